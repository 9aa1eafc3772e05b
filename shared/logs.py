"""Log lines for every process: ``--log-format text`` (one human line) or ``json`` (one object a line).

A JSON line holds ts (UTC, ISO 8601 with milliseconds), level, logger, role (the process, as
"api", "tokenizer-1", "scheduler r1"), pid, message, and request_id when the line is about a
request: from ``extra={"request_id": ...}`` or, in an api process, from the ``REQUEST_ID``
context variable the request middleware sets for the handler and the tasks it starts. A line
may carry more keys as ``extra={"fields": {...}}`` (the access log's status, tokens, timings).
Text lines show the request id after the logger name, ``[req ID]``, unless the message names it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar

LOG_FORMATS = ("text", "json")
# the id of the request the running code serves (api processes; the engine processes pass it in `extra`)
REQUEST_ID: ContextVar[str | None] = ContextVar("zeroserve_request_id", default=None)


def _request_id(record: logging.LogRecord) -> str | None:
    rid = getattr(record, "request_id", None)
    return rid if rid is not None else REQUEST_ID.get()


class TextFormatter(logging.Formatter):
    def __init__(self, role: str):
        super().__init__(f"%(asctime)s %(levelname)s [{role} %(process)d] %(name)s: %(req_tag)s%(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        rid = _request_id(record)
        # a line that already names its request (the engine's "request ID: ...") needs no tag
        record.req_tag = "" if rid is None or rid in record.message else f"[req {rid}] "
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "role": self.role,
            "pid": record.process,
            "message": record.getMessage(),
        }
        rid = _request_id(record)
        if rid is not None:
            line["request_id"] = rid
        fields = getattr(record, "fields", None)
        if fields:
            for k, v in fields.items():
                line.setdefault(k, v)
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def make_formatter(role: str, log_format: str = "text") -> logging.Formatter:
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    return JsonFormatter(role) if log_format == "json" else TextFormatter(role)


def configure(role: str, level: int | str, log_format: str = "text") -> None:
    """The root logger writes to stderr in ``log_format``; a second call (a process that learns
    its format after it started logging) replaces the first one's handler."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_zeroserve", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._zeroserve = True  # type: ignore[attr-defined]
    handler.setFormatter(make_formatter(role, log_format))
    root.addHandler(handler)
    root.setLevel(level)

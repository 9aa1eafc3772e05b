"""The request-end seam: one ``RequestContext`` per HTTP request, one ``RequestRecord`` at its end.

``request_middleware`` (the outermost middleware) takes the client's ``X-Request-Id`` (or makes
one), stores a ``RequestContext`` in ``request[REQUEST_CTX]`` and sets the request-id context
variable that log lines read (shared/logs.py). Handlers fill in what they learn (model, tokens,
finish reason, replica, TTFT). When the handler is done, however it ended (answered, ApiError,
HTTPException, client gone: ``finally``), the middleware freezes the context into one
``RequestRecord`` and hands it to every sink in ``ApiState.request_sinks``: the access log (this
module), the audit writer, the tracing span's end. Sinks run on the event loop, so each must
enqueue and return; one that raises is logged once and the others still run.

Probes and scrapes (/health, /ready, /metrics, /dashboard...) get an id on their response but
no record. ``X-Request-Id`` goes on every response, SSE streams and errors included, through
``on_response_prepare``.

``run_recorded`` is the same for a request that does not come over HTTP (``zeroserve batch``):
it runs ``complete_body`` and hands the record to the sinks given.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
from aiohttp import web

from zeroserve.api_proc.errors import ApiError, error_response
from zeroserve.shared.logs import REQUEST_ID

log = logging.getLogger("zeroserve.api")
access_log = logging.getLogger("zeroserve.access")

REQUEST_ID_HEADER = "X-Request-Id"
MODEL_VERSION_HEADER, MODEL_NAME_HEADER = "X-Model-Version", "X-Model-Name"
MAX_REQUEST_ID_LENGTH = 128
# no record for these: probes and scrapes would drown the access log and the audit trail
UNRECORDED_PREFIXES = ("/health", "/ready", "/metrics", "/dashboard")
# the status of a request whose client left before it was answered (nginx's convention)
CLIENT_CLOSED = 499


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_error(value: str) -> str | None:
    """Why ``value`` cannot be a request id, or None. Ids go into log lines, engine request ids
    and headers: visible ASCII only (no spaces, no control characters), bounded length."""
    if len(value) > MAX_REQUEST_ID_LENGTH:
        return f"is {len(value)} characters long; at most {MAX_REQUEST_ID_LENGTH} are allowed"
    if not all("!" <= c <= "~" for c in value):
        return "may hold only visible ASCII characters (no spaces or control characters)"
    return None


class RequestContext:
    """What is known about one request while it runs; handlers fill it in."""

    __slots__ = (
        "request_id", "started_at", "started_mono", "endpoint", "method", "client", "tenant", "model",
        "version", "stream", "prompt_tokens", "completion_tokens", "cached_tokens", "finish_reason",
        "replica", "ttft_s", "prompt_text", "output_text", "trace", "error_type",
    )  # fmt: skip

    def __init__(self, request_id: str, endpoint: str, method: str = "POST", client: str = ""):
        self.request_id = request_id
        self.started_at = time.time()
        self.started_mono = time.monotonic()
        self.endpoint = endpoint
        self.method = method
        self.client = client
        self.tenant: str | None = None  # the auth middleware: the name of the key that matched
        self.model: str | None = None
        self.version: str | None = None
        self.stream = False
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.finish_reason: str | None = None  # the first choice's; "error" when an engine error ended it
        self.replica: str | None = None  # the replica id ("r0"), as the router names it
        self.ttft_s: float | None = None
        self.prompt_text: str | None = None  # only when ApiState.wants_text
        self.output_text: str | None = None
        self.trace: Any = None  # tracing's slot: the api span or its context
        # the OpenAI error code (else type) when the request failed, in-band stream errors included
        self.error_type: str | None = None

    def note_error(self, err: ApiError) -> None:
        self.error_type = err.code or err.type

    def record(self, status: int) -> RequestRecord:
        return RequestRecord(
            request_id=self.request_id,
            started_at=self.started_at,
            endpoint=self.endpoint,
            method=self.method,
            status=status,
            error_type=self.error_type,
            tenant=self.tenant,
            client=self.client,
            model=self.model,
            version=self.version,
            replica=self.replica,
            stream=self.stream,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens,
            finish_reason=self.finish_reason,
            ttft_s=self.ttft_s,
            e2e_s=time.monotonic() - self.started_mono,
            prompt_text=self.prompt_text,
            output_text=self.output_text,
        )


class RequestRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One finished request, as every sink gets it (once)."""

    request_id: str
    started_at: float  # wall clock (time.time()) at arrival
    endpoint: str
    method: str
    status: int  # the HTTP status sent (499: the client left before an answer)
    error_type: str | None
    tenant: str | None
    client: str
    model: str | None
    version: str | None
    replica: str | None  # the replica id ("r0")
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: str | None
    ttft_s: float | None
    e2e_s: float
    prompt_text: str | None
    output_text: str | None


Sink = Callable[[RequestRecord], None]
REQUEST_CTX = web.RequestKey("zeroserve_request_ctx", RequestContext)  # request[REQUEST_CTX]


def context_of(request: web.Request) -> RequestContext | None:
    return request.get(REQUEST_CTX)


def note_error(request: web.Request, err: ApiError) -> None:
    """Called by the error middleware for the error it answers with."""
    ctx = request.get(REQUEST_CTX)
    if ctx is not None:
        ctx.note_error(err)


# sinks that raised, by id; the sink is kept so that its id cannot be reused by another one
_failed_sinks: dict[int, Sink] = {}


def deliver(record: RequestRecord, sinks: Iterable[Sink]) -> None:
    for sink in sinks:
        try:
            sink(record)
        except Exception:
            if id(sink) not in _failed_sinks:  # once: a broken sink must not flood the log
                _failed_sinks[id(sink)] = sink
                log.exception("request sink %r failed (logged once; it keeps being called)", sink)


def request_middleware(sinks: Callable[[], list[Sink]]):
    """The outermost middleware; ``sinks()`` is read at each request's end (ApiState.request_sinks)."""

    @web.middleware
    async def request_context(request: web.Request, handler):
        given = request.headers.get(REQUEST_ID_HEADER, "")
        why = request_id_error(given) if given else None
        ctx = RequestContext(
            given if given and why is None else new_request_id(),
            request.path,
            request.method,
            request.remote or "",
        )
        request[REQUEST_CTX] = ctx
        token = REQUEST_ID.set(ctx.request_id)
        status = CLIENT_CLOSED
        try:
            if why is not None:
                err = ApiError(400, f"The {REQUEST_ID_HEADER} header {why}.", param=REQUEST_ID_HEADER)
                ctx.note_error(err)
                response = error_response(err)
            else:
                response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:  # redirects and the like (the error middleware answers >= 400)
            status = e.status
            raise
        except asyncio.CancelledError:
            ctx.error_type = ctx.error_type or "client_disconnected"
            raise
        except Exception:  # escaped the error middleware: aiohttp answers 500
            status = 500
            ctx.error_type = ctx.error_type or "server_error"  # the error middleware's 500 type
            raise
        finally:
            REQUEST_ID.reset(token)
            if not request.path.startswith(UNRECORDED_PREFIXES):
                deliver(ctx.record(status), sinks())

    return request_context


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response carries its request's id (errors and streams too), and
    one that a model version served (or tried to) carries X-Model-Version and X-Model-Name."""
    ctx = request.get(REQUEST_CTX)
    if ctx is not None:
        response.headers[REQUEST_ID_HEADER] = ctx.request_id
        if ctx.version is not None:  # set by the model router (api_proc/versions.py): provenance
            response.headers[MODEL_VERSION_HEADER] = ctx.version
            response.headers[MODEL_NAME_HEADER] = ctx.model or ""


def install(app: web.Application) -> None:
    app.on_response_prepare.append(add_request_id_header)


# --------------------------------------------------------------------------- access log


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)


def access_log_sink(log_prompts: bool = False) -> Sink:
    """The INFO line per request. With the JSON formatter its fields are the line's keys; the
    prompt and output text only with ``log_prompts`` (--log-prompts)."""

    def sink(r: RequestRecord) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        fields: dict[str, Any] = {
            "request_id": r.request_id,
            "method": r.method,
            "endpoint": r.endpoint,
            "status": r.status,
            "model": r.model,
            "version": r.version,
            "replica": r.replica,
            "stream": r.stream,
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "cached_tokens": r.cached_tokens,
            "finish_reason": r.finish_reason,
            "error": r.error_type,
            "ttft_ms": _ms(r.ttft_s),
            "e2e_ms": _ms(r.e2e_s),
            "client": r.client,
            "tenant": r.tenant,
        }
        if log_prompts:
            fields["prompt"] = r.prompt_text
            fields["output"] = r.output_text
        access_log.info(
            "%s %s %d %s prompt=%d output=%d finish=%s ttft_ms=%s e2e_ms=%s client=%s%s",
            r.method,
            r.endpoint,
            r.status,
            r.model or "-",
            r.prompt_tokens,
            r.completion_tokens,
            r.finish_reason or r.error_type or "-",
            fields["ttft_ms"],
            fields["e2e_ms"],
            r.client or "-",
            f" prompt={r.prompt_text!r} output={r.output_text!r}" if log_prompts else "",
            extra={"request_id": r.request_id, "fields": fields},
        )

    return sink


# --------------------------------------------------------------------------- batch


async def run_recorded(
    ctx: RequestContext,
    client: Any,
    config: Any,
    url: str,
    body: bytes,
    sinks: Iterable[Sink] = (),
    wants_text: bool = False,
) -> dict:
    """``serving.complete_body`` for a request that did not come over HTTP, with its record
    handed to ``sinks`` at the end (status 200, or the ApiError's, which is re-raised)."""
    from zeroserve.api_proc.serving import complete_body

    token = REQUEST_ID.set(ctx.request_id)
    status = 500
    try:
        result = await complete_body(client, config, url, body, ctx=ctx, wants_text=wants_text)
        status = 200
        return result
    except ApiError as e:
        status = e.status
        ctx.note_error(e)
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    except Exception:  # a bug: the batch job files it as a 500 for this line
        ctx.error_type = ctx.error_type or "server_error"
        raise
    finally:
        REQUEST_ID.reset(token)
        deliver(ctx.record(status), sinks)

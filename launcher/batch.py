"""`zeroserve batch INPUT.jsonl OUTPUT.jsonl`: an OpenAI Batch file run over the ZMQ client.

Each input line is ``{"custom_id", "method": "POST", "url": "/v1/completions" |
"/v1/chat/completions" | "/v1/embeddings", "body": {...}}``; each yields exactly one output line
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error", "model", "version"}`` whose
body is what the HTTP API would return for the same body (same code: api_proc.serving);
``model`` and ``version`` name what produced a result (null on an error line; the engine's one
model is version "v1", as an api process without a registry serves it).
A line that is not JSON (or nests too deeply to decode) or is invalid becomes an error line
(status 400) and the job goes on; a line without a usable custom_id gets ``line-N`` (with a
``-K`` suffix where the input also has that string as a custom_id). Transient failures (429,
502, 503, 504: queue full, a worker restarting) are retried with exponential backoff, up to
--max-retries times, before they are written as errors. Re-running with the same OUTPUT skips
the custom_ids already there, so an interrupted job continues where it stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field

URLS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")
RETRY_STATUSES = frozenset({429, 502, 503, 504})  # the engine is busy or restarting, not the request's fault
BACKOFF_START_S, BACKOFF_MAX_S = 1.0, 30.0

log = logging.getLogger("zeroserve.batch")


def add_parser(sub) -> None:
    from zeroserve.launcher.engine_args import add_engine_args

    p = sub.add_parser(
        "batch",
        help="run an OpenAI batch-format JSONL file through the engine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="input JSONL (OpenAI batch format)")
    p.add_argument("output", help="output JSONL; existing results are kept and their custom_ids skipped")
    p.add_argument(
        "--address",
        default=None,
        help="a running engine's tokenizer socket (e.g. ipc:///run/zeroserve/tokenizer-0.sock); "
        "default: start an engine for the job on MODEL",
    )
    p.add_argument("--max-concurrency", type=int, default=64, help="requests in flight at once (default 64)")
    p.add_argument(
        "--max-retries",
        type=int,
        default=10,
        help="retries of a request that failed with 429/502/503/504, backing off from 1 s doubling "
        "to 30 s (default 10)",
    )
    p.add_argument(
        "--model", dest="model", default=None, help="model for a self-started engine (default: SmolLM2)"
    )
    add_engine_args(p, with_model=False)


@dataclass
class Job:
    """One input line, parsed: either a request to run or an error to write."""

    line_no: int
    custom_id: str
    url: str = ""
    body: bytes = b""
    error: str | None = None


@dataclass
class Summary:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    retries: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.monotonic)


def _decode(raw: str, n: int) -> dict | str:
    """A line's JSON object, or why it is not one."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        return f"line {n} is not valid JSON: {e.msg}"
    except RecursionError:  # a hostile line must not end the job (on every resume, too)
        return f"line {n} is not valid JSON: it nests too deeply"
    return obj if isinstance(obj, dict) else f"line {n} is not a JSON object"


def parse_lines(lines: list[str]) -> list[Job]:
    decoded = [(n, _decode(raw, n)) for n, raw in enumerate(lines, 1) if raw.strip()]
    # a generated id must never equal a custom_id of the input, or resume would mix them up
    taken = {obj.get("custom_id") for _, obj in decoded if isinstance(obj, dict)}
    jobs, seen = [], set()

    def fallback(n: int) -> str:
        cid, k = f"line-{n}", 2
        while cid in taken or cid in seen:
            cid, k = f"line-{n}-{k}", k + 1
        seen.add(cid)
        return cid

    for n, obj in decoded:
        if isinstance(obj, str):
            jobs.append(Job(n, fallback(n), error=obj))
            continue
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid or cid in seen:
            why = "a duplicate custom_id" if isinstance(cid, str) and cid in seen else "no string custom_id"
            own = fallback(n)
            jobs.append(Job(n, own, error=f"line {n} has {why}; its result is filed under {own!r}"))
            continue
        seen.add(cid)
        if obj.get("method", "POST") != "POST":
            jobs.append(Job(n, cid, error=f"method must be POST, got {obj.get('method')!r}"))
        elif obj.get("url") not in URLS:
            jobs.append(Job(n, cid, error=f"url must be one of {', '.join(URLS)}, got {obj.get('url')!r}"))
        elif not isinstance(obj.get("body"), dict):
            jobs.append(Job(n, cid, error="body must be a JSON object"))
        else:
            try:
                jobs.append(Job(n, cid, url=obj["url"], body=json.dumps(obj["body"]).encode()))
            except RecursionError:
                jobs.append(Job(n, cid, error="body nests too deeply"))
    return jobs


def _result(raw: bytes) -> tuple[str, int] | None:
    """(custom_id, HTTP status) of a complete output line, or None."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    if not isinstance(cid, str):
        return None
    status = (obj.get("response") or {}).get("status_code") if isinstance(obj.get("response"), dict) else None
    return cid, status if isinstance(status, int) else 0


def done_ids(path: str) -> set[str]:
    """custom_ids already in OUTPUT.

    A job killed mid-write leaves a torn last line: it is cut. A last line that is whole but
    lacks its newline (killed between the two) counts as done and gets its newline. A line
    that does not read as a result anywhere else is kept, and its request runs again. A line
    that failed transiently (429, 503, ... after the retries ran out) is removed, so the
    resumed job runs its request again and writes one line for it, not two."""
    if not os.path.exists(path):
        return set()
    ids: set[str] = set()
    kept: list[bytes] = []
    unreadable = retried = 0
    rewrite = False
    with open(path, "rb") as f:
        for raw in f:
            result = _result(raw)
            if not raw.endswith(b"\n"):  # the last line
                if result is None:  # torn: cut it
                    rewrite = True
                    continue
                raw += b"\n"
                rewrite = True
            if result is None:
                unreadable += 1
            elif result[1] in RETRY_STATUSES:
                retried += 1
                rewrite = True
                continue
            else:
                ids.add(result[0])
            kept.append(raw)
    if rewrite:  # atomically: a crash now leaves either the old file or the new one
        tmp = f"{path}.resume-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    if unreadable:
        print(f"zeroserve batch: kept {unreadable} line(s) of {path} that are not results", file=sys.stderr)
    if retried:
        print(f"zeroserve batch: running {retried} transiently failed request(s) again", file=sys.stderr)
    return ids


def output_line(
    custom_id: str,
    status: int,
    body: dict,
    request_id: str | None = None,
    model: str | None = None,
    version: str | None = None,
) -> dict:
    """request_id: the id its engine requests and log lines quote (as X-Request-Id over HTTP);
    model and version: what produced the result (provenance, as X-Model-Version over HTTP)."""
    error = None
    if status != 200:
        err = body.get("error", {})
        error = {"code": err.get("code") or err.get("type"), "message": err.get("message")}
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id or uuid.uuid4().hex, "body": body},
        "error": error,
        "model": model,
        "version": version,
    }


def backoff_s(attempt: int, error) -> float:
    """Exponential with jitter (clients that failed together do not come back together), never
    sooner than the server's Retry-After."""
    delay = min(BACKOFF_MAX_S, BACKOFF_START_S * 2**attempt) * random.uniform(0.5, 1.0)
    try:
        return max(delay, float(error.headers.get("Retry-After", 0)))
    except ValueError:
        return delay


def encode_line(line: dict) -> str:
    text = json.dumps(line, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (from a \ud800 escape in the input): keep it escaped
        text = json.dumps(line)
    return text + "\n"


async def run_jobs(
    jobs: list[Job],
    out,
    client,
    api_config,
    max_concurrency: int,
    summary: Summary,
    progress,
    max_retries: int = 10,
    sinks: list | None = None,
    wants_text: bool = False,
) -> None:
    """sinks: each gets every attempt's RequestRecord (api_proc.request_log), as over HTTP."""
    from zeroserve.api_proc.errors import ApiError
    from zeroserve.api_proc.request_log import RequestContext, new_request_id, run_recorded
    from zeroserve.api_proc.versions import STATIC_VERSION

    semaphore = asyncio.Semaphore(max_concurrency)

    def write(line: dict, ok: bool) -> None:
        out.write(encode_line(line))
        out.flush()
        if ok:
            summary.done += 1
        else:
            summary.failed += 1
        rate = summary.tokens / max(time.monotonic() - summary.started, 1e-9)
        progress.set_postfix(failed=summary.failed, tok_s=f"{rate:.1f}", refresh=False)
        progress.update(1)

    async def one(job: Job) -> None:
        rid = new_request_id()  # every attempt of the line runs under it
        if job.error is not None:
            write(output_line(job.custom_id, 400, ApiError(400, job.error).body(), rid), False)
            return
        async with semaphore:
            for attempt in range(max_retries + 1):
                ctx = RequestContext(rid, job.url, "POST", "batch")
                ctx.version = STATIC_VERSION  # one engine, no registry: its model is version v1
                try:
                    body = await run_recorded(
                        ctx, client, api_config, job.url, job.body, sinks or (), wants_text
                    )
                    break
                except ApiError as e:
                    if e.status not in RETRY_STATUSES or attempt == max_retries:
                        write(output_line(job.custom_id, e.status, e.body(), rid), False)
                        return
                    delay = backoff_s(attempt, e)
                except Exception:  # one request's bug must not end the job: log it, file an error
                    log.exception(
                        "batch line %d (%s) failed", job.line_no, job.custom_id, extra={"request_id": rid}
                    )
                    error = ApiError(500, "internal error while running this request; see the log")
                    write(output_line(job.custom_id, 500, error.body(), rid), False)
                    return
                summary.retries += 1
                await asyncio.sleep(delay)
            summary.tokens += body.get("usage", {}).get("completion_tokens", 0)
            write(output_line(job.custom_id, 200, body, rid, ctx.model, ctx.version), True)

    await asyncio.gather(*(one(j) for j in jobs))


async def run_batch(args: argparse.Namespace, address: str | list[str], curve, api_config) -> Summary:
    from tqdm import tqdm

    from zeroserve.shared.client import EngineClient

    with open(args.input, encoding="utf-8", errors="replace") as f:
        jobs = parse_lines(f.read().splitlines())
    finished = done_ids(args.output)
    todo = [j for j in jobs if j.custom_id not in finished]
    summary = Summary(skipped=len(jobs) - len(todo))
    if summary.skipped:
        print(
            f"zeroserve batch: resuming: {summary.skipped} line(s) already in {args.output}", file=sys.stderr
        )
    # what gets each request's record (api_proc.request_log.RequestRecord); the output lines are
    # the job's own account, so no access log line here
    sinks: list = []
    audit = batch_audit_writer(args)  # the audit trail (docs/audit.md); None with --audit-db off
    if audit is not None:
        audit.start()
        sinks.append(audit.submit)
    try:
        async with EngineClient(address, curve) as client:
            try:
                pong = await client.wait_ready(600)
            except TimeoutError as e:
                raise SystemExit(f"zeroserve batch: {e}") from None
            if api_config is None:
                from zeroserve.api_proc.config import ApiConfig

                model_name = pong.engine.model_name if pong.engine is not None else ""
                api_config = ApiConfig(engine_address=address, model_name=model_name)
            with (
                open(args.output, "a", encoding="utf-8") as out,
                tqdm(
                    total=len(todo), desc="batch", unit="req", file=sys.stderr, dynamic_ncols=True
                ) as progress,
            ):
                task = asyncio.ensure_future(
                    run_jobs(
                        todo,
                        out,
                        client,
                        api_config,
                        args.max_concurrency,
                        summary,
                        progress,
                        args.max_retries,
                        sinks,
                        audit is not None and audit.content != "none",
                    )
                )
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, task.cancel)
                try:
                    await task
                except asyncio.CancelledError:
                    print(
                        "\nzeroserve batch: interrupted; finished results are saved, run again to resume",
                        file=sys.stderr,
                    )
                    summary.failed = -1
    finally:  # however the job ended: spool what was handed in (the spool keeps what the database lacks)
        if audit is not None:
            await asyncio.to_thread(audit.close)
    return summary


def batch_audit_writer(args: argparse.Namespace):
    """The audit writer of a batch job (source "batch", spool STATE_DIR/audit-spool/batch.spool)."""
    from zeroserve.api_proc.audit import StoreError, audit_writer
    from zeroserve.shared import env

    try:
        return audit_writer(
            args.audit_db or "",
            os.path.abspath(args.state_dir) if args.state_dir else env.state_dir(),
            "batch",
            args.audit_content,
            args.audit_retention_days,
            source="batch",
        )
    except StoreError as e:
        raise SystemExit(f"zeroserve batch: {e}") from None


def run(args: argparse.Namespace) -> int:
    api_config, supervisor = None, None
    if args.address:
        address, curve = args.address, None
    else:
        from zeroserve.api_proc.config import ApiConfig
        from zeroserve.launcher.supervisor import Supervisor, engine_config
        from zeroserve.shared.ipc import client_keys

        args.api_workers = 0
        config, run_dir = engine_config(args)
        supervisor = Supervisor(config, run_dir)
        address, curve = config.tokenizer_addresses, client_keys(config.curve)
        api_config = ApiConfig.from_engine(config)
        print(f"zeroserve batch: starting an engine for {config.served_model_name}...", file=sys.stderr)
    try:
        if supervisor is not None:
            supervisor.start()
        summary = asyncio.run(run_batch(args, address, curve, api_config))
    finally:
        if supervisor is not None:
            supervisor.shutdown()
    if summary.failed < 0:
        return 130
    elapsed = time.monotonic() - summary.started
    print(
        f"zeroserve batch: {summary.done} done, {summary.failed} failed, {summary.skipped} skipped (already done); "
        f"{summary.tokens} completion tokens in {elapsed:.1f}s ({summary.tokens / max(elapsed, 1e-9):.1f} tok/s)"
        + (f"; {summary.retries} transient failure(s) retried" if summary.retries else ""),
        file=sys.stderr,
    )
    return 0

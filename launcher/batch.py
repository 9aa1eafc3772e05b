"""`zeroserve batch INPUT.jsonl OUTPUT.jsonl`: an OpenAI Batch file run over the ZMQ client.

Each input line is ``{"custom_id", "method": "POST", "url": "/v1/completions" |
"/v1/chat/completions", "body": {...}}``; each yields exactly one output line
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`` whose
body is what the HTTP API would return for the same body (same code: api_proc.serving).
A line that is not JSON or is invalid becomes an error line (status 400) and the job goes
on; a line without a usable custom_id gets ``line-N``. Re-running with the same OUTPUT skips
the custom_ids already there, so an interrupted job continues where it stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field

URLS = ("/v1/completions", "/v1/chat/completions")


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
    tokens: int = 0
    started: float = field(default_factory=time.monotonic)


def parse_lines(lines: list[str]) -> list[Job]:
    jobs, seen = [], set()
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        fallback = f"line-{n}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            jobs.append(Job(n, fallback, error=f"line {n} is not valid JSON: {e.msg}"))
            continue
        if not isinstance(obj, dict):
            jobs.append(Job(n, fallback, error=f"line {n} is not a JSON object"))
            continue
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid or cid in seen:
            why = "a duplicate custom_id" if isinstance(cid, str) and cid in seen else "no string custom_id"
            jobs.append(Job(n, fallback, error=f"line {n} has {why}; its result is filed under {fallback!r}"))
            seen.add(fallback)
            continue
        seen.add(cid)
        if obj.get("method", "POST") != "POST":
            jobs.append(Job(n, cid, error=f"method must be POST, got {obj.get('method')!r}"))
        elif obj.get("url") not in URLS:
            jobs.append(Job(n, cid, error=f"url must be one of {', '.join(URLS)}, got {obj.get('url')!r}"))
        elif not isinstance(obj.get("body"), dict):
            jobs.append(Job(n, cid, error="body must be a JSON object"))
        else:
            jobs.append(Job(n, cid, url=obj["url"], body=json.dumps(obj["body"]).encode()))
    return jobs


def done_ids(path: str) -> set[str]:
    """custom_ids already in OUTPUT; a torn last line (the job was killed mid-write) is cut."""
    if not os.path.exists(path):
        return set()
    ids, good_bytes = set(), 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                ids.add(json.loads(raw)["custom_id"])
            except (ValueError, KeyError, TypeError):
                break
            if not raw.endswith(b"\n"):
                break
            good_bytes += len(raw)
    if good_bytes != os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return ids


def output_line(custom_id: str, status: int, body: dict) -> dict:
    error = None
    if status != 200:
        err = body.get("error", {})
        error = {"code": err.get("code") or err.get("type"), "message": err.get("message")}
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body},
        "error": error,
    }


async def run_jobs(
    jobs: list[Job], out, client, api_config, limits, max_concurrency: int, summary: Summary, progress
) -> None:
    from zeroserve.api_proc.errors import ApiError
    from zeroserve.api_proc.generate import TokenTexts
    from zeroserve.api_proc.serving import complete_body

    token_texts = TokenTexts(client)
    semaphore = asyncio.Semaphore(max_concurrency)

    def write(line: dict, ok: bool) -> None:
        out.write(json.dumps(line, ensure_ascii=False) + "\n")
        out.flush()
        if ok:
            summary.done += 1
        else:
            summary.failed += 1
        rate = summary.tokens / max(time.monotonic() - summary.started, 1e-9)
        progress.set_postfix(failed=summary.failed, tok_s=f"{rate:.1f}", refresh=False)
        progress.update(1)

    async def one(job: Job) -> None:
        if job.error is not None:
            write(output_line(job.custom_id, 400, ApiError(400, job.error).body()), False)
            return
        async with semaphore:
            try:
                body = await complete_body(client, api_config, limits, job.url, job.body, token_texts)
            except ApiError as e:
                write(output_line(job.custom_id, e.status, e.body()), False)
                return
            summary.tokens += body.get("usage", {}).get("completion_tokens", 0)
            write(output_line(job.custom_id, 200, body), True)

    await asyncio.gather(*(one(j) for j in jobs))


async def run_batch(args: argparse.Namespace, address: str | list[str], curve, api_config) -> Summary:
    from tqdm import tqdm

    from zeroserve.api_proc.requests import EngineLimits
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
    async with EngineClient(address, curve) as client:
        try:
            pong = await client.wait_ready(600)
        except TimeoutError as e:
            raise SystemExit(f"zeroserve batch: {e}") from None
        if api_config is None:
            from zeroserve.api_proc.config import ApiConfig

            api_config = ApiConfig(engine_address=address, model_name=str(pong.info.get("model_name", "")))
        limits = EngineLimits(
            max_model_len=int(pong.info["max_model_len"]), vocab_size=int(pong.info["vocab_size"])
        )
        with (
            open(args.output, "a", encoding="utf-8") as out,
            tqdm(total=len(todo), desc="batch", unit="req", file=sys.stderr, dynamic_ncols=True) as progress,
        ):
            task = asyncio.ensure_future(
                run_jobs(todo, out, client, api_config, limits, args.max_concurrency, summary, progress)
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
    return summary


def run(args: argparse.Namespace) -> int:
    api_config, supervisor = None, None
    if args.address:
        address, curve = args.address, None
    else:
        from zeroserve.api_proc.config import ApiConfig
        from zeroserve.launcher.engine_args import config_from_args
        from zeroserve.launcher.supervisor import Supervisor

        args.api_workers = 0
        config = config_from_args(args)
        supervisor = Supervisor(config)
        supervisor.start()
        address, curve = config.tokenizer_addresses, config.curve
        api_config = ApiConfig.from_engine(config)
        print(f"zeroserve batch: starting an engine for {config.served_model_name}...", file=sys.stderr)
    try:
        summary = asyncio.run(run_batch(args, address, curve, api_config))
    finally:
        if supervisor is not None:
            supervisor.shutdown()
    if summary.failed < 0:
        return 130
    elapsed = time.monotonic() - summary.started
    print(
        f"zeroserve batch: {summary.done} done, {summary.failed} failed, {summary.skipped} skipped (already done); "
        f"{summary.tokens} completion tokens in {elapsed:.1f}s ({summary.tokens / max(elapsed, 1e-9):.1f} tok/s)",
        file=sys.stderr,
    )
    return 0

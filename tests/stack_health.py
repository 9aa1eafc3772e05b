"""Checks that a real zeroserve stack came through a barrage unharmed (issue 13): the engine
is idle with every KV block free, no process died or restarted, nothing went unhandled, and
error bodies have OpenAI's shape. Shared by the soak (tests/engine/test_soak.py) and the fuzz
test (tests/api_proc/test_fuzz.py)."""

from __future__ import annotations

import asyncio
import json
import time

from zeroserve.shared.client import EngineClient, EngineError
from zeroserve.shared.messages import SamplingParams, SchedulerStats

# lines the launcher and api_proc write when something broke that a client may not have seen
BAD_LOG_LINES = ("restarting", "unhandled error", "Traceback")


def engine_stats(server) -> SchedulerStats:
    """The scheduler's latest report, as a tokenizer relays it (fresh within a heartbeat)."""

    async def ask() -> SchedulerStats:
        async with EngineClient(server.tokenizer_address) as client:
            return (await client.ping(timeout=5)).engine.stats

    return asyncio.run(ask())


def wait_engine_idle(server, timeout: float = 60.0) -> SchedulerStats:
    """Wait until nothing runs or waits and every KV block is free (cached prefix blocks with
    no reader count as free: ``num_free_blocks`` includes them); fail with the last stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine_stats(server)
        idle = stats.num_running == 0 and stats.num_waiting == 0
        if idle and stats.num_kv_blocks > 0 and stats.num_free_blocks == stats.num_kv_blocks:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the engine is not idle with every KV block free {timeout:.0f}s after the last request: "
                f"{stats}\n{full_log(server)[-4000:]}"
            )
        time.sleep(0.25)


def full_log(server) -> str:
    with open(server.log_path, errors="replace") as f:
        return f.read()


def assert_unharmed(server, pids_before: list[int], log_offset: int = 0) -> None:
    """Same child processes as before, all alive, and no restart or unhandled error logged
    since ``log_offset`` (the log's length when the barrage began)."""
    log = full_log(server)[log_offset:]
    bad = [line for line in log.splitlines() if any(b in line for b in BAD_LOG_LINES)]
    assert not bad, "the server log reports trouble:\n" + "\n".join(bad[:20]) + "\n" + log[-4000:]
    assert server.process.poll() is None, f"zeroserve exited:\n{log[-4000:]}"
    assert sorted(server.children()) == sorted(pids_before), f"a process died or restarted:\n{log[-4000:]}"


def error_body_problem(raw: bytes) -> str | None:
    """None when ``raw`` is an OpenAI error body ({"error": {"message": str, "type": str, ...}}),
    else what is wrong with it."""
    try:
        body = json.loads(raw)
    except ValueError:
        return f"error body is not JSON: {raw[:200]!r}"
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return f"error body has no error object: {raw[:200]!r}"
    if not isinstance(err.get("message"), str) or not err["message"]:
        return f"error body has no message: {raw[:200]!r}"
    if not isinstance(err.get("type"), str):
        return f"error body has no type: {raw[:200]!r}"
    if "param" not in err or "code" not in err:
        return f"error body lacks param or code: {raw[:200]!r}"
    return None


async def serve_again(server, within_s: float = 90.0, max_tokens: int = 4) -> dict:
    """A completion, retried while the engine answers 503 (a process being restarted), for at
    most ``within_s``: how the failure tests see the engine come back."""
    async with EngineClient(server.tokenizer_address) as client:
        deadline = time.monotonic() + within_s
        while True:
            try:
                return await client.complete(
                    prompt="Hello again", params=SamplingParams(temperature=0, max_tokens=max_tokens)
                )
            except EngineError as e:
                assert e.info.status == 503, e.info
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"engine not serving again within {within_s:g}s:\n" + server.log()
                    ) from e
                await asyncio.sleep(0.5)

"""`zeroserve serve --tensor-parallel-size N` as processes: a size the model cannot split is
refused before anything starts, and a rank killed (or stopped: alive but silent) mid-stream
fails the in-flight requests within 2 s, the supervisor restarts the whole group, and the
server serves again with no orphans."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import tempfile
import time

from tests.conftest import start_server, zeroserve_command
from tests.engine.test_engine_failures import pid_alive, stream_until_done
from tests.stack_health import serve_again
from zeroserve.shared.client import EngineClient


def worker_pids(server) -> dict[int, int]:
    """rank -> pid of each worker process under the launcher."""
    ranks = {}
    for pid in server.children():
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
        if b"proc" in args and b"worker" in args:
            ranks[int(args[args.index(b"--index") + 1])] = pid
    return ranks


def test_a_size_that_does_not_divide_the_heads_is_refused_at_start():
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.monotonic()
        out = subprocess.run(
            [*zeroserve_command(), "serve", "--run-dir", run_dir, "--tensor-parallel-size", "2"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode != 0
    assert "--tensor-parallel-size 2 does not divide its 9 attention heads" in out.stderr, out.stderr
    assert "sizes that work for this model: 1, 3" in out.stderr
    assert "proc worker" not in out.stderr and time.monotonic() - started < 60


def test_tp3_rank_killed_mid_stream_fails_requests_restarts_the_group():
    server = start_server("--tensor-parallel-size", "3", api_key=None)
    try:
        ranks = worker_pids(server)
        assert sorted(ranks) == [0, 1, 2]
        children = set(server.children())

        async def stream_then_kill(sig: int, rank: int):
            async with EngineClient(server.tokenizer_address) as client:
                events = [asyncio.Event() for _ in range(2)]
                ends = [{} for _ in range(2)]
                tasks = [
                    asyncio.ensure_future(
                        stream_until_done(client, f"Count to a thousand: {i}", 1000, events[i], ends[i])
                    )
                    for i in range(2)
                ]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 120)
                killed_at = time.monotonic()
                os.kill(ranks[rank], sig)
                results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
                return killed_at, results, ends

        def check_failed_fast(killed_at, results, ends, what: str):
            for deltas, end in zip(results, ends):
                assert any(d.token_ids for d in deltas)  # it was streaming
                last = deltas[-1]
                assert last.finish_reason == "error" and last.error is not None, last
                assert "tensor-parallel" in last.error.message, last.error.message
                assert end["end"] - killed_at < 2.0, (
                    f"request ended {end['end'] - killed_at:.2f}s after {what}"
                )

        def check_group_replaced(before: dict[int, int]) -> dict[int, int]:
            assert asyncio.run(serve_again(server, 120, max_tokens=4))["usage"]["completion_tokens"] == 4
            status, _ = server.get("/ready", timeout=5)
            assert status == 200
            after = worker_pids(server)
            assert sorted(after) == [0, 1, 2] and not set(after.values()) & set(before.values()), (
                before,
                after,
            )
            return after

        check_failed_fast(*asyncio.run(stream_then_kill(signal.SIGKILL, 1)), "the kill")
        # every rank is replaced (the group is restarted whole), and the server serves again
        ranks = check_group_replaced(ranks)
        children |= set(server.children())

        # a rank that stops heart-beating (SIGSTOP: alive, silent) is lost the same way
        check_failed_fast(*asyncio.run(stream_then_kill(signal.SIGSTOP, 2)), "the stop")
        check_group_replaced(ranks)
        children |= set(server.children())
    finally:
        code = server.stop()
    assert code == 0, server.log()
    time.sleep(0.5)
    assert not [p for p in children if pid_alive(p)], "orphan processes after shutdown"

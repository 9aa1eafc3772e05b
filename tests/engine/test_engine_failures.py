"""Failure and shutdown behaviour of the process engine: kill -9, garbage frames, SIGTERM drain."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import zmq

from tests.conftest import start_server
from tests.stack_health import serve_again
from zeroserve.shared.client import EngineClient
from zeroserve.shared.messages import SamplingParams


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def role_pid(server, role: str) -> int:
    pids = server.role_pids(role)
    if not pids:
        raise AssertionError(f"no {role} process under the launcher")
    return pids[0]


async def stream_until_done(client, prompt, max_tokens, first_token: asyncio.Event, started_at: dict):
    deltas = []
    async for d in client.generate(
        prompt=prompt, params=SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ):
        if d.token_ids and not first_token.is_set():
            first_token.set()
        deltas.append(d)
    started_at["end"] = time.monotonic()
    return deltas


def test_kill_worker_fails_in_flight_then_recovers_and_no_orphans():
    server = start_server(api_key=None)
    try:
        worker = role_pid(server, "worker")
        children = server.children()

        async def phase1():
            async with EngineClient(server.tokenizer_address) as client:
                events = [asyncio.Event() for _ in range(4)]
                ends = [{} for _ in range(4)]
                tasks = [
                    asyncio.ensure_future(
                        stream_until_done(
                            client, f"Count slowly to one thousand: {i}", 1500, events[i], ends[i]
                        )
                    )
                    for i in range(4)
                ]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
                killed_at = time.monotonic()
                os.kill(worker, signal.SIGKILL)
                results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
                return killed_at, results, ends

        killed_at, results, ends = asyncio.run(phase1())
        for deltas, end in zip(results, ends):
            last = deltas[-1]
            assert last.finish_reason == "error" and last.error is not None, last
            assert "worker" in last.error.message
            assert end["end"] - killed_at < 2.0, f"request ended {end['end'] - killed_at:.2f}s after the kill"

        # the supervisor restarts the worker; the engine serves again within 60 s
        assert asyncio.run(serve_again(server, 60, max_tokens=8))["usage"]["completion_tokens"] == 8
        status, _ = server.get("/ready", timeout=5)
        assert status == 200
        assert role_pid(server, "worker") != worker
        children = set(children) | set(server.children())
    finally:
        code = server.stop()
    assert code == 0, server.log()
    time.sleep(0.5)
    assert not [p for p in children if pid_alive(p)], "orphan processes after shutdown"


def test_kill_scheduler_fails_in_flight_and_the_same_worker_serves_the_new_one():
    """The supervisor restarts the scheduler alone. The worker (still loaded) sees its
    connection drop and come back, forgets its requests and says WorkerReady again: the new
    scheduler serves without a model reload. The requests in flight end with an error."""
    server = start_server(api_key=None)
    try:
        scheduler, worker = role_pid(server, "scheduler"), role_pid(server, "worker")

        async def phase1():
            async with EngineClient(server.tokenizer_address) as client:
                started = asyncio.Event()
                task = asyncio.ensure_future(
                    stream_until_done(client, "Count slowly to one thousand:", 1500, started, {})
                )
                await asyncio.wait_for(started.wait(), 60)
                os.kill(scheduler, signal.SIGKILL)
                return await asyncio.wait_for(task, 30)

        deltas = asyncio.run(phase1())
        assert deltas[-1].finish_reason == "error" and deltas[-1].error is not None, deltas[-1]
        assert asyncio.run(serve_again(server, 30, max_tokens=8))["usage"]["completion_tokens"] == 8
        assert role_pid(server, "scheduler") != scheduler
        assert role_pid(server, "worker") == worker  # announced again, not reloaded
        assert "announced itself again" in server.log()
    finally:
        code = server.stop()
    assert code == 0, server.log()


def test_garbage_frames_on_every_socket_change_nothing(zeroserve_server):
    server = zeroserve_server
    run_dir = server.run_dir
    addresses = [
        f"ipc://{run_dir}/tokenizer-0.sock",
        f"ipc://{run_dir}/scheduler.sock",
        f"ipc://{run_dir}/workers.sock",
    ]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)

    async def reference():
        async with EngineClient(server.tokenizer_address) as client:
            return await client.complete(prompt="Garbage in, garbage out:", params=params)

    expected = asyncio.run(reference())
    pids_before = sorted(server.children())

    async def under_attack():
        async with EngineClient(server.tokenizer_address) as client:
            job = asyncio.ensure_future(client.complete(prompt="Garbage in, garbage out:", params=params))
            ctx = zmq.Context()
            rng = random.Random(0)
            for address in addresses:
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(address)
                for i in range(10_000):
                    n = rng.choice([0, 1, 3, 17, 200, 5000])
                    frame = rng.randbytes(n)
                    if i % 7 == 0:
                        sock.send_multipart([frame, rng.randbytes(8), b""])
                    elif i % 11 == 0:  # valid msgpack of the wrong shape
                        sock.send(b"\x92\xa8generate\x01")
                    else:
                        sock.send(frame)
                    if i % 1000 == 0:
                        await asyncio.sleep(0)
                await asyncio.sleep(0.2)
                sock.close(0)
            ctx.term()
            return await asyncio.wait_for(job, 120), await client.ping(timeout=5)

    got, pong = asyncio.run(under_attack())
    assert got["token_ids"] == expected["token_ids"]
    assert pong.engine.bad_frames >= 10_000, "every frame sent to the tokenizer is counted as dropped"
    assert sorted(server.children()) == pids_before, "a process died or restarted"
    status, _ = server.get("/health")
    assert status == 200


def test_sigterm_drains_in_flight_requests_then_exits_zero():
    server = start_server(api_key=None)
    children = server.children()

    async def main():
        async with EngineClient(server.tokenizer_address) as client:
            events = [asyncio.Event() for _ in range(3)]
            ends = [{} for _ in range(3)]
            tasks = [
                asyncio.ensure_future(stream_until_done(client, f"Story number {i}:", 40, events[i], ends[i]))
                for i in range(3)
            ]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
            server.process.send_signal(signal.SIGTERM)
            return await asyncio.wait_for(asyncio.gather(*tasks), 60)

    results = asyncio.run(main())
    for deltas in results:
        assert deltas[-1].finish_reason == "length", deltas[-1]
        assert sum(len(d.token_ids) for d in deltas) == 40
    assert server.process.wait(60) == 0, server.log()
    assert "every process exited cleanly" in server.log()
    assert not [p for p in children if pid_alive(p)]

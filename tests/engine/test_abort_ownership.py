"""An Abort ends a request only when it comes from the connection that sent the request (at the
tokenizer: the api process or client; at the scheduler: the tokenizer), and a deadline ends a
request that is already running, with finish reason "timeout"."""

from __future__ import annotations

import asyncio
import time

import zmq

from zeroserve.shared.client import EngineClient
from zeroserve.shared.ipc import Codec
from zeroserve.shared.messages import Abort, SamplingParams

PARAMS = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)


def foreign_abort(address: str, request_id: str) -> None:
    """An Abort of ``request_id`` from a connection that never sent it."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.IDENTITY, b"someone-else")
    sock.connect(address)
    sock.send(Codec(Abort, "test").encode(Abort(request_id=request_id)))
    sock.close()
    ctx.term()


def run_with_foreign_abort(server, address: str) -> list:
    async def main():
        async with EngineClient(server.tokenizer_address) as owner:
            deltas, streaming = [], asyncio.Event()

            async def consume():
                async for d in owner.generate(
                    prompt="Tell me about rivers.", params=PARAMS, request_id="owned"
                ):
                    deltas.append(d)
                    streaming.set()

            job = asyncio.ensure_future(consume())
            await asyncio.wait_for(streaming.wait(), 60)
            foreign_abort(address, "owned")
            await asyncio.wait_for(job, 60)
            return deltas

    return asyncio.run(main())


def test_an_abort_from_another_client_is_ignored_by_the_tokenizer(zeroserve_server):
    deltas = run_with_foreign_abort(zeroserve_server, zeroserve_server.tokenizer_address)
    assert deltas[-1].finish_reason == "length", deltas[-1].error
    assert sum(len(d.token_ids) for d in deltas) == PARAMS.max_tokens


def test_an_abort_from_another_peer_is_ignored_by_the_scheduler(zeroserve_server):
    deltas = run_with_foreign_abort(zeroserve_server, f"ipc://{zeroserve_server.run_dir}/scheduler.sock")
    assert deltas[-1].finish_reason == "length", deltas[-1].error
    assert sum(len(d.token_ids) for d in deltas) == PARAMS.max_tokens


def test_the_owner_still_aborts_its_own_request(zeroserve_server):
    async def main():
        async with EngineClient(zeroserve_server.tokenizer_address) as client:
            params = SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True)
            async for d in client.generate(prompt="Count to a thousand:", params=params):
                if d.token_ids:
                    break  # leaving the loop sends the owner's Abort
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                stats = (await client.ping(timeout=5)).engine.stats
                if stats.num_running == 0 and stats.num_waiting == 0:
                    return stats
                await asyncio.sleep(0.1)
            raise AssertionError(f"the request is still in the scheduler: {stats}")

    asyncio.run(main())


def test_a_running_request_ends_at_its_deadline(zeroserve_server):
    async def main():
        async with EngineClient(zeroserve_server.tokenizer_address) as client:
            params = SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True)
            started = time.monotonic()
            deltas = [
                d async for d in client.generate(prompt="Count to a thousand:", params=params, deadline_s=2.0)
            ]
            return deltas, time.monotonic() - started

    deltas, took = asyncio.run(main())
    assert deltas[-1].finish_reason == "timeout" and deltas[-1].error is None, deltas[-1].error
    produced = sum(len(d.token_ids) for d in deltas)
    assert 0 < produced < 1500, "it ran before the deadline, and stopped there"
    assert took < 2.0 + 5, f"ended {took:.1f}s after it was sent"

"""Bounded queues between processes: a peer that stops reading costs the sender a bounded
number of messages, then a clear error, never unbounded memory or a silent loss."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time

import pytest
import zmq
import zmq.asyncio

from zeroserve.shared.client import EngineClient, EngineError
from zeroserve.shared.ipc import HWM, PeerGone, PeerOverloaded, bind, connect, send_now
from zeroserve.shared.messages import Ping, SamplingParams, TokenizeRequest

pytestmark = pytest.mark.timeout(120)  # a socket left open would hang Context.term() for good

# A pipe holds HWM messages at each end, plus what the kernel's socket buffer takes.
LIMIT = 2 * HWM + 5_000


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fill(sock: zmq.Socket, frames: list[bytes]) -> int:
    """Send until the pipe refuses, and again once zmq's io thread has moved what it could
    towards the peer (it runs beside us: on a loaded machine it is still moving at the first
    refusal); how many it took."""
    total = 0
    for _ in range(2):
        for n in range(LIMIT - total):
            try:
                send_now(sock, frames)
            except PeerOverloaded:
                total += n
                break
        else:
            raise AssertionError(f"{LIMIT} messages queued to a peer that reads nothing: unbounded")
        time.sleep(0.5)
    return total


@pytest.fixture
def address():
    run_dir = tempfile.mkdtemp(prefix="zs-hwm-")
    yield f"ipc://{run_dir}/peer.sock"


def test_dealer_to_a_router_that_stops_reading_is_bounded_then_refused(address):
    ctx = zmq.Context()
    try:
        bind(ctx, zmq.ROUTER, address, mandatory=True)  # a ROUTER that never reads
        dealer = connect(ctx, zmq.DEALER, address, identity=b"sender")
        accepted = fill(dealer, [b"x" * 200])
        assert HWM <= accepted < LIMIT
        for _ in range(1000):  # stays refused, and nothing piles up behind the refusal
            with pytest.raises(PeerOverloaded):
                send_now(dealer, [b"x" * 200])
    finally:
        ctx.destroy(linger=0)  # closes every socket first, even after a failed assertion


def test_mandatory_router_reports_a_stalled_peer_and_a_gone_one(address):
    async def main():
        ctx = zmq.asyncio.Context()
        router = bind(ctx, zmq.ROUTER, address, mandatory=True)
        plain = bind(ctx, zmq.ROUTER, address.replace("peer", "plain"))
        try:
            reader = connect(ctx, zmq.DEALER, address, identity=b"slow-reader")
            send_now(reader, [b"hello"])
            identity, _ = await asyncio.wait_for(router.recv_multipart(), 5)
            assert identity == b"slow-reader"
            accepted = fill(router, [identity, b"y" * 200])  # the reader never reads
            assert HWM <= accepted < LIMIT
            with pytest.raises(PeerGone):
                send_now(router, [b"nobody-by-this-name", b"z"])
            # the scheduler's sockets keep zmq's plain ROUTER: an unroutable reply is dropped
            send_now(plain, [b"nobody-by-this-name", b"z"])
        finally:
            ctx.destroy(linger=0)

    asyncio.run(main())


def test_client_whose_tokenizer_stops_reading_gets_overloaded_errors_at_once(address):
    async def main():
        ctx = zmq.asyncio.Context()
        bind(ctx, zmq.ROUTER, address, mandatory=True)  # a hung tokenizer: reads nothing
        try:
            # a long heartbeat timeout: the 503 of a silent engine must not come first
            async with EngineClient(address, heartbeat_timeout_s=60.0) as client:
                fill(client.sockets[0], [client.codec.encode(Ping(sent_at=0.0))])
                before = rss_bytes()
                prompt = "word " * 20_000  # 100 kB a request: 200 MB if the refused ones were kept
                for _ in range(2000):
                    started = asyncio.get_running_loop().time()
                    with pytest.raises(EngineError) as refused:
                        await client.complete(prompt=prompt, params=SamplingParams(max_tokens=4))
                    assert asyncio.get_running_loop().time() - started < 1.0
                    assert refused.value.info.status == 429
                    assert refused.value.info.code == "engine_overloaded"
                    assert "overloaded" in refused.value.info.message
                assert rss_bytes() - before < 50 * 1024 * 1024
                assert not client.streams, "refused requests must not stay registered"
                with pytest.raises(EngineError) as refused:
                    await client.tokenize(TokenizeRequest(request_id="t1", prompt="hi"))
                assert refused.value.info.status == 429
                with pytest.raises(TimeoutError):
                    await client.ping(timeout=5.0)
        finally:
            ctx.destroy(linger=0)

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_send_now_keeps_a_pending_receive_awake(loop, tmp_path):
    """ZMQ's fd is edge-triggered: a send through send_now's plain view of an asyncio socket
    must not swallow the wake-up of a receive parked on the same socket (the tokenizer once
    stopped reading the scheduler's stats this way and declared it dead)."""
    import uvloop

    path = str(tmp_path / "s.sock")

    async def main():
        actx, ctx = zmq.asyncio.Context(), zmq.Context()
        mine = actx.socket(zmq.DEALER)
        peer = ctx.socket(zmq.DEALER)
        mine.bind(f"ipc://{path}")
        peer.connect(f"ipc://{path}")
        try:
            peer.send(b"hello")  # connected both ways
            assert await asyncio.wait_for(mine.recv(), 5) == b"hello"
            receiving = asyncio.ensure_future(mine.recv())
            await asyncio.sleep(0.05)  # the receive is parked on the socket's fd
            peer.send(b"reply")
            time.sleep(0.1)  # it arrives while this loop does not run...
            send_now(mine, [b"ping"])  # ...and the send sees the arrival
            assert await asyncio.wait_for(receiving, 2) == b"reply"
        finally:
            ctx.destroy(linger=0)
            actx.destroy(linger=0)

    (uvloop.run if loop == "uvloop" else asyncio.run)(main())

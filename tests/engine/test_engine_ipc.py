"""shared/ipc.py's receive helpers, the one path every process reads its sockets through: on
each socket kind a bad frame is counted and dropped, and the next good message still arrives.
And the Pong an api process reads is typed all the way down."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import zmq
import zmq.asyncio

from zeroserve.shared.ipc import Codec, receive, receive_blocking, receive_routed
from zeroserve.shared.messages import (
    ApiInbox,
    EngineStatus,
    Ping,
    Pong,
    SchedulerInbox,
    SchedulerStats,
    SchedulerWorkerInbox,
    StepPlan,
    TokenDeltas,
    TokenizerEngineInbox,
    TokenizerInbox,
    WorkerInbox,
    WorkerReady,
)

GARBAGE = [
    b"",
    b"\x00",
    b"\x92\xa8generate\x01",  # msgpack of the wrong shape
    msgspec.msgpack.encode(["pong", "not a time", "tokenizer"]),  # a known tag with wrong field types
]
# a valid message, but of the workers' inbox, not of any inbox a ROUTER or async DEALER reads
FOREIGN = msgspec.msgpack.encode(StepPlan(step_id=1))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


@pytest.mark.parametrize(
    "inbox, good",
    [
        (TokenizerInbox, Ping(sent_at=1.0)),  # tokenizer_proc's front
        (SchedulerInbox, Ping(sent_at=2.0)),  # scheduler_proc's front
        (SchedulerWorkerInbox, Pong(sent_at=3.0, role="worker")),  # scheduler_proc's workers
    ],
)
def test_router_drops_bad_frames_and_messages_of_the_wrong_shape(inbox, good):
    async def main():
        ctx = zmq.asyncio.Context()
        router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        router.bind("inproc://router")
        dealer.setsockopt(zmq.IDENTITY, b"peer")
        dealer.connect("inproc://router")
        codec: Codec = Codec(inbox, "test.router")
        for frame in [*GARBAGE, FOREIGN]:
            await dealer.send(frame)
        await dealer.send_multipart([b"two", b"frames"])  # three at the ROUTER: not [identity, payload]
        await dealer.send(codec.encode(good))
        try:
            return codec.bad_frames, await receive_routed(router, codec), codec.bad_frames
        finally:
            ctx.destroy(linger=0)

    before, (identity, msg), after = run(main())
    assert before == 0 and (identity, msg) == (b"peer", good)
    assert after == len(GARBAGE) + 2


@pytest.mark.parametrize(
    "inbox, good",
    [
        (TokenizerEngineInbox, TokenDeltas(deltas=[])),  # tokenizer_proc's scheduler socket
        (ApiInbox, Pong(sent_at=4.0, role="tokenizer")),  # EngineClient (api_proc, batch jobs)
    ],
)
def test_dealer_drops_bad_frames(inbox, good):
    async def main():
        ctx = zmq.asyncio.Context()
        router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        router.bind("inproc://dealer")
        dealer.setsockopt(zmq.IDENTITY, b"me")
        dealer.connect("inproc://dealer")
        await dealer.send(b"hello")  # the ROUTER learns the DEALER's identity
        await router.recv_multipart()
        codec: Codec = Codec(inbox, "test.dealer")
        for frame in [*GARBAGE, FOREIGN, codec.encode(good)]:
            await router.send_multipart([b"me", frame])
        try:
            return await receive(dealer, codec), codec.bad_frames
        finally:
            ctx.destroy(linger=0)

    msg, bad_frames = run(main())
    assert msg == good and bad_frames == len(GARBAGE) + 1


def test_blocking_dealer_of_the_worker_drops_bad_frames():
    ctx = zmq.Context()
    try:
        router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        router.bind("inproc://worker")
        dealer.setsockopt(zmq.IDENTITY, b"worker")
        dealer.connect("inproc://worker")
        dealer.send(b"hello")
        router.recv_multipart()
        codec: Codec = Codec(WorkerInbox, "test.worker")
        plan = StepPlan(step_id=7, finished_ids=["gone"])
        ready = WorkerReady(
            rank=0, num_kv_blocks=1, block_size=16, max_model_len=8, vocab_size=8, eos_token_ids=[]
        )
        foreign = [msgspec.msgpack.encode(m) for m in (ready, Ping(sent_at=0.0))]  # not for a worker
        for frame in [*GARBAGE, *foreign, codec.encode(plan)]:
            router.send_multipart([b"worker", frame])
        assert receive_blocking(dealer, codec) == plan
        assert codec.bad_frames == len(GARBAGE) + 2
    finally:
        ctx.destroy(linger=0)


def test_pong_carries_typed_engine_status():
    stats = SchedulerStats(num_running=2, kv_cache_usage=0.5, num_kv_blocks=64, workers_ready=True)
    engine = EngineStatus(
        model_name="m", max_model_len=2048, vocab_size=49152, draining=False, bad_frames=3, stats=stats
    )
    codec: Codec = Codec(ApiInbox, "test.api")
    pong = codec.decode(codec.encode(Pong(sent_at=1.0, role="tokenizer", engine=engine)))
    assert isinstance(pong, Pong) and isinstance(pong.engine, EngineStatus)
    assert isinstance(pong.engine.stats, SchedulerStats) and pong.engine.stats == stats
    assert codec.decode(codec.encode(Pong(sent_at=1.0, role="worker"))).engine is None
    # the untyped shape of old (a dict of engine facts) is a bad frame, not half-read stats
    old = msgspec.msgpack.encode(["pong", 1.0, "tokenizer", True, "", {"max_model_len": 2048}])
    assert codec.decode(old) is None and codec.bad_frames == 1

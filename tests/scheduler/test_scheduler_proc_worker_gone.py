"""scheduler_proc, in-process on real ipc sockets, with a scripted worker: a WorkerGone from
the worker's heartbeat socket (its tensor-parallel group broke) fails the requests it held at
once, with the reason, though its heartbeat timeout is far away; the restarted group serves."""

from __future__ import annotations

import asyncio
import time

import zmq
import zmq.asyncio

from zeroserve.scheduler_proc.proc import SchedulerProcess
from zeroserve.shared.config import EngineConfig
from zeroserve.shared.ipc import Codec
from zeroserve.shared.messages import (
    EngineRequest,
    Ping,
    SamplingParams,
    SchedulerStats,
    StepPlan,
    TokenDeltas,
    TokenizerEngineInbox,
    WorkerGone,
    WorkerInbox,
    WorkerReady,
)

REASON = "tensor-parallel rank 1 sent no heartbeat for 1.0s"
READY = WorkerReady(
    rank=0, num_kv_blocks=32, block_size=16, max_model_len=256, vocab_size=64, eos_token_ids=[0]
)


def dealer(ctx: zmq.asyncio.Context, address: str, identity: bytes) -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


async def until(condition, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_worker_gone_fails_the_step_in_flight_at_once(tmp_path):
    # a heartbeat timeout of a minute: only WorkerGone can fail the request within the test
    config = EngineConfig(
        model="unused",
        served_model_name="m",
        run_dir=str(tmp_path),
        heartbeat_timeout_s=60.0,
        step_timeout_s=60.0,
    )

    async def main():
        sched = SchedulerProcess(config)
        task = asyncio.ensure_future(sched.run())
        ctx = zmq.asyncio.Context()
        enc = Codec(WorkerInbox, "test").encoder
        worker = dealer(ctx, config.worker_address_of(0), b"worker-0-1")
        heartbeat = dealer(ctx, config.worker_address_of(0), b"worker-0-hb-1")
        tokenizer = dealer(ctx, config.scheduler_address_of(0), b"tokenizer-0")
        try:
            await worker.send(enc.encode(READY))
            await until(lambda: sched.worker_ready is not None, 10)
            request = EngineRequest(
                request_id="r1",
                prompt_token_ids=[1, 2, 3],
                params=SamplingParams(max_tokens=8, temperature=0.0),
                arrival_time=time.time(),
            )
            await tokenizer.send(enc.encode(request))
            plan = Codec(WorkerInbox, "test.worker").decode(await asyncio.wait_for(worker.recv(), 10))
            assert isinstance(plan, StepPlan)  # the step is in flight, and never answered
            gone_at = time.monotonic()
            await heartbeat.send(enc.encode(WorkerGone(reason=REASON)))
            replies = Codec(TokenizerEngineInbox, "test.tokenizer")
            deltas = replies.decode(await asyncio.wait_for(tokenizer.recv(), 5))
            failed_after = time.monotonic() - gone_at
            assert isinstance(deltas, TokenDeltas) and len(deltas.deltas) == 1
            (delta,) = deltas.deltas
            assert delta.request_id == "r1" and delta.finish_reason == "error"
            assert delta.error.status == 503 and REASON in delta.error.message, delta.error
            assert failed_after < 1.0
            # the scheduler waits for the group's restart: not ready, new requests refused
            await tokenizer.send(enc.encode(Ping(sent_at=time.time())))
            stats = replies.decode(await asyncio.wait_for(tokenizer.recv(), 5))
            assert isinstance(stats, SchedulerStats) and not stats.workers_ready
            await worker.send(enc.encode(READY))  # the restarted group
            await until(lambda: sched.worker_ready is not None, 10)
            await tokenizer.send(enc.encode(Ping(sent_at=time.time())))
            stats = replies.decode(await asyncio.wait_for(tokenizer.recv(), 5))
            assert stats.workers_ready
        finally:
            task.cancel()
            ctx.destroy(linger=0)
            sched.ctx.destroy(linger=0)

    asyncio.run(asyncio.wait_for(main(), 60))

"""A tokenizer in front of two replicas: routing through the registry bus, and failover.

The real TokenizerProcess, the real registry bus and real sockets; the two replicas are
schedulers this test plays (each a ROUTER that answers pings with stats, and a publisher of
announces and load reports), so that a replica can fail a request or go silent on cue.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq
import zmq.asyncio

from zeroserve.shared.config import EngineConfig
from zeroserve.shared.ipc import Codec, receive, receive_routed
from zeroserve.shared.messages import (
    Abort,
    ApiInbox,
    EngineRequest,
    ErrorInfo,
    GenerateRequest,
    LoadReport,
    Ping,
    ReplicaAnnounce,
    SamplingParams,
    SchedulerInbox,
    SchedulerStats,
    TextDelta,
    TokenDelta,
    TokenDeltas,
)
from zeroserve.shared.registry import TOPIC_ANNOUNCE, TOPIC_LOAD, RegistryBus, RegistryPublisher
from zeroserve.tokenizer_proc.proc import TokenizerProcess

WORKER_DIED = ErrorInfo(status=503, type="service_unavailable", message="the model worker died (test)")


class FakeReplica:
    """A scheduler on cue: ``alive`` False stops its load reports and its answers to pings."""

    def __init__(self, ctx: zmq.asyncio.Context, config: EngineConfig, index: int):
        self.config = config
        self.replica_id = config.replica_id(index)
        self.address = config.scheduler_address_of(index)
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.address)
        self.bus = RegistryPublisher(ctx, config.registry_publish_address)
        self.codec = Codec(SchedulerInbox, f"test.{self.replica_id}")
        self.alive = True
        self.requests: dict[str, bytes] = {}  # request id -> the tokenizer that sent it
        self.aborts: list[str] = []
        self.started_at = time.time()

    async def serve(self) -> None:
        stats = self.codec.encode(SchedulerStats(workers_ready=True, max_model_len=self.config.max_model_len))
        while True:
            identity, msg = await receive_routed(self.sock, self.codec)
            match msg:
                case Ping():
                    if self.alive:
                        await self.sock.send_multipart([identity, stats])
                case EngineRequest():
                    self.requests[msg.request_id] = identity
                case Abort():
                    self.aborts.append(msg.request_id)

    async def publish(self) -> None:
        seq = 0
        while True:
            if self.alive:
                seq += 1
                announce = ReplicaAnnounce(
                    replica_id=self.replica_id,
                    model=self.config.served_model_name,
                    request_address=self.address,
                    replay_address=self.config.replay_address_of(0),
                    block_size=self.config.block_size,
                    num_kv_blocks=100,
                    max_model_len=self.config.max_model_len,
                    started_at=self.started_at,
                )
                self.bus.publish(TOPIC_ANNOUNCE, announce)
                self.bus.publish(
                    TOPIC_LOAD,
                    LoadReport(replica_id=self.replica_id, seq=seq, waiting=0, running=0, kv_usage=0),
                )
            await asyncio.sleep(0.1)

    async def reply(self, delta: TokenDelta) -> None:
        identity = self.requests[delta.request_id]
        await self.sock.send_multipart([identity, self.codec.encode(TokenDeltas(deltas=[delta]))])


class Harness:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.replies: dict[str, list[TextDelta]] = {}

    async def __aenter__(self) -> Harness:
        cfg = self.config
        self.bus = RegistryBus(cfg.registry_publish_address, cfg.registry_subscribe_address).start()
        self.ctx = zmq.asyncio.Context()
        self.replicas = [FakeReplica(self.ctx, cfg, i) for i in range(2)]
        self.proc = TokenizerProcess(cfg, 0)
        self.client = self.ctx.socket(zmq.DEALER)
        self.client.setsockopt(zmq.LINGER, 0)
        self.client.connect(cfg.tokenizer_address(0))
        self.codec = Codec(ApiInbox, "test.client")
        self.tasks = [asyncio.ensure_future(self.proc.run()), asyncio.ensure_future(self._read())]
        self.tasks += [asyncio.ensure_future(f()) for r in self.replicas for f in (r.serve, r.publish)]
        self.tasks.append(asyncio.ensure_future(self._ping()))
        await self.wait_for(
            lambda: len([r for r in self.proc.replicas.replicas.values() if r.stats.workers_ready]) == 2,
            what="both replicas known to the tokenizer",
        )
        return self

    async def __aexit__(self, *exc) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.proc.close()
        for sock in (self.client, self.proc.front, *(r.sock for r in self.replicas)):
            sock.close(0)
        for r in self.replicas:
            r.bus.close()
        self.ctx.term()
        self.proc.ctx.term()
        self.bus.close()

    async def _read(self) -> None:
        while True:
            msg = await receive(self.client, self.codec)
            if isinstance(msg, TextDelta):
                self.replies.setdefault(msg.request_id, []).append(msg)

    async def _ping(self) -> None:  # keeps this owner alive, as EngineClient does
        while True:
            self.client.send(self.codec.encode(Ping(sent_at=0.0)))
            await asyncio.sleep(0.05)

    def generate(self, request_id: str, prompt: str, session: str | None = None) -> None:
        req = GenerateRequest(
            request_id=request_id, params=SamplingParams(max_tokens=4), prompt=prompt, session=session
        )
        self.client.send(self.codec.encode(req))

    def holders(self, request_id: str) -> list[FakeReplica]:
        return [r for r in self.replicas if request_id in r.requests]

    async def landed(self, request_id: str) -> FakeReplica:
        await self.wait_for(lambda: self.holders(request_id), what=f"{request_id} at a replica")
        (replica,) = self.holders(request_id)
        return replica

    async def wait_for(self, predicate, timeout: float = 20.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.02)


@pytest.fixture
def config(tmp_path, gguf_path) -> EngineConfig:
    return EngineConfig(
        model=gguf_path,
        served_model_name="m",
        run_dir=str(tmp_path),
        max_model_len=2048,
        vocab_size=49152,
        data_parallel_size=2,
    )


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 90))


def other(h: Harness, replica: FakeReplica) -> FakeReplica:
    return next(r for r in h.replicas if r is not replica)


def test_a_request_failed_before_its_first_token_is_resent_once(config):
    async def main():
        async with Harness(config) as h:
            h.generate("a", "Hello there")
            first = await h.landed("a")
            await first.reply(
                TokenDelta(request_id="a", token_ids=[], finish_reason="error", error=WORKER_DIED)
            )
            second = other(h, first)
            await h.wait_for(lambda: "a" in second.requests, what="a re-sent to the other replica")
            assert "a" not in h.replies, "the client heard of the first failure"
            await second.reply(
                TokenDelta(request_id="a", token_ids=[], finish_reason="error", error=WORKER_DIED)
            )
            await h.wait_for(lambda: "a" in h.replies, what="the second failure at the client")
            return h.replies["a"], h.proc.replicas.failovers

    replies, failovers = run(main())
    assert [d.finish_reason for d in replies] == ["error"] and replies[0].error.message == WORKER_DIED.message
    assert failovers == 1


def test_a_request_that_streamed_gets_the_error(config):
    async def main():
        async with Harness(config) as h:
            h.generate("b", "Hello there")
            replica = await h.landed("b")
            await replica.reply(TokenDelta(request_id="b", token_ids=[9906]))
            await replica.reply(
                TokenDelta(request_id="b", token_ids=[], finish_reason="error", error=WORKER_DIED)
            )
            await h.wait_for(lambda: len(h.replies.get("b", [])) == 2, what="both deltas at the client")
            await asyncio.sleep(0.3)
            return h.replies["b"], other(h, replica).requests

    replies, elsewhere = run(main())
    assert replies[0].token_ids == [9906] and replies[0].finish_reason is None
    assert replies[1].finish_reason == "error" and replies[1].error.message == WORKER_DIED.message
    assert "b" not in elsewhere


def test_a_silent_replica_has_its_unstarted_requests_moved_and_its_streaming_ones_failed(config):
    async def main():
        async with Harness(config) as h:
            h.generate("c", "One prompt", session="s")
            replica = await h.landed("c")
            await replica.reply(TokenDelta(request_id="c", token_ids=[9906]))  # c has streamed
            await h.wait_for(lambda: "c" in h.replies, what="c's first token at the client")
            h.generate("d", "Another prompt", session="s")  # the same session: the same replica
            assert await h.landed("d") is replica
            replica.alive = False
            survivor = other(h, replica)
            started = time.monotonic()
            await h.wait_for(lambda: "d" in survivor.requests, timeout=10, what="d moved to the survivor")
            moved_after = time.monotonic() - started
            await survivor.reply(TokenDelta(request_id="d", token_ids=[17], finish_reason="length"))
            await h.wait_for(lambda: "d" in h.replies, what="d's answer")
            await h.wait_for(lambda: len(h.replies["c"]) == 2, timeout=10, what="c's error")
            return h.replies, replica.aborts, moved_after, "c" in survivor.requests

    replies, aborts, moved_after, c_moved = run(main())
    assert moved_after < 2.0, f"d moved {moved_after:.1f}s after its replica went silent"
    assert [d.finish_reason for d in replies["d"]] == ["length"] and "d" in aborts
    assert not c_moved and replies["c"][1].finish_reason == "error"
    assert replies["c"][1].error.message == "the scheduler process stopped responding; retry"

"""The replicas a tokenizer sends requests to, and the choice of one for each request.

Without a registry (``--data-parallel-size 1``) there is one fixed replica, ``r0``, at the
configured scheduler address, and every request goes there as it always did. With one, the
replicas are learned from the registry bus and each request is routed by the ``Router``::

    bus (SUB) --ReplicaAnnounce--> Router.on_announce; a DEALER to its request_address
              --LoadReport-------> Router.on_load
              --KVEventBatch-----> Router.on_kv_events; a gap -> KVReplayRequest to its replay_address
    replay (DEALER) --KVReplayReply | KVReplayUnavailable--> Router.on_replay_answer
    replica (DEALER) --TokenDeltas | SchedulerStats--> the tokenizer (``Listener``)

A replica *serves* while its scheduler answers our pings (its SchedulerStats, every
heartbeat) with a ready worker and, with a registry, while the Router has heard from it within
a second. What happens to the requests of a replica that stops serving is the tokenizer's
business (tokenizer_proc/proc.py): this module only says which replicas those are.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, Protocol

import msgspec
import zmq
import zmq.asyncio

from zeroserve.shared.config import EngineConfig
from zeroserve.shared.ipc import Codec, SendError, connect, has_unread, receive, send_now
from zeroserve.shared.messages import (
    BucketCounts,
    KVEventBatch,
    KVReplayRequest,
    LoadReport,
    Ping,
    ReplayAnswer,
    ReplicaAnnounce,
    ReplicaStatus,
    RouteCount,
    RouterStats,
    SchedulerStats,
    TokenizerEngineInbox,
)

log = logging.getLogger("zeroserve.tokenizer")

# matched prefix blocks per decision, and a decision's time in seconds (the target: < 50 us)
MATCHED_BLOCKS_BOUNDS = [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0]
DECISION_SECONDS_BOUNDS = [5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3]
COUNTERS = (
    "prefix_cache_queries",
    "prefix_cache_hits",
    "num_preemptions",
    "num_steps",
    "num_steps_over_target",
)


class Listener(Protocol):
    def on_engine_message(self, replica_id: str, msg: Any) -> None: ...

    def on_replica_restarted(self, replica_id: str) -> None: ...


class Replica:
    """One scheduler: the DEALER to it, its latest stats, and when it last spoke."""

    def __init__(self, replica_id: str, address: str, sock: zmq.asyncio.Socket, codec: Codec) -> None:
        self.replica_id = replica_id
        self.address = address
        self.sock = sock
        self.codec = codec
        self.stats = SchedulerStats(workers_ready=False)
        self.seen = 0.0  # time.monotonic() of its latest SchedulerStats
        self.started_at: float | None = None  # its announce's: changes when the scheduler restarts
        self.replay_address: str | None = None
        self.replay: zmq.asyncio.Socket | None = None
        self.reader: asyncio.Future | None = None
        self.replay_reader: asyncio.Future | None = None
        self.was_heard = self.was_serving = False  # as of the last check_serving()


class HistogramCounts:
    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        i = 0
        while i < len(self.bounds) and value > self.bounds[i]:
            i += 1
        self.counts[i] += 1
        self.total += value

    def message(self) -> BucketCounts:
        return BucketCounts(bounds=self.bounds, counts=list(self.counts), total=self.total)


class ReplicaSet:
    def __init__(self, config: EngineConfig, ctx: zmq.asyncio.Context, identity: bytes, listener: Listener):
        self.config = config
        self.ctx = ctx
        self.identity = identity
        self.listener = listener
        self.replicas: dict[str, Replica] = {}
        self.encoder = msgspec.msgpack.Encoder()
        self.silent_after_s = max(config.heartbeat_timeout_s * 2, 2.0)
        self.router: Any = None
        self.subscriber: Any = None
        self.decisions: Counter[tuple[str, str]] = Counter()
        self.matched_blocks = HistogramCounts(MATCHED_BLOCKS_BOUNDS)
        self.decision_seconds = HistogramCounts(DECISION_SECONDS_BOUNDS)
        self.failovers = 0
        if config.uses_registry:
            from zeroserve.shared.registry import RegistrySubscriber
            from zeroserve.tokenizer_proc.router import Router, RouterConfig

            self.router = Router(
                config.routing_policy, config.block_size, RouterConfig(model=config.served_model_name)
            )
            self.subscriber = RegistrySubscriber(ctx, config.registry_subscribe_address, config.curve)
            self.replay_codec: Codec = Codec(ReplayAnswer, "tokenizer.replay")
        else:
            self.add(config.replica_id(0), config.scheduler_address)

    # ------------------------------------------------------------------ membership
    def add(self, replica_id: str, address: str) -> Replica:
        sock = connect(self.ctx, zmq.DEALER, address, self.config.curve, self.identity)
        replica = Replica(replica_id, address, sock, Codec(TokenizerEngineInbox, f"tokenizer.{replica_id}"))
        self.replicas[replica_id] = replica
        replica.reader = asyncio.ensure_future(self._read(replica))
        self.ping(replica)  # the scheduler learns us, and we its stats, without waiting a heartbeat
        return replica

    async def _read(self, replica: Replica) -> None:
        while True:
            msg = await receive(replica.sock, replica.codec)
            if isinstance(msg, SchedulerStats):
                if replica.stats.started_at and msg.started_at and msg.started_at != replica.stats.started_at:
                    # restarted (by its supervisor) before it was missed: what it held is gone
                    log.warning(
                        "replica %s: its scheduler restarted; its requests in flight were lost",
                        replica.replica_id,
                    )
                    self.listener.on_replica_restarted(replica.replica_id)
                replica.stats = msg
                replica.seen = time.monotonic()
            try:
                self.listener.on_engine_message(replica.replica_id, msg)
            except Exception:  # a bug on one message must not leave this replica unheard for good
                log.exception("replica %s: handling %s failed", replica.replica_id, type(msg).__name__)

    def on_announce(self, msg: ReplicaAnnounce, now: float) -> None:
        if not self.router.on_announce(msg, now):
            return  # another model or block size: refused (the Router logs why)
        replica = self.replicas.get(msg.replica_id)
        if replica is not None and replica.address != msg.request_address:
            log.warning("replica %s moved to %s; reconnecting", msg.replica_id, msg.request_address)
            self.listener.on_replica_restarted(msg.replica_id)
            self.close_replica(replica)
            replica = None
        if replica is None:
            log.info("replica %s joined at %s", msg.replica_id, msg.request_address)
            replica = self.add(msg.replica_id, msg.request_address)
        elif replica.started_at is not None and replica.started_at != msg.started_at:
            log.warning("replica %s restarted: its requests in flight were lost", msg.replica_id)
            self.listener.on_replica_restarted(msg.replica_id)
        replica.started_at = msg.started_at
        if replica.replay_address != msg.replay_address:
            self.close_replay(replica)
            replica.replay_address = msg.replay_address

    async def registry_loop(self) -> None:
        if self.subscriber is None:
            return
        router = self.router
        while True:
            _, msg = await self.subscriber.receive()
            now = time.monotonic()
            match msg:
                case LoadReport():
                    router.on_load(msg, now)
                case KVEventBatch():
                    self.replay_from(msg.replica_id, router.on_kv_events(msg, now))
                case ReplicaAnnounce():
                    self.on_announce(msg, now)

    def replay_from(self, replica_id: str, seq: int | None) -> None:
        """Ask a replica for the KV event batches from seq on (the Router saw a gap)."""
        replica = self.replicas.get(replica_id)
        if seq is None or replica is None or replica.replay_address is None:
            return
        if replica.replay is None:
            replica.replay = connect(self.ctx, zmq.DEALER, replica.replay_address, self.config.curve)
            replica.replay_reader = asyncio.ensure_future(self._read_replay(replica, replica.replay))
        try:
            send_now(replica.replay, [self.encoder.encode(KVReplayRequest(from_seq=seq))])
        except SendError:
            pass  # the Router asks again after replay_retry_s

    async def _read_replay(self, replica: Replica, sock: zmq.asyncio.Socket) -> None:
        while True:
            answer = await receive(sock, self.replay_codec)
            if answer.replica_id == replica.replica_id:  # a replica answers for itself only
                self.replay_from(replica.replica_id, self.router.on_replay_answer(answer))

    def close_replay(self, replica: Replica) -> None:
        if replica.replay_reader is not None:
            replica.replay_reader.cancel()
        if replica.replay is not None:
            replica.replay.close(0)
        replica.replay = replica.replay_reader = None

    def close_replica(self, replica: Replica) -> None:
        self.close_replay(replica)
        if replica.reader is not None:
            replica.reader.cancel()
        replica.sock.close(0)
        self.replicas.pop(replica.replica_id, None)

    def close(self) -> None:
        for replica in list(self.replicas.values()):
            self.close_replica(replica)
        if self.subscriber is not None:
            self.subscriber.close()

    # ------------------------------------------------------------------ liveness
    def ping(self, replica: Replica) -> None:
        try:
            send_now(replica.sock, [self.encoder.encode(Ping(sent_at=0.0))])
        except SendError:
            pass  # the scheduler is not reading: it turns silent below

    def ping_all(self) -> None:
        for replica in self.replicas.values():
            self.ping(replica)

    def heard(self, replica: Replica, now: float) -> bool:
        """Whether its scheduler spoke lately. Its stats come every heartbeat; stats waiting
        unread count too, else a tokenizer that was itself starved of CPU (its loop busy,
        the machine loaded) would take its own lateness for the scheduler's silence."""
        return now - replica.seen < self.silent_after_s or has_unread(replica.sock)

    def in_rotation(self, now: float) -> set[str] | None:
        """The replicas the Router hears from (None: no registry, or its news wait unread)."""
        if self.router is None or has_unread(self.subscriber.sock):
            return None
        return set(self.router.live_replicas(now))

    def serving(self, replica: Replica, now: float, rotation: set[str] | None = None) -> bool:
        if not (self.heard(replica, now) and replica.stats.workers_ready):
            return False
        return rotation is None or replica.replica_id in rotation

    def any_serving(self) -> bool:
        now = time.monotonic()
        rotation = self.in_rotation(now)
        return any(self.serving(r, now, rotation) for r in self.replicas.values())

    def check_serving(self) -> tuple[list[Replica], list[Replica]]:
        """(replicas whose scheduler went silent, replicas that left the Router's rotation)
        since the last check."""
        now = time.monotonic()
        rotation = self.in_rotation(now)
        silent, left = [], []
        for replica in self.replicas.values():
            heard = self.heard(replica, now)
            serving = self.serving(replica, now, rotation)
            if replica.was_heard and not heard:
                silent.append(replica)
            elif replica.was_serving and not serving and rotation is not None:
                left.append(replica)
            replica.was_heard, replica.was_serving = heard, serving
        return silent, left

    def mark_dead(self, replica_id: str) -> None:
        """Out of the Router's rotation until it announces again (its worker died under a request)."""
        if self.router is not None:
            self.router.mark_dead(replica_id)

    # ------------------------------------------------------------------ routing
    def choose(
        self,
        token_ids: Sequence[int],
        cache_salt: str | None,
        session: str | None,
        exclude: Sequence[str] = (),
    ) -> Replica | None:
        """The replica for a request; None when none can take it."""
        now = time.monotonic()
        if self.router is None:
            replica = self.replicas[self.config.replica_id(0)]
            return replica if replica.replica_id not in exclude and self.serving(replica, now) else None
        from zeroserve.tokenizer_proc.router import NoReplicaAvailable

        unfit = [r.replica_id for r in self.replicas.values() if not self.serving(r, now)]
        started = time.perf_counter()
        try:
            decision = self.router.route(token_ids, cache_salt, session, now, exclude=[*exclude, *unfit])
        except NoReplicaAvailable:
            return None
        self.decision_seconds.observe(time.perf_counter() - started)
        self.matched_blocks.observe(decision.matched_blocks)
        self.decisions[(decision.replica_id, decision.reason)] += 1
        return self.replicas.get(decision.replica_id)

    # ------------------------------------------------------------------ status, for pongs
    def status(self, alive: bool) -> tuple[SchedulerStats, list[ReplicaStatus]]:
        """(the engine's stats: the serving replicas' sum, counters over all; each replica's)."""
        now = time.monotonic()
        rotation = self.in_rotation(now)
        replicas = [
            ReplicaStatus(replica_id=r.replica_id, live=self.serving(r, now, rotation), stats=r.stats)
            for r in sorted(self.replicas.values(), key=lambda r: r.replica_id)
        ]
        if self.router is None and replicas:  # one replica: its own report, as before replicas
            return msgspec.structs.replace(replicas[0].stats, workers_ready=alive), replicas
        live = [r.stats for r in replicas if r.live]
        return (
            SchedulerStats(
                num_running=sum(s.num_running for s in live),
                num_waiting=sum(s.num_waiting for s in live),
                kv_cache_usage=sum(s.kv_cache_usage for s in live) / len(live) if live else 0.0,
                num_kv_blocks=sum(s.num_kv_blocks for s in live),
                num_free_blocks=sum(s.num_free_blocks for s in live),
                tokens_scheduled_last_step=sum(s.tokens_scheduled_last_step for s in live),
                workers_ready=alive,
                max_model_len=min((s.max_model_len for s in live if s.max_model_len), default=0),
                **{name: sum(getattr(r.stats, name) for r in replicas) for name in COUNTERS},
            ),
            replicas,
        )

    def bad_frames(self) -> int:
        codecs = [r.codec for r in self.replicas.values()]
        if self.subscriber is None:
            return sum(c.bad_frames for c in codecs)
        codecs += [self.subscriber.codec, self.replay_codec]
        return sum(c.bad_frames for c in codecs) + self.router.bad_reports  # decoded, but out of range

    def router_stats(self) -> RouterStats | None:
        if self.router is None:
            return None
        return RouterStats(
            decisions=[
                RouteCount(replica_id=replica_id, reason=reason, count=n)
                for (replica_id, reason), n in sorted(self.decisions.items())
            ],
            matched_blocks=self.matched_blocks.message(),
            decision_seconds=self.decision_seconds.message(),
            failovers=self.failovers,
        )

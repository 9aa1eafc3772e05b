"""KV events: what a replica's prefix cache gained and lost, for the routers in front of it.

The block manager calls ``stored`` / ``removed`` / ``cleared`` as it keys, evicts and forgets
blocks (only when a log is attached: a single replica without a registry bus pays nothing).
The scheduler process flushes the pending events into a numbered ``KVEventBatch`` after every
step (or every ~20 ms), publishes it on the registry bus, and keeps the latest batches in a
ring buffer for replay::

    block manager --stored/removed/cleared--> pending events
    flush()  --> KVEventBatch(seq = 0, 1, 2, ...) --> bus (PUB, may drop) and ring[-ring_size:]
    router sees seq jump 7 -> 9 --KVReplayRequest(8)--> replay(8) --> batches 8, 9, ... (ring)
                                                                 or a snapshot (see below)

Resync when the ring no longer holds ``from_seq``: the answer is ``KVReplayUnavailable``
carrying every hash the prefix cache holds now, as of the last flushed batch (the caller
flushes first, so the snapshot's seq covers every event it reflects). The router drops what it
knew of the replica, takes the snapshot and continues from the batch after it. A snapshot is
O(cached blocks), so it only answers requests the ring cannot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import TYPE_CHECKING

import msgspec
import zmq
import zmq.asyncio

from zeroserve.shared.config import EngineConfig
from zeroserve.shared.ipc import Codec, SendError, bind, receive_routed, send_now
from zeroserve.shared.messages import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
    KVReplayReply,
    KVReplayUnavailable,
    LoadReport,
    ReplayInbox,
    ReplicaAnnounce,
    SchedulerStats,
    WorkerReady,
)
from zeroserve.shared.prefix_hash import event_hash
from zeroserve.shared.registry import TOPIC_ANNOUNCE, TOPIC_KV, TOPIC_LOAD, RegistryPublisher

if TYPE_CHECKING:
    from zeroserve.scheduler_proc.block_manager import BlockManager

log = logging.getLogger("zeroserve.scheduler")

DEFAULT_RING_SIZE = 1024  # batches: at one per step, seconds of history at full speed


class KVEventLog:
    """Pending events of one replica, numbered into batches, the latest kept for replay."""

    def __init__(self, replica_id: str, ring_size: int = DEFAULT_RING_SIZE) -> None:
        self.replica_id = replica_id
        self.next_seq = 0
        self._pending: list[KVEvent] = []
        # consecutive stores (a prompt's blocks, keyed in one step) share one BlockStored
        self._stored: list[int] | None = None
        self._ring: deque[KVEventBatch] = deque(maxlen=ring_size)
        self._cached: set[int] = set()  # hashes the cache holds now, for a snapshot

    # ------------------------------------------------------------------ from the block manager
    def stored(self, key: bytes) -> None:
        h = event_hash(key)
        self._cached.add(h)
        if self._stored is None:
            self._stored = []
            self._pending.append(BlockStored(block_hashes=self._stored))
        self._stored.append(h)

    def removed(self, key: bytes) -> None:
        h = event_hash(key)
        self._cached.discard(h)
        self._stored = None
        last = self._pending[-1] if self._pending else None
        if isinstance(last, BlockRemoved):
            last.block_hashes.append(h)
        else:
            self._pending.append(BlockRemoved(block_hashes=[h]))

    def cleared(self) -> None:
        self._cached.clear()
        self._stored = None
        self._pending = [AllBlocksCleared()]  # what came before it no longer matters

    # ------------------------------------------------------------------ batches and replay
    def flush(self, now: float) -> KVEventBatch | None:
        """The pending events as the next batch (kept for replay), or None when there are none."""
        if not self._pending:
            return None
        batch = KVEventBatch(replica_id=self.replica_id, seq=self.next_seq, ts=now, events=self._pending)
        self.next_seq += 1
        self._pending, self._stored = [], None
        self._ring.append(batch)
        return batch

    def replay(self, from_seq: int) -> KVReplayReply | KVReplayUnavailable:
        """The batches from ``from_seq`` on, or a snapshot when the ring no longer reaches back.
        Flush (and publish) first, so a snapshot's seq covers every event it reflects."""
        ring = self._ring
        first = ring[0].seq if ring else self.next_seq
        if first <= from_seq <= self.next_seq:
            batches = list(islice(ring, from_seq - first, None))
            return KVReplayReply(replica_id=self.replica_id, batches=batches)
        return self.snapshot()

    def snapshot(self) -> KVReplayUnavailable:
        return KVReplayUnavailable(
            replica_id=self.replica_id, seq=self.next_seq - 1, block_hashes=sorted(self._cached)
        )


class ReplicaPublisher:
    """A replica on the registry bus: announces itself every ``announce_interval_s``, reports
    its load every ``load_interval_s``, publishes KV event batches after every step (and every
    ``flush_interval_s`` for events born between steps) and answers replay requests.

    Silent while its workers are not ready (no scheduler): it then cannot serve, and routers
    take it out of rotation within a second; it announces again the moment a worker is ready.
    """

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        config: EngineConfig,
        replica: int,
        stats: Callable[[], SchedulerStats],
        *,
        announce_interval_s: float = 1.0,
        load_interval_s: float = 0.1,
        flush_interval_s: float = 0.02,
    ) -> None:
        self.config = config
        self.replica_id = config.replica_id(replica)
        self.request_address = config.scheduler_address_of(replica)
        self.replay_address = config.replay_address_of(replica)
        self.stats = stats
        self.announce_interval_s = announce_interval_s
        self.load_interval_s = load_interval_s
        self.flush_interval_s = flush_interval_s
        self.started_at = time.time()
        self.log = KVEventLog(self.replica_id)
        self.bus = RegistryPublisher(ctx, config.registry_publish_address, config.curve)
        self.replay_sock = bind(ctx, zmq.ROUTER, self.replay_address, config.curve)
        self.replay_codec: Codec = Codec(ReplayInbox, "scheduler.replay")
        self.encoder = msgspec.msgpack.Encoder()
        self.blocks: BlockManager | None = None  # the live scheduler's; None while no worker is ready
        self.worker: WorkerReady | None = None
        self._load_seq = 0

    # ------------------------------------------------------------------ the scheduler's life
    def attach(self, blocks: BlockManager, worker: WorkerReady) -> None:
        """A worker is ready with an empty KV cache (a fresh block manager): say so, and announce."""
        self.detach()
        blocks.events = self.log
        self.blocks, self.worker = blocks, worker
        self.announce()

    def detach(self) -> None:
        """The worker is gone, and its KV cache with it."""
        if self.blocks is not None:
            self.blocks.events = None
            self.blocks = self.worker = None
        self.log.cleared()
        self.flush()

    # ------------------------------------------------------------------ publishing
    def flush(self) -> None:
        batch = self.log.flush(time.time())
        if batch is not None:
            self.bus.publish(TOPIC_KV, batch)

    def announce(self) -> None:
        worker = self.worker
        if worker is None:
            return
        self.bus.publish(
            TOPIC_ANNOUNCE,
            ReplicaAnnounce(
                replica_id=self.replica_id,
                model=self.config.served_model_name,
                request_address=self.request_address,
                replay_address=self.replay_address,
                block_size=worker.block_size,
                num_kv_blocks=worker.num_kv_blocks,
                max_model_len=worker.max_model_len,
                started_at=self.started_at,
            ),
        )

    def report_load(self) -> None:
        if self.worker is None:
            return
        s = self.stats()
        self._load_seq += 1
        self.bus.publish(
            TOPIC_LOAD,
            LoadReport(
                replica_id=self.replica_id,
                seq=self._load_seq,
                waiting=s.num_waiting,
                running=s.num_running,
                kv_usage=min(max(s.kv_cache_usage, 0.0), 1.0),
                prefix_hits=s.prefix_cache_hits,
                prefix_queries=s.prefix_cache_queries,
            ),
        )

    async def publish_loop(self) -> None:
        next_load = next_announce = 0.0
        while True:
            await asyncio.sleep(self.flush_interval_s)
            self.flush()
            now = time.monotonic()
            if now >= next_load:
                next_load = now + self.load_interval_s
                self.report_load()
            if now >= next_announce:
                next_announce = now + self.announce_interval_s
                self.announce()

    async def replay_loop(self) -> None:
        while True:
            identity, req = await receive_routed(self.replay_sock, self.replay_codec)
            self.flush()
            answer = self.log.replay(req.from_seq)
            try:
                send_now(self.replay_sock, [identity, self.encoder.encode(answer)])
            except SendError as e:
                log.debug("replay answer to %r not sent: %s", identity, e)

    async def run(self) -> None:
        log.info("replica %s on the registry bus %s", self.replica_id, self.config.registry_publish_address)
        await asyncio.gather(self.publish_loop(), self.replay_loop())

    def close(self) -> None:
        self.bus.close()
        self.replay_sock.close(linger=0)

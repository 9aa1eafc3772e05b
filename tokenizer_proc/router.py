"""Which replica serves a request: prefix affinity against load, from what the replicas publish.

Pure logic: no sockets, and every method that depends on time takes ``now`` (or reads the
injected ``clock``), so tests drive it with fake replicas and a fake clock. The tokenizer
process feeds it what the registry bus carries and asks it for each request::

    bus --ReplicaAnnounce--> on_announce    (joins / rejoins; another model or block size: refused)
    bus --LoadReport-------> on_load        (waiting, running, KV usage; every ~100 ms)
    bus --KVEventBatch-----> on_kv_events   -> seq to replay from, when a batch was missed
    replica's replay ROUTER --KVReplayReply | KVReplayUnavailable--> on_replay_answer
    route(token_ids, cache_salt, session, now) -> RouteDecision(replica_id, reason, matched_blocks)

The index maps each block hash (``prefix_hash.event_hash`` of the chained key, salt
included) to a bitmask of the replicas holding it. As a replica's cache is closed under
prefixes (it holds a block's parents too), the masks along a prompt only lose bits, and the
points where they do are found by bisection: a decision costs O(log(prompt blocks)) index
lookups per distinct answer plus O(replicas), whatever the number of indexed blocks::

    prompt blocks     h0      h1      h2      h3
    index[h]        0b1011  0b0011  0b0001    -      candidates 0b1111
    still matching  0b1011  0b0011  0b0001  0b0000   -> r3 matched 1, r1 2, r0 3, r2 0

Policies (``--routing``):
- ``round_robin``: the next live replica in turn.
- ``least_loaded``: the smallest load, ``waiting * 4 + running`` (vLLM's DP balancer), plus
  the requests this router sent since the replica's last report (counted as waiting).
- ``prefix_aware``: when loads are too uneven (busiest - idlest > ``balance_abs_threshold``
  and busiest > idlest * ``balance_rel_threshold``: SGLang's rule) the idlest replica
  (reason ``balance``); otherwise the best score (reason ``prefix`` when it holds part of the
  prompt, else ``load``)::

      score = prefix_weight * matched / prompt_blocks
            - load_weight * (load - min_load) / balance_abs_threshold
            - kv_weight * kv_usage

  Defaults: a replica holding the whole prompt is worth being one threshold (32 load units,
  8 queued requests) busier than the idlest; KV usage only breaks near-ties. The chosen
  replica's entry gets the prompt's hashes at once (a *pending insert*, kept
  ``pending_ttl_s`` or until the replica's own event confirms it), so a burst of requests
  sharing a prefix follows the first one before the first event arrives.
- Session affinity (any policy): requests with the same ``session`` (the ``user`` field or
  ``X-Session-Id``) go where the first went while that replica is live (reason ``session``).

Liveness: a replica is live while it announced or reported within ``liveness_timeout_s``;
once silent longer it is out of rotation until it announces again (a load report alone does
not bring it back: the tokenizer reconnects on the announce).

KV events are applied in ``seq`` order per replica. A batch past the next expected seq is
held back and ``on_kv_events`` returns the seq to replay from (once per ``replay_retry_s``);
the replay answer (the missing batches, or a snapshot of the replica's whole cache when its
ring buffer no longer reaches back) fills the gap and the held batches follow. A replica seen
for the first time is replayed from seq 0, which brings a router that starts late up to date.
"""

from __future__ import annotations

import logging
import math
import operator
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Sequence

import msgspec

from zeroserve.shared.messages import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVReplayReply,
    KVReplayUnavailable,
    LoadReport,
    ReplicaAnnounce,
)
from zeroserve.shared.prefix_hash import prompt_event_hashes

log = logging.getLogger("zeroserve.router")

POLICIES = ("round_robin", "least_loaded", "prefix_aware")
_get_load, _get_cost = operator.attrgetter("load"), operator.attrgetter("cost")


class RouterConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How a Router weighs prefix affinity against load (see the module docstring)."""

    model: str | None = None  # the served model: a replica announcing another is refused (None: any)
    liveness_timeout_s: float = 1.0
    prefix_weight: float = 1.0
    load_weight: float = 1.0
    kv_weight: float = 0.25
    balance_abs_threshold: float = 32.0
    balance_rel_threshold: float = 1.5
    pending_ttl_s: float = 2.0
    max_sessions: int = 100_000
    replay_retry_s: float = 1.0
    max_held_batches: int = 4096  # batches held back behind a gap (beyond: ask for a replay again)


class RouteDecision(msgspec.Struct, frozen=True):
    replica_id: str
    reason: str  # session | prefix | load | balance | round_robin | least_loaded
    matched_blocks: int = 0


class NoReplicaAvailable(Exception):
    """No live replica (outside ``exclude``) can take the request."""


class _Replica:
    __slots__ = (
        "replica_id", "slot", "bit", "announce", "last_seen", "waiting", "running", "kv_usage",
        "prefix_hits", "prefix_queries", "routed", "load", "cost", "held", "pending", "next_seq",
        "held_back", "replay_asked_at",
    )  # fmt: skip

    def __init__(self, replica_id: str, slot: int) -> None:
        self.replica_id = replica_id
        self.slot = slot
        self.bit = 1 << slot
        self.announce: ReplicaAnnounce | None = None
        self.last_seen = -math.inf
        self.waiting = self.running = 0
        self.kv_usage = 0.0
        self.prefix_hits = self.prefix_queries = 0
        self.routed = 0  # requests this router sent since the replica's last load report
        self.load = 0  # (waiting + routed) * 4 + running
        self.cost = 0.0  # the load and KV terms of its prefix_aware score, kept current (see _update)
        self.held: set[int] = set()  # hashes its events say it holds
        self.pending: dict[int, float] = {}  # hash -> expiry of a pending insert
        self.next_seq = 0  # the KV event batch expected next
        self.held_back: dict[int, KVEventBatch] = {}  # batches past a gap, by seq
        self.replay_asked_at = -math.inf

    def update(self, load_w: float, kv_w: float) -> None:
        self.load = (self.waiting + self.routed) * 4 + self.running
        self.cost = load_w * self.load + kv_w * self.kv_usage


class Router:
    """The replicas a tokenizer knows of, their prefix caches and loads; picks one per request."""

    def __init__(
        self,
        policy: str,
        block_size: int,
        config: RouterConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; expected one of {', '.join(POLICIES)}")
        self.policy = policy
        self.block_size = block_size
        self.config = config or RouterConfig()
        self.clock = clock
        self._replicas: dict[str, _Replica] = {}
        self._slots: list[_Replica] = []
        self._index: dict[int, int] = {}  # block hash -> bitmask of replica slots holding it
        self._pending_expiry: deque[tuple[float, _Replica, Sequence[int]]] = deque()
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._rr = 0
        self._live: list[_Replica] = []
        self._live_mask = 0  # their bits
        self._live_until = -math.inf  # _live holds until then (or until a replica (re)joins)
        self.refused: dict[str, str] = {}  # replica id -> why its announce was refused
        self.bad_reports = 0

    # ------------------------------------------------------------------ replicas
    def on_announce(self, msg: ReplicaAnnounce, now: float) -> bool:
        """A replica (re)announces itself; False when it is refused (logged once per reason)."""
        why = None
        if self.config.model is not None and msg.model != self.config.model:
            why = f"it serves model {msg.model!r}, not {self.config.model!r}"
        elif msg.block_size != self.block_size:
            why = f"its KV block size is {msg.block_size}, not {self.block_size} (prefix hashes would differ)"
        rep = self._replicas.get(msg.replica_id)
        if why is not None:
            if self.refused.get(msg.replica_id) != why:
                log.warning("refused replica %s at %s: %s", msg.replica_id, msg.request_address, why)
            self.refused[msg.replica_id] = why
            if rep is not None and rep.announce is not None:
                self._forget(rep)
                rep.announce = None
                rep.last_seen = -math.inf
                self._live_until = -math.inf
            return False
        self.refused.pop(msg.replica_id, None)
        if rep is None:
            rep = _Replica(msg.replica_id, len(self._slots))
            self._replicas[msg.replica_id] = rep
            self._slots.append(rep)
        elif rep.announce is not None and rep.announce.started_at != msg.started_at:
            log.info("replica %s restarted: its prefix cache starts empty", msg.replica_id)
            self._forget(rep)
        if rep.last_seen < now - self.config.liveness_timeout_s:
            self._live_until = -math.inf  # it (re)joins the rotation
        rep.announce = msg
        rep.last_seen = now
        return True

    def on_load(self, msg: LoadReport, now: float) -> None:
        rep = self._replicas.get(msg.replica_id)
        if not (msg.waiting >= 0 and msg.running >= 0 and 0.0 <= msg.kv_usage <= 1.0):
            self.bad_reports += 1  # decoded from the bus this cannot happen (the Struct's bounds)
            return
        if rep is None or rep.announce is None:
            return  # not announced yet (or refused): nothing to route to
        if rep.last_seen < now - self.config.liveness_timeout_s:
            return  # out of rotation: back when it announces (the tokenizer reconnects then)
        rep.waiting, rep.running, rep.kv_usage = msg.waiting, msg.running, msg.kv_usage
        rep.prefix_hits, rep.prefix_queries = msg.prefix_hits, msg.prefix_queries
        rep.routed = 0
        self._update(rep)
        rep.last_seen = now

    def mark_dead(self, replica_id: str) -> None:
        """Out of rotation at once (its worker died under a request); back when it announces."""
        rep = self._replicas.get(replica_id)
        if rep is not None:
            rep.last_seen = -math.inf
            self._live_until = -math.inf

    def live_replicas(self, now: float) -> list[str]:
        return [rep.replica_id for rep in self._live_at(now)]

    def _live_at(self, now: float) -> list[_Replica]:
        if now >= self._live_until:
            timeout = self.config.liveness_timeout_s
            self._live = [r for r in self._slots if r.announce is not None and now - r.last_seen <= timeout]
            self._live_until = min((r.last_seen + timeout for r in self._live), default=math.inf)
            self._live_mask = sum(r.bit for r in self._live)
        return self._live

    def snapshot(self, now: float | None = None) -> dict[str, dict]:
        """Each replica's state, for /health."""
        now = self.clock() if now is None else now
        live = {r.replica_id for r in self._live_at(now)}
        out = {}
        for rep in self._slots:
            a = rep.announce
            out[rep.replica_id] = {
                "live": rep.replica_id in live,
                "address": a.request_address if a else None,
                "seen_s_ago": None if rep.last_seen == -math.inf else round(now - rep.last_seen, 3),
                "waiting": rep.waiting,
                "running": rep.running,
                "kv_usage": rep.kv_usage,
                "prefix_hits": rep.prefix_hits,
                "prefix_queries": rep.prefix_queries,
                "indexed_blocks": len(rep.held),
                "kv_events_seq": rep.next_seq,
            }
        for replica_id, why in self.refused.items():
            out.setdefault(replica_id, {"live": False})["refused"] = why
        return out

    # ------------------------------------------------------------------ KV events
    def on_kv_events(self, batch: KVEventBatch, now: float | None = None) -> int | None:
        """Apply a batch in seq order; the seq to replay from when a gap is seen (else None)."""
        rep = self._replicas.get(batch.replica_id)
        if rep is None or rep.announce is None:
            return None  # not announced yet: once it is, its events are replayed from seq 0
        if batch.seq < rep.next_seq:
            return None  # seen already (a replay overlapping what came live)
        if batch.seq > rep.next_seq:
            if len(rep.held_back) >= self.config.max_held_batches:
                rep.held_back.clear()  # the replay is not coming: ask again, from the same seq
                rep.replay_asked_at = -math.inf
            rep.held_back[batch.seq] = batch
            now = self.clock() if now is None else now
            if now - rep.replay_asked_at >= self.config.replay_retry_s:
                rep.replay_asked_at = now
                return rep.next_seq
            return None
        self._apply(rep, batch)
        self._apply_held_back(rep)
        return None

    def on_replay_answer(self, answer: KVReplayReply | KVReplayUnavailable) -> int | None:
        """What a replica's replay ROUTER answered; like on_kv_events, a seq when still short."""
        rep = self._replicas.get(answer.replica_id)
        if rep is None or rep.announce is None:
            return None
        rep.replay_asked_at = -math.inf
        if isinstance(answer, KVReplayUnavailable):
            self._drop_held(rep)
            for h in answer.block_hashes:
                self._hold(rep, h)
            rep.next_seq = answer.seq + 1
            rep.held_back = {s: b for s, b in rep.held_back.items() if s >= rep.next_seq}
            self._apply_held_back(rep)
            return None
        ask = None
        for batch in answer.batches:
            seq = self.on_kv_events(batch)
            ask = seq if ask is None else ask
        return ask

    def _apply_held_back(self, rep: _Replica) -> None:
        held_back = rep.held_back
        while held_back:
            batch = held_back.pop(rep.next_seq, None)
            if batch is None:
                for seq in [s for s in held_back if s < rep.next_seq]:
                    del held_back[seq]
                return
            self._apply(rep, batch)

    def _apply(self, rep: _Replica, batch: KVEventBatch) -> None:
        for event in batch.events:
            if isinstance(event, BlockStored):
                for h in event.block_hashes:
                    self._hold(rep, h)
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    self._unhold(rep, h)
            elif isinstance(event, AllBlocksCleared):
                self._drop_held(rep)
        rep.next_seq = batch.seq + 1

    def _hold(self, rep: _Replica, h: int) -> None:
        if h not in rep.held:
            rep.held.add(h)
            index = self._index
            index[h] = index.get(h, 0) | rep.bit

    def _unhold(self, rep: _Replica, h: int) -> None:
        if h in rep.held:
            rep.held.discard(h)
            if h not in rep.pending:
                self._clear_bit(h, rep.bit)

    def _drop_held(self, rep: _Replica) -> None:
        pending = rep.pending
        for h in rep.held:
            if h not in pending:
                self._clear_bit(h, rep.bit)
        rep.held = set()

    def _forget(self, rep: _Replica) -> None:
        """Everything known of a replica's cache and events (it restarted, or was refused)."""
        self._drop_held(rep)
        for h in rep.pending:
            self._clear_bit(h, rep.bit)
        rep.pending = {}
        rep.next_seq = 0
        rep.held_back = {}
        rep.replay_asked_at = -math.inf
        rep.waiting = rep.running = rep.routed = 0
        rep.kv_usage = 0.0
        self._update(rep)

    def _clear_bit(self, h: int, bit: int) -> None:
        index = self._index
        mask = index.get(h)
        if mask is not None:
            mask &= ~bit
            if mask:
                index[h] = mask
            else:
                del index[h]

    def _expire_pending(self, now: float) -> None:
        queue = self._pending_expiry
        while queue and queue[0][0] <= now:
            expiry, rep, hashes = queue.popleft()
            pending, held = rep.pending, rep.held
            for h in hashes:
                if pending.get(h) == expiry:  # not renewed by a later request
                    del pending[h]
                    if h not in held:
                        self._clear_bit(h, rep.bit)

    # ------------------------------------------------------------------ routing
    def route(
        self,
        token_ids: Sequence[int],
        cache_salt: str | None = None,
        session: str | None = None,
        now: float | None = None,
        exclude: Collection[str] = (),
        block_hashes: Sequence[int] | None = None,
    ) -> RouteDecision:
        """The replica for a request, or NoReplicaAvailable. ``block_hashes``: the prompt's
        ``prompt_event_hashes`` if already computed (a re-route after a failover), else computed
        here when the policy needs them."""
        now = self.clock() if now is None else now
        live = self._live_at(now)
        cands = [r for r in live if r.replica_id not in exclude] if exclude else live
        if not cands:
            raise NoReplicaAvailable(
                "no replica is available"
                if not self._slots
                else "no live replica is available; retry shortly"
            )
        if session is not None:
            replica_id = self._sessions.get(session)
            if replica_id is not None:
                rep = self._replicas[replica_id]
                if rep in cands:
                    self._sessions.move_to_end(session)
                    rep.routed += 1
                    self._update(rep)
                    matched = 0
                    if self.policy == "prefix_aware":
                        hashes = self._hashes(token_ids, cache_salt) if block_hashes is None else block_hashes
                        matched = self._walk(hashes, rep.bit).get(rep.slot, 0)
                        self._insert_pending(rep, hashes, matched, now)
                    return RouteDecision(replica_id, "session", matched)
        if self.policy == "prefix_aware":
            hashes = self._hashes(token_ids, cache_salt) if block_hashes is None else block_hashes
            rep, reason, matched = self._prefix_aware(cands, hashes, now)
        elif self.policy == "least_loaded":
            rep, reason, matched = self._least_loaded(cands), "least_loaded", 0
        else:
            rep, reason, matched = self._round_robin(cands), "round_robin", 0
        rep.routed += 1
        self._update(rep)
        if session is not None:
            sessions = self._sessions
            sessions[session] = rep.replica_id
            sessions.move_to_end(session)
            if len(sessions) > self.config.max_sessions:
                sessions.popitem(last=False)
        return RouteDecision(rep.replica_id, reason, matched)

    def _round_robin(self, cands: list[_Replica]) -> _Replica:
        n = len(self._slots)
        start = self._rr
        rep = min(cands, key=lambda r: (r.slot - start) % n)
        self._rr = rep.slot + 1
        return rep

    def _least_loaded(self, cands: list[_Replica]) -> _Replica:
        n = len(self._slots)
        start = self._rr  # ties in turn, not always the first slot
        rep = min(cands, key=lambda r: (r.load, (r.slot - start) % n))
        self._rr = rep.slot + 1
        return rep

    def _hashes(self, token_ids: Sequence[int], cache_salt: str | None) -> list[int]:
        return prompt_event_hashes(token_ids, self.block_size, cache_salt)

    def held_prefix(self, token_ids: Sequence[int], cache_salt: str | None, now: float) -> dict[str, int]:
        """Leading blocks of the prompt each live replica holds, as the index says (no side effects)."""
        self._expire_pending(now)
        by_slot = self._matched(self._hashes(token_ids, cache_salt), self._live_at(now))
        return {self._slots[slot].replica_id: n for slot, n in by_slot.items()}

    def _matched(self, hashes: Sequence[int], cands: list[_Replica]) -> dict[int, int]:
        if cands is self._live:
            cur = self._live_mask
        else:
            cur = 0
            for r in cands:
                cur |= r.bit
        return self._walk(hashes, cur)

    def _walk(self, hashes: Sequence[int], cur: int) -> dict[int, int]:
        """Leading blocks of ``hashes`` each replica of mask ``cur`` holds, by slot (those
        holding >= 1), by bisection: O(log(blocks)) index lookups per distinct answer.

        A replica's cached blocks are closed under prefixes: a block is keyed after its parent,
        and evicted before it (the block manager frees a sequence tail first, and a parent is
        used whenever a child is), so "holds block i" implies "holds blocks 0..i". Bisection
        finds, for the set ``s`` of replicas holding blocks 0..lo, the last block all of them
        hold. Where a cache were not prefix-closed, a replica missing a middle block might be
        counted as holding it: a routing estimate off, never a wrong answer from the scheduler
        (it matches its own keys). One lookup per block would cost ~1 us each at 1M blocks
        (cache misses), the whole budget of a decision."""
        n = len(hashes)
        if not n:
            return {}
        get = self._index.get
        s = get(hashes[0], 0) & cur
        out: dict[int, int] = {}
        lo = 0  # every replica in s holds blocks 0..lo
        while s:
            hi = n - 1
            if get(hashes[hi], 0) & s == s:
                lo = hi
            else:  # lo: all of s hold it; hi: not all do
                while hi - lo > 1:
                    mid = (lo + hi) >> 1
                    if get(hashes[mid], 0) & s == s:
                        lo = mid
                    else:
                        hi = mid
            rest = get(hashes[lo + 1], 0) & s if lo + 1 < n else 0
            dropped = s & ~rest
            while dropped:
                low = dropped & -dropped
                out[low.bit_length() - 1] = lo + 1
                dropped ^= low
            s = rest
            lo += 1
        return out

    def _update(self, rep: _Replica) -> None:
        cfg = self.config
        rep.update(cfg.load_weight / cfg.balance_abs_threshold, cfg.kv_weight)

    def _prefix_aware(
        self, cands: list[_Replica], hashes: Sequence[int], now: float
    ) -> tuple[_Replica, str, int]:
        """Balance when loads are too uneven, else the best score (module docstring). The score
        less its constant part is ``prefix_w * matched - cost``: the best replica holding nothing
        is the one of least cost, so only those holding a prefix are scored one by one."""
        cfg = self.config
        self._expire_pending(now)
        matched = self._matched(hashes, cands) if hashes else {}
        loads = list(map(_get_load, cands))
        min_load, max_load = min(loads), max(loads)
        if (
            max_load - min_load > cfg.balance_abs_threshold
            and max_load > min_load * cfg.balance_rel_threshold
        ):
            idlest = [cands[i] for i, load in enumerate(loads) if load == min_load]
            rep = max(idlest, key=lambda r: matched.get(r.slot, 0))  # of those, the most prefix
            reason = "balance"
        else:
            costs = list(map(_get_cost, cands))
            rep = cands[costs.index(min(costs))]  # the first (lowest slot) of equal ones
            best = -rep.cost
            prefix_w = cfg.prefix_weight / len(hashes) if hashes else 0.0
            slots = self._slots
            for slot, m in matched.items():
                r = slots[slot]
                score = prefix_w * m - r.cost
                if score > best or (score == best and slot < rep.slot):
                    best, rep = score, r
            reason = "prefix" if matched.get(rep.slot, 0) else "load"
        m = matched.get(rep.slot, 0)
        self._insert_pending(rep, hashes, m, now)
        return rep, reason, m

    def _insert_pending(self, rep: _Replica, hashes: Sequence[int], matched: int, now: float) -> None:
        """The prompt's blocks beyond the ``matched`` ones the index already gives ``rep``: until
        its events confirm them (or ``pending_ttl_s``), they count as held there."""
        new = hashes[matched:]
        if not new:
            return
        expiry = now + self.config.pending_ttl_s
        index, pending, bit = self._index, rep.pending, rep.bit
        for h in new:
            pending[h] = expiry
            index[h] = index.get(h, 0) | bit
        self._pending_expiry.append((expiry, rep, new))

"""The Router with fake replicas: what each one announces, reports and stores is fed by hand,
and the clock is the ``now`` each call passes, so every choice here is exact."""

from __future__ import annotations

import logging

import msgspec
import pytest

from zeroserve.shared.ipc import Codec
from zeroserve.shared.messages import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVReplayReply,
    KVReplayUnavailable,
    LoadReport,
    RegistryInbox,
    ReplicaAnnounce,
)
from zeroserve.shared.prefix_hash import prompt_event_hashes
from zeroserve.tokenizer_proc.router import NoReplicaAvailable, Router, RouterConfig

BS = 4
MODEL = "tiny"


def prompt(first: int, n_blocks: int, tail: int = 1) -> list[int]:
    """n_blocks full blocks of distinct tokens starting at ``first``, then a partial block."""
    return list(range(first, first + n_blocks * BS + tail))


def announce(replica_id: str, model: str = MODEL, started_at: float = 1.0, block_size: int = BS):
    return ReplicaAnnounce(
        replica_id=replica_id, model=model, request_address=f"ipc:///tmp/{replica_id}",
        replay_address=f"ipc:///tmp/{replica_id}-replay", block_size=block_size, num_kv_blocks=1000,
        max_model_len=4096, started_at=started_at,
    )  # fmt: skip


def load(replica_id: str, waiting: int = 0, running: int = 0, kv: float = 0.0, seq: int = 1) -> LoadReport:
    return LoadReport(replica_id=replica_id, seq=seq, waiting=waiting, running=running, kv_usage=kv)


def stored(replica_id: str, seq: int, tokens: list[int], salt: str | None = None) -> KVEventBatch:
    hashes = prompt_event_hashes(tokens, BS, salt)
    return KVEventBatch(replica_id=replica_id, seq=seq, ts=0.0, events=[BlockStored(block_hashes=hashes)])


def heartbeat(router: Router, now: float, *replica_ids: str) -> None:
    """Each replica announces itself and reports an idle load (what a live replica does)."""
    for replica_id in replica_ids:
        router.on_announce(announce(replica_id), now=now)
        router.on_load(load(replica_id), now=now)


def cluster(n: int, policy: str = "prefix_aware", **cfg) -> Router:
    router = Router(policy, BS, RouterConfig(model=MODEL, **cfg), clock=lambda: 0.0)
    for i in range(n):
        assert router.on_announce(announce(f"r{i}"), now=0.0)
    return router


# ---------------------------------------------------------------------- prefix affinity


def test_prefix_hit_goes_to_the_replica_holding_the_longest_leading_run():
    router = cluster(3)
    p = prompt(100, 6)
    assert router.on_kv_events(stored("r0", 0, p[: 1 * BS])) is None  # r0: 1 leading block
    assert router.on_kv_events(stored("r2", 0, p[: 4 * BS])) is None  # r2: 4
    # r1 holds blocks 2..5 of the prompt but not the first: a chained hash cannot match them
    other = KVEventBatch(replica_id="r1", seq=0, ts=0.0,
                         events=[BlockStored(block_hashes=prompt_event_hashes(p, BS, None)[2:])])  # fmt: skip
    assert router.on_kv_events(other) is None
    d = router.route(p, now=0.1)
    assert (d.replica_id, d.reason, d.matched_blocks) == ("r2", "prefix", 4)


def test_without_any_prefix_the_least_loaded_wins_and_kv_usage_breaks_ties():
    router = cluster(3)
    router.on_load(load("r0", waiting=2), now=0.1)
    router.on_load(load("r1", running=1, kv=0.9), now=0.1)
    router.on_load(load("r2", running=1, kv=0.2), now=0.1)
    d = router.route(prompt(5000, 3), now=0.2)
    assert (d.replica_id, d.reason, d.matched_blocks) == ("r2", "load", 0)


def test_imbalance_beyond_the_threshold_makes_balance_win_over_affinity():
    router = cluster(2)
    p = prompt(100, 8)
    router.on_kv_events(stored("r1", 0, p))
    # r1 somewhat busier (load 20 - 0 < 32): the full prefix hit is worth it
    router.on_load(load("r1", waiting=5), now=0.1)
    assert router.route(p, now=0.2).replica_id == "r1"
    # r1 far busier (load 40 + the one just routed: 44 > 32 and > 0 * 1.5): balance wins
    router.on_load(load("r1", waiting=10), now=0.3)
    d = router.route(p, now=0.4)
    assert (d.replica_id, d.reason) == ("r0", "balance")


def test_the_cache_salt_is_part_of_the_hash():
    router = cluster(2)
    p = prompt(100, 5)
    router.on_load(load("r1", running=3), now=0.1)  # r0 is idler, r1 holds tenant-a's prefix
    router.on_kv_events(stored("r1", 0, p, salt="tenant-a"))
    assert router.route(p, cache_salt="tenant-a", now=0.2).replica_id == "r1"
    d = router.route(p, cache_salt="tenant-b", now=0.2)
    assert (d.replica_id, d.matched_blocks) == ("r0", 0), "another tenant's prefix must not attract it"
    assert router.route(p, now=0.2).matched_blocks == 0, "no salt is not tenant-a's salt"


def test_pending_insert_sends_a_burst_with_one_prefix_to_one_replica_until_it_expires():
    router = cluster(3, pending_ttl_s=2.0)
    system = prompt(100, 8, tail=0)
    first = router.route(system + [7, 8, 9], now=0.0)
    assert first.reason == "load" and first.replica_id == "r0"
    # no event yet: the router's own insert makes the next ones follow
    for i in range(3):
        d = router.route(system + [i], now=0.1)
        assert (d.replica_id, d.reason, d.matched_blocks) == ("r0", "prefix", 8)
    assert router.route(prompt(900, 8), now=0.2).replica_id == "r1", "an unrelated prompt goes elsewhere"
    # the replica never confirmed the blocks: after the ttl they no longer attract requests
    heartbeat(router, 2.5, "r0", "r1", "r2")
    d = router.route(system + [1], now=2.6)
    assert (d.replica_id, d.matched_blocks) == ("r0", 0)  # r0 by slot order: an all-way tie
    assert router.route(system + [2], now=2.7).matched_blocks == 8, "routing re-inserts the prefix"


def test_a_confirmed_block_outlives_its_pending_insert_and_removal_drops_it():
    router = cluster(2, pending_ttl_s=1.0)
    p = prompt(100, 4)
    assert router.route(p, now=0.0).replica_id == "r0"
    router.on_kv_events(stored("r0", 0, p))
    heartbeat(router, 0.9, "r0", "r1")
    assert router.route(p, now=1.5).matched_blocks == 4
    hashes = prompt_event_hashes(p, BS, None)
    router.on_kv_events(KVEventBatch(replica_id="r0", seq=1, ts=0.0, events=[BlockRemoved(hashes[2:])]))
    heartbeat(router, 3.0, "r0", "r1")  # every pending insert expired by now
    assert router.route(p, now=3.1).matched_blocks == 2
    router.on_kv_events(KVEventBatch(replica_id="r0", seq=2, ts=0.0, events=[AllBlocksCleared()]))
    heartbeat(router, 5.5, "r0", "r1")
    assert router.route(p, now=5.6).matched_blocks == 0


# ---------------------------------------------------------------------- sessions and simple policies


def test_a_session_sticks_to_its_replica_while_it_is_live():
    router = cluster(3)
    p = prompt(100, 4)
    router.on_kv_events(stored("r2", 0, p))
    first = router.route(prompt(500, 2), session="alice", now=0.1)
    assert first.replica_id == "r0"
    d = router.route(p, session="alice", now=0.2)  # r2 holds this prompt, but alice stays on r0
    assert (d.replica_id, d.reason, d.matched_blocks) == ("r0", "session", 0)
    d = router.route(p + [1, 2], session="alice", now=0.25)  # r0 got p's blocks with the last one
    assert (d.replica_id, d.reason, d.matched_blocks) == ("r0", "session", 4)
    assert router.route(p, session="bob", now=0.2).replica_id == "r2"
    # r0 goes silent: alice moves (and stays where she moved)
    for t in (0.9, 1.8):
        router.on_load(load("r1"), now=t)
        router.on_load(load("r2"), now=t)
    moved = router.route(prompt(700, 2), session="alice", now=1.9)
    assert moved.replica_id in ("r1", "r2") and moved.reason != "session"
    assert router.route(p, session="alice", now=1.95).replica_id == moved.replica_id


def test_round_robin_and_least_loaded_exact_choices():
    rr = cluster(3, policy="round_robin")
    assert [rr.route([1, 2], now=0.1).replica_id for _ in range(4)] == ["r0", "r1", "r2", "r0"]
    assert rr.route([1], now=0.1, exclude={"r1"}).replica_id == "r2"

    ll = cluster(3, policy="least_loaded")
    ll.on_load(load("r0", waiting=1, running=0), now=0.1)  # 4
    ll.on_load(load("r1", waiting=0, running=3), now=0.1)  # 3
    ll.on_load(load("r2", waiting=0, running=5), now=0.1)  # 5
    d = ll.route([1, 2, 3], now=0.2)
    assert (d.replica_id, d.reason) == ("r1", "least_loaded")
    # the request just sent counts as waiting on r1 (3 + 4 = 7) until r1 reports again
    assert ll.route([1, 2, 3], now=0.2).replica_id == "r0"


def test_no_replica_raises_and_exclude_is_honoured():
    router = Router("prefix_aware", BS, RouterConfig(model=MODEL))
    with pytest.raises(NoReplicaAvailable):
        router.route([1, 2, 3], now=0.0)
    router.on_announce(announce("r0"), now=0.0)
    with pytest.raises(NoReplicaAvailable):
        router.route([1, 2, 3], now=0.1, exclude=("r0",))


# ---------------------------------------------------------------------- liveness and refusals


def test_a_silent_replica_is_out_within_a_second_and_back_when_it_announces():
    router = cluster(2)
    p = prompt(100, 4)
    router.on_kv_events(stored("r1", 0, p))
    router.on_load(load("r0"), now=0.5)
    router.on_load(load("r1"), now=0.5)  # r1 says nothing after this
    router.on_load(load("r0"), now=1.2)
    assert router.route(p, now=1.4).replica_id == "r1"
    assert router.live_replicas(1.5) == ["r0", "r1"], "silent for exactly 1 s: still in"
    assert router.live_replicas(1.51) == ["r0"]
    assert router.route(p, now=1.55).replica_id == "r0", "a silent replica is skipped within 1 s"
    router.on_load(load("r1"), now=1.6)
    assert router.live_replicas(1.6) == ["r0"], "a load report alone does not bring it back"
    router.on_announce(announce("r1"), now=1.7)
    assert router.live_replicas(1.7) == ["r0", "r1"]
    d = router.route(p, now=1.75, exclude={"r0"})  # (r0 holds p too now: the request sent at 1.55)
    assert (d.replica_id, d.matched_blocks) == ("r1", 4), "back, with its index intact"
    assert router.snapshot(1.75)["r1"]["live"] is True


def test_mark_dead_takes_a_replica_out_until_it_announces():
    router = cluster(2)
    router.mark_dead("r0")
    assert router.live_replicas(0.1) == ["r1"]
    router.on_announce(announce("r0"), now=0.2)
    assert router.live_replicas(0.2) == ["r0", "r1"]


def test_a_replica_announcing_another_model_or_block_size_is_refused_with_a_logged_reason(caplog):
    router = Router("prefix_aware", BS, RouterConfig(model=MODEL))
    with caplog.at_level(logging.WARNING, logger="zeroserve.router"):
        assert not router.on_announce(announce("rx", model="other-model"), now=0.0)
        assert not router.on_announce(announce("ry", block_size=16), now=0.0)
    assert "other-model" in caplog.text and "block size is 16" in caplog.text
    assert router.live_replicas(0.1) == []
    with pytest.raises(NoReplicaAvailable):
        router.route([1, 2, 3, 4, 5], now=0.1)
    assert "other-model" in router.snapshot(0.1)["rx"]["refused"]
    # a replica that was accepted and then announces another model leaves the rotation
    router.on_announce(announce("r0"), now=0.0)
    assert router.live_replicas(0.1) == ["r0"]
    router.on_announce(announce("r0", model="other-model"), now=0.2)
    assert router.live_replicas(0.3) == []


def test_a_restarted_replica_starts_with_an_empty_index():
    router = cluster(2)
    p = prompt(100, 4)
    router.on_kv_events(stored("r1", 0, p))
    router.on_load(load("r1", running=1), now=0.1)
    assert router.route(p, now=0.2).replica_id == "r1"
    router.on_announce(announce("r1", started_at=2.0), now=0.3)  # new process
    assert router.route(p, now=0.4).matched_blocks == 0
    assert router.on_kv_events(stored("r1", 0, prompt(300, 1))) is None, "its seqs start again at 0"


def test_a_malformed_load_report_is_dropped_and_counted():
    codec: Codec = Codec(RegistryInbox, "test")
    good = codec.encode(load("r0", waiting=1))
    bad = [
        b"\x00garbage",
        msgspec.msgpack.encode(["load", "r0", 1, -3, 0, 0.5]),  # negative waiting
        msgspec.msgpack.encode(["load", "r0", 1, 0, 0, 1.5]),  # KV usage above 1
        msgspec.msgpack.encode(["load", "r0", 1, 0, 0, float("nan")]),
        msgspec.msgpack.encode(["kv", "r0", "one", 0.0, []]),  # seq not an int
        msgspec.msgpack.encode(["kv", "r0", 1, 0.0, [["stored", "not-a-list"]]]),
        msgspec.msgpack.encode(["exec", "os.system"]),
    ]
    assert [codec.decode(f) for f in bad] == [None] * len(bad)
    assert codec.bad_frames == len(bad)
    assert codec.decode(good) == load("r0", waiting=1)
    # built in-process (no decoder bounds): the router drops it itself and keeps the last report
    router = cluster(2)
    router.on_load(load("r0", waiting=1), now=0.1)
    router.on_load(LoadReport(replica_id="r0", seq=2, waiting=0, running=0, kv_usage=float("nan")), now=0.2)
    router.on_load(LoadReport(replica_id="r0", seq=3, waiting=-5, running=0, kv_usage=0.0), now=0.2)
    assert router.bad_reports == 2
    assert router.snapshot(0.3)["r0"]["waiting"] == 1


# ---------------------------------------------------------------------- KV events: gaps and resync


def test_a_sequence_gap_asks_for_a_replay_and_the_replay_fills_it_in_order():
    router = cluster(1, replay_retry_s=1.0)
    a, b, c = prompt(100, 2), prompt(200, 2), prompt(300, 2)
    assert router.on_kv_events(stored("r0", 0, a), now=0.0) is None
    hashes_b = prompt_event_hashes(b, BS, None)
    # seq 1 is lost on the bus; seq 2 removes b (stored by seq 1): applying it early would be wrong
    removed_b = KVEventBatch(replica_id="r0", seq=2, ts=0.0, events=[BlockRemoved(hashes_b)])
    assert router.on_kv_events(removed_b, now=0.1) == 1
    assert router.on_kv_events(stored("r0", 3, c), now=0.2) is None, "asked already, within replay_retry_s"
    assert router.route(c, now=0.3).matched_blocks == 0, "held back behind the gap"
    assert router.on_kv_events(stored("r0", 4, prompt(400, 1)), now=1.2) == 1, "no answer: ask again"
    reply = KVReplayReply(replica_id="r0", batches=[stored("r0", 1, b), removed_b, stored("r0", 3, c)])
    assert router.on_replay_answer(reply) is None
    assert router.snapshot(0.3)["r0"]["kv_events_seq"] == 5, "the replay and what was held back: 1..4"
    assert router.route(c, now=0.4).matched_blocks == 2
    assert router.route(b, now=0.4).matched_blocks == 0
    assert router.route(a, now=0.4).matched_blocks == 2


def test_replay_unavailable_resyncs_from_the_snapshot():
    router = cluster(1)
    a, b = prompt(100, 3), prompt(200, 3)
    router.on_kv_events(stored("r0", 0, a))
    assert router.on_kv_events(stored("r0", 9, prompt(300, 1)), now=0.0) == 1
    snapshot = KVReplayUnavailable(replica_id="r0", seq=8, block_hashes=prompt_event_hashes(b, BS, None))
    assert router.on_replay_answer(snapshot) is None
    assert router.route(a, now=0.1).matched_blocks == 0, "what the snapshot does not hold is dropped"
    assert router.route(b, now=0.1).matched_blocks == 3
    assert router.route(prompt(300, 1), now=0.1).matched_blocks == 1, "the held-back seq 9 applied after"
    assert router.snapshot(0.1)["r0"]["kv_events_seq"] == 10


def test_a_replica_first_seen_mid_stream_is_replayed_from_zero():
    router = cluster(1)
    assert router.on_kv_events(stored("r0", 41, prompt(100, 1)), now=0.0) == 0
    assert router.on_kv_events(stored("unknown", 0, prompt(100, 1)), now=0.0) is None


def test_without_now_the_injected_clock_decides_who_is_live():
    t = [0.0]
    router = Router("round_robin", BS, RouterConfig(model=MODEL), clock=lambda: t[0])
    router.on_announce(announce("r0"), now=0.0)
    router.on_announce(announce("r1"), now=0.0)
    t[0] = 0.9
    router.on_load(load("r1"), now=0.9)
    assert [router.route([1]).replica_id for _ in range(2)] == ["r0", "r1"]
    t[0] = 1.05  # r0 silent for 1.05 s, r1 for 0.15 s
    assert [router.route([1]).replica_id for _ in range(2)] == ["r1", "r1"]
    assert router.snapshot()["r0"]["live"] is False

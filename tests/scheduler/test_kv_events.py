"""KV events from the real scheduler and block manager: what a router is told about a prefill,
a prefix hit, an eviction and a reset, and what a replay gives back to one that missed some.

block_size 4 throughout."""

from __future__ import annotations

from sched_fakes import Driver, make_request

from zeroserve.scheduler_proc.kv_events import KVEventLog
from zeroserve.scheduler_proc.scheduler import Scheduler, SchedulerConfig
from zeroserve.shared.messages import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVReplayReply,
    KVReplayUnavailable,
    ReplicaAnnounce,
)
from zeroserve.shared.prefix_hash import prompt_event_hashes
from zeroserve.tokenizer_proc.router import Router, RouterConfig

BS = 4


def make_sched(num_blocks: int = 64) -> tuple[Scheduler, Driver, KVEventLog]:
    s = Scheduler(SchedulerConfig(num_blocks=num_blocks, block_size=BS, max_model_len=256,
                                  max_num_batched_tokens=64, max_num_seqs=6))  # fmt: skip
    log = KVEventLog("r0", ring_size=4)
    s.blocks.events = log
    return s, Driver(s), log


def tokens(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def run_one(s: Scheduler, d: Driver, rid: str, prompt: list[int], salt: str | None = None) -> None:
    s.add_request(make_request(rid, prompt, max_tokens=1, cache_salt=salt))
    d.run()


def test_a_prefill_stores_its_full_blocks_with_the_routers_hashes():
    s, d, log = make_sched()
    prompt = tokens(100, 3 * BS + 2)
    run_one(s, d, "a", prompt, salt="tenant")
    batch = log.flush(now=5.0)
    assert batch is not None and (batch.replica_id, batch.seq, batch.ts) == ("r0", 0, 5.0)
    # one BlockStored for the three full blocks (the partial one is never shared), in chain
    # order, equal to what a router computes from the prompt: one hash function on both sides
    assert batch.events == [BlockStored(block_hashes=prompt_event_hashes(prompt, BS, "tenant"))]
    assert prompt_event_hashes(prompt, BS, "tenant") != prompt_event_hashes(prompt, BS, None)
    assert log.flush(now=6.0) is None, "nothing new: no batch"


def test_a_prefix_hit_stores_only_the_blocks_it_computed():
    s, d, log = make_sched()
    system = tokens(100, 2 * BS)
    run_one(s, d, "a", system + [1])
    log.flush(0.0)
    run_one(s, d, "b", system + [1])  # the same prompt: a full hit, nothing new keyed
    assert log.flush(0.0) is None
    longer = system + tokens(500, BS + 1)
    run_one(s, d, "c", longer)  # hits the system prompt, keys one more block
    batch = log.flush(0.0)
    assert batch is not None and batch.seq == 1
    assert batch.events == [BlockStored(block_hashes=prompt_event_hashes(longer, BS, None)[2:])]


def test_an_eviction_removes_the_evicted_blocks():
    s, d, log = make_sched(num_blocks=4)
    a = tokens(100, 3 * BS + 1)  # 3 full blocks + 1 partial: the whole pool
    run_one(s, d, "a", a)
    log.flush(0.0)
    b = tokens(900, 2 * BS + 1)  # needs 3 blocks: one free (a's partial) + 2 evicted of a's
    run_one(s, d, "b", b)
    batch = log.flush(0.0)
    assert batch is not None
    removed = [h for e in batch.events if isinstance(e, BlockRemoved) for h in e.block_hashes]
    stored = [h for e in batch.events if isinstance(e, BlockStored) for h in e.block_hashes]
    ha = prompt_event_hashes(a, BS, None)
    # a freed its blocks tail first, so LRU evicts its end first; its first block survives
    assert removed == [ha[2], ha[1]]
    assert stored == prompt_event_hashes(b, BS, None)
    assert isinstance(batch.events[0], BlockRemoved), "b's blocks were evicted before they were keyed"
    assert log.snapshot().block_hashes == sorted([ha[0], *stored])


def test_a_reset_is_one_all_blocks_cleared():
    s, d, log = make_sched()
    run_one(s, d, "a", tokens(100, 3 * BS + 1))
    s.reset_kv_cache()
    batch = log.flush(0.0)
    # the stores of the same batch are superseded: a router only needs to know the cache is empty
    assert batch is not None and batch.events == [AllBlocksCleared()]
    assert log.snapshot().block_hashes == []
    run_one(s, d, "b", tokens(100, 3 * BS + 1))  # the same prompt: keyed again, no hit
    again = log.flush(0.0)
    assert again is not None and again.events == [BlockStored(prompt_event_hashes(tokens(100, 13), BS, None))]


def test_replay_returns_what_was_missed_and_a_snapshot_once_the_ring_has_moved_on():
    s, d, log = make_sched()  # the ring holds 4 batches
    batches: list[KVEventBatch] = []
    for i in range(6):
        run_one(s, d, f"p{i}", tokens(1000 * (i + 1), BS + 1))
        batch = log.flush(float(i))
        assert batch is not None and batch.seq == i
        batches.append(batch)
    reply = log.replay(3)
    assert isinstance(reply, KVReplayReply) and reply.batches == batches[3:]
    assert log.replay(6) == KVReplayReply(replica_id="r0", batches=[]), "up to date: nothing to send"
    for gone in (0, 1, 7):  # left the ring, or from a previous life of the replica
        snap = log.replay(gone)
        assert isinstance(snap, KVReplayUnavailable) and snap.seq == 5
        assert snap.block_hashes == sorted(prompt_event_hashes(tokens(1000 * (i + 1), BS), BS, None)[0]
                                           for i in range(6))  # fmt: skip


def test_a_router_that_misses_batches_ends_up_with_the_schedulers_view():
    s, d, log = make_sched(num_blocks=8)
    router = Router("prefix_aware", BS, RouterConfig(), clock=lambda: 0.0)
    router.on_announce(
        ReplicaAnnounce(replica_id="r0", model="m", request_address="a", replay_address="b", block_size=BS,
                        num_kv_blocks=8, max_model_len=256, started_at=0.0), now=0.0)  # fmt: skip
    prompts = [tokens(1000 * (i + 1), 3 * BS + 1) for i in range(5)]  # the pool holds 2 at a time
    asked = None
    for i, p in enumerate(prompts):
        run_one(s, d, f"p{i}", p)
        batch = log.flush(0.0)
        assert batch is not None
        if i in (1, 2):
            continue  # lost on the bus
        got = router.on_kv_events(batch, now=float(i * 2))
        asked = got if got is not None else asked
    assert asked == 1
    router.on_replay_answer(log.replay(asked))
    cached = set(log.snapshot().block_hashes)
    for p in prompts:
        hashes = prompt_event_hashes(p, BS, None)
        expect = 0
        while expect < len(hashes) and hashes[expect] in cached:
            expect += 1
        assert router.held_prefix(p, None, now=0.0).get("r0", 0) == expect

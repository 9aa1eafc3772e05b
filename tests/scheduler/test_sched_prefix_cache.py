"""Automatic prefix caching through the Scheduler: exact block ids in hit scenarios.

block_size 4 throughout; a fresh pool hands out blocks 0, 1, 2, ... in order.
"""

from __future__ import annotations

from sched_fakes import Driver, make_request

from zeroserve.scheduler_proc.scheduler import Scheduler, SchedulerConfig
from zeroserve.shared.messages import NewRequestData, StepPlan


def make_sched(num_blocks: int = 64, **kw) -> Scheduler:
    kw.setdefault("max_num_batched_tokens", 64)
    kw.setdefault("max_num_seqs", 6)
    return Scheduler(SchedulerConfig(num_blocks=num_blocks, block_size=4, max_model_len=256, **kw))


def new_of(plan: StepPlan, rid: str) -> NewRequestData:
    (n,) = [n for n in plan.new if n.request_id == rid]
    return n


def tokens(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_shared_system_prompt_is_reused_by_a_later_request():
    s = make_sched()
    d = Driver(s)
    system = tokens(100, 12)  # three full blocks
    s.add_request(make_request("a", system + [200, 201], max_tokens=4))
    plan = d.step()
    assert new_of(plan, "a").block_ids == [0, 1, 2, 3] and new_of(plan, "a").num_computed_tokens == 0
    s.add_request(make_request("b", system + [300, 301, 302], max_tokens=4))
    plan = d.step()
    b = new_of(plan, "b")
    assert b.block_ids == [0, 1, 2, 4], "b must share the system prompt's blocks and get a fresh 4th"
    assert (b.num_computed_tokens, b.num_new_tokens) == (12, 3)
    assert [s.blocks.ref_cnt[i] for i in range(5)] == [2, 2, 2, 1, 1]
    stats = s.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (14 + 15, 12)
    d.run()
    assert d.finish == {"a": "length", "b": "length"}
    first_b = next(x for x in d.deltas if x.request_id == "b")
    assert (first_b.num_prompt_tokens, first_b.num_cached_tokens) == (15, 12)
    assert s.num_free_blocks == 64 and all(r == 0 for r in s.blocks.ref_cnt)


def test_n4_siblings_of_one_prompt_share_full_blocks_in_the_same_step():
    s = make_sched()
    d = Driver(s)
    prompt = tokens(100, 10)  # blocks: full, full, 2 of 4
    for i in range(4):
        s.add_request(make_request(f"r{i}", prompt, max_tokens=5))
    plan = d.step()
    assert [(n.request_id, n.block_ids, n.num_computed_tokens) for n in plan.new] == [
        ("r0", [0, 1, 2], 0),
        ("r1", [0, 1, 3], 8),
        ("r2", [0, 1, 4], 8),
        ("r3", [0, 1, 5], 8),
    ]
    assert s.blocks.ref_cnt[:6] == [4, 4, 1, 1, 1, 1]
    assert (s.stats().prefix_cache_queries, s.stats().prefix_cache_hits) == (40, 24)
    d.run()
    # the fake model reads every context back through the block tables: same prompt, same tokens
    assert len({tuple(t) for t in d.tokens.values()}) == 1 and len(d.tokens["r0"]) == 5
    assert s.num_free_blocks == 64


def test_partial_last_block_is_never_shared():
    s = make_sched()
    d = Driver(s)
    prompt = tokens(100, 10)
    s.add_request(make_request("a", prompt, max_tokens=1))
    d.run()  # a: blocks [0, 1, 2]; 0 and 1 full (cached-free), 2 partial (back to free)
    assert s.blocks.block_key[2] is None and s.blocks.block_key[0] is not None
    s.add_request(make_request("b", prompt, max_tokens=1))
    plan = d.step()
    b = new_of(plan, "b")
    assert b.num_computed_tokens == 8 and b.num_new_tokens == 2
    assert b.block_ids == [0, 1, 3], "the partly filled block 2 must not be reused as a hit"


def test_prompt_of_whole_blocks_recomputes_its_last_block():
    s = make_sched()
    d = Driver(s)
    s.add_request(make_request("a", tokens(100, 8), max_tokens=1))
    d.run()  # blocks 0, 1 full and cached
    s.add_request(make_request("b", tokens(100, 8), max_tokens=1))
    b = new_of(d.step(), "b")
    # at least one token must be computed to sample: the hit stops one block short
    assert (b.block_ids, b.num_computed_tokens, b.num_new_tokens) == ([0, 2], 4, 4)


def test_eviction_order_under_pressure():
    s = make_sched(num_blocks=8)
    d = Driver(s)
    a_prompt, b_prompt = tokens(100, 12), tokens(200, 12)
    s.add_request(make_request("a", a_prompt, max_tokens=1))
    d.run()  # a: [0, 1, 2], all keyed -> cached-free, evicted tail first: 2, 1, 0
    s.add_request(make_request("b", b_prompt, max_tokens=1))
    d.run()  # b: [3, 4, 5] -> LRU now 2, 1, 0, 5, 4, 3; unkeyed free: 6, 7
    assert list(s.blocks._cached_free) == [2, 1, 0, 5, 4, 3] and list(s.blocks._free) == [6, 7]
    s.add_request(make_request("c", tokens(300, 15), max_tokens=2))
    c = new_of(d.step(), "c")
    assert c.block_ids == [6, 7, 2, 1], "free blocks first, then the oldest cached, a's tail first"
    assert s.blocks.num_evictions == 2
    s.add_request(make_request("a2", a_prompt, max_tokens=1))
    plan = d.step()  # c decodes position 15 (no new block); a2 arrives; both finish
    a2 = new_of(plan, "a2")
    assert a2.num_computed_tokens == 4, "only a's first block survived"
    assert a2.block_ids == [0, 5, 4], "then b's blocks are evicted, tail first"
    # freed in finish order, tail first: c (1, 2, 7, 6), then a2 (4, 5, 0), behind b's 3
    assert list(s.blocks._cached_free) == [3, 1, 2, 7, 6, 4, 5, 0]
    s.add_request(make_request("b2", b_prompt, max_tokens=1))
    b2 = new_of(d.step(), "b2")
    assert (b2.block_ids, b2.num_computed_tokens) == ([3, 1, 2], 4), "b's first block survived"
    assert s.blocks.num_evictions == 6


def test_cache_salt_separates_tenants():
    s = make_sched()
    d = Driver(s)
    prompt = tokens(100, 9)
    s.add_request(make_request("x", prompt, max_tokens=2, cache_salt="tenant-a"))
    d.run()
    s.add_request(make_request("y", prompt, max_tokens=2, cache_salt="tenant-b"))
    s.add_request(make_request("nosalt", prompt, max_tokens=2))
    s.add_request(make_request("z", prompt, max_tokens=2, cache_salt="tenant-a"))
    plan = d.step()
    x_blocks = d.plans[0].new[0].block_ids
    assert new_of(plan, "y").num_computed_tokens == 0, "another tenant's salt must not hit"
    assert new_of(plan, "nosalt").num_computed_tokens == 0, "no salt must not hit a salted prefix"
    z = new_of(plan, "z")
    assert z.num_computed_tokens == 8 and z.block_ids[:2] == x_blocks[:2], "the same tenant hits"
    assert not set(new_of(plan, "y").block_ids) & set(x_blocks)
    d.run()
    assert d.tokens["y"] == d.tokens["z"] == d.tokens["x"]


def test_generated_tokens_fill_cacheable_blocks():
    s = make_sched()
    d = Driver(s)
    s.add_request(make_request("a", tokens(100, 6), max_tokens=6))
    d.run()
    a_blocks = d.plans[0].new[0].block_ids + [b for p in d.plans for r in p.running for b in r.new_block_ids]
    history = tokens(100, 6) + d.tokens["a"]  # 12 tokens; KV held 11 of them (last never fed back)
    s.add_request(make_request("b", history[:10], max_tokens=1))
    b = new_of(d.step(), "b")
    assert b.num_computed_tokens == 8, "block 1 (prompt 4..5 + generated 0..1) must be cached"
    assert b.block_ids[:2] == a_blocks[:2]


def test_prefix_caching_disabled():
    s = make_sched(enable_prefix_caching=False)
    d = Driver(s)
    for i in range(2):
        s.add_request(make_request(f"r{i}", tokens(100, 10), max_tokens=2))
    plan = d.step()
    assert [n.block_ids for n in plan.new] == [[0, 1, 2], [3, 4, 5]]
    assert all(n.num_computed_tokens == 0 for n in plan.new)
    d.run()
    assert s.stats().prefix_cache_queries == 0 and s.blocks.num_cached_blocks == 0


def test_chunk_ending_mid_block_keys_only_full_blocks():
    s = make_sched(max_num_batched_tokens=6)
    d = Driver(s)
    s.add_request(make_request("a", tokens(100, 10), max_tokens=2))
    d.step()  # a computed 6 tokens: block 0 full, block 1 holds 2 of 4
    assert s.blocks.block_key[0] is not None and s.blocks.block_key[1] is None
    assert s.blocks.find_cached_prefix(s.request("a").block_keys, 2) == [0]
    s.add_request(make_request("b", tokens(100, 10), max_tokens=2))
    plan = d.step()  # a's last 4 tokens fill block 1 in this step; b, admitted after it, shares it
    assert new_of(plan, "b").block_ids == [0, 1, 3] and new_of(plan, "b").num_computed_tokens == 8
    d.run()
    assert d.tokens["a"] == d.tokens["b"]

"""Scheduler behaviour: finishing, abort, chunked prefill, priority, preemption, failures."""

from __future__ import annotations

import random

import pytest
from sched_fakes import Driver, FakeWorker, context_token, make_request

from zeroserve.scheduler_proc.scheduler import Scheduler, SchedulerConfig
from zeroserve.shared.messages import SamplingParams, StepResult, TokenLogprobs

EOS = 2


def make_sched(num_blocks: int = 64, **kw) -> Scheduler:
    kw.setdefault("max_num_batched_tokens", 64)
    kw.setdefault("max_num_seqs", 6)
    kw.setdefault("max_model_len", 256)
    return Scheduler(SchedulerConfig(num_blocks=num_blocks, block_size=4, eos_token_ids=(EOS,), **kw))


def script(outputs: dict[str, list[int]], prompt_len: int):
    """A fake model that emits outputs[rid][i] as the i-th generated token, else a context token."""

    def next_token(rid: str, context: list[int]) -> int:
        i = len(context) - prompt_len
        seq = outputs.get(rid, [])
        return seq[i] if i < len(seq) else context_token(rid, context)

    return next_token


# ----------------------------------------------------------------------------- finishing


def test_max_tokens_finishes_with_length_and_first_delta_carries_prompt_info():
    s = make_sched()
    d = Driver(s)
    s.add_request(make_request("a", list(range(100, 110)), max_tokens=5))
    d.run()
    deltas = [x for x in d.deltas if x.request_id == "a"]
    assert [len(x.token_ids) for x in deltas] == [1] * 5
    assert [x.finish_reason for x in deltas] == [None] * 4 + ["length"]
    assert (deltas[0].num_prompt_tokens, deltas[0].num_cached_tokens) == (10, 0)
    assert all(x.num_prompt_tokens == 0 for x in deltas[1:])
    assert not s.has_unfinished() and s.num_free_blocks == 64


@pytest.mark.parametrize(
    ("outputs", "params", "expect_tokens", "finish", "stop_reason"),
    [
        ([11, EOS, 12], {}, [11, EOS], "stop", None),
        ([11, 77, 12], {"stop_token_ids": [77]}, [11, 77], "stop", 77),
        ([11, EOS, 12, 13], {"ignore_eos": True, "max_tokens": 4}, [11, EOS, 12, 13], "length", None),
        ([EOS, EOS, EOS, EOS], {"min_tokens": 3}, [EOS, EOS, EOS], "stop", None),
        ([11, 12, EOS], {"max_tokens": 3}, [11, 12, EOS], "stop", None),  # stop wins on the last token
    ],
)
def test_stop_conditions(outputs, params, expect_tokens, finish, stop_reason):
    s = make_sched()
    d = Driver(s, FakeWorker(64, 4, script({"a": outputs}, prompt_len=5)))
    params = {"max_tokens": 10} | params
    s.add_request(make_request("a", [100, 101, 102, 103, 104], params=SamplingParams(**params)))
    d.run()
    assert d.tokens["a"] == expect_tokens and d.finish["a"] == finish
    assert d.deltas[-1].stop_reason == stop_reason


def test_context_length_finishes_with_length():
    s = make_sched(max_model_len=16)
    d = Driver(s)
    s.add_request(make_request("a", list(range(100, 110)), max_tokens=6))  # exactly 16
    d.run()
    assert len(d.tokens["a"]) == 6 and d.finish["a"] == "length"


def test_logprobs_pass_through_to_deltas():
    s = make_sched()
    s.add_request(make_request("a", [100, 101], max_tokens=1))
    plan = s.schedule(0.0)
    lp = TokenLogprobs(-0.5)
    (delta,) = s.update_from_output(StepResult(plan.step_id, ["a"], [50], logprobs=[lp]))
    assert delta.logprobs == [lp] and delta.finish_reason == "length"


# ----------------------------------------------------------------------------- abort


def test_abort_in_every_state_frees_blocks_at_once():
    s = make_sched(max_num_batched_tokens=8, max_num_seqs=2)
    w = FakeWorker(64, 4)
    assert s.abort("nope") is False
    s.add_request(make_request("decoding", [200, 201], max_tokens=20))
    s.add_request(make_request("prefilling", list(range(100, 130)), max_tokens=4))  # 30 tokens: chunked
    s.add_request(make_request("waiting", [300, 301], max_tokens=4))  # no seat: max_num_seqs=2
    s.update_from_output(w.step(s.schedule(0.0)))
    s.update_from_output(w.step(s.schedule(0.0)))
    assert (
        s.request("prefilling").num_computed_tokens == 6 + 7
        and len(s.request("decoding").output_token_ids) == 2
    )
    free, held = s.num_free_blocks, len(s.request("prefilling").block_ids)
    assert s.abort("waiting") and s.abort("prefilling")
    assert s.num_free_blocks == free + held == free + 4, "the prefilling request's blocks come back at once"
    s.check_invariants()
    plan = s.schedule(0.0)
    assert plan.finished_ids == ["prefilling"], "the workers never saw 'waiting'"
    assert s.abort("decoding"), "abort while its step is in flight"
    assert s.num_free_blocks == 64
    result = w.step(plan)
    assert result.request_ids == ["decoding"]
    assert s.update_from_output(result) == [], "a token for an aborted request is dropped"
    s.add_request(make_request("next", [400], max_tokens=1))
    assert s.schedule(0.0).finished_ids == ["decoding"]
    s.check_invariants()


def test_abort_and_reuse_of_the_id_while_in_flight():
    s = make_sched()
    w = FakeWorker(64, 4)
    s.add_request(make_request("x", [100, 101, 102], max_tokens=3))
    plan = s.schedule(0.0)
    s.abort("x")
    s.add_request(make_request("x", [500, 501], max_tokens=2))  # a new request, same id
    assert s.update_from_output(w.step(plan)) == [], "the old x's token must not land on the new x"
    d = Driver(s, w)
    d.run()
    assert d.plans[0].finished_ids == ["x"] and d.plans[0].new[0].token_ids == [500, 501]
    assert len(d.tokens["x"]) == 2 and d.finish["x"] == "length"


# ----------------------------------------------------------------------------- chunked prefill


def test_chunked_prefill_never_exceeds_the_budget_and_decodes_go_first():
    s = make_sched(max_num_batched_tokens=10)
    d = Driver(s)
    s.add_request(make_request("d1", [100, 101], max_tokens=30))
    s.add_request(make_request("d2", [110, 111], max_tokens=30))
    d.step()
    s.add_request(make_request("long", list(range(200, 237)), max_tokens=2))  # 37 tokens
    chunks = []
    while "long" not in d.tokens:
        plan = d.step()
        assert sum(r.num_new_tokens for r in plan.running) + sum(n.num_new_tokens for n in plan.new) <= 10
        assert [r.num_new_tokens for r in plan.running if r.request_id != "long"] == [1, 1], "decodes first"
        chunks += [x.num_new_tokens for x in plan.new + plan.running if x.request_id == "long"]
        assert s.stats().tokens_scheduled_last_step == min(10, 2 + chunks[-1])
    assert chunks == [8, 8, 8, 8, 5], "each chunk is the budget left after the two decodes"
    d.run()
    assert len(d.tokens["long"]) == 2 and len(d.tokens["d1"]) == 30


def test_max_num_seqs_caps_the_batch():
    s = make_sched(max_num_seqs=2)
    d = Driver(s)
    for i in range(5):
        s.add_request(make_request(f"r{i}", [100 + i, 50], max_tokens=3))
    while d.step() is not None:
        assert len(s.running) <= 2
    assert len(d.finish) == 5


# ----------------------------------------------------------------------------- priority


def test_high_priority_arrival_goes_first():
    s = make_sched(max_num_seqs=1)
    d = Driver(s)
    s.add_request(make_request("busy", [100], max_tokens=3, arrival=0.0))
    d.step()
    s.add_request(make_request("low", [101], max_tokens=1, arrival=1.0, priority=5))
    s.add_request(make_request("high", [102], max_tokens=1, arrival=2.0, priority=0))
    s.add_request(make_request("high-later", [103], max_tokens=1, arrival=3.0, priority=0))
    d.run()
    order = [n.request_id for p in d.plans for n in p.new]
    assert order == ["busy", "high", "high-later", "low"]


@pytest.mark.parametrize("aging", [1.0, None])
def test_low_priority_finishes_under_steady_high_priority_load(aging):
    """Two high-priority arrivals per step, more than two seats can serve: the backlog grows."""
    s = make_sched(max_num_seqs=2, priority_aging_s=aging)
    d = Driver(s, check=False)
    s.add_request(make_request("low", [100, 101], max_tokens=4, arrival=0.0, priority=3))
    arrival = {"low": 0.0}
    for step in range(150):
        now = round(step * 0.1, 6)
        for k in range(2):
            arrival[f"hi-{step}-{k}"] = now
            s.add_request(make_request(f"hi-{step}-{k}", [200, step % 50], max_tokens=3, arrival=now))
        d.step(now)
        if "low" in d.finish:
            break
    if aging is None:  # strict (priority, arrival) order starves it: the reason aging exists
        assert "low" not in d.finish
        return
    assert d.finish.get("low") == "length"
    admitted = [n.request_id for p in d.plans for n in p.new]
    before = admitted[: admitted.index("low")]
    # priority 3 at 1 s per level ranks "low" like a request arriving at t = 3 s: exactly the
    # high-priority requests that arrived before then go first, none that arrived after
    assert before and max(arrival[r] for r in before) < 3.0
    assert all(arrival[r] >= 3.0 for r in arrival if r not in before and r != "low")


# ----------------------------------------------------------------------------- preemption


def _workload(rng: random.Random, n: int) -> list[tuple[str, list[int], int, int]]:
    system = list(range(100, 111))
    out = []
    for i in range(n):
        prompt = (system if i % 2 else []) + [rng.randrange(200, 900) for _ in range(rng.randrange(1, 14))]
        out.append((f"r{i}", prompt, rng.randrange(1, 25), rng.randrange(0, 3)))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_preemption_under_a_tiny_pool_gives_the_same_tokens(seed):
    workload = _workload(random.Random(seed), 16)
    results = {}
    tiny_pool = max(-(-(len(p) + mt - 1) // 4) for _, p, mt, _ in workload)  # the least that can work
    for num_blocks in (1000, tiny_pool):
        s = make_sched(num_blocks=num_blocks, max_num_batched_tokens=16, max_num_seqs=8)
        d = Driver(s)
        for rid, prompt, max_tokens, priority in workload:
            s.add_request(make_request(rid, prompt, max_tokens=max_tokens, priority=priority))
        d.run()
        results[num_blocks] = (d.tokens, d.finish, s.stats())
        assert s.num_free_blocks == num_blocks
    big, tiny = results[1000], results[tiny_pool]
    assert tiny[2].num_preemptions > 0 and big[2].num_preemptions == 0
    assert tiny[0] == big[0] and tiny[1] == big[1]
    assert all(len(big[0][rid]) == mt for rid, _, mt, _ in workload)


def test_preemption_picks_the_lowest_priority_latest_arrival():
    s = make_sched(num_blocks=6, max_num_seqs=4)
    d = Driver(s)
    s.add_request(make_request("hi", [100, 101, 102], max_tokens=12, priority=0, arrival=0.0))
    s.add_request(make_request("lo-early", [110, 111, 112], max_tokens=12, priority=1, arrival=0.0))
    s.add_request(make_request("lo-late", [120, 121, 122], max_tokens=12, priority=1, arrival=1.0))
    d.step()  # 3 blocks used; every request needs a second block at position 4, a third at 8
    victims = []
    while not victims:
        plan = d.step()
        victims = [rid for rid in plan.finished_ids]
    assert victims == ["lo-late"]
    assert s.request("lo-late") is not None and s.request("lo-late").num_computed_tokens == 0
    d.run()
    assert all(len(d.tokens[r]) == 12 for r in ("hi", "lo-early", "lo-late"))


# ----------------------------------------------------------------------------- failures


def test_step_error_fails_its_requests_and_drops_keys_it_would_have_written():
    s = make_sched()
    w = FakeWorker(64, 4)
    s.add_request(make_request("a", list(range(100, 109)), max_tokens=3))
    plan = s.schedule(0.0)
    assert s.blocks.num_cached_blocks == 2
    deltas = s.update_from_output(StepResult(plan.step_id, [], [], error="CUDA error: device lost"))
    assert [(x.request_id, x.finish_reason, x.error.status) for x in deltas] == [("a", "error", 500)]
    assert "device lost" in deltas[0].error.message and deltas[0].num_prompt_tokens == 9
    assert s.blocks.num_cached_blocks == 0 and s.num_free_blocks == 64, "blocks never written: no keys"
    s.add_request(make_request("b", list(range(100, 109)), max_tokens=2))
    plan = s.schedule(0.0)
    assert plan.finished_ids == ["a"] and plan.new[0].num_computed_tokens == 0
    w.reqs["a"] = None  # the worker had taken the failed plan's request in
    s.update_from_output(w.step(plan))
    s.check_invariants()


def test_worker_missing_a_token_fails_that_request_only():
    s = make_sched()
    for rid in ("a", "b"):
        s.add_request(make_request(rid, [100, 101], max_tokens=3))
    plan = s.schedule(0.0)
    deltas = s.update_from_output(StepResult(plan.step_id, ["a"], [50]))
    assert [(x.request_id, x.finish_reason) for x in deltas] == [("a", None), ("b", "error")]
    s.check_invariants()


def test_protocol_misuse_is_reported():
    s = make_sched()
    s.add_request(make_request("a", [100], max_tokens=2))
    plan = s.schedule(0.0)
    with pytest.raises(RuntimeError, match="in flight"):
        s.schedule(0.0)
    with pytest.raises(ValueError, match="step in flight"):
        s.update_from_output(StepResult(plan.step_id + 1, [], []))
    s.update_from_output(StepResult(plan.step_id, ["a"], [50]))
    with pytest.raises(ValueError):
        s.update_from_output(StepResult(plan.step_id, ["a"], [50]))


def test_reset_kv_cache_requeues_running_requests_for_fresh_workers():
    workload = [(f"r{i}", list(range(100 + i, 112 + i)), 10) for i in range(4)]
    reference = make_sched()
    ref = Driver(reference)
    for rid, prompt, mt in workload:
        reference.add_request(make_request(rid, prompt, max_tokens=mt))
    ref.run()
    s = make_sched()
    d = Driver(s)
    for rid, prompt, mt in workload:
        s.add_request(make_request(rid, prompt, max_tokens=mt))
    for _ in range(4):
        d.step()
    s.reset_kv_cache()  # the worker group restarted: KV gone
    assert s.blocks.num_cached_blocks == 0 and s.num_free_blocks == 64 and len(s.waiting) == 4
    d.w = FakeWorker(64, 4)
    d.run()
    assert d.tokens == ref.tokens


def test_stats_snapshot():
    s = make_sched(num_blocks=10, max_num_seqs=1)
    d = Driver(s)
    s.add_request(make_request("a", list(range(100, 110)), max_tokens=2))
    s.add_request(make_request("b", list(range(100, 110)), max_tokens=2))
    d.step()
    st = s.stats()
    assert (st.num_running, st.num_waiting, st.num_steps, st.tokens_scheduled_last_step) == (1, 1, 1, 10)
    assert st.kv_cache_usage == pytest.approx(0.3) and (st.num_kv_blocks, st.num_free_blocks) == (10, 7)
    d.run()
    st = s.stats()
    assert (st.num_running, st.num_waiting, st.kv_cache_usage, st.num_free_blocks) == (0, 0, 0.0, 10)
    assert (st.prefix_cache_queries, st.prefix_cache_hits) == (20, 8)


def test_preempted_request_resumes_with_its_generated_tokens_and_a_prefix_hit():
    s = make_sched(num_blocks=5)
    d = Driver(s)
    s.add_request(make_request("a", list(range(100, 108)), max_tokens=6))  # needs 4 blocks at the end
    s.add_request(make_request("b", list(range(200, 206)), max_tokens=8))  # needs 4 blocks at the end
    b_blocks = d.step().new[1].block_ids
    while "b" not in d.plans[-1].finished_ids:  # pool of 5 runs out: b (later arrival) is preempted
        d.step()
    generated = list(d.tokens["b"])
    assert len(generated) == 3 and s.request("b").num_computed_tokens == 0
    resumed = None
    while resumed is None:
        d.step()
        resumed = next((n for n in d.plans[-1].new if n.request_id == "b"), None)
    assert resumed.token_ids == list(range(200, 206)) + generated, "resumed with every known token"
    assert resumed.num_prompt_tokens == 6, "the generated tokens stay output (penalties, min_tokens)"
    assert resumed.num_computed_tokens == 4 and resumed.block_ids[0] == b_blocks[0], (
        "its first block survived"
    )
    d.run()
    assert len(d.tokens["b"]) == 8 and d.finish["b"] == "length"

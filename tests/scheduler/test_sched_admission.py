"""Admission control (400 / 429) and deadlines, each exactly at its limit."""

from __future__ import annotations

import pytest
from sched_fakes import Driver, make_request

from zeroserve.scheduler_proc.scheduler import AdmissionError, Scheduler, SchedulerConfig


def make_sched(num_blocks: int = 64, **kw) -> Scheduler:
    kw.setdefault("max_model_len", 64)
    return Scheduler(SchedulerConfig(num_blocks=num_blocks, block_size=4, **kw))


def refused(s: Scheduler, req) -> AdmissionError:
    with pytest.raises(AdmissionError) as info:
        s.add_request(req)
    return info.value


def test_context_length_limit_is_exact():
    s = make_sched(max_model_len=64)
    s.add_request(make_request("fits", [100] * 40, max_tokens=24))  # 64 == max_model_len
    err = refused(s, make_request("over", [100] * 40, max_tokens=25))
    assert err.status == 400 and err.code == "context_length_exceeded" and "64" in err.message
    info = err.to_error_info()
    assert (info.status, info.type, info.param) == (400, "invalid_request_error", "max_tokens")


def test_each_context_limit_names_the_field_at_fault():
    """The context rules live here alone (the API and the tokenizer leave them to the scheduler)."""
    s = make_sched(max_model_len=64)
    s.add_request(make_request("fits", [100] * 63, max_tokens=1))
    err = refused(s, make_request("long", [100] * 64, max_tokens=1))
    assert (err.param, err.code) == (
        "prompt",
        "context_length_exceeded",
    ) and "prompt has 64 tokens" in err.message
    # "the rest of the context" resolved by the tokenizer for a prompt that fills it: the prompt is at fault
    assert refused(s, make_request("full", [100] * 70, max_tokens=-6)).param == "prompt"
    err = refused(s, make_request("huge", [100], max_tokens=65))
    assert err.param == "max_tokens" and err.message.startswith(
        "max_tokens is 65, but this model's context holds 64"
    )


def test_min_tokens_may_reach_max_tokens_but_not_pass_it():
    s = make_sched()
    s.add_request(make_request("equal", [100], max_tokens=4, sampling={"min_tokens": 4}))
    err = refused(s, make_request("over", [100], max_tokens=4, sampling={"min_tokens": 5}))
    assert (err.status, err.param) == (400, "min_tokens") and "got 5" in err.message


def test_kv_pool_limit_is_exact_and_the_largest_admitted_request_runs():
    s = make_sched(num_blocks=4)  # 16 token slots
    # KV holds prompt + max_tokens - 1 tokens (the last sampled token is never fed back)
    err = refused(s, make_request("over", [100] * 10, max_tokens=8))
    assert err.status == 400 and err.code == "kv_cache_too_small"
    s.add_request(make_request("fits", [100] * 10, max_tokens=7))
    d = Driver(s)
    d.run()
    assert len(d.tokens["fits"]) == 7 and d.finish["fits"] == "length"


@pytest.mark.parametrize(("prompt", "max_tokens"), [([], 4), ([100], 0)])
def test_empty_prompt_and_zero_max_tokens_are_refused(prompt, max_tokens):
    assert refused(make_sched(), make_request("x", prompt, max_tokens=max_tokens)).status == 400


def test_duplicate_request_id_is_refused():
    s = make_sched()
    s.add_request(make_request("x", [100], max_tokens=1))
    assert refused(s, make_request("x", [101], max_tokens=1)).status == 400


def test_max_waiting_requests_is_exact():
    s = make_sched(max_waiting_requests=3, max_num_seqs=1)
    for i in range(3):
        s.add_request(make_request(f"r{i}", [100 + i], max_tokens=2))
    err = refused(s, make_request("r3", [103], max_tokens=2))
    assert err.status == 429 and err.to_error_info().type == "rate_limit_error"
    s.schedule(0.0)  # r0 starts running: one waiting seat frees up
    s.add_request(make_request("r3", [103], max_tokens=2))
    assert refused(s, make_request("r4", [104], max_tokens=2)).status == 429


def test_max_waiting_tokens_is_exact():
    s = make_sched(max_waiting_tokens=20)
    s.add_request(make_request("a", [100] * 8, max_tokens=1))
    s.add_request(make_request("b", [100] * 8, max_tokens=1))
    assert refused(s, make_request("c", [100] * 5, max_tokens=1)).status == 429  # 21 > 20
    s.add_request(make_request("c", [100] * 4, max_tokens=1))  # exactly 20
    assert s.waiting.num_tokens == 20


def test_token_limit_never_refuses_into_an_empty_queue():
    s = make_sched(max_waiting_tokens=20)
    s.add_request(make_request("big", [100] * 30, max_tokens=1))  # alone: accepted, else refused forever
    assert refused(s, make_request("next", [100], max_tokens=1)).status == 429


def test_deadline_times_out_exactly_after_it_passes():
    s = make_sched(max_num_seqs=1)
    d = Driver(s)
    # more urgent, so it holds the one seat (by deadline alone, "late" would run first)
    s.add_request(make_request("busy", [100], max_tokens=10, arrival=0.0, priority=-1))
    s.add_request(make_request("late", [101, 102], max_tokens=2, arrival=0.0, deadline=5.0))
    d.step(now=1.0)
    d.step(now=5.0)  # at the deadline: still waiting, not yet late
    assert "late" not in d.finish and len(s.waiting) == 1
    d.step(now=5.000001)
    assert d.finish["late"] == "timeout"
    (delta,) = [x for x in d.deltas if x.request_id == "late"]
    assert delta.token_ids == [] and delta.num_prompt_tokens == 2
    assert len(s.waiting) == 0 and s.request("late") is None
    d.run(now=6.0)
    assert all(n.request_id != "late" for p in d.plans for n in p.new), "a timed-out request never runs"
    assert not any("late" in p.finished_ids for p in d.plans), "the workers never knew it"


def test_deadline_is_checked_before_admission_and_ends_started_requests_too():
    s = make_sched(num_blocks=5, max_num_seqs=4)
    d = Driver(s)
    s.add_request(make_request("expired", [100], max_tokens=1, deadline=1.0))
    s.add_request(make_request("hi", [110, 111, 112], max_tokens=14, priority=0, deadline=100.0))
    s.add_request(make_request("lo", [120, 121, 122], max_tokens=10, priority=1, deadline=2.0))
    plan = d.step(now=1.5)
    assert d.finish == {"expired": "timeout"} and [n.request_id for n in plan.new] == ["hi", "lo"]
    for _ in range(20):  # the pool runs out: "lo" is preempted back to waiting
        d.step(now=1.5)
        if s.stats().num_preemptions:
            break
    assert s.request("lo") in list(s.waiting)
    d.run(now=50.0)  # past lo's deadline: that it started (then was preempted) does not spare it
    assert d.finish == {"expired": "timeout", "hi": "length", "lo": "timeout"}
    assert s.request("lo") is None and not s.has_unfinished()


def test_seats_are_capped_by_the_token_budget_so_every_running_request_advances():
    s = make_sched(max_num_seqs=16, max_num_batched_tokens=5)
    d = Driver(s)
    for i in range(8):
        s.add_request(make_request(f"r{i}", [100 + i] * 3, max_tokens=6))
    while s.has_unfinished():
        before = {r.request_id for r in s.running}
        plan = d.step()
        assert len(s.running) <= 5
        assert before <= {r.request_id for r in plan.running}, "a running request skipped a step"
    assert len(d.finish) == 8
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(num_blocks=8, max_model_len=64, max_num_seqs=0)

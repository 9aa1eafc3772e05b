"""StepResult.dead_ends: a request whose grammar allowed no token ends as "stop" with
stop_reason "grammar_dead_end", without the token sampled for it, and frees its blocks; the
other requests of the step are not touched."""

from __future__ import annotations

from sched_fakes import make_request

from zeroserve.scheduler_proc.scheduler import Scheduler, SchedulerConfig
from zeroserve.shared.messages import SamplingParams, StepResult


def test_dead_end_ends_only_that_request_without_its_token():
    s = Scheduler(SchedulerConfig(num_blocks=16, block_size=4, eos_token_ids=(0,), max_model_len=64))
    for rid in ("a", "b"):
        s.add_request(make_request(rid, [5, 6, 7], params=SamplingParams(max_tokens=8)))
    plan = s.schedule()
    result = StepResult(plan.step_id, ["a", "b"], [11, 12])
    first = {d.request_id: d for d in s.update_from_output(result)}
    assert first["a"].token_ids == [11] and first["a"].finish_reason is None
    plan = s.schedule()
    deltas = {
        d.request_id: d
        for d in s.update_from_output(StepResult(plan.step_id, ["a", "b"], [13, 99], dead_ends=["b"]))
    }
    assert deltas["a"].token_ids == [13] and deltas["a"].finish_reason is None
    b = deltas["b"]
    assert b.token_ids == [] and b.finish_reason == "stop" and b.stop_reason == "grammar_dead_end"
    assert b.timings is not None
    assert s.request("b") is None and s.request("a").all_token_ids == [5, 6, 7, 11, 13]
    plan = s.schedule()
    assert plan.finished_ids == ["b"] and [r.request_id for r in plan.running] == ["a"]
    s.check_invariants()
    s.update_from_output(StepResult(plan.step_id, ["a"], [14]))
    s.abort("a")
    assert s.num_free_blocks == 16 and not s.has_unfinished()

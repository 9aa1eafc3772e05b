"""Priority is bounded: no request jumps every queue for good, and aging lets the least urgent
end of the range through under steady load at the most urgent end (a fake clock: arrival
times are the tokenizer's, so the test sets them)."""

from __future__ import annotations

import pytest
from sched_fakes import Driver, make_request

from zeroserve.scheduler_proc.scheduler import AdmissionError, Scheduler, SchedulerConfig
from zeroserve.shared.config import DEFAULTS

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def make_sched(**kw) -> Scheduler:
    kw.setdefault("max_model_len", 64)
    return Scheduler(SchedulerConfig(num_blocks=64, block_size=4, **kw))


def test_the_default_range_is_minus_100_to_100():
    assert DEFAULTS.priority_range == (-100, 100)
    assert SchedulerConfig(num_blocks=1, max_model_len=8).priority_range == (-100, 100)


@pytest.mark.parametrize(
    "priority_range, outside", [((-100, 100), [INT64_MIN, -101, 101, INT64_MAX]), ((-3, 5), [-4, 6])]
)
def test_a_priority_outside_the_range_is_refused_with_400(priority_range, outside):
    s = make_sched(priority_range=priority_range)
    low, high = priority_range
    for p in outside:
        with pytest.raises(AdmissionError) as info:
            s.add_request(make_request(f"p{p}", [100], max_tokens=1, priority=p))
        err = info.value.to_error_info()
        assert (err.status, err.type, err.param) == (400, "invalid_request_error", "priority")
        assert f"between {low} and {high}" in err.message and str(p) in err.message
    for p in (low, high, 0 if low <= 0 <= high else low):
        s.add_request(make_request(f"ok{p}-{len(s.waiting)}", [100], max_tokens=1, priority=p))
    assert len(s.waiting) == 3
    s.check_invariants()


def test_a_reversed_range_is_a_config_error():
    with pytest.raises(ValueError, match="priority_range"):
        SchedulerConfig(num_blocks=1, max_model_len=8, priority_range=(5, -5))


@pytest.mark.parametrize("priority_range, aging", [((-100, 100), 0.1), ((-3, 5), 1.0)])
def test_the_least_urgent_priority_runs_within_a_bound_under_steady_most_urgent_load(priority_range, aging):
    """Three most-urgent arrivals per 0.1 s step against two seats: the queue stays full (the
    rest get 429). The least urgent request, waiting from t = 0, ranks like a most-urgent one
    arriving at t = (high - low) * aging, so it runs once the backlog from before then is
    served: within that time plus one full queue's worth of steps, never later."""
    low, high = priority_range
    queue_limit = 16
    s = make_sched(max_num_seqs=2, priority_aging_s=aging, priority_range=priority_range,
                   max_waiting_requests=queue_limit)  # fmt: skip
    d = Driver(s, check=False)
    s.add_request(make_request("lazy", [100, 101], max_tokens=2, arrival=0.0, priority=high))
    catch_up = (high - low) * aging
    steps_per_request = 3  # a 2-token prompt and 2 new tokens: prefill, decode, done
    bound = catch_up + (queue_limit * steps_per_request / 2 + 10) * 0.1
    arrival, refused = {}, 0
    now = 0.0
    step = 0
    while "lazy" not in d.finish:
        now = round(step * 0.1, 6)
        assert now <= bound, f"the priority-{high} request still waits at t={now} (bound {bound:.1f})"
        for k in range(3):
            rid = f"urgent-{step}-{k}"
            try:
                s.add_request(make_request(rid, [200, step % 50], max_tokens=2, arrival=now, priority=low))
                arrival[rid] = now
            except AdmissionError as e:
                assert e.status == 429
                refused += 1
        d.step(now)
        step += 1
    assert refused > 0, "the load was not steady: the queue never filled"
    admitted = [n.request_id for p in d.plans for n in p.new]
    before = admitted[: admitted.index("lazy")]
    assert len(before) > queue_limit  # the urgent ones did go first for a while
    assert max(arrival[r] for r in before) <= catch_up + 1e-9  # only those it ranks behind
    assert now >= catch_up - 1.0  # and it did not jump ahead either

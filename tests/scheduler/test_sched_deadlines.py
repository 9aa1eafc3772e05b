"""Deadlines of started requests: a running (or preempted) request past its deadline ends with
finish reason "timeout", its blocks freed and the workers told to forget it. The clock is the
``now`` passed to schedule(); never-started requests are covered in test_sched_admission.py."""

from __future__ import annotations

from sched_fakes import Driver, make_request

from zeroserve.scheduler_proc.scheduler import Scheduler, SchedulerConfig


def make_sched(num_blocks: int = 64, **kw) -> Scheduler:
    kw.setdefault("max_model_len", 256)
    return Scheduler(SchedulerConfig(num_blocks=num_blocks, block_size=4, **kw))


def test_a_running_request_times_out_once_its_deadline_passes():
    s = make_sched()
    d = Driver(s)
    s.add_request(make_request("slow", [100, 101, 102], max_tokens=100, deadline=5.0))
    s.add_request(make_request("other", [110, 111], max_tokens=100))
    d.step(now=1.0)
    for now in (2.0, 3.0, 4.0, 5.0):  # at the deadline itself: still running
        d.step(now=now)
    assert "slow" not in d.finish and s.request("slow") in s.running
    produced = list(d.tokens["slow"])
    assert len(produced) == 5

    plan = d.step(now=5.000001)
    assert d.finish == {"slow": "timeout"}
    last = [x for x in d.deltas if x.request_id == "slow"][-1]
    assert last.token_ids == [] and last.error is None and last.num_prompt_tokens == 0  # not its first delta
    assert d.tokens["slow"] == produced, "no token after the timeout"
    assert s.request("slow") is None
    assert "slow" in plan.finished_ids and "slow" not in d.w.reqs, "the workers were told to forget it"
    assert all(r.request_id != "slow" for r in plan.running)
    d.run(now=6.0)
    assert d.finish["other"] == "length"
    assert s.num_free_blocks == s.cfg.num_blocks, "the timed-out request's blocks came back"


def test_a_timeout_before_the_first_token_carries_the_prompt_counts():
    s = make_sched(max_num_batched_tokens=4)  # a 12-token prompt takes three steps to prefill
    d = Driver(s)
    s.add_request(make_request("long", list(range(100, 112)), max_tokens=4, deadline=1.0))
    d.step(now=0.5)
    assert s.request("long").num_computed_tokens == 4
    d.step(now=2.0)
    (delta,) = d.deltas
    assert (delta.finish_reason, delta.num_prompt_tokens, delta.token_ids) == ("timeout", 12, [])
    assert not s.has_unfinished()


def test_an_aborted_requests_deadline_does_not_touch_a_new_request_with_its_id():
    s = make_sched()
    d = Driver(s)
    s.add_request(make_request("r", [100, 101], max_tokens=50, deadline=2.0))
    d.step(now=1.0)
    assert s.abort("r")
    s.add_request(make_request("r", [100, 101], max_tokens=6))  # no deadline this time
    d.run(now=10.0)
    assert d.finish == {"r": "length"} and len(d.tokens["r"]) == 1 + 6


def test_deadlines_of_finished_requests_are_not_kept_until_they_pass():
    s = make_sched()
    d = Driver(s, check=False)
    for i in range(300):
        s.add_request(make_request(f"r{i}", [100 + i % 50], max_tokens=2, deadline=1e12))
        d.run(now=1.0)
    assert len(d.finish) == 300 and set(d.finish.values()) == {"length"}
    assert len(s._started_deadlines) <= 64 + 2, "finished requests stay referenced until their deadline"


def test_a_queue_deadline_ends_only_requests_that_never_started():
    """queue_deadline (the API's server-wide request timeout) bounds the wait, not the run."""
    s = make_sched(max_num_seqs=1)  # one runs at a time: the second waits behind the first
    d = Driver(s)
    s.add_request(make_request("runs", [100, 101], max_tokens=20, queue_deadline=2.0))
    s.add_request(make_request("waits", [110, 111], max_tokens=20, queue_deadline=2.0))
    d.step(now=1.0)
    assert s.request("runs") in s.running and s.request("waits") not in s.running
    for now in (2.5, 3.0, 4.0):
        d.step(now=now)
    assert d.finish == {"waits": "timeout"}, "the waiting one times out, the running one carries on"
    d.run(now=100.0)
    assert d.finish["runs"] == "length" and len(d.tokens["runs"]) == 20
    assert s.num_free_blocks == s.cfg.num_blocks

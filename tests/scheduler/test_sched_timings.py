"""The scheduler measures each request's phases (queue, prefill, decode, inference) on its own
clock and sends them on the request's last delta; it counts the tokens of every step."""

from __future__ import annotations

import time

from sched_fakes import FakeWorker, make_request

from zeroserve.scheduler_proc.scheduler import ITERATION_TOKEN_BOUNDS, Scheduler, SchedulerConfig


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_sched(**kw) -> Scheduler:
    return Scheduler(
        SchedulerConfig(num_blocks=64, block_size=4, eos_token_ids=(2,), max_model_len=256, **kw)
    )


def run_step(s: Scheduler, w: FakeWorker, clock: Clock, planned_at: float, answered_at: float):
    clock.t = planned_at
    plan = s.schedule()
    assert plan is not None
    clock.t = answered_at
    return s.update_from_output(w.step(plan))


def test_phases_are_measured_between_scheduling_first_token_and_last_token(monkeypatch):
    clock = Clock(100.0)
    monkeypatch.setattr(time, "monotonic", clock)
    s = make_sched(max_num_batched_tokens=64)
    w = FakeWorker(64, 4)
    s.add_request(make_request("a", list(range(100, 110)), max_tokens=3))
    s.add_request(make_request("b", list(range(200, 210)), max_tokens=3))
    first = run_step(s, w, clock, planned_at=102.0, answered_at=103.5)  # both prefills, first tokens
    for d in first:  # the first token: queue and prefill are known, decode has not begun
        t = d.timings
        assert (t.queue_s, t.prefill_s, t.decode_s, t.inference_s) == (2.0, 1.5, 0.0, 1.5), d.request_id
    middle = run_step(s, w, clock, planned_at=104.0, answered_at=105.0)
    assert [d.timings for d in middle] == [None, None]  # neither first nor last: nothing
    last = run_step(s, w, clock, planned_at=107.0, answered_at=108.0)
    assert {d.finish_reason for d in last} == {"length"}
    for d in last:
        t = d.timings
        assert (t.queue_s, t.prefill_s, t.decode_s, t.inference_s) == (2.0, 1.5, 4.5, 6.0), d.request_id
    stats = s.stats().iteration_tokens
    # one step of 20 prompt tokens (le=32), two of 2 decodes each (le=8)
    expected = [0] * (len(ITERATION_TOKEN_BOUNDS) + 1)
    expected[ITERATION_TOKEN_BOUNDS.index(32)] = 1
    expected[ITERATION_TOKEN_BOUNDS.index(8)] = 2
    assert stats.counts == expected and stats.total == 24.0 and stats.bounds == ITERATION_TOKEN_BOUNDS


def test_a_request_that_never_ran_reports_only_its_queue_time(monkeypatch):
    clock = Clock(50.0)
    monkeypatch.setattr(time, "monotonic", clock)
    s = make_sched(max_num_seqs=1, max_num_batched_tokens=64)
    w = FakeWorker(64, 4)
    s.add_request(make_request("runs", list(range(100, 108)), max_tokens=50))
    wall = time.time()  # deadlines are wall-clock times
    s.add_request(make_request("queued", list(range(300, 308)), max_tokens=5, queue_deadline=wall + 60))
    run_step(s, w, clock, planned_at=51.0, answered_at=51.5)  # one seat: "queued" waits
    clock.t = 53.25
    assert s.schedule(now=wall + 120) is not None  # past its queue deadline: it times out, waiting
    (timeout,) = s.drain_outputs()
    assert timeout.request_id == "queued" and timeout.finish_reason == "timeout"
    t = timeout.timings
    assert (t.queue_s, t.prefill_s, t.decode_s, t.inference_s) == (3.25, 0.0, 0.0, 0.0)

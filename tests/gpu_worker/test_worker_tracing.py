"""The worker's per-step spans (gpu_worker/tracing.py, --collect-detailed-traces)."""

from __future__ import annotations

from zeroserve.gpu_worker.tracing import StepSpans
from zeroserve.shared.messages import NewRequestData, RunningRequestData, SamplingParams, StepPlan

TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Recorder:
    """Stands in for shared.tracing.Tracer: records the spans written."""

    def __init__(self):
        self.spans: list[tuple[str, str, dict]] = []

    def context(self, parent):
        return parent

    def span(self, name, parent, start, end, attributes=None, offset_ns=None):
        self.spans.append((name, parent, dict(attributes or {})))


def new(request_id: str, trace: str | None) -> NewRequestData:
    return NewRequestData(request_id, [1, 2, 3], [0], 0, 3, SamplingParams(max_tokens=4), trace=trace)


def test_step_spans_follow_traced_requests_until_finished_or_the_runner_resets():
    tracer = Recorder()
    steps = StepSpans(tracer)
    steps.record(StepPlan(1, new=[new("a", TRACE), new("b", None)]), 0.0, 1.0)
    # one span, for the traced request only, with the step's batch and its own tokens
    assert [(s[0], s[1], s[2]["zeroserve.step.request_tokens"]) for s in tracer.spans] == [
        ("worker.step", TRACE, 3)
    ]
    assert tracer.spans[0][2]["zeroserve.step.batch_size"] == 2

    steps.record(StepPlan(2, running=[RunningRequestData("a", [], 1)]), 1.0, 2.0)
    assert len(tracer.spans) == 2
    steps.record(StepPlan(3, running=[RunningRequestData("b", [], 1)], finished_ids=["a"]), 2.0, 3.0)
    assert len(tracer.spans) == 2 and steps.parents == {}

    # a failed step: the runner forgets every request, and no plan will finish them
    steps.record(StepPlan(4, new=[new("c", TRACE)]), 3.0, 4.0)
    steps.reset()
    steps.record(StepPlan(5, running=[RunningRequestData("c", [], 1)]), 4.0, 5.0)
    assert len(tracer.spans) == 3 and steps.parents == {}

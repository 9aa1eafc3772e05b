"""The worker's spans, with --collect-detailed-traces: one ``worker.step`` per traced request per
step it takes part in, a child of the scheduler's ``llm_request`` span (whose traceparent comes
with the request in ``NewRequestData.trace``, once, as the rest of its state does).

Each says how long the step took on this rank (the forward pass and sampling of the whole
batch), how many requests and tokens it held, and this request's tokens in it: a prefill chunk
or one decode token. Rank 0 alone writes them (every rank runs the same steps).
"""

from __future__ import annotations

from typing import Any

from zeroserve.shared import tracing
from zeroserve.shared.messages import StepPlan


class StepSpans:
    def __init__(self, tracer: tracing.Tracer):
        self.tracer = tracer
        self.parents: dict[str, Any] = {}  # request id -> the context of its llm_request span

    def reset(self) -> None:
        """The runner forgot every request (a failed step): so does this, as no plan will name
        them in ``finished_ids`` again."""
        self.parents.clear()

    def record(self, plan: StepPlan, start: float, end: float) -> None:
        """One executed plan, timed by this process (monotonic seconds)."""
        for request_id in plan.finished_ids:  # applied first, as the runner does
            self.parents.pop(request_id, None)
        for n in plan.new:
            if n.trace is not None:
                self.parents[n.request_id] = self.tracer.context(n.trace)
        if not self.parents:
            return
        work = [(n.request_id, n.num_new_tokens) for n in plan.new]
        work += [(r.request_id, r.num_new_tokens) for r in plan.running]
        step = {
            "zeroserve.step.id": plan.step_id,
            "zeroserve.step.batch_size": len(work),
            "zeroserve.step.tokens": sum(tokens for _, tokens in work),
        }
        offset = tracing.clock_offset_ns()
        for request_id, tokens in work:
            parent = self.parents.get(request_id)
            if parent is not None:
                attributes = {**step, "zeroserve.step.request_tokens": tokens}
                self.tracer.span("worker.step", parent, start, end, attributes, offset_ns=offset)

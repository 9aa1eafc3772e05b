"""The scheduler's spans of a traced request (tracing on, and its EngineRequest carries a trace).

    llm_request      arrival here -> its end (last token, abort, error); vLLM's span name and attributes
      queue          -> first scheduled
      prefill        -> first token
      decode         -> last token
      worker.step    (the worker's, with --collect-detailed-traces: parent llm_request)

The phases are the final TokenDelta's ``RequestTimings``, measured by the Scheduler on this
process's monotonic clock (the numbers the latency histograms get), laid back from the moment
the last delta leaves (or, for a request its owner aborts, from the Scheduler's request at that
moment: a stop string found by the tokenizer ends requests that way). A request whose worker is
lost ends its span there, failed, without phases.
"""

from __future__ import annotations

import time

import msgspec

from zeroserve.scheduler_proc.request import Request
from zeroserve.shared import tracing
from zeroserve.shared.messages import EngineRequest, ErrorInfo, RequestTimings, StepPlan, TokenDelta


class _Traced:
    __slots__ = ("span", "arrived", "traceparent", "output_tokens")

    def __init__(self, span, arrived: float, traceparent: str | None):
        self.span = span
        self.arrived = arrived
        self.traceparent = traceparent  # the worker's parent for its step spans
        self.output_tokens = 0


class RequestTraces:
    def __init__(self, tracer: tracing.Tracer, model_name: str):
        self.tracer = tracer
        self.model_name = model_name
        self.open: dict[str, _Traced] = {}

    def _start(self, req: EngineRequest) -> tuple[object, float]:
        now = time.monotonic()
        params = req.params
        span = self.tracer.start_span(
            "llm_request",
            parent=req.trace,
            start=now,
            kind="server",  # as vLLM's, so that queries written for it find ours
            attributes={
                tracing.REQUEST_ID: req.request_id,
                tracing.RESPONSE_MODEL: self.model_name,
                tracing.REQUEST_MAX_TOKENS: params.max_tokens,
                tracing.REQUEST_TEMPERATURE: params.temperature,
                tracing.REQUEST_TOP_P: params.top_p,
                tracing.USAGE_PROMPT_TOKENS: len(req.prompt_token_ids),
                "zeroserve.priority": req.priority,
            },
        )
        return span, now

    def admitted(self, req: EngineRequest) -> None:
        span, now = self._start(req)
        self.open[req.request_id] = _Traced(span, now, self.tracer.traceparent(span))

    def refused(self, req: EngineRequest, error: ErrorInfo) -> None:
        span, _ = self._start(req)
        span.set_attribute("error.type", error.code or error.type)
        self.tracer.end(span, error=error.message)

    def on_plan(self, plan: StepPlan) -> StepPlan:
        """With --collect-detailed-traces: the plan with each traced new request's span named as
        the parent of the worker's step spans (sent with it once, as its state is)."""
        if not self.tracer.detailed or not plan.new or not self.open:
            return plan
        new = []
        for n in plan.new:
            traced = self.open.get(n.request_id)
            new.append(n if traced is None else msgspec.structs.replace(n, trace=traced.traceparent))
        return msgspec.structs.replace(plan, new=new)

    def on_deltas(self, deltas: list[TokenDelta]) -> None:
        for d in deltas:
            traced = self.open.get(d.request_id)
            if traced is None:
                continue
            traced.output_tokens += len(d.token_ids)
            if d.num_cached_tokens:
                traced.span.set_attribute("zeroserve.cached_prompt_tokens", d.num_cached_tokens)
            if d.finish_reason is not None:
                del self.open[d.request_id]
                self._finish(traced, d.finish_reason, d.timings, d.error, time.monotonic())

    def aborted(self, request: Request | None, reason: str) -> None:
        """Its owner ended it (``reason``: "stop" when the tokenizer found a stop string, else the
        client left or moved it); ``request``: the Scheduler's, for the phases so far."""
        if request is None or request.request_id not in self.open:
            return
        traced = self.open.pop(request.request_id)
        end = time.monotonic()
        traced.span.set_attribute("zeroserve.abort_reason", reason)
        self._finish(traced, "stop" if reason == "stop" else "abort", request.timings(end), None, end)

    def _finish(
        self,
        traced: _Traced,
        finish_reason: str,
        t: RequestTimings | None,
        error: ErrorInfo | None,
        end: float,
    ) -> None:
        span = traced.span
        span.set_attribute(tracing.USAGE_COMPLETION_TOKENS, traced.output_tokens)
        span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
        span.set_attribute(tracing.LATENCY_E2E, end - traced.arrived)
        if t is not None:
            self._phases(span, t, end)
        if error is not None:
            span.set_attribute("error.type", error.code or error.type)
        self.tracer.end(span, end, error=None if error is None else error.message)

    def _phases(self, span, t: RequestTimings, end: float) -> None:
        # phase boundaries, walked back from the end: queued, scheduled, first token, end
        first_token = end - t.decode_s
        scheduled = end - t.inference_s
        queued = scheduled - t.queue_s
        span.set_attribute(tracing.LATENCY_TIME_IN_QUEUE, t.queue_s)
        offset = tracing.clock_offset_ns()
        self.tracer.span("queue", span, queued, scheduled, offset_ns=offset)
        if t.prefill_s > 0 or t.decode_s > 0:
            span.set_attribute(tracing.LATENCY_TTFT, t.queue_s + t.prefill_s)
            span.set_attribute(tracing.LATENCY_PREFILL, t.prefill_s)
            span.set_attribute(tracing.LATENCY_DECODE, t.decode_s)
            self.tracer.span("prefill", span, scheduled, first_token, offset_ns=offset)
            self.tracer.span("decode", span, first_token, end, offset_ns=offset)
        elif t.inference_s > 0:  # ended while its prompt was being computed
            self.tracer.span("prefill", span, scheduled, end, offset_ns=offset)
        span.set_attribute(tracing.LATENCY_INFERENCE, t.inference_s)

    def lost(self, why: str) -> None:
        """Every open request failed at once (its worker was lost): ended here, as errors."""
        for traced in self.open.values():
            traced.span.set_attribute(tracing.USAGE_COMPLETION_TOKENS, traced.output_tokens)
            traced.span.set_attribute("gen_ai.response.finish_reasons", ["error"])
            self.tracer.end(traced.span, error=why)
        self.open.clear()

"""The tokenizer's spans of a traced request (tracing on, and its GenerateRequest carries a trace).

    tokenizer    received -> its EngineRequest built for the chosen replica
      tokenize   the worker thread's part: chat template, tokenize, checks

The difference between the two is the wait for the worker thread (prompts are built one at a
time). The spans are written once the request goes on, as both ends are known then; a request
that fails here has none (the api span says why it failed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from zeroserve.shared import tracing
from zeroserve.shared.messages import GenerateRequest


class PromptTiming:
    __slots__ = ("received", "build_start", "build_end")

    def __init__(self) -> None:
        self.received = time.monotonic()
        self.build_start = self.build_end = self.received

    def timed(self, build: Callable[[], Any]) -> Callable[[], Any]:
        """``build`` timed where it runs (the worker thread)."""

        def run() -> Any:
            self.build_start = time.monotonic()
            try:
                return build()
            finally:
                self.build_end = time.monotonic()

        return run

    def spans(
        self, tracer: tracing.Tracer, req: GenerateRequest, prompt_ids: list[int], replica: str
    ) -> str | None:
        """Write the spans; returns the traceparent the EngineRequest carries to the scheduler."""
        offset = tracing.clock_offset_ns()
        span = tracer.start_span(
            "tokenizer",
            parent=req.trace,
            start=self.received,
            offset_ns=offset,
            attributes={
                tracing.REQUEST_ID: req.request_id,
                tracing.USAGE_PROMPT_TOKENS: len(prompt_ids),
                "zeroserve.replica": replica,
                "zeroserve.chat": req.messages is not None,
            },
        )
        tracer.span("tokenize", span, self.build_start, self.build_end, offset_ns=offset)
        tracer.end(span, time.monotonic(), offset_ns=offset)
        return tracer.traceparent(span)

"""The api span of each request (tracing on): the root of the request's trace, or the child of the
span a client named in its W3C ``traceparent`` header.

``trace_middleware`` runs right inside the request-id middleware (request_log.py), so the
context is there and the status it sees is the one sent (errors already answered). The span
covers arrival to the last byte (the whole SSE stream), with the request's outcome from its
context: tokens, TTFT, finish reason, replica. ``ApiSpan.continue_in`` hands its traceparent to
the engine requests of a generation, whose tokenizer and scheduler spans then nest under it.
"""

from __future__ import annotations

import time

import msgspec
from aiohttp import web

from zeroserve.api_proc.request_log import CLIENT_CLOSED, UNRECORDED_PREFIXES, RequestContext, context_of
from zeroserve.api_proc.requests import GenerationPlan
from zeroserve.shared import tracing
from zeroserve.shared.messages import GenerateRequest


class ApiSpan:
    """What ``RequestContext.trace`` holds for a traced request."""

    __slots__ = ("tracer", "span")

    def __init__(self, tracer: tracing.Tracer, span):
        self.tracer = tracer
        self.span = span

    def continue_in(self, plan: GenerationPlan) -> list[GenerateRequest]:
        """The plan's engine requests carrying this span as their parent (unchanged when the
        span is not sampled: then no process records anything)."""
        first = plan.requests[0].params if plan.requests else None
        if first is not None:
            self.span.set_attributes(
                {
                    tracing.REQUEST_MAX_TOKENS: first.max_tokens,
                    tracing.REQUEST_TEMPERATURE: first.temperature,
                    tracing.REQUEST_TOP_P: first.top_p,
                    tracing.REQUEST_N: plan.n,
                    "zeroserve.stream": plan.stream,
                    "zeroserve.engine_requests": len(plan.requests),
                }
            )
        traceparent = self.tracer.traceparent(self.span)
        if traceparent is None:
            return plan.requests
        return [msgspec.structs.replace(r, trace=traceparent) for r in plan.requests]


def trace_middleware(tracer: tracing.Tracer):
    @web.middleware
    async def trace_request(request: web.Request, handler):
        ctx = context_of(request)
        if ctx is None or request.path.startswith(UNRECORDED_PREFIXES):
            return await handler(request)
        resource = request.match_info.route.resource
        # the route, not the path: span names must not grow with every URL a scanner tries
        name = request.method if resource is None else f"{request.method} {resource.canonical}"
        span = tracer.start_span(
            name,
            parent=tracer.extract(request.headers),
            start=ctx.started_mono,
            kind="server",
            attributes={
                "http.request.method": request.method,
                "url.path": request.path,
                "client.address": ctx.client,
                tracing.REQUEST_ID: ctx.request_id,
            },
        )
        ctx.trace = ApiSpan(tracer, span)
        status = CLIENT_CLOSED
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            _end(tracer, span, ctx, status)

    return trace_request


def _end(tracer: tracing.Tracer, span, ctx: RequestContext, status: int) -> None:
    end = time.monotonic()
    attributes = {
        "http.response.status_code": status,
        tracing.USAGE_PROMPT_TOKENS: ctx.prompt_tokens,
        tracing.USAGE_COMPLETION_TOKENS: ctx.completion_tokens,
        tracing.LATENCY_E2E: end - ctx.started_mono,
    }
    optional = {
        tracing.RESPONSE_MODEL: ctx.model,
        tracing.LATENCY_TTFT: ctx.ttft_s,
        "gen_ai.response.finish_reasons": None if ctx.finish_reason is None else [ctx.finish_reason],
        "zeroserve.replica": ctx.replica,
        "zeroserve.tenant": ctx.tenant,
        "error.type": ctx.error_type,
    }
    attributes.update((k, v) for k, v in optional.items() if v is not None)
    span.set_attributes(attributes)
    # a server span fails on 5xx, or on an error inside a 200 stream; a 4xx is the client's
    failed = status >= 500 or (status < 400 and ctx.error_type is not None)
    tracer.end(span, end, error=ctx.error_type if failed else None)

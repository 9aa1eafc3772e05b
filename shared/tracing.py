"""OpenTelemetry traces across the processes: off unless an OTLP endpoint is configured.

    tracer = tracing.init("scheduler", config)   # None when tracing is off: callers test for None
    span = tracer.start_span("llm_request", parent=req.trace, start=arrived)  # monotonic seconds
    next_hop = tracer.traceparent(span)            # what the next process's message carries
    tracer.end(span, finished)

One trace per request. Each process makes its own spans and hands the next one the W3C
``traceparent`` of its span in the request's message (``GenerateRequest.trace``,
``EngineRequest.trace``, ``NewRequestData.trace``), so the spans nest process by process:

    api        POST /v1/chat/completions            (a client's traceparent header is its parent)
    tokenizer    tokenizer > tokenize                (chat template + tokenize on the worker thread)
    scheduler      llm_request > queue, prefill, decode
    worker           worker.step                     (one per step, with --collect-detailed-traces)

Time is measured with ``time.monotonic()`` by the process that saw both ends of an interval
(monotonic clocks are not comparable between processes) and turned into wall-clock
nanoseconds for the span at the moment it is written, from this process's own clock pair.

Off, nothing here runs: ``init`` returns None without importing the SDK, messages carry
``trace=None``, and the request path pays one None check per hop. On, spans leave through a
``BatchSpanProcessor`` (a queue and a background thread): a slow or absent collector costs
dropped spans and one warning, never a request's time. The SDK reads the standard ``OTEL_*``
variables itself (``OTEL_BSP_SCHEDULE_DELAY``, ``OTEL_EXPORTER_OTLP_TRACES_HEADERS``,
``OTEL_TRACES_SAMPLER``, ``OTEL_RESOURCE_ATTRIBUTES``...).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

from zeroserve.shared import env

log = logging.getLogger("zeroserve.tracing")

TRACES_PATH = "/v1/traces"
SHUTDOWN_TIMEOUT_S = 3.0  # at exit, what is still queued gets this long to reach the collector
# the SDK's exporter logs every failed batch and every retry; ours says it once per outage
_EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.sdk._shared_internal",
)

# vLLM's span attribute names (vllm/tracing.py), so that queries written for vLLM work here
REQUEST_ID = "gen_ai.request.id"
RESPONSE_MODEL = "gen_ai.response.model"
REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
REQUEST_TEMPERATURE = "gen_ai.request.temperature"
REQUEST_TOP_P = "gen_ai.request.top_p"
REQUEST_N = "gen_ai.request.n"
USAGE_PROMPT_TOKENS = "gen_ai.usage.prompt_tokens"
USAGE_COMPLETION_TOKENS = "gen_ai.usage.completion_tokens"
LATENCY_TIME_IN_QUEUE = "gen_ai.latency.time_in_queue"
LATENCY_TTFT = "gen_ai.latency.time_to_first_token"
LATENCY_E2E = "gen_ai.latency.e2e"
LATENCY_PREFILL = "gen_ai.latency.time_in_model_prefill"
LATENCY_DECODE = "gen_ai.latency.time_in_model_decode"
LATENCY_INFERENCE = "gen_ai.latency.time_in_model_inference"


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL: a bare collector address (http://jaeger:4318) gets the standard
    path, as OTEL_EXPORTER_OTLP_ENDPOINT would; a URL with a path is used as given."""
    if urllib.parse.urlsplit(endpoint).path in ("", "/"):
        return endpoint.rstrip("/") + TRACES_PATH
    return endpoint


def init(role: str, config: Any) -> Tracer | None:
    """This process's tracer, or None when ``config.otlp_traces_endpoint`` is not set (then the
    OpenTelemetry SDK is never imported). ``config``: EngineConfig or a view of it."""
    endpoint = getattr(config, "otlp_traces_endpoint", None)
    if not endpoint:
        return None
    return Tracer(role, traces_url(endpoint), bool(getattr(config, "collect_detailed_traces", False)))


def wall_ns(mono: float, offset_ns: int) -> int:
    return int(mono * 1e9) + offset_ns


def clock_offset_ns() -> int:
    """Wall clock minus monotonic clock, now, in ns: turns this process's monotonic readings
    into span timestamps."""
    return time.time_ns() - time.monotonic_ns()


class _OncePerOutageExporter:
    """The OTLP exporter, saying once that the collector cannot be reached (and once that it can
    again) instead of an error per batch. Runs on the span processor's thread only."""

    def __init__(self, inner: Any, url: str):
        self.inner = inner
        self.url = url
        self.failing = False

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            result = self.inner.export(spans)
        except Exception as e:  # an exporter bug must not kill the processor's thread
            log.debug("span export raised %s: %s", type(e).__name__, e)
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            if self.failing:
                self.failing = False
                log.info("traces reach %s again", self.url)
        elif not self.failing:
            self.failing = True
            log.warning(
                "traces cannot be exported to %s; spans are dropped until it answers (said once)", self.url
            )
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class Tracer:
    """One process's spans. Spans are the SDK's: ``set_attribute``, ``add_event`` and
    ``set_status`` work on them as usual; times given here are ``time.monotonic()`` seconds."""

    def __init__(self, role: str, url: str, detailed: bool = False):
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.role = role
        self.url = url
        self.detailed = detailed  # --collect-detailed-traces: per-step worker spans
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        for name in _EXPORTER_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        resource = Resource.create(
            {"service.name": env.otel_service_name() or "zeroserve", "zeroserve.process": role}
        )
        # our own bounded shutdown at exit, not the SDK's (which waits up to 30 s for a dead collector)
        self.provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        self.provider.add_span_processor(
            BatchSpanProcessor(_OncePerOutageExporter(OTLPSpanExporter(endpoint=url), url))
        )
        self.tracer = self.provider.get_tracer("zeroserve")
        self._kinds = {
            "internal": trace.SpanKind.INTERNAL,
            "server": trace.SpanKind.SERVER,
        }
        atexit.register(self.shutdown)
        log.info("%s: tracing to %s%s", role, url, " (detailed)" if detailed else "")

    # ------------------------------------------------------------------ spans
    def start_span(
        self,
        name: str,
        parent: Any = None,
        start: float | None = None,
        attributes: Mapping[str, Any] | None = None,
        kind: str = "internal",
        offset_ns: int | None = None,
    ) -> Any:
        """A span started at ``start`` (monotonic seconds; None: now). ``parent``: a traceparent
        string, a span of this process, a context from ``extract``, or None (a new trace).
        ``offset_ns``: a ``clock_offset_ns()`` shared by the spans written together."""
        if start is not None:
            start = wall_ns(start, clock_offset_ns() if offset_ns is None else offset_ns)
        return self.tracer.start_span(
            name,
            context=self.context(parent),
            kind=self._kinds[kind],
            attributes=attributes,
            start_time=start,
        )

    def end(
        self, span: Any, end: float | None = None, error: str | None = None, offset_ns: int | None = None
    ) -> None:
        """End ``span`` at ``end`` (monotonic seconds; None: now), marked failed when ``error``."""
        if error is not None:
            self.set_error(span, error)
        if end is not None:
            end = wall_ns(end, clock_offset_ns() if offset_ns is None else offset_ns)
        span.end(end_time=end)

    def span(
        self,
        name: str,
        parent: Any,
        start: float,
        end: float,
        attributes: Mapping[str, Any] | None = None,
        offset_ns: int | None = None,
    ) -> Any:
        """A finished span over [start, end] (monotonic seconds), measured before it is written."""
        offset = clock_offset_ns() if offset_ns is None else offset_ns
        span = self.tracer.start_span(
            name, context=self.context(parent), attributes=attributes, start_time=wall_ns(start, offset)
        )
        span.end(end_time=wall_ns(end, offset))
        return span

    def set_error(self, span: Any, message: str) -> None:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, message))

    # ------------------------------------------------------------------ propagation
    def traceparent(self, span: Any) -> str | None:
        """The W3C traceparent naming ``span`` as the parent, for the next process's message;
        None when the span is not sampled (then nothing downstream records either)."""
        ctx = span.get_span_context()
        if not ctx.is_valid or not ctx.trace_flags.sampled:
            return None
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    def extract(self, headers: Mapping[str, str]) -> Any:
        """The parent a client named in its ``traceparent`` / ``tracestate`` headers (an empty
        context, hence a new trace, when it named none or a malformed one)."""
        return self._propagator.extract(headers)

    def context(self, parent: Any) -> Any:
        """An OpenTelemetry context naming ``parent`` (see start_span)."""
        if parent is None:
            return None
        if isinstance(parent, str):
            return self._propagator.extract({"traceparent": parent})
        if isinstance(parent, self._trace.Span):
            return self._trace.set_span_in_context(parent)
        return parent  # a Context

    # ------------------------------------------------------------------ exit
    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Send what is queued, for at most ``timeout_s`` (the exporter may be retrying against
        a collector that is down: the process must still exit promptly)."""
        done = threading.Thread(target=self.provider.shutdown, name="trace-shutdown", daemon=True)
        done.start()
        done.join(timeout_s)

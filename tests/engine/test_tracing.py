"""OpenTelemetry traces across the real processes, received by a test OTLP/HTTP collector
(tests/otlp_receiver.py): one trace per request with spans from api, tokenizer, scheduler and
(--collect-detailed-traces) worker, each process's span a child of the previous one's, token
counts as the response's usage; a client's traceparent is continued; with tracing off no
message carries a trace context and the SDK is never imported."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request

import pytest

from tests.conftest import API_KEY, start_server
from tests.otlp_receiver import OtlpReceiver, Span
from tests.tokenizer_proc.test_tokenizer_proc import Harness
from zeroserve.shared import tracing
from zeroserve.shared.config import EngineConfig
from zeroserve.shared.messages import GenerateRequest, SamplingParams

TOL_NS = 2_000_000  # spans of different processes are ordered on one wall clock, each converted from
# its own monotonic clock: a few microseconds apart at most; 2 ms of slack for a loaded machine
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


@pytest.fixture(scope="module")
def traced():
    """A server that traces everything (worker steps too) to a receiver, exporting every 50 ms."""
    with OtlpReceiver() as receiver:
        os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "50"
        try:
            server = start_server("--otlp-traces-endpoint", receiver.url, "--collect-detailed-traces")
        finally:
            del os.environ["OTEL_BSP_SCHEDULE_DELAY"]
        try:
            yield server, receiver
        finally:
            code = server.stop()
            assert code == 0, f"zeroserve exited with {code}:\n{server.log()}"


def post(server, path: str, body: dict, headers: dict[str, str]) -> tuple[dict[str, str], bytes]:
    req = urllib.request.Request(
        server.base_url + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}", **headers},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200
        return dict(r.headers), r.read()


def in_trace(spans: list[Span], trace_id: str) -> list[Span]:
    return [s for s in spans if s.trace_id == trace_id]


def named(spans: list[Span], name: str) -> list[Span]:
    return [s for s in spans if s.name == name]


def one(spans: list[Span], name: str) -> Span:
    [span] = named(spans, name)
    return span


def before(a: int, b: int) -> bool:
    return a <= b + TOL_NS


def complete(trace: list[Span], engine_requests: int) -> bool:
    """Every span of a finished trace is in: each engine request's phases and worker steps."""
    requests = named(trace, "llm_request")
    steps = named(trace, "worker.step")
    return (
        len(named(trace, "tokenize")) == engine_requests
        and len(requests) == engine_requests
        and len(named(trace, "decode")) == engine_requests
        and len(steps) == sum(r.attributes["gen_ai.usage.completion_tokens"] for r in requests)
        and any(s.process == "api" for s in trace)
    )


def test_one_request_is_one_trace_through_every_process(traced):
    server, receiver = traced
    headers, raw = post(
        server,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 5, "temperature": 0},
        {"X-Request-Id": "trace-me-1"},
    )
    body = json.loads(raw)
    usage = body["usage"]

    def api_span(spans: list[Span]) -> Span | None:
        found = [
            s for s in spans if s.process == "api" and s.attributes.get("gen_ai.request.id") == "trace-me-1"
        ]
        return found[0] if found else None

    spans = receiver.wait_for(
        lambda spans: (a := api_span(spans)) is not None and complete(in_trace(spans, a.trace_id), 1)
    )
    api = api_span(spans)
    trace = in_trace(spans, api.trace_id)
    tokenizer, tokenize = one(trace, "tokenizer"), one(trace, "tokenize")
    request, queue, prefill, decode = (one(trace, n) for n in ("llm_request", "queue", "prefill", "decode"))
    steps = sorted(named(trace, "worker.step"), key=lambda s: s.start_ns)

    # each process's span is a child of the previous process's; the api span is the root
    assert (api.name, api.parent_span_id, api.kind) == ("POST /v1/chat/completions", "", 2)
    assert [s.process for s in (tokenizer, tokenize, request, queue, prefill, decode)] == [
        "tokenizer", "tokenizer", "scheduler", "scheduler", "scheduler", "scheduler",
    ]  # fmt: skip
    assert tokenizer.parent_span_id == api.span_id and tokenize.parent_span_id == tokenizer.span_id
    assert request.parent_span_id == tokenizer.span_id
    assert {queue.parent_span_id, prefill.parent_span_id, decode.parent_span_id} == {request.span_id}
    assert {s.process for s in steps} == {"worker"} and {s.parent_span_id for s in steps} == {request.span_id}
    assert len(trace) == 7 + len(steps)  # nothing else, nothing twice

    # the counts are the response's
    a, r = api.attributes, request.attributes
    assert a["gen_ai.usage.prompt_tokens"] == r["gen_ai.usage.prompt_tokens"] == usage["prompt_tokens"]
    assert (
        a["gen_ai.usage.completion_tokens"]
        == r["gen_ai.usage.completion_tokens"]
        == usage["completion_tokens"]
    )
    assert tokenizer.attributes["gen_ai.usage.prompt_tokens"] == usage["prompt_tokens"]
    assert len(steps) == usage["completion_tokens"]  # one token sampled per step
    assert steps[0].attributes["zeroserve.step.request_tokens"] == usage["prompt_tokens"]  # the prefill
    assert {s.attributes["zeroserve.step.request_tokens"] for s in steps[1:]} == {1}  # decodes
    assert r["gen_ai.request.id"] == body["id"] + "-0"  # the engine request of choice 0
    assert a["http.response.status_code"] == 200 and headers["X-Request-Id"] == "trace-me-1"
    assert a["gen_ai.response.model"] == r["gen_ai.response.model"] == body["model"]
    assert (a["gen_ai.request.max_tokens"], a["gen_ai.request.temperature"], a["gen_ai.request.n"]) == (
        5,
        0.0,
        1,
    )
    assert r["gen_ai.request.max_tokens"] == 5 and r["gen_ai.response.finish_reasons"] == [
        body["choices"][0]["finish_reason"]
    ]

    # time: nested process by process, phases back to back, steps inside prefill..decode
    assert before(api.start_ns, tokenizer.start_ns) and before(tokenizer.start_ns, tokenize.start_ns)
    assert before(tokenize.end_ns, tokenizer.end_ns) and before(tokenizer.end_ns, request.start_ns)
    assert before(request.start_ns, queue.start_ns) and before(decode.end_ns, request.end_ns)
    assert abs(queue.end_ns - prefill.start_ns) < TOL_NS and abs(prefill.end_ns - decode.start_ns) < TOL_NS
    assert before(request.end_ns, api.end_ns)
    assert before(prefill.start_ns, steps[0].start_ns) and before(steps[-1].end_ns, decode.end_ns)
    assert abs(r["gen_ai.latency.time_in_queue"] * 1e9 - (queue.end_ns - queue.start_ns)) < TOL_NS
    assert 0 < r["gen_ai.latency.time_to_first_token"] <= r["gen_ai.latency.e2e"]
    assert 0 < a["gen_ai.latency.time_to_first_token"] <= a["gen_ai.latency.e2e"]
    assert r["gen_ai.latency.e2e"] < a["gen_ai.latency.e2e"]  # the engine's part of the client's wait


def test_a_client_traceparent_is_continued_across_choices(traced):
    server, receiver = traced
    _, raw = post(
        server,
        "/v1/completions",
        {
            "prompt": "One, two,",
            "max_tokens": 4,
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "tracestate": "vendor=abc"},
    )
    events = [json.loads(line[6:]) for line in raw.decode().split("\n\n") if line.startswith("data: {")]
    usage = events[-1]["usage"]

    spans = receiver.wait_for(lambda spans: complete(in_trace(spans, CLIENT_TRACE), 2))
    trace = in_trace(spans, CLIENT_TRACE)
    [api] = [s for s in trace if s.process == "api"]
    assert api.parent_span_id == CLIENT_SPAN and api.trace_state == "vendor=abc"
    assert api.attributes["gen_ai.request.n"] == 2 and api.attributes["zeroserve.stream"] is True
    tokenizers = named(trace, "tokenizer")
    assert len(tokenizers) == 2 and {t.parent_span_id for t in tokenizers} == {api.span_id}
    requests = named(trace, "llm_request")
    assert {r.parent_span_id for r in requests} == {t.span_id for t in tokenizers}  # one each
    assert sum(r.attributes["gen_ai.usage.completion_tokens"] for r in requests) == usage["completion_tokens"]
    assert api.attributes["gen_ai.usage.completion_tokens"] == usage["completion_tokens"]


def test_an_unsampled_client_trace_records_nothing_anywhere(traced):
    server, receiver = traced
    unsampled = "1" * 32
    post(
        server,
        "/v1/completions",
        {"prompt": "Hi", "max_tokens": 2},
        {"traceparent": f"00-{unsampled}-{'2' * 16}-00"},
    )
    post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}, {"X-Request-Id": "after-unsampled"})
    spans = receiver.wait_for(
        lambda spans: any(
            s.attributes.get("gen_ai.request.id") == "after-unsampled"
            and complete(in_trace(spans, s.trace_id), 1)
            for s in spans
        )
    )
    assert in_trace(spans, unsampled) == []


def test_a_request_a_stop_string_ends_keeps_its_phases(traced):
    """The tokenizer ends it (an Abort upstream): the scheduler's span still closes with its
    phases, finish reason stop, and the tokens it generated."""
    server, receiver = traced
    post(
        server,
        "/v1/completions",
        {"prompt": "The capital of France is", "max_tokens": 60, "temperature": 0, "stop": [" "]},
        {"X-Request-Id": "stopped"},
    )

    def request_span(spans: list[Span]) -> Span | None:
        found = [
            s for s in spans if s.name == "llm_request" and "-stopped-" in s.attributes["gen_ai.request.id"]
        ]
        return found[0] if found else None

    spans = receiver.wait_for(lambda spans: request_span(spans) is not None)
    request = request_span(spans)
    trace = in_trace(spans, request.trace_id)
    r = request.attributes
    assert r["gen_ai.response.finish_reasons"] == ["stop"] and r["zeroserve.abort_reason"] == "stop"
    assert 1 <= r["gen_ai.usage.completion_tokens"] < 60 and request.status_code == 0
    assert {s.name for s in trace if s.parent_span_id == request.span_id} >= {"queue", "prefill", "decode"}
    assert 0 < r["gen_ai.latency.time_to_first_token"] <= r["gen_ai.latency.e2e"]


# --------------------------------------------------------------------------- off


def test_tracing_off_imports_no_sdk_and_builds_no_tracer():
    """What every process runs at start, with the default config, in a fresh interpreter."""
    code = (
        "import sys\n"
        "import zeroserve.api_proc.app, zeroserve.tokenizer_proc.proc, zeroserve.scheduler_proc.proc\n"
        "import zeroserve.gpu_worker.proc\n"
        "from zeroserve.shared import tracing\n"
        "from zeroserve.shared.config import EngineConfig\n"
        "config = EngineConfig(model='m', served_model_name='m', run_dir='/tmp', otlp_traces_endpoint=sys.argv[1] or None)\n"
        "tracers = [tracing.init(role, config) for role in ('api', 'tokenizer', 'scheduler', 'worker')]\n"
        "print(sum(t is not None for t in tracers), any(m.startswith('opentelemetry') for m in sys.modules))\n"
    )

    def run(endpoint: str) -> str:
        out = subprocess.run(
            [sys.executable, "-c", code, endpoint], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert run("") == ["0", "False"]
    assert run("http://127.0.0.1:9/v1/traces") == ["4", "True"]  # the check can see an import


def test_a_bare_collector_address_gets_the_traces_path():
    assert tracing.traces_url("http://jaeger:4318") == "http://jaeger:4318/v1/traces"
    assert tracing.traces_url("http://jaeger:4318/") == "http://jaeger:4318/v1/traces"
    assert tracing.traces_url("https://c.example/otlp/v1/traces") == "https://c.example/otlp/v1/traces"


def _traced_generate(request_id: str) -> GenerateRequest:
    return GenerateRequest(
        request_id=request_id,
        params=SamplingParams(max_tokens=2),
        prompt="hello",
        trace=f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
    )


@pytest.mark.parametrize("on", [False, True], ids=["off", "on"])
def test_the_tokenizer_passes_a_context_on_only_when_tracing(tmp_path, gguf_path, on):
    """The real TokenizerProcess given a traced request (as a ZMQ client may send): off, its
    EngineRequest carries nothing; on, the tokenizer's own span becomes the scheduler's parent."""

    async def main(receiver: OtlpReceiver):
        config = EngineConfig(
            model=gguf_path,
            served_model_name="m",
            run_dir=str(tmp_path),
            max_model_len=2048,
            vocab_size=49152,
            otlp_traces_endpoint=receiver.url if on else None,
        )
        async with Harness(config) as h:
            h.send(_traced_generate("t-1"))
            await h.wait_for(lambda: h.engine_requests, what="the EngineRequest")
            return h.engine_requests[0]

    with OtlpReceiver() as receiver:
        os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "50"
        try:
            sent = asyncio.run(asyncio.wait_for(main(receiver), 60))
        finally:
            del os.environ["OTEL_BSP_SCHEDULE_DELAY"]
        if not on:
            assert sent.trace is None
            return
        spans = receiver.wait_for(lambda spans: len(spans) == 2)
    tokenizer, tokenize = one(spans, "tokenizer"), one(spans, "tokenize")
    assert tokenizer.trace_id == CLIENT_TRACE and tokenizer.parent_span_id == CLIENT_SPAN
    assert sent.trace == f"00-{CLIENT_TRACE}-{tokenizer.span_id}-01"
    assert tokenize.parent_span_id == tokenizer.span_id

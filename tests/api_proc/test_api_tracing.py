"""The api span (api_proc/tracing.py) against the fake engine and a test OTLP collector: its
status and outcome, what reaches the engine requests, and a collector that is down."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from api_fake_engine import MODEL, api_client

from tests.otlp_receiver import OtlpReceiver, Span

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def receiver(monkeypatch):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    with OtlpReceiver() as r:
        yield r


def api_spans(receiver: OtlpReceiver, count: int) -> list[Span]:
    spans = receiver.wait_for(lambda spans: len(spans) >= count, timeout=10)
    assert len(spans) == count and {s.process for s in spans} == {"api"}
    return sorted(spans, key=lambda s: s.start_ns)


async def test_off_no_engine_request_carries_a_context():
    async with api_client() as client:
        resp = await client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "n": 2},
            headers={"traceparent": TRACEPARENT},
        )
        assert resp.status == 200
        assert [r.trace for r in client.fake.requests] == [None, None]


async def test_every_choice_names_the_api_span_as_parent(receiver):
    async with api_client(otlp_traces_endpoint=receiver.url) as client:
        resp = await client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "hi there", "max_tokens": 3, "n": 2, "temperature": 0.5},
            headers={"traceparent": TRACEPARENT, "X-Request-Id": "abc"},
        )
        body = await resp.json()
        sent = client.fake.requests
    [span] = await asyncio.to_thread(api_spans, receiver, 1)
    assert (span.trace_id, span.parent_span_id) == ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
    assert {r.trace for r in sent} == {f"00-{span.trace_id}-{span.span_id}-01"}
    a = span.attributes
    assert (span.name, a["gen_ai.request.id"], a["http.response.status_code"]) == (
        "POST /v1/completions",
        "abc",
        200,
    )
    assert (a["gen_ai.request.n"], a["gen_ai.request.temperature"], a["gen_ai.request.max_tokens"]) == (
        2,
        0.5,
        3,
    )
    assert a["gen_ai.usage.completion_tokens"] == body["usage"]["completion_tokens"] == 6
    assert a["gen_ai.usage.prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert span.status_code == 0


async def test_the_status_sent_and_failures_are_on_the_span(receiver):
    async with api_client(otlp_traces_endpoint=receiver.url) as client:
        overloaded = await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "OVERLOAD", "max_tokens": 2}
        )
        lost = await client.post("/v1/completions", json={"model": MODEL, "prompt": "RAISE", "max_tokens": 2})
        crashed = await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "CRASH", "max_tokens": 5, "stream": True}
        )
        await crashed.read()
        no_route = await client.get("/v1/nothing/at/all")
        await client.get("/health")  # probes make no span
    assert (overloaded.status, lost.status, crashed.status, no_route.status) == (429, 503, 200, 404)
    spans = await asyncio.to_thread(api_spans, receiver, 4)
    statuses = [
        (s.attributes["http.response.status_code"], s.attributes.get("error.type"), s.status_code)
        for s in spans
    ]
    assert statuses == [
        (429, "rate_limit_error", 0),  # the client's to fix: not a failed span
        (503, "engine_unavailable", 2),
        (200, "server_error", 2),  # an error inside a stream that had started
        (404, "not_found", 0),
    ]
    assert spans[3].name == "GET"  # no route: the method alone, not the scanned path


async def test_a_collector_that_is_down_costs_nothing_but_one_warning(monkeypatch, caplog):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "0.3")
    with OtlpReceiver() as closed:
        url = closed.url  # a port nothing listens on once the receiver is gone
    caplog.set_level(logging.INFO, logger="zeroserve.tracing")
    async with api_client(otlp_traces_endpoint=url) as client:
        started = time.monotonic()
        for _ in range(20):
            resp = await client.post(
                "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}
            )
            assert resp.status == 200
            await asyncio.sleep(0.05)  # several export batches fail meanwhile
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + 5
        while not any("cannot be exported" in r.message for r in caplog.records):
            assert time.monotonic() < deadline, "no warning about the collector"
            await asyncio.sleep(0.05)
    assert elapsed < 3.0  # 20 requests + 1 s of sleeps: the exporter's retries never held a request
    warnings = [r for r in caplog.records if "cannot be exported" in r.message]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING and url in warnings[0].getMessage()

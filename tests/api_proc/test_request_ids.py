"""X-Request-Id and the request-end seam (request_log.py) against the fake engine: the id on
every response, in the engine request ids, and one record per request for every sink."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from api_fake_engine import MODEL, FakeEngineClient, api_client, make_config, sse_events

from zeroserve.api_proc.app import create_app
from zeroserve.api_proc.request_log import REQUEST_ID_HEADER, request_middleware
from zeroserve.api_proc.server import serve_app
from zeroserve.api_proc.serving import STATE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collect(client) -> list:
    records: list = []
    client.app[STATE].request_sinks.append(records.append)
    return records


async def test_a_client_id_round_trips_and_reaches_the_engine_and_the_record():
    async with api_client() as client:
        records = collect(client)
        resp = await client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "hello there", "max_tokens": 3},
            headers={REQUEST_ID_HEADER: "abc-123"},
        )
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        sent = client.fake.requests[0]
    assert resp.headers[REQUEST_ID_HEADER] == "abc-123"
    assert body["id"].startswith("cmpl-abc-123-")
    assert sent.request_id.startswith("cmpl-abc-123-") and sent.request_id.endswith("-0")
    [r] = records
    assert (r.request_id, r.status, r.endpoint, r.model) == ("abc-123", 200, "/v1/completions", MODEL)
    assert (r.prompt_tokens, r.completion_tokens, r.finish_reason) == (2, 3, "length")
    assert r.error_type is None and r.ttft_s is not None and 0 <= r.ttft_s <= r.e2e_s
    assert r.prompt_text is None and r.output_text is None  # nobody asked for text


async def test_a_generated_id_when_absent_and_on_errors():
    async with api_client() as client:
        records = collect(client)
        ok = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
        missing = await client.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
        bad = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "n": 0})
        no_route = await client.get("/v1/nothing", headers={REQUEST_ID_HEADER: "r404"})
        await client.get("/health")
    generated = ok.headers[REQUEST_ID_HEADER]
    assert len(generated) == 32 and generated != missing.headers[REQUEST_ID_HEADER]
    assert missing.status == 404 and REQUEST_ID_HEADER in missing.headers
    assert bad.status == 400 and REQUEST_ID_HEADER in bad.headers
    assert no_route.status == 404 and no_route.headers[REQUEST_ID_HEADER] == "r404"
    assert [r.status for r in records] == [200, 404, 400, 404]  # /health leaves no record
    assert [r.error_type for r in records] == [None, "model_not_found", "invalid_request_error", "not_found"]
    assert records[1].model == "nope"


async def test_an_invalid_header_is_a_400_naming_it():
    async with api_client() as client:
        records = collect(client)
        for value in ("x" * 129, "has space", "tab\there"):
            resp = await client.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": "hi", "max_tokens": 1},
                headers={REQUEST_ID_HEADER: value},
            )
            assert resp.status == 400
            err = (await resp.json())["error"]
            assert err["param"] == REQUEST_ID_HEADER and REQUEST_ID_HEADER in err["message"]
            assert resp.headers[REQUEST_ID_HEADER] != value  # a fresh id, not the rejected one
        assert client.fake.requests == []
    assert [r.status for r in records] == [400, 400, 400]


async def test_streaming_carries_the_id_and_records_the_stream():
    async with api_client() as client:
        records = collect(client)
        resp = await client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                  "stream": True},
            headers={REQUEST_ID_HEADER: "stream-1"},
        )  # fmt: skip
        assert resp.status == 200
        await sse_events(resp)
    assert resp.headers[REQUEST_ID_HEADER] == "stream-1"
    [r] = records
    assert r.stream and r.status == 200 and r.completion_tokens == 2 and r.finish_reason == "length"


async def test_an_engine_error_inside_a_stream_is_in_the_record():
    async with api_client() as client:
        records = collect(client)
        resp = await client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "CRASH", "max_tokens": 8, "stream": True},
            headers={REQUEST_ID_HEADER: "crash-1"},
        )
        assert resp.status == 200
        events = await sse_events(resp)
    error = next(e["error"] for e in events if isinstance(e, dict) and "error" in e)
    [r] = records
    assert r.status == 200 and r.completion_tokens == 2 and r.finish_reason == "error"
    assert r.error_type == (error["code"] or error["type"])


async def test_duplicate_ids_at_once_both_succeed_with_distinct_engine_ids():
    async with api_client() as client:
        collect(client)
        body = {"model": MODEL, "prompt": "SLOW hello", "max_tokens": 3}
        a, b = await asyncio.gather(
            *(
                client.post("/v1/completions", json=body, headers={REQUEST_ID_HEADER: "same"})
                for _ in range(2)
            )
        )
        assert (a.status, b.status) == (200, 200)
        ids = [r.request_id for r in client.fake.requests]
    assert len(set(ids)) == 2 and all(i.startswith("cmpl-same-") for i in ids)
    assert a.headers[REQUEST_ID_HEADER] == b.headers[REQUEST_ID_HEADER] == "same"


async def test_text_is_captured_only_when_wanted():
    async with api_client() as client:
        records = collect(client)
        client.app[STATE].wants_text = True
        await client.post("/v1/completions", json={"model": MODEL, "prompt": "hello there", "max_tokens": 2})
        await client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hey"}], "max_tokens": 1},
        )
    assert (records[0].prompt_text, records[0].output_text) == ("hello there", " t0 t1")
    assert records[1].prompt_text == '[{"role":"user","content":"hey"}]'


async def test_a_sink_that_raises_does_not_break_requests_or_the_other_sinks(caplog):
    def broken(record):
        raise RuntimeError("sink bug")

    async with api_client() as client:
        state = client.app[STATE]
        records: list = []
        state.request_sinks[:0] = [broken]
        state.request_sinks.append(records.append)
        with caplog.at_level(logging.ERROR, "zeroserve.api"):
            for _ in range(3):
                resp = await client.post(
                    "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1}
                )
                assert resp.status == 200
    assert len(records) == 3
    failures = [r for r in caplog.records if "request sink" in r.getMessage()]
    assert len(failures) == 1 and "sink bug" in (failures[0].exc_text or "")  # logged once, not per request


async def test_401_and_tokenize_carry_the_id_and_tokenize_quotes_it_to_the_engine():
    async with api_client(api_keys=["k1"]) as client:
        records = collect(client)
        denied = await client.post(
            "/v1/completions", json={"prompt": "hi"}, headers={REQUEST_ID_HEADER: "no-key"}
        )
        tok = await client.post(
            "/tokenize",
            json={"prompt": "hello there"},
            headers={REQUEST_ID_HEADER: "tok-1", "Authorization": "Bearer k1"},
        )
        assert tok.status == 200, await tok.text()
    assert denied.status == 401 and denied.headers[REQUEST_ID_HEADER] == "no-key"
    assert tok.headers[REQUEST_ID_HEADER] == "tok-1"
    assert [(r.request_id, r.status, r.error_type) for r in records] == [
        ("no-key", 401, "invalid_api_key"),
        ("tok-1", 200, None),
    ]


async def test_a_client_that_leaves_gets_a_499_record():
    port = free_port()
    fake = FakeEngineClient()
    app = create_app(make_config(port=port), fake)
    records: list = []
    app[STATE].request_sinks.append(records.append)
    runner = await serve_app(app, make_config(port=port))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = json.dumps({"prompt": "HANG", "max_tokens": 10}).encode()
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-Request-Id: gone-1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        await asyncio.wait_for(fake.started.wait(), 5)
        writer.close()
        for _ in range(100):
            if records:
                break
            await asyncio.sleep(0.02)
    finally:
        await runner.cleanup()
    [r] = records
    assert (r.request_id, r.status, r.error_type, r.finish_reason) == (
        "gone-1",
        499,
        "client_disconnected",
        "abort",
    )
    assert r.completion_tokens == 1  # the one token the engine sent before the client left


async def test_an_exception_past_every_middleware_is_recorded_as_a_500():
    """The seam alone (no error middleware): a handler's bug still leaves a record, status 500."""
    records: list = []

    async def buggy(request):
        raise RuntimeError("bug")

    app = web.Application(middlewares=[request_middleware(lambda: [records.append])])
    app.router.add_post("/v1/completions", buggy)
    async with TestClient(TestServer(app)) as client:
        resp = await client.post("/v1/completions", headers={REQUEST_ID_HEADER: "bug-1"})
        assert resp.status == 500
    [r] = records
    assert (r.request_id, r.status, r.error_type) == ("bug-1", 500, "server_error")

"""Bad input, engine failures, disconnects and auth: every one a 4xx/5xx with an OpenAI error
body (never a 500 for the client's mistake, never a hang), and no engine work left running."""

from __future__ import annotations

import asyncio

import pytest
from api_fake_engine import FakeEngineClient, api_client, sse_events

CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


def assert_error_body(body: dict, param: str | None = None) -> dict:
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    for leak in ("Traceback", "/work/", ".py", "ipc://", "inproc://"):
        assert leak not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


BAD_BODIES = [
    # (route, raw body or json, status, param)
    (CMPL, b"{not json", 400, None),
    (CMPL, b"", 400, None),
    (CMPL, b"[1, 2]", 400, None),
    (CMPL, b"\xff\xfe", 400, None),
    (CMPL, {"max_tokens": 3}, 400, "prompt"),
    (CMPL, {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    (CMPL, {"prompt": "x", "max_tokens": "3"}, 400, "max_tokens"),
    (CMPL, {"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    (CMPL, {"prompt": "x", "n": True}, 400, "n"),
    (CMPL, {"prompt": "x", "stream": "yes"}, 400, "stream"),
    (CMPL, {"prompt": 5}, 400, "prompt"),
    (CMPL, {"prompt": [1, "a"]}, 400, "prompt"),
    (CMPL, {"prompt": []}, 400, "prompt"),
    (CMPL, {"prompt": [[]]}, 400, "prompt"),
    (CMPL, {"prompt": "x", "temperature": -0.1}, 400, "temperature"),
    (CMPL, {"prompt": "x", "temperature": 2.5}, 400, "temperature"),
    (CMPL, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    (CMPL, {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    (CMPL, {"prompt": "x", "top_k": -2}, 400, "top_k"),
    (CMPL, {"prompt": "x", "min_p": 2}, 400, "min_p"),
    (CMPL, {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    (CMPL, {"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty"),
    (CMPL, {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    (CMPL, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    (CMPL, {"prompt": "x", "n": 0}, 400, "n"),
    (CMPL, {"prompt": "x", "n": 17}, 400, "n"),
    (CMPL, {"prompt": "x", "seed": 2**64}, 400, "seed"),
    (CMPL, {"prompt": "x", "stop": ["a"] * 9}, 400, "stop"),
    (CMPL, {"prompt": "x", "stop": "a" * 257}, 400, "stop"),
    (CMPL, {"prompt": "x", "stop": [""]}, 400, "stop"),
    (CMPL, {"prompt": "x", "stop": [1]}, 400, "stop[0]"),
    (CMPL, {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    (CMPL, {"prompt": "x", "logprobs": 1, "echo": True}, 400, "echo"),
    (CMPL, {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (CMPL, {"prompt": ["x"] * 257}, 400, "prompt"),
    (CMPL, {"prompt": "x", "model": "other-model"}, 404, "model"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": [{"content": "x"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages[0].content",
    ),
    (CHAT, {"messages": USER * 1025}, 400, "messages"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (CHAT, {"messages": USER, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    (CHAT, {"messages": USER, "logprobs": 3}, 400, "logprobs"),
    ("/tokenize", {"prompt": "a", "messages": USER}, 400, "prompt"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
]

# What needs the vocabulary or the context is the engine's to refuse (for every entry point);
# the API passes its 400 through.
REFUSED_BY_ENGINE = [
    (CMPL, {"prompt": [-1]}, 400, "prompt"),
    (CMPL, {"prompt": [5000]}, 400, "prompt"),  # vocab_size 1000
    (CMPL, {"prompt": "x", "max_tokens": 65}, 400, "max_tokens"),  # over max_model_len 64
    (CMPL, {"prompt": "x", "min_tokens": 5, "max_tokens": 2}, 400, "min_tokens"),
    (CMPL, {"prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ("/detokenize", {"tokens": [-4]}, 400, "tokens"),
]


async def test_bad_requests_get_4xx_with_openai_error_bodies():
    fake = FakeEngineClient()
    async with api_client(fake) as client:
        for route, body, status, param in BAD_BODIES:
            kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
            resp = await client.post(route, **kwargs)
            assert resp.status == status, (route, body, await resp.text())
            assert resp.content_type == "application/json"
            assert_error_body(await resp.json(), param)
        assert fake.requests == [] and fake.detokenized == []  # none of them reached the engine
        for route, body, status, param in REFUSED_BY_ENGINE:
            resp = await client.post(route, json=body)
            assert resp.status == status, (route, body, await resp.text())
            assert_error_body(await resp.json(), param)
    assert len(fake.requests) + len(fake.detokenized) == len(REFUSED_BY_ENGINE)


async def test_unknown_fields_are_ignored_and_nulls_mean_default():
    async with api_client() as client:
        resp = await client.post(
            CMPL,
            json={
                "prompt": "x",
                "max_tokens": 1,
                "frobnicate": {"a": [1]},
                "temperature": None,
                "n": None,
                "logit_bias": {"1": 2},
            },
        )
        assert resp.status == 200, await resp.text()
        assert client.fake.requests[0].params.temperature == 1.0


async def test_routes_and_methods():
    async with api_client() as client:
        missing = await client.get("/v2/whatever")
        wrong = await client.get(CMPL)
        assert missing.status == 404 and wrong.status == 405
        assert_error_body(await missing.json())
        assert_error_body(await wrong.json())
        assert "POST" in wrong.headers["Allow"]


async def test_body_over_the_limit_is_413():
    async with api_client(max_body_bytes=1000) as client:
        resp = await client.post(CMPL, json={"prompt": "x" * 2000})
        assert resp.status == 413
        assert_error_body(await resp.json())

        async def chunks():  # no Content-Length: the limit holds while reading too
            for _ in range(4):
                yield b" " * 600

        resp = await client.post(CMPL, data=chunks())
        assert resp.status == 413
        assert_error_body(await resp.json())


async def test_engine_400_is_passed_through():
    async with api_client() as client:
        long_prompt = " ".join(["w"] * 60)
        resp = await client.post(CMPL, json={"prompt": long_prompt, "max_tokens": 10})
        assert resp.status == 400
        err = assert_error_body(await resp.json(), "max_tokens")
        assert "context length" in err["message"]
        stream = await client.post(CMPL, json={"prompt": long_prompt, "max_tokens": 10, "stream": True})
        assert stream.status == 400  # a status, not an error inside a 200 stream
        bad_id = await client.post(CMPL, json={"prompt": [999, 3], "max_tokens": 1})
        assert bad_id.status == 200  # in the vocabulary
        assert_error_body(await (await client.post(CMPL, json={"prompt": [1000]})).json(), "prompt")


@pytest.mark.parametrize("stream", [False, True])
async def test_engine_429_gives_retry_after_and_aborts_siblings(stream):
    async with api_client(retry_after_s=3) as client:
        resp = await client.post(
            CMPL, json={"prompt": ["SLOW a", "OVERLOAD"], "max_tokens": 50, "stream": stream}
        )
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "3"
        assert_error_body(await resp.json())
        await asyncio.sleep(0.05)
        fake = client.fake
        assert fake.active == 0
        assert any(r.endswith("-0") for r in fake.aborted)  # the sibling was aborted, not left running


async def test_mid_stream_engine_failure_is_an_error_event_then_done():
    async with api_client() as client:
        resp = await client.post(
            CHAT, json={"messages": [{"role": "user", "content": "CRASH"}], "max_tokens": 10, "stream": True}
        )
        assert resp.status == 200
        events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "server_error" and "worker" in events[-2]["error"]["message"]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2]) == " t0 t1"


async def test_engine_failure_without_stream_is_its_status():
    async with api_client() as client:
        resp = await client.post(
            CHAT, json={"messages": [{"role": "user", "content": "CRASH"}], "max_tokens": 10}
        )
        assert resp.status == 503
        assert_error_body(await resp.json())
        raised = await client.post(CMPL, json={"prompt": "RAISE", "max_tokens": 2})
        assert raised.status == 503
        assert_error_body(await raised.json())


async def test_silent_engine_is_a_503_not_a_hang():
    async with api_client(request_timeout_s=0.1, engine_stall_timeout_s=0.1) as client:
        resp = await client.post(CMPL, json={"prompt": "SILENT", "max_tokens": 2})
        assert resp.status == 503
        assert_error_body(await resp.json())
        assert client.fake.aborted and client.fake.active == 0


async def test_unreachable_engine_before_first_ping_is_503():
    fake = FakeEngineClient()
    fake.ping_fails = True
    async with api_client(fake) as client:
        resp = await client.post(CMPL, json={"prompt": "x"})
        assert resp.status == 503
        assert_error_body(await resp.json())


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_aborts_the_engine_request(stream):
    fake = FakeEngineClient()
    async with api_client(fake) as client:
        task = asyncio.ensure_future(
            client.post(CMPL, json={"prompt": "HANG", "max_tokens": 50, "n": 2, "stream": stream})
        )
        await asyncio.wait_for(fake.started.wait(), 5)
        if stream:
            resp = await task  # the headers came: the stream is running
            assert (await resp.content.readuntil(b"\n\n")).startswith(b"data: ")
            resp.close()  # drops the connection
        else:
            await asyncio.sleep(0.05)
            task.cancel()  # drops the connection
        for _ in range(100):
            if len(fake.aborted) == 2:
                break
            await asyncio.sleep(0.02)
        assert sorted(fake.aborted) == sorted(r.request_id for r in fake.requests)
        assert fake.active == 0


async def test_auth_on():
    async with api_client(api_keys=["k1", "secret-2"]) as client:
        no_key = await client.post(CMPL, json={"prompt": "x", "max_tokens": 1})
        wrong = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        basic = await client.get("/v1/models", headers={"Authorization": "Basic secret-2"})
        ok = await client.get("/v1/models", headers={"Authorization": "Bearer secret-2"})
        ok2 = await client.post(
            CMPL, json={"prompt": "x", "max_tokens": 1}, headers={"Authorization": "bearer k1"}
        )
        unknown_route = await client.get("/nope")
        assert [r.status for r in (no_key, wrong, basic, unknown_route)] == [401] * 4
        err = assert_error_body(await no_key.json())
        assert err["code"] == "invalid_api_key" and no_key.headers["WWW-Authenticate"] == "Bearer"
        assert ok.status == 200 and ok2.status == 200
        for path in ("/health", "/ready", "/metrics"):
            assert (await client.get(path)).status == 200, path


async def test_auth_exempt_paths_are_configurable_and_off_without_keys():
    async with api_client(api_keys=["k"], auth_exempt_paths=["/health"]) as client:
        assert (await client.get("/health")).status == 200
        assert (await client.get("/metrics")).status == 401
    async with api_client() as client:
        assert (await client.get("/v1/models")).status == 200

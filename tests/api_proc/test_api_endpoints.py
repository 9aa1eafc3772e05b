"""Response shapes of every endpoint against the fake engine, streaming and not."""

from __future__ import annotations

from api_fake_engine import MODEL, FakeEngineClient, api_client, sse_events

from zeroserve.shared.messages import SchedulerStats


async def test_completion_shape_and_usage():
    async with api_client() as client:
        resp = await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "hello there", "max_tokens": 3}
        )
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["model"] == MODEL and isinstance(body["created"], int)
    assert body["choices"] == [
        {"index": 0, "text": " t0 t1 t2", "logprobs": None, "finish_reason": "length", "stop_reason": None}
    ]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


async def test_chat_shape():
    async with api_client() as client:
        resp = await client.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "max_completion_tokens": 2,
            },
        )
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        sent = client.fake.requests[0]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": " t0 t1"},
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
        }
    ]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    assert sent.messages[0].role == "user" and sent.messages[0].content == "hi"
    assert sent.add_generation_prompt is True and sent.params.max_tokens == 2


async def test_completion_stream_chunks_and_usage():
    async with api_client() as client:
        resp = await client.post(
            "/v1/completions",
            json={
                "prompt": "a b c",
                "max_tokens": 3,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == " t0 t1 t2"
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert len({c["id"] for c in events[:-1]}) == 1
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 3,
        "total_tokens": 6,
    }


async def test_chat_stream_role_first_and_no_usage_unless_asked():
    async with api_client() as client:
        resp = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True},
        )
        events = await sse_events(resp)
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == " t0 t1"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"] for c in chunks)  # no usage chunk


async def test_n_and_seed_fan_out_ordered_choices():
    async with api_client() as client:
        resp = await client.post("/v1/completions", json={"prompt": "x", "n": 3, "seed": 7, "max_tokens": 1})
        body = await resp.json()
        sent = {r.request_id: r for r in client.fake.requests}
    rid = body["id"]
    assert set(sent) == {f"{rid}-0", f"{rid}-1", f"{rid}-2"}
    assert [sent[f"{rid}-{i}"].params.seed for i in range(3)] == [7, 8, 9]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == [" s7_0", " s8_0", " s9_0"]
    # the prompt is counted once, every choice's tokens are
    assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}


async def test_prompt_batch_with_n_orders_choices_prompt_major():
    async with api_client() as client:
        resp = await client.post(
            "/v1/completions", json={"prompt": ["one", "two words"], "n": 2, "max_tokens": 1, "echo": True}
        )
        body = await resp.json()
    texts = [c["text"] for c in body["choices"]]
    assert texts == ["one t0", "one t0", "two words t0", "two words t0"]
    assert body["usage"]["prompt_tokens"] == 1 + 2 and body["usage"]["completion_tokens"] == 4


async def test_token_id_prompts_and_echo_from_engine_text():
    async with api_client() as client:
        resp = await client.post(
            "/v1/completions", json={"prompt": [[11, 12], [13]], "max_tokens": 1, "echo": True}
        )
        body = await resp.json()
        sent = client.fake.requests
    assert [r.prompt_token_ids for r in sent] == [[11, 12], [13]]
    assert all(r.return_prompt for r in sent)
    assert [c["text"] for c in body["choices"]] == ["<11> <12> t0", "<13> t0"]


async def test_stream_n2_interleaves_and_each_choice_finishes():
    async with api_client() as client:
        resp = await client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "SLOW"}],
                "n": 2,
                "max_tokens": 3,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        events = await sse_events(resp)
    chunks = [e for e in events[:-1] if e["choices"]]
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant"
        assert "".join(m["delta"].get("content", "") for m in mine) == " t0 t1 t2"
        assert [m["finish_reason"] for m in mine].count("length") == 1
    assert events[-2]["usage"]["completion_tokens"] == 6


async def test_completion_logprobs_shape():
    async with api_client() as client:
        resp = await client.post("/v1/completions", json={"prompt": "p", "max_tokens": 2, "logprobs": 2})
        body = await resp.json()
        assert client.fake.requests[0].params.logprobs == 2
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == [" t0", " t1"]
    assert lp["token_logprobs"] == [-0.5, -0.5]
    assert lp["text_offset"] == [0, 3]
    assert lp["top_logprobs"][0] == {"<900>": -1.0, "<901>": -2.0, " t0": -0.5}


async def test_chat_logprobs_shape():
    async with api_client() as client:
        resp = await client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "q"}],
                "max_tokens": 2,
                "logprobs": True,
                "top_logprobs": 1,
            },
        )
        body = await resp.json()
        assert client.fake.detokenized == []  # the engine sent every text along
    content = body["choices"][0]["logprobs"]["content"]
    assert content[0] == {
        "token": " t0",
        "logprob": -0.5,
        "bytes": [32, 116, 48],
        "top_logprobs": [{"token": "<900>", "logprob": -1.0, "bytes": list(b"<900>")}],
    }
    assert len(content) == 2


async def test_chat_logprobs_stream():
    async with api_client() as client:
        resp = await client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "q"}],
                "max_tokens": 2,
                "logprobs": True,
                "stream": True,
            },
        )
        events = await sse_events(resp)
    tokens = [
        t["token"] for e in events[1:-1] for t in (e["choices"][0]["logprobs"] or {"content": []})["content"]
    ]
    assert tokens == [" t0", " t1"]


async def test_stop_strings_are_passed_and_reported():
    async with api_client() as client:
        resp = await client.post("/v1/completions", json={"prompt": "p", "max_tokens": 8, "stop": "t2"})
        body = await resp.json()
        sent = client.fake.requests[0]
    assert sent.stop == ["t2"]
    assert body["choices"][0]["text"] == " t0 t1 "
    assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["stop_reason"] == "t2"


async def test_max_tokens_absent_asks_for_the_rest_of_the_context():
    fake = FakeEngineClient(max_model_len=10)
    async with api_client(fake) as client:
        resp = await client.post("/v1/completions", json={"prompt": "a b c d"})
        body = await resp.json()
    assert fake.requests[0].params.max_tokens == 0  # the engine resolves it to the rest of the context
    assert body["usage"]["completion_tokens"] == 6 and body["choices"][0]["finish_reason"] == "length"


async def test_default_completion_max_tokens_is_configurable():
    async with api_client(default_completion_max_tokens=16) as client:
        await client.post("/v1/completions", json={"prompt": "a"})
        await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}]})
        sent = client.fake.requests
    assert sent[0].params.max_tokens == 16
    assert sent[1].params.max_tokens == 0  # chat: the rest of the context


async def test_models_lists_the_served_name():
    async with api_client() as client:
        body = await (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]
    assert body["data"][0]["object"] == "model" and body["data"][0]["max_model_len"] == 64


async def test_tokenize_and_detokenize():
    async with api_client() as client:
        tok = await (await client.post("/tokenize", json={"prompt": "a bb"})).json()
        chat = await client.post("/tokenize", json={"messages": [{"role": "user", "content": "x"}]})
        detok = await (await client.post("/detokenize", json={"tokens": [1, 2]})).json()
        bad = await client.post("/tokenize", json={"prompt": "TOOLONG"})
        bad_body = await bad.json()
        sent = client.fake.tokenized
    assert tok["count"] == 2 and len(tok["tokens"]) == 2 and tok["max_model_len"] == 64
    assert chat.status == 200 and sent[1].messages[0].content == "x"
    assert sent[0].add_special_tokens is True and sent[1].add_special_tokens is False
    assert detok == {"prompt": "<1> <2>"}
    assert bad.status == 400 and bad_body["error"]["param"] == "prompt"


async def test_health_and_ready():
    fake = FakeEngineClient()
    async with api_client(fake) as client:
        assert (await client.get("/health")).status == 200
        assert (await client.get("/ready")).status == 200
        fake.ready = False
        loading = await client.get("/ready")
        fake.ready, fake.stats = True, SchedulerStats(workers_ready=False)
        worker_down = await client.get("/ready")
        fake.stats, fake.ping_fails = SchedulerStats(), True
        unreachable = await client.get("/ready")
        assert (await client.get("/health")).status == 200
        assert [r.status for r in (loading, worker_down, unreachable)] == [503, 503, 503]
        assert "loading" in (await loading.json())["error"]["message"]
        assert "worker" in (await worker_down.json())["error"]["message"]

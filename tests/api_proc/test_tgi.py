"""TGI's API over a fake engine: the parameters TGI's clients send become the right engine
request, answers and stream events have TGI's shapes, and errors TGI's error shape."""

from __future__ import annotations

import json

import pytest
from api_fake_engine import api_client

from zeroserve.api_proc.protocol import StructuredOutputsIn


def events(body: str) -> list[dict]:
    out = []
    for block in body.split("\n\n"):
        if block:
            assert block.startswith("data:"), block
            out.append(json.loads(block[len("data:") :]))
    return out


async def test_generate_is_greedy_by_default_and_answers_tgis_shape():
    async with api_client() as client:
        r = await client.post(
            "/generate", json={"inputs": "hello world", "parameters": {"max_new_tokens": 3}}
        )
        body = await r.json()
        assert r.status == 200, body
        assert body == {"generated_text": " t0 t1 t2"}
        (req,) = client.fake.requests
        assert req.prompt == "hello world"
        assert req.params.temperature == 0.0 and req.params.max_tokens == 3 and req.params.seed is None
        assert req.params.logprobs is None  # no details asked: no logprob work in the engine
        assert req.include_stop_str_in_output  # TGI keeps the stop sequence in generated_text


async def test_do_sample_and_sampling_parameters_sample_with_a_reported_seed():
    async with api_client() as client:
        params = {"max_new_tokens": 2, "do_sample": True, "top_k": 5, "top_p": 0.9, "details": True}
        r = await client.post("/generate", json={"inputs": "x", "parameters": params})
        body = await r.json()
        req = client.fake.requests[-1]
        assert req.params.temperature == 1.0 and req.params.top_k == 5 and req.params.top_p == 0.9
        assert req.params.seed is not None and body["details"]["seed"] == req.params.seed
        # as TGI: a temperature alone (no do_sample) samples at that temperature
        r = await client.post(
            "/generate", json={"inputs": "x", "parameters": {"temperature": 0.5, "seed": 9}}
        )
        assert r.status == 200
        assert client.fake.requests[-1].params.temperature == 0.5
        assert client.fake.requests[-1].params.seed == 9


async def test_details_tokens_finish_reasons_and_full_text():
    async with api_client() as client:
        params = {"max_new_tokens": 4, "details": True, "return_full_text": True, "top_n_tokens": 2}
        r = await client.post("/generate", json={"inputs": "a b", "parameters": params})
        body = await r.json()
        assert body["generated_text"] == "a b t0 t1 t2 t3"
        d = body["details"]
        assert d["finish_reason"] == "length" and d["generated_tokens"] == 4 and d["seed"] is None
        assert d["prefill"] == []
        assert [t["text"] for t in d["tokens"]] == [" t0", " t1", " t2", " t3"]
        assert [t["id"] for t in d["tokens"]] == [5, 6, 7, 8]
        assert all(t["logprob"] == -0.5 and t["special"] is False for t in d["tokens"])
        assert [[a["id"] for a in top] for top in d["top_tokens"]] == [[900, 901]] * 4
        r = await client.post(
            "/generate", json={"inputs": "a", "parameters": {"stop": [" t1"], "details": True}}
        )
        body = await r.json()
        assert body["generated_text"] == " t0 t1"
        assert body["details"]["finish_reason"] == "stop_sequence"


async def test_generate_stream_events_and_compat_route():
    async with api_client() as client:
        r = await client.post("/generate_stream", json={"inputs": "x", "parameters": {"max_new_tokens": 3}})
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        evs = events(await r.text())
        assert [e["token"]["text"] for e in evs] == [" t0", " t1", " t2"]
        assert [e["index"] for e in evs] == [1, 2, 3]
        assert [e["generated_text"] for e in evs] == [None, None, " t0 t1 t2"]
        assert evs[-1]["details"]["finish_reason"] == "length" and evs[-1]["details"]["generated_tokens"] == 3
        assert all(e["details"] is None for e in evs[:-1])
        # POST /: the body's stream picks; a whole answer is a one-element list
        r = await client.post("/", json={"inputs": "x", "parameters": {"max_new_tokens": 2}})
        assert await r.json() == [{"generated_text": " t0 t1"}]
        r = await client.post("/", json={"inputs": "x", "stream": True, "parameters": {"max_new_tokens": 2}})
        assert [e["token"]["text"] for e in events(await r.text())] == [" t0", " t1"]


async def test_grammar_becomes_the_structured_outputs_of_the_request(monkeypatch):
    seen = []
    import zeroserve.api_proc.tgi as tgi

    real = tgi.completion_plan
    monkeypatch.setattr(tgi, "completion_plan", lambda body, *a: seen.append(body) or real(body, *a))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    async with api_client() as client:
        for grammar in ({"type": "json", "value": schema}, {"type": "json", "value": json.dumps(schema)}):
            r = await client.post("/generate", json={"inputs": "x", "parameters": {"grammar": grammar}})
            assert r.status == 200, await r.text()
        r = await client.post(
            "/generate", json={"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "[ab]+"}}}
        )
        assert r.status == 200, await r.text()
    assert [b.structured_outputs for b in seen] == [
        StructuredOutputsIn(json=schema),
        StructuredOutputsIn(json=schema),
        StructuredOutputsIn(regex="[ab]+"),
    ]


@pytest.mark.parametrize(
    ("parameters", "word"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": 0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"typical_p": 0.5}, "typical_p"),
        ({"watermark": True}, "watermark"),
        ({"best_of": 2, "do_sample": True}, "best_of"),
        ({"decoder_input_details": True, "details": True}, "decoder_input_details"),
        ({"adapter_id": "lora-1"}, "adapter_id"),
        ({"grammar": {"type": "ebnf", "value": "x"}}, "ebnf"),
        ({"temperature": 3.0}, "temperature"),
        ({"top_n_tokens": 21, "details": True}, "top_n_tokens"),
        ({"stop": ["a"] * 9}, "stop"),
        ({"max_new_tokens": "many"}, "max_new_tokens"),
    ],
)
async def test_bad_parameters_are_422_in_tgis_error_shape(parameters, word):
    async with api_client() as client:
        for route in ("/generate", "/generate_stream", "/"):
            r = await client.post(route, json={"inputs": "x", "parameters": parameters})
            body = await r.json()
            assert r.status == 422, body
            assert body["error_type"] == "validation" and word in body["error"]
        assert client.fake.requests == []


async def test_engine_errors_keep_tgis_shape_and_status():
    async with api_client() as client:
        r = await client.post("/generate", json={"inputs": "OVERLOAD"})
        body = await r.json()
        assert r.status == 429 and body["error_type"] == "overloaded"
        r = await client.post("/generate_stream", json={"inputs": "TOOLONG"})
        assert r.status == 422 and (await r.json())["error_type"] == "validation"
        r = await client.post(
            "/generate_stream", json={"inputs": "CRASH", "parameters": {"max_new_tokens": 5}}
        )
        evs = events(await r.text())
        assert [e["token"]["text"] for e in evs[:-1]] == [" t0", " t1"]
        assert evs[-1]["error_type"] == "generation" and "worker died" in evs[-1]["error"]
        r = await client.post("/generate", json={"inputs": ""})
        assert r.status == 422 and "inputs" in (await r.json())["error"]


async def test_truncate_keeps_the_last_tokens_of_the_prompt():
    async with api_client() as client:
        params = {"truncate": 2, "max_new_tokens": 1}
        r = await client.post("/generate", json={"inputs": "one two three four", "parameters": params})
        assert r.status == 200, await r.text()
        (req,) = client.fake.requests
        assert req.prompt is None and len(req.prompt_token_ids) == 2
        assert req.prompt_token_ids == client.fake._tokens("three four")


async def test_info_and_auth():
    async with api_client(api_keys=["k1"]) as client:
        r = await client.post("/generate", json={"inputs": "x"})
        assert r.status == 401
        # refused before the TGI handler ran, yet in TGI's shape: its clients read `error` as text
        body = await r.json()
        assert body["error_type"] == "authentication" and isinstance(body["error"], str), body
        assert r.headers["WWW-Authenticate"] == "Bearer"
        r = await client.get("/info", headers={"Authorization": "Bearer k1"})
        info = await r.json()
        assert info["model_id"] == "test-model" and info["max_total_tokens"] == 64
        assert info["max_input_tokens"] == 63 and info["max_best_of"] == 1


async def test_tenant_request_limits_count_tgi_routes(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text('[tenants.r]\nkey = "k"\nrequests_per_minute = 2\n')
    path.chmod(0o600)
    auth = {"Authorization": "Bearer k"}
    async with api_client(api_keys_file=str(path)) as client:
        body = {"inputs": "x", "parameters": {"max_new_tokens": 1}}
        statuses = [
            (await client.post(route, json=body, headers=auth)).status for route in ("/generate", "/", "/")
        ]
        assert statuses == [200, 200, 429]  # no way around a tenant's limits through TGI's routes
        r = await client.post("/generate", json=body, headers=auth)
        assert (await r.json())["error_type"] == "overloaded" and "Retry-After" in r.headers

"""The context the engine serves is the worker's: a KV pool smaller than the configured context
lowers it, and every process (both tokenizers, the api's /v1/models and /tokenize) uses the
lowered value, so a request that leaves out max_tokens fits instead of getting a 400."""

from __future__ import annotations

import asyncio
import json
import zlib

import pytest

from tests.conftest import start_server
from zeroserve.shared.client import EngineClient
from zeroserve.shared.messages import SamplingParams

POOL_TOKENS = 8 * 16  # --num-kv-blocks 8 --block-size 16, under the configured --max-model-len 2048


@pytest.fixture(scope="module")
def server():
    server = start_server("--num-kv-blocks", "8", "--block-size", "16", "--num-tokenizers", "2")
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def model(server) -> str:
    status, body = server.get("/v1/models")
    assert status == 200, body
    return json.loads(body)["data"][0]["id"]


def test_models_and_tokenize_report_the_pool_bound_context(server, model):
    assert "--max-model-len" in server.args and "2048" in server.args
    status, body = server.get("/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["max_model_len"] == POOL_TOKENS
    status, body = server.post("/tokenize", {"model": model, "prompt": "Hello there"})
    assert status == 200 and body["max_model_len"] == POOL_TOKENS, body


def test_requests_without_max_tokens_fill_the_real_context(server, model):
    status, body = server.post(
        "/v1/completions", {"model": model, "prompt": "Once upon a time", "temperature": 0}
    )
    assert status == 200, body
    usage = body["usage"]
    assert usage["total_tokens"] <= POOL_TOKENS and usage["completion_tokens"] > 0
    messages = [{"role": "user", "content": "Tell me a long story about a dragon."}]
    status, body = server.post(
        "/v1/chat/completions", {"model": model, "messages": messages, "temperature": 0}
    )
    assert status == 200, body
    assert body["usage"]["total_tokens"] <= POOL_TOKENS
    # asking for more than the real context is refused, naming the real context
    status, body = server.post("/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": POOL_TOKENS})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    assert f"{POOL_TOKENS} tokens" in body["error"]["message"]


def test_every_tokenizer_resolves_max_tokens_to_the_real_context(server):
    """Each tokenizer learns the context from the scheduler, not from the config file."""
    ids = {}
    for i in range(100):  # one request id for each tokenizer (the client picks by crc32)
        ids.setdefault(zlib.crc32(f"ctx-{i}".encode()) % 2, f"ctx-{i}")

    addresses = [f"ipc://{server.run_dir}/tokenizer-{i}.sock" for i in (0, 1)]
    params = SamplingParams(temperature=0, max_tokens=0, ignore_eos=True)  # 0: the rest of the context

    async def main():
        async with EngineClient(addresses) as c:
            pongs = [await c.ping(timeout=5, index=i) for i in (0, 1)]
            results = [
                await c.complete(prompt="Count: 1, 2, 3,", params=params, request_id=ids[i]) for i in (0, 1)
            ]
            return pongs, results

    pongs, results = asyncio.run(main())
    assert [p.engine.max_model_len for p in pongs] == [POOL_TOKENS, POOL_TOKENS]
    for res in results:
        assert res["finish_reason"] == "length", res
        assert res["usage"]["total_tokens"] == POOL_TOKENS, res["usage"]

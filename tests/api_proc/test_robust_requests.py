"""End to end: one request must never hurt the others (issue 13).

A huge fan-out or a huge prompt must not stall the tokenizer (its pings stop and every open
stream ends in a 503); bodies the decoders choke on are a 400, never a 500; a request may not
ask for a priority outside the configured range; sampling values that would break the batch
are refused or clamped. Every test runs the real processes.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import aiohttp
import pytest

from tests.conftest import start_server

STREAM = {"prompt": "Once upon a time, in a quiet village,", "max_tokens": 160, "temperature": 0.0}
STREAM["ignore_eos"] = True
STREAM["stream"] = True
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()


@pytest.fixture(scope="module")
def server():
    server = start_server("--num-kv-blocks", "512")
    yield server
    assert server.stop() == 0, server.log()


def headers(server) -> dict:
    return {"Authorization": f"Bearer {server.api_key}"}


def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


async def read_stream(resp: aiohttp.ClientResponse, first: asyncio.Event | None = None) -> tuple[str, list]:
    """The streamed text and any error events."""
    text, errors = [], []
    async for line in resp.content:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[len(b"data: ") :])
        if "error" in chunk:
            errors.append(chunk["error"])
            continue
        text.append(chunk["choices"][0]["text"])
        if first is not None:
            first.set()
    return "".join(text), errors


async def stream_alongside(
    server, big_body: bytes, timeout: float = 60.0
) -> tuple[str, list, int, dict, float]:
    """Open a greedy stream, send ``big_body`` to /v1/completions once it is producing tokens,
    and return (stream text, stream errors, big status, big json, seconds the big one took)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        resp = await session.post(server.base_url + "/v1/completions", json=STREAM, headers=headers(server))
        assert resp.status == 200, await resp.text()
        first = asyncio.Event()
        reader = asyncio.ensure_future(read_stream(resp, first))
        await asyncio.wait_for(first.wait(), 30)
        started = time.monotonic()
        async with session.post(
            server.base_url + "/v1/completions",
            data=big_body,
            headers={**headers(server), "Content-Type": "application/json"},
        ) as big:
            big_status, big_json = big.status, await big.json()
        took = time.monotonic() - started
        text, errors = await reader
        return text, errors, big_status, big_json, took


def alone(server) -> str:
    async def main():
        async with aiohttp.ClientSession() as session:
            resp = await session.post(
                server.base_url + "/v1/completions", json=STREAM, headers=headers(server)
            )
            assert resp.status == 200
            text, errors = await read_stream(resp)
            assert not errors
            return text

    return asyncio.run(main())


# --------------------------------------------------------------------------- item 1: huge requests


def test_a_huge_fan_out_is_refused_and_the_open_stream_is_untouched(server):
    """256 prompts of ~3,000 words with n=16 (~3.8 MB): 4,096 sequences. The old tokenizer
    tokenized every copy inside its loop, went silent, and every open stream got a 503."""
    reference = alone(server)
    prompts = [f"{i} " + words(2900, seed=i) for i in range(256)]
    body = json.dumps({"prompt": prompts, "n": 16, "max_tokens": 4}).encode()
    assert 3_500_000 < len(body) < 4 * 1024 * 1024
    text, errors, status, payload, took = asyncio.run(stream_alongside(server, body))
    assert not errors, errors
    assert text == reference
    assert status == 400, payload
    error = payload["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "n"
    assert "4096" in error["message"] and "256" in error["message"]
    assert "--max-seqs-per-request" in error["message"]
    assert took < 10, f"the refusal took {took:.1f}s"


def test_a_huge_prompt_is_tokenized_off_the_loop(server):
    """One ~3.8 MB prompt takes seconds to tokenize; meanwhile the tokenizer keeps answering
    pings and serving the open stream. The prompt is then over the context: a 400."""
    reference = alone(server)
    body = json.dumps({"prompt": words(640_000, seed=1), "max_tokens": 4}).encode()
    assert 3_000_000 < len(body) < 4 * 1024 * 1024
    text, errors, status, payload, _ = asyncio.run(stream_alongside(server, body))
    assert not errors, errors
    assert text == reference
    assert status == 400, payload
    assert payload["error"]["code"] == "context_length_exceeded"


def test_n_copies_of_many_prompts_at_the_limit_get_their_results(server):
    """prompts x n at the limit (16 x 16 = 256): every choice answered, copies of one prompt
    share its tokenization (same prompt_tokens), and the open stream is untouched."""
    reference = alone(server)
    prompts = [f"{i} " + words(150, seed=100 + i) for i in range(16)]
    body = json.dumps({"prompt": prompts, "n": 16, "max_tokens": 1, "temperature": 0}).encode()
    text, errors, status, payload, _ = asyncio.run(stream_alongside(server, body, timeout=120))
    assert not errors, errors
    assert text == reference
    assert status == 200, payload
    assert len(payload["choices"]) == 256
    assert sorted(c["index"] for c in payload["choices"]) == list(range(256))
    by_prompt = {}
    for c in payload["choices"]:
        by_prompt.setdefault(c["index"] // 16, set()).add(c["text"])
    assert all(len(texts) == 1 for texts in by_prompt.values())  # greedy: copies agree


# --------------------------------------------------------------------------- item 2: deep nesting

DEEP = b"[" * 5000 + b"]" * 5000


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 1, "extra": ' + DEEP + b"}"),
        ("/v1/completions", b"[" * 5000),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + DEEP + b"}"),
        ("/tokenize", b'{"prompt": "x", "x": ' + DEEP + b"}"),
        ("/detokenize", b'{"tokens": [1], "x": ' + DEEP + b"}"),
        ("/detokenize", b'{"x": {"y": ' + b'{"z": ' * 5000 + b"1" + b"}" * 5000 + b"}}"),
    ],
    ids=["completions", "completions-bare", "chat", "tokenize", "detokenize", "detokenize-objects"],
)
def test_deeply_nested_json_is_a_400_not_a_500(server, path, body):
    async def main():
        async with aiohttp.ClientSession() as session:
            async with session.post(
                server.base_url + path,
                data=body,
                headers={**headers(server), "Content-Type": "application/json"},
            ) as resp:
                return resp.status, await resp.json()

    status, payload = asyncio.run(main())
    assert status == 400, payload
    assert payload["error"]["type"] == "invalid_request_error"
    for leak in ("Traceback", "Recursion", ".py"):
        assert leak not in payload["error"]["message"]
    assert "unhandled error" not in server.log() and "Traceback" not in server.log()


def test_deeply_nested_frames_between_processes_are_dropped(server):
    """Frames nested thousands deep on the tokenizer's and the scheduler's sockets are bad
    frames (dropped, counted), not a RecursionError that ends a process loop."""
    import msgspec
    import zmq

    from zeroserve.shared.client import EngineClient
    from zeroserve.shared.messages import Ping

    ping = msgspec.msgpack.encode(Ping(sent_at=1.0))  # ["ping", 1.0, ""]: a 3-array
    deep = bytes([0x94]) + ping[1:] + b"\x91" * 100_000 + b"\xc0"  # one more, skipped, element
    ctx = zmq.Context()
    try:
        for address in (server.tokenizer_address, f"ipc://{server.run_dir}/scheduler.sock"):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(address)
            for _ in range(3):
                sock.send(deep)
            sock.close()
    finally:
        ctx.term()

    async def bad_frames() -> int:
        async with EngineClient(server.tokenizer_address) as client:
            pong = await client.ping(timeout=5)
            return pong.engine.bad_frames

    deadline = time.monotonic() + 10
    while asyncio.run(bad_frames()) < 3:
        assert time.monotonic() < deadline, "the tokenizer did not count the frames"
        time.sleep(0.2)
    assert "bad frame" in server.log() and "Traceback" not in server.log()
    status, body = server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert status == 200, body  # tokenizer and scheduler still serve


def test_the_batch_path_refuses_deep_nesting_with_400():
    from zeroserve.api_proc.config import ApiConfig
    from zeroserve.api_proc.errors import ApiError
    from zeroserve.api_proc.serving import complete_body

    config = ApiConfig(engine_address="ipc:///nowhere", model_name="m")
    body = b'{"prompt": "x", "extra": ' + DEEP + b"}"
    with pytest.raises(ApiError) as e:
        asyncio.run(complete_body(None, config, "/v1/completions", body))
    assert e.value.status == 400 and e.value.type == "invalid_request_error"


# --------------------------------------------------------------------------- item 3: priority range


@pytest.mark.parametrize("stream", [False, True])
def test_a_priority_outside_the_range_is_a_400_and_the_ends_are_served(server, stream):
    for priority in (-(2**63), -101, 101, 2**63 - 1):
        body = {"prompt": "Hi", "max_tokens": 2, "priority": priority, "stream": stream}
        status, payload = server.post("/v1/completions", body)
        assert status == 400, payload
        assert (
            payload["error"]["param"] == "priority" and "between -100 and 100" in payload["error"]["message"]
        )
    for priority in (-100, 100):
        status, payload = server.post(
            "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "priority": priority}
        )
        assert status == 200, payload


def test_the_zmq_client_is_held_to_the_same_priority_range(server):
    from zeroserve.shared.client import EngineClient, EngineError
    from zeroserve.shared.messages import SamplingParams

    async def main():
        async with EngineClient(server.tokenizer_address) as client:
            with pytest.raises(EngineError) as e:
                await client.complete(prompt="Hi", params=SamplingParams(max_tokens=2), priority=-(2**63))
            ok = await client.complete(prompt="Hi", params=SamplingParams(max_tokens=2), priority=-100)
            return e.value.info, ok

    info, ok = asyncio.run(main())
    assert info.status == 400 and info.param == "priority"
    assert ok["usage"]["completion_tokens"] == 2


# --------------------------------------------------------------------------- item 4: sampling values


def test_the_zmq_client_cannot_poison_a_batch_with_non_finite_sampling_values(server):
    """A NaN temperature from a ZMQ client (no API in front) would make the step's sampling fail
    for every request in the batch; the tokenizer refuses it, and a stream beside it is whole."""
    from zeroserve.shared.client import EngineClient, EngineError
    from zeroserve.shared.messages import SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    async def main():
        async with EngineClient(server.tokenizer_address) as client:
            alone = await client.complete(prompt="Once upon a time", params=greedy)
            beside = asyncio.ensure_future(client.complete(prompt="Once upon a time", params=greedy))
            errors = []
            for bad in (
                {"temperature": float("nan")},
                {"temperature": float("inf")},
                {"top_p": float("nan")},
                {"min_p": 2.0},
                {"repetition_penalty": 0.0},
                {"presence_penalty": float("-inf")},
            ):
                with pytest.raises(EngineError) as e:
                    await client.complete(prompt="Hi", params=SamplingParams(max_tokens=4, **bad))
                errors.append((e.value.info.status, e.value.info.param, next(iter(bad))))
            return alone, await beside, errors

    alone, beside, errors = asyncio.run(main())
    assert all(status == 400 and param == name for status, param, name in errors), errors
    assert beside["token_ids"] == alone["token_ids"] and len(alone["token_ids"]) == 24


def test_repetition_penalty_must_keep_logits_finite(server):
    for bad in (0, 1e-300, 0.001, 100.5, 1e300):
        status, payload = server.post(
            "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "repetition_penalty": bad}
        )
        assert status == 400 and payload["error"]["param"] == "repetition_penalty", (bad, payload)
    for good in (0.01, 1.3, 100):
        status, payload = server.post(
            "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "repetition_penalty": good}
        )
        assert status == 200, (good, payload)


def test_a_top_k_past_the_vocabulary_samples_like_no_top_k(server):
    base = {"prompt": "The weather today is", "max_tokens": 8, "temperature": 1.0, "seed": 7}
    texts = []
    for extra in ({}, {"top_k": 10**18}, {"top_k": 49152}):
        status, payload = server.post("/v1/completions", {**base, **extra})
        assert status == 200, payload
        texts.append(payload["choices"][0]["text"])
    assert texts[1] == texts[0] == texts[2]


# --------------------------------------------------------------------------- the fan-out limit, exactly


def test_the_fan_out_limit_is_exact_and_names_the_field():
    from zeroserve.api_proc.config import ApiConfig
    from zeroserve.api_proc.errors import ApiError
    from zeroserve.api_proc.protocol import ChatCompletionRequest, ChatMessageIn, CompletionRequest
    from zeroserve.api_proc.requests import chat_plan, completion_plan

    config = ApiConfig(engine_address="ipc:///nowhere", model_name="m", max_seqs_per_request=32)
    ok = [({"prompt": ["a"] * 32}, 32), ({"prompt": ["a"] * 2, "n": 16}, 32), ({"prompt": [[1, 2]] * 32}, 32)]
    for fields, expected in ok:
        assert len(completion_plan(CompletionRequest(**fields), config).requests) == expected
    for fields, param in (
        ({"prompt": ["a"] * 33}, "prompt"),
        ({"prompt": [[1, 2]] * 33}, "prompt"),
        ({"prompt": ["a"] * 3, "n": 11}, "n"),
    ):
        with pytest.raises(ApiError) as e:
            completion_plan(CompletionRequest(**fields), config)
        assert e.value.status == 400 and e.value.param == param
        assert "at most 32 (--max-seqs-per-request)" in e.value.message
    small = ApiConfig(engine_address="ipc:///nowhere", model_name="m", max_seqs_per_request=4)
    chat = {"messages": [ChatMessageIn(role="user", content="hi")]}
    assert len(chat_plan(ChatCompletionRequest(**chat, n=4), small).requests) == 4
    with pytest.raises(ApiError) as e:
        chat_plan(ChatCompletionRequest(**chat, n=5), small)
    assert e.value.status == 400 and e.value.param == "n"

"""The process engine through its ZMQ client: real processes, the packaged SmolLM2 GGUF."""

from __future__ import annotations

import asyncio

import pytest
import torch

from zeroserve.shared.client import EngineClient, EngineError
from zeroserve.shared.messages import EngineStatus, SamplingParams, SchedulerStats

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "1, 2, 3, 4,",
    "The quick brown fox",
]


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    from zeroserve.tokenizer_proc.tokenizer import load_tokenizer

    return load_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def reference_tokens(tokenizer, gguf_path):
    """Greedy tokens of the in-process engine (same scheduler and runner, no processes)."""
    from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig
    from zeroserve.launcher.inprocess import InProcessEngine

    torch.set_num_threads(2)
    engine = InProcessEngine(  # the server's default --quantization too: the same projections
        ModelRunner(RunnerConfig(model=gguf_path, max_model_len=2048, num_kv_blocks=512))
    )
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    out = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    return dict(zip(PROMPTS, out))


def test_50_concurrent_requests_match_in_process_greedy(zeroserve_server, reference_tokens):
    async def main():
        async with EngineClient(zeroserve_server.tokenizer_address) as client:
            jobs = [
                {
                    "prompt": PROMPTS[i % len(PROMPTS)],
                    "params": SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                }
                for i in range(50)
            ]
            results = {}
            async for i, res in client.generate_many(jobs, max_concurrency=50):
                results[i] = res
            return jobs, results

    jobs, results = run(main())
    assert len(results) == 50
    for i, job in enumerate(jobs):
        res = results[i]
        assert not isinstance(res, EngineError), res
        assert res["token_ids"] == reference_tokens[job["prompt"]], (
            f"request {i} ({job['prompt']!r}) diverged"
        )
        assert res["finish_reason"] == "length"
        assert res["usage"]["completion_tokens"] == 24


def test_streamed_deltas_concatenate_to_final_text(zeroserve_server, tokenizer):
    async def main():
        async with EngineClient(zeroserve_server.tokenizer_address) as client:
            pieces, ids = [], []
            async for d in client.generate(
                prompt="Write a haiku about the sea.", params=SamplingParams(temperature=0, max_tokens=40)
            ):
                assert "\ufffd" not in d.text
                pieces.append(d.text)
                ids.extend(d.token_ids)
            return "".join(pieces), ids

    text, ids = run(main())
    assert ids and text == tokenizer.decode(ids)


def test_stop_string_split_across_tokens(zeroserve_server, tokenizer):
    """Find a greedy continuation, then stop on a string that spans a token boundary."""
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)

    async def main(**kw):
        async with EngineClient(zeroserve_server.tokenizer_address) as client:
            return await client.complete(prompt="The capital of France is", params=params, **kw)

    full = run(main())
    ids = full["token_ids"]
    # a stop string made of the end of token 3 and the start of token 4
    t3, t4 = tokenizer.decode(ids[:4]), tokenizer.decode(ids[:5])
    boundary = len(t3)
    stop = t4[boundary - 2 : boundary + 2] if len(t4) >= boundary + 2 else t4[boundary - 2 :]
    assert len(stop) >= 3, "pick another prompt: tokens too short"
    stopped = run(main(stop=[stop]))
    cut = full["text"].index(stop)
    assert stopped["text"] == full["text"][:cut]
    assert stopped["finish_reason"] == "stop" and stopped["stop_reason"] == stop
    both = run(main(stop=[stop], include_stop_str_in_output=True))
    assert both["text"] == full["text"][: cut + len(stop)]


def test_emoji_and_cjk_are_never_broken(zeroserve_server, tokenizer):
    """A repetitive prompt makes greedy decoding emit multi-token characters, streamed token
    by token: no delta may carry half a character, and the pieces add up to the decode."""
    prompt = "🌋火山 😀漢字 " * 6

    async def main():
        async with EngineClient(zeroserve_server.tokenizer_address) as client:
            return [
                d
                async for d in client.generate(
                    prompt=prompt, params=SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
                )
            ]

    deltas = run(main())
    ids = [t for d in deltas for t in d.token_ids]
    text = "".join(d.text for d in deltas)
    assert all("\ufffd" not in d.text for d in deltas)
    assert any(ord(c) > 0x2E80 for c in text), f"expected CJK/emoji in the output, got {text!r}"
    multi_token_chars = [t for t in ids if "\ufffd" in tokenizer.decode([t])]
    assert multi_token_chars, "the output should include characters split across tokens"
    assert text == tokenizer.decode(ids)


def test_bad_requests_get_typed_errors(zeroserve_server):
    async def main():
        async with EngineClient(zeroserve_server.tokenizer_address) as client:
            errors = []
            for kwargs in (
                {"prompt_token_ids": [10, 999_999]},  # outside the vocabulary
                {"prompt": "x " * 3000},  # longer than --max-model-len 2048
                {
                    "prompt": "hello",
                    "params": SamplingParams(max_tokens=4000),
                },  # prompt + max_tokens > context
                {"prompt": ""},  # empty
            ):
                with pytest.raises(EngineError) as e:
                    await client.complete(**kwargs)
                errors.append(e.value.info)
            ok = await client.complete(
                prompt="Still alive?", params=SamplingParams(temperature=0, max_tokens=4)
            )
            return errors, ok

    errors, ok = run(main())
    assert [e.status for e in errors] == [400, 400, 400, 400]
    assert "vocabulary" in errors[0].message and "context length" in errors[1].message
    assert ok["usage"]["completion_tokens"] >= 1


def test_ping_reports_the_engine_as_a_typed_status(zeroserve_server):
    async def main():
        async with EngineClient(zeroserve_server.tokenizer_address) as client:
            return await client.ping(timeout=5)

    pong = run(main())
    engine = pong.engine
    assert pong.ready and pong.role == "tokenizer"
    assert isinstance(engine, EngineStatus) and isinstance(engine.stats, SchedulerStats)
    assert engine.max_model_len == 2048 and engine.vocab_size >= 49152 and not engine.draining
    assert engine.stats.workers_ready and engine.stats.num_kv_blocks > 0

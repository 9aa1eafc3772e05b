"""SmolLM2-135M-Instruct from the packaged Q4_1 GGUF: the first 32 greedy tokens equal what
transformers produces from the same file, for 2 raw and 2 chat prompts, alone and batched.

transformers' GGUF load takes ~30 s here, so its outputs (token ids) are cached under
zeroserve.shared.env.cache_dir(), keyed by the file's hash, the transformers version and
the prompts' token ids; a cold cache recomputes them once.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import PackageNotFoundError, version

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(2)

from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig  # noqa: E402
from zeroserve.launcher.inprocess import InProcessEngine  # noqa: E402
from zeroserve.shared import env  # noqa: E402
from zeroserve.shared.messages import SamplingParams  # noqa: E402

NUM_TOKENS = 32
RAW_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    "]
CHATS = [
    [{"role": "user", "content": "What is the tallest mountain on Earth?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three primary colors."},
    ],
]


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    from zeroserve.tokenizer_proc.tokenizer import load_tokenizer

    return load_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(p) for p in RAW_PROMPTS] + [tokenizer.encode_chat(m) for m in CHATS]


@pytest.fixture(scope="module")
def runner(gguf_path) -> ModelRunner:
    # quantization none: the GGUF's values in fp32, as transformers loads them
    return ModelRunner(
        RunnerConfig(model=gguf_path, max_model_len=256, num_kv_blocks=64, quantization="none")
    )


@pytest.fixture(scope="module")
def params() -> SamplingParams:
    # min_tokens: both sides hide EOS for all 32 tokens, as HF's min_new_tokens does
    return SamplingParams(max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS, temperature=0.0)


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _hf_outputs(model, prompts: list[list[int]], eos_token_ids: list[int]) -> list[list[int]]:
    outputs = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=NUM_TOKENS,
                min_new_tokens=NUM_TOKENS,
                do_sample=False,
                eos_token_id=eos_token_ids,
                pad_token_id=eos_token_ids[0],
            )
            outputs.append(out[0, len(ids) :].tolist())
    return outputs


@pytest.fixture(scope="module")
def expected(request, gguf_path, prompts, runner) -> list[list[int]]:
    try:
        tf_version = version("transformers")
    except PackageNotFoundError:
        pytest.skip("transformers is not installed")
    key = hashlib.sha256(
        json.dumps([_file_sha256(gguf_path), tf_version, prompts, NUM_TOKENS, runner.eos_token_ids]).encode()
    ).hexdigest()[:24]
    cache = os.path.join(env.cache_dir(), "test-references", f"hf-smollm2-greedy-{key}.json")
    if os.path.isfile(cache):
        with open(cache) as f:
            return json.load(f)
    outputs = _hf_outputs(request.getfixturevalue("hf_smollm2"), prompts, runner.eos_token_ids)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache + ".tmp", "w") as f:
        json.dump(outputs, f)
    os.replace(cache + ".tmp", cache)
    return outputs


def test_each_prompt_alone(runner, prompts, params, expected):
    engine = InProcessEngine(runner)
    for ids, want in zip(prompts, expected, strict=True):
        assert engine.generate([ids], params) == [want]


def test_all_prompts_batched(runner, prompts, params, expected):
    engine = InProcessEngine(runner)
    assert engine.generate(prompts, params) == expected
    # again on the same engine: the prompts' full blocks (but the last token) come from the prefix cache
    assert engine.generate(prompts, params) == expected
    full_blocks = sum((len(p) - 1) // runner.block_size * runner.block_size for p in prompts)
    assert full_blocks > 0 and engine.scheduler.stats().prefix_cache_hits >= full_blocks


def test_reference_is_sensible(tokenizer, expected):
    """Guards the reference itself (a wrong file or template would make equality hollow)."""
    assert "Paris" in tokenizer.decode(expected[0])
    assert "Everest" in tokenizer.decode(expected[2])

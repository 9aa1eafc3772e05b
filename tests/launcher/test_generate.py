"""`zeroserve generate` on the packaged SmolLM2: stdout is exactly the detokenized greedy
completion of the in-process engine (EOS left out), the summary line goes to stderr."""

from __future__ import annotations

import pytest

from zeroserve.launcher import generate
from zeroserve.launcher.cli import build_parser
from zeroserve.shared.messages import SamplingParams


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    # fp32 projections, as the reference: the chat test relies on fp32's reply ending before 64 tokens
    rc = generate.run(build_parser().parse_args(["generate", "--quantization", "none", *argv]))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def reference(gguf_path):
    """Greedy token ids through the engine the command should be driving."""
    from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig
    from zeroserve.launcher.inprocess import InProcessEngine
    from zeroserve.tokenizer_proc.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(gguf_path)
    engine = InProcessEngine(
        ModelRunner(RunnerConfig(model=gguf_path, max_model_len=256, num_kv_blocks=16, quantization="none"))
    )

    def greedy(prompt_ids: list[int], max_tokens: int) -> list[int]:
        return engine.generate([prompt_ids], SamplingParams(max_tokens=max_tokens, temperature=0.0))[0]

    return tokenizer, greedy


def test_raw_prompt_prints_the_greedy_completion(gguf_path, reference, capsys):
    tokenizer, greedy = reference
    prompt = "The capital of France is"
    want = greedy(tokenizer.encode(prompt), 8)
    rc, out, err = run_cli(
        capsys, "--model", gguf_path, "--prompt", prompt, "--max-tokens", "8", "--device", "cpu"
    )
    assert rc == 0
    assert out == tokenizer.decode(want) + "\n"
    assert f"{len(tokenizer.encode(prompt))} prompt tokens, 8 generated (length)" in err


def test_chat_stops_at_eos_and_leaves_it_out(gguf_path, reference, capsys):
    tokenizer, greedy = reference
    question = "What is the capital of France?"
    prompt_ids = tokenizer.encode_chat([{"role": "user", "content": question}])
    want = greedy(prompt_ids, 64)
    assert want[-1] in tokenizer.eos_token_ids and len(want) < 64  # the reply ends before the limit
    rc, out, err = run_cli(
        capsys, "--model", gguf_path, "--chat", "--prompt", question, "--max-tokens", "64", "--device", "cpu"
    )
    assert rc == 0
    assert out == tokenizer.decode(want[:-1]) + "\n"
    assert f"{len(want)} generated (stop)" in err


def test_max_tokens_below_one_is_refused(capsys):
    rc, out, err = run_cli(capsys, "--prompt", "Hi", "--max-tokens", "0")
    assert rc == 2 and out == "" and "--max-tokens must be >= 1" in err

"""Quality of each --quantization mode against fp32: perplexity over a public-domain text shipped
in the repo (tests/data/public_domain_prose.txt) and greedy agreement over 8 prompts x 64 tokens.

    .venv/bin/python benchmarks/bench_quality.py                      # every CPU mode here
    .venv/bin/python benchmarks/bench_quality.py --modes none,q4 --window 512 --stride 256

fp32 is ``--quantization none`` over the checkpoint's own values (a GGUF's blocks dequantized),
so q4 on a GGUF measures only what its kernels add (int8 activations), and int8 / bf16 what
re-quantizing the weights costs. Perplexity: a sliding window of --window tokens moved by
--stride; each window scores its last --stride tokens given everything before them in the
window (the first window scores all its tokens), so every token after the first is scored once.
Greedy agreement: per prompt, how many of the 64 greedy tokens match fp32's before the first
difference (after one, the two continue from different texts), and how many prompts match in full.

The quality bar (tests/gpu_worker/test_quantized_quality.py asserts it): each mode's perplexity
within +3% of fp32's.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from zeroserve.shared import env as _env  # noqa: E402  (no torch: sets OpenMP's env before torch loads it)

_env.set_cpu_thread_env()  # as the worker process does: PASSIVE threads after a short spin

import torch  # noqa: E402

from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig  # noqa: E402
from zeroserve.kernels.metadata import AttentionMetadata  # noqa: E402
from zeroserve.shared.messages import SamplingParams  # noqa: E402
from zeroserve.shared.model_files import resolve_model  # noqa: E402

TEXT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "public_domain_prose.txt")
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "In 1776, the thirteen American colonies",
    "To make a cup of tea, first",
    "The largest planet in the solar system is",
]
# mode -> the runner settings that select it ("bf16" is --dtype bfloat16 on a CPU)
MODES = {
    "none": {"quantization": "none", "dtype": "float32"},
    "int8": {"quantization": "int8"},
    "q4": {"quantization": "q4"},
    "bf16": {"quantization": "none", "dtype": "bfloat16"},
}


def read_text(path: str = TEXT) -> str:
    """The text without its '#' header lines (which say what it is)."""
    with open(path, encoding="utf-8") as f:
        return "".join(line for line in f if not line.startswith("#"))


def text_token_ids(model_path: str, max_tokens: int | None = None) -> list[int]:
    from zeroserve.tokenizer_proc.tokenizer import load_tokenizer

    ids = load_tokenizer(model_path).encode(read_text())
    return ids[:max_tokens] if max_tokens else ids


def make_runner(model_path: str, mode: str, window: int, **kw) -> ModelRunner:
    """A runner in ``mode`` with KV room for one window (perplexity) or the greedy prompts."""
    blocks = max(-(-window // 16), len(PROMPTS) * 8)
    config = RunnerConfig(model=model_path, num_kv_blocks=blocks, max_model_len=max(window, 128), **kw)
    runner = ModelRunner(msgspec_replace(config, **MODES[mode]))
    if runner.quantization != mode:
        raise ValueError(f"mode {mode} is not served here: {runner.quantization_summary}")
    return runner


def msgspec_replace(config: RunnerConfig, **changes) -> RunnerConfig:
    import msgspec

    return msgspec.structs.replace(config, **changes)


@torch.inference_mode()
def window_nll(runner: ModelRunner, ids: list[int], first_scored: int) -> tuple[float, int]:
    """Sum of -log p(ids[t] | ids[:t]) for t in [max(first_scored, 1), len(ids)), one prefill
    of the whole window in the runner's first blocks; and how many tokens that scored."""
    n = len(ids)
    bs = runner.block_size
    meta = AttentionMetadata.build([n], [n], [list(range(-(-n // bs)))], list(range(n)), runner.device)
    tokens = torch.tensor(ids, device=runner.device)
    hidden = runner.model(tokens, torch.arange(n, device=runner.device), runner.kv_caches, meta)
    start = max(first_scored, 1)
    logits = runner.model.compute_logits(hidden[start - 1 : n - 1]).float()
    nll = torch.nn.functional.cross_entropy(logits, tokens[start:n], reduction="sum")
    return float(nll), n - start


def perplexity(runner: ModelRunner, ids: list[int], window: int, stride: int) -> float:
    """exp(mean NLL) over ``ids`` with a sliding window (see the module docstring)."""
    total, count = 0.0, 0
    begin = 0
    while True:
        end = min(begin + window, len(ids))
        first = 0 if begin == 0 else window - stride
        nll, n = window_nll(runner, ids[begin:end], first)
        total, count = total + nll, count + n
        if end == len(ids):
            break
        begin += stride
    return math.exp(total / count)


def greedy_outputs(runner: ModelRunner, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from zeroserve.launcher.inprocess import InProcessEngine

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return InProcessEngine(runner).generate(prompts, params)


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> tuple[float, int]:
    """(mean share of tokens matching before the first difference, prompts matching in full)."""
    shares, full = [], 0
    for got, want in zip(outputs, reference, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        shares.append(same / max(len(want), 1))
        full += got == want
    return sum(shares) / len(shares), full


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default: the packaged SmolLM2)")
    p.add_argument("--modes", default="none,int8,q4,bf16", help="modes to compare with fp32 (none)")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--max-text-tokens", type=int, default=0, help="0: the whole text")
    p.add_argument("--greedy-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--kernel-backend", default=None, choices=["torch", "cpu"])
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    ids = text_token_ids(path, args.max_text_tokens or None)
    from zeroserve.tokenizer_proc.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(path)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    modes = ["none"] + [m for m in args.modes.split(",") if m and m != "none"]
    rows, reference, base = [], None, None
    for mode in modes:
        try:
            runner = make_runner(path, mode, args.window, kernel_backend=args.kernel_backend)
        except ValueError as e:
            print(f"# {mode}: skipped ({e})", file=sys.stderr)
            continue
        start = time.perf_counter()
        ppl = perplexity(runner, ids, args.window, args.stride)
        outputs = greedy_outputs(runner, prompts, args.greedy_tokens)
        seconds = time.perf_counter() - start
        if mode == "none":
            reference, base = outputs, ppl
        share, full = agreement(outputs, reference)
        rows.append((mode, runner.quantization_summary, ppl, ppl / base - 1, share, full, seconds))
        print(f"# {mode}: ppl {ppl:.4f} in {seconds:.1f} s ({runner.quantization_summary})", file=sys.stderr)
        del runner
    print(
        f"\n{os.path.basename(path)}, {len(ids)} tokens of tests/data/public_domain_prose.txt, window "
        f"{args.window} stride {args.stride}; greedy: {len(PROMPTS)} prompts x {args.greedy_tokens} tokens, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| mode | perplexity | vs fp32 | greedy agreement | prompts identical | time (s) | weights |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for mode, summary, ppl, delta, share, full, seconds in rows:
        weights = summary.rsplit("): ", 1)[-1]  # "quantization q4 (why): Q4_1 x120, ... on cpu kernels"
        print(
            f"| {mode} | {ppl:.3f} | {100 * delta:+.2f}% | {100 * share:.1f}% | {full}/{len(PROMPTS)} | "
            f"{seconds:.1f} | {weights} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

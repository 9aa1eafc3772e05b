"""Model-path benchmark (CPU serving path): decode step time and tokens/s of the ModelRunner
at several batch sizes, prefill tokens/s, and Hugging Face `generate` beside it, with the
achieved GFLOP/s against a torch.mm fp32 peak measured in the same run.

    .venv/bin/python benchmarks/bench_model.py                       # SmolLM2-135M, all batches
    .venv/bin/python benchmarks/bench_model.py --batches 1,64 --no-hf
    .venv/bin/python benchmarks/bench_model.py --quantization q4 --load-format auto --no-hf

--quantization MODE runs the projections in that mode (q4 needs real GGUF blocks: --load-format
auto); then the rate is in GOP/s (the same operation count, whatever the arithmetic) and its
share is of the run's peak for that arithmetic: torch._int_mm int8 for int8 / q4 (int8 dots),
torch.mm in bf16 for bf16, torch.mm fp32 otherwise.

Decode at context C: each sequence arrives with C - 1 tokens already "cached" (a prefix hit,
num_computed_tokens = C - 1; the KV values do not change the cost), so no prefill is paid
before timing; then --steps decode steps are timed. HF gets the same start: generate() is
handed a DynamicCache already holding C - 1 positions. Weights are random at the model's
shapes (--load-format dummy; the time does not depend on the values), for both sides.

FLOPs: 2 * matmul parameters per token (the embedding lookup is not a matmul; the lm_head
counts only for rows that sample: all in decode, one per prompt in prefill) + attention
4 * Hq * D * context per layer and token (context ~ half the prompt in a causal prefill).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from zeroserve.shared import env as _env  # noqa: E402  (no torch: sets OpenMP's env before torch loads it)

_env.set_cpu_thread_env()  # as the worker process does: PASSIVE threads after a short spin

import torch  # noqa: E402

from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig  # noqa: E402
from zeroserve.shared.config import DEFAULTS  # noqa: E402
from zeroserve.shared.messages import NewRequestData, RunningRequestData, SamplingParams, StepPlan  # noqa: E402
from zeroserve.shared.model_files import resolve_model  # noqa: E402

GREEDY = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)


def mm_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def int8_peak_gops(size: int = 2048, repeats: int = 5) -> float:
    a = torch.randint(-127, 128, (size, size), dtype=torch.int8)
    b = torch.randint(-127, 128, (size, size), dtype=torch.int8)
    torch._int_mm(a, b)
    return 2 * size**3 / min(_timed(lambda: torch._int_mm(a, b)) for _ in range(repeats)) / 1e9


def bf16_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=torch.bfloat16), torch.randn(size, size, dtype=torch.bfloat16)
    torch.mm(a, b)
    return 2 * size**3 / min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats)) / 1e9


# the run's peak for a mode's arithmetic: (what it is called, how it is measured)
PEAKS = {
    "int8": ("torch._int_mm int8", int8_peak_gops),
    "q4": ("torch._int_mm int8", int8_peak_gops),
    "bf16": ("torch.mm bf16", bf16_peak_gflops),
}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_flops(cfg, num_tokens: int, context: float, logits_rows: int) -> float:
    """FLOPs of a step: num_tokens through the layers, each attending over `context` tokens
    (on average), and the lm_head for the logits_rows rows that sample."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    qkv = h * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d
    per_layer = qkv + cfg.num_attention_heads * d * h + 3 * h * i
    attention = 4 * cfg.num_attention_heads * d * context
    layers = num_tokens * cfg.num_hidden_layers * (2 * per_layer + attention)
    return layers + logits_rows * 2 * cfg.vocab_size * h


# --------------------------------------------------------------------------- zeroserve


def bench_decode(runner: ModelRunner, batch: int, context: int, steps: int) -> tuple[float, float]:
    """(best, median) seconds per decode step of `batch` sequences at ~`context` tokens."""
    bs = runner.block_size
    blocks_per_seq = -(-(context + steps + 1) // bs)
    gen = torch.Generator().manual_seed(batch)
    new = []
    for i in range(batch):
        ids = torch.randint(0, runner.vocab_size, (context,), generator=gen).tolist()
        blocks = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
        new.append(NewRequestData(f"b{batch}-{i}", ids, blocks, context - 1, 1, GREEDY))
    runner.execute(StepPlan(0, new=new))  # first decode step (warm-up)
    running = [RunningRequestData(r.request_id, [], 1) for r in new]
    times = [runner.execute(StepPlan(1 + s, running=running)).step_time_s for s in range(steps)]
    runner.execute(StepPlan(steps + 1, finished_ids=[r.request_id for r in new]))
    return min(times), statistics.median(times)


def bench_prefill(runner: ModelRunner, num_seqs: int, length: int) -> float:
    """Seconds for one step prefilling num_seqs prompts of `length` tokens."""
    bs = runner.block_size
    per = -(-length // bs)
    new = [
        NewRequestData(
            f"p{i}",
            [(7 * i + j) % runner.vocab_size for j in range(length)],
            list(range(i * per, (i + 1) * per)),
            0,
            length,
            GREEDY,
        )
        for i in range(num_seqs)
    ]
    seconds = runner.execute(StepPlan(0, new=new)).step_time_s
    runner.execute(StepPlan(1, finished_ids=[r.request_id for r in new]))
    return seconds


# --------------------------------------------------------------------------- Hugging Face


def hf_model(cfg):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


def bench_hf_decode(model, batch: int, context: int, steps: int) -> float:
    """Seconds per decode step of HF generate from a filled cache: the best of ``steps`` steps,
    timed between calls of a logits processor (once per step), as zeroserve's best step is."""
    from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    cfg = model.config
    cache = DynamicCache(config=cfg)
    shape = (batch, cfg.num_key_value_heads, context - 1, cfg.head_dim)
    for layer in range(cfg.num_hidden_layers):
        cache.update(torch.randn(shape) * 0.1, torch.randn(shape) * 0.1, layer)
    ids = torch.randint(0, cfg.vocab_size, (batch, context))
    clock = StepClock()
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        past_key_values=cache,
        max_new_tokens=steps + 1,
        min_new_tokens=steps + 1,
        do_sample=False,
        logits_processor=LogitsProcessorList([clock]),
    )
    return min(b - a for a, b in zip(clock.times, clock.times[1:]))


def bench_hf_prefill(model, num_seqs: int, length: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (num_seqs, length))
    return _timed(
        lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
    )


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default: the packaged SmolLM2)")
    p.add_argument("--batches", default="1,8,32,64,128")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per batch (best reported)")
    p.add_argument(
        "--hf-steps", type=int, default=6, help="timed HF generate steps per batch (best reported)"
    )
    p.add_argument("--prefill", default="8x256", help="prefill shape SEQSxLEN, one step")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's, all cores)")
    p.add_argument("--load-format", default="dummy", choices=["dummy", "auto"])
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument(
        "--kernel-backend", default=None, choices=["torch", "cpu"], help="default: cpu where it builds"
    )
    p.add_argument(
        "--quantization",
        default="none",
        choices=["auto", "none", "int8", "q4", "bf16"],
        help="projection format (bf16: --dtype bfloat16 on a CPU with bf16 units); default none (fp32)",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="no decode graphs (CPU graphs replay the kernel calls of decode steps by default)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    pre_seqs, pre_len = (int(x) for x in args.prefill.lower().split("x"))
    path = resolve_model(args.model)
    blocks_per_seq = -(-(args.context + args.steps + 2) // 16)
    num_blocks = max(max(batches) * blocks_per_seq, pre_seqs * -(-pre_len // 16))
    runner = ModelRunner(
        RunnerConfig(
            model=path,
            load_format=args.load_format,
            num_kv_blocks=num_blocks,
            max_model_len=max(args.context + args.steps + 2, pre_len),
            kv_cache_dtype=args.kv_cache_dtype,
            kernel_backend=args.kernel_backend,
            quantization="none" if args.quantization == "bf16" else args.quantization,
            dtype="bfloat16" if args.quantization == "bf16" else DEFAULTS.dtype,
            enforce_eager=args.enforce_eager,
        )
    )
    mode = runner.quantization
    peak_name, peak_fn = PEAKS.get(mode, ("torch.mm fp32", mm_peak_gflops))
    unit = "GFLOP/s" if mode in ("none", "bf16") else "GOP/s"
    cfg = runner.model_config
    hf = None if args.no_hf else hf_model(cfg)
    peak = peak_fn()
    print(
        f"# {os.path.basename(path)} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}), "
        f"{runner.quantization_summary}, {torch.get_num_threads()} threads, {peak_name} peak {peak:.1f} {unit}; "
        f"{runner.graphs_summary}",
        file=sys.stderr,
    )
    # a shared machine: every time is the best of several runs, and so is the peak

    rows = []
    with torch.inference_mode():
        for batch in batches:
            step, median = bench_decode(runner, batch, args.context, args.steps)
            gflops = step_flops(cfg, batch, args.context, batch) / step / 1e9
            hf_tps = None
            if hf is not None:
                hf_tps = batch / bench_hf_decode(hf, batch, args.context, args.hf_steps)
            rows.append((f"decode b={batch}", step, batch / step, gflops, hf_tps))
            print(
                f"  {rows[-1][0]}: best {step * 1e3:.1f} ms/step, median {median * 1e3:.1f}"
                + (f"; HF {hf_tps:.1f} tok/s" if hf_tps else ""),
                file=sys.stderr,
            )
        seconds = bench_prefill(runner, pre_seqs, pre_len)
        tokens = pre_seqs * pre_len
        gflops = step_flops(cfg, tokens, (pre_len + 1) / 2, pre_seqs) / seconds / 1e9  # causal: ~half
        hf_tps = tokens / bench_hf_prefill(hf, pre_seqs, pre_len) if hf is not None else None
        rows.append((f"prefill {pre_seqs}x{pre_len}", seconds, tokens / seconds, gflops, hf_tps))
    peak = max(peak, peak_fn())

    print(
        f"\n{cfg.architecture} {os.path.basename(path)} shapes, context {args.context}, CPU, "
        f"{runner.quantization_summary}, KV cache {str(runner.kv_dtype).removeprefix('torch.')}, "
        f"{torch.get_num_threads()} threads; {peak_name} peak {peak:.1f} {unit} (2048^3, best of the run); "
        f"decode time: best of {args.steps} steps\n"
    )
    print(f"| step | time (ms) | zeroserve tok/s | {unit} | % of peak | HF generate tok/s | speedup |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, seconds, tps, gflops, hf_tps in rows:
        hf_cell = f"{hf_tps:.1f}" if hf_tps else "-"
        speed = f"{tps / hf_tps:.2f}x" if hf_tps else "-"
        print(
            f"| {name} | {seconds * 1e3:.1f} | {tps:.1f} | {gflops:.1f} | {100 * gflops / peak:.0f}% | "
            f"{hf_cell} | {speed} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

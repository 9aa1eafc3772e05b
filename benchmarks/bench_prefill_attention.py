"""Prefill attention on the CPU kernels: query tiles (kernels/cpu/ops.py QUERY_TILE, each K/V
block read once for up to that many query tokens) against one token per work item (tile 1,
the kernel as it was before tiles), side by side in one run, alternating.

    .venv/bin/python benchmarks/bench_prefill_attention.py                  # SmolLM2 geometry
    .venv/bin/python benchmarks/bench_prefill_attention.py --lengths 512,4000 --tile 4

Two parts:
- the kernel alone: one prompt of each length, prefilled whole (every query token over its
  causal context), at the model's heads, KV heads and head dim, in its KV cache dtype;
- the whole model: one ModelRunner step prefilling one prompt (the model's weights, in the
  projection format `zeroserve serve` picks unless --quantization says), the same two settings.

Times are the median of --repeats alternating runs. GFLOP/s counts 4 * Hq * D per query token
and visible position (QK^T and PV).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from zeroserve.shared import env as _env  # noqa: E402  (no torch: sets OpenMP's env before torch loads it)

_env.set_cpu_thread_env()  # as the worker process does

import torch  # noqa: E402

from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig  # noqa: E402
from zeroserve.kernels.cpu import ops as cpu_ops  # noqa: E402
from zeroserve.kernels.metadata import AttentionMetadata  # noqa: E402
from zeroserve.shared.messages import NewRequestData, SamplingParams, StepPlan  # noqa: E402
from zeroserve.shared.model_files import resolve_model  # noqa: E402

GREEDY = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def alternate(settings: dict[str, int], run, repeats: int) -> dict[str, float]:
    """Median seconds of ``run()`` under each QUERY_TILE setting, the settings taking turns."""
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(repeats):
        for name, tile in settings.items():
            cpu_ops.QUERY_TILE = tile
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def kernel_case(length: int, heads: int, kv_heads: int, dim: int, block_size: int, dtype: torch.dtype):
    blocks = -(-length // block_size)
    k_cache = torch.randn(blocks, block_size, kv_heads, dim).to(dtype)
    v_cache = torch.randn(blocks, block_size, kv_heads, dim).to(dtype)
    table = torch.randperm(blocks).tolist()  # blocks scattered over the pool, as served
    q = torch.randn(length, heads, dim)
    meta = AttentionMetadata.build([length], [length], [table], [0] * length)
    return lambda: cpu_ops.paged_attention(q, k_cache, v_cache, meta, dim**-0.5)


def model_prefill(runner: ModelRunner, length: int):
    per = -(-length // runner.block_size)
    ids = [(7 * j) % runner.vocab_size for j in range(length)]

    def run():
        runner.execute(StepPlan(0, new=[NewRequestData("p", ids, list(range(per)), 0, length, GREEDY)]))
        runner.execute(StepPlan(1, finished_ids=["p"]))

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default: the packaged SmolLM2)")
    p.add_argument("--lengths", default="128,512,1500,4000", help="prompt lengths for the kernel alone")
    p.add_argument(
        "--model-lengths", default="512,1500", help="prompt lengths for the whole model ('' = skip)"
    )
    p.add_argument(
        "--tile", type=int, default=cpu_ops.QUERY_TILE, help="the tiled setting (default: the kernel's)"
    )
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "q4"])
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", *DTYPES])
    args = p.parse_args(argv)
    torch.manual_seed(0)
    path = resolve_model(args.model)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    model_lengths = [int(x) for x in args.model_lengths.split(",") if x]
    runner = ModelRunner(
        RunnerConfig(
            model=path,
            load_format="auto",
            num_kv_blocks=-(-max([*model_lengths, 16]) // 16),
            max_model_len=max([*model_lengths, 16]),
            kv_cache_dtype=args.kv_cache_dtype,
            quantization=args.quantization,
        )
    )
    cfg, dtype = runner.model_config, runner.kv_dtype
    heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    settings = {"tile 1": 1, f"tile {args.tile}": args.tile}
    threads = torch.get_num_threads()
    print(
        f"# {os.path.basename(path)}: {heads} heads, {kv_heads} KV heads, head dim {dim}, KV cache "
        f"{str(dtype).removeprefix('torch.')}, block {runner.block_size}, {threads} threads; "
        f"median of {args.repeats}, alternating",
        file=sys.stderr,
    )
    print(f"\nkernel alone, one layer, one prompt prefilled whole ({threads} threads)\n")
    print(f"| prompt | tile 1 (ms) | GFLOP/s | tile {args.tile} (ms) | GFLOP/s | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for length in lengths:
            run = kernel_case(length, heads, kv_heads, dim, runner.block_size, dtype)
            run()
            t = alternate(settings, run, args.repeats)
            flops = 4 * heads * dim * length * (length + 1) / 2
            one, tiled = t["tile 1"], t[f"tile {args.tile}"]
            print(
                f"| {length} | {one * 1e3:.2f} | {flops / one / 1e9:.1f} | {tiled * 1e3:.2f} | "
                f"{flops / tiled / 1e9:.1f} | {one / tiled:.2f}x |",
                flush=True,
            )
        if model_lengths:
            print(
                f"\nwhole model, one step prefilling one prompt ({cfg.num_hidden_layers} layers, "
                f"{runner.quantization_summary})\n"
            )
            print(f"| prompt | tile 1 (s) | tok/s | tile {args.tile} (s) | tok/s | speed-up |")
            print("|---:|---:|---:|---:|---:|---:|")
        for length in model_lengths:
            run = model_prefill(runner, length)
            run()
            t = alternate(settings, run, max(3, args.repeats // 2))
            one, tiled = t["tile 1"], t[f"tile {args.tile}"]
            print(
                f"| {length} | {one:.3f} | {length / one:.0f} | {tiled:.3f} | {length / tiled:.0f} | "
                f"{one / tiled:.2f}x |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"\n({time.monotonic() - started:.0f}s)", file=sys.stderr)
    sys.exit(code)

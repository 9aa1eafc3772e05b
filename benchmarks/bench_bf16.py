"""bf16-weight projections on the CPU (mode "bf16"): the fp32 panel GEMM (the CPU default,
kernels/cpu/ops.py), oneDNN's bf16 linear (vLLM's CPU path; kernels/reference/bf16.py) and our
AVX512-BF16 panel GEMM (kernels/cpu/bf16.py), per SmolLM2-135M projection shape and batch M.

    .venv/bin/python benchmarks/bench_bf16.py                      # all shapes, M in 1,2,4,8,64,128,256
    .venv/bin/python benchmarks/bench_bf16.py --m 1,64 --hot       # weights left in cache
    .venv/bin/python benchmarks/bench_bf16.py --cpu-time           # 1 thread, its CPU time

Each call is timed end to end, fp32 x in and fp32 y out (the rounding of x to bf16 and, for
oneDNN, of y back to fp32 included). By default the weights are cold, as in a model step where
the other layers have evicted them: each method gets the same number of copies of the weight,
enough for the fp32 copies to fill --cold-mb, and cycles through them; one call's time is the
best pass (of --repeats) divided by the copies. GFLOP/s counts 2 * M * N * K.

On a machine shared with other work, wall times measure the neighbours as much as the kernels;
--cpu-time runs one thread and times the CPU time it got (memory stalls included, time
slices lost to others not), which ranks the kernels the same way run after run.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from zeroserve.kernels.cpu import bf16 as cpu_bf16  # noqa: E402
from zeroserve.kernels.cpu import ops as cpu_ops  # noqa: E402
from zeroserve.kernels.reference import bf16 as ref_bf16  # noqa: E402

# SmolLM2-135M: (name, K, N)
SHAPES = [
    ("qkv", 576, 960),
    ("o_proj", 576, 576),
    ("gate_up", 576, 3072),
    ("down", 1536, 576),
    ("lm_head", 576, 49152),
]

METHODS = {
    "fp32 panels": (cpu_ops.PackedLinear, cpu_ops.linear),
    "oneDNN bf16": (ref_bf16.Bf16DenseLinear, ref_bf16.bf16_dense_linear),
    "ours bf16": (cpu_bf16.Bf16Linear, cpu_bf16.bf16_linear),
}


def time_call(handles: list, run, x: torch.Tensor, repeats: int, clock=time.perf_counter) -> float:
    """Seconds per call: the best of `repeats` passes over every handle, per handle."""
    for h in handles[:2]:
        run(x, h)
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        for h in handles:
            run(x, h)
        best = min(best, (clock() - start) / len(handles))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", default="1,2,4,8,64,128,256", help="batch sizes (rows of x)")
    parser.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cold-mb", type=float, default=96.0, help="fp32 weight bytes cycled through")
    parser.add_argument("--hot", action="store_true", help="one copy of each weight (stays in cache)")
    parser.add_argument("--cpu-time", action="store_true", help="1 thread, timed by its CPU time")
    args = parser.parse_args()
    if args.cpu_time:
        args.threads = 1
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    rows = [int(m) for m in args.m.split(",")]
    wanted = args.shapes.split(",")
    if not cpu_bf16.bf16_available():
        print(f"our kernel runs its portable loops here: {cpu_bf16.why_not()}")
    print(
        f"torch {torch.__version__}, {args.threads} threads ({'CPU' if args.cpu_time else 'wall'} time), "
        f"{'hot' if args.hot else f'cold ({args.cold_mb:.0f} MB of fp32 weights cycled)'} weights; "
        "ms per call (GFLOP/s)"
    )
    print("| shape (K x N) | M | " + " | ".join(METHODS) + " | speedup vs fp32 | vs oneDNN |")
    print("|---|---|" + "---|" * (len(METHODS) + 2))
    gen = torch.Generator().manual_seed(0)
    for name, k, n in (s for s in SHAPES if s[0] in wanted):
        copies = 1 if args.hot else max(2, round(args.cold_mb * 2**20 / (4 * n * k)))
        weights = [torch.randn(n, k, generator=gen) * k**-0.5 for _ in range(copies)]
        handles = {method: [make(w, None) for w in weights] for method, (make, _) in METHODS.items()}
        del weights
        for m in rows:
            x = torch.randn(m, k, generator=gen)
            secs = {
                method: time_call(handles[method], run, x, args.repeats, clock)
                for method, (_, run) in METHODS.items()
            }
            cells = [f"{1e3 * s:.3f} ({2 * m * n * k / s / 1e9:.0f})" for s in secs.values()]
            ours, fp32, onednn = secs["ours bf16"], secs["fp32 panels"], secs["oneDNN bf16"]
            print(
                f"| {name} ({k} x {n}) | {m} | "
                + " | ".join(cells)
                + f" | {fp32 / ours:.2f}x | {onednn / ours:.2f}x |",
                flush=True,
            )
        del handles


if __name__ == "__main__":
    main()

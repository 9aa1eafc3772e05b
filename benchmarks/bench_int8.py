"""int8 W8A8 projections on the CPU: the fp32 panel GEMM (today's CPU default), the library
path (``torch._int_mm`` + per-token quantization + dequant, kernels/reference/int8.py) and our
VNNI kernel (kernels/cpu/int8.py), per SmolLM2-135M projection shape and batch size M.
"_int_mm" is the reference as served (with the two fp32 channels per token), "_int_mm bare"
the library's floor without them (quantize, _int_mm, scale: no bias, no kept channels).

    .venv/bin/python benchmarks/bench_int8.py                  # all shapes, M in 1,8,64,256
    .venv/bin/python benchmarks/bench_int8.py --m 1,64 --hot   # weights left in cache

Each call is timed end to end (fp32 x in, fp32 y out: quantization and dequant included).
By default the weights are cold, as in a model step where the other layers have evicted them:
each method gets enough copies of the weight to fill --cold-mb and cycles through them, and
the time of one call is the best pass (of --repeats) divided by the copies. GOP/s counts
2 * M * N * K.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from zeroserve.kernels.cpu import int8 as cpu_int8  # noqa: E402
from zeroserve.kernels.cpu import ops as cpu_ops  # noqa: E402
from zeroserve.kernels.reference import int8 as ref_int8  # noqa: E402

# SmolLM2-135M: (name, K, N)
SHAPES = [
    ("qkv", 576, 960),
    ("o_proj", 576, 576),
    ("gate_up", 576, 3072),
    ("down", 1536, 576),
    ("lm_head", 576, 49152),
]


def bare_int_mm(x: torch.Tensor, h: ref_int8.Int8Linear) -> torch.Tensor:
    """The library floor: per-token int8 of all of x (no kept channels), _int_mm, dequant."""
    xq, x_scale = ref_int8.quantize_rows(x)
    return torch._int_mm(xq, h.qweight.t()).to(torch.float32) * (x_scale[:, None] * h.scale[None, :])


METHODS = {
    "fp32 panels": (cpu_ops.PackedLinear, cpu_ops.linear, 4),
    "_int_mm": (ref_int8.Int8Linear, ref_int8.int8_linear, 1),
    "_int_mm bare": (ref_int8.Int8Linear, bare_int_mm, 1),
    "C++ VNNI": (cpu_int8.CpuInt8Linear, cpu_int8.cpu_int8_linear, 1),
}


def time_call(handles: list, run, x: torch.Tensor, repeats: int) -> float:
    """Seconds per call: the best of `repeats` passes over every handle, per handle."""
    for h in handles[:2]:
        run(x, h)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for h in handles:
            run(x, h)
        best = min(best, (time.perf_counter() - start) / len(handles))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", default="1,8,64,256", help="batch sizes (rows of x)")
    p.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--cold-mb", type=float, default=96.0, help="weight bytes each method cycles through")
    p.add_argument("--hot", action="store_true", help="one copy of each weight (it stays in cache)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's, all cores)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpu_int8.vnni_available():
        print(f"C++ int8 kernel not used here: {cpu_int8.why_not()}")
        METHODS.pop("C++ VNNI")
    ms = [int(m) for m in args.m.split(",")]
    wanted = set(args.shapes.split(","))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, weights {'hot' if args.hot else 'cold'}"
    )
    header = f"| shape | M x K x N | {' | '.join(f'{name} ms (GOP/s)' for name in METHODS)} | fastest |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    gen = torch.Generator().manual_seed(0)
    for name, k, n in SHAPES:
        if name not in wanted:
            continue
        weight = torch.randn(n, k, generator=gen) * 0.05
        handles = {}
        for method, (make, _, bytes_per) in METHODS.items():
            copies = 1 if args.hot else max(2, int(args.cold_mb * 2**20 // (n * k * bytes_per)))
            handles[method] = [make(weight, None) for _ in range(copies)]
        for m in ms:
            x = torch.randn(m, k, generator=gen)
            cells, times = [], {}
            for method, (_, run, _) in METHODS.items():
                t = time_call(handles[method], run, x, args.repeats)
                times[method] = t
                cells.append(f"{t * 1e3:.3f} ({2 * m * n * k / t / 1e9:.0f})")
            fastest = min(times, key=times.get)
            print(f"| {name} | {m} x {k} x {n} | {' | '.join(cells)} | {fastest} |", flush=True)


if __name__ == "__main__":
    main()

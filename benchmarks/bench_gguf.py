"""GGUF block kernels (kernels/cpu/gguf.py) against the fp32 paths, at SmolLM2-135M's shapes.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_gguf.py
    .venv/bin/python benchmarks/bench_gguf.py --batches 1,64 --threads 2

For each projection shape (K -> N, the GGUF type SmolLM2's Q4_1 file uses for it) and batch M:
the C++ fp32 PackedLinear over the dequantized weight (today's CPU default), the reference
(oneDNN / F.linear over the dequantized weight), and the block kernel. Per call: the fastest of
--repeats timed loops; GB/s = bytes of weights streamed (each path's own format) per
call / time (meaningful at M = 1, where the weights dominate); GOP/s = 2 M N K / time.
Weights are random fp32 matrices quantized with gguf.quants (times do not depend on values).
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from gguf import quants  # noqa: E402
from gguf.constants import GGMLQuantizationType  # noqa: E402

from zeroserve.kernels.cpu import gguf, ops  # noqa: E402
from zeroserve.kernels.quantized import GGUFWeight  # noqa: E402
from zeroserve.kernels.reference.backend import ReferenceKernels  # noqa: E402

# (name, K, N, type): q|k|v fused, o, gate|up fused, down, the tied lm_head (Q8_0 token_embd)
SHAPES = [
    ("qkv", 576, 960, "Q4_1"),
    ("o", 576, 576, "Q4_1"),
    ("gate_up", 576, 3072, "Q4_1"),
    ("down", 1536, 576, "Q4_1"),
    ("lm_head", 576, 49152, "Q8_0"),
]


def timed(fn, min_s: float, repeats: int) -> float:
    """Seconds per call: the fastest of `repeats` loops of ~min_s each (other load on a shared
    machine only ever adds time)."""
    fn()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < min_s:
        fn()
        n += 1
    loops = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        loops.append((time.perf_counter() - start) / n)
    return min(loops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--min-s", type=float, default=0.2, help="seconds per timed loop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-step", action="store_true", help="skip the whole-model step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    reference = ReferenceKernels()
    print(
        f"threads={args.threads} vnni={gguf.vnni_available()} torch={torch.__version__} "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    )
    print(
        "| shape | K x N | type | M | fp32 packed ms | reference ms | gguf ms | speedup vs packed "
        "| GB/s packed / gguf | GOP/s packed / gguf |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    totals = {m: [0.0, 0.0, 0.0] for m in batches}
    gen = torch.Generator().manual_seed(0)
    for name, k, n, type_name in SHAPES:
        qtype = GGMLQuantizationType[type_name]
        w32 = torch.randn(n, k, generator=gen)
        weight = GGUFWeight(torch.from_numpy(quants.quantize(w32.numpy(), qtype)), int(qtype), (n, k))
        dense = weight.dequantize()
        packed = ops.PackedLinear(dense, None)
        ref = reference.prepare_dense(dense, None)
        block = gguf.GGUFLinear(weight, None)
        for m in batches:
            x = torch.randn(m, k, generator=gen)
            t_packed = timed(partial(ops.linear, x, packed), args.min_s, args.repeats)
            t_ref = timed(partial(reference.linear, x, ref), args.min_s, args.repeats)
            t_gguf = timed(partial(gguf.gguf_linear, x, block), args.min_s, args.repeats)
            for i, t in enumerate((t_packed, t_ref, t_gguf)):
                totals[m][i] += t
            ops_ = 2 * m * n * k
            print(
                f"| {name} | {k} x {n} | {type_name} | {m} | {t_packed * 1e3:.3f} | {t_ref * 1e3:.3f} | "
                f"{t_gguf * 1e3:.3f} | {t_packed / t_gguf:.1f}x | {n * k * 4 / t_packed / 1e9:.1f} / "
                f"{block.nbytes / t_gguf / 1e9:.1f} | {ops_ / t_packed / 1e9:.0f} / {ops_ / t_gguf / 1e9:.0f} |"
            )
    print()
    print("one set of the five shapes (a layer's projections + the lm_head), ms:")
    for m, (p, r, g) in totals.items():
        print(f"  M={m}: fp32 packed {p * 1e3:.3f}, reference {r * 1e3:.3f}, gguf {g * 1e3:.3f}")
    if not args.no_step:
        model_step(batches, args)


def _run_all(handles, fn, xs: dict[int, torch.Tensor]) -> None:
    for h in handles:
        fn(xs[h.in_features], h)


def model_step(batches: list[int], args: argparse.Namespace) -> None:
    """Every projection of a decode step of the packaged SmolLM2 (its real tensors: 30 layers
    of q|k|v, o, gate|up, down, and the Q8_0 lm_head), one after another: the weights no
    longer fit in the caches, so this is what a step streams from memory."""
    from zeroserve.gpu_worker.loader.gguf_file import GGUFFile
    from zeroserve.shared.model_files import default_model_path

    f = GGUFFile(default_model_path())

    def weight(name: str) -> GGUFWeight:
        info = f.tensors[name]
        return GGUFWeight(torch.from_numpy(f.raw(info).copy()), info.ggml_type, (info.ne[1], info.ne[0]))

    layers = int(f.metadata["llama.block_count"])
    weights = []
    for i in range(layers):
        b = f"blk.{i}."
        weights.append(
            GGUFWeight.cat([weight(b + n) for n in ("attn_q.weight", "attn_k.weight", "attn_v.weight")])
        )
        weights.append(weight(b + "attn_output.weight"))
        weights.append(GGUFWeight.cat([weight(b + "ffn_gate.weight"), weight(b + "ffn_up.weight")]))
        weights.append(weight(b + "ffn_down.weight"))
    weights.append(weight("token_embd.weight"))
    f.close()
    block = [gguf.GGUFLinear(w, None) for w in weights]
    packed = [ops.PackedLinear(w.dequantize(), None) for w in weights]
    q_bytes = sum(h.nbytes for h in block)
    f_bytes = sum(4 * w.shape[0] * w.shape[1] for w in weights)
    print()
    print(
        f"a decode step's projections, SmolLM2 ({layers} layers + lm_head; block weights "
        f"{q_bytes / 1e6:.1f} MB, fp32 {f_bytes / 1e6:.0f} MB), ms per step:"
    )
    print("| M | fp32 packed ms | gguf ms | speedup | gguf GB/s |")
    print("|---|---|---|---|---|")
    for m in batches:
        xs = {k: torch.randn(m, k) for k in {w.shape[1] for w in weights}}

        t_packed = timed(partial(_run_all, packed, ops.linear, xs), args.min_s, args.repeats)
        t_gguf = timed(partial(_run_all, block, gguf.gguf_linear, xs), args.min_s, args.repeats)
        print(
            f"| {m} | {t_packed * 1e3:.2f} | {t_gguf * 1e3:.2f} | {t_packed / t_gguf:.1f}x | "
            f"{q_bytes / t_gguf / 1e9:.1f} |"
        )


if __name__ == "__main__":
    main()

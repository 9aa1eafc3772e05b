"""Kernel microbenchmarks: achieved bandwidth / FLOP rate of each Triton kernel.

    python benchmarks/gpu/bench_kernels.py [--device cuda] [--tiny] [--out DIR]

Decode attention is memory-bound: its figure of merit is bytes of K/V read per second
against the card's peak (H200: 4.8 TB/s; ``--peak-gbps``). Llama-3-8B heads (32 q, 8 KV,
head_dim 128), bf16, batch 64 / 256, context 1k / 2k / 4k, every sequence at full context.
Also: extend attention TFLOP/s on a 2k-token prefill, the elementwise kernels' GB/s, and the
sampling filter against the torch reference (a sort). On sm_89+: the fp8 (e4m3 W8A8) linear,
``torch._scaled_mm`` and the Triton GEMM, quantization included, against bf16 cuBLAS at the
projections of SmolLM2-135M and Llama-3-8B (benchmarks/configs), and decode attention over
an e4m3 KV cache. Writes ``bench_kernels.json``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Report, parse_args, print_table, setup_device, time_fn  # noqa: E402


def main() -> int:
    args = parse_args(
        __doc__.splitlines()[0], lambda p: p.add_argument("--peak-gbps", type=float, default=4800.0)
    )
    setup_device(args)
    import torch

    from zeroserve.kernels.metadata import AttentionMetadata
    from zeroserve.kernels.reference import ops as ref
    from zeroserve.kernels.triton import ops as tri
    from zeroserve.kernels.triton import sampling as tri_sampling
    from zeroserve.kernels.triton.attention_decode import decode_bytes

    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    elem = torch.empty((), dtype=dtype).element_size()
    report = Report("bench_kernels", args)
    iters = 20 if dev == "cuda" else 1
    warmup = 3 if dev == "cuda" else 1
    bs = 16
    if args.tiny:
        hq, hkv, d, hidden, inter, vocab = 4, 2, 64, 128, 96, 1000
        decode_grid, prefill_len, sample_rows = [(2, 64), (4, 128)], 64, 4
    else:
        hq, hkv, d, hidden, inter, vocab = 32, 8, 128, 4096, 14336, 128256
        decode_grid = [(b, c) for b in (64, 256) for c in (1024, 2048, 4096)]
        prefill_len, sample_rows = 2048, 256

    with report.section("decode attention") as rows:
        for batch, ctx in decode_grid:
            blocks = batch * ctx // bs
            k = torch.randn(blocks, bs, hkv, d, device=dev, dtype=dtype)
            v = torch.randn(blocks, bs, hkv, d, device=dev, dtype=dtype)
            tables = (
                torch.randperm(blocks, device=dev, dtype=torch.int64).to(torch.int32).view(batch, ctx // bs)
            )
            q = torch.randn(batch, hq, d, device=dev, dtype=dtype)
            meta = AttentionMetadata.build(
                [1] * batch, [ctx] * batch, [[0]] * batch, [-1] * batch, device=dev
            )
            meta.block_tables = tables
            t = time_fn(
                lambda q=q, k=k, v=v, meta=meta: tri.paged_attention(q, k, v, meta, d**-0.5),
                dev,
                warmup,
                iters,
            )
            gbps = decode_bytes(batch, ctx, hq, hkv, d, elem) / t / 1e9
            row = {
                "batch": batch,
                "context": ctx,
                "us": t * 1e6,
                "GB/s": gbps,
                "% of peak": 100 * gbps / args.peak_gbps,
            }
            if batch == decode_grid[0][0] and ctx == decode_grid[0][1]:
                t_ref = time_fn(
                    lambda q=q, k=k, v=v, meta=meta: ref.paged_attention(q, k, v, meta, d**-0.5),
                    dev,
                    1,
                    max(1, iters // 4),
                )
                row["torch ref us"] = t_ref * 1e6
            rows.append(row)
            print(row, flush=True)
            del k, v
        print_table(rows, ["batch", "context", "us", "GB/s", "% of peak", "torch ref us"])

    with report.section("extend attention (prefill)") as rows:
        n = prefill_len
        blocks = -(-n // bs)
        k = torch.randn(blocks, bs, hkv, d, device=dev, dtype=dtype)
        v = torch.randn(blocks, bs, hkv, d, device=dev, dtype=dtype)
        q = torch.randn(n, hq, d, device=dev, dtype=dtype)
        meta = AttentionMetadata.build([n], [n], [list(range(blocks))], [-1] * n, device=dev)
        t = time_fn(
            lambda q=q, k=k, v=v, meta=meta: tri.paged_attention(q, k, v, meta, d**-0.5), dev, warmup, iters
        )
        flops = 4 * hq * d * n * n / 2  # causal: half of QK^T and PV
        t_ref = time_fn(
            lambda q=q, k=k, v=v, meta=meta: ref.paged_attention(q, k, v, meta, d**-0.5),
            dev,
            1,
            max(1, iters // 4),
        )
        rows.append(
            {"tokens": n, "us": t * 1e6, "TFLOP/s": flops / t / 1e12, "torch ref (sdpa) us": t_ref * 1e6}
        )
        print_table(rows, ["tokens", "us", "TFLOP/s", "torch ref (sdpa) us"])

    with report.section("elementwise") as rows:
        tokens = 256 if not args.tiny else 8
        x = torch.randn(tokens, hidden, device=dev, dtype=dtype)
        w = torch.ones(hidden, device=dev, dtype=dtype)
        cases = [
            ("rms_norm+residual", lambda: tri.rms_norm(x, w, 1e-5, residual=x), 5 * tokens * hidden * elem),
        ]
        g = torch.randn(tokens, 2 * inter, device=dev, dtype=dtype)
        cases.append(("silu_and_mul", lambda: tri.silu_and_mul(g), 3 * tokens * inter * elem))
        qkv = torch.randn(tokens, (hq + 2 * hkv) * d, device=dev, dtype=dtype)
        q, kk = qkv[:, : hq * d].view(tokens, hq, d), qkv[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d)
        cache = torch.randn(8192, d, device=dev)
        pos = torch.randint(0, 8192, (tokens,), device=dev)
        cases.append(("rotary", lambda: tri.rotary(pos, q, kk, cache), 2 * tokens * (hq + hkv) * d * elem))
        kv = torch.zeros(tokens * 2 // bs + 1, bs, hkv, d, device=dev, dtype=dtype)
        slots = torch.randperm(kv.shape[0] * bs, device=dev)[:tokens]
        cases.append(("write_kv", lambda: tri.write_kv(kk, kk, kv, kv, slots), 4 * tokens * hkv * d * elem))
        for name, fn, nbytes in cases:
            t = time_fn(fn, dev, warmup, iters)
            rows.append({"op": name, "tokens": tokens, "us": t * 1e6, "GB/s": nbytes / t / 1e9})
        print_table(rows, ["op", "tokens", "us", "GB/s"])

    with report.section("sampling filter") as rows:
        logits = torch.randn(sample_rows, vocab, device=dev) * 3
        top_k = torch.full((sample_rows,), 50, device=dev, dtype=torch.int64)
        top_p = torch.full((sample_rows,), 0.9, device=dev)
        min_p = torch.full((sample_rows,), 0.05, device=dev)
        for name, params in (
            ("top_k=50 top_p=0.9", (top_k, top_p, None)),
            ("top_p=0.9", (None, top_p, None)),
            ("top_k+top_p+min_p", (top_k, top_p, min_p)),
        ):
            t = time_fn(
                lambda params=params: tri_sampling.top_k_top_p_min_p_filter(logits, *params),
                dev,
                warmup,
                iters,
            )
            t_ref = time_fn(
                lambda params=params: tri_sampling.reference_filter(logits, *params),
                dev,
                1,
                max(1, iters // 2),
            )
            rows.append(
                {
                    "filter": name,
                    "rows": sample_rows,
                    "vocab": vocab,
                    "triton us": t * 1e6,
                    "torch ref us": t_ref * 1e6,
                }
            )
        print_table(rows, ["filter", "rows", "vocab", "triton us", "torch ref us"])

    if dev != "cuda" or torch.cuda.get_device_capability() >= (8, 9):
        report.save()  # the sections so far survive if the time limit cuts the fp8 ones short
        bench_fp8(report, dev, args, iters, warmup)
    report.save()
    return report.exit_code()


def projection_shapes(tiny: bool) -> list[tuple[str, int, int]]:
    """(name, K, N) of every projection of SmolLM2-135M and of Llama-3-8B (from its config)."""
    if tiny:
        return [("tiny qkv", 96, 160), ("tiny down", 144, 96)]
    import json

    path = os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "configs", "llama-3-8b", "config.json"
    )
    shapes = []
    # SmolLM2-135M: hidden 576, 9 heads / 3 KV heads of 64, intermediate 1536, vocab 49152
    for model, c in (
        ("smollm2", dict(h=576, i=1536, q=9 * 64, kv=3 * 64, v=49152)),
        ("llama3-8b", None),
    ):
        if c is None:
            with open(path) as f:
                cfg = json.load(f)
            hd = cfg["hidden_size"] // cfg["num_attention_heads"]
            c = dict(
                h=cfg["hidden_size"],
                i=cfg["intermediate_size"],
                q=cfg["num_attention_heads"] * hd,
                kv=cfg["num_key_value_heads"] * hd,
                v=cfg["vocab_size"],
            )
        shapes += [
            (f"{model} qkv", c["h"], c["q"] + 2 * c["kv"]),
            (f"{model} o", c["q"], c["h"]),
            (f"{model} gate_up", c["h"], 2 * c["i"]),
            (f"{model} down", c["i"], c["h"]),
            (f"{model} lm_head", c["h"], c["v"]),
        ]
    return shapes


def bench_fp8(report, dev, args, iters, warmup) -> None:
    import torch
    import torch.nn.functional as F

    from zeroserve.kernels.metadata import AttentionMetadata
    from zeroserve.kernels.triton import fp8
    from zeroserve.kernels.triton import ops as tri
    from zeroserve.kernels.triton.attention_decode import decode_bytes

    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    batches = (1, 4) if args.tiny else (1, 64, 2048)
    with report.section("fp8 linear vs bf16") as rows:
        for name, k, n in projection_shapes(args.tiny):
            w = torch.randn(n, k, device=dev, dtype=dtype) * 0.02
            handles = [fp8.Fp8Linear(w, None, use_scaled_mm=False)]
            if fp8.scaled_mm_usable(torch.device(dev), n, k):
                handles.append(fp8.Fp8Linear(w, None, use_scaled_mm=True))
            for m in batches:
                x = torch.randn(m, k, device=dev, dtype=dtype)
                t_dense = time_fn(lambda x=x, w=w: F.linear(x, w), dev, warmup, iters)
                row = {"proj": name, "M": m, "K": k, "N": n, "bf16 us": t_dense * 1e6}
                for h in handles:
                    t = time_fn(lambda x=x, h=h: fp8.fp8_linear(x, h), dev, warmup, iters)
                    row[f"{h.kernel} us"] = t * 1e6
                    row[f"{h.kernel} x"] = t_dense / t
                    row[f"{h.kernel} TFLOP/s"] = 2 * m * k * n / t / 1e12
                rows.append(row)
                print(row, flush=True)
            del w, handles
        columns = ["proj", "M", "K", "N", "bf16 us"]
        for kernel in ("torch._scaled_mm", "triton"):
            columns += [f"{kernel} us", f"{kernel} x"]
        print_table(rows, columns)

    with report.section("decode attention, e4m3 KV cache") as rows:
        bs = 16
        hq, hkv, d = (4, 2, 64) if args.tiny else (32, 8, 128)
        grid = [(2, 64)] if args.tiny else [(64, 4096), (256, 2048)]
        for batch, ctx in grid:
            blocks = batch * ctx // bs
            row = {"batch": batch, "context": ctx}
            for cache_dtype in (dtype, torch.float8_e4m3fn):
                k = torch.randn(blocks, bs, hkv, d, device=dev, dtype=dtype).to(cache_dtype)
                v = torch.randn(blocks, bs, hkv, d, device=dev, dtype=dtype).to(cache_dtype)
                meta = AttentionMetadata.build(
                    [1] * batch, [ctx] * batch, [[0]] * batch, [-1] * batch, device=dev
                )
                meta.block_tables = (
                    torch.randperm(blocks, device=dev, dtype=torch.int64)
                    .to(torch.int32)
                    .view(batch, ctx // bs)
                )
                q = torch.randn(batch, hq, d, device=dev, dtype=dtype)
                t = time_fn(
                    lambda q=q, k=k, v=v, meta=meta: tri.paged_attention(q, k, v, meta, d**-0.5),
                    dev,
                    warmup,
                    iters,
                )
                elem = torch.empty((), dtype=cache_dtype).element_size()
                key = "e4m3" if cache_dtype == torch.float8_e4m3fn else str(dtype).removeprefix("torch.")
                row[f"{key} us"] = t * 1e6
                row[f"{key} GB/s"] = decode_bytes(batch, ctx, hq, hkv, d, elem) / t / 1e9
                del k, v
            rows.append(row)
            print(row, flush=True)
        print_table(rows, list(rows[0]) if rows else [])


if __name__ == "__main__":
    sys.exit(main())

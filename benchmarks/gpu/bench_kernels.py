"""Kernel microbenchmarks: achieved bandwidth / FLOP rate of each Triton kernel.

    python benchmarks/gpu/bench_kernels.py [--device cuda] [--tiny] [--out DIR]

Decode attention is memory-bound: its figure of merit is bytes of K/V read per second
against the card's peak (H200: 4.8 TB/s; ``--peak-gbps``). Llama-3-8B heads (32 q, 8 KV,
head_dim 128), bf16, batch 64 / 256, context 1k / 2k / 4k, every sequence at full context.
Also: extend attention TFLOP/s on a 2k-token prefill, the elementwise kernels' GB/s, and the
sampling filter against the torch reference (a sort). Writes ``bench_kernels.json``.
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

    report.save()
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())

"""Every Triton kernel against its torch reference on the device, in fp32 and bf16.

    python benchmarks/gpu/check_kernels.py [--device cuda] [--tiny] [--out DIR]

Llama-3-8B head shapes (32 query heads, 8 KV heads, head_dim 128) plus a head_dim 64 / GQA 1
case; ragged decode contexts up to 4k; an extend batch mixing fresh prefills, chunks after
cached prefixes and decode rows. On sm_89+ also the e4m3 (fp8) projections and KV cache
(``check_fp8``). Writes ``check_kernels.json``; exit status 1 on a mismatch.
"""

from __future__ import annotations

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Report, parse_args, print_table, setup_device  # noqa: E402

TOL = {"float32": 1e-4, "bfloat16": 2e-2}
ATTN_TOL = {"float32": 2e-3, "bfloat16": 3e-2}


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    setup_device(args)
    import torch

    from zeroserve.kernels.metadata import AttentionMetadata
    from zeroserve.kernels.reference import ops as ref
    from zeroserve.kernels.triton import ops as tri
    from zeroserve.kernels.triton import sampling as tri_sampling

    torch.manual_seed(0)
    dev = args.device
    report = Report("check_kernels", args)
    rows = report.data.setdefault("checks", [])

    def record(op, dtype, shape, out, expected, tol):
        err = (out.float() - expected.float()).abs()
        finite = torch.isfinite(expected.float())
        bound = tol + tol * expected.float().abs()
        ok = bool(torch.equal(torch.isfinite(out.float()), finite)) and bool(
            (err[finite] <= bound[finite]).all()
        )
        rows.append(
            {
                "op": op,
                "dtype": str(dtype).removeprefix("torch."),
                "shape": shape,
                "max_abs_err": float(err[finite].max()) if finite.any() else 0.0,
                "tol": tol,
                "ok": ok,
            }
        )
        print(
            f"{'ok  ' if ok else 'FAIL'} {op:28s} {rows[-1]['dtype']:9s} {shape:34s} err={rows[-1]['max_abs_err']:.2e}",
            flush=True,
        )

    if args.tiny:
        hq, hkv, d, hidden, inter, vocab = 4, 2, 64, 128, 96, 1000
        decode_lens = [1, 15, 63, 100]
        extend = ([5, 1, 17], [5, 40, 63])
    else:
        hq, hkv, d, hidden, inter, vocab = 32, 8, 128, 4096, 14336, 128256
        rng = random.Random(0)
        decode_lens = [rng.choice([1, 15, 63, 300, 1000, 2048, 4096]) for _ in range(64)]
        extend = ([1, 7, 128, 300, 513, 1, 64, 2000], [100, 107, 128, 1300, 533, 4001, 80, 2000])
    bs = 16

    def paged(query_lens, seq_lens, hq, hkv, d, dtype):
        blocks = [-(-n // bs) for n in seq_lens]
        physical = torch.randperm(sum(blocks) + 1).tolist()
        tables, i = [], 0
        for n in blocks:
            tables.append(physical[i : i + n])
            i += n
        shape = (sum(blocks) + 1, bs, hkv, d)
        k = torch.randn(shape, device=dev, dtype=dtype)
        v = torch.randn(shape, device=dev, dtype=dtype)
        q = torch.randn(sum(query_lens), hq, d, device=dev, dtype=dtype)
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, [-1] * sum(query_lens), device=dev)
        return q, k, v, meta

    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        tol, attn_tol = TOL[name], ATTN_TOL[name]
        # a rounded add is exact on a GPU; the CPU interpreter rounds fp32 -> bf16 toward zero
        exact = 0.0 if dev == "cuda" or dtype == torch.float32 else 8e-3
        with report.section(f"elementwise {name}"):
            x = torch.randn(33, hidden, device=dev, dtype=dtype)
            r = torch.randn(33, hidden, device=dev, dtype=dtype)
            w = (1 + 0.1 * torch.randn(hidden, device=dev)).to(dtype)
            record(
                "rms_norm", dtype, f"[33, {hidden}]", tri.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), tol
            )
            out, res = tri.rms_norm(x, w, 1e-5, residual=r)
            exp_out, exp_res = ref.rms_norm(x, w, 1e-5, residual=r)
            record("rms_norm+residual", dtype, f"[33, {hidden}]", out, exp_out, tol)
            record("residual add", dtype, f"[33, {hidden}]", res, exp_res, exact)
            g = torch.randn(33, 2 * inter, device=dev, dtype=dtype) * 3
            record("silu_and_mul", dtype, f"[33, {2 * inter}]", tri.silu_and_mul(g), ref.silu_and_mul(g), tol)
            qkv = torch.randn(33, (hq + 2 * hkv) * d, device=dev, dtype=dtype)
            q = qkv[:, : hq * d].view(33, hq, d)
            k = qkv[:, hq * d : (hq + hkv) * d].view(33, hkv, d)
            pos = torch.randint(0, 8192, (33,), device=dev)
            inv = 1.0 / 500000.0 ** (torch.arange(0, d, 2, device=dev).float() / d)
            ang = torch.outer(torch.arange(8192, device=dev).float(), inv)
            cache = torch.cat([ang.cos(), ang.sin()], -1)
            (qo, ko), (qe, ke) = tri.rotary(pos, q, k, cache), ref.rotary(pos, q, k, cache)
            record("rotary q", dtype, f"[33, {hq}, {d}]", qo, qe, tol)
            record("rotary k", dtype, f"[33, {hkv}, {d}]", ko, ke, tol)
            caches = [torch.zeros(40, bs, hkv, d, device=dev, dtype=dtype) for _ in range(4)]
            slots = torch.randperm(40 * bs, device=dev)[:33]
            slots[::5] = -1
            kk, vv = torch.randn(2, 33, hkv, d, device=dev, dtype=dtype)
            tri.write_kv(kk, vv, caches[0], caches[1], slots)
            ref.write_kv(kk, vv, caches[2], caches[3], slots)
            record("write_kv", dtype, f"[33, {hkv}, {d}] -> paged", caches[0], caches[2], 0.0)
        # head_dim 64 / GQA 1 in bf16 only: each fp32 attention variant costs ~10-20 s of ptxas
        head_cases = [(hq, hkv, d)] + ([(hkv, hkv, 64)] if dtype == torch.bfloat16 or args.tiny else [])
        for qh, kh, hd in head_cases:
            scale = hd**-0.5
            with report.section(f"decode attention {name} Hq{qh} Hkv{kh} D{hd}"):
                q, k, v, meta = paged([1] * len(decode_lens), decode_lens, qh, kh, hd, dtype)
                expected = ref.paged_attention(q, k, v, meta, scale)
                record(
                    "decode (auto split)",
                    dtype,
                    f"S={len(decode_lens)} max_ctx={max(decode_lens)}",
                    tri.paged_attention(q, k, v, meta, scale),
                    expected,
                    attn_tol,
                )
                from zeroserve.kernels.triton.attention_decode import decode_attention

                out = decode_attention(
                    q, k, v, meta.block_tables, meta.seq_lens, meta.max_seq_len, scale, split_len=64
                )
                record(
                    "decode (split 64)",
                    dtype,
                    f"S={len(decode_lens)} max_ctx={max(decode_lens)}",
                    out,
                    expected,
                    attn_tol,
                )
            with report.section(f"extend attention {name} Hq{qh} Hkv{kh} D{hd}"):
                q, k, v, meta = paged(extend[0], extend[1], qh, kh, hd, dtype)
                record(
                    "extend (ragged, prefixes)",
                    dtype,
                    f"q_lens={extend[0][:4]}..",
                    tri.paged_attention(q, k, v, meta, scale),
                    ref.paged_attention(q, k, v, meta, scale),
                    attn_tol,
                )

    if dev == "cuda":
        with report.section("decode attention captured in a CUDA graph"):
            # capture with max_seq_len = the context limit, replay with other lengths and tables
            from zeroserve.kernels.triton.attention_decode import decode_attention

            q, k, v, meta = paged([1] * 8, [4096] * 8, hq, hkv, d, torch.bfloat16)
            out = torch.empty_like(q)
            decode_attention(q, k, v, meta.block_tables, meta.seq_lens, 4096, d**-0.5)  # compile first
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out.copy_(decode_attention(q, k, v, meta.block_tables, meta.seq_lens, 4096, d**-0.5))
            for lens in ([1, 15, 63, 300, 1000, 2048, 4096, 7], [4096] * 8):
                meta.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
                meta.block_tables.copy_(meta.block_tables.flip(0))
                q.normal_()
                graph.replay()
                expected_meta = AttentionMetadata(
                    meta.query_start_loc,
                    meta.seq_lens,
                    meta.block_tables,
                    meta.slot_mapping,
                    1,
                    max(lens),
                    [1] * 8,
                    lens,
                )
                record(
                    "decode graph replay",
                    torch.bfloat16,
                    f"lens={lens[:4]}..",
                    out,
                    ref.paged_attention(q, k, v, expected_meta, d**-0.5),
                    ATTN_TOL["bfloat16"],
                )

    fp8_ok = dev != "cuda" or torch.cuda.get_device_capability() >= (8, 9)
    if not fp8_ok:
        report.data["fp8"] = "skipped: e4m3 needs compute capability 8.9+"
        print("\n=== fp8 sections skipped: e4m3 needs compute capability 8.9+", flush=True)
    else:
        check_fp8(report, record, paged, dev, args.tiny, hq, hkv, d)

    with report.section("sampling filters fp32"):
        logits = torch.randn(64, vocab, device=dev) * 3
        top_k = torch.randint(0, 200, (64,), device=dev)
        top_p = torch.rand(64, device=dev) * 0.5 + 0.5
        min_p = torch.rand(64, device=dev) * 0.1
        temp = torch.rand(64, device=dev) + 0.5
        out = tri_sampling.top_k_top_p_min_p_filter(logits, top_k, top_p, min_p, temp)
        expected = tri_sampling.reference_filter(logits, top_k, top_p, min_p, temp)
        record("top_k/top_p/min_p/temp", torch.float32, f"[64, {vocab}]", out, expected, 1e-5)

    print()
    print_table(rows, ["op", "dtype", "shape", "max_abs_err", "tol", "ok"])
    bad = [r for r in rows if not r["ok"]]
    report.data["summary"] = {"checks": len(rows), "failed": len(bad)}
    print(
        f"\n{len(rows) - len(bad)}/{len(rows)} checks passed; section errors: {list(report.data['errors'])}"
    )
    report.save()
    return 1 if bad or report.data["errors"] else 0


def check_fp8(report, record, paged, dev, tiny, hq, hkv, d) -> None:
    """e4m3 projections (activation quantization, the Triton GEMM, torch._scaled_mm) at
    SmolLM2-135M and Llama-3-8B shapes, and attention over an e4m3 KV cache, each against the
    torch reference over the same e4m3 values."""
    import torch

    from zeroserve.kernels.reference import ops as ref
    from zeroserve.kernels.triton import fp8
    from zeroserve.kernels.triton import ops as tri

    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    if tiny:
        shapes = [(1, 96, 100), (37, 128, 48)]
    else:  # (M, K, N): SmolLM2 qkv and down, Llama-3-8B qkv and down, and an N % 16 != 0
        shapes = [(1, 576, 960), (256, 1536, 576), (1, 4096, 6144), (256, 14336, 4096), (37, 4096, 4100)]
    with report.section("fp8 projections"):
        for m, k, n in shapes:
            x = torch.randn(m, k, device=dev, dtype=dtype)
            w = torch.randn(n, k, device=dev) * 0.02
            b = torch.randn(n, device=dev, dtype=dtype)
            q, s = fp8.quantize_rows(x)
            q_ref, s_ref = fp8.quantize_rows_reference(x)
            record("fp8 quantize_rows", dtype, f"[{m}, {k}]", q.float(), q_ref.float(), 0.0)
            record("fp8 row scales", dtype, f"[{m}, {k}]", s, s_ref, 0.0)
            paths = [False] + ([True] if fp8.scaled_mm_usable(torch.device(dev), n, k) else [])
            for use_scaled_mm in paths:
                h = fp8.Fp8Linear(w, b, use_scaled_mm=use_scaled_mm)
                # same e4m3 values on both sides: the bf16 output rounding and summation order
                record(
                    f"fp8 linear ({h.kernel})",
                    dtype,
                    f"{m}x{k}x{n}",
                    fp8.fp8_linear(x, h),
                    fp8.fp8_linear_reference(x, h),
                    2e-2,
                )
    with report.section("fp8 KV cache"):
        q, k_cache, v_cache, meta = paged([1] * 4, [1, 15, 63, 300], hq, hkv, d, dtype)
        caches = [torch.zeros(k_cache.shape, device=dev, dtype=torch.float8_e4m3fn) for _ in range(4)]
        n = 40
        slots = torch.randperm(k_cache.shape[0] * k_cache.shape[1], device=dev)[:n]
        slots[::7] = -1
        kk, vv = torch.randn(2, n, hkv, d, device=dev, dtype=dtype) * 100  # some beyond 448: saturate
        tri.write_kv(kk, vv, caches[0], caches[1], slots)
        ref.write_kv(kk, vv, caches[2], caches[3], slots)
        record(
            "write_kv e4m3", dtype, f"[{n}, {hkv}, {d}] -> paged", caches[0].float(), caches[2].float(), 0.0
        )
        fk, fv = k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn)
        record(
            "decode over e4m3 cache",
            dtype,
            "S=4 max_ctx=300",
            tri.paged_attention(q, fk, fv, meta, d**-0.5),
            ref.paged_attention(q, fk, fv, meta, d**-0.5),
            ATTN_TOL["bfloat16"],
        )
        q, k_cache, v_cache, meta = paged([5, 1, 17], [5, 40, 63], hq, hkv, d, dtype)
        fk, fv = k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn)
        record(
            "extend over e4m3 cache",
            dtype,
            "q_lens=[5, 1, 17]",
            tri.paged_attention(q, fk, fv, meta, d**-0.5),
            ref.paged_attention(q, fk, fv, meta, d**-0.5),
            ATTN_TOL["bfloat16"],
        )


if __name__ == "__main__":
    sys.exit(main())

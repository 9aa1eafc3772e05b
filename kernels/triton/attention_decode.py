"""Paged decode attention: one query token per sequence, split-K (flash-decoding).

Grid of the split kernel: ``(S, Hkv, num_splits)``. One program owns one KV head of one
sequence and one slice of its context, and serves all ``G = Hq / Hkv`` query heads that share
the KV head (GQA), so each K/V tile is read from HBM once::

    context of sequence s:  | split 0 | split 1 | split 2 |..|     each split_len tokens
    split j, tile by tile:  pos -> block_tables[s, pos // bs] -> k_cache[block, pos % bs, kvh]
    per split:              out_j = softmax-weighted V over the slice, lse_j = log2-sum-exp2

The reduce kernel (grid ``(S, Hq)``) merges the splits of a sequence with their lse values.
With one split the split kernel writes the normalized output directly and no reduce runs.

Host ints only (``max_seq_len``, tensor shapes) size the grid and the scratch buffers, so the
wrapper neither syncs nor depends on data: a CUDA graph captured with ``max_seq_len`` set to
the model's context limit replays correctly for any shorter contexts (empty splits exit).

An fp8 (e4m3) cache holds K/V at scale 1.0 (see kv_write.py); tiles are widened to q's dtype
before the dots, so q is never rounded to fp8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zeroserve.kernels.triton._common import FP32_DOT, device_sms, dot_in_fp32, last_dim_contiguous, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale_log2e,
    split_len,
    num_splits,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DIRECT: tl.constexpr,
    DOT_F32: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kv_head * GROUP + g  # query heads served by this KV head
    q = tl.load(
        q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(tl.float32)  # (G, D)
    if not DOT_F32:
        # the dots run in the cache's dtype, or in q's when the cache is e4m3 (widened per tile)
        q = q.to(q_ptr.dtype.element_ty if KV_FP8 else k_cache_ptr.dtype.element_ty)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    table_row = block_tables_ptr + seq * stride_bt

    for tile in range(start, end, BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)
        p_mask = pos < end
        block = tl.load(table_row + pos // PAGE_SIZE, mask=p_mask, other=0).to(tl.int64)
        in_block = (pos % PAGE_SIZE).to(tl.int64)
        kv_mask = p_mask[:, None] & d_mask[None, :]
        k_off = block * stride_kb + in_block * stride_kt + kv_head * stride_kh
        k = tl.load(k_cache_ptr + k_off[:, None] + d[None, :], mask=kv_mask, other=0.0)  # (N, D)
        if DOT_F32:
            qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=FP32_DOT)
        else:
            qk = tl.dot(q, tl.trans(k.to(q.dtype)))  # (G, N), fp32 accumulate
        qk = tl.where(p_mask[None, :], qk * scale_log2e, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_off = block * stride_vb + in_block * stride_vt + kv_head * stride_vh
        v = tl.load(v_cache_ptr + v_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if DOT_F32:
            pv = tl.dot(p, v.to(tl.float32), input_precision=FP32_DOT)
        else:
            pv = tl.dot(p.to(q.dtype), v.to(q.dtype))
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    has_tokens = start < seq_len
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # a padded row (seq_len 0) yields zeros, not NaN
    out = acc / l_safe[:, None]
    row_mask = g_mask[:, None] & d_mask[None, :]
    if DIRECT:
        o_ptrs = out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask)
    else:
        # scratch layout: part_out (S, Hq, num_splits, D_PAD), part_lse (S, Hq, num_splits)
        row = (seq * (GROUP * tl.num_programs(1)) + heads) * num_splits + split
        tl.store(part_out_ptr + row[:, None] * D_PAD + d[None, :], out, mask=row_mask & has_tokens)
        lse = m_i + tl.log2(l_safe)
        tl.store(part_lse_ptr + row, lse, mask=g_mask & has_tokens)


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    seq_lens_ptr,
    out_ptr,
    split_len,
    num_splits,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    used = tl.cdiv(seq_len, split_len)  # splits that saw tokens; the rest hold garbage
    d = tl.arange(0, D_PAD)
    row0 = (seq * tl.num_programs(1) + head) * num_splits

    m = tl.full([1], float("-inf"), tl.float32)
    denom = tl.zeros([1], tl.float32)
    acc = tl.zeros([D_PAD], tl.float32)
    for j in range(0, used):
        lse = tl.load(part_lse_ptr + row0 + j + tl.zeros([1], tl.int32))
        part = tl.load(part_out_ptr + (row0 + j) * D_PAD + d)
        m_new = tl.maximum(m, lse)
        a = tl.exp2(m - m_new)
        b = tl.exp2(lse - m_new)
        acc = acc * a + part * b
        denom = denom * a + b
        m = m_new
    denom = tl.where(denom > 0.0, denom, 1.0)
    o_ptrs = out_ptr + seq * stride_ot + head * stride_oh + d
    tl.store(o_ptrs, (acc / denom).to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def choose_split_len(num_seqs: int, num_kv_heads: int, max_seq_len: int, block_n: int, sms: int) -> int:
    """Tokens per split: enough programs for ~2 waves of SMs, at least one tile per split.

    Large batches already fill the GPU with ``S * Hkv`` programs and get one split (no
    reduce); a single long sequence is cut into many.
    """
    tiles = max(1, triton.cdiv(max_seq_len, block_n))
    wanted = triton.cdiv(2 * sms, max(1, num_seqs * num_kv_heads))
    splits = max(1, min(wanted, tiles))
    return triton.cdiv(tiles, splits) * block_n


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    scale: float,
    split_len: int | None = None,
    block_n: int = 64,
) -> torch.Tensor:
    """q: [S, Hq, D] (one token per sequence) -> [S, Hq, D] in q's dtype.

    k_cache, v_cache: [N, bs, Hkv, D]; block_tables: [S, W] int32; seq_lens: [S] int32 (context
    after this step, new token included; 0 = padding row, output zeros). ``max_seq_len`` must
    bound every seq_len (the grid covers only that much). ``split_len`` (a multiple of
    ``block_n``) overrides the automatic split size (tests use it).
    """
    num_seqs, hq, head_dim = q.shape
    _, page_size, hkv, _ = k_cache.shape
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    q = last_dim_contiguous(q)
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "KV cache needs a contiguous head dim"
    assert block_tables.stride(-1) == 1, "block table rows must be contiguous"
    group = hq // hkv
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn
    d_pad = max(16, next_pow2(head_dim))
    if split_len is None:
        split_len = choose_split_len(num_seqs, hkv, max_seq_len, block_n, device_sms(q.device))
    assert split_len % block_n == 0, f"split_len {split_len} must be a multiple of block_n {block_n}"
    num_splits = max(1, triton.cdiv(max(max_seq_len, 1), split_len))
    direct = num_splits == 1
    if direct:
        part_out = part_lse = out  # unused placeholders
    else:
        part_out = torch.empty((num_seqs, hq, num_splits, d_pad), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_seqs, hq, num_splits), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(num_seqs, hkv, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        part_out,
        part_lse,
        scale * LOG2E,
        split_len,
        num_splits,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, next_pow2(group)),
        HEAD_DIM=head_dim,
        D_PAD=d_pad,
        PAGE_SIZE=page_size,
        BLOCK_N=block_n,
        DIRECT=direct,
        DOT_F32=dot_in_fp32(q.dtype if kv_fp8 else k_cache.dtype),
        KV_FP8=kv_fp8,
        num_warps=4,
        num_stages=2,
    )
    if not direct:
        _decode_reduce_kernel[(num_seqs, hq)](
            part_out,
            part_lse,
            seq_lens,
            out,
            split_len,
            num_splits,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            D_PAD=d_pad,
            num_warps=1 if d_pad <= 64 else 2,
        )
    return out


def decode_bytes(num_seqs: int, context: int, hq: int, hkv: int, head_dim: int, elem: int) -> int:
    """HBM bytes one decode attention call must move (K and V of every context, q and out)."""
    return num_seqs * (2 * context * hkv * head_dim + 2 * hq * head_dim) * elem


__all__ = ["decode_attention", "choose_split_len", "decode_bytes"]

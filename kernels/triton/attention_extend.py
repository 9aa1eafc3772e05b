"""Paged extend (prefill) attention for a ragged batch: causal, after a cached prefix.

Sequence s brings ``q_len = query_start_loc[s+1] - query_start_loc[s]`` new tokens whose K/V
are already written; its context holds ``seq_len = seq_lens[s]`` tokens, so new token i sits
at position ``prefix + i`` with ``prefix = seq_len - q_len`` and sees keys ``0 .. prefix + i``::

    keys:    0 ........ prefix-1 | prefix ........ seq_len-1
             cached (all rows see) | new: causal triangle
    rows:                          q0 q1 ... q(q_len-1)

Grid ``(cdiv(max_query_len, BLOCK_M), S, Hkv)``: a program takes BLOCK_M query tokens of one
sequence and all G query heads of one KV head, as ``BLOCK_M * G_PAD`` rows of one tile (row r
is token ``r // G_PAD``, head ``r % G_PAD``), so each K/V tile is loaded once for the whole
group. Keys before the first row's position need no mask; the rest go through a causal mask.
Decode rows (q_len == 1) of a mixed batch are just short sequences here.

An fp8 (e4m3) cache holds K/V at scale 1.0 (see kv_write.py); tiles are widened to q's dtype
before the dots, so q is never rounded to fp8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zeroserve.kernels.triton._common import FP32_DOT, dot_in_fp32, last_dim_contiguous, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    q,
    acc,
    m_i,
    l_i,
    k_cache_ptr,
    v_cache_ptr,
    table_row,
    kv_head,
    tile,
    q_pos,
    kv_limit,
    d,
    d_mask,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    scale_log2e,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Online-softmax update of (acc, m_i, l_i) with keys ``tile .. tile + BLOCK_N``."""
    pos = tile + tl.arange(0, BLOCK_N)
    p_mask = pos < kv_limit
    block = tl.load(table_row + pos // PAGE_SIZE, mask=p_mask, other=0).to(tl.int64)
    in_block = (pos % PAGE_SIZE).to(tl.int64)
    kv_mask = p_mask[:, None] & d_mask[None, :]
    k_off = block * stride_kb + in_block * stride_kt + kv_head * stride_kh
    k = tl.load(k_cache_ptr + k_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    if DOT_F32:
        qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=FP32_DOT)
    else:
        qk = tl.dot(q, tl.trans(k.to(q.dtype)))  # no-op unless the cache is e4m3
    qk = qk * scale_log2e
    if MASKED:
        allowed = (pos[None, :] <= q_pos[:, None]) & p_mask[None, :]
        qk = tl.where(allowed, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(qk - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v_off = block * stride_vb + in_block * stride_vt + kv_head * stride_vh
    v = tl.load(v_cache_ptr + v_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    if DOT_F32:
        pv = tl.dot(p, v.to(tl.float32), input_precision=FP32_DOT)
    else:
        pv = tl.dot(p.to(q.dtype), v.to(q.dtype))
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _extend_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    scale_log2e,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    m_block = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len
    m_start = m_block * BLOCK_M

    ROWS: tl.constexpr = BLOCK_M * GROUP_PAD
    r = tl.arange(0, ROWS)
    tok = m_start + r // GROUP_PAD
    g = r % GROUP_PAD
    row_ok = (tok < q_len) & (g < GROUP)
    d = tl.arange(0, D_PAD)
    d_mask = d < HEAD_DIM
    heads = kv_head * GROUP + g
    io_mask = row_ok[:, None] & d_mask[None, :]

    q_off = (q_start + tok).to(tl.int64) * stride_qt + heads * stride_qh
    q = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=io_mask, other=0.0).to(tl.float32)
    if not DOT_F32:
        # the dots run in the cache's dtype, or in q's when the cache is e4m3 (widened per tile)
        q = q.to(q_ptr.dtype.element_ty if KV_FP8 else k_cache_ptr.dtype.element_ty)
    q_pos = prefix + tok  # absolute position of each row's token

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D_PAD], tl.float32)
    table_row = block_tables_ptr + seq * stride_bt

    # keys every row of this tile sees: no mask, whole tiles only
    last_row_pos = prefix + tl.minimum(m_start + BLOCK_M, q_len)  # one past the furthest key
    kv_end = tl.where(m_start < q_len, last_row_pos, 0)
    free_end = tl.where(m_start < q_len, (prefix + m_start) // BLOCK_N * BLOCK_N, 0)
    for tile in range(0, free_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q,
            acc,
            m_i,
            l_i,
            k_cache_ptr,
            v_cache_ptr,
            table_row,
            kv_head,
            tile,
            q_pos,
            kv_end,
            d,
            d_mask,
            stride_kb,
            stride_kt,
            stride_kh,
            stride_vb,
            stride_vt,
            stride_vh,
            scale_log2e,
            PAGE_SIZE,
            BLOCK_N,
            False,
            DOT_F32,
        )
    # the causal edge (and the sequence's end)
    for tile in range(free_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q,
            acc,
            m_i,
            l_i,
            k_cache_ptr,
            v_cache_ptr,
            table_row,
            kv_head,
            tile,
            q_pos,
            kv_end,
            d,
            d_mask,
            stride_kb,
            stride_kt,
            stride_kh,
            stride_vb,
            stride_vt,
            stride_vh,
            scale_log2e,
            PAGE_SIZE,
            BLOCK_N,
            True,
            DOT_F32,
        )

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_off = (q_start + tok).to(tl.int64) * stride_ot + heads * stride_oh
    tl.store(out_ptr + o_off[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)


def extend_tile_rows(group: int) -> tuple[int, int]:
    """(BLOCK_M tokens, G_PAD heads) per program: about 64 rows per tile in total."""
    group_pad = next_pow2(group)
    return max(1, 64 // group_pad), group_pad


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    block_n: int | None = None,
) -> torch.Tensor:
    """q: [T, Hq, D] flat ragged batch -> [T, Hq, D]; see the module docstring for layout.

    query_start_loc: [S+1] int32; seq_lens: [S] int32; block_tables: [S, W] int32.
    """
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn
    fp32 = dot_in_fp32(q.dtype if kv_fp8 else k_cache.dtype)
    if block_n is None:
        # fp32 tiles are twice the bytes and 3xTF32 triples the dot's temporaries: a narrower
        # key tile and no pipelining keep shared memory within sm_80's 163 KiB
        block_n = 32 if fp32 else 64
    num_tokens, hq, head_dim = q.shape
    _, page_size, hkv, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0 or max_query_len == 0:
        return out
    q = last_dim_contiguous(q)
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "KV cache needs a contiguous head dim"
    assert block_tables.stride(-1) == 1, "block table rows must be contiguous"
    group = hq // hkv
    block_m, group_pad = extend_tile_rows(group)
    grid = (triton.cdiv(max_query_len, block_m), num_seqs, hkv)
    _extend_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        query_start_loc,
        seq_lens,
        block_tables,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        D_PAD=max(16, next_pow2(head_dim)),
        PAGE_SIZE=page_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_F32=fp32,
        KV_FP8=kv_fp8,
        num_warps=4,
        num_stages=1 if fp32 else 2,
    )
    return out

"""Neox-style rotary embedding (Hugging Face's rotate_half) on q and k in one launch.

Grid ``(T,)``: one program rotates every query and key head of one token. The cos/sin cache
is ``[max_pos, D]`` fp32 with cos in the first D/2 columns and sin in the last D/2::

    x = [x1 | x2]  ->  [x1*cos - x2*sin | x2*cos + x1*sin]   (in fp32, rounded once)

q and k may be strided views (e.g. slices of one fused qkv projection); outputs are new,
contiguous tensors in the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zeroserve.kernels.triton._common import last_dim_contiguous, next_pow2


@triton.jit
def _rotate_heads(
    x_ptr,
    o_ptr,
    t,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    cos,
    sin,
    NUM_HEADS: tl.constexpr,
    H_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    h = tl.arange(0, H_PAD)
    j = tl.arange(0, HALF_PAD)
    mask = (h[:, None] < NUM_HEADS) & (j[None, :] < HALF)
    src = x_ptr + t * stride_xt + h[:, None] * stride_xh + j[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = o_ptr + t * stride_ot + h[:, None] * stride_oh + j[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    cos_sin_ptr,
    q_out_ptr,
    k_out_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_oqt,
    stride_oqh,
    stride_okt,
    stride_okh,
    stride_cache,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    HQ_PAD: tl.constexpr,
    HKV_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    j = tl.arange(0, HALF_PAD)
    row = cos_sin_ptr + pos * stride_cache
    cos = tl.load(row + j, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(row + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(
        q_ptr,
        q_out_ptr,
        t,
        stride_qt,
        stride_qh,
        stride_oqt,
        stride_oqh,
        cos,
        sin,
        HQ,
        HQ_PAD,
        HALF,
        HALF_PAD,
    )
    _rotate_heads(
        k_ptr,
        k_out_ptr,
        t,
        stride_kt,
        stride_kh,
        stride_okt,
        stride_okh,
        cos,
        sin,
        HKV,
        HKV_PAD,
        HALF,
        HALF_PAD,
    )


def rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [T] int; q: [T, Hq, D]; k: [T, Hkv, D]; cos_sin_cache: [max_pos, D] fp32."""
    num_tokens, hq, head_dim = q.shape
    hkv = k.shape[1]
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    cache = last_dim_contiguous(cos_sin_cache)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            positions,
            q,
            k,
            cache,
            q_out,
            k_out,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            q_out.stride(0),
            q_out.stride(1),
            k_out.stride(0),
            k_out.stride(1),
            cache.stride(0),
            HQ=hq,
            HKV=hkv,
            HQ_PAD=next_pow2(hq),
            HKV_PAD=next_pow2(hkv),
            HALF=half,
            HALF_PAD=next_pow2(half),
            num_warps=4,
        )
    return q_out, k_out

"""KV-cache write: token t's keys and values go to flat slot ``slot_mapping[t]``.

Grid ``(T,)``; one program copies one token's ``[Hkv, D]`` keys and values. The flat slot is
``block * bs + offset`` of the ``[N, bs, Hkv, D]`` cache; slot -1 marks a padding token (a
CUDA-graph bucket's filler row) and writes nothing. Offsets are int64: a large cache has
more than 2**31 elements.

An fp8 cache (``--kv-cache-dtype fp8``, float8_e4m3fn) stores K and V with a fixed scale of
1.0, vLLM's default without calibrated scales: values are clamped to e4m3's +-448 and rounded
to nearest (3 mantissa bits: within 2^-4 of the value, or 2^-10 absolute below 2^-6), and the
attention kernels read them back as they are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zeroserve.kernels.triton._common import last_dim_contiguous, next_pow2
from zeroserve.kernels.triton.fp8 import E4M3_MAX, FP8_DTYPE, e4m3_round


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ck_slot,
    stride_ck_head,
    stride_cv_slot,
    stride_cv_head,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    H_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    h = tl.arange(0, H_PAD)
    d = tl.arange(0, D_PAD)
    mask = (h[:, None] < NUM_HEADS) & (d[None, :] < HEAD_DIM) & (slot >= 0)
    t = token.to(tl.int64)
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    ck = k_cache_ptr + slot * stride_ck_slot + h[:, None] * stride_ck_head + d[None, :]
    cv = v_cache_ptr + slot * stride_cv_slot + h[:, None] * stride_cv_head + d[None, :]
    # through fp32: the interpreter only converts bf16 correctly to and from fp32
    k = k.to(tl.float32)
    v = v.to(tl.float32)
    if FP8_MAX > 0:  # an e4m3 cache: saturate (an overflowing cast is NaN), round on the grid
        k = e4m3_round(tl.minimum(tl.maximum(k, -FP8_MAX), FP8_MAX))
        v = e4m3_round(tl.minimum(tl.maximum(v, -FP8_MAX), FP8_MAX))
    tl.store(ck, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(cv, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v: [T, Hkv, D]; caches [N, bs, Hkv, D]; slot_mapping: [T] int64 (-1 = skip)."""
    num_tokens, hkv, head_dim = k.shape
    if num_tokens == 0:
        return
    k, v = last_dim_contiguous(k), last_dim_contiguous(v)
    # (N, bs) collapse to one slot axis only when bs and N are laid out back to back
    assert k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1), "k_cache blocks must be dense"
    assert v_cache.stride(0) == v_cache.shape[1] * v_cache.stride(1), "v_cache blocks must be dense"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "KV cache needs a contiguous head dim"
    _write_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_HEADS=hkv,
        HEAD_DIM=head_dim,
        H_PAD=next_pow2(hkv),
        D_PAD=next_pow2(head_dim),
        FP8_MAX=E4M3_MAX if k_cache.dtype == FP8_DTYPE else 0.0,
        num_warps=4 if hkv * head_dim >= 2048 else 2,
    )

"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer.

Grid ``(T,)``: one program per row of H features (the whole row in one tile; H <= 32768).
Rounding follows the torch reference (Hugging Face): the sum ``x + residual`` is rounded to
the input dtype (it *is* the new residual), normalized in fp32, rounded to the input dtype,
then multiplied by the weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zeroserve.kernels.triton._common import last_dim_contiguous, next_pow2


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    hidden,
    eps,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
        x = x.to(tl.float32)
    mean_sq = tl.sum(x * x, 0) / hidden
    normed = x * tl.rsqrt(mean_sq + eps)
    normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)  # HF casts back before the weight
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x: [T, H] (or [..., H]), weight: [H]. With residual: returns (normed, x + residual)."""
    shape = x.shape
    hidden = shape[-1]
    x2 = last_dim_contiguous(x.reshape(-1, hidden))
    rows = x2.shape[0]
    out = torch.empty((rows, hidden), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if residual is not None:
        r2 = last_dim_contiguous(residual.reshape(-1, hidden))
        residual_out = torch.empty(
            (rows, hidden), dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device
        )
    else:
        r2 = residual_out = x2  # unused placeholders
    if rows:
        block = next_pow2(hidden)
        _rms_norm_kernel[(rows,)](
            x2,
            r2,
            weight,
            out,
            residual_out,
            x2.stride(0),
            r2.stride(0),
            out.stride(0),
            residual_out.stride(0),
            hidden,
            eps,
            BLOCK=block,
            HAS_RESIDUAL=residual is not None,
            num_warps=min(16, max(1, block // 512)),
        )
    out = out.view(shape)
    return out if residual is None else (out, residual_out.view(shape))

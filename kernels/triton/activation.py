"""SiLU-and-multiply of the MLP: ``x = [gate | up]`` -> ``silu(gate) * up``.

Grid ``(T, cdiv(I, BLOCK))``. As in torch, silu(gate) is rounded to the input dtype before
the multiply, so bf16 results match the reference bit for bit in most elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zeroserve.kernels.triton._common import last_dim_contiguous, next_pow2


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2I] -> [..., I]."""
    inter = x.shape[-1] // 2
    x2 = last_dim_contiguous(x.reshape(-1, x.shape[-1]))
    rows = x2.shape[0]
    out = torch.empty((rows, inter), dtype=x.dtype, device=x.device)
    if rows and inter:
        block = min(1024, next_pow2(inter))
        _silu_and_mul_kernel[(rows, triton.cdiv(inter, block))](
            x2,
            out,
            x2.stride(0),
            out.stride(0),
            inter,
            BLOCK=block,
            num_warps=4,
        )
    return out.view(*x.shape[:-1], inter)

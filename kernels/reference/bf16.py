"""The reference bf16-weight projection (mode "bf16"): W rounded to bf16 once, x rounded to bf16
per call, oneDNN's bf16 linear (vLLM's CPU path) where this torch has it, else ``F.linear`` on
bf16; the output comes back as fp32 (it was rounded to bf16 on the way), the bias added in fp32.

The oracle of kernels/cpu/bf16.py (which sums into fp32 without rounding the output), and the
CPU backend's bf16 projection where that kernel does not run (no avx512_bf16).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from zeroserve.kernels.base import LinearHandle

__all__ = ["Bf16DenseLinear", "bf16_dense_linear", "onednn_bf16_available"]

BF16 = torch.bfloat16


@functools.cache
def onednn_bf16_available() -> bool:
    """Whether this torch build runs oneDNN's packed bf16 linear on this CPU (and gets it right)."""
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        w, x = torch.randn(8, 4).to(BF16), torch.randn(3, 4).to(BF16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(out.float(), F.linear(x.float(), w.float()), rtol=1e-2, atol=1e-2))
    except (AttributeError, RuntimeError):
        return False


class Bf16DenseLinear(LinearHandle):
    """W [N, K] rounded to bf16 (to nearest even): in oneDNN's blocked layout on a CPU that
    runs it, else the plain bf16 tensor. The bias stays fp32. No fp32 copy of W is kept."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        if weight.dim() != 2:
            raise ValueError(f"Bf16DenseLinear takes a 2-D weight, not {tuple(weight.shape)}")
        w = weight.detach().to(BF16).contiguous()
        self.out_features, self.in_features = w.shape
        self.onednn = w.device.type == "cpu" and onednn_bf16_available()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, None) if self.onednn else w
        self.bias = None if bias is None else bias.detach().float()


def bf16_dense_linear(x: torch.Tensor, handle: Bf16DenseLinear) -> torch.Tensor:
    """x [M, K] (any float dtype) -> fp32 [M, N] = bf16(bf16(x) @ W^T) + bias."""
    xb = x.to(BF16)
    if handle.onednn:
        y = torch.ops.mkldnn._linear_pointwise(xb.contiguous(), handle.weight, None, "none", [], "")
    else:
        y = F.linear(xb, handle.weight)
    y = y.float()
    if handle.bias is not None:
        y += handle.bias
    return y

"""The C++ CPU backend: kernels/cpu/ops.py behind the kernel interface.

Every model op, the projections and the greedy argmax run in the compiled kernels (each op
itself falls back to the reference for a dtype or layout they do not take). Inherited from the
torch backend, because there is nothing to gain in C++: the sampling filter (a ``topk`` over a
few rows, already multi-threaded in torch), and the projections of weights that are not fp32
(oneDNN or ``F.linear``).
"""

from __future__ import annotations

import torch

from zeroserve.kernels.base import LinearHandle
from zeroserve.kernels.cpu import ops
from zeroserve.kernels.reference.backend import ReferenceKernels

__all__ = ["CpuKernels"]


class CpuKernels(ReferenceKernels):
    name = "cpu"

    rms_norm = staticmethod(ops.rms_norm)
    rotary = staticmethod(ops.rotary)
    silu_and_mul = staticmethod(ops.silu_and_mul)
    write_kv = staticmethod(ops.write_kv)
    paged_attention = staticmethod(ops.paged_attention)
    argmax_rows = staticmethod(ops.argmax_rows)

    def __init__(self, quantization: str = "none"):
        super().__init__(quantization)
        self.linear_kernels[ops.PackedLinear] = ops.linear

    def prepare_dense(self, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearHandle:
        """fp32 weights are packed into the panels of the C++ GEMM (faster than oneDNN here at
        every batch size, and bit-identical to it for K <= ~1K)."""
        if (
            weight.device.type == "cpu"
            and weight.dtype == torch.float32
            and weight.dim() == 2
            and (bias is None or bias.dtype == torch.float32)
        ):
            return ops.PackedLinear(weight, bias)
        return super().prepare_dense(weight, bias)

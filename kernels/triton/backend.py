"""The Triton backend (NVIDIA GPUs): kernels/triton/ops.py and the sampling filter of
sampling.py behind the kernel interface.

Inherited from the torch backend: the projections (``F.linear``, i.e. cuBLAS, over the weight
as it is; interpreted on a CPU in tests, oneDNN's fp32 path as the torch backend's) and the
greedy argmax (torch's is one launch on a GPU already). ``--quantization fp8``: e4m3 weights
and per-token e4m3 activations (kernels/triton/fp8.py), on GPUs of compute capability 8.9+.
"""

from __future__ import annotations

import torch

from zeroserve.kernels.base import LinearHandle
from zeroserve.kernels.reference.backend import ReferenceKernels
from zeroserve.kernels.reference.bitmask import apply_token_bitmask, check_token_bitmask
from zeroserve.kernels.triton import ops
from zeroserve.kernels.triton._common import interpreting
from zeroserve.kernels.triton.fp8 import Fp8Linear, fp8_linear, require_fp8_device
from zeroserve.kernels.triton.sampling import top_k_top_p_min_p_filter

__all__ = ["TritonKernels"]


class TritonKernels(ReferenceKernels):
    name = "triton"

    rms_norm = staticmethod(ops.rms_norm)
    rotary = staticmethod(ops.rotary)
    silu_and_mul = staticmethod(ops.silu_and_mul)
    write_kv = staticmethod(ops.write_kv)
    paged_attention = staticmethod(ops.paged_attention)

    def __init__(self, quantization: str = "none"):
        super().__init__(quantization)
        self.linear_kernels[Fp8Linear] = fp8_linear

    def prepare_fp8(self, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearHandle:
        """e4m3 weight, per-output-channel scales: ``torch._scaled_mm`` or the Triton GEMM. A GPU
        below compute capability 8.9 is a ValueError; so is a CPU, except under the interpreter
        (the kernel tests)."""
        if weight.device.type == "cuda":
            require_fp8_device(weight.device)
        elif not interpreting():
            return super().prepare_fp8(weight, bias)
        return Fp8Linear(weight, bias)

    def sampling_filter(
        self,
        logits: torch.Tensor,
        temperature: torch.Tensor | None,
        min_p: torch.Tensor | None,
        top_k: torch.Tensor | None,
        top_p: torch.Tensor | None,
        max_top_k: int | None = None,
    ) -> torch.Tensor:
        """One fused launch, by bisection instead of a sort: no device sync (the reference's
        top-p syncs to find rows wider than its candidates), so max_top_k is not needed."""
        if temperature is None and min_p is None and top_k is None and top_p is None:
            return logits
        return top_k_top_p_min_p_filter(logits, top_k, top_p, min_p, temperature)

    def apply_token_bitmask(
        self, logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None
    ) -> None:
        """On a GPU, xgrammar's Triton kernel (one launch); its ``indices`` pick the same row of
        logits and bitmask, so a packed bitmask is first spread to the logits' rows (all ones
        elsewhere). Elsewhere (the interpreter, or no xgrammar), the torch reference."""
        cols = check_token_bitmask(logits, bitmask, rows)
        if logits.device.type != "cuda" or logits.stride(1) != 1 or bitmask.shape[0] == 0 or cols == 0:
            return apply_token_bitmask(logits, bitmask, rows)
        try:
            import xgrammar as xgr
        except ImportError:
            return apply_token_bitmask(logits, bitmask, rows)
        if rows is not None:
            rows = rows.to(device=logits.device, dtype=torch.int64)
            spread = bitmask.new_full((logits.shape[0], bitmask.shape[1]), -1)
            bitmask = spread.index_copy_(0, rows, bitmask)
        else:
            bitmask = bitmask.contiguous()  # its kernel reads the row stride as the row's width
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=cols, indices=rows)
        return None

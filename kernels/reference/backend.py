"""The torch backend: the reference ops (ops.py, sampling.py) behind the kernel interface.

Runs on any device; the oracle of the kernel tests, and the CPU serving path where the C++
kernels cannot be built. Projections: on a CPU in fp32, W is reordered once into oneDNN's
blocked layout (MKL's sgemm, behind ``F.linear``, repacks W on every call, and at decode sizes,
e.g. the 49152 x 576 lm_head with a few rows, spends more on that than on the multiply);
anywhere else ``F.linear`` reads W as it is (cuBLAS on a GPU).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from zeroserve.kernels.base import DenseLinear, KernelBackend, LinearHandle
from zeroserve.kernels.quantized import GGUFWeight
from zeroserve.kernels.reference import ops, sampling
from zeroserve.kernels.reference.bf16 import Bf16DenseLinear, bf16_dense_linear
from zeroserve.kernels.reference.bitmask import apply_token_bitmask
from zeroserve.kernels.reference.int8 import Int8Linear, int8_linear

__all__ = ["OneDNNLinear", "ReferenceKernels", "onednn_linear_available"]


class OneDNNLinear(LinearHandle):
    """W reordered into oneDNN's blocked layout (a copy: the original can be dropped)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self.bias = bias


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this torch build runs oneDNN's packed fp32 linear (and gets it right)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w, x = torch.randn(8, 4), torch.randn(3, 4)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(out, F.linear(x, w), atol=1e-5))
    except (AttributeError, RuntimeError):
        return False


class ReferenceKernels(KernelBackend):
    name = "torch"

    rms_norm = staticmethod(ops.rms_norm)
    rotary = staticmethod(ops.rotary)
    silu_and_mul = staticmethod(ops.silu_and_mul)
    write_kv = staticmethod(ops.write_kv)
    paged_attention = staticmethod(ops.paged_attention)

    def __init__(self, quantization: str = "none"):
        super().__init__(quantization)
        # handle class -> the function that runs it; each backend adds the handles it makes
        self.linear_kernels: dict[type[LinearHandle], Callable[[torch.Tensor, Any], torch.Tensor]] = {
            DenseLinear: lambda x, h: F.linear(x, h.weight, h.bias),
            OneDNNLinear: lambda x, h: torch.ops.mkldnn._linear_pointwise(
                x, h.packed, h.bias, "none", [], ""
            ),
            Int8Linear: int8_linear,
            Bf16DenseLinear: bf16_dense_linear,
        }

    def prepare_linear(self, weight: torch.Tensor | GGUFWeight, bias: torch.Tensor | None) -> LinearHandle:
        """By the weight's kind, then the backend's quantization mode: a GGUFWeight goes to
        prepare_gguf; a float weight to prepare_int8 / prepare_fp8 / prepare_bf16 in those modes, else
        prepare_dense. Subclasses override the step they do differently."""
        if isinstance(weight, GGUFWeight):
            return self.prepare_gguf(weight, bias)
        if self.quantization == "int8" and weight.dim() == 2 and weight.dtype == torch.float32:
            return self.prepare_int8(weight, bias)
        if self.quantization == "fp8" and weight.dim() == 2:
            return self.prepare_fp8(weight, bias)
        if self.quantization == "bf16" and weight.dim() == 2 and weight.is_floating_point():
            return self.prepare_bf16(weight, bias)
        return self.prepare_dense(weight, bias)

    def prepare_dense(self, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearHandle:
        if weight.device.type == "cpu" and weight.dtype == torch.float32 and onednn_linear_available():
            return OneDNNLinear(weight, bias)
        return DenseLinear(weight, bias)

    def prepare_gguf(self, weight: GGUFWeight, bias: torch.Tensor | None) -> LinearHandle:
        """The torch reference of a GGUF linear: the file's values dequantized to fp32 (the
        oracle the block kernels are tested against; the fallback where there is none)."""
        return self.prepare_dense(weight.dequantize().to(weight.data.device), bias)

    def prepare_int8(self, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearHandle:
        """int8 weights per output channel, x per token at run time (its two largest channels
        kept in fp32), torch._int_mm: kernels/reference/int8.py."""
        return Int8Linear(weight, bias)

    def prepare_bf16(self, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearHandle:
        """W rounded to bf16 (no fp32 copy kept), x rounded to bf16 per call: oneDNN's bf16
        linear where torch has it, else F.linear on bf16; y comes back as fp32."""
        return Bf16DenseLinear(weight, bias)

    def prepare_fp8(self, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearHandle:
        raise ValueError(
            f"--quantization fp8 needs an NVIDIA GPU of compute capability 8.9 or newer (the {self.name} "
            "kernels have no fp8 projection); on a CPU use int8 or q4"
        )

    def linear(self, x: torch.Tensor, handle: LinearHandle) -> torch.Tensor:
        run = self.linear_kernels.get(type(handle))
        if run is None:
            raise TypeError(f"the {self.name} kernels cannot run {type(handle).__name__} handles")
        return run(x, handle)

    def argmax_rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.argmax(dim=-1)

    def sampling_filter(
        self,
        logits: torch.Tensor,
        temperature: torch.Tensor | None,
        min_p: torch.Tensor | None,
        top_k: torch.Tensor | None,
        top_p: torch.Tensor | None,
        max_top_k: int | None = None,
    ) -> torch.Tensor:
        return sampling.filter_logits(logits, temperature, min_p, top_k, top_p, max_top_k)

    apply_token_bitmask = staticmethod(apply_token_bitmask)

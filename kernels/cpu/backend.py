"""The C++ CPU backend: kernels/cpu/ops.py behind the kernel interface.

Every model op, the projections, the greedy argmax and the grammar's token bitmask run in the
compiled kernels (each op itself falls back to the reference for a dtype or layout they do not
take). Inherited from the torch backend, because there is nothing to gain in C++: the sampling
filter (a ``topk`` over a few rows, already multi-threaded in torch), and the projections of
weights that are not fp32 (oneDNN or ``F.linear``).
"""

from __future__ import annotations

import logging

import torch

from zeroserve.kernels.base import LinearHandle
from zeroserve.kernels.cpu import bf16, gguf, int8, ops
from zeroserve.kernels.quantized import GGUFWeight
from zeroserve.kernels.reference.backend import ReferenceKernels

__all__ = ["CpuKernels"]

log = logging.getLogger(__name__)
_dequantized_types: set[str] = set()  # GGUF types served dequantized, logged once each


class CpuKernels(ReferenceKernels):
    name = "cpu"

    rms_norm = staticmethod(ops.rms_norm)
    rotary = staticmethod(ops.rotary)
    silu_and_mul = staticmethod(ops.silu_and_mul)
    embedding = staticmethod(ops.embedding)
    write_kv = staticmethod(ops.write_kv)
    paged_attention = staticmethod(ops.paged_attention)
    argmax_rows = staticmethod(ops.argmax_rows)
    apply_token_bitmask = staticmethod(ops.apply_token_bitmask)

    def __init__(self, quantization: str = "none"):
        super().__init__(quantization)
        self.linear_kernels[ops.PackedLinear] = ops.linear
        self.linear_kernels[gguf.GGUFLinear] = gguf.gguf_linear
        self.linear_kernels[int8.CpuInt8Linear] = int8.cpu_int8_linear
        self.linear_kernels[bf16.Bf16Linear] = bf16.bf16_linear

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

    def prepare_int8(self, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearHandle:
        """The VNNI kernel (csrc/int8_gemm.cpp), measured faster than torch._int_mm + dequant
        at every SmolLM2 shape and batch (benchmarks/bench_int8.py); where the CPU has no VNNI,
        the library path (int8.why_not() says why)."""
        if weight.device.type == "cpu" and int8.vnni_available():
            return int8.CpuInt8Linear(weight, bias)
        return super().prepare_int8(weight, bias)

    def prepare_bf16(self, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearHandle:
        """The AVX512-BF16 panel GEMM (csrc/bf16_gemm.cpp): faster than oneDNN's bf16 linear
        here at the SmolLM2 shapes and batches (benchmarks/bench_bf16.py), and y is not rounded
        to bf16; where the CPU has no avx512_bf16, the reference (bf16.why_not() says why)."""
        if weight.device.type == "cpu" and bf16.bf16_available():
            return bf16.Bf16Linear(weight, bias)
        return super().prepare_bf16(weight, bias)

    def prepare_gguf(self, weight: GGUFWeight, bias: torch.Tensor | None) -> LinearHandle:
        """GGUF weights stay in their blocks where there is a kernel for the type
        (gguf.GGUF_KERNEL_TYPES: int8 activations x 4/8-bit blocks); other types are served
        dequantized to fp32 (the reference), said once per type."""
        if weight.ggml_type in gguf.GGUF_KERNEL_TYPES and weight.data.device.type == "cpu":
            return gguf.GGUFLinear(weight, bias)
        if weight.type_name not in _dequantized_types:
            _dequantized_types.add(weight.type_name)
            log.info(
                "no CPU kernel for GGUF %s weights (e.g. a [%d, %d] one): they are served dequantized "
                "to fp32",
                weight.type_name,
                *weight.shape,
            )
        return super().prepare_gguf(weight, bias)

"""Projections with bf16 weights and fp32 activations (mode "bf16"): csrc/bf16_gemm.cpp.

    handle = Bf16Linear(weight, bias)   # W [N, K] fp32 or bf16 -> bf16 panels (the only copy)
    y = bf16_linear(x, handle)          # x [M, K] fp32 -> y [M, N] fp32

W is rounded to bf16 once; x is rounded to bf16 inside the kernel (to nearest even, as
``x.bfloat16()``), products are exact in fp32 and summed in fp32, the output stays fp32 (no
rounding of y, unlike oneDNN's bf16 linear, whose output is bf16). Half the bytes of fp32
weights to stream at decode, twice the multiply-adds per instruction (vdpbf16ps) in prefill.

The kernel needs AVX512-BF16; ``bf16_available()`` says whether this machine runs it and
``why_not()`` why not (the CPU backend then serves mode "bf16" through oneDNN, the reference).
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from zeroserve.kernels.base import LinearHandle
from zeroserve.kernels.cpu import build

__all__ = ["Bf16Linear", "bf16_available", "bf16_linear", "load_library", "why_not"]

PANEL = 16  # output columns per panel (csrc kBf16Panel)
F32, BF16 = torch.float32, torch.bfloat16


@functools.cache
def load_library(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The CPU kernels' library with this module's functions typed; raises CpuKernelsUnavailable.
    ``extra_flags``: a variant build (the tests run ``-DZS_SCALAR``, the portable loops)."""
    lib = build.load(extra_flags)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.zs_bf16_vectorized.restype = ctypes.c_int
    lib.zs_bf16_vectorized.argtypes = []
    lib.zs_bf16_linear.restype = None
    lib.zs_bf16_linear.argtypes = [p, i64, p, p, p, i64, i64, i64]
    return lib


def _cpu_has(flag: str) -> bool:
    return flag in build._cpu_flags().split()


@functools.cache
def why_not() -> str:
    """Why the AVX512-BF16 kernel does not serve here ("" where it does)."""
    try:
        lib = load_library()
    except build.CpuKernelsUnavailable as exc:
        return f"the C++ CPU kernels are unavailable: {exc}"
    if lib.zs_bf16_vectorized():
        return ""
    if not _cpu_has("avx512_bf16"):
        return "this CPU has no avx512_bf16 (bf16 dot products)"
    return "the compiler built the CPU kernels without AVX512-BF16 (-march=native did not enable it)"


def bf16_available() -> bool:
    """Whether this machine runs the AVX512-BF16 kernel."""
    return why_not() == ""


class Bf16Linear(LinearHandle):
    """W [N, K] rounded to bf16 (to nearest even) and packed as the kernel reads it::

        panels [ceil(N / 16), ceil(K / 2), 16, 2] bf16   [p, k, j, i] = W[16p + j, 2k + i]

    zero-padded past N and K: one 64-byte line per (panel, k-pair), a vdpbf16ps operand. The
    bias stays fp32, padded to the panels. No fp32 copy of W is kept."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        if weight.dim() != 2 or weight.dtype not in (F32, BF16) or weight.device.type != "cpu":
            raise ValueError("Bf16Linear takes an fp32 or bf16 [N, K] CPU weight")
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
            raise ValueError(
                f"Bf16Linear: bias of shape {tuple(bias.shape)} for a weight of {tuple(weight.shape)}"
            )
        self.out_features, self.in_features = n, k = weight.shape
        panels, pairs = -(-n // PANEL), -(-k // 2)
        w = F.pad(weight.detach().to(BF16), (0, 2 * pairs - k, 0, panels * PANEL - n))
        self.panels = w.view(panels, PANEL, pairs, 2).permute(0, 2, 1, 3).contiguous()
        self.bias = None
        if bias is not None:
            self.bias = F.pad(bias.detach().to(F32), (0, panels * PANEL - n)).contiguous()


def bf16_linear(x: torch.Tensor, handle: Bf16Linear, *, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, K] -> fp32 [M, N] = bf16(x) @ W^T + bias, summed in fp32."""
    if x.dim() != 2 or x.shape[1] != handle.in_features:
        raise ValueError(
            f"bf16_linear: input of shape {tuple(x.shape)} for a [{handle.out_features}, "
            f"{handle.in_features}] weight"
        )
    if x.dtype != F32 or x.device.type != "cpu" or x.stride(1) != 1:
        x = x.to(device="cpu", dtype=F32).contiguous()
    out = torch.empty((x.shape[0], handle.out_features), dtype=F32)
    if x.shape[0]:
        (lib or load_library()).zs_bf16_linear(
            x.data_ptr(),
            x.stride(0),
            handle.panels.data_ptr(),
            None if handle.bias is None else handle.bias.data_ptr(),
            out.data_ptr(),
            x.shape[0],
            handle.out_features,
            handle.in_features,
        )
    return out

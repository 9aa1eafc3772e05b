"""The int8 W8A8 projection in C++ (csrc/int8_gemm.cpp, AVX512-VNNI), beside the library one.

The weight is quantized exactly as the reference does it (kernels/reference/int8.py,
``quantize_rows``), then packed once into the kernel's panels; each call quantizes x per token,
multiplies in int32 with ``vpdpbusd`` and scales back, in one pass. Where the CPU has no VNNI
(or the library cannot be built) ``vnni_available()`` is False, ``why_not()`` says why, and the
CPU backend serves int8 through ``torch._int_mm`` instead.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from zeroserve.kernels.base import LinearHandle
from zeroserve.kernels.cpu import build
from zeroserve.kernels.reference.int8 import quantize_rows

__all__ = ["CpuInt8Linear", "cpu_int8_linear", "vnni_available", "why_not"]

COLS, KSTEP = 16, 4  # csrc/int8_gemm.cpp: 16-column panels, K in steps of 4
F32 = torch.float32


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.zs_i8_vnni.restype = ctypes.c_int
    lib.zs_i8_vnni.argtypes = []
    lib.zs_i8_pack.restype = None
    lib.zs_i8_pack.argtypes = [p, i64, i64, p, p]
    lib.zs_i8_linear.restype = None
    lib.zs_i8_linear.argtypes = [p, i64, i64, i64, p, p, p, p, p, i64]
    return lib


@functools.cache
def library(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The kernels' library (one build per flags), with this module's argtypes set."""
    return _bind(build.load(extra_flags))


@functools.cache
def why_not() -> str:
    """Why the C++ int8 kernel is not used on this machine ("" when it is)."""
    try:
        lib = library()
    except build.CpuKernelsUnavailable as exc:
        return f"the C++ CPU kernels are unavailable ({exc})"
    if not lib.zs_i8_vnni():
        return (
            "this CPU has no AVX512-VNNI (avx512_vnni with avx512bw), which the C++ int8 kernel needs; "
            "int8 runs through torch._int_mm"
        )
    return ""


def vnni_available() -> bool:
    return why_not() == ""


def _padded(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if t is None:
        return None
    out = torch.zeros(n, dtype=F32)
    out[: t.numel()] = t.detach().to(F32)
    return out


class CpuInt8Linear(LinearHandle):
    """W [N, K] quantized per output channel (as reference Int8Linear) and packed for the
    VNNI kernel: ``packed`` int8 panels, ``comp`` int32 = 128 x row sums, ``scale`` and
    ``bias`` fp32 padded to whole panels. No fp32 copy of W is kept."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, lib: ctypes.CDLL | None = None):
        if weight.dim() != 2 or not weight.dtype.is_floating_point:
            raise ValueError(
                f"CpuInt8Linear takes a float [N, K] weight, not {weight.dtype} {tuple(weight.shape)}"
            )
        self.lib = library() if lib is None else lib
        self.out_features, self.in_features = n, k = weight.shape
        qweight, scale = quantize_rows(weight.detach().to(F32).cpu())
        padded_n = -(-n // COLS) * COLS
        self.packed = torch.empty(padded_n * (-(-k // KSTEP) * KSTEP), dtype=torch.int8)
        self.comp = torch.empty(padded_n, dtype=torch.int32)
        self.lib.zs_i8_pack(qweight.data_ptr(), n, k, self.packed.data_ptr(), self.comp.data_ptr())
        self.scale = _padded(scale, padded_n)
        self.bias = _padded(bias, padded_n)


def cpu_int8_linear(x: torch.Tensor, h: CpuInt8Linear) -> torch.Tensor:
    """x [..., K] fp32 -> [..., N] fp32, equal bit for bit to reference ``int8_linear``."""
    if x.shape[-1] != h.in_features:
        raise ValueError(
            f"int8 linear: input of shape {tuple(x.shape)} for a [{h.out_features}, {h.in_features}] weight"
        )
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, h.in_features)
    if x2.dtype != F32 or x2.device.type != "cpu" or x2.stride(1) != 1:  # rows of floats, any row stride
        x2 = x2.to(device="cpu", dtype=F32).contiguous()
    out = torch.empty((x2.shape[0], h.out_features), dtype=F32)
    if x2.shape[0]:
        h.lib.zs_i8_linear(
            x2.data_ptr(),
            x2.stride(0),
            x2.shape[0],
            h.in_features,
            h.packed.data_ptr(),
            h.comp.data_ptr(),
            h.scale.data_ptr(),
            None if h.bias is None else h.bias.data_ptr(),
            out.data_ptr(),
            h.out_features,
        )
    return out if x.dim() == 2 else out.reshape(*lead, h.out_features)

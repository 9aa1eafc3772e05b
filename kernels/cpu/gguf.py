"""Projections over GGUF block-quantized weights, kept in their blocks (csrc/gguf_gemm.cpp).

``GGUFLinear`` repacks a :class:`GGUFWeight` once into tiles of 16 rows (the 4- or 8-bit quants
regrouped so that one 512-bit register holds 4 elements of 16 rows, the file's fp16 scales
beside them; about the file's own size, nothing fp32-sized). ``gguf_linear`` quantizes the
activation rows to int8 in blocks of 32 and multiplies in int32 (AVX512-VNNI where the CPU has
it, plain loops otherwise: ``vnni_available``), so a decode step streams the 4-bit weights
instead of an fp32 copy. The result is the exact product with the int8-rounded activations up
to fp32 rounding: at most ``sum_k |w_k| * d_x / 2`` from ``F.linear(x, w.dequantize())``, with
``d_x = max|x_block| / 127`` the activation block's step.

``gguf_rows`` dequantizes looked-up rows (the embedding) to exactly the values
``gguf.quants.dequantize`` gives.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from zeroserve.kernels.base import LinearHandle
from zeroserve.kernels.cpu import build
from zeroserve.kernels.quantized import GGUFWeight

__all__ = ["GGUF_KERNEL_TYPES", "GGUFLinear", "gguf_linear", "gguf_rows", "kernel_path", "vnni_available"]

# ggml type ids with a kernel: Q4_0, Q4_1, Q8_0, Q4_K
GGUF_KERNEL_TYPES = frozenset({2, 3, 8, 12})
TILE = 16  # output rows per packed tile
F32 = torch.float32

_bound: set[int] = set()


def _library(lib: ctypes.CDLL | None = None) -> ctypes.CDLL:
    """The library (the serving build unless one is given: tests pass the -DZS_SCALAR one),
    with the argtypes of the functions this module calls set once."""
    lib = build.load() if lib is None else lib
    if id(lib) not in _bound:
        p, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
        lib.zs_gguf_vnni.restype = ctypes.c_int
        lib.zs_gguf_vnni.argtypes = []
        lib.zs_gguf_packed_bytes.restype = i64
        lib.zs_gguf_packed_bytes.argtypes = [i32, i64, i64]
        lib.zs_gguf_pack.restype = None
        lib.zs_gguf_pack.argtypes = [i32, p, i64, i64, p]
        lib.zs_gguf_linear.restype = None
        lib.zs_gguf_linear.argtypes = [i32, p, p, i64, i64, p, i64, p, i64]
        lib.zs_gguf_rows.restype = None
        lib.zs_gguf_rows.argtypes = [i32, p, i64, p, i64, i64, p]
        _bound.add(id(lib))
    return lib


def vnni_available(lib: ctypes.CDLL | None = None) -> bool:
    """Whether the tiles run on AVX512-VNNI here (else the portable loops, several times slower)."""
    return bool(_library(lib).zs_gguf_vnni())


def kernel_path(lib: ctypes.CDLL | None = None) -> str:
    """Which code runs the GGUF projections here, in words (for the worker's log)."""
    if vnni_available(lib):
        return "int8 activations x GGUF blocks on AVX512-VNNI"
    return (
        "int8 activations x GGUF blocks on portable loops (this build has no AVX512-VNNI/BW: "
        "the CPU lacks them or the kernels were built with -DZS_SCALAR)"
    )


class GGUFLinear(LinearHandle):
    """A GGUF weight ``[N, K]`` (and bias) repacked for ``gguf_linear`` (a copy of the blocks:
    the GGUFWeight can be dropped). ``lib``: the build to run on (tests: the scalar one)."""

    def __init__(self, weight: GGUFWeight, bias: torch.Tensor | None, lib: ctypes.CDLL | None = None):
        if weight.ggml_type not in GGUF_KERNEL_TYPES:
            raise ValueError(f"no GGUF kernel for {weight.type_name} weights")
        if weight.data.device.type != "cpu":
            raise ValueError(f"GGUFLinear takes a weight on the CPU, not on {weight.data.device}")
        self.lib = _library(lib)
        self.ggml_type, self.type_name = weight.ggml_type, weight.type_name
        self.out_features, self.in_features = weight.shape
        n, k = weight.shape
        nbytes = self.lib.zs_gguf_packed_bytes(self.ggml_type, n, k)
        if nbytes <= 0:
            raise ValueError(f"no GGUF kernel for a {weight.type_name} [{n}, {k}] weight")
        data = weight.data.contiguous()
        self.packed = torch.empty(nbytes, dtype=torch.uint8)
        self.lib.zs_gguf_pack(self.ggml_type, data.data_ptr(), n, k, self.packed.data_ptr())
        self.bias = None
        if bias is not None:
            if bias.shape != (n,):
                raise ValueError(f"a bias of shape {tuple(bias.shape)} for a [{n}, {k}] weight")
            self.bias = torch.zeros(-(-n // TILE) * TILE, dtype=torch.float32)  # whole tiles
            self.bias[:n] = bias.detach().to(torch.float32)
        # the call with this weight's arguments bound: (x, x_stride, y, M) -> None
        self.run = functools.partial(
            self.lib.zs_gguf_linear,
            self.ggml_type,
            self.packed.data_ptr(),
            None if self.bias is None else self.bias.data_ptr(),
            n,
            k,
        )

    @property
    def nbytes(self) -> int:
        return self.packed.numel()


def gguf_linear(x: torch.Tensor, h: GGUFLinear) -> torch.Tensor:
    """``F.linear(x, W, b)`` with W in its GGUF blocks: x [M, K] fp32 -> [M, N] fp32."""
    # a decode step makes ~120 of these calls: the common case is checked in one expression
    if not (
        x.dtype is F32 and x.dim() == 2 and x.shape[1] == h.in_features and x.stride(1) == 1 and not x.is_cuda
    ):
        if x.dim() != 2 or x.shape[1] != h.in_features:
            raise ValueError(
                f"gguf_linear: input of shape {tuple(x.shape)} for a [{h.out_features}, {h.in_features}] weight"
            )
        x = x.to(device="cpu", dtype=F32).contiguous()
    rows = x.shape[0]
    out = torch.empty((rows, h.out_features), dtype=F32)
    if rows:
        h.run(x.data_ptr(), x.stride(0), out.data_ptr(), rows)
    return out


def gguf_rows(w: GGUFWeight, ids: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """Rows ``ids`` of ``w`` dequantized: fp32 ``[len(ids), K]``, exactly ``w.dequantize(ids)``
    (types without a kernel go through it)."""
    ids = ids.to(device="cpu", dtype=torch.int64).reshape(-1).contiguous()
    n, k = w.shape
    if not ids.numel():  # (gguf.quants cannot dequantize zero blocks)
        return torch.empty((0, k), dtype=F32)
    if w.ggml_type not in GGUF_KERNEL_TYPES or w.data.device.type != "cpu":
        return w.dequantize(ids)
    lib = _library(lib)
    if not 0 <= int(ids.min()) <= int(ids.max()) < n:
        raise IndexError(f"gguf_rows: a row id is outside the {n} rows of the weight")
    data = w.data if w.data.is_contiguous() else w.data.contiguous()
    out = torch.empty((ids.numel(), k), dtype=F32)
    lib.zs_gguf_rows(
        w.ggml_type, data.data_ptr(), data.stride(0), ids.data_ptr(), ids.numel(), k, out.data_ptr()
    )
    return out

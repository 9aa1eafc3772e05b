"""int8 W8A8 projections: the library path (kernels/reference/int8.py, torch._int_mm) against
fp32, and the C++ kernel (kernels/cpu/int8.py, both builds) against the library path.

Tolerance, derived from the quantization steps: with x_k = x_s qx_k + ex_k (|ex_k| <= x_s / 2)
and w_k = w_s qw_k + ew_k (|ew_k| <= w_s / 2), the product computed from the integers differs
from x_k w_k by x_k ew_k + ex_k w_k - ex_k ew_k, so per output

    |y - y_fp32| <= sum_k (|x_k| w_s / 2 + |w_k| x_s / 2 + x_s w_s / 4) + fp32 rounding

where x_s is the step of the token's int8 part: its two largest |x_k| are kept in fp32 (only
their weights' error counts), so x_s = (third largest |x_k|) / 127. Rows with one or two
spikes (as SmolLM2's MLP inputs have) check that: quantized with the spikes, the bound fails.

(the rounding: 1e-5 of sum_k |x_k w_k|, orders above what K <= 1531 fp32 additions make). The
bound holds for every element whatever the data; a statistical check beside it catches errors
that stay inside it: the rounding errors are close to uniform, so the rms of (y - y_fp32) is
about sqrt(sum_k (x_k^2 w_s^2 + w_k^2 x_s^2) / 12) (measured: 0.97-1.3x of it, the most with
K = 13) and must stay under 1.5x.

The C++ kernel quantizes the same way and adds in int32, which is exact, and its epilogue
rounds in the reference's order: its outputs must equal the library path's bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zeroserve.kernels.reference.backend import ReferenceKernels
from zeroserve.kernels.reference.int8 import Int8Linear, int8_linear

# (K, N): K not a multiple of 4 or 64, N % 16 != 0, the SmolLM2 shapes' odd neighbours
SHAPES = [(577, 33), (13, 7), (1531, 50), (64, 100), (576, 961), (1, 16)]
ROWS = [1, 3, 17, 64, 200]


def _data(m: int, k: int, n: int, seed: int, bias: bool):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4  # rows of different scales
    if m >= 3 and k >= 4:  # tokens whose energy sits in one or two channels
        x[1, k // 2] = 300.0
        x[2, 1], x[2, k - 1] = -200.0, 150.0
    w = torch.randn(n, k, generator=gen) * 0.05
    w[:, 0] *= 20  # an outlier column: the per-channel scale must follow it
    b = torch.randn(n, generator=gen) if bias else None
    return x, w, b


def _error_bounds(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(worst-case |error| per element [M, N], expected rms of the error) for W8A8 of x W^T."""
    x, w = x.double(), w.double()
    k = x.shape[1]
    xs = x.abs().topk(3, dim=1).values[:, 2] / 127 if k >= 3 else x.new_zeros(x.shape[0])  # [M]
    ws = w.abs().amax(1) / 127  # [N]
    worst = (
        x.abs().sum(1)[:, None] * ws[None, :] / 2
        + xs[:, None] * w.abs().sum(1)[None, :] / 2
        + k * xs[:, None] * ws[None, :] / 4
        + 1e-5 * (x.abs() @ w.abs().T)
    )
    variance = ((x**2).sum(1)[:, None] * ws[None, :] ** 2 + xs[:, None] ** 2 * (w**2).sum(1)[None, :]) / 12
    return worst, variance.mean().sqrt()


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_library_path_within_the_quantization_bound(m, k, n):
    x, w, b = _data(m, k, n, seed=m * 7919 + k, bias=True)
    got = int8_linear(x, Int8Linear(w, b))
    want = F.linear(x.double(), w.double(), b.double())
    worst, rms = _error_bounds(x, w)
    err = (got.double() - want).abs()
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert bool((err <= worst).all()), f"max excess {(err - worst).max().item():.3g}"
    if m * n >= 64 and k > 1:  # enough errors for an rms (K = 1: exact products, error ~0)
        assert err.pow(2).mean().sqrt() <= 1.5 * rms


def test_library_path_edge_rows():
    """A zero row of x (scale 0) gives exactly the bias; a zero row of W gives the bias in
    that column; an empty batch gives an empty [0, N]."""
    x, w, b = _data(5, 40, 20, seed=1, bias=True)
    x[2] = 0
    w[3] = 0
    h = Int8Linear(w, b)
    got = int8_linear(x, h)
    assert torch.equal(got[2], b)
    assert torch.equal(got[:, 3], b[3].expand(5))
    assert int8_linear(torch.empty(0, 40), h).shape == (0, 20)
    with pytest.raises(ValueError, match="input of shape"):
        int8_linear(torch.randn(2, 41), h)


def test_weights_are_int8_per_channel():
    x, w, _ = _data(1, 100, 24, seed=2, bias=False)
    h = Int8Linear(w, None)
    assert h.qweight.dtype == torch.int8 and h.qweight.shape == (24, 100)
    assert int(h.qweight.abs().max()) == 127
    assert torch.equal(
        h.qweight.abs().amax(1), torch.full((24,), 127, dtype=torch.int8)
    )  # each row its own scale
    torch.testing.assert_close(h.scale, w.abs().amax(1) / 127, rtol=1e-6, atol=0)


def test_reference_backend_serves_int8():
    x, w, b = _data(4, 64, 48, seed=3, bias=True)
    ops = ReferenceKernels("int8")
    h = ops.prepare_linear(w, b)
    assert isinstance(h, Int8Linear)
    assert torch.equal(ops.linear(x, h), int8_linear(x, h))
    assert not isinstance(ReferenceKernels("none").prepare_linear(w, b), Int8Linear)


# --------------------------------------------------------------------------- the C++ kernel

try:
    from zeroserve.kernels.cpu import build
    from zeroserve.kernels.cpu import int8 as cpu_int8

    _COMPILER = build._compiler() is not None
except ImportError:  # pragma: no cover
    _COMPILER = False
needs_compiler = pytest.mark.skipif(not _COMPILER, reason="no C++ compiler here")


@pytest.fixture(params=["native", "scalar"])
def lib(request):
    """The library build the C++ handle is made with (serving flags, or -DZS_SCALAR loops)."""
    if request.param == "scalar":
        built = cpu_int8.library(("-DZS_SCALAR",))
        assert built.zs_i8_vnni() == 0
        return built
    return cpu_int8.library()


@needs_compiler
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_cpp_equals_the_library_path(lib, m, k, n, bias):
    x, w, b = _data(m, k, n, seed=m * 31 + k * 7 + n, bias=bias)
    want = int8_linear(x, Int8Linear(w, b))
    got = cpu_int8.cpu_int8_linear(x, cpu_int8.CpuInt8Linear(w, b, lib=lib))
    assert got.shape == (m, n)
    assert torch.equal(got, want), f"max diff {(got - want).abs().max().item():.3g}"


@needs_compiler
def test_cpp_strided_rows_empty_batch_and_zero_rows(lib):
    x, w, b = _data(9, 70, 37, seed=4, bias=True)
    wide = torch.randn(9, 100)
    wide[:, :70] = x
    x[4] = 0
    wide[4, :70] = 0
    h = cpu_int8.CpuInt8Linear(w, b, lib=lib)
    want = int8_linear(x, Int8Linear(w, b))
    assert torch.equal(cpu_int8.cpu_int8_linear(wide[:, :70], h), want)  # rows 100 floats apart
    assert torch.equal(want[4], b)
    assert cpu_int8.cpu_int8_linear(torch.empty(0, 70), h).shape == (0, 37)
    with pytest.raises(ValueError, match="input of shape"):
        cpu_int8.cpu_int8_linear(torch.randn(2, 71), h)


@needs_compiler
def test_cpu_backend_picks_the_vnni_kernel_where_there_is_one(monkeypatch):
    from zeroserve.kernels.cpu.backend import CpuKernels

    x, w, b = _data(5, 96, 40, seed=5, bias=True)
    ops = CpuKernels("int8")
    h = ops.prepare_linear(w, b)
    if cpu_int8.vnni_available():
        assert isinstance(h, cpu_int8.CpuInt8Linear) and cpu_int8.why_not() == ""
    else:
        assert isinstance(h, Int8Linear) and cpu_int8.why_not() != ""
    assert torch.equal(ops.linear(x, h), int8_linear(x, Int8Linear(w, b)))
    monkeypatch.setattr(cpu_int8, "why_not", lambda: "no VNNI (test)")
    assert isinstance(CpuKernels("int8").prepare_linear(w, b), Int8Linear)

"""bf16-weight projections (mode "bf16"): kernels/cpu/bf16.py (the AVX512-BF16 panel GEMM, and
the portable loops of the ``-DZS_SCALAR`` build) and the reference (kernels/reference/bf16.py,
oneDNN or F.linear on bf16), against fp32 F.linear of the bf16-rounded weight, in fp64.

The tolerance is a bound derived per output element, not tuned. With S = sum_k |x_k| |W[n, k]|
(W already bf16, so exact) and u = 2^-24 (fp32):
- x is rounded to bf16 (8 significant bits: relative error <= 2^-8 per element, so per
  product x_k W[n, k]): at most 2^-8 S;
- the products of two bf16 numbers are exact in fp32 and summed in fp32 with the bias, K + 1
  additions: at most gamma(K + 1) ((1 + 2^-8) S + |b|), gamma(n) = n u / (1 - n u);
- the reference (oneDNN's bf16 linear) also rounds y to bf16 before the bias is added: plus
  2^-8 (1 + 2^-8) S (and one more fp32 addition).
Our kernel is also held to the second term alone against x rounded by torch (``x.bfloat16()``,
to nearest even): that pins the rounding of x, not only its size.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zeroserve.kernels.cpu import build

if build._compiler() is None:  # a machine without g++ serves with the torch kernels
    pytest.skip("no C++ compiler here", allow_module_level=True)
from zeroserve.kernels.cpu import bf16  # noqa: E402
from zeroserve.kernels.cpu.backend import CpuKernels  # noqa: E402
from zeroserve.kernels.reference import bf16 as ref_bf16  # noqa: E402
from zeroserve.kernels.reference.backend import ReferenceKernels  # noqa: E402
from zeroserve.kernels.reference.bf16 import Bf16DenseLinear, bf16_dense_linear  # noqa: E402

U32 = 2.0**-24  # unit roundoff of fp32
U16 = 2.0**-8  # unit roundoff of bf16

# (N, K): panels cut short (N % 16), a lone last panel (N = 33: groups of 2 + 1), odd K (a
# zero-padded last pair), K = 1, and SmolLM2's shapes
SHAPES = [(7, 13), (16, 8), (33, 1537), (50, 1), (17, 2), (960, 576), (576, 1536)]
# row blocks of 8 and their remainders, chunks of 128 rows and past them
ROWS = [1, 2, 3, 7, 8, 9, 13, 64, 127, 128, 129, 200]


@pytest.fixture(params=["native", "scalar"], scope="module")
def lib(request):
    """One build of the library: the serving one, or the portable loops."""
    library = bf16.load_library(() if request.param == "native" else ("-DZS_SCALAR",))
    if request.param == "scalar":
        assert library.zs_bf16_vectorized() == 0
    return library


def _gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def _case(m: int, n: int, k: int, seed: int, bias: bool = True):
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(m, k + 3, generator=gen)
    x = wide[:, :k]  # rows k + 3 apart
    weight = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    return x, weight, b


def _exact(x: torch.Tensor, weight: torch.Tensor, b: torch.Tensor | None):
    """(y, S): the fp64 F.linear of x and the bf16-rounded W, and sum_k |x_k| |W[n, k]|."""
    w = weight.bfloat16().double()
    y = F.linear(x.double(), w, None if b is None else b.double())
    return y, x.double().abs() @ w.abs().t()


def _assert_within(y: torch.Tensor, y_ref: torch.Tensor, bound: torch.Tensor) -> None:
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    excess = (y.double() - y_ref).abs() - bound
    worst = int(excess.argmax())
    assert excess.max() <= 0, (
        f"element {divmod(worst, y.shape[1])}: error {float((y.double() - y_ref).flatten()[worst]):.3g} "
        f"over the bound {float(bound.flatten()[worst]):.3g}"
    )


def _our_bound(s: torch.Tensor, b: torch.Tensor | None, k: int) -> torch.Tensor:
    babs = 0.0 if b is None else b.double().abs()
    return U16 * s + _gamma(k + 1) * ((1 + U16) * s + babs)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_matches_fp32_linear_of_the_rounded_weight(lib, m, n, k):
    x, weight, b = _case(m, n, k, seed=m * 7919 + n * 31 + k)
    y_ref, s = _exact(x, weight, b)
    _assert_within(bf16.bf16_linear(x, bf16.Bf16Linear(weight, b), lib=lib), y_ref, _our_bound(s, b, k))
    y_ref, s = _exact(x, weight, None)
    _assert_within(bf16.bf16_linear(x, bf16.Bf16Linear(weight, None), lib=lib), y_ref, _our_bound(s, None, k))


@pytest.mark.parametrize("m,n,k", [(1, 960, 576), (9, 33, 1537), (200, 50, 63)])
def test_x_is_rounded_to_nearest_even_as_torch_does(lib, m, n, k):
    """Against x.bfloat16() in fp64, only the fp32 summation is left: truncating x, or
    rounding it another way, breaks this bound by orders of magnitude."""
    x, weight, b = _case(m, n, k, seed=k)
    y_ref, s = _exact(x.bfloat16().float(), weight, b)
    bound = _gamma(k + 1) * (s + b.double().abs())
    _assert_within(bf16.bf16_linear(x, bf16.Bf16Linear(weight, b), lib=lib), y_ref, bound)


def test_more_threads_than_panel_groups(lib):
    x, weight, b = _case(200, 33, 1537, seed=5)  # 3 panels, 2 groups: idle threads still convert x
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        y = bf16.bf16_linear(x, bf16.Bf16Linear(weight, b), lib=lib)
    finally:
        torch.set_num_threads(threads)
    y_ref, s = _exact(x, weight, b)
    _assert_within(y, y_ref, _our_bound(s, b, 1537))


@pytest.mark.parametrize("n,k", [(7, 13), (960, 576), (33, 1537)])
@pytest.mark.parametrize("m", [1, 8, 129])
def test_reference_within_its_bound(m, n, k):
    """oneDNN's bf16 linear (or F.linear on bf16), y rounded to bf16 on the way."""
    x, weight, b = _case(m, n, k, seed=n + k)
    y_ref, s = _exact(x, weight, b)
    bound = _our_bound(s, b, k + 1) + U16 * (1 + U16) * s
    _assert_within(bf16_dense_linear(x, Bf16DenseLinear(weight, b)), y_ref, bound)


def test_reference_without_onednn_runs_f_linear_on_bf16(monkeypatch):
    monkeypatch.setattr(ref_bf16, "onednn_bf16_available", lambda: False)
    x, weight, b = _case(9, 33, 101, seed=2)
    handle = Bf16DenseLinear(weight, b)
    assert not handle.onednn and handle.weight.dtype == torch.bfloat16 and handle.weight.shape == (33, 101)
    y_ref, s = _exact(x, weight, b)
    _assert_within(bf16_dense_linear(x, handle), y_ref, _our_bound(s, b, 102) + U16 * (1 + U16) * s)


def test_the_handle_holds_bf16_only():
    weight, b = torch.randn(33, 13), torch.randn(33)
    handle = bf16.Bf16Linear(weight, b)
    # 3 panels x 7 k-pairs x 16 columns x 2
    assert handle.panels.dtype == torch.bfloat16 and handle.panels.shape == (3, 7, 16, 2)
    assert handle.panels[1, 3, 4, 1] == weight[20, 7].bfloat16()
    assert handle.panels[2, 6, 0, 1] == 0 and handle.panels[2, 0, 1, 0] == 0  # K and N padding
    assert handle.bias.dtype == torch.float32 and handle.bias.shape == (48,)
    fp32 = [v for v in vars(handle).values() if isinstance(v, torch.Tensor) and v.dtype == torch.float32]
    assert sum(t.numel() for t in fp32) == 48  # the bias, no copy of W
    ref = Bf16DenseLinear(weight, b)
    assert ref.weight.dtype == torch.bfloat16 and ref.bias.dtype == torch.float32
    x = torch.randn(5, 13)
    from_bf16 = bf16.Bf16Linear(weight.bfloat16(), b)  # a bf16 checkpoint packs the same
    assert torch.equal(bf16.bf16_linear(x, from_bf16), bf16.bf16_linear(x, handle))


def test_edges(lib):
    handle = bf16.Bf16Linear(torch.randn(16, 8), None)
    assert bf16.bf16_linear(torch.randn(0, 8), handle, lib=lib).shape == (0, 16)
    x64 = torch.randn(3, 8, dtype=torch.float64)  # converted to fp32 first
    torch.testing.assert_close(
        bf16.bf16_linear(x64, handle, lib=lib), bf16.bf16_linear(x64.float(), handle, lib=lib)
    )
    xt = torch.randn(8, 3).t()  # columns not contiguous: copied
    torch.testing.assert_close(
        bf16.bf16_linear(xt, handle, lib=lib), bf16.bf16_linear(xt.contiguous(), handle, lib=lib)
    )
    with pytest.raises(ValueError, match=r"input of shape \(2, 9\)"):
        bf16.bf16_linear(torch.randn(2, 9), handle, lib=lib)
    with pytest.raises(ValueError, match="fp32 or bf16"):
        bf16.Bf16Linear(torch.randn(4, 4, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="bias"):
        bf16.Bf16Linear(torch.randn(4, 4), torch.randn(5))


@pytest.mark.parametrize("backend_cls", [ReferenceKernels, CpuKernels])
def test_mode_bf16_goes_through_prepare_bf16(backend_cls):
    gen = torch.Generator().manual_seed(3)
    weight, b, x = (
        torch.randn(40, 24, generator=gen),
        torch.randn(40, generator=gen),
        torch.randn(6, 24, generator=gen),
    )
    backend = backend_cls("bf16")
    handle = backend.prepare_linear(weight, b)
    if backend_cls is CpuKernels and bf16.bf16_available():
        assert isinstance(handle, bf16.Bf16Linear)
    else:
        assert isinstance(handle, Bf16DenseLinear)
    y_ref, s = _exact(x, weight, b)
    _assert_within(backend.linear(x, handle), y_ref, _our_bound(s, b, 25) + U16 * (1 + U16) * s)
    assert not isinstance(backend_cls("none").prepare_linear(weight, b), (bf16.Bf16Linear, Bf16DenseLinear))


@pytest.fixture
def fresh_why_not():
    bf16.why_not.cache_clear()
    yield
    bf16.why_not.cache_clear()


def test_why_not_says_why(fresh_why_not, monkeypatch):
    assert bf16.bf16_available() == (bf16.why_not() == "")
    if bf16._cpu_has("avx512_bf16"):
        assert bf16.bf16_available(), bf16.why_not()
    scalar = bf16.load_library(("-DZS_SCALAR",))
    monkeypatch.setattr(bf16, "load_library", lambda: scalar)
    monkeypatch.setattr(bf16, "_cpu_has", lambda flag: False)
    bf16.why_not.cache_clear()
    assert not bf16.bf16_available() and "no avx512_bf16" in bf16.why_not()
    monkeypatch.setattr(bf16, "_cpu_has", lambda flag: True)
    bf16.why_not.cache_clear()
    assert "without AVX512-BF16" in bf16.why_not()


def test_without_avx512_bf16_the_portable_loops_are_built():
    """-march=native on a CPU without bf16 units: the intrinsics are left out, not miscompiled."""
    if not bf16._cpu_has("avx512_bf16"):
        pytest.skip("the serving build is already one without avx512_bf16")
    library = bf16.load_library(("-mno-avx512bf16",))
    assert library.zs_bf16_vectorized() == 0
    x, weight, b = _case(13, 33, 101, seed=1)
    y_ref, s = _exact(x, weight, b)
    _assert_within(bf16.bf16_linear(x, bf16.Bf16Linear(weight, b), lib=library), y_ref, _our_bound(s, b, 101))

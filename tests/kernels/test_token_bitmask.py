"""The structured-output token bitmask (``apply_token_bitmask``): the C++ kernel (serving and
``-DZS_SCALAR`` builds) and every backend equal the torch reference (kernels/reference/bitmask.py)
bit for bit, and the reference equals xgrammar's ``apply_token_bitmask_inplace``: masks with
all-zero, all-one and sign-bit words, widths that are not multiples of 32, a subset of rows,
batch 1 and 64, strided logits, NaN logits left alone."""

from __future__ import annotations

import pytest
import torch

from zeroserve.kernels import BACKENDS, get_kernels
from zeroserve.kernels.cpu import build
from zeroserve.kernels.reference.bitmask import apply_token_bitmask as reference

NEG_INF = float("-inf")


def _mask(n: int, words: int, seed: int) -> torch.Tensor:
    """Random int32 words, a third of them all zeros and a third all ones (a JSON schema's
    mask is mostly whole words), and some with only the sign bit set or clear."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**31), 2**31, (n, words), dtype=torch.int64, generator=gen).to(torch.int32)
    kind = torch.randint(0, 3, (n, words), generator=gen)
    bits[kind == 0] = 0
    bits[kind == 1] = -1
    bits[:, 0] = -(2**31)  # only bit 31: token 31 allowed
    if words > 1:
        bits[:, 1] = 2**31 - 1  # all but bit 31
    return bits


def _logits(n: int, vocab: int, seed: int, pad: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab + pad, generator=gen)[:, :vocab]  # strided when padded
    x[:, 3] = float("nan")  # an allowed NaN stays NaN
    return x


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))  # bit for bit, NaNs included


def _xgrammar(logits: torch.Tensor, bits: torch.Tensor, rows: torch.Tensor | None) -> None:
    """xgrammar's CPU apply, its indices picking the same row of logits and bitmask."""
    xgr = pytest.importorskip("xgrammar")
    if rows is not None:
        spread = torch.full((logits.shape[0], bits.shape[1]), -1, dtype=torch.int32)
        spread[rows] = bits
        bits = spread
    xgr.apply_token_bitmask_inplace(logits, bits, indices=None if rows is None else rows.tolist())


CASES = [  # (batch, vocab, words, rows)
    (1, 49152, 1536, None),
    (64, 49152, 1536, None),
    (64, 49152, 1536, [0, 5, 6, 63, 31]),
    (16, 1000, 32, None),  # 1000 = 31 words and 8 bits
    (16, 1000, 32, [15, 2]),
    (3, 37, 2, None),
    (5, 70, 2, [1, 4]),  # logits wider than the mask: columns 64.. are left as they are
]


def test_the_reference_is_xgrammars_apply():
    for i, (batch, vocab, words, rows) in enumerate(CASES):
        rows_t = None if rows is None else torch.tensor(rows, dtype=torch.int64)
        bits = _mask(batch if rows is None else len(rows), words, seed=i)
        want, got = _logits(batch, vocab, seed=i), _logits(batch, vocab, seed=i)
        with pytest.warns(UserWarning) if 32 * words < vocab else _no_warning():
            _xgrammar(want, bits, rows_t)
        reference(got, bits, rows_t)
        _same(got, want)
    # what the masks do, spelled out on a 37-token vocabulary
    x = torch.zeros(2, 37)
    reference(x, torch.tensor([[0, 0]], dtype=torch.int32), torch.tensor([1]))
    assert x[0].eq(0).all() and x[1].isinf().all()  # rows not named are untouched
    x = torch.zeros(1, 37)
    reference(x, torch.tensor([[-(2**31), 0b101]], dtype=torch.int32))
    assert [i for i in range(37) if x[0, i] == 0] == [31, 32, 34]


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if build._compiler() is not None:

    @pytest.fixture(params=["native", "scalar"])
    def cpu_ops(request, monkeypatch):
        from zeroserve.kernels.cpu import ops

        if request.param == "scalar":
            monkeypatch.setattr(ops, "_lib", build.load(("-DZS_SCALAR",)))
        return ops

    @pytest.mark.parametrize("case", range(len(CASES)))
    @pytest.mark.parametrize("pad", [0, 5])
    def test_the_cpu_kernel_is_the_reference(cpu_ops, case, pad):
        batch, vocab, words, rows = CASES[case]
        rows_t = None if rows is None else torch.tensor(rows, dtype=torch.int64)
        bits = _mask(batch if rows is None else len(rows), words, seed=case + 100)
        want, got = _logits(batch, vocab, case, pad), _logits(batch, vocab, case, pad)
        reference(want, bits, rows_t)
        cpu_ops.apply_token_bitmask(got, bits, rows_t)
        _same(got, want)
        assert got.isinf().any() and not got.isinf().all()  # the case masks some, not all

    def test_the_cpu_kernel_refuses_bad_rows(cpu_ops):
        x = torch.zeros(4, 64)
        with pytest.raises(IndexError, match="outside the logits' 4 rows"):
            cpu_ops.apply_token_bitmask(x, torch.zeros(1, 2, dtype=torch.int32), torch.tensor([4]))
        with pytest.raises(ValueError, match="2 bitmask rows for 1 rows"):
            cpu_ops.apply_token_bitmask(x, torch.zeros(2, 2, dtype=torch.int32), torch.tensor([0]))
        with pytest.raises(ValueError, match="1 bitmask rows for 4 logits rows"):
            cpu_ops.apply_token_bitmask(x, torch.zeros(1, 2, dtype=torch.int32))
        assert x.eq(0).all()

    def test_the_cpu_kernel_leaves_other_dtypes_to_the_reference(cpu_ops):
        bits = _mask(3, 4, seed=7)
        want, got = _logits(3, 100, 7).to(torch.bfloat16), _logits(3, 100, 7).to(torch.bfloat16)
        reference(want, bits)
        cpu_ops.apply_token_bitmask(got, bits)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("name", [n for n in BACKENDS if n != "cpu" or build._compiler() is not None])
def test_every_backend_is_the_reference(name):
    kernels = get_kernels(name)
    for rows in (None, [2, 0]):
        rows_t = None if rows is None else torch.tensor(rows, dtype=torch.int64)
        bits = _mask(4 if rows is None else 2, 32, seed=11)
        want, got = _logits(4, 1000, 11), _logits(4, 1000, 11)
        reference(want, bits, rows_t)
        kernels.apply_token_bitmask(got, bits, rows_t)
        _same(got, want)

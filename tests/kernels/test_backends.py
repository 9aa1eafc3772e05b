"""Every kernel backend implements the whole interface (kernels/base.py), and its projections
(prepare_linear, then linear) compute F.linear on odd shapes.

The Triton backend runs interpreted on the CPU here (conftest.py); the C++ one where there is
a compiler.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zeroserve.kernels import BACKENDS, get_kernels
from zeroserve.kernels.base import DenseLinear, KernelBackend, LinearHandle
from zeroserve.kernels.cpu import build

torch.set_num_threads(2)

NAMES = [name for name in BACKENDS if name != "cpu" or build._compiler() is not None]
ABSTRACT = sorted(KernelBackend.__abstractmethods__)


@pytest.fixture(params=NAMES)
def kernels(request) -> KernelBackend:
    return get_kernels(request.param)


def test_the_interface_covers_what_the_model_and_sampler_call():
    assert ABSTRACT == sorted(
        [
            "rms_norm",
            "rotary",
            "silu_and_mul",
            "write_kv",
            "paged_attention",
            "prepare_linear",
            "linear",
            "argmax_rows",
            "sampling_filter",
            "apply_token_bitmask",
        ]
    )


def test_each_backend_is_a_complete_kernel_backend(kernels):
    assert isinstance(kernels, KernelBackend) and kernels.name in BACKENDS
    assert get_kernels(kernels.name).name == kernels.name
    for method in ABSTRACT:
        assert callable(getattr(kernels, method))


def _stub(self, *args, **kwargs):
    return None


@pytest.mark.parametrize("left_out", ABSTRACT)
def test_a_backend_missing_one_method_cannot_be_made(left_out):
    body = {name: _stub for name in ABSTRACT if name != left_out}
    incomplete = type("Incomplete", (KernelBackend,), {"name": "incomplete", **body})
    with pytest.raises(TypeError, match=left_out):
        incomplete()
    type("Complete", (KernelBackend,), {"name": "complete", **body, left_out: _stub})()  # that one was all


def test_an_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        get_kernels("cuda")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_features,in_features", [(7, 13), (33, 65), (1, 5), (49, 576)])
def test_linear_matches_f_linear(kernels, out_features, in_features, bias):
    gen = torch.Generator().manual_seed(out_features * in_features + bias)
    weight = torch.randn(out_features, in_features, generator=gen)
    b = torch.randn(out_features, generator=gen) if bias else None
    handle = kernels.prepare_linear(weight, b)
    assert isinstance(handle, LinearHandle)
    assert (handle.out_features, handle.in_features) == (out_features, in_features)
    for rows in (1, 3, 17, 64):
        x = torch.randn(rows, in_features + 2, generator=gen)[:, :in_features]  # strided rows
        out = kernels.linear(x, handle)
        torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-4, atol=1e-4)


def test_linear_in_bf16_uses_the_weight_as_it_is(kernels):
    weight = torch.randn(9, 11, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    handle = kernels.prepare_linear(weight, None)
    assert isinstance(handle, DenseLinear) and handle.weight is weight  # later edits of W show
    x = torch.randn(4, 11, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    assert torch.equal(kernels.linear(x, handle), F.linear(x, weight))


def test_a_handle_of_another_kind_is_refused(kernels):
    class Int8Linear(LinearHandle):  # what a quantized format would look like to a backend without it
        in_features, out_features = 4, 4

    with pytest.raises(TypeError, match="kernels cannot run Int8Linear handles"):
        kernels.linear(torch.randn(2, 4), Int8Linear())


def test_argmax_rows_is_torch_argmax(kernels):
    x = torch.randn(5, 301, generator=torch.Generator().manual_seed(2))
    x[1, 7] = x[1, 200] = 40.0  # a tie: the first index
    x[2, 3] = float("nan")  # NaN is the largest
    assert torch.equal(kernels.argmax_rows(x), x.argmax(dim=-1))


def test_sampling_filter_with_nothing_to_do_keeps_the_logits(kernels):
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(kernels.sampling_filter(x, None, None, None, None), x)

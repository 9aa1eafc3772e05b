"""Triton RMSNorm (+residual), rotary, SiLU-mul and KV write against the torch reference.

Interpreted on CPU (conftest.py). bf16 results are compared with a tolerance of a few bf16
ulps: the kernels round where the reference rounds, but fp32 sums may differ in order.
"""

from __future__ import annotations

import pytest
import torch

from zeroserve.kernels.reference import ops as ref
from zeroserve.kernels.triton import ops as tri

torch.set_num_threads(2)

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def assert_close(out, expected):
    assert out.shape == expected.shape and out.dtype == expected.dtype
    tol = TOLERANCE[expected.dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [64, 100])
def test_rms_norm_with_and_without_residual(dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn(17, hidden, generator=gen) * 3).to(dtype)
    residual = torch.randn(17, hidden, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    assert_close(tri.rms_norm(x, weight, 1e-6), ref.rms_norm(x, weight, 1e-6))
    residual_before = residual.clone()
    out, new_residual = tri.rms_norm(x, weight, 1e-5, residual=residual)
    expected_out, expected_residual = ref.rms_norm(x, weight, 1e-5, residual=residual)
    assert_close(out, expected_out)
    if dtype == torch.bfloat16:  # the interpreter rounds fp32 -> bf16 toward zero; GPUs to nearest
        assert_close(new_residual, expected_residual)
    else:
        assert torch.equal(new_residual, expected_residual)  # one rounded add: exact
    assert torch.equal(residual, residual_before)  # inputs are left alone, as in the reference


def cos_sin_cache(max_pos, head_dim, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


@pytest.mark.parametrize("head_dim,hq,hkv,dtype", [(64, 6, 2, torch.float32), (128, 3, 3, torch.bfloat16)])
def test_rotary_on_strided_views_of_a_fused_qkv(head_dim, hq, hkv, dtype):
    num_tokens = 15
    gen = torch.Generator().manual_seed(head_dim)
    qkv = torch.randn(num_tokens, (hq + 2 * hkv) * head_dim, generator=gen).to(dtype)
    q = qkv[:, : hq * head_dim].view(num_tokens, hq, head_dim)  # strided: row stride > Hq*D
    k = qkv[:, hq * head_dim : (hq + hkv) * head_dim].view(num_tokens, hkv, head_dim)
    positions = torch.tensor([0, 1, 2, 300, 299, 7, 8, 9, 10, 63, 64, 65, 100, 5, 4])
    cache = cos_sin_cache(512, head_dim)
    q_out, k_out = tri.rotary(positions, q, k, cache)
    q_ref, k_ref = ref.rotary(positions, q, k, cache)
    assert_close(q_out, q_ref)
    assert_close(k_out, k_ref)
    assert not torch.equal(q_out, q)  # it did rotate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(17, 2 * 100, generator=gen) * 4).to(dtype)
    assert_close(tri.silu_and_mul(x), ref.silu_and_mul(x))


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_write_kv_skips_padding_slots(cache_dtype):
    gen = torch.Generator().manual_seed(1)
    num_blocks, block_size, hkv, head_dim = 5, 16, 3, 64
    k = torch.randn(7, hkv, head_dim, generator=gen).to(cache_dtype)
    v = torch.randn(7, hkv, head_dim, generator=gen).to(cache_dtype)
    slots = torch.tensor([17, -1, 0, 79, 40, -1, 41], dtype=torch.int64)
    caches = [torch.full((num_blocks, block_size, hkv, head_dim), 9.0, dtype=cache_dtype) for _ in range(4)]
    tri.write_kv(k, v, caches[0], caches[1], slots)
    ref.write_kv(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert int((caches[0] != 9.0).any(-1).any(-1).sum()) == 5  # exactly the 5 real tokens landed

"""Triton sampling filters (bisection, no sort) against the torch reference ops.

Logits are distinct random values (ties at a top-p boundary are the one place the two may
legitimately differ: the reference's sort splits them, the kernel keeps them together).
"""

from __future__ import annotations

import torch

from zeroserve.kernels.reference import sampling as ref
from zeroserve.kernels.triton import sampling as tri

torch.set_num_threads(2)
VOCAB = 1000


def logits(rows, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=gen) * 2.5


def assert_same_filter(out, expected):
    assert torch.equal(torch.isinf(out), torch.isinf(expected)), (
        f"kept {torch.isfinite(out).sum(1).tolist()}, reference kept {torch.isfinite(expected).sum(1).tolist()}"
    )
    finite = torch.isfinite(expected)
    torch.testing.assert_close(out[finite], expected[finite], atol=1e-6, rtol=1e-6)


def test_top_k_rows_including_disabled_and_edge_values():
    x = logits(6, 0)
    k = torch.tensor([0, 1, 7, VOCAB - 1, VOCAB, -3])
    out = tri.apply_top_k(x, k)
    assert_same_filter(out, ref.apply_top_k(x, k))
    assert torch.isfinite(out).sum(1).tolist() == [VOCAB, 1, 7, VOCAB - 1, VOCAB, VOCAB]


def test_top_k_keeps_ties_with_the_kth_value():
    x = torch.zeros(1, VOCAB)
    x[0, :5] = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0])
    out = tri.apply_top_k(x, torch.tensor([2]))
    assert torch.isfinite(out).sum().item() == 4  # 3.0 and all three 2.0s, as the reference
    assert_same_filter(out, ref.apply_top_k(x, torch.tensor([2])))


def test_top_p_and_top_k_top_p():
    x = logits(5, 1)
    p = torch.tensor([1.0, 0.9, 0.5, 0.0, 0.05])
    assert_same_filter(tri.apply_top_p(x, p), ref.apply_top_p(x, p))
    k = torch.tensor([0, 50, 3, 10, 400])
    assert_same_filter(tri.apply_top_k_top_p(x, k, p), ref.apply_top_k_top_p(x, k, p))


def test_min_p_and_the_whole_chain_with_temperature():
    x = logits(5, 2)
    min_p = torch.tensor([0.0, 0.05, 0.3, 0.0, 0.01])
    assert_same_filter(tri.apply_min_p(x, min_p), ref.apply_min_p(x, min_p))
    k = torch.tensor([0, 20, 0, 5, 100])
    p = torch.tensor([0.8, 1.0, 0.95, 0.6, 0.7])
    t = torch.tensor([1.0, 0.5, 1e-7, 2.0, 0.7])  # row 2 is greedy: divides by 1
    out = tri.top_k_top_p_min_p_filter(x, k, p, min_p, t)
    assert_same_filter(out, tri.reference_filter(x, k, p, min_p, t))
    assert 1 < torch.isfinite(out[0]).sum() < VOCAB  # top-p alone really cut row 0


def test_the_sampler_on_the_triton_backend_draws_what_the_reference_draws(monkeypatch):
    """Wired behind the kernel interface: the Triton filter serves the sampler, and seeded rows
    (same filtered logits, same noise) draw the same tokens as with the torch backend."""
    from zeroserve.gpu_worker.sampler import Sampler, SamplingBatch, make_generator
    from zeroserve.kernels import get_kernels
    from zeroserve.kernels.triton import backend
    from zeroserve.shared.messages import SamplingParams

    launches = []

    def counted(*args):
        launches.append(args[0].shape)
        return tri.top_k_top_p_min_p_filter(*args)

    monkeypatch.setattr(backend, "top_k_top_p_min_p_filter", counted)

    params = [
        SamplingParams(temperature=0.8, top_k=20, seed=1),
        SamplingParams(temperature=0.0),  # greedy, beside random rows
        SamplingParams(temperature=1.3, top_p=0.7, seed=2),
        SamplingParams(min_p=0.1, seed=3),
        SamplingParams(temperature=0.5, top_k=50, top_p=0.9, min_p=0.02, seed=4),
    ]
    x = logits(len(params), 3)
    tokens = {}
    for name in ("torch", "triton"):
        kernels = get_kernels(name)
        generators = [make_generator(p.seed) if p.seed is not None else None for p in params]
        batch = SamplingBatch.build(params, [[]] * 5, [[]] * 5, generators, [0], "cpu")
        sampler = Sampler(kernels)
        tokens[name] = [sampler.sample(x, batch).token_ids for _ in range(3)]  # generators advance
    assert launches == [x.shape] * 3  # one fused launch per step
    assert tokens["triton"] == tokens["torch"]
    assert len({tuple(t) for t in tokens["torch"]}) > 1  # the draws really are random

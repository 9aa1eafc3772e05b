"""CPU graphs (kernels/cpu/graph.py): a recorded chain of C++ kernel calls replays exactly
what the eager calls compute on new inputs, lays its tensors in a shared arena without two
live tensors overlapping, and refuses what it cannot replay, naming it."""

from __future__ import annotations

import pytest
import torch

from zeroserve.kernels.cpu import build

if build._compiler() is None:
    pytest.skip("no C++ compiler here", allow_module_level=True)
from zeroserve.kernels.cpu import graph as cpu_graph  # noqa: E402
from zeroserve.kernels.cpu import ops  # noqa: E402


def _block(x, w1, w2, norm, residual):
    """An MLP block as the model runs it: norm (+ residual), gate_up, silu * up, down."""
    if residual is None:
        h, residual = ops.rms_norm(x, norm, 1e-6), x
    else:
        h, residual = ops.rms_norm(x, norm, 1e-6, residual)
    return ops.linear(ops.silu_and_mul(ops.linear(h, w1)), w2), residual


def _chain(x, layers):
    h, residual = x, None
    for w1, w2, norm in layers:
        h, residual = _block(h, w1, w2, norm, residual)
    out, _ = ops.rms_norm(h, layers[0][2], 1e-6, residual)
    return out


@pytest.fixture
def layers():
    gen = torch.Generator().manual_seed(0)
    return [
        (
            ops.PackedLinear(torch.randn(2 * 40, 24, generator=gen) * 0.2, None),
            ops.PackedLinear(torch.randn(24, 40, generator=gen) * 0.2, torch.randn(24, generator=gen)),
            torch.rand(24, generator=gen) + 0.5,
        )
        for _ in range(4)
    ]


def test_replay_equals_the_eager_calls_on_new_inputs(layers):
    x = torch.randn(3, 24)
    graph, recorded = cpu_graph.record(lambda: _chain(x, layers))
    assert len(graph) == 4 * 4 + 1 and set(graph.names) == {"zs_rms_norm", "zs_linear", "zs_silu_and_mul"}
    assert torch.equal(recorded, _chain(x, layers))
    for seed in range(3):
        x.copy_(torch.randn(3, 24, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        assert torch.equal(graph.output, _chain(x, layers))


def test_the_arena_reuses_dead_tensors_and_never_overlaps_live_ones(layers):
    x = torch.randn(5, 24)
    graph, _ = cpu_graph.record(lambda: _chain(x, layers))
    allocated = sum(o[1] for o in graph._places.values())
    assert graph.arena_bytes < allocated / 3  # 4 layers' activations in about one layer's room
    # no two tensors that share arena bytes are touched by overlapping spans of calls
    starts = sorted(graph._places)
    sizes = {start: nbytes for start, (_, nbytes) in graph._places.items()}
    life: dict[int, list[int]] = {}
    for n, call in enumerate(graph._calls):
        for k in call.pointers:
            owner = cpu_graph._owner(call.ints[k], starts, sizes)
            if owner is not None:
                life.setdefault(owner, []).append(n)
    assert set(life) == set(graph._places)
    for a, (oa, na) in graph._places.items():
        for b, (ob, nb) in graph._places.items():
            if a < b and oa < ob + nb and ob < oa + na:
                assert max(life[a]) < min(life[b]) or max(life[b]) < min(life[a])


def test_two_graphs_share_one_arena(layers):
    x1, x2 = torch.randn(1, 24), torch.randn(7, 24)
    g1, _ = cpu_graph.record(lambda: _chain(x1, layers), bind=False)
    g2, _ = cpu_graph.record(lambda: _chain(x2, layers), bind=False)
    arena = torch.empty(max(g1.arena_bytes, g2.arena_bytes), dtype=torch.uint8)
    g1.bind(arena)
    g2.bind(arena)
    g2.replay()
    g1.replay()
    assert torch.equal(g1.output, _chain(x1, layers))
    g2.replay()
    assert torch.equal(g2.output, _chain(x2, layers))
    with pytest.raises(ValueError, match="arena"):
        g2.bind(torch.empty(g2.arena_bytes - 1, dtype=torch.uint8))


def test_the_fp32_embedding_and_half_kv_write_record():
    table = torch.randn(50, 16)
    ids = torch.tensor([3, 49, 0])
    k_cache = torch.zeros(4, 4, 2, 8, dtype=torch.float16)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([1, 7, -1])

    def fn():
        rows = ops.embedding(ids, table)
        ops.write_kv(rows.view(3, 2, 8), rows.view(3, 2, 8), k_cache, v_cache, slots)
        return rows

    graph, rows = cpu_graph.record(fn)
    assert torch.equal(rows, table[ids])
    ids.copy_(torch.tensor([7, 8, 9]))
    k_cache.zero_()
    graph.replay()
    assert torch.equal(graph.output, table[ids])
    assert torch.equal(k_cache.view(16, 16)[7], table[8].to(torch.float16))
    with pytest.raises(IndexError, match="outside the table"):
        ops.embedding(torch.tensor([50]), table)


def test_torch_arithmetic_is_refused_by_name(layers):
    x = torch.randn(2, 24)
    with pytest.raises(cpu_graph.GraphUnsupported, match="aten.mul"):
        cpu_graph.record(lambda: _chain(x, layers) * 2)
    with pytest.raises(cpu_graph.GraphUnsupported, match="aten.add_"):  # in place, on a new tensor
        cpu_graph.record(lambda: ops.linear(x, layers[0][0]).add_(1))


def test_a_library_call_that_cannot_be_replayed_is_refused():
    w = torch.randn(16, 8)
    with pytest.raises(cpu_graph.GraphUnsupported, match="zs_pack_linear cannot be recorded"):
        cpu_graph.record(lambda: ops.PackedLinear(w, None) and None)


def test_replay_before_bind_is_an_error(layers):
    x = torch.randn(2, 24)
    graph, _ = cpu_graph.record(lambda: _chain(x, layers), bind=False)
    with pytest.raises(RuntimeError, match="bind"):
        graph.replay()

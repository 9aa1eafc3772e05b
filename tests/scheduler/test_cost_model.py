"""The step cost model learns a known step time formula from samples, with and without noise,
follows a machine whose speed changes, and sizes a chunk to the time left."""

from __future__ import annotations

import math
import random

import pytest

from zeroserve.scheduler_proc.cost_model import StepCostModel, StepShape, TimeBudget

# seconds: per step, per decode row, per 1k decode context, per prefill token, per 1k attention
TRUE = (0.004, 0.0008, 0.0003, 0.00012, 0.00002)


def true_time(shape: StepShape, w=TRUE) -> float:
    return sum(a * x for a, x in zip(w, shape.features(), strict=True))


def random_shape(rng: random.Random) -> StepShape:
    shape = StepShape()
    for _ in range(rng.randrange(0, 40)):
        shape.add_decode(rng.randrange(1, 3000))
    for _ in range(rng.randrange(0, 3)):
        shape.add_prefill(rng.choice([0, 128, 1024]), rng.randrange(1, 1500))
    return shape


def test_learns_an_exact_formula():
    rng = random.Random(0)
    m = StepCostModel()
    for _ in range(60):
        s = random_shape(rng)
        m.update(s, true_time(s))
    assert m.warmed_up
    for got, want in zip(m.weights, TRUE, strict=True):
        assert got == pytest.approx(want, rel=0.02)
    for _ in range(50):
        s = random_shape(rng)
        assert m.predict(s) == pytest.approx(true_time(s), rel=0.01)
    assert m.error < 0.01


def test_learns_through_noise_and_reports_its_error():
    """5% multiplicative noise: predictions of unseen steps stay close to the true time, and
    ``error`` reports about the noise's mean absolute size (0.04), not zero."""
    rng = random.Random(1)
    m = StepCostModel()
    for _ in range(500):
        s = random_shape(rng)
        m.update(s, true_time(s) * (1 + rng.gauss(0, 0.05)))
    worst = max(
        abs(m.predict(s) - true_time(s)) / true_time(s) for s in (random_shape(rng) for _ in range(200))
    )
    assert worst < 0.08
    assert 0.025 < m.error < 0.08


def test_follows_a_machine_that_slows_down():
    rng = random.Random(2)
    m = StepCostModel()
    for _ in range(200):
        s = random_shape(rng)
        m.update(s, true_time(s))
    slow = tuple(2 * w for w in TRUE)
    for _ in range(800):  # forget=0.995: old samples weigh e^-4 after 800 steps
        s = random_shape(rng)
        m.update(s, true_time(s, slow))
    s = random_shape(rng)
    assert m.predict(s) == pytest.approx(true_time(s, slow), rel=0.05)


def test_warm_up_and_bad_samples():
    m = StepCostModel(min_samples=3)
    s = StepShape()
    s.add_decode(10)
    for bad in (0.0, -1.0, math.nan, math.inf):
        m.update(s, bad)
    assert m.num_samples == 0 and not m.warmed_up and m.predict(s) == 0.0
    for _ in range(3):
        m.update(s, 0.01)
    assert m.warmed_up and m.predict(s) == pytest.approx(0.01, rel=1e-3)


@pytest.mark.parametrize("computed", [0, 100, 5000])
@pytest.mark.parametrize("seconds", [0.0005, 0.01, 0.2])
def test_max_chunk_is_the_largest_that_fits(computed, seconds):
    m = StepCostModel()
    m.weights = list(TRUE)
    k = m.max_chunk(seconds, computed)
    assert k is not None and k >= 0
    assert m.prefill_cost(computed, k) <= seconds < m.prefill_cost(computed, k + 1)


def test_time_budget_keeps_the_floor_past_the_target():
    m = StepCostModel()
    m.weights = list(TRUE)
    tb = TimeBudget(m, -0.5, floor=64)  # decodes alone already past the target
    assert tb.chunk(0, 1000) == 64
    tb.spend(0, 64)
    assert tb.chunk(64, 1000) == 0, "the floor is per step, not per chunk"
    tb = TimeBudget(m, 0.05, floor=16)
    k = tb.chunk(0, 10_000)
    assert 16 < k < 10_000 and m.prefill_cost(0, k) <= 0.05
    assert tb.chunk(0, 10) == 10

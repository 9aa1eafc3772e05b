"""The step cost model learns a known step time formula from samples, with and without noise,
follows a machine whose speed changes, keeps every weight >= 0 where least squares would not,
and sizes a chunk to the time left."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from zeroserve.scheduler_proc.cost_model import StepCostModel, StepShape, TimeBudget, nonnegative_solve

# seconds: per step, per step with a prefill, per decode row, per 1k decode context, per prefill
# token, per 1k attention
TRUE = (0.004, 0.003, 0.0008, 0.0003, 0.00012, 0.00002)


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
    assert 16 < k < 10_000 and m.prefill_step_cost + m.prefill_cost(0, k) <= 0.05
    assert m.prefill_step_cost + m.prefill_cost(0, k + 1) > 0.05, (
        "the step's fixed cost of prefilling is paid once"
    )
    assert tb.chunk(0, 10) == 10
    tb.spend(0, k)
    assert tb.seconds == pytest.approx(0.05 - m.prefill_step_cost - m.prefill_cost(0, k))
    assert tb.chunk(k, 10_000) <= 1


def best_nonnegative(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The constrained optimum by brute force: the best unconstrained solve over every subset of
    free weights whose solution is >= 0."""
    n, best, best_loss = len(b), np.zeros(len(b)), 0.0
    for k in range(1, n + 1):
        for free in itertools.combinations(range(n), k):
            idx = list(free)
            z = np.linalg.solve(a[np.ix_(idx, idx)], b[idx])
            if np.all(z >= 0):
                w = np.zeros(n)
                w[idx] = z
                loss = w @ a @ w - 2 * b @ w
                if loss < best_loss:
                    best, best_loss = w, loss
    return best


@pytest.mark.parametrize("seed", range(40))
def test_nonnegative_solve_finds_the_constrained_optimum(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(30, 6))
    x[:, 5] = x[:, 4] * 2 + rng.normal(scale=1e-3, size=30)  # two features that move together
    y = x @ rng.normal(size=6) + rng.normal(scale=0.1, size=30)
    a, b = x.T @ x + 1e-9 * np.eye(6), x.T @ y
    want = best_nonnegative(a, b)
    # cold, and warm-started from a guess of the free set (right or wrong)
    for start in (None, want > 0, rng.random(6) > 0.5, np.ones(6, dtype=bool)):
        w = nonnegative_solve(a, b, start=start)
        assert w is not None and np.all(w >= 0)
        assert w @ a @ w - 2 * b @ w == pytest.approx(want @ a @ want - 2 * b @ want, rel=1e-6, abs=1e-9)


def test_features_that_move_together_cannot_cancel_and_a_step_fills_to_its_target():
    """Equal 128-token prompts make prefill tokens and attention proportional; unconstrained least
    squares then gave one of them a negative weight, so a chunk's cost (its positive part)
    overshot the step's predicted time and every step planned under the target was short of it
    (seen on the real stack: steps predicted at 0.12-0.16 s under a 0.2 s target). Every weight
    stays >= 0, and a budget spent to its end predicts the whole step at the target."""
    rng = random.Random(3)

    def measured(shape: StepShape) -> float:  # no attention term, 5% noise
        t = (
            0.007
            + 0.004 * (shape.prefill_tokens > 0)
            + 0.0005 * shape.decode_rows
            + 0.0006 * shape.prefill_tokens
        )
        return t * (1 + rng.gauss(0, 0.05))

    m = StepCostModel()
    for i in range(300):
        shape = StepShape()
        for _ in range(rng.randrange(0, 64)):
            shape.add_decode(rng.randrange(129, 192))
        if i % 3:  # a chunk of a 128-token prompt, and the next prompt's start
            done = rng.randrange(0, 128)
            shape.add_prefill(done, 128 - done)
            shape.add_prefill(0, rng.randrange(1, 129))
        m.update(shape, measured(shape))
    assert all(w >= 0 for w in m.weights), m.weights
    decodes = StepShape()
    for _ in range(30):
        decodes.add_decode(160)
    tb = TimeBudget(m, 0.2 - m.predict(decodes), floor=16)
    step, computed = decodes.copy(), 0
    while (k := tb.chunk(computed % 128, 128 - computed % 128)) > 0:
        step.add_prefill(computed % 128, k)
        tb.spend(computed % 128, k)
        computed += k
    assert computed > 200
    assert 0.195 <= m.predict(step) <= 0.2

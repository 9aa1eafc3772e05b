"""How long a step takes, learned online from the workers' measured step times.

A step's time is modelled as linear in six features of its plan (``StepShape``)::

    t ~ w . [1, prefilling, decode_rows, decode_context / 1k, prefill_tokens, prefill_attention / 1k]

    prefilling         1 for a step that computes any prompt tokens, else 0: its own fixed cost
                       (a decode-only step replays a recorded graph, CUDA's or the CPU's; a step
                       with a prefill chunk runs eagerly)
    decode_rows        requests computing their one next token
    decode_context     tokens those decodes attend to (their KV lengths, summed)
    prefill_tokens     prompt tokens computed this step (chunks included)
    prefill_attention  sum over chunks of k * (c + k): k tokens each attending to at most
                       c + k tokens (c computed before the chunk); the quadratic term

The weights are a least-squares fit of relative error with exponential forgetting (each step's sample weighs
``forget`` times the one after it, so the fit follows a machine whose speed drifts: thermal
throttling, another tenant), solved from the weighted normal equations with a small ridge so
that a feature never seen (no prefill for a while) keeps a finite weight instead of blowing
up, and **with every weight kept >= 0** (Lawson-Hanson's active set on the normal equations):
no feature makes a step faster, and features that move together (a batch of equal prompts
makes prefill tokens and attention proportional) cannot cancel with opposite signs, which
would predict a chunk's cost (the positive parts) above what the whole step is predicted to
take, and fill steps short of the target. ``error`` is the mean relative error of each
prediction made *before* its sample was learned: the fit error on unseen steps, what a
latency target can rely on.

Pure Python and numpy (the scheduler never imports torch); one update is a few 6x6 solves.
"""

from __future__ import annotations

import math

import numpy as np

NUM_FEATURES = 6


class StepShape:
    """The features of one planned step (accumulated while the scheduler fills it)."""

    __slots__ = ("decode_rows", "decode_context", "prefill_tokens", "prefill_attention")

    def __init__(self) -> None:
        self.decode_rows = 0
        self.decode_context = 0
        self.prefill_tokens = 0
        self.prefill_attention = 0

    def copy(self) -> StepShape:
        shape = StepShape()
        shape.decode_rows, shape.decode_context = self.decode_rows, self.decode_context
        shape.prefill_tokens, shape.prefill_attention = self.prefill_tokens, self.prefill_attention
        return shape

    def add_decode(self, context: int) -> None:
        self.decode_rows += 1
        self.decode_context += context

    def add_prefill(self, num_computed: int, num_new: int) -> None:
        self.prefill_tokens += num_new
        self.prefill_attention += num_new * (num_computed + num_new)

    def features(self) -> list[float]:
        return [
            1.0,
            1.0 if self.prefill_tokens else 0.0,
            float(self.decode_rows),
            self.decode_context / 1000.0,
            float(self.prefill_tokens),
            self.prefill_attention / 1000.0,
        ]


class StepCostModel:
    """Online least squares with forgetting over ``StepShape`` features; times in seconds."""

    def __init__(self, forget: float = 0.995, min_samples: int = 16, ridge: float = 1e-6) -> None:
        if not 0.0 < forget <= 1.0:
            raise ValueError(f"forget must be in (0, 1], got {forget}")
        self.forget = forget
        self.min_samples = min_samples
        self.ridge = ridge
        self._a = np.zeros((NUM_FEATURES, NUM_FEATURES))  # sum of forget^age * x x^T
        self._b = np.zeros(NUM_FEATURES)  # sum of forget^age * x y
        self.weights = [0.0] * NUM_FEATURES
        self.num_samples = 0
        self._err_sum = 0.0  # relative errors of a-priori predictions, once warmed up
        self._err_n = 0

    @property
    def warmed_up(self) -> bool:
        return self.num_samples >= self.min_samples

    @property
    def error(self) -> float:
        """Mean relative error |predicted - measured| / measured of predictions made once warmed
        up, before learning the step they predicted (0.0 until then)."""
        return self._err_sum / self._err_n if self._err_n else 0.0

    def predict(self, shape: StepShape) -> float:
        return max(0.0, sum(w * x for w, x in zip(self.weights, shape.features(), strict=True)))

    def update(self, shape: StepShape, seconds: float) -> None:
        """Learn one measured step (ignored unless ``seconds`` is positive and finite)."""
        if not (seconds > 0.0 and math.isfinite(seconds)):
            return
        if self.warmed_up:
            self._err_sum += abs(self.predict(shape) - seconds) / seconds
            self._err_n += 1
        # weighted by 1 / seconds^2: the fit minimises relative error, so a short decode step is
        # predicted as well as a long prefill (plain least squares lets big steps' noise swamp it)
        x = np.array(shape.features()) / seconds
        self._a *= self.forget
        self._b *= self.forget
        self._a += np.outer(x, x)
        self._b += x
        self.num_samples += 1
        # the ridge is scaled per feature, so it regularises each feature alike whatever its units
        scale = np.maximum(np.diag(self._a), 1e-12)
        a = self._a + self.ridge * np.diag(scale) + 1e-12 * np.eye(NUM_FEATURES)
        w = nonnegative_solve(a, self._b, start=np.array(self.weights) > 0.0)
        if w is not None:
            self.weights = [float(v) for v in w]

    # ---------------------------------------------------------------- what a step may hold

    @property
    def prefill_step_cost(self) -> float:
        """Predicted extra seconds of a step for holding any prefill at all (paid once a step)."""
        return self.weights[1]

    def prefill_cost(self, num_computed: int, num_new: int) -> float:
        """Predicted extra seconds for a chunk of ``num_new`` tokens after ``num_computed``."""
        w = self.weights
        return w[4] * num_new + w[5] * num_new * (num_computed + num_new) / 1000.0

    def max_chunk(self, seconds: float, num_computed: int) -> int | None:
        """The most tokens a chunk after ``num_computed`` may hold within ``seconds`` (None: no
        limit, the model sees no cost in prefill tokens)."""
        a = self.weights[5] / 1000.0  # cost = a k^2 + b k
        b = self.weights[4] + a * num_computed
        if seconds <= 0.0:
            return 0
        if a <= 0.0:
            return None if b <= 0.0 else int(seconds / b)
        return int((-b + math.sqrt(b * b + 4.0 * a * seconds)) / (2.0 * a))


class TimeBudget:
    """What one step may still add in prefill: ``seconds`` of predicted time, less the step's
    fixed cost of holding any prefill (the budget is spent on prefill only), and at least
    ``floor`` tokens whatever the prediction (the minimum prefill share)."""

    __slots__ = ("model", "seconds", "floor")

    def __init__(self, model: StepCostModel, seconds: float, floor: int) -> None:
        self.model, self.seconds, self.floor = model, seconds - model.prefill_step_cost, floor

    def chunk(self, num_computed: int, want: int) -> int:
        """How many of ``want`` tokens after ``num_computed`` this step may compute."""
        if want <= self.floor:
            return want
        fits = self.model.max_chunk(self.seconds, num_computed)
        return want if fits is None else min(want, max(fits, self.floor))

    def spend(self, num_computed: int, num_new: int) -> None:
        self.seconds -= self.model.prefill_cost(num_computed, num_new)
        self.floor = max(0, self.floor - num_new)


def nonnegative_solve(
    a: np.ndarray, b: np.ndarray, start: np.ndarray | None = None, tol: float = 1e-12
) -> np.ndarray | None:
    """argmin over w >= 0 of w.a.w - 2 b.w for a symmetric positive definite ``a`` (the
    normal equations of least squares): Lawson and Hanson's active set, on the Gram matrix.
    ``start``: the weights free (> 0) in a previous solution, tried first (one solve when the
    set has not changed: the usual case from one step to the next). None if a solve fails (a
    singular or non-finite system)."""
    n = len(b)
    free = np.zeros(n, dtype=bool)
    w = np.zeros(n)
    if start is not None and start.any():
        z = _free_solve(a, b, np.where(start)[0])
        if z is not None and np.all(z > 0):
            free, w[start] = start.copy(), z
    scale = tol * (np.abs(b).max() + 1e-300)
    for _ in range(3 * n):  # each pass frees one weight; a handful of passes in practice
        grad = b - a @ w  # minus half the gradient: > 0 where raising w_j lowers the loss
        candidates = np.where(~free & (grad > scale))[0]
        if len(candidates) == 0:
            break
        free[candidates[np.argmax(grad[candidates])]] = True
        for _ in range(n):
            idx = np.where(free)[0]
            z = _free_solve(a, b, idx)
            if z is None:
                return None
            if np.all(z > 0):
                w = np.zeros(n)
                w[idx] = z
                break
            # step from w towards z as far as every weight stays >= 0, and fix the ones that hit 0
            neg = z <= 0
            wi = w[idx]
            alpha = np.min(wi[neg] / (wi[neg] - z[neg]))
            wi = wi + alpha * (z - wi)
            w = np.zeros(n)
            w[idx] = wi
            free[idx[wi <= tol * (np.abs(wi).max() + 1e-300)]] = False
            w[~free] = 0.0
            if not free.any():
                break
    return w


def _free_solve(a: np.ndarray, b: np.ndarray, idx: np.ndarray) -> np.ndarray | None:
    """The unconstrained optimum over the weights ``idx`` (the others held at 0); None if the
    system is singular or its solution not finite."""
    try:
        z = np.linalg.solve(a[np.ix_(idx, idx)], b[idx])
    except np.linalg.LinAlgError:
        return None
    return z if np.all(np.isfinite(z)) else None

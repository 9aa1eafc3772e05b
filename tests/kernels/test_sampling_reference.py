"""The torch reference sampling ops against hand-computed results."""

from __future__ import annotations

import math

import pytest
import torch

from zeroserve.kernels.reference import sampling as ops

torch.set_num_threads(2)

INF = float("inf")


def kept(logits: torch.Tensor) -> list[set[int]]:
    """Per row, the token ids that survived filtering (finite logits)."""
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in logits]


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    return float(((counts.double() - expected) ** 2 / expected).sum())


# Upper 0.1% points of the chi-square distribution (no scipy in the environment).
CHI2_CRITICAL_0_001 = {3: 16.266, 5: 20.515, 7: 24.322}


# --------------------------------------------------------------------------- token statistics


def test_token_counts_and_mask_from_ragged_lists():
    counts = ops.token_counts([[1, 1, 3], [], [0, 3, 3, 3]], vocab_size=4)
    assert counts.tolist() == [[0, 2, 0, 1], [0, 0, 0, 0], [1, 0, 0, 3]]
    mask = ops.token_mask([[2, 2], [0]], vocab_size=3)
    assert mask.tolist() == [[False, False, True], [True, False, False]]


# --------------------------------------------------------------------------- penalties

# One row, tokens:   0: positive, prompt only      1: negative, output x2
#                    2: positive, output x1        3: negative, prompt only
#                    4: positive, never seen       5: zero, in output x1
LOGITS = [2.0, -1.0, 0.5, -3.0, 1.0, 0.0]
PROMPT = [0, 3]
OUTPUT = [1, 2, 1, 5]


def penalize(presence: float, frequency: float, repetition: float, rows: int = 1) -> list:
    logits = torch.tensor([LOGITS] * rows)
    counts = ops.token_counts([OUTPUT] * rows, vocab_size=6)
    prompt = ops.token_mask([PROMPT] * rows, vocab_size=6)
    out = ops.apply_penalties(
        logits,
        counts,
        prompt,
        torch.full((rows,), presence),
        torch.full((rows,), frequency),
        torch.full((rows,), repetition),
    )
    assert logits.tolist() == [LOGITS] * rows, "apply_penalties must not modify its input"
    return out.tolist()


def test_repetition_penalty_divides_positive_multiplies_negative_prompt_or_output():
    assert penalize(0.0, 0.0, 2.0) == [[1.0, -2.0, 0.25, -6.0, 1.0, 0.0]]


def test_frequency_penalty_scales_with_output_count_only():
    assert penalize(0.0, 0.5, 1.0) == [[2.0, -2.0, 0.0, -3.0, 1.0, -0.5]]


def test_presence_penalty_once_per_output_token_only():
    assert penalize(0.25, 0.0, 1.0) == [[2.0, -1.25, 0.25, -3.0, 1.0, -0.25]]


def test_all_penalties_apply_repetition_first():
    # token 1: -1*2 = -2, -0.5*2 = -3, -0.25 -> -3.25; token 2: 0.5/2 - 0.5 - 0.25 = -0.5
    assert penalize(0.25, 0.5, 2.0) == [[1.0, -3.25, -0.5, -6.0, 1.0, -0.75]]


def test_penalties_are_per_row():
    logits = torch.tensor([LOGITS, LOGITS])
    counts = ops.token_counts([OUTPUT, OUTPUT], 6)
    prompt = ops.token_mask([PROMPT, PROMPT], 6)
    out = ops.apply_penalties(
        logits,
        counts,
        prompt,
        torch.tensor([0.0, 0.25]),
        torch.tensor([0.0, 0.5]),
        torch.tensor([1.0, 2.0]),
    )
    assert out.tolist() == [LOGITS, [1.0, -3.25, -0.5, -6.0, 1.0, -0.75]]


# --------------------------------------------------------------------------- temperature / filters


def test_temperature_divides_and_leaves_greedy_rows_finite():
    logits = torch.tensor([[1.0, -2.0], [1.0, -2.0]])
    out = ops.apply_temperature(logits, torch.tensor([0.5, 0.0]))
    assert out.tolist() == [[2.0, -4.0], [1.0, -2.0]]


def test_top_k_keeps_k_largest_and_disables_for_nonpositive_or_full_k():
    row = [5.0, 1.0, 4.0, 2.0, 3.0]
    logits = torch.tensor([row] * 5)
    out = ops.apply_top_k(logits, torch.tensor([2, 1, 0, -1, 5]))
    assert kept(out) == [{0, 2}, {0}, set(range(5)), set(range(5)), set(range(5))]
    assert out[0, 0] == 5.0 and out[0, 2] == 4.0  # survivors keep their logits


def test_top_k_keeps_ties_with_the_kth():
    out = ops.apply_top_k(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), torch.tensor([1]))
    assert kept(out) == [{1, 2}]


# probabilities 0.5, 0.2, 0.15, 0.1, 0.05 placed at shuffled vocab positions
PROBS = {3: 0.5, 0: 0.2, 4: 0.15, 1: 0.1, 2: 0.05}
PROB_LOGITS = torch.tensor([[math.log(PROBS[i]) + 1.7 for i in range(5)]])


@pytest.mark.parametrize(
    "p, expected",
    [
        (0.4, {3}),
        (0.6, {3, 0}),
        (0.8, {3, 0, 4}),
        (0.9, {3, 0, 4, 1}),
        (0.99, set(range(5))),
        (1.0, set(range(5))),
        (0.0, {3}),
    ],
)
def test_top_p_keeps_smallest_set_reaching_p(p, expected):
    out = ops.apply_top_p(PROB_LOGITS, torch.tensor([p]))
    assert kept(out) == [expected]
    assert torch.equal(out[0, sorted(expected)], PROB_LOGITS[0, sorted(expected)])


def test_top_p_is_per_row():
    out = ops.apply_top_p(PROB_LOGITS.repeat(3, 1), torch.tensor([0.4, 0.8, 1.0]))
    assert kept(out) == [{3}, {3, 0, 4}, set(range(5))]


@pytest.mark.parametrize(
    "min_p, expected",
    [(0.0, set(range(5))), (0.25, {3, 0, 4}), (0.35, {3, 0}), (0.5, {3}), (1.0, {3})],
)
def test_min_p_drops_tokens_below_fraction_of_max_prob(min_p, expected):
    # threshold = min_p * 0.5: 0.125 keeps 0.15; 0.175 keeps 0.2; 0.25 drops 0.2
    out = ops.apply_min_p(PROB_LOGITS, torch.tensor([min_p]))
    assert kept(out) == [expected]


def test_top_k_then_top_p_renormalizes_over_top_k_survivors():
    # top-3 renormalized: 0.5/0.85 = 0.588 >= 0.58 -> only the top token; without the
    # renormalization 0.5 < 0.58 would keep two.
    out = ops.apply_top_k_top_p(PROB_LOGITS, torch.tensor([3]), torch.tensor([0.58]))
    assert kept(out) == [{3}]
    assert kept(ops.apply_top_p(PROB_LOGITS, torch.tensor([0.58]))) == [{3, 0}]
    out = ops.apply_top_k_top_p(PROB_LOGITS, torch.tensor([3]), torch.tensor([1.0]))
    assert kept(out) == [{3, 0, 4}]


def test_top_k_with_and_without_sort_agree():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=gen)
    k = torch.tensor([0, 1, 7, 50, 299, 300])
    by_topk = ops.apply_top_k(logits, k)
    by_sort = ops.apply_top_k_top_p(logits, k, torch.ones(6))
    assert torch.equal(by_topk, by_sort)
    assert [len(s) for s in kept(by_topk)] == [300, 1, 7, 50, 299, 300]
    assert torch.equal(ops.apply_top_k(logits, k, max_k=299), by_topk)


def nucleus_by_definition(row: torch.Tensor, k: int, p: float) -> set[int]:
    """Top-k then top-p for one row the slow, obvious way, in float64."""
    order = row.double().sort(descending=True).indices.tolist()
    if 0 < k < len(order):
        order = order[:k]
    probs = row.double()[order].softmax(-1).tolist()
    keep, mass = [], 0.0
    for token, q in zip(order, probs):
        if keep and (mass >= p or p <= 0.0):
            break
        keep.append(token)
        mass += q
    return set(keep)


@pytest.mark.parametrize("candidates", [ops.TOP_P_CANDIDATES, 8])
def test_top_k_top_p_match_the_definition_on_random_rows(monkeypatch, candidates):
    # 8 candidates forces the full-sort fallback for wide nuclei; 1024 covers all of V = 300.
    monkeypatch.setattr(ops, "TOP_P_CANDIDATES", candidates)
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(8, 300, generator=gen) * torch.tensor([0.3, 1, 3, 8] * 2)[:, None]
    k = torch.tensor([0, 0, 0, 0, 5, 40, 0, 300])
    p = torch.tensor([0.9, 0.5, 0.95, 0.3, 0.9, 0.99, 1.0, 0.7])
    out = ops.apply_top_k_top_p(logits, k, p)
    for row in range(8):
        assert kept(out[row : row + 1])[0] == nucleus_by_definition(
            logits[row], int(k[row]), float(p[row])
        ), f"row {row}"
    assert torch.equal(out[6], logits[6])


# --------------------------------------------------------------------------- sampling


def test_sample_from_probs_matches_distribution():
    probs = torch.tensor([0.3, 0.25, 0.2, 0.1, 0.08, 0.05, 0.015, 0.005])
    torch.manual_seed(1234)
    tokens = ops.sample_from_probs(probs.repeat(20_000, 1))
    counts = torch.bincount(tokens, minlength=8)
    assert chi_square(counts, probs) < CHI2_CRITICAL_0_001[7]
    # and the test can fail: the same counts are far from a flatter distribution
    flatter = (probs + 0.05) / (probs + 0.05).sum()
    assert chi_square(counts, flatter) > 10 * CHI2_CRITICAL_0_001[7]


def test_sample_from_probs_never_picks_zero_probability_tokens():
    probs = torch.zeros(500, 64)
    probs[:, 5], probs[:, 40] = 0.999, 0.001
    torch.manual_seed(0)
    assert set(ops.sample_from_probs(probs).tolist()) <= {5, 40}


def test_seeded_row_is_independent_of_batch_and_position():
    gen = torch.Generator().manual_seed(7)
    probs = torch.rand(4, 50, generator=gen).softmax(-1)
    g = ops.make_generator(99)
    alone = [ops.sample_from_probs(probs[2:3], [g]).item() for _ in range(10)]
    g, other = ops.make_generator(99), ops.make_generator(5)
    # the same probs row at position 0, beside an unseeded and a differently seeded row
    batch = torch.stack([probs[2], probs[0], probs[1]])
    together = [ops.sample_from_probs(batch, [g, None, other])[0].item() for _ in range(10)]
    assert together == alone
    assert len(set(alone)) > 1  # it really samples


def test_make_generator_on_device():
    g = ops.make_generator(3, "cpu")
    assert g.device.type == "cpu" and g.initial_seed() == 3


def test_gather_logprobs_token_and_top_sorted():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 5.5, -1.0, 0.0]])
    logprobs = ops.compute_logprobs(logits)
    chosen, values, ids = ops.gather_logprobs(logprobs, torch.tensor([2, 0]), num_top=2)
    expected = logits.log_softmax(-1)
    assert torch.allclose(chosen, torch.stack([expected[0, 2], expected[1, 0]]))
    assert ids.tolist() == [[1, 3], [1, 0]]
    assert torch.allclose(values, expected.gather(1, ids))

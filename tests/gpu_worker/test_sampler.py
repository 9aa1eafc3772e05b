"""Sampler: per-request parameters in one batch, seeds, greedy, min_tokens and logprobs."""

from __future__ import annotations

import pytest
import torch

from zeroserve.gpu_worker.sampler import Sampler, SamplingBatch, make_generator
from zeroserve.kernels.reference import sampling as ops
from zeroserve.kernels.reference.backend import ReferenceKernels
from zeroserve.shared.messages import SamplingParams

torch.set_num_threads(2)

V = 200
EOS = [0]


def build(params, prompts=None, outputs=None, generators=None, eos=EOS):
    n = len(params)
    return SamplingBatch.build(
        params,
        prompts if prompts is not None else [[]] * n,
        outputs if outputs is not None else [[]] * n,
        generators if generators is not None else [None] * n,
        eos,
        "cpu",
    )


def random_logits(rows: int, vocab: int = V, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


SAMPLER = Sampler()


# --------------------------------------------------------------------------- greedy


def test_temperature_zero_is_argmax_and_leaves_logits_alone():
    logits = random_logits(8)
    before = logits.clone()
    out = SAMPLER.sample(logits, build([SamplingParams(temperature=0.0)] * 8))
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.sampled.tolist() == out.token_ids and out.logprobs == [None] * 8
    assert torch.equal(logits, before)


def test_top_k_one_equals_greedy_even_at_high_temperature():
    logits = random_logits(16, seed=1, scale=0.1)  # nearly flat: sampling would differ
    params = [SamplingParams(temperature=2.0, top_k=1, seed=i) for i in range(16)]
    out = SAMPLER.sample(logits, build(params))
    assert out.token_ids == logits.argmax(-1).tolist()


def test_greedy_rows_do_not_draw_from_their_generator():
    g = make_generator(5)
    state = g.get_state()
    params = [SamplingParams(temperature=0.0, seed=5), SamplingParams(temperature=1.0)]
    logits = random_logits(2)
    out = SAMPLER.sample(logits, build(params, generators=[g, None]))
    assert torch.equal(g.get_state(), state)
    assert out.token_ids[0] == logits[0].argmax().item()


def test_mixed_batch_keeps_greedy_rows_greedy():
    logits = random_logits(6, seed=2, scale=0.1)
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.5) for i in range(6)]
    torch.manual_seed(0)
    out = SAMPLER.sample(logits, build(params))
    argmax = logits.argmax(-1).tolist()
    assert [out.token_ids[i] for i in (1, 3, 5)] == [argmax[i] for i in (1, 3, 5)]
    assert [out.token_ids[i] for i in (0, 2, 4)] != [argmax[i] for i in (0, 2, 4)]


def test_bf16_logits_are_accepted():
    logits = random_logits(4).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.0, logprobs=2)] * 2 + [SamplingParams(top_p=0.9)] * 2
    out = SAMPLER.sample(logits, build(params))
    assert out.token_ids[:2] == logits[:2].float().argmax(-1).tolist()


# --------------------------------------------------------------------------- seeds


def run_steps(logits_per_step, params, generators, row) -> list[int]:
    return [
        SAMPLER.sample(logits, build(params, generators=generators)).token_ids[row]
        for logits in logits_per_step
    ]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.9, seed=42),
        SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.01, seed=42),
    ],
)
def test_seeded_request_reproduces_alone_and_in_any_batch_position(params):
    steps = [random_logits(1, seed=s, scale=0.5)[0] for s in range(8)]
    alone = run_steps([x[None] for x in steps], [params], [make_generator(42)], 0)
    assert alone == run_steps([x[None] for x in steps], [params], [make_generator(42)], 0)
    assert len(set(alone)) > 1

    # row 2 of 4, beside an unseeded row and a differently seeded one with other filters
    others = [
        SamplingParams(temperature=1.0),
        SamplingParams(top_k=5, seed=1),
        SamplingParams(temperature=0.0),
    ]
    batch_params = others[:2] + [params] + others[2:]
    gens = [None, make_generator(1), make_generator(42), None]
    batched = [
        torch.cat([random_logits(2, seed=100 + i), x[None], random_logits(1, seed=200 + i)])
        for i, x in enumerate(steps)
    ]
    assert run_steps(batched, batch_params, gens, 2) == alone

    # and first, with the rows shuffled
    gens = [make_generator(42), None, make_generator(1)]
    batched = [torch.cat([x[None], random_logits(2, seed=300 + i)]) for i, x in enumerate(steps)]
    assert run_steps(batched, [params, others[0], others[1]], gens, 0) == alone


def test_different_seeds_give_different_tokens():
    logits = random_logits(1, seed=3, scale=0.2).expand(2, V)
    params = [SamplingParams(seed=1), SamplingParams(seed=2)]
    gens = [make_generator(1), make_generator(2)]
    runs = [SAMPLER.sample(logits, build(params, generators=gens)).token_ids for _ in range(6)]
    assert [r[0] for r in runs] != [r[1] for r in runs]


# --------------------------------------------------------------------------- distributions


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    keep = expected > 0
    return float(((counts.double()[keep] - expected[keep]) ** 2 / expected[keep]).sum())


CHI2_CRITICAL_0_001 = {2: 13.816, 5: 20.515}  # upper 0.1% points (no scipy here)


def test_temperature_sampling_matches_softmax_over_t():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, -2.0])
    n = 20_000
    torch.manual_seed(2024)
    out = SAMPLER.sample(logits.expand(n, 6), build([SamplingParams(temperature=0.7)] * n))
    counts = torch.bincount(out.sampled, minlength=6)
    assert chi_square(counts, (logits / 0.7).softmax(-1)) < CHI2_CRITICAL_0_001[5]
    # the statistic can tell temperatures apart: T = 1 is far off
    assert chi_square(counts, logits.softmax(-1)) > 10 * CHI2_CRITICAL_0_001[5]


def test_filtered_sampling_renormalizes_over_survivors():
    # top_k=4 drops tokens 4, 5; top_p=0.8 over the renormalized rest drops token 3.
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, -2.0])
    n = 20_000
    torch.manual_seed(7)
    params = [SamplingParams(temperature=1.0, top_k=4, top_p=0.8)] * n
    out = SAMPLER.sample(logits.expand(n, 6), build(params))
    counts = torch.bincount(out.sampled, minlength=6)
    assert counts[3:].sum() == 0
    expected = torch.zeros(6)
    expected[:3] = logits[:3].softmax(-1)
    assert chi_square(counts, expected) < CHI2_CRITICAL_0_001[2]


# --------------------------------------------------------------------------- penalties / min_tokens


def test_penalties_change_the_greedy_choice_exactly_as_the_op():
    logits = random_logits(3, seed=4)
    top = logits.argmax(-1).tolist()
    prompts = [[top[0]], [5, 6], [7]]
    outputs = [[1], [top[1]] * 3, []]
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1e3),
        SamplingParams(temperature=0.0, frequency_penalty=10.0),
        SamplingParams(temperature=0.0, presence_penalty=0.5),
    ]
    out = SAMPLER.sample(logits, build(params, prompts, outputs))
    expected = ops.apply_penalties(
        logits,
        ops.token_counts(outputs, V),
        ops.token_mask(prompts, V),
        torch.tensor([0.0, 0.0, 0.5]),
        torch.tensor([0.0, 10.0, 0.0]),
        torch.tensor([1e3, 1.0, 1.0]),
    ).argmax(-1)
    assert out.token_ids == expected.tolist()
    assert out.token_ids[0] != top[0] and out.token_ids[1] != top[1]
    assert out.token_ids[2] == top[2]  # its prompt/output tokens are not the top one


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(1, V)
    logits[0, 0], logits[0, 9], logits[0, 3] = 9.0, 8.0, 7.0  # EOS, stop id, ordinary
    for ignore_eos in (False, True):
        params = [SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[9], ignore_eos=ignore_eos)]
        short = SAMPLER.sample(logits, build(params, outputs=[[5]]))
        assert short.token_ids == [3]
        reached = SAMPLER.sample(logits, build(params, outputs=[[5, 5]]))
        assert reached.token_ids == [0]


def test_min_tokens_masks_random_rows_too():
    logits = torch.zeros(300, 4)
    logits[:, 0], logits[:, 2] = 5.0, 5.0  # EOS and stop id would win almost always
    params = [SamplingParams(min_tokens=1, stop_token_ids=[2])] * 300
    torch.manual_seed(0)
    out = SAMPLER.sample(logits, build(params))
    assert set(out.token_ids) <= {1, 3}


# --------------------------------------------------------------------------- logprobs


def test_logprobs_are_raw_log_softmax_and_top_n_sorted():
    logits = random_logits(4, seed=5)
    params = [
        SamplingParams(temperature=0.5, repetition_penalty=1.5, logprobs=5, seed=1),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, presence_penalty=2.0, logprobs=0),
        SamplingParams(top_k=3, logprobs=50),
    ]
    gens = [make_generator(1), None, None, None]
    before = logits.clone()
    out = SAMPLER.sample(logits, build(params, [[1, 2]] * 4, [[3]] * 4, gens))
    assert torch.equal(logits, before)
    raw = logits.log_softmax(-1)
    assert out.logprobs[1] is None
    for row, n in ((0, 5), (2, 0), (3, 20)):
        lp = out.logprobs[row]
        assert lp.logprob == pytest.approx(raw[row, out.token_ids[row]].item(), abs=1e-5)
        assert len(lp.top) == n
        values = [t.logprob for t in lp.top]
        assert values == sorted(values, reverse=True)
        want = raw[row].topk(n) if n else None
        assert [t.token_id for t in lp.top] == (want.indices.tolist() if n else [])
        assert values == pytest.approx(want.values.tolist() if n else [], abs=1e-5)


def test_all_rows_logprobs_take_the_full_batch_path():
    logits = random_logits(3, seed=6)
    out = SAMPLER.sample(logits, build([SamplingParams(temperature=0.0, logprobs=1)] * 3))
    raw = logits.log_softmax(-1)
    for row in range(3):
        token = out.token_ids[row]
        assert token == logits[row].argmax().item()
        assert out.logprobs[row].top[0].token_id == token
        assert out.logprobs[row].logprob == pytest.approx(raw[row, token].item(), abs=1e-5)


# --------------------------------------------------------------------------- build


def test_build_skips_unused_work():
    batch = build([SamplingParams(temperature=0.0)] * 3)
    assert batch.fast_greedy and batch.generators is None
    batch = build([SamplingParams(top_k=20), SamplingParams(temperature=0.0, top_p=0.5)])
    assert batch.top_k is not None and batch.top_p is None  # greedy rows do not filter
    assert batch.temperature is None and batch.min_p is None and not batch.needs_penalties
    assert batch.max_top_k == 20


def test_build_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="output_ids has 1 entries for 2 params"):
        SamplingBatch.build([SamplingParams()] * 2, [[], []], [[]], [None, None], EOS, "cpu")


class SpyKernels(ReferenceKernels):
    """The torch backend, recording what the sampler asks of it."""

    def __init__(self):
        self.filters, self.argmaxes = [], 0

    def sampling_filter(self, logits, temperature, min_p, top_k, top_p, max_top_k=None):
        self.filters.append((temperature, min_p, top_k.tolist(), top_p, max_top_k))
        return super().sampling_filter(logits, temperature, min_p, top_k, top_p, max_top_k)

    def argmax_rows(self, x):
        self.argmaxes += 1
        return super().argmax_rows(x)


def test_sampler_takes_its_filter_and_argmax_from_the_kernel_backend():
    kernels = SpyKernels()
    sampler = Sampler(kernels)
    params = [SamplingParams(top_k=3), SamplingParams(temperature=0.0, top_k=7)]
    out = sampler.sample(random_logits(2), build(params))
    # the greedy row's top_k is switched off; the host knows the largest k (no device sync)
    assert kernels.filters == [(None, None, [3, 0], None, 3)]
    assert kernels.argmaxes == 1  # the greedy row's token
    assert len(out.token_ids) == 2
    sampler.sample(random_logits(4), build([SamplingParams(temperature=0.0)] * 4))
    assert kernels.argmaxes == 2 and len(kernels.filters) == 1  # all greedy: no filter


# --------------------------------------------------------------------------- a top_k past the vocabulary


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_a_huge_top_k_costs_what_top_k_vocab_costs_and_samples_the_same(monkeypatch, top_p):
    """top_k >= V keeps every token. As the batch's largest k it used to buy every row a
    full-vocabulary topk; it must cost (and sample) what top_k = V, i.e. no top-k, does."""
    widths: list[int] = []
    topk = torch.Tensor.topk

    def spy(self, k, *args, **kwargs):
        widths.append(k)
        return topk(self, k, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "topk", spy)
    vocab = 4 * ops.TOP_P_CANDIDATES  # top-p's own candidates are not the whole vocabulary
    logits = random_logits(6, vocab=vocab, seed=9)
    runs = {}
    for top_k in (vocab, 2**62, 2**63 - 1, 0):
        widths.clear()
        params = [SamplingParams(temperature=0.8, top_p=top_p, top_k=top_k, seed=i) for i in range(6)]
        generators = [make_generator(i) for i in range(6)]
        out = SAMPLER.sample(logits, build(params, generators=generators))
        runs[top_k] = (out.token_ids, list(widths))
    assert runs[2**62] == runs[vocab] == runs[2**63 - 1] == runs[0]  # as if top_k were off
    assert all(w < vocab for w in runs[2**62][1]), f"a full-vocabulary topk: {runs[2**62][1]}"


def test_a_real_top_k_next_to_a_huge_one_still_filters_its_row():
    logits = random_logits(2, seed=10, scale=0.1)  # nearly flat: top_k decides what can come out
    allowed = set(logits[1].topk(3).indices.tolist())
    for seed in range(20):
        params = [SamplingParams(top_k=2**40, seed=seed), SamplingParams(top_k=3, seed=seed)]
        out = SAMPLER.sample(logits, build(params, generators=[make_generator(seed)] * 2))
        assert out.token_ids[1] in allowed

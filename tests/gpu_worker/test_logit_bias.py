"""logit_bias in the sampler: added before greedy and random picks, only on the rows that ask,
never to the caller's logits or the reported (raw) logprobs; rows without it pay nothing."""

from __future__ import annotations

import torch

from zeroserve.gpu_worker.sampler import Sampler, SamplingBatch
from zeroserve.kernels.cpu.backend import CpuKernels
from zeroserve.shared.messages import SamplingParams

torch.set_num_threads(2)

V = 200


def build(params):
    n = len(params)
    return SamplingBatch.build(params, [[]] * n, [[]] * n, [None] * n, [0], "cpu")


def logits_of(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 2.0


def test_bias_moves_greedy_rows_and_leaves_others_and_the_callers_logits_alone():
    logits = logits_of(4)
    before = logits.clone()
    argmax = logits.argmax(-1).tolist()
    target = (argmax[0] + 7) % V
    params = [
        SamplingParams(temperature=0.0, logit_bias={target: 100.0}),  # pushed up: becomes the pick
        SamplingParams(temperature=0.0, logit_bias={argmax[1]: -100.0}),  # pushed down: the runner-up wins
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logit_bias={(argmax[3] + 1) % V: 0.001}),  # too small to matter
    ]
    batch = build(params)
    assert not batch.fast_greedy  # the bare-argmax shortcut would skip the bias
    out = Sampler().sample(logits, batch)
    runner_up = logits[1].topk(2).indices[1].item()
    assert out.token_ids == [target, runner_up, argmax[2], argmax[3]]
    assert torch.equal(logits, before)


def test_bias_applies_to_sampled_rows_and_logprobs_stay_raw():
    logits = logits_of(2, seed=3)
    target = 17
    params = [SamplingParams(temperature=1.0, logit_bias={target: 100.0}, logprobs=0, seed=1)] * 2
    out = Sampler().sample(logits, build(params))
    assert out.token_ids == [target, target]  # +100 dwarfs every other logit: no draw can miss it
    raw = torch.log_softmax(logits.float(), -1)[:, target].tolist()
    assert [lp.logprob for lp in out.logprobs] == torch.tensor(raw).tolist()


def test_rows_without_bias_keep_the_fast_path_and_the_cpu_backend_agrees():
    assert build([SamplingParams(temperature=0.0)] * 3).fast_greedy
    assert build([SamplingParams(temperature=0.0)] * 3).logit_bias is None
    logits = logits_of(3, seed=5)
    params = [SamplingParams(temperature=0.0, logit_bias={5: 50.0, 6: -3.0})] * 3
    ref = Sampler().sample(logits, build(params)).token_ids
    cpu = Sampler(CpuKernels()).sample(logits, build(params)).token_ids
    assert ref == cpu == [5, 5, 5]

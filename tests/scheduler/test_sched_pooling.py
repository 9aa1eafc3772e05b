"""Embedding requests (EngineRequest.pooling) in the scheduler: prefill only, whole in one step,
finished by the worker's pooled vector, blocks freed; admission against the context and the
step budget (scheduler_proc/pooling.py)."""

from __future__ import annotations

import time

import pytest

from zeroserve.scheduler_proc.admission import AdmissionError
from zeroserve.scheduler_proc.scheduler import Scheduler, SchedulerConfig
from zeroserve.shared.messages import (
    EngineRequest,
    PooledOutput,
    PoolingParams,
    SamplingParams,
    StepPlan,
    StepResult,
)

BS = 4


def make(num_blocks=64, budget=32, max_model_len=40, caching=True) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            num_blocks=num_blocks,
            block_size=BS,
            max_num_seqs=8,
            max_num_batched_tokens=budget,
            max_model_len=max_model_len,
            eos_token_ids=(2,),
            enable_prefix_caching=caching,
        )
    )


def embed(rid: str, n: int, first: int = 100) -> EngineRequest:
    return EngineRequest(
        request_id=rid,
        prompt_token_ids=list(range(first, first + n)),
        params=SamplingParams(max_tokens=1),
        arrival_time=time.time(),
        pooling=PoolingParams(),
    )


def gen(rid: str, n: int, max_tokens: int = 4) -> EngineRequest:
    return EngineRequest(
        request_id=rid,
        prompt_token_ids=list(range(100, 100 + n)),
        params=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
        arrival_time=time.time(),
    )


def vector(rid: str) -> bytes:
    return rid.encode().ljust(8, b"\0")


def result(plan: StepPlan) -> StepResult:
    """The worker's answer: a vector for each embedding request that completed its prompt, a
    token (7) for each other request that reached the end of its known tokens."""
    pooled, ids = [], []
    for n in plan.new:
        if n.num_computed_tokens + n.num_new_tokens == len(n.token_ids):
            if n.pooling is not None:
                pooled.append(PooledOutput(request_id=n.request_id, data=vector(n.request_id)))
            else:
                ids.append(n.request_id)
    ids += [r.request_id for r in plan.running]  # decodes and prefill chunks (a chunk: ignored)
    return StepResult(step_id=plan.step_id, request_ids=ids, sampled_token_ids=[7] * len(ids), pooled=pooled)


def test_embeddings_run_whole_with_generation_and_end_with_their_vector():
    s = make()
    s.add_request(gen("g", 6, max_tokens=3))
    for rid, n in (("e1", 5), ("e2", 11), ("e3", 1)):
        s.add_request(embed(rid, n))
    plan = s.schedule()
    new = {n.request_id: n for n in plan.new}
    assert set(new) == {"g", "e1", "e2", "e3"}
    for rid, n in (("e1", 5), ("e2", 11), ("e3", 1)):  # whole prompt, never from a cache
        assert (new[rid].num_computed_tokens, new[rid].num_new_tokens) == (0, n)
        assert new[rid].pooling == PoolingParams()
    assert new["g"].pooling is None
    deltas = {d.request_id: d for d in s.update_from_output(result(plan))}
    for rid, n in (("e1", 5), ("e2", 11), ("e3", 1)):
        d = deltas[rid]
        assert (d.finish_reason, d.token_ids, d.embedding, d.num_prompt_tokens) == (
            "stop",
            [],
            vector(rid),
            n,
        )
    assert deltas["g"].token_ids == [7] and deltas["g"].finish_reason is None
    s.check_invariants()
    while s.has_unfinished():
        s.update_from_output(result(s.schedule()))
    assert s.num_free_blocks == 64  # nothing held: every block free (or cached, ref count 0)
    s.check_invariants()


def test_an_embedding_that_does_not_fit_the_step_waits_whole_instead_of_being_chunked():
    s = make(budget=16)
    s.add_request(embed("e1", 10))
    s.add_request(embed("e2", 10))  # 6 tokens of budget left after e1: waits for the next step
    s.add_request(embed("e3", 3))  # behind it: no skipping ahead
    plan = s.schedule()
    assert [(n.request_id, n.num_new_tokens) for n in plan.new] == [("e1", 10)]
    s.update_from_output(result(plan))
    plan = s.schedule()
    assert [(n.request_id, n.num_new_tokens) for n in plan.new] == [("e2", 10), ("e3", 3)]
    assert {d.request_id for d in s.update_from_output(result(plan))} == {"e2", "e3"}
    assert not s.has_unfinished()


def test_embeddings_neither_read_nor_fill_the_prefix_cache():
    s = make(budget=64)
    s.add_request(gen("g", 12, max_tokens=1))
    s.update_from_output(result(s.schedule()))  # g's 3 full blocks are cached now
    s.add_request(embed("e", 12))  # same tokens
    plan = s.schedule()
    (new,) = plan.new
    assert (new.num_computed_tokens, new.num_new_tokens) == (0, 12)
    s.update_from_output(result(plan))
    assert s.prefix_cache_hits == 0


@pytest.mark.parametrize(
    ("n", "code"),
    [(41, "context_length_exceeded"), (33, "context_length_exceeded"), (0, None)],
)
def test_embedding_admission(n, code):
    s = make(budget=32, max_model_len=40)
    with pytest.raises(AdmissionError) as e:
        s.add_request(embed("e", n))
    assert (e.value.status, e.value.param, e.value.code) == (400, "input", code)
    make(budget=64, max_model_len=40).add_request(embed("ok", 40))  # all prompt: no output to make room for


def test_a_pooled_result_for_a_request_aborted_meanwhile_is_dropped():
    s = make()
    s.add_request(embed("e", 5))
    plan = s.schedule()
    assert s.abort("e")
    assert s.update_from_output(result(plan)) == []
    s.check_invariants()
    assert s.num_free_blocks == 64

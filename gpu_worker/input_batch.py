"""Per-request state on the worker, and turning a StepPlan into model inputs.

The scheduler sends diffs; the worker keeps, for every request it holds, every known token
(prompt + what it sampled), its block table and how many tokens are in the KV cache.

A plan is checked as a whole before any state changes (``RequestStates.apply``): an unknown
request id, a block id out of range or a step past the known tokens raises PlanError, and
the states are as they were, so one bad plan cannot corrupt memory or later steps.

Flat inputs of one step (three sequences: a prefill chunk, a decode, a prefix-hit prefill)::

    input_ids  | t5 t6 t7 t8 | t40 | t16 t17 t18 |
    positions  |  5  6  7  8 |  40 |  16  17  18 |
    slot       |  B0[p//bs]*bs + p%bs for each p |
    logits_indices: last token of each sequence that samples -> [3, 4, 7] (s0 when 8 ends it)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zeroserve.kernels.metadata import AttentionMetadata
from zeroserve.shared.messages import PoolingParams, SamplingParams, StepPlan


class PlanError(ValueError):
    """A StepPlan that does not fit the worker's state (a scheduler/worker mismatch)."""


@dataclass
class RequestState:
    request_id: str
    token_ids: list[int]  # every known token: prompt (+ resumed output) + sampled here
    num_prompt_tokens: int  # token_ids[:num_prompt_tokens] count as the prompt for penalties
    block_ids: list[int]
    num_computed_tokens: int  # tokens whose K/V are in the cache
    params: SamplingParams
    generator: torch.Generator | None
    pooling: PoolingParams | None = None  # an embedding request: pooled, never sampled (pooling.py)


@dataclass
class ScheduledRequest:
    state: RequestState
    num_new_tokens: int
    samples: bool  # this step reaches the end of the known tokens


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [B] int64: rows of the hidden states to compute logits for
    sampling: list[RequestState]  # the B requests that sample, in plan order


class RequestStates:
    """The worker's view of every request it holds."""

    def __init__(self, num_blocks: int, block_size: int, max_model_len: int, make_generator):
        self.num_blocks, self.block_size, self.max_model_len = num_blocks, block_size, max_model_len
        self.make_generator = make_generator
        self.requests: dict[str, RequestState] = {}

    def __len__(self) -> int:
        return len(self.requests)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.requests

    def clear(self) -> None:
        self.requests.clear()

    # ------------------------------------------------------------------ checks

    def _check_blocks(self, request_id: str, block_ids: list[int]) -> None:
        for b in block_ids:
            if not 0 <= b < self.num_blocks:
                raise PlanError(
                    f"request {request_id!r}: block id {b} is out of range (the worker's KV cache has "
                    f"{self.num_blocks} blocks, ids 0..{self.num_blocks - 1}); the scheduler and the worker "
                    "disagree on the cache size"
                )

    def _check_step(self, request_id: str, start: int, num_new: int, num_known: int, num_blocks: int) -> None:
        end = start + num_new
        if num_new <= 0:
            raise PlanError(
                f"request {request_id!r}: num_new_tokens={num_new}; a scheduled request computes >= 1 token"
            )
        if end > num_known:
            raise PlanError(
                f"request {request_id!r}: computing tokens {start}..{end - 1} but the worker knows only "
                f"{num_known} tokens; the plan is ahead of the worker's state"
            )
        if end > num_blocks * self.block_size:
            raise PlanError(
                f"request {request_id!r}: {end} tokens need {-(-end // self.block_size)} blocks of "
                f"{self.block_size} but its block table has {num_blocks}"
            )
        if end > self.max_model_len:
            raise PlanError(f"request {request_id!r}: {end} tokens exceed max_model_len={self.max_model_len}")

    def _validate(self, plan: StepPlan) -> None:
        finished = set(plan.finished_ids)
        seen: set[str] = set()
        for new in plan.new:
            rid = new.request_id
            if rid in seen:
                raise PlanError(f"request {rid!r} appears twice in plan {plan.step_id}")
            seen.add(rid)
            if rid in self.requests and rid not in finished:
                raise PlanError(
                    f"request {rid!r} is sent as new but the worker already holds it; a preempted "
                    "request must be listed in finished_ids before it is sent again"
                )
            if not 0 <= new.num_computed_tokens:
                raise PlanError(f"request {rid!r}: num_computed_tokens={new.num_computed_tokens} < 0")
            if not (new.num_prompt_tokens == -1 or 0 <= new.num_prompt_tokens <= len(new.token_ids)):
                raise PlanError(
                    f"request {rid!r}: num_prompt_tokens={new.num_prompt_tokens} is not in "
                    f"0..{len(new.token_ids)} (or -1)"
                )
            self._check_blocks(rid, new.block_ids)
            self._check_step(
                rid, new.num_computed_tokens, new.num_new_tokens, len(new.token_ids), len(new.block_ids)
            )
        for run in plan.running:
            rid = run.request_id
            if rid in seen:
                raise PlanError(f"request {rid!r} appears twice in plan {plan.step_id}")
            seen.add(rid)
            state = self.requests.get(rid)
            if state is None or rid in finished:
                raise PlanError(
                    f"plan {plan.step_id} continues request {rid!r}, which the worker does not hold "
                    "(never sent as new, or already finished)"
                )
            self._check_blocks(rid, run.new_block_ids)
            self._check_step(
                rid,
                state.num_computed_tokens,
                run.num_new_tokens,
                len(state.token_ids),
                len(state.block_ids) + len(run.new_block_ids),
            )

    # ------------------------------------------------------------------ state

    def apply(self, plan: StepPlan) -> list[ScheduledRequest]:
        """Check the plan, then forget finished requests, add new ones, extend running ones.
        Returns the scheduled requests in plan order (new, then running)."""
        self._validate(plan)
        for rid in plan.finished_ids:
            self.requests.pop(rid, None)
        scheduled = []
        for new in plan.new:
            params = new.params
            state = RequestState(
                request_id=new.request_id,
                token_ids=list(new.token_ids),
                num_prompt_tokens=len(new.token_ids) if new.num_prompt_tokens < 0 else new.num_prompt_tokens,
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
                params=params,
                generator=self.make_generator(params.seed) if params.seed is not None else None,
                pooling=new.pooling,
            )
            self.requests[new.request_id] = state
            end = new.num_computed_tokens + new.num_new_tokens
            scheduled.append(ScheduledRequest(state, new.num_new_tokens, end == len(state.token_ids)))
        for run in plan.running:
            state = self.requests[run.request_id]
            state.block_ids.extend(run.new_block_ids)
            end = state.num_computed_tokens + run.num_new_tokens
            scheduled.append(ScheduledRequest(state, run.num_new_tokens, end == len(state.token_ids)))
        return scheduled

    @staticmethod
    def advance(scheduled: list[ScheduledRequest], sampled_token_ids: list[int]) -> None:
        """After the forward: the scheduled tokens are cached; samplers gain their token."""
        for item in scheduled:
            item.state.num_computed_tokens += item.num_new_tokens
        sampling = [item.state for item in scheduled if item.samples]
        for state, token in zip(sampling, sampled_token_ids, strict=True):
            state.token_ids.append(token)


def build_inputs(scheduled: list[ScheduledRequest], block_size: int, device: torch.device) -> StepInputs:
    """Flat input tensors and attention metadata for one step (host lists, one copy each)."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_lens: list[int] = []
    seq_lens: list[int] = []
    block_tables: list[list[int]] = []
    logits_indices: list[int] = []
    sampling: list[RequestState] = []
    prompt: list[bool] = []
    bs = block_size
    for item in scheduled:
        state, n = item.state, item.num_new_tokens
        start = state.num_computed_tokens
        end = start + n
        blocks = state.block_ids
        if n == 1:  # decode: skip the range machinery
            input_ids.append(state.token_ids[start])
            positions.append(start)
            slots.append(blocks[start // bs] * bs + start % bs)
        else:
            input_ids.extend(state.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend([blocks[p // bs] * bs + p % bs for p in range(start, end)])
        query_lens.append(n)
        prompt.append(start < state.num_prompt_tokens)
        seq_lens.append(end)
        block_tables.append(blocks[: -(-end // bs)])
        if item.samples:
            logits_indices.append(len(input_ids) - 1)
            sampling.append(state)
    meta = AttentionMetadata.build(query_lens, seq_lens, block_tables, slots, device, prompt=prompt)
    return StepInputs(
        input_ids=torch.tensor(input_ids, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        meta=meta,
        logits_indices=torch.tensor(logits_indices, dtype=torch.int64, device=device),
        sampling=sampling,
    )

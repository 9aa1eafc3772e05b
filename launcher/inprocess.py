"""The engine in one process: the real Scheduler and a ModelRunner driven in a plain loop.

No sockets, no tokenizer: token ids in, token ids out. It is how `zeroserve generate`, the
model tests and the benchmarks run a model, and the reference the process engine is compared
with (same greedy tokens). Batching, chunked prefill, prefix caching and preemption are the
scheduler's, exactly as in the server; one step is the scheduler process's step without the
sockets::

    plan   = scheduler.schedule()
    result = runner.execute(plan)
    deltas = scheduler.update_from_output(result)

    llm = InProcessEngine(RunnerConfig(model=path))
    outputs = llm.generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0, max_tokens=32))

The engine's scheduler owns the runner's KV blocks, so a runner serves one engine at a time:
building an engine on a runner starts the runner over (a new scheduler's blocks are all free).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig
from zeroserve.scheduler_proc.scheduler import Scheduler, SchedulerConfig
from zeroserve.shared.messages import EngineRequest, SamplingParams, StepPlan, StepResult, TokenDelta


class EngineStep(NamedTuple):
    """One step: what the scheduler planned, what the runner returned, what came out of it."""

    plan: StepPlan
    result: StepResult
    deltas: list[TokenDelta]


class InProcessEngine:
    def __init__(
        self,
        model: ModelRunner | RunnerConfig,
        *,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        eos_token_ids: Sequence[int] | None = None,
    ):
        """``model``: a runner, or the config to build one. The limits default to the
        runner's (what it profiled memory and captured CUDA graphs for); ``eos_token_ids``
        to the model's."""
        runner = self.runner = model if isinstance(model, ModelRunner) else ModelRunner(model)
        runner.reset()  # forget another engine's requests: this one's ids start at "0" again
        self.scheduler = Scheduler(
            SchedulerConfig(
                num_blocks=runner.num_kv_blocks,
                block_size=runner.block_size,
                max_num_seqs=max_num_seqs or runner.config.max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens or runner.config.max_num_batched_tokens,
                max_model_len=runner.max_model_len,
                eos_token_ids=tuple(runner.eos_token_ids if eos_token_ids is None else eos_token_ids),
                enable_prefix_caching=enable_prefix_caching,
                # generate() queues every prompt at once: the server's queue limits would refuse some
                max_waiting_requests=None,
                max_waiting_tokens=None,
            )
        )
        self._ids = itertools.count()

    def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> str:
        """Queue a request; returns its id. Raises AdmissionError for one that can never run
        (empty prompt, longer than the context or the whole KV cache)."""
        request_id = str(next(self._ids))
        self.scheduler.add_request(
            EngineRequest(
                request_id=request_id,
                prompt_token_ids=list(prompt_token_ids),
                params=params,
                arrival_time=time.time(),
            )
        )
        return request_id

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> EngineStep | None:
        """Run one step; None when no request is left."""
        plan = self.scheduler.schedule()
        if plan is None:
            if self.scheduler.has_unfinished():
                raise RuntimeError("the scheduler has unfinished requests but planned no step")
            return None
        result = self.runner.execute(plan)
        return EngineStep(plan, result, self.scheduler.update_from_output(result))

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        *,
        on_step: Callable[[EngineStep], None] | None = None,
    ) -> list[list[int]]:
        """Run every prompt to completion (continuous batching); the generated token ids per
        prompt. ``on_step`` sees every step (tests check the plans, benchmarks time them)."""
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else params
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, per_prompt, strict=True)]
        outputs: dict[str, list[int]] = {i: [] for i in ids}
        while (step := self.step()) is not None:
            if on_step is not None:
                on_step(step)
            for delta in step.deltas:
                if delta.error is not None:
                    raise RuntimeError(f"request {delta.request_id} failed: {delta.error.message}")
                if delta.request_id in outputs:  # not a request added before with add_request
                    outputs[delta.request_id] += delta.token_ids
        return [outputs[i] for i in ids]

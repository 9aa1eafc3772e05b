"""The engine in one process: Scheduler + ModelRunner driven in a plain loop.

No sockets, no tokenizer: token ids in, token ids out. It is the reference the process
engine is compared with (tests: same greedy tokens; benchmarks: the cost of the process
hops), and a convenient way to run the model from Python.

    llm = InProcessEngine(RunnerConfig(model=path))
    outputs = llm.generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0, max_tokens=32))
"""

from __future__ import annotations

import time
import uuid

from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig
from zeroserve.scheduler_proc.scheduler import Scheduler, SchedulerConfig
from zeroserve.shared.messages import EngineRequest, SamplingParams


class InProcessEngine:
    def __init__(
        self,
        runner_config: RunnerConfig,
        max_num_seqs: int = 128,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        runner: ModelRunner | None = None,
    ):
        self.runner = runner or ModelRunner(runner_config)
        self.scheduler_config = SchedulerConfig(
            num_blocks=self.runner.num_kv_blocks,
            block_size=self.runner.block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=self.runner.max_model_len,
            eos_token_ids=tuple(self.runner.eos_token_ids),
            enable_prefix_caching=enable_prefix_caching,
        )
        self.scheduler = Scheduler(self.scheduler_config)
        self._next_id = 0
        self._prefix = uuid.uuid4().hex[:8]  # engines sharing one runner must not reuse ids
        self.num_steps = 0

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[list[int]]:
        """Run every prompt to completion (continuous batching); output token ids per prompt."""
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        ids = []
        now = time.time()
        for prompt, p in zip(prompts, per_prompt):
            request_id = f"inproc-{self._prefix}-{self._next_id}"
            self._next_id += 1
            ids.append(request_id)
            self.scheduler.add_request(
                EngineRequest(
                    request_id=request_id, prompt_token_ids=list(prompt), params=p, arrival_time=now
                )
            )
        outputs: dict[str, list[int]] = {i: [] for i in ids}
        pending = set(ids)
        while pending:
            plan = self.scheduler.schedule()
            if plan is None:
                raise RuntimeError("the scheduler has unfinished requests but planned no step")
            result = self.runner.execute(plan)
            self.num_steps += 1
            for delta in self.scheduler.update_from_output(result) + self.scheduler.drain_outputs():
                if delta.request_id in outputs:
                    outputs[delta.request_id].extend(delta.token_ids)
                    if delta.finish_reason is not None:
                        pending.discard(delta.request_id)
        return [outputs[i] for i in ids]

"""Generation in one process, without the scheduler: a small plan builder around a ModelRunner.

For `zeroserve generate`, the model tests and the benchmark. It sends the runner the same
kind of plans the scheduler does (diffs: new, running, finished_ids) with a deliberately
simple policy: first come first served, running requests first, prompts chunked to the
token budget, blocks from a free queue (freed blocks go to its back, so a finished
request's blocks keep their K/V until reused), no preemption: running out of blocks is an
error. A caller may hand a request blocks that already hold its prefix (``reuse_blocks``),
which is what a prefix-cache hit looks like to the worker.

    builder = PlanBuilder(runner.num_kv_blocks, runner.block_size)
    builder.add("a", prompt_ids, SamplingParams(max_tokens=32, temperature=0))
    while (plan := builder.schedule()) is not None:
        builder.update(runner.execute(plan))
    builder.outputs["a"]  # generated token ids
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from zeroserve.shared.messages import NewRequestData, RunningRequestData, SamplingParams, StepPlan, StepResult


@dataclass
class _Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    block_ids: list[int]
    num_computed: int
    output: list[int] = field(default_factory=list)
    sent: bool = False  # the runner holds it
    new_blocks: list[int] = field(default_factory=list)  # appended since the last plan

    @property
    def num_known(self) -> int:
        return len(self.prompt) + len(self.output)


class PlanBuilder:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
        eos_token_ids: Sequence[int] = (),
    ):
        self.block_size = block_size
        self.max_num_batched_tokens, self.max_num_seqs = max_num_batched_tokens, max_num_seqs
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.active: dict[str, _Request] = {}  # arrival order
        self.outputs: dict[str, list[int]] = {}
        self.finish_reasons: dict[str, str] = {}
        self.block_ids: dict[str, list[int]] = {}  # finished requests' blocks (freed, K/V kept until reused)
        self._finished_since_plan: list[str] = []
        self._step_id = 0

    def add(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        reuse_blocks: Sequence[int] = (),
        num_cached_tokens: int = 0,
    ) -> None:
        """Queue a request. reuse_blocks: free blocks that already hold the K/V of its first
        num_cached_tokens tokens (a prefix-cache hit); they are taken out of the free queue."""
        if request_id in self.active or request_id in self.outputs:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_ids:
            raise ValueError(f"request {request_id!r}: empty prompt")
        if num_cached_tokens > len(reuse_blocks) * self.block_size or num_cached_tokens >= len(prompt_ids):
            raise ValueError(
                "num_cached_tokens must fit in reuse_blocks and leave >= 1 prompt token to compute"
            )
        for b in reuse_blocks:
            try:
                self.free_blocks.remove(b)
            except ValueError:
                raise ValueError(f"block {b} is not free; only free blocks can be reused") from None
        self.active[request_id] = _Request(
            request_id, list(prompt_ids), params, list(reuse_blocks), num_cached_tokens
        )

    @property
    def has_unfinished(self) -> bool:
        return bool(self.active)

    def _grow(self, req: _Request, num_tokens: int) -> bool:
        need = -(-num_tokens // self.block_size) - len(req.block_ids)
        if need > len(self.free_blocks):
            return False
        for _ in range(max(need, 0)):
            b = self.free_blocks.popleft()
            req.block_ids.append(b)
            req.new_blocks.append(b)
        return True

    def schedule(self) -> StepPlan | None:
        """The next plan, or None when every request has finished (a last plan carrying
        only finished_ids is still sent so the runner frees their state)."""
        budget = self.max_num_batched_tokens
        new: list[NewRequestData] = []
        running: list[RunningRequestData] = []
        for req in list(self.active.values())[: self.max_num_seqs]:
            num_new = min(req.num_known - req.num_computed, budget)
            if num_new <= 0:
                break
            if not self._grow(req, req.num_computed + num_new):
                break
            budget -= num_new
            if req.sent:
                running.append(RunningRequestData(req.request_id, req.new_blocks, num_new))
            else:
                new.append(
                    NewRequestData(
                        req.request_id,
                        req.prompt + req.output,
                        list(req.block_ids),
                        req.num_computed,
                        num_new,
                        req.params,
                        len(req.prompt),
                    )
                )
                req.sent = True
            req.new_blocks = []
            req.num_computed += num_new
        if not new and not running:
            if self.active:
                raise RuntimeError(
                    f"cannot schedule: {len(self.free_blocks)} free KV blocks are not enough for the next "
                    "request; use a larger KV cache or fewer/shorter requests"
                )
            if not self._finished_since_plan:
                return None
        plan = StepPlan(self._step_id, new, running, self._finished_since_plan)
        self._finished_since_plan = []
        self._step_id += 1
        return plan

    def update(self, result: StepResult) -> list[str]:
        """Record sampled tokens; returns the ids of requests that finished."""
        if result.error:
            raise RuntimeError(f"step {result.step_id} failed: {result.error}")
        finished = []
        for rid, token in zip(result.request_ids, result.sampled_token_ids, strict=True):
            req = self.active[rid]
            req.output.append(token)
            reason = self._finish_reason(req, token)
            if reason is not None:
                finished.append(rid)
                self.finish_reasons[rid] = reason
                self.outputs[rid] = req.output
                self.block_ids[rid] = req.block_ids
                self.free_blocks.extend(req.block_ids)
                del self.active[rid]
                self._finished_since_plan.append(rid)
        return finished

    def _finish_reason(self, req: _Request, token: int) -> str | None:
        p = req.params
        if len(req.output) >= p.min_tokens:
            if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
                return "stop"
        if len(req.output) >= p.max_tokens:
            return "length"
        if self.max_model_len is not None and req.num_known >= self.max_model_len:
            return "length"
        return None


def generate(
    runner,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
    *,
    max_num_batched_tokens: int | None = None,
    max_num_seqs: int | None = None,
) -> list[list[int]]:
    """Generate for every prompt (token ids) with a ModelRunner; returns the output token ids
    in prompt order."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    builder = PlanBuilder(
        runner.num_kv_blocks,
        runner.block_size,
        max_num_batched_tokens=max_num_batched_tokens or runner.config.max_num_batched_tokens,
        max_num_seqs=max_num_seqs or runner.config.max_num_seqs,
        max_model_len=runner.max_model_len,
        eos_token_ids=runner.eos_token_ids,
    )
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        builder.add(str(i), prompt, p)
    while (plan := builder.schedule()) is not None:
        builder.update(runner.execute(plan))
    return [builder.outputs[str(i)] for i in range(len(prompts))]

"""Test doubles for the scheduler: a fake worker with a paged KV cache, and a driver loop.

The fake worker plays the workers' side of the StepPlan protocol. Its KV cache holds, in
each slot, the token id written there. A step first writes the tokens every scheduled
request computes, then each request that samples reads its whole context back *through its
block table*. A wrong block table, a prefix hit on a block never written (or since
overwritten), or a shared block written with other tokens shows up as a context that
differs from the request's tokens (asserted) or as different sampled tokens.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable

from zeroserve.scheduler_proc.scheduler import Scheduler
from zeroserve.shared.messages import EngineRequest, SamplingParams, StepPlan, StepResult, TokenDelta


def context_token(request_id: str, context: list[int]) -> int:
    """Next token as a function of the whole context read from KV (never 0..9: no EOS)."""
    digest = hashlib.blake2b(array("q", context), digest_size=8).digest()
    return 10 + int.from_bytes(digest, "little") % 1000


class _WorkerRequest:
    def __init__(self, request_id: str, tokens: list[int], blocks: list[int], computed: int):
        self.request_id, self.tokens, self.blocks, self.computed = request_id, tokens, blocks, computed


# one request's share of a step, for a step time formula: (tokens computed before, tokens
# computed now, whether it is a decode: a request the worker held computing its last token)
Work = tuple[int, int, bool]


class FakeWorker:
    """``step_time`` (optional) gives each StepResult's step_time_s from the step's work."""

    def __init__(self, num_blocks: int, block_size: int,
                 next_token: Callable[[str, list[int]], int] = context_token,
                 step_time: Callable[[list[Work]], float] | None = None) -> None:  # fmt: skip
        self.step_time = step_time
        self.bs = block_size
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.reqs: dict[str, _WorkerRequest] = {}
        self.next_token = next_token
        self.last_step_id = -1

    def _slot(self, st: _WorkerRequest, pos: int) -> tuple[list[int | None], int]:
        return self.kv[st.blocks[pos // self.bs]], pos % self.bs

    def step(self, plan: StepPlan) -> StepResult:
        bs = self.bs
        assert plan.step_id > self.last_step_id, "plans out of order"
        self.last_step_id = plan.step_id
        for rid in plan.finished_ids:
            assert rid in self.reqs, f"told to forget {rid!r}, never told about it"
            del self.reqs[rid]
        work: list[tuple[_WorkerRequest, int]] = []
        shares: list[Work] = []
        hits: list[_WorkerRequest] = []
        for n in plan.new:
            assert n.request_id not in self.reqs, f"{n.request_id!r} sent as new twice"
            assert n.num_computed_tokens % bs == 0 and 0 <= n.num_computed_tokens < len(n.token_ids)
            assert n.num_new_tokens >= 1
            st = _WorkerRequest(n.request_id, list(n.token_ids), list(n.block_ids), n.num_computed_tokens)
            hits.append(st)
            self.reqs[n.request_id] = st
            work.append((st, n.num_new_tokens))
            shares.append((st.computed, n.num_new_tokens, False))
        for r in plan.running:
            st = self.reqs[r.request_id]
            st.blocks += r.new_block_ids
            assert r.num_new_tokens >= 1
            work.append((st, r.num_new_tokens))
            shares.append(
                (st.computed, r.num_new_tokens, r.num_new_tokens == 1 == len(st.tokens) - st.computed)
            )
        for st, k in work:  # every layer: write K/V of the whole batch first ...
            assert st.computed + k <= len(st.tokens), f"{st.request_id}: computes unknown tokens"
            assert len(st.blocks) == -(-(st.computed + k) // bs), f"{st.request_id}: block table size"
            for pos in range(st.computed, st.computed + k):
                block, slot = self._slot(st, pos)
                block[slot] = st.tokens[pos]
            st.computed += k
        for st in hits:  # a prefix hit must hold exactly its tokens (maybe written this step)
            for pos in range(st.computed):
                block, slot = self._slot(st, pos)
                assert block[slot] == st.tokens[pos], f"{st.request_id}: prefix hit on wrong KV at {pos}"
        ids, tokens = [], []
        for st, _ in work:  # ... then attend through the block table
            if st.computed == len(st.tokens):
                context = [self._slot(st, p)[0][self._slot(st, p)[1]] for p in range(st.computed)]
                assert context == st.tokens, f"{st.request_id}: KV read back differs from its tokens"
                token = self.next_token(st.request_id, context)
                st.tokens.append(token)
                ids.append(st.request_id)
                tokens.append(token)
        seconds = self.step_time(shares) if self.step_time is not None else 0.0
        return StepResult(plan.step_id, ids, tokens, step_time_s=seconds)


def make_request(
    rid: str, prompt: list[int], max_tokens: int = 8, arrival: float = 0.0, **kw
) -> EngineRequest:
    params = kw.pop("params", None) or SamplingParams(max_tokens=max_tokens, **kw.pop("sampling", {}))
    return EngineRequest(rid, list(prompt), params, arrival, **kw)


class Driver:
    """Runs a scheduler against a FakeWorker and gathers every request's tokens and finish."""

    def __init__(self, sched: Scheduler, worker: FakeWorker | None = None, check: bool = True) -> None:
        self.s = sched
        self.w = worker or FakeWorker(sched.cfg.num_blocks, sched.cfg.block_size)
        self.check = check
        self.tokens: dict[str, list[int]] = {}
        self.finish: dict[str, str] = {}
        self.deltas: list[TokenDelta] = []
        self.plans: list[StepPlan] = []

    def _collect(self, deltas: list[TokenDelta]) -> None:
        for d in deltas:
            assert d.request_id not in self.finish, f"delta after the end of {d.request_id}"
            self.deltas.append(d)
            self.tokens.setdefault(d.request_id, []).extend(d.token_ids)
            if d.finish_reason is not None:
                self.finish[d.request_id] = d.finish_reason

    def step(self, now: float = 0.0) -> StepPlan | None:
        plan = self.s.schedule(now)
        self._collect(self.s.drain_outputs())
        if plan is None:
            return None
        self.plans.append(plan)
        if self.check:
            self.s.check_invariants()
        self._collect(self.s.update_from_output(self.w.step(plan)))
        if self.check:
            self.s.check_invariants()
        return plan

    def run(self, max_steps: int = 10_000, now: float = 0.0) -> None:
        for _ in range(max_steps):
            if self.step(now) is None and not self.s.has_unfinished():
                return
        raise AssertionError(f"not done after {max_steps} steps")

"""Continuous batching: which requests compute which tokens in the next step, and what came out.

One step, as the process loop drives it (one plan in flight at a time)::

    plan   = scheduler.schedule()                 # StepPlan of diffs, or None when idle
    result = <workers run the plan>               # StepResult: one token per sampling request
    deltas = scheduler.update_from_output(result) + scheduler.drain_outputs()

How ``schedule`` fills a step (token budget ``max_num_batched_tokens``, cap ``max_num_seqs``)::

    running, best sort_key first          waiting heap, best first
    [ d d p d d ... d ]  -- 1. ------>    2. admit while budget, seqs and blocks allow
      d: decode, 1 token each; p: a running prefill, chunked to the budget left after
      reserving one token per request behind it (decodes never starve behind a prefill)
    out of blocks -> preempt running[-1] (lowest priority, latest arrival) by recompute,
      and admit no waiting request this step

With ``target_itl_ms`` set and the step cost model (``cost_model.py``, learned from every
step's measured time) warmed up, prefill chunks and admissions also stop at the predicted step
time: target - predicted(decodes) seconds of prefill, never fewer than ``min_prefill_tokens``.

A request samples only when the step reaches the end of its known tokens. Full blocks are
registered in the prefix cache when they are scheduled, so a request admitted later in the
same step (an n>1 sibling) already shares them. **Worker contract**: within one step, write
every request's K/V for a layer before that layer's attention reads the paged cache (the
usual write-then-attend order), because a later request of the plan may read blocks an
earlier one fills in that step.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import operator
import time

import msgspec

from zeroserve.scheduler_proc.admission import AdmissionError, WaitingQueue, check_admission
from zeroserve.scheduler_proc.block_manager import BlockManager
from zeroserve.scheduler_proc.config import SchedulerConfig
from zeroserve.scheduler_proc.cost_model import StepShape, TimeBudget
from zeroserve.scheduler_proc.latency import LatencyPolicy
from zeroserve.scheduler_proc.pooling import pooled_delta, starts_whole
from zeroserve.scheduler_proc.request import Request, RequestStatus, due_time
from zeroserve.shared.messages import (
    BucketCounts,
    EngineRequest,
    ErrorInfo,
    NewRequestData,
    RunningRequestData,
    SchedulerStats,
    StepPlan,
    StepResult,
    TokenDelta,
    TokenLogprobs,
)

__all__ = ["AdmissionError", "Scheduler", "SchedulerConfig"]

# upper bounds of the tokens-per-step histogram (vLLM's iteration_tokens_total buckets)
ITERATION_TOKEN_BOUNDS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]

_RUNNING, _WAITING, _FINISHED = RequestStatus.RUNNING, RequestStatus.WAITING, RequestStatus.FINISHED
_by_sort_key = operator.attrgetter("sort_key")


class _InFlight:
    """What the scheduler remembers about the plan the workers are running."""

    __slots__ = ("plan", "step_id", "num_sampling", "keyed_blocks", "shape")

    def __init__(self, plan: StepPlan, num_sampling: int, keyed: list[int], shape: StepShape) -> None:
        self.plan = plan
        self.shape = shape  # the step's cost features, learned with its measured time
        self.step_id = plan.step_id
        self.num_sampling = num_sampling  # requests expected to sample a token
        self.keyed_blocks = keyed  # blocks whose prefix keys rely on this step's KV writes

    def requests(self, live: dict[str, Request]) -> list[Request]:
        """The plan's requests still running (an id re-used after an abort is WAITING: skipped)."""
        ids = [n.request_id for n in self.plan.new] + [r.request_id for r in self.plan.running]
        return [r for r in map(live.get, ids) if r is not None and r.status == _RUNNING]


class Scheduler:
    """Owns every request from ``add_request`` to its last delta, and every KV block."""

    def __init__(self, cfg: SchedulerConfig) -> None:
        self.cfg = cfg
        self.block_size = cfg.block_size
        # one token each per step at least: more seats than budget would stall some of them
        self.max_num_seqs = min(cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.blocks = BlockManager(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.waiting = WaitingQueue()
        self.running: list[Request] = []  # sorted by sort_key
        self._requests: dict[str, Request] = {}  # every waiting or running request
        self._eos = frozenset(cfg.eos_token_ids)
        self._seq = itertools.count()
        self._next_step_id = 0
        self._inflight: _InFlight | None = None
        self._finished_ids: list[str] = []  # requests the workers must forget, for the next plan
        self._outputs: list[TokenDelta] = []  # deltas born outside update_from_output
        # (deadline, sort_key, request) of started requests: the waiting queue only expires
        # requests that never ran, these hold blocks (or did) and the workers may know them
        self._started_deadlines: list[tuple[float, tuple, Request]] = []
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # tokens looked up when requests (re)start
        self.prefix_cache_hits = 0  # of which found in the cache
        self.num_steps = 0
        self.tokens_scheduled_last_step = 0
        self.iteration_token_counts = [0] * (len(ITERATION_TOKEN_BOUNDS) + 1)  # per bucket, not cumulative
        self.iteration_tokens_sum = 0
        self.latency = LatencyPolicy(cfg.target_itl_ms, cfg.min_prefill_tokens)

    # ------------------------------------------------------------------ requests in and out

    def add_request(self, req: EngineRequest, now: float | None = None) -> None:
        """Queue ``req`` or raise AdmissionError (status 400: can never run, 429: queue full, or
        a deadline that even a start at ``now`` (time.time() by default) could not meet).

        Waiting requests of a priority run earliest due first (EDF): a request is due at its
        deadline or queue deadline, whichever comes first. Strict order: (priority, due, arrival),
        no due ranking last. With aging (seconds ``A`` per level), the score is
        ``priority + min(due, arrival + A) / A``: a request without a due time (or a later one)
        ranks as due A after arrival, so such requests keep arrival order, and a deadline moves a
        request up by less than one level, never past a more urgent one that arrived with it.
        """
        if req.request_id in self._requests:
            raise AdmissionError(400, f"Request id {req.request_id!r} is already in use; ids must be unique.",
                                 param="request_id")  # fmt: skip
        default_ms = self.cfg.priority_deadline_ms.get(req.priority)
        if req.deadline is None and default_ms is not None:  # the priority class's SLO
            req = msgspec.structs.replace(req, deadline=req.arrival_time + default_ms / 1000.0)
        check_admission(self.cfg, req, self.waiting)
        self.latency.check_deadline(req, time.time() if now is None else now, self.running)
        due = due_time(req)
        aging = self.cfg.priority_aging_s
        if aging is None:
            sort_key = (req.priority, due, req.arrival_time, next(self._seq))
        else:
            score = req.priority + min(due, req.arrival_time + aging) / aging
            sort_key = (score, req.arrival_time, next(self._seq))
        r = Request(req, sort_key, self._eos, self.cfg.max_model_len)
        if self.cfg.enable_prefix_caching:
            r.update_block_keys(self.block_size)
        self._requests[r.request_id] = r
        self.waiting.push(r)
        self.waiting.watch_deadline(r)

    def abort(self, request_id: str) -> bool:
        """End a request in any state and free its blocks now; False if the id is unknown."""
        r = self._requests.get(request_id)
        if r is None:
            return False
        if r.status == _WAITING:  # holds no blocks; the workers do not know it (or forgot it)
            del self._requests[request_id]
            self.waiting.remove(r)
        else:
            self.running.remove(r)
            self._finish(r)
        return True

    def drain_outputs(self) -> list[TokenDelta]:
        """Deltas that did not come from a step: deadline timeouts (queued or running)."""
        out, self._outputs = self._outputs, []
        return out

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free_blocks

    # ------------------------------------------------------------------ one step

    def schedule(self, now: float | None = None) -> StepPlan | None:
        """Plan the next step, or None when there is nothing to compute.

        ``now`` (time.time() by default) first ends requests past their deadline, waiting or
        running (finish reason "timeout"; a running one's blocks are freed and the plan tells the
        workers to forget it).
        """
        if self._inflight is not None:
            raise RuntimeError(
                f"schedule() called while step {self._inflight.step_id} is in flight; pass its StepResult "
                "to update_from_output() first (a lost step: a StepResult with error set)"
            )
        self._expire_deadlines(time.time() if now is None else now)
        bs, bm, running = self.block_size, self.blocks, self.running
        caching = self.cfg.enable_prefix_caching
        keyed: list[int] = []  # blocks keyed this step
        running_data: list[RunningRequestData] = []
        new_data: list[NewRequestData] = []
        shape = StepShape()
        tb = self.latency.time_budget(self.running)
        # 1. Running requests, best first (decodes, then chunks of running prefills).
        budget, num_sampling, preempted = self._schedule_running(running_data, keyed, shape, tb)

        # 2. Waiting requests, best first, while budget, seats and blocks last (no skipping
        #    ahead: a big request at the head is not starved by small ones behind it).
        max_seqs, waiting = self.max_num_seqs, self.waiting
        while not preempted and budget > 0 and len(running) < max_seqs:
            r = waiting.peek()
            if r is None:
                break
            num_tokens = len(r.all_token_ids)
            hits: list[int] = []
            if caching and r.pooling is None:  # the longest cached prefix, leaving a token to compute
                r.update_block_keys(bs)
                hits = bm.find_cached_prefix(r.block_keys, (num_tokens - 1) // bs)
            num_computed = len(hits) * bs
            num_new = min(num_tokens - num_computed, budget)
            if r.pooling is not None:  # an embedding runs whole, in one step, or waits (pooling.py)
                if not starts_whole(num_tokens, num_new, tb, not new_data):
                    break
            elif tb is not None:
                num_new = tb.chunk(num_computed, num_new)
                if num_new <= 0:
                    break
            fresh = bm.allocate((num_computed + num_new + bs - 1) // bs - len(hits), hits)
            if fresh is None:
                break
            waiting.pop()
            r.status = _RUNNING
            r.block_ids = hits + fresh
            r.num_cached_blocks = len(hits)
            r.num_computed_tokens = num_computed + num_new
            if caching:
                self.prefix_cache_queries += num_tokens
                self.prefix_cache_hits += num_computed
            if not r.started:
                r.started = True
                r.scheduled_at = time.monotonic()
                if r.deadline is not None:
                    heapq.heappush(self._started_deadlines, (r.deadline, r.sort_key, r))
                r.num_cached_tokens = num_computed
            r.known_to_workers = True
            new_data.append(NewRequestData(
                r.request_id, list(r.all_token_ids), list(r.block_ids), num_computed, num_new, r.params,
                r.num_prompt_tokens, pooling=r.pooling))  # fmt: skip
            bisect.insort(running, r, key=_by_sort_key)
            budget -= num_new
            shape.add_prefill(num_computed, num_new)
            if tb is not None:
                tb.spend(num_computed, num_new)
            if r.num_computed_tokens == num_tokens:
                num_sampling += 1
            if caching and r.pooling is None:
                self._cache_full_blocks(r, keyed)

        if not running_data and not new_data:
            return None
        step_id = self._next_step_id
        self._next_step_id += 1
        finished_ids, self._finished_ids = self._finished_ids, []
        plan = StepPlan(step_id, new_data, running_data, finished_ids)
        self._inflight = _InFlight(plan, num_sampling, keyed, shape)
        self.num_steps += 1
        self.tokens_scheduled_last_step = tokens = self.cfg.max_num_batched_tokens - budget
        self.iteration_token_counts[bisect.bisect_left(ITERATION_TOKEN_BOUNDS, tokens)] += 1
        self.iteration_tokens_sum += tokens
        return plan

    def _schedule_running(
        self, out: list[RunningRequestData], keyed: list[int], shape: StepShape, tb: TimeBudget | None
    ) -> tuple[int, int, bool]:
        """Step 1 of schedule(): running requests, best first; returns (budget left, number
        sampling, whether a request was preempted).

        A running prefill's chunk leaves one token of the budget for every request behind
        it, so decodes are never crowded out; as there are no more running requests than
        tokens in the budget, every running request computes at least one token every step. Out of blocks, the
        request at the back of ``running`` is preempted (maybe r itself): the loop walks
        forward, so the victim has not been scheduled in this step.
        """
        bs, bm, running = self.block_size, self.blocks, self.running
        caching = self.cfg.enable_prefix_caching
        budget = self.cfg.max_num_batched_tokens
        num_sampling = 0
        preempted = False
        n, i = len(running), 0
        while i < n and budget > 0:
            r = running[i]
            i += 1
            num_computed = r.num_computed_tokens
            remaining = len(r.all_token_ids) - num_computed
            if remaining == 1:
                if num_computed % bs:  # fast path: a decode with room in its last block
                    out.append(r.decode_data)
                    shape.add_decode(num_computed + 1)
                    r.num_computed_tokens = num_computed = num_computed + 1
                    budget -= 1
                    num_sampling += 1
                    if caching and num_computed % bs == 0:
                        self._cache_full_blocks(r, keyed)
                    continue
                num_new = need = 1
            else:  # the next chunk of a prefill
                num_new = min(remaining, budget - (n - i))
                if tb is not None and num_new > 0:
                    num_new = tb.chunk(num_computed, num_new)
                if num_new <= 0:
                    continue
                need = (num_computed + num_new + bs - 1) // bs - len(r.block_ids)
            fresh = bm.take(need) if need > 0 else []
            while fresh is None:
                victim = running.pop()
                n -= 1
                self._preempt(victim)
                preempted = True
                if victim is r:
                    return budget, num_sampling, preempted
                fresh = bm.take(need)
            r.block_ids += fresh
            out.append(RunningRequestData(r.request_id, fresh, num_new))
            budget -= num_new
            if remaining == 1:
                shape.add_decode(num_computed + 1)
            else:
                shape.add_prefill(num_computed, num_new)
                if tb is not None:
                    tb.spend(num_computed, num_new)
            r.num_computed_tokens = num_computed = num_computed + num_new
            if num_computed == len(r.all_token_ids):
                num_sampling += 1
            if caching and num_computed // bs > r.num_cached_blocks:
                self._cache_full_blocks(r, keyed)
        return budget, num_sampling, preempted

    def update_from_output(self, result: StepResult) -> list[TokenDelta]:
        """Append the sampled tokens, finish requests, return one delta per request that sampled.

        Entries for requests aborted since the plan are ignored. A result with ``error`` set
        fails every request of that step (finish_reason "error", HTTP 500) and drops the
        prefix keys that relied on the step's KV writes.
        """
        inflight = self._inflight
        if inflight is None or result.step_id != inflight.step_id:
            expected = inflight.step_id if inflight else "none"
            raise ValueError(f"StepResult for step {result.step_id}, but the step in flight is {expected}")
        self._inflight = None
        if result.error is not None:
            requests = inflight.requests(self._requests)
            return self._fail(requests, inflight.keyed_blocks, f"The engine step failed: {result.error}")
        self.latency.model.update(inflight.shape, result.step_time_s)
        now = time.monotonic()  # the step's tokens arrived: first and last token times
        live, lps, tokens = self._requests, result.logprobs, result.sampled_token_ids
        deltas: list[TokenDelta] = []
        append = deltas.append
        finished: list[Request] = []
        applied = 0
        dead_ends = set(result.dead_ends) if result.dead_ends else None  # their token is void
        for idx, rid in enumerate(result.request_ids):
            r = live.get(rid)
            if r is None:
                continue  # aborted since the plan
            all_tokens = r.all_token_ids
            if r.num_computed_tokens != len(all_tokens):
                continue  # not sampling in this step (an id re-used after an abort is WAITING, at 0)
            applied += 1
            if dead_ends is not None and rid in dead_ends:
                append(self._dead_end_delta(r))
                finished.append(r)
                continue
            token = tokens[idx]
            all_tokens.append(token)
            if (
                token in r.stop_set
                or len(all_tokens) >= r.max_len
                or lps is not None
                or not r.sent_first_delta
            ):
                delta = self._delta(r, token, None if lps is None else lps[idx], now)
                append(delta)
                if delta.finish_reason is not None:
                    finished.append(r)
            else:  # the common case: one more token, nothing else to say
                append(TokenDelta(request_id=rid, token_ids=[token]))
        for out in result.pooled:  # embedding requests: their vector ends them (pooling.py)
            r = live.get(out.request_id)
            if r is not None and r.pooling is not None and r.num_computed_tokens == len(r.all_token_ids):
                applied += 1
                append(pooled_delta(r, out.data, now))
                finished.append(r)
        if finished:
            finished.sort(key=_by_sort_key)  # free order (LRU order) independent of result order
            for r in finished:
                self._finish(r)
            self.running[:] = [r for r in self.running if r.status == _RUNNING]
        if applied != inflight.num_sampling:  # aborts meanwhile, or a worker bug: find the latter
            missing = [r for r in self.running if r.num_computed_tokens == len(r.all_token_ids)]
            if missing:  # failing them beats leaving them stuck forever
                deltas += self._fail(missing, [], "The worker returned no token for this request.")
        return deltas

    @staticmethod
    def _delta(r: Request, token: int, logprobs: TokenLogprobs | None, now: float) -> TokenDelta:
        """The delta for r's new last token ``token``, deciding whether r finishes.

        "stop": an EOS (unless ignore_eos) or stop token id once min_tokens are out;
        stop_reason is the token id for stop_token_ids, None for EOS. "length": max_tokens
        or max_model_len reached. A stop token on the last allowed token is a "stop".
        """
        finish = stop_reason = None
        num_tokens = len(r.all_token_ids)
        if token in r.stop_set and num_tokens >= r.min_len:
            finish = "stop"
            if token in r.stop_token_ids:
                stop_reason = token
        elif num_tokens >= r.max_len:
            finish = "length"
        lp = None if logprobs is None else [logprobs]
        first, r.sent_first_delta = not r.sent_first_delta, True
        if first:
            r.first_token_at = now
        return TokenDelta(
            request_id=r.request_id,
            token_ids=[token],
            logprobs=lp,
            finish_reason=finish,
            stop_reason=stop_reason,
            num_prompt_tokens=r.num_prompt_tokens if first else 0,  # the prompt counts ride the first
            num_cached_tokens=r.num_cached_tokens if first else 0,
            # the phases so far ride the first token (queue and prefill are known then: a stop
            # string may end it in the tokenizer later), all of them the last
            timings=r.timings(now) if first or finish is not None else None,
        )

    @classmethod
    def _dead_end_delta(cls, r: Request) -> TokenDelta:
        """r's grammar allowed no next token (the worker's StepResult.dead_ends): it ends as a
        "stop" that says why, without the step's token."""
        return msgspec.structs.replace(cls._last_delta(r, "stop"), stop_reason="grammar_dead_end")

    def reset_kv_cache(self) -> None:
        """The workers restarted with an empty KV cache: requeue every running request (it is
        recomputed from its tokens) and forget the prefix cache. Fail the lost step first."""
        if self._inflight is not None:
            raise RuntimeError(
                "reset_kv_cache() with a step in flight: pass it a StepResult with error first"
            )
        while self.running:
            self._preempt(self.running.pop())
        self.blocks.reset_prefix_cache()
        self._finished_ids.clear()

    # ------------------------------------------------------------------ stats and checks

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.blocks.usage,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
            num_steps=self.num_steps,
            tokens_scheduled_last_step=self.tokens_scheduled_last_step,
            num_kv_blocks=self.blocks.num_blocks,
            num_free_blocks=self.blocks.num_free_blocks,
            iteration_tokens=BucketCounts(
                ITERATION_TOKEN_BOUNDS, list(self.iteration_token_counts), float(self.iteration_tokens_sum)
            ),
            num_steps_over_target=self.latency.num_steps_over_target,
            step_cost_error=self.latency.model.error,
        )

    def check_invariants(self) -> None:
        """Assert the bookkeeping is consistent (tests; O(blocks + requests))."""
        bs, refs = self.block_size, [0] * self.blocks.num_blocks
        assert len(self.running) <= self.max_num_seqs
        assert [r.sort_key for r in self.running] == sorted(r.sort_key for r in self.running), (
            "running unsorted"
        )
        for r in self.running:
            assert r.status == _RUNNING and self._requests.get(r.request_id) is r, r
            assert len(r.block_ids) == -(-r.num_computed_tokens // bs), f"block table does not cover KV: {r}"
            assert r.num_computed_tokens < len(r.all_token_ids) or self._inflight, (
                f"nothing left to compute: {r}"
            )
            for b in r.block_ids:
                refs[b] += 1
        waiting = list(self.waiting)
        for r in waiting:
            assert not r.block_ids and r.num_computed_tokens == 0 and not r.known_to_workers, r
            assert self._requests.get(r.request_id) is r, r
        assert len(waiting) == self.waiting.num_requests
        assert sum(len(r.all_token_ids) for r in waiting) == self.waiting.num_tokens
        assert len(self._requests) == len(waiting) + len(self.running), "a request is lost or duplicated"
        self.blocks.check_invariants(refs)

    # ------------------------------------------------------------------ internals

    def _cache_full_blocks(self, r: Request, keyed: list[int]) -> None:
        """Register r's blocks that are full once this step has computed them."""
        n_full = r.num_computed_tokens // self.block_size
        if len(r.block_keys) < n_full:
            r.update_block_keys(self.block_size)
        for i in range(r.num_cached_blocks, n_full):
            if self.blocks.cache_block(r.block_ids[i], r.block_keys[i]):
                keyed.append(r.block_ids[i])
        r.num_cached_blocks = n_full

    def _preempt(self, r: Request) -> None:
        """Free r's blocks and requeue it with its tokens; it resumes by recompute (prefix hits
        on its own blocks where they survive)."""
        self.blocks.free(r.block_ids)
        r.block_ids = []
        r.num_computed_tokens = r.num_cached_blocks = 0
        if r.known_to_workers:
            self._finished_ids.append(r.request_id)
            r.known_to_workers = False
        r.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.push(r)

    def _finish(self, r: Request) -> None:
        """End a running request (the caller removes it from ``running``)."""
        self.blocks.free(r.block_ids)
        r.block_ids = []
        r.status = _FINISHED
        del self._requests[r.request_id]
        if r.known_to_workers:
            self._finished_ids.append(r.request_id)
            r.known_to_workers = False

    def _fail(self, requests: list[Request], keyed_blocks: list[int], message: str) -> list[TokenDelta]:
        self.blocks.uncache(keyed_blocks)
        error = ErrorInfo(status=500, type="internal_server_error", message=message)
        deltas = []
        for r in requests:
            if r.status != _RUNNING:
                continue
            deltas.append(self._last_delta(r, "error", error))
            self._finish(r)
        self.running[:] = [r for r in self.running if r.status == _RUNNING]
        return deltas

    @staticmethod
    def _last_delta(r: Request, finish_reason: str, error: ErrorInfo | None = None) -> TokenDelta:
        """A delta with no token that ends r (with the prompt counts if it is r's first)."""
        prompt, cached = (0, 0) if r.sent_first_delta else (r.num_prompt_tokens, r.num_cached_tokens)
        r.sent_first_delta = True
        return TokenDelta(
            request_id=r.request_id,
            token_ids=[],
            finish_reason=finish_reason,
            error=error,
            num_prompt_tokens=prompt,
            num_cached_tokens=cached,
            timings=r.timings(time.monotonic()),
        )

    def _expire_deadlines(self, now: float) -> None:
        """End every request whose deadline passed (deadline < now) with finish reason "timeout"."""
        for r in self.waiting.expire(now):  # never started: no blocks, unknown to the workers
            del self._requests[r.request_id]
            self._outputs.append(self._last_delta(r, "timeout"))
        live, started = self._requests, self._started_deadlines
        while started and started[0][0] < now:
            r = heapq.heappop(started)[2]
            if live.get(r.request_id) is not r:
                continue  # finished or aborted meanwhile (maybe its id reused since)
            if r.status == _RUNNING:
                self.running.remove(r)
                self._finish(r)
            else:  # preempted: holds no blocks, and the workers were told to forget it then
                self.waiting.remove(r)
                del live[r.request_id]
            self._outputs.append(self._last_delta(r, "timeout"))
        if len(started) > 2 * len(live) + 64:  # entries of finished requests: drop them
            self._started_deadlines = [e for e in started if live.get(e[2].request_id) is e[2]]
            heapq.heapify(self._started_deadlines)

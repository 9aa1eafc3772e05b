"""Before a request runs: admission control and the waiting queue (priority, deadlines).

Admission happens once, in ``add_request``: a request that can never run (prompt +
max_tokens past the context length or the whole KV pool) is refused with HTTP 400, one that
would overfill the waiting queue with HTTP 429, at once, so the client can back off instead
of queueing without bound.

The rules that need the context length or the KV pool (prompt length, max_tokens, min_tokens
against the resolved max_tokens) and the queue's (the priority range) are checked here and
nowhere else: every entry point's
requests (HTTP API, ZMQ client) reach the scheduler through the tokenizer, which only checks
what needs the tokenizer (token ids against the vocabulary).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator

from zeroserve.scheduler_proc.config import SchedulerConfig
from zeroserve.scheduler_proc.pooling import embedding_admission_error
from zeroserve.scheduler_proc.request import Request, RequestStatus
from zeroserve.shared.messages import EngineRequest, ErrorInfo


class AdmissionError(Exception):
    """A request refused by add_request; api_proc turns ``to_error_info()`` into the HTTP reply."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def to_error_info(self) -> ErrorInfo:
        kind = "rate_limit_error" if self.status == 429 else "invalid_request_error"
        return ErrorInfo(
            status=self.status, type=kind, message=self.message, param=self.param, code=self.code
        )


def check_admission(cfg: SchedulerConfig, req: EngineRequest, waiting: WaitingQueue) -> None:
    """Raise AdmissionError (400 never fits, 429 queue full) or return when ``req`` may wait."""
    num_prompt, max_tokens, context = len(req.prompt_token_ids), req.params.max_tokens, cfg.max_model_len
    low, high = cfg.priority_range
    if not low <= req.priority <= high:
        raise AdmissionError(
            400,
            f"priority must be between {low} and {high} (--priority-range; smaller runs first), "
            f"got {req.priority}.",
            param="priority",
        )
    if req.pooling is not None:  # an embedding: only the prompt runs (pooling.py)
        error = embedding_admission_error(cfg, req)
        if error is not None:
            raise AdmissionError(400, error[0], param=error[1], code=error[2])
        check_queue(cfg, num_prompt, waiting)
        return
    if num_prompt == 0:
        raise AdmissionError(400, "the prompt is empty: it must contain at least one token", param="prompt")
    if max_tokens > context:
        raise AdmissionError(
            400,
            f"max_tokens is {max_tokens}, but this model's context holds {context} tokens (prompt included). "
            "Ask for fewer tokens.",
            param="max_tokens",
        )
    if num_prompt >= context:
        raise AdmissionError(
            400,
            f"This model's maximum context length is {context} tokens. However, your prompt has "
            f"{num_prompt} tokens, leaving no room for the completion. Please shorten the prompt.",
            param="prompt",
            code="context_length_exceeded",
        )
    if max_tokens < 1:
        raise AdmissionError(400, f"max_tokens must be at least 1, got {max_tokens}.", param="max_tokens")
    total = num_prompt + max_tokens
    if total > context:
        raise AdmissionError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{total} tokens ({num_prompt} in the prompt, {max_tokens} for the completion). "
            "Please reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    min_tokens = req.params.min_tokens
    if min_tokens > max_tokens:
        raise AdmissionError(
            400, f"min_tokens must be between 0 and max_tokens, got {min_tokens}.", param="min_tokens"
        )
    # The last sampled token is never fed back, so KV holds at most total - 1 tokens.
    blocks_needed = -(-(total - 1) // cfg.block_size)
    if blocks_needed > cfg.num_blocks:
        raise AdmissionError(
            400,
            f"The request needs {blocks_needed} KV-cache blocks ({num_prompt} prompt tokens + {max_tokens} "
            f"max_tokens) but the whole cache holds {cfg.num_blocks} blocks of {cfg.block_size} tokens "
            f"({cfg.num_blocks * cfg.block_size} tokens). Reduce the prompt or max_tokens.",
            param="max_tokens",
            code="kv_cache_too_small",
        )
    check_queue(cfg, num_prompt, waiting)


def check_queue(cfg: SchedulerConfig, num_prompt: int, waiting: WaitingQueue) -> None:
    """429 when the waiting queue is full (in requests or prompt tokens)."""
    limit = cfg.max_waiting_requests
    if limit is not None and waiting.num_requests >= limit:
        raise AdmissionError(
            429,
            f"The server is overloaded: {waiting.num_requests} requests are already waiting "
            f"(limit {limit}). Retry later.",
            code="queue_full",
        )
    limit = cfg.max_waiting_tokens
    if limit is not None and waiting.num_requests > 0 and waiting.num_tokens + num_prompt > limit:
        raise AdmissionError(
            429,
            f"The server is overloaded: {waiting.num_tokens} prompt tokens are already waiting and this "
            f"request adds {num_prompt} (limit {limit}). Retry later.",
            code="queue_full",
        )


class WaitingQueue:
    """Requests waiting to run (new or preempted), best ``sort_key`` first.

    A binary heap with lazy deletion: aborted and timed-out requests stay in the heap,
    marked FINISHED, until they reach the top or the heap is compacted. A second heap
    orders deadlines, so expiring requests costs O(log n) per expiry, not a scan per step.
    ``num_tokens`` counts the tokens the waiting requests still have to prefill.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[tuple, Request]] = []
        self._deadlines: list[tuple[float, tuple, Request]] = []
        self.num_requests = 0
        self.num_tokens = 0

    def __len__(self) -> int:
        return self.num_requests

    def __iter__(self) -> Iterator[Request]:
        """Live waiting requests, best first (for tests and debugging; O(n log n))."""
        return iter(
            sorted((r for _, r in self._heap if r.status == RequestStatus.WAITING), key=lambda r: r.sort_key)
        )

    def push(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        heapq.heappush(self._heap, (req.sort_key, req))
        self.num_requests += 1
        self.num_tokens += len(req.all_token_ids)

    def watch_deadline(self, req: Request) -> None:
        """Expire it if it is still waiting (never started) when it is due."""
        if req.due != math.inf:
            heapq.heappush(self._deadlines, (req.due, req.sort_key, req))

    def peek(self) -> Request | None:
        heap = self._heap
        while heap and heap[0][1].status != RequestStatus.WAITING:
            heapq.heappop(heap)
        return heap[0][1] if heap else None

    def pop(self) -> Request:
        """Remove the request ``peek`` returned (call peek first)."""
        req = heapq.heappop(self._heap)[1]
        self.num_requests -= 1
        self.num_tokens -= len(req.all_token_ids)
        return req

    def remove(self, req: Request) -> None:
        """Take a waiting request out (abort, timeout); the caller marks it FINISHED."""
        self.num_requests -= 1
        self.num_tokens -= len(req.all_token_ids)
        req.status = RequestStatus.FINISHED
        if len(self._heap) > 2 * self.num_requests + 64:
            self._heap = [e for e in self._heap if e[1].status == RequestStatus.WAITING]
            heapq.heapify(self._heap)
            self._deadlines = [e for e in self._deadlines if e[2].status == RequestStatus.WAITING]
            heapq.heapify(self._deadlines)

    def expire(self, now: float) -> list[Request]:
        """Remove and return waiting requests whose deadline passed (deadline < now) before they
        ever started; a request that has started (even if preempted since) is the scheduler's to
        expire, as it holds blocks or the workers may know it."""
        out: list[Request] = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] < now:
            req = heapq.heappop(deadlines)[2]
            if req.status == RequestStatus.WAITING and not req.started:
                self.remove(req)
                out.append(req)
        return out

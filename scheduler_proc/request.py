"""One request's state inside the scheduler.

A request's tokens, its KV progress and its block table (block_size 4 here)::

    all_token_ids      p0 p1 p2 p3 | p4 p5 g0 g1 | g2 g3       (p: prompt, g: generated)
    KV written         ########### | ########### | ##          num_computed_tokens = 9
    block_ids (table)  [    7    ]   [    2    ]   [ 9 . . ]   one block per 4 token slots
    block_keys         K0            K1                        one per *full* block of tokens
    num_cached_blocks  2: blocks registered in the prefix cache so far

A decode step computes the one token not yet in KV (g3) and samples the next; a prefill
step computes a run of prompt tokens (a chunk when the token budget is short) and samples
only when it reaches the last known token.

Lifecycle (preempted: blocks freed, tokens kept, recomputed when it runs again)::

    add_request --> WAITING ---schedule---> RUNNING ---EOS / length---> FINISHED
                     |   ^                   |   |
                     |   +----preempted------+   +---abort / error / deadline--> FINISHED
                     +---deadline / abort-------------------------------> FINISHED
"""

from __future__ import annotations

import math
import time

from zeroserve.scheduler_proc.block_manager import hash_block, root_key
from zeroserve.shared.messages import EngineRequest, RequestTimings, RunningRequestData, SamplingParams


def due_time(req: EngineRequest) -> float:
    """When the request must have ended, or (its queue deadline) started: the earlier of the two
    (wall time), math.inf without either. Waiting requests expire, and rank, by it."""
    return min(t for t in (req.deadline, req.queue_deadline, math.inf) if t is not None)


class RequestStatus:
    """Plain ints, not an Enum: compared for every request on every step."""

    WAITING = 0
    RUNNING = 1
    FINISHED = 2
    NAMES = ("WAITING", "RUNNING", "FINISHED")


class Request:
    """Mutable per-request state; owned by the Scheduler, never sent anywhere as is."""

    __slots__ = (
        "request_id", "prompt_token_ids", "all_token_ids", "params", "arrival_time", "priority",
        "deadline", "due", "cache_salt", "sort_key", "status", "block_ids", "num_computed_tokens",
        "block_keys", "num_cached_blocks", "num_cached_tokens", "started", "sent_first_delta",
        "known_to_workers", "stop_token_ids", "stop_set", "max_len", "min_len", "num_prompt_tokens",
        "num_preemptions", "decode_data", "_root_key", "queued_at", "scheduled_at", "first_token_at",
        "pooling",
    )  # fmt: skip

    def __init__(
        self, req: EngineRequest, sort_key: tuple, eos_token_ids: frozenset[int], max_model_len: int
    ) -> None:
        params: SamplingParams = req.params
        self.request_id = req.request_id
        self.prompt_token_ids = req.prompt_token_ids
        self.all_token_ids: list[int] = list(req.prompt_token_ids)
        self.num_prompt_tokens = len(req.prompt_token_ids)
        self.params = params
        self.pooling = req.pooling  # an embedding request: prefill only, then pooled (pooling.py)
        self.arrival_time = req.arrival_time
        self.priority = req.priority
        self.deadline = req.deadline
        self.due = due_time(req)
        self.cache_salt = req.cache_salt
        self.sort_key = sort_key  # smaller runs first, larger is preempted first
        self.status = RequestStatus.WAITING
        self.block_ids: list[int] = []
        self.num_computed_tokens = 0
        self.block_keys: list[bytes] = []
        self.num_cached_blocks = 0
        self.num_cached_tokens = 0  # prefix hit at first scheduling, reported on the first delta
        self.started = False  # scheduled at least once: the scheduler, not the queue, expires it
        self.sent_first_delta = False
        self.known_to_workers = False  # workers hold its state: tell them when it goes
        # Finish checks as token counts, precomputed: one comparison each per sampled token.
        self.stop_token_ids = frozenset(params.stop_token_ids)
        self.stop_set = self.stop_token_ids if params.ignore_eos else self.stop_token_ids | eos_token_ids
        self.min_len = self.num_prompt_tokens + params.min_tokens  # no stop before this many tokens
        self.max_len = min(self.num_prompt_tokens + params.max_tokens, max_model_len)  # "length" here
        self.num_preemptions = 0
        # A plan entry for "decode one token, no new block", the same every such step: built
        # once and reused (plans are immutable messages; nobody may mutate its empty list).
        self.decode_data = RunningRequestData(req.request_id, [], 1)
        self._root_key = root_key(req.cache_salt)
        # phase boundaries on this process' monotonic clock (RequestTimings): the first scheduling
        # and first token count, a preemption does not move them
        self.queued_at = time.monotonic()
        self.scheduled_at: float | None = None
        self.first_token_at: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens :]

    def timings(self, now: float) -> RequestTimings:
        """Its phases, ``now`` (time.monotonic()) being its end."""
        scheduled, first = self.scheduled_at, self.first_token_at
        if scheduled is None:
            return RequestTimings(queue_s=now - self.queued_at)
        if first is None:
            return RequestTimings(queue_s=scheduled - self.queued_at, inference_s=now - scheduled)
        return RequestTimings(
            queue_s=scheduled - self.queued_at,
            prefill_s=first - scheduled,
            decode_s=now - first,
            inference_s=now - scheduled,
        )

    def update_block_keys(self, block_size: int) -> None:
        """Extend ``block_keys`` to cover every full block of ``all_token_ids``."""
        keys, tokens = self.block_keys, self.all_token_ids
        parent = keys[-1] if keys else self._root_key
        for i in range(len(keys), len(tokens) // block_size):
            parent = hash_block(parent, tokens[i * block_size : (i + 1) * block_size])
            keys.append(parent)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {RequestStatus.NAMES[self.status]}, tokens={len(self.all_token_ids)}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_ids})"
        )

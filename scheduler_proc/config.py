"""The scheduler's one frozen config struct: a view of the launcher's EngineConfig."""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from zeroserve.shared.config import DEFAULTS, EngineConfig, view_of


class SchedulerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Limits of one scheduler. ``num_blocks``, ``max_model_len`` and ``eos_token_ids`` are
    what the workers' WorkerReady says; every other field is EngineConfig's of the same name.

    max_num_batched_tokens: tokens computed per step over all requests (decodes count 1).
    max_num_seqs: requests running at once (holding KV blocks). The scheduler runs at most
        max_num_batched_tokens of them, so that every running request advances every step.
    max_waiting_requests / max_waiting_tokens: admission limits on the waiting queue (None =
        no limit); a request over them is refused with HTTP 429. The token limit counts the
        tokens the waiting requests still have to prefill and never refuses a request that
        arrives to an empty queue, so no request is refused forever.
    priority_aging_s: seconds of waiting worth one priority level. Requests are ordered by
        ``priority + min(due, arrival_time + priority_aging_s) / priority_aging_s`` (then
        arrival; due: the request's deadline or queue deadline, whichever is first), which
        equals ordering by priority minus time waited, with a deadline worth less than one
        level (earliest deadline first among equal priorities): a low-priority request
        overtakes newer high-priority ones after a while instead of starving. None = strict
        (priority, due, arrival) order.
    target_itl_ms: a latency target per step (0 = off). Once the step cost model
        (``cost_model.py``) has learned from enough measured steps, each step takes its
        decodes, then only as many prefill tokens as keep the predicted step time under the
        target (never fewer than ``min_prefill_tokens``, so prompts progress when decodes alone
        take longer), within ``max_num_batched_tokens`` as always.
    priority_range: the priorities a request may ask for (inclusive; smaller runs first). One
        outside is refused with HTTP 400, so no request jumps every queue for good, and with
        aging a request at the low end waits at most (max - min) * priority_aging_s behind
        newer ones.
    priority_deadline_ms: the deadline (ms from arrival) a request of that priority gets when
        it names none: the server's default per SLO class (``--priority-deadline-ms P:MS``).
    """

    num_blocks: int
    max_model_len: int  # the worker's: EngineConfig.max_model_len, or the model's, capped by the KV cache
    eos_token_ids: tuple[int, ...] = (2,)
    block_size: int = DEFAULTS.block_size
    max_num_seqs: int = DEFAULTS.max_num_seqs
    max_num_batched_tokens: int = DEFAULTS.max_num_batched_tokens
    max_waiting_requests: int | None = DEFAULTS.max_waiting_requests
    max_waiting_tokens: int | None = DEFAULTS.max_waiting_tokens
    enable_prefix_caching: bool = DEFAULTS.enable_prefix_caching
    priority_aging_s: float | None = DEFAULTS.priority_aging_s
    priority_range: tuple[int, int] = DEFAULTS.priority_range
    target_itl_ms: float = DEFAULTS.target_itl_ms
    priority_deadline_ms: dict[int, float] = DEFAULTS.priority_deadline_ms

    @classmethod
    def from_engine(
        cls, config: EngineConfig, *, num_blocks: int, max_model_len: int, eos_token_ids: Iterable[int]
    ) -> SchedulerConfig:
        """The scheduler of ``config``'s engine, once its workers said what they hold."""
        return view_of(
            config,
            cls,
            num_blocks=num_blocks,
            max_model_len=max_model_len,
            eos_token_ids=tuple(eos_token_ids),
        )

    @property
    def min_prefill_tokens(self) -> int:
        """Prefill tokens a step may hold under target_itl_ms even past the target: one block,
        or 1/32 of the token budget if more, so time to first token stays bounded."""
        return max(self.block_size, self.max_num_batched_tokens // 32)

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"SchedulerConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_waiting_requests", "max_waiting_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be >= 1 or None (no limit), got {value}")
        low, high = self.priority_range
        if low > high:
            raise ValueError(f"SchedulerConfig.priority_range: {low} is above {high}")
        if not self.target_itl_ms >= 0:
            raise ValueError(
                f"SchedulerConfig.target_itl_ms must be >= 0 (0 = off), got {self.target_itl_ms}"
            )
        if self.priority_aging_s is not None and not self.priority_aging_s > 0:
            raise ValueError(
                f"SchedulerConfig.priority_aging_s must be > 0 or None, got {self.priority_aging_s}"
            )

"""The scheduler's one frozen config struct (parsed once by the launcher)."""

from __future__ import annotations

import msgspec


class SchedulerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Limits of one scheduler. ``num_blocks`` comes from the workers' WorkerReady.

    max_num_batched_tokens: tokens computed per step over all requests (decodes count 1).
    max_num_seqs: requests running at once (holding KV blocks). The scheduler runs at most
        max_num_batched_tokens of them, so that every running request advances every step.
    max_waiting_requests / max_waiting_tokens: admission limits on the waiting queue (None =
        no limit); a request over them is refused with HTTP 429. The token limit counts the
        tokens the waiting requests still have to prefill and never refuses a request that
        arrives to an empty queue, so no request is refused forever.
    priority_aging_s: seconds of waiting worth one priority level. Requests are ordered by
        ``priority + arrival_time / priority_aging_s`` (then arrival), which equals ordering
        by priority minus time waited: a low-priority request overtakes newer high-priority
        ones after a while instead of starving. None = strict (priority, arrival) order.
    """

    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    eos_token_ids: tuple[int, ...] = (2,)
    max_waiting_requests: int | None = None
    max_waiting_tokens: int | None = None
    enable_prefix_caching: bool = True
    priority_aging_s: float | None = 10.0

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"SchedulerConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_waiting_requests", "max_waiting_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be >= 1 or None (no limit), got {value}")
        if self.priority_aging_s is not None and not self.priority_aging_s > 0:
            raise ValueError(
                f"SchedulerConfig.priority_aging_s must be > 0 or None, got {self.priority_aging_s}"
            )

"""What this api process knows about the engine: the latest Pong, refreshed in the background.

The Pong's info (max_model_len, vocab_size, scheduler stats) feeds request defaults, /ready,
/v1/models and the engine-wide metrics, which are read at scrape time from here so that N
api processes do not report N copies of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from zeroserve.api_proc.errors import ApiError
from zeroserve.api_proc.requests import EngineLimits
from zeroserve.shared.messages import Pong

log = logging.getLogger("zeroserve.api")


class EngineMonitor:
    def __init__(self, client: Any, interval_s: float = 1.0, timeout_s: float = 1.0):
        self.client = client
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.latest: Pong | None = None  # last answer, kept while the engine is silent
        self.reachable = False
        self.draining = False  # set on SIGTERM: /ready answers 503 so balancers move on
        self._task: asyncio.Task | None = None
        self._refreshing: asyncio.Future | None = None

    @property
    def info(self) -> dict:
        """The latest Pong.info (read only), {} before the first answer."""
        return self.latest.info if self.latest is not None else {}

    async def refresh(self) -> Pong | None:
        """Ping now (one ping in flight however many callers wait); None if no answer."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._ping())
        return await asyncio.shield(self._refreshing)

    async def _ping(self) -> Pong | None:
        try:
            pong = await asyncio.wait_for(self.client.ping(timeout=self.timeout_s), self.timeout_s + 0.5)
        except Exception as e:  # timeout, connection trouble: the engine is unreachable
            if self.reachable:
                log.warning("engine stopped answering pings: %s", type(e).__name__)
            self.reachable = False
            return None
        self.latest, self.reachable = pong, True
        return pong

    async def limits(self) -> EngineLimits:
        """max_model_len / vocab_size for a request; pings once if nothing is known yet."""
        if "max_model_len" not in self.info:
            await self.refresh()
        info = self.info
        try:
            max_model_len = int(info["max_model_len"])
        except (KeyError, TypeError, ValueError):
            raise ApiError(
                503,
                "The engine is not ready yet (it has not reported its model). Retry shortly.",
                headers={"Retry-After": "1"},
            ) from None
        vocab_size = info.get("vocab_size", 0)
        return EngineLimits(
            max_model_len=max_model_len, vocab_size=vocab_size if isinstance(vocab_size, int) else 0
        )

    async def readiness(self) -> tuple[bool, str]:
        """(ready, why not): draining, unreachable, loading, or a worker down."""
        if self.draining:
            return False, "draining: this api process is shutting down"
        pong = await self.refresh()
        if pong is None:
            return False, "the engine does not answer"
        if not pong.ready:
            return False, "the engine is loading"
        if pong.info.get("workers_ready") is False:
            return False, "a worker is down (restarting)"
        return True, "ready"

    # ------------------------------------------------------------------ background refresh

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            await self.refresh()
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

"""What this api process knows about the engine: the latest Pong, refreshed in the background.

The Pong's EngineStatus (model, max_model_len, scheduler stats) gates work until the engine
has answered once, and feeds /ready, /v1/models and the engine-wide metrics, which are read
at scrape time from here so that N api processes do not report N copies of them. Every
tokenizer is pinged: requests are spread over all of them, so /ready needs every one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from zeroserve.api_proc.errors import ApiError
from zeroserve.shared.messages import EngineStatus, Pong, RouterStats

log = logging.getLogger("zeroserve.api")


class EngineMonitor:
    def __init__(self, client: Any, interval_s: float = 1.0, timeout_s: float = 1.0):
        self.client = client
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.latest: Pong | None = None  # last answer, kept while the engine is silent
        self.answers: list[Pong | None] = []  # the last round, one per tokenizer (None: silent)
        # each tokenizer's latest routing counters (kept while it is silent: counters never drop)
        self.routers: dict[int, RouterStats] = {}
        self.reachable = False
        self.draining = False  # set on SIGTERM: /ready answers 503 so balancers move on
        self._task: asyncio.Task | None = None
        self._refreshing: asyncio.Future | None = None

    @property
    def engine(self) -> EngineStatus | None:
        """The latest answer's engine status, None before the first answer."""
        return self.latest.engine if self.latest is not None else None

    async def refresh(self) -> Pong | None:
        """Ping every tokenizer now (one round in flight however many callers wait); the first
        answer in tokenizer order, None if none answered."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._ping())
        return await asyncio.shield(self._refreshing)

    async def _ping(self) -> Pong | None:
        try:
            answers = await asyncio.wait_for(
                self.client.ping_all(timeout=self.timeout_s), self.timeout_s + 0.5
            )
        except Exception as e:  # timeout, connection trouble: the engine is unreachable
            answers = []
            log.debug("engine ping failed: %s", type(e).__name__)
        before, self.answers = self.silent(), answers
        for i, answer in enumerate(answers):
            if answer is not None and answer.engine is not None and answer.engine.router is not None:
                self.routers[i] = answer.engine.router
        silent = self.silent()
        if silent and silent != before and len(silent) < len(answers):  # all silent: logged below
            log.warning("tokenizer(s) %s do not answer pings", ", ".join(map(str, silent)))
        pong = next((a for a in answers if a is not None), None)
        if pong is None:
            if self.reachable:
                log.warning("engine stopped answering pings")
            self.reachable = False
            return None
        self.latest, self.reachable = pong, True
        return pong

    def router_stats(self) -> list[RouterStats]:
        """Every tokenizer's routing counters (each routes its own share of the requests)."""
        return list(self.routers.values())

    def silent(self) -> list[int]:
        """Tokenizers that did not answer the last round."""
        return [i for i, pong in enumerate(self.answers) if pong is None]

    async def require_engine(self) -> EngineStatus:
        """Before sending work: pings once if the engine never answered, 503 if it still has not."""
        if self.engine is None:
            await self.refresh()
        engine = self.engine
        if engine is None:
            raise ApiError(
                503,
                "The engine is not ready yet (it has not reported its model). Retry shortly.",
                headers={"Retry-After": "1"},
            )
        return engine

    async def readiness(self) -> tuple[bool, str]:
        """(ready, why not): draining, unreachable, a tokenizer silent, loading, or a worker down."""
        if self.draining:
            return False, "draining: this api process is shutting down"
        pong = await self.refresh()
        if pong is None:
            return False, "the engine does not answer"
        silent = self.silent()
        if len(silent) == 1:
            return False, f"tokenizer {silent[0]} does not answer"
        if silent:
            return False, f"tokenizers {', '.join(map(str, silent))} do not answer"
        pong = next((a for a in self.answers if a is not None and not a.ready), pong)
        if not pong.ready:
            return False, "the engine is loading"
        if pong.engine is not None and not pong.engine.stats.workers_ready:
            if len(pong.engine.replicas) > 1:
                return False, "no engine replica is live (their workers are down or restarting)"
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

"""EngineMonitor's readiness over several tokenizers: every one must answer and be ready."""

from __future__ import annotations

import asyncio

from zeroserve.api_proc.engine_state import EngineMonitor
from zeroserve.shared.messages import EngineStatus, Pong, SchedulerStats


def pong(ready: bool = True, max_model_len: int = 128) -> Pong:
    engine = EngineStatus(
        model_name="m",
        max_model_len=max_model_len,
        vocab_size=100,
        draining=False,
        bad_frames=0,
        stats=SchedulerStats(workers_ready=ready),
    )
    return Pong(sent_at=0.0, role="tokenizer", ready=ready, engine=engine)


class Tokenizers:
    """The part of EngineClient the monitor uses: one answer (or None) per tokenizer."""

    def __init__(self, *answers: Pong | None):
        self.answers = list(answers)

    async def ping_all(self, timeout: float = 1.0) -> list[Pong | None]:
        return list(self.answers)


def readiness(*answers: Pong | None) -> tuple[tuple[bool, str], EngineMonitor]:
    monitor = EngineMonitor(Tokenizers(*answers))
    return asyncio.run(monitor.readiness()), monitor


def test_ready_only_when_every_tokenizer_answers_ready():
    assert readiness(pong(), pong())[0] == (True, "ready")
    assert readiness(pong(), None)[0] == (False, "tokenizer 1 does not answer")
    assert readiness(None, pong(), None)[0] == (False, "tokenizers 0, 2 do not answer")
    assert readiness(pong(), pong(ready=False))[0] == (False, "the engine is loading")
    assert readiness(None, None)[0] == (False, "the engine does not answer")


def test_engine_status_comes_from_the_first_tokenizer_that_answers():
    (ok, _), monitor = readiness(None, pong(max_model_len=77))
    assert not ok and monitor.engine is not None and monitor.engine.max_model_len == 77

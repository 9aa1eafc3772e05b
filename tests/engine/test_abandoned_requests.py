"""No work left running for nobody: requests whose client is gone, hung or has given up stop
generating, and only theirs.

One engine with two api processes (the test that kills one comes last); the running count is the scheduler's own (through a
tokenizer's Pong), fresh within a heartbeat.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest

from tests.conftest import start_server
from zeroserve.shared.client import EngineClient
from zeroserve.shared.messages import SamplingParams

NUM_STREAMS = 32
# long enough that, unaborted, they run far past the end of each check (tokens/s on a few cores)
MAX_TOKENS = 600


@pytest.fixture(scope="module")
def server():
    server = start_server("--api-workers", "2", api_key=None)
    yield server
    assert server.stop() == 0, server.log()


async def in_engine(probe: EngineClient) -> int:
    """Requests the scheduler holds (running or waiting)."""
    stats = (await probe.ping(timeout=5)).engine.stats
    return stats.num_running + stats.num_waiting


async def wait_in_engine(probe: EngineClient, want: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while (n := await in_engine(probe)) != want:
        assert time.monotonic() < deadline, f"{what}: {n} requests in the engine, expected {want}"
        await asyncio.sleep(0.1)


class HttpStream:
    """One streaming completion, read in the background: when data last came, and whether the
    connection broke."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, i: int):
        self.session, self.base_url, self.i = session, base_url, i
        self.chunks = 0
        self.last_chunk = 0.0
        self.broken = False
        self.ended = False
        self.error_event = False
        self.task: asyncio.Task | None = None

    async def open(self) -> None:
        body = {
            "prompt": f"Write a long story about the number {self.i}:",
            "max_tokens": MAX_TOKENS,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
        }
        self.resp = await self.session.post(self.base_url + "/v1/completions", json=body)
        assert self.resp.status == 200, await self.resp.text()
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for line in self.resp.content:
                if line.startswith(b"data: {"):
                    self.chunks += 1
                    self.last_chunk = time.monotonic()
                    self.error_event |= b'"error"' in line
        except (aiohttp.ClientError, ConnectionError):
            self.broken = True
        self.ended = True

    def close(self) -> None:
        self.resp.close()
        if self.task is not None:
            self.task.cancel()


def test_a_client_that_gives_up_on_a_silent_tokenizer_aborts_its_request(server):
    """The client's heartbeat times out while the tokenizer is stopped; when the tokenizer
    reads again, the client's Abort frees the request."""
    tokenizer = server.role_pids("tokenizer")[0]

    async def main():
        async with (
            EngineClient(server.tokenizer_address) as probe,
            EngineClient(server.tokenizer_address) as client,
        ):
            await wait_in_engine(probe, 0, 30, "engine not idle at start")
            first_token = asyncio.Event()

            async def run():
                params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
                async for delta in client.generate(prompt="Tell me everything about rivers:", params=params):
                    if delta.token_ids:
                        first_token.set()
                    if delta.finish_reason is not None:
                        return delta

            task = asyncio.ensure_future(run())
            await asyncio.wait_for(first_token.wait(), 60)
            os.kill(tokenizer, signal.SIGSTOP)
            try:
                last = await asyncio.wait_for(task, 10)
            finally:
                os.kill(tokenizer, signal.SIGCONT)
            assert last.error is not None and last.error.status == 503, last
            # well within the scheduler's own 4 s watchdog on a silent tokenizer
            await wait_in_engine(probe, 0, 2.5, "the request the client gave up on kept running")

    asyncio.run(main())


def test_a_hung_api_process_has_its_requests_aborted_and_is_told_when_it_wakes(server):
    """A stopped (not dead) api process keeps its connections: its silence alone frees its
    requests; when it runs again its streams end with an error instead of hanging."""
    apis = server.role_pids("api")
    assert len(apis) == 2

    async def main():
        async with EngineClient(server.tokenizer_address) as probe, aiohttp.ClientSession() as session:
            await wait_in_engine(probe, 0, 60, "engine not idle at start")
            streams = [HttpStream(session, server.base_url, i) for i in range(16)]
            await asyncio.gather(*(s.open() for s in streams))
            stopped_api = apis[0]
            try:
                deadline = time.monotonic() + 60
                while not all(s.chunks for s in streams) or await in_engine(probe) != len(streams):
                    assert time.monotonic() < deadline, "the streams never all ran"
                    await asyncio.sleep(0.2)
                os.kill(stopped_api, signal.SIGSTOP)
                stopped = time.monotonic()
                await asyncio.sleep(1.0)
                frozen = [s for s in streams if s.last_chunk < stopped + 0.5]
                assert 0 < len(frozen) < len(streams), "SO_REUSEPORT put every stream on one process"
                await wait_in_engine(
                    probe, len(streams) - len(frozen), 8, "the hung api process's requests kept running"
                )
            finally:
                os.kill(stopped_api, signal.SIGCONT)
            try:
                deadline = time.monotonic() + 10
                while not all(s.ended for s in frozen):
                    assert time.monotonic() < deadline, "streams of the woken api process still hang"
                    await asyncio.sleep(0.1)
                assert all(s.error_event and not s.broken for s in frozen)
            finally:
                for s in streams:
                    s.close()
            await wait_in_engine(probe, 0, 15, "hung-up streams kept running")

    asyncio.run(main())


def test_killing_an_api_process_aborts_its_requests_and_only_its(server):
    apis = server.role_pids("api")
    assert len(apis) == 2

    async def main():
        async with EngineClient(server.tokenizer_address) as probe, aiohttp.ClientSession() as session:
            await wait_in_engine(probe, 0, 60, "engine not idle at start")
            streams = [HttpStream(session, server.base_url, i) for i in range(NUM_STREAMS)]
            await asyncio.gather(*(s.open() for s in streams))
            try:
                deadline = time.monotonic() + 120
                while not all(s.chunks for s in streams) or await in_engine(probe) != NUM_STREAMS:
                    assert time.monotonic() < deadline, "the streams never all ran"
                    await asyncio.sleep(0.2)

                os.kill(apis[0], signal.SIGKILL)
                killed = time.monotonic()
                # each stream either breaks (it was on the killed process) or goes on streaming
                while not all(s.ended or s.last_chunk > killed for s in streams):
                    assert time.monotonic() < killed + 5, "some streams neither broke nor streamed"
                    await asyncio.sleep(0.05)
                survivors = [s for s in streams if not s.ended]
                assert 0 < len(survivors) < NUM_STREAMS, "SO_REUSEPORT put every stream on one process"
                await wait_in_engine(
                    probe,
                    len(survivors),
                    killed + 5 - time.monotonic(),
                    "the killed api process's requests kept running",
                )

                # past the tokenizer's silence timeout too, the living process's streams go on
                await asyncio.sleep(3.5)
                assert await in_engine(probe) == len(survivors)
                now = time.monotonic()
                stalled = [s.i for s in survivors if s.ended or now - s.last_chunk > 2.0]
                assert not stalled, f"streams on the living api process stopped: {stalled}"
            finally:
                for s in streams:
                    s.close()
            await wait_in_engine(probe, 0, 15, "hung-up streams kept running")

    asyncio.run(main())

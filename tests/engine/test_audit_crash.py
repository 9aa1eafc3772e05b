"""kill -9 of the api process under load: every request whose whole response reached the client
has its audit record once the supervisor has restarted the process (which replays its spool)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import tempfile
import time
import uuid

import aiohttp
import pytest

from tests.conftest import start_server

CONCURRENCY = 24


@pytest.fixture
def server():
    state = tempfile.mkdtemp(prefix="zs-audit-crash-")
    server = start_server("--state-dir", state, "--max-num-seqs", "32", api_key=None)
    server.state = state
    yield server
    server.stop()
    shutil.rmtree(state, ignore_errors=True)


async def load(base_url: str, completed: list[str], kill_after: int, api_pid: int) -> int:
    """Requests from CONCURRENCY clients until the api process is killed (after ``kill_after``
    complete responses); returns how many were cut off by the kill."""
    killed = asyncio.Event()
    cut = 0

    async def client(c: int, session: aiohttp.ClientSession) -> None:
        nonlocal cut
        i = 0
        while not killed.is_set():
            i += 1
            rid = f"crash-{c}-{i}-{uuid.uuid4().hex[:8]}"
            stream = (c + i) % 2 == 0
            body = {"prompt": f"client {c} request {i}:", "max_tokens": 1 + i % 4, "stream": stream}
            try:
                async with session.post(
                    base_url + "/v1/completions", json=body, headers={"X-Request-Id": rid}
                ) as resp:
                    data = await resp.read()  # to the end of the body (the SSE stream's EOF)
                    if resp.status == 200 and (not stream or data.endswith(b"data: [DONE]\n\n")):
                        completed.append(rid)
            except (TimeoutError, aiohttp.ClientError, ConnectionError):
                cut += 1
                return
            if len(completed) >= kill_after and not killed.is_set():
                os.kill(api_pid, signal.SIGKILL)
                killed.set()

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(client(c, session) for c in range(CONCURRENCY)))
    return cut


def recorded(state: str, ids: list[str], timeout: float = 60.0) -> set[str]:
    deadline = time.monotonic() + timeout
    want = set(ids)
    while True:
        try:
            with sqlite3.connect(os.path.join(state, "audit.db")) as db:
                found = {r[0] for r in db.execute("SELECT request_id FROM zeroserve_audit")}
        except sqlite3.OperationalError:  # not created yet
            found = set()
        if want <= found or time.monotonic() > deadline:
            return found & want
        time.sleep(0.3)


def ready(server) -> bool:
    try:
        return server.get("/ready", timeout=2)[0] == 200
    except OSError:  # connection refused while no api process listens
        return False


def test_every_completed_request_survives_a_kill_9_of_the_api_process(server):
    (api_pid,) = server.role_pids("api")
    completed: list[str] = []
    cut = asyncio.run(load(server.base_url, completed, 60, api_pid))
    assert len(completed) >= 60 and cut > 0  # the kill did land under load
    deadline = time.monotonic() + 60
    while not ready(server):  # the supervisor restarts the api process
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.3)
    assert server.role_pids("api") != [api_pid]
    found = recorded(server.state, completed)
    missing = sorted(set(completed) - found)
    assert not missing, f"{len(missing)} of {len(completed)} completed requests have no record: {missing[:5]}"

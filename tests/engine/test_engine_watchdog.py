"""A worker that stops making progress while its heartbeats go on (a stuck forward pass) or that
is paused: the scheduler fails its requests with finish reason "error", /ready turns 503, the
worker exits and is restarted, and the engine serves again.

The stall is injected with ZEROSERVE_FAULT_STEP_SLEEP_FILE (test-only): the worker consumes the
file at the start of a step and sleeps for the seconds it holds, inside the step.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from tests.conftest import start_server
from tests.engine.test_engine_failures import role_pid
from tests.stack_health import serve_again
from zeroserve.shared.client import EngineClient
from zeroserve.shared.messages import SamplingParams

STEP_TIMEOUT_S = 2.0  # the worker's own limit is STEP_EXIT_GRACE_S (2 s) later


@pytest.fixture(scope="module")
def stall_file(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("fault") / "step-sleep")


@pytest.fixture(scope="module")
def server(stall_file):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZEROSERVE_FAULT_STEP_SLEEP_FILE", stall_file)
        server = start_server("--step-timeout-s", str(STEP_TIMEOUT_S), api_key=None)
    yield server
    assert server.stop() == 0, server.log()


def arm(path: str, seconds: float) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(str(seconds))
    os.replace(path + ".tmp", path)  # the worker never reads a half-written file


async def stream_past_first_token(client: EngineClient, started: asyncio.Event) -> list:
    deltas = []
    params = SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True)
    async for d in client.generate(prompt="Count slowly to one thousand:", params=params):
        deltas.append(d)
        if d.token_ids:
            started.set()
    return deltas


def ready_status(server) -> int:
    return server.get("/ready", timeout=5)[0]


def wait_for_status(server, want: int, within_s: float) -> float:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if ready_status(server) == want:
            return time.monotonic()
        time.sleep(0.1)
    raise AssertionError(f"/ready never answered {want} within {within_s}s:\n{server.log()}")


def stall_during_a_request(server, stall_file: str, seconds: float) -> tuple[list, float]:
    """Arm a stall of ``seconds`` once a request streams; (its deltas, seconds until it ended)."""

    async def main():
        async with EngineClient(server.tokenizer_address) as client:
            started = asyncio.Event()
            job = asyncio.ensure_future(stream_past_first_token(client, started))
            await asyncio.wait_for(started.wait(), 60)
            armed_at = time.monotonic()
            arm(stall_file, seconds)
            deltas = await asyncio.wait_for(job, STEP_TIMEOUT_S + 15)
            return deltas, time.monotonic() - armed_at

    return asyncio.run(main())


def test_a_hung_step_fails_its_requests_and_the_worker_is_restarted(server, stall_file):
    worker = role_pid(server, "worker")
    deltas, took = stall_during_a_request(server, stall_file, 60.0)  # "hung": far past every limit
    last = deltas[-1]
    assert last.finish_reason == "error" and last.error is not None, last
    assert "stalled" in last.error.message and "step_timeout_s" in last.error.message, last.error
    assert STEP_TIMEOUT_S - 0.5 < took < STEP_TIMEOUT_S + 5, f"ended {took:.1f}s after the stall began"
    assert not os.path.exists(stall_file), "the fault fired"
    wait_for_status(server, 503, within_s=5)  # not ready while the worker restarts
    assert asyncio.run(serve_again(server))["usage"]["completion_tokens"] == 4
    assert ready_status(server) == 200
    assert role_pid(server, "worker") != worker, "the stuck worker was replaced"
    assert "a step has run for more than" in server.log(), "the worker's own watchdog ended it"


def test_a_step_that_returns_after_the_timeout_is_told_to_exit(server, stall_file):
    """Between the scheduler's limit and the worker's own: the worker reads WorkerExit and goes."""
    worker = role_pid(server, "worker")
    deltas, took = stall_during_a_request(server, stall_file, STEP_TIMEOUT_S + 1.0)
    assert deltas[-1].finish_reason == "error" and "stalled" in deltas[-1].error.message
    assert took < STEP_TIMEOUT_S + 1.0, "failed at the scheduler's limit, not when the step returned"
    assert asyncio.run(serve_again(server))["usage"]["completion_tokens"] == 4
    assert role_pid(server, "worker") != worker
    assert "the scheduler gave up on this worker" in server.log()


def test_a_paused_worker_is_replaced_once_it_resumes(server):
    """Heartbeats stop while the worker is stopped; when it resumes it must not carry on with
    requests the scheduler has already failed, and the engine must come back."""
    worker = role_pid(server, "worker")
    os.kill(worker, signal.SIGSTOP)
    try:
        wait_for_status(server, 503, within_s=10)
    finally:
        os.kill(worker, signal.SIGCONT)
    assert asyncio.run(serve_again(server))["usage"]["completion_tokens"] == 4
    assert role_pid(server, "worker") != worker
    assert ready_status(server) == 200

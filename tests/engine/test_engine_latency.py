"""--target-itl-ms and deadline_ms through the real stack (packaged SmolLM2 GGUF): requests are
served as usual, a deadline no start could meet is refused with 429 once the scheduler has
measured enough steps, and the over-target counter and the model's fit error reach /metrics."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import start_server
from zeroserve.shared.config import DEFAULTS


@pytest.fixture(scope="module")
def server():
    s = start_server("--target-itl-ms", "250")
    yield s
    code = s.stop()
    assert code == 0, f"zeroserve exited with {code}:\n{s.log()}"


def complete(server, **body):
    return server.post("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 8, **body})


def test_the_target_is_off_by_default():
    assert DEFAULTS.target_itl_ms == 0


def test_requests_are_served_and_an_impossible_deadline_is_refused(server):
    # warm the step cost model up: four waves of requests, well over its minimum of 16 steps
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: complete(server, max_tokens=12, seed=i), range(16)))
    for status, body in results:
        assert status == 200, body
        assert body["usage"]["completion_tokens"] == 12
    status, body = complete(server, prompt="word " * 400, deadline_ms=1, max_tokens=4)
    assert status == 429, body
    assert body["error"]["code"] == "deadline_infeasible" and "deadline" in body["error"]["message"]
    status, body = complete(server, deadline_ms=600_000)
    assert status == 200 and body["choices"][0]["finish_reason"] == "length", body


def test_the_over_target_counter_and_the_fit_error_are_exported(server):
    # the model's fit error on unseen steps: measured once the test above ran past its warm-up
    # (/metrics shows the engine's stats as of the last heartbeat: poll a few)
    deadline = time.monotonic() + 10
    while True:
        status, text = server.get("/metrics")
        assert status == 200
        line = next(x for x in text.splitlines() if x.startswith(b"zeroserve:step_cost_model_error{"))
        error = float(line.rsplit(b" ", 1)[1])
        if error > 0.0 or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert b"zeroserve:steps_over_itl_target_total" in text
    assert 0.0 < error < 1.0, line

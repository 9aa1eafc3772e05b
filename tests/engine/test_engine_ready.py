"""/ready speaks for every tokenizer: requests are spread over all of them, so one that is down
makes the api not ready until the supervisor has it back."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.conftest import start_server
from tests.engine.test_engine_failures import pid_alive


def tokenizer_pid(server, index: int) -> int:
    """The pid of `zeroserve proc tokenizer ... --index INDEX` under the launcher."""
    for pid in server.children():
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
        if b"proc" not in args or b"--index" not in args:
            continue
        role, i = args[args.index(b"proc") + 1], args[args.index(b"--index") + 1]
        if role == b"tokenizer" and i == str(index).encode():
            return pid
    raise AssertionError(f"no tokenizer {index} under the launcher")


@pytest.fixture(scope="module")
def server():
    server = start_server("--num-tokenizers", "2", api_key=None)
    yield server
    assert server.stop() == 0, server.log()


def test_ready_is_503_while_any_tokenizer_is_down(server):
    assert server.get("/ready")[0] == 200
    victim = tokenizer_pid(server, 1)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    statuses = []
    while time.monotonic() < deadline:
        status, body = server.get("/ready", timeout=5)
        statuses.append(status)
        if status == 503:
            assert "tokenizer 1" in json.loads(body)["error"]["message"], body
            break
        time.sleep(0.05)
    assert 503 in statuses, f"/ready stayed {set(statuses)} with tokenizer 1 killed"
    deadline = time.monotonic() + 60
    while server.get("/ready", timeout=5)[0] != 200:
        assert time.monotonic() < deadline, "not ready again after the tokenizer restarted:\n" + server.log()
        time.sleep(0.2)
    assert not pid_alive(victim) and tokenizer_pid(server, 1) != victim

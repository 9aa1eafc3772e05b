"""The model registry with real processes: the packaged SmolLM2 served as two versions.

One server for the module (tiny KV pools); the admin calls go straight to the launcher's
control socket with a DEALER, as the api processes send them. Hot load v2, unload v1 while 16
streams run on it (every stream completes; v1 is stopped only after them), a restart restores
the weights and the stable version, a load that cannot fit is refused before anything starts,
and a load whose processes cannot start ends failed with the reason.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import msgspec
import pytest
import zmq

from tests.conftest import start_server
from zeroserve.shared.control import AdminCommand, ToApi

pytestmark = pytest.mark.usefixtures("gguf_path")

TINY_LLAMA = {  # a config.json the launcher reads, with no weights or tokenizer beside it
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
ARGS = (
    "--served-model-name",
    "smol",
    "--max-model-len",
    "256",
    "--num-kv-blocks",
    "48",
    "--audit-db",
    "off",
    "--model-drain-timeout-s",
    "30",
)
STREAMS, TOKENS = 16, 24


def admin(server, op: str, version: str | None = None, body: dict | None = None) -> tuple[int, dict]:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{server.run_dir}/control.sock")
    try:
        cmd = AdminCommand(
            uuid.uuid4().hex, op, "smol", version, json.dumps(body) if body is not None else ""
        )
        sock.send(msgspec.msgpack.encode(cmd))
        assert sock.poll(30_000), f"no answer to {op}"
        reply = msgspec.msgpack.decode(sock.recv(), type=ToApi)
    finally:
        sock.close()
    return reply.status, json.loads(reply.body)


def states(server) -> dict[str, tuple[str, int]]:
    status, out = admin(server, "list")
    assert status == 200
    return {v["version"]: (v["state"], v["weight"]) for v in out["data"][0]["versions"]}


def wait_state(server, version: str, state: str, timeout: float = 120.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if states(server).get(version, ("",))[0] == state:
            return time.monotonic()
        time.sleep(0.2)
    raise AssertionError(f"{version} not {state} after {timeout}s: {states(server)}\n{server.log()}")


def completion(server) -> tuple[int, str]:
    port = int(server.base_url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps({"prompt": "Hi", "max_tokens": 2}),
        {"Content-Type": "application/json"},
    )
    r = conn.getresponse()
    r.read()
    return r.status, r.getheader("X-Model-Version")


@pytest.fixture(scope="module")
def broken_model(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("broken-model")
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA))
    return str(folder)


@pytest.fixture(scope="module")
def server(tmp_path_factory, broken_model):
    state_dir = str(tmp_path_factory.mktemp("registry-state"))
    srv = start_server(*ARGS, "--state-dir", state_dir, api_key=None)
    srv.state_dir = state_dir
    # the broken load fails in the background (three exits with backoff) while the other tests run
    status, out = admin(srv, "load", body={"version": "broken", "path": broken_model})
    assert status == 202, out
    yield srv
    srv.stop()


def test_a_load_that_cannot_fit_or_has_no_model_is_refused_before_anything_starts(server):
    workers = len(server.role_pids("worker"))
    status, out = admin(server, "load", body={"version": "huge", "options": {"num_kv_blocks": 10**9}})
    assert status == 507 and out["error"]["code"] == "insufficient_memory"
    assert "does not fit" in out["error"]["message"] and "GiB is available" in out["error"]["message"]
    status, out = admin(server, "load", body={"version": "gone", "path": "/nonexistent/model.gguf"})
    assert (status, out["error"]["param"]) == (400, "path")
    assert "huge" not in states(server) and "gone" not in states(server)
    assert not os.path.exists(os.path.join(server.run_dir, "groups", "smol@huge"))
    assert len(server.role_pids("worker")) == workers


def test_a_ready_version_whose_worker_keeps_dying_is_failed_and_its_traffic_stays_on_v1(server):
    wait_state(server, "broken", "failed")  # (its workers come and go until then)
    v1_workers = set(server.role_pids("worker"))
    assert admin(server, "load", body={"version": "v3"})[0] == 202
    wait_state(server, "v3", "ready")
    assert admin(server, "traffic", body={"weights": {"v1": 70, "v3": 30}})[0] == 200
    killed: set[int] = set()
    deadline = time.monotonic() + 60
    while states(server)["v3"][0] == "ready":  # kill v3's worker each time it is restarted
        assert time.monotonic() < deadline, f"v3 never failed: {states(server)}\n{server.log()}"
        for pid in set(server.role_pids("worker")) - v1_workers - killed:
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.1)
    assert len(killed) == 3  # three quick exits in a row
    _, out = admin(server, "list")
    v3 = next(v for v in out["data"][0]["versions"] if v["version"] == "v3")
    assert (v3["state"], v3["weight"]) == ("failed", 0) and "keeps exiting" in v3["reason"], v3
    assert admin(server, "traffic", body={"weights": {"v1": 100}})[0] == 200
    assert {completion(server) for _ in range(6)} == {(200, "v1")}
    deadline = time.monotonic() + 30
    while set(server.role_pids("worker")) - v1_workers:  # v3's group is stopped (SIGTERM first)
        assert time.monotonic() < deadline, f"v3's worker still runs: {server.role_pids('worker')}"
        time.sleep(0.2)


def test_unloading_v1_lets_its_16_streams_finish_then_stops_it(server):
    status, out = admin(server, "load", body={"version": "v2"})
    assert (status, out["weight"]) == (202, 0)
    wait_state(server, "v2", "ready")
    assert states(server)["v1"] == ("ready", 100)
    port = int(server.base_url.rsplit(":", 1)[1])
    started: list[float] = []

    def stream() -> tuple[int, str, str | None, float]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        body = {"prompt": "Tell me a story", "max_tokens": TOKENS, "min_tokens": TOKENS, "stream": True}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        version = r.getheader("X-Model-Version")
        first = r.readline()
        started.append(time.monotonic())
        rest = first + r.read()
        events = [json.loads(x[6:]) for x in rest.decode().split("\n") if x.startswith("data: {")]
        finish = next(
            (c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")), None
        )
        return r.status, version, finish, time.monotonic()

    with ThreadPoolExecutor(STREAMS) as pool:
        futures = [pool.submit(stream) for _ in range(STREAMS)]
        deadline = time.monotonic() + 60
        while len(started) < STREAMS and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(started) == STREAMS, "the streams did not start"
        assert admin(server, "traffic", body={"weights": {"v1": 0, "v2": 100}})[0] == 200
        status, out = admin(server, "unload", "v1")
        assert (status, out["state"]) == (202, "draining")
        assert admin(server, "unload", "v1")[1]["state"] == "draining"  # asked twice: the same drain
        results = [f.result() for f in futures]
    wait_state(server, "v1", "unloaded", timeout=60)
    assert [(s, v, f) for s, v, f, _ in results] == [(200, "v1", "length")] * STREAMS
    assert completion(server) == (200, "v2")
    assert len(server.role_pids("worker")) == 1  # v1's worker is gone; v2's serves


def test_a_load_whose_processes_cannot_start_ends_failed_with_the_reason(server):
    wait_state(server, "broken", "failed", timeout=120)
    _, out = admin(server, "list")
    broken = next(v for v in out["data"][0]["versions"] if v["version"] == "broken")
    assert broken["weight"] == 0 and "failed to start 3 times" in broken["reason"], broken
    assert not os.path.exists(os.path.join(server.run_dir, "groups", "smol@broken", "tokenizer-0.sock"))


def test_a_restart_restores_the_weights_and_the_stable_version(server):
    wait_state(server, "v1", "unloaded")
    server.stop()
    again = start_server(*ARGS, "--state-dir", server.state_dir, api_key=None)
    try:
        _, out = admin(again, "list")
        model = out["data"][0]
        assert model["stable"] == "v2"
        assert [(v["version"], v["state"], v["weight"]) for v in model["versions"]] == [("v2", "ready", 100)]
        assert completion(again) == (200, "v2")
        # v2 is the first group now: it took the run dir's root sockets
        assert os.path.exists(os.path.join(again.run_dir, "tokenizer-0.sock"))
    finally:
        assert again.stop() == 0, again.log()

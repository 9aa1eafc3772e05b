"""The model registry on real processes: the packaged SmolLM2 served as three versions of one
model (`zeroserve serve --models`), routed by the api processes (api_proc/versions.py,
model_router.py) and steered by the launcher's registry (canary, rollback, promotion).

One server for the module (each version a small KV pool); the tests run in file order, the
canaries last, because they change the weights."""

from __future__ import annotations

import collections
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import start_server

ADMIN = "admin-key-16"
MODELS = """
default = "smol"
[[models]]
name = "smol"
  [[models.versions]]
  version = "v1"
  weight = 70
  options = { num_kv_blocks = 256 }
  [[models.versions]]
  version = "v2"
  weight = 30
  options = { num_kv_blocks = 256, max_num_seqs = 1, max_waiting_requests = 1 }
  [[models.versions]]
  version = "v3"
  weight = 0
  options = { num_kv_blocks = 256 }
  fault = { error_rate = 0.5 }
[[virtual]]
name = "auto"
fallback = ["smol@v1"]
  [[virtual.rules]]
  max_prompt_tokens = 8
  model = "smol@v2"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("versions")
    (d / "models.toml").write_text(MODELS)
    s = start_server(
        "--models", str(d / "models.toml"), "--state-dir", str(d / "state"), "--admin-key", ADMIN,
        "--allow-fault-injection", "--max-model-len", "512", api_key=None, ready_timeout=360,
    )  # fmt: skip
    try:
        wait_until(
            lambda: all(v["state"] == "ready" for v in versions(s).values()), 240, "every version ready"
        )
        # the api process routes by the registry it last heard (a watch every 200 ms): requests
        # sent before it sees the last version ready all go to the others
        wait_until(
            lambda: all(g["state"] == "ready" and g["reachable"] for g in api_health(s)),
            10,
            "the api to see them",
        )
        yield s
    finally:
        assert s.stop() == 0, s.log()


def call(server, method: str, path: str, body: dict | None = None, headers: dict | None = None):
    """(status, headers, JSON body) of one HTTP call."""
    req = urllib.request.Request(
        server.base_url + path,
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read() or b"null")


def complete(server, prompt: str = "Hi", max_tokens: int = 1, headers: dict | None = None, **body):
    return call(
        server, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, **body}, headers
    )


def admin(server, method: str, path: str, body: dict | None = None, key: str = ADMIN):
    return call(server, method, "/admin/models" + path, body, {"Authorization": f"Bearer {key}"})


def versions(server) -> dict[str, dict]:
    status, _, body = admin(server, "GET", "")
    assert status == 200, body
    (smol,) = [m for m in body["data"] if m["name"] == "smol"]
    return {v["version"]: v | {"canary": smol["canary"], "stable": smol["stable"]} for v in smol["versions"]}


def wait_until(check, timeout: float, what: str, between=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if between is not None:
            between()
        else:
            time.sleep(0.2)
    raise AssertionError(f"not within {timeout}s: {what}")


def test_weights_70_30_split_within_binomial_noise(server):
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: complete(server), range(300)))
    assert {status for status, _, _ in answers} <= {200, 429}  # v2 takes one request at a time
    split = collections.Counter(h["X-Model-Version"] for _, h, _ in answers)
    # 300 draws at p = 0.7: mean 210, sd 7.9; 4 sd either way
    assert set(split) == {"v1", "v2"} and abs(split["v1"] - 210) <= 32, split
    ok = [b for s, _, b in answers if s == 200]
    assert all(b["model"] == "smol" for b in ok)


def test_a_pinned_version_always_serves(server):
    for _ in range(10):
        status, headers, body = complete(server, model="smol@v2")
        assert (status, headers["X-Model-Version"], headers["X-Model-Name"]) == (200, "v2", "smol"), body
    status, _, body = complete(server, model="smol@v9")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert "`smol@v1`" in body["error"]["message"] and "`auto`" in body["error"]["message"]
    ids = [m["id"] for m in call(server, "GET", "/v1/models")[2]["data"]]
    assert {"smol", "smol@v1", "smol@v2", "smol@v3", "auto"} <= set(ids)


def test_sessions_stick_to_one_version(server):
    seen: dict[str, set[str]] = collections.defaultdict(set)
    for _round in range(3):
        for i in range(20):
            if i % 2:
                _, h, _ = complete(server, user=f"user-{i}")
            else:
                _, h, _ = complete(server, headers={"X-Session-Id": f"user-{i}"})
            seen[f"user-{i}"].add(h["X-Model-Version"])
    assert all(len(v) == 1 for v in seen.values()), seen
    assert {next(iter(v)) for v in seen.values()} == {"v1", "v2"}  # the sessions spread over both


def test_a_virtual_model_routes_by_length_and_falls_back_when_overloaded(server):
    status, h, _ = complete(server, "Hi", model="auto")
    assert (status, h["X-Model-Version"]) == (200, "v2")  # short: the rule's choice
    status, h, _ = complete(server, "Tell me a long story about " + "the sea " * 10, model="auto")
    assert (status, h["X-Model-Version"]) == (200, "v1")  # no rule matches: the fallback chain
    # v2 runs one request and queues one: the rest must go to v1, and none may see a 429
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda _: complete(server, "Hi", 24, model="auto", ignore_eos=True), range(8))
        )
    assert [s for s, _, _ in answers] == [200] * 8, [b for _, _, b in answers]
    served = collections.Counter(h["X-Model-Version"] for _, h, _ in answers)
    assert served["v1"] >= 1 and served["v2"] >= 1, served


def test_admin_checks_keys_and_bodies(server):
    assert admin(server, "GET", "", key="wrong")[0] == 401
    status, _, body = admin(server, "PUT", "/smol/traffic", {"weights": {"v1": 0}})
    assert status == 400 and body["error"]["param"] == "weights"
    status, _, body = admin(server, "DELETE", "/nope/versions/v1")
    assert status == 404, body


def test_a_failing_canary_is_rolled_back_within_an_interval(server):
    interval = 1.5
    status, _, body = admin(
        server,
        "POST",
        "/smol/canary",
        {"version": "v3", "steps": [50, 100], "interval_s": interval, "slo": {"max_error_rate": 0.2}},
    )
    assert status == 202, body
    started = time.monotonic()
    codes = collections.Counter()

    def traffic():
        status, h, _ = complete(server)
        codes[(h["X-Model-Version"], status)] += 1

    wait_until(lambda: versions(server)["v3"]["canary"]["state"] == "rolled_back", 30, "rollback", traffic)
    elapsed = time.monotonic() - started
    # the first window (interval s at 50%, half of it failing) breaches: rolled back at its check
    assert elapsed < 2 * interval + 2.0, (elapsed, codes)
    assert codes[("v3", 500)] >= 1
    state = versions(server)
    assert state["v3"]["weight"] == 0 and "error rate" in (state["v3"]["canary"]["reason"] or ""), state
    # the api processes route by the registry they last heard (a watch every 200 ms)
    wait_until(lambda: api_weights(server)["v3"] == 0, 2, "the api to see the rollback")
    after = collections.Counter(complete(server)[1]["X-Model-Version"] for _ in range(30))
    assert "v3" not in after, after


def test_a_healthy_canary_is_promoted_to_stable(server):
    status, _, body = admin(
        server,
        "POST",
        "/smol/canary",
        {"version": "v2", "steps": [50, 100], "interval_s": 1.0, "slo": {"max_error_rate": 0.2}},
    )
    assert status == 202, body
    wait_until(
        lambda: versions(server)["v2"]["canary"]["state"] == "promoted",
        40,
        "promotion",
        complete_once(server),
    )
    state = versions(server)
    assert state["v2"]["stable"] == "v2" and state["v1"]["weight"] == 0 and state["v2"]["weight"] > 0, state
    assert {complete(server)[1]["X-Model-Version"] for _ in range(10)} == {"v2"}
    # /metrics renders the api's snapshot, which may be one watch (200 ms) behind the launcher's
    promoted = 'zeroserve:model_promotions_total{model_name="smol"} 1.0'
    wait_until(lambda: promoted in call_text(server, "/metrics"), 2, "the api to see the promotion")
    metrics = call_text(server, "/metrics")
    assert 'model_version="v2"' in metrics


def api_health(server) -> list[dict]:
    """The versions of smol as the api process routes them now (its /health)."""
    return [g for g in call(server, "GET", "/health")[2]["models"] if g["model"] == "smol"]


def api_weights(server) -> dict[str, int]:
    """The weights the api process routes by now."""
    return {g["version"]: g["weight"] for g in api_health(server)}


def complete_once(server):
    return lambda: complete(server)


def call_text(server, path: str) -> str:
    with urllib.request.urlopen(server.base_url + path, timeout=30) as r:
        return r.read().decode()

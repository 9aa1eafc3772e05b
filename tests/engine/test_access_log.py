"""Request ids and logs on a real deployment: X-Request-Id through the API, the engine's log
lines and `zeroserve batch`; JSON log lines that parse; prompt text only with --log-prompts."""

from __future__ import annotations

import json
import subprocess
import threading
import urllib.error
import urllib.request

import pytest

from tests.conftest import start_server, zeroserve_command

SECRET = "purple elephants dance quietly"  # a prompt that must not reach the logs unless asked


def post(server, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(
        server.base_url + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"{}")


def json_lines(server) -> list[dict]:
    """Every JSON log line of the deployment (launcher and child processes share the file)."""
    out = []
    with open(server.log_path, errors="replace") as f:
        for line in f:
            if line.startswith("{"):
                out.append(json.loads(line))
    return out


@pytest.fixture(scope="module")
def json_server(monkeypatch_module):
    monkeypatch_module.setenv("ZEROSERVE_LOG_LEVEL", "DEBUG")  # the engine's per-request lines are DEBUG
    server = start_server("--log-format", "json", "--max-num-seqs", "8", api_key=None)
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def completion(server, rid: str | None, prompt: str = "Say hi", **extra) -> tuple[int, dict, dict]:
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, **extra}
    return post(server, "/v1/completions", body, {"X-Request-Id": rid} if rid else None)


def test_json_logs_carry_the_request_id_from_api_to_engine(json_server):
    status, headers, body = completion(json_server, "trace-me-1", SECRET)
    assert status == 200 and headers["X-Request-Id"] == "trace-me-1"
    assert body["id"].startswith("cmpl-trace-me-1-")
    lines = json_lines(json_server)
    assert lines, "no JSON log line at all"
    for line in lines:
        assert {"ts", "level", "logger", "role", "message"} <= line.keys(), line
    [access] = [x for x in lines if x["logger"] == "zeroserve.access" and x.get("request_id") == "trace-me-1"]
    assert access["level"] == "INFO" and access["role"] == "api"
    assert access["status"] == 200 and access["endpoint"] == "/v1/completions"
    assert access["prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert access["completion_tokens"] == body["usage"]["completion_tokens"]
    assert access["finish_reason"] == "length" and access["model"] == body["model"]
    assert access["replica"] == "r0" and access["client"] == "127.0.0.1"
    assert 0 < access["ttft_ms"] <= access["e2e_ms"]
    engine = [
        x for x in lines
        if x["role"].startswith(("tokenizer", "scheduler")) and "trace-me-1" in x.get("request_id", "")
    ]  # fmt: skip
    assert {x["role"] for x in engine} == {"tokenizer", "scheduler"}, engine
    assert not [x for x in lines if SECRET in json.dumps(x)]  # no --log-prompts: no prompt text


def test_the_id_round_trips_on_chat_streams_and_errors(json_server):
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    status, headers, _ = post(json_server, "/v1/chat/completions", chat, {"X-Request-Id": "chat-1"})
    assert status == 200 and headers["X-Request-Id"] == "chat-1"

    req = urllib.request.Request(
        json_server.base_url + "/v1/completions",
        data=json.dumps({"prompt": "Hi", "max_tokens": 3, "stream": True}).encode(),
        headers={"Content-Type": "application/json", "X-Request-Id": "stream-1"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["X-Request-Id"] == "stream-1"
        assert r.read().decode().endswith("data: [DONE]\n\n")

    status, headers, err = completion(json_server, "bad-model", model="no-such-model")
    assert (
        status == 404 and headers["X-Request-Id"] == "bad-model" and err["error"]["code"] == "model_not_found"
    )
    status, headers, err = completion(json_server, "too-long", max_tokens=10**6)
    assert status == 400 and headers["X-Request-Id"] == "too-long"

    status, headers, _ = completion(json_server, None)
    generated = headers["X-Request-Id"]
    assert status == 200 and len(generated) == 32

    status, headers, err = completion(json_server, "not ok")
    assert status == 400 and err["error"]["param"] == "X-Request-Id" and headers["X-Request-Id"] != "not ok"

    access = {x["request_id"]: x for x in json_lines(json_server) if x["logger"] == "zeroserve.access"}
    assert access["chat-1"]["endpoint"] == "/v1/chat/completions" and access["stream-1"]["stream"] is True
    assert (access["bad-model"]["status"], access["bad-model"]["error"]) == (404, "model_not_found")
    assert access["too-long"]["status"] == 400 and access[generated]["status"] == 200


def test_requests_with_the_same_id_at_once_both_succeed(json_server):
    results: list = []

    def run() -> None:
        results.append(completion(json_server, "dup-1", "Count to five:", max_tokens=8))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r[0] for r in results] == [200, 200]
    assert results[0][2]["id"] != results[1][2]["id"]
    access = [
        x for x in json_lines(json_server) if x["logger"] == "zeroserve.access" and x["request_id"] == "dup-1"
    ]
    assert [x["status"] for x in access] == [200, 200]


def test_batch_lines_quote_their_request_id(json_server, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    body = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}
    inp.write_text(
        "".join(
            json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/completions", "body": body})
            + "\n"
            for i in range(3)
        )
    )
    cmd = zeroserve_command() + ["batch", str(inp), str(out), "--address", json_server.tokenizer_address]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    ids = [x["response"]["request_id"] for x in lines]
    assert len(set(ids)) == 3 and all(x["response"]["status_code"] == 200 for x in lines)
    for line in lines:  # the body's id quotes the request id, as over HTTP
        assert line["response"]["body"]["id"].startswith(f"cmpl-{line['response']['request_id']}-")
    engine_ids = {x.get("request_id", "") for x in json_lines(json_server) if x["role"] == "tokenizer"}
    for rid in ids:
        assert any(rid in e for e in engine_ids), rid


def test_log_prompts_puts_prompt_and_output_in_the_access_line():
    server = start_server("--log-prompts", api_key=None)
    try:
        status, headers, body = completion(server, "with-text", SECRET)
        assert status == 200
        with open(server.log_path, errors="replace") as f:
            [line] = [x for x in f if "zeroserve.access" in x and "with-text" in x]
    finally:
        assert server.stop() == 0, server.log()
    assert not line.startswith("{")  # text is the default format
    assert SECRET in line and repr(body["choices"][0]["text"]) in line

"""`zeroserve batch` against a running engine: bad lines, resume after interrupt, equality with the API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from tests.conftest import zeroserve_command

GOOD_BODIES = [
    ("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0},
    ),
    ("/v1/completions", {"prompt": ["One", "Two"], "max_tokens": 3, "temperature": 0, "n": 2}),
]


def make_input(path: str, n: int = 500) -> set[str]:
    """n lines, 5 of them bad; returns the custom_ids the output must hold."""
    bad = {
        17: "not json {",
        101: json.dumps([1, 2]),
        202: json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {}}),
        303: json.dumps(
            {
                "custom_id": "bad-body",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"prompt": "x", "temperature": -1},
            }
        ),
        404: json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "no id"}}),
    }
    ids = set()
    with open(path, "w") as f:
        for i in range(1, n + 1):
            if i in bad:
                f.write(bad[i] + "\n")
                obj = None
                try:
                    obj = json.loads(bad[i])
                except ValueError:
                    pass
                cid = obj.get("custom_id") if isinstance(obj, dict) else None
                ids.add(cid or f"line-{i}")
                continue
            url, body = GOOD_BODIES[i % len(GOOD_BODIES)]
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}) + "\n")
            ids.add(f"req-{i}")
    return ids


def read_output(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def batch_cmd(server, inp, out):
    return zeroserve_command() + [
        "batch",
        inp,
        out,
        "--address",
        server.tokenizer_address,
        "--max-concurrency",
        "64",
    ]


def test_batch_500_lines_with_5_bad_interrupted_and_resumed(zeroserve_server, tmp_path):
    inp, out = str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")
    expected_ids = make_input(inp)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.Popen(batch_cmd(zeroserve_server, inp, out), env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(out) and sum(1 for _ in open(out)) >= 250:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, stderr
    first = read_output(out)
    assert 0 < len(first) < 500, "the interrupt should land about halfway"

    done = subprocess.run(
        batch_cmd(zeroserve_server, inp, out), env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "skipped" in done.stderr
    lines = read_output(out)
    ids = [line["custom_id"] for line in lines]
    assert len(ids) == 500 and len(set(ids)) == 500, "no duplicate and no missing custom_id"
    assert set(ids) == expected_ids
    ok = [line for line in lines if line["response"]["status_code"] == 200]
    errors = [line for line in lines if line["response"]["status_code"] != 200]
    assert len(ok) == 495 and len(errors) == 5
    for line in errors:
        assert line["response"]["status_code"] == 400 and line["error"]["message"]
        assert "error" in line["response"]["body"]


def test_batch_results_equal_the_http_api(zeroserve_server, tmp_path):
    inp, out = str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")
    with open(inp, "w") as f:
        for i, (url, body) in enumerate(GOOD_BODIES):
            f.write(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": url, "body": body}) + "\n")
    done = subprocess.run(batch_cmd(zeroserve_server, inp, out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    by_id = {line["custom_id"]: line["response"] for line in read_output(out)}
    for i, (url, body) in enumerate(GOOD_BODIES):
        status, api = zeroserve_server.post(url, body)
        assert status == 200 and by_id[f"c{i}"]["status_code"] == 200
        batch = by_id[f"c{i}"]["body"]
        assert batch["object"] == api["object"] and batch["usage"] == api["usage"]
        strip = lambda choices: [{k: v for k, v in c.items()} for c in choices]  # noqa: E731
        assert strip(batch["choices"]) == strip(api["choices"])

"""`zeroserve batch` against a running engine: bad lines, resume after interrupt, equality with the API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from tests.conftest import zeroserve_command
from zeroserve.launcher.batch import done_ids, parse_lines

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
        202: json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/moderations", "body": {}}),
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
    # provenance: the model and version that produced each result (one engine: version v1)
    model = ok[0]["response"]["body"]["model"]
    assert all((line["model"], line["version"]) == (model, "v1") for line in ok)
    for line in errors:
        assert line["response"]["status_code"] == 400 and line["error"]["message"]
        assert (line["model"], line["version"]) == (None, None)
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


def test_batch_embeddings_equal_the_http_api(zeroserve_server, tmp_path):
    """/v1/embeddings lines (a string, a list, base64) give the endpoint's bodies; a bad one is
    the endpoint's 400."""
    import base64

    import numpy as np

    bodies = [
        {"input": "The capital of France is Paris."},
        {"input": ["One", "Two words", "and three words"], "encoding_format": "base64"},
        {"input": "x", "encoding_format": "hex"},
    ]
    inp, out = str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")
    with open(inp, "w") as f:
        for i, body in enumerate(bodies):
            f.write(
                json.dumps({"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings", "body": body})
                + "\n"
            )
    done = subprocess.run(batch_cmd(zeroserve_server, inp, out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    by_id = {line["custom_id"]: line["response"] for line in read_output(out)}

    def vectors(body: dict) -> list[np.ndarray]:
        return [
            np.frombuffer(base64.b64decode(d["embedding"]), "<f4")
            if isinstance(d["embedding"], str)
            else np.array(d["embedding"], dtype=np.float32)
            for d in body["data"]
        ]

    for i, body in enumerate(bodies[:2]):
        status, api = zeroserve_server.post("/v1/embeddings", body)
        batch = by_id[f"e{i}"]
        assert status == 200 and batch["status_code"] == 200, batch
        assert batch["body"]["object"] == "list" and batch["body"]["usage"] == api["usage"]
        got, want = vectors(batch["body"]), vectors(api)
        assert len(got) == len(want) == len(body["input"] if isinstance(body["input"], list) else [0])
        for g, w in zip(got, want):
            assert g.shape == w.shape and np.allclose(g, w, atol=1e-4)
    status, api = zeroserve_server.post("/v1/embeddings", bodies[2])
    assert status == by_id["e2"]["status_code"] == 400
    assert by_id["e2"]["body"]["error"]["param"] == api["error"]["param"] == "encoding_format"


# ------------------------------------------------------------------ input and resume, no engine


def request_line(cid, prompt: str = "Hi", max_tokens: int = 2) -> str:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions", "body": body})


def test_deeply_nested_lines_become_error_lines():
    deep_body = '{"custom_id": "deep-body", "method": "POST", "url": "/v1/completions", "body": '
    lines = ["[" * 100_000, deep_body + '{"p": ' + "[" * 5000 + "]" * 5000 + "}}", request_line("ok")]
    jobs = parse_lines(lines)
    assert [(j.line_no, j.error is None) for j in jobs] == [(1, False), (2, False), (3, True)]
    assert "nests too deeply" in jobs[0].error and "nests too deeply" in jobs[1].error


def test_generated_ids_never_equal_a_custom_id_of_the_input():
    lines = [
        "not json",  # line 1: would be line-1, which line 2 uses; line-1-2 is line 3's
        request_line("line-1"),
        request_line("line-1-2"),
        request_line("x"),
        request_line("x"),  # a duplicate: its own generated id
        json.dumps({"custom_id": 7}),
    ]
    jobs = parse_lines(lines)
    ids = [j.custom_id for j in jobs]
    assert ids == ["line-1-3", "line-1", "line-1-2", "x", "line-5", "line-6"]
    assert [j.custom_id for j in parse_lines(lines)] == ids  # the same on resume


def result_line(cid: str, status: int = 200) -> str:
    return json.dumps(
        {"id": "b", "custom_id": cid, "response": {"status_code": status, "body": {}}, "error": None}
    )


def test_resume_keeps_a_whole_last_line_without_its_newline(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(result_line("a") + "\n" + result_line("b"))  # killed between the line and "\n"
    assert done_ids(str(out)) == {"a", "b"}
    assert (
        out.read_text() == result_line("a") + "\n" + result_line("b") + "\n"
    )  # the next append is a new line


def test_resume_cuts_a_torn_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    whole = result_line("a") + "\n"
    out.write_text(whole + result_line("b")[:-7])
    assert done_ids(str(out)) == {"a"}
    assert out.read_text() == whole


def test_resume_keeps_the_lines_after_one_it_cannot_read(tmp_path):
    out = tmp_path / "out.jsonl"
    text = result_line("a") + "\n" + "garbage\n" + result_line("c") + "\n"
    out.write_text(text)
    assert done_ids(str(out)) == {"a", "c"}
    assert out.read_text() == text


def test_resume_runs_transient_failures_again_without_duplicating_lines(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(
        result_line("a") + "\n" + result_line("b", 503) + "\n" + result_line("c", 400) + "\n"
        + result_line("d", 429)
    )  # fmt: skip
    # b and d gave up on a busy engine: they run again; c's 400 is the request's own fault
    assert done_ids(str(out)) == {"a", "c"}
    assert out.read_text() == result_line("a") + "\n" + result_line("c", 400) + "\n"
    assert not [p for p in tmp_path.iterdir() if p.name != "out.jsonl"], "no temporary file left"


# ------------------------------------------------------------------ against real engines


def test_hostile_lines_become_error_lines_and_resume_is_exact(zeroserve_server, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [
        "[" * 100_000,  # line 1: nests too deeply for any JSON decoder
        request_line("line-1"),  # the id line 1 would have been filed under
        request_line("\ud800 lone surrogate"),
        request_line("plain"),
    ]
    inp.write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        batch_cmd(zeroserve_server, str(inp), str(out)), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    by_id = {line["custom_id"]: line["response"]["status_code"] for line in read_output(out)}
    assert by_id == {"line-1-2": 400, "line-1": 200, "\ud800 lone surrogate": 200, "plain": 200}
    again = subprocess.run(
        batch_cmd(zeroserve_server, str(inp), str(out)), capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0 and "4 skipped" in again.stderr, again.stderr
    assert len(read_output(out)) == 4


def test_transient_failures_are_retried_until_they_succeed(tmp_path):
    """Queue-full 429s (one running, one waiting) and a worker killed mid-job (503s while it
    restarts) end as results, not as error lines."""
    from tests.conftest import start_server
    from tests.engine.test_engine_failures import role_pid

    server = start_server("--max-num-seqs", "1", "--max-waiting-requests", "1", api_key=None)
    try:
        inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        n = 24
        inp.write_text("".join(request_line(f"r{i}", f"Count to {i}:", 8) + "\n" for i in range(n)))
        worker = role_pid(server, "worker")
        cmd = batch_cmd(server, str(inp), str(out))
        cmd[cmd.index("--max-concurrency") + 1] = "12"
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not (out.exists() and len(out.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.05)
        os.kill(worker, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=400)
        assert proc.returncode == 0, stderr
        lines = read_output(out)
        assert sorted(line["custom_id"] for line in lines) == sorted(f"r{i}" for i in range(n))
        assert [line["custom_id"] for line in lines if line["response"]["status_code"] != 200] == []
        assert "retried" in stderr
        assert role_pid(server, "worker") != worker  # the kill landed while the job ran
    finally:
        assert server.stop() == 0, server.log()

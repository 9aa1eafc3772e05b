"""The run directory: zeroserve removes only what it made there, and runs only in a private one.

Unit tests drive launcher/run_dir.py and the Supervisor's files without processes; the last
tests run `zeroserve serve` and `zeroserve batch` for real and stop them with SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import time

import pytest
import zmq

from tests.conftest import start_server, zeroserve_command
from zeroserve.api_proc.config import ApiConfig
from zeroserve.launcher.run_dir import API_CONFIG_NAME, CONFIG_NAME, RunDir, RunDirError
from zeroserve.launcher.supervisor import Supervisor
from zeroserve.shared.config import EngineConfig, read_config
from zeroserve.shared.ipc import bind, new_curve_keys


def engine_config(run_dir: str, **kw) -> EngineConfig:
    return EngineConfig(model="/m.gguf", served_model_name="m", run_dir=run_dir, **kw)


def user_files(d) -> dict[str, str]:
    """A file and a folder with a file, as a user keeps them in a directory."""
    (d / "notes.txt").write_text("mine")
    (d / "sub").mkdir()
    (d / "sub" / "data.txt").write_text("also mine")
    return {"notes.txt": "mine", "sub/data.txt": "also mine"}


def assert_only(d, files: dict[str, str]) -> None:
    found = {}
    for root, _, names in os.walk(d):
        for n in names:
            p = os.path.join(root, n)
            with open(p) as f:
                found[os.path.relpath(p, d)] = f.read()
    assert found == files


# ---------------------------------------------------------------------------- unit


def test_a_dir_others_can_write_is_refused(tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    kept = user_files(d)
    d.chmod(0o777)
    with pytest.raises(RunDirError, match="writable by group or others") as e:
        RunDir.claim(str(d))
    assert "--run-dir" in str(e.value) and str(d) in str(e.value)
    d.chmod(0o770)
    with pytest.raises(RunDirError, match="writable by group or others"):
        RunDir.claim(str(d))
    assert_only(d, kept)


def test_a_dir_of_another_user_is_refused(tmp_path, monkeypatch):
    real = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: real + 1)
    with pytest.raises(RunDirError, match="belongs to another user"):
        RunDir.claim(str(tmp_path))


def test_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match="not a directory"):
        RunDir.claim(str(tmp_path / "f"))


def test_missing_dirs_are_made_private_and_removed_at_the_end(tmp_path):
    old = os.umask(0)  # a permissive umask must not leak into what zeroserve creates
    try:
        run_dir = RunDir.claim(str(tmp_path / "a" / "b" / "run"))
    finally:
        os.umask(old)
    for d in ("a", "a/b", "a/b/run"):
        assert stat.S_IMODE(os.stat(tmp_path / d).st_mode) == 0o700, d
    config = engine_config(run_dir.path)
    run_dir.prepare(config)
    assert stat.S_IMODE(os.stat(config.metrics_dir).st_mode) == 0o700
    run_dir.clean(config)
    assert os.listdir(tmp_path) == []


def test_a_made_dir_that_someone_filled_stays(tmp_path):
    run_dir = RunDir.claim(str(tmp_path / "run"))
    config = engine_config(run_dir.path)
    run_dir.prepare(config)
    (tmp_path / "run" / "later.txt").write_text("added during the run")
    run_dir.clean(config)
    assert_only(tmp_path, {"run/later.txt": "added during the run"})


def test_without_run_dir_a_fresh_private_one_is_made_and_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    run_dir = RunDir.claim(None)
    assert os.path.dirname(run_dir.path) == str(tmp_path)
    assert stat.S_IMODE(os.stat(run_dir.path).st_mode) == 0o700
    config = engine_config(run_dir.path)
    run_dir.prepare(config)
    run_dir.clean(config)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", [CONFIG_NAME, API_CONFIG_NAME, "tokenizer-0.sock", "metrics/notes.txt"])
def test_foreign_files_under_zeroserve_names_are_refused_not_overwritten(tmp_path, name):
    run_dir = RunDir.claim(str(tmp_path))
    os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
    (tmp_path / name).write_text('{"my": "settings"}')
    with pytest.raises(RunDirError, match="did not make") as e:
        run_dir.prepare(engine_config(run_dir.path))
    assert str(tmp_path / name) in str(e.value)
    assert (tmp_path / name).read_text() == '{"my": "settings"}'


def test_leftovers_of_a_crashed_run_are_taken_over(tmp_path):
    """What a killed zeroserve leaves (config, sockets, metrics) does not block the next start."""
    config = engine_config(str(tmp_path))
    first = RunDir.claim(str(tmp_path))
    first.prepare(config)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "scheduler.sock"))
    stale.close()
    (tmp_path / "metrics" / "counter_123.db").write_bytes(b"\0" * 8)
    user_files(tmp_path)

    again = RunDir.claim(str(tmp_path))
    again.prepare(config)
    assert os.listdir(tmp_path / "metrics") == []  # stale metrics cleared
    again.clean(config)
    assert sorted(os.listdir(tmp_path)) == ["metrics", "notes.txt", "sub"]  # an older run's metrics/


def test_the_api_processes_get_a_config_without_the_curve_server_secret(tmp_path):
    keys = new_curve_keys()
    config = engine_config(str(tmp_path), transport="tcp", base_port=6000, curve=keys)
    sup = Supervisor(config, RunDir.claim(str(tmp_path)))
    try:
        by_role = {c.role: c.command[c.command.index("--config") + 1] for c in sup.children}
        assert by_role["api"] != by_role["scheduler"] == by_role["worker"] == by_role["tokenizer"]
        with open(by_role["api"], "rb") as f:
            api_file = f.read()
        assert keys.server_secret.encode() not in api_file
        assert stat.S_IMODE(os.stat(by_role["api"]).st_mode) == 0o600
        api = ApiConfig.from_engine(read_config(by_role["api"]))
        assert api.curve.server_secret == ""
        assert (api.curve.client_secret, api.curve.server_public) == (keys.client_secret, keys.server_public)
        assert read_config(by_role["scheduler"]).curve == keys  # the servers still have theirs
    finally:
        sup.run_dir.clean(config)
    assert os.listdir(tmp_path) == []


def test_api_config_from_engine_drops_the_server_secret():
    keys = new_curve_keys()
    api = ApiConfig.from_engine(engine_config("/tmp/x", transport="tcp", curve=keys))
    assert api.curve.server_secret == "" and api.curve.client_public == keys.client_public
    ctx = zmq.Context()
    try:
        with pytest.raises(ValueError, match="no server secret"):
            bind(ctx, zmq.ROUTER, "tcp://127.0.0.1:0", api.curve)
    finally:
        ctx.term()


# ---------------------------------------------------------------------------- real processes


def test_serve_removes_only_its_own_files_at_sigterm(tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    kept = user_files(d)
    server = start_server("--run-dir", str(d), api_key=None)
    try:
        os.rmdir(server.run_dir)  # start_server's own (unused: the later --run-dir wins)
        made = set(os.listdir(d)) - set(kept) - {"sub"}
        assert {CONFIG_NAME, API_CONFIG_NAME, "metrics", "tokenizer-0.sock", "scheduler.sock"} <= made
        status, _ = server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert status == 200
    finally:
        code = server.stop()
    assert code == 0, server.log()
    assert_only(d, kept)
    assert sorted(os.listdir(d)) == ["notes.txt", "sub"]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run(
        zeroserve_command() + list(args), capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.parametrize("command", ["serve", "batch"])
def test_a_world_writable_run_dir_is_refused_with_a_clear_message(tmp_path, command):
    d = tmp_path / "open"
    d.mkdir()
    kept = user_files(d)
    d.chmod(0o777)
    args = ["--run-dir", str(d)]
    if command == "batch":
        (tmp_path / "in.jsonl").write_text("")
        args = [str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), *args]
    done = run_cli(command, *args)
    assert done.returncode != 0
    assert f"--run-dir {d} is writable by group or others" in done.stderr
    assert "Traceback" not in done.stderr
    assert_only(d, kept)


def test_batch_removes_only_its_own_files(tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    kept = user_files(d)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    body = {"prompt": "Hello", "max_tokens": 2}
    inp.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": body}))
    done = run_cli("batch", str(inp), str(out), "--run-dir", str(d), "--max-model-len", "2048", timeout=400)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["response"]["status_code"] for line in out.read_text().splitlines()] == [200]
    assert_only(d, kept)
    assert sorted(os.listdir(d)) == ["notes.txt", "sub"]


def test_batch_in_a_missing_run_dir_leaves_nothing(tmp_path):
    """A run dir zeroserve had to create goes away with the job, parents included."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("not json\n")
    done = run_cli(
        "batch",
        str(inp),
        str(out),
        "--run-dir",
        str(tmp_path / "a" / "run"),
        "--max-model-len",
        "2048",
        timeout=400,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]


def test_sigterm_during_batch_keeps_the_run_dir(tmp_path):
    """An interrupted batch (SIGTERM) still removes only its own files."""
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    kept = user_files(d)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions", "body": body}
        for i, body in enumerate(
            [{"prompt": "Hi", "max_tokens": 1}]
            + [{"prompt": "Count to a thousand:", "max_tokens": 500, "ignore_eos": True}] * 20
        )
    ]
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.Popen(
        zeroserve_command()
        + [
            "batch",
            str(inp),
            str(out),
            "--run-dir",
            str(d),
            "--max-model-len",
            "2048",
            "--max-concurrency",
            "2",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 300
    while not (out.exists() and out.read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert len(out.read_text().splitlines()) < len(lines)  # it was stopped mid-job
    assert_only(d, kept)

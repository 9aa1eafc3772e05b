"""`zeroserve deploy`: the rendered supervisord stack really serves and restarts a killed worker;
the systemd units pass `systemd-analyze verify`."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import msgspec
import pytest

from tests.conftest import free_port, zeroserve_command

BIN = os.path.dirname(sys.executable)


def render(kind: str, out: str, *extra: str) -> None:
    subprocess.run(
        zeroserve_command() + ["deploy", kind, "--out", out, *extra],
        check=True,
        capture_output=True,
        timeout=120,
    )


def http(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict | bytes]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode() if body else None, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw) if body else raw
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def wait_ready(base: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http(base + "/ready", timeout=2)[0] == 200:
            return
        time.sleep(0.5)
    raise AssertionError(f"{base} not ready in {timeout}s")


def test_supervisord_stack_serves_and_restarts_a_killed_worker(tmp_path):
    out = str(tmp_path / "deploy")
    port = free_port()
    render(
        "supervisord",
        out,
        "--port",
        str(port),
        "--max-model-len",
        "1024",
        "--num-kv-blocks",
        "256",
        "--num-threads",
        "2",
        "--run-dir",
        str(tmp_path / "run"),
    )
    conf = os.path.join(out, "supervisord.conf")
    ctl = [os.path.join(BIN, "supervisorctl"), "-c", conf]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    subprocess.run([os.path.join(BIN, "supervisord"), "-c", conf], check=True, env=env, timeout=30)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, 240)
        body = {"prompt": "Hello, my name is", "max_tokens": 5, "temperature": 0}
        status, first = http(base + "/v1/completions", body)
        assert status == 200 and first["usage"]["completion_tokens"] == 5
        pid = int(
            subprocess.run(ctl + ["pid", "zeroserve:worker"], capture_output=True, text=True).stdout.strip()
        )
        os.kill(pid, signal.SIGKILL)
        time.sleep(3)
        wait_ready(base, 240)
        new_pid = int(
            subprocess.run(ctl + ["pid", "zeroserve:worker"], capture_output=True, text=True).stdout.strip()
        )
        assert new_pid != pid, "supervisord should have started a new worker"
        status, again = http(base + "/v1/completions", body)
        assert status == 200 and again["choices"][0]["text"] == first["choices"][0]["text"]
    finally:
        subprocess.run(ctl + ["shutdown"], capture_output=True, timeout=120)


def test_systemd_units_verify_and_are_hardened(tmp_path):
    out = str(tmp_path / "units")
    render("systemd", out, "--api-workers", "2", "--api-key", "s3cret")
    units = sorted(f for f in os.listdir(out) if f.endswith(".service"))
    assert units == [
        "zeroserve-api-0.service",
        "zeroserve-api-1.service",
        "zeroserve-scheduler-0.service",
        "zeroserve-tokenizer-0.service",
        "zeroserve-worker-0.service",
    ]
    for unit in units:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str
        parser.read(os.path.join(out, unit))
        service = parser["Service"]
        for key in ("NoNewPrivileges", "PrivateTmp"):
            assert service[key] == "yes"
        assert service["ProtectSystem"] == "strict" and service["User"] == "zeroserve"
        assert service["Restart"] == "always"
        config_file = "zeroserve-api.json" if "-api-" in unit else "zeroserve.json"
        assert " proc " in service["ExecStart"]
        assert f"--config /etc/zeroserve/{config_file} " in service["ExecStart"]
        if "worker" in unit:  # where the C++ CPU kernels are built and cached, writable under strict
            assert service["CacheDirectory"] == "zeroserve"
            with open(os.path.join(out, unit)) as f:
                assert "Environment=ZEROSERVE_CACHE_DIR=/var/cache/zeroserve" in f.read()
    with open(os.path.join(out, "zeroserve.json")) as f:
        assert "s3cret" not in f.read(), "secrets belong in the environment file"
    with open(os.path.join(out, "zeroserve.env")) as f:
        assert "ZEROSERVE_API_KEY=s3cret" in f.read()
    assert oct(os.stat(os.path.join(out, "zeroserve.env")).st_mode & 0o777) == "0o600"
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed; the units were checked structurally")
    files = [os.path.join(out, u) for u in units] + [os.path.join(out, "zeroserve.target")]
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *files], capture_output=True, text=True, timeout=120
    )
    complaints = [line for line in (verify.stdout + verify.stderr).splitlines() if out in line]
    assert verify.returncode == 0 and not complaints, complaints


def test_api_processes_get_no_curve_server_secret(tmp_path):
    """The api faces the network and only connects: its config holds the client keys alone."""
    from zeroserve.shared.config import read_config

    for kind in ("systemd", "supervisord"):
        out = str(tmp_path / kind)
        render(kind, out, "--transport", "tcp")
        engine, api = read_config(f"{out}/zeroserve.json"), read_config(f"{out}/zeroserve-api.json")
        assert engine.curve is not None and engine.curve.server_secret
        assert api.curve is not None and api.curve.server_secret == ""
        assert api.curve.client_secret == engine.curve.client_secret
        assert msgspec.structs.replace(api, curve=engine.curve) == engine

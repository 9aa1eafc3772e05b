"""kernels/cpu/build.py as a gatekeeper: which cached libraries it loads, what a failed compile leaves.

A library in the cache is native code run inside the worker: it is loaded only when no one but
this user (or root) could have written it. A compile that fails, times out or is interrupted
leaves nothing in the cache that a later run could pick up.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from zeroserve.kernels.cpu import build

if build._compiler() is None:
    pytest.skip("no C++ compiler here", allow_module_level=True)


@pytest.fixture(scope="module")
def real_library() -> str:
    """The serving build of this machine (compiled once, in the shared cache)."""
    build.load()
    return str(build.library_path(build._compiler(), build.FLAGS))


@pytest.fixture
def cached_copy(real_library, tmp_path, monkeypatch):
    """A copy of the real library where load() will look for it in an empty cache, with
    load()'s per-process memory of earlier loads and failures cleared."""
    monkeypatch.setenv("ZEROSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "_libs", {})
    monkeypatch.setattr(build, "_errors", {})
    target = build.library_path(build._compiler(), build.FLAGS)
    target.parent.mkdir(parents=True)
    shutil.copyfile(real_library, target)
    target.chmod(0o644)
    return target


def test_a_library_others_can_write_is_not_loaded(cached_copy, monkeypatch):
    cached_copy.chmod(0o666)
    with pytest.raises(build.CpuKernelsUnavailable, match="writable by group or others"):
        build.load()
    cached_copy.chmod(0o644)
    monkeypatch.setattr(build, "_errors", {})
    assert build.load().zs_abi_version() == build.ABI_VERSION  # the same file, once trusted, loads


def test_a_library_of_another_user_is_not_loaded(cached_copy, monkeypatch):
    if os.geteuid() == 0:
        os.chown(cached_copy, 65534, 65534)  # nobody's
    else:
        real = os.geteuid()
        monkeypatch.setattr(os, "geteuid", lambda: real + 1)
    with pytest.raises(build.CpuKernelsUnavailable, match="belongs to another user"):
        build.load()


def test_a_symlinked_library_is_not_followed(cached_copy, tmp_path):
    elsewhere = tmp_path / "elsewhere.so"
    cached_copy.rename(elsewhere)
    cached_copy.symlink_to(elsewhere)
    with pytest.raises(build.CpuKernelsUnavailable):
        build.load()


FAKE_COMPILER = """#!/bin/sh
case "$1" in --version) echo "fake-g++ 1.0"; exit 0;; esac
while [ $# -gt 0 ]; do [ "$1" = -o ] && out="$2"; shift; done
echo "half a library" > "$out"
exec sleep 30
"""

LOAD = (
    "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    "from zeroserve.kernels.cpu import build\n"
    "build.COMPILE_TIMEOUT_S = {timeout}\n"
    "try:\n    build.load()\nexcept build.CpuKernelsUnavailable as exc:\n    print('ERR', exc)\n"
)


def _start(tmp_path, timeout: float) -> tuple[subprocess.Popen, object]:
    fake = tmp_path / "slow-g++"
    fake.write_text(FAKE_COMPILER)
    fake.chmod(0o755)
    cache = tmp_path / "cache"
    env = {**os.environ, "CXX": str(fake), "ZEROSERVE_CACHE_DIR": str(cache)}
    proc = subprocess.Popen(
        [sys.executable, "-c", LOAD.format(timeout=timeout)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    return proc, cache / "cpu_kernels"


def _wait_for_partial_output(proc, kernels_dir) -> None:
    deadline = time.monotonic() + 120
    while not list(kernels_dir.glob("*/*.so")) or not any(p.read_text() for p in kernels_dir.glob("*/*.so")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the fake compiler never started writing"
        time.sleep(0.05)


def test_an_interrupted_compile_leaves_no_file(tmp_path):
    proc, kernels_dir = _start(tmp_path, timeout=600)
    _wait_for_partial_output(proc, kernels_dir)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "KeyboardInterrupt" in err  # it was interrupted mid-compile, not finished
    assert list(kernels_dir.glob("*/*")) == []


def test_a_compile_that_times_out_leaves_no_file(tmp_path):
    proc, kernels_dir = _start(tmp_path, timeout=3)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "ERR compiling " in out and "cpu_ops.cpp" in out and "took over 3s" in out
    assert list(kernels_dir.glob("*/*")) == []

"""Build (once per machine) and load the C++ CPU kernels in csrc/.

The shared library is compiled with the system C++ compiler on first use and cached under
``<cache_dir>/cpu_kernels/<key>/``, the key hashing the source, the flags, the compiler's
version and this CPU's flags, so a new source or another CPU never loads a stale build.
Concurrent builders (several worker processes, parallel tests) each compile to a temporary
name and rename it into place: the rename is atomic, the last one wins, all are equal.

No compiler, a failed compile, or a library that does not load: ``load()`` raises
``CpuKernelsUnavailable`` saying why; the caller falls back to the torch kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from zeroserve.shared import env

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_ops.cpp"
ABI_VERSION = 1
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-fno-math-errno"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


class CpuKernelsUnavailable(RuntimeError):
    """The C++ CPU kernels could not be built or loaded here (the message says why)."""


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def library_path(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.blake2b(digest_size=10)
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), version.encode(), _cpu_flags().encode()):
        key.update(part)
    return Path(env.cache_dir()) / "cpu_kernels" / key.hexdigest() / "libzeroserve_cpu.so"


def _compile(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler, *FLAGS, str(SOURCE), "-o", tmp]
    log.info("compiling the CPU kernels (once per machine): %s", " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        os.unlink(tmp)
        raise CpuKernelsUnavailable(f"compiling {SOURCE.name} failed:\n{result.stderr.strip()[-2000:]}")
    os.replace(tmp, target)


def _bind(lib: ctypes.CDLL) -> None:
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.zs_abi_version.restype = ctypes.c_int
    lib.zs_paged_attention.restype = None
    lib.zs_max_threads.restype = ctypes.c_int
    lib.zs_vectorized.restype = ctypes.c_int
    lib.zs_paged_attention.argtypes = [p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, f32, i64]
    lib.zs_rms_norm.argtypes = [p, i64, p, i64, p, p, p, i64, i64, f32]
    lib.zs_rotary.argtypes = [p, p, i64, p, i64, p, p, p, i64, i64, i64, i64]
    lib.zs_write_kv.argtypes = [p, i64, p, i64, p, p, p, i64, i64]
    lib.zs_silu_and_mul.argtypes = [p, i64, p, i64, i64]
    for fn in (lib.zs_rms_norm, lib.zs_rotary, lib.zs_write_kv, lib.zs_silu_and_mul):
        fn.restype = None


def load() -> ctypes.CDLL:
    """The loaded library (building it first if needed); raises CpuKernelsUnavailable."""
    global _lib, _error
    with _lock:
        if _lib is not None:
            return _lib
        if _error is not None:
            raise CpuKernelsUnavailable(_error)
        try:
            import torch  # noqa: F401  (loads torch's libgomp first: the kernels share its pool)

            compiler = _compiler()
            if compiler is None:
                raise CpuKernelsUnavailable("no C++ compiler (g++, c++ or clang++) on PATH")
            path = library_path(compiler)
            if not path.exists():
                _compile(compiler, path)
            lib = ctypes.CDLL(str(path))
            if lib.zs_abi_version() != ABI_VERSION:
                raise CpuKernelsUnavailable(f"{path} has ABI {lib.zs_abi_version()}, expected {ABI_VERSION}")
            _bind(lib)
        except CpuKernelsUnavailable as exc:
            _error = str(exc)
            raise
        except (OSError, subprocess.SubprocessError) as exc:
            _error = f"building or loading the CPU kernels failed: {exc}"
            raise CpuKernelsUnavailable(_error) from exc
        _lib = lib
        return lib


def available() -> bool:
    try:
        load()
        return True
    except CpuKernelsUnavailable:
        return False

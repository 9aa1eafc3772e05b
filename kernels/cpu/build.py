"""Build (once per machine) and load the C++ CPU kernels in csrc/.

The shared library is compiled with the system C++ compiler on first use and cached under
``<cache_dir>/cpu_kernels/<key>/``, the key hashing the source, the flags, the compiler's
version and this CPU's flags, so a new source or another CPU never loads a stale build.
Concurrent builders (several worker processes, parallel tests) each compile to a temporary
name and rename it into place: the rename is atomic, the last one wins, all are equal.

No compiler, a failed compile, or a library that does not load: ``load()`` raises
``CpuKernelsUnavailable`` saying why; the caller falls back to the torch kernels. A cached
library is loaded only if it belongs to this user (or root) and no one else can write it:
it is checked on an open descriptor and loaded through that descriptor, so it cannot be
swapped between the check and the load. A failed or interrupted compile leaves no file.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

from zeroserve.shared import env

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
# every source in csrc/ goes into the one library (cpu_ops.cpp: the fp32 model ops; the others:
# the quantized projections); each Python module declares the argtypes of the functions it calls
SOURCES = sorted(CSRC.glob("*.cpp"))
HEADERS = sorted(CSRC.glob("*.h"))  # not compiled on their own; part of the build's key
ABI_VERSION = 5
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-fno-math-errno"]

COMPILE_TIMEOUT_S = 600

_lock = threading.Lock()
_libs: dict[tuple[str, ...], ctypes.CDLL] = {}  # by extra flags ((): the serving build)
_errors: dict[tuple[str, ...], str] = {}
# descriptors of loaded libraries, kept open: the dynamic loader knows a library by the name it
# was loaded under, so a /proc/self/fd/N name must never be reused for another file
_fds: list[int] = []


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


def library_path(compiler: str, flags: list[str]) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.blake2b(digest_size=10)
    for part in (
        *(src.read_bytes() for src in (*SOURCES, *HEADERS)),
        " ".join(flags).encode(),
        version.encode(),
        _cpu_flags().encode(),
    ):
        key.update(part)
    return Path(env.cache_dir()) / "cpu_kernels" / key.hexdigest() / "libzeroserve_cpu.so"


def _compile(compiler: str, flags: list[str], target: Path) -> None:
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    installed = False
    try:
        cmd = [compiler, *flags, *map(str, SOURCES), "-o", tmp]
        log.info("compiling the CPU kernels (once per machine): %s", " ".join(cmd))
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise CpuKernelsUnavailable(
                f"compiling {' '.join(src.name for src in SOURCES)} took over {COMPILE_TIMEOUT_S}s; gave up"
            ) from None
        if result.returncode != 0:
            raise CpuKernelsUnavailable(
                f"compiling {' '.join(src.name for src in SOURCES)} failed:\n{result.stderr.strip()[-2000:]}"
            )
        os.replace(tmp, target)
        installed = True
    finally:  # failed, timed out, interrupted: the half-written library must not stay behind
        if not installed:
            os.unlink(tmp)


def _open_trusted(path: Path) -> int:
    """An open descriptor of the library, once it is known that no one but this user (or root)
    can have written it; raises CpuKernelsUnavailable otherwise."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    st = os.fstat(fd)
    why = None
    if not stat.S_ISREG(st.st_mode):
        why = "is not a regular file"
    elif st.st_uid not in (os.geteuid(), 0):
        why = f"belongs to another user (uid {st.st_uid})"
    elif st.st_mode & 0o022:
        why = f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    if why is not None:
        os.close(fd)
        raise CpuKernelsUnavailable(
            f"not loading {path}: it {why}, so it may not be the library zeroserve built; "
            "delete it to rebuild, or point ZEROSERVE_CACHE_DIR at a directory of your own"
        )
    return fd


def _dlopen(path: Path) -> ctypes.CDLL:
    fd = _open_trusted(path)
    by_fd = f"/proc/self/fd/{fd}"
    if not os.path.exists(by_fd):  # no procfs (not Linux): the path, checked a moment ago
        os.close(fd)
        return ctypes.CDLL(str(path))
    try:
        lib = ctypes.CDLL(by_fd)
    except OSError:
        os.close(fd)
        raise
    _fds.append(fd)
    return lib


def _bind(lib: ctypes.CDLL) -> None:
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.zs_abi_version.restype = ctypes.c_int
    lib.zs_paged_attention.restype = None
    lib.zs_max_threads.restype = ctypes.c_int
    lib.zs_vectorized.restype = ctypes.c_int
    lib.zs_paged_attention.argtypes = [
        p,
        p,
        p,
        ctypes.c_int32,
        p,
        p,
        p,
        p,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        f32,
        i64,
        i64,
        p,
    ]
    lib.zs_rms_norm.argtypes = [p, i64, p, i64, p, p, p, i64, i64, f32]
    lib.zs_rotary.argtypes = [p, p, i64, p, i64, p, p, p, i64, i64, i64, i64]
    lib.zs_write_kv.argtypes = [p, i64, p, i64, p, p, p, i64, i64, ctypes.c_int32]
    lib.zs_silu_and_mul.argtypes = [p, i64, p, i64, i64]
    lib.zs_argmax_rows.argtypes = [p, i64, i64, i64, p]
    lib.zs_pack_linear.argtypes = [p, p, i64, i64, p, p]
    lib.zs_linear.argtypes = [p, i64, p, p, p, i64, i64, i64]
    lib.zs_apply_token_bitmask.argtypes = [p, i64, p, i64, p, i64, i64]
    lib.zs_gather_rows.argtypes = [p, i64, p, i64, i64, p]
    lib.zs_graph_thunk.argtypes = [ctypes.c_char_p]
    lib.zs_graph_thunk.restype = i64
    lib.zs_graph_layout.argtypes = [p]
    lib.zs_graph_run.argtypes = [p, i64]
    for fn in (
        lib.zs_rms_norm,
        lib.zs_rotary,
        lib.zs_write_kv,
        lib.zs_silu_and_mul,
        lib.zs_argmax_rows,
        lib.zs_pack_linear,
        lib.zs_linear,
        lib.zs_apply_token_bitmask,
        lib.zs_gather_rows,
        lib.zs_graph_layout,
        lib.zs_graph_run,
    ):
        fn.restype = None


def load(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The loaded library (building it first if needed); raises CpuKernelsUnavailable.

    ``extra_flags`` builds a variant (the tests build ``-DZS_SCALAR``, the portable loops)."""
    with _lock:
        if extra_flags in _libs:
            return _libs[extra_flags]
        if extra_flags in _errors:
            raise CpuKernelsUnavailable(_errors[extra_flags])
        try:
            import torch  # noqa: F401  (loads torch's libgomp first: the kernels share its pool)

            compiler = _compiler()
            if compiler is None:
                raise CpuKernelsUnavailable(
                    "no C++ compiler (g++, c++ or clang++) on PATH; install one "
                    "(apt-get install g++) for the fast CPU kernels"
                )
            flags = [*FLAGS, *extra_flags]
            path = library_path(compiler, flags)
            if not path.exists():
                _compile(compiler, flags, path)
            lib = _dlopen(path)
            if lib.zs_abi_version() != ABI_VERSION:
                raise CpuKernelsUnavailable(f"{path} has ABI {lib.zs_abi_version()}, expected {ABI_VERSION}")
            _bind(lib)
        except CpuKernelsUnavailable as exc:
            _errors[extra_flags] = str(exc)
            raise
        except (OSError, subprocess.SubprocessError) as exc:
            _errors[extra_flags] = f"building or loading the CPU kernels failed: {exc}"
            raise CpuKernelsUnavailable(_errors[extra_flags]) from exc
        _libs[extra_flags] = lib
        return lib

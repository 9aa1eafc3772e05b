"""The one place that reads environment variables. Everything else imports from here."""

from __future__ import annotations

import os


def _str(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _int(name: str, default: int) -> int:
    value = _str(name)
    return int(value) if value is not None else default


def _bool(name: str, default: bool = False) -> bool:
    value = _str(name)
    return default if value is None else value.lower() in ("1", "true", "yes", "on")


def api_keys() -> list[str]:
    """ZEROSERVE_API_KEY: one key, or several separated by commas."""
    raw = _str("ZEROSERVE_API_KEY")
    return [k.strip() for k in raw.split(",") if k.strip()] if raw else []


def admin_key() -> str | None:
    """ZEROSERVE_ADMIN_KEY: the admin API's key when --admin-key is not given (api processes,
    `zeroserve usage`)."""
    return _str("ZEROSERVE_ADMIN_KEY")


def state_dir() -> str:
    """ZEROSERVE_STATE_DIR, else $XDG_STATE_HOME/zeroserve, else ~/.local/state/zeroserve: where
    state that outlives a run is kept (the audit trail's SQLite file and spool)."""
    explicit = _str("ZEROSERVE_STATE_DIR")
    if explicit:
        return os.path.abspath(explicit)
    base = _str("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "zeroserve")


def cache_dir() -> str:
    """ZEROSERVE_CACHE_DIR, else ~/.cache/zeroserve (converted reference weights, run dirs)."""
    return _str("ZEROSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "zeroserve")


def kernel_backend() -> str | None:
    """ZEROSERVE_KERNELS=torch|cpu|triton overrides the automatic choice (tests use it)."""
    return _str("ZEROSERVE_KERNELS")


def triton_interpret() -> bool:
    return _bool("TRITON_INTERPRET")


def num_threads() -> int:
    """ZEROSERVE_NUM_THREADS: the launcher's value for EngineConfig.num_threads (torch threads
    in a worker) when --num-threads is not given; 0 or unset: all cores."""
    return _int("ZEROSERVE_NUM_THREADS", 0)


def fault_step_sleep_file() -> str | None:
    """ZEROSERVE_FAULT_STEP_SLEEP_FILE, test-only fault injection, read by gpu_worker alone: a
    path; when a file is there as a step starts, the worker removes it and sleeps for the
    seconds it holds inside the step (a hung forward pass, heartbeats still going). Never set
    it in production."""
    return _str("ZEROSERVE_FAULT_STEP_SLEEP_FILE")


def log_level() -> str:
    return (_str("ZEROSERVE_LOG_LEVEL") or "INFO").upper()


def otlp_traces_endpoint() -> str | None:
    """OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: the launcher's value for --otlp-traces-endpoint when
    the flag is not given (tracing on). The SDK reads the other OTEL_* variables itself."""
    return _str("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def otel_service_name() -> str | None:
    """OTEL_SERVICE_NAME: the service every process's spans are reported under (default zeroserve)."""
    return _str("OTEL_SERVICE_NAME")


# spins an idle OpenMP thread makes before it sleeps (~50 us here): a decode step runs ~150
# parallel regions back to back, and waking a sleeping thread for each cost ~30 us (batch-1
# steps 14.6 -> 10.0 ms, batch 8 30 -> 16 ms measured with this against 0); after a step the
# threads sleep within ~50 us, so the processes sharing the cores lose next to nothing
GOMP_SPIN_COUNT = "5000"


def set_cpu_thread_env() -> None:
    """OpenMP threads sleep when idle (processes share the cores) after a short spin. Only
    effective before torch (and its libgomp) is loaded; a value already set wins."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPIN_COUNT)

"""Kernel interface: every hot op has one signature and two implementations.

- ``torch`` (kernels/reference): plain torch, runs anywhere; the oracle in tests.
- ``cpu`` (kernels/cpu): C++/OpenMP kernels compiled at first use (fp32, AVX2 when the CPU
  has it); the CPU serving path.
- ``triton``: Triton kernels for NVIDIA GPUs (tested on CPU with TRITON_INTERPRET=1).

The implementation is chosen once, at construction (``get_kernels``), by an explicit
backend, else ``ZEROSERVE_KERNELS``, else the device: CUDA -> triton, anything else -> cpu,
or torch (with a warning saying why) where the C++ kernels cannot be built.
All expose the functions listed in ``OPS``; see kernels/reference/ops.py for the contracts.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from zeroserve.kernels.metadata import AttentionMetadata

OPS = ("rms_norm", "rotary", "silu_and_mul", "write_kv", "paged_attention")
BACKENDS = {
    "torch": "zeroserve.kernels.reference.ops",
    "cpu": "zeroserve.kernels.cpu.ops",
    "triton": "zeroserve.kernels.triton.ops",
}

log = logging.getLogger(__name__)

__all__ = ["AttentionMetadata", "get_kernels", "OPS", "BACKENDS"]


def get_kernels(backend: str | None = None, device: str | None = None) -> ModuleType:
    """The module implementing OPS for ``backend`` ("torch" | "cpu" | "triton")."""
    if backend is None:
        from zeroserve.shared import env

        backend = env.kernel_backend()
    if backend is None:
        if device is not None and str(device).startswith("cuda"):
            backend = "triton"
        else:
            from zeroserve.kernels.cpu.build import CpuKernelsUnavailable, load

            try:
                load()
                backend = "cpu"
            except CpuKernelsUnavailable as exc:
                log.warning("C++ CPU kernels unavailable, using the slower torch kernels: %s", exc)
                backend = "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {sorted(BACKENDS)}")
    module = importlib.import_module(BACKENDS[backend])
    missing = [op for op in OPS if not hasattr(module, op)]
    if missing:
        raise ImportError(f"kernel backend {backend!r} lacks {missing}")
    return module

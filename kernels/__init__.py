"""Kernel interface: every hot op has one signature and two implementations.

- ``reference``: plain torch, runs anywhere; the CPU path, CI and the oracle in tests.
- ``triton``: Triton kernels for NVIDIA GPUs (tested on CPU with TRITON_INTERPRET=1).

The implementation is chosen once, at construction (``get_kernels``), by an explicit
backend, else ``ZEROSERVE_KERNELS``, else the device: CUDA -> triton, anything else -> torch.
Both expose the functions listed in ``OPS``; see kernels/reference/ops.py for the contracts.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from zeroserve.kernels.metadata import AttentionMetadata

OPS = ("rms_norm", "rotary", "silu_and_mul", "write_kv", "paged_attention")
BACKENDS = {"torch": "zeroserve.kernels.reference.ops", "triton": "zeroserve.kernels.triton.ops"}

__all__ = ["AttentionMetadata", "get_kernels", "OPS", "BACKENDS"]


def get_kernels(backend: str | None = None, device: str | None = None) -> ModuleType:
    """The module implementing OPS for ``backend`` ("torch" | "triton")."""
    if backend is None:
        from zeroserve.shared import env

        backend = env.kernel_backend()
    if backend is None:
        backend = "triton" if device is not None and str(device).startswith("cuda") else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {sorted(BACKENDS)}")
    module = importlib.import_module(BACKENDS[backend])
    missing = [op for op in OPS if not hasattr(module, op)]
    if missing:
        raise ImportError(f"kernel backend {backend!r} lacks {missing}")
    return module

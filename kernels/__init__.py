"""Kernel backends: every kernel the model and the sampler call, behind one interface
(``KernelBackend``, kernels/base.py), implemented three times.

- ``torch`` (kernels/reference): plain torch, runs anywhere; the oracle in tests.
- ``cpu`` (kernels/cpu): C++/OpenMP kernels compiled at first use (fp32, AVX2 when the CPU
  has it); the CPU serving path.
- ``triton``: Triton kernels for NVIDIA GPUs (tested on CPU with TRITON_INTERPRET=1).

The backend is chosen once, at construction (``get_kernels``), by an explicit name (the
override tests use), else ``ZEROSERVE_KERNELS``, else the device: CUDA -> triton, anything
else -> cpu, or torch (with a warning saying why) where the C++ kernels cannot be built.
"""

from __future__ import annotations

import importlib
import logging

from zeroserve.kernels.base import KernelBackend, LinearHandle
from zeroserve.kernels.metadata import AttentionMetadata

# name -> (module, class), imported only when chosen (the cpu one compiles, the triton one
# decorates GPU kernels)
BACKENDS = {
    "torch": ("zeroserve.kernels.reference.backend", "ReferenceKernels"),
    "cpu": ("zeroserve.kernels.cpu.backend", "CpuKernels"),
    "triton": ("zeroserve.kernels.triton.backend", "TritonKernels"),
}

log = logging.getLogger(__name__)

__all__ = ["AttentionMetadata", "BACKENDS", "KernelBackend", "LinearHandle", "get_kernels"]


def get_kernels(
    backend: str | None = None, device: str | None = None, quantization: str = "none"
) -> KernelBackend:
    """The kernel backend named ``backend`` ("torch" | "cpu" | "triton"), else the one for
    ``device``; ``quantization`` is the resolved mode its ``prepare_linear`` applies."""
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
    module, cls = BACKENDS[backend]
    return getattr(importlib.import_module(module), cls)(quantization)

"""Small helpers the Triton kernel wrappers share (host side only).

Two facts shape every wrapper:

- ``TRITON_INTERPRET=1`` is read by ``@triton.jit`` when a kernel module is *imported*, not at
  launch: a process that wants interpreted kernels sets it before importing these modules.
- The interpreter runs on numpy, which has no bfloat16: it stores bf16 as uint16 and only
  converts to and from fp32 correctly. Kernels therefore upcast every load to fp32, and feed
  ``tl.dot`` bf16 operands only when compiled for a GPU (``dot_in_fp32`` says which).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from zeroserve.shared import env

TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# Read once, when the kernel modules are imported: the same moment @triton.jit decides between
# a GPU kernel and an interpreted one, so the two never disagree (tests/kernels/conftest.py
# sets the variable only while it imports these modules).
INTERPRET = env.triton_interpret()


def interpreting() -> bool:
    """Whether kernels were decorated for the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return INTERPRET


# Precision of tl.dot on fp32 operands: three TF32 products (error ~1e-6 relative, on tensor
# cores). Plain TF32 (1e-3) is too coarse for the fp32 checks; "ieee" FMA dots of a 64x64x128
# tile take ptxas minutes to compile and spill registers. The interpreter ignores this.
FP32_DOT = tl.constexpr("tf32x3")


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Run tl.dot on fp32 operands (see FP32_DOT) rather than on the 16-bit input dtype.

    fp32 caches stay fp32; bf16 under the interpreter is cast up because numpy cannot
    multiply bf16; fp16 and bf16 on a GPU feed tensor cores directly (fp32 accumulation).
    """
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


@functools.lru_cache(maxsize=8)
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (a host-side property query, no sync)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(device: torch.device) -> int:
    """SM count to size grids against; a nominal 132 (H100/H200) off-GPU so CPU tests see
    the same split decisions a GPU would make."""
    if device.type == "cuda":
        return num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 132


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """Kernels index the last dim with unit stride; other strides are passed explicitly."""
    return x if x.stride(-1) == 1 else x.contiguous()

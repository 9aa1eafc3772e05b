"""What a tensor-parallel rank reads of a checkpoint: a slice per tensor, and a byte count.

The slices themselves are decided by gpu_worker/parallel.py (``tensor_shards``); the loaders
read only those bytes from the file (safetensors ``get_slice``, GGUF rows or whole blocks of
columns from the memory map) and add them to ``ReadStats.bytes_read``.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class TensorShard:
    """The part of one checkpoint tensor a rank reads: indices [start, stop) along ``dim``."""

    dim: int
    start: int
    stop: int

    def shape_of(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.stop - self.start if d == self.dim else n for d, n in enumerate(shape))

    def of(self, t: torch.Tensor) -> torch.Tensor:
        """``t``'s slice (a copy), for weights already in memory (--load-format dummy)."""
        return t.narrow(self.dim, self.start, self.stop - self.start).contiguous()


@dataclasses.dataclass
class ReadStats:
    """Bytes of tensor data the loader took from the checkpoint's files (tests assert a rank
    reads about 1/N of the sharded tensors)."""

    bytes_read: int = 0

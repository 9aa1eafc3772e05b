"""The paged KV cache: how many blocks fit, and allocating them.

One tensor per layer, K pool and V pool side by side::

    kv_caches[layer]: [2, num_blocks, block_size, Hkv, D]
                       ^ 0 = K, 1 = V
    token at position p of a sequence with block table B lives in block B[p // block_size],
    row p % block_size; its flat slot is B[p // block_size] * block_size + p % block_size.

The scheduler owns block ids 0..num_blocks-1; the worker only checks they are in range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GiB = 1 << 30
DEFAULT_CPU_KV_CACHE_GB = 2.0


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        """K and V of every layer for one block of tokens."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem


def blocks_needed(num_seqs: int, max_model_len: int, block_size: int) -> int:
    """Blocks for ``num_seqs`` sequences of ``max_model_len`` tokens each (the most a cache
    can usefully hold)."""
    return num_seqs * -(-max_model_len // block_size)


def cpu_num_blocks(spec: KVCacheSpec, memory_gb: float | None, max_num_seqs: int, max_model_len: int) -> int:
    """Blocks in ``memory_gb`` (default 2 GiB), capped at what max_num_seqs full-length
    sequences can use, so small models do not reserve memory they can never fill."""
    budget = (DEFAULT_CPU_KV_CACHE_GB if memory_gb is None else memory_gb) * GiB
    num = int(budget // spec.bytes_per_block)
    return min(num, blocks_needed(max_num_seqs, max_model_len, spec.block_size))


def cuda_num_blocks(
    spec: KVCacheSpec,
    device: torch.device,
    gpu_memory_utilization: float,
    memory_gb: float | None,
    max_num_seqs: int,
    max_model_len: int,
) -> int:
    """Blocks that fit in ``gpu_memory_utilization`` of the GPU's total memory, after what is
    in use now (weights, other processes) and the peak the profile forward left in the
    allocator's stats (activations). Call after a profile forward."""
    if memory_gb is not None:
        budget = memory_gb * GiB
    else:
        torch.cuda.synchronize(device)
        peak_activations = torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        budget = total * gpu_memory_utilization - (total - free) - peak_activations
    num = int(budget // spec.bytes_per_block)
    return min(num, blocks_needed(max_num_seqs, max_model_len, spec.block_size))


def allocate_kv_cache(spec: KVCacheSpec, num_blocks: int, device: torch.device | str) -> list[torch.Tensor]:
    """Zeroed pools: rows past a sequence's end are read (and masked) by attention, and stale
    finite values mask safely where uninitialised memory could hold NaNs."""
    shape = (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    return [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]

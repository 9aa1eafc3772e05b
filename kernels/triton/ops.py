"""Triton kernels with the contracts of kernels/reference/ops.py (same names, same signatures);
backend.py puts them behind the kernel interface.

Each op lives in its own module; this file only dispatches. No wrapper here syncs with the
device or sizes anything from tensor *contents*: grids come from shapes and the host ints of
AttentionMetadata, so decode steps can be captured in CUDA graphs.
"""

from __future__ import annotations

import torch

from zeroserve.kernels.metadata import AttentionMetadata
from zeroserve.kernels.triton.activation import silu_and_mul
from zeroserve.kernels.triton.attention_decode import decode_attention
from zeroserve.kernels.triton.attention_extend import extend_attention
from zeroserve.kernels.triton.kv_write import write_kv
from zeroserve.kernels.triton.norm import rms_norm
from zeroserve.kernels.triton.rotary import rotary

__all__ = ["rms_norm", "rotary", "silu_and_mul", "write_kv", "paged_attention"]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, Hq, D] -> [T, Hq, D] over the paged cache (K/V of this step already written).

    Decode-only batches (every sequence brings one token, so T == S) go to the split-K
    decode kernel; anything with a prefill or a chunk goes to the extend kernel, which also
    handles the batch's q_len == 1 rows.
    """
    if meta.is_decode_only:
        return decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, scale
        )
    return extend_attention(
        q,
        k_cache,
        v_cache,
        meta.query_start_loc,
        meta.seq_lens,
        meta.block_tables,
        meta.max_query_len,
        scale,
    )

"""C++ CPU kernels with the contracts of kernels/reference/ops.py (same names, same signatures);
backend.py puts them behind the kernel interface.

fp32 CPU tensors in the layouts the model produces go to the compiled kernels
(csrc/cpu_ops.cpp); anything else (another dtype, a layout they do not take) falls back to
the torch reference, which stays the oracle. Outputs are new tensors, as in the reference.
"""

from __future__ import annotations

import torch

from zeroserve.kernels.base import LinearHandle
from zeroserve.kernels.cpu import build
from zeroserve.kernels.metadata import AttentionMetadata
from zeroserve.kernels.reference import bitmask as reference_bitmask
from zeroserve.kernels.reference import ops as reference

__all__ = [
    "rms_norm",
    "rotary",
    "silu_and_mul",
    "embedding",
    "write_kv",
    "paged_attention",
    "argmax_rows",
    "apply_token_bitmask",
    "PackedLinear",
    "linear",
]

_lib = build.load()  # importing this module raises CpuKernelsUnavailable where there is no build
_VECTORIZED = bool(_lib.zs_vectorized())  # the AVX2 attention takes head dims that are multiples of 8
MIN_SPLIT = 256  # a decode with fewer tokens than ~2 per thread splits each context in ranges this long
QUERY_TILE = 8  # a prefill's query tokens attend in tiles of up to this many (one read of each K/V block)
F32 = torch.float32
CACHE_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc CacheType


def in_range(t: torch.Tensor, bound: int) -> bool:
    """Every value of the integer tensor ``t`` is in [0, bound): the bounds check before a
    kernel indexes with it (an empty tensor passes)."""
    return t.numel() == 0 or 0 <= int(t.min()) <= int(t.max()) < bound


def _rows_ok(t: torch.Tensor) -> bool:
    """fp32 on the CPU, rows of contiguous floats (any row stride)."""
    return t.dtype == F32 and t.device.type == "cpu" and t.dim() == 2 and t.stride(1) == 1


def _heads_ok(t: torch.Tensor) -> bool:
    """[T, H, D] fp32 on the CPU with each token's heads contiguous (any token stride)."""
    return (
        t.dtype == F32
        and t.device.type == "cpu"
        and t.dim() == 3
        and t.stride(2) == 1
        and t.stride(1) == t.shape[2]
    )


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if not (
        _rows_ok(x)
        and weight.dtype == F32
        and weight.is_contiguous()
        and (residual is None or (_rows_ok(residual) and residual.shape == x.shape))
    ):
        return reference.rms_norm(x, weight, eps, residual)
    rows, hidden = x.shape
    out = torch.empty((rows, hidden), dtype=F32)
    if residual is None:
        _lib.zs_rms_norm(
            x.data_ptr(), x.stride(0), None, 0, weight.data_ptr(), out.data_ptr(), None, rows, hidden, eps
        )
        return out
    residual_out = torch.empty((rows, hidden), dtype=F32)
    _lib.zs_rms_norm(
        x.data_ptr(),
        x.stride(0),
        residual.data_ptr(),
        residual.stride(0),
        weight.data_ptr(),
        out.data_ptr(),
        residual_out.data_ptr(),
        rows,
        hidden,
        eps,
    )
    return out, residual_out


def rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if not (
        _heads_ok(q)
        and _heads_ok(k)
        and q.shape[0] == k.shape[0]
        and q.shape[2] == k.shape[2]
        and q.shape[2] % 2 == 0
        and cos_sin_cache.dtype == F32
        and cos_sin_cache.is_contiguous()
        and cos_sin_cache.shape[1] == q.shape[2]
        and positions.device.type == "cpu"
    ):
        return reference.rotary(positions, q, k, cos_sin_cache)
    positions = positions.to(torch.int64).contiguous()
    tokens, q_heads, dim = q.shape
    if not in_range(positions, cos_sin_cache.shape[0]):
        raise IndexError(
            f"rotary: a position is outside the cos/sin cache of {cos_sin_cache.shape[0]} positions"
        )
    q_out, k_out = torch.empty((tokens, q_heads, dim), dtype=F32), torch.empty(k.shape, dtype=F32)
    _lib.zs_rotary(
        positions.data_ptr(),
        q.data_ptr(),
        q.stride(0),
        k.data_ptr(),
        k.stride(0),
        cos_sin_cache.data_ptr(),
        q_out.data_ptr(),
        k_out.data_ptr(),
        tokens,
        q_heads,
        k.shape[1],
        dim,
    )
    return q_out, k_out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if not (_rows_ok(x) and x.shape[1] % 2 == 0):
        return reference.silu_and_mul(x)
    rows, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((rows, inter), dtype=F32)
    _lib.zs_silu_and_mul(x.data_ptr(), x.stride(0), out.data_ptr(), rows, inter)
    return out


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if not (_rows_ok(weight) and ids.dtype == torch.int64 and ids.dim() == 1 and ids.device.type == "cpu"):
        return torch.nn.functional.embedding(ids, weight)
    ids = ids.contiguous()
    n, (vocab, hidden) = ids.shape[0], weight.shape
    if not in_range(ids, vocab):
        raise IndexError(f"embedding: a token id is outside the table's {vocab} rows")
    out = torch.empty((n, hidden), dtype=F32)
    _lib.zs_gather_rows(weight.data_ptr(), weight.stride(0), ids.data_ptr(), n, hidden, out.data_ptr())
    return out


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """fp32 rows go into the cache as they are, or rounded to a 16-bit cache's type in the
    kernel (to nearest even, as torch's ``.to()`` and the reference store them)."""
    num_blocks, block_size, hkv, dim = k_cache.shape
    if not (
        _heads_ok(k)
        and _heads_ok(v)
        and k_cache.dtype in CACHE_TYPES
        and v_cache.dtype == k_cache.dtype
        and k_cache.device.type == "cpu"
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and k.shape[1:] == (hkv, dim)
        and v.shape == k.shape
        and slot_mapping.dtype == torch.int64
        and slot_mapping.is_contiguous()
    ):
        return reference.write_kv(k, v, k_cache, v_cache, slot_mapping)
    tokens = k.shape[0]
    if tokens and int(slot_mapping.max()) >= num_blocks * block_size:
        raise IndexError(f"write_kv: a slot is past the cache's {num_blocks * block_size} slots")
    _lib.zs_write_kv(
        k.data_ptr(),
        k.stride(0),
        v.data_ptr(),
        v.stride(0),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        slot_mapping.data_ptr(),
        tokens,
        hkv * dim,
        CACHE_TYPES[k_cache.dtype],
    )


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, Hq, D] -> [T, Hq, D]; every row causal over its sequence's paged context.
    The cache may be fp32, fp16 or bf16 (widened to fp32 as it is read)."""
    if not (
        q.dtype == F32
        and k_cache.dtype in CACHE_TYPES
        and v_cache.dtype == k_cache.dtype
        and q.device.type == "cpu"
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and not (_VECTORIZED and q.shape[-1] % 8)
    ):
        return reference.paged_attention(q, k_cache, v_cache, meta, scale)
    q = q.contiguous()
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    tables = meta.block_tables.contiguous()
    out = torch.empty_like(q)
    _lib.zs_paged_attention(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        CACHE_TYPES[k_cache.dtype],
        tables.data_ptr(),
        meta.seq_lens.data_ptr(),
        meta.query_start_loc.data_ptr(),
        out.data_ptr(),
        meta.num_seqs,
        num_tokens,
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        tables.shape[1],
        scale,
        MIN_SPLIT,
        QUERY_TILE,
        None if meta.one_token_prompts is None else meta.one_token_prompts.data_ptr(),
    )
    return out


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x: [B, V] -> [B] int64, as ``x.argmax(dim=-1)`` (first index on ties, NaN the largest);
    rows in parallel (torch's argmax runs a decode batch's logits on one thread)."""
    if not (_rows_ok(x) and x.shape[1] > 0):
        return x.argmax(dim=-1)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _lib.zs_argmax_rows(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], out.data_ptr())
    return out


def apply_token_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None
) -> None:
    """In place, as kernels/reference/bitmask.py: one pass over each masked row, all-ones
    words skipped, the rest two masked AVX-512 stores of -inf; rows in parallel. 64 rows of
    49152 tokens, nearly all refused (a JSON schema's mask), on the 2-core dev VM: 0.3 ms, where
    xgrammar's CPU apply takes 12.4 ms."""
    cols = reference_bitmask.check_token_bitmask(logits, bitmask, rows)
    if not (
        _rows_ok(logits)
        and bitmask.device.type == "cpu"
        and bitmask.stride(1) == 1
        and (rows is None or rows.device.type == "cpu")
    ):
        return reference_bitmask.apply_token_bitmask(logits, bitmask, rows)
    n = bitmask.shape[0]
    if n == 0 or cols == 0:
        return None
    if rows is not None:
        rows = rows.to(torch.int64).contiguous()
        if not in_range(rows, logits.shape[0]):
            raise IndexError(
                f"apply_token_bitmask: a row index is outside the logits' {logits.shape[0]} rows"
            )
    _lib.zs_apply_token_bitmask(
        logits.data_ptr(),
        logits.stride(0),
        bitmask.data_ptr(),
        bitmask.stride(0),
        None if rows is None else rows.data_ptr(),
        n,
        cols,
    )
    return None


class PackedLinear(LinearHandle):
    """A projection's weight [N, K] (and bias) in the panel layout of ``linear``, packed once
    (a copy: the original can be dropped)."""

    PANEL = 16

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        if weight.dtype != F32 or weight.dim() != 2 or (bias is not None and bias.dtype != F32):
            raise ValueError("PackedLinear takes an fp32 [N, K] weight and an fp32 [N] bias")
        weight = weight.detach().contiguous()
        self.out_features, self.in_features = weight.shape
        panels = -(-self.out_features // self.PANEL)
        self.panels = torch.empty(panels * self.in_features * self.PANEL, dtype=F32)
        self.bias = None if bias is None else torch.empty(panels * self.PANEL, dtype=F32)
        b = None if bias is None else bias.detach().contiguous()
        _lib.zs_pack_linear(
            weight.data_ptr(),
            None if b is None else b.data_ptr(),
            self.out_features,
            self.in_features,
            self.panels.data_ptr(),
            None if b is None else self.bias.data_ptr(),
        )


def linear(x: torch.Tensor, packed: PackedLinear) -> torch.Tensor:
    """``F.linear(x, W, b)`` over W packed by PackedLinear: x [M, K] fp32 -> [M, N]."""
    if x.dim() != 2 or x.shape[1] != packed.in_features:
        raise ValueError(
            f"linear: input of shape {tuple(x.shape)} for a [{packed.out_features}, "
            f"{packed.in_features}] weight"
        )
    if not _rows_ok(x):
        x = x.to(F32).contiguous()
    out = torch.empty((x.shape[0], packed.out_features), dtype=F32)
    if x.shape[0]:
        _lib.zs_linear(
            x.data_ptr(),
            x.stride(0),
            packed.panels.data_ptr(),
            None if packed.bias is None else packed.bias.data_ptr(),
            out.data_ptr(),
            x.shape[0],
            packed.out_features,
            packed.in_features,
        )
    return out

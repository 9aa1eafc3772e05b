"""The kernel backend interface: everything the model and the sampler call on kernels.

    ops = get_kernels(backend, device)            # one KernelBackend, chosen once
    handle = ops.prepare_linear(weight, bias)     # once per projection (layers.Linear)
    y = ops.linear(x, handle)                     # every step
    ops.rms_norm(...), ops.paged_attention(...), ops.argmax_rows(logits), ops.sampling_filter(...)
    ops.apply_token_bitmask(logits, bitmask, rows)  # structured output: the grammar's -inf

A backend is a class with every abstract method below; one left out fails at instantiation,
not at the first step that calls it. Shapes and contracts of the model ops are those of the
torch reference (kernels/reference/ops.py), of the sampling filter those of
kernels/reference/sampling.py; a faster backend may differ only by rounding (and, for the
filter, by keeping ties at a top-p boundary together).

Projections go through an opaque :class:`LinearHandle`: ``prepare_linear`` turns a weight into
whatever its ``linear`` reads (the C++ kernels' panels, oneDNN's blocked layout, the tensor as
is for cuBLAS), and only the backend that made a handle looks inside it. That is the seam for
quantized weights: an int8-with-scales or 4-bit-block format is one more handle class (and
weight type from the loader), which the backends that can run it accept in ``prepare_linear``
and dispatch on in ``linear``; the model does not change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from zeroserve.kernels.metadata import AttentionMetadata

__all__ = ["DenseLinear", "KernelBackend", "LinearHandle"]


class LinearHandle:
    """A projection's weight W ``[out_features, in_features]`` (and bias) in one backend's
    layout. The logical shape is public; the storage is the backend's business."""

    in_features: int
    out_features: int


class DenseLinear(LinearHandle):
    """W and b as the plain tensors they were (``F.linear`` / cuBLAS read them as they are)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape


class KernelBackend(ABC):
    """One implementation of every kernel the model and the sampler use."""

    name: ClassVar[str]  # what RunnerConfig.kernel_backend / ZEROSERVE_KERNELS call it

    def __init__(self, quantization: str = "none"):
        # the resolved --quantization mode ("none", "int8", "q4", "fp8"; never "auto"): what
        # prepare_linear makes of a plain weight. A GGUFWeight is always served from its blocks
        # where this backend has a kernel for its type, whatever the mode.
        self.quantization = quantization

    # ------------------------------------------------------------------ model ops

    @abstractmethod
    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> RMSNorm(x) * weight; with ``residual``, adds it first and returns
        (normed, x + residual)."""

    @abstractmethod
    def rotary(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Neox-style rotary of q [T, Hq, D] and k [T, Hkv, D] at positions [T]."""

    @abstractmethod
    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, 2I] (gate | up) -> silu(gate) * up [T, I]."""

    @abstractmethod
    def write_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Store token t's K/V [T, Hkv, D] at flat slot ``slot_mapping[t]`` (-1: skip)."""

    @abstractmethod
    def paged_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """q [T, Hq, D] -> [T, Hq, D], each row causal over its sequence's paged context."""

    def embedding(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` [T] of a dense table [V, H] -> [T, H], as ``F.embedding`` (an id out
        of range is an IndexError)."""
        return torch.nn.functional.embedding(ids, weight)

    @abstractmethod
    def prepare_linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearHandle:
        """W [N, K] (and b [N]) in the form ``linear`` reads. May copy (the caller may then
        drop W) or keep W itself (then later in-place edits of W show)."""

    @abstractmethod
    def linear(self, x: torch.Tensor, handle: LinearHandle) -> torch.Tensor:
        """``F.linear(x, W, b)``: x [M, K] -> [M, N] over a handle from this backend's
        prepare_linear (a handle of another kind is a TypeError)."""

    # ------------------------------------------------------------------ sampling

    @abstractmethod
    def argmax_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, V] -> int64 [B], exactly ``x.argmax(dim=-1)`` (first index on ties, NaN the
        largest): the greedy token."""

    @abstractmethod
    def sampling_filter(
        self,
        logits: torch.Tensor,
        temperature: torch.Tensor | None,
        min_p: torch.Tensor | None,
        top_k: torch.Tensor | None,
        top_p: torch.Tensor | None,
        max_top_k: int | None = None,
    ) -> torch.Tensor:
        """logits fp32 [B, V] -> divided by the temperature, then min-p, top-k, top-p (vLLM
        v1's order), removed entries -inf. Each parameter is a [B] tensor, or None when no row
        uses it (see kernels/reference/sampling.py for the per-row "off" values). max_top_k:
        the largest enabled top_k if known on the host (spares a device sync where the
        backend needs it). The input is not modified; with nothing to do it may be returned."""

    @abstractmethod
    def apply_token_bitmask(
        self, logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None
    ) -> None:
        """In place, structured output's grammar mask: ``logits[rows[k], t] = -inf`` where bit t
        of ``bitmask[k]`` is 0. logits fp32 [B, V]; bitmask int32 [n, ceil(V / 32)] in
        xgrammar's layout (bit j of word w: token 32 w + j) on the logits' device; rows int64
        [n] of distinct row indices, or None for every row (n = B). Exactly
        kernels/reference/bitmask.py (xgrammar's apply_token_bitmask_inplace semantics)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

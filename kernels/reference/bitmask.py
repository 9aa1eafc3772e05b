"""Torch reference of the structured-output token bitmask: the contract of
``KernelBackend.apply_token_bitmask`` (kernels/base.py), and its oracle in the kernel tests.

The layout is xgrammar's (``GrammarMatcher.fill_next_token_bitmask``): int32 words, bit j of
word w (the sign bit is bit 31) allows token ``32 * w + j``. The semantics are those of
``xgrammar.apply_token_bitmask_inplace`` with ``vocab_size=None``: a 0 bit sets that logit to
-inf, a 1 bit leaves it as it is (NaN stays NaN), bits past the logits' width are ignored, and
logits past the mask's width (``32 * words``) are left as they are. One difference in the
rows: here bitmask row k masks logits row ``rows[k]`` (the masks of the constrained rows only,
packed), where xgrammar's ``indices`` pick the same row of both.

Unlike the sampling ops (sampling.py), this one works in place: the model runner masks the
step's logits before anything reads them.
"""

from __future__ import annotations

import torch

__all__ = ["apply_token_bitmask", "check_token_bitmask"]


def check_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None) -> int:
    """Raise on shapes the op does not take; return the number of columns it masks."""
    if logits.dim() != 2 or bitmask.dim() != 2:
        raise ValueError(
            f"apply_token_bitmask: logits [B, V] and bitmask [B', words], got {tuple(logits.shape)} "
            f"and {tuple(bitmask.shape)}"
        )
    if bitmask.dtype != torch.int32:
        raise ValueError(f"apply_token_bitmask: the bitmask must be int32, got {bitmask.dtype}")
    n = logits.shape[0] if rows is None else rows.numel()
    if bitmask.shape[0] != n:
        raise ValueError(
            f"apply_token_bitmask: {bitmask.shape[0]} bitmask rows for {n} "
            f"{'logits rows' if rows is None else 'rows'}"
        )
    return min(logits.shape[1], 32 * bitmask.shape[1])


def apply_token_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None
) -> None:
    """In place: ``logits[rows[k], t] = -inf`` where bit t of ``bitmask[k]`` is 0 (k over every
    row, ``rows`` the identity when None).

    logits: fp32 ``[B, V]`` (any float dtype here); bitmask: int32 ``[n, words]`` on the same
    device, n = B, or ``len(rows)``; rows: int64 ``[n]``, distinct indices into the logits' rows,
    or None."""
    cols = check_token_bitmask(logits, bitmask, rows)
    if bitmask.shape[0] == 0 or cols == 0:
        return
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :cols]  # [n, 32 * words] -> [n, cols]
    refused = allowed.to(logits.device) == 0
    if rows is None:
        logits[:, :cols].masked_fill_(refused, float("-inf"))
        return
    rows = rows.to(device=logits.device, dtype=torch.int64)
    logits[rows, :cols] = logits[rows, :cols].masked_fill_(refused, float("-inf"))

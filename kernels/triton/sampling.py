"""Sampling filters (temperature, min-p, top-k, top-p) without sorting the vocabulary.

Same signatures as kernels/reference/sampling.py (apply_min_p, apply_top_k, apply_top_p,
apply_top_k_top_p, apply_temperature), all served by one fused kernel, plus
``top_k_top_p_min_p_filter`` that applies the whole chain in one launch: the Triton backend's
``sampling_filter`` (backend.py), which the sampler calls on a GPU.

One program per row. Instead of a sort, each threshold is found by bisection over the
order-preserving int32 image of the fp32 values (``key``), counting or summing over the row
in every step; every step also snaps the bracket to the nearest keys that really occur, so
the search ends on an exact value after ~log2(key range between neighbours) passes::

    top-k:  largest key t with  #{key >= t} >= k             -> keep key >= t
    top-p:  smallest key t with  mass{key > t} < p * Z        -> keep key >= t
            (mass over top-k survivors, Z their softmax denominator: what the reference's
             "probability strictly above me is below p" means, ties aside)

Order (vLLM v1, as the reference): temperature -> min_p -> top_k -> top_p. Removed entries
become -inf. Ties at a top-p boundary are kept together (the reference's sort may split them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zeroserve.kernels.reference.sampling import GREEDY_TEMPERATURE_EPS

KEY_BELOW_ALL = tl.constexpr(-(2**40))  # int64 sentinels outside every int32 key
KEY_ABOVE_ALL = tl.constexpr(2**40)


@triton.jit
def _row_values(row_ptr, cols, vocab, temperature, min_p_logit):
    """Logits of one chunk after temperature and min-p, with their sortable int keys."""
    mask = cols < vocab
    x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32) / temperature
    x = tl.where(x < min_p_logit, float("-inf"), x)
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
    return x, key, mask


@triton.jit
def _filter_kernel(
    logits_ptr,
    out_ptr,
    temperature_ptr,
    min_p_ptr,
    top_k_ptr,
    top_p_ptr,
    vocab,
    stride_l,
    stride_o,
    greedy_eps,
    HAS_TEMPERATURE: tl.constexpr,
    HAS_MIN_P: tl.constexpr,
    HAS_TOP_K: tl.constexpr,
    HAS_TOP_P: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_l
    base = tl.arange(0, BLOCK)

    temperature = 1.0
    if HAS_TEMPERATURE:
        t = tl.load(temperature_ptr + row).to(tl.float32)
        temperature = tl.where(t < greedy_eps, 1.0, t)

    # pass 1: row max (min-p survives it, so it is also the max after min-p)
    row_max = tl.full([], float("-inf"), tl.float32)
    for off in range(0, vocab, BLOCK):
        x, key, mask = _row_values(row_ptr, off + base, vocab, temperature, float("-inf"))
        row_max = tl.maximum(row_max, tl.max(x, 0))
    min_p_logit = float("-inf")
    if HAS_MIN_P:
        min_p = tl.load(min_p_ptr + row).to(tl.float32)
        min_p_logit = tl.where(min_p > 0.0, row_max + tl.log(tl.maximum(min_p, 1e-30)), float("-inf"))
    max_bits = row_max.to(tl.int32, bitcast=True)
    max_key = tl.where(max_bits >= 0, max_bits, max_bits ^ 0x7FFFFFFF).to(tl.int64)

    # top-k: invariant #{key >= lo} >= k, #{key >= hi} < k
    lo = tl.full([], KEY_BELOW_ALL, tl.int64)
    if HAS_TOP_K:
        k = tl.load(top_k_ptr + row).to(tl.int64)
        hi = max_key + 1
        if (k <= 0) | (k >= vocab):
            hi = lo + 1  # disabled: keep everything
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            count = tl.zeros([], tl.int64)
            first_above = tl.full([], KEY_ABOVE_ALL, tl.int64)  # smallest key >= mid
            last_below = tl.full([], KEY_BELOW_ALL, tl.int64)  # largest key < mid
            for off in range(0, vocab, BLOCK):
                x, key, mask = _row_values(row_ptr, off + base, vocab, temperature, min_p_logit)
                ge = mask & (key >= mid)
                count += tl.sum(ge.to(tl.int64), 0)
                first_above = tl.minimum(first_above, tl.min(tl.where(ge, key, KEY_ABOVE_ALL), 0))
                last_below = tl.maximum(
                    last_below, tl.max(tl.where(mask & (key < mid), key, KEY_BELOW_ALL), 0)
                )
            if count >= k:
                lo = first_above
                if count == k:
                    hi = lo + 1  # exactly k at or above: done
            else:
                hi = last_below + 1
    keep_key = lo  # keys >= keep_key survive top-k (and are finite unless k exceeds them)

    if HAS_TOP_P:
        p = tl.load(top_p_ptr + row).to(tl.float32)
        z = tl.zeros([], tl.float32)
        for off in range(0, vocab, BLOCK):
            x, key, mask = _row_values(row_ptr, off + base, vocab, temperature, min_p_logit)
            z += tl.sum(tl.where(mask & (key >= keep_key), tl.exp(x - row_max), 0.0), 0)
        limit = p * z
        # invariant: mass{key > lo} >= p*Z (lo fails), mass{key > hi} < p*Z (hi holds)
        lo_p = keep_key - 1
        hi_p = max_key  # the top token always stays
        if p >= 1.0:
            hi_p = keep_key  # off: nothing beyond top-k is removed
        if p <= 0.0:
            lo_p = hi_p - 1  # only the top token
        while hi_p - lo_p > 1:
            mid = lo_p + (hi_p - lo_p) // 2
            mass = tl.zeros([], tl.float32)
            first_above = tl.full([], KEY_ABOVE_ALL, tl.int64)  # smallest key > mid
            last_below = tl.full([], KEY_BELOW_ALL, tl.int64)  # largest key <= mid
            for off in range(0, vocab, BLOCK):
                x, key, mask = _row_values(row_ptr, off + base, vocab, temperature, min_p_logit)
                alive = mask & (key >= keep_key)
                above = alive & (key > mid)
                mass += tl.sum(tl.where(above, tl.exp(x - row_max), 0.0), 0)
                first_above = tl.minimum(first_above, tl.min(tl.where(above, key, KEY_ABOVE_ALL), 0))
                last_below = tl.maximum(
                    last_below, tl.max(tl.where(alive & (key <= mid), key, KEY_BELOW_ALL), 0)
                )
            if mass < limit:
                hi_p = tl.maximum(last_below, lo_p + 1)
            else:
                lo_p = tl.minimum(first_above - 1, hi_p - 1)
        keep_key = tl.maximum(keep_key, hi_p)

    out_row = out_ptr + row * stride_o
    for off in range(0, vocab, BLOCK):
        cols = off + base
        x, key, mask = _row_values(row_ptr, cols, vocab, temperature, min_p_logit)
        tl.store(out_row + cols, tl.where(key >= keep_key, x, float("-inf")), mask=mask)


def top_k_top_p_min_p_filter(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
    temperature: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits: fp32 [B, V]; top_k int [B] (<= 0 or >= V: off), top_p fp32 [B] (>= 1: off),
    min_p fp32 [B] (0: off), temperature fp32 [B] (None: not applied). Returns new logits
    (divided by the temperature when given) with removed entries set to -inf."""
    rows, vocab = logits.shape
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    out = torch.empty((rows, vocab), dtype=torch.float32, device=logits.device)
    if rows == 0 or vocab == 0:
        return out
    dummy = out  # stands in for absent parameter tensors; never read
    _filter_kernel[(rows,)](
        logits,
        out,
        temperature if temperature is not None else dummy,
        min_p if min_p is not None else dummy,
        top_k if top_k is not None else dummy,
        top_p if top_p is not None else dummy,
        vocab,
        logits.stride(0),
        out.stride(0),
        GREEDY_TEMPERATURE_EPS,
        HAS_TEMPERATURE=temperature is not None,
        HAS_MIN_P=min_p is not None,
        HAS_TOP_K=top_k is not None,
        HAS_TOP_P=top_p is not None,
        BLOCK=min(4096, triton.next_power_of_2(vocab)),
        num_warps=8,
    )
    return out


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    return top_k_top_p_min_p_filter(logits, None, None, None, temperature)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    return top_k_top_p_min_p_filter(logits, None, None, min_p)


def apply_top_k(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return top_k_top_p_min_p_filter(logits, k, None, None)


def apply_top_p(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return top_k_top_p_min_p_filter(logits, None, p, None)


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
    return top_k_top_p_min_p_filter(logits, k, p, None)


def reference_filter(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
    temperature: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same chain through the torch reference ops (the oracle for tests and gpu checks)."""
    from zeroserve.kernels.reference.sampling import filter_logits

    return filter_logits(logits, temperature, min_p, top_k, top_p)

"""Torch reference sampling ops: pure functions over batched tensors.

Shapes: B rows (requests that sample this step), V vocabulary. ``logits`` are fp32 ``[B, V]``;
per-request parameters are ``[B]`` tensors on the same device. No op modifies its inputs (one
with nothing to do may return its input as is). Definitions follow vLLM / OpenAI (see each
docstring). Every device runs these; the filter chain (``filter_logits``) and the greedy
argmax are also in the kernel interface (kernels/base.py ``sampling_filter``, ``argmax_rows``),
where a backend may put a faster version.

Order the sampler applies them in (vLLM v1's):

    raw logits --min_tokens mask--> --penalties--> greedy argmax
                                                \\-> temperature -> min_p -> top_k -> top_p
                                                    -> softmax -> exponential race (seeded)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

# Below this a temperature counts as greedy (vLLM's _SAMPLING_EPS): logits / 1e-6 overflow
# the softmax's useful range anyway.
GREEDY_TEMPERATURE_EPS = 1e-5

# Top-p looks for its cut among this many top logits first; a nucleus wider than that is
# rare (top_p near 1 over a flat distribution) and costs a full sort of that row.
TOP_P_CANDIDATES = 1024


# --------------------------------------------------------------------------- token statistics


def flatten_token_ids(
    token_ids: Sequence[Sequence[int]], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged per-row token ids -> (row index, token id), both int64 ``[total]`` on device."""
    lengths = np.fromiter(map(len, token_ids), dtype=np.int64, count=len(token_ids))
    total = int(lengths.sum())
    flat = np.empty((2, total), dtype=np.int64)  # (row; token id)
    flat[0] = np.repeat(np.arange(len(token_ids), dtype=np.int64), lengths)
    # numpy reads Python ints ~3x faster than torch.tensor(list); this runs every step
    flat[1] = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int64, count=total)
    rows, ids = torch.from_numpy(flat).to(device).unbind(0)  # one host-to-device copy
    return rows, ids


def scatter_token_counts(
    rows: torch.Tensor, ids: torch.Tensor, num_rows: int, vocab_size: int
) -> torch.Tensor:
    """How often each token occurs per row: int32 ``[num_rows, vocab_size]``.

    rows, ids: int64 ``[total]`` from :func:`flatten_token_ids`.
    """
    counts = torch.zeros(num_rows, vocab_size, dtype=torch.int32, device=ids.device)
    ones = torch.ones(ids.shape, dtype=torch.int32, device=ids.device)
    return counts.index_put_((rows, ids), ones, accumulate=True)


def scatter_token_mask(rows: torch.Tensor, ids: torch.Tensor, num_rows: int, vocab_size: int) -> torch.Tensor:
    """Whether each token occurs per row: bool ``[num_rows, vocab_size]``."""
    mask = torch.zeros(num_rows, vocab_size, dtype=torch.bool, device=ids.device)
    return mask.index_put_((rows, ids), torch.ones((), dtype=torch.bool, device=ids.device))


def token_counts(
    token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Per-row token counts from ragged lists: int32 ``[B, V]``."""
    rows, ids = flatten_token_ids(token_ids, device)
    return scatter_token_counts(rows, ids, len(token_ids), vocab_size)


def token_mask(
    token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Per-row token presence from ragged lists: bool ``[B, V]``."""
    rows, ids = flatten_token_ids(token_ids, device)
    return scatter_token_mask(rows, ids, len(token_ids), vocab_size)


# --------------------------------------------------------------------------- logits processors


def mask_tokens(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Set ``logits[rows[i], ids[i]] = -inf`` (min_tokens hides EOS / stop ids this way)."""
    return logits.index_put((rows, ids), logits.new_full((), float("-inf")))


def apply_penalties(
    logits: torch.Tensor,
    output_token_counts: torch.Tensor,
    prompt_mask: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    repetition: torch.Tensor,
) -> torch.Tensor:
    """Repetition, then frequency, then presence penalty (vLLM's apply_penalties).

    output_token_counts: int ``[B, V]`` counts in the generated tokens; prompt_mask: bool
    ``[B, V]`` tokens of the prompt; presence, frequency, repetition: fp32 ``[B]``.

    - repetition (HF CTRL-style, multiplicative), for tokens seen in the prompt OR the output:
      ``logit / r`` if ``logit > 0`` else ``logit * r``; r = 1 is a no-op.
    - frequency (OpenAI): ``logit -= frequency * count_in_output``.
    - presence (OpenAI): ``logit -= presence * (count_in_output > 0)``.
    """
    output_mask = output_token_counts > 0
    seen = prompt_mask | output_mask
    rep = torch.where(seen, repetition.unsqueeze(1), 1.0)  # (B, V); 1 where unseen
    logits = torch.where(logits > 0, logits / rep, logits * rep)
    logits = logits - frequency.unsqueeze(1) * output_token_counts
    return logits - presence.unsqueeze(1) * output_mask


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``logits / T`` per row. Greedy rows (T below GREEDY_TEMPERATURE_EPS) divide by 1: their
    token is the argmax, decided elsewhere; this only keeps them finite."""
    t = torch.where(temperature < GREEDY_TEMPERATURE_EPS, 1.0, temperature)
    return logits / t.unsqueeze(1)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p * max_prob`` of their row.

    Done in logit space, which is the same test without a softmax:
    ``p_i < min_p * p_max  <=>  logit_i - logit_max < log(min_p)``. min_p = 0 keeps all.
    """
    max_logit = logits.amax(dim=-1, keepdim=True)
    threshold = max_logit + torch.log(min_p).unsqueeze(1)  # -inf where min_p == 0
    return logits.masked_fill(logits < threshold, float("-inf"))


def _top_k_threshold(values_desc: torch.Tensor, k: torch.Tensor, width: int) -> torch.Tensor:
    """k-th largest logit per row from descending values ``[B, >=max k]``; -inf where k is
    off (k <= 0 or k >= width) so that nothing is below it."""
    enabled = (k > 0) & (k < width)
    idx = (k.clamp(1, values_desc.shape[1]) - 1).unsqueeze(1)
    kth = values_desc.gather(1, idx.long())
    return torch.where(enabled.unsqueeze(1), kth, float("-inf"))


def apply_top_k(logits: torch.Tensor, k: torch.Tensor, max_k: int | None = None) -> torch.Tensor:
    """Keep each row's k largest logits (ties with the k-th are kept too, as in vLLM).

    k: int ``[B]``; k <= 0 or k >= V disables it for that row. Uses ``topk(max k)``, never a
    full-vocabulary sort. max_k: the largest enabled k if the caller knows it (saves a sync).
    """
    vocab = logits.shape[-1]
    if max_k is None:
        max_k = int(torch.where((k > 0) & (k < vocab), k, 0).max().item()) if k.numel() else 0
    max_k = min(max_k, vocab)
    if max_k <= 0:
        return logits
    values = logits.topk(max_k, dim=-1).values  # (B, max_k), descending
    threshold = _top_k_threshold(values, k, vocab)
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of top tokens whose probability sums to >= p
    (the top token always stays; ties with the last kept logit stay too). p: fp32 ``[B]``;
    p >= 1 keeps everything."""
    return apply_top_k_top_p(logits, None, p)


def apply_top_k_top_p(
    logits: torch.Tensor,
    k: torch.Tensor | None,
    p: torch.Tensor | None,
    max_k: int | None = None,
) -> torch.Tensor:
    """Top-k, then top-p over the renormalized survivors (vLLM's order).

    k: int ``[B]`` or None, p: fp32 ``[B]`` or None (see apply_top_k / apply_top_p); max_k as
    in apply_top_k. No full-vocabulary sort in the common case: one ``topk`` of
    ``max(TOP_P_CANDIDATES, max k)`` candidates serves both filters, and only rows whose
    nucleus reaches past the candidates (very flat distributions) are sorted in full.
    """
    if p is None:
        return logits if k is None else apply_top_k(logits, k, max_k)
    vocab = logits.shape[-1]
    if k is not None and max_k is None:
        max_k = int(torch.where((k > 0) & (k < vocab), k, 0).max().item()) if k.numel() else 0
    values = logits.topk(min(vocab, max(TOP_P_CANDIDATES, max_k or 0)), dim=-1).values
    if k is not None:
        threshold = _top_k_threshold(values, k, vocab)
        logits = logits.masked_fill(logits < threshold, float("-inf"))
        values = values.masked_fill(values < threshold, float("-inf"))
    cutoff = _top_p_cutoff(logits, values, p)
    return logits.masked_fill(logits < cutoff, float("-inf"))


def filter_logits(
    logits: torch.Tensor,
    temperature: torch.Tensor | None,
    min_p: torch.Tensor | None,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    max_k: int | None = None,
) -> torch.Tensor:
    """The whole filter chain in the sampler's order: temperature, min-p, top-k, top-p.
    Each parameter a ``[B]`` tensor or None (no row uses it); max_k as in apply_top_k."""
    if temperature is not None:
        logits = apply_temperature(logits, temperature)
    if min_p is not None:
        logits = apply_min_p(logits, min_p)
    return apply_top_k_top_p(logits, top_k, top_p, max_k)


def _top_p_cutoff(logits: torch.Tensor, values: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Smallest logit kept by top-p per row, ``[B, 1]`` (-inf where p >= 1).

    values: each row's largest logits, descending ``[B, C]``. A token stays while the mass
    strictly above it is < p, so the top token (nothing above it) always stays.
    """
    vocab = logits.shape[-1]
    lse = logits.logsumexp(dim=-1, keepdim=True)  # softmax over the whole (filtered) row
    probs = (values - lse).exp()
    cum = probs.cumsum(dim=-1)
    mass_above = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)
    num_kept = (mass_above < p.unsqueeze(1)).sum(dim=-1, keepdim=True).clamp_min(1)
    cutoff = values.gather(1, num_kept - 1)
    enabled = p < 1
    if values.shape[1] < vocab:
        beyond = enabled & (cum[:, -1] < p)  # the candidates do not reach p: sort the row
        if bool(beyond.any()):
            rows = beyond.nonzero().squeeze(1)
            full = logits.index_select(0, rows)
            sorted_full = full.sort(dim=-1, descending=True).values
            cutoff[rows] = _top_p_cutoff(full, sorted_full, p.index_select(0, rows))
    # p >= 1 rows keep all: a rounded cumsum may pass 1.0 before the tail and cut it.
    return torch.where(enabled.unsqueeze(1), cutoff, float("-inf"))


# --------------------------------------------------------------------------- sampling


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A request's own random stream: same seed, same tokens, whatever shares its batch."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def sample_from_probs(
    probs: torch.Tensor, generators: Sequence[torch.Generator | None] | None = None
) -> torch.Tensor:
    """One token per row by the exponential race: ``argmax(probs / E)``, ``E ~ Exp(1)`` iid.

    This picks token i with probability ``probs[i]`` (the Gumbel-max trick in another form)
    without a cumulative sum or a sync. probs: fp32 ``[B, V]`` rows summing to 1 (zeros for
    masked tokens). generators: None, or one entry per row; a row with a generator draws its
    noise ``[V]`` from it alone, so its token depends only on its own seed and probs; rows
    with None share the device's default generator. Returns int64 ``[B]``.
    """
    noise = torch.empty_like(probs)
    seeded = [(i, g) for i, g in enumerate(generators or ()) if g is not None]
    if len(seeded) < probs.shape[0]:
        _exponential_(noise, None)
    for i, generator in seeded:
        _exponential_(noise[i], generator)
    return probs.div(noise).argmax(dim=-1)


def _exponential_(noise: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Fill with Exp(1) draws that are never 0 (0/0 would be NaN, and NaN wins argmax)."""
    if noise.is_cuda:  # CUDA's exponential_ excludes 0 by construction
        return noise.exponential_(generator=generator)
    # CPU's exponential_ is ~4x slower than uniform_ and can return 0. -log(U), U in [0, 1),
    # is Exp(1) too and > 0 (U = 0 gives +inf noise: that token just cannot win).
    return noise.uniform_(generator=generator).log_().neg_()


def compute_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """fp32 log-softmax over the vocabulary, ``[B, V]``."""
    return logits.float().log_softmax(dim=-1)


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logprob of each row's token and the row's top-``num_top`` alternatives.

    logprobs: ``[B, V]``, token_ids: int64 ``[B]``. Returns (token logprob ``[B]``,
    top logprobs ``[B, num_top]`` descending, top token ids ``[B, num_top]``).
    """
    chosen = logprobs.gather(1, token_ids.long().unsqueeze(1)).squeeze(1)
    top = logprobs.topk(min(num_top, logprobs.shape[-1]), dim=-1)
    return chosen, top.values, top.indices

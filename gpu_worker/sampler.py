"""Pick the next token of every request that samples this step, on device, in one batch.

The model runner keeps per-request state (params, prompt ids, output ids, a torch.Generator
for seeded requests), builds a :class:`SamplingBatch` for the rows that sample this step
(one row per request, in plan order) and calls :meth:`Sampler.sample` with the last-position
logits ``[B, V]``. The greedy argmax and the filters come from the kernel backend
(``argmax_rows``, ``sampling_filter``: kernels/base.py), the rest are the pure torch functions
of ``kernels.reference.sampling``, which every device runs; the order is vLLM v1's:

    raw logits ─────────────────────────────────────────────────► logprobs (log_softmax, top-N)
      └─ min_tokens mask (EOS, stop ids) ─ logit_bias ─ penalties ─┬─► argmax_rows  (greedy rows)
                                                                   └─► sampling_filter (/T ─ min_p
                                                                       ─ top_k ─ top_p) ─ softmax ─ race

Only the work some row asks for runs: a filter only for what some row has (the torch one
never sorts the full vocabulary, save for rows whose top-p nucleus is wider than 1024 tokens;
the Triton one never sorts), and a bare argmax when the whole batch is greedy with nothing
else to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from zeroserve.kernels.base import KernelBackend
from zeroserve.kernels.reference import sampling as reference_ops
from zeroserve.kernels.reference.backend import ReferenceKernels
from zeroserve.kernels.reference.sampling import GREEDY_TEMPERATURE_EPS, make_generator
from zeroserve.shared.messages import SamplingParams, TokenLogprobs, TopLogprob

__all__ = ["MAX_LOGPROBS", "Sampler", "SamplerOutput", "SamplingBatch", "make_generator"]

MAX_LOGPROBS = 20  # OpenAI's cap on top_logprobs


def is_greedy(params: SamplingParams) -> bool:
    """Greedy rows take the argmax and never draw random numbers."""
    return params.temperature < GREEDY_TEMPERATURE_EPS or params.top_k == 1


@dataclass
class SamplingBatch:
    """Device tensors for one step's sampling rows; built by :meth:`build`.

    Optional groups are None when no row needs them, which is what lets sample() skip work.
    Flattened token lists are (row index, token id) pairs, int64 ``[total]``.
    """

    num_rows: int
    all_greedy: bool
    any_greedy: bool
    greedy: torch.Tensor  # bool [B]
    temperature: torch.Tensor | None  # fp32 [B]; None when all rows are greedy or T == 1
    min_p: torch.Tensor | None  # fp32 [B]
    top_k: torch.Tensor | None  # int64 [B], <= 0 off
    max_top_k: int  # largest top_k of the random rows, 0 if none
    top_p: torch.Tensor | None  # fp32 [B], 1 off
    # penalties, None unless some row has one
    presence: torch.Tensor | None  # fp32 [B]
    frequency: torch.Tensor | None  # fp32 [B]
    repetition: torch.Tensor | None  # fp32 [B]
    prompt_tokens: tuple[torch.Tensor, torch.Tensor] | None  # empty without repetition penalty
    output_tokens: tuple[torch.Tensor, torch.Tensor] | None
    # min_tokens: tokens to hide this step (EOS and stop ids of rows short of min_tokens)
    banned_tokens: tuple[torch.Tensor, torch.Tensor] | None
    # OpenAI's logit_bias: (rows, token ids, fp32 biases) added to the logits; None unless a row has one
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    # one per row, None for unseeded and greedy rows; None when no row has one
    generators: list[torch.Generator | None] | None
    # logprobs: rows that asked (ascending), and how many alternatives each wants
    logprob_rows: list[int]
    logprob_rows_tensor: torch.Tensor | None  # int64 [R]; None when all rows asked
    num_top_logprobs: list[int]

    @property
    def needs_penalties(self) -> bool:
        return self.presence is not None

    @property
    def fast_greedy(self) -> bool:
        """Nothing to do but an argmax."""
        return (
            self.all_greedy
            and not self.needs_penalties
            and self.banned_tokens is None
            and self.logit_bias is None
            and not self.logprob_rows
        )

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
        eos_token_ids: Sequence[int],
        device: torch.device | str,
    ) -> SamplingBatch:
        """One row per request, all lists in the same (plan) order.

        prompt_ids / output_ids: the request's prompt and generated tokens so far (read only
        when a row has a penalty, or for min_tokens' length). generators: the request's own
        generator (see make_generator) for seeded requests, else None. eos_token_ids: the
        model's EOS ids, hidden together with stop_token_ids while a row is short of
        min_tokens (also with ignore_eos).
        """
        num_rows = len(params)
        for name, seq in (("prompt_ids", prompt_ids), ("output_ids", output_ids), ("generators", generators)):
            if len(seq) != num_rows:
                raise ValueError(
                    f"SamplingBatch.build: {name} has {len(seq)} entries for {num_rows} "
                    "params; pass one entry per sampling row, in the same order"
                )
        greedy = [is_greedy(p) for p in params]
        # Greedy rows take the argmax; their filters are switched off so that they cost
        # nothing in the random path they share with the other rows (e.g. a top-p sort).
        temps = [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)]
        # past 2**24 it is off anyway (no vocabulary is that large) and stays exact in fp32 below
        top_ks = [0 if g else min(p.top_k, 1 << 24) for p, g in zip(params, greedy, strict=True)]
        top_ps = [1.0 if g else p.top_p for p, g in zip(params, greedy, strict=True)]
        min_ps = [0.0 if g else p.min_p for p, g in zip(params, greedy, strict=True)]
        presence = [p.presence_penalty for p in params]
        frequency = [p.frequency_penalty for p in params]
        repetition = [p.repetition_penalty for p in params]

        use_temperature = any(t != 1.0 for t in temps)
        use_min_p = any(m > 0.0 for m in min_ps)
        use_top_k = any(k > 0 for k in top_ks)
        use_top_p = any(q < 1.0 for q in top_ps)
        use_repetition = any(rp != 1.0 for rp in repetition)
        use_penalties = use_repetition or any(x != 0.0 for x in presence + frequency)

        # One host-to-device copy for every per-row scalar (top_k < 2**24, exact in fp32).
        packed = torch.tensor(
            [greedy, temps, min_ps, top_ks, top_ps, presence, frequency, repetition],
            dtype=torch.float32,
        ).to(device)
        g_t, temp_t, min_p_t, top_k_t, top_p_t, pres_t, freq_t, rep_t = packed.unbind(0)

        banned = [
            (row, tok)
            for row, (p, out) in enumerate(zip(params, output_ids, strict=True))
            if len(out) < p.min_tokens
            for tok in sorted(set(eos_token_ids) | set(p.stop_token_ids))
        ]
        banned_tokens = None
        if banned:
            rows, ids = torch.tensor(banned, dtype=torch.int64).to(device).unbind(1)
            banned_tokens = (rows, ids)

        logit_bias = None
        biased = [
            (row, tok, b) for row, p in enumerate(params) if p.logit_bias for tok, b in p.logit_bias.items()
        ]
        if biased:
            rows_b, ids_b, values_b = zip(*biased)
            logit_bias = (
                torch.tensor(rows_b, dtype=torch.int64).to(device),
                torch.tensor(ids_b, dtype=torch.int64).to(device),
                torch.tensor(values_b, dtype=torch.float32).to(device),
            )

        seeded = [None if g else gen for gen, g in zip(generators, greedy, strict=True)]
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        return cls(
            num_rows=num_rows,
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            greedy=g_t > 0.5,
            temperature=temp_t if use_temperature else None,
            min_p=min_p_t if use_min_p else None,
            top_k=top_k_t.long() if use_top_k else None,
            max_top_k=max(top_ks, default=0),
            top_p=top_p_t if use_top_p else None,
            presence=pres_t if use_penalties else None,
            frequency=freq_t if use_penalties else None,
            repetition=rep_t if use_penalties else None,
            # the prompt only matters to the repetition penalty
            prompt_tokens=(
                reference_ops.flatten_token_ids(prompt_ids if use_repetition else [], device)
                if use_penalties
                else None
            ),
            output_tokens=(reference_ops.flatten_token_ids(output_ids, device) if use_penalties else None),
            banned_tokens=banned_tokens,
            logit_bias=logit_bias,
            generators=seeded if any(g is not None for g in seeded) else None,
            logprob_rows=logprob_rows,
            logprob_rows_tensor=(
                torch.tensor(logprob_rows, dtype=torch.int64).to(device)
                if 0 < len(logprob_rows) < num_rows
                else None
            ),
            num_top_logprobs=[min(params[i].logprobs, MAX_LOGPROBS) for i in logprob_rows],
        )


@dataclass
class SamplerOutput:
    """token_ids: one per row; logprobs: per row, None where the request did not ask;
    sampled: the same token ids as an int64 ``[B]`` device tensor (next step's input)."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    sampled: torch.Tensor


class Sampler:
    """One per worker; no state between steps. sample() runs a SamplingBatch's step.

    kernels: the backend whose argmax and filters it uses (the torch one by default), chosen
    once, at construction, with the model's.
    """

    def __init__(self, kernels: KernelBackend | None = None) -> None:
        self.kernels = kernels if kernels is not None else ReferenceKernels()

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: ``[B, V]`` (any float dtype; computed in fp32), one row per batch row.
        The caller's tensor is never modified."""
        if logits.dim() != 2 or logits.shape[0] != batch.num_rows:
            raise ValueError(
                f"Sampler.sample: logits have shape {tuple(logits.shape)} but the batch has "
                f"{batch.num_rows} rows; pass the last-position logits [rows, vocab]"
            )
        if batch.fast_greedy:
            sampled = self.kernels.argmax_rows(logits)
            return SamplerOutput(sampled.tolist(), [None] * batch.num_rows, sampled)

        raw = logits.float()
        processed = self._process(raw, batch)
        if batch.all_greedy:
            sampled = self.kernels.argmax_rows(processed)
        else:
            sampled = self._sample_random(processed, batch)
            if batch.any_greedy:
                sampled = torch.where(batch.greedy, self.kernels.argmax_rows(processed), sampled)
        # queue the logprob kernels before the first device-to-host copy waits for them all
        logprobs = self._logprobs(raw, sampled, batch)
        return SamplerOutput(sampled.tolist(), self._to_messages(logprobs, batch), sampled)

    def _process(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """min_tokens masking, logit_bias and penalties: what greedy and random rows both see."""
        num_rows, vocab = logits.shape
        if batch.banned_tokens is not None:
            logits = reference_ops.mask_tokens(logits, *batch.banned_tokens)
        if batch.logit_bias is not None:  # out of place: the caller's logits stay as they were
            rows, ids, values = batch.logit_bias
            logits = logits.index_put((rows, ids), values, accumulate=True)
        if batch.needs_penalties:
            counts = reference_ops.scatter_token_counts(*batch.output_tokens, num_rows, vocab)
            prompt_mask = reference_ops.scatter_token_mask(*batch.prompt_tokens, num_rows, vocab)
            logits = reference_ops.apply_penalties(
                logits, counts, prompt_mask, batch.presence, batch.frequency, batch.repetition
            )
        return logits

    def _sample_random(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        # A top_k at or past the vocabulary is off for its row (it keeps every token); as the
        # batch's max it would buy a full-vocabulary top-k for every row. Then the filter
        # finds the largest real k itself (one small sync). The tokenizer turns such a top_k
        # off before it gets here; this guards the other ways in.
        max_top_k = batch.max_top_k if batch.max_top_k < logits.shape[-1] else None
        logits = self.kernels.sampling_filter(
            logits, batch.temperature, batch.min_p, batch.top_k, batch.top_p, max_top_k
        )
        return reference_ops.sample_from_probs(logits.softmax(dim=-1), batch.generators)

    def _logprobs(
        self, raw: torch.Tensor, sampled: torch.Tensor, batch: SamplingBatch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """vLLM's default "raw_logprobs": log_softmax of the model's logits, before any
        penalty, mask or temperature. Returns (token logprob [R], top values [R, N], top
        ids [R, N]) for the R rows that asked, N their largest request; None if none did."""
        if not batch.logprob_rows:
            return None
        rows = batch.logprob_rows_tensor
        if rows is not None:  # only some rows asked: skip the others' log_softmax
            raw, sampled = raw.index_select(0, rows), sampled.index_select(0, rows)
        return reference_ops.gather_logprobs(
            reference_ops.compute_logprobs(raw), sampled, max(batch.num_top_logprobs)
        )

    @staticmethod
    def _to_messages(
        logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, batch: SamplingBatch
    ) -> list[TokenLogprobs | None]:
        out: list[TokenLogprobs | None] = [None] * batch.num_rows
        if logprobs is None:
            return out
        chosen, values, ids = (t.tolist() for t in logprobs)
        for j, (row, n) in enumerate(zip(batch.logprob_rows, batch.num_top_logprobs, strict=True)):
            top = [TopLogprob(ids[j][m], values[j][m]) for m in range(min(n, len(ids[j])))]
            out[row] = TokenLogprobs(chosen[j], top)
        return out

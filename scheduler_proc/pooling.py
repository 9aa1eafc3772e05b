"""Embedding requests in the scheduler (EngineRequest.pooling set): prefill only, then pooled.

Rules, applied by ``Scheduler`` and ``check_admission``:

- **One step, whole.** An embedding request starts only when its whole prompt fits the step
  (the token budget left, and with ``--target-itl-ms`` the time budget, unless it is the first
  prefill of the step, so it cannot wait forever); it is never chunked. An encoder's attention
  is bidirectional (every token needs every other one), and mean / cls / max pooling read every
  token's hidden state, which the worker only has in the step that computes it.
- **No prefix-cache reads or writes.** Its hidden states are needed for every token, so a
  cached prefix would not save anything, and an encoder writes no KV for a block to hold.
- **Admission.** The prompt must fit the context (prompt <= max_model_len: nothing is
  generated after it) and one step's token budget; max_tokens is not looked at.
- **End.** The worker returns the vector in StepResult.pooled instead of a token; the request
  ends at once with finish reason "stop" and the vector in TokenDelta.embedding, and its blocks
  are freed.
"""

from __future__ import annotations

from zeroserve.scheduler_proc.config import SchedulerConfig
from zeroserve.scheduler_proc.cost_model import TimeBudget
from zeroserve.scheduler_proc.request import Request
from zeroserve.shared.messages import EngineRequest, TokenDelta


def embedding_admission_error(cfg: SchedulerConfig, req: EngineRequest) -> tuple[str, str, str | None] | None:
    """(message, param, code) when the embedding request can never run, else None."""
    num_prompt, context = len(req.prompt_token_ids), cfg.max_model_len
    if num_prompt == 0:
        return "the input is empty: it must contain at least one token", "input", None
    if num_prompt > context:
        return (
            f"This model's maximum context length is {context} tokens. However, the input has {num_prompt} "
            "tokens. Please shorten the input.",
            "input",
            "context_length_exceeded",
        )
    if num_prompt > cfg.max_num_batched_tokens:
        return (
            f"The input has {num_prompt} tokens, but an embedding is computed in one step of at most "
            f"{cfg.max_num_batched_tokens} tokens (--max-num-batched-tokens). Shorten the input.",
            "input",
            "context_length_exceeded",
        )
    if -(-num_prompt // cfg.block_size) > cfg.num_blocks:
        return (
            f"The input needs {-(-num_prompt // cfg.block_size)} KV-cache blocks but the whole cache holds "
            f"{cfg.num_blocks}. Shorten the input.",
            "input",
            "kv_cache_too_small",
        )
    return None


def starts_whole(num_tokens: int, num_new: int, tb: TimeBudget | None, first_prefill: bool) -> bool:
    """Whether an embedding request of ``num_tokens`` may start this step: all its tokens fit the
    token budget (``num_new`` is what is left of it, capped at num_tokens) and the time budget,
    which the first prefill of a step may exceed (else a prompt costlier than the target would
    never start)."""
    if num_new < num_tokens:
        return False
    return tb is None or first_prefill or tb.chunk(0, num_tokens) >= num_tokens


def pooled_delta(r: Request, data: bytes, now: float) -> TokenDelta:
    """The last (and only) delta of embedding request r: its vector, no token."""
    r.sent_first_delta = True
    r.first_token_at = now
    return TokenDelta(
        request_id=r.request_id,
        token_ids=[],
        finish_reason="stop",
        num_prompt_tokens=r.num_prompt_tokens,
        num_cached_tokens=0,
        timings=r.timings(now),
        embedding=data,
    )

"""Per-request work in tokenizer_proc: building the prompt, and turning tokens into text."""

from __future__ import annotations

import msgspec

from zeroserve.shared.messages import ErrorInfo, GenerateRequest, SamplingParams, TextDelta, TokenDelta
from zeroserve.tokenizer_proc.detokenizer import IncrementalDetokenizer
from zeroserve.tokenizer_proc.errors import TokenizerError
from zeroserve.tokenizer_proc.stop_strings import StopChecker


class PromptError(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.info = ErrorInfo(400, "invalid_request_error", message, param=param, code=code)


def build_prompt(
    tokenizer, req: GenerateRequest, max_model_len: int, vocab_size: int
) -> tuple[list[int], SamplingParams]:
    """Token ids of the request's prompt, and its params with max_tokens resolved.

    Raises PromptError (HTTP 400) for an empty prompt, ids outside the vocabulary, or a
    prompt (+ max_tokens) that does not fit the context, with vLLM's wording.
    """
    given = [x is not None for x in (req.prompt, req.messages, req.prompt_token_ids)]
    if sum(given) != 1:
        raise PromptError("exactly one of prompt, messages or prompt token ids must be given", param="prompt")
    if req.messages is not None:
        try:
            text = tokenizer.apply_chat_template(
                req.messages, add_generation_prompt=req.add_generation_prompt
            )
        except TokenizerError as e:  # the template's own raise_exception, or a malformed conversation
            raise PromptError(e.message, param=e.param or "messages") from None
        except Exception:  # never leak internals; the message says what to fix
            raise PromptError(
                "the chat template could not render these messages; check roles and content", param="messages"
            ) from None
        ids = tokenizer.encode(text, add_special_tokens=False)
        param = "messages"
    elif req.prompt is not None:
        ids = tokenizer.encode(req.prompt, add_special_tokens=True)
        param = "prompt"
    else:
        ids = list(req.prompt_token_ids)
        param = "prompt"
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise PromptError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})", param=param)
    if not ids:
        raise PromptError("the prompt is empty: it must contain at least one token", param=param)
    params = req.params
    if len(ids) >= max_model_len:
        raise PromptError(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
            f"{len(ids)} tokens, leaving no room for the completion. Please shorten the prompt.",
            param=param,
            code="context_length_exceeded",
        )
    if params.max_tokens <= 0:
        params = msgspec.structs.replace(params, max_tokens=max_model_len - len(ids))
    elif len(ids) + params.max_tokens > max_model_len:
        raise PromptError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{len(ids) + params.max_tokens} tokens ({len(ids)} in the prompt, {params.max_tokens} for the "
            "completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    if params.min_tokens > params.max_tokens:
        raise PromptError("min_tokens must not exceed max_tokens", param="min_tokens")
    return ids, params


class RequestState:
    """Detokenizer, stop strings and counters of one request in flight."""

    def __init__(self, tokenizer, owner: bytes, req: GenerateRequest, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.owner = owner
        self.req = req
        self.prompt_ids = prompt_ids
        self.detok = IncrementalDetokenizer(
            tokenizer, prompt_ids, skip_special_tokens=req.skip_special_tokens
        )
        self.stop = StopChecker(req.stop, req.include_stop_str_in_output) if req.stop else None
        self.num_output = 0
        self.first = True

    def advance(self, delta: TokenDelta) -> TextDelta:
        first, self.first = self.first, False
        extra = {}
        if first:
            extra = {
                "num_prompt_tokens": delta.num_prompt_tokens or len(self.prompt_ids),
                "num_cached_tokens": delta.num_cached_tokens,
            }
            if self.req.return_prompt:
                extra["prompt_token_ids"] = self.prompt_ids
                extra["prompt_text"] = self.tokenizer.decode(self.prompt_ids, skip_special_tokens=False)
        if delta.error is not None:
            return TextDelta(
                request_id=delta.request_id,
                text="",
                finish_reason=delta.finish_reason or "error",
                error=delta.error,
                num_output_tokens=self.num_output,
                **extra,
            )
        self.num_output += len(delta.token_ids)
        finished = delta.finish_reason is not None
        text = self.detok.push(delta.token_ids)
        if finished:
            text += self.detok.flush()
        finish_reason, stop_reason = delta.finish_reason, delta.stop_reason
        if self.stop is not None:
            text, stopped, matched = self.stop.feed(text, final=finished)
            if stopped:
                finish_reason, stop_reason = "stop", matched
        if self.req.params.logprobs is not None and delta.logprobs:
            extra["logprobs"] = delta.logprobs
            extra["token_texts"] = [self.detok.token_text(t) for t in delta.token_ids]
            extra["top_token_texts"] = [
                [self.detok.token_text(t.token_id) for t in lp.top] for lp in delta.logprobs
            ]
        return TextDelta(
            request_id=delta.request_id,
            text=text,
            token_ids=delta.token_ids,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
            num_output_tokens=self.num_output,
            **extra,
        )

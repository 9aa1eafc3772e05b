"""Turn a request's prompt into token ids and check them before the scheduler sees them.

Every failure is a TokenizerError subclass whose ``param`` names the request field at
fault, so tokenizer_proc can answer with an OpenAI-style 400 instead of failing later.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import ChatTemplateError, InvalidTokenIdError, PromptTooLongError, TokenizerError
from .tokenizer import Tokenizer


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str = "prompt_token_ids") -> None:
    """Raise InvalidTokenIdError naming the first id outside [0, vocab_size)."""
    for i, token_id in enumerate(ids):
        if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < vocab_size:
            raise InvalidTokenIdError(
                f"{param}[{i}] = {token_id!r} is not a token id of this model: ids must be integers "
                f"in [0, {vocab_size})",
                param=param,
            )


def encode_prompt(
    tokenizer: Tokenizer,
    prompt: str | None = None,
    messages: Sequence | None = None,
    prompt_token_ids: Sequence[int] | None = None,
    add_generation_prompt: bool = True,
    add_special_tokens: bool = True,
    vocab_size: int | None = None,
) -> list[int]:
    """The prompt's token ids, from exactly one of prompt / messages / prompt_token_ids.

    A plain prompt gets BOS when the model wants it (add_special_tokens); a chat is rendered by
    the template, which writes its own BOS. Given ids are checked against vocab_size (default:
    the tokenizer's; pass the model's when its embedding is larger).
    """
    given = [
        name
        for name, v in (("prompt", prompt), ("messages", messages), ("prompt_token_ids", prompt_token_ids))
        if v is not None
    ]
    if len(given) != 1:
        raise TokenizerError(
            "give exactly one of prompt, messages or prompt_token_ids"
            + (f" (got {', '.join(given)})" if given else ""),
            param=given[-1] if given else "prompt",
        )
    if prompt_token_ids is not None:
        ids = list(prompt_token_ids)
        check_token_ids(ids, vocab_size or tokenizer.vocab_size)
        return ids
    if messages is not None:
        if not messages:
            raise ChatTemplateError("messages is empty: a chat needs at least one message")
        return tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    return tokenizer.encode(prompt, add_special_tokens=add_special_tokens)


def check_prompt_length(num_prompt_tokens: int, max_model_len: int, max_tokens: int | None = None) -> None:
    """The prompt must leave room for at least one token, and for max_tokens when given."""
    if num_prompt_tokens == 0:
        raise TokenizerError("the prompt is empty: it must hold at least one token", param="prompt")
    if num_prompt_tokens >= max_model_len:
        raise PromptTooLongError(
            f"this model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{num_prompt_tokens} tokens: shorten the prompt",
            param="prompt",
        )
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise PromptTooLongError(
            f"this model's maximum context length is {max_model_len} tokens, but {num_prompt_tokens + max_tokens} "
            f"were requested ({num_prompt_tokens} in the prompt, {max_tokens} for the completion): lower "
            f"max_tokens to at most {max_model_len - num_prompt_tokens} or shorten the prompt",
            param="max_tokens",
        )

"""Turn a request's prompt into token ids, and check what only the tokenizer knows.

tokenizer_proc owns the vocabulary: prompt ids, stop_token_ids and /detokenize ids are
checked here, for the HTTP API and the ZMQ client alike. The context length, min_tokens and
the KV pool are the scheduler's (scheduler_proc/admission.py); the shape of an HTTP body is
api_proc's. Every failure is a TokenizerError whose ``param`` names the request field at
fault, so tokenizer_proc can answer with an OpenAI-style 400.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import msgspec

from zeroserve.shared.messages import GenerateRequest, SamplingParams
from zeroserve.shared.sampling_rules import sampling_error

from .errors import ChatTemplateError, InvalidTokenIdError, TokenizerError
from .structured import check_structured
from .tokenizer import Tokenizer
from .tool_messages import tool_variables


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str = "prompt_token_ids") -> None:
    """Raise InvalidTokenIdError naming the first id outside [0, vocab_size)."""
    for token_id in ids:
        if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < vocab_size:
            raise InvalidTokenIdError(
                f"Token id {token_id} in {param} is outside the vocabulary [0, {vocab_size}).", param=param
            )


def check_logit_bias(bias: dict[int, float] | None, vocab_size: int) -> None:
    """Ids in the vocabulary and finite biases within OpenAI's [-100, 100]: one row's inf or NaN
    would poison the sampling of its whole batch (ZMQ clients reach us without the API's checks)."""
    if not bias:
        return
    check_token_ids(list(bias), vocab_size, param="logit_bias")
    for token_id, value in bias.items():
        if not (isinstance(value, float | int) and math.isfinite(value) and -100.0 <= value <= 100.0):
            raise TokenizerError(
                f"logit_bias values must be between -100 and 100, got {value} for token {token_id}.",
                param="logit_bias",
            )


def encode_prompt(
    tokenizer: Tokenizer,
    prompt: str | None = None,
    messages: Sequence | None = None,
    prompt_token_ids: Sequence[int] | None = None,
    add_generation_prompt: bool = True,
    add_special_tokens: bool = True,
    vocab_size: int | None = None,
    tools: str | None = None,
) -> list[int]:
    """The prompt's token ids, from exactly one of prompt / messages / prompt_token_ids.

    A plain prompt gets BOS when the model wants it (add_special_tokens); a chat is rendered by
    the template, which writes its own BOS. Given ids are checked against vocab_size (default:
    the tokenizer's; pass the model's when its embedding is larger). Given ids are the
    completions API's ``prompt`` field, hence that param name in errors.
    """
    given = [
        name
        for name, v in (("prompt", prompt), ("messages", messages), ("prompt_token_ids", prompt_token_ids))
        if v is not None
    ]
    if len(given) != 1:
        raise TokenizerError(
            "exactly one of prompt, messages or prompt token ids must be given"
            + (f" (got {', '.join(given)})" if given else ""),
            param="prompt",
        )
    if prompt_token_ids is not None:
        ids = list(prompt_token_ids)
        check_token_ids(ids, vocab_size or tokenizer.vocab_size, param="prompt")
        return ids
    if messages is not None:
        if not messages:
            raise ChatTemplateError("messages is empty: a chat needs at least one message")
        try:
            return tokenizer.encode_chat(
                messages, add_generation_prompt=add_generation_prompt, **tool_variables(tools)
            )
        except TokenizerError as e:  # the template's own raise_exception, or a malformed conversation
            raise TokenizerError(e.message, param=e.param or "messages") from None
        except Exception:  # never leak internals; the message says what to fix
            raise ChatTemplateError(
                "the chat template could not render these messages; check roles and content"
            ) from None
    return tokenizer.encode(prompt, add_special_tokens=add_special_tokens)


class PromptCache:
    """Token ids of the last few distinct text prompts and chats, so that the n copies of one
    request (the api sends them back to back, one GenerateRequest per choice) are rendered
    and tokenized once. Bounded in entries and in cached tokens; the lists are shared by the
    requests that hit them and must never be mutated. Not thread-safe: one user at a time."""

    def __init__(self, max_entries: int = 64, max_tokens: int = 1 << 20):
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        self.num_tokens = 0
        self.hits = 0
        self._entries: OrderedDict[object, list[int]] = OrderedDict()

    @staticmethod
    def key(req: GenerateRequest) -> object | None:
        """What the prompt's ids depend on; None when there is nothing to tokenize (token ids
        given) or the request is malformed (encode_prompt says how)."""
        if req.prompt_token_ids is not None or (req.prompt is None) == (req.messages is None):
            return None
        if req.prompt is not None:
            return req.prompt
        return (req.add_generation_prompt, msgspec.msgpack.encode(req.messages), req.tools)

    def get(self, key: object) -> list[int] | None:
        ids = self._entries.get(key)
        if ids is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return ids

    def put(self, key: object, ids: list[int]) -> None:
        if len(ids) > self.max_tokens or key in self._entries:
            return
        self._entries[key] = ids
        self.num_tokens += len(ids)
        while len(self._entries) > self.max_entries or self.num_tokens > self.max_tokens:
            _, old = self._entries.popitem(last=False)
            self.num_tokens -= len(old)


def build_prompt(
    tokenizer: Tokenizer,
    req: GenerateRequest,
    max_model_len: int,
    vocab_size: int,
    cache: PromptCache | None = None,
) -> tuple[list[int], SamplingParams]:
    """Token ids of the request's prompt, and its params with max_tokens resolved.

    max_tokens <= 0 means the rest of the context; a prompt that leaves none resolves to
    max_tokens <= 0, which the scheduler refuses, naming the prompt. vocab_size: the model's
    (0: the tokenizer's); a top_k at or above it keeps every token, so it is turned off (0)
    here, where the vocabulary is known. With a cache, a prompt seen lately is not tokenized again (the ids
    returned may then be shared: do not mutate them). Raises TokenizerError.
    """
    vocab_size = vocab_size or tokenizer.vocab_size
    key = None if cache is None else cache.key(req)
    ids = None if key is None else cache.get(key)
    if ids is None:
        ids = encode_prompt(
            tokenizer,
            prompt=req.prompt,
            messages=req.messages,
            prompt_token_ids=req.prompt_token_ids,
            add_generation_prompt=req.add_generation_prompt,
            vocab_size=vocab_size,
            tools=req.tools,
        )
        if key is not None:
            cache.put(key, ids)
    params = req.params
    error = sampling_error(params)  # ZMQ clients reach us without the API's checks
    if error is not None:
        raise TokenizerError(*error)
    check_token_ids(params.stop_token_ids, vocab_size, param="stop_token_ids")
    check_logit_bias(params.logit_bias, vocab_size)
    check_structured(params.structured)  # xgrammar reads it, or a 400 says why
    if params.top_k >= vocab_size:  # every token anyway: off, so the sampler does no top-k at all
        params = msgspec.structs.replace(params, top_k=0)
    if params.max_tokens <= 0:
        params = msgspec.structs.replace(params, max_tokens=max_model_len - len(ids))
    return ids, params

"""Request bodies of the OpenAI API (and vLLM's common extensions) as msgspec Structs.

Decoding a body with ``msgspec.json.decode(body, type=...)`` checks every known field's
type (a wrong one is a 400 naming the field, see errors.from_decode_error) and ignores
unknown fields, as vLLM does by default. Optional fields are ``X | None = None`` because
clients send explicit nulls; defaults are applied in requests.py, where values are also
range-checked and turned into GenerateRequests.
"""

from __future__ import annotations

import msgspec


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool | None = None


class ContentPart(msgspec.Struct, kw_only=True):
    """One part of a message's content; only ``{"type": "text", "text": ...}`` is served."""

    type: str
    text: str | None = None


class ChatMessageIn(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None


class SamplingFields(msgspec.Struct, kw_only=True):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    priority: int | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    cache_salt: str | None = None
    # ours: milliseconds from arrival until the request ends with finish_reason "timeout",
    # queued or running; one the engine's measured speed cannot meet is refused with 429
    deadline_ms: float | None = None


class CompletionRequest(SamplingFields, kw_only=True):
    """POST /v1/completions. prompt: a string, a list of strings, a list of token ids, or a
    list of token-id lists (msgspec allows one array type per union, so the list's items are
    checked for being all of one kind in requests.py)."""

    prompt: str | list[str | int | list[int]]
    logprobs: int | None = None  # top-N alternatives per token, 0..max_logprobs
    echo: bool | None = None


class ChatCompletionRequest(SamplingFields, kw_only=True):
    """POST /v1/chat/completions."""

    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    add_generation_prompt: bool | None = None


class TokenizeBody(msgspec.Struct, kw_only=True):
    """POST /tokenize (vLLM): a prompt, or chat messages rendered by the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None


class DetokenizeBody(msgspec.Struct, kw_only=True):
    """POST /detokenize (vLLM)."""

    tokens: list[int]
    model: str | None = None

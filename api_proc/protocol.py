"""Request bodies of the OpenAI API (and vLLM's common extensions) as msgspec Structs.

Decoding a body with ``msgspec.json.decode(body, type=...)`` checks every known field's
type (a wrong one is a 400 naming the field, see errors.from_decode_error) and ignores
unknown fields, as vLLM does by default. Optional fields are ``X | None = None`` because
clients send explicit nulls; defaults are applied in requests.py, where values are also
range-checked and turned into GenerateRequests.
"""

from __future__ import annotations

from typing import Any

import msgspec


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool | None = None


class ContentPart(msgspec.Struct, kw_only=True):
    """One part of a message's content; only ``{"type": "text", "text": ...}`` is served."""

    type: str
    text: str | None = None


class FunctionCallIn(msgspec.Struct, kw_only=True):
    name: str
    arguments: str = ""  # JSON text, as OpenAI sends it


class ToolCallIn(msgspec.Struct, kw_only=True):
    """An assistant message's tool call, sent back in a later turn."""

    id: str
    function: FunctionCallIn
    type: str = "function"


class ChatMessageIn(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCallIn] | None = None


class FunctionDef(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class ToolDef(msgspec.Struct, kw_only=True):
    type: str  # "function"
    function: FunctionDef


class NamedFunction(msgspec.Struct, kw_only=True):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True):
    """tool_choice naming one function: {"type": "function", "function": {"name": ...}}."""

    type: str
    function: NamedFunction


class JsonSchemaFormat(msgspec.Struct, kw_only=True):
    name: str | None = None
    description: str | None = None
    schema: dict[str, Any] | bool | None = None
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, kw_only=True):
    """OpenAI's response_format: {"type": "text" | "json_object" | "json_schema", "json_schema": ...}."""

    type: str
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsIn(msgspec.Struct, kw_only=True):
    """vLLM's `structured_outputs` extension: exactly one of these constrains the output."""

    json: dict[str, Any] | bool | str | None = None  # a JSON schema (object, or its JSON text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool | None = None


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
    # vLLM's pre-0.12 guided decoding: refused by name (api_proc/fields.py LEGACY_VLLM)
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None
    # ours: milliseconds from arrival until the request ends with finish_reason "timeout",
    # queued or running; one the engine's measured speed cannot meet is refused with 429
    deadline_ms: float | None = None
    # OpenAI: token id (as a string key) -> bias in [-100, 100]
    logit_bias: dict[str, float] | None = None
    # constrained decoding: OpenAI's response_format, and vLLM's structured_outputs extension
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsIn | None = None


class CompletionRequest(SamplingFields, kw_only=True):
    """POST /v1/completions. prompt: a string, a list of strings, a list of token ids, or a
    list of token-id lists (msgspec allows one array type per union, so the list's items are
    checked for being all of one kind in requests.py)."""

    prompt: str | list[str | int | list[int]]
    logprobs: int | None = None  # top-N alternatives per token, 0..max_logprobs
    echo: bool | None = None
    # OpenAI fields zeroserve refuses by name (api_proc/fields.py): typed loosely so that any
    # value is seen and answered with a 400 that names the field, never silently dropped
    best_of: int | None = None
    suffix: Any = None


class ChatCompletionRequest(SamplingFields, kw_only=True):
    """POST /v1/chat/completions."""

    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    add_generation_prompt: bool | None = None
    tools: list[ToolDef] | None = None
    tool_choice: str | NamedToolChoice | None = None  # "none" | "auto" | "required" | a named function
    parallel_tool_calls: bool | None = None
    # OpenAI fields zeroserve refuses by name (api_proc/fields.py)
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    functions: Any = None
    function_call: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    moderation: Any = None


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

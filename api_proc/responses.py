"""Response bodies and SSE chunks in the exact shapes of the OpenAI API (plus vLLM's
``stop_reason``). Plain dicts, encoded with msgspec.

Completions choice: {index, text, logprobs: null | {tokens, token_logprobs, top_logprobs:
[{token: logprob}], text_offset}, finish_reason, stop_reason}
Chat choice: {index, message: {role, content}, logprobs: null | {content: [{token, logprob,
bytes, top_logprobs: [{token, logprob, bytes}]}]}, finish_reason, stop_reason}
Streams: chunks of one choice each, then (stream_options.include_usage) a chunk with
``choices: []`` and the usage, then ``data: [DONE]``.
"""

from __future__ import annotations

import math

import msgspec

from zeroserve.api_proc import tools
from zeroserve.api_proc.errors import ApiError
from zeroserve.api_proc.generate import ChoiceState, LogprobEntry
from zeroserve.api_proc.requests import GenerationPlan

SSE_DONE = b"data: [DONE]\n\n"
_json = msgspec.json.Encoder()


def encode(obj: object) -> bytes:
    return _json.encode(obj)


def sse(obj: object) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


def error_event(err: ApiError) -> bytes:
    """A mid-stream failure; the openai client raises on a chunk with an "error" key."""
    return sse(err.body())


def _lp(value: float) -> float:
    """JSON has no -inf: clamp as vLLM does."""
    return -9999.0 if math.isnan(value) else max(value, -9999.0)


def usage(plan: GenerationPlan, choices: list[ChoiceState]) -> dict:
    """Prompt tokens count once per prompt (not per sample), completion tokens per choice."""
    prompt = sum(c.num_prompt_tokens for c in choices if c.counts_prompt)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# --------------------------------------------------------------------------- logprobs


def completion_logprobs(entries: list[LogprobEntry]) -> dict:
    """vLLM includes the sampled token among the top alternatives (up to N + 1 of them)."""
    top = []
    for e in entries:
        alternatives = {text: _lp(lp) for text, lp in e.top}
        alternatives.setdefault(e.token, _lp(e.logprob))
        top.append(alternatives)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [_lp(e.logprob) for e in entries],
        "top_logprobs": top,
        "text_offset": [e.offset for e in entries],
    }


def _chat_token(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": _lp(logprob), "bytes": list(token.encode("utf-8"))}


def chat_logprobs(entries: list[LogprobEntry]) -> dict:
    return {
        "content": [
            {**_chat_token(e.token, e.logprob), "top_logprobs": [_chat_token(t, lp) for t, lp in e.top]}
            for e in entries
        ]
    }


# --------------------------------------------------------------------------- full responses


def completion_body(plan: GenerationPlan, choices: list[ChoiceState]) -> dict:
    return {
        "id": plan.request_id,
        "object": "text_completion",
        "created": plan.created,
        "model": plan.model,
        "choices": [
            {
                "index": c.index,
                "text": "".join(c.text),
                "logprobs": completion_logprobs(c.logprobs) if plan.logprobs is not None else None,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            for c in choices
        ],
        "usage": usage(plan, choices),
        "system_fingerprint": None,
    }


def chat_body(plan: GenerationPlan, choices: list[ChoiceState]) -> dict:
    return {
        "id": plan.request_id,
        "object": "chat.completion",
        "created": plan.created,
        "model": plan.model,
        "choices": [_chat_choice(plan, c) for c in choices],
        "usage": usage(plan, choices),
        "system_fingerprint": None,
    }


def _chat_choice(plan: GenerationPlan, c: ChoiceState) -> dict:
    message, finish_reason = tools.chat_message(plan.tools, "".join(c.text), c.finish_reason)
    return {
        "index": c.index,
        "message": message,
        "logprobs": chat_logprobs(c.logprobs) if plan.logprobs is not None else None,
        "finish_reason": finish_reason,
        "stop_reason": c.stop_reason,
    }


# --------------------------------------------------------------------------- stream chunks


def _chunk(plan: GenerationPlan, choice: dict) -> dict:
    chunk = {
        "id": plan.request_id,
        "object": "chat.completion.chunk" if plan.chat else "text_completion",
        "created": plan.created,
        "model": plan.model,
        "choices": [choice],
    }
    if plan.include_usage:
        chunk["usage"] = None  # OpenAI: null on every chunk but the last
    return chunk


def completion_chunk(
    plan: GenerationPlan,
    index: int,
    text: str,
    entries: list[LogprobEntry] | None,
    finish_reason: str | None,
    stop_reason: str | int | None,
) -> dict:
    return _chunk(
        plan,
        {
            "index": index,
            "text": text,
            "logprobs": completion_logprobs(entries) if entries is not None else None,
            "finish_reason": finish_reason,
            "stop_reason": stop_reason,
        },
    )


def chat_role_chunk(plan: GenerationPlan, index: int) -> dict:
    return _chunk(
        plan,
        {
            "index": index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        },
    )


def chat_chunk(
    plan: GenerationPlan,
    index: int,
    text: str,
    entries: list[LogprobEntry] | None,
    finish_reason: str | None,
    stop_reason: str | int | None,
    tool_calls: list[dict] | None = None,
) -> dict:
    delta: dict = {"content": text} if text or (finish_reason is None and not tool_calls) else {}
    if tool_calls:  # OpenAI's tool-call deltas (api_proc/tools.py)
        delta["tool_calls"] = tool_calls
    choice: dict = {
        "index": index,
        "delta": delta,
        "logprobs": chat_logprobs(entries) if entries is not None else None,
        "finish_reason": finish_reason,
    }
    if finish_reason is not None:
        choice["stop_reason"] = stop_reason
    return _chunk(plan, choice)


def usage_chunk(plan: GenerationPlan, choices: list[ChoiceState]) -> dict:
    return {
        "id": plan.request_id,
        "object": "chat.completion.chunk" if plan.chat else "text_completion",
        "created": plan.created,
        "model": plan.model,
        "choices": [],
        "usage": usage(plan, choices),
    }

"""Every field of OpenAI's /v1/completions and /v1/chat/completions bodies, and what zeroserve
does with it: no field is dropped without a word.

    implemented           honoured; ``note`` names the test that shows it (path::test)
    accepted (no effect)  taken and ignored, because it cannot change the output
                          (bookkeeping, billing, caching hints); ``note`` says why
    refused               a 400 naming the field (``param``, code "unsupported_parameter"),
                          until it is implemented; ``note`` is the reason the 400 gives.
                          ``noop`` lists values that ask for nothing and pass (e.g.
                          modalities ["text"])

The lists come from the OpenAI API (the ``openai`` package's request params; the test
tests/api_proc/test_fields.py walks them, so a field OpenAI adds shows up there first). vLLM's
extensions (top_k, min_p, ...) are protocol.py's and implemented. Refused fields are typed
``Any`` in protocol.py so any value reaches ``check_fields`` (msgspec drops unknown keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from zeroserve.api_proc.errors import bad_request

IMPLEMENTED, ACCEPTED, REFUSED = "implemented", "accepted (no effect)", "refused"
MAX_LOGIT_BIAS = 300  # entries per request, as OpenAI allows
LOGIT_BIAS_RANGE = (-100.0, 100.0)

_API = "tests/api_proc/test_api_requests.py::"
_ENDPOINTS = "tests/api_proc/test_api_endpoints.py::"
_STACK = "tests/api_proc/test_api_full_stack.py::"
_SAMPLER = "tests/gpu_worker/test_sampler.py::"


@dataclass(frozen=True)
class Field:
    status: str
    note: str
    noop: tuple = ()  # refused fields: values that change nothing and are let through


def _implemented(test: str) -> Field:
    return Field(IMPLEMENTED, test)


def _accepted(why: str) -> Field:
    return Field(ACCEPTED, why)


def _refused(why: str, *noop: Any) -> Field:
    return Field(REFUSED, why, noop)


_SHARED: dict[str, Field] = {
    "model": _implemented(_API + "test_model_must_be_the_served_one"),
    "max_tokens": _implemented(_ENDPOINTS + "test_completion_shape_and_usage"),
    "temperature": _implemented(_SAMPLER + "test_temperature_sampling_matches_softmax_over_t"),
    "top_p": _implemented(_SAMPLER + "test_filtered_sampling_renormalizes_over_survivors"),
    "n": _implemented(_ENDPOINTS + "test_n_and_seed_fan_out_ordered_choices"),
    "stream": _implemented(_STACK + "test_completion_stream_equals_whole_greedy"),
    "stream_options": _implemented(_ENDPOINTS + "test_completion_stream_chunks_and_usage"),
    "stop": _implemented(_STACK + "test_stop_string_and_echo"),
    "seed": _implemented(_SAMPLER + "test_seeded_request_reproduces_alone_and_in_any_batch_position"),
    "presence_penalty": _implemented(_SAMPLER + "test_penalties_change_the_greedy_choice_exactly_as_the_op"),
    "frequency_penalty": _implemented(_SAMPLER + "test_penalties_change_the_greedy_choice_exactly_as_the_op"),
    "logit_bias": _implemented("tests/api_proc/test_tgi_stack.py::test_logit_bias_moves_the_greedy_output"),
    "user": _accepted(
        "an end-user id for abuse tracking; zeroserve uses it only to keep a user's requests on one "
        "replica (prefix-cache affinity), which changes where a request runs, not what it returns"
    ),
}

COMPLETIONS: dict[str, Field] = {
    **_SHARED,
    "prompt": _implemented(_API + "test_prompt_forms"),
    "logprobs": _implemented(_STACK + "test_logprobs"),
    "echo": _implemented(_STACK + "test_stop_string_and_echo"),
    # best_of == n (or absent) is what every request does; more needs ranking by sequence logprob
    "best_of": _refused(
        "best_of greater than n (generate more and return the n best by logprob) is not supported; "
        "leave best_of out or set it to n"
    ),
    "suffix": _refused("suffix (insertion: text after the completion) is not supported", ""),
}

CHAT: dict[str, Field] = {
    **_SHARED,
    "messages": _implemented(_API + "test_messages_mapping"),
    "max_completion_tokens": _implemented(_API + "test_chat_specific_fields"),
    "logprobs": _implemented(_ENDPOINTS + "test_chat_logprobs_shape"),
    "top_logprobs": _implemented(_ENDPOINTS + "test_chat_logprobs_shape"),
    "tools": _implemented(
        "tests/engine/test_tools_stack.py::test_required_calls_validate_whole_and_streamed"
    ),
    "tool_choice": _implemented("tests/engine/test_tools_stack.py::test_named_function_streamed"),
    "parallel_tool_calls": _implemented(
        "tests/api_proc/test_tools.py::test_hermes_without_parallel_keeps_the_first_call"
    ),
    "response_format": _implemented(
        "tests/engine/test_structured_stack.py::test_json_schema_corpus_greedy_and_sampled_all_validate"
    ),
    "metadata": _accepted("key-value tags for OpenAI's stored completions; nothing is stored here"),
    "store": _accepted("asks OpenAI to keep the completion for evals; nothing is stored here"),
    "service_tier": _accepted("a billing and latency class; every request here is served alike"),
    "safety_identifier": _accepted("an end-user id for OpenAI's abuse detection"),
    "prompt_cache_key": _accepted("a caching hint; zeroserve's prefix cache is automatic"),
    "prompt_cache_options": _accepted("caching options; zeroserve's prefix cache is automatic"),
    "prompt_cache_retention": _accepted("a cache lifetime; zeroserve's prefix cache is automatic"),
    "audio": _refused("audio output is not supported: this server generates text only"),
    "modalities": _refused(
        'only text output is supported: send modalities ["text"] or leave it out', ["text"]
    ),
    "prediction": _refused(
        "predicted outputs are not supported (no speculative decoding from a given prediction)"
    ),
    "functions": _refused("the deprecated functions field is not supported; send tools instead"),
    "function_call": _refused(
        "the deprecated function_call field is not supported; send tool_choice instead"
    ),
    "web_search_options": _refused("web search is not available on this server"),
    "reasoning_effort": _refused(
        "reasoning_effort is not supported: the served model has no reasoning control"
    ),
    "verbosity": _refused("verbosity is not supported: only the default (medium) is served", "medium"),
    "moderation": _refused("moderation of input and output is not available on this server"),
}

FIELDS: dict[str, dict[str, Field]] = {"completions": COMPLETIONS, "chat": CHAT}

# vLLM's guided-decoding fields from before its structured_outputs (gone since vLLM 0.12), not
# OpenAI's: clients written for older vLLM still send them, and dropping one would answer
# unconstrained text with a 200. Refused on both endpoints, naming what to send instead.
LEGACY_VLLM: dict[str, Field] = {
    f"guided_{kind}": _refused(
        f'guided_{kind} is vLLM\'s old name; send structured_outputs: {{"{kind}": ...}} '
        "(or response_format) instead"
    )
    for kind in ("json", "regex", "choice", "grammar")
} | {
    "guided_decoding_backend": _refused("the structured-output backend is always xgrammar here"),
    "guided_whitespace_pattern": _refused("a whitespace pattern for JSON is not supported"),
}


def check_fields(body: Any, endpoint: str) -> None:
    """400 naming the first refused field the body sets to something other than a no-op value."""
    for name, field in (FIELDS[endpoint] | LEGACY_VLLM).items():
        if field.status != REFUSED:
            continue
        value = getattr(body, name, None)
        if value is None or value in field.noop:
            continue
        if name == "best_of" and value == (body.n or 1):
            continue
        if name == "best_of" and isinstance(value, int) and value < (body.n or 1):
            raise bad_request(f"best_of must be at least n, got {value}.", name)
        raise bad_request(
            f"Unsupported parameter: `{name}`: {field.note}.", name, code="unsupported_parameter"
        )


def parse_logit_bias(value: dict[str, float] | None, param: str = "logit_bias") -> dict[int, float] | None:
    """OpenAI's logit_bias (token-id strings -> bias in [-100, 100], at most 300 entries) as the
    engine's dict[int, float]; None when empty. Whether the ids are in the vocabulary is the
    tokenizer's check."""
    if not value:
        return None
    if len(value) > MAX_LOGIT_BIAS:
        raise bad_request(f"{param} may hold at most {MAX_LOGIT_BIAS} tokens, got {len(value)}.", param)
    lo, hi = LOGIT_BIAS_RANGE
    out: dict[int, float] = {}
    for key, bias in value.items():
        text = key.strip()
        if not (text.isascii() and text.isdigit()) or len(text) > 18:  # a non-negative int64 id
            raise bad_request(f"{param} keys must be token ids (as strings), got `{key[:32]}`.", param)
        if not (math.isfinite(bias) and lo <= bias <= hi):
            raise bad_request(
                f"{param} values must be between {lo:g} and {hi:g}, got {bias} for `{text}`.", param
            )
        out[int(text)] = float(bias)
    return out

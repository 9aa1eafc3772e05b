"""From a decoded request body to the GenerateRequests the engine runs: defaults, range
checks (each failure a 400 naming the field) and the fan-out of n choices and batched prompts.

Choice order, as OpenAI and vLLM number them: prompt p, sample j -> choice p * n + j, engine
request id f"{request_id}-{choice}", where request_id is "cmpl-{X-Request-Id}-{8 hex}" (also the
body's `id`). With a seed, sample j uses seed + j, so the n choices differ while a batch of
prompts gives each prompt what it would get alone.

max_tokens left out means "as many as the context leaves": the API sends max_tokens = 0,
which tokenizer_proc resolves to max_model_len - prompt_len once the prompt is tokenized.

Only the shape of the body is checked here (types, ranges, counts, sizes). What needs the
tokenizer (token ids against the vocabulary) or the context (prompt + max_tokens, min_tokens
against max_tokens) is checked by the engine for every entry point, and its 400 is passed
through unchanged.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

import msgspec

from zeroserve.api_proc.config import ApiConfig
from zeroserve.api_proc.errors import ApiError, bad_request
from zeroserve.api_proc.fields import check_fields, parse_logit_bias
from zeroserve.api_proc.protocol import (
    ChatCompletionRequest,
    ChatMessageIn,
    CompletionRequest,
    SamplingFields,
    TokenizeBody,
)
from zeroserve.api_proc.structured import structured_output
from zeroserve.api_proc.tools import ToolPlan, calls_json, tool_plan
from zeroserve.shared.messages import ChatMessage, GenerateRequest, SamplingParams, TokenizeRequest
from zeroserve.shared.sampling_rules import sampling_error

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
CHAT_ROLES = {"system", "user", "assistant", "tool", "developer"}


@dataclass
class GenerationPlan:
    """One HTTP request's work: the engine requests (choice order) and how to answer."""

    request_id: str
    created: int
    model: str
    chat: bool
    requests: list[GenerateRequest]
    n: int
    num_prompts: int
    stream: bool
    include_usage: bool
    echo: bool = False
    logprobs: int | None = None  # None: no logprobs; N >= 0: N alternatives per token
    prompt_texts: list[str | None] = field(default_factory=list)  # string prompts, for echo
    tools: ToolPlan | None = None  # chat with tools: how the output is read (tools.py)

    def prompt_index(self, choice: int) -> int:
        return choice // self.n


def new_request_id(prefix: str, client_id: str | None = None) -> str:
    """An engine request id. With the request's X-Request-Id (client_id) it quotes it, so every
    log line and message that names the engine request names the client's id too; the random
    tail keeps it unique when two requests send the same X-Request-Id."""
    if client_id is None:
        return f"{prefix}-{uuid.uuid4().hex}"
    return f"{prefix}-{client_id}-{uuid.uuid4().hex[:8]}"


def check_model(model: str | None, config: ApiConfig) -> None:
    if model is not None and model != config.model_name:
        raise ApiError(
            404,
            f"The model `{model[:100]}` does not exist. This server serves `{config.model_name}` (see GET /v1/models).",
            param="model",
            code="model_not_found",
        )


# --------------------------------------------------------------------------- checks


def _stop_strings(stop: str | list[str] | None, config: ApiConfig) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > config.max_stop_strings:
        raise bad_request(
            f"At most {config.max_stop_strings} stop strings are allowed, got {len(stops)}.", "stop"
        )
    for s in stops:
        if not s:
            raise bad_request("Stop strings must not be empty.", "stop")
        if len(s) > config.max_stop_length:
            raise bad_request(
                f"Stop strings may be at most {config.max_stop_length} characters long, got one of {len(s)}.",
                "stop",
            )
    return stops


def check_token_ids(ids: list[int], param: str) -> None:
    """Ids that an engine message can carry (int64); the vocabulary is tokenizer_proc's to check."""
    for t in ids:
        if not INT64_MIN <= t <= INT64_MAX:
            raise bad_request(f"Token id {t} in {param} is outside the vocabulary.", param)


def sampling_params(
    body: SamplingFields,
    config: ApiConfig,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    max_tokens_param: str = "max_tokens",
) -> SamplingParams:
    """Range-checked SamplingParams; max_tokens None means the rest of the context."""
    error = sampling_error(body)  # the ranges every entry point shares (tokenizer_proc checks them too)
    if error is not None:
        raise bad_request(*error)
    if body.top_k is not None and not -1 <= body.top_k <= INT64_MAX:
        raise bad_request(
            f"top_k must be -1 or 0 (disabled) or a positive number, got {body.top_k}.", "top_k"
        )
    # max_tokens against the context and min_tokens against max_tokens are the scheduler's checks
    if max_tokens is not None:
        if max_tokens < 1:
            raise bad_request(f"{max_tokens_param} must be at least 1, got {max_tokens}.", max_tokens_param)
        if max_tokens > INT64_MAX:
            raise bad_request(f"{max_tokens_param} must fit in a signed 64-bit integer.", max_tokens_param)
    if body.min_tokens is not None and not 0 <= body.min_tokens <= INT64_MAX:
        raise bad_request(
            f"min_tokens must be between 0 and max_tokens, got {body.min_tokens}.", "min_tokens"
        )
    if body.seed is not None and not INT64_MIN <= body.seed <= INT64_MAX:
        raise bad_request("seed must fit in a signed 64-bit integer.", "seed")
    stop_ids = list(body.stop_token_ids or [])
    if len(stop_ids) > config.max_stop_token_ids:
        raise bad_request(
            f"At most {config.max_stop_token_ids} stop_token_ids are allowed.", "stop_token_ids"
        )
    check_token_ids(stop_ids, "stop_token_ids")
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else 0,  # 0: the rest of the context
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),
        min_p=body.min_p or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        seed=body.seed,
        min_tokens=body.min_tokens or 0,
        stop_token_ids=stop_ids,
        ignore_eos=bool(body.ignore_eos),
        logprobs=logprobs,
        logit_bias=parse_logit_bias(body.logit_bias),
        structured=structured_output(body),
    )


def _check_common(body: SamplingFields, config: ApiConfig) -> int:
    """Checks every generation body shares; returns n."""
    check_model(body.model, config)
    n = 1 if body.n is None else body.n
    if not 1 <= n <= config.max_n:
        raise bad_request(f"n must be between 1 and {config.max_n}, got {n}.", "n")
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options can only be set when stream is true.", "stream_options")
    if body.priority is not None and not INT64_MIN <= body.priority <= INT64_MAX:
        raise bad_request("priority must fit in a signed 64-bit integer.", "priority")
    if body.deadline_ms is not None and not 0 < body.deadline_ms < math.inf:
        raise bad_request(
            f"deadline_ms must be a positive number of milliseconds, got {body.deadline_ms}.", "deadline_ms"
        )
    return n


def _logprobs_count(value: int | None, param: str, config: ApiConfig) -> int | None:
    if value is not None and not 0 <= value <= config.max_logprobs:
        raise bad_request(f"{param} must be between 0 and {config.max_logprobs}, got {value}.", param)
    return value


def _seeded(params: SamplingParams, j: int) -> SamplingParams:
    if params.seed is None or j == 0:
        return params
    wrapped = (params.seed + j - INT64_MIN) % 2**64 + INT64_MIN  # stay inside int64
    return msgspec.structs.replace(params, seed=wrapped)


def _fan_out(
    request_id: str,
    body: SamplingFields,
    config: ApiConfig,
    params: SamplingParams,
    n: int,
    prompts: list[dict],
    *,
    return_prompt: bool = False,
    session: str | None = None,
) -> list[GenerateRequest]:
    stop = _stop_strings(body.stop, config)
    out = []
    for p, prompt in enumerate(prompts):
        for j in range(n):
            out.append(
                GenerateRequest(
                    request_id=f"{request_id}-{p * n + j}",
                    params=_seeded(params, j),
                    stop=stop,
                    include_stop_str_in_output=bool(body.include_stop_str_in_output),
                    skip_special_tokens=body.skip_special_tokens is not False,
                    priority=body.priority or 0,
                    queue_timeout_s=config.request_timeout_s,
                    deadline_s=None if body.deadline_ms is None else body.deadline_ms / 1000.0,
                    cache_salt=body.cache_salt,
                    return_prompt=return_prompt,
                    session=session or body.user,
                    **prompt,
                )
            )
    return out


# --------------------------------------------------------------------------- completions


def check_fan_out(num_prompts: int, n: int, config: ApiConfig) -> None:
    """One request fans out to prompts x n engine sequences, each tokenized, queued and run on
    its own: cap the product, so one body cannot flood the engine for everyone else."""
    limit = config.max_seqs_per_request
    if num_prompts * n > limit:
        raise bad_request(
            f"This request asks for {num_prompts * n} sequences ({num_prompts} prompt(s) x n={n}); one "
            f"request may ask for at most {limit} (--max-seqs-per-request). Send fewer prompts or a smaller n.",
            "n" if n > 1 else "prompt",
        )


def completion_prompts(prompt: str | list, config: ApiConfig, n: int = 1) -> list[dict]:
    """The prompt field as GenerateRequest keyword sets: one per prompt of the batch."""
    if isinstance(prompt, str):
        check_fan_out(1, n, config)
        return [{"prompt": prompt}]
    if not prompt:
        raise bad_request("prompt must not be empty.", "prompt")
    kinds = {type(x) for x in prompt}
    if kinds == {int}:
        check_fan_out(1, n, config)
        check_token_ids(prompt, "prompt")
        return [{"prompt_token_ids": list(prompt)}]
    if len(kinds) != 1:
        raise bad_request(
            "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists, "
            "not a mix.",
            "prompt",
        )
    check_fan_out(len(prompt), n, config)
    if kinds == {str}:
        return [{"prompt": p} for p in prompt]
    for ids in prompt:
        if not ids:
            raise bad_request("A token-id prompt must not be empty.", "prompt")
        check_token_ids(ids, "prompt")
    return [{"prompt_token_ids": list(ids)} for ids in prompt]


def completion_plan(
    body: CompletionRequest, config: ApiConfig, session: str | None = None, client_id: str | None = None
) -> GenerationPlan:
    """session: the X-Session-Id header (else the body's `user`) keeps requests on one replica;
    client_id: the request's X-Request-Id, quoted in the engine request ids."""
    check_fields(body, "completions")
    n = _check_common(body, config)
    logprobs = _logprobs_count(body.logprobs, "logprobs", config)
    if body.echo and logprobs is not None:
        raise bad_request(
            "echo together with logprobs is not supported: the engine returns no prompt logprobs. "
            "Drop one of the two.",
            "echo",
        )
    max_tokens = body.max_tokens if body.max_tokens is not None else config.default_completion_max_tokens
    params = sampling_params(body, config, max_tokens=max_tokens, logprobs=logprobs)
    prompts = completion_prompts(body.prompt, config, n)
    request_id = new_request_id("cmpl", client_id)
    return GenerationPlan(
        request_id=request_id,
        created=int(time.time()),
        model=config.model_name,
        chat=False,
        requests=_fan_out(
            request_id, body, config, params, n, prompts, return_prompt=bool(body.echo), session=session
        ),
        n=n,
        num_prompts=len(prompts),
        stream=bool(body.stream),
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        echo=bool(body.echo),
        logprobs=logprobs,
        prompt_texts=[p.get("prompt") for p in prompts],
    )


# --------------------------------------------------------------------------- chat


def chat_messages(messages: list[ChatMessageIn], config: ApiConfig) -> list[ChatMessage]:
    """Messages for the chat template; text parts are joined with newlines as vLLM does.
    "developer" (OpenAI's newer name for system instructions) is rendered as "system"."""
    if not messages:
        raise bad_request("messages must hold at least one message.", "messages")
    if len(messages) > config.max_messages:
        raise bad_request(
            f"At most {config.max_messages} messages are allowed, got {len(messages)}.", "messages"
        )
    out = []
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise bad_request(
                f"Unknown role `{m.role[:64]}` in messages[{i}]; use one of {', '.join(sorted(CHAT_ROLES))}.",
                f"messages[{i}].role",
            )
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"Content parts of type `{part.type[:64]}` are not supported: this model takes text "
                        'parts ({"type": "text", "text": ...}) only.',
                        f"messages[{i}].content",
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        if content is None and m.role != "assistant":
            raise bad_request(f"messages[{i}] ({m.role}) has no content.", f"messages[{i}].content")
        role = "system" if m.role == "developer" else m.role
        out.append(
            ChatMessage(
                role=role,
                content=content,
                name=m.name,
                tool_call_id=m.tool_call_id,
                tool_calls=calls_json(m.tool_calls, f"messages[{i}].tool_calls"),
            )
        )
    return out


def chat_plan(
    body: ChatCompletionRequest, config: ApiConfig, session: str | None = None, client_id: str | None = None
) -> GenerationPlan:
    check_fields(body, "chat")
    n = _check_common(body, config)
    top = _logprobs_count(body.top_logprobs, "top_logprobs", config)
    if top is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true.", "top_logprobs")
    logprobs = (top or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    params = sampling_params(body, config, max_tokens=max_tokens, logprobs=logprobs, max_tokens_param=param)
    tools = tool_plan(body, config.tool_call_parser)
    constraint = None if tools is None else tools.structured()  # required / a named function
    if constraint is not None:
        params = msgspec.structs.replace(params, structured=constraint)
    check_fan_out(1, n, config)
    messages = chat_messages(body.messages, config)
    request_id = new_request_id("chatcmpl", client_id)
    prompt = {"messages": messages, "add_generation_prompt": body.add_generation_prompt is not False}
    if tools is not None:
        prompt["tools"] = tools.tools_json
    return GenerationPlan(
        request_id=request_id,
        created=int(time.time()),
        model=config.model_name,
        chat=True,
        requests=_fan_out(request_id, body, config, params, n, [prompt], session=session),
        n=n,
        num_prompts=1,
        stream=bool(body.stream),
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        logprobs=logprobs,
        prompt_texts=[None],
        tools=tools,
    )


# --------------------------------------------------------------------------- tokenize


def tokenize_request(body: TokenizeBody, config: ApiConfig, client_id: str | None = None) -> TokenizeRequest:
    """vLLM's /tokenize: a prompt (special tokens added by default) or chat messages
    (the template adds them, so add_special_tokens defaults to false)."""
    check_model(body.model, config)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("Send exactly one of prompt or messages.", "prompt")
    request_id = new_request_id("tok", client_id)
    if body.prompt is not None:
        return TokenizeRequest(
            request_id=request_id, prompt=body.prompt, add_special_tokens=body.add_special_tokens is not False
        )
    return TokenizeRequest(
        request_id=request_id,
        messages=chat_messages(body.messages or [], config),
        add_special_tokens=bool(body.add_special_tokens),
        add_generation_prompt=body.add_generation_prompt is not False,
    )

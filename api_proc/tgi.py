"""Hugging Face Text Generation Inference's API, over the same engine plumbing as /v1.

    POST /generate          {"inputs", "parameters"} -> {"generated_text", "details"?}
    POST /generate_stream   SSE: one event per token, the last with generated_text and details
    POST /                  /generate (answered as a one-element list) or /generate_stream, by `stream`
    GET  /info              the model and its limits, in TGI's field names

A TGI body is mapped onto a CompletionRequest and planned by requests.completion_plan (so the
ranges, the fan-out and the engine's own checks are the /v1 ones), then run with
generate.EngineStreams. TGI's own rules (strictly positive temperature, top_k, ...) are
checked first, so their messages name TGI's parameters. Errors leave in TGI's shape,
``{"error": "...", "error_type": "validation" | "overloaded" | "generation"}``: 422 for a
bad request, 429 when overloaded. What TGI offers that zeroserve cannot honour is refused by
name (422): typical_p, watermark, best_of > 1, decoder_input_details (no prompt logprobs are
computed), adapter_id. Field table and docs: docs/tgi.md.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from importlib import metadata
from typing import Any

import msgspec
from aiohttp import web

from zeroserve.api_proc import responses
from zeroserve.api_proc.errors import ApiError, from_error_info
from zeroserve.api_proc.generate import ChoiceState, EngineStreams
from zeroserve.api_proc.model_router import VERSIONS, route, route_one
from zeroserve.api_proc.protocol import CompletionRequest, StructuredOutputsIn
from zeroserve.api_proc.request_log import RequestContext, context_of, note_error
from zeroserve.api_proc.requests import GenerationPlan, completion_plan, new_request_id
from zeroserve.api_proc.serving import (
    SESSION_HEADER,
    SSE_HEADERS,
    STATE,
    ApiState,
    fill_context,
    new_choices,
    read_body,
)
from zeroserve.shared.messages import TextDelta, TokenizeRequest

INT64_MAX = 2**63 - 1


class Grammar(msgspec.Struct, kw_only=True):
    type: str  # "json" (value: a JSON schema, object or text) | "regex" (value: the pattern)
    value: Any = None


class Parameters(msgspec.Struct, kw_only=True):
    max_new_tokens: int | None = None  # None: the rest of the context (TGI 2+)
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    return_full_text: bool | None = None
    details: bool | None = None
    decoder_input_details: bool | None = None
    best_of: int | None = None
    watermark: bool | None = None
    truncate: int | None = None
    top_n_tokens: int | None = None
    grammar: Grammar | None = None
    adapter_id: str | None = None


class GenerateBody(msgspec.Struct, kw_only=True):
    inputs: str
    parameters: Parameters | None = None
    stream: bool | None = None  # POST / only


# --------------------------------------------------------------------------- errors


class TgiError(Exception):
    def __init__(self, status: int, message: str, error_type: str):
        super().__init__(message)
        self.status, self.message, self.error_type = status, message, error_type

    def body(self) -> dict:
        return {"error": self.message, "error_type": self.error_type}


def _invalid(message: str) -> TgiError:
    return TgiError(422, message, "validation")


def from_api_error(err: ApiError) -> TgiError:
    """An OpenAI-shaped verdict (ours or the engine's) in TGI's terms."""
    if err.status == 429:
        return TgiError(429, err.message, "overloaded")
    if err.status in (401, 403):  # no TGI type fits: clients fall back to the status and keep the message
        return TgiError(err.status, err.message, "authentication")
    if err.status in (400, 404, 422):
        return TgiError(422, err.message, "validation")
    if err.status == 413:
        return TgiError(413, err.message, "validation")
    return TgiError(err.status, err.message, "generation")


def _error_response(err: TgiError, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=err.status, body=responses.encode(err.body()), content_type="application/json", headers=headers
    )


TGI_PATHS = frozenset({"/generate", "/generate_stream", "/", "/info"})


def error_response_for(request: web.Request, err: ApiError) -> web.Response | None:
    """A failure raised before a TGI handler ran (a missing key, a tenant's limit, a wrong
    method) in TGI's shape on TGI's paths, so its clients raise their typed errors; else None."""
    if request.path not in TGI_PATHS:
        return None
    return _error_response(from_api_error(err), err.headers)


# --------------------------------------------------------------------------- planning


class TgiPlan(msgspec.Struct, kw_only=True):
    """How to answer: what the client asked for beyond the engine requests."""

    inputs: str
    details: bool
    full_text: bool
    top_n: int
    seed: int | None
    stop: list[str]


def _check(p: Parameters) -> None:
    """TGI's validation rules, named as TGI names them (text_generation's own checks agree)."""
    if p.max_new_tokens is not None and p.max_new_tokens < 1:
        raise _invalid("`max_new_tokens` must be strictly positive")
    if p.temperature is not None and not p.temperature > 0:
        raise _invalid("`temperature` must be strictly positive")
    if p.top_k is not None and p.top_k <= 0:
        raise _invalid("`top_k` must be strictly positive")
    if p.top_p is not None and not 0 < p.top_p <= 1:
        raise _invalid("`top_p` must be > 0.0 and <= 1.0")
    if p.repetition_penalty is not None and not p.repetition_penalty > 0:
        raise _invalid("`repetition_penalty` must be strictly positive")
    if p.seed is not None and not 0 <= p.seed <= INT64_MAX:
        raise _invalid("`seed` must be between 0 and 2^63 - 1")
    if p.truncate is not None and p.truncate <= 0:
        raise _invalid("`truncate` must be strictly positive")
    if p.top_n_tokens is not None and p.top_n_tokens <= 0:
        raise _invalid("`top_n_tokens` must be strictly positive")
    # what TGI offers and zeroserve does not do: refused by name rather than ignored
    if p.typical_p is not None and p.typical_p != 1.0:
        raise _invalid("`typical_p` is not supported by this server (no typical sampling); leave it out")
    if p.watermark:
        raise _invalid("`watermark` is not supported by this server; leave it out or set it to false")
    if p.best_of is not None and p.best_of != 1:
        raise _invalid("`best_of` > 1 is not supported by this server; leave it out or set it to 1")
    if p.decoder_input_details:
        raise _invalid(
            "`decoder_input_details` is not supported: this server computes no prompt logprobs; "
            "set it to false"
        )
    if p.adapter_id is not None:
        raise _invalid("`adapter_id` is not supported: this server serves no LoRA adapters")
    if p.grammar is not None:
        if p.grammar.type not in ("json", "regex"):
            raise _invalid(f"grammar type `{p.grammar.type[:32]}` is not supported; use json or regex")
        if not p.grammar.value:
            raise _invalid(f"`value` cannot be empty for `{p.grammar.type}` grammar")
        if p.grammar.type == "regex" and not isinstance(p.grammar.value, str):
            raise _invalid("the value of a regex grammar must be a string")


def _structured(grammar: Grammar | None) -> StructuredOutputsIn | None:
    if grammar is None:
        return None
    if grammar.type == "regex":
        return StructuredOutputsIn(regex=grammar.value)
    value = grammar.value
    if isinstance(value, str):  # TGI takes the schema as an object or as its JSON text
        try:
            value = json.loads(value)
        except ValueError:
            raise _invalid(
                "the value of a json grammar must be a JSON schema (an object, or its JSON text)"
            ) from None
    return StructuredOutputsIn(json=value)


def tgi_plan(
    body: GenerateBody,
    state: ApiState,
    stream: bool,
    prompt_ids: list[int] | None = None,
    session: str | None = None,
    client_id: str | None = None,
) -> tuple[GenerationPlan, TgiPlan]:
    """The engine request for a TGI body (sampling as TGI decides it: greedy unless do_sample or a
    sampling parameter is set) and how to answer. Raises TgiError."""
    p = body.parameters or Parameters()
    if p.top_n_tokens is not None and p.top_n_tokens > state.config.max_logprobs:
        raise _invalid(f"`top_n_tokens` must be at most {state.config.max_logprobs}")
    sampling = (
        bool(p.do_sample) or p.temperature not in (None, 1.0) or bool(p.top_k) or p.top_p not in (None, 1.0)
    )
    seed = p.seed
    if sampling and seed is None:  # as TGI: a sampled answer reports the seed that reproduces it
        seed = random.getrandbits(63)
    wants_tokens = stream or bool(p.details)
    completion = CompletionRequest(
        prompt=prompt_ids if prompt_ids is not None else body.inputs,
        max_tokens=p.max_new_tokens,
        temperature=(1.0 if p.temperature is None else p.temperature) if sampling else 0.0,
        top_k=p.top_k,
        top_p=p.top_p,
        repetition_penalty=p.repetition_penalty,
        frequency_penalty=p.frequency_penalty,
        stop=p.stop,
        seed=seed,
        # per-token texts and logprobs for the token events and details; top_n_tokens alternatives
        logprobs=(p.top_n_tokens or 0) if wants_tokens else None,
        include_stop_str_in_output=True,  # TGI's generated_text keeps the stop sequence
        structured_outputs=_structured(p.grammar),
    )
    try:
        plan = completion_plan(completion, state.config, session, client_id)
    except ApiError as e:
        raise from_api_error(e) from None
    plan.stream = stream
    how = TgiPlan(
        inputs=body.inputs,
        details=bool(p.details),
        full_text=bool(p.return_full_text),
        top_n=p.top_n_tokens or 0,
        seed=seed if sampling else None,
        stop=list(p.stop or []),
    )
    return plan, how


async def _truncated_ids(
    state: ApiState, client, body: GenerateBody, client_id: str | None
) -> list[int] | None:
    """TGI's truncate: the prompt's last N tokens (one tokenize round trip, only when asked)."""
    truncate = body.parameters.truncate if body.parameters is not None else None
    if truncate is None:
        return None
    req = TokenizeRequest(
        request_id=new_request_id("tok", client_id), prompt=body.inputs, add_special_tokens=True
    )
    try:
        res = await asyncio.wait_for(client.tokenize(req), state.config.engine_stall_timeout_s)
    except Exception:  # a timeout or transport trouble; the client's own cancellation passes
        raise TgiError(503, "The engine is unavailable; retry shortly.", "generation") from None
    if res.error is not None:
        raise from_api_error(from_error_info(res.error, state.config.retry_after_s))
    return res.token_ids[-truncate:]


# --------------------------------------------------------------------------- answers


def _lp(value: float) -> float:
    """JSON has no -inf: clamped as the /v1 logprobs are."""
    return -9999.0 if math.isnan(value) else max(value, -9999.0)


def _finish_reason(choice: ChoiceState, how: TgiPlan) -> str:
    if choice.finish_reason == "stop":
        return (
            "stop_sequence"
            if isinstance(choice.stop_reason, str) and choice.stop_reason in how.stop
            else "eos_token"
        )
    return "length"  # max_new_tokens, the context, or a deadline: stopped by a limit


class _Tokens:
    """The tokens of one answer as TGI lists them, built from the engine's deltas."""

    def __init__(self) -> None:
        self.tokens: list[dict] = []
        self.top: list[list[dict]] = []

    def add(self, delta: TextDelta) -> list[tuple[dict, list[dict]]]:
        new = []
        logprobs = delta.logprobs or []
        for k, token_id in enumerate(delta.token_ids):
            lp = logprobs[k] if k < len(logprobs) else None
            text = delta.token_texts[k] if k < len(delta.token_texts) else ""
            token = {
                "id": token_id,
                "text": text,
                "logprob": None if lp is None else _lp(lp.logprob),
                "special": False,
            }
            alternatives = []
            if lp is not None and delta.top_token_texts is not None and k < len(delta.top_token_texts):
                for alt, alt_text in zip(lp.top, delta.top_token_texts[k]):
                    alternatives.append(
                        {"id": alt.token_id, "text": alt_text, "logprob": _lp(alt.logprob), "special": False}
                    )
            self.tokens.append(token)
            self.top.append(alternatives)
            new.append((token, alternatives))
        return new

    def mark_eos(self, finish_reason: str) -> None:
        if finish_reason == "eos_token" and self.tokens:
            self.tokens[-1]["special"] = True


def _details(choice: ChoiceState, how: TgiPlan, tokens: _Tokens) -> dict:
    finish = _finish_reason(choice, how)
    tokens.mark_eos(finish)
    out: dict[str, Any] = {
        "finish_reason": finish,
        "generated_tokens": choice.completion_tokens,
        "seed": how.seed,
        "prefill": [],
        "tokens": tokens.tokens,
    }
    if how.top_n:
        out["top_tokens"] = tokens.top
    return out


def _generated_text(choice: ChoiceState, how: TgiPlan) -> str:
    text = "".join(choice.text)
    return how.inputs + text if how.full_text else text


async def _whole(state: ApiState, plan: GenerationPlan, how: TgiPlan, choice: ChoiceState, streams) -> dict:
    tokens = _Tokens()
    async for _, delta in streams:
        if delta.error is not None:
            raise from_api_error(from_error_info(delta.error, state.config.retry_after_s))
        if how.details:
            tokens.add(delta)
        choice.apply(delta, time.monotonic())
    out: dict[str, Any] = {"generated_text": _generated_text(choice, how)}
    if how.details:
        out["details"] = _details(choice, how, tokens)
    return out


def _event(obj: dict) -> bytes:
    return b"data:" + responses.encode(obj) + b"\n\n"


async def _stream(
    request: web.Request,
    state: ApiState,
    how: TgiPlan,
    choice: ChoiceState,
    streams,
    ctx: RequestContext | None,
) -> web.StreamResponse:
    # the first delta before the headers: the engine's admission verdict is then a real status
    held = []
    async for _, delta in streams:
        if delta.error is not None:
            raise from_api_error(from_error_info(delta.error, state.config.retry_after_s))
        held.append(delta)
        break
    response = web.StreamResponse(status=200, headers=SSE_HEADERS)
    tokens = _Tokens()
    index = 0

    async def send(delta: TextDelta) -> None:
        nonlocal index
        new = tokens.add(delta)
        choice.apply(delta, time.monotonic())
        if delta.finish_reason is not None and not new and tokens.tokens:
            # an end that came without a token of its own: TGI's last event still needs one
            last = {"id": tokens.tokens[-1]["id"], "text": "", "logprob": None, "special": True}
            new = [(last, [])]
        for k, (token, alternatives) in enumerate(new):
            index += 1
            event: dict[str, Any] = {"index": index, "token": token, "generated_text": None, "details": None}
            if how.top_n:
                event["top_tokens"] = alternatives
            if delta.finish_reason is not None and k == len(new) - 1:
                finish = _finish_reason(choice, how)
                tokens.mark_eos(finish)
                event["generated_text"] = _generated_text(choice, how)
                event["details"] = {
                    "finish_reason": finish,
                    "generated_tokens": choice.completion_tokens,
                    "seed": how.seed,
                    "input_length": choice.num_prompt_tokens,
                }
            await response.write(_event(event))

    try:
        await response.prepare(request)
        for delta in held:
            await send(delta)
        async for _, delta in streams:
            if delta.error is not None:
                err = from_error_info(delta.error, state.config.retry_after_s)
                if ctx is not None:
                    ctx.note_error(err)
                choice.finish_reason = choice.finish_reason or "error"
                await response.write(_event(from_api_error(err).body()))
                break
            await send(delta)
        await response.write_eof()
    except ConnectionResetError:  # the client left; leaving EngineStreams aborts what still runs
        if ctx is not None:
            ctx.error_type = ctx.error_type or "client_disconnected"
        choice.finish_reason = choice.finish_reason or "abort"
    return response


async def _run(request: web.Request, stream: bool | None, as_list: bool = False) -> web.StreamResponse:
    state: ApiState = request.app[STATE]
    ctx = context_of(request)
    body = await read_body(request, GenerateBody, state.config)
    stream = bool(body.stream) if stream is None else stream
    if not body.inputs:
        raise _invalid("`inputs` cannot be empty")
    params = body.parameters or Parameters()
    _check(params)
    client_id = ctx.request_id if ctx is not None else None
    if ctx is not None:
        ctx.stream = stream
    # TGI names no model: the default model, by its versions' traffic weights (X-Model-Version says
    # which served it); its lease keeps the version's engine up until the request ends (drains)
    session = request.headers.get(SESSION_HEADER)
    targets = await route(request, None, user=session, prompt=body.inputs, max_tokens=params.max_new_tokens)

    async def call(target) -> web.StreamResponse:
        prompt_ids = await _truncated_ids(state, target.client, body, client_id)
        plan, how = tgi_plan(body, state, stream, prompt_ids, session, client_id)
        plan.model = target.name
        if ctx is not None and ctx.trace is not None:
            plan.requests = ctx.trace.continue_in(plan)
        choices = new_choices(plan, target.metrics)
        config = state.config
        ended = None
        try:
            async with EngineStreams(
                target.client, plan.requests, config.request_timeout_s, config.engine_stall_timeout_s
            ) as streams:
                if stream:
                    return await _stream(request, state, how, choices[0], streams, ctx)
                out = await _whole(state, plan, how, choices[0], streams)
                return web.Response(
                    body=responses.encode([out] if as_list else out), content_type="application/json"
                )
        except asyncio.CancelledError:
            ended = "abort"
            raise
        except TgiError:
            ended = "error"
            raise
        finally:
            if ctx is not None:
                fill_context(ctx, plan, choices, state.wants_text, ended)

    return await request.app[VERSIONS].run_targets(targets, ctx, call)


def _tgi_errors(handler):
    """Every failure of a TGI route in TGI's error shape (the clients parse error_type)."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as e:
            note_error(request, e)
            return _error_response(from_api_error(e))
        except TgiError as e:
            note_error(request, ApiError(e.status, e.message))
            return _error_response(e)

    return wrapped


@_tgi_errors
async def generate(request: web.Request) -> web.StreamResponse:
    return await _run(request, stream=False)


@_tgi_errors
async def generate_stream(request: web.Request) -> web.StreamResponse:
    return await _run(request, stream=True)


@_tgi_errors
async def compat_generate(request: web.Request) -> web.StreamResponse:
    """TGI's POST /: the body's `stream` picks; a whole answer comes as a one-element list."""
    return await _run(request, stream=None, as_list=True)


def _version() -> str:
    try:
        return metadata.version("zeroserve")
    except metadata.PackageNotFoundError:
        return "unknown"


@_tgi_errors
async def info(request: web.Request) -> web.Response:
    state: ApiState = request.app[STATE]
    target = await route_one(request, None, context_of(request))  # TGI serves one model: the default
    engine = await target.monitor.require_engine()
    config = state.config
    body = {
        "model_id": target.name,
        "model_sha": None,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": None,
        "max_best_of": 1,
        "max_stop_sequences": config.max_stop_strings,
        "max_input_tokens": max(engine.max_model_len - 1, 0),
        "max_input_length": max(engine.max_model_len - 1, 0),  # TGI 1.x's name for the same
        "max_total_tokens": engine.max_model_len,
        "max_client_batch_size": 1,
        "validation_workers": 1,
        "router": "zeroserve",
        "version": _version(),
        "sha": None,
        "docker_label": None,
    }
    return web.Response(body=responses.encode(body), content_type="application/json")


def add_tgi_routes(app: web.Application) -> None:
    app.router.add_post("/generate", generate)
    app.router.add_post("/generate_stream", generate_stream)
    app.router.add_post("/", compat_generate)
    app.router.add_get("/info", info)

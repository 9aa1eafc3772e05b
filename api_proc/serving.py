"""The generation endpoints: POST /v1/completions and /v1/chat/completions.

A request is decoded (400 on any wrong type), planned (requests.py: defaults, ranges,
fan-out of n and batched prompts), run (generate.EngineStreams) and answered whole or as SSE.

Streaming holds back the response headers until every choice has heard from the engine:
the engine's verdicts on admission (400 prompt too long, 429 over the admission limits) then
become real HTTP statuses instead of an error inside a 200 stream. After the headers, an
engine failure is an error event followed by ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from zeroserve.api_proc import responses, tools
from zeroserve.api_proc.config import ApiConfig
from zeroserve.api_proc.engine_state import EngineMonitor
from zeroserve.api_proc.errors import ApiError, bad_request, from_decode_error, from_error_info
from zeroserve.api_proc.generate import ChoiceState, EngineStreams, LogprobEntry, logprob_entries
from zeroserve.api_proc.metrics import ApiMetrics, ParentRequest
from zeroserve.api_proc.model_router import VERSIONS, route, unrouted
from zeroserve.api_proc.protocol import ChatCompletionRequest, CompletionRequest
from zeroserve.api_proc.request_log import RequestContext, RequestRecord, context_of
from zeroserve.api_proc.requests import GenerationPlan, chat_plan, completion_plan
from zeroserve.shared.messages import TextDelta

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies must not buffer the stream
}
SESSION_HEADER = "X-Session-Id"  # routes a session's requests to one replica (as the body's `user` does)
_decoders: dict[type, msgspec.json.Decoder] = {}


@dataclass
class ApiState:
    """What the handlers share in one api process."""

    config: ApiConfig
    client: Any  # EngineClient or a test double with the same methods
    monitor: EngineMonitor
    metrics: ApiMetrics
    started: int
    # called once with each request's record at its end (request_log.py); each must only enqueue
    request_sinks: list[Callable[[RequestRecord], None]] = field(default_factory=list)
    # whether handlers copy prompt and output text into the request's context (--log-prompts, audit)
    wants_text: bool = False


STATE = web.AppKey("zeroserve_api_state", ApiState)


async def read_body(request: web.Request, kind: type, config: ApiConfig) -> Any:
    """The body decoded into a Struct: 413 over the size limit, 400 for bad JSON or types."""
    if request.content_length is not None and request.content_length > config.max_body_bytes:
        raise ApiError(
            413,
            f"The request body is {request.content_length} bytes; the limit is "
            f"{config.max_body_bytes}. Send a smaller request.",
        )
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(
            413,
            f"The request body is over the limit of {config.max_body_bytes} bytes. Send a smaller request.",
        ) from None
    return decode_body(raw, kind)


def decode_body(raw: bytes, kind: type) -> Any:
    """``raw`` decoded into the Struct ``kind``; ApiError 400 for bad JSON, types or nesting."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(raw)
    except msgspec.DecodeError as e:
        raise from_decode_error(e) from None
    except RecursionError:  # msgspec's answer to arrays/objects nested thousands deep
        raise bad_request(
            "The request body is nested too deeply (arrays or objects inside each other thousands of "
            "levels down). Send a JSON object with the documented fields."
        ) from None


def _begin(ctx: RequestContext | None, body: Any, config: ApiConfig) -> str | None:
    """What the body says about the request, into its context; returns its X-Request-Id."""
    if ctx is None:
        return None
    ctx.model = body.model or config.model_name
    ctx.stream = bool(body.stream)
    return ctx.request_id


async def completions(request: web.Request) -> web.StreamResponse:
    state: ApiState = request.app[STATE]
    ctx = context_of(request)
    body = await read_body(request, CompletionRequest, state.config)
    client_id = _begin(ctx, body, state.config)
    targets = await route(request, body.model, user=body.user, prompt=body.prompt, max_tokens=body.max_tokens)
    plan = completion_plan(unrouted(body), state.config, request.headers.get(SESSION_HEADER), client_id)
    return await run_routed(request, state, plan, ctx, targets)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state: ApiState = request.app[STATE]
    ctx = context_of(request)
    body = await read_body(request, ChatCompletionRequest, state.config)
    client_id = _begin(ctx, body, state.config)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    targets = await route(request, body.model, user=body.user, messages=body.messages, max_tokens=max_tokens)
    plan = chat_plan(unrouted(body), state.config, request.headers.get(SESSION_HEADER), client_id)
    return await run_routed(request, state, plan, ctx, targets)


async def run_routed(
    request: web.Request, state: ApiState, plan: GenerationPlan, ctx: RequestContext | None, targets: list
) -> web.StreamResponse:
    """``run_plan`` on the routed version (model_router.route), the next on 429/503 for a virtual model."""

    async def call(target: Any) -> web.StreamResponse:
        plan.model = target.name
        return await run_plan(request, state, plan, ctx, target)

    return await request.app[VERSIONS].run_targets(targets, ctx, call)


async def run_plan(
    request: web.Request,
    state: ApiState,
    plan: GenerationPlan,
    ctx: RequestContext | None = None,
    target: Any = None,
) -> web.StreamResponse:
    """target: the version that runs it (versions.Target: its client and metrics), else state's."""
    if ctx is not None and ctx.trace is not None:  # the engine's spans continue the api span's trace
        plan.requests = ctx.trace.continue_in(plan)
    choices = new_choices(plan, state.metrics if target is None else target.metrics)
    config = state.config
    ended = None
    try:
        async with EngineStreams(
            state.client if target is None else target.client,
            plan.requests,
            config.request_timeout_s,
            config.engine_stall_timeout_s,
        ) as streams:
            if plan.stream:
                return await _stream(request, state, plan, choices, streams, ctx)
            return await _whole(state, plan, choices, streams)
    except asyncio.CancelledError:
        ended = "abort"  # the client left
        raise
    except ApiError:
        ended = "error"
        raise
    finally:
        if ctx is not None:
            fill_context(ctx, plan, choices, state.wants_text, ended)


def fill_context(
    ctx: RequestContext, plan: GenerationPlan, choices: list[ChoiceState], wants_text: bool, ended: str | None
) -> None:
    """The request's outcome, summed over its choices, into its context (for its record)."""
    ctx.model = plan.model
    ctx.prompt_tokens = sum(c.num_prompt_tokens for c in choices if c.counts_prompt)
    ctx.cached_tokens = sum(c.num_cached_tokens for c in choices if c.counts_prompt)
    ctx.completion_tokens = sum(c.completion_tokens for c in choices)
    first = choices[0] if choices else None
    ctx.finish_reason = first.finish_reason if first is not None and first.finish_reason else ended
    firsts = [c.first_token_at for c in choices if c.first_token_at is not None]
    if firsts:
        ctx.ttft_s = min(firsts) - ctx.started_mono
    ctx.replica = next((c.replica for c in choices if c.replica is not None), None)
    if wants_text:
        ctx.prompt_text = prompt_text(plan)
        texts = ["".join(c.text) for c in choices]
        ctx.output_text = texts[0] if len(texts) == 1 else responses.encode(texts).decode()


def prompt_text(plan: GenerationPlan) -> str:
    """The prompt(s) as the client sent them: a string, else JSON (chat messages, token ids, a batch)."""
    prompts: list[Any] = []
    for r in plan.requests[:: plan.n]:
        if r.prompt is not None:
            prompts.append(r.prompt)
        elif r.messages is not None:
            prompts.append([{"role": m.role, "content": m.content} for m in r.messages])
        else:
            prompts.append(r.prompt_token_ids)
    if len(prompts) == 1 and isinstance(prompts[0], str):
        return prompts[0]
    return responses.encode(prompts[0] if len(prompts) == 1 else prompts).decode()


def _entries(plan: GenerationPlan, choice: ChoiceState, delta: TextDelta) -> list[LogprobEntry] | None:
    if plan.logprobs is None:
        return None
    return logprob_entries(delta, choice.offset)


async def collect_body(
    plan: GenerationPlan,
    choices: list[ChoiceState],
    streams: EngineStreams,
    retry_after_s: int,
) -> dict:
    """Run every choice to its end and build the whole (non-streaming) response body."""
    async for i, delta in streams:
        if delta.error is not None:
            raise from_error_info(delta.error, retry_after_s)
        entries = _entries(plan, choices[i], delta)
        choices[i].apply(delta, time.monotonic())
        if entries:
            choices[i].logprobs.extend(entries)
    return responses.chat_body(plan, choices) if plan.chat else responses.completion_body(plan, choices)


def new_choices(plan: GenerationPlan, metrics: ApiMetrics | None) -> list[ChoiceState]:
    arrival = time.monotonic()
    parents = [ParentRequest(plan.n, r.params.max_tokens) for r in plan.requests[:: plan.n]]
    return [
        ChoiceState(
            i,
            arrival,
            metrics,
            counts_prompt=(i % plan.n == 0),
            echo=plan.echo,
            echo_text=plan.prompt_texts[plan.prompt_index(i)] if plan.echo else None,
            parent=parents[plan.prompt_index(i)],
        )
        for i in range(len(plan.requests))
    ]


async def complete_body(
    client: Any,
    config: ApiConfig,
    url: str,
    body: bytes,
    ctx: RequestContext | None = None,
    wants_text: bool = False,
) -> dict:
    """A non-streaming POST body for ``url`` (/v1/completions or /v1/chat/completions) run to
    its response body, exactly as the HTTP endpoint answers it (batch jobs use this, through
    request_log.run_recorded, which passes the request's context to fill).
    Raises ApiError with the status and message the endpoint would return."""
    if url == "/v1/embeddings":  # (embeddings.py imports this module: imported at the call)
        from zeroserve.api_proc.embeddings import embed_body

        return await embed_body(client, config, body, ctx)
    kind = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}.get(url)
    if kind is None:
        raise ApiError(
            400, f"url {url!r} is not supported; use /v1/completions, /v1/chat/completions or /v1/embeddings"
        )
    parsed = decode_body(body, kind)
    client_id = _begin(ctx, parsed, config)
    plan = (
        chat_plan(parsed, config, client_id=client_id)
        if kind is ChatCompletionRequest
        else completion_plan(parsed, config, client_id=client_id)
    )
    if plan.stream:
        raise ApiError(400, "stream is not supported here", param="stream")
    choices = new_choices(plan, None)
    ended = None
    try:
        async with EngineStreams(
            client, plan.requests, config.request_timeout_s, config.engine_stall_timeout_s
        ) as streams:
            return await collect_body(plan, choices, streams, config.retry_after_s)
    except ApiError:
        ended = "error"
        raise
    finally:
        if ctx is not None:
            fill_context(ctx, plan, choices, wants_text, ended)


async def _whole(
    state: ApiState, plan: GenerationPlan, choices: list[ChoiceState], streams: EngineStreams
) -> web.Response:
    body = await collect_body(plan, choices, streams, state.config.retry_after_s)
    return web.Response(body=responses.encode(body), content_type="application/json")


async def _stream(
    request: web.Request,
    state: ApiState,
    plan: GenerationPlan,
    choices: list[ChoiceState],
    streams: EngineStreams,
    ctx: RequestContext | None = None,
) -> web.StreamResponse:
    held: list[tuple[int, TextDelta]] = []
    heard: set[int] = set()
    async for i, delta in streams:
        if delta.error is not None:
            raise from_error_info(delta.error, state.config.retry_after_s)  # nothing sent yet: a status
        held.append((i, delta))
        heard.add(i)
        if len(heard) == len(choices):
            break

    response = web.StreamResponse(status=200, headers=SSE_HEADERS)
    try:
        await response.prepare(request)
        if plan.chat:
            for c in choices:
                await response.write(responses.sse(responses.chat_role_chunk(plan, c.index)))
        for i, delta in held:
            await _send_delta(response, state, plan, choices[i], delta)
        failed = False
        async for i, delta in streams:
            if delta.error is not None:
                err = from_error_info(delta.error, state.config.retry_after_s)
                if ctx is not None:
                    ctx.note_error(err)
                    choices[i].finish_reason = choices[i].finish_reason or "error"
                await response.write(responses.error_event(err))
                failed = True
                break
            await _send_delta(response, state, plan, choices[i], delta)
        if plan.include_usage and not failed:
            await response.write(responses.sse(responses.usage_chunk(plan, choices)))
        await response.write(responses.SSE_DONE)
        await response.write_eof()
    except ConnectionResetError:  # the client left; leaving EngineStreams aborts what still runs
        if ctx is not None:
            ctx.error_type = ctx.error_type or "client_disconnected"
            for c in choices:
                c.finish_reason = c.finish_reason or "abort"
    return response


async def _send_delta(
    response: web.StreamResponse, state: ApiState, plan: GenerationPlan, choice: ChoiceState, delta: TextDelta
) -> None:
    entries = _entries(plan, choice, delta)
    text = choice.apply(delta, time.monotonic())
    finish, calls = delta.finish_reason, None
    if plan.tools is not None and plan.tools.mode != "none":  # the calls' text becomes tool-call deltas
        choice.tools = choice.tools or plan.tools.stream()
        text, calls, finish = tools.stream_step(choice.tools, text, finish)
    if not text and not entries and not calls and finish is None:
        return  # nothing to say (e.g. a first message that only carries the prompt length)
    if plan.chat:
        chunk = responses.chat_chunk(plan, choice.index, text, entries, finish, delta.stop_reason, calls)
    else:
        chunk = responses.completion_chunk(plan, choice.index, text, entries, finish, delta.stop_reason)
    await response.write(responses.sse(chunk))

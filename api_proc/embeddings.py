"""POST /v1/embeddings: OpenAI's embeddings API (docs/embeddings.md).

    {"input": "text" | ["text", ...] | [token ids] | [[token ids], ...], "model"?,
     "encoding_format"?: "float" | "base64", "dimensions"?: N, "user"?, "normalize"?: bool (vLLM's)}
    -> {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [...] | "b64"}],
        "model", "usage": {"prompt_tokens", "total_tokens"}}

Each input is one engine request (GenerateRequest.pooling): tokenized like a completion
prompt (special tokens added: BERT's [CLS] ... [SEP]; token ids are used as given), scheduled
with everyone else's requests (prefill only), pooled on the worker. ``base64`` is the float32
little-endian bytes of the vector, as OpenAI sends it (the engine's own format, passed through).

The body's shape is checked here (400 naming the field); the model's facts (whether it can
shorten vectors to ``dimensions``, whether it only serves embeddings) by the tokenizer, and the
input's length against the context by the scheduler, for every entry point alike.
"""

from __future__ import annotations

import base64
import time

import msgspec
import numpy as np
from aiohttp import web

from zeroserve.api_proc import responses
from zeroserve.api_proc.errors import ApiError, bad_request, from_error_info
from zeroserve.api_proc.generate import EngineStreams
from zeroserve.api_proc.model_router import VERSIONS, route
from zeroserve.api_proc.request_log import RequestContext, context_of
from zeroserve.api_proc.requests import check_token_ids, new_request_id
from zeroserve.api_proc.serving import STATE, ApiState, decode_body, read_body
from zeroserve.shared.messages import GenerateRequest, PoolingParams, SamplingParams

ENCODING_FORMATS = ("float", "base64")
_PARAMS = SamplingParams(max_tokens=1)  # nothing is sampled; the scheduler ignores max_tokens


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    """The body. input: as /v1/completions' prompt (one array type per union in msgspec, so
    the items are checked for being all of one kind in ``embedding_inputs``)."""

    input: str | list[str | int | list[int]]
    model: str | None = None
    encoding_format: str | None = None
    dimensions: int | None = None
    user: str | None = None  # accepted: bookkeeping only (and the session a replica sticks to)
    normalize: bool | None = None  # vLLM's extension: False = the raw pooled vector; None: the model's


def embedding_inputs(value: str | list, max_inputs: int) -> list[dict]:
    """The input field as GenerateRequest keyword sets, one per input; 400 naming `input`."""
    if isinstance(value, str):
        items: list = [value]
    elif not value:
        raise bad_request("input must not be empty.", "input")
    elif all(type(x) is int for x in value):
        items = [value]  # one input given as token ids
    else:
        items = value
    if len(items) > max_inputs:
        raise bad_request(
            f"input holds {len(items)} inputs; one request may hold at most {max_inputs} "
            "(--max-seqs-per-request). Split it into several requests.",
            "input",
        )
    kinds = {type(x) for x in items}
    if len(kinds) != 1:
        raise bad_request(
            "input must be a string, a list of strings, a list of token ids or a list of token-id lists, "
            "not a mix.",
            "input",
        )
    out = []
    for i, item in enumerate(items):
        where = "input" if len(items) == 1 else f"input[{i}]"
        if isinstance(item, str):
            if not item:
                raise bad_request(f"{where} is an empty string; embed some text.", "input")
            out.append({"prompt": item})
        else:
            if not item:
                raise bad_request(f"{where} is an empty list of token ids.", "input")
            check_token_ids(item, "input")
            out.append({"prompt_token_ids": list(item)})
    return out


def embedding_requests(
    body: EmbeddingRequest, request_id: str, max_inputs: int, queue_timeout_s: float | None
) -> list[GenerateRequest]:
    if body.encoding_format is not None and body.encoding_format not in ENCODING_FORMATS:
        raise bad_request(
            f"encoding_format must be float or base64, got {body.encoding_format[:64]!r}.", "encoding_format"
        )
    if body.dimensions is not None and body.dimensions < 1:
        raise bad_request(f"dimensions must be at least 1, got {body.dimensions}.", "dimensions")
    pooling = PoolingParams(normalize=body.normalize, dimensions=body.dimensions)
    return [
        GenerateRequest(
            request_id=f"{request_id}-{i}",
            params=_PARAMS,
            pooling=pooling,
            queue_timeout_s=queue_timeout_s,
            session=body.user,
            **prompt,
        )
        for i, prompt in enumerate(embedding_inputs(body.input, max_inputs))
    ]


async def embeddings(request: web.Request) -> web.Response:
    state: ApiState = request.app[STATE]
    config = state.config
    ctx = context_of(request)
    body = await read_body(request, EmbeddingRequest, config)
    targets = await route(request, body.model, user=body.user)  # the model (and version) that serves it
    request_id = new_request_id("embd", ctx.request_id if ctx is not None else None)
    reqs = embedding_requests(body, request_id, config.max_seqs_per_request, config.request_timeout_s)

    async def call(target) -> web.Response:
        answer = await embed(target.client, reqs, config, ctx, request_id, target.name, body.encoding_format)
        return web.Response(body=responses.encode(answer), content_type="application/json")

    return await request.app[VERSIONS].run_targets(targets, ctx, call)


async def embed_body(client, config, raw: bytes, ctx: RequestContext | None) -> dict:
    """A POST /v1/embeddings body (bytes) run to the response body the endpoint gives, for a
    request that did not come over HTTP (``zeroserve batch``)."""
    body = decode_body(raw, EmbeddingRequest)
    if ctx is not None:
        ctx.model = body.model or config.model_name
    request_id = new_request_id("embd", ctx.request_id if ctx is not None else None)
    reqs = embedding_requests(body, request_id, config.max_seqs_per_request, config.request_timeout_s)
    return await embed(client, reqs, config, ctx, request_id, config.model_name, body.encoding_format)


async def embed(
    client, reqs: list[GenerateRequest], config, ctx: RequestContext | None, request_id: str, model: str,
    encoding_format: str | None,
) -> dict:  # fmt: skip
    """The requests' vectors, as the endpoint's response body."""
    vectors, prompt_tokens = await run_embeddings(client, reqs, config, ctx)
    return embedding_body(request_id, model, vectors, prompt_tokens, encoding_format)


async def run_embeddings(
    client, reqs: list[GenerateRequest], config, ctx: RequestContext | None
) -> tuple[list[bytes], int]:
    """Every input's vector (float32 LE bytes, in input order) and the prompt tokens they took;
    the first engine error is raised as the ApiError it maps to."""
    vectors: list[bytes | None] = [None] * len(reqs)
    prompt_tokens = 0
    try:
        async with EngineStreams(
            client, reqs, config.request_timeout_s, config.engine_stall_timeout_s
        ) as streams:
            async for i, delta in streams:
                if delta.error is not None:
                    raise from_error_info(delta.error, config.retry_after_s)
                prompt_tokens += delta.num_prompt_tokens
                if delta.embedding is not None:
                    vectors[i] = delta.embedding
                elif delta.finish_reason is not None:
                    raise ApiError(
                        503 if delta.finish_reason in ("abort", "timeout") else 500,
                        f"The engine ended input {i} without an embedding ({delta.finish_reason}); retry.",
                    )
    finally:
        if ctx is not None:
            ctx.prompt_tokens = prompt_tokens
            ctx.finish_reason = "stop" if all(v is not None for v in vectors) else None
    return vectors, prompt_tokens


def embedding_body(
    request_id: str, model: str, vectors: list[bytes], prompt_tokens: int, encoding_format: str | None
) -> dict:
    b64 = encoding_format == "base64"
    return {
        "id": request_id,
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(v).decode() if b64 else np.frombuffer(v, "<f4").tolist(),
            }
            for i, v in enumerate(vectors)
        ],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def add_embedding_routes(app: web.Application) -> None:
    app.router.add_post("/v1/embeddings", embeddings)

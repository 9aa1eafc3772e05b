"""The aiohttp application: routes, the error and auth middlewares, the small endpoints.

``create_app(config, client)`` is all a caller needs; the client is an EngineClient (or a
test double with stream / tokenize / detokenize / ping) whose start/close the caller owns.

Routes:
    POST /v1/completions, /v1/chat/completions   serving.py
    POST /v1/embeddings                          embeddings.py
    GET  /v1/models  every NAME, NAME@VERSION and virtual name served (versions.py)
    POST /tokenize, /detokenize                  vLLM's shapes
    GET  /health   200 while the process runs; each engine replica (live, waiting, running, KV usage),
                   each model version (state, weight, in flight here)
    GET  /ready    200 when the engine takes work (a replica of the default model is live); 503 loading,
                   draining, workers down
    /admin/models...  the model registry (models_admin.py, behind --admin-key)

The model a request names picks the engine group it runs on (model_router.py, versions.py);
X-Model-Version says which version served it.
    GET  /metrics  prometheus text
    GET  /dashboard  a live page over /metrics (dashboard.py)
    POST /generate, /generate_stream, /; GET /info   Hugging Face TGI's API (tgi.py)
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from zeroserve.api_proc import responses
from zeroserve.api_proc.audit import setup_accounting
from zeroserve.api_proc.auth import auth_middleware, tenants_of
from zeroserve.api_proc.config import ApiConfig
from zeroserve.api_proc.dashboard import add_dashboard_routes
from zeroserve.api_proc.embeddings import add_embedding_routes
from zeroserve.api_proc.engine_state import EngineMonitor
from zeroserve.api_proc.errors import ApiError, error_response, from_error_info
from zeroserve.api_proc.metrics import CONTENT_TYPE, ApiMetrics, CacheInfo
from zeroserve.api_proc.model_router import VERSIONS, route_one, unrouted
from zeroserve.api_proc.models_admin import add_models_admin
from zeroserve.api_proc.protocol import DetokenizeBody, TokenizeBody
from zeroserve.api_proc.request_log import access_log_sink, context_of, note_error, request_middleware
from zeroserve.api_proc.request_log import install as install_request_ids
from zeroserve.api_proc.requests import check_token_ids, new_request_id, tokenize_request
from zeroserve.api_proc.serving import STATE, ApiState, chat_completions, completions, read_body
from zeroserve.api_proc.tgi import add_tgi_routes
from zeroserve.api_proc.tgi import error_response_for as tgi_error_response
from zeroserve.api_proc.tracing import trace_middleware
from zeroserve.api_proc.versions import RegistryCollector, Versions
from zeroserve.shared import tracing
from zeroserve.shared.messages import DetokenizeRequest

log = logging.getLogger("zeroserve.api")


@web.middleware
async def openai_errors(request: web.Request, handler):
    """Every failure leaves as an OpenAI error body (TGI's shape on TGI's routes); nothing
    internal leaks into it."""
    try:
        return await handler(request)
    except ApiError as e:
        note_error(request, e)
        return tgi_error_response(request, e) or error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        path = request.path[:200]
        if e.status == 404:
            err = ApiError(
                404,
                f"No route {request.method} {path}. See /v1/models, /v1/completions, /v1/chat/completions.",
                code="not_found",
            )
        elif e.status == 405:
            allowed = e.headers.get("Allow", "")
            err = ApiError(
                405,
                f"Method {request.method} is not allowed on {path}; use {allowed or 'another'}.",
                code="method_not_allowed",
                headers={"Allow": allowed} if allowed else None,
            )
        elif e.status == 413:
            err = ApiError(413, "The request body is over the size limit. Send a smaller request.")
        else:
            err = ApiError(e.status, e.reason or "The request failed.")
        note_error(request, err)
        return tgi_error_response(request, err) or error_response(err)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path[:200])
        err = ApiError(
            500,
            "Internal server error; the request was not completed. Retry, and report it if it persists.",
        )
        note_error(request, err)
        return error_response(err)


async def models(request: web.Request) -> web.Response:
    state: ApiState = request.app[STATE]
    return _json({"object": "list", "data": request.app[VERSIONS].model_cards(state.started)})


async def _engine_call(state: ApiState, coro: Any) -> Any:
    try:
        return await asyncio.wait_for(coro, state.config.engine_stall_timeout_s)
    except Exception as e:  # timeout or transport trouble; CancelledError (client gone) passes
        log.warning("engine call failed: %s: %s", type(e).__name__, e)
        raise ApiError(503, "The engine is unavailable; retry shortly.", code="engine_unavailable") from None


async def tokenize(request: web.Request) -> web.Response:
    state: ApiState = request.app[STATE]
    body = await read_body(request, TokenizeBody, state.config)
    ctx = context_of(request)
    client_id = ctx.request_id if ctx is not None else None
    target = await route_one(request, body.model, ctx)
    tok = tokenize_request(unrouted(body), state.config, client_id)
    res = await _engine_call(state, target.client.tokenize(tok))
    if res.error is not None:
        raise from_error_info(res.error, state.config.retry_after_s)
    engine = target.monitor.engine
    max_model_len = res.max_model_len or (engine.max_model_len if engine is not None else 0)
    return _json(
        {
            "count": len(res.token_ids),
            "max_model_len": max_model_len,
            "tokens": res.token_ids,
            "token_strs": None,
        }
    )


async def detokenize(request: web.Request) -> web.Response:
    state: ApiState = request.app[STATE]
    body = await read_body(request, DetokenizeBody, state.config)
    ctx = context_of(request)
    target = await route_one(request, body.model, ctx)
    check_token_ids(body.tokens, "tokens")
    await target.monitor.require_engine()
    client_id = ctx.request_id if ctx is not None else None
    req = DetokenizeRequest(request_id=new_request_id("detok", client_id), token_ids=body.tokens)
    res = await _engine_call(state, target.client.detokenize(req))
    if res.error is not None:
        raise from_error_info(res.error, state.config.retry_after_s)
    return _json({"prompt": res.text})


async def health(request: web.Request) -> web.Response:
    """200 while this process runs, with each engine replica as last reported (no fresh ping:
    probes must stay cheap); ``replicas`` is empty until the engine first answers."""
    versions = request.app[VERSIONS]
    group = versions.default_group()
    engine = (group.monitor if group is not None else request.app[STATE].monitor).engine
    replicas = []
    if engine is not None:
        for r in engine.replicas:
            s = r.stats
            replicas.append(
                {
                    "id": r.replica_id,
                    "live": r.live,
                    "waiting": s.num_waiting,
                    "running": s.num_running,
                    "kv_usage": s.kv_cache_usage,
                    "prefix_cache_hits": s.prefix_cache_hits,
                    "prefix_cache_queries": s.prefix_cache_queries,
                }
            )
    return _json({"status": "ok", "replicas": replicas, "models": versions.health()})


async def ready(request: web.Request) -> web.Response:
    ok, why = await request.app[VERSIONS].readiness()
    if not ok:
        raise ApiError(503, f"Not ready: {why}.", code="not_ready", headers={"Retry-After": "1"})
    return _json({"status": "ready"})


async def metrics_endpoint(request: web.Request) -> web.Response:
    state: ApiState = request.app[STATE]
    return web.Response(body=state.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=responses.encode(obj), content_type="application/json")


def create_app(config: ApiConfig, client: Any, metrics: ApiMetrics | None = None) -> web.Application:
    """The application for one api process. The engine monitor (pings for /ready, /metrics
    and max_model_len) runs while the app does."""
    monitor = EngineMonitor(client, config.ping_interval_s, config.ping_timeout_s)
    made: list[Versions] = []  # the engine-wide metrics follow the default model's serving group

    def engine_monitor() -> EngineMonitor:
        group = made[0].default_group() if made else None
        return group.monitor if group is not None else monitor

    if metrics is None:
        cache_info = CacheInfo(
            config.block_size,
            config.kv_cache_dtype,
            config.enable_prefix_caching,
            config.gpu_memory_utilization,
        )
        metrics = ApiMetrics(
            config.model_name,
            lambda: engine_monitor().engine,
            config.metrics_dir,
            lambda: engine_monitor().router_stats(),
            prefix=config.metrics_prefix,
            cache_info=cache_info,
        )
    tracer = tracing.init("api", config)
    tenants, limits = tenants_of(config)
    state = ApiState(
        config=config,
        client=client,
        monitor=monitor,
        metrics=metrics,
        started=int(time.time()),
        request_sinks=[access_log_sink(config.log_prompts), metrics.record_sink],
        wants_text=config.log_prompts,
    )
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[
            request_middleware(lambda: state.request_sinks),  # outermost: sees every outcome
            *([] if tracer is None else [trace_middleware(tracer)]),  # sees the status sent
            openai_errors,
            auth_middleware(tenants, config.auth_exempt_paths, limits),
        ],
    )
    app[STATE] = state
    versions = app[VERSIONS] = Versions(config, client, monitor, metrics)  # the models it serves
    made.append(versions)
    metrics.add_collector(RegistryCollector(versions, metrics.prefix))
    install_request_ids(app)
    setup_accounting(app, state, tenants)  # per-tenant metrics, the audit trail, /admin
    add_models_admin(app)

    async def monitor_ctx(app: web.Application):
        monitor.start()
        await versions.start()
        yield
        await versions.stop()
        await monitor.stop()

    app.cleanup_ctx.append(monitor_ctx)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    add_embedding_routes(app)  # POST /v1/embeddings
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics_endpoint)
    add_dashboard_routes(app, config.metrics_prefix)
    add_tgi_routes(app)  # Hugging Face TGI's /generate, /generate_stream, / and /info
    return app

"""The model registry's admin routes (behind --admin-key, api_proc/admin.py):

    GET    /admin/models                        every model, version, state, weight, stats
    POST   /admin/models/NAME/versions          {"version", "path"?, "options"?, "weight"?, "fault"?}: 202
    DELETE /admin/models/NAME/versions/VERSION  drain, then unload
    PUT    /admin/models/NAME/traffic           {"weights": {"v1": 90, "v2": 10}}
    POST   /admin/models/NAME/canary            {"version", "steps"?, "interval_s"?, "slo"?}
    POST   /admin/models/NAME/rollback          the stable version gets all traffic

The shape of each body is checked here (400 naming the field); what needs the registry (does the
version exist, does it fit in memory, is fault injection allowed) is the launcher's to answer,
and its AdminReply's status and body are the answer as they are. Without a launcher (no control
channel) every one of them is 404.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from aiohttp import web

from zeroserve.api_proc.admin import add_admin_route
from zeroserve.api_proc.errors import ApiError, bad_request
from zeroserve.api_proc.model_router import VERSIONS

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")  # a model or version name (no "@", no "/")
MAX_BODY = 64 * 1024


def add_models_admin(app: web.Application) -> None:
    add_admin_route(app, "GET", "/models", list_models)
    add_admin_route(app, "POST", "/models/{model:.+}/versions", load)
    add_admin_route(app, "DELETE", "/models/{model:.+}/versions/{version}", unload)
    add_admin_route(app, "PUT", "/models/{model:.+}/traffic", traffic)
    add_admin_route(app, "POST", "/models/{model:.+}/canary", canary)
    add_admin_route(app, "POST", "/models/{model:.+}/rollback", rollback)


# --------------------------------------------------------------------------- body checks


def _name(value: Any, param: str, what: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        shown = value[:64] if isinstance(value, str) else json.dumps(value)[:64]
        raise bad_request(
            f"`{param}` must be a {what} name: 1-64 letters, digits, '.', '_', ':' or '-' (no '@' or '/'), "
            f"got {shown!r}",
            param=param,
        )
    return value


def _number(value: Any, param: str, low: float, high: float = math.inf, *, integer: bool = False) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if not ok or isinstance(value, bool) or not low <= value <= high or not math.isfinite(value):
        kind = "an integer" if integer else "a number"
        upper = "" if high == math.inf else f" and {high:g}"
        raise bad_request(
            f"`{param}` must be {kind} between {low:g}{upper}, got {json.dumps(value)[:64]}", param
        )
    return value


def _object(value: Any, param: str) -> dict:
    if not isinstance(value, dict):
        raise bad_request(f"`{param}` must be a JSON object", param=param)
    return value


def _only(body: dict, allowed: tuple[str, ...], prefix: str = "") -> None:
    for key in body:
        if key not in allowed:
            raise bad_request(
                f"unknown field `{prefix}{key[:64]}`; allowed here: {', '.join(allowed)}",
                param=f"{prefix}{key[:64]}",
            )


def check_load(body: dict) -> None:
    _only(body, ("version", "path", "options", "weight", "fault"))
    _name(body.get("version"), "version", "version")
    if body.get("path") is not None and (not isinstance(body["path"], str) or not body["path"]):
        raise bad_request("`path` must be a GGUF file or a Hugging Face folder (a non-empty string)", "path")
    if body.get("options") is not None:
        for key in _object(body["options"], "options"):
            if not re.fullmatch(r"[a-z_][a-z0-9_]{0,63}", key):
                raise bad_request(f"`options.{key[:64]}` is not an engine option name", f"options.{key[:64]}")
    if body.get("weight") is not None:
        _number(body["weight"], "weight", 0, 2**31 - 1, integer=True)
    if body.get("fault") is not None:
        check_fault(_object(body["fault"], "fault"))


def check_fault(fault: dict) -> None:
    _only(fault, ("error_rate", "latency_ms"), "fault.")
    if "error_rate" in fault:
        _number(fault["error_rate"], "fault.error_rate", 0, 1)
    if "latency_ms" in fault:
        _number(fault["latency_ms"], "fault.latency_ms", 0, 600_000)


def check_traffic(body: dict) -> None:
    _only(body, ("weights",))
    weights = _object(body.get("weights"), "weights")
    if not weights:
        raise bad_request("`weights` must name at least one version", "weights")
    for version, weight in weights.items():
        _name(version, "weights", "version")
        _number(weight, f"weights.{version}", 0, 2**31 - 1, integer=True)
    if not any(w > 0 for w in weights.values()):
        raise bad_request("`weights` must give at least one version a positive weight", "weights")


def check_canary(body: dict) -> None:
    _only(body, ("version", "steps", "interval_s", "slo"))
    _name(body.get("version"), "version", "version")
    if body.get("steps") is not None:
        steps = body["steps"]
        if not isinstance(steps, list) or not steps or len(steps) > 100:
            raise bad_request("`steps` must be a list of 1-100 percentages, e.g. [5, 25, 50, 100]", "steps")
        for i, step in enumerate(steps):
            _number(step, f"steps[{i}]", 1, 100, integer=True)
        if any(b <= a for a, b in zip(steps, steps[1:], strict=False)) or steps[-1] != 100:
            raise bad_request("`steps` must rise strictly and end at 100, e.g. [5, 25, 50, 100]", "steps")
    if body.get("interval_s") is not None:
        _number(body["interval_s"], "interval_s", 0.1, 86_400)
    if body.get("slo") is not None:
        slo = _object(body["slo"], "slo")
        _only(slo, ("max_error_rate", "max_ttft_p95_s"), "slo.")
        if slo.get("max_error_rate") is not None:
            _number(slo["max_error_rate"], "slo.max_error_rate", 0, 1)
        if slo.get("max_ttft_p95_s") is not None:
            _number(slo["max_ttft_p95_s"], "slo.max_ttft_p95_s", 0.001, 86_400)


# --------------------------------------------------------------------------- handlers


async def _body(request: web.Request, required: bool = True) -> dict:
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise ApiError(413, f"The admin request body is over {MAX_BODY} bytes.")
    if not raw.strip():
        if required:
            raise bad_request("The request needs a JSON object body.")
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise bad_request("The request body is not valid JSON. Send a JSON object.") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


async def _forward(request: web.Request, op: str, body: dict | None = None, version: str | None = None):
    model = request.match_info.get("model")
    if model is not None and (len(model) > 200 or not model.isprintable()):
        raise bad_request("`model` in the path is not a model name", param="model")
    reply = await request.app[VERSIONS].admin(
        op, model, version, json.dumps(body, separators=(",", ":")) if body is not None else ""
    )
    return web.Response(status=reply.status, body=reply.body.encode(), content_type="application/json")


async def list_models(request: web.Request) -> web.Response:
    return await _forward(request, "list")


async def load(request: web.Request) -> web.Response:
    body = await _body(request)
    check_load(body)
    return await _forward(request, "load", body, body["version"])


async def unload(request: web.Request) -> web.Response:
    version = _name(request.match_info["version"], "version", "version")
    return await _forward(request, "unload", None, version)


async def traffic(request: web.Request) -> web.Response:
    body = await _body(request)
    check_traffic(body)
    return await _forward(request, "traffic", body)


async def canary(request: web.Request) -> web.Response:
    body = await _body(request)
    check_canary(body)
    return await _forward(request, "canary", body, body["version"])


async def rollback(request: web.Request) -> web.Response:
    body = await _body(request, required=False)
    _only(body, ())
    return await _forward(request, "rollback", body)

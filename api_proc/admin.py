"""The admin API under /admin, enabled by ``--admin-key`` (or ZEROSERVE_ADMIN_KEY).

Without an admin key no /admin route exists (404, like any unknown path). With one, every
/admin request must send ``Authorization: Bearer ADMIN_KEY`` (compared in constant time; a
different key from the API keys, which do not open /admin): else 401. Query parameters that
cannot be used are 400 naming the parameter.

    GET /admin/usage?since=&until=&group_by=tenant|model|version|day[&tenant=]
        requests, errors and tokens per group over [since, until) (the audit trail)
    GET /admin/audit?request_id=ID
    GET /admin/audit?tenant=&since=&until=&limit=
        audit records, newest first (limit: 1..1000, default 100)

Times are unix seconds or ISO 8601 (``2026-11-29``, ``2026-11-29T18:00:00Z``; no zone: UTC).

Other admin routes (the model registry) join with ``add_admin_route``: they get the same key
check, 404 without a key, and the JSON error bodies.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from zeroserve.api_proc import responses
from zeroserve.api_proc.auth import TENANT_NAME, bearer_token, digest_of
from zeroserve.api_proc.errors import ApiError, bad_request
from zeroserve.api_proc.request_log import request_id_error

PREFIX = "/admin"
ADMIN_KEY = web.AppKey("zeroserve_admin_key_digest", bytes)
AUDIT = web.AppKey("zeroserve_audit", object)  # api_proc.audit.ApiAudit, or absent: auditing off
MAX_LIMIT = 1000
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def setup_admin(app: web.Application, admin_key: str | None) -> None:
    """Enable /admin when there is a key: the usage and audit routes, and the key check."""
    if not admin_key:
        return
    app[ADMIN_KEY] = digest_of(admin_key)
    add_admin_route(app, "GET", "/usage", usage)
    add_admin_route(app, "GET", "/audit", audit_records)


def add_admin_route(app: web.Application, method: str, path: str, handler: Handler) -> None:
    """``path`` under /admin, behind the admin key; a no-op when /admin is off (no key)."""
    if ADMIN_KEY not in app:
        return

    async def checked(request: web.Request) -> web.StreamResponse:
        require_admin(request)
        return await handler(request)

    app.router.add_route(method, PREFIX + path, checked)


def require_admin(request: web.Request) -> None:
    token = bearer_token(request)
    # both digests are 32 bytes: compare_digest's time depends on neither key
    if token is None or not hmac.compare_digest(digest_of(token), request.app[ADMIN_KEY]):
        raise ApiError(
            401,
            "Missing or invalid admin key: send it as the header `Authorization: Bearer <admin key>`.",
            code="invalid_admin_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


# --------------------------------------------------------------------------- parameters


def parse_time(value: str | None, name: str) -> float | None:
    """Unix seconds or ISO 8601 (no zone: UTC) -> unix seconds; 400 naming ``name`` otherwise."""
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise bad_request(
                f"`{name}` must be a finite number of unix seconds, got {value[:64]!r}", param=name
            )
        return seconds
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except ValueError:
        raise bad_request(
            f"`{name}` must be unix seconds or an ISO 8601 date/time (e.g. 2026-11-29T18:00:00Z), "
            f"got {value[:64]!r}",
            param=name,
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _only(request: web.Request, allowed: tuple[str, ...]) -> None:
    for name in request.query:
        if name not in allowed:
            raise bad_request(
                f"unknown query parameter `{name[:64]}`; this route takes {', '.join(allowed)}",
                param=name[:64],
            )


def _audit(request: web.Request) -> Any:
    audit = request.app.get(AUDIT)
    if audit is None:
        raise ApiError(404, "The audit trail is off on this server (--audit-db off).", code="audit_off")
    return audit


def _tenant(request: web.Request) -> str | None:
    tenant = request.query.get("tenant")
    if tenant is not None and not TENANT_NAME.fullmatch(tenant):
        raise bad_request(
            f"`tenant` is not a tenant name (1-64 letters, digits, '_', '.', '@' or '-'), got {tenant[:64]!r}",
            param="tenant",
        )
    return tenant


def _range(request: web.Request) -> tuple[float | None, float | None]:
    since = parse_time(request.query.get("since"), "since")
    until = parse_time(request.query.get("until"), "until")
    if since is not None and until is not None and until < since:
        raise bad_request("`until` is before `since`", param="until")
    return since, until


async def usage(request: web.Request) -> web.Response:
    from zeroserve.api_proc.audit.store import GROUPS

    _only(request, ("since", "until", "group_by", "tenant"))
    since, until = _range(request)
    group_by = request.query.get("group_by", "tenant")
    if group_by not in GROUPS:
        raise bad_request(
            f"`group_by` must be one of {', '.join(GROUPS)}, got {group_by[:64]!r}", param="group_by"
        )
    audit = _audit(request)
    tenant = _tenant(request)
    rows = await audit.query(lambda store: store.usage(since, until, group_by, tenant))
    return _json({"object": "usage", "group_by": group_by, "since": since, "until": until, "data": rows})


async def audit_records(request: web.Request) -> web.Response:
    _only(request, ("request_id", "tenant", "since", "until", "limit"))
    since, until = _range(request)
    raw_limit = request.query.get("limit", "100")
    try:
        limit = int(raw_limit)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise bad_request(
            f"`limit` must be an integer in 1..{MAX_LIMIT}, got {raw_limit[:64]!r}", param="limit"
        )
    request_id, tenant = request.query.get("request_id"), _tenant(request)
    why = request_id_error(request_id) if request_id is not None else None
    if why is not None:  # no record has such an id (the API refuses them), and a NUL breaks PostgreSQL
        raise bad_request(f"`request_id` {why}", param="request_id")
    audit = _audit(request)
    rows = await audit.query(lambda store: store.records(request_id, tenant, since, until, limit))
    return _json({"object": "list", "data": rows})


def _json(obj: object) -> web.Response:
    return web.Response(body=responses.encode(obj), content_type="application/json")

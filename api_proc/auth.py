"""Bearer API keys: ``Authorization: Bearer <key>`` on every route but the exempt ones."""

from __future__ import annotations

import hmac

from aiohttp import web

from zeroserve.api_proc.errors import ApiError


def key_matches(token: str, keys: list[bytes]) -> bool:
    """Constant time in the token's content; every key is compared, so the time does not
    tell which one (or whether an early one) matched."""
    candidate = token.encode("utf-8", "surrogateescape")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key)
    return matched


def auth_middleware(api_keys: list[str], exempt_paths: list[str]):
    keys = [k.encode("utf-8") for k in api_keys]
    exempt = frozenset(exempt_paths)

    @web.middleware
    async def require_api_key(request: web.Request, handler):
        if keys and request.path not in exempt:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not key_matches(token.strip(), keys):
                raise ApiError(
                    401,
                    "Missing or invalid API key: send it as the header `Authorization: Bearer <key>`.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    return require_api_key

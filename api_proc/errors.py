"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a handler can meet becomes an ``ApiError`` and then this body: bad JSON, a
wrong type (msgspec names the field), an out-of-range value, an engine ErrorInfo. Messages
say what was wrong and what to do; they never carry tracebacks, addresses or paths.
"""

from __future__ import annotations

import re

import msgspec
from aiohttp import web

from zeroserve.shared.messages import ErrorInfo

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}
_json = msgspec.json.Encoder()


class ApiError(Exception):
    """A request that gets an error status instead of a completion."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def error_response(err: ApiError) -> web.Response:
    return web.Response(
        status=err.status, body=_json.encode(err.body()), content_type="application/json", headers=err.headers
    )


def from_error_info(info: ErrorInfo, retry_after_s: int) -> ApiError:
    """The engine's verdict on one request (400 bad prompt, 429 admission, 5xx worker trouble)."""
    status = info.status if 400 <= info.status <= 599 else 500
    headers = {"Retry-After": str(retry_after_s)} if status == 429 else None
    return ApiError(
        status, info.message, param=info.param, code=info.code, type=info.type or None, headers=headers
    )


_AT_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_MISSING = re.compile(r"missing required field `(?P<field>[^`]+)`")


def from_decode_error(e: msgspec.DecodeError) -> ApiError:
    """msgspec's complaint about a body, with ``param`` set to the field at fault.

    ValidationError messages look like "Expected `float`, got `str` - at `$.temperature`" or
    "Object missing required field `role` - at `$.messages[0]`".
    """
    text = str(e)
    if not isinstance(e, msgspec.ValidationError):
        return bad_request(f"The request body is not valid JSON ({text}). Send a JSON object.")
    path = ""
    at = _AT_PATH.search(text)
    if at:
        path = at.group("path").lstrip(".")
        text = text[: at.start()]
    missing = _MISSING.search(text)
    if missing:
        path = f"{path}.{missing.group('field')}" if path else missing.group("field")
    param = path or None
    if param is None and text.startswith("Expected `object`"):
        return bad_request(f"The request body must be a JSON object: {text}")
    where = f"`{param}`: " if param else ""
    return bad_request(f"Invalid request: {where}{text}", param=param)

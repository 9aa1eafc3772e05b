"""Holding a response's last bytes until its audit record is on disk (the spool's fsync).

    non-streaming   the handler returns a web.Response; the request-end seam hands the record
                    in; then aiohttp prepares the response: ``on_response_prepare`` awaits the
                    fsync before the status line and body go out.
    SSE stream      the handler writes ``data: [DONE]`` and EOF itself, before the seam makes
                    the record. When its response is prepared, its ``write`` of ``[DONE]`` and
                    its ``write_eof`` are deferred; the innermost middleware (``stream_hold``)
                    then, the handler done and its context filled, hands the record in itself,
                    awaits the fsync and sends the two. The seam's own record of that request
                    comes later and is skipped (``ApiAudit.sink``: keyed by request id and start).

Only the generation endpoints stream; others pass straight through the middleware.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from zeroserve.api_proc.responses import SSE_DONE

log = logging.getLogger("zeroserve.audit")

STREAMING_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


class _Held:
    __slots__ = ("active", "done", "eof", "write", "write_eof")

    def __init__(self):
        self.active = True  # deferring: the handler is still running
        self.done: bytes | None = None  # the deferred [DONE] event
        self.eof: bytes | None = None  # the deferred write_eof's data (b"" when called)
        self.write: Callable[[bytes], Awaitable[None]] | None = None
        self.write_eof: Callable[[bytes], Awaitable[None]] | None = None


HELD = web.RequestKey("zeroserve_audit_held", _Held)  # request[HELD]: a generation request's


def defer_stream_end(request: web.Request, response: web.StreamResponse) -> bool:
    """From on_response_prepare: for a held request's stream, defer [DONE] and EOF. True if so."""
    held: _Held | None = request.get(HELD)
    if held is None or isinstance(response, web.Response):
        return False
    held.write, held.write_eof = response.write, response.write_eof

    async def write(data) -> None:
        if held.active and data == SSE_DONE:
            held.done = bytes(data)
            return
        await held.write(data)

    async def write_eof(data: bytes = b"") -> None:
        if held.active:
            held.eof = data
            return
        await held.write_eof(data)

    response.write = write  # type: ignore[method-assign]
    response.write_eof = write_eof  # type: ignore[method-assign]
    return True


def stream_hold_middleware(record_now: Callable[[web.Request, int], Awaitable[None]]):
    """The innermost middleware: after a stream's handler, ``record_now(request, status)`` (hand
    the record in and await its fsync), then the deferred [DONE] and EOF."""

    @web.middleware
    async def stream_hold(request: web.Request, handler):
        if request.method != "POST" or request.path not in STREAMING_PATHS:
            return await handler(request)
        held = request[HELD] = _Held()
        try:
            response = await handler(request)
        finally:
            held.active = False
        if held.done is None and held.eof is None:
            return response  # not a stream, or one that ended without its last bytes
        try:
            await record_now(request, response.status)
        except Exception:  # the answer must still end: the seam's own record follows anyway
            log.exception("audit: could not record a stream before its end")
        try:
            if held.done is not None:
                await held.write(held.done)
            if held.eof is not None:
                await held.write_eof(held.eof)
        except ConnectionResetError:
            pass  # the client left meanwhile
        return response

    return stream_hold

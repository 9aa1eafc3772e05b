"""The ZMQ client of the engine: what api_proc uses, and what batch jobs use directly.

    async with EngineClient(address) as c:
        async for delta in c.generate(prompt="Hello", params=SamplingParams(max_tokens=32)):
            print(delta.text, end="")

It speaks to tokenizer_proc's ROUTER socket(s) with a DEALER per tokenizer process; a
request always goes to the same tokenizer (chosen by its id), so its Abort does too.
Leaving a ``stream``/``generate`` loop early sends Abort, which frees the request's KV
blocks. If the engine stops answering pings, every request in flight ends with a 503
error delta instead of hanging (and is aborted, should the engine only be stalled). The
client pings every ``heartbeat_interval_s``; a tokenizer aborts the requests of a client it
has not heard from for a few heartbeat timeouts, so a dead client leaves no work running.
When a tokenizer stops reading and this client's queue to it is full (``ipc.HWM``
messages), a new request ends at once with a 429 ``engine_overloaded`` error delta.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from typing import Any

import zmq
import zmq.asyncio

from zeroserve.shared.config import DEFAULTS, CurveKeys
from zeroserve.shared.ipc import Codec, SendError, connect, has_unread, receive, send_now
from zeroserve.shared.messages import (
    Abort,
    ApiInbox,
    ChatMessage,
    DetokenizeRequest,
    ErrorInfo,
    GenerateRequest,
    Ping,
    Pong,
    SamplingParams,
    TextDelta,
    TokenizeRequest,
    TokenizeResult,
)


class EngineError(Exception):
    """A request failed in the engine; ``info`` says how (status, type, message)."""

    def __init__(self, info: ErrorInfo):
        super().__init__(info.message)
        self.info = info


class EngineClient:
    def __init__(
        self,
        address: str | list[str],
        curve: CurveKeys | None = None,
        heartbeat_interval_s: float = DEFAULTS.heartbeat_interval_s,
        heartbeat_timeout_s: float = DEFAULTS.heartbeat_timeout_s,
    ):
        self.addresses = [address] if isinstance(address, str) else list(address)
        self.curve = curve
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.ctx: zmq.asyncio.Context | None = None
        self.sockets: list[zmq.asyncio.Socket] = []
        self.codec: Codec = Codec(ApiInbox, "client")
        self.streams: dict[str, tuple[int, asyncio.Queue]] = {}
        self.waiters: dict[str, asyncio.Future] = {}
        self.last_seen: list[float] = []
        self.tasks: list[asyncio.Task] = []
        self.identity = f"client-{os.getpid()}-{uuid.uuid4().hex[:8]}".encode()

    async def __aenter__(self) -> EngineClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def start(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sockets = [connect(self.ctx, zmq.DEALER, a, self.curve, self.identity) for a in self.addresses]
        self.last_seen = [0.0] * len(self.sockets)
        self.tasks = [asyncio.ensure_future(self._recv_loop(i)) for i in range(len(self.sockets))]
        self.tasks.append(asyncio.ensure_future(self._heartbeat_loop()))

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for sock in self.sockets:
            sock.close(0)
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None

    # ------------------------------------------------------------------ plumbing
    def _pick(self, request_id: str) -> int:
        return zlib.crc32(request_id.encode()) % len(self.sockets)

    def _send(self, index: int, msg: Any) -> None:
        """Queue ``msg`` for tokenizer ``index`` or raise SendError (its queue is full)."""
        send_now(self.sockets[index], [self.codec.encode(msg)])

    def _send_quietly(self, index: int, msg: Any) -> None:
        """Best effort (pings, aborts): a tokenizer too far behind to take it is handled by the
        heartbeat timeout here and the owner timeout there."""
        try:
            self._send(index, msg)
        except SendError:
            pass

    async def _recv_loop(self, index: int) -> None:
        sock = self.sockets[index]
        while True:
            msg = await receive(sock, self.codec)
            self.last_seen[index] = time.monotonic()
            match msg:
                case TextDelta():
                    entry = self.streams.get(msg.request_id)
                    if entry is not None:
                        entry[1].put_nowait(msg)
                    elif msg.finish_reason is None and msg.error is None:
                        # nobody here waits for it (given up, Abort lost): stop it generating
                        self._send_quietly(index, Abort(request_id=msg.request_id, reason="client gone"))
                case TokenizeResult() | Pong():  # answers to _call, matched by request id
                    fut = self.waiters.pop(msg.request_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)

    async def _heartbeat_loop(self) -> None:
        while True:
            for i in range(len(self.sockets)):
                self._send_quietly(i, Ping(sent_at=time.time()))
            await asyncio.sleep(self.heartbeat_interval_s)
            now = time.monotonic()
            for request_id, (i, queue) in list(self.streams.items()):
                # unread replies: this loop was late, not the tokenizer silent
                if now - self.last_seen[i] > self.heartbeat_timeout_s and not has_unread(self.sockets[i]):
                    del self.streams[request_id]
                    # the tokenizer may only be stalled: when it reads again, this frees the request
                    self._send_quietly(i, Abort(request_id=request_id, reason="engine silent"))
                    queue.put_nowait(
                        TextDelta(
                            request_id=request_id,
                            text="",
                            finish_reason="error",
                            error=ErrorInfo(
                                status=503,
                                type="service_unavailable",
                                message="the engine stopped responding; retry the request",
                            ),
                        )
                    )

    async def _call(self, index: int, msg: Any, request_id: str, timeout: float) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self.waiters[request_id] = fut
        try:
            try:
                self._send(index, msg)
            except SendError:
                raise EngineError(overloaded()) from None
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.waiters.pop(request_id, None)

    # ------------------------------------------------------------------ API
    async def stream(self, req: GenerateRequest) -> AsyncIterator[TextDelta]:
        """Every TextDelta of one request; the last has finish_reason (or error) set."""
        index = self._pick(req.request_id)
        queue: asyncio.Queue = asyncio.Queue()
        self.streams[req.request_id] = (index, queue)
        finished = False
        try:
            try:
                self._send(index, req)
            except SendError:
                finished = True  # never sent: nothing to abort
                yield TextDelta(request_id=req.request_id, text="", finish_reason="error", error=overloaded())
                return
            while True:
                delta: TextDelta = await queue.get()
                finished = delta.finish_reason is not None or delta.error is not None
                yield delta
                if finished:
                    return
        finally:
            self.streams.pop(req.request_id, None)
            if not finished and self.ctx is not None:
                self._send_quietly(index, Abort(request_id=req.request_id, reason="client gone"))

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[ChatMessage | dict] | None = None,
        prompt_token_ids: list[int] | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        **fields: Any,
    ) -> AsyncIterator[TextDelta]:
        """Convenience over ``stream``: a prompt, chat messages or token ids, and params."""
        if messages is not None:
            messages = [m if isinstance(m, ChatMessage) else ChatMessage(**m) for m in messages]
        req = GenerateRequest(
            request_id=request_id or uuid.uuid4().hex,
            params=params or SamplingParams(),
            prompt=prompt,
            messages=messages,
            prompt_token_ids=prompt_token_ids,
            **fields,
        )
        async with aclosing(self.stream(req)) as deltas:  # closed now, not whenever GC gets to it
            async for delta in deltas:
                yield delta

    async def complete(self, **kwargs: Any) -> dict[str, Any]:
        """Run one request to the end: {"text", "token_ids", "finish_reason", "usage", ...}.

        Raises EngineError when the engine refuses or fails it.
        """
        text, token_ids, last, first = [], [], None, None
        async with aclosing(self.generate(**kwargs)) as deltas:
            async for delta in deltas:
                first = first or delta
                last = delta
                if delta.error is not None:
                    raise EngineError(delta.error)
                text.append(delta.text)
                token_ids.extend(delta.token_ids)
        prompt_tokens = first.num_prompt_tokens if first else 0
        return {
            "text": "".join(text),
            "token_ids": token_ids,
            "finish_reason": last.finish_reason if last else None,
            "stop_reason": last.stop_reason if last else None,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(token_ids),
                "total_tokens": prompt_tokens + len(token_ids),
            },
        }

    async def generate_many(
        self, requests: Iterable[dict[str, Any]], max_concurrency: int = 64
    ) -> AsyncIterator[tuple[int, dict[str, Any] | EngineError]]:
        """Run many ``complete(**kwargs)`` with at most max_concurrency in flight; yields
        (index, result or EngineError) in completion order."""
        semaphore = asyncio.Semaphore(max_concurrency)
        done: asyncio.Queue = asyncio.Queue()

        async def one(i: int, kwargs: dict[str, Any]) -> None:
            async with semaphore:
                try:
                    done.put_nowait((i, await self.complete(**kwargs)))
                except EngineError as e:
                    done.put_nowait((i, e))

        tasks = [asyncio.ensure_future(one(i, kw)) for i, kw in enumerate(requests)]
        try:
            for _ in range(len(tasks)):
                yield await done.get()
        finally:
            for t in tasks:
                t.cancel()

    async def tokenize(self, req: TokenizeRequest, timeout: float = 30.0) -> TokenizeResult:
        return await self._call(self._pick(req.request_id), req, req.request_id, timeout)

    async def detokenize(self, req: DetokenizeRequest, timeout: float = 30.0) -> TokenizeResult:
        return await self._call(self._pick(req.request_id), req, req.request_id, timeout)

    async def wait_ready(self, timeout_s: float = 600.0, poll_s: float = 0.3) -> Pong:
        """Ping until the engine says it can take work; raises TimeoutError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                pong = await self.ping(timeout=1.0)
                if pong.ready:
                    return pong
            except TimeoutError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine at {self.addresses[0]} was not ready after {timeout_s:.0f}s")
            await asyncio.sleep(poll_s)

    async def ping(self, timeout: float = 1.0, index: int = 0) -> Pong:
        """Ask tokenizer #index how the engine is; raises asyncio.TimeoutError when nobody answers."""
        request_id = uuid.uuid4().hex
        try:
            return await self._call(
                index, Ping(sent_at=time.time(), request_id=request_id), request_id, timeout
            )
        except EngineError as e:  # our queue to it is full: it is not reading
            raise TimeoutError(e.info.message) from None

    async def ping_all(self, timeout: float = 1.0) -> list[Pong | None]:
        """Every tokenizer's answer, in address order, at once; None where none came in time."""
        answers = await asyncio.gather(
            *(self.ping(timeout, i) for i in range(len(self.sockets))), return_exceptions=True
        )
        return [a if isinstance(a, Pong) else None for a in answers]


def overloaded(who: str = "it has stopped taking requests from this client") -> ErrorInfo:
    """429 engine_overloaded: a queue between two processes is full (see ipc.HWM)."""
    return ErrorInfo(
        status=429,
        type="rate_limit_error",
        message=f"The engine is overloaded: {who}. Retry later.",
        code="engine_overloaded",
    )

"""tokenizer_proc: text in, tokens to the scheduler; tokens back, text out to the owner.

Inboxes:
    front  ROUTER  api processes / clients -> GenerateRequest | Abort | TokenizeRequest |
                                              DetokenizeRequest | Ping
    engine DEALER  scheduler               -> TokenDeltas | SchedulerStats
Each request's incremental detokenizer and stop-string checker live here; a stop string
ends the request (an Abort goes upstream so its KV blocks are freed at once).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import zmq
import zmq.asyncio

from zeroserve.shared.config import EngineConfig
from zeroserve.shared.ipc import Codec, bind, connect, recv_router, start_authenticator
from zeroserve.shared.messages import (
    Abort,
    DetokenizeRequest,
    EngineRequest,
    ErrorInfo,
    GenerateRequest,
    Ping,
    Pong,
    SchedulerStats,
    TextDelta,
    TokenDelta,
    TokenDeltas,
    TokenizerEngineInbox,
    TokenizeRequest,
    TokenizeResult,
    TokenizerInbox,
)
from zeroserve.shared.proc_main import parse_proc_args, run_actor
from zeroserve.tokenizer_proc.requests import PromptError, RequestState, build_prompt
from zeroserve.tokenizer_proc.tokenizer import load_tokenizer

log = logging.getLogger("zeroserve.tokenizer")


class TokenizerProcess:
    def __init__(self, config: EngineConfig, index: int):
        self.config = config
        self.tokenizer = load_tokenizer(config.model)
        self.ctx = zmq.asyncio.Context()
        self.auth = start_authenticator(self.ctx, config.curve)
        self.front = bind(self.ctx, zmq.ROUTER, config.tokenizer_address(index), config.curve)
        identity = f"tokenizer-{index}-{os.getpid()}".encode()
        self.engine = connect(self.ctx, zmq.DEALER, config.scheduler_address, config.curve, identity)
        self.front_codec: Codec = Codec(TokenizerInbox, f"tokenizer-{index}.front")
        self.engine_codec: Codec = Codec(TokenizerEngineInbox, f"tokenizer-{index}.engine")
        self.encoder = self.front_codec.encoder
        self.requests: dict[str, RequestState] = {}
        self.stats = SchedulerStats(workers_ready=False)
        self.engine_seen = 0.0
        self.draining = False
        self.index = index

    # ------------------------------------------------------------------ inbox: api / clients
    async def front_loop(self) -> None:
        while True:
            parsed = recv_router(await self.front.recv_multipart(copy=True))
            if parsed is None:
                self.front_codec.drop("not an [identity, payload] message")
                continue
            identity, payload = parsed
            msg = self.front_codec.decode(payload)
            match msg:
                case GenerateRequest():
                    self.on_generate(identity, msg)
                case Abort():
                    self.on_abort(msg)
                case TokenizeRequest():
                    self.reply(identity, self.on_tokenize(msg))
                case DetokenizeRequest():
                    self.reply(identity, self.on_detokenize(msg))
                case Ping():
                    self.reply(identity, self.pong(msg))

    def reply(self, identity: bytes, msg) -> None:
        self.front.send_multipart([identity, self.encoder.encode(msg)])

    def fail(self, identity: bytes, request_id: str, error: ErrorInfo) -> None:
        self.reply(identity, TextDelta(request_id=request_id, text="", finish_reason="error", error=error))

    def on_generate(self, identity: bytes, req: GenerateRequest) -> None:
        if self.draining:
            self.fail(
                identity, req.request_id, ErrorInfo(503, "service_unavailable", "the server is shutting down")
            )
            return
        if not self.engine_alive():
            self.fail(
                identity,
                req.request_id,
                ErrorInfo(
                    503,
                    "service_unavailable",
                    "the engine is not ready (model loading or a worker restarting); retry shortly",
                ),
            )
            return
        if req.request_id in self.requests:
            self.fail(
                identity, req.request_id, ErrorInfo(400, "invalid_request_error", "duplicate request id")
            )
            return
        try:
            prompt_ids, params = build_prompt(
                self.tokenizer, req, self.config.max_model_len, self.config.vocab_size
            )
        except PromptError as e:
            self.fail(identity, req.request_id, e.info)
            return
        now = time.time()
        self.requests[req.request_id] = RequestState(self.tokenizer, identity, req, prompt_ids)
        self.engine.send(
            self.encoder.encode(
                EngineRequest(
                    request_id=req.request_id,
                    prompt_token_ids=prompt_ids,
                    params=params,
                    arrival_time=now,
                    priority=req.priority,
                    deadline=None if req.deadline_s is None else now + req.deadline_s,
                    cache_salt=req.cache_salt,
                )
            )
        )

    def on_abort(self, msg: Abort) -> None:
        if self.requests.pop(msg.request_id, None) is not None:
            self.engine.send(self.encoder.encode(msg))

    def on_tokenize(self, req: TokenizeRequest) -> TokenizeResult:
        try:
            if req.messages is not None:
                text = self.tokenizer.apply_chat_template(
                    req.messages, add_generation_prompt=req.add_generation_prompt
                )
                ids = self.tokenizer.encode(text, add_special_tokens=False)
            else:
                ids = self.tokenizer.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
        except Exception as e:
            return TokenizeResult(
                request_id=req.request_id, error=ErrorInfo(400, "invalid_request_error", str(e))
            )
        return TokenizeResult(
            request_id=req.request_id, token_ids=ids, max_model_len=self.config.max_model_len
        )

    def on_detokenize(self, req: DetokenizeRequest) -> TokenizeResult:
        bad = [t for t in req.token_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            return TokenizeResult(
                request_id=req.request_id,
                error=ErrorInfo(
                    400,
                    "invalid_request_error",
                    f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})",
                    param="tokens",
                ),
            )
        return TokenizeResult(
            request_id=req.request_id,
            token_ids=req.token_ids,
            text=self.tokenizer.decode(req.token_ids, skip_special_tokens=False),
        )

    def pong(self, ping: Ping) -> Pong:
        s = self.stats
        alive = self.engine_alive()
        return Pong(
            sent_at=ping.sent_at,
            role="tokenizer",
            ready=alive and not self.draining,
            request_id=ping.request_id,
            info={
                "model_name": self.config.served_model_name,
                "max_model_len": self.config.max_model_len,
                "vocab_size": self.config.vocab_size,
                "workers_ready": alive,
                "draining": self.draining,
                "num_running": s.num_running,
                "num_waiting": s.num_waiting,
                "kv_cache_usage": s.kv_cache_usage,
                "prefix_cache_queries": s.prefix_cache_queries,
                "prefix_cache_hits": s.prefix_cache_hits,
                "num_preemptions": s.num_preemptions,
                "num_kv_blocks": s.num_kv_blocks,
                "num_free_blocks": s.num_free_blocks,
                "bad_frames": self.front_codec.bad_frames + self.engine_codec.bad_frames,
            },
        )

    # ------------------------------------------------------------------ inbox: scheduler
    async def engine_loop(self) -> None:
        while True:
            msg = self.engine_codec.decode(await self.engine.recv(copy=True))
            match msg:
                case TokenDeltas():
                    for delta in msg.deltas:
                        self.on_delta(delta)
                case SchedulerStats():
                    self.stats = msg
                    self.engine_seen = time.monotonic()

    def on_delta(self, delta: TokenDelta) -> None:
        state = self.requests.get(delta.request_id)
        if state is None:
            return  # aborted by its owner meanwhile
        out = state.advance(delta)
        if out.finish_reason is not None:
            del self.requests[delta.request_id]
            if delta.finish_reason is None:  # we stopped it (stop string): free its blocks now
                self.engine.send(self.encoder.encode(Abort(request_id=delta.request_id, reason="stop")))
        self.reply(state.owner, out)

    # ------------------------------------------------------------------ liveness
    def engine_alive(self) -> bool:
        fresh = time.monotonic() - self.engine_seen < max(self.config.heartbeat_timeout_s * 2, 2.0)
        return fresh and self.stats.workers_ready

    async def heartbeat_loop(self) -> None:
        ping = Ping(sent_at=0.0)
        was_alive = False
        while True:
            self.engine.send(self.encoder.encode(ping))
            await asyncio.sleep(self.config.heartbeat_interval_s)
            alive = time.monotonic() - self.engine_seen < max(self.config.heartbeat_timeout_s * 2, 2.0)
            if was_alive and not alive:
                log.error("scheduler went silent; failing %d in-flight request(s)", len(self.requests))
                for request_id, state in list(self.requests.items()):
                    self.fail(
                        state.owner,
                        request_id,
                        ErrorInfo(
                            503, "service_unavailable", "the scheduler process stopped responding; retry"
                        ),
                    )
                self.requests.clear()
            was_alive = alive

    async def drain(self) -> None:
        """Refuse new work, let in-flight requests finish (bounded), then stop."""
        self.draining = True
        deadline = time.monotonic() + 120
        while self.requests and time.monotonic() < deadline and self.engine_alive():
            await asyncio.sleep(0.05)

    async def run(self) -> None:
        log.info("tokenizer %d listening on %s", self.index, self.config.tokenizer_address(self.index))
        await asyncio.gather(self.front_loop(), self.engine_loop(), self.heartbeat_loop())


def main(argv: list[str] | None = None) -> None:
    config, args = parse_proc_args("tokenizer", argv)
    run_actor("tokenizer", lambda: TokenizerProcess(config, args.index))

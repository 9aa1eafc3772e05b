"""tokenizer_proc: text in, tokens to the scheduler; tokens back, text out to the owner.

Inboxes:
    front  ROUTER  api processes / clients -> GenerateRequest | Abort | TokenizeRequest |
                                              DetokenizeRequest | Ping
    engine DEALER  scheduler (one per replica) -> TokenDeltas | SchedulerStats
    bus    SUB     registry (with replicas)    -> ReplicaAnnounce | LoadReport | KVEventBatch
A request's prompt is built and its token ids checked against the vocabulary here
(validation.py); its length against the context is the scheduler's to check. Each request's
incremental detokenizer and stop-string checker live here; a stop string ends the request
(an Abort goes upstream so its KV blocks are freed at once).

Prompts are rendered and tokenized on one worker thread, never on the event loop: a
multi-megabyte prompt or a burst of them must not stop this process answering pings and
streaming everyone else's text. A request is *pending* while its prompt is built; an Abort
(or a reused id) arriving meanwhile still takes effect, and the thread's results are handled
back on the loop in arrival order, so requests reach the scheduler in the order they came.

Replicas (replicas.py): each request goes to the replica the Router picks (the one fixed
scheduler without a registry) and stays there; its deltas count only from that replica, and
its Abort goes there. A replica that fails a request before its first token (its worker died,
restarted or is not ready: a 503), whose scheduler goes silent, or that leaves the Router's
rotation, has such requests re-sent once to another replica, transparently; a request that
already streamed text ends with the error instead, since its text cannot be taken back.

No work runs for nobody: an owner (api process, client) that disconnects, stops reading its
replies (the front ROUTER is mandatory: such a reply fails instead of vanishing) or is silent
for a few heartbeat timeouts has all its requests aborted upstream; if it speaks again, it
is told they were lost. Requests failed because the scheduler went silent are aborted too,
so a scheduler that was only stalled frees them when it reads again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor

import zmq
import zmq.asyncio

from zeroserve.shared import tracing
from zeroserve.shared.client import overloaded
from zeroserve.shared.config import EngineConfig
from zeroserve.shared.ipc import (
    Codec,
    PeerGone,
    SendError,
    bind,
    has_unread,
    receive_routed,
    send_now,
    start_authenticator,
)
from zeroserve.shared.messages import (
    Abort,
    DetokenizeRequest,
    EngineRequest,
    EngineStatus,
    ErrorInfo,
    GenerateRequest,
    Ping,
    Pong,
    TextDelta,
    TokenDelta,
    TokenDeltas,
    TokenizeRequest,
    TokenizeResult,
    TokenizerInbox,
)
from zeroserve.shared.proc_main import parse_proc_args, run_actor
from zeroserve.tokenizer_proc.errors import TokenizerError
from zeroserve.tokenizer_proc.pooling import pooling_error
from zeroserve.tokenizer_proc.replicas import ReplicaSet
from zeroserve.tokenizer_proc.requests import RequestState
from zeroserve.tokenizer_proc.structured import preload as preload_structured
from zeroserve.tokenizer_proc.tokenizer import load_tokenizer
from zeroserve.tokenizer_proc.tracing import PromptTiming
from zeroserve.tokenizer_proc.validation import PromptCache, build_prompt, check_token_ids

log = logging.getLogger("zeroserve.tokenizer")

LOST_KEPT_S = 300.0  # how long the ids of an abandoned owner's requests wait for it to come back


class TokenizerProcess:
    def __init__(self, config: EngineConfig, index: int):
        self.config = config
        self.tokenizer = load_tokenizer(config.model)
        preload_structured()  # xgrammar's import stalls the GIL for ~1 s: never while serving
        self.tokenizer.tool_format = config.tool_call_parser
        self.ctx = zmq.asyncio.Context()
        self.auth = start_authenticator(self.ctx, config.curve)
        # mandatory: a reply to a dead or stalled owner fails, and its requests are aborted
        self.front = bind(self.ctx, zmq.ROUTER, config.tokenizer_address(index), config.curve, mandatory=True)
        identity = f"tokenizer-{index}-{os.getpid()}".encode()
        self.replicas = ReplicaSet(config, self.ctx, identity, self)
        self.front_codec: Codec = Codec(TokenizerInbox, f"tokenizer-{index}.front")
        self.encoder = self.front_codec.encoder
        self.requests: dict[str, RequestState] = {}
        # request id -> owner, while its prompt is built on self.work (not yet at the scheduler)
        self.pending: dict[str, bytes] = {}
        # one thread: FIFO, so results come back in arrival order; the tokenizer and the chat
        # template are only ever used by it (the loop only decodes, for the detokenizers)
        self.work = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self.prompt_cache = PromptCache()  # used on self.work only
        self.owner_seen: dict[bytes, float] = {}  # front identity -> when it last sent anything
        # front identity -> (when, ids) of requests aborted because it was silent, stalled or
        # unreachable: told to it if it speaks again, so that a paused client does not wait forever
        self.lost: dict[bytes, tuple[float, list[str]]] = {}
        self.draining = False
        self.index = index
        self.tracer = tracing.init("tokenizer", config)

    # ------------------------------------------------------------------ inbox: api / clients
    async def front_loop(self) -> None:
        while True:
            identity, msg = await receive_routed(self.front, self.front_codec)
            self.heard_from(identity)
            match msg:
                case GenerateRequest():
                    self.on_generate(identity, msg)
                case Abort():
                    self.on_abort(identity, msg)
                case TokenizeRequest():
                    self.off_loop(identity, self.on_tokenize, msg)
                case DetokenizeRequest():
                    self.off_loop(identity, self.on_detokenize, msg)
                case Ping():
                    self.reply(identity, self.pong(msg))

    def reply(self, identity: bytes, msg) -> None:
        try:
            send_now(self.front, [identity, self.encoder.encode(msg)])
        except SendError as e:
            gone = isinstance(e, PeerGone)
            self.abandon_owner(identity, "disconnected" if gone else "stopped reading its replies")

    def fail(self, identity: bytes, request_id: str, error: ErrorInfo) -> None:
        self.reply(identity, TextDelta(request_id=request_id, text="", finish_reason="error", error=error))

    def off_loop(self, identity: bytes, handler, msg) -> None:
        """Run ``handler(msg)`` on the worker thread and reply with what it returns."""

        def done(fut: Future) -> None:
            try:
                result = fut.result()
            except Exception:  # the handlers answer every expected failure themselves
                log.exception(
                    "request %s: %s failed",
                    msg.request_id,
                    type(msg).__name__,
                    extra={"request_id": msg.request_id},
                )
                result = TokenizeResult(request_id=msg.request_id, error=internal())
            self.reply(identity, result)

        asyncio.get_running_loop().run_in_executor(self.work, handler, msg).add_done_callback(done)

    def on_generate(self, identity: bytes, req: GenerateRequest) -> None:
        if self.draining:
            self.fail(identity, req.request_id, unavailable("the server is shutting down"))
            return
        if not self.engine_alive():
            self.fail(
                identity,
                req.request_id,
                unavailable("the engine is not ready (model loading or a worker restarting); retry shortly"),
            )
            return
        error = pooling_error(req, self.config)  # embeddings, or a model that serves only those
        if error is not None:
            self.fail(identity, req.request_id, error)
            return
        # Guards this table, not the scheduler's: a reused id would take over the first request's text.
        if req.request_id in self.requests or req.request_id in self.pending:
            self.fail(identity, req.request_id, invalid("duplicate request id"))
            return
        self.pending[req.request_id] = identity
        build = functools.partial(
            build_prompt, self.tokenizer, req, self.max_model_len, self.config.vocab_size, self.prompt_cache
        )
        arrival = time.time()  # queue time and deadline count from here, tokenization included
        timing = None
        if req.trace is not None and self.tracer is not None:
            timing = PromptTiming()
            build = timing.timed(build)
        done = functools.partial(self.on_prompt_built, identity, req, arrival, timing)
        asyncio.get_running_loop().run_in_executor(self.work, build).add_done_callback(done)

    def on_prompt_built(
        self, identity: bytes, req: GenerateRequest, now: float, timing: PromptTiming | None, fut: Future
    ) -> None:
        """Back on the loop: send the request on, unless it was aborted while being built."""
        if self.pending.get(req.request_id) != identity:
            return  # aborted, or its owner abandoned, meanwhile: never sent, nothing to free
        del self.pending[req.request_id]
        try:
            prompt_ids, params = fut.result()
        except TokenizerError as e:  # an embedding's prompt is its `input`
            param = "input" if req.pooling is not None and e.param == "prompt" else e.param
            self.fail(identity, req.request_id, invalid(e.message, param))
            return
        except Exception:
            log.exception(
                "request %s: building the prompt failed", req.request_id, extra={"request_id": req.request_id}
            )
            self.fail(identity, req.request_id, internal())
            return
        replica = self.replicas.choose(prompt_ids, req.cache_salt, req.session)
        if replica is None:  # the scheduler(s) went silent while the prompt was built
            message = "the scheduler process stopped responding; retry"
            if self.replicas.router is not None:
                message = "no engine replica is serving (all loading, restarting or silent); retry shortly"
            self.fail(identity, req.request_id, unavailable(message))
            return
        engine_request = EngineRequest(
            request_id=req.request_id,
            prompt_token_ids=prompt_ids,
            params=params,
            arrival_time=now,
            priority=req.priority,
            deadline=None if req.deadline_s is None else now + req.deadline_s,
            queue_deadline=None if req.queue_timeout_s is None else now + req.queue_timeout_s,
            cache_salt=req.cache_salt,
            trace=None if timing is None else timing.spans(self.tracer, req, prompt_ids, replica.replica_id),
            pooling=req.pooling,
        )
        try:  # never an unbounded Python queue in front of a scheduler that stopped reading
            send_now(replica.sock, [self.encoder.encode(engine_request)])
        except SendError:
            self.fail(identity, req.request_id, overloaded("the scheduler is not taking requests"))
            return
        self.requests[req.request_id] = RequestState(
            self.tokenizer, identity, req, prompt_ids, engine_request, replica.replica_id
        )
        log.debug(
            "request %s: %d prompt tokens to replica %s",
            req.request_id,
            len(prompt_ids),
            replica.replica_id,
            extra={"request_id": req.request_id},
        )

    def on_abort(self, identity: bytes, msg: Abort) -> None:
        if self.pending.get(msg.request_id) == identity:
            del self.pending[msg.request_id]  # on_prompt_built drops it: the scheduler never hears of it
            return
        state = self.requests.get(msg.request_id)
        if state is None or state.owner != identity:  # only the connection that sent it may end it
            return
        del self.requests[msg.request_id]
        self.abort_upstream(state, msg.reason)

    def on_tokenize(self, req: TokenizeRequest) -> TokenizeResult:
        """/tokenize (on the worker thread)."""
        try:
            if req.messages is not None:
                text = self.tokenizer.apply_chat_template(
                    req.messages, add_generation_prompt=req.add_generation_prompt
                )
                ids = self.tokenizer.encode(text, add_special_tokens=False)
            else:
                ids = self.tokenizer.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
        except TokenizerError as e:  # our own: written for the client (no template, template raised)
            return TokenizeResult(request_id=req.request_id, error=invalid(e.message, e.param))
        except Exception:  # the text of anything else may carry internals: log it, say something fixed
            log.warning(
                "request %s: tokenize failed",
                req.request_id,
                exc_info=True,
                extra={"request_id": req.request_id},
            )
            message = "the prompt could not be tokenized" + (
                "; check the messages' roles and content" if req.messages is not None else ""
            )
            return TokenizeResult(request_id=req.request_id, error=invalid(message))
        return TokenizeResult(request_id=req.request_id, token_ids=ids, max_model_len=self.max_model_len)

    def on_detokenize(self, req: DetokenizeRequest) -> TokenizeResult:
        """/detokenize (on the worker thread)."""
        try:
            check_token_ids(
                req.token_ids, self.config.vocab_size or self.tokenizer.vocab_size, param="tokens"
            )
        except TokenizerError as e:
            return TokenizeResult(request_id=req.request_id, error=invalid(e.message, e.param))
        return TokenizeResult(
            request_id=req.request_id,
            token_ids=req.token_ids,
            text=self.tokenizer.decode(req.token_ids, skip_special_tokens=False),
        )

    @property
    def max_model_len(self) -> int:
        """The context the engine serves: the worker's (it may lower the configured value to
        what its KV pool holds), from the schedulers' stats (the smallest, with replicas); the
        configured one until known."""
        known = [r.stats.max_model_len for r in self.replicas.replicas.values() if r.stats.max_model_len]
        return min(known, default=self.config.max_model_len)

    def pong(self, ping: Ping) -> Pong:
        alive = self.engine_alive()
        stats, replicas = self.replicas.status(alive)
        engine = EngineStatus(
            model_name=self.config.served_model_name,
            max_model_len=self.max_model_len,
            vocab_size=self.config.vocab_size,
            draining=self.draining,
            bad_frames=self.front_codec.bad_frames + self.replicas.bad_frames(),
            stats=stats,
            replicas=replicas,
            router=self.replicas.router_stats(),
        )
        return Pong(
            sent_at=ping.sent_at,
            role="tokenizer",
            ready=alive and not self.draining,
            request_id=ping.request_id,
            engine=engine,
        )

    # ------------------------------------------------------------------ inbox: schedulers
    def on_engine_message(self, replica_id: str, msg) -> None:
        """A replica's message (its SchedulerStats are kept by self.replicas)."""
        if isinstance(msg, TokenDeltas):
            for delta in msg.deltas:
                self.on_delta(replica_id, delta)

    def on_delta(self, replica_id: str, delta: TokenDelta) -> None:
        state = self.requests.get(delta.request_id)
        if state is None or state.replica != replica_id:
            return  # aborted by its owner meanwhile, or re-sent elsewhere
        if delta.error is not None and delta.error.status == 503:
            self.replicas.mark_dead(replica_id)  # its worker died, restarted or is not ready
            if state.first and self.fail_over(state, delta.error.message, abort_old=False):
                return
        out = state.advance(delta)
        if out.finish_reason is not None:
            del self.requests[delta.request_id]
            self.log_end(out)
            if delta.finish_reason is None:  # we stopped it (stop string): free its blocks now
                self.abort_upstream(state, "stop")
        self.reply(state.owner, out)

    @staticmethod
    def log_end(out: TextDelta) -> None:
        """A request's end, under its id: engine failures (5xx) as warnings, the rest for debugging."""
        rid = out.request_id
        if out.error is not None and out.error.status >= 500:
            log.warning(
                "request %s failed (%d): %s",
                rid,
                out.error.status,
                out.error.message,
                extra={"request_id": rid},
            )
        elif log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request %s finished: %s, %d output tokens on replica %s",
                rid,
                out.finish_reason,
                out.num_output_tokens,
                out.replica,
                extra={"request_id": rid},
            )

    def fail_over(self, state: RequestState, why: str, abort_old: bool) -> bool:
        """Re-send a request that has not streamed a token to another replica, once; False when
        it was re-sent already or no other replica can take it."""
        if state.resent or self.replicas.router is None or state.engine_request is None:
            return False
        req = state.req
        replica = self.replicas.choose(
            state.prompt_ids, req.cache_salt, req.session, exclude=(state.replica,)
        )
        if replica is None:
            return False
        try:
            send_now(replica.sock, [self.encoder.encode(state.engine_request)])
        except SendError:
            return False
        if abort_old:  # it may only be slow: when it reads again, the Abort frees the request
            self.abort_upstream(state, "moved to another replica")
        log.warning(
            "request %s: replica %s lost it before its first token (%s); re-sent to %s",
            req.request_id,
            state.replica,
            why,
            replica.replica_id,
            extra={"request_id": req.request_id},
        )
        state.replica, state.resent = replica.replica_id, True
        self.replicas.failovers += 1
        return True

    # ------------------------------------------------------------------ liveness
    def engine_alive(self) -> bool:
        """Whether a replica serves: its scheduler answers, its worker is ready (and, with a
        registry, the Router hears from it)."""
        return self.replicas.any_serving()

    async def heartbeat_loop(self) -> None:
        while True:
            self.replicas.ping_all()
            await asyncio.sleep(self.config.heartbeat_interval_s)
            silent, left = self.replicas.check_serving()
            for replica in silent:
                self.on_replica_silent(replica.replica_id)
            for replica in left:
                self.on_replica_left(replica.replica_id, lost=not replica.stats.workers_ready)
            self.check_owners()

    def requests_on(self, replica_id: str) -> list[tuple[str, RequestState]]:
        return [(rid, state) for rid, state in self.requests.items() if state.replica == replica_id]

    def on_replica_silent(self, replica_id: str) -> None:
        """Its scheduler stopped answering: requests without a token move to another replica
        (if there is one), the others fail."""
        mine = self.requests_on(replica_id)
        if self.replicas.router is None:
            log.error("scheduler went silent; failing %d in-flight request(s)", len(mine))
        else:
            log.error("replica %s: scheduler went silent with %d request(s) in flight", replica_id, len(mine))
        for request_id, state in mine:
            if state.first and self.fail_over(state, "its scheduler went silent", abort_old=True):
                continue
            # it may only be stalled: when it reads again, the Abort frees the request
            self.abort_upstream(state, "scheduler silent")
            del self.requests[request_id]
            self.fail(state.owner, request_id, unavailable("the scheduler process stopped responding; retry"))

    def on_replica_left(self, replica_id: str, lost: bool) -> None:
        """The Router stopped hearing it (within a second), or its worker is down. Requests
        without a token move at once. The rest stay, to finish or to get the scheduler's own
        error, unless ``lost``: a scheduler without a ready worker has failed everything it held,
        so what is still mapped to it here (sent just before a restart) will never finish."""
        for request_id, state in self.requests_on(replica_id):
            if state.first and self.fail_over(state, "it left the rotation", abort_old=True):
                continue
            if lost:
                del self.requests[request_id]
                self.fail(
                    state.owner,
                    request_id,
                    unavailable(f"engine replica {replica_id} lost its model worker; retry the request"),
                )

    def on_replica_restarted(self, replica_id: str) -> None:
        """Its scheduler is a new process, which never heard of our requests there (or got one
        queued while it was down: the Abort makes sure it does not run for no one)."""
        for request_id, state in self.requests_on(replica_id):
            if state.first and self.fail_over(state, "its scheduler restarted", abort_old=True):
                continue
            self.abort_upstream(state, "scheduler restarted")
            del self.requests[request_id]
            self.fail(
                state.owner,
                request_id,
                unavailable(f"engine replica {replica_id} restarted and lost the request; retry"),
            )

    # ------------------------------------------------------------------ owners (api processes, clients)
    def heard_from(self, identity: bytes) -> None:
        self.owner_seen[identity] = time.monotonic()
        if self.lost and identity in self.lost:
            _, request_ids = self.lost.pop(identity)
            for request_id in request_ids:
                self.fail(
                    identity,
                    request_id,
                    unavailable(
                        "the request was aborted: this client stopped answering the engine "
                        "(silent or not reading its replies); retry"
                    ),
                )

    def check_owners(self) -> None:
        """Abort the requests of an owner silent for a few heartbeat timeouts: clients ping
        every heartbeat_interval_s, so it is dead or hung and no one will read their text."""
        now = time.monotonic()
        for identity, (when, _) in list(self.lost.items()):
            if now - when > LOST_KEPT_S:  # it never came back
                del self.lost[identity]
        if has_unread(self.front):
            return  # this process was late: the owners may not be silent
        limit = max(self.config.heartbeat_timeout_s * 3, 2.0)
        for identity, seen in list(self.owner_seen.items()):
            if now - seen > limit:
                self.abandon_owner(identity, f"has been silent for {now - seen:.1f}s")

    def abandon_owner(self, identity: bytes, why: str) -> None:
        """Abort every request of an owner that cannot take their text any more, so that none
        keeps generating for nobody."""
        self.owner_seen.pop(identity, None)
        building = [request_id for request_id, owner in self.pending.items() if owner == identity]
        for request_id in building:
            del self.pending[request_id]  # on_prompt_built drops it: the scheduler never hears of it
        orphans = [request_id for request_id, state in self.requests.items() if state.owner == identity]
        for request_id in orphans:
            self.abort_upstream(self.requests.pop(request_id), "client gone")
        if building or orphans:
            log.warning(
                "client %r %s; aborted its %d request(s)", identity, why, len(building) + len(orphans)
            )
            _, earlier = self.lost.get(identity, (0.0, []))
            self.lost[identity] = (time.monotonic(), earlier + building + orphans)

    def abort_upstream(self, state: RequestState, reason: str) -> None:
        """Tell the request's replica. Best effort: if the scheduler is not reading, its own
        watchdog frees the requests of a tokenizer that stopped pinging it."""
        request_id = state.req.request_id
        replica = self.replicas.replicas.get(state.replica)
        if replica is None:
            return  # it left: its scheduler is gone, and the request with it
        try:
            send_now(replica.sock, [self.encoder.encode(Abort(request_id=request_id, reason=reason))])
        except SendError:
            log.debug("could not send Abort for %s: the scheduler is not reading", request_id)

    async def drain(self) -> None:
        """Refuse new work, let in-flight requests finish (bounded), then stop."""
        self.draining = True
        deadline = time.monotonic() + 120
        while (self.requests or self.pending) and time.monotonic() < deadline and self.engine_alive():
            await asyncio.sleep(0.05)

    def close(self) -> None:
        self.work.shutdown(wait=False, cancel_futures=True)  # prompts no one will send on
        self.replicas.close()

    async def run(self) -> None:
        log.info("tokenizer %d listening on %s", self.index, self.config.tokenizer_address(self.index))
        await asyncio.gather(self.front_loop(), self.heartbeat_loop(), self.replicas.registry_loop())


def invalid(message: str, param: str | None = None) -> ErrorInfo:
    return ErrorInfo(status=400, type="invalid_request_error", message=message, param=param)


def unavailable(message: str) -> ErrorInfo:
    return ErrorInfo(status=503, type="service_unavailable", message=message)


def internal() -> ErrorInfo:
    """A failure of ours, not the request's: the details are in this process' log."""
    return ErrorInfo(
        status=500, type="server_error", message="the tokenizer failed on this request; see the server log"
    )


def main(argv: list[str] | None = None) -> None:
    config, args = parse_proc_args("tokenizer", argv)
    run_actor("tokenizer", lambda: TokenizerProcess(config, args.index))

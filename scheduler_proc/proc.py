"""scheduler_proc: the actor that owns the Scheduler.

Inboxes:
    front   ROUTER  tokenizers -> EngineRequest | Abort | Ping
    workers ROUTER  workers    -> WorkerReady | StepResult | WorkerGone | Pong (heartbeats)
Loop: drain the inboxes, schedule one step, send the StepPlan to every worker, take the
StepResult, send TokenDeltas to the tokenizer that owns each request. One plan in flight;
new requests and aborts are received while a step runs.

Liveness: workers send a heartbeat every ``heartbeat_interval_s`` from a side thread; a
worker silent for ``heartbeat_timeout_s`` (or one that says ready again: it restarted) is
dead: every request fails with finish reason "error" and the KV pool starts empty once a
worker is ready again; a worker that says it is gone (WorkerGone: its tensor-parallel group
broke) is dead at once. Heartbeats come from a side thread, so they cannot tell a stuck
forward pass: a step not answered within ``step_timeout_s`` is treated the same way, and the
worker is sent ``WorkerExit`` (as is one that went silent, in case it was only paused) so that
its supervisor restarts it. Tokenizers ping us; one silent for the timeout has its requests
aborted, since no one could receive their tokens. An Abort counts only from the tokenizer
that sent the request.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
import zmq
import zmq.asyncio

from zeroserve.scheduler_proc.kv_events import ReplicaPublisher
from zeroserve.scheduler_proc.scheduler import AdmissionError, Scheduler, SchedulerConfig
from zeroserve.scheduler_proc.tracing import RequestTraces
from zeroserve.shared import tracing
from zeroserve.shared.config import EngineConfig
from zeroserve.shared.ipc import Codec, bind, has_unread, receive_routed, start_authenticator
from zeroserve.shared.messages import (
    Abort,
    EngineRequest,
    ErrorInfo,
    Ping,
    Pong,
    SchedulerInbox,
    SchedulerStats,
    SchedulerWorkerInbox,
    StepPlan,
    StepResult,
    TokenDelta,
    TokenDeltas,
    WorkerExit,
    WorkerGone,
    WorkerReady,
)
from zeroserve.shared.proc_main import parse_proc_args, run_actor

log = logging.getLogger("zeroserve.scheduler")


class SchedulerProcess:
    def __init__(self, config: EngineConfig, replica: int = 0):
        self.config = config
        self.replica = replica  # which of the data_parallel_size replicas this scheduler is
        self.started_at = time.time()  # in every SchedulerStats: tokenizers tell a restart by it
        self.ctx = zmq.asyncio.Context()
        self.auth = start_authenticator(self.ctx, config.curve)
        self.front = bind(self.ctx, zmq.ROUTER, config.scheduler_address_of(replica), config.curve)
        self.workers = bind(self.ctx, zmq.ROUTER, config.worker_address_of(replica), config.curve)
        self.front_codec: Codec = Codec(SchedulerInbox, "scheduler.front")
        self.worker_codec: Codec = Codec(SchedulerWorkerInbox, "scheduler.workers")
        self.encoder = self.front_codec.encoder
        self.scheduler: Scheduler | None = None
        self.worker_identity: bytes | None = None
        self.worker_ready: WorkerReady | None = None
        self.worker_seen = 0.0
        self.owner: dict[str, bytes] = {}  # request_id -> tokenizer identity
        self.tokenizer_seen: dict[bytes, float] = {}
        # step_id -> the worker's answer, awaited by run_step; None: the worker was lost meanwhile
        self.step_waiters: dict[int, asyncio.Future[StepResult | None]] = {}
        self.wake = asyncio.Event()
        tracer = tracing.init("scheduler", config)
        self.traces = None if tracer is None else RequestTraces(tracer, config.served_model_name)
        # with several replicas: announce, load reports and KV events on the registry bus
        self.publisher = (
            ReplicaPublisher(self.ctx, config, replica, self.stats) if config.uses_registry else None
        )

    # ------------------------------------------------------------------ inbox: tokenizers
    async def front_loop(self) -> None:
        while True:
            identity, msg = await receive_routed(self.front, self.front_codec)
            self.tokenizer_seen[identity] = time.monotonic()
            match msg:
                case EngineRequest():
                    self.on_request(identity, msg)
                case Abort():
                    self.on_abort(identity, msg.request_id, msg.reason)
                case Ping():
                    await self.front.send_multipart([identity, self.encoder.encode(self.stats())])

    def on_request(self, identity: bytes, req: EngineRequest) -> None:
        if self.scheduler is None:
            self.reply_error(
                identity,
                req.request_id,
                ErrorInfo(
                    status=503,
                    type="service_unavailable",
                    message="the model worker is not ready yet (loading or restarting); retry shortly",
                ),
            )
            return
        try:  # add_request refuses what never fits, a full queue and an id already in use
            self.scheduler.add_request(req)
        except AdmissionError as e:
            log.debug("request %s refused: %s", req.request_id, e, extra={"request_id": req.request_id})
            if req.trace is not None and self.traces is not None:
                self.traces.refused(req, e.to_error_info())
            self.reply_error(identity, req.request_id, e.to_error_info())
            return
        if req.trace is not None and self.traces is not None:
            self.traces.admitted(req)
        self.owner[req.request_id] = identity
        self.wake.set()
        log.debug(
            "request %s queued: %d prompt tokens, priority %d",
            req.request_id,
            len(req.prompt_token_ids),
            req.priority,
            extra={"request_id": req.request_id},
        )

    def on_abort(self, identity: bytes, request_id: str, reason: str = "abort") -> None:
        if self.owner.get(request_id) != identity:
            log.debug("ignored an Abort of %r from %r, which did not send it", request_id, identity)
            return
        self.abort(request_id, reason)

    def abort(self, request_id: str, reason: str = "abort") -> None:
        if self.owner.pop(request_id, None) is not None and self.scheduler is not None:
            if self.traces is not None:
                self.traces.aborted(self.scheduler.request(request_id), reason)
            self.scheduler.abort(request_id)
            self.wake.set()

    def reply_error(self, identity: bytes, request_id: str, error: ErrorInfo) -> None:
        delta = TokenDelta(request_id=request_id, token_ids=[], finish_reason="error", error=error)
        self.front.send_multipart([identity, self.encoder.encode(TokenDeltas(deltas=[delta]))])

    # ------------------------------------------------------------------ inbox: workers
    async def worker_loop(self) -> None:
        while True:
            identity, msg = await receive_routed(self.workers, self.worker_codec)
            match msg:
                case Pong():
                    if self.worker_ready is not None and msg.role == "worker":
                        self.worker_seen = time.monotonic()
                case WorkerReady():
                    self.on_worker_ready(identity, msg)
                case WorkerGone():
                    if self.worker_ready is not None:
                        self.on_worker_dead(msg.reason)
                case StepResult():
                    waiter = self.step_waiters.pop(msg.step_id, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(msg)

    def on_worker_ready(self, identity: bytes, ready: WorkerReady) -> None:
        if self.worker_ready is not None:
            self.fail_all("the model worker restarted; the request was lost")
        cfg = self.config
        max_model_len = ready.max_model_len
        self.scheduler = Scheduler(
            SchedulerConfig.from_engine(
                cfg,
                num_blocks=ready.num_kv_blocks,
                max_model_len=max_model_len,
                eos_token_ids=ready.eos_token_ids,
            )
        )
        self.worker_identity = identity
        self.worker_ready = ready
        self.worker_seen = time.monotonic()
        if self.publisher is not None:
            self.publisher.attach(self.scheduler.blocks, ready)
        log.info(
            "worker rank %d ready: %d KV blocks of %d tokens, max_model_len %d (loaded in %.1fs)",
            ready.rank,
            ready.num_kv_blocks,
            ready.block_size,
            max_model_len,
            ready.load_time_s,
        )
        self.wake.set()

    def on_worker_dead(self, why: str, message: str | None = None) -> None:
        log.error("model worker lost (%s); failing its requests and waiting for a restart", why)
        self.fail_all(message or f"the model worker died ({why}); retry the request")
        self.worker_ready = None
        self.worker_identity = None
        self.scheduler = None
        if self.publisher is not None:
            self.publisher.detach()

    def on_worker_stuck(self, why: str, message: str | None = None) -> None:
        """Give up on a worker that may still be alive (a step that never ends, heartbeats that
        stopped): it exits when it reads WorkerExit, so its supervisor starts a fresh one, rather
        than coming back with state the new scheduler knows nothing about."""
        if self.worker_identity is not None:
            self.workers.send_multipart([self.worker_identity, self.encoder.encode(WorkerExit(reason=why))])
        self.on_worker_dead(why, message)

    def fail_all(self, message: str) -> None:
        by_owner: dict[bytes, list[TokenDelta]] = {}
        for request_id, identity in self.owner.items():
            by_owner.setdefault(identity, []).append(
                TokenDelta(
                    request_id=request_id,
                    token_ids=[],
                    finish_reason="error",
                    error=ErrorInfo(status=503, type="service_unavailable", message=message),
                )
            )
        for identity, deltas in by_owner.items():
            self.front.send_multipart([identity, self.encoder.encode(TokenDeltas(deltas=deltas))])
        self.owner.clear()
        if self.traces is not None:
            self.traces.lost(message)
        for waiter in self.step_waiters.values():  # release a step waiting on a dead worker
            if not waiter.done():
                waiter.set_result(None)
        self.step_waiters.clear()

    # ------------------------------------------------------------------ the step loop
    async def step_loop(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.scheduler is not None:
                plan = self.scheduler.schedule(time.time())
                self.send_deltas(self.scheduler.drain_outputs())
                if plan is None:
                    break
                await self.run_step(plan)
                if self.publisher is not None:
                    self.publisher.flush()

    async def run_step(self, plan: StepPlan) -> None:
        waiter = self.step_waiters[plan.step_id] = asyncio.get_running_loop().create_future()
        if self.traces is not None:
            plan = self.traces.on_plan(plan)
        sent = time.perf_counter()
        await self.workers.send_multipart([self.worker_identity, self.encoder.encode(plan)])
        try:
            result = await asyncio.wait_for(waiter, self.config.step_timeout_s)
        except TimeoutError:
            why = f"step {plan.step_id} ran for more than step_timeout_s={self.config.step_timeout_s:g}s"
            self.on_worker_stuck(
                why, f"the model worker stalled ({why}) and is restarting; retry the request"
            )
            return
        if result is None or self.scheduler is None:
            return  # the worker died mid-step; fail_all has answered every request
        if result.error is not None:
            self.on_worker_dead(f"step failed: {result.error}")
            return
        # the step cost model learns the step as a token's wait sees it: the worker's compute
        # and both trips over the socket (on a busy machine the trips are not negligible)
        round_trip = time.perf_counter() - sent
        if round_trip > result.step_time_s:
            result = msgspec.structs.replace(result, step_time_s=round_trip)
        deltas = self.scheduler.update_from_output(result)
        self.send_deltas(deltas)

    def send_deltas(self, deltas: list[TokenDelta]) -> None:
        if self.traces is not None and deltas:
            self.traces.on_deltas(deltas)
        by_owner: dict[bytes, list[TokenDelta]] = {}
        for d in deltas:
            identity = self.owner.get(d.request_id)
            if identity is None:
                continue  # aborted meanwhile
            if d.finish_reason is not None:
                del self.owner[d.request_id]
            by_owner.setdefault(identity, []).append(d)
        for identity, group in by_owner.items():
            self.front.send_multipart([identity, self.encoder.encode(TokenDeltas(deltas=group))])

    # ------------------------------------------------------------------ liveness and stats
    def stats(self) -> SchedulerStats:
        if self.scheduler is None:
            return SchedulerStats(workers_ready=False, started_at=self.started_at)
        return msgspec.structs.replace(
            self.scheduler.stats(),
            workers_ready=True,
            max_model_len=self.scheduler.cfg.max_model_len,
            started_at=self.started_at,
        )

    async def watchdog_loop(self) -> None:
        cfg = self.config
        while True:
            await asyncio.sleep(cfg.heartbeat_interval_s)
            now = time.monotonic()
            # peers are judged only once their queued messages have been read
            if (
                self.worker_ready is not None
                and now - self.worker_seen > cfg.heartbeat_timeout_s
                and not has_unread(self.workers)
            ):
                self.on_worker_stuck(f"no heartbeat for {now - self.worker_seen:.1f}s")
            if has_unread(self.front):
                continue
            for identity, seen in list(self.tokenizer_seen.items()):
                if now - seen > max(cfg.heartbeat_timeout_s * 4, 2.0):
                    del self.tokenizer_seen[identity]
                    orphans = [r for r, owner in self.owner.items() if owner == identity]
                    if orphans:
                        log.warning(
                            "tokenizer %r went silent; aborting its %d request(s)", identity, len(orphans)
                        )
                    for request_id in orphans:
                        self.abort(request_id, "tokenizer silent")

    async def run(self) -> None:
        log.info(
            "scheduler listening on %s (tokenizers) and %s (workers)",
            self.config.scheduler_address_of(self.replica),
            self.config.worker_address_of(self.replica),
        )
        loops = [self.front_loop(), self.worker_loop(), self.step_loop(), self.watchdog_loop()]
        if self.publisher is not None:
            loops.append(self.publisher.run())
        await asyncio.gather(*loops)


def main(argv: list[str] | None = None) -> None:
    config, args = parse_proc_args("scheduler", argv)
    run_actor("scheduler", lambda: SchedulerProcess(config, args.replica))

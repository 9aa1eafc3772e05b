"""gpu_worker: loads the model, says how much KV it holds, then executes StepPlans.

The worker is compute-bound, so its inbox is read with a plain blocking receive between
steps (nothing else could run during a forward anyway); a side thread with its own socket
sends heartbeats so the scheduler can tell a long step from a dead process.

A stuck step cannot be interrupted from inside the process, so a stalled worker ends itself
and its supervisor (``zeroserve serve``, supervisord, systemd) starts a fresh one: the
scheduler, which times every step, fails the step's requests after ``step_timeout_s`` and
sends ``WorkerExit`` (read here as soon as the step returns); if the step never returns,
the heartbeat thread exits the process once the step is ``STEP_EXIT_GRACE_S`` past the
same limit.

Tensor parallel (``--tensor-parallel-size N``, gpu_worker/parallel.py): N processes, one per
rank. Rank 0 is the worker the scheduler knows; it forwards every frame it receives to the
others (``GroupLink.forward``) before running it, and only it answers. The other ranks
heart-beat to rank 0's heartbeat thread, which watches them: a rank that dies (its socket
closes) or goes silent for ``heartbeat_timeout_s`` is reported to the scheduler
(``WorkerGone``, naming it: the group's requests fail at once, in a step or between two), and
rank 0 exits; a rank whose rank 0 is gone exits too. A broken group is never
mended: every rank exits with EXIT_STALLED and the supervisor starts the group again.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time
from typing import NoReturn

import msgspec
import zmq
import zmq.utils.monitor

from zeroserve.gpu_worker.tracing import StepSpans
from zeroserve.shared import env, tracing
from zeroserve.shared.config import EngineConfig
from zeroserve.shared.ipc import Codec, bind, connect, receive_blocking
from zeroserve.shared.messages import (
    Pong,
    StepPlan,
    StepResult,
    WorkerExit,
    WorkerGone,
    WorkerInbox,
    WorkerReady,
)
from zeroserve.shared.proc_main import die_with_parent, parse_proc_args

log = logging.getLogger("zeroserve.worker")

# The worker's own limit is this far past the scheduler's, so the scheduler (which owns the
# requests) reports the stall first; this limit is the backstop for a step that never returns.
STEP_EXIT_GRACE_S = 2.0
EXIT_STALLED = 75  # EX_TEMPFAIL: not a clean exit, so every supervisor restarts the worker


def exit_for_restart(why: str) -> NoReturn:
    """End the process now, from any thread: a stuck step holds the main thread, and clean
    interpreter shutdown would wait for it."""
    log.error("worker exiting to be restarted: %s", why)  # the stderr handler flushes each record
    os._exit(EXIT_STALLED)


def send_then_exit(sock: zmq.Socket, frame: bytes, why: str) -> NoReturn:
    """Send ``frame`` (an error for the scheduler), wait until it has left, then exit."""
    sock.send(frame)
    sock.close(linger=1000)  # os._exit would kill zmq's I/O thread with the frame still queued
    sock.context.term()
    exit_for_restart(why)


STOPPING = threading.Event()  # SIGTERM: the group is being stopped, a rank leaving is expected
TP_GROUP = threading.Event()  # this process is a rank of a tensor-parallel group


class PeerWatch:
    """Rank 0's view of the other ranks' heartbeats (PULL): which rank is lost, and why."""

    FIRST_BEAT_GRACE_S = 5.0

    def __init__(self, ctx: zmq.Context, config: EngineConfig, replica: int):
        self.config = config
        self.sock = bind(ctx, zmq.PULL, config.tp_heartbeat_address_of(replica), config.curve)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.codec: Codec = Codec(Pong, "worker-0.peers")
        # the others start heart-beating a moment after rank 0 starts watching: a first beat
        # gets this much more time than the timeout
        first = time.monotonic() + self.FIRST_BEAT_GRACE_S
        self.seen = {r: first for r in range(1, config.tensor_parallel_size)}

    def lost(self) -> str | None:
        while self.sock.poll(0):
            pong = self.codec.decode(self.sock.recv())
            rank = "" if pong is None else pong.role.removeprefix("worker-")
            if rank.isdigit() and int(rank) in self.seen:  # anything else is a stray frame: dropped
                self.seen[int(rank)] = time.monotonic()
        if self.monitor.poll(0):
            return "a tensor-parallel rank died (its heartbeat connection closed)"
        now = time.monotonic()
        for rank, seen in self.seen.items():
            if now - seen > self.config.heartbeat_timeout_s:
                return f"tensor-parallel rank {rank} sent no heartbeat for {now - seen:.1f}s"
        return None

    def close(self) -> None:
        self.monitor.close(0)
        self.sock.close(0)


class Heartbeat(threading.Thread):
    """Sends Pong(role="worker") every interval on its own socket (zmq sockets are not
    thread-safe), and ends the process when the step in progress (``step_started``, set by the
    main thread) has run past ``step_timeout_s + STEP_EXIT_GRACE_S``.

    Tensor parallel: rank 0 also watches the other ranks (``PeerWatch``) and, when one is lost,
    tells the scheduler why (``WorkerGone``: it fails the requests the group held at once, in a
    step or between two), then exits; the other ranks send Pong(role="worker-R") to rank 0 and
    exit when its connection closes."""

    def __init__(self, config: EngineConfig, rank: int, replica: int = 0):
        super().__init__(name="heartbeat", daemon=True)
        self.config, self.rank, self.replica = config, rank, replica
        self.stop = threading.Event()
        self.step_started: float | None = None  # time.monotonic() when the current step began

    def run(self) -> None:
        ctx = zmq.Context()
        config, group = self.config, self.config.tensor_parallel_size > 1
        if self.rank == 0:
            identity = f"worker-{self.rank}-hb-{os.getpid()}".encode()
            sock = connect(ctx, zmq.DEALER, config.worker_address_of(self.replica), config.curve, identity)
            role = "worker"
        else:
            sock = connect(ctx, zmq.PUSH, config.tp_heartbeat_address_of(self.replica), config.curve)
            role = f"worker-{self.rank}"
        peers = PeerWatch(ctx, config, self.replica) if group and self.rank == 0 else None
        leader = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED) if self.rank > 0 else None
        encoder = Codec(Pong, "worker.heartbeat").encoder
        limit = config.step_timeout_s + STEP_EXIT_GRACE_S
        while not self.stop.wait(config.heartbeat_interval_s):
            started = self.step_started
            if started is not None and time.monotonic() - started > limit:
                exit_for_restart(f"a step has run for more than {limit:g}s (step_timeout_s + grace)")
            if peers is not None and not STOPPING.is_set() and (why := peers.lost()) is not None:
                peers.close()
                send_then_exit(sock, encoder.encode(WorkerGone(reason=why)), why)
            if leader is not None and leader.poll(0) and not STOPPING.is_set():
                exit_for_restart("tensor-parallel rank 0 is gone (its connection closed)")
            sock.send(encoder.encode(Pong(sent_at=time.time(), role=role)))
        for s in (peers, leader, sock):
            if s is not None:
                s.close(0)
        ctx.term()


def injected_stall(path: str | None) -> None:
    """Test-only fault (ZEROSERVE_FAULT_STEP_SLEEP_FILE): when the file exists, consume it and
    sleep for the seconds it holds, inside the step, as a hung forward pass would."""
    if path is None:
        return
    try:
        with open(path) as f:
            seconds = float(f.read())
        os.unlink(path)
    except (OSError, ValueError):  # absent, or still being written: no fault this step
        return
    log.warning("fault injection: this step sleeps %.1fs", seconds)
    time.sleep(seconds)


def cpu_share(replica: int, replicas: int, cores: list[int]) -> list[int]:
    """Replica #replica's slice of ``cores`` when ``replicas`` split them evenly (the first ones
    get the remainder); with more replicas than cores, replicas share single cores round-robin."""
    if replicas >= len(cores):
        return [cores[replica % len(cores)]]
    size, extra = divmod(len(cores), replicas)
    start = replica * size + min(replica, extra)
    return cores[start : start + size + (replica < extra)]


def replica_placement(config: EngineConfig, replica: int, rank: int = 0) -> dict:
    """Where replica #replica's worker (rank ``rank`` of it) runs, as RunnerConfig overrides. On
    a CPU each worker is kept on its own share of the cores, so that replicas do not thrash each
    other's caches and OpenMP pools (torch threads: --num-threads, else the share's size); a
    replica's tensor-parallel ranks split its share again (and --num-threads). On a GPU worker
    r * N + rank takes that device (modulo the devices there are)."""
    replicas, ranks = config.data_parallel_size, config.tensor_parallel_size
    if replicas == 1 and ranks == 1:
        return {}
    if config.device == "cpu":
        share = sorted(os.sched_getaffinity(0))
        if replicas > 1:
            share = cpu_share(replica, replicas, share)
        if ranks > 1:
            share = cpu_share(rank, ranks, share)
        os.sched_setaffinity(0, share)
        log.info("replica %d rank %d: pinned to cores %s", replica, rank, ",".join(map(str, share)))
        return {"num_threads": max(1, config.num_threads // ranks) if config.num_threads else len(share)}
    if config.device == "cuda":
        import torch

        return {"device": f"cuda:{(replica * ranks + rank) % max(torch.cuda.device_count(), 1)}"}
    return {}


def serve(config: EngineConfig, rank: int, replica: int = 0) -> None:
    env.set_cpu_thread_env()
    placement = replica_placement(config, replica, rank)  # before torch starts its thread pool
    started = time.monotonic()
    if rank == 0 and not config.embedding_only:
        # xgrammar's import holds the GIL for about a second: done beside the weight loading, it
        # never stalls a step (nor the heartbeat thread) when the first constrained request comes
        from zeroserve.tokenizer_proc.structured import preload

        preload()
    from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig

    runner_config = msgspec.structs.replace(RunnerConfig.from_engine(config), **placement)
    link = None
    if config.tensor_parallel_size > 1:
        import torch

        from zeroserve.gpu_worker.parallel import GroupLink

        TP_GROUP.set()
        link = GroupLink(config, replica, rank)
        timeout = config.step_timeout_s + STEP_EXIT_GRACE_S
        runner = ModelRunner(runner_config, link.start(torch.device(runner_config.device), timeout))
        if rank > 0:
            follow(config, rank, replica, runner, link)
    else:
        runner = ModelRunner(runner_config)
    load_time = time.monotonic() - started

    ctx = zmq.Context()
    identity = f"worker-{rank}-{os.getpid()}".encode()
    sock = connect(ctx, zmq.DEALER, config.worker_address_of(replica), config.curve, identity)
    codec: Codec = Codec(WorkerInbox, f"worker-{rank}")
    ready = WorkerReady(
        rank=rank,
        num_kv_blocks=runner.num_kv_blocks,
        block_size=runner.block_size,
        max_model_len=runner.max_model_len,
        vocab_size=runner.vocab_size,
        eos_token_ids=list(runner.eos_token_ids),
        load_time_s=load_time,
    )
    heartbeat = Heartbeat(config, rank, replica)
    heartbeat.start()
    sock.send(codec.encode(ready))
    log.info(
        "worker rank %d ready in %.1fs: %d KV blocks, %s",
        rank,
        load_time,
        runner.num_kv_blocks,
        runner.quantization_summary,
    )
    fault_file = env.fault_step_sleep_file()
    tracer = tracing.init("worker", config) if rank == 0 and config.collect_detailed_traces else None
    steps = None if tracer is None else StepSpans(tracer)

    scheduler = SchedulerLink(sock)
    while True:
        while not scheduler.wait():  # the scheduler restarted: it knows nothing of this worker
            if link is not None:  # the other ranks hold request state too: the group starts over
                exit_for_restart("the scheduler restarted; the tensor-parallel group starts over")
            runner.reset()
            if steps is not None:
                steps.reset()
            sock.send(codec.encode(ready))
            log.warning("the scheduler restarted: this worker announced itself again (its requests are gone)")
        plan = receive_blocking(sock, codec) if link is None else receive_and_forward(sock, codec, link)
        if isinstance(plan, WorkerExit):
            exit_for_restart(f"the scheduler gave up on this worker: {plan.reason}")
        started = heartbeat.step_started = time.monotonic()
        try:
            injected_stall(fault_file)
            result = runner.execute(plan)
        except Exception as e:  # report, never die silently: the scheduler fails the step
            log.exception("step %d failed", plan.step_id)
            error = f"{type(e).__name__}: {e}"
            if link is not None:  # the ranks may be out of step now: the group starts over
                error = f"the tensor-parallel group failed (a rank died or erred): {collective_error(e)}"
            failed = StepResult(step_id=plan.step_id, request_ids=[], sampled_token_ids=[], error=error)
            if link is not None:
                send_then_exit(sock, codec.encode(failed), error)
            sock.send(codec.encode(failed))
            # state may be half-applied: forget every request and announce a fresh start
            runner.reset()
            if steps is not None:
                steps.reset()
            sock.send(codec.encode(ready))
            continue
        finally:
            heartbeat.step_started = None
        sock.send(codec.encode(result))
        if steps is not None:  # after the reply, so the tokens go out first (the next step waits instead)
            steps.record(plan, started, started + result.step_time_s)


class SchedulerLink:
    """Watches the connection to the scheduler. A scheduler restarted on its own (by
    ``zeroserve serve`` or a service manager) starts with no worker: the connection drops and
    comes back, and the worker must say WorkerReady again, or the new scheduler waits forever.
    (A replica's scheduler and workers share one machine, so the link drops only when the
    scheduler process ends; a dropped link is taken as a new scheduler.)"""

    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self.monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.dropped = False

    def wait(self) -> bool:
        """Block until a message waits on the socket (True), or the connection came back after
        a drop (False: announce again, then wait again)."""
        while True:
            ready = dict(self.poller.poll())
            if self.monitor in ready and self._reconnected():
                return False
            if self.sock in ready:
                return True

    def _reconnected(self) -> bool:
        back = False
        while self.monitor.poll(0):
            event = zmq.utils.monitor.recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self.dropped = True
            elif event == zmq.EVENT_CONNECTED and self.dropped:
                self.dropped, back = False, True
        return back


def collective_error(e: Exception) -> str:
    """A failed collective's message without gloo's source path and advice: "RuntimeError:
    Connection closed by peer [127.0.0.1]:1726"."""
    text = re.sub(r"^\[[^\]]*\] ", "", str(e)).split(". This is typically")[0]
    return f"{type(e).__name__}: {text[:200]}"


def receive_and_forward(sock: zmq.Socket, codec: Codec, link) -> StepPlan | WorkerExit:
    """Rank 0 of a group: the next message from the scheduler, sent on to every other rank
    as the bytes it came in (one encode, by the scheduler)."""
    while True:
        frame = sock.recv(copy=True)
        msg = codec.decode(frame)
        if msg is not None:
            link.forward(frame)
            return msg


def follow(config: EngineConfig, rank: int, replica: int, runner, link) -> NoReturn:
    """A tensor-parallel rank > 0: run every plan rank 0 forwards; never answer anyone."""
    heartbeat = Heartbeat(config, rank, replica)
    heartbeat.start()
    log.info(
        "worker rank %d ready: %d KV blocks, %s", rank, runner.num_kv_blocks, runner.quantization_summary
    )
    while True:
        plan = link.receive()
        if isinstance(plan, WorkerExit):
            exit_for_restart(f"rank 0 forwarded the scheduler's exit: {plan.reason}")
        heartbeat.step_started = time.monotonic()
        try:
            runner.execute(plan)
        except Exception:
            log.exception("step %d failed on tensor-parallel rank %d", plan.step_id, rank)
            exit_for_restart(f"step {plan.step_id} failed on tensor-parallel rank {rank}")
        heartbeat.step_started = None


def stop(*_) -> None:
    STOPPING.set()
    if TP_GROUP.is_set():  # a live gloo/NCCL group's destructors may abort the teardown (-6)
        logging.shutdown()
        os._exit(0)
    sys.exit(0)


def main(argv: list[str] | None = None) -> None:
    config, args = parse_proc_args("worker", argv)
    die_with_parent()
    signal.signal(signal.SIGTERM, stop)
    try:
        serve(config, args.index, args.replica)
    except KeyboardInterrupt:
        sys.exit(0)

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
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import NoReturn

import msgspec
import zmq

from zeroserve.shared import env
from zeroserve.shared.config import EngineConfig
from zeroserve.shared.ipc import Codec, connect, receive_blocking
from zeroserve.shared.messages import Pong, StepResult, WorkerExit, WorkerInbox, WorkerReady
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


class Heartbeat(threading.Thread):
    """Sends Pong(role="worker") every interval on its own socket (zmq sockets are not
    thread-safe), and ends the process when the step in progress (``step_started``, set by the
    main thread) has run past ``step_timeout_s + STEP_EXIT_GRACE_S``."""

    def __init__(self, config: EngineConfig, rank: int, replica: int = 0):
        super().__init__(name="heartbeat", daemon=True)
        self.config, self.rank, self.replica = config, rank, replica
        self.stop = threading.Event()
        self.step_started: float | None = None  # time.monotonic() when the current step began

    def run(self) -> None:
        ctx = zmq.Context()
        identity = f"worker-{self.rank}-hb-{os.getpid()}".encode()
        address = self.config.worker_address_of(self.replica)
        sock = connect(ctx, zmq.DEALER, address, self.config.curve, identity)
        encoder = Codec(Pong, "worker.heartbeat").encoder
        limit = self.config.step_timeout_s + STEP_EXIT_GRACE_S
        while not self.stop.wait(self.config.heartbeat_interval_s):
            started = self.step_started
            if started is not None and time.monotonic() - started > limit:
                exit_for_restart(f"a step has run for more than {limit:g}s (step_timeout_s + grace)")
            sock.send(encoder.encode(Pong(sent_at=time.time(), role="worker")))
        sock.close(0)
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


def replica_placement(config: EngineConfig, replica: int) -> dict:
    """Where replica #replica's worker runs, as RunnerConfig overrides. On a CPU each worker is
    kept on its own share of the cores, so that replicas do not thrash each other's caches and
    OpenMP pools (torch threads: --num-threads, else the share's size); on a GPU replica r takes
    device r (modulo the devices there are)."""
    if config.data_parallel_size == 1:
        return {}
    if config.device == "cpu":
        share = cpu_share(replica, config.data_parallel_size, sorted(os.sched_getaffinity(0)))
        os.sched_setaffinity(0, share)
        log.info("replica %d: pinned to cores %s", replica, ",".join(map(str, share)))
        return {"num_threads": config.num_threads or len(share)}
    if config.device == "cuda":
        import torch

        return {"device": f"cuda:{replica % max(torch.cuda.device_count(), 1)}"}
    return {}


def serve(config: EngineConfig, rank: int, replica: int = 0) -> None:
    env.set_cpu_thread_env()
    placement = replica_placement(config, replica)  # before torch starts its thread pool
    started = time.monotonic()
    from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig

    runner = ModelRunner(msgspec.structs.replace(RunnerConfig.from_engine(config), **placement))
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

    while True:
        plan = receive_blocking(sock, codec)
        if isinstance(plan, WorkerExit):
            exit_for_restart(f"the scheduler gave up on this worker: {plan.reason}")
        heartbeat.step_started = time.monotonic()
        try:
            injected_stall(fault_file)
            result = runner.execute(plan)
        except Exception as e:  # report, never die silently: the scheduler fails the step
            log.exception("step %d failed", plan.step_id)
            failed = StepResult(
                step_id=plan.step_id, request_ids=[], sampled_token_ids=[], error=f"{type(e).__name__}: {e}"
            )
            sock.send(codec.encode(failed))
            # state may be half-applied: forget every request and announce a fresh start
            runner.reset()
            sock.send(codec.encode(ready))
            continue
        finally:
            heartbeat.step_started = None
        sock.send(codec.encode(result))


def main(argv: list[str] | None = None) -> None:
    config, args = parse_proc_args("worker", argv)
    die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(config, args.index, args.replica)
    except KeyboardInterrupt:
        sys.exit(0)

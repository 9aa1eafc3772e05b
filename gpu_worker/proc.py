"""gpu_worker: loads the model, says how much KV it holds, then executes StepPlans.

The worker is compute-bound, so its inbox is read with a plain blocking receive between
steps (nothing else could run during a forward anyway); a side thread with its own socket
sends heartbeats so the scheduler can tell a long step from a dead process.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import zmq

from zeroserve.shared import env
from zeroserve.shared.config import EngineConfig
from zeroserve.shared.ipc import Codec, connect
from zeroserve.shared.messages import Ping, Pong, StepPlan, StepResult, WorkerInbox, WorkerReady
from zeroserve.shared.proc_main import die_with_parent, parse_proc_args

log = logging.getLogger("zeroserve.worker")


def runner_config(config: EngineConfig):
    from zeroserve.gpu_worker.model_runner import RunnerConfig

    return RunnerConfig(
        model=config.model,
        dtype=config.dtype,
        kv_cache_dtype=config.kv_cache_dtype,
        device=config.device,
        block_size=config.block_size,
        num_kv_blocks=config.num_kv_blocks or None,
        kv_cache_memory_gb=config.kv_cache_memory_gb or None,
        gpu_memory_utilization=config.gpu_memory_utilization,
        max_model_len=config.max_model_len or None,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_num_seqs=config.max_num_seqs,
        kernel_backend=config.kernel_backend,
        enforce_eager=config.enforce_eager,
        load_format=config.load_format,
        seed=config.seed,
    )


class Heartbeat(threading.Thread):
    """Sends Pong(role="worker") every interval on its own socket (zmq sockets are not thread-safe)."""

    def __init__(self, config: EngineConfig, rank: int):
        super().__init__(name="heartbeat", daemon=True)
        self.config, self.rank = config, rank
        self.stop = threading.Event()

    def run(self) -> None:
        ctx = zmq.Context()
        identity = f"worker-{self.rank}-hb-{os.getpid()}".encode()
        sock = connect(ctx, zmq.DEALER, self.config.worker_address, self.config.curve, identity)
        encoder = Codec(Pong, "worker.heartbeat").encoder
        while not self.stop.wait(self.config.heartbeat_interval_s):
            sock.send(encoder.encode(Pong(sent_at=time.time(), role="worker")))
        sock.close(0)
        ctx.term()


def serve(config: EngineConfig, rank: int) -> None:
    env.set_cpu_thread_env()
    if config.num_threads > 0:  # --num-threads wins over the environment
        os.environ["ZEROSERVE_NUM_THREADS"] = str(config.num_threads)
    started = time.monotonic()
    from zeroserve.gpu_worker.model_runner import ModelRunner

    runner = ModelRunner(runner_config(config))
    load_time = time.monotonic() - started

    ctx = zmq.Context()
    identity = f"worker-{rank}-{os.getpid()}".encode()
    sock = connect(ctx, zmq.DEALER, config.worker_address, config.curve, identity)
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
    Heartbeat(config, rank).start()
    sock.send(codec.encode(ready))
    log.info("worker rank %d ready in %.1fs: %d KV blocks", rank, load_time, runner.num_kv_blocks)

    while True:
        msg = codec.decode(sock.recv(copy=True))
        match msg:
            case StepPlan():
                try:
                    result = runner.execute(msg)
                except Exception as e:  # report, never die silently: the scheduler fails the step
                    log.exception("step %d failed", msg.step_id)
                    sock.send(
                        codec.encode(
                            StepResult(
                                step_id=msg.step_id,
                                request_ids=[],
                                sampled_token_ids=[],
                                error=f"{type(e).__name__}: {e}",
                            )
                        )
                    )
                    # state may be half-applied: forget every request and announce a fresh start
                    runner.reset()
                    sock.send(codec.encode(ready))
                    continue
                sock.send(codec.encode(result))
            case Ping():
                sock.send(codec.encode(Pong(sent_at=msg.sent_at, role="worker")))
            case None:
                pass


def main(argv: list[str] | None = None) -> None:
    config, args = parse_proc_args("worker", argv)
    die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(config, args.index)
    except KeyboardInterrupt:
        sys.exit(0)

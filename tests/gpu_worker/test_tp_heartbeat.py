"""Rank 0's heartbeat thread, in its own process, between steps (no step in progress): when a
tensor-parallel rank dies or goes silent it tells the scheduler at once (WorkerGone, naming
the cause) before it exits, so the group's requests fail now, not after heartbeat_timeout_s
of silence with a message that does not say what broke."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import zmq

from zeroserve.gpu_worker.proc import EXIT_STALLED
from zeroserve.shared.config import EngineConfig, write_config
from zeroserve.shared.ipc import Codec
from zeroserve.shared.messages import Pong, SchedulerWorkerInbox, WorkerGone

RANK0 = """
import sys, threading
from zeroserve.gpu_worker.proc import Heartbeat
from zeroserve.shared.config import read_config
Heartbeat(read_config(sys.argv[1]), rank=0).start()
threading.Event().wait()  # the main thread waits for a plan, as between two steps
"""


@pytest.fixture
def rank0(tmp_path):
    config = EngineConfig(
        model="unused",
        served_model_name="unused",
        run_dir=str(tmp_path),
        tensor_parallel_size=2,
        heartbeat_interval_s=0.05,
        heartbeat_timeout_s=0.5,
    )
    path = str(tmp_path / "config.json")
    write_config(config, path)
    ctx = zmq.Context()
    scheduler = ctx.socket(zmq.ROUTER)
    scheduler.bind(config.worker_address_of(0))
    proc = subprocess.Popen([sys.executable, "-c", RANK0, path], stderr=subprocess.PIPE, text=True)
    try:
        yield config, ctx, scheduler, proc
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
        ctx.destroy(linger=0)


def next_message(scheduler: zmq.Socket, within_s: float):
    codec: Codec = Codec(SchedulerWorkerInbox, "test.scheduler")
    if not scheduler.poll(int(within_s * 1000)):
        return None
    _identity, frame = scheduler.recv_multipart()
    return codec.decode(frame)


def heartbeats_then_gone(scheduler: zmq.Socket, within_s: float) -> tuple[int, WorkerGone | None]:
    pongs = 0
    while (msg := next_message(scheduler, within_s)) is not None:
        if isinstance(msg, WorkerGone):
            return pongs, msg
        assert isinstance(msg, Pong) and msg.role == "worker", msg
        pongs += 1
    return pongs, None


def rank1_beats(config: EngineConfig, ctx: zmq.Context, beats: int) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.connect(config.tp_heartbeat_address_of(0))
    for _ in range(beats):
        sock.send(Codec(Pong, "test.rank1").encode(Pong(sent_at=time.time(), role="worker-1")))
        time.sleep(config.heartbeat_interval_s)
    return sock


def test_a_rank_that_dies_between_steps_is_reported_before_rank_0_exits(rank0):
    config, ctx, scheduler, proc = rank0
    assert next_message(scheduler, 30) is not None  # rank 0 is heart-beating
    rank1 = rank1_beats(config, ctx, 5)
    lost_at = time.monotonic()
    rank1.close(linger=0)  # its connection closes, as a killed process's does
    pongs, gone = heartbeats_then_gone(scheduler, 5)
    assert gone is not None, f"rank 0 went silent with no WorkerGone ({pongs} heartbeats after the loss)"
    assert gone.reason == "a tensor-parallel rank died (its heartbeat connection closed)"
    assert time.monotonic() - lost_at < config.heartbeat_timeout_s
    assert proc.wait(10) == EXIT_STALLED
    assert "worker exiting to be restarted: a tensor-parallel rank died" in proc.stderr.read()


def test_a_rank_that_goes_silent_between_steps_is_reported_by_rank(rank0):
    config, ctx, scheduler, proc = rank0
    assert next_message(scheduler, 30) is not None
    rank1 = rank1_beats(config, ctx, 5)  # then silent, its connection still open (SIGSTOP)
    try:
        pongs, gone = heartbeats_then_gone(scheduler, 5)
        assert gone is not None, f"rank 0 went silent with no WorkerGone ({pongs} heartbeats)"
        assert gone.reason.startswith("tensor-parallel rank 1 sent no heartbeat for "), gone.reason
        assert pongs >= 5  # it kept heart-beating to the scheduler until then
        assert proc.wait(10) == EXIT_STALLED
    finally:
        rank1.close(linger=0)


def test_no_report_while_the_group_is_whole(rank0):
    config, ctx, scheduler, proc = rank0
    assert next_message(scheduler, 30) is not None
    rank1 = rank1_beats(config, ctx, 30)  # 1.5 s of beats, three timeouts' worth
    try:
        pongs = 0
        while (msg := next_message(scheduler, 0)) is not None:
            assert isinstance(msg, Pong), msg
            pongs += 1
        assert pongs >= 15 and proc.poll() is None
    finally:
        rank1.close(linger=0)

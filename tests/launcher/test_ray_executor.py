"""The Ray backend's pieces without a cluster: placement bundles, addresses per node, flags, and
the process supervision a replica actor runs (with stand-in processes).

The real thing (a local Ray cluster, DP=2, an actor killed) is tests/engine/test_ray.py.
"""

from __future__ import annotations

import os
import sys
import time

import msgspec
import pytest

pytest.importorskip("ray", reason="the ray backend needs Ray: pip install 'zeroserve[ray]'")

from zeroserve.launcher import ray_executor as rx  # noqa: E402
from zeroserve.launcher import replica_processes as rp  # noqa: E402
from zeroserve.shared.config import EngineConfig  # noqa: E402


def config(tmp_path, **kw) -> EngineConfig:
    return EngineConfig(model="m.gguf", served_model_name="m", run_dir=str(tmp_path), **kw)


def test_a_replica_is_one_bundle_per_tp_rank_and_ipc_pins_them_to_the_launchers_node(tmp_path):
    cpu = config(tmp_path, tensor_parallel_size=3, num_threads=2)
    assert rx.replica_bundles(cpu) == [{"CPU": 2.0}] * 3
    assert rx.replica_bundles(config(tmp_path)) == [{"CPU": 1.0}]  # num_threads 0 (all cores): one CPU
    gpu = config(tmp_path, tensor_parallel_size=2, device="cuda")
    assert rx.replica_bundles(gpu) == [{"CPU": 1.0, "GPU": 1.0}] * 2
    pinned = rx.replica_bundles(cpu, pin_node_ip="10.0.0.7")
    assert len(pinned) == 3 and all(b["node:10.0.0.7"] > 0 and b["CPU"] == 2.0 for b in pinned)


def test_ray_always_uses_the_registry_so_replicas_anywhere_announce_themselves(tmp_path):
    assert not config(tmp_path).uses_registry
    ray_one = config(tmp_path, distributed_executor_backend="ray")
    assert ray_one.uses_registry and ray_one.routing_policy == "prefix_aware"


def test_tcp_replicas_bind_on_their_node_and_reach_the_bus_written_out(tmp_path):
    wide = config(tmp_path, transport="tcp", bind_host="0.0.0.0", base_port=7000)
    cluster = rx.with_cluster_addresses(wide, "10.0.0.1")
    assert cluster.registry_address == "tcp://10.0.0.1:7070"
    # a replica on another node derives the same bus address, and binds its own sockets there
    remote = rx.node_config(cluster, "10.0.0.2")
    assert remote.registry_publish_address == cluster.registry_publish_address == "tcp://10.0.0.1:7070"
    assert remote.scheduler_address_of(1) == "tcp://10.0.0.2:7103"
    assert remote.tp_group_address_of(1).startswith("tcp://10.0.0.2:")
    # one machine on loopback, and ipc: nothing changes
    local = rx.with_cluster_addresses(config(tmp_path, transport="tcp"), "10.0.0.1")
    assert local.registry_address == "tcp://127.0.0.1:5620"
    assert rx.node_config(local, "10.0.0.2") == local
    ipc = config(tmp_path)
    assert rx.with_cluster_addresses(ipc, "10.0.0.1") == ipc and rx.node_config(ipc, "10.0.0.2") == ipc


def test_the_supervisor_leaves_replicas_to_ray_and_keeps_the_front_end(tmp_path):
    from zeroserve.launcher.supervisor import Supervisor

    cfg = config(tmp_path / "run", data_parallel_size=2, distributed_executor_backend="ray")
    sup = Supervisor(cfg)  # no cluster is joined before start()
    try:
        assert [c.name for c in sup.children] == ["registry", "tokenizer", "api"]
        assert sup.ray is not None and sup.ray.placed == []
    finally:
        sup.run_dir.clean(cfg)


def test_flags_refuse_a_ray_address_without_the_ray_backend(tmp_path, gguf_path):
    from zeroserve.launcher.cli import build_parser
    from zeroserve.launcher.engine_args import config_from_args

    args = build_parser().parse_args(["serve", gguf_path, "--ray-address", "auto"])
    with pytest.raises(SystemExit, match="--ray-address is for --distributed-executor-backend ray"):
        config_from_args(args, run_dir=str(tmp_path))
    args = build_parser().parse_args(
        ["serve", gguf_path, "--distributed-executor-backend", "ray", "--ray-address", "10.0.0.1:6379"]
    )
    cfg = config_from_args(args, run_dir=str(tmp_path))
    assert cfg.distributed_executor_backend == "ray" and cfg.ray_address == "10.0.0.1:6379"
    default = config_from_args(build_parser().parse_args(["serve", gguf_path]), run_dir=str(tmp_path))
    assert default.distributed_executor_backend == "mp" and default.ray_address is None


# ---------------------------------------------------------------- a replica's processes


def stand_in(out: str) -> list[str]:
    """A process that saves its stdin to ``out``, then runs until SIGTERM (exit 0)."""
    code = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); "
        f"open({out!r}, 'wb').write(sys.stdin.buffer.read()); time.sleep(600)"
    )
    return [sys.executable, "-c", code]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive: the actor reaps its children itself
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_dead_rank_restarts_its_whole_group_and_the_scheduler_stays(tmp_path):
    files = {name: str(tmp_path / name) for name in ("sched", "rank0", "rank1")}
    procs = rp.ReplicaProcesses(
        rp._Group("scheduler-r0", [stand_in(files["sched"])]),
        rp._Group("workers-r0", [stand_in(files["rank0"]), stand_in(files["rank1"])]),
        b'{"config": 1}',
        dict(os.environ),
    )
    try:
        wait_for(lambda: all(os.path.exists(f) and os.path.getsize(f) for f in files.values()), 30, "stdin")
        assert all(open(f, "rb").read() == b'{"config": 1}' for f in files.values())  # the config, on stdin
        scheduler = procs.scheduler.popens[0].pid
        rank0, rank1 = (p.pid for p in procs.workers.popens)

        os.remove(files["rank0"])
        os.remove(files["rank1"])
        os.kill(rank1, 9)
        wait_for(lambda: not alive(rank0), 5, "rank 0 to be taken down with rank 1")
        restarted = wait_for(
            lambda: len(procs.workers.popens) == 2 and procs.workers.popens, 10, "a new group"
        )
        assert {p.pid for p in restarted}.isdisjoint({rank0, rank1}) and procs.workers.restarts == 1
        assert procs.scheduler.popens[0].pid == scheduler and alive(scheduler)  # the scheduler stays
        wait_for(
            lambda: os.path.exists(files["rank0"]) and os.path.exists(files["rank1"]), 30, "the new ranks"
        )
        pids = procs.pids()
        assert len(pids) == 3
    finally:
        codes = procs.stop()
    assert codes == {"scheduler-r0": [0], "workers-r0": [0, 0]}
    assert not any(alive(pid) for pid in pids)


def test_a_replica_whose_processes_cannot_start_fails_at_once_and_leaves_none(tmp_path):
    started = str(tmp_path / "sched")
    missing = [str(tmp_path / "no-such-program")]
    begun = time.monotonic()
    with pytest.raises(RuntimeError, match="cannot start the replica's processes: FileNotFoundError"):
        rp.ReplicaProcesses(
            rp._Group("scheduler-r0", [missing]),  # spawned after the workers: they are up by then
            rp._Group("workers-r0", [stand_in(started)]),
            b"{}",
            dict(os.environ),
        )
    assert time.monotonic() - begun < 10  # the actor's creation fails instead of hanging in it
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and started in cmdline(int(pid))]


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read() if alive(pid) else ""
    except OSError:
        return ""


def test_the_config_a_replica_reads_on_stdin_is_the_engines(tmp_path):
    cfg = config(tmp_path, data_parallel_size=2, tensor_parallel_size=2)

    class Built:  # what of_replica would start, without starting it
        def __init__(self, scheduler, workers, stdin, env):
            self.scheduler, self.workers, self.stdin = scheduler, workers, stdin

    built = rp.ReplicaProcesses.of_replica.__func__(Built, cfg, 1, {})
    assert msgspec.json.decode(built.stdin, type=EngineConfig) == cfg
    assert [c[c.index("proc") :] for c in built.workers.commands] == [
        ["proc", "worker", "--config", "/dev/stdin", "--index", str(rank), "--replica", "1"]
        for rank in (0, 1)
    ]
    assert built.scheduler.commands[0][-6:] == ["--config", "/dev/stdin", "--index", "0", "--replica", "1"]


def test_a_cluster_address_that_does_not_answer_is_refused_at_once(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(SystemExit, match=f"no Ray cluster answers at --ray-address 127.0.0.1:{port}"):
        rx.check_reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - started < 5
    rx.check_reachable("auto")  # ray finds it itself


def test_deploy_refuses_the_ray_backend_it_cannot_render(tmp_path, gguf_path):
    from zeroserve.launcher import deploy
    from zeroserve.launcher.cli import build_parser

    argv = ["deploy", "supervisord", gguf_path, "--out", str(tmp_path / "out")]
    args = build_parser().parse_args([*argv, "--distributed-executor-backend", "ray"])
    with pytest.raises(SystemExit, match="--distributed-executor-backend ray is for `zeroserve serve`"):
        deploy.run(args)
    assert not (tmp_path / "out").exists()

"""`zeroserve serve`: start every process, wait until ready, supervise, drain on SIGTERM.

Each role runs as its own interpreter with the same command supervisord/systemd use
(``zeroserve proc ROLE --config FILE --index N``). A child that dies is restarted with
exponential backoff (1 s doubling to 30 s; reset after a minute of good health); while a
worker is down the engine reports not-ready and its requests fail fast with an error.

With ``--data-parallel-size N`` > 1 there are N replicas, each a scheduler and its worker
(``--replica R``: its own sockets, its share of the CPU cores), and the registry bus role
through which they announce themselves to the tokenizers. A dead child is restarted alone:
the other replicas keep serving, and the engine is ready while any replica is.

With ``--tensor-parallel-size N`` > 1 each replica has N worker processes (``--index`` is the
rank) in one torch.distributed group, which cannot take a rank back: when any of them exits,
the supervisor kills the rest and starts all N again, together.

Shutdown (SIGTERM/SIGINT): api and tokenizer processes drain first (refuse new work, finish
what is in flight), then the schedulers, workers and the bus stop; every process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from zeroserve.launcher.run_dir import RunDir
from zeroserve.shared.client import EngineClient
from zeroserve.shared.config import EngineConfig

log = logging.getLogger("zeroserve.launcher")

ROLES = {  # role -> package run with `python -m`
    "api": "zeroserve.api_proc",
    "tokenizer": "zeroserve.tokenizer_proc",
    "scheduler": "zeroserve.scheduler_proc",
    "worker": "zeroserve.gpu_worker",
    "registry": "zeroserve.shared.registry",
}
BACKOFF_START_S, BACKOFF_MAX_S, HEALTHY_AFTER_S = 1.0, 30.0, 60.0


def proc_command(role: str, config_path: str, index: int, replica: int | None = None) -> list[str]:
    """The command line of one process; it names its role (``zeroserve proc worker ...``)."""
    script = os.path.join(os.path.dirname(sys.executable), "zeroserve")
    if not os.path.exists(script):
        script = shutil.which("zeroserve") or ""
    head = [sys.executable, script] if script else [sys.executable, "-m", "zeroserve.launcher.cli"]
    tail = [] if replica is None else ["--replica", str(replica)]
    return head + ["proc", role, "--config", config_path, "--index", str(index), *tail]


def child_env(config: EngineConfig) -> dict[str, str]:
    environ = dict(os.environ)
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    environ["PROMETHEUS_MULTIPROC_DIR"] = config.metrics_dir
    return environ


@dataclass
class Child:
    role: str
    index: int
    command: list[str]
    replica: int | None = None  # scheduler / worker of replica #replica, when there are several
    popen: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = BACKOFF_START_S
    restart_at: float | None = None
    exit_codes: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        name = self.role if self.index == 0 else f"{self.role}-{self.index}"
        return name if self.replica is None else f"{name}-r{self.replica}"


def engine_config(args) -> tuple[EngineConfig, RunDir]:
    """The config of a `serve` or `batch` command line, and the run directory it claimed."""
    from zeroserve.launcher.engine_args import config_from_args

    run_dir = RunDir.claim(args.run_dir)
    try:
        return config_from_args(args, run_dir=run_dir.path), run_dir
    except BaseException:
        run_dir.release()
        raise


class Supervisor:
    def __init__(self, config: EngineConfig, run_dir: RunDir | None = None):
        self.ray = None  # with --distributed-executor-backend ray, the replicas are Ray actors
        if config.distributed_executor_backend == "ray":
            from zeroserve.launcher.ray_executor import RayExecutor

            config = RayExecutor.cluster_config(config)
            self.ray = RayExecutor(config)
        self.config = config
        self.run_dir = run_dir or RunDir.claim(config.run_dir)
        try:
            self.config_path, api_config_path = self.run_dir.prepare(config)
        except BaseException:
            self.run_dir.release()
            raise
        # (role, instances, replica): the bus first, so replicas find it as they come up
        order: list[tuple[str, int, int | None]] = [("registry", 1, None)] if config.uses_registry else []
        replicas = config.data_parallel_size
        for r in range(replicas if self.ray is None else 0):
            order += [
                ("worker", config.tensor_parallel_size, None if replicas == 1 else r),
                ("scheduler", 1, None if replicas == 1 else r),
            ]
        order += [("tokenizer", config.num_tokenizers, None), ("api", config.api_workers, None)]
        paths = {"api": api_config_path}  # the api only connects: its file lacks the CURVE server secret
        self.children = [
            Child(role, i, proc_command(role, paths.get(role, self.config_path), i, replica), replica)
            for role, n, replica in order
            for i in range(n)
        ]
        self.stopping = False
        self.env = child_env(config)

    def spawn(self, child: Child) -> None:
        child.popen = subprocess.Popen(child.command, env=self.env, stdin=subprocess.DEVNULL)
        child.started_at = time.monotonic()
        child.restart_at = None
        log.debug("started %s (pid %d)", child.name, child.popen.pid)

    def start(self) -> None:
        for child in self.children:
            self.spawn(child)
        if self.ray is not None:
            self.ray.start()

    def pids(self) -> dict[str, int]:
        return {c.name: c.popen.pid for c in self.children if c.popen is not None and c.popen.poll() is None}

    def check_children(self) -> None:
        """Restart the dead (with backoff)."""
        if self.ray is not None:
            self.ray.check()  # Ray restarts its actors itself; this notes what it cannot place
        now = time.monotonic()
        for child in self.children:
            if child.popen is None:
                if child.restart_at is not None and now >= child.restart_at:
                    child.restarts += 1
                    log.warning("restarting %s (restart #%d)", child.name, child.restarts)
                    self.spawn(child)
                continue
            code = child.popen.poll()
            if code is None:
                if now - child.started_at > HEALTHY_AFTER_S:
                    child.backoff_s = BACKOFF_START_S
                continue
            child.exit_codes.append(code)
            child.popen = None
            delay = child.backoff_s
            child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)
            child.restart_at = now + delay
            if child.role == "worker" and self.config.tensor_parallel_size > 1:
                self.stop_group(child)
            level = logging.ERROR if delay >= 8 else logging.WARNING
            log.log(
                level,
                "%s exited with code %s; restarting in %.0fs%s",
                child.name,
                code,
                delay,
                " (crash loop: check the log above)" if delay >= 8 else "",
            )

    def stop_group(self, dead: Child) -> None:
        """Tensor parallel: kill the dead worker's surviving ranks and restart the group as one
        (a fresh torch.distributed group needs every rank to start over)."""
        group = [c for c in self.children if c.role == "worker" and c.replica == dead.replica]
        for rank in group:
            if rank is not dead and rank.popen is not None:
                if rank.popen.poll() is None:
                    log.warning("%s exited: killing %s, of its tensor-parallel group", dead.name, rank.name)
                    rank.popen.kill()
                rank.popen.wait()
                rank.popen = None
        restart_at = max(c.restart_at or 0.0 for c in group)
        for rank in group:
            rank.restart_at, rank.backoff_s = restart_at, max(c.backoff_s for c in group)

    async def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Block until tokenizer 0 reports a ready engine (with replicas: one of them ready);
        raise if a child keeps failing."""
        started = time.monotonic()
        async with EngineClient(self.config.tokenizer_addresses, self.config.curve) as client:
            last_note = 0.0
            while True:
                self.check_children()
                try:
                    pong = await client.ping(timeout=0.5)
                    if pong.ready:
                        return
                except TimeoutError:
                    pass
                waited = time.monotonic() - started
                if waited > timeout_s:
                    raise RuntimeError(f"the engine was not ready after {timeout_s:.0f}s; see the log above")
                if self.ray is not None and self.ray.failed:
                    raise RuntimeError(f"{', '.join(self.ray.failed)}; see the log above")
                if any(len(c.exit_codes) >= 3 for c in self.children):
                    bad = [c.name for c in self.children if len(c.exit_codes) >= 3]
                    raise RuntimeError(f"{', '.join(bad)} failed to start 3 times; see the log above")
                if waited - last_note > 10:
                    last_note = waited
                    print(
                        f"zeroserve: waiting for the engine to load ({waited:.0f}s)...",
                        file=sys.stderr,
                        flush=True,
                    )
                await asyncio.sleep(0.2)

    async def supervise(self) -> None:
        while not self.stopping:
            self.check_children()
            await asyncio.sleep(0.2)

    def _signal(self, roles: tuple[str, ...], sig: int) -> None:
        for child in self.children:
            if child.role in roles and child.popen is not None and child.popen.poll() is None:
                child.popen.send_signal(sig)

    def _wait(self, roles: tuple[str, ...], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        for child in self.children:
            if child.role in roles and child.popen is not None:
                try:
                    child.popen.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    return False
        return True

    def shutdown(self, drain_timeout_s: float = 120.0) -> bool:
        """Drain front to back; kill whatever does not exit in time. True if all exited 0."""
        self.stopping = True
        clean = True
        stages = ((("api", "tokenizer"), drain_timeout_s), (("scheduler", "worker", "registry"), 15.0))
        for stage, timeout in stages:
            if "scheduler" in stage and self.ray is not None:
                clean = self.ray.stop() and clean
            self._signal(stage, signal.SIGTERM)
            if not self._wait(stage, timeout):
                log.error("%s did not stop in %.0fs; killing", "/".join(stage), timeout)
                self._signal(stage, signal.SIGKILL)
                self._wait(stage, 5.0)
            for child in self.children:
                if child.role in stage and child.popen is not None and child.popen.returncode != 0:
                    log.error("%s exited with code %s", child.name, child.popen.returncode)
                    clean = False
        self.run_dir.clean(self.config)
        return clean


def serve(config: EngineConfig, run_dir: RunDir | None = None) -> int:
    """Run the engine until SIGTERM/SIGINT; returns the exit code."""
    from zeroserve.shared.proc_main import die_with_parent

    die_with_parent()
    sup = Supervisor(config, run_dir)
    stop = asyncio.Event()

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        sup.start()
        ready = asyncio.ensure_future(sup.wait_ready())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([ready, stopped], return_when=asyncio.FIRST_COMPLETED)
        if ready.done() and ready.exception() is not None:
            log.error("%s", ready.exception())
            return 1
        if not stop.is_set():
            print(
                f"zeroserve: serving {config.served_model_name} on http://{config.host}:{config.port} "
                f"(OpenAI API under /v1)",
                file=sys.stderr,
                flush=True,
            )
            watcher = asyncio.ensure_future(sup.supervise())
            await stop.wait()
            watcher.cancel()
        ready.cancel()
        print("zeroserve: draining in-flight requests, then stopping...", file=sys.stderr, flush=True)
        return 0

    code = 1
    try:
        code = asyncio.run(main())
    finally:
        if not sup.shutdown() and code == 0:
            code = 1
    if code == 0:
        print("zeroserve: stopped; every process exited cleanly", file=sys.stderr, flush=True)
    return code

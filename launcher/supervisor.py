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

Models and versions (docs/models.md): each served (model, version) is an engine group of its own
(launcher/engine_groups.py: its bus, workers, schedulers and tokenizers, its config and sockets);
the api processes are shared. `serve` runs the model registry (launcher/model_registry.py) and
answers the api processes on RUN_DIR/control.sock (launcher/control.py); groups are started and
stopped while the server runs. `batch` and tests without a control address get one group.

Shutdown (SIGTERM/SIGINT): api and tokenizer processes drain first (refuse new work, finish
what is in flight; every group at once), then the schedulers, workers and the bus stop; every
process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time

import msgspec

from zeroserve.launcher.engine_groups import (  # noqa: F401  (re-exported: replica_processes, tests)
    BACKOFF_MAX_S,
    BACKOFF_START_S,
    HEALTHY_AFTER_S,
    Child,
    EngineGroup,
    GroupManager,
    ProcessSet,
    child_env,
    proc_command,
)
from zeroserve.launcher.models_file import ModelsFileError
from zeroserve.launcher.run_dir import RunDir
from zeroserve.shared.config import EngineConfig

log = logging.getLogger("zeroserve.launcher")

ROLES = {  # role -> package run with `python -m`
    "api": "zeroserve.api_proc",
    "tokenizer": "zeroserve.tokenizer_proc",
    "scheduler": "zeroserve.scheduler_proc",
    "worker": "zeroserve.gpu_worker",
    "registry": "zeroserve.shared.registry",
}


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
    """Every process of a `serve` (or `batch`): the api processes, and one engine group per
    served (model, version). With ``config.control_address`` the model registry decides the
    groups (launcher/model_registry.py) and answers the api processes on that socket; without
    it (batch, tests) there is one group, the config's own model."""

    def __init__(self, config: EngineConfig, run_dir: RunDir | None = None):
        self.ray = None  # with --distributed-executor-backend ray, the replicas are Ray actors
        if config.distributed_executor_backend == "ray":
            from zeroserve.launcher.ray_executor import RayExecutor

            config = RayExecutor.cluster_config(config)
            self.ray = RayExecutor(config)
        self.config = config
        self.run_dir = run_dir or RunDir.claim(config.run_dir)
        self.registry = None
        self.control = None
        self.groups = GroupManager(config, self.run_dir.path)
        try:
            keys = self._prepare_groups(config)
            root = self.groups.pending.get(keys[0][0] + "@" + keys[0][1])
            self.config_path, api_config_path = self.run_dir.prepare(root)
            self.root = None
            for model, version in keys:
                group = self.groups.build(model, version)
                self.root = self.root or group
        except BaseException:
            self.run_dir.release()
            raise
        self.groups.accept_root = False
        self.env = child_env(config)
        # the api only connects: its file lacks the CURVE server secret
        api = [Child("api", i, proc_command("api", api_config_path, i)) for i in range(config.api_workers)]
        self.api = ProcessSet(api, self.env)
        self.stopping = False

    def _prepare_groups(self, config: EngineConfig) -> list[tuple[str, str]]:
        if config.control_address is None:
            self.groups.pending[f"{config.served_model_name}@v1"] = config
            return [(config.served_model_name, "v1")]
        from zeroserve.launcher.model_registry import STATE_FILE, Registry
        from zeroserve.launcher.models_file import read_models_file, single_model
        from zeroserve.shared import env

        if config.models_file:
            spec = read_models_file(config.models_file, config.allow_fault_injection)
        else:
            spec = single_model(config.served_model_name, config.model)
        self.registry = Registry(
            spec,
            self.groups,
            api_workers=config.api_workers,
            drain_timeout_s=config.model_drain_timeout_s,
            allow_fault_injection=config.allow_fault_injection,
            state_path=os.path.join(config.state_dir or env.state_dir(), STATE_FILE),
        )
        self.groups.registry = self.registry
        try:
            return self.registry.prepare_all()
        except ModelsFileError as e:
            note = ""
            if self.registry.restored:
                note = (
                    f" (the versions of {', '.join(self.registry.restored)} come from {self.registry.state_path}, "
                    "which wins over the command line: fix or remove that entry to start from it)"
                )
            raise SystemExit(f"zeroserve: cannot serve the models: {e}{note}") from None

    @property
    def children(self) -> list[Child]:
        """The first group's processes and the api's, in start order."""
        return self.root.children + self.api.children

    def all_sets(self) -> list[ProcessSet]:
        return [*self.groups.groups.values(), self.api]

    def start(self) -> None:
        for group in list(self.groups.groups.values()):
            group.start()
        self.api.start()
        if self.ray is not None:
            self.ray.start()
        if self.registry is not None:
            from zeroserve.launcher.control import ControlServer, serve_control

            self.control = ControlServer(self.config.control_address, self.registry)
            self.control_task = asyncio.get_running_loop().create_task(serve_control(self.control))
            self.control_task.add_done_callback(_control_ended)

    def pids(self) -> dict[str, int]:
        return {c.name: c.popen.pid for c in self.children if c.popen is not None and c.popen.poll() is None}

    def check_children(self) -> None:
        """Restart the dead (with backoff)."""
        if self.ray is not None:
            self.ray.check()  # Ray restarts its actors itself; this notes what it cannot place
        self.groups.check()
        self.api.check()
        if self.registry is not None:
            self.registry.tick()

    async def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Block until the engine is ready (with a registry: every version ready or failed);
        raise if a child keeps failing or a version fails."""
        started = time.monotonic()
        watches = [asyncio.ensure_future(self.groups.watch(g)) for g in self.groups.groups.values()]
        last_note = 0.0
        try:
            while True:
                self.check_children()
                if all(w.done() for w in watches):
                    failed = [w.result() for w in watches if w.result()[1] is not None]
                    if failed:
                        raise RuntimeError("; ".join(f"{k} failed: {r}" for k, r in failed))
                    return
                waited = time.monotonic() - started
                if waited > timeout_s:
                    raise RuntimeError(f"the engine was not ready after {timeout_s:.0f}s; see the log above")
                if self.ray is not None and self.ray.failed:
                    raise RuntimeError(f"{', '.join(self.ray.failed)}; see the log above")
                bad = self.api.crash_looping()
                if bad:
                    raise RuntimeError(
                        f"{', '.join(c.name for c in bad)} failed to start 3 times; see the log above"
                    )
                if waited - last_note > 10:
                    last_note = waited
                    print(
                        f"zeroserve: waiting for the engine to load ({waited:.0f}s)...",
                        file=sys.stderr,
                        flush=True,
                    )
                await asyncio.sleep(0.2)
        finally:
            for w in watches:
                w.cancel()

    async def supervise(self) -> None:
        while not self.stopping:
            self.check_children()
            await asyncio.sleep(0.2)

    def _children(self, roles: tuple[str, ...]) -> list[Child]:
        return [c for s in self.all_sets() for c in s.children if c.role in roles and c.popen is not None]

    def _wait(self, roles: tuple[str, ...], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        for child in self._children(roles):
            try:
                child.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True

    def shutdown(self, drain_timeout_s: float = 120.0) -> bool:
        """Drain front to back, every group at once; kill whatever does not exit in time. True if all exited 0."""
        self.stopping = True
        clean = True
        if self.control is not None:
            self.control.close()
        stages = ((("api", "tokenizer"), drain_timeout_s), (("scheduler", "worker", "registry"), 15.0))
        for stage, timeout in stages:
            if "scheduler" in stage and self.ray is not None:
                clean = self.ray.stop() and clean
            for s in self.all_sets():
                s.signal(stage, signal.SIGTERM)
            if not self._wait(stage, timeout):
                log.error("%s did not stop in %.0fs; killing", "/".join(stage), timeout)
                for s in self.all_sets():
                    s.signal(stage, signal.SIGKILL)
                self._wait(stage, 5.0)
            for child in self._children(stage):
                if child.popen.returncode != 0:
                    log.error("%s exited with code %s", child.name, child.popen.returncode)
                    clean = False
        for group in self.groups.groups.values():
            group.remove_files()
        self.run_dir.clean(self.root.config)
        return clean


def _control_ended(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the model registry's control channel stopped", exc_info=task.exception())


def serve(config: EngineConfig, run_dir: RunDir | None = None) -> int:
    """Run the engine until SIGTERM/SIGINT; returns the exit code."""
    from zeroserve.shared.proc_main import die_with_parent

    die_with_parent()
    if run_dir is None:
        run_dir = RunDir.claim(config.run_dir)
    from zeroserve.launcher.control import control_address

    config = msgspec.structs.replace(config, control_address=control_address(run_dir.path))
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

"""One replica's processes on its node, supervised together (`--distributed-executor-backend ray`).

``ReplicaActor`` (launcher/ray_executor.py) runs one of these: the replica's scheduler, and its
tensor-parallel ranks as one group (a dead rank takes the whole group down and up again, as
``launcher/supervisor.py`` does on one machine). Nothing here imports Ray.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

import msgspec

from zeroserve.launcher.supervisor import BACKOFF_MAX_S, BACKOFF_START_S, HEALTHY_AFTER_S, proc_command
from zeroserve.shared.config import EngineConfig

log = logging.getLogger("zeroserve.launcher.ray")

STOP_TIMEOUT_S = 15.0


@dataclass
class _Group:
    """Processes restarted together: a replica's scheduler alone, or its TP group of workers."""

    name: str
    commands: list[list[str]]
    popens: list[subprocess.Popen] = field(default_factory=list)
    started_at: float = 0.0
    backoff_s: float = BACKOFF_START_S
    restart_at: float | None = None
    restarts: int = 0


class ReplicaProcesses:
    """One replica's processes on this node, supervised by a thread of their own.

    The thread both starts the processes and outlives them: PR_SET_PDEATHSIG, which each
    process sets at start (shared/proc_main.die_with_parent), fires when the *thread* that
    forked it ends, so a process is never left behind by its actor, killed or not."""

    def __init__(self, scheduler: _Group, workers: _Group, stdin: bytes, env: dict[str, str]) -> None:
        self.scheduler, self.workers = scheduler, workers
        self.groups = (workers, scheduler)
        self.stdin = stdin
        self.env = env
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self.exit_codes: dict[str, list[int]] = {}
        self._spawned = threading.Event()
        self.error: str | None = None  # why the supervising thread ended early
        self._thread = threading.Thread(target=self._run, name="replica-processes", daemon=True)
        self._thread.start()
        self._spawned.wait()
        if self.error is not None:  # fail the actor's creation now rather than hang in it
            raise RuntimeError(f"cannot start the replica's processes: {self.error}")

    @classmethod
    def of_replica(cls, config: EngineConfig, replica: int, env: dict[str, str]) -> ReplicaProcesses:
        """The scheduler and the TP ranks of replica #replica, each reading ``config`` on stdin."""
        tag = None if config.data_parallel_size == 1 else replica
        ranks = range(config.tensor_parallel_size)
        return cls(
            _Group(f"scheduler-r{replica}", [proc_command("scheduler", "/dev/stdin", 0, tag)]),
            _Group(
                f"workers-r{replica}", [proc_command("worker", "/dev/stdin", rank, tag) for rank in ranks]
            ),
            msgspec.json.encode(config),
            env,
        )

    def pids(self) -> list[int]:
        return [p.pid for g in self.groups for p in g.popens if p.poll() is None]

    def _spawn(self, group: _Group) -> None:
        group.popens = []
        for command in group.commands:
            # the config (CURVE keys included) arrives on stdin: nothing secret is written on this node
            popen = subprocess.Popen(command, env=self.env, stdin=subprocess.PIPE)
            try:
                popen.stdin.write(self.stdin)
                popen.stdin.close()
            except BrokenPipeError:
                pass  # it died at once: the next check restarts it
            group.popens.append(popen)
        group.started_at = time.monotonic()
        group.restart_at = None

    def _check(self, group: _Group, now: float) -> None:
        if not group.popens:
            if group.restart_at is not None and now >= group.restart_at:
                group.restarts += 1
                log.warning("restarting %s (restart #%d)", group.name, group.restarts)
                self._spawn(group)
            return
        codes = [p.poll() for p in group.popens]
        if all(code is None for code in codes):
            if now - group.started_at > HEALTHY_AFTER_S:
                group.backoff_s = BACKOFF_START_S
            return
        # one rank gone leaves the others waiting on collectives with it: the group goes as one
        for popen in group.popens:
            if popen.poll() is None:
                popen.kill()
            popen.wait()
        code = next(c for c in codes if c is not None)
        group.popens = []
        delay, group.backoff_s = group.backoff_s, min(group.backoff_s * 2, BACKOFF_MAX_S)
        group.restart_at = now + delay
        log.warning("%s exited with code %s; restarting in %.0fs", group.name, code, delay)

    def _run(self) -> None:
        try:
            for group in self.groups:
                self._spawn(group)
            self._spawned.set()
            while not self._stop.wait(0.2):
                now = time.monotonic()
                for group in self.groups:
                    self._check(group, now)
            self._terminate()
        except Exception as e:
            log.exception("the replica's process supervisor failed")
            self.error = f"{type(e).__name__}: {e}"
            for group in self.groups:
                for popen in group.popens:
                    if popen.poll() is None:
                        popen.kill()
                    popen.wait()
                self.exit_codes[group.name] = [-1] * len(group.commands)
        finally:
            # whoever waits (the actor's constructor, stop) learns of it instead of waiting forever
            self._spawned.set()
            self._stopped.set()

    def _terminate(self) -> None:
        """SIGTERM (the scheduler first: it fails its requests cleanly), then SIGKILL what lingers."""
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for group in (self.scheduler, self.workers):
            for popen in group.popens:
                if popen.poll() is None:
                    popen.send_signal(signal.SIGTERM)
            for popen in group.popens:
                try:
                    popen.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.error("%s did not stop in %.0fs; killing", group.name, STOP_TIMEOUT_S)
                    popen.kill()
                    popen.wait()
            self.exit_codes[group.name] = [p.returncode for p in group.popens]

    def stop(self) -> dict[str, list[int]]:
        """Stop every process; their exit codes by group (0 each after a clean stop)."""
        self._stop.set()
        self._stopped.wait()
        return self.exit_codes

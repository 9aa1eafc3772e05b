"""The model registry the launcher owns: every (model, version), its state and traffic weight,
the canary controller, window stats from the api processes' reports, and persistence.

No processes and no sockets here: the registry asks a ``Groups`` object to start or stop a
version's engine group, and learns what happened through ``group_ready`` / ``group_failed`` /
``group_stopped``. Time comes from the ``clock`` it is given, so tests drive it with a fake
clock and fake reports (tests/launcher/test_model_registry.py).

States: loading -> ready -> draining -> unloaded, or failed (with the reason). ``epoch`` moves
on every change (window stats too, at most once a second); the api processes route by the
snapshot of the latest epoch they have.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from zeroserve.launcher.models_file import (
    FIRST_VERSION_WEIGHT,
    ModelsFileError,
    ModelsSpec,
    VersionSpec,
    check_fault,
    check_name,
    check_options,
    check_weight,
    from_table,
)
from zeroserve.shared.control import (
    DRAINING,
    FAILED,
    LOADING,
    READY,
    UNLOADED,
    AdminCommand,
    AdminReply,
    CanaryStatus,
    FaultSpec,
    ModelEntry,
    RegistrySnapshot,
    VersionEntry,
    VersionReport,
    VirtualModel,
    WindowStats,
)

log = logging.getLogger("zeroserve.launcher.registry")

STATE_FILE = "model-registry.json"
STATE_FORMAT = 1
STATS_WINDOW_S = 30.0  # GET /admin/models' window
MAX_CANARY_INTERVAL_S = 3600.0  # reports are kept for one interval: bounds the launcher's memory
DEFAULT_CANARY_MAX_ERROR_RATE = 0.01  # a canary sent without an slo
STATS_REFRESH_S = 1.0  # the snapshot's stats move the epoch at most this often
RUNNING, PROMOTED, ROLLED_BACK, CANCELLED = "running", "promoted", "rolled_back", "cancelled"


class AdminError(Exception):
    """An admin call refused: the HTTP status, an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class CapacityError(Exception):
    """A version that would not fit in memory (the message says how much it needs and has)."""


class Groups(Protocol):
    """What the registry needs of the processes (launcher/engine_groups.py; a fake in tests)."""

    def prepare(self, model: str, spec: VersionSpec) -> list[str]:
        """Check the version can be served (its config, its memory) without starting anything;
        returns its tokenizer addresses. Raises ModelsFileError (400) or CapacityError (507)."""

    def start(self, model: str, spec: VersionSpec) -> None:
        """Start a prepared version's processes (a hot load); its events come back later."""

    def stop(self, model: str, version: str) -> None:
        """Stop a version's processes (SIGTERM: its tokenizers drain); then ``group_stopped``."""


@dataclass
class _Report:
    at: float
    requests: int
    errors: int
    ttfts: list[float]


@dataclass
class Version:
    spec: VersionSpec
    weight: int
    state: str = LOADING
    reason: str | None = None
    addresses: list[str] = field(default_factory=list)
    max_model_len: int = 0
    drain_epoch: int | None = None
    drain_deadline: float | None = None
    reports: deque = field(default_factory=deque)  # _Report, oldest first

    @property
    def name(self) -> str:
        return self.spec.version

    def window(self, now: float, window_s: float, since: float | None = None) -> WindowStats:
        start = now - window_s if since is None else since
        requests = errors = 0
        ttfts: list[float] = []
        for r in self.reports:
            if r.at > start:
                requests += r.requests
                errors += r.errors
                ttfts += r.ttfts
        ttfts.sort()
        return WindowStats(
            window_s=round(now - start, 3),
            requests=requests,
            errors=errors,
            ttft_p50_s=_quantile(ttfts, 0.5),
            ttft_p95_s=_quantile(ttfts, 0.95),
        )


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


@dataclass
class Canary:
    version: str
    steps: list[int]
    interval_s: float
    max_error_rate: float | None
    max_ttft_p95_s: float | None
    step: int = 0
    step_started: float = 0.0
    state: str = RUNNING
    reason: str | None = None

    def status(self) -> CanaryStatus:
        return CanaryStatus(
            self.version, list(self.steps), self.step, self.interval_s, self.state, self.reason
        )


@dataclass
class Model:
    name: str
    versions: dict[str, Version] = field(default_factory=dict)
    stable: str | None = None
    canary: Canary | None = None
    promotions: int = 0
    rollbacks: int = 0


class Registry:
    def __init__(
        self,
        spec: ModelsSpec,
        groups: Groups,
        *,
        api_workers: int = 1,
        drain_timeout_s: float = 60.0,
        allow_fault_injection: bool = False,
        state_path: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.groups = groups
        self.api_workers = api_workers
        self.drain_timeout_s = drain_timeout_s
        self.allow_fault_injection = allow_fault_injection
        self.state_path = state_path
        self.clock = clock
        self.epoch = 0
        self.models: dict[str, Model] = {}
        self.virtual: list[VirtualModel] = list(spec.virtual)
        self.default_model = spec.default or spec.models[0].name
        self.api_in_flight: dict[int, tuple[int, dict[tuple[str, str], int]]] = {}
        self._snapshot: RegistrySnapshot | None = None
        self._stats_dirty_at: float | None = None
        self._last_stats_refresh = -1e9
        # versions prepared as the server starts and not ready yet: one that fails there stops the
        # server (exit 1), so its failure must not be written (it would drop the version and its
        # weight from the state file, and a restart after a transient failure would serve nothing)
        self._starting: set[tuple[str, str]] = set()
        restored = self._read_state()
        self.restored = sorted(set(restored) & {m.name for m in spec.models})  # models the state file gave
        for m in spec.models:
            saved = restored.get(m.name)
            model = Model(m.name)
            if saved is not None:  # the state file wins for a model it holds
                model.stable, model.promotions, model.rollbacks = (
                    saved.stable,
                    saved.promotions,
                    saved.rollbacks,
                )
                for v in saved.versions.values():
                    model.versions[v.name] = Version(v.spec, v.weight)
                log.info(
                    "model %s: restored %s from %s",
                    m.name,
                    ", ".join(f"{v}={x.weight}" for v, x in model.versions.items()),
                    state_path,
                )
            else:
                for i, v in enumerate(m.versions):
                    weight = v.weight if v.weight is not None else (FIRST_VERSION_WEIGHT if i == 0 else 0)
                    model.versions[v.version] = Version(v, weight)
                model.stable = m.stable or m.versions[0].version
            self.models[m.name] = model
        self._persisted = self._state_bytes()  # written only once something changes

    # ------------------------------------------------------------------ start
    def prepare_all(self) -> list[tuple[str, str]]:
        """Prepare every version's group as the server starts (the caller starts them); their keys."""
        keys = []
        for model in self.models.values():
            for v in model.versions.values():
                v.addresses = self.groups.prepare(model.name, v.spec)
                keys.append((model.name, v.name))
        self._starting = set(keys)
        self._changed(persist=False)
        return keys

    def settled(self) -> tuple[bool, list[str]]:
        """(every version is ready or failed, the failures as "NAME@VERSION: reason")."""
        versions = [(m.name, v) for m in self.models.values() for v in m.versions.values()]
        failed = [f"{n}@{v.name}: {v.reason}" for n, v in versions if v.state == FAILED]
        return all(v.state in (READY, FAILED) for _, v in versions), failed

    # ------------------------------------------------------------------ group events
    def _version(self, model: str, version: str) -> Version | None:
        m = self.models.get(model)
        return None if m is None else m.versions.get(version)

    def group_ready(self, model: str, version: str, max_model_len: int = 0) -> None:
        v = self._version(model, version)
        if v is not None and v.state == LOADING:
            v.state, v.max_model_len = READY, max_model_len
            self._starting.discard((model, version))
            log.info("%s@%s is ready", model, version)
            self._changed()

    def group_failed(self, model: str, version: str, reason: str) -> None:
        v = self._version(model, version)
        if v is None or v.state not in (LOADING, READY):
            return
        log.error("%s@%s failed: %s", model, version, reason)
        v.state, v.reason, v.weight = FAILED, reason, 0
        m = self.models[model]
        if m.canary is not None and m.canary.version == version and m.canary.state == RUNNING:
            self._roll_back(m, f"{version} failed: {reason}")
        self.groups.stop(model, version)
        self._changed(persist=(model, version) not in self._starting)

    def group_crash_looping(self, model: str, version: str, reason: str) -> bool:
        """A ready version's processes keep exiting soon after each restart. It is failed (its
        group stopped, its traffic to the versions still ready: the stable one gets all of it
        if no other one had any) when another version of the model is ready to serve; the only
        ready version is left restarting, as a single-version server's engine is. True when
        it was failed."""
        v, m = self._version(model, version), self.models.get(model)
        if v is None or m is None or v.state != READY:
            return False
        others = [o for o in m.versions.values() if o is not v and o.state == READY]
        if not others:
            return False
        self.group_failed(model, version, reason)
        if m.stable == version:  # the most-used version still ready is the one to fall back on
            m.stable = max(others, key=lambda o: o.weight).name
            self._changed()
        if not any(o.weight for o in others):
            heir = m.versions[m.stable]
            heir = heir if heir.state == READY else others[0]
            heir.weight = 100
            log.warning("%s@%s takes all of %s's traffic", model, heir.name, model)
            self._changed()
        return True

    def group_stopped(self, model: str, version: str) -> None:
        v = self._version(model, version)
        if v is not None and v.state == DRAINING:
            v.state, v.addresses = UNLOADED, []
            log.info("%s@%s unloaded", model, version)
            self._changed()

    # ------------------------------------------------------------------ reports and time
    def on_report(self, report: VersionReport) -> None:
        now = self.clock()
        flights: dict[tuple[str, str], int] = {}
        for c in report.counts:
            flights[(c.model, c.version)] = c.in_flight
            v = self._version(c.model, c.version)
            if v is None or (c.requests == 0 and not c.ttfts_s):
                continue
            v.reports.append(_Report(now, c.requests, c.errors, list(c.ttfts_s)))
            self._stats_dirty_at = now
        self.api_in_flight[report.api_index] = (report.epoch, flights)

    def tick(self) -> None:
        """Drains that are done, canary steps that are due, old reports dropped, stats refreshed."""
        now = self.clock()
        for model in self.models.values():
            for v in model.versions.values():
                keep = max(STATS_WINDOW_S, model.canary.interval_s if model.canary else 0.0) + 5.0
                while v.reports and v.reports[0].at < now - keep:
                    v.reports.popleft()
                if v.state == DRAINING and v.drain_deadline is not None:
                    self._check_drain(model, v, now)
            if model.canary is not None and model.canary.state == RUNNING:
                self._check_canary(model, now)
        if self._stats_dirty_at is not None and now - self._last_stats_refresh >= STATS_REFRESH_S:
            self._stats_dirty_at, self._last_stats_refresh = None, now
            self._changed(persist=False)

    def _check_drain(self, model: Model, v: Version, now: float) -> None:
        key = (model.name, v.name)
        reported = [
            flights.get(key, 0) for epoch, flights in self.api_in_flight.values() if epoch >= v.drain_epoch
        ]
        drained = len(reported) >= self.api_workers and not any(reported)
        if not drained and now < v.drain_deadline:
            return
        if not drained:
            waiting = sum(f.get(key, 0) for _, f in self.api_in_flight.values())
            log.warning(
                "%s@%s: drain timeout (%.0fs) with %d request(s) in flight; stopping it",
                model.name,
                v.name,
                self.drain_timeout_s,
                waiting,
            )
        v.drain_deadline = None  # stopping: group_stopped makes it unloaded
        self.groups.stop(model.name, v.name)

    def _check_canary(self, model: Model, now: float) -> None:
        c = model.canary
        if now < c.step_started + c.interval_s:
            return
        v = model.versions.get(c.version)
        stats = v.window(now, c.interval_s, since=c.step_started)
        pct = c.steps[c.step]
        if stats.requests == 0:
            c.reason = f"holding at {pct}%: no request reached {c.version} in the last {c.interval_s:g}s"
            c.step_started = now
            self._changed(persist=False)
            return
        breach = None
        if c.max_error_rate is not None and stats.error_rate > c.max_error_rate:
            breach = f"error rate {stats.error_rate:.2f} > {c.max_error_rate:g}"
        elif c.max_ttft_p95_s is not None and (stats.ttft_p95_s or 0.0) > c.max_ttft_p95_s:
            breach = f"TTFT p95 {stats.ttft_p95_s:.3f}s > {c.max_ttft_p95_s:g}s"
        if breach is not None:
            self._roll_back(
                model, f"{breach} over {stats.requests} requests in the last {stats.window_s:g}s at {pct}%"
            )
        elif c.step + 1 < len(c.steps):
            c.step += 1
            c.step_started, c.reason = now, None
            self._set_canary_weights(model)
            log.info("%s: canary %s -> %d%%", model.name, c.version, c.steps[c.step])
        else:
            c.state, c.reason = PROMOTED, f"promoted after {len(c.steps)} steps"
            model.stable, model.promotions = c.version, model.promotions + 1
            for name, x in model.versions.items():
                x.weight = FIRST_VERSION_WEIGHT if name == c.version else 0
            log.info("%s: %s promoted to stable", model.name, c.version)
        self._changed()

    def _set_canary_weights(self, model: Model) -> None:
        c = model.canary
        pct = c.steps[c.step]
        for name, x in model.versions.items():
            x.weight = pct if name == c.version else (100 - pct if name == model.stable else 0)

    def _roll_back(self, model: Model, reason: str, state: str = ROLLED_BACK) -> None:
        """The stable version gets all the traffic now; a running canary ends with ``reason``."""
        for name, x in model.versions.items():
            x.weight = FIRST_VERSION_WEIGHT if name == model.stable else 0
        if model.canary is not None and model.canary.state == RUNNING:
            model.canary.state, model.canary.reason = state, reason
            log.warning("%s: canary %s %s: %s", model.name, model.canary.version, state, reason)
        model.rollbacks += 1

    # ------------------------------------------------------------------ admin
    def handle(self, cmd: AdminCommand) -> AdminReply:
        try:
            body = json.loads(cmd.body) if cmd.body else {}
            if not isinstance(body, dict):
                raise AdminError(400, "the body must be a JSON object")
            op = getattr(self, f"_op_{cmd.op}", None)
            if op is None:
                raise AdminError(404, f"unknown registry operation {cmd.op!r}")
            status, result = op(cmd, body)
        except AdminError as e:
            return AdminReply(cmd.request_id, e.status, json.dumps(e.body()))
        except json.JSONDecodeError:
            return AdminReply(cmd.request_id, 400, json.dumps(AdminError(400, "the body is not JSON").body()))
        except Exception as e:  # an answer either way: the api process waits for one
            log.exception("registry operation %s failed", cmd.op)
            error = AdminError(500, f"the registry failed on {cmd.op}: {type(e).__name__}: {e}")
            return AdminReply(cmd.request_id, 500, json.dumps(error.body()))
        return AdminReply(cmd.request_id, status, json.dumps(result))

    def _model(self, name: str | None) -> Model:
        m = self.models.get(name or "")
        if m is None:
            raise AdminError(
                404, f"no model {name!r}; served: {', '.join(self.models)}", "model", "model_not_found"
            )
        return m

    def _op_list(self, cmd: AdminCommand, body: dict) -> tuple[int, Any]:
        return 200, self.describe()

    def _op_load(self, cmd: AdminCommand, body: dict) -> tuple[int, Any]:
        name = _checked(check_name, cmd.model, "model name", "model")
        extra = sorted(set(body) - {"version", "path", "options", "weight", "fault"})
        if extra:
            raise AdminError(400, f"unknown field(s) {', '.join(extra)}", extra[0])
        version = _checked(check_name, body.get("version"), "version", "version")
        options = _checked(check_options, body.get("options") or {})
        weight = _checked(check_weight, body.get("weight"))
        fault = _checked(check_fault, body.get("fault"), self.allow_fault_injection)
        from zeroserve.launcher.models_file import resolve_path

        if not isinstance(body.get("path"), str | None):
            raise AdminError(400, "path must be a string", "path")
        path = _checked(resolve_path, body.get("path"), None)
        model = self.models.get(name)
        if model is not None:
            old = model.versions.get(version)
            if old is not None and old.state not in (UNLOADED, FAILED):
                raise AdminError(409, f"{name}@{version} is already {old.state}", "version", "version_exists")
        spec = VersionSpec(version, path, weight, options, fault)
        self._starting.discard((name, version))  # a hot load: its failure is written
        try:
            addresses = self.groups.prepare(name, spec)
        except ModelsFileError as e:
            raise AdminError(400, str(e), e.param) from None
        except CapacityError as e:
            raise AdminError(507, str(e), None, "insufficient_memory") from None
        try:
            self.groups.start(name, spec)
        except RuntimeError as e:  # the same version's previous processes are still stopping
            raise AdminError(409, f"{name}@{version}: {e}; try again in a few seconds", "version") from None
        if model is None:
            model = self.models[name] = Model(name, stable=version)
            first = True
        else:
            first = not any(v.state in (LOADING, READY) for v in model.versions.values())
            if first or model.stable not in model.versions:
                model.stable = version
        v = Version(spec, weight if weight is not None else (FIRST_VERSION_WEIGHT if first else 0))
        v.addresses = addresses
        model.versions.pop(version, None)
        model.versions[version] = v
        self._changed()
        return 202, {"model": name, "version": version, "state": LOADING, "weight": v.weight}

    def _op_unload(self, cmd: AdminCommand, body: dict) -> tuple[int, Any]:
        model = self._model(cmd.model)
        v = model.versions.get(cmd.version or "")
        if v is None or v.state in (UNLOADED,):
            raise AdminError(
                404, f"{model.name} has no version {cmd.version!r} loaded", "version", "model_not_found"
            )
        if v.state == DRAINING:
            return 202, {"model": model.name, "version": v.name, "state": DRAINING}
        # only a ready version takes the traffic over: one still loading (or that then fails) would
        # leave the model with nothing to route to, and its requests 503, until it is ready
        others = [x for x in model.versions.values() if x is not v and x.weight > 0 and x.state == READY]
        if v.weight > 0 and not others:
            raise AdminError(
                409,
                f"{model.name}@{v.name} is the only ready version with traffic; give another ready version "
                f"traffic first (PUT /admin/models/{model.name}/traffic)",
                "version",
                "only_version_with_traffic",
            )
        if model.canary is not None and model.canary.state == RUNNING and model.canary.version == v.name:
            model.canary.state, model.canary.reason = CANCELLED, f"{v.name} was unloaded"
        if v.state == FAILED:
            v.state, v.addresses = UNLOADED, []
            self._changed()
            return 200, {"model": model.name, "version": v.name, "state": UNLOADED}
        v.weight, v.state = 0, DRAINING
        if model.stable == v.name:
            live = [x for x in model.versions.values() if x.state in (READY, LOADING)]
            model.stable = max(live, key=lambda x: x.weight).name if live else None
        self._changed()
        v.drain_epoch, v.drain_deadline = self.epoch, self.clock() + self.drain_timeout_s
        return 202, {"model": model.name, "version": v.name, "state": DRAINING}

    def _op_traffic(self, cmd: AdminCommand, body: dict) -> tuple[int, Any]:
        model = self._model(cmd.model)
        weights = body.get("weights")
        if not isinstance(weights, dict) or not weights:
            raise AdminError(400, 'weights must be an object {"VERSION": WEIGHT, ...}', "weights")
        for name, w in weights.items():
            v = model.versions.get(name)
            if v is None or v.state not in (READY, LOADING):
                state = "unknown" if v is None else v.state
                raise AdminError(
                    400,
                    f"{model.name}@{name} is {state}: only ready or loading versions take traffic",
                    f"weights.{name}",
                )
            _checked(check_weight, w, f"weights.{name}")
        if not any(w > 0 for w in weights.values()):
            raise AdminError(400, "at least one weight must be positive", "weights")
        if not any(w > 0 and model.versions[n].state == READY for n, w in weights.items()):
            # a loading version serves nothing yet: every request would be a 503 until it is ready
            raise AdminError(
                409,
                f"no ready version of {model.name} would have traffic; keep a positive weight on one "
                "(a loading version takes its share once it is ready)",
                "weights",
                "no_ready_version",
            )
        if model.canary is not None and model.canary.state == RUNNING:
            model.canary.state, model.canary.reason = CANCELLED, "traffic set by the admin"
        for name, v in model.versions.items():
            v.weight = weights.get(name, 0)
        self._changed()
        return 200, self._describe_model(model, self.clock())

    def _op_canary(self, cmd: AdminCommand, body: dict) -> tuple[int, Any]:
        model = self._model(cmd.model)
        extra = sorted(set(body) - {"version", "steps", "interval_s", "slo"})
        if extra:
            raise AdminError(400, f"unknown field(s) {', '.join(extra)}", extra[0])
        name = body.get("version")
        v = model.versions.get(name) if isinstance(name, str) else None
        if v is None:
            raise AdminError(404, f"{model.name} has no version {name!r}", "version", "model_not_found")
        if v.state != READY:
            raise AdminError(
                409, f"{model.name}@{name} is {v.state}; a canary needs a ready version", "version"
            )
        if name == model.stable:
            raise AdminError(400, f"{name} is already the stable version", "version")
        stable = model.versions.get(model.stable or "")
        if stable is None or stable.state != READY:
            raise AdminError(
                409, f"the stable version {model.stable} of {model.name} is not ready", "version"
            )
        steps = body.get("steps", [5, 25, 50, 100])
        if (
            not isinstance(steps, list)
            or not steps
            or any(isinstance(s, bool) or not isinstance(s, int) or not 0 < s <= 100 for s in steps)
            or any(a >= b for a, b in zip(steps, steps[1:]))
            or steps[-1] != 100
        ):
            raise AdminError(
                400, "steps must be increasing integer percentages in (0, 100] ending at 100", "steps"
            )
        interval = body.get("interval_s", 30)
        if (
            isinstance(interval, bool)
            or not isinstance(interval, int | float)
            or not 0 < interval <= MAX_CANARY_INTERVAL_S
        ):
            raise AdminError(
                400,
                f"interval_s must be a number of seconds in (0, {MAX_CANARY_INTERVAL_S:.0f}]",
                "interval_s",
            )
        # without an SLO nothing could breach and any canary would be promoted: at least the error rate
        slo = body.get("slo") or {"max_error_rate": DEFAULT_CANARY_MAX_ERROR_RATE}
        if not isinstance(slo, dict) or set(slo) - {"max_error_rate", "max_ttft_p95_s"}:
            raise AdminError(400, "slo must be {max_error_rate, max_ttft_p95_s}", "slo")
        for key, value in slo.items():
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or value < 0
            ):
                raise AdminError(400, f"slo.{key} must be a number >= 0", f"slo.{key}")
        model.canary = Canary(
            name, steps, float(interval), slo.get("max_error_rate"), slo.get("max_ttft_p95_s"),
            step_started=self.clock(),
        )  # fmt: skip
        self._set_canary_weights(model)
        self._changed()
        return 202, msgspec.structs.asdict(model.canary.status())

    def _op_rollback(self, cmd: AdminCommand, body: dict) -> tuple[int, Any]:
        model = self._model(cmd.model)
        stable = model.versions.get(model.stable or "")
        if stable is None or stable.state not in (READY, LOADING):
            raise AdminError(409, f"{model.name} has no stable version to roll back to", "model")
        self._roll_back(model, "rolled back by the admin", CANCELLED)
        self._changed()
        return 200, self._describe_model(model, self.clock())

    # ------------------------------------------------------------------ snapshot
    def _changed(self, persist: bool = True) -> None:
        self.epoch += 1
        self._snapshot = None
        if persist:
            self._write_state()

    def snapshot(self) -> RegistrySnapshot:
        if self._snapshot is None:
            now = self.clock()
            self._snapshot = RegistrySnapshot(
                self.epoch,
                [self._entry(m, now) for m in self.models.values()],
                list(self.virtual),
                self.default_model,
            )
        return self._snapshot

    def _entry(self, m: Model, now: float) -> ModelEntry:
        versions = [
            VersionEntry(
                v.name,
                v.state,
                v.weight,
                v.spec.path,
                list(v.addresses) if v.state in (LOADING, READY, DRAINING) else [],
                v.reason,
                v.spec.fault,
                json.dumps(v.spec.options),
                v.window(now, STATS_WINDOW_S),
                v.max_model_len,
            )
            for v in m.versions.values()
        ]
        canary = m.canary.status() if m.canary is not None else None
        return ModelEntry(m.name, m.stable, versions, canary, m.promotions, m.rollbacks)

    def _describe_model(self, m: Model, now: float) -> dict:
        versions = []
        for v in m.versions.values():
            stats = v.window(now, STATS_WINDOW_S)
            versions.append(
                {
                    "version": v.name,
                    "state": v.state,
                    "weight": v.weight,
                    "path": v.spec.path,
                    "reason": v.reason,
                    "options": v.spec.options,
                    "fault": msgspec.structs.asdict(v.spec.fault) if v.spec.fault else None,
                    "max_model_len": v.max_model_len,
                    "stats": {**msgspec.structs.asdict(stats), "error_rate": round(stats.error_rate, 4)},
                }
            )
        return {
            "name": m.name,
            "stable": m.stable,
            "versions": versions,
            "canary": msgspec.structs.asdict(m.canary.status()) if m.canary is not None else None,
            "promotions": m.promotions,
            "rollbacks": m.rollbacks,
        }

    def describe(self) -> dict:
        """GET /admin/models: every model, version, state, weight, stable version and window stats."""
        now = self.clock()
        return {
            "object": "list",
            "epoch": self.epoch,
            "default_model": self.default_model,
            "data": [self._describe_model(m, now) for m in self.models.values()],
            "virtual": [_virtual_dict(v) for v in self.virtual],
        }

    # ------------------------------------------------------------------ persistence
    def _state_doc(self) -> dict:
        models = {}
        for m in self.models.values():
            weights = {v.name: v.weight for v in m.versions.values()}
            c = m.canary
            if c is not None and c.state == RUNNING and m.stable in weights:
                # a restart has no canary controller: the unproven version's share goes back to stable
                weights[m.stable] += weights.get(c.version, 0)
                weights[c.version] = 0
            versions = [
                {
                    "version": v.name,
                    "path": v.spec.path,
                    "options": v.spec.options,
                    "weight": weights[v.name],
                    "fault": msgspec.structs.asdict(v.spec.fault) if v.spec.fault else None,
                }
                for v in m.versions.values()
                if v.state in (LOADING, READY)
            ]
            models[m.name] = {
                "stable": m.stable,
                "promotions": m.promotions,
                "rollbacks": m.rollbacks,
                "versions": versions,
            }
        return {"models": models}

    def _state_bytes(self) -> bytes:
        return json.dumps(self._state_doc(), sort_keys=True).encode()

    def _write_state(self) -> None:
        if self.state_path is None:
            return
        now = self._state_bytes()
        if now == self._persisted:
            return
        try:
            doc = _read_json(self.state_path) or {}
            others = {k: v for k, v in (doc.get("models") or {}).items() if k not in self.models}
            out = {
                "format": STATE_FORMAT,
                "models": {**others, **self._state_doc()["models"]},
                "virtual": [_virtual_dict(v) for v in self.virtual],
                "default": self.default_model,
            }
            write_atomic(self.state_path, json.dumps(out, indent=1, sort_keys=True).encode())
            self._persisted = now
        except OSError as e:
            log.error("cannot write the model registry to %s: %s", self.state_path, e)

    def _read_state(self) -> dict[str, Model]:
        if self.state_path is None:
            return {}
        doc = _read_json(self.state_path)
        if doc is None:
            return {}
        out = {}
        for name, raw in (doc.get("models") or {}).items():
            try:
                m = Model(name, stable=raw.get("stable"))
                m.promotions, m.rollbacks = int(raw.get("promotions", 0)), int(raw.get("rollbacks", 0))
                for v in raw["versions"]:
                    fault = from_table(v["fault"], FaultSpec, "fault") if v.get("fault") else None
                    if fault is not None and not self.allow_fault_injection:
                        # injected errors only ever with the flag, whatever an earlier run wrote
                        log.warning(
                            "%s@%s: not injecting the fault %s restored from %s: the server started "
                            "without --allow-fault-injection",
                            name,
                            v["version"],
                            msgspec.structs.asdict(fault),
                            self.state_path,
                        )
                        fault = None
                    spec = VersionSpec(
                        v["version"], v["path"], v["weight"], check_options(v.get("options") or {}), fault
                    )
                    m.versions[spec.version] = Version(spec, int(v["weight"]))
            except (KeyError, TypeError, ValueError) as e:
                log.error("ignoring model %s in %s: %s", name, self.state_path, e)
                continue
            if m.versions:
                out[name] = m
        return out


def _virtual_dict(v: VirtualModel) -> dict:
    out = msgspec.structs.asdict(v)
    out["rules"] = [msgspec.structs.asdict(r) for r in v.rules]
    return out


def _checked(check, *args):
    try:
        return check(*args)
    except ModelsFileError as e:
        raise AdminError(400, str(e), e.param) from None


def _read_json(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.error("ignoring the model registry file %s: %s", path, e)
        return None
    return doc if isinstance(doc, dict) else None


def write_atomic(path: str, data: bytes) -> None:
    """tmp + fsync + rename + fsync of the directory: the file is the old one or the new one."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

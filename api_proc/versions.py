"""This api process' view of the model registry: every (model, version) it can send work to.

With a launcher (``zeroserve serve``, ``ApiConfig.control_address`` set) a DEALER talks to the
launcher's registry (shared/control.py):

    every 200 ms   RegistryWatch(epoch)  ->  RegistrySnapshot when the epoch moved, else RegistryUnchanged
    every second   VersionReport         (requests, errors, TTFTs since the last report; in flight now)
    admin calls    AdminCommand          ->  AdminReply (its status and body are the HTTP answer)

Each snapshot rebuilds the route table (model_router.RouteTable) and opens one ``Group`` (an
EngineClient and an EngineMonitor over its tokenizers) per version that has addresses and is
ready or draining; a group that left the snapshot closes once nothing in flight uses it. The
client this process was started with is borrowed for the group on the same addresses.

Without a control channel (supervisord/systemd units, tests that build an app by hand) the
snapshot is static: the configured model as version "v1" over the configured engine, which is
exactly the single-model server.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from zeroserve.api_proc.engine_state import EngineMonitor
from zeroserve.api_proc.errors import ApiError
from zeroserve.api_proc.model_router import RouteTable
from zeroserve.shared.control import (
    DRAINING,
    READY,
    AdminCommand,
    AdminReply,
    FaultSpec,
    ModelEntry,
    RegistrySnapshot,
    RegistryUnchanged,
    RegistryWatch,
    ToApi,
    VersionCounts,
    VersionEntry,
    VersionReport,
)

log = logging.getLogger("zeroserve.api")

STATIC_VERSION = "v1"
UNSYNCED_WARNING_S = 10.0
FRESH_WAIT_S = 1.0  # a request nothing can serve waits this long for a newer registry
WATCH_INTERVAL_S = 0.2
REPORT_INTERVAL_S = 1.0
ADMIN_TIMEOUT_S = 60.0
MAX_TTFTS_PER_REPORT = 500
VERSION_HEADER, NAME_HEADER = "X-Model-Version", "X-Model-Name"


def static_snapshot(model_name: str, addresses: list[str]) -> RegistrySnapshot:
    entry = VersionEntry(
        version=STATIC_VERSION, state=READY, weight=100, path="", tokenizer_addresses=list(addresses)
    )
    return RegistrySnapshot(
        epoch=0,
        models=[ModelEntry(name=model_name, stable=STATIC_VERSION, versions=[entry])],
        default_model=model_name,
    )


@dataclass(eq=False)
class Group:
    """One (model, version) engine group as this process uses it, and its counts since the last report."""

    model: str
    version: str
    addresses: tuple[str, ...]
    client: Any
    monitor: EngineMonitor
    metrics: Any  # api_proc.metrics.RequestMetrics for (model, version)
    owned: bool  # this module started the client (and closes it)
    fault: FaultSpec | None = None
    in_flight: int = 0
    requests: int = 0
    errors: int = 0
    ttfts: list[float] = field(default_factory=list)
    retired: bool = False  # left the snapshot: closes when in_flight reaches 0


class Targets(list):
    """The targets of one request, with what routed them (to route it again)."""

    route: tuple[str | None, str | None, dict] | None = None


@dataclass(frozen=True, slots=True, eq=False)
class Target:
    """Where one request goes: the group's client and monitor, the names to answer with."""

    name: str  # the real model's NAME (the response's `model`)
    version: str
    group: Group

    @property
    def client(self) -> Any:
        return self.group.client

    @property
    def monitor(self) -> EngineMonitor:
        return self.group.monitor

    @property
    def metrics(self) -> Any:
        return self.group.metrics


class Versions:
    def __init__(self, config: Any, client: Any, monitor: EngineMonitor, metrics: Any = None):
        self.config = config
        self.client = client  # the caller's (started and closed by it)
        self.monitor = monitor
        self.metrics = metrics
        self.control_address: str | None = getattr(config, "control_address", None)
        addresses = config.engine_address
        self.addresses = (addresses,) if isinstance(addresses, str) else tuple(addresses)
        self.groups: dict[tuple[str, str], Group] = {}  # routable: their clients are started
        self.opening: dict[tuple[str, str], Group] = {}
        self.retired: list[Group] = []
        self.waiters: dict[str, asyncio.Future] = {}
        self.tasks: list[asyncio.Task] = []
        self.ctx: Any = None
        self.sock: Any = None
        self.codec: Any = None
        self.synced = asyncio.Event() if self.control_address is not None else None
        self.client_factory = self._engine_client  # addresses -> a client (tests put a fake here)
        if self.control_address is None:
            self.apply(static_snapshot(config.model_name, list(self.addresses)))
        else:  # nothing is routable until the registry has answered (503 "no model is loaded yet")
            self.apply(RegistrySnapshot(epoch=-1, models=[]))

    @property
    def static(self) -> bool:
        return self.control_address is None

    @property
    def epoch(self) -> int:
        return self.snapshot.epoch

    # ------------------------------------------------------------------ snapshots

    def apply(self, snapshot: RegistrySnapshot) -> None:
        """Route by ``snapshot`` from now on: open the groups it adds, retire those it drops."""
        wanted: dict[tuple[str, str], VersionEntry] = {}
        for m in snapshot.models:
            for v in m.versions:
                if v.state in (READY, DRAINING) and v.tokenizer_addresses:
                    wanted[(m.name, v.version)] = v
        for key, group in list(self.groups.items()):
            entry = wanted.get(key)
            if entry is None or tuple(entry.tokenizer_addresses) != group.addresses:
                del self.groups[key]
                self._retire(group)
        for key, group in list(self.opening.items()):
            entry = wanted.get(key)
            if entry is None or tuple(entry.tokenizer_addresses) != group.addresses:
                del self.opening[key]
                group.retired = True  # closed by _start_group once its client is up
        for key, entry in wanted.items():
            group = self.groups.get(key) or self.opening.get(key)
            if group is None:
                group = self._open(key[0], key[1], tuple(entry.tokenizer_addresses))
            group.fault = entry.fault
        self.snapshot = snapshot
        self.table = RouteTable(snapshot)

    def _open(self, model: str, version: str, addresses: tuple[str, ...]) -> Group:
        metrics = self.metrics.view(model, version) if self.metrics is not None else None
        if addresses == self.addresses:
            group = Group(model, version, addresses, self.client, self.monitor, metrics, owned=False)
            self.groups[(model, version)] = group
            return group
        c = self.config
        client = self.client_factory(list(addresses))
        monitor = EngineMonitor(client, c.ping_interval_s, c.ping_timeout_s)
        group = Group(model, version, addresses, client, monitor, metrics, owned=True)
        # routable once its client has sockets (start() is a coroutine: on the next loop turn)
        self.opening[(model, version)] = group
        asyncio.ensure_future(self._start_group(group))
        log.info("model %s@%s: connected to %s", model, version, ", ".join(addresses))
        return group

    def _engine_client(self, addresses: list[str]) -> Any:
        from zeroserve.shared.client import EngineClient

        c = self.config
        return EngineClient(addresses, c.curve, c.heartbeat_interval_s, c.heartbeat_timeout_s)

    async def _start_group(self, group: Group) -> None:
        key = (group.model, group.version)
        try:
            await group.client.start()
        except Exception:  # e.g. a bad address: not routable; the next snapshot tries again
            log.exception("model %s@%s: cannot connect to %s", group.model, group.version, group.addresses)
            if self.opening.get(key) is group:
                del self.opening[key]
            return
        group.monitor.start()
        if group.retired:
            await self._close(group)
        elif self.opening.get(key) is group:
            del self.opening[key]
            self.groups[key] = group

    def _retire(self, group: Group) -> None:
        group.retired = True
        if group.in_flight == 0:
            asyncio.ensure_future(self._close(group))
        else:
            self.retired.append(group)

    async def _close(self, group: Group) -> None:
        if group in self.retired:
            self.retired.remove(group)
        if not group.owned:
            return
        log.info("model %s@%s: disconnected", group.model, group.version)
        await group.monitor.stop()
        await group.client.close()

    # ------------------------------------------------------------------ routing

    def targets(
        self,
        model: str | None,
        session: str | None = None,
        *,
        prompt_tokens: int = 0,
        max_tokens: int | None = None,
        tier_of: Any = None,
    ) -> list[Target]:
        choices = self.table.candidates(
            model, session, prompt_tokens=prompt_tokens, max_tokens=max_tokens, tier_of=tier_of
        )
        out = []
        for c in choices:
            group = self.groups.get((c.model, c.version))
            if group is not None:
                out.append(Target(c.model, c.version, group))
        if not out:
            raise ApiError(
                503,
                f"`{choices[0].model}@{choices[0].version}` is not connected yet; retry shortly.",
                code="model_not_ready",
                headers={"Retry-After": "1"},
            )
        return out

    async def fresh_targets(self, model: str | None, session: str | None = None, **kw: Any) -> list[Target]:
        """``targets``, but when nothing is routable (503) ask the launcher for the registry now
        and try once more: a version the launcher just made ready (or just loaded) is routed by
        this process within a round trip instead of after its next 200 ms watch, so no request
        gets a 503 for a version that is already up."""
        if not self.static and not self.synced.is_set():  # before the first answer nothing is known
            await self.catch_up(FRESH_WAIT_S)
        out = Targets()
        out.route = (model, session, kw)
        try:
            out += self.targets(model, session, **kw)
            return out
        except ApiError as e:
            if e.status != 503 or self.static or not await self.catch_up(FRESH_WAIT_S):
                raise
        out += self.targets(model, session, **kw)
        return out

    async def catch_up(self, timeout_s: float) -> bool:
        """Ask for the registry now; wait until an answer newer than ours is applied and the
        groups it opened are connected. False if nothing newer came within ``timeout_s``."""
        epoch = self.snapshot.epoch if self.synced.is_set() else -1
        self._send(RegistryWatch(epoch=epoch))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.synced.is_set() and self.snapshot.epoch != epoch and not self.opening:
                return True
            await asyncio.sleep(0.01)
        return False

    @asynccontextmanager
    async def lease(self, target: Target, ctx: Any = None):
        """One request on ``target``'s group: counted in flight while it runs, then in the next
        report (an error when it ends with a 5xx or an in-band engine error); its fault applied."""
        group = target.group
        group.in_flight += 1
        status = 200
        try:
            fault = group.fault
            if fault is not None:
                if fault.latency_ms > 0:
                    await asyncio.sleep(fault.latency_ms / 1000.0)
                if fault.error_rate > 0 and random.random() < fault.error_rate:
                    raise ApiError(
                        500,
                        f"Injected fault: {target.name}@{target.version} fails {fault.error_rate:.0%} of its "
                        "requests (--allow-fault-injection).",
                        code="injected_fault",
                    )
            yield target
        except ApiError as e:
            status = e.status
            raise
        except asyncio.CancelledError:
            status = 499
            raise
        except Exception:
            status = 500
            raise
        finally:
            group.in_flight -= 1
            group.requests += 1
            if status >= 500 or (status < 400 and ctx is not None and ctx.finish_reason == "error"):
                group.errors += 1
            elif ctx is not None and ctx.ttft_s is not None and len(group.ttfts) < MAX_TTFTS_PER_REPORT:
                group.ttfts.append(ctx.ttft_s)
            if group.retired and group.in_flight == 0:
                asyncio.ensure_future(self._close(group))

    async def run_targets(self, targets: list[Target], ctx: Any, call: Any, rerouted: bool = False) -> Any:
        """``await call(target)`` on the first target, then on the next while one answers 429 or
        503 before anything was sent (a virtual model's fallback chain). Sets the request
        context's model and version (the access log, the audit record, X-Model-Version). When
        the last one answers 503 before anything was sent, the request is routed once more on a
        fresh registry when that version is no longer routed there (the launcher has just failed
        or drained it)."""
        error: ApiError | None = None
        for i, target in enumerate(targets):
            if error is not None and not self._routable(target):
                # draining or gone since the request was routed (the first choice ran meanwhile): a
                # drain that saw it idle may stop its engine under this request
                continue
            if ctx is not None:
                ctx.model, ctx.version = target.name, target.version
            try:
                async with self.lease(target, ctx):
                    await target.monitor.require_engine()
                    return await call(target)
            except ApiError as e:
                # (an ApiError out of call: nothing was answered yet, and a 503 ran nothing)
                last = i + 1 == len(targets)
                if last and e.status == 503 and not rerouted:
                    again = await self._rerouted(targets, target)
                    if again is not None:
                        log.info("%s@%s is not ready any more; routed again to %s@%s", target.name,
                                 target.version, again[0].name, again[0].version)  # fmt: skip
                        return await self.run_targets(again, ctx, call, rerouted=True)
                if last or e.status not in (429, 503):
                    raise
                error = e
                log.info(
                    "%s@%s answered %d; falling back to %s@%s",
                    target.name,
                    target.version,
                    e.status,
                    targets[i + 1].name,
                    targets[i + 1].version,
                )
        assert error is not None  # the first target is always tried
        raise error

    async def _rerouted(self, targets: list[Target], failed: Target) -> list[Target] | None:
        """After ``failed`` answered 503 (running nothing): the launcher may have just
        failed or drained it, and this process's registry be up to 200 ms old. With a newer
        registry that no longer routes there, the request's targets again; else None."""
        route = getattr(targets, "route", None)
        m = self.table.models.get(failed.name)
        if route is None or self.static or m is None:
            return None
        if not any(v != failed.version and e.state == READY for v, e in m.states.items()):
            return None  # nowhere else to go: the 503 stands at once
        if self._routable(failed) and (not await self.catch_up(FRESH_WAIT_S) or self._routable(failed)):
            return None  # (our registry, or a newer one, still routes there: the 503 stands)
        model, session, kw = route
        try:
            again = self.targets(model, session, **kw)
        except ApiError:
            return None
        return again if again and again[0].group is not failed.group else None

    def _routable(self, target: Target) -> bool:
        """Still ready in the snapshot routed by now, on the same group."""
        m = self.table.models.get(target.name)
        entry = m.states.get(target.version) if m is not None else None
        return (
            entry is not None
            and entry.state == READY
            and self.groups.get((target.name, target.version)) is target.group
        )

    # ------------------------------------------------------------------ state for the endpoints

    def default_group(self) -> Group | None:
        name = self.table.default
        m = self.table.models.get(name) if name is not None else None
        if m is None:
            return None
        for v in m.versions:  # routable ones first
            if (name, v) in self.groups:
                return self.groups[(name, v)]
        return next((g for (n, _), g in self.groups.items() if n == name), None)

    async def readiness(self) -> tuple[bool, str]:
        """Ready when the default model has a ready version with traffic whose engine is ready."""
        if self.static:
            return await self.monitor.readiness()
        if self.monitor.draining:
            return False, "draining: this api process is shutting down"
        if not self.synced.is_set():
            return False, "the model registry has not answered yet"
        name = self.table.default
        m = self.table.models.get(name) if name is not None else None
        if m is None or not m.versions:
            return False, f"no version of the default model `{name}` is ready with traffic"
        why = "its engine does not answer"
        for version in m.versions:
            group = self.groups.get((name, version))
            if group is None:
                continue
            ok, why = await group.monitor.readiness()
            if ok:
                return True, "ready"
        return False, why  # as the single-model server says it (probes and tests read it)

    def model_cards(self, started: int) -> list[dict]:
        """/v1/models: every NAME, NAME@VERSION and virtual name (static: the one NAME, as before)."""
        cards = []

        def card(id_: str, root: str, engine: Any) -> dict:
            c: dict[str, Any] = {
                "id": id_,
                "object": "model",
                "created": started,
                "owned_by": "zeroserve",
                "root": root,
                "parent": None,
            }
            if engine is not None:
                c["max_model_len"] = engine.max_model_len
            return c

        for m in self.snapshot.models:
            first = next((g for (n, _), g in self.groups.items() if n == m.name), None)
            cards.append(card(m.name, m.name, first.monitor.engine if first is not None else None))
            if self.static:
                continue
            for v in m.versions:
                if v.state in (READY, "loading", DRAINING):
                    group = self.groups.get((m.name, v.version))
                    c = card(f"{m.name}@{v.version}", m.name, group.monitor.engine if group else None)
                    c["parent"] = m.name
                    cards.append(c)
        for v in self.snapshot.virtual:
            cards.append(card(v.name, v.name, None))
        return cards

    def health(self) -> list[dict]:
        out = []
        for m in self.snapshot.models:
            for v in m.versions:
                group = self.groups.get((m.name, v.version))
                out.append(
                    {
                        "model": m.name,
                        "version": v.version,
                        "state": v.state,
                        "weight": v.weight,
                        "connected": group is not None,
                        "reachable": group.monitor.reachable if group is not None else False,
                        "in_flight": group.in_flight if group is not None else 0,
                    }
                )
        return out

    # ------------------------------------------------------------------ control channel

    async def start(self) -> None:
        if self.static:
            return
        import zmq
        import zmq.asyncio

        from zeroserve.shared.ipc import Codec, connect

        self.ctx = zmq.asyncio.Context()
        identity = f"api-{self.config.index}-{uuid.uuid4().hex[:8]}".encode()
        # the launcher binds its control socket in the private run dir (ipc://, never CURVE), whatever
        # the engine's transport: CURVE keys on this side would fail the handshake without a word
        curve = self.config.curve if self.control_address.startswith("tcp://") else None
        self.sock = connect(self.ctx, zmq.DEALER, self.control_address, curve, identity)
        self.codec = Codec(ToApi, "registry")
        self.tasks = [
            asyncio.ensure_future(self._recv_loop()),
            asyncio.ensure_future(self._watch_loop()),
            asyncio.ensure_future(self._report_loop()),
        ]

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []
        for group in [*self.groups.values(), *self.opening.values(), *self.retired]:
            if group.owned:
                await group.monitor.stop()
                await group.client.close()
        self.groups.clear()
        self.opening.clear()
        self.retired.clear()
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None

    def _send(self, msg: Any) -> bool:
        from zeroserve.shared.ipc import SendError, send_now

        try:
            send_now(self.sock, [self.codec.encode(msg)])
            return True
        except SendError:
            return False

    async def _recv_loop(self) -> None:
        from zeroserve.shared.ipc import receive

        while True:
            msg = await receive(self.sock, self.codec)
            match msg:
                case RegistrySnapshot():
                    if msg.epoch != self.snapshot.epoch or not self.synced.is_set():
                        try:
                            self.apply(msg)
                        except Exception:  # a snapshot we cannot use must not end the loop
                            log.exception("registry snapshot %d could not be applied", msg.epoch)
                            continue
                    self.synced.set()
                case RegistryUnchanged():
                    self.synced.set()
                case AdminReply():
                    fut = self.waiters.pop(msg.request_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)

    async def _watch_loop(self) -> None:
        started, warned = time.monotonic(), False
        while True:
            epoch = self.snapshot.epoch if self.synced.is_set() else -1
            self._send(RegistryWatch(epoch=epoch))
            if not warned and epoch == -1 and time.monotonic() - started > UNSYNCED_WARNING_S:
                warned = True  # /ready stays 503 until the registry answers: say why, once
                log.warning(
                    "no model registry from the launcher at %s after %.0fs; /ready answers 503 until "
                    "it answers (is `zeroserve serve` running with this run dir?)",
                    self.control_address,
                    UNSYNCED_WARNING_S,
                )
            await asyncio.sleep(WATCH_INTERVAL_S)

    def take_report(self) -> VersionReport:
        counts = []
        for group in [*self.groups.values(), *self.retired]:
            counts.append(
                VersionCounts(
                    model=group.model,
                    version=group.version,
                    requests=group.requests,
                    errors=group.errors,
                    ttfts_s=group.ttfts,
                    in_flight=group.in_flight,
                )
            )
            group.requests = group.errors = 0
            group.ttfts = []
        return VersionReport(api_index=self.config.index, epoch=self.snapshot.epoch, counts=counts)

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL_S)
            if self.synced.is_set():
                try:
                    self._send(self.take_report())
                except Exception:  # a report lost must not stop the next ones (drains wait on them)
                    log.exception("version report failed")

    async def admin(
        self, op: str, model: str | None = None, version: str | None = None, body: str = ""
    ) -> AdminReply:
        """Forward an admin call (auth and body checks done) to the launcher's registry."""
        if self.static:
            raise ApiError(
                404,
                "The model registry needs `zeroserve serve` (its launcher owns the registry); this api "
                "process serves one fixed model.",
                code="registry_off",
            )
        request_id = uuid.uuid4().hex
        fut = asyncio.get_running_loop().create_future()
        self.waiters[request_id] = fut
        try:
            if not self._send(
                AdminCommand(request_id=request_id, op=op, model=model, version=version, body=body)
            ):
                raise ApiError(
                    503, "The model registry is not reading; retry shortly.", code="registry_unavailable"
                )
            try:
                return await asyncio.wait_for(fut, ADMIN_TIMEOUT_S)
            except TimeoutError:
                raise ApiError(
                    504, "The model registry did not answer in time.", code="registry_unavailable"
                ) from None
        finally:
            self.waiters.pop(request_id, None)


class RegistryCollector:
    """The registry's numbers at scrape time, from this process' latest snapshot: every api
    process holds the same one, so a scrape (answered by any one) counts each once."""

    def __init__(self, versions: Versions, prefix: str = "zeroserve"):
        self.versions = versions
        self.prefix = prefix

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        p, snapshot = self.prefix, self.versions.snapshot
        weights = GaugeMetricFamily(
            f"{p}:model_version_weight",
            "The traffic weight of each version (its share is weight / the model's total); state and "
            "stable in the labels.",
            labels=["model_name", "model_version", "state", "stable"],
        )
        promotions = CounterMetricFamily(
            f"{p}:model_promotions", "Canary versions promoted to stable.", labels=["model_name"]
        )
        rollbacks = CounterMetricFamily(
            f"{p}:model_rollbacks", "Rollbacks (a canary's SLO breach, or asked for).", labels=["model_name"]
        )
        for m in snapshot.models:
            for v in m.versions:
                weights.add_metric([m.name, v.version, v.state, str(v.version == m.stable).lower()], v.weight)
            promotions.add_metric([m.name], float(m.promotions))
            rollbacks.add_metric([m.name], float(m.rollbacks))
        yield weights
        yield promotions
        yield rollbacks

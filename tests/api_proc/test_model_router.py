"""The model router (api_proc/model_router.py) and the api side of the registry
(api_proc/versions.py, models_admin.py), without engine processes: route tables from hand-made
snapshots, and the app over fake engines with a fake launcher on the control socket."""

from __future__ import annotations

import asyncio
import collections
import json

import msgspec
import pytest
import zmq
import zmq.asyncio
from aiohttp.test_utils import TestClient, TestServer
from api_fake_engine import FakeEngineClient, make_config

from zeroserve.api_proc.app import create_app
from zeroserve.api_proc.errors import ApiError
from zeroserve.api_proc.model_router import VERSIONS, RouteTable, estimate_prompt_tokens
from zeroserve.shared.control import (
    AdminCommand,
    AdminReply,
    FaultSpec,
    ModelEntry,
    RegistrySnapshot,
    RegistryUnchanged,
    RegistryWatch,
    ToLauncher,
    VersionEntry,
    VersionReport,
    VirtualModel,
    VirtualRule,
    WindowStats,
)
from zeroserve.shared.messages import ErrorInfo, TextDelta


def version(v: str, weight: int, state: str = "ready", addresses=("ipc:///x",), **kw) -> VersionEntry:
    return VersionEntry(
        version=v, state=state, weight=weight, path="", tokenizer_addresses=list(addresses), **kw
    )


def snapshot(*models: ModelEntry, virtual=(), default=None, epoch=1) -> RegistrySnapshot:
    return RegistrySnapshot(epoch=epoch, models=list(models), virtual=list(virtual), default_model=default)


SMOL = ModelEntry(
    name="smol",
    stable="v1",
    versions=[version("v1", 70), version("v2", 30), version("v3", 50, state="loading"), version("v4", 0)],
)
BIG = ModelEntry(name="big", stable="v1", versions=[version("v1", 1)])


def test_weights_split_among_ready_versions_with_traffic():
    table = RouteTable(snapshot(SMOL, BIG))
    grid = [i / 1000 for i in range(1000)]  # the random draw, evenly: the split is exact
    counts = collections.Counter(table.choose("smol", rand=r).version for r in grid)
    assert counts == {"v1": 700, "v2": 300}  # v3 is loading, v4 has weight 0
    assert table.choose(None, rand=0.5).model == "smol"  # no default named: the first model
    assert RouteTable(snapshot(SMOL, BIG, default="big")).choose(None).model == "big"


def test_a_session_sticks_to_one_version_and_every_process_agrees():
    table, other = RouteTable(snapshot(SMOL)), RouteTable(snapshot(SMOL, epoch=7))
    sessions = [f"user-{i}" for i in range(400)]
    first = {s: table.choose("smol", s).version for s in sessions}
    for _ in range(3):  # random draws in between must not move a session
        table.choose("smol")
        assert {s: table.choose("smol", s).version for s in sessions} == first
    assert {s: other.choose("smol", s).version for s in sessions} == first
    share = collections.Counter(first.values())["v1"] / len(sessions)
    assert 0.6 < share < 0.8  # the sessions spread by the weights too


def test_a_traffic_shift_moves_only_the_sessions_at_the_boundary():
    before = RouteTable(snapshot(SMOL))
    after = RouteTable(
        snapshot(ModelEntry(name="smol", stable="v1", versions=[version("v1", 60), version("v2", 40)]))
    )
    sessions = [f"s{i}" for i in range(500)]
    moved = [s for s in sessions if before.choose("smol", s).version != after.choose("smol", s).version]
    # cumulative weights: only points in [0.6, 0.7) of the range change hands, and only v1 -> v2
    assert all(before.choose("smol", s).version == "v1" for s in moved)
    assert len(moved) < 0.2 * len(sessions)


def test_a_pin_picks_its_version_whatever_the_weights():
    table = RouteTable(snapshot(SMOL))
    assert {table.choose("smol@v2").version for _ in range(50)} == {"v2"}
    assert table.choose("smol@v4").version == "v4"  # weight 0 but ready: pinned requests still get it
    with pytest.raises(ApiError) as e:
        table.choose("smol@v3")
    assert e.value.status == 503 and "loading" in e.value.message


def test_an_unknown_model_or_version_is_a_404_listing_what_is_served():
    auto = VirtualModel(name="auto", rules=[VirtualRule(model="smol")])
    table = RouteTable(snapshot(SMOL, virtual=[auto]))
    for name in ("gpt-4", "smol@v9", "big@v1", "smol@"):
        with pytest.raises(ApiError) as e:
            table.candidates(name)
        assert (e.value.status, e.value.code, e.value.param) == (404, "model_not_found", "model")
        for served in ("`smol`", "`smol@v1`", "`smol@v2`", "`smol@v3`", "`auto`"):
            assert served in e.value.message, (name, e.value.message)
        assert "`smol@v9`" not in e.value.message.split("serves", 1)[1]


def test_a_model_without_a_ready_version_is_a_503():
    table = RouteTable(
        snapshot(ModelEntry(name="m", stable="v1", versions=[version("v1", 5, state="loading")]))
    )
    with pytest.raises(ApiError) as e:
        table.choose("m")
    assert e.value.status == 503 and e.value.headers["Retry-After"] == "1"


def test_a_virtual_model_picks_by_rules_then_falls_back():
    auto = VirtualModel(
        name="auto",
        rules=[
            VirtualRule(model="big", tier="gold"),
            VirtualRule(model="smol@v2", max_prompt_tokens=10),
            VirtualRule(model="big", max_tokens_over=100),
        ],
        fallback=["smol", "big"],
    )
    table = RouteTable(snapshot(SMOL, BIG, virtual=[auto]))

    def first(**kw):
        return [(c.model, c.version) for c in table.candidates("auto", rand=0.0, **kw)]

    assert first(prompt_tokens=5) == [("smol", "v2"), ("smol", "v1"), ("big", "v1")]
    assert first(prompt_tokens=50, max_tokens=500)[0] == ("big", "v1")
    assert first(prompt_tokens=50, max_tokens=50) == [("smol", "v1"), ("big", "v1")]  # no rule: the chain
    assert first(prompt_tokens=5, tier_of={"X-Tier": "gold"}.get)[0] == ("big", "v1")


def test_a_virtual_model_skips_what_is_not_ready_and_tries_failing_ones_last():
    failing = ModelEntry(
        name="smol", stable="v1", versions=[version("v1", 1, stats=WindowStats(requests=20, errors=12))]
    )
    down = ModelEntry(name="big", stable="v1", versions=[version("v1", 1, state="failed")])
    ok = ModelEntry(name="tiny", stable="v1", versions=[version("v1", 1)])
    auto = VirtualModel(name="auto", rules=[VirtualRule(model="big")], fallback=["smol", "tiny"])
    table = RouteTable(snapshot(failing, down, ok, virtual=[auto]))
    assert [c.model for c in table.candidates("auto")] == ["tiny", "smol"]


def test_prompt_tokens_are_estimated_from_characters_or_counted():
    assert estimate_prompt_tokens("x" * 41) == 11
    assert estimate_prompt_tokens([1, 2, 3]) == 3
    assert estimate_prompt_tokens([[1, 2], [1, 2, 3, 4]]) == 4
    msgs = [msgspec.structs.replace(m, content="y" * 8) for m in _messages(2)]
    assert estimate_prompt_tokens(messages=msgs) == 4


def _messages(n):
    from zeroserve.api_proc.protocol import ChatMessageIn

    return [ChatMessageIn(role="user", content="") for _ in range(n)]


# --------------------------------------------------------------------------- admin, no launcher


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


async def test_admin_model_routes_need_the_admin_key_and_a_launcher():
    async with TestClient(TestServer(create_app(make_config(), FakeEngineClient()))) as client:
        assert (await client.get("/admin/models", headers=bearer("adm"))).status == 404  # no --admin-key
    app = create_app(make_config(admin_key="adm"), FakeEngineClient())
    async with TestClient(TestServer(app)) as client:
        wrong = await client.get("/admin/models", headers=bearer("nope"))
        assert wrong.status == 401 and (await wrong.json())["error"]["code"] == "invalid_admin_key"
        off = await client.get("/admin/models", headers=bearer("adm"))
        body = await off.json()
        assert off.status == 404 and body["error"]["code"] == "registry_off"
        assert "zeroserve serve" in body["error"]["message"]


BAD_BODIES = [
    ("POST", "/admin/models/smol/versions", {"path": "/m.gguf"}, "version"),
    ("POST", "/admin/models/smol/versions", {"version": "v@2"}, "version"),
    ("POST", "/admin/models/smol/versions", {"version": "v2", "weight": -1}, "weight"),
    ("POST", "/admin/models/smol/versions", {"version": "v2", "options": [1]}, "options"),
    (
        "POST",
        "/admin/models/smol/versions",
        {"version": "v2", "fault": {"error_rate": 2}},
        "fault.error_rate",
    ),
    ("POST", "/admin/models/smol/versions", {"version": "v2", "fault": {"rate": 1}}, "fault.rate"),
    ("POST", "/admin/models/smol/versions", {"version": "v2", "colour": 1}, "colour"),
    ("PUT", "/admin/models/smol/traffic", {"weights": {"v1": 0, "v2": 0}}, "weights"),
    ("PUT", "/admin/models/smol/traffic", {"weights": {"v1": 1.5}}, "weights.v1"),
    ("PUT", "/admin/models/smol/traffic", {"weights": []}, "weights"),
    ("POST", "/admin/models/smol/canary", {"version": "v2", "steps": [50, 25, 100]}, "steps"),
    ("POST", "/admin/models/smol/canary", {"version": "v2", "steps": [5, 50]}, "steps"),
    ("POST", "/admin/models/smol/canary", {"version": "v2", "interval_s": 0}, "interval_s"),
    (
        "POST",
        "/admin/models/smol/canary",
        {"version": "v2", "slo": {"max_error_rate": -1}},
        "slo.max_error_rate",
    ),
    ("POST", "/admin/models/smol/rollback", {"now": True}, "now"),
]


@pytest.mark.parametrize(("method", "path", "body", "param"), BAD_BODIES)
async def test_bad_admin_bodies_are_400s_naming_the_field(method, path, body, param):
    app = create_app(make_config(admin_key="adm"), FakeEngineClient())
    async with TestClient(TestServer(app)) as client:
        resp = await client.request(method, path, json=body, headers=bearer("adm"))
        err = (await resp.json())["error"]
        assert resp.status == 400 and err["param"] == param, err


async def test_one_model_is_served_as_version_v1_with_the_header():
    fake = FakeEngineClient()
    async with TestClient(TestServer(create_app(make_config(), fake))) as client:
        resp = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "stream": True})
        await resp.read()
        assert (resp.status, resp.headers["X-Model-Version"], resp.headers["X-Model-Name"]) == (
            200,
            "v1",
            "test-model",
        )
        pinned = await client.post(
            "/v1/completions", json={"model": "test-model@v1", "prompt": "a", "max_tokens": 1}
        )
        assert pinned.status == 200 and (await pinned.json())["model"] == "test-model"
        missing = await client.post("/v1/completions", json={"model": "x", "prompt": "a"})
        assert missing.status == 404 and "X-Model-Version" not in missing.headers
        health = await (await client.get("/health")).json()
        assert health["models"] == [
            {"model": "test-model", "version": "v1", "state": "ready", "weight": 100, "connected": True,
             "reachable": True, "in_flight": 0}
        ]  # fmt: skip


# --------------------------------------------------------------------------- with a (fake) launcher


class Overloaded(FakeEngineClient):
    async def stream(self, req):
        self.requests.append(req)
        info = ErrorInfo(status=429, type="rate_limit_error", message="queue full", code="engine_overloaded")
        yield TextDelta(request_id=req.request_id, text="", finish_reason="error", error=info)


class FakeLauncher:
    """The launcher's end of the control socket: answers watches with ``snapshot``, keeps the
    reports, answers admin calls with 207 and the command echoed."""

    def __init__(self, address: str, snapshot: RegistrySnapshot):
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.bind(address)
        self.snapshot = snapshot
        self.reports: list[VersionReport] = []
        self.commands: list[AdminCommand] = []
        self.task = asyncio.ensure_future(self.run())

    async def run(self):
        decoder, enc = msgspec.msgpack.Decoder(ToLauncher), msgspec.msgpack.Encoder()
        while True:
            ident, raw = await self.sock.recv_multipart()
            msg = decoder.decode(raw)
            if isinstance(msg, RegistryWatch):
                reply = (
                    self.snapshot if msg.epoch != self.snapshot.epoch else RegistryUnchanged(epoch=msg.epoch)
                )
            elif isinstance(msg, VersionReport):
                self.reports.append(msg)
                continue
            else:
                self.commands.append(msg)
                reply = AdminReply(request_id=msg.request_id, status=207, body=json.dumps({"op": msg.op}))
            await self.sock.send_multipart([ident, enc.encode(reply)])

    async def close(self):
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.sock.close(0)
        self.ctx.term()


async def registry_app(tmp_path, snap: RegistrySnapshot, fakes: dict[str, FakeEngineClient]):
    launcher = FakeLauncher(f"ipc://{tmp_path}/control.sock", snap)
    config = make_config(admin_key="adm", control_address=f"ipc://{tmp_path}/control.sock")
    app = create_app(config, fakes.pop("inproc://fake"))
    app[VERSIONS].client_factory = lambda addresses: fakes[addresses[0]]
    client = TestClient(TestServer(app))
    await client.start_server()
    for _ in range(100):
        if (await client.get("/ready")).status == 200:
            break
        await asyncio.sleep(0.05)
    return launcher, client


TWO = ModelEntry(
    name="m",
    stable="v1",
    versions=[
        version("v1", 50, addresses=["inproc://fake"]),
        version("v2", 50, addresses=["fake://v2"], fault=FaultSpec(error_rate=1.0)),
    ],
)


async def test_versions_with_a_launcher_split_pin_inject_faults_and_report(tmp_path):
    v1, v2 = FakeEngineClient(), FakeEngineClient()
    launcher, client = await registry_app(
        tmp_path, snapshot(TWO, epoch=3), {"inproc://fake": v1, "fake://v2": v2}
    )
    try:
        seen = collections.Counter()
        for _ in range(40):
            resp = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
            seen[(resp.headers["X-Model-Version"], resp.status)] += 1
            if resp.status == 500:
                assert (await resp.json())["error"]["code"] == "injected_fault"
        assert set(seen) == {("v1", 200), ("v2", 500)}  # v2 fails all: its fault is applied
        assert not v2.requests  # ... before anything reaches its engine
        pinned = await client.post("/v1/completions", json={"model": "m@v1", "prompt": "a", "max_tokens": 1})
        assert pinned.headers["X-Model-Version"] == "v1"
        ids = [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]]
        assert ids == ["m", "m@v1", "m@v2"]
        admin = await client.put(
            "/admin/models/m/traffic", json={"weights": {"v1": 1}}, headers=bearer("adm")
        )
        assert admin.status == 207 and await admin.json() == {"op": "traffic"}  # the launcher's answer, as is
        assert (launcher.commands[-1].op, launcher.commands[-1].model) == ("traffic", "m")
        await client.delete("/admin/models/org%2Fm/versions/v1", headers=bearer("adm"))
        assert (launcher.commands[-1].op, launcher.commands[-1].model, launcher.commands[-1].version) == (
            "unload",
            "org/m",
            "v1",
        )  # a model name with a slash (a Hugging Face id), quoted in the path
        await asyncio.sleep(1.2)  # a report
        sums = collections.Counter()
        for r in launcher.reports:
            assert r.epoch == 3
            for c in r.counts:
                sums[(c.version, "requests")] += c.requests
                sums[(c.version, "errors")] += c.errors
        assert sums[("v2", "errors")] == seen[("v2", 500)] and sums[("v1", "errors")] == 0
        assert sums[("v1", "requests")] == seen[("v1", 200)] + 1
    finally:
        await client.close()
        await launcher.close()


async def test_a_virtual_model_falls_back_when_its_choice_answers_429(tmp_path):
    auto = VirtualModel(name="auto", rules=[VirtualRule(model="m@v1")], fallback=["m@v2"])
    two = msgspec.structs.replace(
        TWO, versions=[TWO.versions[0], msgspec.structs.replace(TWO.versions[1], fault=None)]
    )
    busy, v2 = Overloaded(), FakeEngineClient()
    launcher, client = await registry_app(
        tmp_path, snapshot(two, virtual=[auto], epoch=2), {"inproc://fake": busy, "fake://v2": v2}
    )
    try:
        for stream in (False, True):
            resp = await client.post(
                "/v1/completions", json={"model": "auto", "prompt": "a", "max_tokens": 1, "stream": stream}
            )
            await resp.read()
            assert (resp.status, resp.headers["X-Model-Version"]) == (200, "v2")
        assert len(busy.requests) == 2 and len(v2.requests) == 2
        direct = await client.post("/v1/completions", json={"model": "m@v1", "prompt": "a", "max_tokens": 1})
        assert direct.status == 429  # a real name has no fallback
    finally:
        await client.close()
        await launcher.close()


async def test_a_fallback_that_started_draining_while_the_first_choice_ran_is_not_tried(tmp_path):
    auto = VirtualModel(name="auto", rules=[VirtualRule(model="m@v1")], fallback=["m@v2"])
    two = msgspec.structs.replace(
        TWO, versions=[TWO.versions[0], msgspec.structs.replace(TWO.versions[1], fault=None)]
    )
    draining = msgspec.structs.replace(
        two,
        versions=[two.versions[0], msgspec.structs.replace(two.versions[1], state="draining", weight=0)],
    )
    apps = []

    class UnloadsV2(Overloaded):
        """Answers 429, after the registry set v2 draining (an unload while this request ran)."""

        async def stream(self, req):
            apps[0][VERSIONS].apply(snapshot(draining, virtual=[auto], epoch=3))
            async for delta in super().stream(req):
                yield delta

    busy, v2 = UnloadsV2(), FakeEngineClient()
    launcher, client = await registry_app(
        tmp_path, snapshot(two, virtual=[auto], epoch=2), {"inproc://fake": busy, "fake://v2": v2}
    )
    apps.append(client.app)
    try:
        resp = await client.post("/v1/completions", json={"model": "auto", "prompt": "a", "max_tokens": 1})
        assert resp.status == 429, await resp.text()  # the first choice's answer: nothing else is ready
        assert len(busy.requests) == 1 and v2.requests == []  # the draining v2 got nothing
    finally:
        await client.close()
        await launcher.close()


# --------------------------------------------------------------------------- the CLI's calls


def test_the_models_cli_builds_the_admin_calls():
    import argparse

    from zeroserve.launcher.models_cli import add_parser, request_of

    root = argparse.ArgumentParser()
    add_parser(root.add_subparsers(dest="command"))

    def of(*argv):
        return request_of(root.parse_args(["models", *argv]))

    assert of("traffic", "smol", "v1=90", "v2=10") == (
        "PUT",
        "/admin/models/smol/traffic",
        {"weights": {"v1": 90, "v2": 10}},
    )
    assert of("canary", "smol", "v2", "--steps", "5,50,100", "--max-error-rate", "0.01") == (
        "POST",
        "/admin/models/smol/canary",
        {"version": "v2", "steps": [5, 50, 100], "slo": {"max_error_rate": 0.01}},
    )
    assert of("load", "smol", "v2", "--option", "max_num_seqs=8", "--option", "dtype=bfloat16") == (
        "POST",
        "/admin/models/smol/versions",
        {"version": "v2", "options": {"max_num_seqs": 8, "dtype": "bfloat16"}},
    )
    assert of("unload", "a/b", "v1") == ("DELETE", "/admin/models/a%2Fb/versions/v1", None)
    with pytest.raises(SystemExit):
        of("traffic", "smol", "v1:90")


async def test_a_version_made_ready_is_served_at_once_not_after_the_next_watch(tmp_path):
    """Between the launcher marking a version ready and this api's next 200 ms watch, a request
    for it must not be a 503: the api asks for the registry at once and routes by the answer."""
    fakes = {"inproc://fake": FakeEngineClient()}
    names = [f"v{i}" for i in range(2, 5)]
    fakes |= {f"fake://{n}": FakeEngineClient() for n in names}

    def entry(ready: list[str], loading: str | None) -> ModelEntry:
        versions = [version("v1", 100, addresses=["inproc://fake"])]
        versions += [version(n, 0, addresses=[f"fake://{n}"]) for n in ready]
        if loading is not None:
            versions.append(version(loading, 0, state="loading", addresses=[f"fake://{loading}"]))
        return ModelEntry(name="m", stable="v1", versions=versions)

    launcher, client = await registry_app(tmp_path, snapshot(entry([], "v2"), epoch=1), dict(fakes))
    try:
        epoch = 1
        for i, name in enumerate(names):
            ready = names[: i + 1]
            await asyncio.sleep(0.3)  # the api has heard the snapshot where `name` is loading
            assert (
                await client.post("/v1/completions", json={"model": f"m@{name}", "prompt": "a"})
            ).status == 503
            epoch += 1
            nxt = names[i + 1] if i + 1 < len(names) else None
            launcher.snapshot = snapshot(entry(ready, nxt), epoch=epoch)  # the launcher: `name` is ready
            resp = await client.post(
                "/v1/completions", json={"model": f"m@{name}", "prompt": "a", "max_tokens": 1}
            )
            assert resp.status == 200, await resp.text()
            assert resp.headers["X-Model-Version"] == name
    finally:
        await client.close()
        await launcher.close()


class NotReady(FakeEngineClient):
    """Answers 503 as a tokenizer whose engine is down does."""

    async def stream(self, req):
        self.requests.append(req)
        info = ErrorInfo(status=503, type="service_unavailable", message="the engine is not ready", code=None)
        yield TextDelta(request_id=req.request_id, text="", finish_reason="error", error=info)


async def test_a_503_from_a_version_the_launcher_just_failed_is_routed_again(tmp_path):
    """The launcher failed v2 (a crash loop) but this api's registry is up to 200 ms old: the
    request that went to v2 and got its 503 is routed again on a fresh registry, to v1. With
    no other ready version, or a registry that still routes to v2, the 503 stands."""
    everything_to_v2 = ModelEntry(
        name="m",
        stable="v1",
        versions=[version("v1", 0, addresses=["inproc://fake"]), version("v2", 100, addresses=["fake://v2"])],
    )
    v2_failed = ModelEntry(
        name="m",
        stable="v1",
        versions=[
            version("v1", 100, addresses=["inproc://fake"]),
            version("v2", 0, state="failed", addresses=["fake://v2"]),
        ],
    )
    v1, v2 = FakeEngineClient(), NotReady()
    launcher, client = await registry_app(
        tmp_path, snapshot(everything_to_v2, epoch=1), {"inproc://fake": v1, "fake://v2": v2}
    )
    try:
        await asyncio.sleep(0.3)
        resp = await client.post("/v1/completions", json={"model": "m", "prompt": "a", "max_tokens": 1})
        assert resp.status == 503 and len(v2.requests) == 1  # the launcher still routes to v2
        launcher.snapshot = snapshot(v2_failed, epoch=2)  # failed, not yet watched by the api
        resp = await client.post("/v1/completions", json={"model": "m", "prompt": "a", "max_tokens": 1})
        assert resp.status == 200, await resp.text()
        assert resp.headers["X-Model-Version"] == "v1" and len(v2.requests) == 2 and len(v1.requests) == 1
    finally:
        await client.close()
        await launcher.close()

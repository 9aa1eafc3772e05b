"""The model registry without processes: its state machine, the canary controller, drains,
persistence and the models file, driven by a fake clock, fake groups and fake api reports."""

from __future__ import annotations

import json
import os

import pytest

from zeroserve.launcher.model_registry import STATE_FILE, CapacityError, Registry
from zeroserve.launcher.models_file import (
    ModelsFileError,
    check_options,
    parse_models,
    read_models_file,
    single_model,
)
from zeroserve.shared.control import (
    AdminCommand,
    RegistrySnapshot,
    VersionCounts,
    VersionReport,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeGroups:
    """Records what the registry asks for; ``refuse`` makes the next prepare fail."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.refuse: Exception | None = None

    def prepare(self, model, spec):
        if self.refuse is not None:
            raise self.refuse
        return [f"ipc:///run/{model}@{spec.version}/tokenizer-0.sock"]

    def start(self, model, spec):
        self.started.append(f"{model}@{spec.version}")

    def stop(self, model, version):
        self.stopped.append(f"{model}@{version}")


def make(tmp_path=None, api_workers=1, **kw) -> tuple[Registry, FakeGroups, Clock]:
    groups, clock = FakeGroups(), Clock()
    state = None if tmp_path is None else str(tmp_path / STATE_FILE)
    reg = Registry(
        single_model("smol", "/m/smol.gguf"),
        groups,
        api_workers=api_workers,
        drain_timeout_s=10.0,
        state_path=state,
        clock=clock,
        **kw,
    )
    reg.prepare_all()
    reg.group_ready("smol", "v1", 2048)
    return reg, groups, clock


def admin(reg: Registry, op: str, model: str | None = "smol", version: str | None = None, body=None):
    reply = reg.handle(AdminCommand("r1", op, model, version, json.dumps(body) if body is not None else ""))
    return reply.status, json.loads(reply.body)


def versions(reg: Registry, model: str = "smol") -> dict[str, tuple[str, int]]:
    return {v.name: (v.state, v.weight) for v in reg.models[model].versions.values()}


def load_v2(reg: Registry, gguf: str, **body) -> None:
    status, out = admin(reg, "load", body={"version": "v2", "path": gguf, **body})
    assert status == 202, out
    reg.group_ready("smol", "v2", 2048)


def report(reg: Registry, clock: Clock, version: str, requests=0, errors=0, ttfts=(), in_flight=0, api=0):
    counts = [VersionCounts("smol", version, requests, errors, list(ttfts), in_flight)]
    reg.on_report(VersionReport(api, reg.epoch, counts))


@pytest.fixture
def gguf(tmp_path) -> str:
    """Any existing .gguf path: the fake groups never read it."""
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    return str(path)


# ---------------------------------------------------------------- load / unload / traffic


def test_a_hot_load_starts_loading_then_ready_and_a_later_version_gets_no_traffic(gguf):
    reg, groups, _ = make()
    epoch = reg.epoch
    status, out = admin(reg, "load", body={"version": "v2", "path": gguf})
    assert (status, out["state"], out["weight"]) == (202, "loading", 0)
    assert groups.started == ["smol@v2"] and reg.epoch > epoch
    snap = reg.snapshot()
    assert isinstance(snap, RegistrySnapshot)
    v2 = snap.models[0].versions[1]
    assert (v2.state, v2.tokenizer_addresses) == ("loading", ["ipc:///run/smol@v2/tokenizer-0.sock"])
    reg.group_ready("smol", "v2", 1024)
    assert versions(reg) == {"v1": ("ready", 100), "v2": ("ready", 0)}
    assert reg.snapshot().models[0].versions[1].max_model_len == 1024
    assert admin(reg, "load", body={"version": "v2", "path": gguf})[0] == 409  # a duplicate


def test_a_load_refused_for_capacity_or_a_bad_body_starts_nothing(gguf):
    reg, groups, _ = make()
    groups.refuse = CapacityError("smol@v2 does not fit: it needs about 9 GiB")
    status, out = admin(reg, "load", body={"version": "v2", "path": gguf})
    assert (
        status == 507 and out["error"]["code"] == "insufficient_memory" and "9 GiB" in out["error"]["message"]
    )
    groups.refuse = None
    cases = [
        ({"version": "v2", "path": "/nope/x.gguf"}, "path"),
        ({"version": "a@b", "path": gguf}, "version"),
        ({"version": "v2", "path": gguf, "options": {"port": 1}}, "options"),
        ({"version": "v2", "path": gguf, "options": {"max_num_seqs": "many"}}, "options.max_num_seqs"),
        ({"version": "v2", "path": gguf, "weight": -1}, "weight"),
        ({"version": "v2", "path": gguf, "fault": {"error_rate": 0.5}}, "fault"),  # not allowed here
        ({"version": "v2", "path": gguf, "colour": 1}, "colour"),
    ]
    for body, param in cases:
        status, out = admin(reg, "load", body=body)
        assert (status, out["error"]["param"]) == (400, param), (body, out)
    assert groups.started == [] and list(reg.models["smol"].versions) == ["v1"]


def test_a_failed_load_keeps_the_reason_stops_its_group_and_can_be_loaded_again(gguf):
    reg, groups, _ = make()
    admin(reg, "load", body={"version": "v2", "path": gguf, "weight": 10})
    reg.group_failed("smol", "v2", "worker failed to start 3 times: CheckpointError: truncated")
    v2 = reg.snapshot().models[0].versions[1]
    assert (v2.state, v2.weight, v2.tokenizer_addresses) == ("failed", 0, [])
    assert "truncated" in v2.reason and groups.stopped == ["smol@v2"]
    assert admin(reg, "load", body={"version": "v2", "path": gguf})[0] == 202  # replaces the failed one
    assert versions(reg)["v2"] == ("loading", 0)


def test_unload_refuses_the_only_version_with_traffic_then_drains_until_every_api_reports_idle(gguf):
    reg, groups, clock = make(api_workers=2)
    load_v2(reg, gguf)
    status, out = admin(reg, "unload", version="v1")
    assert status == 409 and out["error"]["code"] == "only_version_with_traffic"
    assert admin(reg, "traffic", body={"weights": {"v2": 100}})[0] == 200
    assert versions(reg) == {"v1": ("ready", 0), "v2": ("ready", 100)}
    status, out = admin(reg, "unload", version="v1")
    assert (status, out["state"]) == (202, "draining")
    assert reg.models["smol"].stable == "v2"  # the stable version moved to the one left with traffic
    drain_epoch = reg.epoch
    # a report from before the draining epoch does not count, however idle it looks
    reg.on_report(VersionReport(0, drain_epoch - 1, []))
    reg.on_report(VersionReport(1, drain_epoch - 1, []))
    reg.tick()
    assert groups.stopped == []
    report(reg, clock, "v1", in_flight=3, api=0)  # api 0 still streams on v1
    reg.on_report(VersionReport(1, reg.epoch, []))
    clock.now += 1
    reg.tick()
    assert groups.stopped == []
    report(reg, clock, "v1", requests=3, in_flight=0, api=0)
    reg.tick()
    assert groups.stopped == ["smol@v1"]
    assert versions(reg)["v1"] == ("draining", 0)
    reg.group_stopped("smol", "v1")
    assert versions(reg)["v1"] == ("unloaded", 0)
    assert reg.snapshot().models[0].versions[0].tokenizer_addresses == []


def test_unload_refuses_while_the_only_other_version_with_traffic_is_still_loading(gguf):
    reg, groups, _ = make()
    assert admin(reg, "load", body={"version": "v2", "path": gguf, "weight": 100})[0] == 202
    assert versions(reg) == {"v1": ("ready", 100), "v2": ("loading", 100)}
    # v2 takes no request until it is ready: unloading v1 now would leave smol nothing to route to
    status, out = admin(reg, "unload", version="v1")
    assert status == 409 and out["error"]["code"] == "only_version_with_traffic", out
    assert versions(reg)["v1"] == ("ready", 100) and groups.stopped == []
    reg.group_ready("smol", "v2", 2048)
    assert admin(reg, "unload", version="v1")[0] == 202


def test_a_drain_is_bounded_by_its_timeout(gguf):
    reg, groups, clock = make()
    load_v2(reg, gguf)
    admin(reg, "traffic", body={"weights": {"v1": 0, "v2": 1}})
    admin(reg, "unload", version="v1")
    report(reg, clock, "v1", in_flight=1)
    clock.now += 9.9
    reg.tick()
    assert groups.stopped == []
    clock.now += 0.2  # past the 10 s drain timeout: stopped with a request still running
    reg.tick()
    assert groups.stopped == ["smol@v1"]


def test_traffic_checks_its_weights_and_names_the_field(gguf):
    reg, _, _ = make()
    load_v2(reg, gguf)
    for body, param in [
        ({}, "weights"),
        ({"weights": {"v1": 0, "v2": 0}}, "weights"),
        ({"weights": {"v9": 10}}, "weights.v9"),
        ({"weights": {"v2": -3}}, "weights.v2"),
        ({"weights": {"v2": 1.5}}, "weights.v2"),
    ]:
        status, out = admin(reg, "traffic", body=body)
        assert (status, out["error"]["param"]) == (400, param), body
    assert admin(reg, "traffic", model="nope", body={"weights": {"v1": 1}})[0] == 404
    status, out = admin(reg, "traffic", body={"weights": {"v1": 90, "v2": 10}})
    assert status == 200 and [v["weight"] for v in out["versions"]] == [90, 10]


def test_a_new_model_name_is_created_and_its_first_version_is_stable(gguf):
    reg, _, _ = make()
    status, out = admin(reg, "load", model="big", body={"version": "a", "path": gguf})
    assert (status, out["weight"]) == (202, 100)
    assert reg.models["big"].stable == "a"
    names = [m.name for m in reg.snapshot().models]
    assert names == ["smol", "big"] and reg.snapshot().default_model == "smol"


# ---------------------------------------------------------------- canary


def start_canary(reg, steps=(5, 25, 50, 100), interval=30.0, **slo):
    body = {"version": "v2", "steps": list(steps), "interval_s": interval, "slo": slo}
    return admin(reg, "canary", body=body)


def test_a_canary_steps_up_while_it_meets_the_slo_then_is_promoted(gguf):
    reg, _, clock = make()
    load_v2(reg, gguf)
    status, out = start_canary(reg, max_error_rate=0.1, max_ttft_p95_s=2.0)
    assert (status, out["state"], out["step"]) == (202, "running", 0)
    assert versions(reg) == {"v1": ("ready", 95), "v2": ("ready", 5)}
    seen = []
    for _ in range(4):
        clock.now += 10
        report(reg, clock, "v2", requests=20, errors=1, ttfts=[0.1] * 20)
        clock.now += 20.5
        reg.tick()
        seen.append(versions(reg)["v2"][1])
    assert seen == [25, 50, 100, 100]
    m = reg.models["smol"]
    assert (m.stable, m.promotions, m.canary.state) == ("v2", 1, "promoted")
    assert versions(reg) == {"v1": ("ready", 0), "v2": ("ready", 100)}
    assert reg.snapshot().models[0].promotions == 1


def test_a_breach_rolls_back_at_the_end_of_its_interval_with_the_reason(gguf):
    reg, _, clock = make()
    load_v2(reg, gguf)
    start_canary(reg, steps=[25, 100], interval=1.0, max_error_rate=0.01)
    clock.now += 0.5
    report(reg, clock, "v2", requests=25, errors=12)
    reg.tick()
    assert versions(reg)["v2"] == ("ready", 25)  # the interval is not over yet
    clock.now += 0.6
    reg.tick()
    assert versions(reg) == {"v1": ("ready", 100), "v2": ("ready", 0)}
    canary = reg.snapshot().models[0].canary
    assert canary.state == "rolled_back"
    assert canary.reason.startswith("error rate 0.48 > 0.01 over 25 requests in the last 1.1s")
    assert reg.models["smol"].rollbacks == 1 and reg.models["smol"].stable == "v1"


def test_a_slow_canary_is_rolled_back_on_its_ttft_p95(gguf):
    reg, _, clock = make()
    load_v2(reg, gguf)
    start_canary(reg, steps=[50, 100], interval=2.0, max_ttft_p95_s=0.5)
    clock.now += 1.0
    report(reg, clock, "v2", requests=20, ttfts=[0.1] * 15 + [3.0] * 5)
    clock.now += 1.1
    reg.tick()
    assert reg.models["smol"].canary.state == "rolled_back"
    assert "TTFT p95 3.000s > 0.5s" in reg.models["smol"].canary.reason


def test_a_window_without_canary_requests_holds_and_says_so(gguf):
    reg, _, clock = make()
    load_v2(reg, gguf)
    start_canary(reg, steps=[10, 100], interval=5.0, max_error_rate=0.5)
    report(reg, clock, "v1", requests=50)  # only the stable version served
    clock.now += 5.1
    reg.tick()
    c = reg.models["smol"].canary
    assert (c.state, c.step) == ("running", 0)
    assert c.reason == "holding at 10%: no request reached v2 in the last 5s"
    clock.now += 1
    report(reg, clock, "v2", requests=3)
    clock.now += 4.1
    reg.tick()
    assert reg.models["smol"].canary.step == 1 and versions(reg)["v2"][1] == 100


def test_a_canary_version_that_fails_is_rolled_back_at_once(gguf):
    reg, groups, clock = make()
    load_v2(reg, gguf)
    start_canary(reg, interval=30.0)
    reg.group_failed("smol", "v2", "worker exited 3 times")
    c = reg.models["smol"].canary
    assert (c.state, versions(reg)["v1"]) == ("rolled_back", ("ready", 100))
    assert "worker exited 3 times" in c.reason and groups.stopped == ["smol@v2"]


def test_rollback_and_a_traffic_change_cancel_a_running_canary(gguf):
    reg, _, _ = make()
    load_v2(reg, gguf)
    start_canary(reg)
    status, out = admin(reg, "rollback")
    assert status == 200 and out["canary"]["state"] == "cancelled"
    assert [v["weight"] for v in out["versions"]] == [100, 0] and out["rollbacks"] == 1
    start_canary(reg)
    admin(reg, "traffic", body={"weights": {"v1": 50, "v2": 50}})
    assert reg.models["smol"].canary.state == "cancelled"
    assert versions(reg) == {"v1": ("ready", 50), "v2": ("ready", 50)}


def test_canary_bodies_are_checked(gguf):
    reg, _, _ = make()
    admin(reg, "load", body={"version": "v2", "path": gguf})
    status, out = start_canary(reg)
    assert status == 409  # v2 is still loading
    reg.group_ready("smol", "v2")
    for body, param in [
        ({"version": "v2", "steps": [50, 25, 100]}, "steps"),
        ({"version": "v2", "steps": [5, 50]}, "steps"),
        ({"version": "v2", "interval_s": 0}, "interval_s"),
        ({"version": "v2", "slo": {"max_error_rate": "x"}}, "slo.max_error_rate"),
        ({"version": "v1"}, "version"),
    ]:
        status, out = admin(reg, "canary", body=body)
        assert (status, out["error"]["param"]) == (400, param), body


def test_window_stats_sum_every_api_process_over_the_last_30s(gguf):
    reg, _, clock = make(api_workers=2)
    report(reg, clock, "v1", requests=10, errors=1, ttfts=[0.2] * 10, api=0)
    report(reg, clock, "v1", requests=10, errors=3, ttfts=[0.4] * 10, api=1)
    clock.now += 1
    stats = admin(reg, "list")[1]["data"][0]["versions"][0]["stats"]
    assert (stats["requests"], stats["errors"], stats["error_rate"]) == (20, 4, 0.2)
    assert (stats["ttft_p50_s"], stats["ttft_p95_s"]) == (0.4, 0.4)
    clock.now += 30
    report(reg, clock, "v1", requests=5, ttfts=[0.1] * 5, api=0)
    reg.tick()
    stats = admin(reg, "list")[1]["data"][0]["versions"][0]["stats"]
    assert (stats["requests"], stats["errors"], stats["ttft_p95_s"]) == (5, 0, 0.1)  # the older ones aged out


def test_stats_move_the_epoch_at_most_once_a_second():
    reg, _, clock = make()
    epoch = reg.epoch
    report(reg, clock, "v1", requests=1)
    reg.tick()
    assert reg.epoch == epoch + 1 and reg.snapshot().models[0].versions[0].stats.requests == 1
    report(reg, clock, "v1", requests=1)
    clock.now += 0.5
    reg.tick()
    assert reg.epoch == epoch + 1
    clock.now += 0.6
    reg.tick()
    assert reg.epoch == epoch + 2 and reg.snapshot().models[0].versions[0].stats.requests == 2


# ---------------------------------------------------------------- persistence


def test_the_state_file_is_written_atomically_on_changes_and_restored_for_the_models_served(tmp_path, gguf):
    reg, _, _ = make(tmp_path)
    state = tmp_path / STATE_FILE
    assert not state.exists()  # nothing changed: nothing written (a fresh server leaves no file)
    load_v2(reg, gguf)
    admin(reg, "traffic", body={"weights": {"v1": 70, "v2": 30}})
    doc = json.loads(state.read_text())
    assert doc["models"]["smol"]["stable"] == "v1"
    assert {v["version"]: v["weight"] for v in doc["models"]["smol"]["versions"]} == {"v1": 70, "v2": 30}
    assert oct(os.stat(state).st_mode & 0o777) == "0o600"
    assert [p for p in os.listdir(tmp_path) if ".tmp" in p] == []
    # another model's entry, written by another server sharing the state dir, is kept as it was
    doc["models"]["other"] = {"stable": "x", "versions": [{"version": "x", "path": gguf, "weight": 1}]}
    state.write_text(json.dumps(doc))
    admin(reg, "traffic", body={"weights": {"v1": 60, "v2": 40}})
    assert "other" in json.loads(state.read_text())["models"]

    again, groups, _ = make(tmp_path)  # a restart: the state wins over the command line's one version
    assert versions(again) == {"v1": ("ready", 60), "v2": ("loading", 40)}
    assert again.models["smol"].versions["v2"].spec.path == gguf
    assert "other" not in again.models  # not served by this server: not loaded


def test_a_restart_restores_a_promotion_and_drops_unloaded_versions(tmp_path, gguf):
    reg, _, clock = make(tmp_path)
    load_v2(reg, gguf)
    start_canary(reg, steps=[100], interval=1.0)
    clock.now += 0.5
    report(reg, clock, "v2", requests=5)
    clock.now += 0.6
    reg.tick()
    assert reg.models["smol"].canary.state == "promoted"
    admin(reg, "unload", version="v1")
    again, _, _ = make(tmp_path)
    m = again.models["smol"]
    assert (m.stable, m.promotions, list(m.versions)) == ("v2", 1, ["v2"])


def test_a_version_that_fails_as_the_server_starts_is_not_dropped_from_the_state_file(tmp_path, gguf):
    reg, _, _ = make(tmp_path)
    load_v2(reg, gguf)
    admin(reg, "traffic", body={"weights": {"v1": 70, "v2": 30}})
    # a restart where v1 fails to load (e.g. out of memory for a moment): the server exits 1
    groups, clock = FakeGroups(), Clock()
    state = str(tmp_path / STATE_FILE)
    again = Registry(single_model("smol", "/m/smol.gguf"), groups, state_path=state, clock=clock)
    again.prepare_all()
    again.group_ready("smol", "v2", 2048)
    again.group_failed("smol", "v1", "worker (exit codes 1, 1, 1) failed to start 3 times")
    # the next start still has both versions, their weights and the stable one
    third = Registry(single_model("smol", "/m/smol.gguf"), FakeGroups(), state_path=state, clock=clock)
    assert versions(third) == {"v1": ("loading", 70), "v2": ("loading", 30)}
    assert third.models["smol"].stable == "v1"
    # a hot load that fails is written: it is not served again after a restart
    third.prepare_all()
    third.group_ready("smol", "v1", 2048)
    third.group_ready("smol", "v2", 2048)
    assert admin(third, "load", body={"version": "v3", "path": gguf, "weight": 5})[0] == 202
    third.group_failed("smol", "v3", "no ready engine")
    admin(third, "traffic", body={"weights": {"v1": 50, "v2": 50}})
    fourth = Registry(single_model("smol", "/m/smol.gguf"), FakeGroups(), state_path=state, clock=clock)
    assert set(fourth.models["smol"].versions) == {"v1", "v2"}


def test_a_restored_fault_is_injected_only_when_the_server_allows_fault_injection(tmp_path, gguf):
    reg, _, _ = make(tmp_path, allow_fault_injection=True)
    status, out = admin(reg, "load", body={"version": "v2", "path": gguf, "fault": {"error_rate": 0.5}})
    assert status == 202, out
    allowed, _, _ = make(tmp_path, allow_fault_injection=True)
    assert allowed.models["smol"].versions["v2"].spec.fault.error_rate == 0.5
    # restarted without --allow-fault-injection: the version is served, its fault is not
    plain, _, _ = make(tmp_path)
    assert plain.models["smol"].versions["v2"].spec.fault is None
    assert plain.snapshot().models[0].versions[1].fault is None


def test_a_corrupt_state_file_is_ignored(tmp_path):
    (tmp_path / STATE_FILE).write_text("{not json")
    reg, _, _ = make(tmp_path)
    assert versions(reg) == {"v1": ("ready", 100)}


# ---------------------------------------------------------------- the models file


def write(tmp_path, text: str) -> str:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return str(path)


def test_a_models_file_parses_into_models_versions_and_virtual_models(tmp_path, gguf):
    path = write(
        tmp_path,
        f"""
default = "smol"
[[models]]
name = "smol"
stable = "v1"
  [[models.versions]]
  version = "v1"
  path = "m.gguf"
  options = {{ max_num_seqs = 8, priority_deadline_ms = {{ "0" = 500 }} }}
  [[models.versions]]
  version = "v2"
  path = "{gguf}"
  weight = 5
  fault = {{ error_rate = 0.5 }}
[[virtual]]
name = "auto"
fallback = ["smol"]
  [[virtual.rules]]
  max_prompt_tokens = 256
  model = "smol@v2"
""",
    )
    spec = read_models_file(path, allow_fault_injection=True)
    (m,) = spec.models
    assert (m.name, m.stable, spec.default) == ("smol", "v1", "smol")
    v1, v2 = m.versions
    assert v1.path == gguf  # relative to the file's folder
    assert v1.options == {"max_num_seqs": 8, "priority_deadline_ms": {0: 500.0}}
    assert (v2.weight, v2.fault.error_rate) == (5, 0.5)
    (auto,) = spec.virtual
    assert (auto.name, auto.rules[0].max_prompt_tokens, auto.rules[0].model) == ("auto", 256, "smol@v2")
    reg = Registry(spec, FakeGroups(), allow_fault_injection=True)
    assert versions(reg) == {"v1": ("loading", 100), "v2": ("loading", 5)}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[[models]]\nname = 'a'\n", "at least one [[models.versions]]"),
        ("x = 1\n[[models]]\nname='a'", "unknown key(s) x"),
        ("[[models]]\nname='a'\n[[models.versions]]\nversion='v1'\npath='nope.gguf'", "versions[0].path"),
        (
            "[[models]]\nname='a'\n[[models.versions]]\nversion='v1'\npath='m.gguf'\noptions={port=1, host='x'}",
            "host, port cannot be set per version",
        ),
        (
            "[[models]]\nname='a'\n[[models.versions]]\nversion='v1'\npath='m.gguf'\noptions={max_num_sqs=1}",
            "unknown engine option(s) max_num_sqs",
        ),
        (
            "[[models]]\nname='a'\n[[models.versions]]\nversion='v1'\npath='m.gguf'\noptions={max_num_seqs=0}",
            "max_num_seqs must be > 0",
        ),
        (
            "[[models]]\nname='a'\n[[models.versions]]\nversion='v1'\npath='m.gguf'\nfault={error_rate=0.5}",
            "start the server with --allow-fault-injection",
        ),
        (
            "[[models]]\nname='a'\nstable='v9'\n[[models.versions]]\nversion='v1'\npath='m.gguf'",
            "no version 'v9'",
        ),
        (
            "default='b'\n[[models]]\nname='a'\n[[models.versions]]\nversion='v1'\npath='m.gguf'",
            "default: 'b'",
        ),
        (
            "[[models]]\nname='a'\n[[models.versions]]\nversion='v1'\npath='m.gguf'\n"
            "[[virtual]]\nname='auto'\nfallback=['zz']\n[[virtual.rules]]\nmodel='a'",
            "'zz' is not a model",
        ),
        ("[[models]]\nname='a'\n[[models.versions]]\nversion='v1'\npath='m.gguf'\nweight=-1", "weight"),
        ("[[models]\n", "not valid TOML"),
    ],
)
def test_models_file_mistakes_are_refused_naming_the_place(tmp_path, gguf, body, message):
    path = write(tmp_path, body)
    with pytest.raises(SystemExit, match=None) as e:
        read_models_file(path)
    assert message in str(e.value) and path in str(e.value)


def test_options_are_engine_config_fields_with_their_types():
    assert check_options({"quantization": "q4", "kv_cache_memory_gb": 1}) == {
        "quantization": "q4",
        "kv_cache_memory_gb": 1.0,
    }
    with pytest.raises(ModelsFileError, match="options.enable_prefix_caching"):
        check_options({"enable_prefix_caching": "maybe"})
    with pytest.raises(ModelsFileError, match="admin_key, api_keys cannot be set per version"):
        check_options({"api_keys": [], "admin_key": "k"})


def test_parse_needs_a_model():
    with pytest.raises(ModelsFileError, match="at least one"):
        parse_models({}, None, False)


# ---------------------------------------------------------------- the command line and the supervisor's files


def models_args(tmp_path, gguf_path, *extra):
    from zeroserve.launcher.cli import build_parser

    path = write(
        tmp_path,
        f"""
default = "smol"
[[models]]
name = "smol"
  [[models.versions]]
  version = "v1"
  path = "{gguf_path}"
  [[models.versions]]
  version = "v2"
  path = "{gguf_path}"
  options = {{ max_num_seqs = 4, num_kv_blocks = 16 }}
""",
    )
    return build_parser().parse_args(["serve", "--models", path, "--max-model-len", "256", *extra]), path


def test_serve_models_names_the_default_models_first_version_and_refuses_a_model_too(tmp_path, gguf_path):
    from zeroserve.launcher.cli import build_parser
    from zeroserve.launcher.engine_args import config_from_args

    args, path = models_args(tmp_path, gguf_path)
    config = config_from_args(args, run_dir=str(tmp_path / "run"))
    assert (config.models_file, config.served_model_name, config.model) == (path, "smol", gguf_path)
    both = build_parser().parse_args(["serve", gguf_path, "--models", path])
    with pytest.raises(SystemExit, match="give a MODEL or --models FILE, not both"):
        config_from_args(both, run_dir=str(tmp_path / "run"))


def test_deploy_refuses_a_models_file(tmp_path, gguf_path):
    from zeroserve.launcher import deploy
    from zeroserve.launcher.cli import build_parser

    args = build_parser().parse_args(
        ["deploy", "systemd", "--out", str(tmp_path / "out"), "--models", "m.toml"]
    )
    with pytest.raises(SystemExit, match="run `zeroserve serve --models FILE` under your service manager"):
        deploy.run(args)
    assert not (tmp_path / "out").exists()


def test_the_supervisor_gives_each_version_its_own_config_and_sockets(tmp_path, gguf_path):
    import msgspec

    from zeroserve.launcher.control import control_address
    from zeroserve.launcher.engine_args import config_from_args
    from zeroserve.launcher.run_dir import RunDir
    from zeroserve.launcher.supervisor import Supervisor
    from zeroserve.shared.config import read_config

    args, _ = models_args(tmp_path, gguf_path, "--state-dir", str(tmp_path / "state"))
    run = tmp_path / "run"
    config = config_from_args(args, run_dir=str(run))
    config = msgspec.structs.replace(config, control_address=control_address(str(run)))
    sup = Supervisor(config, RunDir.claim(str(run)))
    try:
        assert [c.name for c in sup.children] == ["worker", "scheduler", "tokenizer", "api"]  # v1: as before
        v2 = sup.groups.groups["smol@v2"]
        v2_config = read_config(v2.config_path)
        assert v2.config_path == str(run / "groups" / "smol@v2" / "config.json")
        assert (v2_config.max_num_seqs, v2_config.num_kv_blocks, v2_config.served_model_name) == (
            4,
            16,
            "smol",
        )
        assert v2_config.tokenizer_addresses == [f"ipc://{run}/groups/smol@v2/tokenizer-0.sock"]
        assert v2_config.control_address is None and read_config(str(run / "config.json")).max_num_seqs == 128
        assert oct(os.stat(run / "groups" / "smol@v2").st_mode & 0o777) == "0o700"
        snap = sup.registry.snapshot()
        assert [v.tokenizer_addresses for v in snap.models[0].versions] == [
            [f"ipc://{run}/tokenizer-0.sock"],
            [f"ipc://{run}/groups/smol@v2/tokenizer-0.sock"],
        ]
        assert read_config(str(run / "api-config.json")).control_address == f"ipc://{run}/control.sock"
    finally:
        for group in sup.groups.groups.values():
            group.remove_files()
        sup.run_dir.clean(sup.root.config)
    assert os.listdir(run) == []  # every file it made is gone (config_from_args made the dir itself)


def test_tcp_port_slots_are_taken_again_after_an_unload_and_a_refused_load_takes_none(tmp_path, gguf_path):
    from zeroserve.launcher.engine_groups import TCP_PORTS_PER_GROUP, GroupManager
    from zeroserve.launcher.model_registry import CapacityError
    from zeroserve.launcher.models_file import VersionSpec
    from zeroserve.shared.config import EngineConfig

    base = EngineConfig(model=gguf_path, served_model_name="s", run_dir=str(tmp_path), max_model_len=256)
    mgr = GroupManager(base, str(tmp_path))
    mgr.accept_root = False  # hot loads: capacity-checked, never the root sockets

    def slot(version: str) -> int:
        return (mgr.pending[f"s@{version}"].base_port - base.base_port) // TCP_PORTS_PER_GROUP

    for _ in range(3):  # refused before anything is reserved
        with pytest.raises(CapacityError):
            mgr.prepare("s", VersionSpec("huge", gguf_path, options={"num_kv_blocks": 10**9}))
    mgr.prepare("s", VersionSpec("v2", gguf_path, options={"num_kv_blocks": 16}))
    mgr.prepare("s", VersionSpec("v3", gguf_path, options={"num_kv_blocks": 16}))
    assert (slot("v2"), slot("v3")) == (1, 2)
    v2 = mgr.build("s", "v2")
    mgr.build("s", "v3")
    v2.stopping = True  # unloaded: its processes are gone (none were started here)
    mgr.prepare("s", VersionSpec("v4", gguf_path, options={"num_kv_blocks": 16}))
    assert slot("v4") == 1
    for group in mgr.groups.values():
        group.remove_files()


def test_a_capacity_check_counts_weights_kv_and_processes(tmp_path, gguf_path):
    import msgspec

    from zeroserve.launcher.engine_groups import check_capacity, kv_bytes
    from zeroserve.launcher.model_registry import CapacityError
    from zeroserve.shared.config import EngineConfig

    config = EngineConfig(model=gguf_path, served_model_name="s", run_dir=str(tmp_path), max_model_len=256)
    small = msgspec.structs.replace(config, num_kv_blocks=16)
    check_capacity(small, "s@v1")  # tens of MiB: fits on any machine that runs the tests
    assert kv_bytes(msgspec.structs.replace(config, num_kv_blocks=32)) == 2 * kv_bytes(small)
    with pytest.raises(CapacityError, match=r"s@v2 does not fit: it needs about \d+\.\d\d GiB"):
        check_capacity(msgspec.structs.replace(config, num_kv_blocks=10**9), "s@v2")


def test_a_restored_version_whose_model_is_gone_stops_the_start_naming_the_state_file(tmp_path, gguf_path):
    import msgspec

    from zeroserve.launcher.control import control_address
    from zeroserve.launcher.engine_args import config_from_args
    from zeroserve.launcher.run_dir import RunDir
    from zeroserve.launcher.supervisor import Supervisor

    state = tmp_path / "state"
    state.mkdir()
    gone = str(tmp_path / "gone.gguf")
    doc = {"models": {"smol": {"stable": "v7", "versions": [{"version": "v7", "path": gone, "weight": 1}]}}}
    (state / STATE_FILE).write_text(json.dumps(doc))
    args, _ = models_args(tmp_path, gguf_path, "--state-dir", str(state))
    run = tmp_path / "run"
    config = config_from_args(args, run_dir=str(run))
    config = msgspec.structs.replace(config, control_address=control_address(str(run)))
    with pytest.raises(SystemExit) as e:
        Supervisor(config, RunDir.claim(str(run)))
    assert gone in str(e.value) and str(state / STATE_FILE) in str(e.value), str(e.value)
    assert os.listdir(run) == []  # nothing was started or written


def test_traffic_that_leaves_no_ready_version_serving_is_refused(gguf):
    reg, _, _ = make()
    status, _ = admin(reg, "load", body={"version": "v2", "path": gguf})
    assert status == 202 and versions(reg)["v2"] == ("loading", 0)
    status, out = admin(reg, "traffic", body={"weights": {"v1": 0, "v2": 100}})
    assert (status, out["error"]["code"]) == (409, "no_ready_version")
    assert versions(reg) == {"v1": ("ready", 100), "v2": ("loading", 0)}  # unchanged
    assert admin(reg, "traffic", body={"weights": {"v1": 50, "v2": 50}})[0] == 200


def test_a_canary_without_an_slo_is_held_to_the_default_error_rate(gguf):
    reg, _, clock = make()
    load_v2(reg, gguf)
    status, _ = admin(reg, "canary", body={"version": "v2", "steps": [50, 100], "interval_s": 1.0})
    assert status == 202
    clock.now += 0.5
    report(reg, clock, "v2", requests=50, errors=5)  # 10%: no SLO given, yet not promoted
    clock.now += 0.6
    reg.tick()
    assert reg.models["smol"].canary.state == "rolled_back"
    assert versions(reg) == {"v1": ("ready", 100), "v2": ("ready", 0)}


def test_a_restart_during_a_canary_gives_its_share_back_to_stable(tmp_path, gguf):
    reg, _, _ = make(tmp_path)
    load_v2(reg, gguf)
    start_canary(reg, steps=[25, 100], max_error_rate=0.1)
    assert versions(reg) == {"v1": ("ready", 75), "v2": ("ready", 25)}
    again, _, _ = make(tmp_path)  # no controller after a restart: the unproven version gets nothing
    assert versions(again) == {"v1": ("ready", 100), "v2": ("loading", 0)}


# ---------------------------------------------------------------- a version that crash-loops after ready


def test_a_ready_version_in_a_crash_loop_is_failed_when_another_can_serve(gguf):
    reg, groups, _ = make()
    load_v2(reg, gguf)
    admin(reg, "traffic", body={"weights": {"v1": 70, "v2": 30}})
    assert reg.group_crash_looping("smol", "v2", "worker (exit codes -9, -9, -9) keeps exiting")
    assert versions(reg) == {"v1": ("ready", 70), "v2": ("failed", 0)}
    assert "keeps exiting" in reg.models["smol"].versions["v2"].reason and groups.stopped == ["smol@v2"]
    assert not reg.group_crash_looping("smol", "v2", "again")  # failed already: nothing more


def test_a_crash_looping_version_that_had_all_the_traffic_hands_it_to_the_stable_one(gguf):
    reg, _, _ = make()
    load_v2(reg, gguf)
    admin(reg, "traffic", body={"weights": {"v1": 0, "v2": 100}})
    assert reg.group_crash_looping("smol", "v2", "worker keeps exiting")
    assert versions(reg) == {"v1": ("ready", 100), "v2": ("failed", 0)}


def test_a_crash_looping_stable_version_passes_stable_to_a_ready_one(gguf):
    reg, _, _ = make()
    load_v2(reg, gguf)  # v2 ready at 0%
    assert reg.models["smol"].stable == "v1"
    assert reg.group_crash_looping("smol", "v1", "scheduler keeps exiting")
    assert versions(reg) == {"v1": ("failed", 0), "v2": ("ready", 100)}
    assert reg.models["smol"].stable == "v2" and reg.snapshot().models[0].stable == "v2"


def test_the_only_ready_version_is_left_restarting(gguf):
    reg, groups, _ = make()
    assert not reg.group_crash_looping("smol", "v1", "worker keeps exiting")
    assert versions(reg) == {"v1": ("ready", 100)} and groups.stopped == []
    status, out = admin(reg, "load", body={"version": "v2", "path": gguf})  # v2 still loading
    assert status == 202 and not reg.group_crash_looping("smol", "v1", "worker keeps exiting")


def test_a_crash_loop_is_three_quick_exits_in_a_row():
    from zeroserve.launcher.engine_groups import BACKOFF_START_S, Child, ProcessSet

    child = Child("worker", 0, ["true"])
    procs = ProcessSet([child], {})
    for backoff, looping in (
        (BACKOFF_START_S, False),
        (4 * BACKOFF_START_S, False),
        (8 * BACKOFF_START_S, True),
    ):
        child.backoff_s = backoff
        assert procs.restarting_in_a_loop() == ([child] if looping else [])

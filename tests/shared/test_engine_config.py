"""EngineConfig is the one place a default is written: the processes' configs are views of it,
the command line takes its defaults from it, and flags reach the process that uses them."""

from __future__ import annotations

import inspect
import json
import os
import re

import msgspec
import pytest
import torch

from zeroserve.api_proc.config import ApiConfig
from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig
from zeroserve.launcher.engine_args import FLAGS, config_from_args
from zeroserve.launcher.readme_flags import serve_parser
from zeroserve.scheduler_proc.config import SchedulerConfig
from zeroserve.shared.client import EngineClient
from zeroserve.shared.config import DEFAULTS, CurveKeys, EngineConfig, read_config, write_config

VIEWS = (SchedulerConfig, RunnerConfig, ApiConfig)
ENGINE_FIELDS = {f.name for f in msgspec.structs.fields(EngineConfig)}

# a value unlike the default for every field a view shares with EngineConfig
CHANGED = {
    "model": "/models/other.gguf",
    "block_size": 32,
    "max_num_seqs": 7,
    "max_num_batched_tokens": 999,
    "max_model_len": 333,
    "max_waiting_requests": 11,
    "max_waiting_tokens": 12_345,
    "enable_prefix_caching": False,
    "priority_aging_s": 2.5,
    "target_itl_ms": 150.0,
    "device": "cuda:1",
    "dtype": "float16",
    "kv_cache_dtype": "bfloat16",
    "num_kv_blocks": 77,
    "kv_cache_memory_gb": 1.5,
    "gpu_memory_utilization": 0.5,
    "kernel_backend": "torch",
    "quantization": "int8",
    "enforce_eager": True,
    "load_format": "dummy",
    "num_threads": 3,
    "seed": 9,
    "pooling": "mean",
    "host": "0.0.0.0",
    "port": 9001,
    "curve": CurveKeys("sp", "ss", "cp", "cs"),
    "api_keys": ["k1"],
    "auth_exempt_paths": ["/health"],
    "max_body_bytes": 10,
    "max_n": 3,
    "max_seqs_per_request": 20,
    "tool_call_parser": "llama3_json",
    "priority_range": (-3, 3),
    "heartbeat_interval_s": 0.7,
    "heartbeat_timeout_s": 4.0,
    "api_keys_file": "/etc/zeroserve/keys.toml",
    "admin_key": "admin-k",
    "api_workers": 3,
    "state_dir": "/var/lib/zeroserve",
    "audit_content": "hash",
    "audit_retention_days": 30.0,
    "otlp_traces_endpoint": "http://collector:4318/v1/traces",
    "control_address": "ipc:///tmp/run-x/control.sock",
    "metrics_prefix": "vllm",
    "log_prompts": True,
    "priority_deadline_ms": {0: 30000.0, -5: 800.0},
}
# what a view takes from elsewhere although EngineConfig has a field of that name
NOT_COPIED = {
    SchedulerConfig: {"max_model_len"},  # the worker's, from WorkerReady
    ApiConfig: {"curve"},  # the client half of the keys: the api only connects
}

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "eos_token_id": 2,
}


def shared_fields(view: type) -> list[msgspec.structs.FieldInfo]:
    return [f for f in msgspec.structs.fields(view) if f.name in ENGINE_FIELDS]


def default_of(field: msgspec.structs.FieldInfo):
    if field.default_factory is not msgspec.NODEFAULT:
        return field.default_factory()
    return field.default


@pytest.fixture
def model_dir(tmp_path) -> str:
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    return str(tmp_path)


def parse(model_dir: str, run_dir: str, *flags: str) -> EngineConfig:
    args = serve_parser().parse_args([model_dir, "--run-dir", run_dir, "--device", "cpu", *flags])
    return config_from_args(args)


@pytest.mark.parametrize("view", VIEWS, ids=lambda v: v.__name__)
def test_a_view_has_engine_configs_default_for_every_field_it_shares(view):
    fields = shared_fields(view)
    assert len(fields) >= 7  # the view really mirrors EngineConfig, not a handful of names
    for field in fields:
        if default_of(field) is not msgspec.NODEFAULT and hasattr(DEFAULTS, field.name):
            assert default_of(field) == getattr(DEFAULTS, field.name), f"{view.__name__}.{field.name}"


def test_the_clients_heartbeat_defaults_are_engine_configs():
    params = inspect.signature(EngineClient.__init__).parameters
    assert params["heartbeat_interval_s"].default == DEFAULTS.heartbeat_interval_s
    assert params["heartbeat_timeout_s"].default == DEFAULTS.heartbeat_timeout_s


def test_from_engine_copies_every_shared_field(monkeypatch):
    monkeypatch.delenv("ZEROSERVE_API_KEY", raising=False)
    every_shared = {f.name for view in VIEWS for f in shared_fields(view)}
    assert every_shared <= CHANGED.keys(), "give the new shared field a changed value in CHANGED"
    for name in every_shared - {"model"}:
        assert CHANGED[name] != getattr(DEFAULTS, name), name
    config = EngineConfig(served_model_name="served", run_dir="/tmp/run-x", **CHANGED)
    views = [
        SchedulerConfig.from_engine(config, num_blocks=5, max_model_len=48, eos_token_ids=[7]),
        RunnerConfig.from_engine(config),
        ApiConfig.from_engine(config),
    ]
    for view in views:
        for field in shared_fields(type(view)):
            if field.name not in NOT_COPIED.get(type(view), ()):
                assert getattr(view, field.name) == CHANGED[field.name], f"{type(view).__name__}.{field.name}"
    scheduler = views[0]
    assert (scheduler.num_blocks, scheduler.max_model_len, scheduler.eos_token_ids) == (5, 48, (7,))


def test_every_flag_sets_an_engine_config_field_and_defaults_to_its_value():
    flags = {f.field: f for group in FLAGS.values() for f in group}
    assert set(flags) <= ENGINE_FIELDS
    actions = {a.dest: a for a in serve_parser()._actions if a.dest in ENGINE_FIELDS}
    assert actions.pop("model").default is None  # the positional MODEL: the packaged GGUF
    assert actions.keys() == flags.keys()
    for name, action in actions.items():
        expected = None if flags[name].resolved else getattr(DEFAULTS, name)
        if isinstance(expected, dict):  # KEY:VALUE items, parsed by config_from_args
            assert action.default == [] and expected == {}, name
            continue
        assert action.default == expected, name


def test_no_flags_give_engine_configs_defaults(model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("ZEROSERVE_NUM_THREADS", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    config = parse(model_dir, str(tmp_path / "run"))
    worked_out = {
        "model",
        "served_model_name",
        "run_dir",
        "max_model_len",
        "vocab_size",
        "device",
        "embedding_size",
    }
    for field in msgspec.structs.fields(EngineConfig):
        if field.name not in worked_out:
            assert getattr(config, field.name) == getattr(DEFAULTS, field.name), field.name
    assert (config.max_model_len, config.vocab_size, config.model) == (64, 128, os.path.abspath(model_dir))


def test_priority_aging_and_threads_reach_the_scheduler_and_the_runner(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROSERVE_NUM_THREADS", "5")
    config = parse(model_dir, str(tmp_path / "run"), "--priority-aging-s", "3", "--num-threads", "2")
    scheduler = SchedulerConfig.from_engine(config, num_blocks=8, max_model_len=64, eos_token_ids=[2])
    assert scheduler.priority_aging_s == 3.0
    assert RunnerConfig.from_engine(config).num_threads == 2  # the flag wins over the environment

    config = parse(model_dir, str(tmp_path / "run"), "--priority-aging-s", "0")
    scheduler = SchedulerConfig.from_engine(config, num_blocks=8, max_model_len=64, eos_token_ids=[2])
    assert scheduler.priority_aging_s is None  # 0: strict (priority, arrival) order
    assert RunnerConfig.from_engine(config).num_threads == 5  # the launcher reads the environment


def test_priority_range_is_parsed_checked_and_survives_the_config_file(model_dir, tmp_path, capsys):
    config = parse(model_dir, str(tmp_path / "run"), "--priority-range", "-5", "7")
    assert config.priority_range == (-5, 7)
    path = str(tmp_path / "zeroserve.json")
    write_config(config, path)
    assert read_config(path).priority_range == (-5, 7)
    scheduler = SchedulerConfig.from_engine(
        read_config(path), num_blocks=8, max_model_len=64, eos_token_ids=[2]
    )
    assert scheduler.priority_range == (-5, 7)  # the scheduler's admission owns the rule
    for bad in (["1"], ["a", "b"]):
        with pytest.raises(SystemExit):
            serve_parser().parse_args(["--priority-range", *bad])
        assert "--priority-range" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="MIN is above MAX"):
        parse(model_dir, str(tmp_path / "run"), "--priority-range", "7", "-5")


@pytest.mark.parametrize(
    "flag, value, rule",
    [
        ("--step-timeout-s", "0", "> 0"),
        ("--max-num-seqs", "0", "> 0"),
        ("--block-size", "-16", "> 0"),
        ("--max-seqs-per-request", "0", "> 0"),
        ("--num-kv-blocks", "-1", ">= 0"),
        ("--priority-aging-s", "-1", ">= 0"),
        ("--gpu-memory-utilization", "1.5", "in (0, 1]"),
    ],
)
def test_meaningless_numbers_are_refused_at_the_command_line(model_dir, tmp_path, flag, value, rule):
    with pytest.raises(SystemExit, match=re.escape(f"{flag} must be {rule}")):
        parse(model_dir, str(tmp_path / "run"), flag, value)


def test_the_runner_takes_its_thread_count_from_its_config_not_the_environment(model_dir, monkeypatch):
    monkeypatch.setenv("ZEROSERVE_NUM_THREADS", "2")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        ModelRunner(
            RunnerConfig(model=model_dir, load_format="dummy", block_size=4, num_kv_blocks=4, num_threads=1)
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_priority_deadlines_parse_into_the_config_and_bad_ones_are_refused(model_dir, tmp_path):
    flags = ["--priority-deadline-ms", "0:30000", "--priority-deadline-ms=-5:800"]
    config = parse(model_dir, str(tmp_path / "run"), *flags)
    assert config.priority_deadline_ms == {0: 30000.0, -5: 800.0}
    decoded = msgspec.json.decode(msgspec.json.encode(config), type=EngineConfig)
    assert decoded.priority_deadline_ms == {0: 30000.0, -5: 800.0}  # int keys survive the config file
    for bad, says in [("0", "PRIORITY:MILLISECONDS"), ("x:5", "PRIORITY:MILLISECONDS"),
                      ("0:-1", "positive"), ("500:10", "--priority-range")]:  # fmt: skip
        with pytest.raises(SystemExit, match=says):
            parse(model_dir, str(tmp_path / "run"), "--priority-deadline-ms", bad)
    with pytest.raises(SystemExit, match="twice"):
        parse(
            model_dir, str(tmp_path / "run"), "--priority-deadline-ms", "1:5", "--priority-deadline-ms", "1:6"
        )


def test_the_traces_endpoint_comes_from_the_flag_or_the_otel_variable_and_is_checked(
    model_dir, tmp_path, monkeypatch
):
    run = str(tmp_path / "run")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://env:4318/v1/traces")
    assert parse(model_dir, run).otlp_traces_endpoint == "http://env:4318/v1/traces"
    assert (
        parse(model_dir, run, "--otlp-traces-endpoint", "http://flag:4318").otlp_traces_endpoint
        == "http://flag:4318"
    )
    assert ApiConfig.from_engine(parse(model_dir, run)).otlp_traces_endpoint == "http://env:4318/v1/traces"
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    with pytest.raises(SystemExit, match="needs --otlp-traces-endpoint"):
        parse(model_dir, run, "--collect-detailed-traces")
    with pytest.raises(SystemExit, match="OTLP/HTTP URL"):
        parse(model_dir, run, "--otlp-traces-endpoint", "collector:4317")


def test_a_state_dir_the_audit_trail_cannot_write_is_refused_at_the_command_line(model_dir, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with pytest.raises(SystemExit, match="cannot create the state dir .*--audit-db off"):
        parse(model_dir, str(tmp_path / "run"), "--state-dir", str(blocked / "state"))
    # with the audit trail off, nothing is kept there: no check
    config = parse(
        model_dir, str(tmp_path / "run"), "--state-dir", str(blocked / "state"), "--audit-db", "off"
    )
    assert config.audit_db == "off"

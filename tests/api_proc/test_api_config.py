"""ApiConfig.from_engine: what an api process of a deployment gets from the launcher's config."""

from __future__ import annotations

from zeroserve.api_proc.config import ApiConfig
from zeroserve.shared.config import EngineConfig


def engine_config(**kw) -> EngineConfig:
    return EngineConfig(model="/m.gguf", served_model_name="served", run_dir="/tmp/run-x", **kw)


def test_from_engine_maps_the_api_fields(monkeypatch):
    monkeypatch.setenv("ZEROSERVE_API_KEY", "env-key, k1")
    config = ApiConfig.from_engine(
        engine_config(
            port=9000,
            host="0.0.0.0",
            api_keys=["k1"],
            max_n=4,
            auth_exempt_paths=["/health"],
            max_body_bytes=10,
        ),
        index=1,
    )
    assert config.model_name == "served" and (config.host, config.port) == ("0.0.0.0", 9000)
    assert config.api_keys == ["k1", "env-key"]  # both sources, no duplicates
    assert config.auth_exempt_paths == ["/health"] and config.max_n == 4 and config.max_body_bytes == 10
    assert config.engine_address == "ipc:///tmp/run-x/tokenizer-0.sock"
    assert config.metrics_dir == "/tmp/run-x/metrics" and config.index == 1


def test_several_tokenizers_are_all_given_to_the_client(monkeypatch):
    monkeypatch.delenv("ZEROSERVE_API_KEY", raising=False)
    config = ApiConfig.from_engine(engine_config(num_tokenizers=2))
    assert config.engine_address == ["ipc:///tmp/run-x/tokenizer-0.sock", "ipc:///tmp/run-x/tokenizer-1.sock"]
    assert config.api_keys == []

"""Hugging Face folders: tiny random transformers models saved with save_pretrained load back as
their exact state_dict; broken folders fail with errors that name the file and the tensor."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from zeroserve.gpu_worker.loader import (
    CheckpointError,
    CorruptCheckpointError,
    MissingConfigError,
    MissingShardError,
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
    UnknownArchitectureError,
    dummy_weights,
    expected_shapes,
    load_checkpoint,
    load_model_config,
)

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=512,
)


def tiny_model(arch: str, **overrides):
    torch.manual_seed(0)
    kw = TINY | overrides
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    if arch == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    if arch == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=32, **kw))
    if arch == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**kw))
    raise ValueError(arch)


def save(model, folder, **kw) -> str:
    model.save_pretrained(str(folder), safe_serialization=True, **kw)
    return str(folder)


def assert_same_weights(weights: dict[str, torch.Tensor], model) -> None:
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    assert sorted(weights) == sorted(state)
    for name, want in state.items():
        assert weights[name].dtype == torch.float32
        assert torch.equal(weights[name], want), name


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_tiny_model_loads_as_its_state_dict(tmp_path, arch):
    model = tiny_model(arch)
    cfg, weights = load_checkpoint(save(model, tmp_path))
    assert_same_weights(weights, model)
    assert set(weights) == set(expected_shapes(cfg))
    assert cfg.architecture == {"mistral": "llama"}.get(arch, arch)
    hf = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 128, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (4, 2, 256)
    assert cfg.head_dim == (32 if arch == "qwen3" else 16)
    assert cfg.rms_norm_eps == hf.rms_norm_eps and cfg.max_position_embeddings == 512
    assert cfg.attention_bias == (arch == "qwen2") and not cfg.o_proj_bias
    assert cfg.rope_scaling is None and cfg.rope_theta == hf.rope_parameters["rope_theta"]
    assert cfg.format == "hf" and cfg.torch_dtype == "float32"


def test_tied_embeddings_drop_lm_head(tmp_path):
    model = tiny_model("qwen2", tie_word_embeddings=True)
    cfg, weights = load_checkpoint(save(model, tmp_path))
    assert cfg.tie_word_embeddings and "lm_head.weight" not in weights
    assert_same_weights(weights, model)


def test_tied_checkpoint_that_still_stores_lm_head_loads(tmp_path):
    """Some tied checkpoints carry a copy of the embedding as lm_head: it is dropped, not an error."""
    model = tiny_model("llama", tie_word_embeddings=True)
    folder = save(model, tmp_path)
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(folder, "model.safetensors"))
    _, weights = load_checkpoint(folder)
    assert "lm_head.weight" not in weights


def test_dtype_and_bf16_checkpoint(tmp_path):
    model = tiny_model("llama").to(torch.bfloat16)
    cfg, weights = load_checkpoint(save(model, tmp_path), dtype=torch.float16)
    assert cfg.torch_dtype == "bfloat16"
    for name, want in model.state_dict().items():
        assert weights[name].dtype == torch.float16
        assert torch.equal(weights[name], want.to(torch.float16)), name


def test_sharded_checkpoint(tmp_path):
    model = tiny_model("qwen3")
    folder = save(model, tmp_path, max_shard_size="40KB")
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 2
    _, weights = load_checkpoint(folder)
    assert_same_weights(weights, model)


def test_config_v4_style_rope_and_generation_eos(tmp_path):
    """Older config.json: rope_theta/rope_scaling at top level; EOS ids from generation_config."""
    cfg_json = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 131072,
        "rope_scaling": {
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg_json))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    cfg = load_model_config(str(tmp_path))
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == {
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    }
    assert cfg.eos_token_ids == [128001, 128008, 128009] and cfg.bos_token_id == 128000
    assert cfg.head_dim == 16 and cfg.tie_word_embeddings and cfg.torch_dtype == "bfloat16"
    (tmp_path / "generation_config.json").unlink()
    assert load_model_config(str(tmp_path)).eos_token_ids == [128001]  # falls back to config.json


def test_v5_rope_parameters_llama3(tmp_path):
    model = tiny_model(
        "llama",
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    )
    cfg = load_model_config(save(model, tmp_path))
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["factor"] == 8.0
    assert "rope_theta" not in cfg.rope_scaling


# --- dummy weights ---------------------------------------------------------------------------


def test_dummy_weights_fit_the_model_and_keep_activations_finite(tmp_path):
    model = tiny_model("qwen3", num_hidden_layers=8)
    folder = tmp_path / "cfg_only"
    model.config.save_pretrained(str(folder))  # config.json only, no weights
    cfg, weights = load_checkpoint(str(folder), load_format="dummy", seed=3)
    assert {n: tuple(t.shape) for n, t in weights.items()} == expected_shapes(cfg)
    assert torch.equal(weights["model.norm.weight"], torch.ones(64))
    model.load_state_dict(weights, strict=True)
    logits = model(torch.randint(0, 256, (1, 16))).logits
    assert torch.isfinite(logits).all() and logits.std() > 0
    again = dummy_weights(cfg, seed=3)
    other = dummy_weights(cfg, seed=4, dtype=torch.bfloat16)
    assert torch.equal(again["model.embed_tokens.weight"], weights["model.embed_tokens.weight"])
    assert not torch.equal(other["model.embed_tokens.weight"].float(), weights["model.embed_tokens.weight"])
    assert other["lm_head.weight"].dtype == torch.bfloat16


# --- broken folders --------------------------------------------------------------------------


def resave(folder: str, state: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "model.safetensors"))


def test_missing_config(tmp_path):
    folder = save(tiny_model("llama"), tmp_path)
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(MissingConfigError, match="config.json") as err:
        load_checkpoint(folder)
    assert err.value.path == os.path.join(folder, "config.json")
    (tmp_path / "model.Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(MissingConfigError, match="model.Q8_0.gguf: pass that file"):
        load_model_config(folder)


def test_unknown_architecture(tmp_path):
    folder = save(tiny_model("llama"), tmp_path)
    cfg = json.loads(open(os.path.join(folder, "config.json")).read())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnknownArchitectureError, match="GPT2LMHeadModel") as err:
        load_model_config(folder)
    assert "config.json" in str(err.value) and "LlamaForCausalLM" in str(err.value)


def test_missing_tensor(tmp_path):
    model = tiny_model("llama")
    folder = save(model, tmp_path)
    state = model.state_dict()
    del state["model.layers.1.mlp.up_proj.weight"]
    resave(folder, state)
    with pytest.raises(MissingTensorError) as err:
        load_checkpoint(folder)
    assert "model.layers.1.mlp.up_proj.weight" in str(err.value) and "model.safetensors" in str(err.value)
    assert err.value.tensor == "model.layers.1.mlp.up_proj.weight"


def test_extra_tensor(tmp_path):
    model = tiny_model("qwen3")
    folder = save(model, tmp_path)
    resave(folder, model.state_dict() | {"model.layers.0.mlp.gate_proj.bias": torch.zeros(128)})
    with pytest.raises(UnexpectedTensorError) as err:
        load_checkpoint(folder)
    assert "model.layers.0.mlp.gate_proj.bias" in str(err.value) and "model.safetensors" in str(err.value)


def test_wrong_shape(tmp_path):
    folder = save(tiny_model("qwen2"), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_key_value_heads"] = 1  # k_proj/v_proj now 16 rows, the file has 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShapeMismatchError) as err:
        load_checkpoint(folder)
    msg = str(err.value)
    assert "model.layers.0.self_attn.k_proj.weight" in msg and "(32, 64)" in msg and "(16, 64)" in msg
    assert "model.safetensors" in msg


def test_truncated_safetensors(tmp_path):
    folder = save(tiny_model("llama"), tmp_path)
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CorruptCheckpointError, match="truncated") as err:
        load_checkpoint(folder)
    assert path in str(err.value) and err.value.tensor in str(err.value)
    with open(path, "r+b") as f:
        f.truncate(5)
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        load_checkpoint(folder)


def test_missing_shard(tmp_path):
    folder = save(tiny_model("llama"), tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    tensor, shard = sorted(index["weight_map"].items())[-1]
    os.remove(os.path.join(folder, shard))
    with pytest.raises(MissingShardError) as err:
        load_checkpoint(folder)
    assert shard in str(err.value) and "model.safetensors.index.json" in str(err.value)
    assert err.value.tensor in str(err.value)


def test_pickle_only_folder_is_refused(tmp_path):
    folder = save(tiny_model("llama"), tmp_path)
    os.rename(os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*pickle"):
        load_checkpoint(folder)


def test_mlp_bias_is_refused(tmp_path):
    folder = save(tiny_model("llama", mlp_bias=True), tmp_path)
    with pytest.raises(UnknownArchitectureError, match="mlp_bias"):
        load_model_config(folder)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt"):
        load_checkpoint(str(tmp_path / "notes.txt"))
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(str(tmp_path / "absent"))

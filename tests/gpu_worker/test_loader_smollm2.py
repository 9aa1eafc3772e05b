"""The packaged SmolLM2-135M Q4_1 GGUF loads to the same tensors as transformers' GGUF loader
(which dequantizes with the same `gguf` package and also undoes llama.cpp's Q/K permutation)."""

from __future__ import annotations

import time

import pytest
import torch

from zeroserve.gpu_worker.loader import expected_shapes, load_checkpoint, load_model_config

transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def reference(hf_smollm2):
    return hf_smollm2.config, hf_smollm2.state_dict()


def test_config_matches_transformers(gguf_path, reference):
    hf, _ = reference
    start = time.perf_counter()
    cfg = load_model_config(gguf_path)
    assert time.perf_counter() - start < 5  # header only: no vocabulary decode, no tensors
    assert cfg.architecture == "llama" and cfg.quantization == "Q4_1" and cfg.format == "gguf"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (49152, 576, 1536)
    assert (hf.vocab_size, hf.hidden_size, hf.intermediate_size) == (49152, 576, 1536)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.head_dim == hf.head_dim == 64
    assert (
        cfg.rms_norm_eps == pytest.approx(hf.rms_norm_eps)
        and cfg.rope_theta == hf.rope_parameters["rope_theta"]
    )
    assert cfg.max_position_embeddings == hf.max_position_embeddings == 8192
    assert cfg.tie_word_embeddings and hf.tie_word_embeddings and cfg.rope_scaling is None
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == [2]  # <|im_end|> ends a chat turn


def test_weights_match_transformers(gguf_path, reference):
    _, state = reference
    cfg, weights = load_checkpoint(gguf_path, dtype=torch.float32)
    assert set(weights) == set(state) - {"lm_head.weight"} == set(expected_shapes(cfg))
    for name, got in weights.items():
        assert got.dtype == torch.float32 and got.shape == state[name].shape, name
        torch.testing.assert_close(got, state[name], rtol=0, atol=1e-6, msg=name)
    # the Q/K permutation was undone (rows not left in llama.cpp's interleaved order)
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(q, state["model.layers.0.self_attn.q_proj.weight"])

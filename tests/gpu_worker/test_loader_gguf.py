"""GGUF files written here with gguf.GGUFWriter from tiny random transformers models, the way
llama.cpp's converter writes them (llama.cpp names, reversed shapes, llama Q/K rows permuted,
no output.weight when tied), load back as the models' state_dicts; broken files fail clearly."""

from __future__ import annotations

import math
import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from zeroserve.gpu_worker.loader import (
    CorruptCheckpointError,
    InvalidConfigError,
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
    UnknownArchitectureError,
    UnsupportedQuantError,
    expected_shapes,
    load_checkpoint,
    load_model_config,
)
from zeroserve.gpu_worker.loader.gguf_loader import rope_scaling_from_freqs
from zeroserve.kernels.quantized import GGUFWeight

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

# llama.cpp's names (gguf-py's tensor_mapping), written out here rather than taken from the loader.
LAYER_NAMES = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    ("self_attn.k_norm.weight", "attn_k_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
]


def to_gguf_name(hf: str) -> str:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}." + dict(LAYER_NAMES)[rest]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute (HF rotate-half rows -> ggml interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_rows_from_gguf_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse, by index: GGUF row h*d + 2j + t holds HF row h*d + t*d/2 + j."""
    d = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for j in range(d // 2):
            for t in range(2):
                out[h * d + t * d // 2 + j] = w[h * d + 2 * j + t]
    return out


def tiny_model(arch: str, **overrides):
    torch.manual_seed(0)
    kw = (
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=2,
        )
        | overrides
    )
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    if arch == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=32, **kw))


def quant_bytes(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, row_bytes] for `w` in `qtype`. gguf-py cannot quantize K types: those get
    random blocks with a sane f16 scale `d` (the loader only has to get the layout right)."""
    if qtype in (Q.F32, Q.F16):
        return w.astype(np.float32 if qtype == Q.F32 else np.float16).view(np.uint8)
    if qtype not in (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ2_XXS):
        return gguf.quants.quantize(w, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (w.size // block, size), dtype=np.uint8)
    d = np.full((len(blocks), 1), 0.01, dtype=np.float16).view(np.uint8)
    if qtype == Q.Q6_K:
        blocks[:, -2:] = d  # ql, qh, scales, then d
    else:
        blocks[:, :2] = d  # d, dmin, ...
        blocks[:, 2:4] = np.full((len(blocks), 1), 0.001, dtype=np.float16).view(np.uint8)
    return blocks.reshape(w.shape[0], -1)


def write_gguf(
    path,
    model,
    arch: str,
    *,
    qtypes=None,
    drop=(),
    extra=None,
    meta=None,
    rope_freqs=None,
    file_arch: str | None = None,
) -> dict[str, np.ndarray]:
    """Write `model` as llama.cpp would; return HF name -> the values the loader should produce."""
    cfg = model.config
    qtypes, extra, meta = qtypes or {}, extra or {}, meta or {}
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), file_arch or arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(meta.get("context_length", cfg.max_position_embeddings))
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(meta.get("feed_forward_length", cfg.intermediate_size))
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "qwen3":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_token_list([f"tok{i}" for i in range(cfg.vocab_size)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_uint32("tokenizer.ggml.eot_token_id", 3)
    expected = {}
    for hf, t in model.state_dict().items():
        if cfg.tie_word_embeddings and hf == "lm_head.weight":
            continue
        name = to_gguf_name(hf)
        if name in drop:
            continue
        arr = t.detach().numpy()
        kind = name.split(".")[2] if name.startswith("blk.") else ""
        n_head = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(kind)
        if arch == "llama" and n_head:
            arr = llama_cpp_permute(arr, n_head)
        qtype = qtypes.get(name, Q.F32)
        raw = quant_bytes(arr, qtype, rng)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        got = gguf.quants.dequantize(raw, qtype).reshape(arr.shape)
        expected[hf] = hf_rows_from_gguf_rows(got, n_head) if arch == "llama" and n_head else got
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for name, (arr, qtype) in extra.items():
        w.add_tensor(name, arr, raw_shape=arr.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("qwen2", False), ("qwen3", True)])
def test_f32_gguf_loads_as_the_state_dict(tmp_path, arch, tied):
    """Exact equality: names mapped, shapes un-reversed, llama Q/K permutation undone."""
    model = tiny_model(arch, tie_word_embeddings=tied)
    path = tmp_path / "m.gguf"
    write_gguf(path, model, arch)
    cfg, weights = load_checkpoint(str(path))
    state = model.state_dict()
    if tied:
        del state["lm_head.weight"]
    assert sorted(weights) == sorted(state) == sorted(expected_shapes(cfg))
    for name, want in state.items():
        assert torch.equal(weights[name], want), name
    assert cfg.architecture == arch and cfg.format == "gguf" and cfg.tie_word_embeddings == tied
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size) == (
        64,
        128,
        2,
        256,
    )
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert cfg.head_dim == (32 if arch == "qwen3" else 16)
    assert cfg.attention_bias == (arch == "qwen2") and not cfg.o_proj_bias
    assert cfg.rms_norm_eps == 1e-5 and cfg.rope_theta == model.config.rope_parameters["rope_theta"]
    assert cfg.max_position_embeddings == 512 and cfg.rope_scaling is None
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == [2, 3]
    assert load_model_config(str(path)) == cfg


@pytest.mark.parametrize(
    "qtype",
    [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K],
    ids=lambda q: q.name,
)
def test_quant_types_dequantize(tmp_path, qtype):
    """Row layout and block sizes per type (K types need rows of 256), also through the Q/K unpermute."""
    model = tiny_model("llama", hidden_size=256, intermediate_size=256, num_hidden_layers=1)
    quantized = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_down.weight"]
    expected = write_gguf(tmp_path / "q.gguf", model, "llama", qtypes=dict.fromkeys(quantized, qtype))
    cfg, weights = load_checkpoint(str(tmp_path / "q.gguf"), dtype=torch.float32)
    assert cfg.quantization == qtype.name
    for name, want in expected.items():
        assert torch.equal(weights[name], torch.from_numpy(want)), name
    if qtype in (Q.Q8_0, Q.F16, Q.BF16):  # close to the original weights too
        for name, want in model.state_dict().items():
            if name != "lm_head.weight":
                torch.testing.assert_close(weights[name], want, atol=2e-3, rtol=0)


def test_dtype_cast(tmp_path):
    model = tiny_model("qwen2")
    write_gguf(tmp_path / "m.gguf", model, "qwen2", qtypes={"blk.0.ffn_up.weight": Q.Q8_0})
    _, weights = load_checkpoint(str(tmp_path / "m.gguf"), dtype=torch.bfloat16)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


def llama3_rope_freqs(head_dim, theta, factor, low, high, orig):
    """llama.cpp convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors) rope_factors."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi / theta ** (-i / head_dim)
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize(
    "head_dim,theta,factor,low,high",
    [(128, 500000.0, 8.0, 1.0, 4.0), (64, 500000.0, 32.0, 1.0, 4.0), (128, 10000.0, 16.0, 2.0, 8.0)],
)
def test_llama3_rope_scaling_recovered_from_rope_freqs(head_dim, theta, factor, low, high):
    got = rope_scaling_from_freqs(
        llama3_rope_freqs(head_dim, theta, factor, low, high, 8192), head_dim, theta, 8192
    )
    assert got["rope_type"] == "llama3" and got["original_max_position_embeddings"] == 8192
    assert got["factor"] == pytest.approx(factor, rel=1e-5)
    assert got["low_freq_factor"] == pytest.approx(low, rel=1e-3)
    assert got["high_freq_factor"] == pytest.approx(high, rel=1e-3)
    assert rope_scaling_from_freqs(np.ones(head_dim // 2), head_dim, theta, 8192) is None
    with pytest.raises(ValueError):
        rope_scaling_from_freqs(np.linspace(1, 8, head_dim // 2)[::-1], head_dim, theta, 8192)


def test_rope_freqs_tensor_becomes_config(tmp_path):
    model = tiny_model(
        "llama", hidden_size=256, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}
    )
    freqs = llama3_rope_freqs(64, 500000.0, 32.0, 1.0, 4.0, 8192)
    write_gguf(tmp_path / "m.gguf", model, "llama", rope_freqs=freqs)
    cfg, weights = load_checkpoint(str(tmp_path / "m.gguf"))
    assert "rope_freqs.weight" not in weights and set(weights) == set(expected_shapes(cfg))
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["factor"] == pytest.approx(32.0)
    assert cfg.rope_scaling["high_freq_factor"] == pytest.approx(4.0, rel=1e-3)


# --- broken files ----------------------------------------------------------------------------


@pytest.fixture
def llama():
    return tiny_model("llama", intermediate_size=256)


def test_unknown_architecture(tmp_path, llama):
    path = tmp_path / "m.gguf"
    write_gguf(path, llama, "llama", file_arch="gpt2")
    with pytest.raises(UnknownArchitectureError, match="'gpt2'") as err:
        load_model_config(str(path))
    assert str(path) in str(err.value)


def test_unsupported_quant_type(tmp_path, llama):
    path = tmp_path / "m.gguf"
    write_gguf(path, llama, "llama", qtypes={"blk.1.ffn_down.weight": Q.IQ2_XXS})
    with pytest.raises(UnsupportedQuantError) as err:
        load_checkpoint(str(path))
    msg = str(err.value)
    assert str(path) in msg and "blk.1.ffn_down.weight" in msg and "IQ2_XXS" in msg and "Q4_K" in msg
    assert err.value.tensor == "blk.1.ffn_down.weight"


def test_missing_tensor(tmp_path, llama):
    path = tmp_path / "m.gguf"
    write_gguf(path, llama, "llama", drop={"blk.1.ffn_up.weight"})
    with pytest.raises(MissingTensorError) as err:
        load_checkpoint(str(path))
    msg = str(err.value)
    assert str(path) in msg and "blk.1.ffn_up.weight" in msg and "model.layers.1.mlp.up_proj.weight" in msg


def test_extra_tensor(tmp_path, llama):
    path = tmp_path / "m.gguf"
    write_gguf(
        path, llama, "llama", extra={"blk.0.ffn_gate_inp.weight": (np.zeros((4, 64), np.float32), Q.F32)}
    )
    with pytest.raises(UnexpectedTensorError) as err:
        load_checkpoint(str(path))
    assert str(path) in str(err.value) and "blk.0.ffn_gate_inp.weight" in str(err.value)


def test_wrong_shape(tmp_path, llama):
    path = tmp_path / "m.gguf"
    write_gguf(path, llama, "llama", meta={"feed_forward_length": 96})
    with pytest.raises(ShapeMismatchError) as err:
        load_checkpoint(str(path))
    msg = str(err.value)
    assert str(path) in msg and "blk.0.ffn_gate.weight" in msg and "(256, 64)" in msg and "(96, 64)" in msg


def test_truncated_gguf(tmp_path, llama):
    path = tmp_path / "m.gguf"
    write_gguf(path, llama, "llama")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CorruptCheckpointError, match="truncated") as err:
        load_model_config(str(path))
    assert str(path) in str(err.value) and err.value.tensor and err.value.tensor in str(err.value)
    with open(path, "r+b") as f:
        f.truncate(200)  # now inside the metadata
    with pytest.raises(CorruptCheckpointError, match="header ends early"):
        load_checkpoint(str(path))


def test_bad_metadata(tmp_path):
    path = tmp_path / "m.gguf"
    model = tiny_model("qwen2")
    model.config.num_key_value_heads = 3  # 4 query heads cannot share 3 KV heads
    write_gguf(path, model, "qwen2")
    with pytest.raises(InvalidConfigError, match="num_key_value_heads=3") as err:
        load_model_config(str(path))
    assert str(path) in str(err.value)


def test_progress_bar_on_stderr(tmp_path, capfd):
    write_gguf(tmp_path / "m.gguf", tiny_model("qwen3"), "qwen3")
    load_checkpoint(str(tmp_path / "m.gguf"), progress=True)
    assert "dequantizing m.gguf" in capfd.readouterr().err


def test_not_gguf(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CorruptCheckpointError, match="not a GGUF file"):
        load_checkpoint(str(path))


# --------------------------------------------------------------------------- --quantization q4


def test_keep_quantized_returns_the_files_blocks_unpermuted(tmp_path):
    """q/k rows un-permuted as whole block rows: the blocks dequantize to exactly what the
    default load gives; F32 tensors (norms, an F32 matrix) stay tensors."""
    model = tiny_model("llama", tie_word_embeddings=True)
    qtypes = {n: Q.Q4_1 for n in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.1.ffn_down.weight")}
    qtypes["token_embd.weight"] = Q.Q8_0
    expected = write_gguf(tmp_path / "q.gguf", model, "llama", qtypes=qtypes)
    _, weights = load_checkpoint(str(tmp_path / "q.gguf"), keep_quantized=True)
    for name, want in expected.items():
        w = weights[name]
        if to_gguf_name(name) in qtypes:
            assert isinstance(w, GGUFWeight) and w.type_name == qtypes[to_gguf_name(name)].name, name
            assert w.shape == want.shape
            assert torch.equal(w.dequantize(), torch.from_numpy(want)), name
            rows = torch.tensor([3, 0, 3])
            assert torch.equal(w.dequantize(rows), torch.from_numpy(want)[rows]), name
        else:
            assert isinstance(w, torch.Tensor) and torch.equal(w, torch.from_numpy(want)), name


def test_block_types_without_a_kernel_are_dequantized_and_logged(tmp_path, caplog):
    model = tiny_model("llama")
    qtypes = {"blk.0.attn_q.weight": Q.Q4_1, "blk.0.ffn_up.weight": Q.Q5_0, "blk.1.ffn_up.weight": Q.Q5_0}
    expected = write_gguf(tmp_path / "q.gguf", model, "llama", qtypes=qtypes)
    with caplog.at_level("WARNING"):
        _, weights = load_checkpoint(str(tmp_path / "q.gguf"), keep_quantized={"Q4_1", "Q8_0"})
    assert isinstance(weights["model.layers.0.self_attn.q_proj.weight"], GGUFWeight)
    up = weights["model.layers.1.mlp.up_proj.weight"]
    assert isinstance(up, torch.Tensor) and torch.equal(
        up, torch.from_numpy(expected["model.layers.1.mlp.up_proj.weight"])
    )
    assert "2 Q5_0 tensor(s) (blk.0.ffn_up.weight, blk.1.ffn_up.weight)" in caplog.text
    assert "no Q5_0 block kernel" in caplog.text


def q4_runner(path, quantization="q4", **kw):
    from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig

    return ModelRunner(
        RunnerConfig(
            model=str(path),
            quantization=quantization,
            kernel_backend="torch",
            num_kv_blocks=16,
            **{"kv_cache_dtype": "float32", **kw},  # q4's default is fp16 K/V on a CPU: like with like
        )
    )


@pytest.mark.parametrize("tied", [True, False])
def test_q4_model_over_blocks_computes_what_the_dequantized_model_does(tmp_path, tied, caplog):
    """The torch backend's q4 is dequantize + dense, so q4 and none must agree exactly: the
    stacking of q|k|v and gate|up, the un-permuted q/k rows, the embedding's row lookup and the
    tied lm_head over the same blocks. Mixed parts (q Q4_1, k Q8_0) are dequantized and logged."""
    from zeroserve.launcher.inprocess import InProcessEngine
    from zeroserve.shared.messages import SamplingParams

    model = tiny_model("llama", tie_word_embeddings=tied)
    qtypes = {
        f"blk.{i}.{t}.weight": Q.Q4_1
        for i in range(2)
        for t in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up", "ffn_down", "attn_output")
    }
    qtypes["blk.1.attn_k.weight"] = Q.Q8_0
    qtypes["token_embd.weight"] = Q.Q8_0
    if not tied:
        qtypes["output.weight"] = Q.Q4_0
    write_gguf(tmp_path / "q.gguf", model, "llama", qtypes=qtypes)
    with caplog.at_level("WARNING"):
        q4 = q4_runner(tmp_path / "q.gguf")
    assert (
        "model.layers.1.self_attn.qkv_proj.weight: parts of different types (q_proj Q4_1, k_proj Q8_0, v_proj Q4_1)"
        in caplog.text
    )
    layers = q4.model.model.layers
    assert isinstance(layers[0].self_attn.qkv_proj.weight, GGUFWeight)
    assert isinstance(layers[1].self_attn.qkv_proj.weight, torch.Tensor)  # mixed: dequantized
    assert isinstance(layers[0].mlp.gate_up_proj.weight, GGUFWeight)
    embed = q4.model.model.embed_tokens.weight
    assert isinstance(embed, GGUFWeight)
    assert (q4.model.lm_head.weight is embed) == tied  # tied: the same blocks, no float copy
    # projections by format: 2 layers x (qkv, o, gate_up, down) minus the mixed qkv, + lm_head
    assert q4.quantization_summary.endswith(
        f": Q4_1 x7, {'Q8_0' if tied else 'Q4_0'} x1, float32 x1 on torch kernels"
    )
    none = q4_runner(tmp_path / "q.gguf", quantization="none")
    ids = [5, 6, 7, 8, 200, 9, 255, 0]
    assert torch.equal(prefill_logits(q4, ids), prefill_logits(none, ids))
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert InProcessEngine(q4).generate(prompts, params) == InProcessEngine(none).generate(prompts, params)


def prefill_logits(runner, ids: list[int]) -> torch.Tensor:
    """Logits of every position of one prompt (in the runner's first KV block)."""
    from zeroserve.kernels.metadata import AttentionMetadata

    n = len(ids)
    meta = AttentionMetadata.build([n], [n], [[0]], list(range(n)), runner.device)
    with torch.inference_mode():
        hidden = runner.model(torch.tensor(ids), torch.arange(n), runner.kv_caches, meta)
        return runner.model.compute_logits(hidden)


def test_quantized_cpu_modes_store_kv_as_fp16_unless_told(tmp_path):
    """auto K/V on a CPU: fp16 for a quantized mode (attention streams half the bytes), the
    compute dtype for none (bit-exact with transformers); an explicit dtype always wins."""
    write_gguf(tmp_path / "q.gguf", tiny_model("llama"), "llama", qtypes={"blk.0.ffn_up.weight": Q.Q4_1})
    assert q4_runner(tmp_path / "q.gguf", kv_cache_dtype="auto").kv_dtype == torch.float16
    assert q4_runner(tmp_path / "q.gguf", kv_cache_dtype="bfloat16").kv_dtype == torch.bfloat16
    assert (
        q4_runner(tmp_path / "q.gguf", quantization="none", kv_cache_dtype="auto").kv_dtype == torch.float32
    )

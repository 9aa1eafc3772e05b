"""GGUF files: config from metadata, tensors renamed to Hugging Face names and dequantized.

Quirks of llama.cpp's converter undone here, so models never see them:
- names: `blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight` (table below);
- shapes: stored in ggml order (`ne`, fastest first), i.e. reversed relative to torch;
- llama only: q_proj/k_proj rows permuted per head (see `undo_llama_qk_permute`);
- tied embeddings: no `output.weight` tensor at all;
- llama 3.x rope scaling: a `rope_freqs.weight` tensor instead of metadata (`rope_scaling_from_freqs`).
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Collection
from typing import Any

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf.quants import dequantize

from zeroserve.kernels.quantized import GGUFWeight

from .config import GGUF_ARCHITECTURES, ModelConfig, check_tensors, expected_shapes
from .errors import (
    CorruptCheckpointError,
    InvalidConfigError,
    UnknownArchitectureError,
    UnsupportedQuantError,
)
from .gguf_file import GGUFFile, GGUFTensorInfo
from .progress import progress_bar
from .sharding import ReadStats, TensorShard

log = logging.getLogger(__name__)

Q = GGMLQuantizationType
SUPPORTED_TYPES = frozenset(
    {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K}
)

FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})  # loaded as tensors whatever keep_quantized says

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {  # blk.N.<key> -> model.layers.N.<value>
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_HF_TO_GGUF = {v: k for k, v in _GLOBAL_NAMES.items()} | {v: k for k, v in _LAYER_NAMES.items()}
ROPE_FREQS = "rope_freqs.weight"  # llama 3.x rope scaling, folded into the config


def hf_name(name: str) -> str | None:
    """GGUF tensor name -> HF name, or None for a name outside the table."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def gguf_name(name: str) -> str:
    """HF name -> GGUF name (for messages about tensors a file lacks)."""
    if name in _HF_TO_GGUF:
        return _HF_TO_GGUF[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _HF_TO_GGUF:
        return f"blk.{parts[2]}.{_HF_TO_GGUF[parts[3]]}"
    return name


def undo_llama_qk_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `LlamaModel.permute` on q_proj/k_proj rows (weights or biases).

    HF rotates the two halves of each head ([x0..x_{d/2-1} | x_{d/2}..x_{d-1}], rotate_half);
    ggml's rope pairs neighbours (x0,x1), (x2,x3)... so the converter interleaves each head's
    rows: [n_head, 2, d/2, ...] -> [n_head, d/2, 2, ...]. We swap them back.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _scalar(value: Any) -> Any:
    """Per-layer metadata (a list) -> one value; zeroserve needs the same for every layer."""
    if isinstance(value, (list, np.ndarray)):
        values = set(np.asarray(value).tolist())
        return max(values) if values else None
    return value


def rope_scaling_from_freqs(
    freqs: np.ndarray, head_dim: int, theta: float, original_ctx: int
) -> dict[str, Any] | None:
    """Recover HF's llama3 rope_scaling from llama.cpp's `rope_freqs` (one divisor per rotary
    frequency: 1 for short wavelengths, `factor` for long ones, a smooth ramp between).

    In the ramp, 1/f = (1 - s)/factor + s with s = (orig/wavelen - low)/(high - low), i.e. s
    is linear in 1/wavelen; two ramp points give low and high (orig is a free scale: HF's
    formula only depends on low/orig and high/orig). Returns None when freqs are all 1, and
    raises ValueError when they do not follow the llama3 shape.
    """
    freqs = np.asarray(freqs, dtype=np.float64)
    factor = float(freqs.max())
    if np.allclose(freqs, 1.0):
        return None
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if len(freqs) != len(inv_freq):
        raise ValueError(f"{len(freqs)} frequencies for head_dim {head_dim}")
    ramp = (freqs > 1 + 1e-4) & (freqs < factor * (1 - 1e-4))
    if ramp.sum() < 2:
        raise ValueError("fewer than two frequencies on the llama3 ramp")
    s = (1 / freqs[ramp] - 1 / factor) / (1 - 1 / factor)
    a, b = np.polyfit(inv_freq[ramp] / (2 * math.pi), s, 1)  # s = a / wavelen + b
    span = original_ctx / a  # high - low
    low = -b * span
    out = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": float(low),
        "high_freq_factor": float(low + span),
        "original_max_position_embeddings": int(original_ctx),
    }
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((original_ctx / wavelen - low) / span, 0.0, 1.0)
    rebuilt = 1 / ((1 - smooth) / factor + smooth)
    if not np.allclose(rebuilt, freqs, rtol=1e-3):
        raise ValueError("the frequencies do not follow llama3 scaling")
    return out


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    md, path = g.metadata, g.path
    arch = md.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnknownArchitectureError(
            f"{path}: GGUF architecture {arch!r} is not supported; zeroserve serves {', '.join(GGUF_ARCHITECTURES)}",
            path=path,
        )

    def key(name: str, default: Any = KeyError) -> Any:
        value = _scalar(md.get(f"{arch}.{name}"))
        if value is None:
            if default is KeyError:
                raise InvalidConfigError(f"{path}: GGUF metadata has no {arch}.{name}", path=path)
            return default
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    rotary_dim = int(key("rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise UnknownArchitectureError(
            f"{path}: partial rotary ({arch}.rope.dimension_count={rotary_dim} < head_dim {head_dim}) "
            "is not supported",
            path=path,
        )
    theta = float(key("rope.freq_base", 10000.0))
    context = int(key("context_length", 2048))
    embd = g.tensors.get("token_embd.weight")
    tokens = md.get("tokenizer.ggml.tokens")
    vocab = (
        embd.shape[0] if embd is not None else key("vocab_size", len(tokens) if tokens is not None else None)
    )
    if vocab is None:
        raise InvalidConfigError(
            f"{path}: no token_embd.weight and no vocabulary size in the metadata", path=path
        )

    rope_scaling = None
    scaling_type = key("rope.scaling.type", "none")
    if scaling_type == "linear" or (scaling_type == "none" and key("rope.scale_linear", 1.0) != 1.0):
        factor = key("rope.scaling.factor", key("rope.scale_linear", 1.0))
        rope_scaling = {"rope_type": "linear", "factor": float(factor)}
    elif scaling_type == "yarn":
        rope_scaling = {
            "rope_type": "yarn",
            "factor": float(key("rope.scaling.factor")),
            "original_max_position_embeddings": int(key("rope.scaling.original_context_length", context)),
        }
    elif scaling_type != "none":
        raise UnknownArchitectureError(f"{path}: rope scaling {scaling_type!r} is not supported", path=path)
    if ROPE_FREQS in g.tensors:
        info = g.tensors[ROPE_FREQS]
        try:
            rope_scaling = rope_scaling_from_freqs(
                _dequantize(g, info), head_dim, theta, int(key("rope.scaling.original_context_length", 8192))
            )
        except ValueError as e:
            raise UnknownArchitectureError(
                f"{path}: tensor {ROPE_FREQS!r} is not llama3 rope scaling ({e})",
                path=path,
                tensor=ROPE_FREQS,
            ) from None

    types = Counter(t.type_name for t in g.tensors.values() if len(t.ne) == 2)
    try:
        quantization = (
            LlamaFileType(md["general.file_type"]).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        )
    except (KeyError, ValueError):
        quantization = "GUESSED"
    if quantization == "GUESSED":  # no file type: the commonest matrix type other than F32
        quantization = next((name for name, _ in types.most_common() if name != "F32"), "F32")
    # llama.cpp stops on any end-of-generation token: eos, and end-of-turn/-message where set
    eos = [
        md[f"tokenizer.ggml.{k}_token_id"]
        for k in ("eos", "eot", "eom")
        if f"tokenizer.ggml.{k}_token_id" in md
    ]
    try:
        return ModelConfig(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_hidden_layers=int(key("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(key("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=context,
            tie_word_embeddings="output.weight" not in g.tensors,
            attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in g.tensors,
            o_proj_bias=arch != "qwen2" and "blk.0.attn_output.bias" in g.tensors,
            bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=list(dict.fromkeys(int(e) for e in eos)),
            torch_dtype="bfloat16" if "BF16" in types else "float16" if "F16" in types else "float32",
            quantization=quantization,
            format="gguf",
        )
    except (TypeError, ValueError) as e:
        raise InvalidConfigError(f"{path}: invalid GGUF metadata: {e}", path=path) from None


def _dequantize(g: GGUFFile, info: GGUFTensorInfo) -> np.ndarray:
    """float32 array in torch shape, never a view of the file's memory map."""
    raw = g.raw(info)
    w = dequantize(raw, Q(info.ggml_type))
    return w.astype(np.float32, copy=np.may_share_memory(w, raw)).reshape(info.shape)


def _check_types(g: GGUFFile, infos: list[GGUFTensorInfo]) -> None:
    for info in infos:
        qtype = Q._value2member_map_.get(info.ggml_type)
        if qtype not in SUPPORTED_TYPES:
            supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
            raise UnsupportedQuantError(
                f"{g.path}: tensor {info.name!r} is stored as {info.type_name}, which zeroserve cannot "
                f"dequantize (supported: {supported}); use a GGUF file quantized to one of those",
                path=g.path,
                tensor=info.name,
            )
        if info.ne and info.ne[0] % GGML_QUANT_SIZES[qtype][0]:
            raise CorruptCheckpointError(
                f"{g.path}: tensor {info.name!r} has rows of {info.ne[0]} values, not a multiple of the "
                f"{qtype.name} block size {GGML_QUANT_SIZES[qtype][0]}: the file is corrupt",
                path=g.path,
                tensor=info.name,
            )


def load_gguf_weights(
    g: GGUFFile,
    cfg: ModelConfig,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    progress: bool | None,
    keep_quantized: bool | Collection[str] = False,
    slices: dict[str, TensorShard] | None = None,
    stats: ReadStats | None = None,
) -> dict[str, torch.Tensor | GGUFWeight]:
    """All weights of an open GGUF file in HF names, checked, dequantized and cast to `dtype`.

    keep_quantized: block-quantized matrices (not F32/F16/BF16) come back as ``GGUFWeight``
    (the file's bytes, q/k rows un-permuted, no float copy): True for every block type, or the
    names of the types the kernels serve (the others are dequantized, and the log says which).
    slices (a tensor-parallel rank): of a tensor named there, only that slice is read: whole
    rows, or whole blocks of each row's columns (a column range that splits a block reads the
    full rows, said in the log)."""
    infos = {hf_name(n) or n: info for n, info in g.tensors.items() if n != ROPE_FREQS}
    check_tensors(
        cfg,
        {n: info.shape for n, info in infos.items()},
        source={},
        default_source=g.path,
        config_name=f"{g.path} metadata",
        display={n: info.name for n, info in infos.items()} | {n: gguf_name(n) for n in expected_shapes(cfg)},
    )
    _check_types(g, list(infos.values()))
    permute = {}
    if cfg.architecture == "llama":
        for i in range(cfg.num_hidden_layers):
            for kind in ("weight", "bias"):
                permute[f"model.layers.{i}.self_attn.q_proj.{kind}"] = cfg.num_attention_heads
                permute[f"model.layers.{i}.self_attn.k_proj.{kind}"] = cfg.num_key_value_heads
    weights: dict[str, torch.Tensor | GGUFWeight] = {}
    unserved: dict[str, list[str]] = {}  # block type without a kernel -> tensors dequantized
    total = sum(i.nbytes for i in infos.values())
    with progress_bar(total, progress, f"dequantizing {os.path.basename(g.path)}") as bar:
        for name, info in infos.items():
            raw, shape, after = _read_raw(g, info, (slices or {}).get(name))
            if stats is not None:
                stats.bytes_read += raw.nbytes
            n_head = permute.get(name)
            if n_head is not None and shape[0] != info.shape[0]:  # a slice of whole heads
                n_head = n_head * shape[0] // info.shape[0]
            if after is None and keep_quantized and len(shape) == 2 and info.type_name not in FLOAT_TYPES:
                if keep_quantized is True or info.type_name in keep_quantized:
                    weights[name] = _blocks(raw, info.ggml_type, shape, n_head).to(device)
                    bar.update(raw.nbytes)
                    continue
                unserved.setdefault(info.type_name, []).append(info.name)
            w = dequantize(raw, Q(info.ggml_type))
            w = w.astype(np.float32, copy=np.may_share_memory(w, raw)).reshape(shape)
            if after is not None:  # columns inside blocks: sliced once dequantized
                w = np.ascontiguousarray(w[:, after.start : after.stop])
            if n_head is not None:
                w = undo_llama_qk_permute(w, n_head)
            weights[name] = torch.from_numpy(w).to(device=device, dtype=dtype)
            bar.update(raw.nbytes)
    for type_name, names in unserved.items():
        log.warning(
            "%s: %d %s tensor(s) (%s%s) dequantized to %s: the kernels have no %s block kernel",
            g.path,
            len(names),
            type_name,
            ", ".join(names[:3]),
            ", ..." if len(names) > 3 else "",
            str(dtype).removeprefix("torch."),
            type_name,
        )
    return weights


def _read_raw(
    g: GGUFFile, info: GGUFTensorInfo, shard: TensorShard | None
) -> tuple[np.ndarray, tuple[int, ...], TensorShard | None]:
    """(bytes, the torch shape they hold, a column slice still to take after dequantizing).

    A view into the memory map: only what the caller copies is read. Rows are whole blocks, so
    a row range is rows of bytes; a column range is a byte range of each row when it starts
    and ends on block boundaries (else the full rows, sliced after dequantizing)."""
    raw = g.raw(info)
    if shard is None:
        return raw, info.shape, None
    if shard.dim == 0:
        if len(info.shape) == 1:  # a bias: one row of values (block size 1 for the float types)
            _, type_size = GGML_QUANT_SIZES[Q(info.ggml_type)]
            return raw[shard.start * type_size : shard.stop * type_size], shard.shape_of(info.shape), None
        return raw[shard.start : shard.stop], shard.shape_of(info.shape), None
    block, type_size = GGML_QUANT_SIZES[Q(info.ggml_type)]
    if shard.start % block or shard.stop % block:
        log.info(
            "%s: %s columns %d..%d split %d-value blocks: its whole rows are read",
            g.path,
            info.name,
            shard.start,
            shard.stop,
            block,
        )
        return raw, info.shape, shard
    return (
        raw[:, shard.start // block * type_size : shard.stop // block * type_size],
        shard.shape_of(info.shape),
        None,
    )


def _blocks(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...], n_head: int | None) -> GGUFWeight:
    """Block bytes as a GGUFWeight (a copy out of the memory map: the file closes)."""
    data = torch.from_numpy(np.ascontiguousarray(raw).copy())
    w = GGUFWeight(data, ggml_type, shape)
    if n_head is not None:  # the llama q/k row interleave, undone on whole rows (see undo_llama_qk_permute)
        w = w.permute_rows(undo_llama_qk_permute(np.arange(shape[0]), n_head))
    return w

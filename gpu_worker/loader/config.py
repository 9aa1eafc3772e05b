"""ModelConfig: the hyperparameters every model family needs, from config.json or GGUF metadata.

Also the one place that says which tensors a config implies (`expected_shapes`) and checks a
checkpoint against it (`check_tensors`), so model code can index the weights dict blindly.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from .errors import (
    InvalidConfigError,
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
    UnknownArchitectureError,
)
from .sentence_transformers import SentenceTransformerConfig

Architecture = Literal["llama", "qwen2", "qwen3", "bert"]

# Hugging Face `architectures[0]` -> our family. Mistral is Llama with other defaults
# (its sliding window is ignored: zeroserve attends over the whole context).
HF_ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "BertModel": "bert",  # an encoder: serves embeddings only (models/bert.py, loader/bert.py)
}
HF_MODEL_TYPES: dict[str, Architecture] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "bert": "bert",
}
GGUF_ARCHITECTURES: tuple[Architecture, ...] = ("llama", "qwen2", "qwen3")


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Hyperparameters of a decoder-only transformer, the same whatever the checkpoint format.

    Attention projections (H = hidden_size, D = head_dim):
        q_proj [num_attention_heads * D, H], k_proj/v_proj [num_key_value_heads * D, H],
        o_proj [H, num_attention_heads * D]
    attention_bias: q/k/v projections carry a bias (always for qwen2).
    o_proj_bias: o_proj carries one too (HF llama/qwen3 `attention_bias`; never for qwen2).
    qwen3 also has per-head RMSNorms `q_norm`/`k_norm` of shape [D] applied before rotary.
    rope_scaling: None, or a dict with "rope_type" ("llama3": factor, low_freq_factor,
        high_freq_factor, original_max_position_embeddings; "linear": factor; "yarn": ...).
    torch_dtype: the checkpoint's own dtype name ("bfloat16", ...); for GGUF the dtype its
        non-quantized weights use. quantization: the GGUF weight type ("Q4_1", ...), else None.
    """

    architecture: Architecture
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    o_proj_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = []
    torch_dtype: str = "float32"
    quantization: str | None = None
    format: Literal["hf", "gguf"] = "hf"
    type_vocab_size: int = 0  # bert: token type (segment) embeddings
    # a sentence-transformers folder's pooling, normalisation and max_seq_length (embeddings)
    sentence_transformer: SentenceTransformerConfig | None = None
    # the `dimensions` an embedding may be cut to (Matryoshka): None = not supported, [] = any
    matryoshka_dimensions: list[int] | None = None

    @property
    def is_encoder(self) -> bool:
        """Bidirectional attention over each input, no KV cache, no LM head: embeddings only."""
        return self.architecture == "bert"

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )


def _arch_from_hf(cfg: dict[str, Any], path: str) -> Architecture:
    names = cfg.get("architectures") or []
    for name in names:
        if name in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[name]
    if not names and cfg.get("model_type") in HF_MODEL_TYPES:
        return HF_MODEL_TYPES[cfg["model_type"]]
    got = ", ".join(names) or f"model_type={cfg.get('model_type')!r}"
    raise UnknownArchitectureError(
        f"{path}: architecture {got} is not supported; zeroserve serves {', '.join(HF_ARCHITECTURES)}",
        path=path,
    )


def normalize_rope_scaling(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """HF's rope_scaling (v4: "type" or "rope_type") or rope_parameters (v5, with rope_theta
    inside) -> None for plain rotary, else a dict keyed by "rope_type" without rope_theta."""
    if not raw:
        return None
    out = {k: v for k, v in raw.items() if k not in ("rope_theta", "type")}
    out["rope_type"] = raw.get("rope_type") or raw.get("type") or "default"
    return None if out["rope_type"] == "default" else out


def _eos_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def config_from_hf(cfg: dict[str, Any], generation: dict[str, Any] | None, path: str) -> ModelConfig:
    """config.json (+ generation_config.json) -> ModelConfig. `path` names config.json in errors."""
    arch = _arch_from_hf(cfg, path)
    if arch == "bert":
        from .bert import bert_config

        return bert_config(cfg, path)
    if cfg.get("mlp_bias"):
        raise UnknownArchitectureError(
            f"{path}: mlp_bias=true (biases on gate/up/down projections) is not supported", path=path
        )
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        rope_params = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        eos = _eos_list((generation or {}).get("eos_token_id"))
        return ModelConfig(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=normalize_rope_scaling(cfg.get("rope_scaling") or rope_params),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=True if arch == "qwen2" else bool(cfg.get("attention_bias", False)),
            o_proj_bias=False if arch == "qwen2" else bool(cfg.get("attention_bias", False)),
            bos_token_id=cfg.get("bos_token_id") if isinstance(cfg.get("bos_token_id"), int) else None,
            eos_token_ids=eos or _eos_list(cfg.get("eos_token_id")),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            format="hf",
        )
    except KeyError as e:
        raise InvalidConfigError(
            f"{path}: config has no {e.args[0]!r}, which {arch} needs", path=path
        ) from None
    except (TypeError, ValueError) as e:
        raise InvalidConfigError(f"{path}: invalid config: {e}", path=path) from None


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, by Hugging Face name, with its torch shape.

    lm_head.weight is absent when tie_word_embeddings (the model reuses embed_tokens).
    """
    if cfg.architecture == "bert":
        from .bert import bert_shapes

        return bert_shapes(cfg)
    H, D, V, inter = cfg.hidden_size, cfg.head_dim, cfg.vocab_size, cfg.intermediate_size
    q_out, kv_out = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (q_out, H),
            p + "self_attn.k_proj.weight": (kv_out, H),
            p + "self_attn.v_proj.weight": (kv_out, H),
            p + "self_attn.o_proj.weight": (H, q_out),
            p + "mlp.gate_proj.weight": (inter, H),
            p + "mlp.up_proj.weight": (inter, H),
            p + "mlp.down_proj.weight": (H, inter),
        }
        if cfg.attention_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q_out,),
                p + "self_attn.k_proj.bias": (kv_out,),
                p + "self_attn.v_proj.bias": (kv_out,),
            }
        if cfg.o_proj_bias:
            shapes[p + "self_attn.o_proj.bias"] = (H,)
        if cfg.architecture == "qwen3":
            shapes |= {p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)}
    return shapes


def is_ignorable(name: str, cfg: ModelConfig) -> bool:
    """Tensors a checkpoint may carry that the model does not load: rotary caches saved by old
    transformers versions, and a copy of the embedding as lm_head in tied checkpoints."""
    if cfg.architecture == "bert":  # the position-id buffer; the pooler sentence-transformers never uses
        return name == "embeddings.position_ids" or name.startswith("pooler.")
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight")


def check_tensors(
    cfg: ModelConfig,
    shapes: dict[str, tuple[int, ...]],
    *,
    source: dict[str, str],
    default_source: str,
    display: dict[str, str] | None = None,
    config_name: str = "the config",
) -> None:
    """Raise the first problem of a checkpoint's tensor set against `expected_shapes(cfg)`.

    shapes: HF name -> shape found in the checkpoint (ignorable names already dropped or not).
    source: HF name -> the file holding it; default_source: the file named for missing ones.
    display: HF name -> the name as the file spells it (GGUF), shown next to the HF name.
    """
    display = display or {}

    def label(name: str) -> str:
        other = display.get(name)
        return f"{other!r} ({name})" if other and other != name else repr(name)

    expected = expected_shapes(cfg)
    missing = [n for n in expected if n not in shapes]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise MissingTensorError(
            f"{default_source}: tensor {label(missing[0])}{more} is missing, but {config_name} "
            f"({cfg.architecture}, {cfg.num_hidden_layers} layers, tie_word_embeddings="
            f"{cfg.tie_word_embeddings}) needs it: the checkpoint is incomplete or does not match its config",
            path=default_source,
            tensor=display.get(missing[0], missing[0]),
        )
    extra = [n for n in shapes if n not in expected and not is_ignorable(n, cfg)]
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise UnexpectedTensorError(
            f"{source.get(extra[0], default_source)}: unexpected tensor {label(extra[0])}{more}: "
            f"{config_name} ({cfg.architecture}, {cfg.num_hidden_layers} layers) does not use it; "
            "the config does not match the weights, or this is a model variant zeroserve does not serve",
            path=source.get(extra[0], default_source),
            tensor=display.get(extra[0], extra[0]),
        )
    for name, want in expected.items():
        got = tuple(shapes[name])
        if got != want:
            raise ShapeMismatchError(
                f"{source.get(name, default_source)}: tensor {label(name)} has shape {got}, but "
                f"{config_name} implies {want}: the weights do not match the config",
                path=source.get(name, default_source),
                tensor=display.get(name, name),
            )

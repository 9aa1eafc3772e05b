"""BERT-family encoders (config.json ``architectures: ["BertModel"]``, e.g. all-MiniLM-L6-v2):
their ModelConfig and the tensors a checkpoint must hold, in Hugging Face's BertModel names::

    embeddings.{word,position,token_type}_embeddings.weight, embeddings.LayerNorm.{weight,bias}
    encoder.layer.N.attention.self.{query,key,value}.{weight,bias}
    encoder.layer.N.attention.output.dense.{weight,bias}, .attention.output.LayerNorm.{weight,bias}
    encoder.layer.N.intermediate.dense.{weight,bias}
    encoder.layer.N.output.dense.{weight,bias}, .output.LayerNorm.{weight,bias}

(``pooler.*`` and ``embeddings.position_ids`` may be present and are not loaded.) Fields a
decoder needs and an encoder has not (rotary, KV heads) get neutral values: ``rms_norm_eps``
holds the LayerNorm eps.
"""

from __future__ import annotations

from typing import Any

from .config import ModelConfig
from .errors import InvalidConfigError, UnknownArchitectureError


def bert_config(cfg: dict[str, Any], path: str) -> ModelConfig:
    """config.json of a BertModel -> ModelConfig; `path` names config.json in errors."""
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise UnknownArchitectureError(
            f"{path}: hidden_act={act!r}; zeroserve's BERT has gelu only", path=path
        )
    kind = cfg.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise UnknownArchitectureError(
            f"{path}: position_embedding_type={kind!r}; zeroserve's BERT has absolute positions only",
            path=path,
        )
    if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
        raise UnknownArchitectureError(f"{path}: a BERT decoder is not supported (encoders only)", path=path)
    matryoshka = cfg.get("matryoshka_dimensions")
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return ModelConfig(
            architecture="bert",
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=hidden // heads,
            rms_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
            rope_theta=0.0,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 512)),
            tie_word_embeddings=False,
            attention_bias=True,
            type_vocab_size=int(cfg.get("type_vocab_size", 2)),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            matryoshka_dimensions=(
                [int(d) for d in matryoshka]
                if isinstance(matryoshka, list)
                else ([] if cfg.get("is_matryoshka") else None)
            ),
            format="hf",
        )
    except KeyError as e:
        raise InvalidConfigError(
            f"{path}: config has no {e.args[0]!r}, which bert needs", path=path
        ) from None
    except (TypeError, ValueError) as e:
        raise InvalidConfigError(f"{path}: invalid config: {e}", path=path) from None


def bert_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    H, inter = cfg.hidden_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (cfg.vocab_size, H),
        "embeddings.position_embeddings.weight": (cfg.max_position_embeddings, H),
        "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, H),
        "embeddings.LayerNorm.weight": (H,),
        "embeddings.LayerNorm.bias": (H,),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for name, out, inp in (
            ("attention.self.query", H, H),
            ("attention.self.key", H, H),
            ("attention.self.value", H, H),
            ("attention.output.dense", H, H),
            ("intermediate.dense", inter, H),
            ("output.dense", H, inter),
        ):
            shapes[p + name + ".weight"] = (out, inp)
            shapes[p + name + ".bias"] = (out,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + norm + ".weight"] = (H,)
            shapes[p + norm + ".bias"] = (H,)
    return shapes

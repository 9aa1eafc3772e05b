"""A sentence-transformers folder: how its hidden states become one embedding.

    modules.json                  [Transformer, Pooling (path 1_Pooling), Normalize (2_Normalize)?]
    1_Pooling/config.json         pooling_mode (sentence-transformers >= 5) or pooling_mode_*_tokens flags
    sentence_bert_config.json     max_seq_length: the longest input the model was trained on

The Normalize module has no files: its presence in modules.json is what says "normalise".
A folder without modules.json is not a sentence-transformers model (None).
"""

from __future__ import annotations

import json
import os
from typing import Any

import msgspec

from .errors import InvalidConfigError

# sentence-transformers' mode names (new string form and old boolean flags) -> ours
_MODES = {
    "mean": "mean",
    "cls": "cls",
    "max": "max",
    "lasttoken": "last",
    "mean_sqrt_len_tokens": "mean_sqrt_len",
}
_FLAGS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "last",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}
POOLING_MODES = ("mean", "cls", "max", "last", "mean_sqrt_len")


class SentenceTransformerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """pooling: one of POOLING_MODES; normalize: a Normalize module follows the pooling;
    max_seq_length: sentence-transformers truncates inputs there (None: not said)."""

    pooling: str
    normalize: bool
    max_seq_length: int | None = None


def _read(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidConfigError(f"{path}: cannot read it as JSON ({e})", path=path) from None


def _pooling_mode(path: str) -> str:
    cfg = _read(path)
    if not isinstance(cfg, dict):
        raise InvalidConfigError(f"{path}: expected a JSON object", path=path)
    mode = cfg.get("pooling_mode")
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if isinstance(mode, str):
        modes = [_MODES.get(mode, mode)]
    else:
        modes = [ours for flag, ours in _FLAGS.items() if cfg.get(flag)]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise InvalidConfigError(
            f"{path}: pooling {modes or 'none'} is not supported; zeroserve pools with exactly one of "
            f"{', '.join(POOLING_MODES)}",
            path=path,
        )
    if cfg.get("include_prompt") is False:
        raise InvalidConfigError(
            f"{path}: include_prompt=false (instruction-excluded pooling) is not supported", path=path
        )
    return modes[0]


def read_sentence_transformer_config(folder: str) -> SentenceTransformerConfig | None:
    """The folder's pooling, normalisation and max_seq_length; None without modules.json."""
    modules_path = os.path.join(folder, "modules.json")
    if not os.path.isfile(modules_path):
        return None
    modules = _read(modules_path)
    if not isinstance(modules, list):
        raise InvalidConfigError(f"{modules_path}: expected a JSON list of modules", path=modules_path)
    pooling, normalize = None, False
    for m in modules:
        kind = str(m.get("type", "")) if isinstance(m, dict) else ""
        name = kind.rsplit(".", 1)[-1]
        if name == "Pooling":
            pooling = _pooling_mode(os.path.join(folder, str(m.get("path", "")), "config.json"))
        elif name == "Normalize":
            normalize = True
        elif name != "Transformer":  # a Dense projection (say) left out would give wrong vectors silently
            raise InvalidConfigError(
                f"{modules_path}: the module {kind[:120] or m!r} is not supported; zeroserve serves "
                "sentence-transformers models made of Transformer, Pooling and Normalize only",
                path=modules_path,
            )
    if pooling is None:  # a Transformer alone: sentence-transformers would add mean pooling
        pooling = "mean"
    max_len = None
    bert_path = os.path.join(folder, "sentence_bert_config.json")
    if os.path.isfile(bert_path):
        value = (_read(bert_path) or {}).get("max_seq_length")
        max_len = value if isinstance(value, int) and value > 0 else None
    return SentenceTransformerConfig(pooling=pooling, normalize=normalize, max_seq_length=max_len)

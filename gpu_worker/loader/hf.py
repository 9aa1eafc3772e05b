"""Hugging Face folders: config.json (+ generation_config.json) and safetensors weights.

Weights come only from safetensors (never torch.load / pickle: a checkpoint must not be able
to run code). Layouts accepted, in this order:
    model.safetensors.index.json + the shards its weight_map names
    model.safetensors
    any other *.safetensors files in the folder (all of them)
Every file's header is read and checked against the config before any tensor is read, so a
wrong or truncated checkpoint fails in milliseconds, not after minutes of loading.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import msgspec
import torch
from safetensors import safe_open

from .config import ModelConfig, check_tensors, config_from_hf, is_ignorable
from .errors import CheckpointError, CorruptCheckpointError, MissingConfigError, MissingShardError
from .progress import progress_bar
from .sentence_transformers import read_sentence_transformer_config
from .sharding import ReadStats, TensorShard

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _read_json(path: str, *, required: bool) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        if required:
            raise MissingConfigError(
                f"{path}: not found: a Hugging Face model folder needs config.json next to its "
                "*.safetensors files",
                path=path,
            )
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MissingConfigError(f"{path}: cannot read it as JSON ({e})", path=path) from None
    if not isinstance(data, dict):
        raise MissingConfigError(f"{path}: expected a JSON object, got {type(data).__name__}", path=path)
    return data


def read_hf_config(folder: str) -> ModelConfig:
    """config.json (+ EOS ids from generation_config.json when present) -> ModelConfig."""
    config_path = os.path.join(folder, "config.json")
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf")) if os.path.isdir(folder) else []
    if ggufs and not os.path.isfile(config_path):
        raise MissingConfigError(
            f"{config_path}: not found, but the folder holds {ggufs[0]}: pass that file as the model",
            path=config_path,
        )
    cfg = _read_json(config_path, required=True)
    generation = _read_json(os.path.join(folder, "generation_config.json"), required=False)
    model_cfg = config_from_hf(cfg, generation, config_path)
    st = read_sentence_transformer_config(folder)  # embeddings: pooling, normalisation, max length
    return model_cfg if st is None else msgspec.structs.replace(model_cfg, sentence_transformer=st)


def safetensors_files(folder: str) -> tuple[list[str], str]:
    """The weight files of a folder, and the file to name when a tensor is missing."""
    index_path = os.path.join(folder, INDEX_FILE)
    index = _read_json(index_path, required=False)
    if index is not None:
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptCheckpointError(f"{index_path}: has no weight_map", path=index_path)
        shards: dict[str, str] = {}
        for tensor, shard in weight_map.items():
            shards.setdefault(shard, tensor)
        for shard, tensor in shards.items():
            if not os.path.isfile(os.path.join(folder, shard)):
                raise MissingShardError(
                    f"{index_path}: shard {shard!r} (holding tensor {tensor!r} and others) is not in "
                    f"{folder}: the download is incomplete; fetch the missing shard",
                    path=os.path.join(folder, shard),
                    tensor=tensor,
                )
        return [os.path.join(folder, s) for s in shards], index_path
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(single):
        return [single], single
    found = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if found:
        return [os.path.join(folder, f) for f in found], folder
    pickled = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth"))]
    hint = (
        f" ({', '.join(pickled)} is a pickle checkpoint, which zeroserve never loads because it can "
        "run code: convert it to safetensors)"
        if pickled
        else ""
    )
    raise CheckpointError(f"{folder}: no *.safetensors weights found{hint}", path=folder)


def read_safetensors_header(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) from the file header, checking that every tensor's
    bytes lie inside the file (a truncated download otherwise fails deep inside a read)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(
                f"{path}: {size} bytes: truncated or empty safetensors file", path=path
            )
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise CorruptCheckpointError(
                f"{path}: the header claims {n} bytes but the file has {size}: truncated or not a "
                "safetensors file; download it again",
                path=path,
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpointError(f"{path}: unreadable safetensors header ({e})", path=path) from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: the safetensors header is not a JSON object", path=path)
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in meta["data_offsets"])
            shape = tuple(int(d) for d in meta["shape"])
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} has a malformed header entry {meta!r}", path=path, tensor=name
            ) from None
        if 8 + n + end > size:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} (bytes {8 + n + begin}..{8 + n + end}) lies past the end of "
                f"the file ({size} bytes): the file is truncated; download it again",
                path=path,
                tensor=name,
            )
        out[name] = (shape, str(meta.get("dtype")))
    return out


def load_hf_weights(
    folder: str,
    cfg: ModelConfig,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    progress: bool | None,
    slices: dict[str, TensorShard] | None = None,
    stats: ReadStats | None = None,
) -> dict[str, torch.Tensor]:
    """All weights of a HF folder in HF names, checked against `cfg` and cast to `dtype`.
    ``slices`` (a tensor-parallel rank): of a tensor named there, only that slice is read."""
    files, default_source = safetensors_files(folder)
    shapes: dict[str, tuple[int, ...]] = {}
    source: dict[str, str] = {}
    for path in files:
        for name, (shape, _) in read_safetensors_header(path).items():
            shapes[name], source[name] = shape, path
    check_tensors(
        cfg,
        shapes,
        source=source,
        default_source=default_source,
        config_name=os.path.join(folder, "config.json"),
    )
    wanted = [n for n in shapes if not is_ignorable(n, cfg)]
    total = sum(os.path.getsize(p) for p in files)
    weights: dict[str, torch.Tensor] = {}
    with progress_bar(total, progress, f"loading {os.path.basename(os.path.normpath(folder))}") as bar:
        for path in files:
            try:
                with safe_open(path, framework="pt", device="cpu") as f:
                    for name in wanted:
                        if source[name] == path:
                            shard = slices.get(name) if slices else None
                            t = f.get_tensor(name) if shard is None else _read_slice(f, name, shard)
                            weights[name] = t.to(device=device, dtype=dtype)
                            bar.update(t.numel() * t.element_size())
                            if stats is not None:
                                stats.bytes_read += t.numel() * t.element_size()
            except CheckpointError:
                raise
            except Exception as e:  # SafetensorError and friends: a file that lied in its header
                raise CorruptCheckpointError(f"{path}: cannot read it: {e}", path=path) from e
    return weights


def _read_slice(f, name: str, shard: TensorShard) -> torch.Tensor:
    """Only the slice's bytes come out of the file (safetensors reads slices from its map)."""
    part = f.get_slice(name)
    if shard.dim == 0:
        return part[shard.start : shard.stop]
    return part[:, shard.start : shard.stop]

"""Checkpoint loaders: a Hugging Face folder or a GGUF file -> (ModelConfig, HF-named weights).

    cfg = load_model_config(path)                                  # cheap: no tensors read
    cfg, weights = load_checkpoint(path, dtype=torch.bfloat16)    # dict[str, Tensor]

`weights` holds exactly `expected_shapes(cfg)` (names and shapes checked, lm_head.weight absent
when tie_word_embeddings), so one model definition serves both formats. Every failure is a
`CheckpointError` whose message names the file and, where one is involved, the tensor.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection
from typing import Literal

import torch

from zeroserve.kernels.quantized import GGUFWeight

from .config import ModelConfig, expected_shapes
from .dummy import dummy_weights
from .errors import (
    CheckpointError,
    CorruptCheckpointError,
    InvalidConfigError,
    MissingConfigError,
    MissingShardError,
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
    UnknownArchitectureError,
    UnsupportedQuantError,
)
from .gguf_file import GGUFFile
from .gguf_loader import SUPPORTED_TYPES, config_from_gguf, load_gguf_weights
from .hf import load_hf_weights, read_hf_config
from .sharding import ReadStats, TensorShard

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "InvalidConfigError",
    "MissingConfigError",
    "MissingShardError",
    "MissingTensorError",
    "ModelConfig",
    "ReadStats",
    "ShapeMismatchError",
    "SUPPORTED_TYPES",
    "TensorShard",
    "UnexpectedTensorError",
    "UnknownArchitectureError",
    "UnsupportedQuantError",
    "checkpoint_format",
    "dummy_weights",
    "expected_shapes",
    "load_checkpoint",
    "load_model_config",
]

log = logging.getLogger(__name__)
LoadFormat = Literal["auto", "hf", "gguf", "dummy"]


def checkpoint_format(path: str) -> Literal["hf", "gguf"]:
    """'hf' for a folder, 'gguf' for a file starting with the GGUF magic; else CheckpointError."""
    if os.path.isdir(path):
        return "hf"
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder", path=path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return "gguf"
    if path.endswith(".gguf"):
        raise CorruptCheckpointError(
            f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')", path=path
        )
    raise CheckpointError(
        f"{path}: neither a GGUF file nor a Hugging Face model folder (config.json + *.safetensors)",
        path=path,
    )


def load_model_config(path: str) -> ModelConfig:
    """The model's hyperparameters, read from config.json or the GGUF header only."""
    if checkpoint_format(path) == "hf":
        return read_hf_config(path)
    with GGUFFile(path) as g:
        return config_from_gguf(g)


def load_checkpoint(
    path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    load_format: LoadFormat = "auto",
    seed: int = 0,
    progress: bool | None = None,
    keep_quantized: bool | Collection[str] = False,
    slices: dict[str, TensorShard] | None = None,
    stats: ReadStats | None = None,
) -> tuple[ModelConfig, dict[str, torch.Tensor | GGUFWeight]]:
    """(config, weights in HF names, each `dtype` on `device`).

    load_format: "auto" picks by path; "dummy" reads only the config and returns random
    weights (seeded); "hf"/"gguf" insist on that format. progress: a tqdm bar on stderr
    (None: only for checkpoints over 512 MiB). GGUF tensors are dequantized to float32 first,
    except with ``keep_quantized`` (``--quantization q4``): a GGUF file's block-quantized
    matrices stay in their blocks as ``GGUFWeight`` (True: every block type; else the type
    names the kernels serve, the others dequantized with a log line). Other formats ignore it.
    ``slices`` (a tensor-parallel rank, gpu_worker/parallel.tensor_shards): a tensor named there
    comes back as that slice, and only its bytes are read; ``stats`` counts the bytes read.
    """
    start = time.perf_counter()
    fmt = checkpoint_format(path)
    if load_format == "dummy":
        cfg = load_model_config(path)
        weights = dummy_weights(cfg, dtype=dtype, device=device, seed=seed)
        for name, shard in (slices or {}).items():  # the same values as one rank would hold
            if name in weights:
                weights[name] = shard.of(weights[name])
        return cfg, weights
    if load_format not in ("auto", fmt):
        raise CheckpointError(
            f"{path}: load_format={load_format!r} but this is a {fmt} checkpoint", path=path
        )
    if fmt == "hf":
        cfg = read_hf_config(path)
        weights = load_hf_weights(
            path, cfg, dtype=dtype, device=device, progress=progress, slices=slices, stats=stats
        )
    else:
        with GGUFFile(path) as g:
            cfg = config_from_gguf(g)
            weights = load_gguf_weights(
                g,
                cfg,
                dtype=dtype,
                device=device,
                progress=progress,
                keep_quantized=keep_quantized,
                slices=slices,
                stats=stats,
            )
    log.info(
        "loaded %s (%s, %d tensors) in %.1f s",
        path,
        cfg.quantization or cfg.torch_dtype,
        len(weights),
        time.perf_counter() - start,
    )
    return cfg, weights

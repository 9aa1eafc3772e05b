"""Checkpoint errors: one hierarchy, every message names the file (and the tensor, when one).

The worker reports `str(err)` to the launcher as is, so each message says what is wrong and
what to do. Catch `CheckpointError` for all of them.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded. `path`: the file (or folder) at fault; `tensor`: the
    tensor name as the file spells it (GGUF or HF name), or None when no tensor is involved."""

    def __init__(self, message: str, *, path: str, tensor: str | None = None):
        super().__init__(message)
        self.path = path
        self.tensor = tensor


class MissingConfigError(CheckpointError):
    """A Hugging Face folder without config.json (or with one that is not valid JSON)."""


class InvalidConfigError(CheckpointError):
    """A config (config.json or GGUF metadata) that lacks a needed key or holds a bad value."""


class UnknownArchitectureError(CheckpointError):
    """An architecture (or an option of one) that zeroserve has no model for."""


class MissingTensorError(CheckpointError):
    """The config needs a tensor that the checkpoint does not hold."""


class UnexpectedTensorError(CheckpointError):
    """The checkpoint holds a tensor that the config does not explain (wrong config, or a
    model variant that zeroserve does not implement)."""


class ShapeMismatchError(CheckpointError):
    """A tensor whose shape differs from the one the config implies."""


class UnsupportedQuantError(CheckpointError):
    """A GGUF tensor stored in a quantization type that zeroserve cannot dequantize."""


class CorruptCheckpointError(CheckpointError):
    """A file that is truncated or not in the format its name claims."""


class MissingShardError(CheckpointError):
    """A sharded checkpoint's index names a shard file that is not in the folder."""

"""Random weights at the right shapes, from the config alone (`--load-format dummy`).

For benchmarks and tests that need a model of a given size but not its answers. Scaled so a
forward pass stays finite at any depth: matrices ~ N(0, 0.02), norms = 1, biases = 0.
"""

from __future__ import annotations

import torch

from .config import ModelConfig, expected_shapes


def dummy_weights(
    cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
) -> dict[str, torch.Tensor]:
    """HF-named weights for `cfg`, the same for the same seed (on the same device type)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight"):  # RMSNorm gains (incl. qwen3 q_norm/k_norm)
            weights[name] = torch.ones(shape, dtype=dtype, device=device)
        elif name.endswith(".bias"):
            weights[name] = torch.zeros(shape, dtype=dtype, device=device)
        else:
            w = torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, 0.02, generator=gen)
            weights[name] = w.to(dtype)
    return weights

"""Model registry: ModelConfig.architecture -> model class (imported lazily).

model = build_model(cfg, ops, max_positions)   # weights on the meta device
model.load_weights(weights, device)            # HF-named tensors from the loader
hidden = model(input_ids, positions, kv_caches, attn_metadata)
logits = model.compute_logits(hidden[rows])
"""

from __future__ import annotations

import importlib

from torch import nn

from zeroserve.kernels.base import KernelBackend

# architecture (as the loader names it) -> (module, class)
MODELS: dict[str, tuple[str, str]] = {
    "llama": ("zeroserve.gpu_worker.models.llama", "LlamaForCausalLM"),
    "qwen2": ("zeroserve.gpu_worker.models.qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("zeroserve.gpu_worker.models.qwen3", "Qwen3ForCausalLM"),
    "bert": ("zeroserve.gpu_worker.models.bert", "BertModel"),  # an encoder: embeddings only
}

__all__ = ["MODELS", "build_model", "model_class"]


def model_class(architecture: str) -> type[nn.Module]:
    if architecture not in MODELS:
        raise ValueError(f"no model for architecture {architecture!r}; zeroserve has {sorted(MODELS)}")
    module, name = MODELS[architecture]
    return getattr(importlib.import_module(module), name)


def build_model(cfg, ops: KernelBackend, max_positions: int | None = None, tp=None) -> nn.Module:
    """An empty model (parameters on the meta device) for ``cfg`` (a loader ModelConfig);
    with ``tp`` (gpu_worker/parallel.TensorParallel) this rank's shard of it."""
    if tp is None:
        return model_class(cfg.architecture)(cfg, ops, max_positions)
    return model_class(cfg.architecture)(cfg, ops, max_positions, tp)

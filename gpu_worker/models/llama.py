"""Llama (also SmolLM2, Mistral without sliding window): the reference decoder-only wiring.

Qwen2 and Qwen3 reuse it and change one knob each (qkv bias, per-head q/k norm).

    input_ids [T] -> embed -> N x DecoderLayer -> norm -> hidden [T, H]
    DecoderLayer: h = x + attn(norm(x));  out = h + mlp(norm(h))
    (the residual adds are fused into the next RMSNorm: rms_norm(x, w, eps, residual))

With ``tp`` (tensor parallelism, gpu_worker/parallel.py) every rank builds this wiring at its
share of the heads, MLP width and vocabulary; compute_logits then returns the whole [B, V] on
rank 0 and None on the others.
"""

from __future__ import annotations

import torch
from torch import nn

from zeroserve.gpu_worker.loader import ModelConfig
from zeroserve.gpu_worker.parallel import TensorParallel, kv_head_range, vocab_range
from zeroserve.kernels.base import KernelBackend
from zeroserve.kernels.metadata import AttentionMetadata

from .layers import (
    Attention,
    GatedMLP,
    KVCache,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    VocabEmbedding,
    VocabParallelEmbedding,
    load_packed_weights,
    set_weight,
)


class DecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        rotary: RotaryEmbedding,
        ops: KernelBackend,
        *,
        qkv_bias: bool,
        qk_norm: bool,
        tp: TensorParallel | None = None,
    ):
        super().__init__()
        heads, kv_heads, intermediate = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size,
        )
        if tp is not None:
            kv0, kv1 = kv_head_range(kv_heads, tp.rank, tp.world_size)
            heads, kv_heads = heads // tp.world_size, kv1 - kv0
            intermediate //= tp.world_size
        self.self_attn = Attention(
            cfg.hidden_size,
            heads,
            kv_heads,
            cfg.head_dim,
            rotary,
            ops,
            qkv_bias=qkv_bias,
            o_bias=cfg.o_proj_bias,
            qk_norm_eps=cfg.rms_norm_eps if qk_norm else None,
            tp=tp,
        )
        self.mlp = GatedMLP(cfg.hidden_size, intermediate, ops, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        ops: KernelBackend,
        max_positions: int,
        *,
        qkv_bias: bool,
        qk_norm: bool,
        tp: TensorParallel | None = None,
    ):
        super().__init__()
        if tp is None:
            self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, ops)
        else:
            v0, v1 = vocab_range(cfg.vocab_size, tp.rank, tp.world_size)
            self.embed_tokens = VocabParallelEmbedding(v1 - v0, cfg.hidden_size, ops, tp, v0)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, ops)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, self.rotary, ops, qkv_bias=qkv_bias, qk_norm=qk_norm, tp=tp)
            for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """forward(input_ids [T], positions [T], kv_caches, meta) -> hidden [T, H] is a pure
    function of its inputs (the KV cache is written in place), so decode steps can be
    captured as CUDA graphs; compute_logits runs only on the rows that sample."""

    qkv_bias: bool | None = None  # None: as the config says (attention_bias)
    qk_norm: bool = False

    def __init__(
        self,
        cfg: ModelConfig,
        ops: KernelBackend,
        max_positions: int | None = None,
        tp: TensorParallel | None = None,
    ):
        super().__init__()
        self.config, self.tp = cfg, tp
        qkv_bias = cfg.attention_bias if self.qkv_bias is None else self.qkv_bias
        max_positions = max_positions or cfg.max_position_embeddings
        self.model = LlamaModel(cfg, ops, max_positions, qkv_bias=qkv_bias, qk_norm=self.qk_norm, tp=tp)
        vocab = cfg.vocab_size
        if tp is not None:
            v0, v1 = vocab_range(vocab, tp.rank, tp.world_size)
            vocab = v1 - v0
        self.lm_head = Linear(cfg.hidden_size, vocab, ops)  # tied: shares embed_tokens' weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [B, H] -> logits [B, V] (tensor parallel: on rank 0; None on the others)."""
        if self.tp is None:
            return self.lm_head(hidden)
        return self.tp.gather_logits(self.lm_head(hidden), self.config.vocab_size)

    def load_weights(self, weights: dict[str, torch.Tensor], device: torch.device | str) -> None:
        """Take the HF-named tensors (the dict is emptied) and move the rest of the model
        (the rotary cache) to ``device``."""
        tied = self.config.tie_word_embeddings
        if tied:
            weights.pop("lm_head.weight", None)
        load_packed_weights(self, weights, device, skip={"lm_head.weight"} if tied else set())
        if tied:  # the same tensor (or GGUF blocks), never a copy
            set_weight(self.lm_head, "weight", self.model.embed_tokens.weight)
        if weights:
            raise ValueError(f"checkpoint tensors not used by the model: {sorted(weights)[:5]}")
        self.to(device)

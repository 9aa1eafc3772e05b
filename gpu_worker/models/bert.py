"""BERT encoder (all-MiniLM-L6-v2 and the like): embeddings only.

    input_ids [T] -> word + position + token type (0) embeddings -> LayerNorm
      -> N x EncoderLayer -> hidden [T, H]  (the last hidden state; pooling.py pools it)
    EncoderLayer (post-LN): h = LN(x + attn(x));  out = LN(h + down(gelu(up(h))))

Attention is bidirectional within each input and never crosses inputs. The scheduler sends an
embedding request's whole prompt in one step, so each input's K/V are all in this step's
q/k/v: attention is computed from them directly and there is no KV cache (``kv_caches`` is
ignored; the worker allocates none). The flat batch is padded to the longest input for one
batched SDPA call, with the padding keys masked out::

    flat rows   | a0 a1 a2 | b0 b1 b2 b3 b4 | c0 |          query_lens [3, 5, 1]
    padded      [[a0 a1 a2 .  . ], [b0 .. b4], [c0 . . . .]]  (B=3, Lmax=5), mask: keys < len
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zeroserve.gpu_worker.loader import ModelConfig
from zeroserve.kernels.base import KernelBackend
from zeroserve.kernels.metadata import AttentionMetadata

from .layers import Linear, _param, set_weight


class LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight, self.bias = _param(size), _param(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H = cfg.hidden_size
        self.word_embeddings = nn.Module()
        self.word_embeddings.weight = _param(cfg.vocab_size, H)
        self.position_embeddings = nn.Module()
        self.position_embeddings.weight = _param(cfg.max_position_embeddings, H)
        self.token_type_embeddings = nn.Module()
        self.token_type_embeddings.weight = _param(cfg.type_vocab_size, H)
        self.LayerNorm = LayerNorm(H, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = F.embedding(input_ids, self.word_embeddings.weight)
        x = x + F.embedding(positions, self.position_embeddings.weight)
        x = x + self.token_type_embeddings.weight[0]  # one segment per input: type 0
        return self.LayerNorm(x)


class Padding:
    """Where each flat row goes in the padded [B, Lmax] batch, and the key mask; made once per
    forward from the host query lengths and shared by every layer."""

    def __init__(self, meta: AttentionMetadata, device: torch.device):
        lens = meta.query_lens_host
        self.num_seqs, self.max_len = len(lens), max(lens)
        self.uniform = min(lens) == self.max_len  # no padding: a plain reshape
        if not self.uniform:
            rows = [b * self.max_len + i for b, n in enumerate(lens) for i in range(n)]
            self.rows = torch.tensor(rows, dtype=torch.int64, device=device)
            lengths = torch.tensor(lens, device=device)
            self.mask = (torch.arange(self.max_len, device=device)[None, :] < lengths[:, None])[
                :, None, None, :
            ]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[T, C] -> [B, Lmax, C]"""
        if self.uniform:
            return x.view(self.num_seqs, self.max_len, -1)
        out = x.new_zeros(self.num_seqs * self.max_len, x.shape[-1])
        out.index_copy_(0, self.rows, x)
        return out.view(self.num_seqs, self.max_len, -1)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Lmax, C] -> [T, C]"""
        x = x.reshape(self.num_seqs * self.max_len, -1)
        return x if self.uniform else x.index_select(0, self.rows)


class SelfAttention(nn.Module):
    """q/k/v in one projection (rows: query | key | value), bidirectional within each input."""

    def __init__(self, cfg: ModelConfig, ops: KernelBackend):
        super().__init__()
        H = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.qkv = Linear(H, 3 * H, ops, bias=True)

    def forward(self, x: torch.Tensor, padding: Padding) -> torch.Tensor:
        B, L, nh, D = padding.num_seqs, padding.max_len, self.num_heads, self.head_dim
        qkv = padding.pad(self.qkv(x)).view(B, L, 3, nh, D).permute(2, 0, 3, 1, 4)  # (3, B, nh, L, D)
        mask = None if padding.uniform else padding.mask
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)  # (B, nh, L, D)
        return padding.unpad(out.transpose(1, 2))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelBackend):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.attention = SelfAttention(cfg, ops)
        self.attention_output = Linear(H, H, ops, bias=True)
        self.attention_norm = LayerNorm(H, eps)
        self.intermediate = Linear(H, cfg.intermediate_size, ops, bias=True)
        self.output = Linear(cfg.intermediate_size, H, ops, bias=True)
        self.output_norm = LayerNorm(H, eps)

    def forward(self, x: torch.Tensor, padding: Padding) -> torch.Tensor:
        h = self.attention_norm(x + self.attention_output(self.attention(x, padding)))
        return self.output_norm(h + self.output(F.gelu(self.intermediate(h))))


# our parameter (under encoder.layer.N.) -> the Hugging Face tensors it is made of (rows stacked)
_HF_NAMES = {
    "attention.qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "attention_output": ("attention.output.dense",),
    "attention_norm": ("attention.output.LayerNorm",),
    "intermediate": ("intermediate.dense",),
    "output": ("output.dense",),
    "output_norm": ("output.LayerNorm",),
}


def hf_sources(name: str) -> list[str]:
    """'encoder.layer.0.attention.qkv.bias' -> [...attention.self.query.bias, ...key.bias, ...value.bias]"""
    if not name.startswith("encoder.layer."):
        return [name]
    prefix, rest = name.split(".", 3)[:3], name.split(".", 3)[3]
    module, _, attr = rest.rpartition(".")
    return [".".join([*prefix, hf, attr]) for hf in _HF_NAMES[module]]


class BertModel(nn.Module):
    """forward(input_ids [T], positions [T], kv_caches (unused), meta) -> hidden [T, H]: each
    input's tokens attend to each other, whole (positions 0..n-1, one step per input)."""

    is_encoder = True

    def __init__(self, cfg: ModelConfig, ops: KernelBackend, max_positions: int | None = None, tp=None):
        super().__init__()
        if tp is not None:
            raise ValueError("tensor parallelism is not supported for encoder (embedding) models")
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(EncoderLayer(cfg, ops) for _ in range(cfg.num_hidden_layers))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        padding = Padding(meta, input_ids.device)
        x = self.embeddings(input_ids, positions)
        for layer in self.encoder.layer:
            x = layer(x, padding)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("an encoder model has no LM head: it serves embeddings only")

    def load_weights(self, weights: dict[str, torch.Tensor], device: torch.device | str) -> None:
        """Take the HF-named tensors (the dict is emptied), q/k/v stacked into one projection."""
        for name, param in list(self.named_parameters()):
            sources = hf_sources(name)
            missing = [s for s in sources if s not in weights]
            if missing:
                raise KeyError(f"checkpoint has no tensor {missing[0]!r}, needed for {name}")
            parts = [weights.pop(s) for s in sources]
            weight = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            if tuple(weight.shape) != tuple(param.shape):
                raise ValueError(
                    f"{name}: checkpoint gives shape {tuple(weight.shape)}, model expects {tuple(param.shape)}"
                )
            owner_name, _, attr = name.rpartition(".")
            set_weight(self.get_submodule(owner_name), attr, weight.to(device).contiguous())
        if weights:
            raise ValueError(f"checkpoint tensors not used by the model: {sorted(weights)[:5]}")
        self.to(device)

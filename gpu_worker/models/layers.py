"""Layers shared by the decoder-only families (Llama, Qwen2, Qwen3).

Everything runs on a flat batch: ``T`` tokens from many sequences laid end to end, no batch
dimension and no padding (see kernels/metadata.py). Every kernel, the projections included,
goes through the kernel backend (``ops = get_kernels(...)``, kernels/base.py). Projections that
read the same input are merged into one matmul:

    qkv_proj     [(Hq + 2 Hkv) * D, H]   rows: q | k | v
    gate_up_proj [2 I, H]                rows: gate | up

Weights start on the ``meta`` device; the model's ``load_weights`` fills them from the
Hugging Face-named tensors (packing q/k/v and gate/up as it goes).

With tensor parallelism (``tp``, gpu_worker/parallel.py) each rank builds the same layers at
its share of the sizes: qkv/gate_up hold its rows (column-parallel: plain ``Linear``), o_proj
and down_proj its input columns (``RowParallelLinear``: partial sums, all-reduced), the
embedding and lm_head its vocabulary rows. Without ``tp`` nothing here calls a collective.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from zeroserve.gpu_worker.parallel import TensorParallel
from zeroserve.kernels.base import KernelBackend, LinearHandle
from zeroserve.kernels.metadata import AttentionMetadata
from zeroserve.kernels.quantized import GGUFWeight

log = logging.getLogger(__name__)

KVCache = torch.Tensor  # one layer: [2, num_blocks, block_size, Hkv, D] (K pool, V pool)


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T (+ b). W: [out_features, in_features], as Hugging Face stores it.

    At the first forward W (and b) go to the backend's ``prepare_linear``, which returns a
    handle in the form its ``linear`` reads (the C++ kernels' panels, oneDNN's blocked layout,
    the tensor as is for cuBLAS, int8 with scales, GGUF blocks); from then on the layer holds
    only that handle, so a packed copy does not double the memory. Until then whoever holds
    the model can still edit W. W may be a GGUFWeight (``--quantization q4``) instead of a tensor.
    """

    def __init__(self, in_features: int, out_features: int, ops: KernelBackend, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.ops = ops
        self.weight = _param(out_features, in_features)
        self.bias = _param(out_features) if bias else None
        self.handle: LinearHandle | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.handle is None:
            self.handle = self.ops.prepare_linear(self.weight, self.bias)
            self.weight = self.bias = None
        return self.ops.linear(x, self.handle)


class VocabEmbedding(nn.Module):
    """Token ids [T] -> rows of the embedding [T, H]. Over a GGUFWeight (``--quantization q4``)
    only the looked-up rows are dequantized: by the C++ kernels where the backend has them,
    else by ``GGUFWeight.dequantize(rows)``; the table stays in its blocks (and a tied lm_head
    multiplies against the same blocks)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, ops: KernelBackend):
        super().__init__()
        self.weight = _param(num_embeddings, embedding_dim)
        self.ops = ops
        self.gguf_rows = _gguf_rows(ops)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if not isinstance(weight, GGUFWeight):
            return self.ops.embedding(input_ids, weight)
        if self.gguf_rows is not None:
            return self.gguf_rows(weight, input_ids)
        return weight.dequantize(input_ids).to(input_ids.device)


class RowParallelLinear(Linear):
    """A row-parallel projection: W is this rank's input columns ``[out, in / N]``, x this
    rank's share of the input; the partial products are summed over the ranks, then the bias
    (whole on every rank) is added once."""

    def __init__(
        self, in_features: int, out_features: int, ops: KernelBackend, tp: TensorParallel, bias: bool = False
    ):
        super().__init__(in_features, out_features, ops, bias=bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.handle is None:
            self.handle = self.ops.prepare_linear(self.weight, None)
            self.weight = None
        out = self.tp.all_reduce(self.ops.linear(x, self.handle))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(VocabEmbedding):
    """This rank's rows [start, start + num_embeddings) of the embedding: ids outside them give
    zeros here, and the sum over the ranks is every id's row."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, ops: KernelBackend, tp: TensorParallel, start: int
    ):
        super().__init__(num_embeddings, embedding_dim, ops)
        self.tp, self.start, self.num_local = tp, start, num_embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.num_local)
        rows = super().forward(local.masked_fill(outside, 0))
        return self.tp.all_reduce(rows.masked_fill_(outside.unsqueeze(1), 0))


def _gguf_rows(ops: KernelBackend):
    """The C++ row dequantizer where the backend is the cpu one and the kernels have it."""
    if ops.name != "cpu":
        return None
    try:
        from zeroserve.kernels.cpu.gguf import gguf_rows
    except ImportError:
        return None
    return gguf_rows


class RMSNorm(nn.Module):
    """RMSNorm; with ``residual`` it adds first and returns (normed, new residual)."""

    def __init__(self, size: int, eps: float, ops: KernelBackend):
        super().__init__()
        self.eps, self.ops = eps, ops
        self.weight = _param(size)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


# --------------------------------------------------------------------------- rotary


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [D/2] fp32, computed exactly as Hugging Face does (same ops, same
    order), so cos/sin match bit for bit. Supports plain, "linear" and "llama3" scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_context = float(scaling["original_max_position_embeddings"])
        low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths (low frequencies) are slowed down by `factor`, short ones kept,
        # and the band between them interpolated smoothly
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(
        f"rope scaling type {rope_type!r} is not supported (zeroserve implements default, "
        "linear and llama3); serve a model without it or add it to models/layers.py"
    )


def build_cos_sin_cache(
    head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None
) -> torch.Tensor:
    """[max_positions, D] fp32: cos(pos * inv_freq) in the first D/2 columns, sin in the last."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float), inv_freq)  # (P, D/2)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin cache (one per model, shared by every layer)."""

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None,
        ops: KernelBackend,
    ):
        super().__init__()
        self.ops = ops
        cache = build_cos_sin_cache(head_dim, max_positions, theta, scaling)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return self.ops.rotary(positions, q, k, self.cos_sin_cache)


# --------------------------------------------------------------------------- attention, MLP


class Attention(nn.Module):
    """Self-attention over the paged KV cache: project, (per-head q/k norm), rotate, store
    the new K/V through the slot mapping, attend over the whole context, project back."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary: RotaryEmbedding,
        ops: KernelBackend,
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm_eps: float | None = None,
        tp: TensorParallel | None = None,
    ):
        """num_heads / num_kv_heads: this rank's (all of them without ``tp``)."""
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.scale = head_dim**-0.5
        self.ops = ops
        self.qkv_proj = Linear(hidden_size, self.q_size + 2 * self.kv_size, ops, bias=qkv_bias)
        if tp is None:
            self.o_proj = Linear(self.q_size, hidden_size, ops, bias=o_bias)
        else:
            self.o_proj = RowParallelLinear(self.q_size, hidden_size, ops, tp, bias=o_bias)
        self.rotary = [rotary]  # a list: shared, not registered once per layer
        if qk_norm_eps is not None:  # Qwen3: RMSNorm over each head's D values
            self.q_norm = RMSNorm(head_dim, qk_norm_eps, ops)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps, ops)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        """positions: [T]; x: [T, H] -> [T, H]."""
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        q, k = self.rotary[0](positions, q, k)
        self.ops.write_kv(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
        out = self.ops.paged_attention(q, kv_cache[0], kv_cache[1], meta, self.scale)  # (T, Hq, D)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up in one matmul."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, ops: KernelBackend, tp: TensorParallel | None = None
    ):
        """intermediate_size: this rank's (all of it without ``tp``)."""
        super().__init__()
        self.ops = ops
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, ops)
        if tp is None:
            self.down_proj = Linear(intermediate_size, hidden_size, ops)
        else:
            self.down_proj = RowParallelLinear(intermediate_size, hidden_size, ops, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


# --------------------------------------------------------------------------- weight loading

# Our packed parameter -> the Hugging Face tensors it concatenates (along dim 0), in order.
PACKED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def hf_sources(param_name: str) -> list[str]:
    """The HF tensor names one of our parameters is made of, e.g.
    'model.layers.0.self_attn.qkv_proj.bias' -> [...q_proj.bias, ...k_proj.bias, ...v_proj.bias]."""
    for packed, parts in PACKED.items():
        marker = f".{packed}."
        if marker in param_name:
            return [param_name.replace(marker, f".{part}.") for part in parts]
    return [param_name]


def _stack(
    name: str, sources: list[str], parts: list[torch.Tensor | GGUFWeight]
) -> torch.Tensor | GGUFWeight:
    """The parts of one packed parameter, rows one after another. GGUF blocks stack as bytes
    when every part has the same block type; mixed parts (llama.cpp's Q4_K_M keeps some v_proj
    in Q6_K) are dequantized, said in the log, as one handle holds one format."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, GGUFWeight) for p in parts) and len({p.ggml_type for p in parts}) == 1:
        return GGUFWeight.cat(parts)
    if any(isinstance(p, GGUFWeight) for p in parts):
        kinds = ", ".join(
            f"{s.rsplit('.', 2)[-2]} {p.type_name if isinstance(p, GGUFWeight) else str(p.dtype).removeprefix('torch.')}"
            for s, p in zip(sources, parts)
        )
        log.warning("%s: parts of different types (%s): dequantized to float32 to stack them", name, kinds)
        parts = [p.dequantize().to(p.data.device) if isinstance(p, GGUFWeight) else p.float() for p in parts]
    return torch.cat(parts, dim=0)


def set_weight(owner: nn.Module, attr: str, value: torch.Tensor | GGUFWeight) -> None:
    """Put a loaded weight in place of ``owner.<attr>``: a tensor as a frozen Parameter, a
    GGUFWeight (not a tensor: it cannot be a Parameter) as a plain attribute."""
    if isinstance(value, GGUFWeight):
        owner._parameters.pop(attr, None)
        object.__setattr__(owner, attr, value)
    else:
        owner.__dict__.pop(attr, None)
        owner._parameters[attr] = (
            value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
        )


def load_packed_weights(
    module: nn.Module,
    weights: dict[str, torch.Tensor | GGUFWeight],
    device: torch.device | str,
    skip: set[str] = frozenset(),
) -> None:
    """Fill every parameter of ``module`` from HF-named ``weights`` (which it empties as it
    goes, so peak memory stays near one copy of the model). Raises KeyError / ValueError
    naming the tensor when one is missing or has the wrong shape. A GGUFWeight (``--quantization
    q4``) stays in its blocks and takes the parameter's place as a plain attribute."""
    for name, param in list(module.named_parameters()):
        if name in skip:
            continue
        sources = hf_sources(name)
        missing = [s for s in sources if s not in weights]
        if missing:
            raise KeyError(f"checkpoint has no tensor {missing[0]!r}, needed for {name}")
        weight = _stack(name, sources, [weights.pop(s) for s in sources])
        if tuple(weight.shape) != tuple(param.shape):
            raise ValueError(
                f"{name}: checkpoint gives shape {tuple(weight.shape)}, model expects {tuple(param.shape)}"
            )
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if isinstance(weight, GGUFWeight):
            if not isinstance(owner, (Linear, VocabEmbedding)):
                raise ValueError(f"{name}: a {weight.type_name} block weight where the model needs a tensor")
            set_weight(owner, attr, weight.to(device))
        else:
            set_weight(owner, attr, weight.to(device).contiguous())

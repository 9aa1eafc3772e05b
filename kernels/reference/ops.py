"""Torch reference kernels: the contracts every backend implements.

Shapes: T tokens in the step, S sequences, Hq query heads, Hkv KV heads (Hq % Hkv == 0),
D head dim, N KV blocks of ``bs`` tokens. KV cache per layer: k_cache, v_cache
``[N, bs, Hkv, D]``. Everything here runs on CPU and GPU; it is the CPU serving path too,
so the common cases (pure decode batches) are batched rather than looped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zeroserve.kernels.metadata import AttentionMetadata


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm as Hugging Face computes it (in fp32, cast back before the weight).

    With ``residual``: ``residual = x + residual`` first; returns (normed, residual).
    x: [T, H], weight: [H].
    """
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * xf.to(x.dtype)
    return out if residual is None else (out, residual)


def rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding (HF's rotate_half) over the full head dim.

    positions: [T] int; q: [T, Hq, D]; k: [T, Hkv, D];
    cos_sin_cache: [max_pos, D] fp32, cos in the first D/2 columns, sin in the last D/2.
    Returns new q, k in their input dtype.
    """
    cos, sin = cos_sin_cache.index_select(0, positions.long()).chunk(2, dim=-1)  # (T, D/2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (T, 1, D/2)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] (gate | up) -> silu(gate) * up: [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store new keys/values: token t goes to flat slot ``slot_mapping[t]`` (block * bs + offset).

    k, v: [T, Hkv, D]; slot_mapping: [T] int64, -1 for padding tokens (skipped).
    """
    num_blocks, block_size, hkv, d = k_cache.shape
    if k_cache.dtype == torch.float8_e4m3fn:
        # e4m3 at scale 1.0, saturated as the Triton kv_write does (an overflowing cast may be
        # NaN); copied as bytes: index_copy_ has no fp8 kernel on CPUs
        k = k.float().clamp(-448.0, 448.0).to(k_cache.dtype).view(torch.uint8)
        v = v.float().clamp(-448.0, 448.0).to(v_cache.dtype).view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.view(num_blocks * block_size, hkv, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, hkv, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of one sequence: [length, Hkv, D]."""
    num_blocks_used = -(-length // cache.shape[1])
    rows = cache.view(cache.shape[0], -1).index_select(0, block_table[:num_blocks_used].long())
    return rows.view(-1, *cache.shape[2:])[:length]


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence, batched. q: [S, Hq, D] -> [S, Hq, D].

    Blocks are gathered with one index_select into (S, Hkv, L, D) views, and the g query heads
    sharing a KV head act as g query rows of one SDPA call: no transposed copies, no repeats.
    """
    s, hq, d = q.shape
    num_blocks, block_size, hkv = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    width = -(-max_seq_len // block_size)
    length = width * block_size
    table = block_tables[:, :width].reshape(-1).long()
    k = (
        k_cache.view(num_blocks, -1).index_select(0, table).view(s, length, hkv, d).transpose(1, 2)
    )  # (S, Hkv, L, D)
    v = v_cache.view(num_blocks, -1).index_select(0, table).view(s, length, hkv, d).transpose(1, 2)
    if k.dtype != torch.float32:
        k, v = k.float(), v.float()
    qg = q.view(s, hkv, group, d).float()  # (S, Hkv, g, D)
    visible = torch.arange(length, device=q.device) < seq_lens.view(-1, 1)  # (S, L)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=visible.view(s, 1, 1, length), scale=scale)
    return out.reshape(s, hq, d).to(q.dtype)


def _extend_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last q_len positions of a context. q: [n, Hq, D], k/v: [L, Hkv, D]."""
    n, hq, d = q.shape
    length, hkv = k.shape[0], k.shape[1]
    # query i sits at position L - n + i and sees keys 0..L - n + i
    qpos = torch.arange(length - n, length, device=q.device).unsqueeze(1)
    allowed = torch.arange(length, device=q.device).unsqueeze(0) <= qpos  # (n, L)
    qt = q.transpose(0, 1).float()  # (Hq, n, D)
    kt = k.transpose(0, 1).float().repeat_interleave(hq // hkv, dim=0)  # (Hq, L, D)
    vt = v.transpose(0, 1).float().repeat_interleave(hq // hkv, dim=0)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed, scale=scale)
    return out.transpose(0, 1).to(q.dtype)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention for a flat, ragged batch over the paged KV cache (K/V already written).

    q: [T, Hq, D] -> out [T, Hq, D]. Mixed prefills (chunked, after cached prefixes) and
    decodes; decode rows are batched together, prefill rows run one sequence at a time.
    """
    if meta.is_decode_only:
        return _decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, scale
        )
    out = torch.empty_like(q)
    start = 0
    decode_rows: list[int] = []
    for s, (n, length) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
        if n == 1:
            decode_rows.append(s)
        elif n > 0:
            k = _gather_context(k_cache, meta.block_tables[s], length)
            v = _gather_context(v_cache, meta.block_tables[s], length)
            out[start : start + n] = _extend_attention(q[start : start + n], k, v, scale)
        start += n
    if decode_rows:
        rows = torch.tensor(decode_rows, device=q.device)
        token_idx = meta.query_start_loc[rows].long()
        lens = [meta.seq_lens_host[s] for s in decode_rows]
        out[token_idx] = _decode_attention(
            q[token_idx], k_cache, v_cache, meta.block_tables[rows], meta.seq_lens[rows], max(lens), scale
        )
    return out

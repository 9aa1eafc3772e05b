"""Memory per tensor-parallel rank: weights + KV cache, from the models' published configs.

    python benchmarks/tp_memory_table.py                      # the table in docs/distributed.md
    python benchmarks/tp_memory_table.py --context 32768 --batch 4 --weight-bytes 1

Nothing is downloaded: each model's shape is written out below from its config.json on the
Hugging Face Hub. The split is the one gpu_worker/models/layers.py makes (Megatron-style):

    q, k, v, gate, up      column-parallel: each rank holds 1/N of the output rows
    o_proj, down           row-parallel: 1/N of the input columns (then an all-reduce)
    embedding, lm_head     vocab-parallel: 1/N of the vocabulary rows (one matrix when tied)
    norms                  replicated
    KV heads               1/N each; when N exceeds them each rank keeps max(1, KV // N) heads
                           (replicated), as vLLM does, so the KV cache stops shrinking there

A TP size that does not divide the attention heads (or the KV heads, below their count) is
refused at start, and shown as "—". Not counted: activations, the sampler's buffers, CUDA
graphs and the allocator's slack (budget ~1-2 GiB per GPU for them).
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

GIB = 1024**3


class Shape(NamedTuple):
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool  # tie_word_embeddings: the lm_head is the embedding
    published_params: float  # the model card's count, a check on the constants above


MODELS = (
    # HuggingFaceTB/SmolLM2-135M-Instruct
    Shape("SmolLM2-135M", 576, 1536, 30, 9, 3, 64, 49152, True, 134.5e6),
    # meta-llama/Meta-Llama-3-8B
    Shape("Llama-3-8B", 4096, 14336, 32, 32, 8, 128, 128256, False, 8.03e9),
    # meta-llama/Meta-Llama-3-70B
    Shape("Llama-3-70B", 8192, 28672, 80, 64, 8, 128, 128256, False, 70.6e9),
)
TP_SIZES = (1, 2, 4, 8)


def supported(m: Shape, tp: int) -> bool:
    return m.heads % tp == 0 and (m.kv_heads % tp == 0 or tp % m.kv_heads == 0)


def kv_heads_per_rank(m: Shape, tp: int) -> int:
    return max(1, m.kv_heads // tp)


def weight_params_per_rank(m: Shape, tp: int) -> int:
    q = m.hidden * m.heads * m.head_dim // tp
    kv = 2 * m.hidden * kv_heads_per_rank(m, tp) * m.head_dim
    o = m.heads * m.head_dim * m.hidden // tp
    mlp = 3 * m.hidden * m.intermediate // tp
    norms = 2 * m.hidden
    vocab = m.vocab // tp * m.hidden * (1 if m.tied else 2)
    return m.layers * (q + kv + o + mlp + norms) + vocab + m.hidden  # + the final norm


def kv_bytes_per_rank(m: Shape, tp: int, tokens: int, kv_bytes: float) -> float:
    return 2 * m.layers * kv_heads_per_rank(m, tp) * m.head_dim * kv_bytes * tokens


def table(context: int, batch: int, weight_bytes: float, kv_bytes: float) -> str:
    head = "| model | params | KV per token | " + " | ".join(f"TP={tp}" for tp in TP_SIZES) + " |"
    lines = [head, "|---|---|---|" + "---|" * len(TP_SIZES)]
    for m in MODELS:
        cells = []
        for tp in TP_SIZES:
            if not supported(m, tp):
                cells.append(f"— ({m.heads} heads)")
                continue
            w = weight_params_per_rank(m, tp) * weight_bytes / GIB
            kv = kv_bytes_per_rank(m, tp, context * batch, kv_bytes) / GIB
            cells.append(f"{w:.2f} + {kv:.2f} = **{w + kv:.2f}**")
        per_token = kv_bytes_per_rank(m, 1, 1, kv_bytes) / 1024
        params = weight_params_per_rank(m, 1)
        lines.append(f"| {m.name} | {params / 1e9:.3g} B | {per_token:.1f} KiB | " + " | ".join(cells) + " |")
    for m in MODELS:  # the sizes it does take, where the columns above refuse it
        if any(not supported(m, tp) for tp in TP_SIZES):
            others = [tp for tp in range(2, 9) if supported(m, tp) and tp not in TP_SIZES]
            for tp in others:
                w = weight_params_per_rank(m, tp) * weight_bytes / GIB
                kv = kv_bytes_per_rank(m, tp, context * batch, kv_bytes) / GIB
                lines.append(f"\n{m.name} at TP={tp}: {w:.2f} + {kv:.2f} = **{w + kv:.2f}** GiB per rank.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=8192, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=16, help="sequences held in the KV cache at once")
    p.add_argument("--weight-bytes", type=float, default=2.0, help="bytes per weight (bf16: 2, int8: 1)")
    p.add_argument("--kv-bytes", type=float, default=2.0, help="bytes per KV element (bf16/fp16: 2, fp8: 1)")
    args = p.parse_args()
    for m in MODELS:  # the shapes above must add up to the published sizes
        computed = weight_params_per_rank(m, 1)
        assert abs(computed / m.published_params - 1) < 0.01, (m.name, computed, m.published_params)
    print(
        f"GiB per rank, weights + KV cache: weights {args.weight_bytes:g} bytes each, KV "
        f"{args.kv_bytes:g} bytes per element, {args.batch} sequences x {args.context} tokens "
        f"({args.batch * args.context:,} tokens cached)\n"
    )
    print(table(args.context, args.batch, args.weight_bytes, args.kv_bytes))


if __name__ == "__main__":
    main()

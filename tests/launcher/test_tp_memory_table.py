"""benchmarks/tp_memory_table.py: its shapes add up to the published sizes, its split is the TP
layers', and docs/distributed.md shows what it prints."""

from __future__ import annotations

import importlib.util
import os

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
spec = importlib.util.spec_from_file_location(
    "tp_memory_table", os.path.join(REPO, "benchmarks", "tp_memory_table.py")
)
tmt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tmt)


def test_the_written_out_shapes_add_up_to_the_published_parameter_counts():
    for m in tmt.MODELS:
        assert abs(tmt.weight_params_per_rank(m, 1) / m.published_params - 1) < 0.01, m.name


def test_kv_heads_split_until_each_rank_holds_one_then_replicate():
    llama8b = next(m for m in tmt.MODELS if m.name == "Llama-3-8B")  # 8 KV heads
    per_rank = [tmt.kv_bytes_per_rank(llama8b, tp, 1000, 2) for tp in (1, 2, 4, 8, 16)]
    assert per_rank[:4] == [per_rank[0] / tp for tp in (1, 2, 4, 8)]
    assert per_rank[4] == per_rank[3]  # TP=16: still one KV head per rank
    smol = tmt.MODELS[0]  # 9 heads, 3 KV heads: TP=3 only
    assert [tp for tp in range(1, 9) if tmt.supported(smol, tp)] == [1, 3]


def test_docs_distributed_md_holds_the_scripts_table():
    with open(os.path.join(REPO, "docs", "distributed.md")) as f:
        doc = f.read()
    assert tmt.table(context=8192, batch=16, weight_bytes=2, kv_bytes=2) in doc, (
        "rerun: python benchmarks/tp_memory_table.py, and paste its table into docs/distributed.md"
    )

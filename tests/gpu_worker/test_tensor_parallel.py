"""Tensor parallelism (gpu_worker/parallel.py): sizes refused, slices read, greedy tokens kept.

The greedy tests start N real rank processes (tests/gpu_worker/tp_rank.py: the worker's own
GroupLink rendezvous, gloo, plan fan-out) on tiny random transformers models and on the packaged
SmolLM2 GGUF, and compare their tokens with one ModelRunner's in this process (which itself
equals transformers: tests/gpu_worker/test_models_hf.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(1)

from zeroserve.gpu_worker.loader import ReadStats, load_checkpoint, load_model_config  # noqa: E402
from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig  # noqa: E402
from zeroserve.gpu_worker.parallel import check_tp_size, kv_head_range, tensor_shards, vocab_range  # noqa: E402
from zeroserve.kernels import get_kernels  # noqa: E402
from zeroserve.kernels.quantized import GGUFWeight  # noqa: E402
from zeroserve.launcher.inprocess import InProcessEngine  # noqa: E402
from zeroserve.shared.config import EngineConfig, write_config  # noqa: E402
from zeroserve.shared.messages import SamplingParams  # noqa: E402

RANK_SCRIPT = os.path.join(os.path.dirname(__file__), "tp_rank.py")
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.2,
    rms_norm_eps=1e-6,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
FAMILIES = {
    # 251 ids: rank 1's vocabulary shard is one row short, padded for the logits gather
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, vocab_size=251)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False, head_dim=16)),
}
PROMPTS = [[5, 17, 99, 3, 250, 8, 41, 77, 12, 9, 180], [200, 1, 64], [33]]
SMOLLM_PROMPTS = [[1, 504, 3458, 282, 4649, 314], [28, 339, 253]]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def run_group(
    tmp_path, model: str, world: int, runner: dict, prompts, max_tokens: int, logits_out: str | None = None
) -> list[dict]:
    """Start ``world`` rank processes on ``model``; each one's output (rank 0: the greedy tokens)."""
    config = os.path.join(tmp_path, "config.json")
    write_config(
        EngineConfig(model=model, served_model_name="tp", run_dir=str(tmp_path), tensor_parallel_size=world),
        config,
    )
    spec = os.path.join(tmp_path, "spec.json")
    with open(spec, "w") as f:
        json.dump(
            {
                "config": config,
                "runner": {"model": model, **runner},
                "prompts": prompts,
                "max_tokens": max_tokens,
                "logits_out": logits_out,
            },
            f,
        )
    outs = [os.path.join(tmp_path, f"rank{r}.json") for r in range(world)]
    logs = [open(os.path.join(tmp_path, f"rank{r}.log"), "w+") for r in range(world)]
    procs = [
        subprocess.Popen(
            [sys.executable, RANK_SCRIPT, spec, str(r), outs[r]], stdout=logs[r], stderr=subprocess.STDOUT
        )
        for r in range(world)
    ]
    codes = []
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        tails = []
        for r, log in enumerate(logs):
            log.seek(0)
            tails.append(f"--- rank {r}:\n" + log.read()[-3000:])
            log.close()
    assert codes == [0] * world, (codes, "\n".join(tails))
    results = []
    for path in outs:
        with open(path) as f:
            results.append(json.load(f))
    return results


def sharded_bytes(cfg, shapes: dict, itemsize: int, world: int) -> list[int]:
    """What each rank must read: every tensor's slice (or all of it, when it is replicated)."""
    per_rank = []
    for rank in range(world):
        slices = tensor_shards(cfg, rank, world)
        total = 0
        for name, shape in shapes.items():
            shape = slices[name].shape_of(shape) if name in slices else shape
            total += itemsize * int(torch.Size(shape).numel())
        per_rank.append(total)
    return per_rank


# --------------------------------------------------------------------------- sizes


def test_a_size_that_does_not_divide_the_heads_is_refused_naming_them(gguf_path):
    cfg = load_model_config(gguf_path)  # SmolLM2-135M: 9 heads, 3 KV heads
    with pytest.raises(
        ValueError, match=r"does not divide its 9 attention heads and its 3 KV heads.*model: 1, 3$"
    ):
        check_tp_size(cfg, 2)
    check_tp_size(cfg, 3)
    with pytest.raises(ValueError, match="does not divide its MLP width 1536"):
        check_tp_size(cfg, 9)  # the heads would split (3 KV heads, each on 3 ranks), the MLP would not


def test_kv_heads_are_replicated_when_ranks_outnumber_them():
    # 2 KV heads on 4 ranks: ranks 0, 1 attend with head 0 and ranks 2, 3 with head 1 (as vLLM)
    assert [kv_head_range(2, r, 4) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [kv_head_range(4, r, 2) for r in range(2)] == [(0, 2), (2, 4)]
    # 49152 ids on 5 ranks: ceil -> 9831 rows each, the last one shorter, none lost or repeated
    ranges = [vocab_range(49152, r, 5) for r in range(5)]
    assert ranges[0] == (0, 9831) and ranges[-1] == (39324, 49152)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


# --------------------------------------------------------------------------- sharded loading


def test_gguf_ranks_read_only_their_slices_and_get_the_full_loads_values(gguf_path):
    """Each of 3 ranks reads ~1/3 of the sharded tensors' bytes from the memory map (rows, or
    whole Q4_1 blocks of columns for o_proj/down_proj), and its tensors are exactly the slices
    of the full load: the llama q/k un-permute commutes with taking whole heads."""
    cfg, full = load_checkpoint(gguf_path, keep_quantized=True)
    full_stats = ReadStats()
    load_checkpoint(gguf_path, keep_quantized=True, stats=full_stats)
    sharded_total = 0
    for rank in range(3):
        slices = tensor_shards(cfg, rank, 3)
        stats = ReadStats()
        _, part = load_checkpoint(gguf_path, keep_quantized=True, slices=slices, stats=stats)
        for name, whole in full.items():
            got, shard = part[name], slices.get(name)
            if isinstance(whole, GGUFWeight):
                assert isinstance(got, GGUFWeight), name  # still in its blocks
                if shard is None:
                    assert torch.equal(got.data, whole.data), name
                elif shard.dim == 0:  # whole rows of blocks: the same bytes
                    assert torch.equal(got.data, whole.data[shard.start : shard.stop]), name
                else:  # whole blocks of each row: compare the values
                    assert torch.equal(got.dequantize(), shard.of(whole.dequantize())), name
            else:
                assert torch.equal(got, whole if shard is None else shard.of(whole)), name
        sharded_total += stats.bytes_read
        assert stats.bytes_read < 0.36 * full_stats.bytes_read, (
            rank,
            stats.bytes_read,
            full_stats.bytes_read,
        )
    # the three ranks together read the file's tensors once, plus the replicated norms twice more
    norms = sum(4 * t.numel() for n, t in full.items() if n.endswith("norm.weight"))
    assert sharded_total == full_stats.bytes_read + 2 * norms


def test_safetensors_ranks_read_only_their_slices(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    cfg, full = load_checkpoint(str(tmp_path))
    shapes = {n: tuple(t.shape) for n, t in full.items()}
    expected = sharded_bytes(cfg, shapes, 4, 2)
    for rank in range(2):
        stats = ReadStats()
        slices = tensor_shards(cfg, rank, 2)
        _, part = load_checkpoint(str(tmp_path), slices=slices, stats=stats)
        assert stats.bytes_read == expected[rank]
        for name, whole in full.items():
            assert torch.equal(part[name], slices[name].of(whole) if name in slices else whole), name
    full_bytes = sum(4 * t.numel() for t in full.values())
    assert expected[0] < 0.52 * full_bytes  # only the norms are read twice


# --------------------------------------------------------------------------- quantized handles


def test_int8_projections_shard_before_quantizing():
    """A column-parallel shard (rows of W) quantized alone has the same per-channel scales as
    in the whole W: its outputs are exactly those rows of the whole's. Row-parallel shards
    (columns) quantize their own channels: the sum of their outputs stays within int8 error."""
    ops = get_kernels("cpu", "cpu", quantization="int8")
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=gen) * 0.05
    x = torch.randn(5, 128, generator=gen)
    whole = ops.linear(x, ops.prepare_linear(w, None))
    top = ops.linear(x, ops.prepare_linear(w[:48].contiguous(), None))
    assert torch.equal(top, whole[:, :48])
    parts = sum(
        ops.linear(x[:, k : k + 64].contiguous(), ops.prepare_linear(w[:, k : k + 64].contiguous(), None))
        for k in (0, 64)
    )
    exact = x @ w.T
    assert (parts - exact).abs().max() < 3 * (whole - exact).abs().max() + 1e-3


# --------------------------------------------------------------------------- greedy equality


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tp2_greedy_tokens_equal_tp1(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**TINY, **extra})).save_pretrained(
        model_dir
    )
    runner = {"block_size": 8, "num_kv_blocks": 64, "quantization": "none"}
    expected = InProcessEngine(ModelRunner(RunnerConfig(model=str(model_dir), **runner))).generate(
        PROMPTS, greedy(12)
    )
    assert len({t for out in expected for t in out}) > 8  # varied outputs: the comparison means something
    ranks = run_group(tmp_path, str(model_dir), 2, runner, PROMPTS, 12)
    assert ranks[0]["outputs"] == expected
    whole = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    assert all(r["bytes_read"] < 0.6 * whole for r in ranks), [r["bytes_read"] for r in ranks]


def test_smollm2_tp3_greedy_tokens_equal_tp1(tmp_path, gguf_path):
    """The packaged GGUF, its Q4_1 blocks read sharded and dequantized (fp32 compute: the
    all-reduce changes only the order of fp32 sums, far below the logit margins)."""
    runner = {"block_size": 16, "num_kv_blocks": 32, "quantization": "none"}
    expected = InProcessEngine(ModelRunner(RunnerConfig(model=gguf_path, **runner))).generate(
        SMOLLM_PROMPTS, greedy(6)
    )
    ranks = run_group(tmp_path, gguf_path, 3, runner, SMOLLM_PROMPTS, 6)
    assert ranks[0]["outputs"] == expected


def first_step_logits(gguf_path: str, runner: dict) -> torch.Tensor:
    one = ModelRunner(RunnerConfig(model=gguf_path, **runner))
    saved = []
    compute_logits = one.model.compute_logits
    one.model.compute_logits = lambda hidden: saved.append(compute_logits(hidden)) or saved[-1]
    InProcessEngine(one).generate(SMOLLM_PROMPTS, greedy(1))
    return saved[0]


def test_smollm2_tp3_q4_logits_agree_within_int8_rounding(tmp_path, gguf_path):
    """With q4 (activations rounded to int8 per block before each projection) the all-reduce's
    fp32 order moves some activations across a rounding step, and 30 layers carry that on:
    greedy tokens can differ at near-ties (measured: a 0.09 logit margin flips at token 4 of a
    prompt). Asserted instead, on the first step: the logits move less, on average, than q4's
    own rounding moves them from fp32 compute on the same weights; at most by 1.0 (they span
    ~-8..24); and every row picks the same token."""
    runner = {"block_size": 16, "num_kv_blocks": 32, "quantization": "q4"}
    q4 = first_step_logits(gguf_path, runner)
    fp32 = first_step_logits(gguf_path, {**runner, "quantization": "none"})
    logits_out = os.path.join(tmp_path, "logits.pt")
    run_group(tmp_path, gguf_path, 3, runner, SMOLLM_PROMPTS, 1, logits_out=logits_out)
    tp3 = torch.load(logits_out)
    assert tp3.shape == q4.shape == (2, 49152)
    moved = (tp3 - q4).abs()
    assert 0 < moved.mean() < (q4 - fp32).abs().mean(), (moved.mean(), (q4 - fp32).abs().mean())
    assert moved.max() < 1.0, moved.max()
    assert torch.equal(tp3.argmax(-1), q4.argmax(-1))

"""The quality bar of issue 14: on the packaged SmolLM2, each quantized mode this CPU serves has
a perplexity within +3% of fp32's (``--quantization none``: the GGUF's values dequantized) over
public-domain prose shipped in the repo (tests/data/public_domain_prose.txt).

The default run scores one 512-token window per mode; the slow variant scores ~2k tokens with a
sliding window, as benchmarks/bench_quality.py does (which also reports greedy agreement).
A broken kernel (a wrong row, scale or permutation) sends perplexity up by far more than 3%:
the first test checks that this measure sees that, so that a pass means something.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from zeroserve.gpu_worker.quantization import BF16_FLAGS, available_modes, cpu_flags

BAR = 1.03  # perplexity at most 3% above fp32's
HERE = os.path.dirname(__file__)


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_quality", os.path.join(HERE, "..", "..", "benchmarks", "bench_quality.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _bench()


def cpu_modes() -> list[str]:
    """The quantized modes this machine and tree serve on the cpu kernels."""
    modes = [m for m in ("q4", "int8") if m in available_modes("cpu")]
    if "bf16" in available_modes("cpu") and any(f in cpu_flags() for f in BF16_FLAGS):
        modes.append("bf16")
    return modes


@pytest.fixture(scope="module")
def text_ids(gguf_path) -> list[int]:
    ids = bench.text_token_ids(gguf_path)
    assert len(ids) >= 2048  # "a few thousand tokens"
    return ids


@pytest.fixture(scope="module")
def fp32(gguf_path):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return bench.make_runner(gguf_path, "none", window=2048)


@pytest.fixture(scope="module")
def fp32_ppl(fp32, text_ids) -> float:
    return bench.perplexity(fp32, text_ids[:512], window=512, stride=512)


def test_the_measure_sees_a_broken_projection(fp32, fp32_ppl, text_ids):
    """The text is ordinary prose for this model, and damage the size of a kernel bug (one
    projection's rows shifted by one in one layer) costs far more than the 3% bar."""
    assert 3 < fp32_ppl < 40
    layer = fp32.model.model.layers[7].mlp.down_proj
    original = layer.handle  # prepared by the fp32_ppl pass
    with torch.inference_mode():  # W read back through the handle: x = I gives W^T
        weight = fp32.ops.linear(torch.eye(layer.in_features), original).T.contiguous()
    try:
        layer.handle = fp32.ops.prepare_linear(weight.roll(1, dims=0), None)  # rows off by one
        broken = bench.perplexity(fp32, text_ids[:512], window=512, stride=512)
    finally:
        layer.handle = original
    assert broken > fp32_ppl * BAR


@pytest.mark.parametrize("mode", ["q4", "int8", "bf16"])
def test_each_cpu_mode_is_within_3_percent_of_fp32_perplexity(gguf_path, fp32_ppl, text_ids, mode):
    if mode not in cpu_modes():
        pytest.skip(f"{mode} is not served on this machine / tree")
    runner = bench.make_runner(gguf_path, mode, window=512)
    ppl = bench.perplexity(runner, text_ids[:512], window=512, stride=512)
    assert ppl <= fp32_ppl * BAR, (
        f"{mode}: perplexity {ppl:.3f} vs fp32 {fp32_ppl:.3f} ({runner.quantization_summary})"
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["q4", "int8", "bf16"])
def test_each_cpu_mode_over_2k_tokens_with_a_sliding_window(gguf_path, fp32, text_ids, mode):
    if mode not in cpu_modes():
        pytest.skip(f"{mode} is not served on this machine / tree")
    ids = text_ids[:2048]
    base = bench.perplexity(fp32, ids, window=1024, stride=512)
    runner = bench.make_runner(gguf_path, mode, window=1024)
    ppl = bench.perplexity(runner, ids, window=1024, stride=512)
    assert ppl <= base * BAR, (
        f"{mode}: perplexity {ppl:.3f} vs fp32 {base:.3f} ({runner.quantization_summary})"
    )

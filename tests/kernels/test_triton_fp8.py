"""FP8 (e4m3) projections and the e4m3 KV cache: Triton (interpreted) against the torch reference.

Tolerances come from e4m3's step, not from what the kernels happen to hit. e4m3 has 3 mantissa
bits, so rounding to nearest moves a normal value v by at most 2^-4 |v| (half of its step
2^(e-3)) and a subnormal one (|v| < 2^-6) by at most 2^-10 (half of the step 2^-9). For the
projection y = x W^T with x quantized per row (scale sx = absmax / 448) and W per output
channel (sw), each product x_k w_k becomes (x_k + dx_k)(w_k + dw_k) with
|dx_k| <= 2^-4 |x_k| + 2^-10 sx and |dw_k| <= 2^-4 |w_k| + 2^-10 sw, which bounds each output:

    |y - y_fp8| <= sum_k |dx_k| |w_k| + |x_k| |dw_k| + |dx_k| |dw_k|

(three small matmuls of absolute values). Against the reference that multiplies the *same*
e4m3 values, the kernel differs only by fp32 summation order: products of two e4m3 values
are exact in fp32, so the slack is a few fp32 ulps of sum_k |xq_k wq_k| sx sw.

The interpreter cannot run ``torch._scaled_mm`` on a GPU; its call (layouts, scale shapes,
bias dtype) is exercised on the CPU, where torch implements the same contract.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from zeroserve.kernels.metadata import AttentionMetadata
from zeroserve.kernels.reference import ops as ref
from zeroserve.kernels.triton import fp8
from zeroserve.kernels.triton.attention_decode import decode_attention
from zeroserve.kernels.triton.attention_extend import extend_attention
from zeroserve.kernels.triton.kv_write import write_kv

torch.set_num_threads(2)
E4M3 = torch.float8_e4m3fn
REL = 2.0**-4  # half a step of a 3-bit mantissa, relative
SUB = 2.0**-10  # half a subnormal step, in units of the scale
FP32_SLACK = 2.0**-20  # fp32 summation-order slack, relative to sum |terms| (K <= 200 here)


def e4m3_error_bound(x: torch.Tensor, w: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """Per-element bound on |x W^T - dequant(xq) dequant(wq)^T| (module docstring); with one
    scale for all of W its subnormal step follows the whole matrix's absmax."""
    x, w = x.double(), w.double()
    sx = x.abs().amax(dim=1, keepdim=True) / 448
    sw = (w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().expand(w.shape[0], 1)) / 448
    dx = REL * x.abs() + SUB * sx
    dw = REL * w.abs() + SUB * sw
    return dx @ w.abs().t() + x.abs() @ dw.t() + dx @ dw.t()


def summation_slack(x: torch.Tensor, h: fp8.Fp8Linear) -> torch.Tensor:
    xq, sx = fp8.quantize_rows_reference(x)
    terms = (xq.double().abs() @ h.weight.double().abs().t()) * sx.double() * h.weight_scale.double()
    return FP32_SLACK * terms + 1e-30


# ----------------------------------------------------------------------------------- quantization


def test_activation_quantization_is_round_to_nearest_even_like_torch():
    """Rows of very different magnitudes, ties, subnormals, the clamp edge and a zero row:
    the kernel's e4m3 values and scales equal torch's cast of the same scaled values."""
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(300, generator=gen) * 10.0**e for e in (-3, 0, 2, 4)]
    edge = torch.tensor([448.0, -448.0, 31.5, 127.9, 0.0, 1e-3, -1e-3] + [0.0] * 293)
    ties = (torch.arange(300) * 0.0625 + 0.03125) * (448 / (299 * 0.0625 + 0.03125))  # midpoints
    x = torch.stack(rows + [edge, ties, torch.zeros(300)])
    q, scale = fp8.quantize_rows(x)
    q_ref, scale_ref = fp8.quantize_rows_reference(x)
    assert q.dtype == E4M3 and scale.shape == (x.shape[0], 1)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.float(), q_ref.float())  # values (the kernel's zero may be +0 for -0)
    assert torch.isfinite(q.float()).all() and q[-1].float().abs().max() == 0
    # dequantized, within e4m3's step of the input
    err = (q.float() * scale - x).abs()
    assert (err <= REL * x.abs() + SUB * scale + 1e-12).all()


@pytest.mark.parametrize("m", [1, 3, 200])
def test_activation_quantization_bf16_rows(m):
    x = (torch.randn(m, 333, generator=torch.Generator().manual_seed(m)) * 5).to(torch.bfloat16)
    q, scale = fp8.quantize_rows(x)
    q_ref, scale_ref = fp8.quantize_rows_reference(x)
    assert torch.equal(scale, scale_ref) and torch.equal(q.float(), q_ref.float())


# ----------------------------------------------------------------------------------- projection

# (M, K, N): every tile configuration (M <= 16, <= 64, more), K not a multiple of BLOCK_K
# (128), N % 16 != 0 but also N a multiple of 16
SHAPES = [(1, 96, 100), (7, 200, 33), (16, 64, 48), (37, 130, 17), (65, 72, 50), (200, 160, 23)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("per_channel", [True, False])
def test_triton_fp8_linear(m, k, n, per_channel):
    gen = torch.Generator().manual_seed(m * 1000 + n)
    # channels of different magnitudes: per-channel scales matter
    w = torch.randn(n, k, generator=gen) * torch.logspace(-2, 1, n).view(n, 1)
    b = torch.randn(n, generator=gen)
    x = torch.randn(m, k, generator=gen) * 3
    h = fp8.Fp8Linear(w, b, per_channel=per_channel, use_scaled_mm=False)
    assert h.weight.dtype == E4M3 and h.weight.shape == (n, k) and h.kernel == "triton"
    y = fp8.fp8_linear(x, h)
    assert y.shape == (m, n) and y.dtype == torch.float32

    same_values = fp8.fp8_linear_reference(x, h)
    assert ((y - same_values).abs().double() <= summation_slack(x, h)).all()

    bound = e4m3_error_bound(x, w, per_channel)
    err = (y.double() - F.linear(x, w, b).double()).abs()
    assert (err <= bound + summation_slack(x, h)).all(), float((err - bound).max())


def test_fp8_linear_bf16_activations_and_leading_dims():
    gen = torch.Generator().manual_seed(7)
    w, x = torch.randn(40, 80, generator=gen), torch.randn(2, 5, 80, generator=gen).to(torch.bfloat16)
    h = fp8.Fp8Linear(w, None, use_scaled_mm=False)
    y = fp8.fp8_linear(x, h)
    assert y.shape == (2, 5, 40) and y.dtype == torch.bfloat16
    expected = fp8.fp8_linear_reference(x, h)
    # both round the same fp32 result to bf16: at most one bf16 step (2^-8 relative) apart
    assert ((y.float() - expected.float()).abs() <= 2.0**-7 * expected.float().abs() + 1e-6).all()


def test_zero_rows_give_bias_not_nan():
    h = fp8.Fp8Linear(torch.randn(24, 32), torch.arange(24.0), use_scaled_mm=False)
    y = fp8.fp8_linear(torch.zeros(3, 32), h)
    assert torch.equal(y, torch.arange(24.0).expand(3, 24))


_scaled_mm_on_cpu = True
try:
    torch._scaled_mm(
        torch.zeros(16, 16, dtype=E4M3),
        torch.zeros(16, 16, dtype=E4M3).t(),
        torch.ones(16, 1),
        torch.ones(1, 16),
    )
except (RuntimeError, NotImplementedError):
    _scaled_mm_on_cpu = False


@pytest.mark.skipif(not _scaled_mm_on_cpu, reason="this torch has no CPU torch._scaled_mm")
@pytest.mark.parametrize("m", [1, 37])
def test_scaled_mm_call_matches_reference(m):
    """The library path's arguments (W^T as a column-major view, [M, 1] / [1, N] scales, a
    bf16 bias and output) on the CPU implementation of the same contract."""
    gen = torch.Generator().manual_seed(m)
    w, b, x = (
        torch.randn(48, 64, generator=gen),
        torch.randn(48, generator=gen),
        torch.randn(m, 64, generator=gen),
    )
    h = fp8.Fp8Linear(w, b, use_scaled_mm=True)
    assert h.kernel == "torch._scaled_mm" and h.bias.dtype == torch.bfloat16
    y = fp8.fp8_linear(x, h)
    expected = fp8.fp8_linear_reference(x, h)  # its bias is the same bf16 values
    assert y.dtype == torch.float32
    # the bf16 output: one rounding, 2^-9 relative (2^-8 to leave room for the summation order)
    assert ((y - expected).abs() <= 2.0**-8 * expected.abs() + 1e-5).all()


def test_backend_prepares_and_runs_fp8(monkeypatch):
    from zeroserve.kernels import get_kernels
    from zeroserve.kernels.triton import backend

    ops = get_kernels("triton", "cpu", quantization="fp8")
    w, x = torch.randn(50, 96), torch.randn(9, 96)
    h = ops.prepare_linear(w, torch.ones(50))
    assert isinstance(h, fp8.Fp8Linear) and not h.use_scaled_mm
    assert torch.equal(ops.linear(x, h), fp8.fp8_linear(x, h))
    # a CPU outside the interpreter has no fp8 projection
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="compute capability 8.9"):
        ops.prepare_linear(w, None)


def test_gpu_below_sm89_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match=r"compute capability 8.9 or newer .*A100 is 8.0"):
        fp8.require_fp8_device(torch.device("cuda"))
    assert not fp8.scaled_mm_usable(torch.device("cuda"), 64, 64)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fp8.require_fp8_device(torch.device("cuda"))


# ----------------------------------------------------------------------------------- fp8 KV cache

BLOCK = 16


def fp8_paged_batch(query_lens, seq_lens, hq, hkv, d, q_dtype, seed):
    """q and an e4m3 paged cache written through the Triton kv_write (blocks shuffled)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-n // BLOCK) for n in seq_lens]
    physical = torch.randperm(sum(blocks) + 2, generator=gen).tolist()
    tables, i = [], 0
    for nb in blocks:
        tables.append(physical[i : i + nb])
        i += nb
    k_cache = torch.zeros(sum(blocks) + 2, BLOCK, hkv, d, dtype=E4M3)
    v_cache = torch.zeros_like(k_cache)
    slots = [t[p // BLOCK] * BLOCK + p % BLOCK for t, n in zip(tables, seq_lens) for p in range(n)]
    k = torch.randn(len(slots), hkv, d, generator=gen) * 2
    v = torch.randn(len(slots), hkv, d, generator=gen) * 2
    write_kv(k, v, k_cache, v_cache, torch.tensor(slots))
    q = torch.randn(sum(query_lens), hq, d, generator=gen).to(q_dtype)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, [-1] * sum(query_lens))
    return q, k_cache, v_cache, meta


def test_kv_write_fp8_rounds_saturates_and_skips_padding():
    gen = torch.Generator().manual_seed(11)
    k = torch.randn(9, 2, 40, generator=gen) * torch.tensor([1e-3, 1.0, 30.0, 600.0]).repeat(3)[:9].view(
        9, 1, 1
    )
    v = -k.flip(0)
    slots = torch.tensor([3, -1, 17, 0, 40, 41, -1, 63, 5])
    caches = [torch.zeros(4, BLOCK, 2, 40, dtype=E4M3) for _ in range(4)]
    write_kv(k, v, caches[0], caches[1], slots)
    ref.write_kv(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0].float(), caches[2].float()) and torch.equal(
        caches[1].float(), caches[3].float()
    )
    stored = caches[0].view(-1, 2, 40)[slots[slots >= 0]].float()
    kept = k[slots >= 0]
    clamped = kept.clamp(-448, 448)
    assert torch.isfinite(stored).all() and stored.abs().max() == 448  # 600-sized values saturate
    assert ((stored - clamped).abs() <= REL * clamped.abs() + SUB).all()
    untouched = torch.ones(4 * BLOCK, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert caches[0].view(-1, 2, 40)[untouched].float().abs().max() == 0


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_decode_over_fp8_cache(q_dtype):
    q, k_cache, v_cache, meta = fp8_paged_batch([1] * 4, [1, 15, 63, 130], 6, 2, 64, q_dtype, seed=12)
    expected = ref.paged_attention(q, k_cache, v_cache, meta, 0.125)
    for split_len in (64, 1024):  # split + reduce, and the direct write
        out = decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 130, 0.125, split_len=split_len
        )
        assert out.dtype == q_dtype
        # the same e4m3 values on both sides: only the summation order (and q's own dtype) differ
        tol = 2e-3 if q_dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_extend_over_fp8_cache(q_dtype):
    q, k_cache, v_cache, meta = fp8_paged_batch([5, 1, 17], [5, 15, 63], 4, 2, 64, q_dtype, seed=13)
    out = extend_attention(
        q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, meta.max_query_len, 0.125
    )
    expected = ref.paged_attention(q, k_cache, v_cache, meta, 0.125)
    tol = 2e-3 if q_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


def test_kv_cache_spec_and_allocation_in_e4m3():
    from zeroserve.gpu_worker.kv_cache import KVCacheSpec, allocate_kv_cache

    fp8_spec = KVCacheSpec(2, 2, 64, BLOCK, E4M3)
    assert fp8_spec.bytes_per_block * 2 == KVCacheSpec(2, 2, 64, BLOCK, torch.bfloat16).bytes_per_block
    caches = allocate_kv_cache(fp8_spec, 3, "cpu")
    assert len(caches) == 2 and caches[0].dtype == E4M3 and caches[0].shape == (2, 3, BLOCK, 2, 64)
    assert caches[0].float().abs().max() == 0  # zeroed: rows past a sequence's end read as 0, not NaN


def test_fp8_kv_cache_refused_on_cpu(tmp_path):
    import json

    from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
        "vocab_size": 256,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "eos_token_id": 1,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="kv_cache_dtype fp8 needs an NVIDIA GPU"):
        ModelRunner(
            RunnerConfig(
                model=str(tmp_path), load_format="dummy", device="cpu", num_kv_blocks=8, kv_cache_dtype="fp8"
            )
        )


# ----------------------------------------------------------------------------------- compilation


@pytest.mark.parametrize("arch", [90, 89])
def test_fp8_kernels_compile(arch, tmp_path):
    """Every e4m3 launch (quantize, GEMM tile configs, KV write/decode/extend) -> cubin, one
    process per target (as test_compile_targets does), without the interpreter."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "fp8.json"
    cmd = [sys.executable, "-m", "zeroserve.kernels.triton.compile_check", "--fp8", "--arch", str(arch)]
    proc = subprocess.run(cmd + ["--json", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    records = json.loads(out.read_text())
    compiled = {r["kernel"] for r in records if r["results"][str(arch)]["ok"]}
    assert {"_quantize_rows_kernel", "_fp8_matmul_kernel", "_write_kv_kernel"} <= compiled
    assert {"_decode_split_kernel", "_extend_kernel"} <= compiled
    assert all(r["results"][str(arch)]["ok"] for r in records)

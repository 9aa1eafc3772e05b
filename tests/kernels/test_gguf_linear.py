"""GGUF block kernels (kernels/cpu/gguf.py) against the reference: F.linear over the weight
dequantized by gguf.quants, in the serving build (AVX512-VNNI where the CPU has it) and the
-DZS_SCALAR one (the portable loops).

Tolerance of gguf_linear, derived from the quantization step: the kernel rounds each block of
32 activations to int8 with the step d_x = max|x_block| / 127, so x moves by at most d_x / 2
per element, and output (m, n) by at most sum_k |w_nk| * d_x(m, block of k) / 2; on top of
that only fp32 rounding (a relative 1e-5 of sum_k |w_nk x_mk|). A second, tighter check
quantizes the activations in torch exactly as the kernel does and leaves only the fp32 slack.
gguf_rows must equal gguf.quants.dequantize exactly.

Weights: random fp32 matrices quantized with gguf.quants.quantize (Q4_0, Q4_1, Q8_0); it has
no Q4_K quantizer, so Q4_K blocks are random bytes with finite fp16 scales (every such block is
valid); and real tensors of the packaged SmolLM2 GGUF (Q4_1 projections, the Q8_0 token_embd
that is also the tied lm_head).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zeroserve.kernels.cpu import build

if build._compiler() is None:
    pytest.skip("no C++ compiler here", allow_module_level=True)
from gguf import quants  # noqa: E402
from gguf.constants import GGMLQuantizationType as QT  # noqa: E402

from zeroserve.kernels.cpu import backend as cpu_backend  # noqa: E402
from zeroserve.kernels.cpu import gguf, ops  # noqa: E402
from zeroserve.kernels.quantized import GGUFWeight  # noqa: E402

TYPES = [QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.Q4_K]


@pytest.fixture(params=["native", "scalar"], scope="module")
def lib(request):
    if request.param == "scalar":
        lib = build.load(("-DZS_SCALAR",))
        assert not gguf.vnni_available(lib)
        assert "portable loops" in gguf.kernel_path(lib)
        return lib
    return build.load()


def make_weight(qtype: QT, n: int, k: int, seed: int) -> GGUFWeight:
    rng = np.random.default_rng(seed)
    if qtype == QT.Q4_K:  # 256-blocks: d, dmin (fp16), 12 bytes of 6-bit scales/mins, 128 of nibbles
        blocks = rng.integers(0, 256, size=(n, k // 256, 144), dtype=np.uint8)
        scales = rng.uniform(0.001, 0.02, size=(n, k // 256, 2)).astype(np.float16)
        blocks[:, :, :4] = scales.view(np.uint8).reshape(n, k // 256, 4)
        data = blocks.reshape(n, -1)
    else:
        data = quants.quantize(rng.standard_normal((n, k), dtype=np.float32), qtype)
    return GGUFWeight(torch.from_numpy(np.ascontiguousarray(data)), int(qtype), (n, k))


def quantize_like_kernel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the int8-rounded activations as fp32, the step d_x per block [M, K / 32])."""
    blocks = x.reshape(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.round(blocks * inv.unsqueeze(-1))  # half to even, as the kernels round
    return (q * d.unsqueeze(-1)).reshape(x.shape), d


def check_linear(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    want = F.linear(x, w, bias)
    xq, d = quantize_like_kernel(x)
    w_blocks = w.abs().reshape(w.shape[0], -1, 32).sum(-1)  # [N, K / 32]
    slack = 1e-5 * (x.abs() @ w.abs().T) + 1e-6  # fp32 rounding over the K / 32 block terms
    step = (d / 2) @ w_blocks.T  # [M, N]: sum_k |w_nk| * d_x / 2
    assert got.shape == want.shape
    err = (got - want).abs()
    assert bool((err <= step + slack).all()), f"max excess {(err - step - slack).max().item()}"
    # tighter: the same product with the kernel's int8 activations: only fp32 rounding left
    tight = (got - F.linear(xq, w, bias)).abs()
    assert bool((tight <= slack).all()), f"max excess {(tight - slack).max().item()}"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 3, 17, 64, 200])
def test_gguf_linear_matches_dequantized(lib, qtype, m):
    shapes = [(33, 256), (100, 768)] if qtype == QT.Q4_K else [(33, 32), (100, 96), (250, 576)]
    for i, (n, k) in enumerate(shapes):
        w = make_weight(qtype, n, k, seed=7 * m + i)
        gen = torch.Generator().manual_seed(m + i)
        bias = torch.randn(n, generator=gen) if i % 2 else None
        x = torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4
        x[:, :32] = 0.0  # an all-zero activation block (d_x = 0)
        h = gguf.GGUFLinear(w, bias, lib)
        check_linear(gguf.gguf_linear(x, h), x, w.dequantize(), bias)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_gguf_linear_strided_input_and_no_rows(lib, qtype):
    n, k = 40, 512
    w = make_weight(qtype, n, k, seed=1)
    h = gguf.GGUFLinear(w, None, lib)
    wide = torch.randn(5, k + 48)
    x = wide[:, 16 : 16 + k]  # a view: rows k + 48 floats apart
    check_linear(gguf.gguf_linear(x, h), x.contiguous(), w.dequantize(), None)
    assert gguf.gguf_linear(torch.empty(0, k), h).shape == (0, n)
    with pytest.raises(ValueError, match="input of shape"):
        gguf.gguf_linear(torch.randn(2, k - 32), h)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_packed_weight_keeps_the_file_size(qtype):
    n, k = 100, 512
    w = make_weight(qtype, n, k, seed=2)
    h = gguf.GGUFLinear(w, None)
    padded_rows_bytes = 112 * w.data.shape[1]  # 100 rows padded to 7 tiles of 16
    # Q4_K: +2.8% (its 6-bit scales and mins unpacked to a byte each); nothing fp32-sized
    assert h.nbytes <= padded_rows_bytes * 1.03
    assert h.out_features == n and h.in_features == k


@pytest.mark.parametrize("qtype", [*TYPES, QT.Q5_0], ids=lambda t: t.name)
def test_gguf_rows_exact(lib, qtype):
    n, k = 70, 512
    w = make_weight(qtype, n, k, seed=3)
    ids = torch.tensor([0, 69, 5, 5, 33, 1])
    got = gguf.gguf_rows(w, ids, lib)
    want = torch.from_numpy(quants.dequantize(w.data.numpy(), qtype)).reshape(n, k)[ids]
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert gguf.gguf_rows(w, torch.tensor([], dtype=torch.int64), lib).shape == (0, k)
    with pytest.raises(IndexError):
        gguf.gguf_rows(w, torch.tensor([70]), lib)


def test_gguf_linear_refuses_types_without_a_kernel():
    w = make_weight(QT.Q5_0, 16, 64, seed=4)
    assert w.ggml_type not in gguf.GGUF_KERNEL_TYPES
    with pytest.raises(ValueError, match="no GGUF kernel for Q5_0"):
        gguf.GGUFLinear(w, None)


def test_cpu_backend_serves_gguf_from_blocks_or_dequantized(monkeypatch, caplog):
    kernels = cpu_backend.CpuKernels("q4")
    x = torch.randn(3, 64)
    w = make_weight(QT.Q4_1, 20, 64, seed=5)
    h = kernels.prepare_linear(w, None)
    assert isinstance(h, gguf.GGUFLinear)
    check_linear(kernels.linear(x, h), x, w.dequantize(), None)

    monkeypatch.setattr(cpu_backend, "_dequantized_types", set())
    other = make_weight(QT.Q5_0, 20, 64, seed=6)
    with caplog.at_level(logging.INFO, logger=cpu_backend.__name__):
        h2 = kernels.prepare_linear(other, None)
        kernels.prepare_linear(other, None)
    assert isinstance(h2, ops.PackedLinear)  # the dequantized reference, on the fp32 kernel
    said = [r.getMessage() for r in caplog.records if "Q5_0" in r.getMessage()]
    assert len(said) == 1 and "dequantized" in said[0]
    torch.testing.assert_close(kernels.linear(x, h2), F.linear(x, other.dequantize()), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the packaged SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    from zeroserve.gpu_worker.loader.gguf_file import GGUFFile
    from zeroserve.shared.model_files import ModelNotFoundError, default_model_path

    try:
        f = GGUFFile(default_model_path())  # the packaged SmolLM2-135M-Instruct Q4_1 GGUF
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))

    def weight(name: str) -> GGUFWeight:
        info = f.tensors[name]
        n, k = info.ne[1], info.ne[0]
        return GGUFWeight(torch.from_numpy(np.array(f.raw(info))), info.ggml_type, (n, k))

    yield weight
    f.close()


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.3.ffn_down.weight", "blk.29.ffn_gate.weight"])
def test_smollm2_q4_1_projection(smollm2, lib, name):
    w = smollm2(name)
    assert w.type_name == "Q4_1"
    h = gguf.GGUFLinear(w, None, lib)
    for m in (1, 17):
        x = torch.randn(m, w.shape[1], generator=torch.Generator().manual_seed(m))
        check_linear(gguf.gguf_linear(x, h), x, w.dequantize(), None)


def test_smollm2_q8_0_embedding_and_lm_head(smollm2):
    w = smollm2("token_embd.weight")
    assert w.type_name == "Q8_0" and w.shape == (49152, 576)
    ids = torch.tensor([0, 1, 2, 49151, 9000, 1])
    assert torch.equal(gguf.gguf_rows(w, ids), w.dequantize(ids))
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(0))
    check_linear(gguf.gguf_linear(x, gguf.GGUFLinear(w, None)), x, w.dequantize(), None)

"""FP8 (e4m3) W8A8 projections for NVIDIA GPUs of compute capability 8.9+ (Ada, Hopper).

    h = Fp8Linear(weight, bias)       # once: W [N, K] -> e4m3 [N, K] + fp32 scale per output channel
    y = fp8_linear(x, h)              # every step: x [M, K] -> y [M, N] in x's dtype

A step quantizes the activations per token (row) at run time, then multiplies two e4m3
matrices with fp32 accumulation and applies both scales (and the bias) in the epilogue::

    x [M, K] --quantize_rows--> xq e4m3 [M, K], sx fp32 [M]    sx[m] = max_k |x[m, k]| / 448
    y[m, n] = sx[m] * sw[n] * sum_k xq[m, k] * wq[n, k]  (+ b[n])

The GEMM is ``torch._scaled_mm`` with row-wise scales (cuBLASLt / CUTLASS) where this torch
build runs it on this GPU (probed once per device) and N, K are multiples of 16 (its layout
rule); otherwise the Triton kernel below (an fp8 ``tl.dot`` with the dequantization in the
epilogue), which is also what the CPU interpreter runs in tests. ``_scaled_mm``'s contract
(torch 2.5 .. 2.13): mat1 [M, K] row-major, mat2 [K, N] column-major (W's transpose as a
view), scale_a fp32 [M, 1], scale_b fp32 [1, N], bias only with a 16-bit output. Row-wise
scaling is sure to support a bfloat16 output in every one of those versions (fp16 and fp32
came later), so that path computes in bf16 and casts to x's dtype if it differs.

e4m3 has 3 mantissa bits: rounding to nearest moves a normal value by at most 2^-4 of itself
(half of a step of 2^(e-3)), a subnormal one by at most 2^-10 of the scale (half of 2^-9).
Largest finite value 448; values are clamped to it (torch's cast saturates or gives NaN
depending on the version; the hardware cast used by Triton saturates).
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl

from zeroserve.kernels.base import LinearHandle
from zeroserve.kernels.triton._common import last_dim_contiguous, next_pow2

__all__ = [
    "E4M3_MAX",
    "FP8_DTYPE",
    "Fp8Linear",
    "fp8_linear",
    "fp8_linear_reference",
    "quantize_rows",
    "quantize_rows_reference",
    "require_fp8_device",
    "scaled_mm_usable",
]

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0
# a row (or weight channel) of zeros gets this absmax: a tiny scale, zeros out, never 0/0
MIN_ABSMAX = 1e-12
_E4M3_MAX = tl.constexpr(E4M3_MAX)
_MIN_ABSMAX = tl.constexpr(MIN_ABSMAX)
# fp32 ulp is 1 from 2^23 up: adding and subtracting 1.5 * 2^23 rounds |y| < 2^22 to an
# integer, ties to even (fp32 addition's own rounding)
_RINT_MAGIC = tl.constexpr(12582912.0)


# ----------------------------------------------------------------------------------- Triton


@triton.jit
def e4m3_round(x):
    """fp32 x (|x| <= 448) -> the nearest e4m3 value, ties to even, still in fp32.

    Cast after this, the value is exact in e4m3. On a GPU the hardware cast rounds the same
    way on its own; the CPU interpreter's cast drops the carry when rounding up crosses a power
    of two (31.5 -> 16 instead of 32, Triton 3.6), so its stores need the value on the grid.
    """
    bits = x.to(tl.int32, bitcast=True)
    exp = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # subnormals share 2^-6's step
    step = ((exp - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(exp-3): e4m3's spacing here
    inv_step = ((127 - exp + 3) << 23).to(tl.float32, bitcast=True)
    y = x * inv_step  # exact (a power of two); |y| <= 16
    y = (y + _RINT_MAGIC) - _RINT_MAGIC
    return y * step


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    K,
    stride_xm,
    stride_qm,
    BLOCK_K: tl.constexpr,
):
    """One program per row: absmax over the row, then the scaled, rounded e4m3 values."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    amax = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    absmax = tl.maximum(tl.max(amax, 0), _MIN_ABSMAX)
    # correctly rounded divisions (a GPU's "/" is approximate): the torch reference matches bit for bit
    inv_scale = tl.div_rn(_E4M3_MAX, absmax)
    tl.store(scale_ptr + row, tl.div_rn(absmax, _E4M3_MAX))
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x * inv_scale, -_E4M3_MAX), _E4M3_MAX)
        tl.store(q_row + k, e4m3_round(q).to(q_ptr.dtype.element_ty), mask=k < K)


@triton.jit
def _fp8_matmul_kernel(
    a_ptr,
    b_ptr,
    a_scale_ptr,
    b_scale_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_bn,
    stride_cm,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C [M, N] = (A [M, K] @ B [N, K]^T) * a_scale[m] * b_scale[n] (+ bias[n]); A, B e4m3.

    Programs run in groups of GROUP_M row blocks per column block, so a group's column block
    of B (the weight) is read from HBM once and then from L2.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = pid // per_group * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :]
    b_ptrs = b_ptr + rn[:, None].to(tl.int64) * stride_bn + rk[None, :]  # (BLOCK_N, BLOCK_K): K-major
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = rk < K - k0
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)  # e4m3 x e4m3 -> fp32 (products are exact in fp32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    a_scale = tl.load(a_scale_ptr + rm, mask=m_mask, other=0.0)
    b_scale = tl.load(b_scale_ptr + rn, mask=n_mask, other=0.0)
    out = acc * a_scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (any float dtype) -> (e4m3 [M, K], fp32 scale [M, 1]), x ~= q * scale."""
    x = last_dim_contiguous(x)
    m, k = x.shape
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    block_k = min(next_pow2(k), 2048)
    _quantize_rows_kernel[(m,)](
        x, q, scale, k, x.stride(0), q.stride(0), BLOCK_K=block_k, num_warps=4 if block_k >= 1024 else 2
    )
    return q, scale


def gemm_config(m: int, n: int) -> dict:
    """Tile sizes by the batch: decode-sized M gets short, narrow tiles (more programs over
    the weight, which is the whole cost); prefill-sized M the tensor-core tile 128 x 128.
    BLOCK_K 128 is 128 bytes of e4m3 per row; 3 stages of 128 x 128 tiles use 96 KiB of
    shared memory (sm_89 has 99)."""
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32 if n <= 4096 else 64, BLOCK_K=128, num_warps=4, num_stages=4)
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)


def fp8_matmul(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The Triton GEMM: a e4m3 [M, K], a_scale fp32 [M] or [M, 1], b e4m3 [N, K], b_scale fp32 [N]."""
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    assert a.stride(1) == 1 and b.stride(1) == 1, "fp8 operands need a contiguous K"
    cfg = gemm_config(m, n)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _fp8_matmul_kernel[grid](
        a,
        b,
        a_scale,
        b_scale,
        bias if bias is not None else b_scale,  # unread placeholder
        c,
        m,
        n,
        k,
        a.stride(0),
        b.stride(0),
        c.stride(0),
        HAS_BIAS=bias is not None,
        GROUP_M=8,
        **cfg,
    )
    return c


# ----------------------------------------------------------------------------------- device checks


def fp8_device_problem(device: torch.device) -> str | None:
    """Why fp8 projections cannot run on ``device`` (None: they can)."""
    if device.type != "cuda":
        return f"fp8 projections need an NVIDIA GPU of compute capability 8.9 or newer, not {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return (
            f"--quantization fp8 needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper); "
            f"{name} is {major}.{minor}: use --quantization none"
        )
    return None


def require_fp8_device(device: torch.device) -> None:
    problem = fp8_device_problem(device)
    if problem is not None:
        raise ValueError(problem)


@functools.cache
def _scaled_mm_rowwise_works(device: torch.device) -> bool:
    """One tiny row-wise ``_scaled_mm`` against its definition: some builds lack the kernel
    for some GPUs ("Rowwise scaling is not currently supported on your device")."""
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(16, 32, generator=gen).to(FP8_DTYPE).to(device)
        b = torch.randn(16, 32, generator=gen).to(FP8_DTYPE).to(device)
        sa = torch.full((16, 1), 0.5, device=device)
        sb = torch.full((1, 16), 0.25, device=device)
        out = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        expected = (a.float() @ b.float().t()) * 0.125
        ok = bool(torch.allclose(out.float(), expected, rtol=2**-7, atol=1e-3))
        if not ok:
            log.warning(
                "torch._scaled_mm gave wrong row-wise results on %s: fp8 uses the Triton GEMM", device
            )
        return ok
    except (RuntimeError, AttributeError, TypeError) as exc:
        log.warning(
            "torch._scaled_mm (row-wise) unavailable on %s, fp8 uses the Triton GEMM: %s", device, exc
        )
        return False


def scaled_mm_usable(device: torch.device, out_features: int, in_features: int) -> bool:
    """``torch._scaled_mm`` for this weight: a CUDA device of 8.9+, where the probe passed,
    and N, K multiples of 16 (cuBLASLt's rule for fp8)."""
    if device.type != "cuda" or fp8_device_problem(device) is not None:
        return False
    if out_features % 16 or in_features % 16:
        return False
    # the probe runs at prepare time, i.e. a layer's first (eager) forward, never in a capture
    return _scaled_mm_rowwise_works(device)


# ----------------------------------------------------------------------------------- the handle


def _quantize_weight(weight: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (e4m3 [N, K], fp32 scale [N]); a few thousand rows at a time, so the fp32
    working copy of a large weight (an lm_head) stays small."""
    n, k = weight.shape
    if per_channel:
        absmax = torch.cat([rows.float().abs().amax(dim=1) for rows in weight.detach().split(4096)])
    else:
        absmax = weight.detach().abs().amax().float().expand(n)
    absmax = absmax.clamp(min=MIN_ABSMAX).contiguous()
    q = torch.empty((n, k), dtype=FP8_DTYPE, device=weight.device)
    for start in range(0, n, 4096):
        rows = weight.detach()[start : start + 4096].float()
        inv = E4M3_MAX / absmax[start : start + 4096, None]
        q[start : start + 4096] = (rows * inv).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return q, absmax / E4M3_MAX


class Fp8Linear(LinearHandle):
    """W as e4m3 [N, K] with an fp32 scale per output channel (``per_channel=False``: one
    for the whole matrix, kept as N equal entries), and the bias. No copy of W at full width.

    ``use_scaled_mm``: None decides by the device (see scaled_mm_usable); True/False force the
    library or the Triton GEMM (tests run ``_scaled_mm``'s call on the CPU this way).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        per_channel: bool = True,
        use_scaled_mm: bool | None = None,
    ):
        self.out_features, self.in_features = weight.shape
        self.per_channel = per_channel
        self.weight, self.weight_scale = _quantize_weight(weight, per_channel)  # [N, K], [N]
        if use_scaled_mm is None:
            use_scaled_mm = scaled_mm_usable(weight.device, self.out_features, self.in_features)
        self.use_scaled_mm = use_scaled_mm
        # _scaled_mm adds a bias of its output dtype (bf16 here); the Triton epilogue adds any
        self.bias = (
            None if bias is None else bias.detach().to(torch.bfloat16 if use_scaled_mm else bias.dtype)
        )

    @property
    def kernel(self) -> str:
        return "torch._scaled_mm" if self.use_scaled_mm else "triton"


def fp8_linear(x: torch.Tensor, h: Fp8Linear) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype: per-token e4m3 activations times h's e4m3 weight."""
    lead, k = x.shape[:-1], x.shape[-1]
    xq, x_scale = quantize_rows(x.reshape(-1, k))
    if h.use_scaled_mm:
        y = torch._scaled_mm(
            xq,
            h.weight.t(),
            scale_a=x_scale,
            scale_b=h.weight_scale.view(1, -1),
            bias=h.bias,
            out_dtype=torch.bfloat16,
        )
        y = y.to(x.dtype)
    else:
        y = fp8_matmul(xq, x_scale, h.weight, h.weight_scale, h.bias, x.dtype)
    return y.view(*lead, h.out_features)


# ----------------------------------------------------------------------------------- torch reference


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows in torch, the same arithmetic (bit-exact with the kernel)."""
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_ABSMAX)
    # tensor / tensor: torch turns a scalar numerator (448 / t) into 448 * (1 / t), off by an ulp
    e4m3_max = torch.full_like(absmax, E4M3_MAX)
    q = (xf * (e4m3_max / absmax)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return q, absmax / e4m3_max


def fp8_linear_reference(x: torch.Tensor, h: Fp8Linear) -> torch.Tensor:
    """fp8_linear in fp32 torch: the same quantized values, dequantized and multiplied."""
    xq, x_scale = quantize_rows_reference(x.reshape(-1, x.shape[-1]))
    y = (xq.float() @ h.weight.float().t()) * x_scale * h.weight_scale
    if h.bias is not None:
        y = y + h.bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], h.out_features)

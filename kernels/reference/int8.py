"""int8 W8A8 projections through the library kernel (``torch._int_mm``): the reference.

    W [N, K] fp32  ->  Wq [N, K] int8, w_scale [N]       per output channel, symmetric:
                       w_scale = absmax(W[n]) / 127, Wq = round(W / w_scale)   (prepare time)
    x [M, K] fp32  ->  per token, at run time: its two largest |x_k| (channels i1, i2) kept
                       in fp32, the rest xq [M, K] int8 with x_scale [M], symmetric
    y [M, N]       =   (xq @ Wq^T  in int32) * (x_scale x w_scale)
                       + (x_i1 Wq[:, i1] + x_i2 Wq[:, i2]) * w_scale + bias

The two kept channels: SmolLM2's MLP inputs have tokens whose energy sits in one or two
channels; quantized with them, the token's other channels all round to 0. Perplexity against
fp32 (benchmarks/bench_quality.py, SmolLM2-135M, every projection int8): +14% (1024 tokens of
the text) without them; +2.3% (all of it) with two kept, one +6.8% (1024 tokens).

The rounding steps are written out (``* (1 / 127)``, ``127 / absmax``, round half to even,
then a multiply and a separate add) so that the C++ kernel (kernels/cpu/int8.py), which
takes the same quantized weights, reproduces them bit for bit: the two then differ only if
their int32 sums differ, which the tests check they never do.
"""

from __future__ import annotations

import torch

from zeroserve.kernels.base import LinearHandle

__all__ = ["Int8Linear", "int8_linear", "quantize_rows", "quantize_tokens"]

QMAX = 127  # symmetric: -128 is never used, so |q| <= 127 and negating a value stays in range
_INV_QMAX = torch.tensor(1.0 / QMAX, dtype=torch.float32).item()  # the fp32 constant C++ uses


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t [R, K] fp32 -> (int8 [R, K], fp32 scale [R]) with t ~= q * scale row by row.

    scale = absmax * (1/127) and q = round_half_even(t * (127 / absmax)); a row of zeros gets
    scale 0 and q 0 (its products are then exactly 0, whatever the other operand)."""
    absmax = t.abs().amax(dim=1)
    nonzero = absmax > 0
    inv = torch.where(nonzero, torch.full_like(absmax, QMAX) / torch.where(nonzero, absmax, 1.0), 0.0)
    q = torch.round(t * inv[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, absmax * _INV_QMAX


def quantize_tokens(x: torch.Tensor):
    """x [M, K] fp32 -> (xq int8 [M, K], x_scale [M], kept [M, 2] int64, kept values [M, 2]).

    Kept: the first index of the largest |x_k|, then the first of the largest of the others
    (argmax takes the first on ties); with K = 1 the second is channel 0 with value 0. They
    are 0 in xq, and x_scale comes from the rest."""
    a = x.abs()
    i1 = a.argmax(1, keepdim=True)
    if x.shape[1] > 1:
        i2 = a.scatter(1, i1, -1.0).argmax(1, keepdim=True)
    else:
        i2 = torch.zeros_like(i1)
    kept = torch.cat([i1, i2], dim=1)
    values = x.gather(1, kept)
    if x.shape[1] == 1:
        values[:, 1] = 0.0
    xq, x_scale = quantize_rows(x.scatter(1, kept, 0.0))
    return xq, x_scale, kept, values


class Int8Linear(LinearHandle):
    """A projection's weight as int8 ``qweight [N, K]`` with fp32 ``scale [N]`` (no fp32 copy)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        if weight.dim() != 2 or not weight.dtype.is_floating_point:
            raise ValueError(
                f"Int8Linear takes a float [N, K] weight, not {weight.dtype} {tuple(weight.shape)}"
            )
        self.out_features, self.in_features = weight.shape
        self.qweight, self.scale = quantize_rows(weight.detach().to(torch.float32))
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()


def int8_linear(x: torch.Tensor, h: Int8Linear) -> torch.Tensor:
    """x [..., K] fp32 -> [..., N] fp32: x quantized per token, int32 products, scaled back."""
    if x.shape[-1] != h.in_features:
        raise ValueError(
            f"int8 linear: input of shape {tuple(x.shape)} for a [{h.out_features}, {h.in_features}] weight"
        )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, h.in_features).to(torch.float32)
    if x2.shape[0] == 0:
        return x2.new_empty((*lead, h.out_features))
    xq, x_scale, kept, values = quantize_tokens(x2)
    # the [N, K] weight viewed as [K, N]: measured here, _int_mm is fast on this view and slow
    # on a contiguous [K, N] copy. With K = 1 that view has strides (1, 1), which _int_mm
    # (torch 2.13, CPU) misreads: returns garbage; [1, N] written as such is read right.
    w_t = h.qweight.t() if h.in_features > 1 else h.qweight.view(1, h.out_features)
    acc = torch._int_mm(xq, w_t)
    y = acc.to(torch.float32) * (x_scale[:, None] * h.scale[None, :])
    w1, w2 = (h.qweight[:, kept[:, i]].T.to(torch.float32) for i in (0, 1))  # [M, N] each
    y = y + (values[:, :1] * w1 + values[:, 1:] * w2) * h.scale[None, :]
    if h.bias is not None:
        y = y + h.bias
    return y.reshape(*lead, h.out_features)

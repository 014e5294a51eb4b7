"""Reference INT8 quantizers and linear layers, computed in float64 where it matters.

Conventions shared with the kernels:
  * weights: per output channel, symmetric, scale = amax / 127, codes in [-127, 127];
  * activations (W8A8): per token (row), symmetric, scale = amax / 127 and
    q = round_half_even(x * (127 / amax)) in fp32, so the kernels' codes match
    bit for bit; a row with NaN/Inf gets scale NaN and zero codes, an all-zero
    row gets scale 0.
Divisions are tensor / tensor on purpose: torch may evaluate `127.0 / t` as
`t.reciprocal() * 127` (and `t / 127.0` as `t * (1/127)` on CUDA), which is not
the correctly rounded quotient the kernels compute.
"""
from __future__ import annotations

import torch


def _symmetric_codes(x32: torch.Tensor, amax: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """round_half_even((x * pre) * (127 / (amax * pre))) per row, 0 where not ok.

    pre = 2^64 for rows with amax < 2^-64 (else 1) keeps 127 / amax finite for
    tiny rows; it is an exact power of two (lowbit/int8_format.h, per_token_prescale).
    """
    pre = torch.where(amax < 2.0**-64, torch.full_like(amax, 2.0**64), torch.ones_like(amax))
    inv = torch.where(ok & (amax > 0), torch.full_like(amax, 127.0) / (amax * pre), torch.zeros_like(amax))
    q = torch.round(torch.nan_to_num(x32) * pre[..., None] * inv[..., None])
    return q.clamp_(-127, 127).to(torch.int8)


def quantize_weight_per_channel(w: torch.Tensor) -> tuple:
    """w [N, K] float -> (qweight int8 [N, K], scale fp32 [N])."""
    w32 = w.detach().to(torch.float32)
    amax = w32.abs().amax(dim=1)
    scale = amax / torch.full_like(amax, 127.0)
    return _symmetric_codes(w32, amax, torch.ones_like(amax, dtype=torch.bool)), scale


def quantize_per_token(x: torch.Tensor) -> tuple:
    """x [..., K] float -> (q int8 [..., K], scale fp32 [...])."""
    x32 = x.to(torch.float32)
    finite = torch.isfinite(x32).all(dim=-1)
    amax = x32.abs().amax(dim=-1)
    q = _symmetric_codes(x32, amax, finite)
    scale = torch.where(finite, amax / torch.full_like(amax, 127.0), torch.full_like(amax, float("nan")))
    return q, scale


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return qweight.to(torch.float64) * scale.to(torch.float64)[:, None]


def linear_w8a16(x, qweight, scale, bias=None) -> torch.Tensor:
    """y = x . dequant(W)^T + bias, in float64, returned in x's dtype."""
    y = x.to(torch.float64) @ dequantize_weight(qweight, scale).T
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype)


def linear_w8a8(x, qweight, scale, bias=None) -> torch.Tensor:
    """Per-token int8 activations times int8 weights, exact integer sums, float64 epilogue."""
    qx, sx = quantize_per_token(x)
    acc = qx.to(torch.float64) @ qweight.to(torch.float64).T  # exact: |sum| < 2^53
    y = acc * sx.to(torch.float64)[..., None] * scale.to(torch.float64)
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype)

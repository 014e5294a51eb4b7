"""Reference INT4 group-wise weight quantizer and dequantizer (canonical form of lowbit/formats/int4.py).

    symmetric  (GGUF Q4_0):  w = d * (q - 8)
    asymmetric (GGUF Q4_1):  w = d * q + m           q in [0, 15], one (d[, m]) per group of g along K

Rounding, exactly (all arithmetic in fp32, each operation correctly rounded, no FMA), per group
of g values x (the weight, converted to fp32 exactly):

  symmetric:   mx = the x with the largest |x| (the first one on ties), d = mx / -8,
               id = 1 / d (0 where d == 0),  q = clamp(floor(x * id + 8.5), 0, 15).
  asymmetric:  mx = max(x), mn = min(x), d = (mx - mn) / 15, m = mn,
               id = 1 / d (0 where d == 0),  q = clamp(floor((x - m) * id + 0.5), 0, 15).

This is llama.cpp's reference Q4_0 / Q4_1 quantizer (quantize_row_q4_0_ref / _q4_1_ref and
gguf-py's gguf.quants): round half up of x * (1/d), so to_gguf_q4_0/q4_1 of the result equals
what llama.cpp writes (whose only extra step is storing d and m as fp16). Note the symmetric
scheme maps the value of largest magnitude to q = 0 exactly, so its range is [-8d, 7d] in
the direction of -mx: values near -mx clamp at q = 15 (error up to |d|); every other value is
within |d|/2 (+ fp32 rounding) of its dequantized value. Asymmetric errors are within d/2.

clip_search=True additionally tries the shrunken ranges mx*r (and mn*r) for CLIP_RATIOS
r = 1.0, ..., 0.8 (20 values, 1.0 first) and keeps, per group, the r whose dequantized group
(computed as dequantize_int4 does) has the smallest squared error, the first one on ties: never
worse than clip_search=False, which is exactly the r = 1.0 candidate.
"""
from __future__ import annotations

import torch

from ..formats.int4 import check_canonical, check_group_size

CLIP_RATIOS = tuple(1.0 - 0.2 * i / 19 for i in range(20))


def _fp32(v: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, v, dtype=torch.float32)


def _candidate(blocks: torch.Tensor, mx: torch.Tensor, mn, symmetric: bool, r: float):
    """Codes, d, m (None for symmetric) of one candidate range ratio r; blocks fp32 [N, G, g]."""
    if symmetric:
        mxr = mx * _fp32(r, mx) if r != 1.0 else mx
        d = mxr / _fp32(-8.0, mxr)
        m = None
        y = blocks
        bias = 8.5
    else:
        mxr = mx * _fp32(r, mx) if r != 1.0 else mx
        mnr = mn * _fp32(r, mn) if r != 1.0 else mn
        d = (mxr - mnr) / _fp32(15.0, mxr)
        m = mnr
        y = blocks - m
        bias = 0.5
    inv = torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / d)
    q = torch.floor(y * inv + _fp32(bias, y)).clamp_(0, 15).to(torch.uint8)
    return q, d, m


def _dequant_blocks(q: torch.Tensor, d: torch.Tensor, m) -> torch.Tensor:
    qf = q.to(torch.float32)
    if m is None:
        return d * (qf - 8.0)
    return d * qf + m


def quantize_weight_int4(w: torch.Tensor, group_size: int, symmetric: bool, clip_search: bool = False) -> dict:
    """w [N, K] float -> dict(codes uint8 [N, K], scales fp32 [N, K/g], mins fp32 [N, K/g] or None).

    Round-to-nearest min/max quantizer per group of ``group_size`` consecutive k; see the
    module docstring for the exact rounding. NaN/Inf weights -> ValueError.
    """
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        got = f"{w.dtype} tensor of shape {tuple(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise TypeError(f"w: expected a 2-D floating tensor [N, K], got {got}")
    n, k = w.shape
    if n == 0 or k == 0:
        raise ValueError(f"w: empty weight of shape {tuple(w.shape)}")
    check_group_size(k, group_size)
    w32 = w.detach().to(device="cpu", dtype=torch.float32)
    if not bool(torch.isfinite(w32).all()):
        raise ValueError("w: weight contains NaN or Inf")
    g = group_size
    blocks = w32.reshape(n, k // g, g)
    if symmetric:
        imax = blocks.abs().argmax(dim=-1, keepdim=True)
        mx, mn = torch.gather(blocks, -1, imax), None
    else:
        mx, mn = blocks.amax(dim=-1, keepdim=True), blocks.amin(dim=-1, keepdim=True)

    q, d, m = _candidate(blocks, mx, mn, symmetric, 1.0)
    if clip_search:
        best = ((_dequant_blocks(q, d, m).double() - blocks.double()) ** 2).sum(-1, keepdim=True)
        for r in CLIP_RATIOS[1:]:
            q2, d2, m2 = _candidate(blocks, mx, mn, symmetric, r)
            err = ((_dequant_blocks(q2, d2, m2).double() - blocks.double()) ** 2).sum(-1, keepdim=True)
            better = err < best
            best = torch.where(better, err, best)
            q = torch.where(better, q2, q)
            d = torch.where(better, d2, d)
            if m is not None:
                m = torch.where(better, m2, m)
    return {
        "codes": q.reshape(n, k).contiguous(),
        "scales": d.reshape(n, k // g).contiguous(),
        "mins": None if m is None else m.reshape(n, k // g).contiguous(),
    }


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, mins=None) -> torch.Tensor:
    """Canonical INT4 -> fp32 [N, K]: d * (q - 8) (mins None) or d * q + m, in fp32.

    Each product and sum is one correctly rounded fp32 operation (no FMA), the same
    arithmetic as ggml's dequantize_row_q4_0 / _q4_1, so the result is bit-exact with them.
    """
    g = check_canonical(codes, scales, mins)
    n, k = codes.shape
    qf = codes.to(torch.float32).reshape(n, k // g, g)
    d = scales.to(torch.float32).reshape(n, k // g, 1)
    m = None if mins is None else mins.to(torch.float32).reshape(n, k // g, 1)
    return _dequant_blocks(qf, d, m).reshape(n, k)


# ---------------------------------------------------------------- linear layers
Q8_BLOCK = 32


def quantize_activations_q8(x: torch.Tensor) -> tuple:
    """W4A8's activation quantization: x [..., K] -> (codes int8 [..., K], scales fp32 [..., ceil(K/32)]).

    Per block of 32 consecutive k (the last block may be shorter), exactly lowbit.ref.int8's
    per-token rule applied to each block: scale = amax / 127, q = round_half_even(x * (127 / amax))
    in fp32; a block holding NaN/Inf gets scale NaN and zero codes, an all-zero block scale 0.
    """
    from .int8 import quantize_per_token

    k = x.shape[-1]
    nb = (k + Q8_BLOCK - 1) // Q8_BLOCK
    xp = torch.zeros((*x.shape[:-1], nb * Q8_BLOCK), dtype=torch.float32)
    xp[..., :k] = x.to(torch.float32)
    q, s = quantize_per_token(xp.reshape(*x.shape[:-1], nb, Q8_BLOCK))
    return q.reshape(*x.shape[:-1], nb * Q8_BLOCK)[..., :k].contiguous(), s


def dequantize_activations_q8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The inverse of quantize_activations_q8, in float64."""
    k = codes.shape[-1]
    s = scales.to(torch.float64).repeat_interleave(Q8_BLOCK, dim=-1)[..., :k]
    return codes.to(torch.float64) * s


def _dequant64(codes, scales, mins) -> torch.Tensor:
    g = check_canonical(codes, scales, mins)
    n, k = codes.shape
    q = codes.to(torch.float64).reshape(n, k // g, g)
    d = scales.to(torch.float64).reshape(n, k // g, 1)
    w = d * (q - 8.0) if mins is None else d * q + mins.to(torch.float64).reshape(n, k // g, 1)
    return w.reshape(n, k)


def linear_w4a16(x, codes, scales, mins=None, bias=None) -> torch.Tensor:
    """y = x . W^T + bias with W the canonical INT4 weight, in float64, returned in x's dtype."""
    y = x.to(torch.float64) @ _dequant64(codes, scales, mins).T
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype)


def linear_w4a8(x, codes, scales, mins=None, bias=None) -> torch.Tensor:
    """y = xq . W^T + bias with xq = x quantized per block of 32 (quantize_activations_q8), float64."""
    xq = dequantize_activations_q8(*quantize_activations_q8(x))
    y = xq @ _dequant64(codes, scales, mins).T
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype)

"""Pure-torch references of lowbit.ops.fused (float64 arithmetic, result in the input dtype)."""
from __future__ import annotations

import torch


def rms_norm(x, weight, eps, residual=None):
    s = x.double() if residual is None else x.double() + residual.double()
    out = (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * weight.double()).to(x.dtype)
    return out if residual is None else (out, s.to(x.dtype))


def silu_and_mul(x):
    gate, up = x.double().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


def rope(x, cos, sin, neox: bool):
    """x [T, H, D] rotated (a new tensor): NeoX pairs (i, i + R) or adjacent pairs (2i, 2i + 1)."""
    r = cos.shape[-1]
    c, s = cos.double()[:, None, :], sin.double()[:, None, :]
    out = x.double().clone()
    if neox:
        a, b = out[..., :r].clone(), out[..., r: 2 * r].clone()
        out[..., :r], out[..., r: 2 * r] = a * c - b * s, a * s + b * c
    else:
        a, b = out[..., 0: 2 * r: 2].clone(), out[..., 1: 2 * r: 2].clone()
        out[..., 0: 2 * r: 2], out[..., 1: 2 * r: 2] = a * c - b * s, a * s + b * c
    return out.to(x.dtype)

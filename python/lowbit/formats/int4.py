"""INT4 group-wise weight layouts.

Canonical form (one code per byte; what the converters in gguf.py / gptq.py produce
and what the reference in lowbit/ref/int4.py computes with)::

    codes   uint8 [N, K]      codes in [0, 15]
    scales  fp32  [N, K/g]    d, one per group of g consecutive k
    mins    fp32  [N, K/g]    m, asymmetric only (None for symmetric)

    symmetric  (GGUF Q4_0 semantics):  w[n, k] = d[n, k//g] * (q[n, k] - 8)
    asymmetric (GGUF Q4_1 semantics):  w[n, k] = d[n, k//g] * q[n, k] + m[n, k//g]

The group size g is one of GROUP_SIZES (32, 64, 128) or g = K (one group per
output channel), and it must divide K.

Nibble-packed form (two codes per byte, along K)::

    packed  uint8 [N, K/2]    packed[n, j] = q[n, 2j] | (q[n, 2j + 1] << 4)

i.e. element 2j in the low nibble and element 2j+1 in the high nibble. Note that
GGUF blocks use a different nibble order (see gguf.py); this one is lowbit's own.
"""
from __future__ import annotations

import torch

GROUP_SIZES = (32, 64, 128)


def check_group_size(k: int, group_size: int, name: str = "group_size") -> None:
    """ValueError unless group_size is in GROUP_SIZES or equals K, and divides K."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"{name}: expected a positive int, got {group_size!r}")
    if group_size not in GROUP_SIZES and group_size != k:
        raise ValueError(f"{name}: must be one of {GROUP_SIZES} or K (= {k}), got {group_size}")
    if k % group_size != 0:
        raise ValueError(f"{name}: {group_size} does not divide K = {k}")


def check_codes(codes: torch.Tensor, name: str = "codes") -> None:
    """TypeError unless a 2-D torch.uint8 tensor; ValueError on codes > 15 or an empty tensor."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.dim() != 2:
        got = (f"{codes.dtype} tensor of shape {tuple(codes.shape)}" if isinstance(codes, torch.Tensor)
               else type(codes).__name__)
        raise TypeError(f"{name}: expected a 2-D torch.uint8 tensor [N, K], got {got}")
    if codes.numel() == 0:
        raise ValueError(f"{name}: empty tensor of shape {tuple(codes.shape)}")
    if bool((codes > 15).any()):
        raise ValueError(f"{name}: INT4 codes must lie in [0, 15]; found {int(codes.max())}")


def check_canonical(codes: torch.Tensor, scales: torch.Tensor, mins=None, *, group_size=None) -> int:
    """Validate a canonical (codes, scales[, mins]) triple; returns the group size."""
    check_codes(codes)
    n, k = codes.shape
    for name, t in (("scales", scales), ("mins", mins)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
            got = (f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor)
                   else type(t).__name__)
            raise TypeError(f"{name}: expected a 2-D floating tensor [N, K/g], got {got}")
        if t.shape[0] != n or t.shape[1] == 0 or k % t.shape[1] != 0:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not fit codes of shape {(n, k)} "
                             "(expected [N, K/g] with g dividing K)")
    if mins is not None and mins.shape != scales.shape:
        raise ValueError(f"mins: shape {tuple(mins.shape)} differs from scales {tuple(scales.shape)}")
    g = k // scales.shape[1]
    if group_size is not None and g != group_size:
        raise ValueError(f"scales: shape {tuple(scales.shape)} implies group size {g}, expected {group_size}")
    return g


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in [0, 15] -> uint8 [N, K/2]; element 2j low nibble, 2j+1 high nibble."""
    check_codes(codes)
    n, k = codes.shape
    if k % 2 != 0:
        raise ValueError(f"codes: K = {k} must be even to pack two codes per byte")
    pairs = codes.reshape(n, k // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 codes [N, K] (inverse of pack_nibbles)."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        got = (f"{packed.dtype} tensor of shape {tuple(packed.shape)}" if isinstance(packed, torch.Tensor)
               else type(packed).__name__)
        raise TypeError(f"packed: expected a 2-D torch.uint8 tensor [N, K/2], got {got}")
    n, kh = packed.shape
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(n, 2 * kh).contiguous()

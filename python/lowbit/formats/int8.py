"""INT8 weight layouts (the same as csrc/include/lowbit/int8_format.h).

Canonical form, held by state_dicts and used by the CUDA kernels::

    qweight  int8  [N, K]  codes in [-127, 127]   w[n, k] = scale[n] * qweight[n, k]
    scale    fp32  [N]

CPU packed form: panels of 16 output rows; inside a panel K goes by quads of 4,
and one quad of one panel is 64 contiguous bytes, byte ``4*i + j`` holding
``qweight[16*p + i, 4*q + j]``. After its K quads each panel carries one more
quad: the 16 row sums ``qweight[n, :].sum()`` as little-endian int32 (the VNNI
kernel needs them to undo its u8 activation offset)::

    packed   int8  [ceil(N/16), ceil(K/4) + 1, 16, 4]

Rows past N and columns past K are zero. Packing is lossless: unpack_cpu(pack_cpu(q), N, K) == q.
"""
from __future__ import annotations

import torch

PANEL_ROWS = 16
QUAD = 4


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def packed_cpu_shape(n: int, k: int) -> tuple:
    return (_round_up(n, PANEL_ROWS) // PANEL_ROWS, _round_up(k, QUAD) // QUAD + 1, PANEL_ROWS, QUAD)


def check_codes(qweight: torch.Tensor, name: str = "qweight") -> None:
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int8 or qweight.dim() != 2:
        got = f"{qweight.dtype} tensor of shape {tuple(qweight.shape)}" if isinstance(qweight, torch.Tensor) else type(qweight).__name__
        raise TypeError(f"{name}: expected a 2-D torch.int8 tensor [N, K], got {got}")
    if qweight.numel() == 0:
        raise ValueError(f"{name}: empty weight of shape {tuple(qweight.shape)}")
    if bool((qweight == -128).any()):
        raise ValueError(f"{name}: INT8 codes must lie in [-127, 127] (symmetric); found -128")


def pack_cpu(qweight: torch.Tensor) -> torch.Tensor:
    """Canonical [N, K] int8 codes -> the CPU panel layout (see module docstring)."""
    check_codes(qweight)
    n, k = qweight.shape
    np_, kp = _round_up(n, PANEL_ROWS), _round_up(k, QUAD)
    q = torch.zeros(np_, kp, dtype=torch.int8, device=qweight.device)
    q[:n, :k] = qweight
    panels = q.view(np_ // PANEL_ROWS, PANEL_ROWS, kp // QUAD, QUAD).permute(0, 2, 1, 3)
    rowsum = q.sum(dim=1, dtype=torch.int32).view(np_ // PANEL_ROWS, 1, PANEL_ROWS)
    rowsum_bytes = rowsum.contiguous().view(torch.int8).view(np_ // PANEL_ROWS, 1, PANEL_ROWS, QUAD)
    return torch.cat([panels, rowsum_bytes], dim=1).contiguous()


def unpack_cpu(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The CPU panel layout -> canonical [N, K] int8 codes."""
    p, q1, rows, quad = packed.shape
    body = packed[:, : q1 - 1].permute(0, 2, 1, 3).reshape(p * rows, (q1 - 1) * quad)
    return body[:n, :k].contiguous()

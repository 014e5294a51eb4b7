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

CPU packed form (the kernels' layout; csrc/include/lowbit/int4_format.h is the same text in C++):
panels of 16 output rows; inside a panel K goes by octets of 8, and one octet of one panel is
one 64-byte block whose byte ``4*i + j`` holds ``q[16p + i, 8o + j]`` in its low nibble and
``q[16p + i, 8o + 4 + j]`` in its high nibble (i < 16, j < 4)::

    qweight  uint8 [ceil(N/16), ceil(K/8), 64]
    scales   [ceil(N/16), K/g, 16]    scales[p, G, i] = d[16p + i, G]
    mins     same shape (asymmetric only)

Rows past N and columns past K hold code 0 (scale and min 0). Scales and mins are stored in
float16 when every value is exactly a float16 value (GGUF and GPTQ give such, and so does
lowbit's own quantizer, which rounds them to float16 like llama.cpp), else in float32, so
packing is always lossless: unpack_cpu(*pack_cpu(c, s, m), N, K) == (c, s, m).
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
    if codes.device.type != "meta" and bool((codes > 15).any()):  # (a meta tensor has no values)
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


# ---------------------------------------------------------------- CPU packed layout
PANEL_ROWS = 16
OCTET = 8


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def packed_cpu_shape(n: int, k: int) -> tuple:
    """Shape of the CPU-packed qweight for N outputs and K inputs."""
    return (_round_up(n, PANEL_ROWS) // PANEL_ROWS, _round_up(k, OCTET) // OCTET, 64)


def packed_scales_shape(n: int, groups: int) -> tuple:
    return (_round_up(n, PANEL_ROWS) // PANEL_ROWS, groups, PANEL_ROWS)


def storage_dtype(scales: torch.Tensor, mins=None) -> torch.dtype:
    """torch.float16 if every scale (and min) is exactly a float16 value, else torch.float32."""
    for t in (scales, mins):
        if t is None:
            continue
        t32 = t.detach().to(torch.float32)
        if not bool((t32.to(torch.float16).to(torch.float32) == t32).all()):
            return torch.float32
    return torch.float16


def round_scales_fp16(scales: torch.Tensor, mins=None) -> tuple:
    """Rounds scales (and mins) to float16 values (kept as float32) when that is safe: every
    nonzero magnitude within float16's normal range [2^-14, 65504], where rounding changes a
    value by at most 2^-11 relative (what llama.cpp does when it stores d and m). Otherwise
    returns them unchanged (they will be stored in float32)."""
    def ok(t):
        a = t.detach().abs().to(torch.float32)
        return bool(((a == 0) | ((a >= 2.0**-14) & (a <= 65504.0))).all())

    if not ok(scales) or (mins is not None and not ok(mins)):
        return scales, mins
    r = lambda t: None if t is None else t.to(torch.float16).to(torch.float32)
    return r(scales), r(mins)


def _panels_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """[N, C] -> [ceil(N/16), C, 16] with zero rows past N."""
    np_ = _round_up(n, PANEL_ROWS)
    out = torch.zeros(np_, t.shape[1], dtype=t.dtype, device=t.device)
    out[:n] = t
    return out.view(np_ // PANEL_ROWS, PANEL_ROWS, t.shape[1]).transpose(1, 2).contiguous()


def pack_cpu(codes: torch.Tensor, scales: torch.Tensor, mins=None) -> tuple:
    """Canonical (codes [N, K], scales [N, K/g], mins or None) -> (qweight, scales, mins) in the CPU
    packed layout (module docstring); scales and mins in float16 when lossless, else float32."""
    g = check_canonical(codes, scales, mins)
    del g
    n, k = codes.shape
    np_, kp = _round_up(n, PANEL_ROWS), _round_up(k, OCTET)
    q = torch.zeros(np_, kp, dtype=torch.uint8, device=codes.device)
    q[:n, :k] = codes
    # [P, 16 rows, O, 2 halves, 4 j] -> [P, O, 16 rows, 4 j] with the half-1 codes in the high nibble
    q = q.view(np_ // PANEL_ROWS, PANEL_ROWS, kp // OCTET, 2, 4).permute(0, 2, 1, 3, 4)
    qweight = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(np_ // PANEL_ROWS, kp // OCTET, 64).contiguous()
    dt = storage_dtype(scales, mins)
    ps = _panels_rows(scales.detach().to(torch.float32), n).to(dt)
    pm = None if mins is None else _panels_rows(mins.detach().to(torch.float32), n).to(dt)
    return qweight, ps, pm


def unpack_cpu(qweight: torch.Tensor, scales: torch.Tensor, mins, n: int, k: int) -> tuple:
    """The CPU packed layout -> canonical (codes uint8 [N, K], scales fp32 [N, K/g], mins fp32 or None)."""
    p, o, _ = qweight.shape
    lo, hi = qweight & 0x0F, qweight >> 4                     # [P, O, 64] each: (row i, j) = byte 4i + j
    q = torch.stack([lo.view(p, o, PANEL_ROWS, 4), hi.view(p, o, PANEL_ROWS, 4)], dim=3)  # [P, O, 16, 2, 4]
    codes = q.permute(0, 2, 1, 3, 4).reshape(p * PANEL_ROWS, o * OCTET)[:n, :k].contiguous()

    def rows(t):
        return None if t is None else t.transpose(1, 2).reshape(-1, t.shape[1])[:n].to(torch.float32).contiguous()

    return codes, rows(scales), rows(mins)


# ---------------------------------------------------------------- CUDA layout
# csrc/cuda/int4.cu's comment explains why: one 16-byte load per lane per (16 columns x 64 k)
# tile, the words in the order of mma.sync m16n8k16 B fragments, K permuted per lane so that a
# lane's 16 activations are contiguous.
CUDA_TILE_N = 16
CUDA_TILE_K = 64
# nibble of (sub, e) in a word: sub = which 8 columns, e = k offset in the lane's 4-k step
_CUDA_NIBBLE = torch.tensor([[0, 4, 1, 5], [2, 6, 3, 7]])


def packed_cuda_shape(n: int, k: int) -> tuple:
    """Shape of the CUDA qweight (int32) for N outputs and K inputs."""
    return (_round_up(n, CUDA_TILE_N) // CUDA_TILE_N, _round_up(k, CUDA_TILE_K) // CUDA_TILE_K, 32, 4)


def packed_cuda_scales_shape(n: int, groups: int) -> tuple:
    return (groups, _round_up(n, CUDA_TILE_N), 2)


def pack_cuda(codes: torch.Tensor, scales: torch.Tensor, mins=None) -> tuple:
    """Canonical (codes [N, K], scales [N, K/g], mins or None) -> (qweight int32 [Np/16, Kp/64, 32, 4],
    scales [K/g, Np, 2]) in the CUDA layout, on the codes' device. The scales tensor holds (d, m)
    pairs (m = -8 d when symmetric) in float16 when lossless, else float32; columns past N and
    codes past K are 0. Lossless: unpack_cuda gives back (codes, scales, mins)."""
    check_canonical(codes, scales, mins)
    n, k = codes.shape
    np_, kp = _round_up(n, CUDA_TILE_N), _round_up(k, CUDA_TILE_K)
    q = torch.zeros(np_, kp, dtype=torch.int32, device=codes.device)
    q[:n, :k] = codes
    # n = 16 p + 8 sub + gid, k = 64 t + 16 tig + 4 j + e  ->  [p, t, gid, tig, j, sub, e]
    q = q.view(np_ // 16, 2, 8, kp // 64, 4, 4, 4).permute(0, 3, 2, 4, 5, 1, 6)
    shifts = (4 * _CUDA_NIBBLE).to(device=codes.device, dtype=torch.int32)
    words = (q << shifts).sum(dim=(-2, -1), dtype=torch.int64)  # 8 disjoint nibbles: the sum is the OR
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    d = scales.detach().to(torch.float32)
    m = -8.0 * d if mins is None else mins.detach().to(torch.float32)
    table = torch.zeros(d.shape[1], np_, 2, dtype=torch.float32, device=codes.device)
    table[:, :n, 0], table[:, :n, 1] = d.t(), m.t()
    return words.reshape(packed_cuda_shape(n, k)).contiguous(), table.to(storage_dtype(table)).contiguous()


def unpack_cuda(qweight: torch.Tensor, scales: torch.Tensor, n: int, k: int, symmetric: bool) -> tuple:
    """The CUDA layout -> canonical (codes uint8 [N, K], scales fp32 [N, K/g], mins fp32 or None)."""
    p, t = qweight.shape[:2]
    shifts = (4 * _CUDA_NIBBLE).to(device=qweight.device, dtype=torch.int32)
    q = (qweight.view(p, t, 8, 4, 4, 1, 1) >> shifts) & 0xF        # [p, t, gid, tig, j, sub, e]
    codes = q.permute(0, 5, 2, 1, 3, 4, 6).reshape(p * 16, t * 64)[:n, :k].to(torch.uint8).contiguous()
    table = scales.to(torch.float32)
    d = table[:, :n, 0].t().contiguous()
    return codes, d, None if symmetric else table[:, :n, 1].t().contiguous()

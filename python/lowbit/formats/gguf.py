"""Lossless converters between GGUF (ggml) block bytes and lowbit's canonical form.

Written from the published ggml block layouts (ggml-common.h); QK = 32 values per block,
blocks follow each other along K, rows along N, all fields little-endian::

    block_q4_0  18 bytes:  fp16 d | uint8 qs[16]             w[j] = d * ((qs[j] & 0xF) - 8)
                                                             w[j+16] = d * ((qs[j] >> 4) - 8)
    block_q4_1  20 bytes:  fp16 d | fp16 m | uint8 qs[16]    w[j] = d * (qs[j] & 0xF) + m
                                                             w[j+16] = d * (qs[j] >> 4) + m
    block_q8_0  34 bytes:  fp16 d | int8 qs[32]              w[j] = d * qs[j]

(byte j of qs holds element j in its LOW nibble and element j + 16 in its HIGH nibble; this is
not lowbit's pack_nibbles order). The canonical forms (lowbit/formats/int4.py) are

    Q4_0 -> codes uint8 [N, K], scales fp32 [N, K/32], mins None          (symmetric, g = 32)
    Q4_1 -> codes uint8 [N, K], scales fp32 [N, K/32], mins fp32 [N, K/32] (asymmetric, g = 32)
    Q8_0 -> codes int8  [N, K], scales fp32 [N, K/32]

from_gguf_* widens d and m from fp16 to fp32 (exact), so raw -> canonical -> raw is bit-exact.
to_gguf_* ROUNDS scales and mins to fp16 (round to nearest even); a finite value that
overflows fp16 raises ValueError. Canonical values that came from from_gguf_* are fp16 values
already, so they convert back unchanged.
"""
from __future__ import annotations

import torch

try:  # numpy is optional: raw bytes may come as a numpy array (gguf-py's GGUFReader gives those)
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

from .int4 import check_canonical, check_codes

QK = 32
BLOCK_BYTES = {"q4_0": 2 + QK // 2, "q4_1": 4 + QK // 2, "q8_0": 2 + QK}


def _as_rows(raw, n: int, k: int, kind: str) -> torch.Tensor:
    """raw bytes (torch uint8 / numpy uint8, [N, K/32*B] or flat) -> uint8 [N, K/32, B] on CPU."""
    for name, v in (("n", n), ("k", k)):
        if not isinstance(v, int) and not (np is not None and isinstance(v, np.integer)) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    n, k = int(n), int(k)
    if k % QK != 0:
        raise ValueError(f"k: {k} is not a multiple of the GGUF block size {QK}")
    if np is not None and isinstance(raw, np.ndarray):
        if raw.dtype != np.uint8:
            raise TypeError(f"raw: expected uint8 bytes, got numpy {raw.dtype}")
        raw = torch.from_numpy(np.ascontiguousarray(raw))
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
        got = f"{raw.dtype} tensor" if isinstance(raw, torch.Tensor) else type(raw).__name__
        raise TypeError(f"raw: expected a torch.uint8 tensor or numpy uint8 array, got {got}")
    b = BLOCK_BYTES[kind]
    want = n * (k // QK) * b
    if raw.numel() != want:
        raise ValueError(f"raw: {raw.numel()} bytes, expected n * k/{QK} * {b} = {want} for {kind.upper()} "
                         f"with n={n}, k={k}")
    if raw.dim() not in (1, 2) or (raw.dim() == 2 and tuple(raw.shape) != (n, (k // QK) * b)):
        raise ValueError(f"raw: shape {tuple(raw.shape)}, expected flat or {(n, (k // QK) * b)}")
    return raw.detach().to("cpu").contiguous().reshape(n, k // QK, b)


def _f16_field(blocks: torch.Tensor, off: int) -> torch.Tensor:
    """Little-endian fp16 at byte offset off of every block -> fp32 [N, K/32]."""
    f = blocks[..., off:off + 2].contiguous().view(torch.float16).squeeze(-1)
    return f.to(torch.float32).reshape(f.shape[0], f.shape[1]).contiguous()


def _unpack_qs(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [N, B, 16] -> codes uint8 [N, B*32] (low nibbles = elements 0..15, high = 16..31)."""
    n, nb, _ = qs.shape
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, nb * QK)


def _pack_qs(codes: torch.Tensor) -> torch.Tensor:
    n, k = codes.shape
    c = codes.reshape(n, k // QK, 2, QK // 2)
    return c[:, :, 0] | (c[:, :, 1] << 4)


def _to_f16_bytes(t: torch.Tensor, name: str) -> torch.Tensor:
    """fp32 [N, B] -> uint8 [N, B, 2] (rounded to fp16; ValueError on a finite value overflowing)."""
    h = t.detach().to("cpu").to(torch.float16)
    if bool((torch.isinf(h) & torch.isfinite(t.detach().to("cpu"))).any()):
        raise ValueError(f"{name}: value out of fp16 range (GGUF stores it as fp16)")
    buf = torch.empty(h.numel(), dtype=torch.float16)  # fresh, stride 1 (.contiguous() may keep odd strides of size-1 dims)
    buf.copy_(h.reshape(-1))
    return buf.view(torch.uint8).reshape(*t.shape, 2)


def from_gguf_q4_0(raw, n: int, k: int) -> dict:
    """GGUF Q4_0 bytes of an [n, k] weight -> dict(codes uint8 [n, k], scales fp32 [n, k/32], mins=None)."""
    blocks = _as_rows(raw, n, k, "q4_0")
    return {"codes": _unpack_qs(blocks[..., 2:]).contiguous(), "scales": _f16_field(blocks, 0), "mins": None}


def from_gguf_q4_1(raw, n: int, k: int) -> dict:
    """GGUF Q4_1 bytes -> dict(codes uint8 [n, k], scales fp32 [n, k/32], mins fp32 [n, k/32])."""
    blocks = _as_rows(raw, n, k, "q4_1")
    return {"codes": _unpack_qs(blocks[..., 4:]).contiguous(), "scales": _f16_field(blocks, 0),
            "mins": _f16_field(blocks, 2)}


def from_gguf_q8_0(raw, n: int, k: int) -> dict:
    """GGUF Q8_0 bytes -> dict(codes int8 [n, k], scales fp32 [n, k/32])."""
    blocks = _as_rows(raw, n, k, "q8_0")
    codes = blocks[..., 2:].contiguous().view(torch.int8).reshape(int(n), int(k))
    return {"codes": codes, "scales": _f16_field(blocks, 0)}


def _check_block_k(codes: torch.Tensor) -> None:
    if codes.shape[1] % QK != 0:
        raise ValueError(f"codes: K = {codes.shape[1]} is not a multiple of the GGUF block size {QK}")


def to_gguf_q4_0(codes: torch.Tensor, scales: torch.Tensor, mins=None) -> torch.Tensor:
    """Canonical symmetric INT4 (g = 32) -> GGUF Q4_0 bytes uint8 [N, K/32*18]; scales rounded to fp16."""
    if mins is not None:
        raise ValueError("mins: Q4_0 is symmetric (w = d * (q - 8)); use to_gguf_q4_1 for mins")
    check_codes(codes)
    _check_block_k(codes)
    check_canonical(codes, scales, None, group_size=QK)
    c = codes.detach().to("cpu")
    out = torch.cat([_to_f16_bytes(scales, "scales"), _pack_qs(c)], dim=-1)
    return out.reshape(c.shape[0], -1).contiguous()


def to_gguf_q4_1(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Canonical asymmetric INT4 (g = 32) -> GGUF Q4_1 bytes uint8 [N, K/32*20]; scales, mins rounded to fp16."""
    if mins is None:
        raise ValueError("mins: Q4_1 needs mins (w = d * q + m)")
    check_codes(codes)
    _check_block_k(codes)
    check_canonical(codes, scales, mins, group_size=QK)
    c = codes.detach().to("cpu")
    out = torch.cat([_to_f16_bytes(scales, "scales"), _to_f16_bytes(mins, "mins"), _pack_qs(c)], dim=-1)
    return out.reshape(c.shape[0], -1).contiguous()


def to_gguf_q8_0(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] + fp32 scales [N, K/32] -> GGUF Q8_0 bytes uint8 [N, K/32*34]; scales rounded to fp16."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int8 or codes.dim() != 2:
        got = (f"{codes.dtype} tensor of shape {tuple(codes.shape)}" if isinstance(codes, torch.Tensor)
               else type(codes).__name__)
        raise TypeError(f"codes: expected a 2-D torch.int8 tensor [N, K], got {got}")
    n, k = codes.shape
    if n == 0 or k == 0:
        raise ValueError(f"codes: empty tensor of shape {(n, k)}")
    _check_block_k(codes)
    if not isinstance(scales, torch.Tensor) or not scales.is_floating_point() or tuple(scales.shape) != (n, k // QK):
        got = f"{scales.dtype} {tuple(scales.shape)}" if isinstance(scales, torch.Tensor) else type(scales).__name__
        raise ValueError(f"scales: expected a floating tensor of shape {(n, k // QK)}, got {got}")
    q = codes.detach().to("cpu").contiguous().view(torch.uint8).reshape(n, k // QK, QK)
    return torch.cat([_to_f16_bytes(scales, "scales"), q], dim=-1).reshape(n, -1).contiguous()

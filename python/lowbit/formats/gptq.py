"""GPTQ (AutoGPTQ / GPTQModel "gptq") and AWQ (AutoAWQ "gemm") 4-bit tensors <-> lowbit's
canonical INT4 form: the same arithmetic, two packings.

GPTQ's published packing, for a Linear with in_features K and out_features N and group size g::

    qweight  int32 [K/8, N]    code of (k, n) in bits 4i..4i+3 of qweight[k // 8, n], i = k % 8
    qzeros   int32 [K/g, N/8]  stored zero of (group, n) in bits 4i..4i+3 of qzeros[group, n // 8], i = n % 8
    scales   fp16  [K/g, N]
    g_idx    int32 [K]         group of each k: k // g, or with act order (desc_act) any map
                               that gives every group g inputs

    w[n, k] = scales[k // g, n] * (q - z),   z = stored zero + zero_offset

zero_offset: the original GPTQ / AutoGPTQ (before the "v2" checkpoint format) stored z - 1
in qzeros, so pass zero_offset=1 for those checkpoints (z = stored + 1); checkpoints that
store z itself (GPTQ v2 / GPTQModel's format="gptq_v2") take the default zero_offset=0.

AWQ's (AutoAWQ's WQLinear_GEMM, "version": "gemm" in its quantization config) packs along N,
with the eight columns of a word interleaved::

    qweight  int32 [K, N/8]    code of (k, n) in nibble i of qweight[k, n // 8], n % 8 = AWQ_ORDER[i]
    qzeros   int32 [K/g, N/8]  zero of (group, n), packed the same way (z itself: no offset)
    scales   fp16  [K/g, N]

    w[n, k] = scales[k // g, n] * (q - z)

Canonical form (asymmetric, lowbit/formats/int4.py): codes = q, scales = d = scale (in fp32),
mins = m = -(d * z) in fp32, so d * q + m = scale * (q - z) up to fp32 rounding (exact when
scale is an fp16 value: d * z then has at most 16 significant bits).
"""
from __future__ import annotations

import torch

from .int4 import check_canonical, check_group_size

PACK = 8  # 4-bit values per int32


def _check_int32(t, name: str, shape=None) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 2:
        got = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name}: expected a 2-D torch.int32 tensor, got {got}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {tuple(shape)}")


def _unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> uint8 [R * 8, C]: value i of packed[r, c] (bits 4i..4i+3) goes to row 8r + i."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, dtype=torch.int64).view(1, PACK, 1)
    return ((p.unsqueeze(1) >> shifts) & 0xF).to(torch.uint8).reshape(p.shape[0] * PACK, p.shape[1])


def _pack_rows(vals: torch.Tensor) -> torch.Tensor:
    """uint8 [R * 8, C] (values in [0, 15]) -> int32 [R, C], inverse of _unpack_rows."""
    r8, c = vals.shape
    v = vals.to(torch.int64).reshape(r8 // PACK, PACK, c)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64).view(1, PACK, 1)
    word = (v << shifts).sum(dim=1)
    word = torch.where(word >= 2**31, word - 2**32, word)
    return word.to(torch.int32)


def _check_scales(scales, k: int, n: int, qweight: torch.Tensor) -> int:
    """scales must be fp16 / fp32 [K/g, N] with a supported group size g; returns K/g."""
    if not isinstance(scales, torch.Tensor) or scales.dtype not in (torch.float16, torch.float32) or scales.dim() != 2:
        got = f"{scales.dtype} {tuple(scales.shape)}" if isinstance(scales, torch.Tensor) else type(scales).__name__
        raise TypeError(f"scales: expected a 2-D fp16/fp32 tensor [K/g, N], got {got}")
    if scales.shape[1] != n or scales.shape[0] == 0 or k % scales.shape[0] != 0:
        raise ValueError(f"scales: shape {tuple(scales.shape)} does not fit qweight {tuple(qweight.shape)} "
                         f"(expected [K/g, N] with K = {k}, N = {n})")
    check_group_size(k, k // scales.shape[0], "scales")
    return scales.shape[0]


def _check_bits(bits) -> None:
    if bits != 4:
        raise ValueError(f"bits: only 4-bit weights are supported, got {bits!r}")


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx=None,
              bits: int = 4, zero_offset: int = 0) -> dict:
    """GPTQ tensors -> dict(codes uint8 [N, K], scales fp32 [N, K/g], mins fp32 [N, K/g]).

    g_idx: None or the trivial arange(K) // g; or an act-order (desc_act) g_idx, which puts each
    input k in group g_idx[k], g inputs per group in any order: then the dict also holds
    ``perm`` (int64 [K]) and the codes are in that order (column j is input perm[j], groups
    contiguous: y = x[..., perm] . W^T; lowbit.nn.Int4ActOrderLinear). Any other g_idx raises
    ValueError. zero_offset: see the module docstring (1 for old AutoGPTQ).
    """
    _check_bits(bits)
    _check_int32(qweight, "qweight")
    k, n = qweight.shape[0] * PACK, qweight.shape[1]
    n_groups = _check_scales(scales, k, n, qweight)
    g = k // n_groups
    _check_int32(qzeros, "qzeros", (n_groups, (n + PACK - 1) // PACK))
    if not isinstance(zero_offset, int) or isinstance(zero_offset, bool):
        raise ValueError(f"zero_offset: expected an int, got {zero_offset!r}")
    perm = None if g_idx is None else _act_order(g_idx, k, g)
    codes = _unpack_rows(qweight.detach().to("cpu")).T.contiguous()               # [N, K]
    z = _unpack_rows(qzeros.detach().to("cpu").T.contiguous()).T[:, :n]           # [K/g, N]
    z = z.to(torch.float32) + float(zero_offset)
    d = scales.detach().to("cpu", torch.float32)
    m = -(d * z)
    out = {"codes": codes, "scales": d.T.contiguous(), "mins": m.T.contiguous()}
    if perm is not None:
        out["codes"], out["perm"] = codes[:, perm].contiguous(), perm
    return out


def _act_order(g_idx, k: int, g: int):
    """None for the trivial g_idx (arange(K) // g); for an act-order one, the order (int64 [K]) that
    makes each group's inputs contiguous, groups ascending; else ValueError."""
    if (not isinstance(g_idx, torch.Tensor) or g_idx.dim() != 1 or g_idx.numel() != k
            or g_idx.dtype.is_floating_point or g_idx.dtype == torch.bool):
        raise ValueError(f"g_idx: expected an integer tensor of K = {k} group indices")
    gi = g_idx.detach().to("cpu", torch.int64)
    groups = k // g
    if torch.equal(gi, torch.arange(k, dtype=torch.int64) // g):
        return None
    if bool(((gi < 0) | (gi >= groups)).any()) or not bool((torch.bincount(gi, minlength=groups) == g).all()):
        raise ValueError(f"g_idx: each of the {groups} groups must hold exactly {g} inputs (GPTQ's act order "
                         "permutes inputs among groups of equal size)")
    return torch.sort(gi, stable=True).indices


def to_gptq(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bits: int = 4,
            zero_offset: int = 0, scale_dtype: torch.dtype = torch.float16, perm=None) -> dict:
    """Canonical asymmetric INT4 -> dict(qweight int32 [K/8, N], qzeros int32 [K/g, ceil(N/8)],
    scales scale_dtype [K/g, N], g_idx int32 [K]) (the inverse of from_gptq).

    GPTQ's zero points are integers: mins must equal -(scale * z) in fp32 exactly for an
    integer z with z - zero_offset in [0, 15], else ValueError naming mins (a group with
    scale 0 must have mins 0 and gets stored zero 0). Scales are rounded to scale_dtype;
    K must be a multiple of 8. Columns of qzeros past N (when N % 8 != 0) are zero.
    perm: an act-order layer's input order (int64 [K], as from_gptq returns it: code column j
    is input perm[j]); qweight then holds the codes in input order and g_idx[perm[j]] = j // g.
    """
    _check_bits(bits)
    if mins is None:
        raise ValueError("mins: GPTQ is asymmetric; mins is required")
    g = check_canonical(codes, scales, mins)
    n, k = codes.shape
    if k % PACK != 0:
        raise ValueError(f"codes: K = {k} must be a multiple of {PACK} for GPTQ packing")
    d = scales.detach().to("cpu", torch.float32)
    npad = (n + PACK - 1) // PACK * PACK
    zs = torch.zeros(npad, k // g, dtype=torch.uint8)
    zs[:n] = _stored_zeros(d, mins, zero_offset, "GPTQ")
    codes = codes.detach().to("cpu")
    g_idx = torch.arange(k, dtype=torch.int32) // g
    if perm is not None:  # back to input order: input perm[j] is code column j, of group j // g
        perm = check_perm(perm, k, "perm")
        in_order, groups = torch.empty_like(codes), torch.empty_like(g_idx)
        in_order[:, perm], groups[perm] = codes, g_idx
        codes, g_idx = in_order, groups
    return {
        "qweight": _pack_rows(codes.T.contiguous()),
        "qzeros": _pack_rows(zs).T.contiguous(),
        "scales": d.T.to(scale_dtype).contiguous(),
        "g_idx": g_idx,
    }


def check_perm(perm, k: int, what: str) -> torch.Tensor:
    """An act-order input order (from_gptq's perm) as an int64 CPU permutation of range(K), or a
    ValueError naming `what`."""
    if (not isinstance(perm, torch.Tensor) or perm.dtype != torch.int64 or tuple(perm.shape) != (k,)
            or not torch.equal(torch.sort(perm.detach().cpu()).values, torch.arange(k))):
        raise ValueError(f"{what} must be an int64 permutation of range({k})")
    return perm.detach().cpu()


def _stored_zeros(d: torch.Tensor, mins: torch.Tensor, zero_offset: int, fmt: str) -> torch.Tensor:
    """The integer zero points z - zero_offset (uint8 [N, K/g]) of canonical (d fp32, mins), or a
    ValueError naming mins where mins is not -(d * z) for such a z (a group with d = 0 must have
    mins 0 and gets z = zero_offset)."""
    m = mins.detach().to("cpu", torch.float32)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    z = torch.round(-m / safe)
    z = torch.where(d == 0, torch.full_like(z, float(zero_offset)), z)
    stored = z - float(zero_offset)
    if not bool(((-(d * z) == m) & (stored >= 0) & (stored <= 15)).all()):
        raise ValueError("mins: not of the form -(scale * z) with an integer zero point "
                         f"z in [{zero_offset}, {15 + zero_offset}] ({fmt} cannot represent it)")
    return stored.to(torch.uint8)


# ---------------------------------------------------------------- AWQ
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column 8c + AWQ_ORDER[i]
_SHIFTS = tuple(range(0, 32, 4))


def _unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> uint8 [R, 8 C]: nibble i of packed[r, c] goes to column 8c + AWQ_ORDER[i]."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    nibbles = (p.unsqueeze(-1) >> torch.tensor(_SHIFTS, dtype=torch.int64)) & 0xF  # [R, C, 8], nibble i
    cols = torch.empty_like(nibbles)
    cols[..., list(AWQ_ORDER)] = nibbles
    return cols.to(torch.uint8).reshape(p.shape[0], -1)


def _pack_awq(vals: torch.Tensor) -> torch.Tensor:
    """uint8 [R, 8 C] (values in [0, 15]) -> int32 [R, C], inverse of _unpack_awq."""
    v = vals.to(torch.int64).reshape(vals.shape[0], -1, PACK)[..., list(AWQ_ORDER)]  # nibble i <- its column
    word = (v << torch.tensor(_SHIFTS, dtype=torch.int64)).sum(dim=-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int = 4) -> dict:
    """AWQ ("gemm") tensors -> dict(codes uint8 [N, K], scales fp32 [N, K/g], mins fp32 [N, K/g])."""
    _check_bits(bits)
    _check_int32(qweight, "qweight")
    k, n = qweight.shape[0], qweight.shape[1] * PACK
    n_groups = _check_scales(scales, k, n, qweight)
    _check_int32(qzeros, "qzeros", (n_groups, n // PACK))
    codes = _unpack_awq(qweight.detach().to("cpu")).T.contiguous()               # [N, K]
    z = _unpack_awq(qzeros.detach().to("cpu")).to(torch.float32)                  # [K/g, N]
    d = scales.detach().to("cpu", torch.float32)
    return {"codes": codes, "scales": d.T.contiguous(), "mins": (-(d * z)).T.contiguous()}


def to_awq(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bits: int = 4,
           scale_dtype: torch.dtype = torch.float16) -> dict:
    """Canonical asymmetric INT4 -> dict(qweight int32 [K, N/8], qzeros int32 [K/g, N/8], scales
    scale_dtype [K/g, N]) (the inverse of from_awq). N must be a multiple of 8 (AWQ packs along N);
    mins must be -(scale * z) in fp32 exactly for an integer z in [0, 15], else ValueError."""
    _check_bits(bits)
    if mins is None:
        raise ValueError("mins: AWQ is asymmetric; mins is required")
    check_canonical(codes, scales, mins)
    n = codes.shape[0]
    if n % PACK != 0:
        raise ValueError(f"codes: N = {n} must be a multiple of {PACK} for AWQ packing")
    d = scales.detach().to("cpu", torch.float32)
    return {
        "qweight": _pack_awq(codes.detach().to("cpu").T.contiguous()),
        "qzeros": _pack_awq(_stored_zeros(d, mins, 0, "AWQ").T.contiguous()),
        "scales": d.T.to(scale_dtype).contiguous(),
    }

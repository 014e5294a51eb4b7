"""Fused row ops of a decoder layer (vLLM's names and meanings), one native call each.

* ``rms_norm(x, weight, eps, residual=None)``: RMSNorm over the last dim,
  ``x * rsqrt(mean(x^2) + eps) * weight``. With ``residual``: normalizes ``s = x + residual``
  and returns ``(normed, s)`` (the pre-norm residual stream, as vLLM's fused_add_rms_norm).
* ``silu_and_mul(x)``: ``x [..., 2F]`` (gate | up) -> ``silu(gate) * up [..., F]`` (SwiGLU).
* ``rope_(x, cos, sin, neox)``: rotates, in place, the first ``2R`` dims of every head of
  ``x [T, H, D]`` by the angles of ``cos`` / ``sin`` (float32 ``[T, R]``): NeoX pairs
  ``(i, i + R)`` or adjacent pairs ``(2i, 2i + 1)`` (llama.cpp's "normal" RoPE of GGUF Llamas).

fp32 / fp16 / bf16 tensors, arithmetic in fp32 (references: lowbit.ref.fused). Each is a
torch.library op with a fake impl; the ``*_cpu`` functions are the eager fast path the model
calls (same validation).
"""
from __future__ import annotations

import torch

from .. import _native
from . import _check as chk

_lib = torch.library.Library("lowbit", "FRAGMENT")
_lib.define("rms_norm(Tensor x, Tensor weight, float eps, Tensor? residual=None) -> (Tensor, Tensor)")
_lib.define("silu_and_mul(Tensor x) -> Tensor")
_lib.define("rope_(Tensor(a!) x, Tensor cos, Tensor sin, bool neox) -> ()")


def _cpu_float(t, name: str, op: str) -> None:
    chk.float_tensor(t, name, op)
    if t.device.type != "cpu":
        raise ValueError(f"lowbit.{op}: {name} is on {t.device}; this op runs on the CPU")


def validate_rms_norm(x, weight, eps, residual, op: str = "rms_norm") -> None:
    _cpu_float(x, "x", op)
    _cpu_float(weight, "weight", op)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"lowbit.{op}: x must be [..., K] with K >= 1, got shape {tuple(x.shape)}")
    chk.shape(weight, (x.shape[-1],), "weight", op)
    chk.contiguous(weight, "weight", op)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"lowbit.{op}: eps must be a float >= 0, got {eps!r}")
    if residual is not None:
        _cpu_float(residual, "residual", op)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"lowbit.{op}: residual must match x ({x.dtype} {tuple(x.shape)}), got "
                             f"{residual.dtype} {tuple(residual.shape)}")


def _rms_norm_args(x, weight, eps, residual, out, s) -> tuple:
    k = x.shape[-1]
    return (x.data_ptr(), 0 if residual is None else residual.data_ptr(), weight.data_ptr(),
            _native.DTYPE_CODE[weight.dtype], out.data_ptr(), s.data_ptr(), _native.DTYPE_CODE[x.dtype],
            x.numel() // k, k, float(eps), _native.get_num_threads())


def rms_norm_cpu(x, weight, eps, residual=None) -> tuple:
    """(normed, s): s = x + residual (x itself when residual is None)."""
    op = "rms_norm"
    validate_rms_norm(x, weight, eps, residual, op)
    x = x.contiguous()
    residual = None if residual is None else residual.contiguous()
    out = torch.empty_like(x)
    s = x if residual is None else torch.empty_like(x)
    if x.numel():  # (no rows: nothing to do)
        _native.check(_native._C.rms_norm(*_rms_norm_args(x, weight, eps, residual, out, s)), op)
    return out, s


def _check_bound(op: str, like: torch.Tensor, **tensors) -> None:
    """bind_*: every buffer contiguous, of like's dtype (and shape, for the names given)."""
    for name, t in tensors.items():
        if t is None:
            continue
        chk.tensor(t, name, op)
        if t.dtype != like.dtype or not t.is_contiguous() or t.device != like.device:
            raise ValueError(f"lowbit.{op}: {name} must be a contiguous {like.dtype} tensor on {like.device}")


def bind_rms_norm(x, weight, eps, residual, out, sum_out):
    """A callable doing rms_norm_cpu(x, weight, eps, residual) into out (and sum_out = x + residual,
    which may be residual itself: rows are read before they are written), arguments checked now."""
    op = "rms_norm"
    validate_rms_norm(x, weight, eps, residual, op)
    if not x.numel():
        raise ValueError(f"lowbit.{op}: x is empty")
    _check_bound(op, x, x=x, residual=residual, out=out, sum_out=sum_out)
    for name, t in (("out", out), ("sum_out", sum_out)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"lowbit.{op}: {name} must have x's shape {tuple(x.shape)}")
    args = _rms_norm_args(x, weight, eps, residual, out, x if sum_out is None else sum_out)
    alive = (x, weight, residual, out, sum_out)
    return lambda alive=alive: _native.check(_native._C.rms_norm(*args), op)


def validate_silu_and_mul(x, op: str = "silu_and_mul") -> None:
    _cpu_float(x, "x", op)
    if x.dim() < 1 or x.shape[-1] == 0 or x.shape[-1] % 2:
        raise ValueError(f"lowbit.{op}: x must be [..., 2F] (gate | up) with F >= 1, got shape {tuple(x.shape)}")


def _silu_args(x, out) -> tuple:
    f = x.shape[-1] // 2
    return x.data_ptr(), out.data_ptr(), _native.DTYPE_CODE[x.dtype], x.numel() // (2 * f), f, _native.get_num_threads()


def silu_and_mul_cpu(x) -> torch.Tensor:
    op = "silu_and_mul"
    validate_silu_and_mul(x, op)
    x = x.contiguous()
    out = x.new_empty((*x.shape[:-1], x.shape[-1] // 2))
    if x.numel():
        _native.check(_native._C.silu_and_mul(*_silu_args(x, out)), op)
    return out


def bind_silu_and_mul(x, out):
    """A callable doing out = silu_and_mul_cpu(x), arguments checked now."""
    op = "silu_and_mul"
    validate_silu_and_mul(x, op)
    if not x.numel():
        raise ValueError(f"lowbit.{op}: x is empty")
    _check_bound(op, x, x=x, out=out)
    if out.shape != (*x.shape[:-1], x.shape[-1] // 2):
        raise ValueError(f"lowbit.{op}: out must have shape {(*x.shape[:-1], x.shape[-1] // 2)}")
    args = _silu_args(x, out)
    return lambda alive=(x, out): _native.check(_native._C.silu_and_mul(*args), op)


def validate_rope(x, cos, sin, neox, op: str = "rope_") -> None:
    _cpu_float(x, "x", op)
    if x.dim() != 3:
        raise ValueError(f"lowbit.{op}: x must be [tokens, heads, head_dim], got shape {tuple(x.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        chk.tensor(t, name, op)
        chk.dtype(t, torch.float32, name, op)
        if t.dim() != 2 or t.shape[0] != x.shape[0]:
            raise ValueError(f"lowbit.{op}: {name} must be float32 [tokens={x.shape[0]}, R], got {tuple(t.shape)}")
        chk.contiguous(t, name, op)
        if t.device != x.device:
            raise ValueError(f"lowbit.{op}: {name} is on {t.device} but x is on {x.device}")
    if sin.shape != cos.shape:
        raise ValueError(f"lowbit.{op}: sin {tuple(sin.shape)} and cos {tuple(cos.shape)} differ")
    if not 1 <= 2 * cos.shape[1] <= x.shape[2]:
        raise ValueError(f"lowbit.{op}: 2R = {2 * cos.shape[1]} rotated dims must be in [2, head_dim = {x.shape[2]}]")
    if x.numel() and (x.stride(2) != 1 or (x.shape[1] > 1 and x.stride(1) < x.shape[2])
                      or (x.shape[0] > 1 and x.stride(0) < x.shape[1] * x.shape[2])):
        raise ValueError(f"lowbit.{op}: x must have unit inner stride and non-overlapping heads and tokens, got "
                         f"strides {tuple(x.stride())}")
    if not isinstance(neox, bool):
        raise TypeError(f"lowbit.{op}: neox must be a bool, got {type(neox).__name__}")


def _rope_args(x, cos, sin, neox) -> tuple:
    return (x.data_ptr(), _native.DTYPE_CODE[x.dtype], x.shape[0], x.shape[1], x.stride(0), x.stride(1),
            cos.data_ptr(), sin.data_ptr(), cos.shape[1], int(neox), _native.get_num_threads())


def rope_cpu(x, cos, sin, neox) -> None:
    op = "rope_"
    validate_rope(x, cos, sin, neox, op)
    if x.numel():
        _native.check(_native._C.rope(*_rope_args(x, cos, sin, neox)), op)


def bind_rope(x, cos, sin, neox):
    """A callable doing rope_cpu(x, cos, sin, neox) (cos / sin read at each call), checked now."""
    op = "rope_"
    validate_rope(x, cos, sin, neox, op)
    if not x.numel():
        raise ValueError(f"lowbit.{op}: x is empty")
    args = _rope_args(x, cos, sin, neox)
    return lambda alive=(x, cos, sin): _native.check(_native._C.rope(*args), op)


@torch.library.register_fake("lowbit::rms_norm", lib=_lib)
def _rms_norm_fake(x, weight, eps, residual=None):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.register_fake("lowbit::silu_and_mul", lib=_lib)
def _silu_and_mul_fake(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.register_fake("lowbit::rope_", lib=_lib)
def _rope_fake(x, cos, sin, neox):
    return None


def _rms_norm_impl(x, weight, eps, residual=None):
    out, s = rms_norm_cpu(x, weight, eps, residual)
    return out, (s.clone() if residual is None else s)  # outputs of an op must not alias its inputs


_lib.impl("rms_norm", _rms_norm_impl, "CPU")
chk.no_backward("rms_norm", _lib, "torch.nn.functional.rms_norm")
_lib.impl("silu_and_mul", silu_and_mul_cpu, "CPU")
chk.no_backward("silu_and_mul", _lib, "torch.nn.functional.silu(gate) * up")
_lib.impl("rope_", rope_cpu, "CPU")


def rms_norm(x, weight, eps: float = 1e-6, residual=None):
    """normed, or (normed, x + residual) when residual is given (see module docstring)."""
    chk.tensors("rms_norm", ("residual",), x=x, weight=weight, residual=residual)
    validate_rms_norm(x, weight, eps, residual)
    out, s = torch.ops.lowbit.rms_norm(x, weight, float(eps), residual)
    return out if residual is None else (out, s)


def silu_and_mul(x) -> torch.Tensor:
    chk.tensors("silu_and_mul", x=x)
    validate_silu_and_mul(x)
    return torch.ops.lowbit.silu_and_mul(x)


def rope_(x, cos, sin, neox: bool = False) -> torch.Tensor:
    """Rotates x in place (see module docstring); returns x."""
    chk.tensors("rope_", x=x, cos=cos, sin=sin)
    validate_rope(x, cos, sin, neox)
    torch.ops.lowbit.rope_(x, cos, sin, neox)
    return x

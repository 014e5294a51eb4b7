"""INT4 ops: group-wise INT4 weights, W4A16 and W4A8 linear.

Schemas (namespace ``lowbit``)::

    int4_linear_w4a16(Tensor x, Tensor qweight, Tensor scales, Tensor? mins, int n, Tensor? bias) -> Tensor
    int4_linear_w4a8(Tensor x, Tensor qweight, Tensor scales, Tensor? mins, int n, Tensor? bias) -> Tensor

``qweight``, ``scales`` and ``mins`` are in the layout of their device (lowbit.formats.int4).
On CPU (``pack_cpu``): qweight uint8 [ceil(N/16), ceil(K/8), 64], scales float16 or float32
[ceil(N/16), K/g, 16], mins the same (asymmetric, w = d * q + m) or None (symmetric,
w = d * (q - 8)). On CUDA (``pack_cuda``): qweight int32 [ceil(N/16), ceil(K/64), 32, 4],
scales [K/g, roundup(N, 16), 2] holding (d, m) pairs (m = -8 d for symmetric weights), and
mins None. ``n`` is N (the packed shapes fix it only up to a multiple of 16); K comes
from x and the group size g = K / scales.shape[1] must be 32, 64, 128 or K. As with the INT8
ops, the packed shapes fix K only up to its octet of 8 when g = K (per channel), so such an x
is taken on trust; the modules check K exactly against in_features.

W4A16 keeps the activations in float: y = x . W^T + bias with fp32 FMAs and fp32 accumulation.
W4A8 quantizes x on the fly to int8 per block of 32 consecutive k (symmetric, scale = amax / 127,
round half to even: lowbit.ref.int4.quantize_activations_q8), as llama.cpp's Q8 blocks do,
and runs int8 dot products with exact int32 sums per block. Per-block scales (rather than
one per token) keep an outlier channel from coarsening a whole row: on activations with
0.5% outlier channels (30x) the per-token output error measured 7.5% against 1.1% per block.
x is [..., K] in fp32 / fp16 / bf16 on CPU, fp16 / bf16 on CUDA (tensor cores: mma.sync
m16n8k16, weights dequantized in registers, fp32 accumulation); y has x's dtype. W4A8 runs on
the CPU only. A NaN or Inf in a row of x makes that
row's outputs NaN (W4A16 too: the factored form computes Inf - Inf where torch would give +-Inf).
"""
from __future__ import annotations

import functools

import torch

from .. import _native
from ..formats import int4 as fmt
from . import _check as chk
from .int8 import DENSE_MIN_M, bias_args, cuda_counters, dense_linear, register_input_grad, run_cpu_kernel, validate_x

_lib = torch.library.Library("lowbit", "FRAGMENT")
for _op in ("int4_linear_w4a16", "int4_linear_w4a8"):
    _lib.define(f"{_op}(Tensor x, Tensor qweight, Tensor scales, Tensor? mins, int n, Tensor? bias=None) -> Tensor")


# ---------------------------------------------------------------- validation
# The CUDA kernels' 32-bit offsets (csrc/cuda/int4.h kW4a16MaxK): a lane's k, and the scale
# table's index over groups x roundup(N, 16).
CUDA_MAX_K = 2**31 - 1 - 64
CUDA_MAX_SCALES = 2**31 - 1
DEQUANT_MAX_N = 65535 * 16  # the dense path's dequantization grid (one block row per 16 columns); beyond, the kernel
# The weight layout of each device (lowbit.formats.int4): qweight's dtype, the scales' last dim
# and group axis, the expected shapes for (N, groups) and (N, K), and the packer's name.
_LAYOUTS = {
    "cpu": (torch.uint8, fmt.PANEL_ROWS, 1, fmt.packed_scales_shape, fmt.packed_cpu_shape,
            "[ceil(N/16), K/g, 16] (lowbit.formats.int4.pack_cpu)"),
    "cuda": (torch.int32, 2, 0, fmt.packed_cuda_scales_shape, fmt.packed_cuda_shape,
             "[K/g, roundup(N, 16), 2] (d, m) pairs (lowbit.formats.int4.pack_cuda)"),
}


def validate_weights(qweight, scales, mins, n, bias, k: int, op: str) -> int:
    """Checks INT4 weights (layout of their device) for K inputs and N = n outputs; returns the group size."""
    chk.tensor(qweight, "qweight", op)
    chk.tensor(scales, "scales", op)
    _check_n(n, op)
    if scales.dtype not in (torch.float16, torch.float32):
        raise TypeError(f"lowbit.{op}: scales must be float16 or float32, got {scales.dtype}")
    if qweight.device != scales.device:
        raise ValueError(f"lowbit.{op}: qweight is on {qweight.device} but scales is on {scales.device}")
    layout = _LAYOUTS.get(scales.device.type)
    if layout is None:
        raise NotImplementedError(f"lowbit.{op}: INT4 kernels run on CPU and CUDA; the weights are on {scales.device}")
    q_dtype, last, group_axis, scales_shape, q_shape, described = layout
    for name, t in (("qweight", qweight), ("scales", scales)):
        chk.contiguous(t, name, op)
    chk.dtype(qweight, q_dtype, "qweight", op)
    if scales.dim() != 3 or 0 in scales.shape or scales.shape[2] != last:
        raise ValueError(f"lowbit.{op}: scales on {scales.device.type} must be {described}, got shape "
                         f"{tuple(scales.shape)}")
    if mins is not None and group_axis == 0:
        raise ValueError(f"lowbit.{op}: mins must be None on CUDA (the CUDA layout keeps d and m together in "
                         "scales)")
    groups = int(scales.shape[group_axis])  # specialized under torch.compile, like K (validate_linear)
    if k % groups != 0:
        raise ValueError(f"lowbit.{op}: scales has {groups} groups, which does not divide K={k} (from x)")
    g = k // groups
    try:
        fmt.check_group_size(k, g)
    except ValueError as e:
        raise ValueError(f"lowbit.{op}: scales has {groups} groups for K={k}, i.e. group size {g}: {e}") from None
    chk.shape(scales, scales_shape(n, groups), f"scales (N={n}, {groups} groups)", op)
    chk.shape(qweight, q_shape(n, k), f"qweight (packed for N={n}, K={k})", op)
    if group_axis == 0 and (k > CUDA_MAX_K or groups * scales.shape[1] > CUDA_MAX_SCALES):
        raise ValueError(f"lowbit.{op}: on CUDA, K must be at most {CUDA_MAX_K} and groups x roundup(N, 16) at most "
                         f"{CUDA_MAX_SCALES} (the kernels' 32-bit offsets); got K={k}, {groups} groups x "
                         f"{scales.shape[1]}")
    if mins is not None:
        chk.tensor(mins, "mins", op)
        if mins.dtype != scales.dtype:
            raise TypeError(f"lowbit.{op}: mins must have the dtype of scales ({scales.dtype}), got {mins.dtype}")
        if mins.device != scales.device:
            raise ValueError(f"lowbit.{op}: mins is on {mins.device} but scales is on {scales.device}")
        chk.shape(mins, tuple(scales.shape), "mins (the shape of scales)", op)
        chk.contiguous(mins, "mins", op)
    chk.bias(bias, n, scales.device, op)
    return g


def validate_linear(x, qweight, scales, mins, n, bias, op: str) -> tuple:
    """Checks every argument of an INT4 linear op; returns (K, group size)."""
    chk.float_tensor(x, "x", op)
    if x.dim() < 1:
        raise ValueError(f"lowbit.{op}: x must have at least 1 dimension [..., K], got a scalar")
    # K is fixed by the weights: under torch.compile with dynamic shapes this specializes it
    # (the group-size arithmetic below needs a concrete value).
    chk.features(x, op)
    k = int(x.shape[-1])
    g = validate_weights(qweight, scales, mins, n, bias, k, op)
    validate_x(x, k, scales.device, op)
    return k, g


# ---------------------------------------------------------------- fake impls
def _linear_fake(op):
    def fake(x, qweight, scales, mins, n, bias=None):
        validate_linear(x, qweight, scales, mins, n, bias, op)
        return x.new_empty((*x.shape[:-1], n))

    return fake


for _op in ("int4_linear_w4a16", "int4_linear_w4a8"):
    torch.library.register_fake(f"lowbit::{_op}", _linear_fake(_op), lib=_lib)


# ---------------------------------------------------------------- CPU
def weight_args(qweight, scales, mins, n, g) -> tuple:
    """The INT4 weight arguments of a CPU linear kernel."""
    return (qweight.data_ptr(), scales.data_ptr(), 0 if mins is None else mins.data_ptr(),
            _native.DTYPE_CODE[scales.dtype], g, n)


def run_linear_cpu(kernel, op, x, qweight, scales, mins, n, bias, k, g):
    """Runs a validated CPU INT4 linear."""
    return run_cpu_kernel(kernel, op, x, k, weight_args(qweight, scales, mins, n, g), n, bias)


def _cpu_impl(op):
    kernel = getattr(_native._C, op)

    def impl(x, qweight, scales, mins, n, bias=None):
        k, g = validate_linear(x, qweight, scales, mins, n, bias, op)
        return run_linear_cpu(kernel, op, x, qweight, scales, mins, n, bias, k, g)

    return impl


# ---------------------------------------------------------------- CUDA
def linear_w4a16_cuda(x, qweight, scales, mins, n, bias=None):
    op = "int4_linear_w4a16"
    k, _ = validate_linear(x, qweight, scales, mins, n, bias, op)
    check_cuda_x(x, op)
    check_cuda_alignment(qweight, scales, op)
    return run_w4a16_cuda(x, qweight, scales, n, bias, k)


def check_cuda_x(x, op: str) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"lowbit.{op}: on CUDA x must be float16 or bfloat16 (the tensor-core kernel), got {x.dtype}; "
                        "cast it (x.half() / x.bfloat16(), or run under torch.autocast)")


def check_cuda_alignment(qweight, scales, op: str) -> None:
    """The kernels copy qweight 16 bytes and scales one (d, m) pair at a time: views that start
    mid-way (a slice of a bigger buffer) must be copied first."""
    pair = 2 * scales.element_size()
    if qweight.data_ptr() % 16 or scales.data_ptr() % pair:
        raise ValueError(f"lowbit.{op}: on CUDA qweight must be 16-byte aligned and scales {pair}-byte aligned (got "
                         f"addresses ending {qweight.data_ptr() % 16:#x} and {scales.data_ptr() % pair:#x}); pass "
                         ".clone()s of the views")


def run_w4a16_cuda(x, qweight, scales, n: int, bias, k: int):
    """Runs a validated CUDA W4A16 linear (the op's path, and the module's eager one)."""
    op = "int4_linear_w4a16"
    mod = _native.cuda_module()
    x2 = chk.rows(x)
    m = x2.shape[0]
    dev = x.device
    stream = _native.stream_of(x)
    if m == 0:
        return torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=dev)
    if m > DENSE_MIN_M and n <= DEQUANT_MAX_N:  # one dequantization, then cuBLAS (see ops/int8.py)
        return dense_linear(x, n, k, bias, functools.partial(mod.int4_dequantize_w4a16, qweight.data_ptr(),
                                                             scales.data_ptr(), _native.DTYPE_CODE[scales.dtype],
                                                             scales.shape[0], n, k), op)
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=dev)
    splits, count = mod.int4_w4a16_plan(m, k, n, _native.DTYPE_CODE[x.dtype], _native.DTYPE_CODE[scales.dtype],
                                        _native.sm_count(dev), dev.index)
    partial = counters = None
    if count:  # a K split: per-split fp32 sums, from torch's allocator (none when the splits form clusters)
        partial = torch.empty((splits, m, scales.shape[1]), dtype=torch.float32, device=dev)
        counters = cuda_counters(dev, stream, count)
    st = mod.int4_linear_w4a16(
        x2.data_ptr(), _native.DTYPE_CODE[x.dtype], m, k, chk.row_stride(x2), qweight.data_ptr(), scales.data_ptr(),
        _native.DTYPE_CODE[scales.dtype], scales.shape[0], n, *bias_args(bias), y.data_ptr(), n, splits,
        0 if partial is None else partial.data_ptr(), 0 if counters is None else counters.data_ptr(), dev.index,
        stream)
    _native.check(st, op)
    return y


def linear_w4a8_cuda(x, qweight, scales, mins, n, bias=None):
    raise NotImplementedError("lowbit.int4_linear_w4a8: W4A8 runs on the CPU only; on CUDA use W4A16 "
                              "(Int4Linear(scheme='w4a16'), tensor cores)")


for _op in ("int4_linear_w4a16", "int4_linear_w4a8"):
    _lib.impl(_op, _cpu_impl(_op), "CPU")
_lib.impl("int4_linear_w4a16", linear_w4a16_cuda, "CUDA")
_lib.impl("int4_linear_w4a8", linear_w4a8_cuda, "CUDA")


# ---------------------------------------------------------------- autograd
def dequantize(qweight, scales, mins, n: int, device_type: str, k: int) -> torch.Tensor:
    """The INT4 weight of either layout as fp32 [N, K]: d * (q - 8), or d * q + m (a CUDA table's (d, m)
    pairs always so), the kernels' weights (lowbit.ref.int4.dequantize_int4, without its data checks,
    which tracing cannot take)."""
    if device_type == "cpu":
        codes, d, m = fmt.unpack_cpu(qweight, scales, mins, n, k)
    else:
        codes, d, m = fmt.unpack_cuda(qweight, scales, n, k, symmetric=False)
    q = codes.to(torch.float32).reshape(n, d.shape[1], -1)
    w = d[..., None] * (q - 8) if m is None else d[..., None] * q + m[..., None]
    return w.reshape(n, k)


for _op in ("int4_linear_w4a16", "int4_linear_w4a8"):
    register_input_grad(_op, dequantize, _lib)


# ---------------------------------------------------------------- public
def _check_n(n, op: str) -> None:
    # Before the dispatcher, which would turn a bad n into a RuntimeError (and True into 1).
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"lowbit.{op}: n (out_features) must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"lowbit.{op}: n (out_features) must be positive, got {n}")


def int4_linear_w4a16(x, qweight, scales, mins, n: int, bias=None) -> torch.Tensor:
    """y = x . dequant(W)^T + bias with W = d * q + m (mins) or d * (q - 8) (mins None), x kept in float."""
    chk.tensors("int4_linear_w4a16", ("mins", "bias"), x=x, qweight=qweight, scales=scales, mins=mins, bias=bias)
    _check_n(n, "int4_linear_w4a16")
    return torch.ops.lowbit.int4_linear_w4a16(chk.autocast(x), qweight, scales, mins, n, bias)


def int4_linear_w4a8(x, qweight, scales, mins, n: int, bias=None) -> torch.Tensor:
    """y = q8(x) . dequant(W)^T + bias, x quantized to int8 per block of 32 along K on the fly."""
    chk.tensors("int4_linear_w4a8", ("mins", "bias"), x=x, qweight=qweight, scales=scales, mins=mins, bias=bias)
    _check_n(n, "int4_linear_w4a8")
    return torch.ops.lowbit.int4_linear_w4a8(chk.autocast(x), qweight, scales, mins, n, bias)

"""INT8 ops: per-token activation quantization, W8A16 and W8A8 linear.

Schemas (namespace ``lowbit``)::

    int8_quantize_per_token(Tensor x) -> (Tensor q, Tensor scale)
    int8_linear_w8a16(Tensor x, Tensor qweight, Tensor scale, Tensor? bias) -> Tensor
    int8_linear_w8a8(Tensor x, Tensor qweight, Tensor scale, Tensor? bias) -> Tensor

``qweight`` is in the layout of its device (lowbit.formats.int8): the packed
panel layout on CPU, canonical [N, K] on CUDA; ``scale`` is fp32 [N] and fixes N.
x is [..., K] in fp32 / fp16 / bf16 and y has x's dtype. K comes from x: the CPU
packed shape fixes it only up to a multiple of 4, so, as with Marlin-style ops
that take K on trust, x must have the K the weight was packed for (the modules
check it exactly against in_features).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from .. import _native
from ..formats import int8 as fmt
from . import _check as chk

_lib = torch.library.Library("lowbit", "DEF")
_lib.define("int8_quantize_per_token(Tensor x) -> (Tensor, Tensor)")
_lib.define("int8_linear_w8a16(Tensor x, Tensor qweight, Tensor scale, Tensor? bias=None) -> Tensor")
_lib.define("int8_linear_w8a8(Tensor x, Tensor qweight, Tensor scale, Tensor? bias=None) -> Tensor")


# ---------------------------------------------------------------- validation
def validate_x(x, k: int, device: torch.device, op: str) -> None:
    """x must be a float tensor [..., K] on `device` (the weights' device); it may have no rows."""
    chk.float_tensor(x, "x", op)
    if x.dim() < 1:
        raise ValueError(f"lowbit.{op}: x must have at least 1 dimension [..., K], got a scalar")
    if x.shape[-1] != k:
        raise ValueError(f"lowbit.{op}: x has K={x.shape[-1]} features (last dim) but the weight expects K={k}")
    xd = x.device
    # (torch.device equality is slow; CPU tensors only need the type compared)
    if xd.type != device.type or (xd.type != "cpu" and xd != device):
        raise ValueError(f"lowbit.{op}: x is on {xd} but the weights are on {device}")


def validate_weights(qweight, scale, bias, k: int, op: str) -> int:
    """Checks an INT8 weight (layout of its device) for K inputs; returns N."""
    chk.tensor(qweight, "qweight", op)
    chk.tensor(scale, "scale", op)
    chk.dtype(qweight, torch.int8, "qweight", op)
    chk.dtype(scale, torch.float32, "scale", op)
    if scale.dim() != 1:
        raise ValueError(f"lowbit.{op}: scale must be 1-D [N], got shape {tuple(scale.shape)}")
    chk.not_empty(scale, "scale", op)
    if qweight.device != scale.device:
        raise ValueError(f"lowbit.{op}: qweight is on {qweight.device} but scale is on {scale.device}")
    chk.contiguous(qweight, "qweight", op)
    chk.contiguous(scale, "scale", op)
    n = scale.shape[0]
    if qweight.device.type == "cpu":
        if qweight.dim() != 4:
            raise ValueError(
                f"lowbit.{op}: qweight on CPU must be the packed 4-D layout (lowbit.formats.int8.pack_cpu), "
                f"got shape {tuple(qweight.shape)}"
            )
        if tuple(qweight.shape) != fmt.packed_cpu_shape(n, k):
            raise ValueError(
                f"lowbit.{op}: qweight has packed shape {tuple(qweight.shape)}, which does not fit "
                f"K={k} (from x) and N={n} (from scale): expected {fmt.packed_cpu_shape(n, k)}"
            )
    else:
        chk.shape(qweight, (n, k), "qweight (canonical [N, K] off the CPU; K from x, N from scale)", op)
    chk.bias(bias, n, scale.device, op)
    return n


def validate_linear(x, qweight, scale, bias, op: str) -> tuple:
    """Checks every argument of a linear op; returns (N, K)."""
    chk.float_tensor(x, "x", op)
    if x.dim() < 1:
        raise ValueError(f"lowbit.{op}: x must have at least 1 dimension [..., K], got a scalar")
    chk.features(x, op)
    k = x.shape[-1]
    n = validate_weights(qweight, scale, bias, k, op)
    validate_x(x, k, scale.device, op)
    return n, k


def validate_quantize(x, op: str) -> None:
    chk.float_tensor(x, "x", op)
    if x.dim() < 1:
        raise ValueError(f"lowbit.{op}: x must have at least 1 dimension [..., K], got a scalar")
    chk.features(x, op)


# ---------------------------------------------------------------- fake impls
@torch.library.register_fake("lowbit::int8_quantize_per_token")
def _quantize_fake(x):
    validate_quantize(x, "int8_quantize_per_token")
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _linear_fake(op):
    def fake(x, qweight, scale, bias=None):
        n, _ = validate_linear(x, qweight, scale, bias, op)
        return x.new_empty((*x.shape[:-1], n))

    return fake


for _op in ("int8_linear_w8a16", "int8_linear_w8a8"):
    torch.library.register_fake(f"lowbit::{_op}", _linear_fake(_op))


# ---------------------------------------------------------------- CPU
def bias_args(bias):
    return (0, 0) if bias is None else (bias.data_ptr(), _native.DTYPE_CODE[bias.dtype])


def quantize_per_token_cpu(x):
    op = "int8_quantize_per_token"
    validate_quantize(x, op)
    x2 = chk.rows(x)
    m, k = x2.shape
    q = torch.empty((m, k), dtype=torch.int8)
    s = torch.empty((m,), dtype=torch.float32)
    if m == 0:
        return q.view(x.shape), s.view(x.shape[:-1])
    st = _native._C.int8_quantize_per_token(
        x2.data_ptr(), _native.DTYPE_CODE[x.dtype], m, k, chk.row_stride(x2), q.data_ptr(), s.data_ptr(),
        _native.get_num_threads())
    _native.check(st, op)
    return q.view(x.shape), s.view(x.shape[:-1])


def run_cpu_kernel(kernel, op, x, k, weight_args: tuple, n, bias):
    """Calls a CPU linear kernel of any family: (x rows, *weight_args, bias, y [..., n], threads).
    Arguments are validated already; returns y (x without rows: y without rows, no call)."""
    x2 = chk.rows(x)
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype)
    if x2.shape[0] == 0:
        return y
    st = kernel(x2.data_ptr(), _native.DTYPE_CODE[x.dtype], x2.shape[0], k, chk.row_stride(x2), *weight_args,
                *bias_args(bias), y.data_ptr(), n, _native.get_num_threads())
    _native.check(st, op)
    return y


def weight_args(qweight, scale, n) -> tuple:
    """The INT8 weight arguments of a CPU linear kernel."""
    return qweight.data_ptr(), scale.data_ptr(), n


def run_linear_cpu(kernel, op, x, qweight, scale, bias, n, k):
    """Runs a validated CPU linear."""
    return run_cpu_kernel(kernel, op, x, k, weight_args(qweight, scale, n), n, bias)


def linear_w8a16_cpu(x, qweight, scale, bias=None):
    op = "int8_linear_w8a16"
    n, k = validate_linear(x, qweight, scale, bias, op)
    return run_linear_cpu(_native._C.int8_linear_w8a16, op, x, qweight, scale, bias, n, k)


def linear_w8a8_cpu(x, qweight, scale, bias=None):
    op = "int8_linear_w8a8"
    n, k = validate_linear(x, qweight, scale, bias, op)
    return run_linear_cpu(_native._C.int8_linear_w8a8, op, x, qweight, scale, bias, n, k)


_lib.impl("int8_quantize_per_token", quantize_per_token_cpu, "CPU")
_lib.impl("int8_linear_w8a16", linear_w8a16_cpu, "CPU")
_lib.impl("int8_linear_w8a8", linear_w8a8_cpu, "CPU")


# ---------------------------------------------------------------- CUDA
def quantize_per_token_cuda(x):
    op = "int8_quantize_per_token"
    validate_quantize(x, op)
    mod = _native.cuda_module()
    x2 = chk.rows(x)
    m, k = x2.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return q.view(x.shape), s.view(x.shape[:-1])
    st = mod.int8_quantize_per_token(
        x2.data_ptr(), _native.DTYPE_CODE[x.dtype], m, k, chk.row_stride(x2), q.data_ptr(), s.data_ptr(),
        x.device.index, _native.stream_of(x))
    _native.check(st, op)
    return q.view(x.shape), s.view(x.shape[:-1])


# K-split counters: zero before a call and left zero by it, so one buffer per (device, stream)
# serves every call in stream order. While a CUDA graph is being captured a fresh zeroed buffer
# is made per call instead: its zeroing becomes part of the graph, one more kernel per call on
# every replay. LOWBIT_CUDA_GRAPH_COUNTERS=shared (an experiment, read per call) has captured
# calls share one buffer per device instead, made and zeroed by the device's first eager call
# under the switch (the way vLLM's Marlin kernels share a zeroed workspace): no zeroing in the graph, but graphs
# holding such calls must not replay concurrently, nor may such calls run on parallel branches of
# one graph (captured from several streams). Without that buffer (no eager call before the
# capture) or beyond its size, the captured call takes a fresh one as by default. The shared
# buffers are never freed or replaced (graphs keep their address), and their zeroing has ended
# before any capture can start (a device synchronization, once per device).
_counters: dict = {}
_graph_counters: dict = {}
GRAPH_COUNTERS = 1 << 16  # per device: K-split counters for up to 65536 column blocks x row blocks


def cuda_counters(device: torch.device, stream: int, count: int) -> torch.Tensor:
    share = os.environ.get("LOWBIT_CUDA_GRAPH_COUNTERS") == "shared"
    if torch.cuda.is_current_stream_capturing():
        shared = _graph_counters.get(device.index)
        if share and shared is not None and count <= shared.numel():
            return shared
        return torch.zeros(count, dtype=torch.int32, device=device)
    if share and device.index not in _graph_counters:
        _graph_counters[device.index] = torch.zeros(GRAPH_COUNTERS, dtype=torch.int32, device=device)
        torch.cuda.synchronize(device)
    key = (device.index, stream)
    buf = _counters.get(key)
    if buf is None or buf.numel() < count:
        buf = _counters[key] = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
    return buf


# Weight-only layers (W8A16, W4A16) with more than DENSE_MIN_M rows: a CUDA kernel writes the
# weights dequantized (x's dtype, [N, K]) into a temporary and one cuBLAS GEMM takes them. The
# tensor-core kernel dequantizes every weight again for each block of 16-64 rows, so its time
# grows with M; the dense path costs one dequantization plus the GEMM. Measured (H100, one
# run of dev/gpu_sweep.py dense on 4096x4096 .. 28672x8192): the kernel is faster at M = 32
# (up to 2x, but for W4A16 on 4096x4096), the dense path from M = 64 (1.0-1.9x; within 2%
# slower on 28672x8192) and 1.4-4.4x faster from M = 96 up, hence the threshold.
DENSE_MIN_M = 48


def dense_linear(x, n: int, k: int, bias, dequantize, op: str) -> torch.Tensor:
    """y = x . w^T + bias on cuBLAS, w [n, k] (x's dtype) the temporary that dequantize(w, dtype
    code, device index, stream) fills with the layer's weights (a native status)."""
    w = torch.empty((n, k), dtype=x.dtype, device=x.device)
    _native.check(dequantize(w.data_ptr(), _native.DTYPE_CODE[x.dtype], x.device.index, _native.stream_of(x)), op)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def _linear_cuda(op, x, qweight, scale, bias):
    n, k = validate_linear(x, qweight, scale, bias, op)
    return run_linear_cuda(op, x, qweight, scale, bias, n, k)


def run_linear_cuda(op, x, qweight, scale, bias, n: int, k: int):
    """Runs a validated CUDA INT8 linear (the op's path, and the modules' eager one)."""
    mod = _native.cuda_module()
    x2 = chk.rows(x)
    m = x2.shape[0]
    dev, stream = x.device, _native.stream_of(x)
    if m == 0:
        return torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=dev)
    if op == "int8_linear_w8a16" and m > DENSE_MIN_M:
        return dense_linear(x, n, k, bias, functools.partial(mod.int8_dequantize_w8a16, qweight.data_ptr(),
                                                             scale.data_ptr(), n, k), op)
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=dev)
    code = _native.DTYPE_CODE[x.dtype]
    args = [x2.data_ptr(), code, m, k, chk.row_stride(x2), qweight.data_ptr(), scale.data_ptr(), n,
            *bias_args(bias), y.data_ptr(), n]
    if op == "int8_linear_w8a8":  # scratch for the per-token codes and scales, from torch's allocator
        qx = torch.empty((m, k), dtype=torch.int8, device=dev)
        sx = torch.empty((m,), dtype=torch.float32, device=dev)
        args += [qx.data_ptr(), sx.data_ptr()]
    else:  # W8A16 on tensor cores splits K when N alone does not fill the GPU (as W4A16)
        splits, count = mod.int8_w8a16_plan(m, k, n, code, _native.sm_count(dev), dev.index)
        partial = counters = None
        if count:  # (none when the splits form clusters: LOWBIT_CUDA_WOQ_REDUCE=cluster)
            partial = torch.empty((splits, m, (n + 15) // 16 * 16), dtype=torch.float32, device=dev)
            counters = cuda_counters(dev, stream, count)
        args += [splits, 0 if partial is None else partial.data_ptr(), 0 if counters is None else counters.data_ptr()]
    _native.check(getattr(mod, op)(*args, dev.index, stream), op)
    return y


def linear_w8a16_cuda(x, qweight, scale, bias=None):
    return _linear_cuda("int8_linear_w8a16", x, qweight, scale, bias)


def linear_w8a8_cuda(x, qweight, scale, bias=None):
    return _linear_cuda("int8_linear_w8a8", x, qweight, scale, bias)


_lib.impl("int8_quantize_per_token", quantize_per_token_cuda, "CUDA")
_lib.impl("int8_linear_w8a16", linear_w8a16_cuda, "CUDA")
_lib.impl("int8_linear_w8a8", linear_w8a8_cuda, "CUDA")


# ---------------------------------------------------------------- autograd
_TENSOR = object()  # (setup_context: where a saved tensor goes back among the weight arguments)


def register_input_grad(op: str, dequantize, lib=_lib) -> None:
    """Gradients of a linear op y = x . W^T + bias (x first, bias last) for x and bias, as for a
    frozen nn.Linear (what training adapters around quantized layers, QLoRA-style, needs):
    grad_x = grad_y . W in grad_y's dtype, as F.linear's backward, with W (fp32 [N, K])
    = dequantize(weight arguments, device type, K), the exact weights the kernels multiply by;
    grad_bias = grad_y summed over rows. W8A8 passes the gradient straight through its
    activation rounding. The quantized weights are frozen: one that requires grad is an error
    (rather than a gradient silently never computed). Double backward is not supported."""
    def setup_context(ctx, inputs, output):
        weights = inputs[1:-1]
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in weights):
            raise ValueError(f"lowbit.{op}: the quantized weights take no gradient (they are frozen; gradients "
                             "flow to x and bias): pass them detached")
        ctx.args = [_TENSOR if isinstance(t, torch.Tensor) else t for t in weights]
        ctx.save_for_backward(*[t for t in weights if isinstance(t, torch.Tensor)])
        ctx.k, ctx.device_type = inputs[0].shape[-1], inputs[0].device.type
        bias = inputs[-1]
        ctx.bias_dtype = None if bias is None else bias.dtype

    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        weights = [next(saved) if a is _TENSOR else a for a in ctx.args]
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ dequantize(*weights, ctx.device_type, ctx.k).to(grad.dtype)
        if ctx.needs_input_grad[-1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return grad_x, *([None] * len(weights)), grad_bias

    torch.library.register_autograd(f"lowbit::{op}", backward, setup_context=setup_context, lib=lib)


def dequantize(qweight, scale, device_type: str, k: int) -> torch.Tensor:
    """The INT8 weight of either layout as fp32 [N, K]."""
    codes = fmt.unpack_cpu(qweight, scale.shape[0], k) if device_type == "cpu" else qweight
    return codes.to(torch.float32) * scale[:, None]


for _op in ("int8_linear_w8a16", "int8_linear_w8a8"):
    register_input_grad(_op, dequantize)
chk.no_backward("int8_quantize_per_token", _lib, "a straight-through estimator (the codes are rounded)")


# ---------------------------------------------------------------- public
def int8_quantize_per_token(x: torch.Tensor) -> tuple:
    """Symmetric per-token int8: returns (q int8 [..., K], scale fp32 [...]), x ~= q * scale[..., None]."""
    chk.tensors("int8_quantize_per_token", x=x)
    return torch.ops.lowbit.int8_quantize_per_token(x)


def int8_linear_w8a16(x, qweight, scale, bias=None) -> torch.Tensor:
    """y = x . (qweight * scale[:, None])^T + bias, activations kept in float."""
    chk.tensors("int8_linear_w8a16", ("bias",), x=x, qweight=qweight, scale=scale, bias=bias)
    return torch.ops.lowbit.int8_linear_w8a16(chk.autocast(x), qweight, scale, bias)


def int8_linear_w8a8(x, qweight, scale, bias=None) -> torch.Tensor:
    """y = (q(x) . qweight^T) * scale_x[..., None] * scale + bias, with x quantized per token on the fly."""
    chk.tensors("int8_linear_w8a8", ("bias",), x=x, qweight=qweight, scale=scale, bias=bias)
    return torch.ops.lowbit.int8_linear_w8a8(chk.autocast(x), qweight, scale, bias)

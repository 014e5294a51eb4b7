"""CUDA INT8 kernels (lowbit._cuda, csrc/cuda/int8.cu) against lowbit.ref.int8.

Every GPU test carries ``@gpu`` (the ``cuda`` marker plus a skip when
``lowbit._native.cuda_unavailable_reason()`` is not None), so without a GPU they
skip cleanly. ``test_cuda_build_*`` always runs: it checks the compiled module
itself (archs string, argument checks that answer without a device).

Tests whose names contain ``small`` use tiny shapes; bench/gpu_check.sh runs them
(those with a bias) under compute-sanitizer: ``-k "small and not nobias"``.

Tolerances: fp32 outputs must be within 1e-5 (relative to max |ref|) of the
float64 reference; fp16/bf16 outputs within 2x the error of torch's own
F.linear at that dtype (on the dequantized operands) plus one ulp of max |ref|.
The per-token quantizer must match, bit for bit, the formula documented in
lowbit/ref/int8.py (inv = 127 / amax and scale = amax / 127 as correctly rounded
fp32 divisions, codes round-half-even): ``quantize_ref`` below. It equals
``ref.int8.quantize_per_token`` except where torch evaluates the reference's
``127.0 / amax`` as ``amax.reciprocal() * 127`` (an ulp off for some amax, which
flips about one code in a million; tests/test_int8.py reports that bug).
"""
from __future__ import annotations

import copy
import re
import zlib

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit import _native, ref
from lowbit.formats import int8 as fmt
from lowbit.nn import Int8Linear
from lowbit.ops import int8 as int8_ops

from conftest import built_cuda_module, capture_graph, cuda_detail, default_plan

_REASON = _native.cuda_unavailable_reason()


def gpu(fn):
    """Marks a test as needing lowbit's CUDA kernels and a GPU (skipped cleanly otherwise)."""
    fn = pytest.mark.skipif(_REASON is not None, reason=f"lowbit CUDA kernels unavailable: {_REASON}")(fn)
    return pytest.mark.cuda(fn)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


OPS = {
    "w8a16": cuda_detail(int8_ops.int8_linear_w8a16),
    "w8a8": cuda_detail(int8_ops.int8_linear_w8a8),
}
quantize_per_token = cuda_detail(int8_ops.int8_quantize_per_token)


def _ids(v):
    return DT_ID.get(v) if isinstance(v, torch.dtype) else None


@pytest.fixture
def cgen(request):
    """A CUDA generator seeded from the test id: fresh inputs per case, reproducible."""
    return torch.Generator(device="cuda").manual_seed(zlib.crc32(request.node.nodeid.encode()))


# ---------------------------------------------------------------- helpers
def randn(shape, gen, dtype=torch.float32):
    return torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)


def rand_weight(n, k, gen):
    """(qweight int8 [N, K] canonical, scale fp32 [N]) from a random float weight."""
    w = torch.randn((n, k), generator=gen, device="cuda") * 0.05
    return ref.int8.quantize_weight_per_channel(w)


def quantize_ref(x):
    """Per-token int8 codes and scales by the documented formula, on the CPU (see module doc)."""
    x32 = x.detach().cpu().to(torch.float32)
    finite = torch.isfinite(x32).all(dim=-1)
    amax = x32.abs().amax(dim=-1)
    c127 = torch.full_like(amax, 127.0)
    inv = torch.where(finite & (amax > 0), c127 / amax, torch.zeros_like(amax))  # tensor / tensor: true division
    q = torch.round(torch.nan_to_num(x32) * inv[..., None]).clamp_(-127, 127).to(torch.int8)
    scale = torch.where(finite, amax / c127, torch.full_like(amax, float("nan")))
    return q, scale


def poison_allocator(*nbytes):
    """Best effort: the caching allocator's next blocks of these sizes hold 0xff bytes
    (NaN in fp32/fp16/bf16), so an output element a kernel forgets to write shows up."""
    bufs = [torch.full((max(int(n), 1),), -1, dtype=torch.int8, device="cuda") for n in nbytes]
    del bufs


def ref_linear64(op, x, qw, s, bias):
    """The reference in float64 (not rounded to x's dtype), on x's device.

    W8A8 quantizes x with quantize_ref (the CUDA kernel matches it bit for bit), so
    only the epilogue's rounding separates kernel and reference."""
    if op == "w8a16":
        y = x.double() @ ref.int8.dequantize_weight(qw, s).T
    else:
        qx, sx = quantize_ref(x)
        qx, sx = qx.to(x.device), sx.to(x.device)
        y = (qx.double() @ qw.double().T) * sx.double()[..., None] * s.double()
    if bias is not None:
        y = y + bias.double()
    return y


def torch_linear_lowp(op, x, qw, s, bias):
    """torch's F.linear at x's dtype on the dequantized operands: the error budget."""
    dt = x.dtype
    w = ref.int8.dequantize_weight(qw, s).to(dt)
    if op == "w8a16":
        xx = x
    else:
        qx, sx = quantize_ref(x)
        xx = (qx.double() * sx.double()[..., None]).to(device=x.device, dtype=dt)
    return F.linear(xx, w, None if bias is None else bias.to(dt))


def assert_linear_close(y, y64, lowp, what):
    assert y.shape == y64.shape, f"{what}: shape {tuple(y.shape)} != {tuple(y64.shape)}"
    assert torch.isfinite(y64).all()
    bad = int((~torch.isfinite(y)).sum())
    assert bad == 0, f"{what}: {bad} of {y.numel()} outputs are NaN/Inf (unwritten?)"
    err = (y.double() - y64).abs().max().item()
    top = y64.abs().max().item()
    if y.dtype == torch.float32:
        tol = 1e-5 * top + 1e-30
        assert err <= tol, f"{what}: max abs err {err:.3e} > 1e-5 x max|ref| = {tol:.3e}"
    else:
        theirs = (lowp.double() - y64).abs().max().item()
        tol = 2.0 * theirs + torch.finfo(y.dtype).eps * top
        assert err <= tol, f"{what}: max abs err {err:.3e} > 2 x torch's {theirs:.3e} + 1 ulp of max|ref|"


def assert_quant_equal(q, s, q_ref, s_ref, what):
    assert q.dtype == torch.int8 and s.dtype == torch.float32, what
    assert q.shape == q_ref.shape and s.shape == s_ref.shape, what
    q, s = q.cpu(), s.cpu()
    nq = int((q != q_ref).sum())
    assert nq == 0, f"{what}: {nq} of {q.numel()} codes differ; first at {(q != q_ref).nonzero()[0].tolist()}"
    same = (s.view(torch.int32) == s_ref.view(torch.int32)) | (torch.isnan(s) & torch.isnan(s_ref))
    assert bool(same.all()), f"{what}: {int((~same).sum())} scales differ bitwise"


def check_linear(op, dtype, M, N, K, bias, gen, bias_dtype=None):
    x = randn((M, K), gen, dtype)
    qw, s = rand_weight(N, K, gen)
    b = randn((N,), gen, bias_dtype or dtype) if bias else None
    poison_allocator(M * N * x.element_size(), M * K, 4 * M)
    y = OPS[op](x, qw, s, b)
    assert y.dtype == dtype and y.device == x.device
    assert_linear_close(y, ref_linear64(op, x, qw, s, b), torch_linear_lowp(op, x, qw, s, b),
                        f"{op} {DT_ID[dtype]} M={M} N={N} K={K} bias={bias}")


# ---------------------------------------------------------------- always runs
def test_cuda_build_reports_archs():
    """With nvcc present, lowbit._cuda must import (unless the build said LOWBIT_CUDA=off),
    report its archs, and reject bad arguments without touching a device."""
    mod = built_cuda_module()
    archs = _native.cuda_built_archs()
    assert archs is not None and archs == mod.archs()
    assert re.fullmatch(r"(native|all|all-major|\d+[af]?(-real|-virtual)?)(;\d+[af]?(-real|-virtual)?)*", archs), archs
    reason = _native.cuda_unavailable_reason()
    assert reason is None or "built without" not in reason, reason

    bad, ok = _native.INVALID_ARGUMENT, _native.OK
    # argument order: x, x_dtype, M, K, ldx, q, scale, device, stream
    assert mod.int8_quantize_per_token(0, 0, 0, 4, 4, 0, 0, 0, 0) == ok          # M == 0: nothing to do
    assert mod.int8_quantize_per_token(0, 0, 1, 0, 0, 0, 0, 0, 0) == bad         # K == 0
    assert mod.int8_quantize_per_token(0, 3, 0, 4, 4, 0, 0, 0, 0) == bad         # dtype code
    assert mod.int8_quantize_per_token(0, 0, 0, 4, 3, 0, 0, 0, 0) == bad         # ldx < K
    assert mod.int8_quantize_per_token(0, 0, 2, 4, 4, 0, 0, 0, 0) == bad         # null pointers, M > 0
    # x, x_dtype, M, K, ldx, qweight, wscale, N, bias, bias_dtype, y, ldy, [splits, partial, counters | qx, sx,]
    # device, stream
    for fn, extra in ((mod.int8_linear_w8a16, (1, 0, 0)), (mod.int8_linear_w8a8, (0, 0))):
        assert fn(0, 0, 0, 8, 8, 0, 0, 4, 0, 0, 0, 4, *extra, 0, 0) == ok         # M == 0
        assert fn(0, 0, 1, 8, 8, 0, 0, 0, 0, 0, 0, 4, *extra, 0, 0) == bad        # N == 0
        assert fn(0, 0, 1, 8, 8, 0, 0, 4, 0, 0, 0, 3, *extra, 0, 0) == bad        # ldy < N
        assert fn(0, 7, 0, 8, 8, 0, 0, 4, 0, 0, 0, 4, *extra, 0, 0) == bad        # x dtype code
        assert fn(0, 0, 0, 8, 8, 0, 0, 4, 64, 9, 0, 4, *extra, 0, 0) == bad       # bias dtype code
        assert fn(0, 0, -1, 8, 8, 0, 0, 4, 0, 0, 0, 4, *extra, 0, 0) == bad       # M < 0
        assert fn(0, 0, 3, 8, 8, 0, 0, 4, 0, 0, 0, 4, *extra, 0, 0) == bad        # null pointers
        assert fn(0, 0, 64, 16, 16, 0, 0, 8, 0, 0, 0, 8, *extra, 0, 0) == bad     # null pointers, W8A8 mma shape
    assert mod.int8_linear_w8a16(0, 0, 0, 8, 8, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0, 0, 0) == bad  # splits < 1
    # W8A16's K split (host arithmetic): tensor cores for fp16 / bf16 with K % 16 == 0 only
    f16, bf16, f32 = (_native.DTYPE_CODE[t] for t in (torch.float16, torch.bfloat16, torch.float32))
    splits, count = mod.int8_w8a16_plan(1, 4096, 4096, f16, 132, -1)
    assert splits > 1 and count > 0, (splits, count)  # 64 column blocks do not fill 132 SMs
    assert mod.int8_w8a16_plan(1, 4096, 4096, bf16, 132, -1)[0] == splits
    assert mod.int8_w8a16_plan(1, 4096, 4096, f32, 132, -1) == (1, 0)
    assert mod.int8_w8a16_plan(1, 4100, 4096, f16, 132, -1) == (1, 0)
    # W8A8 scratch missing (fake non-null operands, never dereferenced): rejected before any device work
    assert mod.int8_linear_w8a8(16, 0, 64, 16, 16, 16, 16, 8, 0, 0, 16, 8, 0, 16, 0, 0) == bad
    assert mod.int8_linear_w8a8(16, 0, 64, 16, 16, 16, 16, 8, 0, 0, 16, 8, 16, 0, 0, 0) == bad
    # a device that cannot exist: CUDA_ERROR (nothing is launched), and last_error() says why
    assert isinstance(mod.last_error(), str)
    assert mod.int8_quantize_per_token(16, 0, 1, 4, 4, 16, 16, 1000, 0) == _native.CUDA_ERROR
    assert "selecting the device" in mod.last_error(), mod.last_error()


# ---------------------------------------------------------------- quantizer
QUANT_SMALL = [(1, 1), (1, 23), (3, 128), (17, 300), (2, 4096), (5, 16)]
# (3, 40000): rows past one chunk of the quantizer's registers (32768 at 16 bits, 16384 at fp32),
# 16-byte vectors; (2, 33001): the same, element by element
QUANT_LARGE = [(64, 4096), (300, 300), (2048, 4096), (7, 11008), (3, 40000), (2, 33001)]


@pytest.fixture(params=["default", "vec"])
def quantizer(request, monkeypatch):
    """The per-token quantizer with each kernel: the default and LOWBIT_CUDA_QUANT=vec (16-byte
    vectors, the row held in registers; read at every call)."""
    if request.param == "vec":
        monkeypatch.setenv("LOWBIT_CUDA_QUANT", "vec")
    else:
        monkeypatch.delenv("LOWBIT_CUDA_QUANT", raising=False)
    return request.param


def _check_quantize(x, what):
    q, s = quantize_per_token(x)
    q_ref, s_ref = quantize_ref(x)
    assert q.device == x.device and s.device == x.device
    assert_quant_equal(q, s, q_ref, s_ref, what)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("M,K", QUANT_SMALL)
def test_quantize_small(dtype, M, K, cgen, quantizer):
    poison_allocator(M * K, 4 * M)
    _check_quantize(randn((M, K), cgen, dtype) * 3, f"{DT_ID[dtype]} M={M} K={K}")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("M,K", QUANT_LARGE)
def test_quantize(dtype, M, K, cgen, quantizer):
    _check_quantize(randn((M, K), cgen, dtype), f"{DT_ID[dtype]} M={M} K={K}")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_quantize_strided_and_batched_small(dtype, cgen, quantizer):
    big = randn((6, 150), cgen, dtype)
    _check_quantize(big[:, 3:103], f"{DT_ID[dtype]} strided rows (ldx=150, offset 3)")
    big = randn((6, 160), cgen, dtype)
    _check_quantize(big[:, 8:104], f"{DT_ID[dtype]} strided 16-byte rows (ldx=160, offset 8)")
    _check_quantize(randn((2, 3, 37), cgen, dtype), f"{DT_ID[dtype]} 3-D x")
    q, s = quantize_per_token(randn((2, 3, 37), cgen, dtype))
    assert q.shape == (2, 3, 37) and s.shape == (2, 3)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_quantize_special_values_small(dtype, cgen, quantizer):
    K = 40
    x = randn((9, K), cgen, torch.float32)
    x[0, 5] = float("nan")
    x[1, 0] = float("inf")
    x[2, K - 1] = float("-inf")
    x[3] = 0.0                                       # all-zero row -> scale 0, codes 0
    x[4] = torch.linspace(-1.0, 1.0, K, device="cuda") * 1e-3
    x[5, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5])  # ties
    x[5, 8:] = 0.25
    x[6] = x[6] * 1e4
    x[7] = 0.0
    x[7, 17] = -3.0                                  # single non-zero
    x = x.to(dtype)
    q, s = quantize_per_token(x)
    q_ref, s_ref = quantize_ref(x)
    assert_quant_equal(q, s, q_ref, s_ref, f"{DT_ID[dtype]} special rows")
    s = s.cpu()
    assert torch.isnan(s[:3]).all() and (q[:3] == 0).all()
    assert s[3] == 0 and (q[3] == 0).all()


# ---------------------------------------------------------------- linear layers
# (M, N, K): 1, primes, non-multiples of every tile (16 rows of x, 8 rows of W, 16 / 512 along K)
LINEAR_SMALL = [(1, 1, 1), (1, 37, 23), (3, 1, 128), (3, 37, 300), (2, 16, 64), (8, 37, 48),
                (17, 37, 23), (17, 9, 128), (16, 8, 16), (9, 37, 64), (12, 24, 4112), (5, 3, 1), (40, 16, 64),
                (129, 37, 23), (160, 16, 64)]
LINEAR = [(1, 576, 4096), (1, 4096, 300), (16, 4096, 4096), (17, 576, 300), (64, 37, 4096),
          (300, 576, 128), (16, 4096, 23), (3, 4096, 4096)]
LINEAR_LARGE = [(2048, 4096, 4096, torch.float16), (2048, 37, 300, torch.float32), (2048, 576, 23, torch.bfloat16)]


@gpu
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("M,N,K", LINEAR_SMALL)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_linear_small(op, dtype, M, N, K, bias, cgen):
    check_linear(op, dtype, M, N, K, bias, cgen)


@gpu
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("M,N,K", LINEAR)
def test_linear(op, dtype, M, N, K, cgen):
    check_linear(op, dtype, M, N, K, (M + N + K) % 2 == 0, cgen)


@gpu
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("M,N,K,dtype", LINEAR_LARGE, ids=lambda v: _ids(v))
def test_linear_large_m(op, M, N, K, dtype, cgen):
    check_linear(op, dtype, M, N, K, True, cgen)


@gpu
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype,bias_dtype", [(torch.float16, torch.float32), (torch.float32, torch.bfloat16),
                                              (torch.bfloat16, torch.float16)], ids=_ids)
def test_linear_bias_dtype_small(op, dtype, bias_dtype, cgen):
    check_linear(op, dtype, 5, 37, 64, True, cgen, bias_dtype=bias_dtype)


@gpu
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_linear_strided_x_small(op, dtype, cgen):
    """x rows further apart than K, and a misaligned start (scalar load path with K % 16 == 0)."""
    M, N, K = 5, 37, 64
    qw, s = rand_weight(N, K, cgen)
    big = randn((M, K + 24), cgen, dtype)
    for x in (big[:, :K], big[:, 1:K + 1], big[:, 8:K + 8], randn((K, M), cgen, dtype).t()):
        y = OPS[op](x, qw, s)
        assert_linear_close(y, ref_linear64(op, x, qw, s, None), torch_linear_lowp(op, x, qw, s, None),
                            f"{op} {DT_ID[dtype]} strides {x.stride()} offset {x.storage_offset()}")


@gpu
@pytest.mark.parametrize("op", list(OPS))
def test_linear_batched_x_small(op, cgen):
    qw, s = rand_weight(37, 23, cgen)
    x = randn((2, 3, 23), cgen, torch.float32)
    y = OPS[op](x, qw, s)
    assert y.shape == (2, 3, 37)
    y2 = OPS[op](x.reshape(6, 23), qw, s).reshape(2, 3, 37)
    assert torch.equal(y, y2)


@gpu
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_native_poisoned_outputs_small(op, dtype, cgen):
    """Direct calls into lowbit._cuda with poisoned outputs and padded rows: every output
    element written, nothing outside [M, N] of a wider y touched."""
    mod = _native.cuda_module()
    code = _native.DTYPE_CODE[dtype]
    # the last two take the W8A8 tensor-core path (M >= 64, K % 16 == 0); W8A16 takes its tensor-core
    # path for fp16 / bf16 when K % 16 == 0, split along K at (1, 5, 512) and (2, 8, 1024)
    for M, N, K in [(3, 37, 23), (17, 9, 128), (1, 5, 512), (2, 8, 1024), (65, 37, 48), (130, 9, 1040)]:
        ldx, ldy = K + 8, N + 5
        x = randn((M, ldx), cgen, dtype)
        qw, s = rand_weight(N, K, cgen)
        b = randn((N,), cgen, dtype)
        y_all = torch.full((M + 2, ldy), float("nan"), dtype=dtype, device="cuda")  # 2 rows past M
        y = y_all[:M]
        stream = torch.cuda.current_stream().cuda_stream
        dev = torch.cuda.current_device()
        if op == "w8a16":  # the plan's K split, with its scratch (poisoned partial sums)
            splits, count = mod.int8_w8a16_plan(M, K, N, code, _native.sm_count(x.device), x.device.index)
            partial = torch.full((splits, M, (N + 15) // 16 * 16), float("nan"), device="cuda")
            counters = torch.zeros(max(count, 1), dtype=torch.int32, device="cuda")
            st = mod.int8_linear_w8a16(x.data_ptr(), code, M, K, ldx, qw.data_ptr(), s.data_ptr(), N,
                                       b.data_ptr(), code, y.data_ptr(), ldy, splits, partial.data_ptr(),
                                       counters.data_ptr(), dev, stream)
        else:
            qx = torch.full((M, K), -128, dtype=torch.int8, device="cuda")
            sx = torch.full((M,), float("nan"), device="cuda")
            st = mod.int8_linear_w8a8(x.data_ptr(), code, M, K, ldx, qw.data_ptr(), s.data_ptr(), N,
                                      b.data_ptr(), code, y.data_ptr(), ldy, qx.data_ptr(), sx.data_ptr(), dev,
                                      stream)
        assert st == _native.OK
        torch.cuda.synchronize()
        xv = x[:, :K]
        what = f"{op} {DT_ID[dtype]} M={M} N={N} K={K} ldx={ldx} ldy={ldy}"
        assert torch.isnan(y[:, N:]).all(), f"{what}: wrote past N into the row padding"
        assert torch.isnan(y_all[M:]).all(), f"{what}: wrote rows past M"
        assert_linear_close(y[:, :N], ref_linear64(op, xv, qw, s, b), torch_linear_lowp(op, xv, qw, s, b), what)
        if op == "w8a16":
            assert not counters.any(), f"{what}: the K-split counters were not left at zero"
        if op == "w8a8":
            q_ref, s_ref = quantize_ref(xv)
            assert_quant_equal(qx, sx, q_ref, s_ref, what + " (scratch)")

    # the quantizer, directly, with poisoned outputs
    M, K, ldx = 7, 300, 301
    x = randn((M, ldx), cgen, dtype)
    q = torch.full((M, K), -128, dtype=torch.int8, device="cuda")
    sc = torch.full((M,), float("nan"), device="cuda")
    st = mod.int8_quantize_per_token(x.data_ptr(), code, M, K, ldx, q.data_ptr(), sc.data_ptr(),
                                     torch.cuda.current_device(), torch.cuda.current_stream().cuda_stream)
    assert st == _native.OK
    q_ref, s_ref = quantize_ref(x[:, :K])
    assert_quant_equal(q, sc, q_ref, s_ref, f"quantize {DT_ID[dtype]} direct")


@gpu
@pytest.mark.parametrize("op", list(OPS))
def test_linear_nonfinite_x_small(op, cgen):
    """NaN in a row of x: that row's outputs are NaN (W8A8: scale NaN), the others are exact."""
    M, N, K = 4, 37, 64
    x = randn((M, K), cgen)
    x[2, 7] = float("nan")
    qw, s = rand_weight(N, K, cgen)
    y = OPS[op](x, qw, s)
    assert torch.isnan(y[2]).all()
    keep = [0, 1, 3]
    assert_linear_close(y[keep], ref_linear64(op, x[keep], qw, s, None), None, f"{op} finite rows")


# ---------------------------------------------------------------- W8A8 on tensor cores
# int8_linear_w8a8 runs the mma.sync kernel (128 x 128 tiles of y, k steps of 64) when
# M >= 64, K % 16 == 0 and qx / qweight are 16-byte aligned, the dp4a kernel otherwise.
# Shapes: M around 64 / 128 / 512, N below / around / past 8, 16 and 128, K multiples
# of 16 that are not multiples of 64 (a zero-filled k tail), and K % 16 != 0 (dp4a).
W8A8_MMA_SMALL = [(64, 8, 16), (65, 100, 48), (127, 129, 80), (200, 9, 16), (70, 37, 23)]
W8A8_MMA = [(513, 129, 4112), (64, 4096, 4096), (200, 100, 4112), (257, 4096, 48), (130, 576, 1040),
            (64, 100, 4100)]


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("M,N,K", W8A8_MMA_SMALL)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_w8a8_mma_small(dtype, M, N, K, bias, cgen):
    check_linear("w8a8", dtype, M, N, K, bias, cgen)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("M,N,K", W8A8_MMA)
def test_w8a8_mma(dtype, M, N, K, cgen):
    check_linear("w8a8", dtype, M, N, K, (M + N + K) % 2 == 1, cgen)


def w8a8_same_bits_under(monkeypatch, switches: dict, x, qw, s, b=None):
    """W8A8 of (x, qw, s, b) as the environment stands, then again with the kernel `switches`
    set: equal bit for bit. Returns the first result."""
    y = OPS["w8a8"](x, qw, s, b)
    for name, value in switches.items():
        monkeypatch.setenv(name, value)
    assert torch.equal(OPS["w8a8"](x, qw, s, b), y), f"{switches} changed the bits"
    return y


@gpu
@pytest.mark.parametrize("M,N,K", [(3, 37, 300), (17, 576, 4096), (257, 4096, 48), (64, 40, 33001)])
def test_w8a8_vec_quantizer_agrees_small(M, N, K, cgen, monkeypatch):
    """W8A8 with LOWBIT_CUDA_QUANT=vec gives the same bits as with the default quantizer: the
    dp4a and tensor-core paths, ragged K (element by element) and a row past one chunk."""
    x = randn((M, K), cgen, torch.float16)
    qw, s = rand_weight(N, K, cgen)
    w8a8_same_bits_under(monkeypatch, {"LOWBIT_CUDA_QUANT": "vec"}, x, qw, s)


# On an H100 / H200 (132 SMs): 128 x 128 tiles with k past K (K = 16, 48), ragged N and k tails
# (4112 = 32 x 128 + 16); 144 tiles (some CTAs take two: the 6-stage ring wraps across tiles,
# 9 k tiles each; the default there is mma.sync); 128 x 256 tiles, 528 of them (4 per CTA, a
# 4-stage ring), and a long K (the TMA kernel by default). "small" ids: the memcheck subset.
@gpu
@pytest.mark.parametrize("kernel", ["default", "tma", "cluster", "cluster4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_ids)
@pytest.mark.parametrize("M,N,K", [pytest.param(*c, id="small-{}x{}x{}".format(*c))
                                   for c in [(64, 8, 16), (200, 129, 4112), (257, 4096, 48)]]
                         + [(1030, 2000, 1040), (4100, 4096, 1040), (2048, 2600, 10240)])
def test_w8a8_tensor_core_kernels_agree(kernel, dtype, M, N, K, cgen, monkeypatch):
    """On sm_90a, W8A8's tensor-core path is the persistent TMA + wgmma kernel where it is the
    faster one (outputs up to 4M elements, or K >= 8192; LOWBIT_CUDA_W8A8=tma: everywhere), else
    mma.sync (LOWBIT_CUDA_W8A8=mma: everywhere); LOWBIT_CUDA_W8A8=cluster / cluster4 run the TMA
    kernel everywhere with clusters of two / four CTAs sharing the weight copies (row-tile counts
    that are not a multiple leave CTAs a tile past M: 1, 2, 3, 9 and 33 row tiles here). All
    sum the same int32 products and share the epilogue: equal bit for bit (on other GPUs every
    call takes mma.sync, and this checks only that the switches are harmless)."""
    x = randn((M, K), cgen, dtype)
    qw, s = rand_weight(N, K, cgen)
    b = randn((N,), cgen, dtype)
    if kernel != "default":
        monkeypatch.setenv("LOWBIT_CUDA_W8A8", kernel)
    y = w8a8_same_bits_under(monkeypatch, {"LOWBIT_CUDA_W8A8": "mma"}, x, qw, s, b)
    assert_linear_close(y, ref_linear64("w8a8", x, qw, s, b), torch_linear_lowp("w8a8", x, qw, s, b),
                        f"w8a8 {kernel} {DT_ID[dtype]} M={M} N={N} K={K}")


# The W8A8 product kernels launched to overlap the quantizer (LOWBIT_CUDA_W8A8_PDL=1): dp4a, the
# opt-in tensor-core decode, mma.sync, and on sm_90a the TMA kernel alone and in clusters.
PDL_KERNELS = {"dp4a": {}, "decode": {"LOWBIT_CUDA_W8A8_DECODE": "mma"}, "mma": {"LOWBIT_CUDA_W8A8": "mma"},
               "tma": {"LOWBIT_CUDA_W8A8": "tma"}, "cluster": {"LOWBIT_CUDA_W8A8": "cluster"},
               "cluster4": {"LOWBIT_CUDA_W8A8": "cluster4"}}


@gpu
@pytest.mark.parametrize("kernel,M,N,K", [("dp4a", 3, 4096, 4096), ("decode", 5, 4096, 4096), ("mma", 200, 2000, 4096),
                                          ("tma", 257, 4096, 1040), ("cluster", 300, 512, 1040),
                                          ("cluster4", 600, 512, 1040)])
def test_w8a8_quantizer_overlap_agrees_small(kernel, M, N, K, cgen, monkeypatch):
    """LOWBIT_CUDA_W8A8_PDL=1 (an experiment) launches W8A8's product kernel to overlap the
    quantizer's end, and the kernel waits for the quantizer before it reads qx and sx: the same
    bits as the plain launch, for fresh x call after call (a read before the quantizer ended would
    see the previous call's codes and scales, left in the reused scratch), and in a CUDA graph."""
    for name, value in PDL_KERNELS[kernel].items():
        monkeypatch.setenv(name, value)
    qw, s = rand_weight(N, K, cgen)
    b = randn((N,), cgen, torch.float16)
    xs = [randn((M, K), cgen, torch.float16) * (1 + 3 * i) for i in range(3)]
    want = [OPS["w8a8"](x, qw, s, b) for x in xs]
    monkeypatch.setenv("LOWBIT_CUDA_W8A8_PDL", "1")
    for _ in range(2):
        for i, x in enumerate(xs):
            assert torch.equal(OPS["w8a8"](x, qw, s, b), want[i]), f"{kernel}: x {i} differs"
    x = xs[0].clone()
    g, y = capture_graph(lambda: OPS["w8a8"](x, qw, s, b))
    for i in (1, 2, 0):
        x.copy_(xs[i])
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, want[i]), f"{kernel}: graph replay with x {i} differs"


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("M,N,K", [(1, 37, 48), (3, 4096, 4096), (8, 129, 4112), (5, 1000, 11008), (2, 16, 16),
                                   (7, 40, 131072), (2, 20, 131088), (4, 33, 100)])
def test_w8a8_tensor_core_decode_agrees_small(dtype, M, N, K, cgen, monkeypatch):
    """LOWBIT_CUDA_W8A8_DECODE=mma (an experiment) runs M <= 8 on int8 tensor cores
    (w8a8_decode_kernel: K split over a block's warps, ragged N and k tiles, K up to one exact
    int32 chunk; K % 16 != 0 and longer K keep dp4a): the same int32 sums and epilogue as the
    dp4a kernel, so the same bits."""
    x = randn((M, K), cgen, dtype)
    qw, s = rand_weight(N, K, cgen)
    b = randn((N,), cgen, dtype)
    w8a8_same_bits_under(monkeypatch, {"LOWBIT_CUDA_W8A8_DECODE": "mma"}, x, qw, s, b)
    assert torch.equal(OPS["w8a8"](x, qw, s), OPS["w8a8"](x, qw, s)), "not deterministic"


@gpu
@pytest.mark.parametrize("kernel", ["default", "mma"])
@pytest.mark.parametrize("M,N,K", [(16, 4096, 4096), (17, 129, 4112), (33, 576, 48), (63, 1000, 1040)])
def test_w8a8_tensor_cores_from_m16_agree_small(kernel, M, N, K, cgen, monkeypatch):
    """LOWBIT_CUDA_W8A8_MIN_M=16 (an experiment) runs M = 16..63 on the tensor-core kernels
    instead of dp4a: the same int32 sums and epilogue, so the same bits."""
    x = randn((M, K), cgen, torch.float16)
    qw, s = rand_weight(N, K, cgen)
    b = randn((N,), cgen, torch.float16)
    switches = {"LOWBIT_CUDA_W8A8_MIN_M": "16"} | ({} if kernel == "default" else {"LOWBIT_CUDA_W8A8": kernel})
    w8a8_same_bits_under(monkeypatch, switches, x, qw, s, b)


@gpu
@pytest.mark.parametrize("kernel", ["default", "tma", "cluster", "cluster4", "mma"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_w8a8_tensor_core_strided_y_small(kernel, dtype, cgen, monkeypatch):
    """The tensor-core epilogue into a y with padded rows (direct calls, poisoned): an even row
    stride (column pairs in one store, whole tiles unchecked), an odd one (element stores: no
    pair is aligned), and y starting one element past an aligned address; the values equal the
    contiguous op's bit for bit, nothing past N or M is touched."""
    mod = _native.cuda_module()
    code = _native.DTYPE_CODE[dtype]
    if kernel != "default":
        monkeypatch.setenv("LOWBIT_CUDA_W8A8", kernel)
    for M, N, K, pad, offset in [(130, 256, 64, 2, 0), (130, 256, 64, 1, 0), (200, 130, 1040, 3, 0),
                                 (256, 128, 48, 0, 1), (65, 37, 48, 5, 0)]:
        x = randn((M, K), cgen, dtype)
        qw, s = rand_weight(N, K, cgen)
        b = randn((N,), cgen, dtype)
        ldy = N + pad
        flat = torch.full(((M + 2) * ldy + offset,), float("nan"), dtype=dtype, device="cuda")
        y_all = flat[offset:].view(M + 2, ldy)  # 2 rows past M
        y = y_all[:M]
        qx = torch.empty((M, K), dtype=torch.int8, device="cuda")
        sx = torch.empty((M,), device="cuda")
        st = mod.int8_linear_w8a8(x.data_ptr(), code, M, K, K, qw.data_ptr(), s.data_ptr(), N, b.data_ptr(), code,
                                  y.data_ptr(), ldy, qx.data_ptr(), sx.data_ptr(), torch.cuda.current_device(),
                                  torch.cuda.current_stream().cuda_stream)
        assert st == _native.OK
        what = f"w8a8 {kernel} {DT_ID[dtype]} M={M} N={N} K={K} ldy={ldy} offset={offset}"
        assert torch.isnan(y[:, N:]).all(), f"{what}: wrote past N into the row padding"
        assert torch.isnan(y_all[M:]).all(), f"{what}: wrote rows past M"
        assert torch.equal(y[:, :N], OPS["w8a8"](x, qw, s, b)), f"{what}: differs from the contiguous call"


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("M,N,K", [(64, 100, 48), (130, 129, 4112)])
def test_w8a8_mma_matches_dp4a_small(dtype, M, N, K, cgen):
    """Both W8A8 kernels sum the same int32 products exactly and apply the same fp32
    epilogue, so they agree bit for bit: rows quantize independently, so the first 63
    rows of an M-row call (tensor cores) equal a 63-row call (dp4a), and a weight at a
    16-byte misaligned address (dp4a at any M) gives the same y as an aligned one."""
    x = randn((M, K), cgen, dtype)
    qw, s = rand_weight(N, K, cgen)
    b = randn((N,), cgen, dtype)
    y = OPS["w8a8"](x, qw, s, b)
    assert torch.equal(y[:63], OPS["w8a8"](x[:63], qw, s, b)), "tensor-core rows differ from dp4a rows"
    raw = torch.empty(N * K + 16, dtype=torch.int8, device="cuda")
    qw_off = raw[1:1 + N * K].view(N, K)
    qw_off.copy_(qw)
    assert qw_off.data_ptr() % 16 != 0
    assert torch.equal(OPS["w8a8"](x, qw_off, s, b), y), "misaligned weight (dp4a) differs from tensor cores"


# W8A16 on tensor cores (fp16 / bf16, K % 16 == 0): 1, 16-row and 64-row tiles and past them,
# columns past a 16-column tile, K in whole 64-k tiles or ending inside one, K splits (N = 4096
# or 576 at small M fill too few blocks), and a grid of more than one M block
W8A16_TC_SMALL = [(1, 37, 48), (2, 16, 16), (17, 9, 1040), (65, 37, 64)]
W8A16_TC = [(1, 4096, 4096), (5, 576, 11008), (16, 4096, 4096), (33, 300, 4112), (64, 4096, 512), (130, 37, 4096)]


@pytest.fixture(params=["auto", "simt"])
def w8a16_kernel(request, monkeypatch):
    """W8A16 with each kernel: the default (tensor cores where they apply) and
    LOWBIT_CUDA_W8A16=simt (the CUDA-core GEMV; read at every call)."""
    if request.param == "simt":
        monkeypatch.setenv("LOWBIT_CUDA_W8A16", "simt")
    else:
        monkeypatch.delenv("LOWBIT_CUDA_W8A16", raising=False)
    return request.param


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_ids)
@pytest.mark.parametrize("M,N,K", W8A16_TC_SMALL)
def test_w8a16_tensor_cores_small(dtype, M, N, K, w8a16_kernel, cgen):
    check_linear("w8a16", dtype, M, N, K, (M + N) % 2 == 0, cgen)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_ids)
@pytest.mark.parametrize("M,N,K", W8A16_TC)
def test_w8a16_tensor_cores(dtype, M, N, K, w8a16_kernel, cgen):
    check_linear("w8a16", dtype, M, N, K, (M + N) % 2 == 1, cgen)


_TC_SHAPES = W8A16_TC_SMALL + W8A16_TC


@gpu
@pytest.mark.parametrize("var,value,M,N,K",
                         [("LOWBIT_CUDA_WOQ_COPY", "bulk") + c for c in _TC_SHAPES if c[0] <= 16]
                         + [("LOWBIT_CUDA_WOQ_TILES", "2") + c for c in _TC_SHAPES + [(3, 48, 2048), (12, 48, 2048)]
                            if c[0] <= 16]
                         + [("LOWBIT_CUDA_WOQ_BLOCKS", n) + c for n in ("6", "8")
                            for c in _TC_SHAPES + [(3, 48, 2048)] if c[0] <= 16]
                         + [("LOWBIT_CUDA_WOQ_REDUCE", "cluster") + c for c in _TC_SHAPES + [(12, 1024, 8192)]
                            if c[0] <= 16])
def test_w8a16_opt_in_kernels_agree(var, value, M, N, K, cgen, monkeypatch):
    """The opt-in tensor-core variants give the same bits as the default kernel at its K split
    (the same sums in the same order) on the tensor-core shapes they take: K splits, N past a
    16-row tile, K ending inside a tile, the m16 tile; and at their own plan, the reference's
    results.
    * LOWBIT_CUDA_WOQ_COPY=bulk (sm_90a, M <= 16): lane 0 copies each 64 k x 16-row tile with
      one TMA box onto an mbarrier, zeros past N and K (elsewhere both calls take cp.async);
    * LOWBIT_CUDA_WOQ_TILES=2 (M <= 16): two column tiles per warp; odd counts of 16-row tiles
      (N = 37, 48) put a warp's second tile past the last;
    * LOWBIT_CUDA_WOQ_BLOCKS=6 / 8 (M <= 16): the M <= 8 kernel in 80 / 64 registers, 6 / 8
      blocks per SM; M = 9-16 on 5 blocks;
    * LOWBIT_CUDA_WOQ_REDUCE=cluster (M <= 16, sm_90a): the K split's blocks as one cluster,
      adding their sums through shared memory in split order, at most 8 splits (where the
      default makes more, e.g. N = 37 or 1024, only the reference check applies).
    (TILES and BLOCKS plan for more resident blocks per SM: a finer K split than the default's.)"""
    mod = built_cuda_module()
    dtype = torch.bfloat16 if (M + N) % 2 else torch.float16
    x = randn((M, K), cgen, dtype)
    qw, s = rand_weight(N, K, cgen)
    y = OPS["w8a16"](x, qw, s)
    monkeypatch.setenv(var, value)
    with monkeypatch.context() as mp:
        planned = default_plan(mod.int8_w8a16_plan, var)
        mp.setattr(mod, "int8_w8a16_plan", planned)
        splits = planned(M, K, N, _native.DTYPE_CODE[dtype], _native.sm_count(x.device), x.device.index)[0]
        if var != "LOWBIT_CUDA_WOQ_REDUCE" or splits <= 8:  # (a cluster takes at most 8 splits)
            assert torch.equal(OPS["w8a16"](x, qw, s), y)
    check_linear("w8a16", dtype, M, N, K, True, cgen)


@gpu
def test_w8a16_extreme_codes_small(cgen):
    """Codes -128 and 127 only (the ends of the exact int8 -> fp16 / bf16 conversion in the
    tensor-core path), against the float64 reference."""
    M, N, K = 3, 40, 64
    qw = torch.where(torch.rand((N, K), generator=cgen, device="cuda") < 0.5, -128, 127).to(torch.int8)
    s = torch.full((N,), 3.0e-2, device="cuda")
    for dtype in (torch.float16, torch.bfloat16):
        x = randn((M, K), cgen, dtype)
        y = OPS["w8a16"](x, qw, s)
        assert_linear_close(y, ref_linear64("w8a16", x, qw, s, None), torch_linear_lowp("w8a16", x, qw, s, None),
                            f"extreme codes {DT_ID[dtype]}")


@gpu
def test_w8a8_mma_nonfinite_x_small(cgen):
    """Non-finite rows on the tensor-core path: their outputs are NaN, the other rows exact."""
    M, N, K = 70, 37, 64
    x = randn((M, K), cgen)
    x[2, 7] = float("nan")
    x[M - 1, 0] = float("inf")
    qw, s = rand_weight(N, K, cgen)
    y = OPS["w8a8"](x, qw, s)
    assert torch.isnan(y[2]).all() and torch.isnan(y[M - 1]).all()
    keep = [i for i in range(M) if i not in (2, M - 1)]
    assert_linear_close(y[keep], ref_linear64("w8a8", x[keep], qw, s, None), None, "w8a8 mma finite rows")


# ---------------------------------------------------------------- bad input
@gpu
@pytest.mark.parametrize("op", list(OPS))
def test_bad_input_small(op, cgen):
    fn = OPS[op]
    N, K = 37, 64
    x = randn((3, K), cgen)
    qw, s = rand_weight(N, K, cgen)
    with pytest.raises(ValueError, match="qweight"):
        fn(x, qw[:, :-1].contiguous(), s)                  # wrong shape
    with pytest.raises(ValueError, match="qweight"):
        fn(x, qw.view(N * K), s)                            # wrong rank
    with pytest.raises(ValueError):
        fn(x, qw.t(), s)                                    # not contiguous (or wrong shape)
    with pytest.raises(TypeError, match="qweight"):
        fn(x, qw.float(), s)                                # wrong dtype
    with pytest.raises(TypeError, match="scale"):
        fn(x, qw, s.half())
    with pytest.raises(TypeError, match="x"):
        fn(x.to(torch.int32), qw, s)
    with pytest.raises(ValueError, match="cpu"):
        fn(x, fmt.pack_cpu(qw.cpu()), s.cpu())              # x on cuda, (valid) weights on cpu
    with pytest.raises(ValueError):
        fn(x, qw.cpu(), s.cpu())                            # canonical weights on cpu (not packed)
    with pytest.raises(ValueError):
        fn(x, qw, s.cpu())                                  # weights split across devices
    with pytest.raises(ValueError):
        fn(x.cpu(), qw, s)                                  # x on cpu, weights on cuda
    with pytest.raises(ValueError, match="bias"):
        fn(x, qw, s, randn((N + 1,), cgen))
    with pytest.raises(ValueError):
        fn(x, qw, s, randn((N,), cgen).cpu())
    with pytest.raises(ValueError):
        fn(x[:, :0], qw[:, :0].contiguous(), s)             # empty
    m = Int8Linear.from_float(torch.nn.Linear(K, N), op)    # on the CPU
    with pytest.raises(ValueError):
        m(x)                                                # x on cuda


@gpu
def test_quantize_bad_input_small(cgen):
    with pytest.raises(TypeError):
        quantize_per_token(torch.ones(3, 4, dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError):
        quantize_per_token(torch.empty(3, 0, device="cuda"))


@gpu
@pytest.mark.parametrize("op", list(OPS))
def test_x_without_rows_small(op, cgen):
    """M = 0 gives an empty y [..., 0, N] (and the quantizer empty codes and scales) on x's device
    without a launch; the arguments are still checked."""
    N, K = 40, 64
    qw, s = rand_weight(N, K, cgen)
    for shape in ((0, K), (2, 0, K)):
        for dtype in DTYPES:
            x = torch.empty(shape, dtype=dtype, device="cuda")
            y = OPS[op](x, qw, s, randn((N,), cgen))
            assert y.shape == (*shape[:-1], N) and y.dtype == dtype and y.device == qw.device
            q, sx = quantize_per_token(x)
            assert q.shape == shape and q.dtype == torch.int8 and sx.shape == shape[:-1] and q.is_cuda
    x = torch.empty(0, K, device="cuda")
    with pytest.raises(ValueError, match="K=32"):
        OPS[op](x[:, :32], qw, s)
    with pytest.raises(ValueError):
        OPS[op](x.cpu(), qw, s)
    with pytest.raises(ValueError, match="bias"):
        OPS[op](x, qw, s, randn((N + 1,), cgen))


# ---------------------------------------------------------------- modules
@gpu
@pytest.mark.parametrize("scheme", list(OPS))
def test_module_cuda_matches_cpu(scheme, cgen):
    torch.manual_seed(zlib.crc32(scheme.encode()))
    lin = torch.nn.Linear(300, 576)
    m_cpu = Int8Linear.from_float(lin, scheme)
    x = torch.randn(5, 300)
    y_cpu = m_cpu(x)

    m_gpu = copy.deepcopy(m_cpu).cuda()
    assert m_gpu.qweight.device.type == "cuda" and tuple(m_gpu.qweight.shape) == (576, 300)
    assert torch.equal(m_gpu.qweight.cpu(), m_cpu.canonical_qweight())
    y_gpu = m_gpu(x.cuda())
    assert y_gpu.device.type == "cuda" and y_gpu.dtype == torch.float32
    top = y_cpu.abs().max().item()
    tol = 1e-5 * top
    if scheme == "w8a8":
        # The CPU and CUDA quantizers may round a rare code differently if their
        # arithmetic differs from the reference; allow two codes per row.
        _, sx = quantize_ref(x)
        tol += 2 * 127 * sx.max().item() * m_cpu.scale.max().item()
    err = (y_gpu.cpu() - y_cpu).abs().max().item()
    assert err <= tol, f"{scheme}: CUDA vs CPU module max abs err {err:.3e} > {tol:.3e}"
    # and the CUDA module against the reference directly
    y64 = ref_linear64(scheme, x.cuda(), m_gpu.qweight, m_gpu.scale, m_gpu.bias)
    assert_linear_close(y_gpu, y64, None, f"{scheme} module")

    # .cpu() brings back the packed layout and the same outputs
    m_back = copy.deepcopy(m_gpu).cpu()
    assert torch.equal(m_back.qweight, m_cpu.qweight)
    assert torch.equal(m_back.scale, m_cpu.scale) and torch.equal(m_back.bias, m_cpu.bias)
    assert torch.equal(m_back(x), y_cpu)

    # a CUDA module's state_dict loads into a CPU module
    m_load = Int8Linear(300, 576, bias=True, scheme=scheme)
    m_load.load_state_dict(m_gpu.state_dict())
    assert m_load.qweight.device.type == "cpu"
    assert torch.equal(m_load.qweight, m_cpu.qweight)
    assert torch.equal(m_load(x), y_cpu)

    # and a CPU state_dict into a CUDA module
    m_load_gpu = Int8Linear(300, 576, bias=True, scheme=scheme).cuda()
    m_load_gpu.load_state_dict(m_cpu.state_dict())
    assert torch.equal(m_load_gpu.qweight, m_gpu.qweight)
    assert torch.equal(m_load_gpu(x.cuda()), y_gpu)


@gpu
@pytest.mark.parametrize("scheme", list(OPS))
def test_module_half_small(scheme, cgen):
    lin = torch.nn.Linear(64, 37).cuda()
    m = Int8Linear.from_float(lin, scheme).half()
    assert m.scale.dtype == torch.float32 and m.bias.dtype == torch.float16
    x = randn((3, 64), cgen, torch.float16)
    y = m(x)
    assert y.dtype == torch.float16
    y64 = ref_linear64(scheme, x, m.qweight, m.scale, m.bias)
    assert_linear_close(y, y64, torch_linear_lowp(scheme, x, m.qweight, m.scale, m.bias), f"{scheme} .half()")


@gpu
@pytest.mark.parametrize("scheme", list(OPS))
def test_module_autocast_small(scheme, cgen):
    """Under torch.autocast("cuda") Int8Linear takes x in autocast's dtype, as nn.Linear does:
    the same bits as casting x by hand."""
    m = Int8Linear.from_float(torch.nn.Linear(64, 37), scheme).cuda()
    x = randn((3, 64), cgen)
    for low in (torch.float16, torch.bfloat16):
        want = m(x.to(low))
        with torch.autocast("cuda", dtype=low):
            got = m(x)
        assert got.dtype == low and torch.equal(got, want)
    assert m(x).dtype == torch.float32


@gpu
@pytest.mark.parametrize("scheme", list(OPS))
def test_module_eager_path_matches_the_op_small(scheme, cgen):
    """The module's eager CUDA path (x checked, then the op's launch code) gives the op's bits, also
    on a split K (N = 64 < one wave) and a large M (W8A16's dense path), and refuses bad x as the op does."""
    for n, k, m in ((64, 1024, 3), (37, 64, 60)):
        mod = Int8Linear.from_float(torch.nn.Linear(k, n), scheme).cuda()
        for dtype in DTYPES:
            x = randn((m, k), cgen, dtype)
            want = OPS[scheme](x, mod.qweight, mod.scale, mod.bias)
            assert torch.equal(mod(x), want)
    with pytest.raises(ValueError, match="K="):
        mod(randn((2, k + 1), cgen))
    with pytest.raises(ValueError):
        mod(randn((2, k), cgen).cpu())


@gpu
@pytest.mark.parametrize("scheme", list(OPS))
def test_module_gradient_small(scheme, cgen):
    """x's gradient through a CUDA Int8Linear: grad_y . W with its dequantized weight (W8A8
    straight through its activation rounding)."""
    m = Int8Linear.from_float(torch.nn.Linear(64, 37), scheme).cuda()
    x = randn((5, 64), cgen, torch.bfloat16).requires_grad_()
    g = randn((5, 37), cgen, torch.bfloat16)
    m(x).backward(g)
    torch.testing.assert_close(x.grad, g @ m.dequantized_weight().to(torch.bfloat16), rtol=0, atol=0)


@gpu
@pytest.mark.parametrize("scheme", list(OPS))
def test_quantize_model_cuda(scheme, cgen):
    torch.manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 37)).cuda()
    x = randn((4, 64), cgen)
    with torch.no_grad():
        y_float = model(x)
        qmodel = lowbit.quantize(copy.deepcopy(model), scheme)
        assert all(isinstance(qmodel[i], Int8Linear) for i in (0, 2))
        assert qmodel[0].qweight.device.type == "cuda" and tuple(qmodel[0].qweight.shape) == (128, 64)
        y = qmodel(x)
        # layer by layer against the reference
        h64 = ref_linear64(scheme, x, qmodel[0].qweight, qmodel[0].scale, qmodel[0].bias)
        h = qmodel[0](x)
        assert_linear_close(h, h64, None, f"{scheme} layer 0")
    assert y.shape == y_float.shape and torch.isfinite(y).all()
    rel = ((y - y_float).norm() / y_float.norm()).item()
    assert rel < 5e-2, f"{scheme}: quantized model is {rel:.3e} away from the float model"


@gpu
@pytest.mark.parametrize("op", list(OPS))
def test_non_default_stream(op, cgen):
    """Kernels run on the caller's current stream. torch's side streams are non-blocking,
    so a kernel sent to the legacy default stream would read x before it is written."""
    M, N, K = 16, 4096, 4096
    qw, s = rand_weight(N, K, cgen)
    src = randn((M, K), cgen, torch.float16)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        assert _native.stream_of(src) == stream.cuda_stream
        poison_allocator(M * K * 2)
        x = torch.empty_like(src)
        torch.cuda._sleep(50_000_000)  # keep the stream busy for tens of ms
        x.copy_(src)
        y = OPS[op](x, qw, s)
    stream.synchronize()
    assert_linear_close(y, ref_linear64(op, src, qw, s, None), torch_linear_lowp(op, src, qw, s, None),
                        f"{op} on a side stream")


@gpu
@pytest.mark.parametrize("scheme", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_ids)
def test_cuda_graph_capture(scheme, dtype, cgen):
    m = Int8Linear.from_float(torch.nn.Linear(256, 384).cuda(), scheme).to(dtype)
    x = randn((4, 256), cgen, dtype)
    g, y = capture_graph(lambda: m(x))
    for _ in range(2):
        x_new = randn((4, 256), cgen, dtype)
        x.copy_(x_new)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, m(x_new)), f"{scheme} {DT_ID[dtype]}: graph replay differs from eager"

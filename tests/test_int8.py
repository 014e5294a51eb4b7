"""lowbit.ops.int8 (per-token quantizer, W8A16 and W8A8 linear) and lowbit.formats.int8.

Every op is checked against its pure-torch reference (lowbit.ref.int8) on every CPU ISA
level this machine supports, with ragged shapes and each float dtype.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.formats import int8 as fmt
from lowbit.nn import Int8Linear
from lowbit.ref import int8 as ref

from conftest import (
    activation_view,
    FLOAT_DTYPES,
    ISAS,
    assert_all_finite,
    assert_bitwise_equal,
    assert_close_to_ref,
    assert_within_torch_error,
    dtype_id,
    poison_allocator,
    rand_codes,
    rand_scale,
    randn,
)

OPS = {"w8a16": lowbit.ops.int8_linear_w8a16, "w8a8": lowbit.ops.int8_linear_w8a8}
REFS = {"w8a16": ref.linear_w8a16, "w8a8": ref.linear_w8a8}
EPS32 = 2.0 ** -24  # unit roundoff of fp32
FLT_MAX = torch.finfo(torch.float32).max

dtypes = pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
schemes = pytest.mark.parametrize("scheme", list(OPS))


def row_scaled(shape, gen, dtype, lo=-3.0, hi=3.0):
    """randn rows, each multiplied by 10**u with u uniform in [lo, hi] (rows of very different size)."""
    x = torch.randn(shape, generator=gen)
    u = torch.rand(shape[:-1] + (1,), generator=gen) * (hi - lo) + lo
    return (x * torch.pow(10.0, u)).to(dtype)


def ref64(scheme, x, qweight, scale, bias):
    """The reference in float64 (x.double() is exact, and x.double().float() == x.float())."""
    return REFS[scheme](x.double(), qweight, scale, bias)


def torch_baseline(scheme, x, qweight, scale, bias):
    """What torch itself computes at x's dtype from the dequantized operands."""
    w = ref.dequantize_weight(qweight, scale).to(x.dtype)
    if scheme == "w8a8":
        qx, sx = ref.quantize_per_token(x)
        x = (qx.double() * sx.double()[..., None]).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# =====================================================================================
# per-token quantizer
# =====================================================================================
def check_code_property(x, q, s):
    """Each code is round(x * 127 / amax) (to within fp32 rounding), and lies in [-127, 127]."""
    lo, hi = int(q.min()), int(q.max())
    assert lo >= -127 and hi <= 127, f"codes outside [-127, 127]: min {lo}, max {hi}"
    x64 = x.double()
    amax = x64.abs().amax(dim=-1, keepdim=True)
    exact = torch.where(amax > 0, x64 * 127.0 / amax, torch.zeros_like(x64))
    dev = (q.double() - exact).abs().max().item()
    assert dev <= 0.5 + 1e-4, f"a code is {dev:.4f} away from x * 127 / amax"


@pytest.mark.parametrize("k", [1, 5, 23, 64, 300, 4097])
@pytest.mark.parametrize("m", [1, 3, 17, 64, 300])
@dtypes
def test_quantize_per_token_matches_ref(isa, gen, dtype, m, k):
    x = row_scaled((m, k), gen, dtype)
    q, s = lowbit.ops.int8_quantize_per_token(x)
    qr, sr = ref.quantize_per_token(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == x.shape[:-1]
    assert_bitwise_equal(q, qr, "codes")
    assert_bitwise_equal(s, sr, "scales")
    check_code_property(x, q, s)


def _documented_codes(x):
    """The documented per-token rule (lowbit/int8_format.h, ref/int8.py), in numpy fp32:
    pre = 2^64 if amax < 2^-64 else 1; q = round_half_even((x * pre) * (127 / (amax * pre)));
    scale = amax / 127. 127 / (...) is the correctly rounded fp32 quotient."""
    import numpy as np

    x32 = x.float().numpy()
    amax = np.abs(x32).max(axis=-1)
    pre = np.where(amax < np.float32(2.0 ** -64), np.float32(2.0 ** 64), np.float32(1.0)).astype(np.float32)
    inv = np.float32(127.0) / (amax * pre)
    q = np.clip(np.rint((x32 * pre[..., None]) * inv[..., None]), -127, 127).astype(np.int8)
    return torch.from_numpy(q), torch.from_numpy(amax / np.float32(127.0))


def _documented_rule_input(gen, dtype):
    x = row_scaled((300, 300), gen, dtype)
    if dtype != torch.float16:  # a few tiny rows (prescaled), down to subnormals
        for r, v in ((5, 1e-30), (6, 3e-37), (7, 1e-39), (8, 2.0 ** -64)):
            x[r] = (torch.rand(300, generator=gen) * 2 - 1).to(dtype) * v
    return x


@dtypes
def test_ref_quantizer_follows_documented_formula(gen, dtype):
    """lowbit.ref.int8.quantize_per_token must follow the documented rule bit for bit (regression:
    torch evaluates `127.0 / amax` as reciprocal(amax) * 127, an ulp off the true quotient for some
    amax, which flipped a code by one now and then)."""
    x = _documented_rule_input(gen, dtype)
    q_want, s_want = _documented_codes(x)
    q, s = ref.quantize_per_token(x)
    assert_bitwise_equal(s, s_want, "ref scales")
    assert_bitwise_equal(q, q_want, "ref codes")


@dtypes
def test_quantize_per_token_follows_documented_formula(isa, gen, dtype):
    x = _documented_rule_input(gen, dtype)
    q_want, s_want = _documented_codes(x)
    q, s = lowbit.ops.int8_quantize_per_token(x)
    assert_bitwise_equal(s, s_want, "scales")
    assert_bitwise_equal(q, q_want, "codes")


@pytest.mark.parametrize("shape", [(2, 3, 23), (4, 1, 5, 64), (1, 1, 1), (7,)], ids=str)
@dtypes
def test_quantize_per_token_nd(isa, gen, dtype, shape):
    x = row_scaled(shape, gen, dtype)
    q, s = lowbit.ops.int8_quantize_per_token(x)
    qr, sr = ref.quantize_per_token(x)
    assert q.shape == x.shape and s.shape == x.shape[:-1]
    assert_bitwise_equal(q, qr, "codes")
    assert_bitwise_equal(s, sr, "scales")


@pytest.mark.parametrize("view", ["transposed", "sliced", "row_step", "offset", "permuted3d"])
@dtypes
def test_quantize_per_token_strided(isa, gen, dtype, view):
    m, k = 17, 37
    if view == "transposed":
        x = randn((k, m), gen, dtype).t()
    elif view == "sliced":
        x = randn((m, k + 9), gen, dtype)[:, 4:4 + k]
    elif view == "row_step":
        x = randn((2 * m, k), gen, dtype)[::2]
    elif view == "offset":
        x = randn((m * k + 3,), gen, dtype)[3:].view(m, k)
    else:
        x = randn((3, k, 5), gen, dtype).permute(0, 2, 1)
    q, s = lowbit.ops.int8_quantize_per_token(x)
    qr, sr = ref.quantize_per_token(x.contiguous())
    assert_bitwise_equal(q, qr, "codes")
    assert_bitwise_equal(s, sr, "scales")


@pytest.mark.parametrize("k", [5, 23, 64, 300])
@dtypes
def test_quantize_per_token_nonfinite_and_zero_rows(isa, gen, dtype, k):
    nan, inf = float("nan"), float("inf")
    x = randn((8, k), gen, torch.float32)
    x[1, 0] = nan                 # first element (vector body for k >= 16)
    x[2, k - 1] = inf             # last element (scalar tail for most k)
    x[3, k // 2] = -inf           # middle
    x[4] = 0.0                    # all zero
    x[5, :] = nan                 # all NaN
    x[6, 0], x[6, k - 1] = inf, -inf
    x = x.to(dtype)
    q, s = lowbit.ops.int8_quantize_per_token(x)
    for r in (1, 2, 3, 5, 6):
        assert torch.isnan(s[r]), f"row {r} holds NaN/Inf: scale should be NaN, got {s[r].item()}"
        assert int(q[r].abs().max()) == 0, f"row {r} holds NaN/Inf: codes should be zero"
    assert s[4].item() == 0.0 and int(q[4].abs().max()) == 0, "all-zero row: scale 0 and zero codes"
    for r in (0, 7):  # untouched rows are quantized normally
        assert torch.isfinite(s[r]) and s[r].item() > 0
    qr, sr = ref.quantize_per_token(x)
    assert_bitwise_equal(q, qr, "codes")
    assert_bitwise_equal(s, sr, "scales")


@pytest.mark.parametrize("k", [5, 64, 300])
@dtypes
def test_quantize_per_token_outliers_stay_finite(isa, gen, dtype, k):
    big = {torch.float32: [1e30, FLT_MAX, -3e38], torch.float16: [6e4, 65504.0, -65504.0],
           torch.bfloat16: [1e38, -3.3e38, 1e30]}[dtype]
    x = randn((len(big) + 1, k), gen, torch.float32)
    for r, v in enumerate(big):
        x[r, (r * 7) % k] = v
    x = x.to(dtype)
    q, s = lowbit.ops.int8_quantize_per_token(x)
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all()), f"scales {s.tolist()}"
    for r in range(len(big)):
        assert abs(int(q[r, (r * 7) % k])) == 127, "the outlier gets code +-127"
    qr, sr = ref.quantize_per_token(x)
    assert_bitwise_equal(q, qr, "codes")
    assert_bitwise_equal(s, sr, "scales")
    check_code_property(x, q, s)


@pytest.mark.parametrize("amax", [1e-37, 2e-38, 1e-40], ids=["1e-37", "2e-38", "subnormal1e-40"])
@pytest.mark.parametrize("k", [5, 23, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_quantize_per_token_tiny_rows(isa, gen, dtype, k, amax):
    """Rows whose amax is so small that 127 / amax overflows fp32 (amax < 127 / FLT_MAX ~ 3.7e-37)
    must still get codes round(x * 127 / amax) in [-127, 127] with the sign of x."""
    x = torch.rand((3, k), generator=gen) * 2 - 1
    x = x / x.abs().amax(dim=1, keepdim=True) * amax
    x[1, 0] = 0.0
    x = x.to(dtype)
    q, s = lowbit.ops.int8_quantize_per_token(x)
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all()), f"scales {s.tolist()}"
    pos, neg = x > 0, x < 0
    lo = int(q.min())
    assert lo >= -127, f"code -128 produced for a tiny row: {q.tolist()}"
    flipped = int((q[pos] < 0).sum()) + int((q[neg] > 0).sum())
    assert flipped == 0, f"{flipped} codes have the wrong sign: {q.tolist()}"
    check_code_property(x, q, s)


# =====================================================================================
# linear layers vs the reference
# =====================================================================================
LIN_M = [1, 3, 17, 64, 300]
LIN_NK = [(1, 1), (37, 23), (100, 300), (576, 576), (257, 1031)]
FP32_TOL = {"w8a16": 2e-6, "w8a8": 1e-6}  # rel err vs float64 ref; "well below 1e-5"


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("nk", LIN_NK, ids=lambda nk: f"N{nk[0]}K{nk[1]}")
@pytest.mark.parametrize("m", LIN_M)
@dtypes
@schemes
def test_linear_matches_ref(isa, gen, scheme, dtype, m, nk, bias):
    n, k = nk
    x = randn((m, k), gen, dtype)
    qw, s = rand_codes(n, k, gen), rand_scale(n, gen)
    b = randn((n,), gen, dtype) if bias else None
    y = OPS[scheme](x, fmt.pack_cpu(qw), s, b)
    assert y.dtype == dtype and y.shape == (m, n)
    r = ref64(scheme, x, qw, s, b)
    if dtype == torch.float32:
        assert_close_to_ref(y, r, FP32_TOL[scheme], f"{scheme} fp32")
    else:
        assert_within_torch_error(y, r, torch_baseline(scheme, x, qw, s, b), f"{scheme} {dtype_id(dtype)}")


@pytest.mark.parametrize("xb", [(torch.float32, torch.float16), (torch.float32, torch.bfloat16),
                                (torch.float16, torch.float32), (torch.bfloat16, torch.float16)],
                         ids=lambda p: f"x{dtype_id(p[0])}-bias{dtype_id(p[1])}")
@schemes
def test_linear_mixed_bias_dtype(isa, gen, scheme, xb):
    xdt, bdt = xb
    m, n, k = 5, 37, 23
    x = randn((m, k), gen, xdt)
    qw, s = rand_codes(n, k, gen), rand_scale(n, gen)
    b = randn((n,), gen, bdt)
    y = OPS[scheme](x, fmt.pack_cpu(qw), s, b)
    assert y.dtype == xdt
    r = ref64(scheme, x, qw, s, b)
    if xdt == torch.float32:
        assert_close_to_ref(y, r, FP32_TOL[scheme], scheme)
    else:
        assert_within_torch_error(y, r, torch_baseline(scheme, x, qw, s, b), scheme)


@pytest.mark.parametrize("view", ["transposed", "sliced_cols", "row_step", "offset", "3d", "3d_permuted",
                                  "expanded", "1d"])
@dtypes
@schemes
def test_linear_strided_and_nd_inputs(isa, gen, scheme, dtype, view):
    m, n, k = 17, 37, 23
    x = activation_view(view, m, k, gen, dtype)
    qw, s, b = rand_codes(n, k, gen), rand_scale(n, gen), randn((n,), gen, dtype)
    packed = fmt.pack_cpu(qw)
    y = OPS[scheme](x, packed, s, b)
    assert y.shape == x.shape[:-1] + (n,) and y.dtype == dtype
    # the same values, contiguous: bitwise the same result
    assert_bitwise_equal(y, OPS[scheme](x.contiguous(), packed, s, b), f"{view} vs contiguous")
    r = ref64(scheme, x, qw, s, b)
    if dtype == torch.float32:
        assert_close_to_ref(y, r, FP32_TOL[scheme], view)
    else:
        assert_within_torch_error(y, r, torch_baseline(scheme, x, qw, s, b), view)


@schemes
def test_linear_large_k(isa, gen, scheme):
    """K > 32768 exercises the W8A8 int32 chunking (flush to fp32 every 32768 k)."""
    m, n, k = 2, 20, 40000
    x = randn((m, k), gen)
    qw, s, b = rand_codes(n, k, gen), rand_scale(n, gen), randn((n,), gen)
    y = OPS[scheme](x, fmt.pack_cpu(qw), s, b)
    assert_close_to_ref(y, ref64(scheme, x, qw, s, b), {"w8a16": 5e-6, "w8a8": 1e-6}[scheme], scheme)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("wkind", ["signed", "positive"])
@pytest.mark.parametrize("k", [23, 1031, 4097, 40000])
def test_w8a8_integer_path_is_exact(isa, gen, k, wkind, bias):
    """x = qx * 2^e is exactly representable, so the kernel's activation codes are exactly qx and
    y = (qx . qw^T) * 2^e * ws + b. The integer dot product must be exact: the only rounding
    allowed is converting each int32 chunk sum (32768 k) to fp32, the scale multiply and the bias add."""
    m, n = 3, 37
    qx = rand_codes(m, k, gen)
    e = torch.randint(-8, 3, (m,), generator=gen).to(torch.float32)
    sx = torch.pow(2.0, e)
    x = qx.to(torch.float32) * sx[:, None]
    qw = rand_codes(n, k, gen) if wkind == "signed" else rand_codes(n, k, gen, low=1, high=127)
    ws = rand_scale(n, gen)
    b = randn((n,), gen) if bias else None

    q_got, s_got = lowbit.ops.int8_quantize_per_token(x)
    assert_bitwise_equal(q_got, qx, "x = q * 2^e must quantize back to exactly q")
    assert_bitwise_equal(s_got, sx, "x = q * 2^e must quantize back to exactly scale 2^e")

    y = lowbit.ops.int8_linear_w8a8(x, fmt.pack_cpu(qw), ws, b)
    qx64, qw64 = qx.double(), qw.double()
    acc = qx64 @ qw64.T  # exact
    f = sx.double()[:, None] * ws.double()[None, :]
    chunk_abs = sum((qx64[:, c:c + 32768] @ qw64[:, c:c + 32768].T).abs() for c in range(0, k, 32768))
    t = acc * f + (0.0 if b is None else b.double())
    bound = EPS32 * (2 * chunk_abs * f + 2 * (acc * f).abs() + 2 * (t.abs() + (0.0 if b is None else b.double().abs())))
    err = (y.double() - t).abs()
    bad = err > bound
    if bool(bad.any()):
        i, j = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{int(bad.sum())} of {y.numel()} outputs exceed the fp32-epilogue bound; e.g. y[{i},{j}] = "
            f"{y[i, j].item()!r}, exact {t[i, j].item()!r} (integer sum {int(acc[i, j])}, error "
            f"{err[i, j].item() / f[i, j].item():.3g} in integer units)")


# =====================================================================================
# every element written, determinism, thread-count independence
# =====================================================================================
@pytest.mark.parametrize("mnk", [(1, 576, 576), (64, 576, 576), (300, 257, 1031), (5, 1, 1)], ids=str)
@dtypes
@schemes
def test_linear_deterministic_and_thread_independent(isa, gen, scheme, dtype, mnk, restore_threads):
    m, n, k = mnk
    x = randn((m, k), gen, dtype)
    qw, s, b = rand_codes(n, k, gen), rand_scale(n, gen), randn((n,), gen, dtype)
    packed = fmt.pack_cpu(qw)
    op = OPS[scheme]
    out_bytes = m * n * x.element_size()
    results = []
    for threads in (None, 1, 2, 3, 1, 2):
        lowbit.set_num_threads(threads)
        poison_allocator(out_bytes)
        y = op(x, packed, s, b)
        assert_all_finite(y, f"threads={threads}")
        results.append(y)
    for i, y in enumerate(results[1:], 1):
        assert_bitwise_equal(y, results[0], f"run {i} vs run 0")
    r = ref64(scheme, x, qw, s, b)
    if dtype == torch.float32:
        assert_close_to_ref(results[0], r, FP32_TOL[scheme], scheme)
    else:
        assert_within_torch_error(results[0], r, torch_baseline(scheme, x, qw, s, b), scheme)


@dtypes
def test_quantize_deterministic_and_thread_independent(isa, gen, dtype, restore_threads):
    x = row_scaled((300, 1031), gen, dtype)
    results = []
    for threads in (None, 1, 2, 3):
        lowbit.set_num_threads(threads)
        poison_allocator(x.numel())
        results.append(lowbit.ops.int8_quantize_per_token(x))
    for q, s in results[1:]:
        assert_bitwise_equal(q, results[0][0], "codes")
        assert_bitwise_equal(s, results[0][1], "scales")


def test_isa_levels_agree_w8a8(gen):
    """W8A8 is exact integer math plus one fp32 epilogue: every ISA level gives the same bits."""
    m, n, k = 17, 100, 300
    x = randn((m, k), gen)
    qw, s, b = rand_codes(n, k, gen), rand_scale(n, gen), randn((n,), gen)
    packed = fmt.pack_cpu(qw)
    prev = lowbit.cpu_isa()
    outs = {}
    try:
        for level in ISAS:
            lowbit.set_cpu_isa(level)
            outs[level] = lowbit.ops.int8_linear_w8a8(x, packed, s, b)
    finally:
        lowbit.set_cpu_isa(prev)
    for level, y in outs.items():
        assert_bitwise_equal(y, outs[ISAS[0]], f"{level} vs {ISAS[0]}")


def test_fork_after_parallel_use(gen, restore_threads):
    """A child forked after the pool has workers gets a fresh pool: its parallel calls neither hang nor differ."""
    m, n, k = 17, 576, 64
    x = randn((m, k), gen)
    qw, s, b = rand_codes(n, k, gen), rand_scale(n, gen), randn((n,), gen)
    packed = fmt.pack_cpu(qw)
    lowbit.set_num_threads(2)
    want = {name: op(x, packed, s, b) for name, op in OPS.items()}  # the parent's pool now has a worker
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery, no torch intra-op parallelism, just lowbit
        code = 3
        try:
            ok = all(bool((op(x, packed, s, b) == want[name]).all()) for name, op in OPS.items())
            code = 0 if ok else 1
        finally:
            os._exit(code)
    import time

    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child hung in a lowbit call")
        time.sleep(0.02)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child failed (status {status})"


def test_many_threads_in_subprocess(tmp_path):
    """More threads than cores (and than the pool's cap) still gives the single-thread bits.
    Run in a subprocess so the extra pool workers don't outlive this test."""
    code = """
import torch, lowbit
from lowbit.formats import int8 as fmt
from lowbit.nn import Int8Linear
g = torch.Generator().manual_seed(0)
x = torch.randn(64, 300, generator=g)
q = torch.randint(-127, 128, (1000, 300), generator=g, dtype=torch.int8)
s = torch.rand(1000, generator=g) * 0.01
p = fmt.pack_cpu(q)
for op in (lowbit.ops.int8_linear_w8a16, lowbit.ops.int8_linear_w8a8):
    lowbit.set_num_threads(1)
    want = op(x, p, s)
    for t in (7, 300, 2):
        lowbit.set_num_threads(t)
        for _ in range(3):
            assert torch.equal(op(x, p, s), want), (op, t)
print("ok")
"""
    r = _run_python(code, {}, tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_set_num_threads_validation(restore_threads):
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="set_num_threads"):
            lowbit.set_num_threads(bad)
    lowbit.set_num_threads(3)
    assert lowbit.get_num_threads() == 3
    lowbit.set_num_threads(None)
    assert lowbit.get_num_threads() == torch.get_num_threads()


# =====================================================================================
# bad input -> ValueError / TypeError naming the argument
# =====================================================================================
N0, K0 = 37, 23


def _valid(gen):
    qw = rand_codes(N0, K0, gen)
    return dict(x=randn((3, K0), gen), qweight=fmt.pack_cpu(qw), scale=rand_scale(N0, gen),
                bias=randn((N0,), gen))


def _noncontig_like(t):
    """Same shape and values, every-other-element strides (not contiguous)."""
    out = torch.stack([t, t], dim=-1)[..., 0]
    assert not out.is_contiguous()
    return out


BAD_LINEAR = {
    # name: (mutation of the valid args, exception, text the message must contain)
    "x_int32": (lambda a: a.update(x=torch.ones(3, K0, dtype=torch.int32)), TypeError, "x"),
    "x_float64": (lambda a: a.update(x=a["x"].double()), TypeError, "x"),
    "x_scalar": (lambda a: a.update(x=torch.tensor(1.0)), ValueError, "x"),
    "x_empty_k": (lambda a: a.update(x=torch.empty(3, 0)), ValueError, "x"),
    "k_mismatch": (lambda a: a.update(x=torch.randn(3, K0 + 8)), ValueError, "K="),
    "qweight_uint8": (lambda a: a.update(qweight=a["qweight"].view(torch.uint8)), TypeError, "qweight"),
    "qweight_float": (lambda a: a.update(qweight=a["qweight"].float()), TypeError, "qweight"),
    "qweight_canonical_2d": (lambda a: a.update(qweight=rand_codes(N0, K0, torch.Generator().manual_seed(1))),
                             ValueError, "qweight"),
    "qweight_wrong_packed_shape": (lambda a: a.update(qweight=fmt.pack_cpu(torch.ones(N0 + 16, K0, dtype=torch.int8))),
                                   ValueError, "qweight"),
    "qweight_noncontiguous": (lambda a: a.update(qweight=_noncontig_like(a["qweight"])), ValueError, "qweight"),
    "scale_float64": (lambda a: a.update(scale=a["scale"].double()), TypeError, "scale"),
    "scale_float16": (lambda a: a.update(scale=a["scale"].half()), TypeError, "scale"),
    "scale_2d": (lambda a: a.update(scale=a["scale"][None]), ValueError, "scale"),
    "scale_wrong_length": (lambda a: a.update(scale=torch.rand(N0 + 16)), ValueError, "scale"),
    "scale_empty": (lambda a: a.update(scale=torch.empty(0)), ValueError, "scale"),
    "scale_noncontiguous": (lambda a: a.update(scale=_noncontig_like(a["scale"])), ValueError, "scale"),
    "bias_wrong_shape": (lambda a: a.update(bias=torch.randn(N0 + 1)), ValueError, "bias"),
    "bias_2d": (lambda a: a.update(bias=a["bias"][None]), ValueError, "bias"),
    "bias_int": (lambda a: a.update(bias=torch.ones(N0, dtype=torch.int32)), TypeError, "bias"),
    "bias_float64": (lambda a: a.update(bias=a["bias"].double()), TypeError, "bias"),
    "bias_noncontiguous": (lambda a: a.update(bias=_noncontig_like(a["bias"])), ValueError, "bias"),
    "qweight_meta": (lambda a: a.update(qweight=a["qweight"].to("meta")), ValueError, "qweight"),
    "scale_meta": (lambda a: a.update(scale=a["scale"].to("meta")), ValueError, "scale"),
    "bias_meta": (lambda a: a.update(bias=a["bias"].to("meta")), ValueError, "bias"),
    "x_meta": (lambda a: a.update(x=a["x"].to("meta")), ValueError, "x"),
}


@pytest.mark.parametrize("case", list(BAD_LINEAR))
@schemes
def test_linear_bad_input(gen, scheme, case):
    mutate, exc, text = BAD_LINEAR[case]
    a = _valid(gen)
    mutate(a)
    with pytest.raises(exc) as info:
        OPS[scheme](a["x"], a["qweight"], a["scale"], a["bias"])
    msg = str(info.value)
    assert text in msg, f"message does not name {text!r}: {msg}"
    assert f"int8_linear_{scheme}" in msg, f"message does not name the op: {msg}"


@pytest.mark.parametrize("shape", [(0, K0), (4, 0, K0)], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@schemes
def test_x_without_rows_gives_y_without_rows(gen, scheme, dtype, shape):
    """M = 0 (an empty batch: e.g. an MoE expert no token was routed to) gives y [..., 0, N] of
    x's dtype, as torch.nn.functional.linear does, through the public op and torch.ops; and the
    weights are still checked: each bad-weight case of BAD_LINEAR raises with empty x too."""
    a = _valid(gen)
    x = torch.empty(shape, dtype=dtype)
    for fn in (OPS[scheme], getattr(torch.ops.lowbit, f"int8_linear_{scheme}")):
        y = fn(x, a["qweight"], a["scale"], a["bias"])
        assert y.shape == (*shape[:-1], N0) and y.dtype == dtype
    checked = [c for c in BAD_LINEAR if not c.startswith(("x_", "k_"))]
    assert len(checked) > 15
    for case in checked:
        mutate, exc, text = BAD_LINEAR[case]
        b = _valid(gen)
        mutate(b)
        with pytest.raises(exc, match=text):
            OPS[scheme](x, b["qweight"], b["scale"], b["bias"])


@schemes
def test_linear_k_mismatch_across_quads_is_rejected(gen, scheme):
    """The CPU packed layout fixes K up to its quad of 4 (documented in lowbit.formats.int8 and the
    ops' docstring, as Marlin-style ops take K on trust): x with another number of quads is refused."""
    a = _valid(gen)
    for k in (K0 - 4, K0 + 2):
        with pytest.raises(ValueError, match="K"):
            OPS[scheme](torch.randn(3, k, generator=gen), a["qweight"], a["scale"], a["bias"])


@schemes
def test_module_rejects_any_k_mismatch(gen, scheme):
    """The module knows in_features exactly, so even a mismatch inside one quad is refused there."""
    mod = Int8Linear.from_float(torch.nn.Linear(K0, 5), scheme)
    for k in (K0 - 2, K0 + 1):
        with pytest.raises(ValueError, match="K"):
            mod(torch.randn(3, k, generator=gen))


@pytest.mark.parametrize("case,exc", [
    ("int32", TypeError), ("float64", TypeError), ("scalar", ValueError), ("empty_k", ValueError),
    ("empty_rows_k0", ValueError)])
def test_quantize_bad_input(case, exc):
    x = {"int32": torch.ones(3, 4, dtype=torch.int32), "float64": torch.randn(3, 4, dtype=torch.float64),
         "scalar": torch.tensor(2.0), "empty_k": torch.empty(3, 0), "empty_rows_k0": torch.empty(0, 0)}[case]
    with pytest.raises(exc, match="x"):
        lowbit.ops.int8_quantize_per_token(x)


@pytest.mark.parametrize("shape", [(0, 4), (2, 0, 4)], ids=str)
def test_quantize_without_rows(shape):
    """x without rows: codes of its shape and scales of its shape less K, both empty."""
    for fn in (lowbit.ops.int8_quantize_per_token, torch.ops.lowbit.int8_quantize_per_token):
        q, s = fn(torch.empty(shape, dtype=torch.float16))
        assert q.shape == shape and q.dtype == torch.int8
        assert s.shape == shape[:-1] and s.dtype == torch.float32


@pytest.mark.parametrize("case,exc,text", [
    ("minus128", ValueError, "-128"), ("float", TypeError, "int8"), ("uint8", TypeError, "int8"),
    ("1d", TypeError, "2-D"), ("3d", TypeError, "2-D"), ("empty", ValueError, "empty")])
def test_pack_cpu_bad_input(gen, case, exc, text):
    q = rand_codes(20, 9, gen)
    if case == "minus128":
        q[13, 7] = -128
    elif case == "float":
        q = q.float()
    elif case == "uint8":
        q = q.view(torch.uint8)
    elif case == "1d":
        q = q[0]
    elif case == "3d":
        q = q[None]
    else:
        q = q[:0]
    with pytest.raises(exc, match=text):
        fmt.pack_cpu(q)


# =====================================================================================
# formats
# =====================================================================================
SHAPES = [(1, 1), (1, 5), (15, 3), (16, 4), (17, 5), (37, 23), (100, 300), (257, 1031)]


@pytest.mark.parametrize("nk", SHAPES, ids=lambda nk: f"N{nk[0]}K{nk[1]}")
def test_pack_unpack_round_trip(gen, nk):
    n, k = nk
    q = rand_codes(n, k, gen)
    p = fmt.pack_cpu(q)
    assert p.dtype == torch.int8 and p.is_contiguous()
    assert tuple(p.shape) == fmt.packed_cpu_shape(n, k) == (-(-n // 16), -(-k // 4) + 1, 16, 4)
    assert_bitwise_equal(fmt.unpack_cpu(p, n, k), q, "round trip")


@pytest.mark.parametrize("nk", SHAPES, ids=lambda nk: f"N{nk[0]}K{nk[1]}")
def test_packed_layout_bytes(gen, nk):
    """qweight[n, k] sits at byte ((n//16)*(ceil(K/4)+1) + k//4)*64 + (n%16)*4 + k%4; padding is zero;
    the last quad of each panel holds the 16 row sums as little-endian int32."""
    n, k = nk
    q = rand_codes(n, k, gen)
    flat = fmt.pack_cpu(q).flatten()
    quads = -(-k // 4)
    nn_, kk = torch.meshgrid(torch.arange(n), torch.arange(k), indexing="ij")
    off = ((nn_ // 16) * (quads + 1) + kk // 4) * 64 + (nn_ % 16) * 4 + kk % 4
    assert_bitwise_equal(flat[off], q, "byte positions")
    # row sums: byte ((n//16)*(quads+1) + quads)*64 + (n%16)*4 .. +4, little endian int32
    rows = torch.arange(n)
    base = ((rows // 16) * (quads + 1) + quads) * 64 + (rows % 16) * 4
    b = flat.view(torch.uint8).to(torch.int64)
    rowsum = b[base] | (b[base + 1] << 8) | (b[base + 2] << 16) | (b[base + 3] << 24)
    rowsum = torch.where(rowsum >= 2 ** 31, rowsum - 2 ** 32, rowsum)
    assert_bitwise_equal(rowsum, q.to(torch.int64).sum(1), "row sums")
    # everything else is zero padding
    used = torch.zeros(flat.numel(), dtype=torch.bool)
    used[off.flatten()] = True
    for j in range(4):
        used[base + j] = True
    if bool((~used).any()):
        assert int(flat[~used].abs().max()) == 0, "padding bytes must be zero"


@pytest.mark.parametrize("nk", [(16, 32768 + 4), (3, 70000)], ids=str)
def test_packed_row_sums_large(gen, nk):
    n, k = nk
    q = rand_codes(n, k, gen, low=100, high=127)  # large positive sums, beyond int16
    p = fmt.pack_cpu(q)
    sums = p[:, -1].contiguous().view(torch.int32).reshape(-1)[:n]
    assert_bitwise_equal(sums.to(torch.int64), q.to(torch.int64).sum(1), "row sums")
    assert_bitwise_equal(fmt.unpack_cpu(p, n, k), q, "round trip")


# =====================================================================================
# ISA selection
# =====================================================================================
def test_isa_levels_listing():
    levels = lowbit.supported_cpu_isas()
    assert levels[0] == "scalar"
    assert levels[-1] == lowbit.best_cpu_isa()
    assert lowbit._native.ISA_LEVELS == ("scalar", "avx2", "avx512", "avx512_vnni", "avx512_bf16")


@pytest.mark.parametrize("bad", ["sse4", "AVX2x", "", "avx512-vnni", "neon"])
def test_set_cpu_isa_rejects_unknown(bad):
    before = lowbit.cpu_isa()
    with pytest.raises(ValueError, match="ISA"):
        lowbit.set_cpu_isa(bad)
    assert lowbit.cpu_isa() == before


def test_set_cpu_isa_rejects_unsupported():
    unsupported = [lv for lv in lowbit._native.ISA_LEVELS if lv not in lowbit.supported_cpu_isas()]
    if not unsupported:
        pytest.skip("this CPU supports every ISA level")
    before = lowbit.cpu_isa()
    for lv in unsupported:
        with pytest.raises(ValueError, match="not supported"):
            lowbit.set_cpu_isa(lv)
    assert lowbit.cpu_isa() == before


def test_set_cpu_isa_round_trip(isa):
    assert lowbit.cpu_isa() == isa


def _run_python(code, env_extra, tmp_path):
    env = dict(os.environ)
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("level", ISAS)
def test_env_var_selects_isa(tmp_path, level):
    r = _run_python("import lowbit; print(lowbit.cpu_isa())", {"LOWBIT_CPU_ISA": level}, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == level


def test_env_var_avx2_uppercase_and_spaces(tmp_path):
    if "avx2" not in ISAS:
        pytest.skip("no AVX2 here")
    r = _run_python("import lowbit; print(lowbit.cpu_isa())", {"LOWBIT_CPU_ISA": " AVX2 "}, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "avx2"


def test_env_var_invalid_fails_at_import(tmp_path):
    r = _run_python("import lowbit", {"LOWBIT_CPU_ISA": "bogus9"}, tmp_path)
    assert r.returncode != 0
    assert "bogus9" in r.stderr, r.stderr[-2000:]
    assert "scalar" in r.stderr and "avx2" in r.stderr, "the message lists the valid levels"
    last = r.stderr.strip().splitlines()[-1]
    assert "LOWBIT_CPU_ISA" in last, f"the error message should name the variable that caused it: {last}"

"""lowbit.ops.int4 (group-wise INT4 weights: W4A16 and W4A8 linear) and the CPU packed
layout of lowbit.formats.int4 (pack_cpu / unpack_cpu).

Every op is checked against its float64 reference (lowbit.ref.int4) on every CPU ISA level
this machine supports, with ragged shapes, each group size (32, 64, 128, K), symmetric and
asymmetric weights, fp16- and fp32-stored scales, each float dtype, bias or not, and
strided / N-d activations.

Tolerance. The kernels take K in blocks of 32 and factor the scales out of each block
(csrc/cpu/int4.cpp):

    W4A16:  y += d * sum(q * x)        + m * sum(x)          (fp32 FMAs, 32-long sums)
    W4A8:   y += (d * sx) * sum(q * qx) + m * (sx * sum(qx))  (exact int32 sums)

so their fp32 rounding error is bounded by gamma * T with T = sum_k |x_k| (|d| q_k + |m|),
the sizes of the factored terms (not |w| |x|, which can be smaller because d * q and m cancel),
gamma = (32 + 2 * nblocks + 4) u for W4A16 and
(2 * nblocks + 6) u for W4A8 (the activation codes are exactly the reference's, so only the
epilogue rounds; its T is taken with the quantized x), u = 2^-24; plus one rounding of the
bias add and, for fp16 / bf16 outputs, one rounding to the output dtype. This worst-case
bound never fails on a correct kernel; it is complemented by a statistical one for fp32
outputs (max error / max |ref| <= FP32_REL_TOL, ~7x the largest the kernels show), which a
single code off by one, a wrong group scale or a misplaced nibble exceeds by orders of
magnitude even at K = 4096, and by exact-arithmetic tests that pin every output bit.
"""
from __future__ import annotations

import functools
import zlib

import pytest
import torch

import lowbit
from lowbit.formats import int4 as fmt
from lowbit.ref import int4 as ref

from conftest import (
    ACTIVATION_VIEWS,
    activation_view,
    run_concurrently,
    FLOAT_DTYPES,
    assert_all_finite,
    assert_bitwise_equal,
    dtype_id,
    poison_allocator,
    randn,
)

OPS = {"w4a16": lowbit.ops.int4_linear_w4a16, "w4a8": lowbit.ops.int4_linear_w4a8}
TORCH_OPS = {"w4a16": torch.ops.lowbit.int4_linear_w4a16, "w4a8": torch.ops.lowbit.int4_linear_w4a8}
REFS = {"w4a16": ref.linear_w4a16, "w4a8": ref.linear_w4a8}
U32 = 2.0 ** -24  # unit roundoff of fp32
# output rounding: unit roundoff of the output dtype, and half its smallest subnormal step
OUT_U = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
OUT_ATOL = {torch.float32: 0.0, torch.float16: 2.0 ** -25, torch.bfloat16: 2.0 ** -134}
FP32_REL_TOL = 1e-5  # max |y - ref| / max |ref| for fp32 outputs (statistical; see the docstring)
OTHER_DTYPE = {torch.float32: torch.bfloat16, torch.float16: torch.bfloat16, torch.bfloat16: torch.float16}

dtypes = pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
schemes = pytest.mark.parametrize("scheme", list(OPS))
syms = pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])


# =====================================================================================
# helpers
# =====================================================================================
@pytest.fixture(autouse=True, scope="module")
def _single_threaded_torch():
    """The float64 references and bounds run on one torch thread (small ops; on a busy 2-core
    machine torch's intra-op parallel regions cost more than they save), while lowbit's kernels
    keep 2 threads, as they would by default here (the thread tests set their own counts)."""
    from lowbit import _native

    prev_torch, prev_lowbit = torch.get_num_threads(), _native._num_threads
    torch.set_num_threads(1)
    lowbit.set_num_threads(max(2, prev_torch) if prev_lowbit is None else prev_lowbit)
    try:
        yield
    finally:
        torch.set_num_threads(prev_torch)
        lowbit.set_num_threads(prev_lowbit)


def _gsize(k, group):
    return k if group == "K" else group


def rand_weight(n, k, g, sym, gen, storage="fp16", lo=1e-3, hi=1e-1):
    """A random canonical INT4 weight (codes uint8 [N, K], scales fp32 [N, K/g], mins or None).

    Codes are uniform in [0, 15], and every row holds a 0 and a 15; d is log-uniform in
    [lo, hi] in magnitude with a random sign (the symmetric quantizer makes d negative when
    the group's largest-magnitude value is positive); asymmetric mins lie in [-12|d|, 4|d|]
    (tiny ones set to 0).
    storage "fp16": d and m rounded to fp16 values (round_scales_fp16), so pack_cpu stores
    them in fp16; "fp32": values that are not fp16-exact, so pack_cpu stores fp32."""
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    cols = torch.randint(0, k, (n, 2), generator=gen)
    codes[torch.arange(n), cols[:, 0]] = 0
    codes[torch.arange(n), cols[:, 1]] = 15
    groups = k // g
    u = torch.rand(n, groups, generator=gen, dtype=torch.float64)
    mag = torch.exp(torch.log(torch.tensor(lo, dtype=torch.float64)) * (1 - u)
                    + torch.log(torch.tensor(hi, dtype=torch.float64)) * u)
    sign = torch.where(torch.rand(n, groups, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    d = (mag * sign).to(torch.float32)
    m = None
    if not sym:
        m = ((torch.rand(n, groups, generator=gen, dtype=torch.float64) * 16 - 12) * mag).to(torch.float32)
        m = torch.where(m.abs() < lo / 16, torch.zeros_like(m), m)  # (0, or within fp16's normal range)
    if storage == "fp16":
        d, m = fmt.round_scales_fp16(d, m)
        assert fmt.storage_dtype(d, m) == torch.float16
    else:
        # make sure at least one value is not an fp16 value (random fp32 values almost never are)
        if fmt.storage_dtype(d, m) == torch.float16:
            d[0, 0] = torch.nextafter(d[0, 0], torch.tensor(float("inf")))
        assert fmt.storage_dtype(d, m) == torch.float32
    return codes, d, m


def packed(codes, d, m, storage=None):
    qw, ps, pm = fmt.pack_cpu(codes, d, m)
    if storage is not None:
        assert ps.dtype == {"fp16": torch.float16, "fp32": torch.float32}[storage]
    return qw, ps, pm


def make_bias(kind, n, gen, dtype):
    if kind is None:
        return None
    bdt = {"fp32": torch.float32, "same": dtype, "other": OTHER_DTYPE[dtype]}[kind]
    return randn((n,), gen, bdt)


def ref64(scheme, x, codes, d, m, bias):
    """The float64 reference (x.double() is exact, and x.double().float() == x.float())."""
    return REFS[scheme](x.double(), codes, d, m, bias)


def error_bound(scheme, x, codes, d, m, bias, out_dtype, ref_y):
    """Elementwise worst-case bound on |y - ref| (module docstring), shaped like ref_y."""
    n, k = codes.shape
    x2 = x.reshape(-1, k)
    nb = (k + 31) // 32
    if scheme == "w4a8":
        xin = ref.dequantize_activations_q8(*ref.quantize_activations_q8(x2))
        gamma = (2 * nb + 6) * U32
    else:
        xin = x2.double()
        gamma = (32 + 2 * nb + 4) * U32
    g = k // d.shape[1]
    dd = d.double().repeat_interleave(g, dim=1)
    mm = -8.0 * dd if m is None else m.double().repeat_interleave(g, dim=1)
    terms = xin.abs() @ (dd.abs() * codes.double() + mm.abs()).T
    r = ref_y.reshape(-1, n).double()
    bound = gamma * terms + U32 * r.abs()
    if bias is not None:
        bound = bound + gamma * bias.double().abs()
    bound = bound + OUT_U[out_dtype] * (r.abs() + bound) + OUT_ATOL[out_dtype]
    return bound.reshape(ref_y.shape)


def check_linear(y, scheme, x, codes, d, m, bias, what=""):
    """y (the op's output) against the float64 reference within error_bound, every element."""
    __tracebackhide__ = True
    n = codes.shape[0]
    assert y.dtype == x.dtype, f"{what}: dtype {y.dtype} != x's {x.dtype}"
    assert y.shape == (*x.shape[:-1], n), f"{what}: shape {tuple(y.shape)} != {(*x.shape[:-1], n)}"
    assert_all_finite(y, what)
    r = ref64(scheme, x, codes, d, m, bias)
    bound = error_bound(scheme, x, codes, d, m, bias, y.dtype, r)
    err = (y.double() - r).abs()
    if y.dtype == torch.float32:
        rel = float(err.max()) / max(float(r.abs().max()), 1e-300)
        assert rel <= FP32_REL_TOL, f"{what}: max error {rel:.3e} of max |ref| > {FP32_REL_TOL:.0e}"
    bad = err > bound
    if bool(bad.any()):
        idx = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {y.numel()} outputs exceed the error bound; first at {list(idx)}: "
            f"got {y[idx].item()!r}, ref {r[idx].item()!r}, err {err[idx].item():.3e} > bound {bound[idx].item():.3e} "
            f"(worst err/bound {float((err / bound.clamp_min(1e-300)).max()):.3g})")


def call_checked(op, x, qw, ps, pm, n, bias, what=""):
    """Calls op twice, the allocator poisoned with NaN bytes before each call (the op allocates
    its output, so an unwritten element likely reads as NaN: check_linear then fails on it), and
    checks that both calls give the same bits."""
    out_bytes = x.numel() // max(x.shape[-1], 1) * n * x.element_size()
    poison_allocator(out_bytes)
    y1 = op(x, qw, ps, pm, n, bias)
    poison_allocator(out_bytes)
    y2 = op(x, qw, ps, pm, n, bias)
    assert_bitwise_equal(y2, y1, f"{what}: second call vs first")
    return y1


# =====================================================================================
# linear layers vs the reference
# =====================================================================================
# (M, N, K, group, symmetric, scale storage, bias): ragged M / N / K, every group size, each
# bias kind ("same": x's dtype, "other": another float dtype) and storage, crossed below
# with op x dtype x ISA level (not the full cross product of everything).
LIN_CASES = [
    (1, 1, 32, 32, True, "fp16", None),
    (2, 15, 64, 32, False, "fp32", "fp32"),
    (7, 16, 128, 64, True, "fp32", "same"),
    (17, 17, 256, 128, False, "fp16", "same"),
    (70, 37, 384, 128, True, "fp16", "fp32"),
    (1, 100, 13, "K", False, "fp16", "fp32"),
    (2, 37, 23, "K", True, "fp32", None),
    (17, 100, 200, "K", False, "fp32", "same"),
    (7, 1, 200, "K", True, "fp16", "other"),
    (70, 100, 96, 32, False, "fp16", None),
    (1, 17, 4096, 128, True, "fp16", "same"),
    (17, 15, 13, "K", True, "fp16", "fp32"),
    (1, 300, 512, 32, False, "fp16", "same"),
    (3, 20, 1, "K", False, "fp32", None),
    (17, 37, 40, "K", False, "fp16", "same"),
    (70, 33, 8, "K", True, "fp32", "fp32"),
    (2, 31, 2048, 32, True, "fp32", "other"),
    (5, 64, 128, 128, False, "fp32", "other"),  # g = K = 128, both a group size and per channel
]


def _case_id(c):
    m, n, k, group, sym, storage, bias = c
    return f"M{m}N{n}K{k}g{group}-{'sym' if sym else 'asym'}-s{storage}-b{bias or 'none'}"


@pytest.mark.parametrize("case", LIN_CASES, ids=_case_id)
@dtypes
@schemes
def test_linear_matches_ref(isa, gen, scheme, dtype, case):
    m, n, k, group, sym, storage, bias_kind = case
    codes, d, mins = rand_weight(n, k, _gsize(k, group), sym, gen, storage)
    qw, ps, pm = packed(codes, d, mins, storage)
    x = randn((m, k), gen, dtype)
    b = make_bias(bias_kind, n, gen, dtype)
    y = call_checked(OPS[scheme], x, qw, ps, pm, n, b, scheme)
    check_linear(y, scheme, x, codes, d, mins, b, f"{scheme} {dtype_id(dtype)}")


@functools.lru_cache(maxsize=None)
def _quantized(n, k, group, sym, clip):
    """(w, reference-quantized w), computed once for all ISA levels and ops (the clip search is slow)."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((n, k, group, sym, clip)).encode()))
    w = torch.randn(n, k, generator=gen) * torch.exp(torch.randn(n, 1, generator=gen))
    return w, ref.quantize_weight_int4(w, _gsize(k, group), sym, clip_search=clip)


@pytest.mark.parametrize("group,clip", [(32, False), (64, True), (128, False), ("K", True)],
                         ids=["g32-rtn", "g64-clip", "g128-rtn", "gK-clip"])
@syms
@schemes
def test_linear_quantized_weights(isa, gen, scheme, sym, group, clip):
    """Weights from the reference quantizer (its fp16-rounded scales, as Int4Linear.from_float keeps)."""
    m, n, k = 5, 37, 384
    w, q = _quantized(n, k, group, sym, clip)
    d, mins = fmt.round_scales_fp16(q["scales"], q["mins"])
    qw, ps, pm = packed(q["codes"], d, mins, "fp16")
    x = randn((m, k), gen)
    b = randn((n,), gen)
    y = call_checked(OPS[scheme], x, qw, ps, pm, n, b, scheme)
    check_linear(y, scheme, x, q["codes"], d, mins, b, scheme)
    # and the result approximates the float layer (sanity of the whole chain, loose)
    yf = x.double() @ w.double().T + b.double()
    assert float(((y.double() - yf) ** 2).sum() / (yf ** 2).sum()) < 0.05


@pytest.mark.parametrize("kind", ["tiny", "huge"])
@schemes
def test_linear_scales_outside_fp16(isa, gen, scheme, kind):
    """Scales below fp16's normal range or above its max are kept (and stored) in fp32."""
    m, n, k, g = 3, 37, 96, 32
    lo, hi = {"tiny": (1e-9, 1e-6), "huge": (1e5, 1e7)}[kind]
    codes, d, mins = rand_weight(n, k, g, False, gen, "fp32", lo=lo, hi=hi)
    assert fmt.round_scales_fp16(d, mins)[0] is d, "round_scales_fp16 must leave such scales alone"
    qw, ps, pm = packed(codes, d, mins, "fp32")
    x = randn((m, k), gen, scale=1e-3 if kind == "huge" else 1.0)
    y = call_checked(OPS[scheme], x, qw, ps, pm, n, None, scheme)
    check_linear(y, scheme, x, codes, d, mins, None, f"{scheme} {kind}")


VIEWS = ACTIVATION_VIEWS
# each view with two dtypes (cycling), so every view meets fp32 or a 16-bit type and every dtype ~7 views
VIEW_CASES = [(v, FLOAT_DTYPES[(i + j) % 3]) for i, v in enumerate(VIEWS) for j in (0, 1)]


@pytest.mark.parametrize("view,dtype", VIEW_CASES, ids=lambda p: p if isinstance(p, str) else dtype_id(p))
@schemes
def test_linear_strided_and_nd_inputs(isa, gen, scheme, view, dtype):
    m, n, k, g = 17, 37, 64, 32
    x = activation_view(view, m, k, gen, dtype)
    codes, d, mins = rand_weight(n, k, g, view in ("3d", "offset"), gen, "fp16")
    qw, ps, pm = packed(codes, d, mins)
    b = randn((n,), gen, dtype)
    y = call_checked(OPS[scheme], x, qw, ps, pm, n, b, view)
    assert y.shape == x.shape[:-1] + (n,) and y.dtype == dtype
    # the same values, contiguous: bitwise the same result
    assert_bitwise_equal(y, OPS[scheme](x.contiguous(), qw, ps, pm, n, b), f"{view} vs contiguous")
    check_linear(y, scheme, x, codes, d, mins, b, view)


# =====================================================================================
# exact arithmetic: results pinned bit for bit
# =====================================================================================
def _exact_inputs(m, n, k, g, sym, gen, xexp):
    """x = c * 2^e per block of 32 (c integers in [-127, 127], each block holding a +-127, so the
    W4A8 quantizer returns exactly c and 2^e); d = +-2^a, m = j * 2^a (j integer). Every product
    and partial sum the kernels form (also with biased codes 1 + q / 16, and m - 16 d) is then an
    exact fp32 value (an integer well below 2^24 times a power of two >= 2^(a + e - 4)), so y must
    be exactly the float64 reference (rounded once to x's dtype)."""
    nb = (k + 31) // 32
    c = torch.randint(-127, 128, (m, nb * 32), generator=gen).to(torch.float32)
    pos = torch.randint(0, 32, (m, nb), generator=gen)
    last_len = k - (nb - 1) * 32
    pos[:, -1] = pos[:, -1] % last_len  # the forced +-127 must fall inside K
    sgn = torch.where(torch.rand(m, nb, generator=gen) < 0.5, -127.0, 127.0)
    c.view(m, nb, 32).scatter_(2, pos[..., None], sgn[..., None])
    e = torch.randint(xexp[0], xexp[1] + 1, (m, nb), generator=gen).to(torch.float32)
    x = (c.view(m, nb, 32) * torch.pow(2.0, e)[..., None]).reshape(m, nb * 32)[:, :k].contiguous()
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    groups = k // g
    a = torch.randint(-2, 1, (n, groups), generator=gen).to(torch.float32)
    d = torch.pow(2.0, a) * torch.where(torch.rand(n, groups, generator=gen) < 0.5, -1.0, 1.0)
    mins = None if sym else torch.randint(-8, 9, (n, groups), generator=gen).to(torch.float32) * d.abs()
    return x, codes, d, mins


EXACT_CASES = [(13, "K", False), (23, "K", True), (200, "K", False), (96, 32, True), (192, 64, False),
               (384, 128, True), (1024, 128, False), (64, 64, True)]


@pytest.mark.parametrize("case", EXACT_CASES, ids=lambda c: f"K{c[0]}g{c[1]}-{'sym' if c[2] else 'asym'}")
@dtypes
@schemes
def test_linear_exact_arithmetic(isa, gen, scheme, dtype, case):
    k, group, sym = case
    m, n = 6, 37
    xexp = (-7, -5) if dtype == torch.float16 else (-1, 1)  # keep fp16 outputs far from overflow
    x32, codes, d, mins = _exact_inputs(m, n, k, _gsize(k, group), sym, gen, xexp)
    x = x32.to(dtype)
    assert torch.equal(x.float(), x32), "the exact inputs are representable in every dtype"
    if scheme == "w4a8":
        qx, sx = ref.quantize_activations_q8(x)
        assert torch.equal(ref.dequantize_activations_q8(qx, sx), x.double()), "x quantizes exactly"
    b = (torch.randint(-64, 65, (n,), generator=gen).to(torch.float32) * 2.0 ** -4).to(dtype)
    qw, ps, pm = packed(codes, d, mins, "fp16")
    y = call_checked(OPS[scheme], x, qw, ps, pm, n, b, scheme)
    r = ref64(scheme, x, codes, d, mins, b)
    quantum = 2.0 ** (xexp[0] - 2)  # the finest step of any block's contribution to y (a >= -2)
    assert float(r.abs().max()) / quantum < 2 ** 21, "inputs too large for exact fp32 sums"
    assert_bitwise_equal(y, r.to(dtype), f"{scheme} exact")


# =====================================================================================
# symmetric weights are m = -8 d
# =====================================================================================
@pytest.mark.parametrize("storage", ["fp16", "fp32"])
@pytest.mark.parametrize("kg", [(96, 32), (200, "K"), (256, 128)], ids=lambda kg: f"K{kg[0]}g{kg[1]}")
@schemes
def test_symmetric_is_mins_minus_8d(isa, gen, scheme, kg, storage):
    """mins=None means w = d (q - 8): the same bits as passing mins = -8 d explicitly (exact in
    either storage dtype), and the reference with mins=None."""
    k, group = kg
    m, n = 7, 37
    codes, d, _ = rand_weight(n, k, _gsize(k, group), True, gen, storage)
    x = randn((m, k), gen)
    b = randn((n,), gen)
    qw, ps, pm = packed(codes, d, None, storage)
    assert pm is None
    y_sym = call_checked(OPS[scheme], x, qw, ps, None, n, b, scheme)
    check_linear(y_sym, scheme, x, codes, d, None, b, f"{scheme} symmetric")
    qw2, ps2, pm2 = packed(codes, d, -8.0 * d, storage)
    assert_bitwise_equal(qw2, qw, "codes")
    assert_bitwise_equal(ps2, ps, "scales")
    y_asym = OPS[scheme](x, qw2, ps2, pm2, n, b)
    assert_bitwise_equal(y_sym, y_asym, "mins=None vs mins=-8d")
    # and the two references agree (they compute d*(q-8) and d*q + (-8d) in float64: exact)
    assert torch.equal(ref64(scheme, x, codes, d, None, b), ref64(scheme, x, codes, d, -8.0 * d, b))


# =====================================================================================
# NaN / Inf / zero rows
# =====================================================================================
@pytest.mark.parametrize("case", [(23, "K", True), (96, 32, False), (200, "K", False), (256, 64, True)],
                         ids=lambda c: f"K{c[0]}g{c[1]}-{'bias' if c[2] else 'nobias'}")
@dtypes
@schemes
def test_linear_nonfinite_and_zero_rows(isa, gen, scheme, dtype, case):
    k, group, bias = case
    n = 37
    nan, inf = float("nan"), float("inf")
    codes, d, mins = rand_weight(n, k, _gsize(k, group), False, gen, "fp16")
    qw, ps, pm = packed(codes, d, mins)
    b = randn((n,), gen, dtype) if bias else None
    clean = randn((9, k), gen, torch.float32)
    x = clean.clone()
    x[1, 0] = nan                  # first element
    x[2, k - 1] = inf              # last element (partial block for most K)
    x[3, k // 2] = -inf            # middle
    x[4] = 0.0                     # all zero
    x[5, :] = nan                  # all NaN
    x[6, 0], x[6, k - 1] = inf, -inf
    x[7, k - 1] = nan
    x, clean = x.to(dtype), clean.to(dtype)
    clean[4] = 0.0
    y = OPS[scheme](x, qw, ps, pm, n, b)
    y_clean = OPS[scheme](clean, qw, ps, pm, n, b)
    r = ref64(scheme, x, codes, d, mins, b)
    for row in (1, 5, 7):
        assert bool(torch.isnan(y[row]).all()), f"row {row} holds a NaN: every output should be NaN, got {y[row]}"
    for row in (2, 3, 6):
        if scheme == "w4a8":  # the block's scale is NaN: it propagates to every output
            assert bool(torch.isnan(y[row]).all()), f"row {row} holds an Inf: W4A8 outputs should be NaN, got {y[row]}"
        else:
            # torch semantics: Inf * w is +-Inf (NaN where w == 0 or signs cancel), never finite;
            # the factored kernel (d * sum(q x) + m * sum(x)) may give NaN where torch gives +-Inf
            assert not bool(torch.isfinite(y[row]).any()), f"row {row} holds an Inf: outputs should be non-finite"
            nan_ref = torch.isnan(r[row])
            assert bool(torch.isnan(y[row])[nan_ref].all()), f"row {row}: NaN in the reference but not in y"
    zero_want = torch.zeros(n, dtype=dtype) if b is None else b.to(torch.float32).to(dtype)
    assert_bitwise_equal(y[4].abs(), zero_want.abs(), "all-zero row gives the bias (or zeros)")
    for row in (0, 8):  # rows without NaN/Inf are untouched by the others
        assert_bitwise_equal(y[row], y_clean[row], f"row {row} vs the same row in a clean batch")
    check_linear(y_clean, scheme, clean, codes, d, mins, b, "clean batch")


# =====================================================================================
# bad input -> TypeError / ValueError naming the argument
# =====================================================================================
N0, K0, G0 = 37, 96, 32


def _valid(gen):
    codes, d, mins = rand_weight(N0, K0, G0, False, gen, "fp16")
    qw, ps, pm = packed(codes, d, mins)
    return dict(x=randn((3, K0), gen), qweight=qw, scales=ps, mins=pm, n=N0, bias=randn((N0,), gen))


def _noncontig_like(t):
    """Same shape and values, every-other-element strides (not contiguous)."""
    out = torch.stack([t, t], dim=-1)[..., 0]
    assert not out.is_contiguous()
    return out


def _packed_for(n, k, g, sym=False):
    gen = torch.Generator().manual_seed(1)
    return packed(*rand_weight(n, k, g, sym, gen, "fp16"))


BAD_LINEAR = {
    # name: (mutation of the valid args, exception(s), regex the message must contain)
    "x_int32": (lambda a: a.update(x=torch.ones(3, K0, dtype=torch.int32)), TypeError, r"\bx\b"),
    "x_int8": (lambda a: a.update(x=torch.ones(3, K0, dtype=torch.int8)), TypeError, r"\bx\b"),
    "x_float64": (lambda a: a.update(x=a["x"].double()), TypeError, r"\bx\b"),
    "x_scalar": (lambda a: a.update(x=torch.tensor(1.0)), ValueError, r"\bx\b"),
    "x_empty_k": (lambda a: a.update(x=torch.empty(3, 0)), ValueError, r"\bx\b"),
    "x_list": (lambda a: a.update(x=a["x"].tolist()), TypeError, r"\bx\b"),
    "x_meta": (lambda a: a.update(x=a["x"].to("meta")), ValueError, r"\bx\b"),
    "x_k_not_divisible_by_groups": (lambda a: a.update(x=torch.randn(3, K0 + 1)), ValueError, f"K={K0 + 1}"),
    "x_k_other_group_size": (lambda a: a.update(x=torch.randn(3, K0 + 3)), ValueError, f"K={K0 + 3}"),  # g=33
    "x_k_double": (lambda a: a.update(x=torch.randn(3, 2 * K0)), ValueError, f"K={2 * K0}"),  # g=64: qweight
    "x_k_half": (lambda a: a.update(x=torch.randn(3, K0 // 2)), ValueError, f"K={K0 // 2}"),  # g=16
    "qweight_int8": (lambda a: a.update(qweight=a["qweight"].view(torch.int8)), TypeError, "qweight"),
    "qweight_float": (lambda a: a.update(qweight=a["qweight"].float()), TypeError, "qweight"),
    "qweight_numpy": (lambda a: a.update(qweight=a["qweight"].numpy()), TypeError, "qweight"),
    "qweight_canonical_2d": (lambda a: a.update(qweight=torch.zeros(N0, K0 // 2, dtype=torch.uint8)),
                             ValueError, "qweight"),
    "qweight_packed_for_more_rows": (lambda a: a.update(qweight=_packed_for(N0 + 16, K0, G0)[0]), ValueError,
                                     "qweight"),
    "qweight_packed_for_other_k": (lambda a: a.update(qweight=_packed_for(N0, K0 + 32, G0)[0]), ValueError,
                                   "qweight"),
    "qweight_flat": (lambda a: a.update(qweight=a["qweight"].view(-1)), ValueError, "qweight"),
    "qweight_noncontiguous": (lambda a: a.update(qweight=_noncontig_like(a["qweight"])), ValueError, "qweight"),
    "qweight_meta": (lambda a: a.update(qweight=a["qweight"].to("meta")), (ValueError, NotImplementedError),
                     "qweight"),
    "scales_int32": (lambda a: a.update(scales=a["scales"].to(torch.int32)), TypeError, "scales"),
    "scales_float64": (lambda a: a.update(scales=a["scales"].double(), mins=a["mins"].double()), TypeError,
                       "scales"),
    "scales_bf16": (lambda a: a.update(scales=a["scales"].bfloat16(), mins=a["mins"].bfloat16()), TypeError,
                    "scales"),
    "scales_list": (lambda a: a.update(scales=a["scales"].tolist()), TypeError, "scales"),
    "scales_2d": (lambda a: a.update(scales=a["scales"][:, :, 0].contiguous()), ValueError, "scales"),
    "scales_canonical": (lambda a: a.update(scales=torch.ones(N0, K0 // G0, dtype=torch.float16),
                                            mins=torch.ones(N0, K0 // G0, dtype=torch.float16)), ValueError, "scales"),
    "scales_panel_width_8": (lambda a: a.update(scales=a["scales"][..., :8].contiguous(),
                                                mins=a["mins"][..., :8].contiguous()), ValueError, "scales"),
    "scales_zero_groups": (lambda a: a.update(scales=a["scales"][:, :0].contiguous(),
                                              mins=a["mins"][:, :0].contiguous()), ValueError, "scales"),
    "scales_group_48": (lambda a: a.update(scales=torch.ones(3, 2, 16, dtype=torch.float16),
                                           mins=torch.ones(3, 2, 16, dtype=torch.float16)), ValueError,
                        r"scales.*group size 48"),
    "scales_groups_not_dividing_k": (lambda a: a.update(scales=torch.ones(3, 5, 16, dtype=torch.float16),
                                                        mins=torch.ones(3, 5, 16, dtype=torch.float16)), ValueError,
                                     r"scales has 5 groups"),
    "scales_too_few_panels": (lambda a: a.update(scales=a["scales"][:2].contiguous(),
                                                 mins=a["mins"][:2].contiguous()), ValueError, "scales"),
    "scales_noncontiguous": (lambda a: a.update(scales=_noncontig_like(a["scales"])), ValueError, "scales"),
    "scales_meta": (lambda a: a.update(scales=a["scales"].to("meta")), (ValueError, NotImplementedError), "scales"),
    "mins_dtype_differs": (lambda a: a.update(mins=a["mins"].float()), TypeError, "mins"),
    "mins_int": (lambda a: a.update(mins=a["mins"].to(torch.int16)), TypeError, "mins"),
    "mins_shape": (lambda a: a.update(mins=a["mins"][:, :2].contiguous()), ValueError, "mins"),
    "mins_more_panels": (lambda a: a.update(mins=torch.zeros(4, 3, 16, dtype=torch.float16)), ValueError, "mins"),
    "mins_noncontiguous": (lambda a: a.update(mins=_noncontig_like(a["mins"])), ValueError, "mins"),
    "mins_float": (lambda a: a.update(mins=0.5), TypeError, "mins"),
    "mins_meta": (lambda a: a.update(mins=a["mins"].to("meta")), (ValueError, NotImplementedError), "mins"),
    "n_zero": (lambda a: a.update(n=0), ValueError, r"\bn\b"),
    "n_negative": (lambda a: a.update(n=-5), ValueError, r"\bn\b"),
    "n_other_panel_count": (lambda a: a.update(n=N0 + 16), ValueError, f"N={N0 + 16}"),
    "n_fewer_panels": (lambda a: a.update(n=N0 - 16), ValueError, f"N={N0 - 16}"),
    "bias_wrong_shape": (lambda a: a.update(bias=torch.randn(N0 + 1)), ValueError, "bias"),
    "bias_2d": (lambda a: a.update(bias=a["bias"][None]), ValueError, "bias"),
    "bias_int": (lambda a: a.update(bias=torch.ones(N0, dtype=torch.int32)), TypeError, "bias"),
    "bias_float64": (lambda a: a.update(bias=a["bias"].double()), TypeError, "bias"),
    "bias_noncontiguous": (lambda a: a.update(bias=_noncontig_like(a["bias"])), ValueError, "bias"),
    "bias_list": (lambda a: a.update(bias=a["bias"].tolist()), TypeError, "bias"),
    "bias_meta": (lambda a: a.update(bias=a["bias"].to("meta")), ValueError, "bias"),
}


@pytest.mark.parametrize("case", list(BAD_LINEAR))
@schemes
def test_linear_bad_input(gen, scheme, case):
    mutate, exc, pattern = BAD_LINEAR[case]
    a = _valid(gen)
    mutate(a)
    with pytest.raises(exc, match=pattern) as info:
        OPS[scheme](**a)
    assert f"int4_linear_{scheme}" in str(info.value), f"message does not name the op: {info.value}"


@pytest.mark.parametrize("case", ["x_k_not_divisible_by_groups", "n_other_panel_count", "scales_group_48",
                                  "mins_dtype_differs", "bias_wrong_shape", "x_empty_k", "x_int32"])
@schemes
def test_torch_op_bad_input(gen, scheme, case):
    """torch.ops.lowbit.int4_* (what compiled graphs call) validates the same way."""
    mutate, exc, pattern = BAD_LINEAR[case]
    a = _valid(gen)
    mutate(a)
    with pytest.raises(exc, match=pattern):
        TORCH_OPS[scheme](a["x"], a["qweight"], a["scales"], a["mins"], a["n"], a["bias"])


@pytest.mark.parametrize("bad_n", [1.5, "37", None, True], ids=["float", "str", "None", "bool"])
@schemes
def test_n_not_an_int_raises_naming_n(gen, scheme, bad_n):
    a = _valid(gen)
    a["n"] = bad_n
    with pytest.raises((TypeError, ValueError), match=r"\bn\b"):
        OPS[scheme](**a)


@schemes
def test_per_channel_k_mismatch_across_octets_is_rejected(gen, scheme):
    """With g = K the packed shapes fix K only up to its octet of 8 (as the INT8 layout fixes it up
    to a quad; the modules check in_features exactly): x with another number of octets is refused."""
    n, k = 37, 13
    codes, d, mins = rand_weight(n, k, k, False, gen, "fp16")
    qw, ps, pm = packed(codes, d, mins)
    for kx in (5, 8, 17, 26):
        with pytest.raises(ValueError, match=f"K={kx}"):
            OPS[scheme](torch.randn(3, kx, generator=gen), qw, ps, pm, n)


@schemes
def test_n_inside_the_last_panel_is_taken_on_trust(gen, scheme):
    """The packed shapes fix N only up to a multiple of 16 (documented): a larger n inside the
    last panel reads the zero padding rows, so the extra outputs are exactly 0."""
    a = _valid(gen)
    a["bias"] = None
    y = OPS[scheme](**a)
    a["n"] = N0 + 2
    y2 = OPS[scheme](**a)
    assert y2.shape == (3, N0 + 2)
    assert_bitwise_equal(y2[:, :N0], y, "the first N columns")
    assert bool((y2[:, N0:] == 0).all())


@pytest.mark.parametrize("shape", [(0, K0), (3, 0, K0)], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@schemes
def test_x_without_rows_gives_y_without_rows(gen, scheme, dtype, shape):
    """M = 0 (an empty batch: e.g. an MoE expert no token was routed to) gives y [..., 0, N] of
    x's dtype, as torch.nn.functional.linear does, like the INT8 ops, through the public op and
    torch.ops; and the weights are still checked: each bad-weight case of BAD_LINEAR raises with
    empty x too."""
    a = _valid(gen)
    x = torch.empty(shape, dtype=dtype)
    for fn in (OPS[scheme], TORCH_OPS[scheme]):
        y = fn(x, a["qweight"], a["scales"], a["mins"], N0, a["bias"])
        assert y.shape == (*shape[:-1], N0) and y.dtype == dtype
    checked = [c for c in BAD_LINEAR if not c.startswith("x_")]
    assert len(checked) > 15
    for case in checked:
        mutate, exc, pattern = BAD_LINEAR[case]
        b = _valid(gen)
        mutate(b)
        b["x"] = x
        with pytest.raises(exc, match=pattern):
            OPS[scheme](**b)


@schemes
def test_cuda_tensors_are_refused(gen, scheme):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    a = _valid(gen)
    with pytest.raises((NotImplementedError, ValueError), match="CPU"):
        OPS[scheme](*(t.cuda() if isinstance(t, torch.Tensor) else t for t in a.values()))


# =====================================================================================
# packing: pack_cpu / unpack_cpu
# =====================================================================================
PACK_SHAPES = [(1, 1, "K"), (1, 13, "K"), (15, 23, "K"), (16, 32, 32), (17, 64, 32), (37, 200, "K"),
               (100, 384, 128), (33, 192, 64), (5, 8, "K"), (16, 7, "K")]


def _slow_pack(codes):
    """The documented layout, byte by byte: block (p, o) byte 4*i + j holds q[16p + i, 8o + j] in
    its low nibble and q[16p + i, 8o + 4 + j] in its high nibble; out-of-range codes are 0."""
    n, k = codes.shape
    c = codes.tolist()
    np_, no = -(-n // 16), -(-k // 8)

    def q(r, col):
        return c[r][col] if r < n and col < k else 0

    out = []
    for p in range(np_):
        for o in range(no):
            for i in range(16):
                for j in range(4):
                    out.append(q(16 * p + i, 8 * o + j) | (q(16 * p + i, 8 * o + 4 + j) << 4))
    return torch.tensor(out, dtype=torch.uint8).view(np_, no, 64)


def _slow_scales(t, n):
    """scales[p, G, i] = t[16p + i, G], zero past N."""
    np_ = -(-n // 16)
    out = torch.zeros(np_, t.shape[1], 16, dtype=torch.float32)
    for r in range(n):
        out[r // 16, :, r % 16] = t[r]
    return out


@pytest.mark.parametrize("storage", ["fp16", "fp32"])
@syms
@pytest.mark.parametrize("nkg", PACK_SHAPES, ids=lambda s: f"N{s[0]}K{s[1]}g{s[2]}")
def test_pack_unpack_round_trip(gen, nkg, sym, storage):
    n, k, group = nkg
    codes, d, mins = rand_weight(n, k, _gsize(k, group), sym, gen, storage)
    qw, ps, pm = fmt.pack_cpu(codes, d, mins)
    want_dt = torch.float16 if storage == "fp16" else torch.float32
    assert qw.dtype == torch.uint8 and qw.is_contiguous() and tuple(qw.shape) == fmt.packed_cpu_shape(n, k)
    assert tuple(qw.shape) == (-(-n // 16), -(-k // 8), 64)
    assert ps.dtype == want_dt and ps.is_contiguous() and tuple(ps.shape) == (-(-n // 16), d.shape[1], 16)
    assert (pm is None) == sym
    if pm is not None:
        assert pm.dtype == want_dt and pm.shape == ps.shape and pm.is_contiguous()
    c2, d2, m2 = fmt.unpack_cpu(qw, ps, pm, n, k)
    assert_bitwise_equal(c2, codes, "codes round trip")
    assert d2.dtype == torch.float32
    assert_bitwise_equal(d2, d, "scales round trip")
    if sym:
        assert m2 is None
    else:
        assert_bitwise_equal(m2, mins, "mins round trip")
    # the documented layout, checked byte by byte against an independent slow loop
    assert_bitwise_equal(qw, _slow_pack(codes), "packed bytes")
    assert_bitwise_equal(ps.float(), _slow_scales(d, n), "packed scales")
    if pm is not None:
        assert_bitwise_equal(pm.float(), _slow_scales(mins, n), "packed mins")


def test_pack_storage_dtype_rules(gen):
    """fp16 only when every scale and min is exactly an fp16 value; one inexact min -> fp32 for both."""
    n, k, g = 20, 64, 32
    codes, d, mins = rand_weight(n, k, g, False, gen, "fp16")
    assert fmt.pack_cpu(codes, d, mins)[1].dtype == torch.float16
    m2 = mins.clone()
    m2[19, 1] = float(m2[19, 1]) * (1 + 2.0 ** -20)
    _, ps, pm = fmt.pack_cpu(codes, d, m2)
    assert ps.dtype == torch.float32 and pm.dtype == torch.float32
    c3, d3, m3 = fmt.unpack_cpu(*fmt.pack_cpu(codes, d, m2), n, k)
    assert_bitwise_equal(d3, d, "scales")
    assert_bitwise_equal(m3, m2, "mins")
    # round_scales_fp16 leaves values outside fp16's normal range alone (they'd lose precision)
    tiny = d * 1e-6
    assert fmt.round_scales_fp16(tiny)[0] is tiny
    assert fmt.storage_dtype(fmt.round_scales_fp16(d * 3.3)[0]) == torch.float16


@pytest.mark.parametrize("nk", [(1, 13), (37, 23), (17, 200), (40, 96)], ids=str)
@schemes
def test_padding_is_never_read(isa, gen, scheme, nk):
    """Garbage in the packed padding (codes past K, rows past N, their scales / mins, even NaN)
    does not change a single output bit."""
    n, k = nk
    g = 32 if k % 32 == 0 else k
    codes, d, mins = rand_weight(n, k, g, False, gen, "fp32")
    qw, ps, pm = packed(codes, d, mins)
    x = randn((5, k), gen)
    b = randn((n,), gen)
    y = OPS[scheme](x, qw, ps, pm, n, b)
    full = torch.randint(0, 256, qw.shape, generator=gen, dtype=torch.uint8)
    want_bytes = _slow_pack(codes)
    used = _slow_pack(torch.full((n, k), 15, dtype=torch.uint8))  # nibbles that hold real codes
    qw_bad = (want_bytes & used) | (full & ~used)
    assert_bitwise_equal(fmt.unpack_cpu(qw_bad, ps, pm, n, k)[0], codes, "same codes")
    ps_bad, pm_bad = ps.clone(), pm.clone()
    rows = torch.arange(ps.shape[0] * 16).view(ps.shape[0], 1, 16).expand(ps.shape) >= n
    ps_bad[rows], pm_bad[rows] = float("nan"), float("nan")
    y_bad = OPS[scheme](x, qw_bad, ps_bad, pm_bad, n, b)
    assert_bitwise_equal(y_bad, y, "padding garbage changed the result")


# =====================================================================================
# torch.compile, fake tensors, opcheck
# =====================================================================================
def _small_op_inputs(gen, dtype=torch.float32, sym=False, bias=True):
    n, k, g = 37, 64, 32
    codes, d, mins = rand_weight(n, k, g, sym, gen, "fp16")
    qw, ps, pm = packed(codes, d, mins)
    return randn((5, k), gen, dtype), qw, ps, pm, n, (randn((n,), gen) if bias else None)


@schemes
def test_compile_fullgraph_matches_eager(gen, scheme):
    torch._dynamo.reset()
    x, qw, ps, pm, n, b = _small_op_inputs(gen, torch.bfloat16)

    def f(x):
        return OPS[scheme](x, qw, ps, pm, n, b) * 2.0

    def g(x, qw, ps):  # weights as graph inputs, symmetric, through torch.ops
        return TORCH_OPS[scheme](x, qw, ps, None, n, None)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert_bitwise_equal(cf(x), f(x), "compiled vs eager")
    x7 = randn((7, x.shape[-1]), gen, torch.bfloat16)  # another M: a recompile with M dynamic (K static)
    assert_bitwise_equal(cf(x7), f(x7), "compiled, another M")
    torch._dynamo.reset()
    x3 = x.view(1, 5, -1)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert_bitwise_equal(cf(x3), f(x3), "compiled 3-D vs eager")
    cg = torch.compile(g, fullgraph=True, backend="aot_eager")
    assert_bitwise_equal(cg(x, qw, ps), g(x, qw, ps), "compiled (torch.ops, weights as inputs) vs eager")


@pytest.mark.parametrize("how", ["2d_then_3d", "dynamic_true"])
@schemes
def test_compile_dynamic_shapes(gen, scheme, how):
    """A compiled function called with [M, K] and then [1, M, K] (the rank change makes dynamo mark
    every dim of x dynamic, K included), or compiled with dynamic=True, must still match eager."""
    torch._dynamo.reset()
    x, qw, ps, pm, n, b = _small_op_inputs(gen)

    def f(x):
        return OPS[scheme](x, qw, ps, pm, n, b)

    if how == "2d_then_3d":
        cf = torch.compile(f, fullgraph=True, backend="aot_eager")
        assert_bitwise_equal(cf(x), f(x), "compiled vs eager")
        x3 = x.view(1, 5, -1)
        assert_bitwise_equal(cf(x3), f(x3), "compiled 3-D (after 2-D) vs eager")
    else:
        cf = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
        assert_bitwise_equal(cf(x), f(x), "compiled (dynamic=True) vs eager")


@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 64), (64,)], ids=str)
@dtypes
@schemes
def test_fake_impl_shape_and_dtype(gen, scheme, dtype, shape):
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, qw, ps, pm, n, b = _small_op_inputs(gen)
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(torch.empty(shape, dtype=dtype))
        fq, fs, fm, fb = (mode.from_tensor(t) for t in (qw, ps, pm, b))
        y = TORCH_OPS[scheme](fx, fq, fs, fm, n, fb)
        assert tuple(y.shape) == (*shape[:-1], n) and y.dtype == dtype
        y = TORCH_OPS[scheme](fx, fq, fs, None, n, None)
        assert tuple(y.shape) == (*shape[:-1], n) and y.dtype == dtype
        with pytest.raises(ValueError, match=f"N={n + 16}"):
            TORCH_OPS[scheme](fx, fq, fs, fm, n + 16, fb)
        y = TORCH_OPS[scheme](mode.from_tensor(torch.empty(0, shape[-1], dtype=dtype)), fq, fs, fm, n, fb)
        assert tuple(y.shape) == (0, n) and y.dtype == dtype


@pytest.mark.parametrize("variant", ["asym_bias", "sym_nobias"])
@schemes
def test_opcheck_static(gen, scheme, variant):
    """torch.library.opcheck: schema, autograd registration, fake tensor and AOT dispatch
    (static shapes; the dynamic-shape part is test_opcheck_dynamic)."""
    sym = variant == "sym_nobias"
    x, qw, ps, pm, n, b = _small_op_inputs(gen, torch.float16, sym=sym, bias=not sym)
    torch.library.opcheck(TORCH_OPS[scheme].default, (x, qw, ps, pm, n, b),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_static"))


@schemes
def test_opcheck_dynamic(gen, scheme):
    x, qw, ps, pm, n, b = _small_op_inputs(gen)
    torch.library.opcheck(TORCH_OPS[scheme].default, (x, qw, ps, pm, n, b), test_utils=("test_aot_dispatch_dynamic",))


# =====================================================================================
# threads: thread-count independence, concurrent callers
# =====================================================================================
@pytest.mark.parametrize("case", [(40, 300, 512, 128, torch.float32), (1, 300, 2048, 32, torch.bfloat16),
                                  (17, 100, 200, "K", torch.float16)],
                         ids=lambda c: f"M{c[0]}N{c[1]}K{c[2]}g{c[3]}-{dtype_id(c[4])}")
@schemes
def test_linear_thread_count_independent(isa, gen, scheme, case, restore_threads):
    m, n, k, group, dtype = case
    codes, d, mins = rand_weight(n, k, _gsize(k, group), False, gen, "fp16")
    qw, ps, pm = packed(codes, d, mins)
    x = randn((m, k), gen, dtype)
    b = randn((n,), gen, dtype)
    results = []
    for threads in (1, 2, None, 3, 2):
        lowbit.set_num_threads(threads)
        poison_allocator(y_bytes := m * n * x.element_size())
        results.append(OPS[scheme](x, qw, ps, pm, n, b))
        assert_all_finite(results[-1], f"threads={threads} ({y_bytes} bytes)")
    for i, y in enumerate(results[1:], 1):
        assert_bitwise_equal(y, results[0], f"run {i} vs run 0 (1 thread)")
    check_linear(results[0], scheme, x, codes, d, mins, b, scheme)


@schemes
def test_concurrent_python_threads_match_serial(gen, scheme, restore_threads):
    n, k, g = 300, 512, 64
    codes, d, mins = rand_weight(n, k, g, False, gen, "fp16")
    qw, ps, pm = packed(codes, d, mins)
    b = randn((n,), gen)
    inputs = [randn(((1, 7, 70)[i % 3], k), gen, FLOAT_DTYPES[i % 3]) for i in range(4 * 12)]
    lowbit.set_num_threads(2)
    op = OPS[scheme]
    serial = [op(x, qw, ps, pm, n, b) for x in inputs]
    results = run_concurrently(lambda x: op(x, qw, ps, pm, n, b), inputs, 4)
    for i, (a, s) in enumerate(zip(results, serial)):
        assert_bitwise_equal(a, s, f"call {i}")

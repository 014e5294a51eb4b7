"""fp16 / bf16 conversions (csrc/include/lowbit/half.h and the SIMD stores), exercised through the ops.

The linear kernels compute in fp32 and round once to the output dtype, and read fp16 / bf16
inputs exactly. So for x in fp16/bf16:

    op(x) == op(x.float()).to(x.dtype)          bit for bit, every element

(the fp32 call sees exactly the same fp32 inputs and does the same arithmetic; only the final
store differs, and torch's .to() is the reference rounding: nearest-even, subnormals, overflow
to Inf, NaN stays NaN).
"""
from __future__ import annotations

import math

import pytest
import torch

import lowbit
from lowbit.formats import int8 as fmt

from conftest import assert_bitwise_equal, dtype_id, rand_codes, rand_scale

OPS = {"w8a16": lowbit.ops.int8_linear_w8a16, "w8a8": lowbit.ops.int8_linear_w8a8}
HALF = [torch.float16, torch.bfloat16]
schemes = pytest.mark.parametrize("scheme", list(OPS))
halves = pytest.mark.parametrize("dtype", HALF, ids=dtype_id)

# (x magnitude range as log10 (lo, hi) per row, weight scale range (lo, hi)) per regime and dtype.
# "subnormal": outputs land in the output dtype's subnormal range (and below);
# "overflow": outputs straddle the dtype's largest finite value (fp32 may overflow too for bf16).
REGIMES = {
    "normal": {torch.float16: ((-1, 1), (1e-3, 1e-2)), torch.bfloat16: ((-2, 2), (1e-3, 1e-2))},
    "subnormal": {torch.float16: ((-4, -1), (1e-8, 1e-6)), torch.bfloat16: ((-22, -19), (1e-21, 1e-19))},
    "overflow": {torch.float16: ((0, 2), (0.5, 20.0)), torch.bfloat16: ((16, 18), (1e17, 1e19))},
    "x_subnormal": {torch.float16: ((-7, -5), (1e-2, 1.0)), torch.bfloat16: ((-39, -38), (1e-2, 1.0))},
}


def make_x(m, k, gen, dtype, lo, hi):
    x = torch.randn(m, k, generator=gen, dtype=torch.float64)
    u = torch.rand(m, 1, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    return (x * torch.pow(10.0, u)).to(dtype)


def _check_once_rounded(scheme, x, packed, s, b):
    y = OPS[scheme](x, packed, s, b)
    r = OPS[scheme](x.float(), packed, s, b)
    assert y.dtype == x.dtype and r.dtype == torch.float32
    assert_bitwise_equal(y, r.to(x.dtype), f"{scheme} {dtype_id(x.dtype)} vs torch's rounding of the fp32 result")
    return y, r


@pytest.mark.parametrize("bias", ["none", "same", "fp32"])
@pytest.mark.parametrize("mnk", [(17, 37, 23), (5, 64, 300), (1, 16, 4)], ids=lambda t: "M{}N{}K{}".format(*t))
@pytest.mark.parametrize("regime", list(REGIMES))
@halves
@schemes
def test_half_output_is_torch_rounding_of_fp32(isa, gen, scheme, dtype, regime, mnk, bias):
    m, n, k = mnk
    (lo, hi), (slo, shi) = REGIMES[regime][dtype]
    x = make_x(m, k, gen, dtype, lo, hi)
    qw, s = rand_codes(n, k, gen), rand_scale(n, gen, slo, shi)
    b = None
    if bias != "none":
        b = (torch.randn(n, generator=gen) * (shi * 10 ** hi)).to(dtype if bias == "same" else torch.float32)
    y, r = _check_once_rounded(scheme, x, fmt.pack_cpu(qw), s, b)
    if m * n < 500:
        return  # too few outputs to be sure to hit the special ranges; the bitwise check above still ran
    if regime == "overflow":
        n_inf, n_fin = int(torch.isinf(y).sum()), int(torch.isfinite(y).sum())
        assert n_inf > 0 and n_fin > 0, f"the overflow case should give both Inf ({n_inf}) and finite ({n_fin}) outputs"
    if regime == "subnormal":
        tiny = torch.finfo(dtype).tiny
        n_sub = int(((y != 0) & (y.abs() < tiny)).sum())
        assert n_sub > 0, "the subnormal case should produce some subnormal outputs"


@pytest.mark.parametrize("k", [5, 64])
@halves
@schemes
def test_half_nonfinite_inputs(isa, gen, scheme, dtype, k):
    m, n = 6, 37
    x = torch.randn(m, k, generator=gen).to(dtype)
    x[1, 0] = float("nan")
    x[2, k - 1] = float("inf")
    x[3, k // 2] = float("-inf")
    x[4] = 0
    qw, s = rand_codes(n, k, gen), rand_scale(n, gen)
    b = torch.randn(n, generator=gen).to(dtype)
    y, _ = _check_once_rounded(scheme, x, fmt.pack_cpu(qw), s, b)
    assert bool(torch.isnan(y[1]).all()), "a NaN input row gives NaN outputs"
    assert not bool(torch.isfinite(y[2]).any()) and not bool(torch.isfinite(y[3]).any())
    assert_bitwise_equal(y[4], b if scheme == "w8a8" else (y[4] * 0 + b), "zero row: y = bias")


def _tie_count(v64: torch.Tensor, dtype) -> int:
    """How many values lie exactly halfway between two neighbours of `dtype` (normal range)."""
    p = {torch.float16: 10, torch.bfloat16: 7}[dtype]  # explicit mantissa bits
    n = 0
    for v in v64.flatten().tolist():
        if v == 0 or not math.isfinite(v) or abs(v) < torch.finfo(dtype).tiny:
            continue
        ulp = 2.0 ** (math.floor(math.log2(abs(v))) - p)
        n += (abs(v) / ulp) % 1 == 0.5
    return n


@halves
def test_ties_round_to_even_w8a16(isa, gen, dtype):
    """Integer activations and codes with a power-of-two scale: the fp32 result is exact, and many
    outputs are exactly halfway between two fp16 / bf16 values."""
    m, n, k = 17, 64, 4
    lim = {torch.float16: 1024, torch.bfloat16: 16}[dtype]
    x = torch.randint(-lim, lim + 1, (m, k), generator=gen).to(dtype)
    assert bool((x.double() == x.double().round()).all())
    qw = rand_codes(n, k, gen)
    s = torch.full((n,), 2.0 ** -3)
    exact = (x.double() @ qw.double().T) * 2.0 ** -3
    ties = _tie_count(exact, dtype)
    assert ties >= 5, f"the test data should contain ties (got {ties})"
    y = lowbit.ops.int8_linear_w8a16(x, fmt.pack_cpu(qw), s)
    assert_bitwise_equal(y, exact.to(dtype), "ties")


@halves
def test_ties_round_to_even_w8a8(isa, gen, dtype):
    """x = qx * 2^e is quantized exactly, weight scales are powers of two: exact fp32 results with ties."""
    m, n, k = 17, 64, 16
    qx = torch.randint(-4, 5, (m, k), generator=gen, dtype=torch.int16)
    qx[:, 0] = 127
    qx = qx.to(torch.int8)
    e = torch.randint(-6, 2, (m, 1), generator=gen).double()
    x = (qx.double() * 2.0 ** e).to(dtype)
    assert bool((x.double() == qx.double() * 2.0 ** e).all())
    qw = rand_codes(n, k, gen)
    we = torch.randint(-8, -2, (n,), generator=gen).double()
    s = (2.0 ** we).float()
    exact = (qx.double() @ qw.double().T) * 2.0 ** e * 2.0 ** we
    ties = _tie_count(exact, dtype)
    assert ties >= 5, f"the test data should contain ties (got {ties})"
    y = lowbit.ops.int8_linear_w8a8(x, fmt.pack_cpu(qw), s)
    assert_bitwise_equal(y, exact.to(dtype), "ties")


@halves
def test_overflow_boundary(isa, dtype):
    """Outputs exactly at, just below and just above the largest finite value, including the tie
    halfway to the next power of two (rounds to Inf: the largest finite has an odd mantissa) and the
    tie below it (rounds down to the even neighbour)."""
    fmax = torch.finfo(dtype).max
    ulp = {torch.float16: 32.0, torch.bfloat16: 2.0 ** 120}[dtype]  # spacing just below fmax
    quarter = ulp / 4
    t_max = round(fmax / quarter)
    offsets = [0, 1, 2, 3, 4, -1, -2, -3, -4, -6]  # in quarter-ulps; +2 and -2 are ties
    targets = [t_max + o for o in offsets]
    targets += [-t for t in targets]
    # y = (4 * x0 + x1) * quarter with x0, x1 small integers, exact in dtype, codes (4, 1): exact in fp32
    x = torch.tensor([[math.copysign(abs(t) // 4, t), math.copysign(abs(t) % 4, t)] for t in targets],
                     dtype=torch.float64)
    assert bool((x.to(dtype).double() == x).all())
    x = x.to(dtype)
    qw = torch.tensor([[4, 1]], dtype=torch.int8)
    s = torch.tensor([quarter], dtype=torch.float32)
    exact = torch.tensor(targets, dtype=torch.float64) * quarter
    y = lowbit.ops.int8_linear_w8a16(x, fmt.pack_cpu(qw), s)[:, 0]
    want = exact.to(dtype)
    assert bool(torch.isinf(want).any()) and bool(torch.isfinite(want).any())
    assert_bitwise_equal(y, want, "rounding at the overflow boundary")
    y32 = lowbit.ops.int8_linear_w8a16(x.float(), fmt.pack_cpu(qw), s)[:, 0]
    assert_bitwise_equal(y32, exact.float(), "fp32 path is exact here")

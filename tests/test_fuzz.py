"""Property-based fuzzing of the INT8 ops with hypothesis (issue: reliability).

Valid calls (random shapes, dtypes, ISA levels, strided / offset / 3-D activations,
bias or not) must match the float64 reference, and the fp16 / bf16 results must be
the fp32 result rounded once; invalid calls (one argument broken at a time) must
raise ValueError / TypeError naming that argument. A crash fails the whole run.
About 10,000 cases per run in total (FUZZ_EXAMPLES below).
"""
from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lowbit  # noqa: E402
from lowbit.formats import int8 as fmt  # noqa: E402
from lowbit.ref import int8 as ref  # noqa: E402

FUZZ_EXAMPLES = 2500  # per test below; 4 tests
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
OPS = {"w8a16": lowbit.ops.int8_linear_w8a16, "w8a8": lowbit.ops.int8_linear_w8a8}
REFS = {"w8a16": ref.linear_w8a16, "w8a8": ref.linear_w8a8}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@st.composite
def linear_case(draw):
    m, n, k = draw(st.integers(1, 40)), draw(st.integers(1, 70)), draw(st.integers(1, 90))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(n, k, generator=gen) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    q, s = ref.quantize_weight_per_channel(w)
    layout = draw(st.sampled_from(["contiguous", "transposed", "offset", "3d"]))
    if layout == "transposed":  # a [M, K] view of a [K, M] tensor: inner stride != 1
        x = torch.randn(k, m, generator=gen).t()
    elif layout == "offset":  # rows with padding and a storage offset
        x = torch.randn(m, k + 5, generator=gen)[:, 3:3 + k]
    elif layout == "3d":
        x = torch.randn(1, m, k, generator=gen)
    else:
        x = torch.randn(m, k, generator=gen)
    x = x * draw(st.sampled_from([1e-2, 1.0, 30.0]))
    bias = torch.randn(n, generator=gen) if draw(st.booleans()) else None
    return dict(x=x, q=q, s=s, bias=bias, scheme=draw(st.sampled_from(list(OPS))),
                isa=draw(st.sampled_from(lowbit.supported_cpu_isas())), dtype=draw(st.sampled_from(DTYPES)))


def _at_isa(isa, fn):
    prev = lowbit.cpu_isa()
    lowbit.set_cpu_isa(isa)
    try:
        return fn()
    finally:
        lowbit.set_cpu_isa(prev)


@FUZZ
@given(linear_case())
def test_fuzz_linear_valid(c):
    op, packed = OPS[c["scheme"]], fmt.pack_cpu(c["q"])
    y32 = _at_isa(c["isa"], lambda: op(c["x"], packed, c["s"], c["bias"]))
    r = REFS[c["scheme"]](c["x"].double(), c["q"], c["s"], c["bias"])
    # fp32 rounding is relative to the size of the terms summed, not of their (possibly cancelling) sum
    terms = c["x"].double().abs().reshape(-1, c["x"].shape[-1]) @ ref.dequantize_weight(c["q"], c["s"]).abs().T
    if c["bias"] is not None:
        terms = terms + c["bias"].double().abs()
    err = (y32.double() - r).abs().reshape(terms.shape)
    assert bool((err <= 1e-5 * terms + 1e-30).all()), f"{c['scheme']} fp32 error {err.max().item()}"
    if c["dtype"] != torch.float32:
        x_lo = c["x"].to(c["dtype"])
        y_lo = _at_isa(c["isa"], lambda: op(x_lo, packed, c["s"], c["bias"]))
        y_ref = _at_isa(c["isa"], lambda: op(x_lo.float(), packed, c["s"], c["bias"])).to(c["dtype"])
        assert y_lo.dtype == c["dtype"] and torch.equal(y_lo, y_ref), "low-precision output != fp32 result rounded once"


@FUZZ
@given(st.integers(1, 12), st.integers(1, 300), st.integers(0, 2**31 - 1), st.sampled_from(DTYPES),
       st.sampled_from(["normal", "tiny", "huge", "zeros", "nan", "inf"]))
def test_fuzz_quantize_per_token(m, k, seed, dtype, kind):
    gen = torch.Generator().manual_seed(seed)
    scale = {"tiny": 1e-38, "huge": 1e30}.get(kind, 1.0)
    x = (torch.randn(m, k, generator=gen) * scale).to(dtype)
    if kind == "zeros":
        x[0] = 0
    elif kind in ("nan", "inf"):
        x[m // 2, k // 2] = float(kind)
    q, s = lowbit.ops.int8_quantize_per_token(x)
    rq, rs = ref.quantize_per_token(x)
    assert torch.equal(q, rq)
    assert torch.equal(s.isnan(), rs.isnan()) and torch.equal(s.nan_to_num(), rs.nan_to_num())


def _breakage(draw, x, packed, s, bias):
    """One argument broken; returns (args, the argument's name). Strided views of one element are
    contiguous (so valid): those breakages use at least 2 elements."""
    n, k = s.shape[0], x.shape[-1]
    choices = {
        "x": [lambda: x.to(torch.int32), lambda: x.double(), lambda: torch.tensor(1.0), lambda: x[:0],
              lambda: torch.randn(x.shape[0], k + 4), lambda: x.to("meta"), lambda: x.tolist()],
        "qweight": [lambda: packed.float(), lambda: packed.view(-1), lambda: packed.transpose(2, 3),
                    lambda: fmt.pack_cpu(torch.ones(n + 16, k, dtype=torch.int8)), lambda: packed.to("meta"),
                    lambda: packed.numpy()],
        "scale": [lambda: s.double(), lambda: s[None], lambda: torch.ones(2 * n + 17), lambda: s[:0],
                  lambda: torch.ones(2 * max(n, 2))[::2], lambda: s.to("meta")],
        "bias": [lambda: torch.ones(n + 1), lambda: torch.ones(n, dtype=torch.int64), lambda: torch.ones(max(n, 2), 2)[:, 0],
                 lambda: torch.ones(n, device="meta")],
    }
    name = draw(st.sampled_from(sorted(choices)))
    broken = draw(st.sampled_from(choices[name]))()
    args = dict(x=x, qweight=packed, scale=s, bias=bias)
    args[name] = broken
    return args, name


@FUZZ
@given(st.data(), st.integers(1, 20), st.integers(1, 40), st.integers(1, 40), st.sampled_from(list(OPS)))
def test_fuzz_linear_invalid(data, m, n, k, scheme):
    x, q = torch.randn(m, k), torch.randint(-127, 128, (n, k), dtype=torch.int8)
    packed, s, bias = fmt.pack_cpu(q), torch.rand(n), torch.randn(n)
    args, name = _breakage(data.draw, x, packed, s, bias)
    with pytest.raises((TypeError, ValueError), match=name):
        OPS[scheme](**args)


@FUZZ
@given(st.integers(1, 20), st.integers(1, 40), st.integers(0, 5), st.sampled_from(list(OPS)))
def test_fuzz_module_bad_x(m, k, case, scheme):
    mod = lowbit.nn.Int8Linear.from_float(torch.nn.Linear(k, 3), scheme)
    bad = [torch.randn(m, k + 1), torch.randn(m, k).double(), torch.randint(0, 5, (m, k)), torch.tensor(0.5),
           torch.randn(0, k), torch.randn(m, k, device="meta")][case]
    with pytest.raises((TypeError, ValueError), match="x"):
        mod(bad)

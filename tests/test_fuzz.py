"""Property-based fuzzing of the INT8, INT4 and attention ops with hypothesis (issue: reliability).

Valid calls (random shapes, dtypes, ISA levels, strided / offset / 3-D activations,
bias or not; for INT4 also group sizes, symmetric or not, fp16 / fp32 scales) must
match the float64 reference, and the fp16 / bf16 results must be the fp32 result
rounded once; invalid calls (one argument broken at a time) must raise ValueError /
TypeError naming that argument. A crash fails the whole run.
About 10,000 INT8 cases per run (FUZZ_EXAMPLES below), 1,600 INT4 cases (INT4_FUZZ_EXAMPLES),
600 attention cases (contiguous and paged, ATTN_FUZZ_EXAMPLES), 800 fused row-op cases and 200
corrupted or truncated GGUF files.
"""
from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lowbit  # noqa: E402
from lowbit.formats import int4 as fmt4  # noqa: E402
from lowbit.formats import int8 as fmt  # noqa: E402
from lowbit.ref import int4 as ref4  # noqa: E402
from lowbit.ref import int8 as ref  # noqa: E402

FUZZ_EXAMPLES = 2500  # per test below; 4 tests
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
OPS = {"w8a16": lowbit.ops.int8_linear_w8a16, "w8a8": lowbit.ops.int8_linear_w8a8}
REFS = {"w8a16": ref.linear_w8a16, "w8a8": ref.linear_w8a8}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def draw_x(draw, gen, m, k, batch):
    """Activations [m, K] (or [batch, m, K]) in a drawn layout and magnitude."""
    layout = draw(st.sampled_from(["contiguous", "transposed", "offset", "3d"]))
    if layout == "transposed":  # a [M, K] view of a [K, M] tensor: inner stride != 1
        x = torch.randn(k, m, generator=gen).t()
    elif layout == "offset":  # rows with padding and a storage offset
        x = torch.randn(m, k + 5, generator=gen)[:, 3:3 + k]
    elif layout == "3d":
        x = torch.randn(batch, m, k, generator=gen)
    else:
        x = torch.randn(m, k, generator=gen)
    return x * draw(st.sampled_from([1e-2, 1.0, 30.0]))


@st.composite
def linear_case(draw):
    m, n, k = draw(st.integers(1, 40)), draw(st.integers(1, 70)), draw(st.integers(1, 90))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(n, k, generator=gen) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    q, s = ref.quantize_weight_per_channel(w)
    x = draw_x(draw, gen, m, k, batch=1)
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
        "x": [lambda: x.to(torch.int32), lambda: x.double(), lambda: torch.tensor(1.0), lambda: x[:, :0],
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
           torch.randn(0, k + 1), torch.randn(m, k, device="meta")][case]
    with pytest.raises((TypeError, ValueError), match="x"):
        mod(bad)


# =====================================================================================
# INT4: W4A16 / W4A8 on group-wise INT4 weights (lowbit.ops.int4, lowbit.formats.int4)
# =====================================================================================
INT4_FUZZ_EXAMPLES = {"valid": 600, "invalid": 1000}  # per test below (INT8's counts above unchanged)
FUZZ_INT4_VALID = settings(max_examples=INT4_FUZZ_EXAMPLES["valid"], deadline=None,
                           suppress_health_check=list(HealthCheck))
FUZZ_INT4_INVALID = settings(max_examples=INT4_FUZZ_EXAMPLES["invalid"], deadline=None,
                             suppress_health_check=list(HealthCheck))
OPS4 = {"w4a16": lowbit.ops.int4_linear_w4a16, "w4a8": lowbit.ops.int4_linear_w4a8}
REFS4 = {"w4a16": ref4.linear_w4a16, "w4a8": ref4.linear_w4a8}


@st.composite
def int4_case(draw):
    m, n = draw(st.integers(1, 40)), draw(st.integers(1, 70))
    group = draw(st.sampled_from([32, 64, 128, "K"]))
    k = draw(st.integers(1, 150)) if group == "K" else group * draw(st.integers(1, 3))
    g = k if group == "K" else group
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    sym = draw(st.booleans())
    w = torch.randn(n, k, generator=gen) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    if not sym and draw(st.booleans()):
        w = w + draw(st.sampled_from([-3.0, 2.0]))  # groups of one sign: mins far from -8 d
    qd = ref4.quantize_weight_int4(w, g, sym, clip_search=draw(st.booleans()))
    codes, d, mins = qd["codes"], qd["scales"], qd["mins"]
    if draw(st.booleans()):  # fp16-stored scales, as llama.cpp / Int4Linear keep them; else fp32
        d, mins = fmt4.round_scales_fp16(d, mins)
    x = draw_x(draw, gen, m, k, batch=2)
    dtype = draw(st.sampled_from(DTYPES))
    bias = draw(st.sampled_from([None, torch.float32, dtype]))
    bias = None if bias is None else torch.randn(n, generator=gen).to(bias)
    return dict(x=x, codes=codes, d=d, mins=mins, bias=bias, scheme=draw(st.sampled_from(list(OPS4))),
                isa=draw(st.sampled_from(lowbit.supported_cpu_isas())), dtype=dtype)


@FUZZ_INT4_VALID
@given(int4_case())
def test_fuzz_int4_linear_valid(c):
    op, scheme, n, k = OPS4[c["scheme"]], c["scheme"], c["codes"].shape[0], c["codes"].shape[1]
    qw, ps, pm = fmt4.pack_cpu(c["codes"], c["d"], c["mins"])
    c2, d2, m2 = fmt4.unpack_cpu(qw, ps, pm, n, k)
    assert torch.equal(c2, c["codes"]) and torch.equal(d2, c["d"]) and (
        m2 is None if c["mins"] is None else torch.equal(m2, c["mins"])), "pack_cpu / unpack_cpu not lossless"
    y32 = _at_isa(c["isa"], lambda: op(c["x"], qw, ps, pm, n, c["bias"]))
    assert y32.shape == (*c["x"].shape[:-1], n) and y32.dtype == torch.float32
    r = REFS4[scheme](c["x"].double(), c["codes"], c["d"], c["mins"], c["bias"]).reshape(-1, n)
    # fp32 rounding is relative to the terms the kernel adds (the scales factored per block of 32:
    # d * sum(q x) + m * sum(x)), see tests/test_int4.py
    x2 = c["x"].reshape(-1, k)
    if scheme == "w4a8":  # the activation codes are exact: only the per-block epilogue rounds
        xin, gamma = ref4.dequantize_activations_q8(*ref4.quantize_activations_q8(x2)), 2 * ((k + 31) // 32) + 6
    else:
        xin, gamma = x2.double(), 36 + 2 * ((k + 31) // 32)
    gs = k // c["d"].shape[1]
    dd = c["d"].double().repeat_interleave(gs, 1)
    mm = -8 * dd if c["mins"] is None else c["mins"].double().repeat_interleave(gs, 1)
    terms = xin.abs() @ (dd.abs() * c["codes"].double() + mm.abs()).T + r.abs()
    if c["bias"] is not None:
        terms = terms + c["bias"].double().abs()
    err = (y32.double().reshape(r.shape) - r).abs()
    assert bool((err <= gamma * 2.0**-24 * terms + 1e-30).all()), f"{scheme} fp32 error {err.max().item()}"
    if c["dtype"] != torch.float32:
        x_lo = c["x"].to(c["dtype"])
        y_lo = _at_isa(c["isa"], lambda: op(x_lo, qw, ps, pm, n, c["bias"]))
        y_ref = _at_isa(c["isa"], lambda: op(x_lo.float(), qw, ps, pm, n, c["bias"])).to(c["dtype"])
        assert y_lo.dtype == c["dtype"] and torch.equal(y_lo, y_ref), "low-precision output != fp32 result rounded once"


def _int4_breakage(draw, x, qw, ps, pm, n, bias):
    """One argument broken; returns (args, regex the message must match). Every breakage is
    invalid whatever the shapes (e.g. a K that changes the packed octet count, not one that a
    per-channel weight of K not a multiple of 8 would take on trust)."""
    k = x.shape[-1]
    kx = k + 8  # another octet count: always refused; the message quotes it
    choices = {
        "x": [(lambda: x.to(torch.int32), r"\bx\b"), (lambda: x.double(), r"\bx\b"),
              (lambda: torch.tensor(1.0), r"\bx\b"), (lambda: x[:, :0], r"\bx\b"),
              (lambda: torch.randn(x.shape[0], kx), f"K={kx}"), (lambda: x.to("meta"), r"\bx\b"),
              (lambda: x.tolist(), r"\bx\b")],
        "qweight": [(lambda: qw.float(), "qweight"), (lambda: qw.view(torch.int8), "qweight"),
                    (lambda: qw.view(-1), "qweight"), (lambda: torch.zeros(qw.shape[0] + 1, *qw.shape[1:],
                                                                           dtype=torch.uint8), "qweight"),
                    (lambda: torch.zeros(*qw.shape[:2], 32, dtype=torch.uint8), "qweight"),
                    (lambda: qw.to("meta"), "qweight"), (lambda: qw.numpy(), "qweight")],
        "scales": [(lambda: ps.double(), "scales"), (lambda: ps.to(torch.int32), "scales"),
                   (lambda: ps[None], "scales"), (lambda: ps[..., :8].contiguous(), "scales"),
                   (lambda: torch.ones(ps.shape[0] + 1, *ps.shape[1:], dtype=ps.dtype), "scales"),
                   (lambda: torch.stack([ps, ps], -1)[..., 0], "scales"), (lambda: ps.to("meta"), "scales"),
                   (lambda: ps.tolist(), "scales")],
        "mins": [(lambda: (ps if pm is None else pm).to(torch.float64), "mins"),
                 (lambda: (ps if pm is None else pm)[:, :, :8].contiguous(), "mins"),
                 (lambda: torch.stack([ps, ps], -1)[..., 0], "mins"),
                 (lambda: ps.to(torch.float32 if ps.dtype == torch.float16 else torch.float16), "mins"),
                 (lambda: ps.to("meta"), "mins"), (lambda: 0.5, "mins")],
        "bias": [(lambda: torch.ones(n + 1), "bias"), (lambda: torch.ones(n, dtype=torch.int64), "bias"),
                 (lambda: torch.ones(max(n, 2), 2)[:, 0], "bias"), (lambda: torch.ones(n, device="meta"), "bias"),
                 (lambda: torch.ones(1, n), "bias"), (lambda: torch.ones(n).tolist(), "bias")],
        "n": [(lambda: 0, r"\bn\b"), (lambda: -n, r"\bn\b"), (lambda: n + 16, f"N={n + 16}")],
    }
    name = draw(st.sampled_from(sorted(choices)))
    make, pattern = draw(st.sampled_from(choices[name]))
    args = dict(x=x, qweight=qw, scales=ps, mins=pm, n=n, bias=bias)
    args[name] = make()
    return args, pattern


@FUZZ_INT4_INVALID
@given(st.data(), st.integers(1, 20), st.integers(1, 40), st.sampled_from([32, 64, "K"]), st.integers(1, 40),
       st.booleans(), st.sampled_from([torch.float16, torch.float32]), st.sampled_from(list(OPS4)))
def test_fuzz_int4_linear_invalid(data, m, n, group, kk, sym, sdtype, scheme):
    k = kk if group == "K" else group * (1 + kk % 2)
    g = k if group == "K" else group
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    d = torch.rand(n, k // g) + 0.5
    mins = None if sym else -8 * d
    qw, ps, pm = fmt4.pack_cpu(codes, d, mins)
    ps, pm = ps.to(sdtype), None if pm is None else pm.to(sdtype)
    args, pattern = _int4_breakage(data.draw, torch.randn(m, k), qw, ps, pm, n, torch.randn(n))
    with pytest.raises((TypeError, ValueError, NotImplementedError), match=pattern):
        OPS4[scheme](**args)


# =====================================================================================
# attention: contiguous (lowbit.attention) and paged (lowbit.ops.paged_attention)
# =====================================================================================
ATTN_FUZZ_EXAMPLES = 300  # per test below
FUZZ_ATTN = settings(max_examples=ATTN_FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
ATTN_OUT_EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _attn_close(y, exact, v, what, bf16_probs=False):
    """fp32 accumulation error (a few ulps of the value scale) plus one rounding to y's dtype;
    bf16_probs: P . V took the probabilities rounded to bf16 (the avx512_bf16 level on bf16
    inputs, as torch does), which moves an output by at most 2^-8 of the largest |value|."""
    vmax = float(v.double().abs().max()) if v.numel() else 0.0
    tol = 2e-6 * vmax + 2 * ATTN_OUT_EPS[y.dtype] * (exact.abs() + vmax * 1e-3) + (2.0**-8 * vmax if bf16_probs else 0)
    err = (y.double() - exact).abs()
    assert bool((err <= tol).all()), f"{what}: max error {float(err.max()):.3g}"


@FUZZ_ATTN
@given(st.data())
def test_fuzz_attention_valid(data):
    draw = data.draw
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    hkv, ratio = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 3]))
    b, L, S = draw(st.integers(1, 2)), draw(st.integers(1, 40)), draw(st.integers(1, 150))
    d, dv = draw(st.sampled_from([8, 16, 32, 40, 64])), draw(st.sampled_from([8, 24, 64]))
    dtype = draw(st.sampled_from(DTYPES))
    q = (torch.randn(b, hkv * ratio, L, d, generator=gen) * draw(st.sampled_from([0.1, 1.0, 4.0]))).to(dtype)
    k, v = torch.randn(b, hkv, S, d, generator=gen).to(dtype), torch.randn(b, hkv, S, dv, generator=gen).to(dtype)
    causal = draw(st.booleans())
    align = draw(st.sampled_from(["top_left", "bottom_right"]))
    window = draw(st.sampled_from([None, (draw(st.integers(-1, 50)), draw(st.integers(-1, 50)))]))
    mask = None
    if not causal and draw(st.booleans()):
        shape = draw(st.sampled_from([(L, S), (1, L, S), (hkv * ratio, 1, S)]))
        mask = torch.rand(shape, generator=gen) > 0.3
        if draw(st.booleans()):
            mask = torch.zeros(shape).masked_fill(~mask, float("-inf")).to(dtype)
    isa = draw(st.sampled_from(lowbit.supported_cpu_isas()))
    y = _at_isa(isa, lambda: lowbit.attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=ratio > 1,
                                              causal_alignment=align, window=window))
    m64 = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    exact = lowbit.ref.attention.attention(q.double(), k.double(), v.double(), m64, causal, None, align, window)
    _attn_close(y, exact, v, f"{isa} attention", bf16_probs=isa == "avx512_bf16" and dtype == torch.bfloat16)


@FUZZ_ATTN
@given(st.data())
def test_fuzz_paged_attention_valid(data):
    draw = data.draw
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    hkv, ratio, d = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([8, 32, 48]))
    bs, nseq = draw(st.sampled_from([1, 4, 16])), draw(st.integers(1, 4))
    lens = [draw(st.integers(0, 90)) for _ in range(nseq)]
    qlens = [min(draw(st.integers(0, 5)), n) for n in lens]
    int8 = draw(st.booleans())
    need = [(n + bs - 1) // bs for n in lens]
    nb = sum(need) + draw(st.integers(0, 4)) + 1
    perm = torch.randperm(nb, generator=gen)
    kc, vc = (torch.full((nb, bs, hkv, d), float("nan")) for _ in range(2))  # unused slots poisoned
    ks = vs = None
    if int8:
        kc, vc = (torch.randint(-127, 128, (nb, bs, hkv, d), generator=gen).to(torch.int8) for _ in range(2))
        ks, vs = (torch.full((nb, bs, hkv), float("nan")) for _ in range(2))
    tables = torch.randint(-5, 2 * nb, (nseq, max(need + [1])), generator=gen).to(torch.int32)  # junk past the end
    ks_, vs_, used = [], [], 0
    for s, n in enumerate(lens):
        tables[s, : need[s]] = perm[used:used + need[s]].to(torch.int32)
        used += need[s]
        kk, vv = torch.randn(n, hkv, d, generator=gen), torch.randn(n, hkv, d, generator=gen)
        pos = torch.arange(n)
        slots = tables[s].to(torch.int64)[pos // bs] * bs + pos % bs
        lowbit.ops.reshape_and_cache(kk, vv, kc, vc, slots, ks, vs)
        ks_.append(kk)
        vs_.append(vv)
    qsl = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), hkv * ratio, d, generator=gen)
    isa = draw(st.sampled_from(lowbit.supported_cpu_isas()))
    y = _at_isa(isa, lambda: lowbit.ops.paged_attention(q, kc, vc, tables, torch.tensor(lens, dtype=torch.int32),
                                                        query_start_loc=qsl, k_scale=ks, v_scale=vs))
    for s, n in enumerate(lens):
        if qlens[s] == 0:
            continue
        kk, vv = ks_[s], vs_[s]
        if int8:  # the reference sees the cache's dequantized values
            qk, sk = ref.quantize_per_token(kk)
            qv, sv = ref.quantize_per_token(vv)
            kk, vv = qk.double() * sk.double()[..., None], qv.double() * sv.double()[..., None]
        qq = q[qsl[s]:qsl[s + 1]].transpose(0, 1).double()
        exact = lowbit.ref.attention.attention(qq, kk.transpose(0, 1).double(), vv.transpose(0, 1).double(),
                                               is_causal=True, causal_alignment="bottom_right").transpose(0, 1)
        _attn_close(y[qsl[s]:qsl[s + 1]], exact, vv, f"{isa} paged seq {s}")


# ---------------------------------------------------------------- fused row ops and GGUF files
FUSED_FUZZ_EXAMPLES = 400  # per test below; 2 tests
GGUF_FUZZ_EXAMPLES = 200
FUZZ_FUSED = settings(max_examples=FUSED_FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ_FUSED
@given(data=st.data())
def test_fuzz_fused_valid(data):
    """rms_norm (with / without residual), silu_and_mul and rope_ on random shapes, dtypes and
    ISA levels against lowbit.ref.fused (poisoned outputs: the ops allocate, rope_ rotates a
    strided head slice of a NaN-bordered buffer)."""
    from lowbit.ops import fused as fops
    from lowbit.ref import fused as fref

    dtype = data.draw(st.sampled_from(DTYPES))
    tol = {torch.float32: 5e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    m, k = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 300))

    def rel(got, want):
        return float(((got.double() - want.double()).abs() / want.double().abs().amax().clamp_min(1e-30)).max())

    def run():
        x = (torch.randn(m, k, generator=gen) * 5).to(dtype)
        w = torch.randn(k, generator=gen)
        r = (torch.randn(m, k, generator=gen)).to(dtype) if data.draw(st.booleans()) else None
        out, s = fops.rms_norm_cpu(x, w, 1e-5, r)
        want = fref.rms_norm(x, w, 1e-5, r)
        assert rel(out, want if r is None else want[0]) <= tol
        g = (torch.randn(m, 2 * k, generator=gen) * 6).to(dtype)
        assert rel(fops.silu_and_mul_cpu(g), fref.silu_and_mul(g)) <= 2 * tol
        h, d = data.draw(st.integers(1, 9)), 2 * data.draw(st.integers(1, 64))
        r2 = data.draw(st.integers(1, d // 2))
        buf = torch.full((m, h + 2, d), float("nan"), dtype=dtype)
        buf[:, 1:h + 1] = torch.randn(m, h, d, generator=gen).to(dtype)
        before = buf.clone()
        cos, sin = torch.randn(m, r2, generator=gen), torch.randn(m, r2, generator=gen)
        neox = data.draw(st.booleans())
        fops.rope_cpu(buf[:, 1:h + 1], cos, sin, neox)
        assert rel(buf[:, 1:h + 1], fref.rope(before[:, 1:h + 1], cos, sin, neox)) <= tol
        assert torch.equal(buf[:, 0].isnan(), before[:, 0].isnan()) and torch.equal(buf[:, -1].isnan(),
                                                                                     before[:, -1].isnan())

    _at_isa(data.draw(st.sampled_from(lowbit.supported_cpu_isas())), run)


@FUZZ_FUSED
@given(data=st.data())
def test_fuzz_fused_invalid(data):
    """One argument broken at a time -> TypeError / ValueError naming it."""
    from lowbit import ops

    m, k = data.draw(st.integers(1, 8)), 2 * data.draw(st.integers(1, 16))
    x, w = torch.randn(m, k), torch.randn(k)
    case = data.draw(st.sampled_from(["x_dtype", "w_shape", "res_shape", "eps", "silu_odd", "rope_rank",
                                      "rope_cos_rows", "rope_wide", "rope_dtype"]))
    calls = {
        "x_dtype": (lambda: ops.rms_norm(x.to(torch.int32), w), "x"),
        "w_shape": (lambda: ops.rms_norm(x, torch.randn(k + 1)), "weight"),
        "res_shape": (lambda: ops.rms_norm(x, w, 1e-5, torch.randn(m + 1, k)), "residual"),
        "eps": (lambda: ops.rms_norm(x, w, float("nan")), "eps"),
        "silu_odd": (lambda: ops.silu_and_mul(torch.randn(m, k + 1)), "x"),
        "rope_rank": (lambda: ops.rope_(x, torch.randn(m, 1), torch.randn(m, 1)), "x"),
        "rope_cos_rows": (lambda: ops.rope_(x.view(m, 1, k), torch.randn(m + 1, 1), torch.randn(m + 1, 1)), "cos"),
        "rope_wide": (lambda: ops.rope_(x.view(m, 1, k), torch.randn(m, k), torch.randn(m, k)), "2R"),
        "rope_dtype": (lambda: ops.rope_(x.view(m, 1, k), torch.randn(m, 1).half(), torch.randn(m, 1)), "cos"),
    }
    call, word = calls[case]
    with pytest.raises((TypeError, ValueError), match=word):
        call()


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    from lowbit.models.synthetic import write_synthetic_gguf

    path = tmp_path_factory.mktemp("fuzz_gguf") / "small.gguf"
    write_synthetic_gguf(path, vocab_size=300, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                         tensor_type="q4_1", embedding_type="q8_0")
    return path.read_bytes()


@settings(max_examples=GGUF_FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_gguf_corrupted_file(small_gguf, data, tmp_path_factory):
    """A GGUF file with random bytes overwritten, or cut short, either loads (the corruption hit
    weight bytes or unused metadata; the model then runs a forward pass) or raises ValueError:
    never another exception, a crash or a hang."""
    from lowbit.models import load_gguf

    blob = bytearray(small_gguf)
    if data.draw(st.booleans()):
        for _ in range(data.draw(st.integers(1, 8))):
            pos = data.draw(st.integers(0, len(blob) - 1))
            blob[pos] = data.draw(st.integers(0, 255))
    else:
        del blob[data.draw(st.integers(1, len(blob) - 1)):]
    path = tmp_path_factory.mktemp("corrupt") / "f.gguf"
    path.write_bytes(bytes(blob))
    try:
        model = load_gguf(path)
    except ValueError:
        return
    logits = model(torch.randint(0, model.config.vocab_size, (1, 3)))
    assert logits.shape == (1, 3, model.config.vocab_size)


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(exp=st.integers(41, 60), which=st.sampled_from(["int8", "int4", "cache"]))
def test_huge_sizes_refused_before_allocating(exp, which):
    """Sizes past the machine's memory (2^41 .. 2^60 bytes) raise ValueError naming the size at
    construction, instead of an allocator failure (or an attempt to fill terabytes)."""
    n = 2 ** (exp // 2)
    k = 2 ** (exp - exp // 2)
    with pytest.raises(ValueError, match="GiB"):
        if which == "int8":
            lowbit.nn.Int8Linear(k, n)
        elif which == "int4":
            lowbit.nn.Int4Linear(k, n, group_size=k)
        else:
            lowbit.PagedKVCache(num_layers=1, num_blocks=n, block_size=16, num_kv_heads=1, head_dim=k // 16 or 1)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(n=st.integers(1, 70), k_units=st.integers(1, 12), group=st.sampled_from([32, 64, 128, "K"]),
       sym=st.booleans(), fp32=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fuzz_cuda_int4_layout_round_trip(n, k_units, group, sym, fp32, seed):
    """The CUDA INT4 layout (built on the CPU here) is lossless for any N, K, group size, symmetry
    and scale dtype: unpack_cuda(pack_cuda(w)) == w, and padding holds zeros."""
    g = 32 if group == "K" else group
    k = k_units * g if group != "K" else k_units * 8 + 3
    g = k if group == "K" else g
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    d = torch.rand((n, k // g), generator=gen) + 0.01
    m = None if sym else torch.randn((n, k // g), generator=gen)
    if fp32:
        d[0, 0] = 0.1  # not a float16 value: the table must stay float32
    else:
        d = d.half().float()
        m = None if m is None else m.half().float()
    q, table = fmt4.pack_cuda(codes, d, m)
    assert tuple(q.shape) == fmt4.packed_cuda_shape(n, k)
    assert table.dtype == (torch.float32 if fp32 else torch.float16)
    c2, d2, m2 = fmt4.unpack_cuda(q, table, n, k, sym)
    assert torch.equal(c2, codes) and torch.equal(d2, d) and (sym or torch.equal(m2, m))
    full, _, _ = fmt4.unpack_cuda(q, table, q.shape[0] * 16, q.shape[1] * 64, True)
    assert int(full[n:].sum()) == 0 and int(full[:, k:].sum()) == 0

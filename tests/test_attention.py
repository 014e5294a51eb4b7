"""lowbit.attention (flash-style scaled dot-product attention on the CPU).

Checked against the float64 reference lowbit.ref.attention (explicit softmax) on every CPU ISA
level, with ragged lengths (1, 2, 17, 1000+; not multiples of the 64-key tile or the 32-row
block), GQA ratios 1 / 3 / 8, head dims 32-256 (and Dv != D), each float dtype, causal masks in
both alignments, sliding windows, boolean / additive masks with broadcasting, fully masked rows,
strided inputs, the split-key decode path, and bad input. Tolerance: flash-attention's rule,
err(lowbit) <= 2 * err(torch SDPA at the same dtype) + a floor of a few fp32 / output ulps.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.ref import attention as ref

from conftest import FLOAT_DTYPES, assert_bitwise_equal, dtype_id, randn, run_concurrently

OUT_EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
dtypes = pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)


def qkv(gen, b, hq, hkv, L, S, d, dv=None, dtype=torch.float32, scale=1.0):
    return (randn((b, hq, L, d), gen, dtype, scale), randn((b, hkv, S, d), gen, dtype, scale),
            randn((b, hkv, S, dv or d), gen, dtype))


def torch_sdpa(q, k, v, mask, causal_align, window, is_causal, scale):
    """torch SDPA (math at q's dtype) given the same semantics, for the error baseline."""
    m = ref.sdpa_mask(q.shape[-2], k.shape[-2], is_causal, causal_align, window, mask)
    return ref.torch_sdpa(q, k, v, attn_mask=m, scale=scale, enable_gqa=q.shape[-3] != k.shape[-3])


def check(y, q, k, v, mask=None, is_causal=False, scale=None, causal_align="top_left", window=None, what=""):
    exact = _ref64(q, k, v, mask, is_causal, scale, causal_align, window)
    assert y.shape == exact.shape and y.dtype == q.dtype, what
    t = torch_sdpa(q, k, v, mask, causal_align, window, is_causal, scale).double()
    # rows torch gives NaN for (all -inf) are zeros in both lowbit and the reference
    t = torch.where(torch.isnan(t) & ~torch.isnan(exact), torch.zeros_like(t), t)
    err = (y.double() - exact).abs()
    torch_err = float((t - exact).abs().max())
    vmax = float(v.double().abs().max())
    tol = 2 * torch_err + 8 * OUT_EPS[q.dtype] * vmax + 1e-6 * vmax
    assert float(err.max()) <= tol, f"{what}: max error {float(err.max()):.3g} > {tol:.3g} (torch {torch_err:.3g})"


def _ref64(q, k, v, mask, is_causal, scale, causal_align, window):
    return ref.attention(q.double(), k.double(), v.double(), None if mask is None else
                         (mask if mask.dtype == torch.bool else mask.double()), is_causal, scale, causal_align,
                         window)


# ---------------------------------------------------------------- shapes, GQA, dtypes
@pytest.mark.parametrize("shape", [
    (1, 1, 1, 1, 1, 32), (2, 3, 3, 17, 17, 64), (1, 6, 2, 2, 100, 32), (2, 8, 1, 1, 1025, 128),
    (1, 4, 4, 70, 33, 80), (1, 2, 2, 5, 300, 256), (3, 3, 1, 33, 65, 48)],
    ids=lambda s: "B{}Hq{}Hkv{}L{}S{}D{}".format(*s))
@dtypes
def test_matches_reference(isa, gen, shape, dtype):
    b, hq, hkv, L, S, d = shape
    q, k, v = qkv(gen, b, hq, hkv, L, S, d, dtype=dtype)
    y = lowbit.attention(q, k, v, enable_gqa=hq != hkv)
    check(y, q, k, v, what=f"{isa} {shape}")


@pytest.mark.parametrize("dv", [16, 40, 200])
def test_value_head_dim_differs(isa, gen, dv):
    q, k, v = qkv(gen, 2, 4, 2, 9, 77, 64, dv)
    check(lowbit.attention(q, k, v, enable_gqa=True), q, k, v, what=f"Dv={dv}")


def test_matches_torch_sdpa_fp32(gen):
    q, k, v = qkv(gen, 2, 8, 8, 50, 50, 64)
    for kw in ({}, {"is_causal": True}, {"scale": 0.3}):
        got, want = lowbit.attention(q, k, v, **kw), F.scaled_dot_product_attention(q, k, v, **kw)
        assert float((got - want).abs().max()) < 2e-6, kw


def test_large_scores_do_not_overflow(gen):
    q, k, v = qkv(gen, 1, 2, 2, 20, 200, 64, scale=30.0)  # scores ~ 1e4: exp needs the running max
    check(lowbit.attention(q, k, v), q, k, v, what="large scores")


# ---------------------------------------------------------------- causal, window
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
@pytest.mark.parametrize("LS", [(17, 17), (5, 130), (1, 1000), (130, 40), (64, 64)], ids=lambda t: f"L{t[0]}S{t[1]}")
def test_causal(isa, gen, align, LS):
    L, S = LS
    q, k, v = qkv(gen, 2, 6, 3, L, S, 64)
    y = lowbit.attention(q, k, v, is_causal=True, enable_gqa=True, causal_alignment=align)
    check(y, q, k, v, is_causal=True, causal_align=align, what=f"{isa} causal {align} L={L} S={S}")


def test_causal_top_left_is_sdpa(gen):
    q, k, v = qkv(gen, 1, 2, 2, 7, 30, 32)
    got = lowbit.attention(q, k, v, is_causal=True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert float((got - want).abs().max()) < 2e-6


def test_causal_bottom_right_rows_above_diagonal_are_zero(gen):
    """L > S, bottom-right: the first L - S queries see no key (FlashAttention gives zeros)."""
    q, k, v = qkv(gen, 1, 2, 2, 10, 4, 32)
    y = lowbit.attention(q, k, v, is_causal=True, causal_alignment="bottom_right")
    assert bool((y[:, :, :6] == 0).all()) and bool((y[:, :, 6:] != 0).any())


@pytest.mark.parametrize("window", [(0, 0), (3, -1), (16, 0), (-1, 5), (40, 40)], ids=str)
@pytest.mark.parametrize("causal,align", [(False, "top_left"), (True, "top_left"), (True, "bottom_right")])
def test_sliding_window(isa, gen, window, causal, align):
    q, k, v = qkv(gen, 1, 4, 2, 37, 150, 32)
    y = lowbit.attention(q, k, v, is_causal=causal, enable_gqa=True, causal_alignment=align, window=window)
    check(y, q, k, v, is_causal=causal, causal_align=align, window=window, what=f"{isa} window {window}")


# ---------------------------------------------------------------- masks
@pytest.mark.parametrize("mshape", ["LS", "1LS", "H1S", "BHLS", "B1LS"])
@pytest.mark.parametrize("kind", ["bool", "additive"])
@dtypes
def test_masks(isa, gen, mshape, kind, dtype):
    b, hq, L, S = 2, 4, 9, 70
    q, k, v = qkv(gen, b, hq, 2, L, S, 32, dtype=dtype)
    shape = {"LS": (L, S), "1LS": (1, L, S), "H1S": (hq, 1, S), "BHLS": (b, hq, L, S), "B1LS": (b, 1, L, S)}[mshape]
    if kind == "bool":
        mask = torch.rand(shape, generator=gen) > 0.3
    else:
        mask = (torch.randn(shape, generator=gen) * 2).to(dtype)
        mask = mask.masked_fill(torch.rand(shape, generator=gen) < 0.2, float("-inf"))
    y = lowbit.attention(q, k, v, attn_mask=mask, enable_gqa=True)
    check(y, q, k, v, mask=mask, what=f"{isa} {kind} mask {mshape}")


def test_fully_masked_rows_are_zero(isa, gen):
    q, k, v = qkv(gen, 1, 2, 2, 6, 90, 32)
    mask = torch.rand(6, 90, generator=gen) > 0.5
    mask[2] = False
    add = torch.zeros(6, 90).masked_fill(~mask, float("-inf"))
    for m in (mask, add):
        y = lowbit.attention(q, k, v, attn_mask=m)
        assert bool((y[:, :, 2] == 0).all()), "a row that attends nothing is zero"
        check(y, q, k, v, mask=m, what="fully masked row")


def test_masked_keys_contribute_nothing_even_if_inf(gen):
    """A masked-out key's value is multiplied by an exact 0, not exp(-87)."""
    q, k, v = qkv(gen, 1, 1, 1, 4, 100, 32)
    v[:, :, 50] = 1e30
    mask = torch.ones(4, 100, dtype=torch.bool)
    mask[:, 50] = False
    y = lowbit.attention(q, k, v, attn_mask=mask)
    assert bool(torch.isfinite(y).all()) and float(y.abs().max()) < 10


# ---------------------------------------------------------------- decode (split keys) and layouts
@pytest.mark.parametrize("S", [256, 511, 3000], ids=lambda s: f"S{s}")
@pytest.mark.parametrize("hq,hkv", [(1, 1), (8, 1), (6, 2)])
@dtypes
def test_decode_split_keys(isa, gen, S, hq, hkv, dtype, restore_threads):
    """One query per sequence: few (batch, kv head) blocks, so the keys are split across threads
    and merged by log-sum-exp; the result must not depend on it beyond rounding."""
    lowbit.set_num_threads(2)
    q, k, v = qkv(gen, 1, hq, hkv, 1, S, 128, dtype=dtype)
    y = lowbit.attention(q, k, v, enable_gqa=hq != hkv, is_causal=True, causal_alignment="bottom_right")
    check(y, q, k, v, is_causal=True, causal_align="bottom_right", what=f"{isa} decode S={S}")
    lowbit.set_num_threads(1)
    y1 = lowbit.attention(q, k, v, enable_gqa=hq != hkv, is_causal=True, causal_alignment="bottom_right")
    check(y1, q, k, v, is_causal=True, causal_align="bottom_right", what=f"{isa} decode 1 thread")


@pytest.mark.parametrize("layout", ["BLHD_transposed", "sliced_head_dim", "3d", "5d"])
def test_strided_and_nd_inputs(isa, gen, layout):
    b, h, L, S, d = 2, 4, 11, 40, 32
    if layout == "BLHD_transposed":  # the usual [B, L, H, D] projection output viewed as [B, H, L, D]
        q = randn((b, L, h, d), gen).transpose(1, 2)
        k = randn((b, S, h, d), gen).transpose(1, 2)
        v = randn((b, S, h, d), gen).transpose(1, 2)
    elif layout == "sliced_head_dim":
        q, k, v = (randn((b, h, n, d + 8), gen)[..., 4:4 + d] for n in (L, S, S))
    elif layout == "3d":
        q, k, v = randn((h, L, d), gen), randn((h, S, d), gen), randn((h, S, d), gen)
    else:
        q, k, v = randn((2, 3, h, L, d), gen), randn((2, 3, h, S, d), gen), randn((2, 3, h, S, d), gen)
    y = lowbit.attention(q, k, v, is_causal=True)
    check(y, q, k, v, is_causal=True, what=layout)
    assert_bitwise_equal(y, lowbit.attention(q.contiguous(), k.contiguous(), v.contiguous(), is_causal=True), layout)


def test_nan_in_query_gives_nan_row(gen):
    q, k, v = qkv(gen, 1, 1, 1, 3, 50, 32)
    q[0, 0, 1, 5] = float("nan")
    y = lowbit.attention(q, k, v)
    assert bool(torch.isnan(y[0, 0, 1]).all()) and bool(torch.isfinite(y[0, 0, [0, 2]]).all())


def test_empty_inputs(gen):
    q, k, v = qkv(gen, 1, 2, 2, 0, 5, 32)
    assert lowbit.attention(q, k, v).shape == (1, 2, 0, 32)
    q, k, v = qkv(gen, 1, 2, 2, 3, 0, 32)
    y = lowbit.attention(q, k, v)
    assert y.shape == (1, 2, 3, 32) and bool((y == 0).all())


# ---------------------------------------------------------------- compile, threads
def test_compile_fullgraph(gen):
    q, k, v = qkv(gen, 1, 4, 2, 9, 33, 32)

    def f(q, k, v):
        return lowbit.attention(q, k, v, is_causal=True, enable_gqa=True, causal_alignment="bottom_right",
                                window=(8, 0))

    torch._dynamo.reset()
    assert_bitwise_equal(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v), f(q, k, v), "compiled")


def test_concurrent_calls_match_serial(gen, restore_threads):
    lowbit.set_num_threads(2)
    inputs = [qkv(gen, 1, 4, 2, (1, 7)[i % 2], 300, 64) for i in range(16)]

    def f(t):
        return lowbit.attention(*t, enable_gqa=True, is_causal=True, causal_alignment="bottom_right")

    serial = [f(t) for t in inputs]
    for i, (a, s) in enumerate(zip(run_concurrently(f, inputs, 4), serial)):
        assert_bitwise_equal(a, s, f"call {i}")


# ---------------------------------------------------------------- bad input
def _ok(gen):
    q, k, v = qkv(gen, 1, 4, 2, 3, 5, 32)
    return dict(query=q, key=k, value=v, enable_gqa=True)


BAD = {
    "dropout": (lambda a: a.update(dropout_p=0.1), ValueError, "dropout_p"),
    "mask_and_causal": (lambda a: a.update(attn_mask=torch.ones(3, 5, dtype=torch.bool), is_causal=True),
                        ValueError, "attn_mask or is_causal"),
    "gqa_not_enabled": (lambda a: a.update(enable_gqa=False), ValueError, "enable_gqa"),
    "heads_not_multiple": (lambda a: a.update(key=torch.randn(1, 3, 5, 32), value=torch.randn(1, 3, 5, 32)),
                           ValueError, "multiple"),
    "head_dim_mismatch": (lambda a: a.update(key=torch.randn(1, 2, 5, 16)), ValueError, "head_dim"),
    "value_length": (lambda a: a.update(value=torch.randn(1, 2, 6, 32)), ValueError, "value"),
    "dtype_mismatch": (lambda a: a.update(key=a["key"].half()), TypeError, "key"),
    "int_query": (lambda a: a.update(query=torch.ones(1, 4, 3, 32, dtype=torch.int32)), TypeError, "query"),
    "2d_query": (lambda a: a.update(query=torch.randn(3, 32)), ValueError, "query"),
    "batch_mismatch": (lambda a: a.update(key=torch.randn(2, 2, 5, 32), value=torch.randn(2, 2, 5, 32)),
                       ValueError, "leading"),
    "mask_shape": (lambda a: a.update(attn_mask=torch.ones(4, 5, dtype=torch.bool)), ValueError, "attn_mask"),
    "mask_dtype": (lambda a: a.update(attn_mask=torch.zeros(3, 5, dtype=torch.float16)), TypeError, "attn_mask"),
    "mask_not_tensor": (lambda a: a.update(attn_mask=[[True]]), TypeError, "attn_mask"),
    "query_not_tensor": (lambda a: a.update(query=1.0), TypeError, "query"),
    "bad_alignment": (lambda a: a.update(causal_alignment="top"), ValueError, "causal_alignment"),
    "window_not_pair": (lambda a: a.update(window=3), ValueError, "window"),
    "window_below_minus_one": (lambda a: a.update(window=(-2, 0)), ValueError, "window"),
    "window_float": (lambda a: a.update(window=(1.5, 0)), ValueError, "window"),
    "scale_nan": (lambda a: a.update(scale=float("nan")), ValueError, "scale"),
    "scale_str": (lambda a: a.update(scale="1"), ValueError, "scale"),
    "causal_not_bool": (lambda a: a.update(is_causal=1), TypeError, "is_causal"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(gen, case):
    mutate, exc, pattern = BAD[case]
    a = _ok(gen)
    mutate(a)
    with pytest.raises(exc, match=pattern):
        lowbit.attention(**a)


def test_default_scale_is_inverse_sqrt_head_dim(gen):
    q, k, v = qkv(gen, 1, 2, 2, 4, 20, 48)
    a = lowbit.attention(q, k, v)
    b = lowbit.attention(q, k, v, scale=1 / math.sqrt(48))
    assert_bitwise_equal(a, b, "default scale")

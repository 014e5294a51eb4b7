"""INT4 groundwork: reference quantizer, nibble packing, GGUF Q4_0/Q4_1/Q8_0 and GPTQ converters.

The GGUF tests use the `gguf` PyPI package (gguf-py, llama.cpp's own Python reader/writer) as
the independent reference when it is installed; the GPTQ tests use a packer written here,
loop by loop, from the published AutoGPTQ format (independent of lowbit/formats/gptq.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.formats import gguf as lgguf
from lowbit.formats import gptq as lgptq
from lowbit.formats.int4 import pack_nibbles, unpack_nibbles
from lowbit.ref.int4 import dequantize_int4, quantize_weight_int4

from conftest import awq_pack_reference

SHAPES = [(1, 32), (7, 64), (13, 128), (33, 256), (5, 384)]  # ragged N, K a multiple of the group
GROUPS = [32, 64, 128, "K"]


def _g(k, group):
    return k if group == "K" else group


def _weights(n, k, gen, dtype=torch.float32):
    w = torch.randn(n, k, generator=gen) * torch.exp(torch.randn(n, 1, generator=gen))
    w[0, :min(k, 5)] = 0.0                                     # some zeros
    if n > 2:
        w[2] = 0.0                                              # an all-zero row (d = 0)
    if n > 3:
        w[3] += 3.0                                             # an all-positive-ish row
    return w.to(dtype)


def _expand(t, g):
    return t.repeat_interleave(g, dim=1)


# ---------------------------------------------------------------- reference quantizer
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("n,k", SHAPES)
def test_quantizer_error_bound(n, k, group, symmetric, gen):
    g = _g(k, group)
    if k % g:
        pytest.skip("group does not divide K")
    w = _weights(n, k, gen)
    out = quantize_weight_int4(w, g, symmetric)
    codes, scales, mins = out["codes"], out["scales"], out["mins"]
    assert codes.dtype == torch.uint8 and codes.shape == (n, k) and int(codes.max()) <= 15
    assert scales.dtype == torch.float32 and scales.shape == (n, k // g)
    assert (mins is None) == symmetric
    deq = dequantize_int4(codes, scales, mins).double()
    err = (deq - w.double()).abs()
    d = _expand(scales.double().abs(), g)
    slack = 1e-5 * w.double().abs().amax() + 1e-30
    if symmetric:
        # the value of largest |x| maps to q = 0 exactly; only values beyond 7.5|d| on the other
        # side clamp at q = 15 (error <= |d|), every other value rounds to nearest (<= |d|/2)
        t = w.double() / _expand(scales.double(), g)
        t = torch.nan_to_num(t, nan=0.0)
        clamped = t > 7.5
        assert bool((err[~clamped] <= d[~clamped] / 2 + slack).all())
        assert bool((err[clamped] <= d[clamped] + slack).all())
        assert bool((codes.reshape(n, k // g, g).amin(-1) == 0)[scales != 0].all())
    else:
        assert bool((err <= d / 2 + slack).all())
        assert torch.equal(mins, w.reshape(n, k // g, g).amin(-1))
    if n > 2:
        assert bool((deq[2] == 0).all())                        # all-zero row stays zero


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group", [32, 128])
def test_clip_search_never_worse(group, symmetric, gen):
    n, k = 19, 512
    w = _weights(n, k, gen)
    w[1, 7] = 25.0                                              # outliers make clipping pay off
    w[4, 300] = -30.0
    g = group
    plain = quantize_weight_int4(w, g, symmetric)
    clip = quantize_weight_int4(w, g, symmetric, clip_search=True)

    def group_mse(o):
        e = (dequantize_int4(o["codes"], o["scales"], o["mins"]).double() - w.double()) ** 2
        return e.reshape(n, k // g, g).sum(-1)

    mp, mc = group_mse(plain), group_mse(clip)
    assert bool((mc <= mp).all())
    assert float(mc.sum()) < float(mp.sum())                    # and it helps somewhere


def test_quantizer_accepts_half_inputs(gen):
    w = _weights(6, 64, gen, torch.bfloat16)
    a = quantize_weight_int4(w, 32, False)
    b = quantize_weight_int4(w.float(), 32, False)
    assert all(torch.equal(a[x], b[x]) for x in ("codes", "scales", "mins"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantizer_rejects_nonfinite(bad, gen):
    w = _weights(4, 64, gen)
    w[1, 3] = bad
    with pytest.raises(ValueError, match="w"):
        quantize_weight_int4(w, 32, True)


@pytest.mark.parametrize("g", [48, 16, 0, 100])
def test_quantizer_rejects_bad_group(g, gen):
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight_int4(_weights(4, 96, gen), g, True)


def test_quantizer_rejects_non_dividing_group(gen):
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight_int4(_weights(4, 80, gen), 32, False)


# ---------------------------------------------------------------- nibble packing
@pytest.mark.parametrize("n,k", [(1, 2), (5, 34), (17, 256)])
def test_nibble_roundtrip(n, k, gen):
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (n, k // 2) and packed.dtype == torch.uint8
    assert torch.equal(packed & 0xF, codes[:, 0::2]) and torch.equal(packed >> 4, codes[:, 1::2])
    assert torch.equal(unpack_nibbles(packed), codes)


def test_nibble_errors():
    with pytest.raises(ValueError, match="codes"):
        pack_nibbles(torch.tensor([[3, 16]], dtype=torch.uint8))
    with pytest.raises(TypeError, match="codes"):
        pack_nibbles(torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="codes"):
        pack_nibbles(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="packed"):
        unpack_nibbles(torch.zeros(2, 4, dtype=torch.int8))


# ---------------------------------------------------------------- GGUF
def _rand_f16_bytes(shape, gen, lo=-8.0, hi=-2.0):
    """Random finite fp16 values (random sign, log-uniform magnitude) as uint8 [..., 2]."""
    mag = torch.exp2(torch.empty(shape).uniform_(lo, hi, generator=gen))
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    return (mag * sign).to(torch.float16).view(torch.uint8).reshape(*shape, 2)


def _rand_raw(kind, n, k, gen):
    nb = k // 32
    head = [_rand_f16_bytes((n, nb), gen)]
    if kind == "q4_1":
        head.append(_rand_f16_bytes((n, nb), gen))
    body = torch.randint(0, 256, (n, nb, 16 if kind != "q8_0" else 32), generator=gen, dtype=torch.uint8)
    return torch.cat(head + [body], dim=-1).reshape(n, -1)


FROM = {"q4_0": lgguf.from_gguf_q4_0, "q4_1": lgguf.from_gguf_q4_1, "q8_0": lgguf.from_gguf_q8_0}


def _to(kind, c):
    if kind == "q4_0":
        return lgguf.to_gguf_q4_0(c["codes"], c["scales"])
    if kind == "q4_1":
        return lgguf.to_gguf_q4_1(c["codes"], c["scales"], c["mins"])
    return lgguf.to_gguf_q8_0(c["codes"], c["scales"])


def _lowbit_dequant(kind, c):
    if kind == "q8_0":
        return c["codes"].to(torch.float32) * c["scales"].repeat_interleave(32, dim=1)
    return dequantize_int4(c["codes"], c["scales"], c["mins"])


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("n,k", [(1, 32), (7, 96), (13, 256)])
def test_gguf_roundtrip_bit_exact(kind, n, k, gen):
    raw = _rand_raw(kind, n, k, gen)
    c = FROM[kind](raw, n, k)
    assert c["codes"].shape == (n, k) and c["scales"].shape == (n, k // 32)
    assert c["scales"].dtype == torch.float32
    assert torch.equal(_to(kind, c), raw)
    c2 = FROM[kind](raw.reshape(-1).numpy(), n, k)              # flat numpy input
    assert all(torch.equal(c[x], c2[x]) for x in c if c[x] is not None)


def test_gguf_q4_0_nibble_order():
    # one block: element j in the low nibble of byte j, element j + 16 in its high nibble
    codes = torch.arange(32, dtype=torch.uint8).remainder(16).reshape(1, 32)
    codes[0, 16:] = 15 - codes[0, 16:]
    raw = lgguf.to_gguf_q4_0(codes, torch.tensor([[0.5]]))
    assert raw.shape == (1, 18)
    assert raw[0, :2].view(torch.float16).item() == 0.5
    for j in range(16):
        assert int(raw[0, 2 + j]) == int(codes[0, j]) | (int(codes[0, j + 16]) << 4)


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("n,k", [(3, 64), (11, 256)])
def test_gguf_against_gguf_py(kind, n, k, gen):
    gq = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType as T
    qt = {"q4_0": T.Q4_0, "q4_1": T.Q4_1, "q8_0": T.Q8_0}[kind]
    # bytes from gguf-py's quantizer -> canonical -> dequantize must equal gguf-py's dequantize
    w = _weights(n, k, gen).numpy()
    raw = gq.quantize(w, qt)
    c = FROM[kind](raw, n, k)
    ref = gq.dequantize(raw, qt).reshape(n, k)
    assert np.array_equal(_lowbit_dequant(kind, c).numpy(), ref)
    assert np.array_equal(_to(kind, c).numpy(), raw.reshape(n, -1))
    # random bytes too (every code / scale pattern, not just quantizer output)
    raw = _rand_raw(kind, n, k, gen).numpy()
    assert np.array_equal(_lowbit_dequant(kind, FROM[kind](raw, n, k)).numpy(),
                          gq.dequantize(raw, qt).reshape(n, k))


@pytest.mark.parametrize("symmetric", [True, False], ids=["q4_0", "q4_1"])
def test_quantizer_matches_llama_cpp(symmetric, gen):
    gq = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType as T
    w = _weights(9, 256, gen)
    out = quantize_weight_int4(w, 32, symmetric)
    ours = (lgguf.to_gguf_q4_0(out["codes"], out["scales"]) if symmetric
            else lgguf.to_gguf_q4_1(out["codes"], out["scales"], out["mins"]))
    theirs = gq.quantize(w.numpy(), T.Q4_0 if symmetric else T.Q4_1).reshape(9, -1)
    assert np.array_equal(ours.numpy(), theirs)


def test_gguf_errors():
    raw = torch.zeros(2 * 2 * 18, dtype=torch.uint8)
    with pytest.raises(ValueError, match="raw"):
        lgguf.from_gguf_q4_0(raw[:-1], 2, 64)
    with pytest.raises(ValueError, match="raw"):
        lgguf.from_gguf_q4_1(raw, 2, 64)                        # Q4_0-sized bytes
    with pytest.raises(ValueError, match="k"):
        lgguf.from_gguf_q4_0(raw, 2, 48)
    with pytest.raises(ValueError, match="n"):
        lgguf.from_gguf_q8_0(raw, 0, 64)
    with pytest.raises(TypeError, match="raw"):
        lgguf.from_gguf_q4_0(raw.to(torch.int8), 2, 64)
    codes = torch.zeros(2, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="scales"):
        lgguf.to_gguf_q4_0(codes, torch.ones(2, 1))             # group 64, not 32
    with pytest.raises(ValueError, match="scales"):
        lgguf.to_gguf_q4_0(codes, torch.full((2, 2), 1e6))      # overflows fp16
    with pytest.raises(ValueError, match="mins"):
        lgguf.to_gguf_q4_1(codes, torch.ones(2, 2), None)
    with pytest.raises(ValueError, match="codes"):
        lgguf.to_gguf_q4_0(codes + 16, torch.ones(2, 2))
    with pytest.raises(ValueError, match="scales"):
        lgguf.to_gguf_q8_0(torch.zeros(2, 64, dtype=torch.int8), torch.ones(2, 3))


# ---------------------------------------------------------------- GPTQ
def _ref_gptq_pack(q_kn, z_gn, scales_gn, zero_offset):
    """Published AutoGPTQ packing, written element by element (independent of lowbit)."""
    k, n = q_kn.shape
    ng = z_gn.shape[0]
    qweight = np.zeros((k // 8, n), dtype=np.uint32)
    for row in range(k // 8):
        for i in range(8):
            qweight[row] |= q_kn[row * 8 + i].astype(np.uint32) << np.uint32(4 * i)
    qzeros = np.zeros((ng, (n + 7) // 8), dtype=np.uint32)
    stored = (z_gn - zero_offset).astype(np.uint32)
    for col in range(n):
        qzeros[:, col // 8] |= stored[:, col] << np.uint32(4 * (col % 8))
    return (torch.from_numpy(qweight.view(np.int32)), torch.from_numpy(qzeros.view(np.int32)),
            torch.from_numpy(scales_gn.astype(np.float16)))


@pytest.mark.parametrize("zero_offset", [0, 1])
@pytest.mark.parametrize("n,k,g", [(8, 64, 32), (24, 256, 128), (40, 128, 128), (13, 64, 64)])
def test_gptq_from_reference_packing(n, k, g, zero_offset, gen):
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    q = rng.integers(0, 16, (k, n)).astype(np.uint8)
    z = rng.integers(zero_offset, 16 + zero_offset, (k // g, n))
    s = (rng.uniform(1e-3, 5e-2, (k // g, n)) * rng.choice([-1, 1], (k // g, n))).astype(np.float16)
    qweight, qzeros, scales = _ref_gptq_pack(q, z, s, zero_offset)
    out = lgptq.from_gptq(qweight, qzeros, scales, zero_offset=zero_offset)
    assert torch.equal(out["codes"], torch.from_numpy(q.T.copy()))
    assert out["scales"].shape == (n, k // g) and out["mins"].shape == (n, k // g)
    # w = scale * (q - z), computed independently in float64, equals lowbit's dequantization
    w_ref = (s.astype(np.float64).repeat(g, axis=0) * (q.astype(np.float64) - z.repeat(g, axis=0))).T
    deq = dequantize_int4(out["codes"], out["scales"], out["mins"]).double().numpy()
    np.testing.assert_allclose(deq, w_ref, rtol=1e-6, atol=1e-7)
    # the trivial g_idx is accepted, and to_gptq inverts from_gptq bit for bit
    trivial = torch.arange(k, dtype=torch.int32) // g
    out2 = lgptq.from_gptq(qweight, qzeros, scales, g_idx=trivial, zero_offset=zero_offset)
    assert all(torch.equal(out[x], out2[x]) for x in out)
    back = lgptq.to_gptq(out["codes"], out["scales"], out["mins"], zero_offset=zero_offset)
    assert torch.equal(back["qweight"], qweight) and torch.equal(back["qzeros"], qzeros)
    assert torch.equal(back["scales"], scales) and torch.equal(back["g_idx"], trivial)


@pytest.mark.parametrize("zero_offset", [0, 1])
def test_gptq_act_order_roundtrip(zero_offset, gen):
    """to_gptq with from_gptq's perm writes the act-order checkpoint back bit for bit (g_idx included)."""
    n, k, g = 24, 256, 64
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    q = rng.integers(0, 16, (k, n)).astype(np.uint8)
    z = rng.integers(zero_offset, 16 + zero_offset, (k // g, n))
    s = (rng.uniform(1e-3, 5e-2, (k // g, n))).astype(np.float16)
    qweight, qzeros, scales = _ref_gptq_pack(q, z, s, zero_offset)
    g_idx = torch.arange(k, dtype=torch.int32)[torch.randperm(k, generator=gen)] // g
    out = lgptq.from_gptq(qweight, qzeros, scales, g_idx=g_idx, zero_offset=zero_offset)
    back = lgptq.to_gptq(out["codes"], out["scales"], out["mins"], zero_offset=zero_offset, perm=out["perm"])
    for name, want in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales), ("g_idx", g_idx)):
        assert torch.equal(back[name], want), name
    with pytest.raises(ValueError, match="perm"):
        lgptq.to_gptq(out["codes"], out["scales"], out["mins"], zero_offset=zero_offset, perm=out["perm"][1:])
    with pytest.raises(ValueError, match="perm"):
        lgptq.to_gptq(out["codes"], out["scales"], out["mins"], zero_offset=zero_offset,
                      perm=torch.zeros(k, dtype=torch.int64))


def test_gptq_roundtrip_from_canonical(gen):
    n, k, g = 16, 256, 64
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    d = (torch.rand(n, k // g, generator=gen) * 0.1 + 1e-3).half().float()
    z = torch.randint(0, 16, (n, k // g), generator=gen).float()
    c = {"codes": codes, "scales": d, "mins": -(d * z)}
    t = lgptq.to_gptq(**c)
    back = lgptq.from_gptq(t["qweight"], t["qzeros"], t["scales"], g_idx=t["g_idx"])
    assert all(torch.equal(c[x], back[x]) for x in c)


# ---------------------------------------------------------------- AWQ
@pytest.mark.parametrize("n,k,g", [(8, 64, 32), (24, 256, 128), (40, 128, 64), (16, 96, 96)])
def test_awq_from_reference_packing(n, k, g, gen):
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    q = rng.integers(0, 16, (k, n)).astype(np.uint8)
    z = rng.integers(0, 16, (k // g, n))
    s = (rng.uniform(1e-3, 5e-2, (k // g, n)) * rng.choice([-1, 1], (k // g, n))).astype(np.float16)
    qweight, qzeros, scales = awq_pack_reference(q), awq_pack_reference(z), torch.from_numpy(s)
    out = lgptq.from_awq(qweight, qzeros, scales)
    assert torch.equal(out["codes"], torch.from_numpy(q.T.copy()))
    # w = scale * (q - z), computed independently in float64, is lowbit's dequantization exactly
    w_ref = (s.astype(np.float64).repeat(g, axis=0) * (q.astype(np.float64) - z.repeat(g, axis=0))).T
    deq = dequantize_int4(out["codes"], out["scales"], out["mins"]).double().numpy()
    np.testing.assert_array_equal(deq, w_ref)
    back = lgptq.to_awq(out["codes"], out["scales"], out["mins"])
    assert all(torch.equal(back[x], t) for x, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)))


def test_awq_errors(gen):
    n, k, g = 16, 128, 32
    qweight = torch.randint(-2**31, 2**31 - 1, (k, n // 8), generator=gen, dtype=torch.int32)
    qzeros = torch.zeros(k // g, n // 8, dtype=torch.int32)
    scales = torch.ones(k // g, n, dtype=torch.float16)
    with pytest.raises(ValueError, match="bits"):
        lgptq.from_awq(qweight, qzeros, scales, bits=8)
    with pytest.raises(ValueError, match="qzeros"):
        lgptq.from_awq(qweight, qzeros[:, :1], scales)
    with pytest.raises(TypeError, match="qweight"):
        lgptq.from_awq(qweight.float(), qzeros, scales)
    with pytest.raises(ValueError, match="scales"):
        lgptq.from_awq(qweight, qzeros, scales[:, :-1])
    with pytest.raises(ValueError, match="scales"):  # a GPTQ-shaped qweight [K/8, N] does not fit AWQ's scales
        lgptq.from_awq(torch.zeros(k // 8, n, dtype=torch.int32), qzeros, scales)
    codes = torch.zeros(n, k, dtype=torch.uint8)
    with pytest.raises(ValueError, match="mins"):
        lgptq.to_awq(codes, torch.ones(n, k // g), torch.full((n, k // g), -0.5))  # z = 0.5
    with pytest.raises(ValueError, match="mins"):
        lgptq.to_awq(codes, torch.ones(n, k // g), None)
    with pytest.raises(ValueError, match="multiple of 8"):
        lgptq.to_awq(codes[:12], torch.ones(12, k // g), torch.zeros(12, k // g))


def test_gptq_errors(gen):
    n, k, g = 16, 128, 32
    qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), generator=gen, dtype=torch.int32)
    qzeros = torch.zeros(k // g, n // 8, dtype=torch.int32)
    scales = torch.ones(k // g, n, dtype=torch.float16)
    act_order = torch.arange(k, dtype=torch.int32)[torch.randperm(k, generator=gen)] // g
    out = lgptq.from_gptq(qweight, qzeros, scales, g_idx=act_order)
    plain = lgptq.from_gptq(qweight, qzeros, scales)
    assert torch.equal(act_order[out["perm"]].long(), torch.arange(k) // g), "perm makes each group contiguous"
    assert torch.equal(out["codes"], plain["codes"][:, out["perm"]]) and torch.equal(out["mins"], plain["mins"])
    with pytest.raises(ValueError, match="g_idx"):
        lgptq.from_gptq(qweight, qzeros, scales, g_idx=torch.zeros(k, dtype=torch.int32))  # one group of K
    with pytest.raises(ValueError, match="g_idx"):
        lgptq.from_gptq(qweight, qzeros, scales, g_idx=act_order.float())
    with pytest.raises(ValueError, match="g_idx"):
        lgptq.from_gptq(qweight, qzeros, scales, g_idx=act_order[:-1])
    with pytest.raises(ValueError, match="bits"):
        lgptq.from_gptq(qweight, qzeros, scales, bits=8)
    with pytest.raises(ValueError, match="qzeros"):
        lgptq.from_gptq(qweight, qzeros[:, :1], scales)
    with pytest.raises(TypeError, match="qweight"):
        lgptq.from_gptq(qweight.float(), qzeros, scales)
    with pytest.raises(ValueError, match="scales"):
        lgptq.from_gptq(qweight, qzeros, scales[:, :-1])
    codes = torch.zeros(n, k, dtype=torch.uint8)
    with pytest.raises(ValueError, match="mins"):
        lgptq.to_gptq(codes, torch.ones(n, k // g), torch.full((n, k // g), -0.5))  # z = 0.5
    with pytest.raises(ValueError, match="mins"):
        lgptq.to_gptq(codes, torch.ones(n, k // g), torch.full((n, k // g), 3.0))   # z = -3
    with pytest.raises(ValueError, match="bits"):
        lgptq.to_gptq(codes, torch.ones(n, k // g), torch.zeros(n, k // g), bits=3)

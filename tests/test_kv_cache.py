"""Paged KV cache: lowbit.ops.{reshape_and_cache, paged_attention, copy_blocks, swap_blocks} and
lowbit.PagedKVCache.

paged_attention is checked against the float64 reference lowbit.ref.attention computed on each
sequence's own contiguous K / V (causal, bottom-right aligned: the queries are the last positions
of their sequence), on every CPU ISA level, with GQA ratios 1 / 3 / 8, sequence lengths 1, 2, 17,
1000+ (not multiples of the 16-token block or the 64-key tile; 0 in chunked prefill and in
decode), block tables holding shuffled block ids (and garbage past each sequence's last block), every float dtype, and every cache slot
no sequence owns poisoned with NaN (a masked key must contribute an exact zero). Tolerance:
flash-attention's rule as in test_attention.py, err <= 2 * err(torch SDPA at the same dtype) + a
floor of a few output ulps. INT8 caches are checked tightly against the reference on the
dequantized K / V, and their error against an fp32 cache against a derived bound.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

import lowbit
from lowbit import ops
from lowbit.ops import kv_cache as kv_ops
from lowbit.ref import attention as ref
from lowbit.ref.int8 import quantize_per_token

from conftest import FLOAT_DTYPES, assert_bitwise_equal, copied_blocks, dtype_id, nmse, randn, rel_err

OUT_EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
dtypes = pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
BS = 16
GARBAGE = 2**30  # block table entries past a sequence's last block: must never be read


# ---------------------------------------------------------------- building paged caches
def make_seqs(gen, seq_lens, hkv, d, dv, dtype):
    """[(K [hkv, S, d], V [hkv, S, dv])] per sequence, random, in dtype."""
    return [(randn((hkv, S, d), gen, dtype), randn((hkv, S, dv), gen, dtype)) for S in seq_lens]


def paged_layout(gen, seq_lens, bs, extra_blocks=3, extra_cols=2):
    """Shuffled block ids for each sequence: (num_blocks, block_tables int32, slots per sequence).
    Columns past a sequence's last block hold out-of-range garbage (they must be ignored)."""
    need = [(S + bs - 1) // bs for S in seq_lens]
    nb = sum(need) + extra_blocks
    perm = torch.randperm(nb, generator=gen)
    bt = torch.empty(len(seq_lens), max(need + [0]) + extra_cols, dtype=torch.int32)
    bt[:, 0::2], bt[:, 1::2] = GARBAGE, -GARBAGE
    slots, i = [], 0
    for s, S in enumerate(seq_lens):
        blocks = perm[i:i + need[s]]
        i += need[s]
        bt[s, :need[s]] = blocks.to(torch.int32)
        pos = torch.arange(S)
        slots.append(blocks[pos // bs] * bs + pos % bs)
    return nb, bt, slots


def fill_caches(seqs, slots, nb, bs, cache_dtype, gen):
    """Caches holding each sequence's K / V at its slots (written directly, not through
    reshape_and_cache); every other slot poisoned (NaN, or random codes with NaN scales for INT8).
    Returns (key_cache, value_cache, k_scale, v_scale, seqs as the cache stores them, float64)."""
    hkv, d, dv = seqs[0][0].shape[0], seqs[0][0].shape[2], seqs[0][1].shape[2]
    int8 = cache_dtype == torch.int8
    caches, scales, stored = [], [], [[None, None] for _ in seqs]
    for j, dim in ((0, d), (1, dv)):
        if int8:
            c = torch.randint(-128, 128, (nb, bs, hkv, dim), generator=gen, dtype=torch.int8)
            sc = torch.full((nb, bs, hkv), float("nan"))
        else:
            c, sc = torch.full((nb, bs, hkv, dim), float("nan"), dtype=cache_dtype), None
        for s, kv in enumerate(seqs):
            rows = kv[j].transpose(0, 1)  # [S, hkv, dim]
            if int8:
                codes, rs = quantize_per_token(rows)
                c.view(-1, hkv, dim)[slots[s]] = codes
                sc.view(-1, hkv)[slots[s]] = rs
                stored[s][j] = (codes.double() * rs.double()[..., None]).transpose(0, 1)
            else:
                c.view(-1, hkv, dim)[slots[s]] = rows.to(cache_dtype)
                stored[s][j] = kv[j].to(cache_dtype).double()  # as the cache holds it
        caches.append(c)
        scales.append(sc)
    return caches[0], caches[1], scales[0], scales[1], [tuple(x) for x in stored]


def build(gen, seq_lens, hkv, d, dv, dtype, cache_dtype=None, bs=BS):
    seqs = make_seqs(gen, seq_lens, hkv, d, dv, dtype)
    nb, bt, slots = paged_layout(gen, seq_lens, bs)
    kc, vc, ks, vs, stored = fill_caches(seqs, slots, nb, bs, cache_dtype or dtype, gen)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    return dict(key_cache=kc, value_cache=vc, block_tables=bt, seq_lens=sl, k_scale=ks, v_scale=vs), seqs, stored


def drop_empty(args, stored):
    """The same caches, for the sequences that have keys only (decode rejects empty ones:
    test_decode_empty_sequence_gives_zeros)."""
    keep = args["seq_lens"] > 0
    a = dict(args, block_tables=args["block_tables"][keep].contiguous(), seq_lens=args["seq_lens"][keep].contiguous())
    return a, [st for st, k in zip(stored, keep.tolist()) if k]


def qsl_of(qlens):
    return torch.tensor([0] + list(torch.tensor(qlens).cumsum(0).tolist()), dtype=torch.int32)


# ---------------------------------------------------------------- reference and tolerance
def reference(q, stored, qsl, window=None, scale=None):
    """float64 [T, hq, dv]: each sequence's queries (its last positions) against its own K / V,
    causal bottom-right (+ window); a sequence without keys gives zeros. Also torch SDPA at q's
    dtype on the same K / V (rounded to q's dtype), the error baseline."""
    T, hq, _ = q.shape
    dv = stored[0][1].shape[-1]
    exact = torch.zeros(T, hq, dv, dtype=torch.float64)
    theirs = torch.zeros(T, hq, dv, dtype=torch.float64)
    for s, (K, V) in enumerate(stored):
        a, b = int(qsl[s]), int(qsl[s + 1])
        S = K.shape[1]
        if a == b or S == 0:
            continue
        qs = q[a:b].transpose(0, 1)  # [hq, L, d]
        exact[a:b] = ref.attention(qs.double(), K.double(), V.double(), is_causal=True, scale=scale,
                                   causal_alignment="bottom_right", window=window).transpose(0, 1)
        mask = ref.allowed_mask(b - a, S, True, "bottom_right", window)
        t = ref.torch_sdpa(qs, K.to(q.dtype), V.to(q.dtype), attn_mask=mask, scale=scale,
                           enable_gqa=hq != K.shape[0])
        theirs[a:b] = t.double().transpose(0, 1)
    return exact, theirs


def check_paged(y, q, stored, qsl, window=None, scale=None, what=""):
    __tracebackhide__ = True
    exact, theirs = reference(q, stored, qsl, window, scale)
    assert y.shape == exact.shape and y.dtype == q.dtype, f"{what}: {tuple(y.shape)} {y.dtype}"
    assert bool(torch.isfinite(y).all()), f"{what}: NaN/Inf in the output (poisoned slot read?)"
    err = float((y.double() - exact).abs().max()) if y.numel() else 0.0
    torch_err = float((theirs - exact).abs().max()) if y.numel() else 0.0
    vmax = max([float(V.abs().max()) for _, V in stored if V.numel()] + [1.0])
    tol = 2 * torch_err + 8 * OUT_EPS[q.dtype] * vmax + 1e-6 * vmax
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g} (torch {torch_err:.3g})"
    for s, (K, _) in enumerate(stored):  # no keys: exact zeros
        if K.shape[1] == 0:
            assert bool((y[int(qsl[s]):int(qsl[s + 1])] == 0).all()), f"{what}: empty sequence {s} not zero"


# ---------------------------------------------------------------- reshape_and_cache
def _slot_mapping(gen, n, nb, bs, skip_every=4):
    """n distinct random slots; every skip_every-th token (from the second) is -1 (padding)."""
    slots = torch.randperm(nb * bs, generator=gen)[:n].to(torch.int64)
    slots[1::skip_every] = -1
    return slots


@pytest.mark.parametrize("num_tokens", [0, 1, 37])
@dtypes
def test_reshape_and_cache_float(gen, dtype, num_tokens):
    nb, bs, h, d, dv = 7, 8, 3, 40, 24
    key, value = randn((num_tokens, h, d), gen, dtype), randn((num_tokens, h, dv), gen, dtype)
    kc, vc = randn((nb, bs, h, d), gen, dtype), randn((nb, bs, h, dv), gen, dtype)
    slots = _slot_mapping(gen, num_tokens, nb, bs)
    want_k, want_v = kc.clone(), vc.clone()
    for t in range(num_tokens):
        if slots[t] >= 0:
            want_k.view(-1, h, d)[slots[t]] = key[t]
            want_v.view(-1, h, dv)[slots[t]] = value[t]
    ops.reshape_and_cache(key, value, kc, vc, slots)
    assert_bitwise_equal(kc, want_k, "key_cache")
    assert_bitwise_equal(vc, want_v, "value_cache")


@pytest.mark.parametrize("num_tokens", [1, 37])
@dtypes
def test_reshape_and_cache_int8(gen, dtype, num_tokens):
    """Codes and scales are lowbit.ref.int8.quantize_per_token of each (token, head) row, bitwise;
    special rows: all zero (scale 0), one spike, a NaN (scale NaN, as the reference says)."""
    nb, bs, h, d, dv = 6, 8, 2, 64, 33
    key, value = randn((num_tokens, h, d), gen, dtype, 3.0), randn((num_tokens, h, dv), gen, dtype)
    if num_tokens > 5:
        key[1, 0] = 0
        value[2, 1] = 0
        key[3, 1, 7] = 1000.0
        value[5, 0, 4] = float("nan")
    kc = torch.randint(-128, 128, (nb, bs, h, d), generator=gen, dtype=torch.int8)
    vc = torch.randint(-128, 128, (nb, bs, h, dv), generator=gen, dtype=torch.int8)
    ks, vs = torch.rand(nb, bs, h, generator=gen), torch.rand(nb, bs, h, generator=gen)
    slots = _slot_mapping(gen, num_tokens, nb, bs, skip_every=3)
    before = [t.clone() for t in (kc, vc, ks, vs)]
    want = [t.clone() for t in before]
    keep = slots >= 0
    for (x, codes_i, scale_i), dim in (((key, 0, 2), d), ((value, 1, 3), dv)):
        codes, sc = quantize_per_token(x[keep])
        want[codes_i].view(-1, h, dim)[slots[keep]] = codes
        want[scale_i].view(-1, h)[slots[keep]] = sc
    ops.reshape_and_cache(key, value, kc, vc, slots, ks, vs)
    for got, w, name in zip((kc, vc, ks, vs), want, ("key_cache", "value_cache", "k_scale", "v_scale")):
        assert_bitwise_equal(got, w, name)


@pytest.mark.parametrize("slots", [[], [-1, -1]], ids=["no_tokens", "all_padding"])
def test_reshape_and_cache_int8_nothing_to_write(gen, slots):
    n, nb, bs, h, d = len(slots), 4, 8, 2, 16
    kc, vc = torch.zeros(nb, bs, h, d, dtype=torch.int8), torch.zeros(nb, bs, h, d, dtype=torch.int8)
    ks, vs = torch.ones(nb, bs, h), torch.ones(nb, bs, h)
    ops.reshape_and_cache(randn((n, h, d), gen), randn((n, h, d), gen), kc, vc, torch.tensor(slots, dtype=torch.int64),
                          ks, vs)
    assert bool((kc == 0).all()) and bool((ks == 1).all())


# ---------------------------------------------------------------- paged_attention: decode
DECODE_LENS = [1, 2, 17, 1037, 65, 33]


@pytest.mark.parametrize("hq,hkv,d,dv", [(2, 2, 64, 48), (6, 2, 80, 80), (16, 2, 128, 128)],
                         ids=["gqa1", "gqa3", "gqa8"])
@dtypes
def test_decode(isa, gen, dtype, hq, hkv, d, dv):
    args, _, stored = build(gen, DECODE_LENS, hkv, d, dv, dtype)
    q = randn((len(DECODE_LENS), hq, d), gen, dtype)
    y = ops.paged_attention(q, **args)
    check_paged(y, q, stored, torch.arange(len(DECODE_LENS) + 1), what=f"{isa} decode")


@pytest.mark.parametrize("bs", [1, 5, 32, 128])
def test_decode_block_sizes(gen, bs):
    args, _, stored = build(gen, [1, 31, 200, 129], 2, 64, 64, torch.float32, bs=bs)
    q = randn((4, 4, 64), gen)
    check_paged(ops.paged_attention(q, **args), q, stored, torch.arange(5), what=f"block_size {bs}")


def test_decode_strided_query_and_scale(gen):
    """A query view (e.g. a slice of a fused qkv projection) and an explicit scale."""
    args, _, stored = build(gen, [3, 100], 2, 32, 32, torch.float32)
    qkv = randn((2, 4, 32 + 16), gen)
    q = qkv[:, :, 8:40]
    y = ops.paged_attention(q, **args, scale=0.3)
    check_paged(y, q.contiguous(), stored, torch.arange(3), scale=0.3, what="strided query")
    assert_bitwise_equal(y, ops.paged_attention(q.contiguous(), **args, scale=0.3), "strided vs contiguous")


@pytest.mark.parametrize("lens", [[0], [3, 0, 40], [0, 0]], ids=str)
def test_decode_empty_sequence_gives_zeros(gen, lens):
    args, _, stored = build(gen, lens, 2, 32, 32, torch.float32)
    q = randn((len(lens), 4, 32), gen)
    y = ops.paged_attention(q, **args)
    check_paged(y, q, stored, torch.arange(len(lens) + 1), what="empty sequence")


@pytest.mark.parametrize("threads", [1, 2])
def test_paged_equals_contiguous(isa, gen, threads, restore_threads):
    """paged_attention on a cache == lowbit.attention on each sequence's contiguous K / V (decode,
    causal bottom-right): bitwise on one thread (same tiles and summation order); with threads the
    contiguous call may split the keys of a long sequence differently (log-sum-exp merge), so only
    to ~1e-6 relative."""
    lowbit.set_num_threads(threads)
    lens = [1, 2, 17, 64, 65, 1037, 300]
    hq, hkv, d = 6, 2, 64
    args, seqs, _ = build(gen, lens, hkv, d, d, torch.float32)
    q = randn((len(lens), hq, d), gen)
    y = ops.paged_attention(q, **args)
    for s, (K, V) in enumerate(seqs):
        c = lowbit.attention(q[s][None, :, None, :], K[None], V[None], is_causal=True,
                             causal_alignment="bottom_right", enable_gqa=True)[0, :, 0]
        if threads == 1:
            assert_bitwise_equal(y[s], c, f"{isa} seq {s} (S={lens[s]})")
        else:
            assert rel_err(y[s], c) <= 4e-6, f"{isa} seq {s}: {rel_err(y[s], c):.2e}"


# ---------------------------------------------------------------- chunked prefill
PREFILL = ([5, 0, 40, 17, 300, 70, 1, 129], [3, 0, 40, 0, 7, 70, 1, 64])  # seq_lens, queries per sequence


@dtypes
def test_chunked_prefill(isa, gen, dtype):
    lens, qlens = PREFILL
    args, _, stored = build(gen, lens, 2, 64, 64, dtype)
    qsl = qsl_of(qlens)
    q = randn((sum(qlens), 6, 64), gen, dtype)
    y = ops.paged_attention(q, **args, query_start_loc=qsl)
    check_paged(y, q, stored, qsl, what=f"{isa} prefill")


def test_chunked_prefill_gqa8_and_decode_agree(gen):
    """query_start_loc with one query per sequence is decode, bitwise."""
    lens = [1, 18, 1000]
    args, _, stored = build(gen, lens, 1, 128, 128, torch.float32)
    q = randn((3, 8, 128), gen)
    y = ops.paged_attention(q, **args, query_start_loc=qsl_of([1, 1, 1]))
    check_paged(y, q, stored, torch.arange(4), what="gqa8")
    assert_bitwise_equal(y, ops.paged_attention(q, **args), "decode vs query_start_loc")
    qlens = [1, 18, 33]
    q = randn((sum(qlens), 8, 128), gen)
    check_paged(ops.paged_attention(q, **args, query_start_loc=qsl_of(qlens)), q, stored, qsl_of(qlens),
                what="gqa8 prefill")


# ---------------------------------------------------------------- window
@pytest.mark.parametrize("left", [0, 5, 16, 100])
def test_window(isa, gen, left):
    lens, qlens = PREFILL
    args, _, stored = build(gen, lens, 2, 32, 32, torch.float32)
    qsl = qsl_of(qlens)
    q = randn((sum(qlens), 4, 32), gen)
    y = ops.paged_attention(q, **args, query_start_loc=qsl, window=(left, -1))
    check_paged(y, q, stored, qsl, window=(left, -1), what=f"{isa} prefill window {left}")
    args, stored = drop_empty(args, stored)
    q = randn((len(stored), 4, 32), gen)
    y = ops.paged_attention(q, **args, window=(left, -1))
    check_paged(y, q, stored, torch.arange(len(stored) + 1), window=(left, -1), what=f"{isa} decode window {left}")


# ---------------------------------------------------------------- INT8 cache
@pytest.mark.parametrize("qdtype", FLOAT_DTYPES, ids=dtype_id)
def test_int8_cache_matches_dequantized_reference(isa, gen, qdtype):
    """The exact target of an INT8 cache is attention on the dequantized K / V (codes * scale):
    tight (the flash-attention tolerance), on decode and chunked prefill; unused slots hold random
    codes and NaN scales."""
    lens, qlens = PREFILL
    args, _, stored = build(gen, lens, 2, 64, 64, qdtype, cache_dtype=torch.int8)
    dargs, dstored = drop_empty(args, stored)
    q = randn((len(dstored), 6, 64), gen, qdtype)
    check_paged(ops.paged_attention(q, **dargs), q, dstored, torch.arange(len(dstored) + 1), what=f"{isa} int8 decode")
    qsl = qsl_of(qlens)
    q = randn((sum(qlens), 6, 64), gen, qdtype)
    check_paged(ops.paged_attention(q, **args, query_start_loc=qsl), q, stored, qsl, what=f"{isa} int8 prefill")


@pytest.mark.parametrize("qdtype,cdtype", [(torch.float32, torch.float16), (torch.float32, torch.bfloat16),
                                            (torch.bfloat16, torch.float32)], ids=str)
def test_float_cache_of_another_dtype(isa, gen, qdtype, cdtype):
    """A float cache need not have the activations' dtype (fp32 activations over an fp16 cache is
    llama.cpp's default): writes round to the cache dtype, attention reads what the cache holds."""
    lens, qlens = PREFILL
    args, _, stored = build(gen, lens, 2, 64, 64, qdtype, cache_dtype=cdtype)
    dargs, dstored = drop_empty(args, stored)
    q = randn((len(dstored), 6, 64), gen, qdtype)
    check_paged(ops.paged_attention(q, **dargs), q, dstored, torch.arange(len(dstored) + 1),
                what=f"{isa} {cdtype} cache decode")
    qsl = qsl_of(qlens)
    q = randn((sum(qlens), 6, 64), gen, qdtype)
    check_paged(ops.paged_attention(q, **args, query_start_loc=qsl), q, stored, qsl, what=f"{isa} {cdtype} prefill")
    key, value = randn((5, 2, 64), gen, qdtype), randn((5, 2, 64), gen, qdtype)
    kc, vc = torch.full((4, BS, 2, 64), float("nan"), dtype=cdtype), torch.full((4, BS, 2, 64), float("nan"), dtype=cdtype)
    slots = torch.tensor([3, 0, -1, 2 * BS + 1, 4 * BS - 1])
    ops.reshape_and_cache(key, value, kc, vc, slots)
    keep = slots >= 0
    assert torch.equal(kc.view(-1, 2, 64)[slots[keep]], key[keep].to(cdtype))
    assert torch.equal(vc.view(-1, 2, 64)[slots[keep]], value[keep].to(cdtype))


def int8_error_bound(q, seqs, k_scale_rows, v_scale_rows, scale):
    """Worst-case |out_int8 - out_exact| per (query, head), for decode.

    Round to nearest: every K / V element is off by at most s / 2 = amax / 254 of its (token, head)
    row. A score q . k * scale is then off by at most D_j = scale * sum|q| * sk_j / 2 <= D; the
    softmax weights p' ~ p * exp(ds) satisfy p'_j / p_j in [e^-2D, e^2D], so |sum (p'_j - p_j) v_j|
    <= (e^2D - 1) * max|v|; and |sum p'_j dv_j| <= max sv_j / 2. (Loose: the errors are random and
    mostly cancel; measured, 0.1% to 4% of it.)"""
    hq = q.shape[1]
    bound = torch.zeros(q.shape[0], hq, dtype=torch.float64)
    for s, (K, V) in enumerate(seqs):
        hkv = K.shape[0]
        for h in range(hq):
            g = h // (hq // hkv)
            D = scale * float(q[s, h].double().abs().sum()) * float(k_scale_rows[s][:, g].max()) / 2
            bound[s, h] = math.expm1(2 * D) * float(V[g].double().abs().max()) + float(v_scale_rows[s][:, g].max()) / 2
    return bound


@pytest.mark.parametrize("S,d", [(1, 64), (17, 64), (300, 128), (1037, 128)], ids=lambda x: str(x))
def test_int8_error_vs_fp32_cache(gen, S, d):
    """INT8 vs fp32 cache on the same N(0, 1) K / V (decode, GQA 4).

    1. Below the worst-case bound of int8_error_bound, element by element.
    2. Statistically: the rounding errors are ~ U(-s/2, s/2), std sigma = s / sqrt(12) with
       s = amax / 127 ~ 2.9 / 127 for rows of 64-128 Gaussians, so sigma ~ 0.0066. A score moves by
       ~ scale * |q| * sigma ~ sigma, so out = sum p_j v_j moves by ~ sqrt(sum p_j^2) * sigma from the
       scores and as much from the values, while out itself is ~ sqrt(sum p_j^2) (an average of unit
       Gaussians): NMSE ~ 2 sigma^2 ~ 8.7e-5 whatever the length (S = 1: the values only, ~4.4e-5).
       Measured (240 random cases): NMSE 4e-5 .. 1.1e-4; max |err| / max |out| 4e-3 .. 1.5e-2.
       Asserted: NMSE < 2.5e-4 (~3x the estimate) and max |err| / max |out| < 3e-2 (2x the worst seen).
    """
    lens = [S, S // 2 + 1, 2 * S + 3]
    hq, hkv = 8, 2
    args, seqs, _ = build(gen, lens, hkv, d, d, torch.float32)
    nb, bs = args["key_cache"].shape[:2]
    kc8 = torch.zeros(args["key_cache"].shape, dtype=torch.int8)
    vc8 = torch.zeros(args["value_cache"].shape, dtype=torch.int8)
    ks, vs = torch.zeros(nb, bs, hkv), torch.zeros(nb, bs, hkv)
    slots = _slots_from(args["block_tables"], lens, bs)
    ksr, vsr = [], []
    for s, (K, V) in enumerate(seqs):
        ops.reshape_and_cache(K.transpose(0, 1).contiguous(), V.transpose(0, 1).contiguous(), kc8, vc8, slots[s],
                              ks, vs)
        ksr.append(ks.view(-1, hkv)[slots[s]])
        vsr.append(vs.view(-1, hkv)[slots[s]])
    q = randn((len(lens), hq, d), gen)
    y32 = ops.paged_attention(q, **args)
    y8 = ops.paged_attention(q, kc8, vc8, args["block_tables"], args["seq_lens"], k_scale=ks, v_scale=vs)
    assert bool(torch.isfinite(y8).all())
    err = (y8.double() - y32.double()).abs()
    bound = int8_error_bound(q, seqs, ksr, vsr, 1 / math.sqrt(d))
    slack = 1e-5 * max(float(V.abs().max()) for _, V in seqs)  # the fp32 result's own rounding
    assert bool((err.amax(-1) <= bound + slack).all()), "INT8 error above the worst-case bound"
    e, n = rel_err(y8, y32), nmse(y8, y32)
    assert n < 2.5e-4 and e < 3e-2, f"INT8 vs fp32 cache: NMSE {n:.2e}, max |err| / max |out| {e:.2e}"


def _slots_from(bt, lens, bs):
    out = []
    for s, S in enumerate(lens):
        pos = torch.arange(S)
        out.append(bt[s].to(torch.int64)[pos // bs] * bs + pos % bs)
    return out


# ---------------------------------------------------------------- copy_blocks / swap_blocks
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.int8], ids=dtype_id)
def test_copy_blocks(gen, cache_dtype):
    layers, nb, bs, h, d, dv = 3, 10, 4, 2, 8, 6
    int8 = cache_dtype == torch.int8

    def rnd(shape):
        if int8:
            return torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)
        return randn(shape, gen, cache_dtype)

    kcs = [rnd((nb, bs, h, d)) for _ in range(layers)]
    vcs = [rnd((nb, bs, h, dv)) for _ in range(layers)]
    kss = [torch.rand(nb, bs, h, generator=gen) for _ in range(layers)] if int8 else None
    vss = [torch.rand(nb, bs, h, generator=gen) for _ in range(layers)] if int8 else None
    mapping = torch.tensor([[1, 7], [1, 8], [3, 0], [9, 2]])  # one source to two copies; dsts are not sources
    groups = [kcs, vcs] + ([kss, vss] if int8 else [])
    want = copied_blocks(groups, mapping)
    ops.copy_blocks(kcs, vcs, mapping, kss, vss)
    for g, w in zip(groups, want):
        for i, (t, tw) in enumerate(zip(g, w)):
            assert_bitwise_equal(t, tw, f"layer {i}")
    before = [[t.clone() for t in g] for g in groups]
    ops.copy_blocks(kcs, vcs, torch.zeros(0, 2, dtype=torch.int64), kss, vss)  # empty mapping: no-op
    for g, w in zip(groups, before):
        for t, tw in zip(g, w):
            assert_bitwise_equal(t, tw, "empty mapping")


@pytest.mark.parametrize("bad", [[[1, 10]], [[10, 1]], [[-1, 2]], [[2, -1]]], ids=str)
def test_copy_blocks_bad_ids(gen, bad):
    kcs, vcs = [randn((10, 4, 2, 8), gen)], [randn((10, 4, 2, 8), gen)]
    before = [kcs[0].clone(), vcs[0].clone()]
    with pytest.raises(ValueError, match="block_mapping"):
        ops.copy_blocks(kcs, vcs, torch.tensor([[0, 5]] + bad))
    assert_bitwise_equal(kcs[0], before[0], "key cache after a rejected copy")
    assert_bitwise_equal(vcs[0], before[1], "value cache after a rejected copy")


def test_copy_blocks_bad_mapping_type(gen):
    kcs, vcs = [randn((10, 4, 2, 8), gen)], [randn((10, 4, 2, 8), gen)]
    with pytest.raises(TypeError, match="block_mapping"):
        ops.copy_blocks(kcs, vcs, torch.tensor([[0, 5]], dtype=torch.int32))
    with pytest.raises(ValueError, match="block_mapping"):
        ops.copy_blocks(kcs, vcs, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="k_scale"):
        ops.copy_blocks([torch.zeros(10, 4, 2, 8, dtype=torch.int8)], [torch.zeros(10, 4, 2, 8, dtype=torch.int8)],
                        torch.tensor([[0, 5]]))


@pytest.mark.parametrize("what", ["fp32", "int8", "scales"])
def test_swap_blocks(gen, what):
    """Between two CPU caches of different num_blocks, both directions."""
    def rnd(nb):
        if what == "int8":
            return torch.randint(-128, 128, (nb, 4, 2, 8), generator=gen, dtype=torch.int8)
        if what == "scales":
            return torch.rand(nb, 4, 2, generator=gen)
        return randn((nb, 4, 2, 8), gen)

    big, small = rnd(10), rnd(6)
    for src, dst, mapping in ((big, small, [[9, 0], [2, 5], [4, 1]]), (small, big, [[5, 9], [0, 0], [0, 3]])):
        want = dst.clone()
        for s, d in mapping:
            want[d] = src[s]
        src_before = src.clone()
        ops.swap_blocks(src, dst, torch.tensor(mapping))
        assert_bitwise_equal(dst, want, "dst")
        assert_bitwise_equal(src, src_before, "src untouched")


def test_swap_blocks_bad(gen):
    big, small = randn((10, 4, 2, 8), gen), randn((6, 4, 2, 8), gen)
    before = small.clone()
    for mapping in ([[10, 0]], [[0, 6]], [[-1, 0]], [[0, -1]]):
        with pytest.raises(ValueError, match="block_mapping"):
            ops.swap_blocks(big, small, torch.tensor([[1, 1]] + mapping))
    assert_bitwise_equal(small, before, "dst after rejected swaps")
    with pytest.raises(ValueError, match="src"):
        ops.swap_blocks(big.half(), small, torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="src"):
        ops.swap_blocks(randn((10, 4, 2, 9), gen), small, torch.tensor([[0, 0]]))
    with pytest.raises(TypeError, match="block_mapping"):
        ops.swap_blocks(big, small, torch.tensor([[0, 0]], dtype=torch.int32))


# ---------------------------------------------------------------- validation
def _ok_paged(gen):
    args, _, _ = build(gen, [5, 20, 1], 2, 32, 32, torch.float32)
    return dict(query=randn((3, 4, 32), gen), **{k: v for k, v in args.items() if v is not None})


def _int8_args(a, with_k=True, with_v=True):
    nb, bs, h, d = a["key_cache"].shape
    a["key_cache"] = torch.zeros(nb, bs, h, d, dtype=torch.int8)
    a["value_cache"] = torch.zeros(nb, bs, h, a["value_cache"].shape[3], dtype=torch.int8)
    if with_k:
        a["k_scale"] = torch.ones(nb, bs, h)
    if with_v:
        a["v_scale"] = torch.ones(nb, bs, h)


def _set(key, value):
    return lambda a: a.update({key: value(a) if callable(value) else value})


def _poke(key, idx, value):
    def f(a):
        t = a[key].clone()
        t[idx] = value
        a[key] = t
    return f


PAGED_BAD = {
    "block_id_too_large": (_poke("block_tables", (1, 1), 10**6), ValueError, "block_tables"),
    "block_id_num_blocks": (lambda a: _poke("block_tables", (1, 0), a["key_cache"].shape[0])(a), ValueError,
                            "block_tables"),
    "block_id_negative": (_poke("block_tables", (0, 0), -1), ValueError, "block_tables"),
    "seq_len_beyond_blocks": (lambda a: _poke("seq_lens", 0, a["block_tables"].shape[1] * BS + 1)(a), ValueError,
                              "seq_lens"),
    "seq_len_negative": (_poke("seq_lens", 2, -1), ValueError, "seq_lens"),
    "heads_not_multiple": (_set("query", lambda a: torch.randn(3, 5, 32)), ValueError, "query"),
    "head_dim_mismatch": (_set("query", lambda a: torch.randn(3, 4, 16)), ValueError, "head_dim"),
    "value_cache_heads": (_set("value_cache", lambda a: torch.zeros(a["key_cache"].shape[0], BS, 1, 32)), ValueError,
                          "value_cache"),
    "value_cache_blocks": (_set("value_cache", lambda a: torch.zeros(a["key_cache"].shape[0] + 1, BS, 2, 32)),
                           ValueError, "value_cache"),
    "qsl_length": (_set("query_start_loc", torch.tensor([0, 1, 3], dtype=torch.int32)), ValueError,
                   "query_start_loc"),
    "qsl_end": (_set("query_start_loc", torch.tensor([0, 1, 2, 2], dtype=torch.int32)), ValueError,
                "query_start_loc"),
    "qsl_start": (_set("query_start_loc", torch.tensor([1, 1, 2, 3], dtype=torch.int32)), ValueError,
                  "query_start_loc"),
    "qsl_decreasing": (_set("query_start_loc", torch.tensor([0, 2, 1, 3], dtype=torch.int32)), ValueError,
                       "query_start_loc"),
    "qsl_queries_beyond_keys": (_set("query_start_loc", torch.tensor([0, 0, 1, 3], dtype=torch.int32)), ValueError,
                                "query_start_loc"),  # sequence 2 has 1 key
    "qsl_int64": (_set("query_start_loc", torch.tensor([0, 1, 3, 3])), TypeError, "query_start_loc"),
    "int8_without_scales": (lambda a: _int8_args(a, False, False), ValueError, "k_scale"),
    "int8_without_v_scale": (lambda a: _int8_args(a, True, False), ValueError, "v_scale"),
    "int8_k_scale_shape": (lambda a: (_int8_args(a), a.update(k_scale=a["k_scale"][:, :-1].contiguous())),
                           ValueError, "k_scale"),
    "int8_k_scale_dtype": (lambda a: (_int8_args(a), a.update(k_scale=a["k_scale"].half())), TypeError, "k_scale"),
    "scales_on_float_cache": (lambda a: a.update(k_scale=torch.ones(a["key_cache"].shape[:3]),
                                                 v_scale=torch.ones(a["key_cache"].shape[:3])), ValueError,
                              "k_scale"),
    "value_cache_dtype": (lambda a: a.update(value_cache=a["value_cache"].half()), TypeError, "value_cache"),
    "query_int": (_set("query", torch.ones(3, 4, 32, dtype=torch.int32)), TypeError, "query"),
    "query_2d": (_set("query", torch.randn(3, 32)), ValueError, "query"),
    "query_not_tensor": (_set("query", 1.0), TypeError, "query"),
    "decode_tokens_ne_seqs": (_set("query", torch.randn(4, 4, 32)), ValueError, "query"),
    "block_tables_int64": (lambda a: a.update(block_tables=a["block_tables"].long()), TypeError, "block_tables"),
    "block_tables_rows": (lambda a: a.update(block_tables=a["block_tables"][:2].contiguous()), ValueError,
                          "block_tables"),
    "block_tables_1d": (lambda a: a.update(block_tables=a["block_tables"][0].contiguous()), ValueError,
                        "block_tables"),
    "block_tables_list": (lambda a: a.update(block_tables=a["block_tables"].tolist()), TypeError, "block_tables"),
    "seq_lens_int64": (lambda a: a.update(seq_lens=a["seq_lens"].long()), TypeError, "seq_lens"),
    "cache_3d": (lambda a: a.update(key_cache=a["key_cache"][0], value_cache=a["value_cache"][0]), ValueError,
                 "key_cache"),
    "cache_not_contiguous": (lambda a: a.update(key_cache=a["key_cache"].transpose(0, 1).contiguous()
                                                .transpose(0, 1)), ValueError, "key_cache"),
    "window_below_minus_one": (_set("window", (-2, -1)), ValueError, "window"),
    "window_not_pair": (_set("window", 3), ValueError, "window"),
    "scale_nan": (_set("scale", float("nan")), ValueError, "scale"),
}


@pytest.mark.parametrize("case", list(PAGED_BAD))
def test_paged_attention_bad_input(gen, case):
    mutate, exc, pattern = PAGED_BAD[case]
    a = _ok_paged(gen)
    if case.startswith("qsl"):
        a["query"] = randn((3, 4, 32), gen)
    mutate(a)
    with pytest.raises(exc, match=pattern):
        ops.paged_attention(**a)


def test_paged_attention_ok_base(gen):
    """The base of the bad-input cases is valid (garbage block ids past each sequence's blocks are fine)."""
    a = _ok_paged(gen)
    assert (a["block_tables"] == GARBAGE).any()
    assert ops.paged_attention(**a).shape == (3, 4, 32)
    assert ops.paged_attention(**a, query_start_loc=torch.tensor([0, 1, 3, 3], dtype=torch.int32)).shape == (3, 4, 32)


@pytest.mark.parametrize("which", ["seq_lens", "query_start_loc"])
def test_non_contiguous_index_tensors(gen, which):
    """seq_lens / query_start_loc given as strided views: read as the view says, or rejected naming
    the argument. (The hidden elements are chosen so that misreading them stays inside the
    caches and tables: a wrong result, not a crash.)"""
    lens, qlens = [20, 30, 25], [2, 3, 1]  # 2 blocks each, no garbage columns
    seqs = make_seqs(gen, lens, 2, 32, 32, torch.float32)
    nb, bt, slots = paged_layout(gen, lens, BS, extra_cols=0)
    kc, vc, _, _, stored = fill_caches(seqs, slots, nb, BS, torch.float32, gen)
    sl, qsl = torch.tensor(lens, dtype=torch.int32), qsl_of(qlens)
    q = randn((sum(qlens), 4, 32), gen)
    if which == "seq_lens":
        big = torch.full((2 * len(lens),), 3, dtype=torch.int32)
        big[::2] = sl
        sl = big[::2]
    else:
        big = torch.full((2 * len(qsl),), 2, dtype=torch.int32)
        big[::2] = qsl
        qsl = big[::2]
    try:
        y = ops.paged_attention(q, kc, vc, bt, sl, query_start_loc=qsl)
    except ValueError as e:
        assert which in str(e)
        return
    check_paged(y, q, stored, qsl_of(qlens), what=f"strided {which}")


def _ok_write(gen, int8=False):
    nb, bs, h, d = 4, 8, 2, 16
    a = dict(key=randn((5, h, d), gen), value=randn((5, h, d), gen),
             key_cache=torch.zeros(nb, bs, h, d), value_cache=torch.zeros(nb, bs, h, d),
             slot_mapping=torch.tensor([0, 31, -1, 7, 12]))
    if int8:
        _int8_args(a)
    return a


WRITE_BAD = {
    "slot_past_end": (_poke("slot_mapping", 1, 32), ValueError, "slot_mapping"),
    "slot_far_past_end": (_poke("slot_mapping", 4, 2**40), ValueError, "slot_mapping"),
    "slot_below_minus_one": (_poke("slot_mapping", 0, -2), ValueError, "slot_mapping"),
    "slot_mapping_int32": (lambda a: a.update(slot_mapping=a["slot_mapping"].int()), TypeError, "slot_mapping"),
    "slot_mapping_length": (lambda a: a.update(slot_mapping=a["slot_mapping"][:4]), ValueError, "slot_mapping"),
    "key_heads": (_set("key", torch.randn(5, 3, 16)), ValueError, "key"),
    "value_head_dim": (_set("value", torch.randn(5, 2, 8)), ValueError, "value"),
    "value_tokens": (_set("value", torch.randn(4, 2, 16)), ValueError, "value"),
    "key_int": (_set("key", torch.ones(5, 2, 16, dtype=torch.int32)), TypeError, "key"),
    "cache_dtype_pair": (lambda a: a.update(value_cache=a["value_cache"].half()), TypeError, "value_cache"),
    "int8_without_scales": (lambda a: _int8_args(a, False, False), ValueError, "k_scale"),
    "int8_without_v_scale": (lambda a: _int8_args(a, True, False), ValueError, "v_scale"),
}


@pytest.mark.parametrize("case", list(WRITE_BAD))
def test_reshape_and_cache_bad_input(gen, case):
    mutate, exc, pattern = WRITE_BAD[case]
    a = _ok_write(gen)
    mutate(a)
    caches = {k: v.clone() for k, v in a.items() if k in ("key_cache", "value_cache", "k_scale", "v_scale")}
    with pytest.raises(exc, match=pattern):
        ops.reshape_and_cache(**a)
    for k, v in caches.items():
        assert_bitwise_equal(a[k], v, f"{k} changed by a rejected call")


def test_reshape_and_cache_ok_base(gen):
    for int8 in (False, True):
        ops.reshape_and_cache(**_ok_write(gen, int8))


# ---------------------------------------------------------------- PagedKVCache
class Model:
    """Each sequence's token history per layer, as the cache stores it (float64; dequantized for INT8)."""

    def __init__(self, layers, hkv, d, int8):
        self.layers, self.hkv, self.d, self.int8 = layers, hkv, d, int8
        self.hist = {}

    def add(self, seq):
        e = torch.zeros(self.hkv, 0, self.d, dtype=torch.float64)
        self.hist[seq] = [[e, e] for _ in range(self.layers)]

    def stored(self, x):
        if not self.int8:
            return x.double()
        codes, sc = quantize_per_token(x)
        return codes.double() * sc.double()[..., None]

    def write(self, seq, layer, key, value):
        h = self.hist[seq][layer]
        h[0] = torch.cat([h[0], self.stored(key).transpose(0, 1)], 1)
        h[1] = torch.cat([h[1], self.stored(value).transpose(0, 1)], 1)

    def fork(self, parent, child):
        self.hist[child] = [list(h) for h in self.hist[parent]]


def _append_and_write(cache, model, seq, n, gen, dtype):
    slots = cache.append(seq, n)
    assert slots.shape == (n,) and slots.dtype == torch.int64
    if n == 0 and model.int8:
        return slots  # an empty write into an INT8 cache fails (test_reshape_and_cache_int8_nothing_to_write)
    for layer in range(model.layers):
        k, v = randn((n, model.hkv, model.d), gen, dtype), randn((n, model.hkv, model.d), gen, dtype)
        cache.write(layer, k, v, slots)
        model.write(seq, layer, k, v)
    return slots


def _check_all(cache, model, gen, dtype, hq, what):
    # (empty sequences left out: decode rejects them, test_decode_empty_sequence_gives_zeros)
    seqs = [s for s in model.hist if cache.seq_len(s) > 0]
    if not seqs:
        return
    for layer in range(model.layers):
        q = randn((len(seqs), hq, model.d), gen, dtype)
        y = cache.attention(layer, q, seqs)
        stored = [tuple(model.hist[s][layer]) for s in seqs]
        check_paged(y, q, stored, torch.arange(len(seqs) + 1), what=f"{what} layer {layer}")


def _snapshot(cache):
    seqs = sorted(cache._tables, key=str)
    return (cache.num_free_blocks, [cache.seq_len(s) for s in seqs],
            cache.block_tables(seqs).tolist() if seqs else [])


@pytest.mark.parametrize("cache_dtype", ["fp32", "int8"])
def test_cache_random_operations(gen, cache_dtype):
    """Random add / append / fork / free: the allocator's books hold after every step, running out
    of blocks changes nothing, every sequence's attention matches its own history (every layer),
    and freeing everything returns every block."""
    layers, nb, bs, hkv, d, hq = 2, 24, 4, 2, 16, 4
    int8 = cache_dtype == "int8"
    cache = lowbit.PagedKVCache(layers, nb, bs, hkv, d, cache_dtype=torch.int8 if int8 else None)
    model = Model(layers, hkv, d, int8)
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    next_id, ooms, forks = 0, 0, 0
    for step in range(160):
        live = list(model.hist)
        op = rng.choices(["add", "append", "fork", "free"], [2, 6, 2, 1.5] if live else [1, 0, 0, 0])[0]
        if op == "add":
            cache.add(next_id)
            model.add(next_id)
            next_id += 1
        elif op == "append":
            seq, n = rng.choice(live), rng.choice([0, 1, 1, 2, 3, 5, 9])
            before = _snapshot(cache)
            try:
                _append_and_write(cache, model, seq, n, gen, torch.float32)
            except RuntimeError:
                ooms += 1
                assert _snapshot(cache) == before, "a failed append changed the cache"
        elif op == "fork":
            parent = rng.choice(live)
            free = cache.num_free_blocks
            cache.fork(parent, next_id)
            model.fork(parent, next_id)
            assert cache.num_free_blocks == free, "fork copies no block"
            next_id += 1
            forks += 1
        else:
            seq = rng.choice(live)
            cache.free(seq)
            del model.hist[seq]
        cache.check_invariants()
        if step % 20 == 19:
            _check_all(cache, model, gen, torch.float32, hq, f"step {step}")
    _check_all(cache, model, gen, torch.float32, hq, "end")
    assert ooms > 0 and forks > 0, (ooms, forks)  # the walk exercised both
    for seq in list(model.hist):
        cache.free(seq)
        cache.check_invariants()
    assert cache.num_free_blocks == nb, "blocks leaked"


def _gather(cache, layer, seq):
    """The K / V rows a sequence's slots hold now."""
    bs, n = cache.block_size, cache.seq_len(seq)
    pos = torch.arange(n)
    slots = torch.tensor(cache._tables[seq], dtype=torch.int64)[pos // bs] * bs + pos % bs
    return [c[layer].flatten(0, 1)[slots].clone() for c in (cache.key_caches, cache.value_caches)]


def test_fork_copy_on_write(gen):
    layers, bs, hkv, d, hq = 2, 4, 2, 16, 4
    cache = lowbit.PagedKVCache(layers, 16, bs, hkv, d)
    model = Model(layers, hkv, d, False)
    cache.add("p")
    model.add("p")
    _append_and_write(cache, model, "p", 6, gen, torch.float32)  # 1.5 blocks: a shared, partly filled tail
    q = randn((1, hq, d), gen)
    parent_out = [cache.attention(layer, q, ["p"]) for layer in range(layers)]
    parent_rows = [_gather(cache, layer, "p") for layer in range(layers)]
    free = cache.num_free_blocks
    cache.fork("p", "c")
    model.fork("p", "c")
    assert cache.num_free_blocks == free and cache.block_tables(["c"]).tolist() == cache.block_tables(["p"]).tolist()
    cache.check_invariants()
    _append_and_write(cache, model, "c", 2, gen, torch.float32)  # copies the tail block first
    cache.check_invariants()
    tp, tc = cache.block_tables(["p"])[0].tolist(), cache.block_tables(["c"])[0].tolist()
    assert tc[0] == tp[0] and tc[1] != tp[1], (tp, tc)
    assert cache.num_free_blocks == free - 1
    for layer in range(layers):
        for a, b in zip(_gather(cache, layer, "p"), parent_rows[layer]):
            assert_bitwise_equal(a, b, "parent's data after the child appended")
        assert_bitwise_equal(cache.attention(layer, q, ["p"]), parent_out[layer], "parent's result")
        ck, cv = _gather(cache, layer, "c")
        assert_bitwise_equal(ck[:6], parent_rows[layer][0], "child keeps the shared prefix")
    # the parent's tail is its own again: appending writes in place
    _append_and_write(cache, model, "p", 1, gen, torch.float32)
    assert cache.block_tables(["p"])[0].tolist() == tp and cache.num_free_blocks == free - 1
    # fork at a block boundary: no copy needed
    cache.add("r")
    model.add("r")
    _append_and_write(cache, model, "r", 8, gen, torch.float32)
    cache.fork("r", "r2")
    model.fork("r", "r2")
    free = cache.num_free_blocks
    _append_and_write(cache, model, "r2", 1, gen, torch.float32)
    assert cache.num_free_blocks == free - 1, "a full shared block is not copied"
    cache.fork("c", "c2")
    model.fork("c", "c2")
    _append_and_write(cache, model, "c2", 2, gen, torch.float32)
    cache.check_invariants()
    _check_all(cache, model, gen, torch.float32, hq, "after forks")
    cache.free("p")  # the children still hold the shared blocks
    del model.hist["p"]
    cache.check_invariants()
    _check_all(cache, model, gen, torch.float32, hq, "parent freed")
    for s in list(model.hist):
        cache.free(s)
    cache.check_invariants()
    assert cache.num_free_blocks == 16


def test_out_of_blocks_leaves_state_unchanged(gen):
    bs, hkv, d = 4, 2, 16
    cache = lowbit.PagedKVCache(1, 4, bs, hkv, d)
    model = Model(1, hkv, d, False)
    cache.add("a")
    model.add("a")
    _append_and_write(cache, model, "a", 10, gen, torch.float32)  # 3 blocks
    cache.add("b")
    model.add("b")
    before = _snapshot(cache)
    data = [cache.key_caches[0].clone(), cache.value_caches[0].clone()]
    with pytest.raises(RuntimeError, match="out of cache blocks"):
        cache.append("b", 5)  # needs 2, 1 free
    assert _snapshot(cache) == before and cache.seq_len("b") == 0
    assert_bitwise_equal(cache.key_caches[0], data[0], "key cache after a failed append")
    assert_bitwise_equal(cache.value_caches[0], data[1], "value cache after a failed append")
    cache.check_invariants()
    _append_and_write(cache, model, "b", 4, gen, torch.float32)  # exactly the last block
    assert cache.num_free_blocks == 0
    # copy-on-write needs a block too
    cache.fork("a", "a2")
    model.fork("a", "a2")
    before = _snapshot(cache)
    data = [cache.key_caches[0].clone(), cache.value_caches[0].clone()]
    with pytest.raises(RuntimeError):
        cache.append("a2", 1)
    assert _snapshot(cache) == before
    assert_bitwise_equal(cache.key_caches[0], data[0], "key cache after a failed copy-on-write")
    assert_bitwise_equal(cache.value_caches[0], data[1], "value cache after a failed copy-on-write")
    cache.check_invariants()
    _check_all(cache, model, gen, torch.float32, 4, "after out of blocks")
    cache.append("a", 0)  # room for nothing: fine, even when full
    cache.check_invariants()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_cache_int8_end_to_end(gen, dtype):
    """INT8 PagedKVCache, 3 layers: chunked prefill of two prompts then decode steps; tight against
    the dequantized history, and within test_int8_error_vs_fp32_cache's limits of the float history."""
    layers, bs, hkv, d, hq = 3, 16, 2, 64, 8
    cache = lowbit.PagedKVCache(layers, 40, bs, hkv, d, dtype=dtype, cache_dtype=torch.int8)
    assert cache.key_caches[0].dtype == torch.int8 and len(cache.k_scales) == layers
    model, exact = Model(layers, hkv, d, True), Model(layers, hkv, d, False)
    prompts = {"x": 37, "y": 100}
    for s, n in prompts.items():
        cache.add(s)
        model.add(s)
        exact.add(s)
    for step in range(4):
        qlens = [n if step == 0 else 1 for n in prompts.values()]
        for s, n in zip(prompts, qlens):
            slots = cache.append(s, n)
            for layer in range(layers):
                k, v = randn((n, hkv, d), gen, dtype), randn((n, hkv, d), gen, dtype)
                cache.write(layer, k, v, slots)
                model.write(s, layer, k, v)
                exact.write(s, layer, k, v)
        qsl = qsl_of(qlens)
        for layer in range(layers):
            q = randn((sum(qlens), hq, d), gen, dtype)
            y = cache.attention(layer, q, list(prompts), query_start_loc=qsl)
            check_paged(y, q, [tuple(model.hist[s][layer]) for s in prompts], qsl, what=f"step {step} layer {layer}")
            want, _ = reference(q, [tuple(exact.hist[s][layer]) for s in prompts], qsl)
            e, n = rel_err(y, want), nmse(y, want)
            assert n < 2.5e-4 and e < 3e-2, f"INT8 cache vs float history: NMSE {n:.2e}, rel {e:.2e}"
    cache.check_invariants()


def test_cache_window_and_value_head_dim(gen):
    cache = lowbit.PagedKVCache(1, 20, 8, 2, 32, value_head_dim=24)
    cache.add(0)
    cache.add(1)
    hist = {}
    for s, n in ((0, 50), (1, 9)):
        k, v = randn((n, 2, 32), gen), randn((n, 2, 24), gen)
        cache.write(0, k, v, cache.append(s, n))
        hist[s] = (k.transpose(0, 1).double(), v.transpose(0, 1).double())
    q = randn((2, 4, 32), gen)
    y = cache.attention(0, q, [0, 1], window=(7, -1))
    check_paged(y, q, [hist[0], hist[1]], torch.arange(3), window=(7, -1), what="cache window")


# ---------------------------------------------------------------- torch.compile
def test_compile_fullgraph(gen):
    lens, qlens = [5, 40, 0, 17], [2, 40, 0, 1]
    args, _, _ = build(gen, lens, 2, 32, 24, torch.float32)
    args8, _, _ = build(gen, lens, 2, 32, 24, torch.float32, cache_dtype=torch.int8)
    qsl = qsl_of(qlens)
    q = randn((sum(qlens), 4, 32), gen)
    dargs, _ = drop_empty(args, [None] * len(lens))
    qd = randn((len(lens) - 1, 4, 32), gen)

    def prefill(q, kc, vc, bt, sl, qsl, ks, vs):
        return ops.paged_attention(q, kc, vc, bt, sl, query_start_loc=qsl, k_scale=ks, v_scale=vs,
                                   window=(8, -1)) * 2

    def decode(q, kc, vc, bt, sl):
        return ops.paged_attention(q, kc, vc, bt, sl) + 1

    torch._dynamo.reset()
    cp = torch.compile(prefill, fullgraph=True, backend="aot_eager")
    cd = torch.compile(decode, fullgraph=True, backend="aot_eager")
    for a in (args, args8):
        pa = (a["key_cache"], a["value_cache"], a["block_tables"], a["seq_lens"])
        got = cp(q, *pa, qsl, a["k_scale"], a["v_scale"])
        assert got.shape == (sum(qlens), 4, 24)
        assert_bitwise_equal(got, prefill(q, *pa, qsl, a["k_scale"], a["v_scale"]), "compiled prefill")
    pa = (dargs["key_cache"], dargs["value_cache"], dargs["block_tables"], dargs["seq_lens"])
    assert_bitwise_equal(cd(qd, *pa), decode(qd, *pa), "compiled decode")


# ---------------------------------------------------------------- caches off the CPU
def test_bound_calls_refuse_caches_off_the_cpu():
    """The replay's bound calls hand raw pointers to the CPU kernels: a cache on another device
    must be refused before any pointer is taken (here: the meta device)."""
    kc = torch.empty(4, 8, 2, 16, device="meta")
    key = torch.empty(1, 2, 16, device="meta")
    slots = torch.empty(1, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="CPU caches only"):
        kv_ops.bind_write(key, key, kc, kc, None, None, slots)
    tables = torch.empty(1, 1, dtype=torch.int32, device="meta")
    lens = torch.empty(1, dtype=torch.int32, device="meta")
    qsl = torch.empty(2, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="CPU caches only"):
        kv_ops.bind_attention(key, kc, kc, None, None, tables, lens, qsl, torch.empty(1, 2, 16, device="meta"))

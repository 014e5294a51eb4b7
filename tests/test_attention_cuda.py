"""CUDA attention and paged KV-cache ops (lowbit._cuda: csrc/cuda/attention.cu,
attention_flash.cu, kv_cache.cu) behind the same public API as on the CPU:
lowbit.attention, lowbit.ops.{reshape_and_cache, paged_attention, copy_blocks, swap_blocks}
and lowbit.PagedKVCache(device="cuda").

GPU tests carry ``@gpu`` (the ``cuda`` marker plus a skip when
``lowbit._native.cuda_unavailable_reason()`` is not None). The fake-impl checks on fake CUDA
tensors (what torch.compile traces) and the build check run everywhere. Tests whose ids contain
``small`` use tiny shapes: bench/gpu_check.sh runs them under compute-sanitizer
(``-k "small and not nobias"``).

Ground truth: lowbit.ref.attention in float64, run on the GPU (inside ``torch.device("cuda")``
so its masks are built there). For paged caches each sequence's K / V is gathered from the
cache through its block table in Python (INT8: codes * scale in float64), i.e. the reference
attends exactly what the cache holds. Every cache slot no sequence owns is poisoned (NaN, or
random codes with NaN scales), so reading one shows up as a non-finite output.

Tolerance (flash-attention's rule): max |out - ref| <= 2 * max |torch - ref| + floor * max |ref|,
where torch is torch's own SDPA at the same dtype on the same inputs, math backend (fp32: cuBLAS
without TF32; fp16 / bf16: scores and probabilities rounded to the dtype, a looser baseline than
its fused kernels, which on an H100 with torch 2.11 misbehave on some of these inputs: cuDNN's
SDPA reads out of bounds under compute-sanitizer, the memory-efficient kernel faults on a
misaligned view; an earlier run against the fused kernels passed too) and floor is one ulp of the output dtype for fp16 / bf16 (2^-10,
2^-7) and 1e-5 for fp32. Why the floor: the output's final rounding alone can cost half an ulp
of the largest output, and on a small case (a few hundred outputs, or S = 1 where both are
just round(v)) torch may happen to round luckier than its typical error, so "2x torch" with
nothing added could reject a correct kernel; one ulp is the project's usual margin
(tests/test_int8_cuda.py, test_int4_cuda.py). For fp32 the floor dominates (torch's fp32 error
is ~1e-7 relative) except where scores are large (exp amplifies the scores' own fp32 rounding,
test_attention_large_scores), where 2x torch takes over. A dropped or duplicated key moves the
output by ~1/S of max |v|, far above the fp32 and fp16 bounds; bf16's bound is the loosest, which
is why every kernel path also runs at fp16 or fp32.

INT8 writes (reshape_and_cache) must equal the CPU op's codes and scales bit for bit (the CPU
kernel implements lowbit.ref.int8's documented rule, checked in tests/test_kv_cache.py); float
writes must equal the CPU op bitwise too, with NaN-poisoned caches so untouched slots are seen.
"""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit import _native, ops
from lowbit.ref import attention as ref_attn
from lowbit.ref import int8 as ref_int8

from conftest import built_cuda_module, capture_graph, copied_blocks, cuda_detail

_REASON = _native.cuda_unavailable_reason()


def gpu(fn):
    """Marks a test as needing lowbit's CUDA kernels and a GPU (skipped cleanly otherwise)."""
    fn = pytest.mark.skipif(_REASON is not None, reason=f"lowbit CUDA kernels unavailable: {_REASON}")(fn)
    return pytest.mark.cuda(fn)


F32, F16, BF16, I8 = torch.float32, torch.float16, torch.bfloat16, torch.int8
DT_ID = {F32: "fp32", F16: "fp16", BF16: "bf16", I8: "int8"}
FLOOR = {F32: 1e-5, F16: 2.0**-10, BF16: 2.0**-7}
GARBAGE = 2**30  # block-table entries past a sequence's last block: never read


def _ids(v):
    return DT_ID.get(v) if isinstance(v, torch.dtype) else None


attention = cuda_detail(lowbit.attention)
paged_attention = cuda_detail(ops.paged_attention)
reshape_and_cache = cuda_detail(ops.reshape_and_cache)


@pytest.fixture
def cgen(request):
    """A CUDA generator seeded from the test id: fresh inputs per case, reproducible."""
    return torch.Generator(device="cuda").manual_seed(zlib.crc32(request.node.nodeid.encode()))


# ---------------------------------------------------------------- helpers
def randn(shape, gen, dtype=F32, scale=1.0):
    return (torch.randn(shape, generator=gen, device="cuda", dtype=F32) * scale).to(dtype)


def poison_allocator(*nbytes):
    """Best effort: the caching allocator's next blocks of these sizes hold 0xff bytes (NaN in
    fp32 / fp16 / bf16), so an output element a kernel forgets to write shows up."""
    bufs = [torch.full((max(int(n), 1),), -1, dtype=torch.int8, device="cuda") for n in nbytes]
    del bufs


def expand_heads(t, hq):
    """[..., Hkv, S, E] -> [..., Hq, S, E] (query head h reads kv head h // (Hq / Hkv))."""
    return t if t.shape[-3] == hq else t.repeat_interleave(hq // t.shape[-3], dim=-3)


def ref64(q, k, v, mask=None, is_causal=False, scale=None, align="top_left", window=None):
    """lowbit.ref.attention in float64, computed on q's device."""
    m = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    with torch.device(q.device):
        return ref_attn.attention(q.double(), k.double(), v.double(), m, is_causal, scale, align, window).double()


def torch_sdpa(q, k, v, mask=None, is_causal=False, scale=None, align="top_left", window=None):
    """torch's SDPA at q's dtype with the same semantics: the error baseline (see module docstring)."""
    if q.dim() == 3:  # [H, L, E]: torch's fused kernels want 4-D
        return torch_sdpa(q[None], k[None], v[None], mask, is_causal, scale, align, window)[0]
    L, S, hq = q.shape[-2], k.shape[-2], q.shape[-3]
    k, v = expand_heads(k.to(q.dtype), hq), expand_heads(v.to(q.dtype), hq)
    causal_tl = is_causal and align == "top_left" and window is None and mask is None
    m = None
    if not causal_tl and (is_causal or window is not None or mask is not None):
        with torch.device(q.device):
            m = ref_attn.sdpa_mask(L, S, is_causal, align, window, mask)
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415
    # The math backend (at q's dtype; fp32 without TF32): torch's fused kernels misbehave on some
    # of these inputs on an H100 with torch 2.11 (cuDNN's SDPA reads out of bounds under
    # compute-sanitizer; the memory-efficient kernel faults on a misaligned-offset view), which
    # would fail these tests for torch's sake.
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal_tl, scale=scale)


def assert_close(y, exact, theirs, what):
    """The module docstring's rule; exact float64, theirs (torch at y's dtype) may be None for
    no baseline (then the floor alone)."""
    __tracebackhide__ = True
    assert y.shape == exact.shape, f"{what}: shape {tuple(y.shape)} != {tuple(exact.shape)}"
    assert y.device.type == "cuda", f"{what}: output on {y.device}"
    bad = int((~torch.isfinite(y)).sum())
    assert bad == 0, f"{what}: {bad} of {y.numel()} outputs are NaN/Inf (unwritten, or a poisoned slot read)"
    if y.numel() == 0:
        return
    err = (y.double() - exact).abs().max().item()
    top = exact.abs().max().item()
    torch_err = 0.0
    if theirs is not None:
        t = theirs.double()
        t = torch.where(torch.isnan(t) & ~torch.isnan(exact), torch.zeros_like(t), t)  # rows that attend nothing
        torch_err = (t - exact).abs().max().item()
    tol = 2.0 * torch_err + FLOOR[y.dtype] * top
    assert err <= tol, (f"{what}: max abs err {err:.3e} > 2 x torch's {torch_err:.3e} + {FLOOR[y.dtype]:.1e} x "
                        f"max|ref| {top:.3e} = {tol:.3e}")


def qkv(gen, b, hq, hkv, L, S, d, dv=None, dtype=F32, scale=1.0):
    return (randn((b, hq, L, d), gen, dtype, scale), randn((b, hkv, S, d), gen, dtype, scale),
            randn((b, hkv, S, dv or d), gen, dtype))


def check_attention(q, k, v, what, mask=None, is_causal=False, scale=None, align="top_left", window=None,
                    enable_gqa=None):
    if enable_gqa is None:
        enable_gqa = q.shape[-3] != k.shape[-3]
    out_bytes = q[..., :1].numel() * v.shape[-1] * q.element_size()
    poison_allocator(out_bytes)
    y = attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                  causal_alignment=align, window=window)
    assert y.dtype == q.dtype and y.device == q.device, what
    exact = ref64(q, k, v, mask, is_causal, scale, align, window)
    assert_close(y, exact, torch_sdpa(q, k, v, mask, is_causal, scale, align, window), what)
    return y


# ---------------------------------------------------------------- runs everywhere: fake CUDA tensors, the build
def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415
    return FakeTensorMode()


def _fake_cuda(*shape, dtype=F16):
    try:
        return torch.empty(*shape, dtype=dtype, device="cuda")
    except RuntimeError as e:
        pytest.skip(f"this torch cannot make fake CUDA tensors: {e}")


def test_fake_attention_on_cuda_tensors():
    """The fake impl (what torch.compile traces) gives CUDA outputs of the right shape / dtype for
    every CUDA variant, and refuses operands on another device (which no CPU test can build)."""
    with _fake_mode():
        q = _fake_cuda(2, 8, 5, 64)
        k, v = _fake_cuda(2, 2, 7, 64), _fake_cuda(2, 2, 7, 48)
        y = lowbit.attention(q, k, v, enable_gqa=True, is_causal=True, causal_alignment="bottom_right",
                             window=(3, 0))
        assert y.shape == (2, 8, 5, 48) and y.dtype == F16 and y.device.type == "cuda"
        q5 = _fake_cuda(2, 3, 4, 9, 128, dtype=BF16)
        kv5 = _fake_cuda(2, 3, 4, 70, 128, dtype=BF16)
        y = lowbit.attention(q5, kv5, kv5, attn_mask=_fake_cuda(9, 70, dtype=torch.bool))
        assert y.shape == (2, 3, 4, 9, 128) and y.dtype == BF16 and y.device.type == "cuda"
        with pytest.raises(ValueError, match="key is on cpu but query is on cuda"):
            lowbit.attention(q, torch.empty(2, 2, 7, 64, dtype=F16), v, enable_gqa=True)
        with pytest.raises(ValueError, match="value is on cpu"):
            lowbit.attention(q, k, torch.empty(2, 2, 7, 48, dtype=F16), enable_gqa=True)
        with pytest.raises(ValueError, match="attn_mask is on cpu"):
            lowbit.attention(q, k, v, enable_gqa=True, attn_mask=torch.ones(5, 7, dtype=torch.bool))
        # the CUDA kernels' head-dim limit, met while tracing (torch.compile), not only when running
        with pytest.raises(NotImplementedError, match="head dims up to 256"):
            lowbit.attention(_fake_cuda(1, 2, 3, 264), _fake_cuda(1, 2, 5, 264), _fake_cuda(1, 2, 5, 64))


def test_fake_paged_ops_on_cuda_tensors():
    """paged_attention's fake impl on CUDA caches (decode and chunked prefill, INT8 with scales);
    reshape_and_cache names an operand on the wrong device before touching any content."""
    with _fake_mode():
        kc = _fake_cuda(10, 16, 2, 64, dtype=I8)
        vc = _fake_cuda(10, 16, 2, 32, dtype=I8)
        sc = _fake_cuda(10, 16, 2, dtype=F32)
        bt, sl = _fake_cuda(3, 4, dtype=torch.int32), _fake_cuda(3, dtype=torch.int32)
        q = _fake_cuda(3, 8, 64, dtype=BF16)
        y = ops.paged_attention(q, kc, vc, bt, sl, k_scale=sc, v_scale=sc)
        assert y.shape == (3, 8, 32) and y.dtype == BF16 and y.device.type == "cuda"
        qp = _fake_cuda(11, 8, 64, dtype=F32)
        y = ops.paged_attention(qp, kc, vc, bt, sl, query_start_loc=_fake_cuda(4, dtype=torch.int32), k_scale=sc,
                                v_scale=sc, window=(5, -1))
        assert y.shape == (11, 8, 32) and y.dtype == F32 and y.device.type == "cuda"
        with pytest.raises(NotImplementedError, match="head dims up to 256"):
            ops.paged_attention(_fake_cuda(3, 2, 64), kc, _fake_cuda(10, 16, 2, 320, dtype=I8), bt, sl, k_scale=sc,
                                v_scale=sc)
        key, value = _fake_cuda(4, 2, 64), _fake_cuda(4, 2, 32)
        slots = _fake_cuda(4, dtype=torch.int64)
        with pytest.raises(ValueError, match="key is on cpu but its cache is on cuda"):
            ops.reshape_and_cache(torch.empty(4, 2, 64, dtype=F16), value, kc, vc, slots, sc, sc)
        with pytest.raises(ValueError, match="slot_mapping is on cpu"):
            ops.reshape_and_cache(key, value, kc, vc, torch.empty(4, dtype=torch.int64), sc, sc)
        with pytest.raises(ValueError, match="v_scale is on cpu"):
            ops.reshape_and_cache(key, value, kc, vc, slots, sc, torch.empty(10, 16, 2))
        with pytest.raises(ValueError, match="value_cache is on cpu"):
            ops.reshape_and_cache(key, value, kc, torch.empty(10, 16, 2, 32, dtype=I8), slots, sc, sc)


_ATTN_ARGS = ["q", "k", "v", "out", "dtype", "kv_dtype", "B", "Hq", "Hkv", "L", "S", "D", "Dv", "qs", "ks", "vs",
              "os", "q_start", "seq_lens", "block_table", "max_blocks", "block_size", "k_scale", "v_scale", "mask",
              "mask_dtype", "ms", "scale", "causal", "bottom_right", "window_left", "window_right", "num_blocks",
              "tokens", "splits", "scratch", "device", "stream"]


def test_cuda_build_has_attention():
    """With nvcc present, lowbit._cuda carries the attention / KV-cache entry points, which answer
    bad arguments without touching a device, and the key-split plan is host arithmetic."""
    mod = built_cuda_module()
    bad, ok = _native.INVALID_ARGUMENT, _native.OK
    f16, i8 = _native.DTYPE_CODE[F16], _native.DTYPE_CODE[I8]
    # fake non-null pointers (16): never dereferenced, tokens == 0 returns before any device work
    base = dict(q=16, k=16, v=16, out=16, dtype=f16, kv_dtype=f16, B=1, Hq=4, Hkv=2, L=0, S=5, D=64, Dv=64,
                qs=(0, 0, 64), ks=(0, 0, 64), vs=(0, 0, 64), os=(0, 0, 64), q_start=0, seq_lens=0, block_table=0,
                max_blocks=0, block_size=0, k_scale=0, v_scale=0, mask=0, mask_dtype=0, ms=(0, 0, 0, 0),
                scale=0.125, causal=0, bottom_right=0, window_left=-1, window_right=-1, num_blocks=0, tokens=0,
                splits=1, scratch=0, device=0, stream=0)

    def call(**kw):
        a = dict(base, **kw)
        return mod.attention(*[a[n] for n in _ATTN_ARGS])

    assert call() == ok
    assert call(D=257) == bad and call(Dv=257) == bad      # the split-KV kernel's limit (kAttentionMaxHeadDim)
    assert call(Hq=3) == bad                                # Hq not a multiple of Hkv
    assert call(kv_dtype=i8) == bad                         # INT8 without scales
    assert call(q=0) == bad
    assert call(window_left=-2) == bad
    assert call(block_table=16) == bad                      # paged without q_start / seq_lens
    # paged decode without q_start: L == 1 and one query per sequence (device 1000: the valid
    # call stops at the missing device, the invalid ones before it)
    paged = dict(block_table=16, seq_lens=16, max_blocks=1, block_size=16, num_blocks=1, device=1000)
    assert call(**paged, L=1, B=2, tokens=2) == _native.CUDA_ERROR
    assert call(**paged, L=2, B=2, tokens=4) == bad
    assert call(**paged, L=1, B=2, tokens=3) == bad
    assert call(tokens=3) == bad                            # tokens != B * L (contiguous)
    # a device that cannot exist: CUDA_ERROR (nothing launched), and last_error() says why
    assert call(L=1, tokens=1, device=1000) == _native.CUDA_ERROR
    assert isinstance(mod.last_error(), str) and mod.last_error()
    # the plan: a few long decode rows split their keys (scratch: per split, Dv outputs + m + l);
    # many rows or few keys do not
    splits, scratch = mod.attention_plan(2, 32, 8, 5000, 128, 132)
    assert 1 < splits <= 64 and scratch >= 2 * 32 * splits * 128
    assert mod.attention_plan(2 * 4096, 32, 8, 4096, 128, 132) == (1, 0)
    assert mod.attention_plan(1, 8, 8, 100, 64, 132) == (1, 0)
    assert mod.attention_plan(0, 8, 8, 5000, 64, 132) == (1, 0)
    # kv_cache_write: src, src_dtype, T, H, D, ld_t, ld_h, slots, cache, cache_dtype, scales, num_slots, device, stream
    assert mod.kv_cache_write(0, f16, 0, 2, 64, 128, 64, 0, 0, f16, 0, 16, 0, 0) == ok     # T == 0
    assert mod.kv_cache_write(16, f16, 1, 2, 64, 128, 64, 16, 16, i8, 0, 16, 0, 0) == bad  # INT8 without scales
    assert mod.kv_cache_write(16, f16, 1, 2, 64, 128, 64, 16, 16, f16, 16, 16, 0, 0) == bad  # scales, float cache
    assert mod.kv_cache_write(0, f16, 1, 2, 64, 128, 64, 16, 16, f16, 0, 16, 0, 0) == bad   # null src
    assert mod.kv_cache_write(16, 9, 1, 2, 64, 128, 64, 16, 16, f16, 0, 16, 0, 0) == bad    # dtype code


# ---------------------------------------------------------------- lowbit.attention: the tensor-core path
# (B, Hq, Hkv, L, S, D, causal, alignment, window). fp16 / bf16, D == Dv in {64, 128}, contiguous,
# no mask: csrc/cuda/attention_flash.cu (128-row query tiles, 64 / 128-key tiles): lengths
# 1, 7, 63, 65, 129, 1000, 2048, S < L and S > L, GQA 1 / 4 / 8, MQA.
FAST_SMALL = [(1, 2, 2, 1, 1, 64, False, "top_left", None),
              (2, 4, 1, 7, 63, 64, True, "bottom_right", None),
              (1, 4, 2, 65, 65, 128, True, "top_left", None)]
FAST = [(2, 8, 2, 129, 1000, 128, False, "top_left", None),
        (1, 8, 1, 1000, 1000, 64, True, "top_left", None),
        (2, 4, 4, 1000, 129, 128, True, "bottom_right", None),      # S < L: the first rows attend nothing
        (1, 16, 2, 63, 1000, 128, True, "bottom_right", (100, 0)),
        (3, 2, 2, 200, 300, 64, False, "top_left", (32, 16)),
        (1, 4, 2, 300, 1000, 128, True, "bottom_right", (0, 0)),
        (2, 4, 1, 100, 130, 64, False, "top_left", (100000, 3)),  # a side wider than L + S
        (2, 8, 1, 65, 1, 64, False, "top_left", None),
        (1, 8, 8, 2048, 2048, 128, True, "top_left", None)]


def _case_id(c, size):
    b, hq, hkv, L, S, d, causal, align, window = c
    tag = ("-causal-" + ("tl" if align == "top_left" else "br")) if causal else ""
    w = f"-w{window[0]}_{window[1]}" if window else ""
    return f"{size}-B{b}H{hq}kv{hkv}L{L}S{S}D{d}{tag}{w}"


FAST_CASES = [pytest.param(*c, id=_case_id(c, s)) for s, cs in (("small", FAST_SMALL), ("large", FAST)) for c in cs]


@gpu
@pytest.mark.parametrize("dtype", [F16, BF16], ids=_ids)
@pytest.mark.parametrize("b,hq,hkv,L,S,d,causal,align,window", FAST_CASES)
def test_attention_fast(dtype, b, hq, hkv, L, S, d, causal, align, window, cgen):
    q, k, v = qkv(cgen, b, hq, hkv, L, S, d, dtype=dtype)
    y = check_attention(q, k, v, f"{DT_ID[dtype]} B={b} Hq={hq} Hkv={hkv} L={L} S={S} D={d}", is_causal=causal,
                        align=align, window=window)
    if causal and align == "bottom_right" and L > S and window is None:
        assert bool((y[:, :, :L - S] == 0).all()), "rows above the bottom-right diagonal must be zeros"


# ---------------------------------------------------------------- lowbit.attention: the split-KV (generic) path
# (dtype, B, Hq, Hkv, L, S, D, Dv, causal, alignment, window): fp32, head dims not in {64, 128},
# Dv != D, GQA groups the kernel splits over several blocks (3, 12), decode rows with split keys.
GEN_SMALL = [(F32, 2, 6, 2, 7, 33, 64, 64, True, "bottom_right", None),
             (F16, 1, 4, 2, 5, 17, 80, 80, False, "top_left", None),
             (BF16, 1, 2, 1, 3, 40, 256, 256, True, "bottom_right", None),
             (F16, 1, 4, 2, 9, 20, 64, 32, False, "top_left", (4, 4))]
GEN = [(F32, 1, 4, 4, 1000, 1000, 128, 128, True, "top_left", None),
       (F32, 2, 8, 1, 1, 5000, 128, 128, True, "bottom_right", None),       # decode: keys split, merged by lse
       (BF16, 1, 8, 2, 1, 5000, 96, 96, False, "top_left", None),
       (F16, 2, 12, 1, 65, 129, 80, 80, True, "bottom_right", None),      # a group of 12: 8 + 4 heads
       (BF16, 1, 4, 1, 129, 63, 256, 256, True, "top_left", None),
       (F32, 1, 3, 3, 63, 1000, 256, 64, False, "top_left", (50, -1)),
       (F16, 2, 4, 2, 1000, 65, 64, 128, True, "bottom_right", None),
       (F32, 3, 2, 2, 17, 17, 16, 16, False, "top_left", None),
       (F16, 1, 8, 8, 7, 1000, 32, 32, True, "bottom_right", (200, -1))]


def _gen_id(c, size):
    dt, b, hq, hkv, L, S, d, dv, causal, align, window = c
    return _case_id((b, hq, hkv, L, S, d, causal, align, window), f"{size}-{DT_ID[dt]}") + (
        f"Dv{dv}" if dv != d else "")


GEN_CASES = [pytest.param(*c, id=_gen_id(c, s)) for s, cs in (("small", GEN_SMALL), ("large", GEN)) for c in cs]


@gpu
@pytest.mark.parametrize("dtype,b,hq,hkv,L,S,d,dv,causal,align,window", GEN_CASES)
def test_attention_generic(dtype, b, hq, hkv, L, S, d, dv, causal, align, window, cgen):
    q, k, v = qkv(cgen, b, hq, hkv, L, S, d, dv, dtype=dtype)
    check_attention(q, k, v, f"{DT_ID[dtype]} B={b} Hq={hq} Hkv={hkv} L={L} S={S} D={d} Dv={dv}", is_causal=causal,
                    align=align, window=window)


@gpu
@pytest.mark.parametrize("layout,dtype", [("small-BLHD_transposed", F16), ("BLHD_transposed", BF16),
                                          ("small-sliced_head_dim", F16), ("misaligned_offset", BF16),
                                          ("expanded_kv_heads", F16), ("3d", F32), ("5d", F16)],
                         ids=lambda v: _ids(v) if isinstance(v, torch.dtype) else v)
def test_attention_strided_inputs(layout, dtype, cgen):
    """Views as models produce them: [B, L, H, D] projections transposed (the tensor-core path
    takes them: strides are multiples of 8), head-dim slices and 2-byte aligned data (the
    generic path), zero-stride (expanded) kv heads, 3-D and 5-D inputs; each against the
    reference, and against the same values made contiguous."""
    small = layout.startswith("small")
    b, h, L, S, d = (1, 2, 9, 33, 128) if small else (2, 4, 130, 257, 128)
    if layout.endswith("BLHD_transposed"):
        q, k, v = (randn((b, n, h, d), cgen, dtype).transpose(1, 2) for n in (L, S, S))
    elif layout.endswith("sliced_head_dim"):
        d = 64
        q, k, v = (randn((b, h, n, d + 8), cgen, dtype)[..., 4:4 + d] for n in (L, S, S))
    elif layout == "misaligned_offset":
        d = 64
        q, k, v = (randn((b * h * n * d + 1,), cgen, dtype)[1:].view(b, h, n, d) for n in (L, S, S))
        assert q.data_ptr() % 16 != 0
    elif layout == "expanded_kv_heads":
        q = randn((b, h, L, d), cgen, dtype)
        k, v = (randn((b, 1, S, d), cgen, dtype).expand(b, h, S, d) for _ in range(2))
    elif layout == "3d":
        q, k, v = randn((h, L, d), cgen, dtype), randn((h, S, d), cgen, dtype), randn((h, S, d), cgen, dtype)
    else:
        q, k, v = (randn((2, 3, h, n, d), cgen, dtype) for n in (L, S, S))
    y = check_attention(q, k, v, layout, is_causal=True, align="bottom_right")
    yc = attention(q.contiguous(), k.contiguous(), v.contiguous(), is_causal=True, causal_alignment="bottom_right")
    exact = ref64(q, k, v, None, True, None, "bottom_right")
    theirs = torch_sdpa(q, k, v, None, True, None, "bottom_right")
    assert_close(yc, exact, theirs, f"{layout} made contiguous")
    if layout in ("3d", "5d"):
        assert torch.equal(y, yc), f"{layout}: a contiguous N-d input is the same call as its contiguous copy"


# ---------------------------------------------------------------- masks, special rows, limits
MASK_SHAPES = ["LS", "1LS", "H1S", "BHLS", "B1LS"]


@gpu
@pytest.mark.parametrize("dtype,mshape,kind", [
    pytest.param(F16, "LS", "bool", id="small-fp16-LS-bool"),
    pytest.param(F16, "B1LS", "additive", id="small-fp16-B1LS-additive"),
    *[pytest.param(F16, m, kd, id=f"fp16-{m}-{kd}") for m in MASK_SHAPES for kd in ("bool", "additive")
      if (m, kd) not in (("LS", "bool"), ("B1LS", "additive"))],
    pytest.param(BF16, "BHLS", "bool", id="bf16-BHLS-bool"),
    pytest.param(F32, "LS", "additive", id="fp32-LS-additive"),
    pytest.param(BF16, "H1S", "additive", id="bf16-H1S-additive-D128")])
def test_attention_masks(dtype, mshape, kind, cgen):
    """Bool (True = may attend) and additive masks (with -inf entries), broadcast from each shape;
    the generic kernel takes every masked call, even fp16 at D = 64 / 128."""
    b, hq, hkv, L, S = 2, 4, 2, 9, 70
    d = 128 if mshape == "H1S" and dtype == BF16 else 64
    q, k, v = qkv(cgen, b, hq, hkv, L, S, d, dtype=dtype)
    shape = {"LS": (L, S), "1LS": (1, L, S), "H1S": (hq, 1, S), "BHLS": (b, hq, L, S), "B1LS": (b, 1, L, S)}[mshape]
    if kind == "bool":
        mask = torch.rand(shape, generator=cgen, device="cuda") > 0.3
    else:
        mask = randn(shape, cgen, dtype, 2.0)
        mask = mask.masked_fill(torch.rand(shape, generator=cgen, device="cuda") < 0.2, float("-inf"))
    check_attention(q, k, v, f"{DT_ID[dtype]} {kind} mask {mshape}", mask=mask)


@gpu
def test_attention_fully_masked_rows_and_empty_small(cgen):
    """A row that may attend no key gives zeros (bool and all -inf additive masks, generic path;
    bottom-right L > S, tensor-core path); L = 0 and S = 0 on CUDA."""
    q, k, v = qkv(cgen, 1, 2, 2, 6, 90, 64, dtype=F16)
    mask = torch.rand(6, 90, generator=cgen, device="cuda") > 0.5
    mask[2] = False
    add = torch.zeros(6, 90, device="cuda", dtype=F16).masked_fill(~mask, float("-inf"))
    for m in (mask, add):
        y = check_attention(q, k, v, f"fully masked row ({m.dtype})", mask=m)
        assert bool((y[:, :, 2] == 0).all()), "a row that attends nothing is zero"
    q, k, v = qkv(cgen, 1, 2, 2, 10, 4, 64, dtype=BF16)
    y = check_attention(q, k, v, "L > S bottom-right", is_causal=True, align="bottom_right")
    assert bool((y[:, :, :6] == 0).all()) and bool((y[:, :, 6:] != 0).any())
    q, k, v = qkv(cgen, 1, 2, 2, 0, 5, 64, dtype=F16)
    y = attention(q, k, v)
    assert y.shape == (1, 2, 0, 64) and y.device.type == "cuda"
    q, k, v = qkv(cgen, 1, 2, 2, 3, 0, 64, dtype=F16)
    y = attention(q, k, v)
    assert y.shape == (1, 2, 3, 64) and bool((y == 0).all())


@gpu
def test_attention_head_dim_limit_small(cgen):
    """Head dims past 256 raise NotImplementedError naming the limit (the CPU takes them)."""
    for d, dv in ((264, 264), (64, 320)):
        q, k, v = qkv(cgen, 1, 2, 2, 3, 5, d, dv, dtype=F16)
        with pytest.raises(NotImplementedError, match="256"):
            attention(q, k, v)
    kc = torch.zeros(2, 16, 1, 264, dtype=F16, device="cuda")
    with pytest.raises(NotImplementedError, match="256"):
        paged_attention(randn((1, 2, 264), cgen, F16), kc, kc, torch.zeros(1, 1, dtype=torch.int32, device="cuda"),
                        torch.ones(1, dtype=torch.int32, device="cuda"))


@gpu
@pytest.mark.parametrize("dtype,d", [(BF16, 128), (F32, 64)], ids=["fast-bf16", "generic-fp32"])
def test_attention_large_scores(dtype, d, cgen):
    """Scores ~ 1e3: the online softmax needs its running max (exp would overflow without it)."""
    q, k, v = qkv(cgen, 1, 4, 2, 100, 300, d, dtype=dtype, scale=30.0)
    check_attention(q, k, v, f"large scores {DT_ID[dtype]}", is_causal=True, align="bottom_right")


@gpu
@pytest.mark.parametrize("dtype,d", [(F16, 64), (F32, 64)], ids=["fast-fp16", "generic-fp32"])
def test_attention_nan_query_row(dtype, d, cgen):
    """NaN in one query row makes that row NaN and no other."""
    q, k, v = qkv(cgen, 1, 2, 2, 5, 70, d, dtype=dtype)
    q[0, 1, 3, 7] = float("nan")
    y = attention(q, k, v)
    assert bool(torch.isnan(y[0, 1, 3]).all())
    keep = torch.ones_like(y, dtype=torch.bool)
    keep[0, 1, 3] = False
    assert bool(torch.isfinite(y[keep]).all())


@gpu
def test_attention_split_keys_deterministic(cgen):
    """Decode rows whose keys are split across blocks merge in a fixed order: repeated calls
    agree bitwise (generic fp32 and D = 96 fp16) and so do fast-path calls."""
    for dtype, d in ((F32, 128), (F16, 96), (BF16, 128)):
        q, k, v = qkv(cgen, 1, 8, 2, 1, 4099, d, dtype=dtype)
        ys = [attention(q, k, v, enable_gqa=True) for _ in range(3)]
        assert all(torch.equal(ys[0], y) for y in ys[1:]), DT_ID[dtype]


# ---------------------------------------------------------------- paged caches: building and reference
def paged_layout(gen, seq_lens, bs, extra_blocks=3, extra_cols=2):
    """Shuffled block ids per sequence: (num_blocks, block_tables int32 on the GPU). Columns past a
    sequence's last block hold out-of-range garbage (never read)."""
    need = [(S + bs - 1) // bs for S in seq_lens]
    nb = sum(need) + extra_blocks
    perm = torch.randperm(nb, generator=gen, device="cuda").cpu()
    bt = torch.empty(len(seq_lens), max(need + [0]) + extra_cols, dtype=torch.int32)
    bt[:, 0::2], bt[:, 1::2] = GARBAGE, -GARBAGE
    i = 0
    for s, n in enumerate(need):
        bt[s, :n] = perm[i:i + n].to(torch.int32)
        i += n
    return nb, bt.cuda()


def seq_slots(bt, s, S, bs):
    """int64 slots of positions 0..S-1 of sequence s, through its block table."""
    pos = torch.arange(S, device=bt.device)
    return bt[s].to(torch.int64)[pos // bs] * bs + pos % bs


def gather(cache, scale, bt, s, S, bs):
    """float64 [hkv, S, dim]: what sequence s's first S positions hold in the cache (INT8: codes * scale)."""
    slots = seq_slots(bt, s, S, bs)
    rows = cache.flatten(0, 1)[slots].double()
    if scale is not None:
        rows = rows * scale.flatten(0, 1)[slots].double()[..., None]
    return rows.transpose(0, 1)


def make_paged(gen, seq_lens, hkv, d, dv, dtype, cache_dtype, bs=16):
    """Caches holding random K / V (drawn in dtype, rounded or quantized to cache_dtype) for each
    sequence, written directly (not through reshape_and_cache); every other slot poisoned (NaN, or
    random codes with NaN scales). Returns the op's keyword arguments."""
    nb, bt = paged_layout(gen, seq_lens, bs)
    slots = torch.cat([seq_slots(bt, s, S, bs) for s, S in enumerate(seq_lens)] +
                      [torch.zeros(0, dtype=torch.int64, device="cuda")])
    int8 = cache_dtype == I8
    out = {}
    for name, dim in (("key", d), ("value", dv)):
        rows = randn((slots.numel(), hkv, dim), gen, dtype)
        if int8:
            c = torch.randint(-128, 128, (nb, bs, hkv, dim), generator=gen, device="cuda", dtype=I8)
            sc = torch.full((nb, bs, hkv), float("nan"), device="cuda")
            codes, rs = ref_int8.quantize_per_token(rows)
            c.view(-1, hkv, dim)[slots] = codes
            sc.view(-1, hkv)[slots] = rs
        else:
            c, sc = torch.full((nb, bs, hkv, dim), float("nan"), dtype=cache_dtype, device="cuda"), None
            c.view(-1, hkv, dim)[slots] = rows.to(cache_dtype)
        out[f"{name}_cache"], out[f"{name[0]}_scale"] = c, sc
    out["block_tables"] = bt
    out["seq_lens"] = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    return out


def qsl_of(qlens):
    return torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")


def check_paged(y, q, args, qsl, what, window=None, scale=None):
    """y against the float64 reference on the K / V each sequence's block table reaches, causal
    bottom-right (+ window); torch SDPA at q's dtype on the same K / V is the error baseline."""
    __tracebackhide__ = True
    T, hq, _ = q.shape
    kc, vc = args["key_cache"], args["value_cache"]
    bs = kc.shape[1]
    exact = torch.zeros(T, hq, vc.shape[3], dtype=torch.float64, device="cuda")
    theirs = torch.zeros(T, hq, vc.shape[3], dtype=q.dtype, device="cuda")
    qsl_l, lens = qsl.tolist(), args["seq_lens"].tolist()
    assert y.shape == exact.shape and y.dtype == q.dtype, f"{what}: {tuple(y.shape)} {y.dtype}"
    for s, S in enumerate(lens):
        a, b = qsl_l[s], qsl_l[s + 1]
        if a == b or S == 0:
            continue
        K = gather(kc, args.get("k_scale"), args["block_tables"], s, S, bs)
        V = gather(vc, args.get("v_scale"), args["block_tables"], s, S, bs)
        qs = q[a:b].transpose(0, 1)  # [hq, L, d]
        exact[a:b] = ref64(qs, K, V, None, True, scale, "bottom_right", window).transpose(0, 1)
        theirs[a:b] = torch_sdpa(qs, K, V, None, True, scale, "bottom_right", window).transpose(0, 1)
    assert_close(y, exact, theirs, what)
    for s, S in enumerate(lens):
        if S == 0:
            assert bool((y[qsl_l[s]:qsl_l[s + 1]] == 0).all()), f"{what}: sequence {s} has no keys: zeros expected"


def run_paged(q, args, what, query_start_loc=None, window=None, scale=None):
    poison_allocator(q.shape[0] * q.shape[1] * args["value_cache"].shape[3] * q.element_size())
    y = paged_attention(q, **args, query_start_loc=query_start_loc, window=window, scale=scale)
    qsl = query_start_loc if query_start_loc is not None else torch.arange(q.shape[0] + 1, device="cuda")
    check_paged(y, q, args, qsl, what, window=window, scale=scale)
    return y


@pytest.fixture(params=["auto", "simt"])
def decode_kernel(request, monkeypatch):
    """Runs a paged test with each split-KV kernel: the default (tensor cores where the call
    allows: D = 128, fp16 / bf16 queries, csrc/cuda/attention_split_mma.cuh) and
    LOWBIT_CUDA_DECODE=simt (CUDA cores only; the variable is read at every call). The long
    and window tests run the default only (GPU time; the CUDA-core kernel passed them before
    the tensor-core one existed, and still runs them for fp32 and mixed dtypes)."""
    if request.param == "simt":
        monkeypatch.setenv("LOWBIT_CUDA_DECODE", "simt")
    else:
        monkeypatch.delenv("LOWBIT_CUDA_DECODE", raising=False)
    return request.param


# (query dtype, cache dtype)
PAGED_DTYPES = [(F16, F16), (BF16, BF16), (F32, F32), (F32, F16), (F16, F32), (BF16, I8), (F16, I8), (F32, I8)]
PAGED_DT_IDS = [f"q{DT_ID[a]}-c{DT_ID[b]}" for a, b in PAGED_DTYPES]
DECODE_LENS = [1, 0, 17, 1037, 65, 300, 2]


# ---------------------------------------------------------------- paged_attention: decode
@gpu
@pytest.mark.parametrize("qdtype,cdtype", PAGED_DTYPES, ids=PAGED_DT_IDS)
@pytest.mark.parametrize("hq,hkv,d", [(8, 8, 64), (32, 8, 128), (12, 1, 80)], ids=["gqa1-D64", "gqa4-D128",
                                                                                  "mqa12-D80"])
def test_paged_decode(qdtype, cdtype, hq, hkv, d, decode_kernel, cgen):
    args = make_paged(cgen, DECODE_LENS, hkv, d, d, qdtype, cdtype)
    q = randn((len(DECODE_LENS), hq, d), cgen, qdtype)
    run_paged(q, args, f"decode q{DT_ID[qdtype]} cache {DT_ID[cdtype]} Hq={hq} Hkv={hkv} D={d}")


@gpu
@pytest.mark.parametrize("qdtype,cdtype", [(F16, F16), (BF16, I8), (F32, F32)], ids=["fp16", "bf16-int8", "fp32"])
def test_paged_decode_small(qdtype, cdtype, cgen):
    """Decode without query_start_loc (the kernel takes token b as sequence b's query: no
    metadata to build or search) equals the same call with query_start_loc = arange, bitwise,
    and so does a strided query view (a slice of a fused qkv projection)."""
    lens = [1, 0, 17, 33]
    args = make_paged(cgen, lens, 2, 64, 64, qdtype, cdtype)
    q = randn((len(lens), 4, 64), cgen, qdtype)
    y = run_paged(q, args, f"small decode {DT_ID[qdtype]} / {DT_ID[cdtype]}")
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32, device="cuda")
    _assert_bitwise(paged_attention(q, **args, query_start_loc=qsl), y.cpu(), "decode vs query_start_loc")
    qkv = randn((len(lens), 4, 64 + 16), cgen, qdtype)
    qkv[:, :, 8:72] = q
    _assert_bitwise(paged_attention(qkv[:, :, 8:72], **args), y.cpu(), "strided vs contiguous query")


@gpu
@pytest.mark.parametrize("cdtype", [BF16, I8], ids=["bf16", "int8"])
def test_paged_decode_merge_overlap(cdtype, monkeypatch, cgen):
    """The split merge is launched to overlap the split kernel's end (programmatic dependent
    launch on sm_90+, attention.cu merge_overlaps): it must still wait for every partial.
    Eager calls (the partials' scratch poisoned first) and graph replays with many splits
    equal LOWBIT_CUDA_PDL=0's output bitwise, which matches the reference; so does a launch
    without the shared-memory padding that keeps 2 blocks per SM (LOWBIT_CUDA_DECODE_RESIDENT=4)."""
    lens = [4096, 3000, 17, 4095, 1, 2048, 4000, 64]
    args = make_paged(cgen, lens, 8, 128, 128, BF16, cdtype)
    q = randn((len(lens), 32, 128), cgen, BF16)
    monkeypatch.setenv("LOWBIT_CUDA_PDL", "0")
    want = run_paged(q, args, f"serial merge, {DT_ID[cdtype]} cache").cpu()
    monkeypatch.delenv("LOWBIT_CUDA_PDL")
    monkeypatch.setenv("LOWBIT_CUDA_DECODE_RESIDENT", "4")
    _assert_bitwise(paged_attention(q, **args), want, "4 blocks per SM")
    monkeypatch.delenv("LOWBIT_CUDA_DECODE_RESIDENT")
    scratch = len(lens) * 32 * 64 * 130 * 4  # tokens x Hq x (at most 64 splits) x (Dv + 2) fp32
    for i in range(3):
        poison_allocator(scratch)
        _assert_bitwise(paged_attention(q, **args), want, f"overlapped merge, call {i}")
    g, out = capture_graph(lambda: paged_attention(q, **args), warmup=1)
    for i in range(3):
        g.replay()
        torch.cuda.synchronize()
        _assert_bitwise(out, want, f"overlapped merge, graph replay {i}")


@gpu
@pytest.mark.parametrize("qdtype,cdtype", [(F16, F16), (BF16, BF16), (F16, I8), (BF16, I8)],
                         ids=["fp16", "bf16", "fp16-int8", "bf16-int8"])
def test_paged_decode_mma_small(qdtype, cdtype, decode_kernel, cgen):
    """The edges of the tensor-core decode kernel (D = 128): GQA groups of 8 (one block of 8
    heads), 3 (two blocks, the second with one head) and 1; block size 5 (a 16-key tile spans
    pages) and 16; lengths at tile (16 keys) and warp-round (64 keys) edges, 0 and 1."""
    lens = [0, 1, 16, 17, 63, 64, 65, 130]
    for hq, hkv, bs in ((8, 1, 5), (6, 2, 16), (2, 2, 16)):
        args = make_paged(cgen, lens, hkv, 128, 128, qdtype, cdtype, bs=bs)
        q = randn((len(lens), hq, 128), cgen, qdtype)
        run_paged(q, args, f"{decode_kernel} decode {DT_ID[qdtype]} / {DT_ID[cdtype]} Hq={hq} Hkv={hkv} bs={bs}")


@gpu
@pytest.mark.parametrize("qscale", [1e6, 1e-7], ids=["large", "tiny"])
def test_paged_decode_int8_bf16_query_range(qscale, decode_kernel, cgen):
    """bf16 queries with an INT8 cache: the tensor-core kernel multiplies Q.K^T in fp16 after a
    power-of-two scale per head; queries past fp16's range (1e6) or deep in its subnormals
    (1e-7), with heads 8x apart, must still give the reference (the softmax scale keeps the
    scores moderate)."""
    lens = [1, 17, 300]
    args = make_paged(cgen, lens, 2, 128, 128, BF16, I8)
    heads = torch.tensor([1.0, 8.0, 0.125, 64.0, 1.0, 0.5, 2.0, 16.0], device="cuda")[None, :, None]
    q = (randn((len(lens), 8, 128), cgen) * heads * qscale).to(BF16)
    run_paged(q, args, f"{decode_kernel} decode bf16 / int8 |q| ~ {qscale:g}", scale=0.1 / qscale)


@gpu
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("qdtype,cdtype", [(BF16, BF16), (BF16, I8), (F16, F16), (F32, F32)],
                         ids=["bf16", "bf16-int8", "fp16", "fp32"])
def test_paged_long_sequences(qdtype, cdtype, bs, cgen):
    """5000 and 4097 keys: decode splits them across blocks (flash-decoding, merged by log-sum-exp);
    chunked prefill of 64 / 300 queries over the same caches."""
    lens = [5000, 1, 4097]
    args = make_paged(cgen, lens, 8, 128, 128, qdtype, cdtype, bs=bs)
    q = randn((3, 32, 128), cgen, qdtype)
    run_paged(q, args, f"long decode {DT_ID[qdtype]} / {DT_ID[cdtype]} bs={bs}")
    qsl = qsl_of([64, 1, 300])
    q = randn((365, 32, 128), cgen, qdtype)
    run_paged(q, args, f"long prefill {DT_ID[qdtype]} / {DT_ID[cdtype]} bs={bs}", query_start_loc=qsl)


@gpu
@pytest.mark.parametrize("bs", [pytest.param(1, id="small-bs1"), pytest.param(5, id="small-bs5"),
                                pytest.param(32, id="bs32")])
def test_paged_block_sizes(bs, cgen):
    lens = [1, 31, 200, 129] if bs == 32 else [1, 7, 33]
    args = make_paged(cgen, lens, 2, 64, 64, F16, F16, bs=bs)
    q = randn((len(lens), 4, 64), cgen, F16)
    run_paged(q, args, f"block_size {bs}")


@gpu
def test_paged_dims_stride_and_scale(cgen):
    """Dv != D, D = 256 (the limit), D = 32, a strided query (a slice of a fused projection) and an
    explicit scale."""
    lens = [3, 100, 17]
    for d, dv, dtype in ((64, 32, F16), (256, 256, BF16), (32, 48, F32)):
        args = make_paged(cgen, lens, 2, d, dv, dtype, dtype)
        q = randn((3, 4, d), cgen, dtype)
        run_paged(q, args, f"D={d} Dv={dv} {DT_ID[dtype]}")
    args = make_paged(cgen, lens, 2, 64, 64, F16, F16)
    fused = randn((3, 4, 64 + 16), cgen, F16)
    q = fused[:, :, 8:72]
    y = run_paged(q, args, "strided query, scale 0.3", scale=0.3)
    assert torch.equal(y, paged_attention(q.contiguous(), **args, scale=0.3)), "strided vs contiguous query"


@gpu
def test_paged_empty_small(cgen):
    """Sequences without keys give zeros; no query tokens gives an empty output."""
    args = make_paged(cgen, [0, 0, 5], 2, 64, 64, F16, F16)
    q = randn((3, 4, 64), cgen, F16)
    run_paged(q, args, "empty sequences")
    qsl = qsl_of([0, 0, 0])
    y = paged_attention(q[:0], **args, query_start_loc=qsl)
    assert y.shape == (0, 4, 64) and y.device.type == "cuda"


# ---------------------------------------------------------------- paged_attention: chunked prefill, windows
PREFILL = ([5, 0, 40, 17, 300, 70, 1, 129], [3, 0, 40, 0, 7, 70, 1, 64])  # seq_lens, queries per sequence


@gpu
@pytest.mark.parametrize("qdtype,cdtype", [(F16, F16), (BF16, I8), (F32, F32), (F32, BF16)],
                         ids=["fp16", "bf16-int8", "fp32", "fp32-cbf16"])
@pytest.mark.parametrize("hq,hkv,d", [(6, 2, 64), (16, 2, 128)], ids=["gqa3-D64", "gqa8-D128"])
def test_paged_chunked_prefill(qdtype, cdtype, hq, hkv, d, decode_kernel, cgen):
    lens, qlens = PREFILL
    args = make_paged(cgen, lens, hkv, d, d, qdtype, cdtype)
    qsl = qsl_of(qlens)
    q = randn((sum(qlens), hq, d), cgen, qdtype)
    run_paged(q, args, f"prefill {DT_ID[qdtype]} / {DT_ID[cdtype]} Hq={hq} Hkv={hkv} D={d}", query_start_loc=qsl)


@gpu
def test_paged_chunked_prefill_small(cgen):
    lens, qlens = [5, 0, 20, 1], [3, 0, 20, 1]
    args = make_paged(cgen, lens, 2, 64, 64, BF16, I8)
    qsl = qsl_of(qlens)
    q = randn((sum(qlens), 4, 64), cgen, BF16)
    run_paged(q, args, "small prefill int8", query_start_loc=qsl)


@gpu
@pytest.mark.parametrize("left", [0, 16, 100])
@pytest.mark.parametrize("qdtype,cdtype", [(BF16, BF16), (F16, I8)], ids=["bf16", "fp16-int8"])
def test_paged_window(qdtype, cdtype, left, cgen):
    lens, qlens = PREFILL
    args = make_paged(cgen, lens, 2, 128, 128, qdtype, cdtype)
    qsl = qsl_of(qlens)
    q = randn((sum(qlens), 8, 128), cgen, qdtype)
    run_paged(q, args, f"prefill window {left}", query_start_loc=qsl, window=(left, -1))
    q = randn((len(lens), 8, 128), cgen, qdtype)
    run_paged(q, args, f"decode window {left}", window=(left, -1))


# ---------------------------------------------------------------- bad metadata (validated in Python)
@gpu
def test_paged_bad_metadata_small(cgen):
    """Out-of-range block ids, seq_lens, query ranges and slots are ValueErrors naming the
    argument, and a rejected write leaves the caches untouched."""
    args = make_paged(cgen, [3, 20], 2, 64, 64, F16, F16)
    nb = args["key_cache"].shape[0]
    q = randn((2, 4, 64), cgen, F16)

    def call(**kw):
        return paged_attention(q, **dict(args, **kw))

    call()
    for bad_id in (nb, -1):
        bt = args["block_tables"].clone()
        bt[1, 0] = bad_id
        with pytest.raises(ValueError, match="block_tables"):
            call(block_tables=bt)
    for lens in ([-1, 20], [3, 10_000]):
        with pytest.raises(ValueError, match="seq_lens"):
            call(seq_lens=torch.tensor(lens, dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_attention(q, **args, query_start_loc=torch.tensor([0, 2, 1], dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match="query_start_loc"):  # 3 queries for a 3-key sequence is fine, 4 is not
        paged_attention(randn((6, 4, 64), cgen, F16), **args,
                        query_start_loc=torch.tensor([0, 4, 6], dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match="block_tables"):
        call(block_tables=args["block_tables"].cpu())
    key, value = randn((2, 2, 64), cgen, F16), randn((2, 2, 64), cgen, F16)
    before = [args["key_cache"].clone(), args["value_cache"].clone()]
    bs = args["key_cache"].shape[1]
    for slots in ([0, nb * bs], [-2, 1]):
        with pytest.raises(ValueError, match="slot_mapping"):
            reshape_and_cache(key, value, args["key_cache"], args["value_cache"],
                              torch.tensor(slots, dtype=torch.int64, device="cuda"))
    torch.cuda.synchronize()
    assert torch.equal(args["key_cache"].isnan(), before[0].isnan())
    assert torch.equal(args["key_cache"].nan_to_num(), before[0].nan_to_num()), "a rejected write changed the cache"
    assert torch.equal(args["value_cache"].nan_to_num(), before[1].nan_to_num())


# ---------------------------------------------------------------- reshape_and_cache
def _slot_mapping(gen, n, nb, bs, skip_every=4):
    """n distinct random slots on the GPU; every skip_every-th token (from the second) is -1."""
    slots = torch.randperm(nb * bs, generator=gen, device="cuda")[:n].to(torch.int64)
    slots[1::skip_every] = -1
    return slots


def _write_both(key, value, kc, vc, slots, ks=None, vs=None):
    """reshape_and_cache on the GPU caches and on CPU copies of them (the ground truth); returns
    the CPU results [kc, vc, (ks, vs)]."""
    cpu = [t.cpu() for t in (kc, vc, ks, vs) if t is not None]
    ops.reshape_and_cache(key.cpu(), value.cpu(), cpu[0], cpu[1], slots.cpu(), *cpu[2:])
    reshape_and_cache(key, value, kc, vc, slots, ks, vs)
    torch.cuda.synchronize()
    return cpu


def _assert_bitwise(got, want, what):
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if got.is_floating_point():
        assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN positions differ (a slot written or skipped)"
        view = {4: torch.int32, 2: torch.int16}[got.element_size()]
        diff = (got.view(view) != want.view(view)) & ~got.isnan()
    else:
        diff = got != want
    n = int(diff.sum())
    assert n == 0, f"{what}: {n} of {got.numel()} elements differ; first at {diff.nonzero()[0].tolist()}"


@gpu
@pytest.mark.parametrize("kdtype,cdtype,n", [
    pytest.param(F16, F16, 37, id="small-fp16"), pytest.param(F32, BF16, 5, id="small-fp32-to-bf16"),
    pytest.param(BF16, BF16, 300, id="bf16"), pytest.param(F32, F32, 1, id="fp32-one-token"),
    pytest.param(F32, F16, 300, id="fp32-to-fp16"), pytest.param(BF16, F32, 37, id="bf16-to-fp32"),
    pytest.param(F16, BF16, 37, id="fp16-to-bf16")])
def test_reshape_and_cache_float(kdtype, cdtype, n, cgen):
    """Rows rounded to the cache dtype at their slots, bitwise as the CPU op; NaN-poisoned caches
    show that nothing else is written (slot -1 skipped)."""
    nb, bs, h, d, dv = 29, 16, 3, 64, 40
    key, value = randn((n, h, d), cgen, kdtype), randn((n, h, dv), cgen, kdtype)
    kc = torch.full((nb, bs, h, d), float("nan"), dtype=cdtype, device="cuda")
    vc = torch.full((nb, bs, h, dv), float("nan"), dtype=cdtype, device="cuda")
    slots = _slot_mapping(cgen, n, nb, bs)
    want = _write_both(key, value, kc, vc, slots)
    _assert_bitwise(kc, want[0], "key_cache")
    _assert_bitwise(vc, want[1], "value_cache")
    written = slots[slots >= 0]
    assert bool(torch.isfinite(kc.view(-1, h, d)[written]).all())
    assert bool(torch.isfinite(vc.view(-1, h, dv)[written]).all())
    assert int(torch.isnan(kc).any(-1).any(-1).sum()) == nb * bs - written.numel(), "untouched slots keep NaN"


@gpu
@pytest.mark.parametrize("dtype,n,h,d", [pytest.param(F32, 37, 2, 64, id="small-fp32-D64"),
                                         pytest.param(F16, 9, 3, 33, id="small-fp16-D33"),
                                         pytest.param(BF16, 1000, 8, 128, id="bf16-D128"),
                                         pytest.param(F16, 300, 1, 80, id="fp16-D80"),
                                         pytest.param(F32, 1, 4, 256, id="fp32-D256")])
def test_reshape_and_cache_int8(dtype, n, h, d, cgen):
    """Per (token, head) quantization on the fly: codes and scales bitwise equal to the CPU op's
    (lowbit.ref.int8's rule, correctly rounded 127 / amax, round half to even), including an
    all-zero row (scale 0), a spike, a NaN (scale NaN, codes 0), a tiny row (amax < 2^-64:
    the prescale) and exact ties; unwritten slots keep their random codes and NaN scales."""
    nb, bs = max(4, (2 * n) // 16 + 1), 16
    key, value = randn((n, h, d), cgen, dtype, 3.0), randn((n, h, d), cgen, dtype)
    if n > 5:
        key[1, 0] = 0
        key[3, h - 1, d // 2] = 1000.0
        value[2, 0, 3] = float("nan")
        value[4, h - 1] = (randn((d,), cgen) * 1e-25).to(dtype) if dtype == F32 else value[4, h - 1]
        key[5, 0, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5], device="cuda").to(dtype)  # ties: x * 127 / 127
        key[5, 0, 4:] = 0.25
    kc = torch.randint(-128, 128, (nb, bs, h, d), generator=cgen, device="cuda", dtype=I8)
    vc = torch.randint(-128, 128, (nb, bs, h, d), generator=cgen, device="cuda", dtype=I8)
    ks = torch.full((nb, bs, h), float("nan"), device="cuda")
    vs = torch.full((nb, bs, h), float("nan"), device="cuda")
    slots = _slot_mapping(cgen, n, nb, bs, skip_every=3)
    want = _write_both(key, value, kc, vc, slots, ks, vs)
    for got, w, name in zip((kc, vc, ks, vs), want, ("key_cache", "value_cache", "k_scale", "v_scale")):
        _assert_bitwise(got, w, f"{DT_ID[dtype]} {name}")


@gpu
def test_reshape_and_cache_strided_source_small(cgen):
    """key / value as slices of a fused [tokens, 3 * heads, head_dim] projection (token and head
    strides other than the dense ones), into a float and an INT8 cache."""
    n, h, d, nb, bs = 7, 2, 64, 4, 16
    qkv_rows = randn((n, 3 * h, d), cgen, F16)
    key, value = qkv_rows[:, h:2 * h], qkv_rows[:, 2 * h:]
    slots = _slot_mapping(cgen, n, nb, bs)
    kc = torch.full((nb, bs, h, d), float("nan"), dtype=F16, device="cuda")
    vc = torch.full((nb, bs, h, d), float("nan"), dtype=F16, device="cuda")
    want = _write_both(key, value, kc, vc, slots)
    _assert_bitwise(kc, want[0], "key_cache")
    _assert_bitwise(vc, want[1], "value_cache")
    kc8 = torch.zeros((nb, bs, h, d), dtype=I8, device="cuda")
    vc8 = torch.zeros((nb, bs, h, d), dtype=I8, device="cuda")
    ks, vs = torch.full((nb, bs, h), float("nan"), device="cuda"), torch.full((nb, bs, h), float("nan"), device="cuda")
    want = _write_both(key, value, kc8, vc8, slots, ks, vs)
    for got, w, name in zip((kc8, vc8, ks, vs), want, ("key_cache", "value_cache", "k_scale", "v_scale")):
        _assert_bitwise(got, w, f"int8 {name}")


# ---------------------------------------------------------------- copy_blocks / swap_blocks
@gpu
@pytest.mark.parametrize("cache_dtype", [BF16, I8], ids=_ids)
def test_copy_blocks(cache_dtype, cgen):
    layers, nb, bs, h, d, dv = 2, 10, 4, 2, 8, 6
    int8 = cache_dtype == I8

    def rnd(shape):
        if int8:
            return torch.randint(-128, 128, shape, generator=cgen, device="cuda", dtype=I8)
        return randn(shape, cgen, cache_dtype)

    kcs = [rnd((nb, bs, h, d)) for _ in range(layers)]
    vcs = [rnd((nb, bs, h, dv)) for _ in range(layers)]
    kss = [torch.rand(nb, bs, h, generator=cgen, device="cuda") for _ in range(layers)] if int8 else None
    vss = [torch.rand(nb, bs, h, generator=cgen, device="cuda") for _ in range(layers)] if int8 else None
    groups = [kcs, vcs] + ([kss, vss] if int8 else [])
    for mapping in (torch.tensor([[1, 7], [1, 8], [3, 0], [9, 2]]), torch.tensor([[4, 5]], device="cuda")):
        want = copied_blocks(groups, mapping)
        ops.copy_blocks(kcs, vcs, mapping, kss, vss)
        for g, w in zip(groups, want):
            for t, tw in zip(g, w):
                assert torch.equal(t, tw), f"copy_blocks {mapping.tolist()} on {mapping.device}"
    before = [t.clone() for t in kcs]
    with pytest.raises(ValueError, match="block_mapping"):
        ops.copy_blocks(kcs, vcs, torch.tensor([[0, 5], [1, nb]]), kss, vss)
    assert all(torch.equal(a, b) for a, b in zip(kcs, before)), "a rejected copy changed a cache"


@gpu
def test_swap_blocks(cgen):
    """GPU <-> GPU, CPU -> GPU and GPU -> CPU (pageable and pinned CPU memory), different
    num_blocks on each side; the source is untouched."""
    def rnd(nb, device):
        return randn((nb, 4, 2, 8), cgen, F16).to(device)

    for src_dev, dst_dev, pinned in (("cuda", "cuda", False), ("cpu", "cuda", False), ("cuda", "cpu", False),
                                     ("cpu", "cuda", True), ("cuda", "cpu", True)):
        src, dst = rnd(10, src_dev), rnd(6, dst_dev)
        if pinned:
            src, dst = (t.pin_memory() if t.device.type == "cpu" else t for t in (src, dst))
        mapping = torch.tensor([[9, 0], [2, 5], [4, 1]])
        want, src_before = dst.clone(), src.clone()
        for s, d in mapping.tolist():
            want[d] = src[s].to(dst_dev)
        ops.swap_blocks(src, dst, mapping)
        torch.cuda.synchronize()
        what = f"{src_dev} -> {dst_dev}{' (pinned)' if pinned else ''}"
        assert torch.equal(dst, want), what
        assert torch.equal(src, src_before), f"{what}: src changed"
        with pytest.raises(ValueError, match="block_mapping"):
            ops.swap_blocks(src, dst, torch.tensor([[0, 6]]))
    k8 = torch.randint(-128, 128, (5, 4, 2, 8), generator=cgen, device="cuda", dtype=I8)
    host = torch.zeros(3, 4, 2, 8, dtype=I8)
    ops.swap_blocks(k8, host, torch.tensor([[4, 0], [0, 2]]))
    torch.cuda.synchronize()
    assert torch.equal(host[0], k8[4].cpu()) and torch.equal(host[2], k8[0].cpu()) and not host[1].any()


# ---------------------------------------------------------------- lowbit.PagedKVCache on the GPU
@gpu
@pytest.mark.parametrize("cache_dtype", [F16, I8], ids=_ids)
def test_paged_kv_cache_end_to_end(cache_dtype, cgen):
    """PagedKVCache(device="cuda"): chunked prefill of three prompts then decode steps, every layer
    (append, write, attention), a fork whose append copies the shared tail block on the GPU, and
    the one-step API (step.write / step.attention). Each result against the reference on what the
    cache holds; what it holds against what was written (float: exactly the rows rounded to the
    cache dtype; INT8: within half a quantization step)."""
    layers, nb, bs, hkv, d, hq, dtype = 2, 64, 16, 2, 128, 8, F16
    cache = lowbit.PagedKVCache(layers, nb, bs, hkv, d, dtype=dtype, cache_dtype=cache_dtype, device="cuda")
    int8 = cache_dtype == I8
    assert cache.key_caches[0].device.type == "cuda" and cache.key_caches[0].dtype == cache_dtype
    hist = {}  # (seq, layer) -> [K rows, V rows] as written, [n, hkv, d]

    def view_args(layer):
        return {"key_cache": cache.key_caches[layer], "value_cache": cache.value_caches[layer],
                "k_scale": cache.k_scales[layer] if int8 else None, "v_scale": cache.v_scales[layer] if int8 else None}

    def check_stored(seqs):
        bt = cache.block_tables(seqs).to("cuda")
        for layer in range(layers):
            a = view_args(layer)
            for s, seq in enumerate(seqs):
                n = cache.seq_len(seq)
                for j, (c, sc) in enumerate(((a["key_cache"], a["k_scale"]), (a["value_cache"], a["v_scale"]))):
                    got = gather(c, sc, bt, s, n, bs).transpose(0, 1)  # [n, hkv, d]
                    want = hist[(seq, layer)][j]
                    if int8:
                        step = sc.flatten(0, 1)[seq_slots(bt, s, n, bs)].double()[..., None]
                        # half a step, plus the fp32 rounding of 127 / amax and amax / 127 (< 2e-5 step)
                        assert bool(((got - want.double()).abs() <= step * (0.5 + 1e-4)).all()), f"{seq} int8 rows"
                    else:
                        assert torch.equal(got, want.to(cache_dtype).double()), f"{seq} layer {layer} rows"

    def attend(seqs, qlens):
        qsl = qsl_of(qlens) if any(n != 1 for n in qlens) else None
        bt = cache.block_tables(seqs).to("cuda")
        lens = torch.tensor([cache.seq_len(s) for s in seqs], dtype=torch.int32, device="cuda")
        outs = []
        for layer in range(layers):
            q = randn((sum(qlens), hq, d), cgen, dtype)
            y = cache.attention(layer, q, seqs, query_start_loc=qsl)
            args = dict(view_args(layer), block_tables=bt, seq_lens=lens)
            check_paged(y, q, args, qsl if qsl is not None else torch.arange(len(seqs) + 1, device="cuda"),
                        f"PagedKVCache {DT_ID[cache_dtype]} {seqs} layer {layer}")
            outs.append((q, y))
        return outs

    def append(seq, n):
        slots = cache.append(seq, n)
        for layer in range(layers):
            k, v = randn((n, hkv, d), cgen, dtype), randn((n, hkv, d), cgen, dtype)
            cache.write(layer, k, v, slots)
            h = hist.setdefault((seq, layer), [k[:0], v[:0]])
            h[0], h[1] = torch.cat([h[0], k]), torch.cat([h[1], v])

    prompts = {"a": 37, "b": 100, "c": 1}
    for seq in prompts:
        cache.add(seq)
    for step in range(3):
        qlens = [n if step == 0 else 1 for n in prompts.values()]
        for seq, n in zip(prompts, qlens):
            append(seq, n)
        attend(list(prompts), qlens)
    check_stored(list(prompts))
    # fork: b2 shares b's 102 tokens (a partly filled last block); its append copies that block
    cache.fork("b", "b2")
    for layer in range(layers):
        hist[("b2", layer)] = list(hist[("b", layer)])
    b_out = attend(["b"], [1])
    free = cache.num_free_blocks
    append("b2", 1)
    assert cache.num_free_blocks == free - 1, "copy-on-write takes one block"
    assert cache.block_tables(["b2"])[0, -1] != cache.block_tables(["b"])[0, -1]
    check_stored(["b", "b2"])
    for layer, (q, y) in enumerate(b_out):
        assert torch.equal(cache.attention(layer, q, ["b"]), y), "the parent's result changed after the child wrote"
    # the one-step API: tables built and validated once, shared by the layers
    seqs = ["a", "c", "b2"]
    slots = torch.cat([cache.append(s, 1) for s in seqs])
    st = cache.step(seqs, slots)
    for layer in range(layers):
        k, v = randn((3, hkv, d), cgen, dtype), randn((3, hkv, d), cgen, dtype)
        st.write(layer, k, v)
        for i, seq in enumerate(seqs):
            h = hist[(seq, layer)]
            h[0], h[1] = torch.cat([h[0], k[i:i + 1]]), torch.cat([h[1], v[i:i + 1]])
    check_stored(seqs)
    bt = cache.block_tables(seqs).to("cuda")
    lens = torch.tensor([cache.seq_len(s) for s in seqs], dtype=torch.int32, device="cuda")
    for layer in range(layers):
        q = randn((3, hq, d), cgen, dtype)
        y = st.attention(layer, q)
        check_paged(y, q, dict(view_args(layer), block_tables=bt, seq_lens=lens), torch.arange(4, device="cuda"),
                    f"PagedKVCache step layer {layer}")
    for seq in list(prompts) + ["b2"]:
        cache.free(seq)
    cache.check_invariants()
    assert cache.num_free_blocks == nb


# ---------------------------------------------------------------- CUDA graphs, streams, compile
@gpu
@pytest.mark.parametrize("cache_dtype", [BF16, I8], ids=_ids)
def test_cuda_graph_decode_step(cache_dtype, cgen):
    """A decode step (reshape_and_cache + paged_attention) captured once in a CUDA graph and replayed
    after the metadata's contents change in place (longer sequences, a new block, the batch
    reordered): the output and the caches equal an eager step on the same state, bitwise."""
    B, hq, hkv, d, bs, dtype = 4, 8, 2, 128, 16, BF16
    lens = [5, 100, 1000, 16]  # tokens cached before the first step
    ahead = 40                 # positions written past them, so the steps below never reach an unwritten one
    cols = (max(lens) + ahead) // bs + 2
    nb = B * cols + 3
    perm = torch.randperm(nb, generator=cgen, device="cuda").to(torch.int32)
    bt = perm[:B * cols].view(B, cols).contiguous()
    int8 = cache_dtype == I8
    if int8:
        kc = torch.randint(-128, 128, (nb, bs, hkv, d), generator=cgen, device="cuda", dtype=I8)
        vc = torch.randint(-128, 128, (nb, bs, hkv, d), generator=cgen, device="cuda", dtype=I8)
        ks = torch.full((nb, bs, hkv), float("nan"), device="cuda")
        vs = torch.full((nb, bs, hkv), float("nan"), device="cuda")
    else:
        kc = torch.full((nb, bs, hkv, d), float("nan"), dtype=cache_dtype, device="cuda")
        vc = torch.full((nb, bs, hkv, d), float("nan"), dtype=cache_dtype, device="cuda")
        ks = vs = None
    prefill = torch.cat([seq_slots(bt, s, n + ahead, bs) for s, n in enumerate(lens)])
    reshape_and_cache(randn((prefill.numel(), hkv, d), cgen, dtype), randn((prefill.numel(), hkv, d), cgen, dtype),
                      kc, vc, prefill, ks, vs)
    # the step's static inputs
    q, k, v = randn((B, hq, d), cgen, dtype), randn((B, hkv, d), cgen, dtype), randn((B, hkv, d), cgen, dtype)
    slots = torch.empty(B, dtype=torch.int64, device="cuda")
    seq_lens = torch.empty(B, dtype=torch.int32, device="cuda")
    tables = bt.clone()

    def set_state(order, lengths):
        """Sequence order[i] in batch row i, with lengths[order[i]] tokens before this step."""
        tables.copy_(bt[order])
        pos = torch.tensor([lengths[o] for o in order], device="cuda")
        slots.copy_(tables.to(torch.int64).gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs)
        seq_lens.copy_(pos.to(torch.int32) + 1)
        for t in (q, k, v):
            t.copy_(randn(t.shape, cgen, dtype))

    def step():
        reshape_and_cache(k, v, kc, vc, slots, ks, vs)
        return paged_attention(q, kc, vc, tables, seq_lens, k_scale=ks, v_scale=vs)

    set_state(list(range(B)), lens)
    g, out = capture_graph(step, warmup=2)
    state = [t for t in (kc, vc, ks, vs) if t is not None]
    cur = list(lens)
    for it, order in enumerate(([0, 1, 2, 3], [0, 1, 2, 3], [3, 1, 0, 2])):
        if it:
            cur = [n + 1 for n in cur]
        cur[3] += 16 * (it == 2)  # sequence 3 jumps into a new block
        set_state(order, cur)
        snapshot = [t.clone() for t in state]
        g.replay()
        torch.cuda.synchronize()
        got, got_state = out.clone(), [t.clone() for t in state]
        for t, s in zip(state, snapshot):
            t.copy_(s)
        want = step()
        torch.cuda.synchronize()
        what = f"{DT_ID[cache_dtype]} replay {it} order {order}"
        assert torch.equal(got, want), f"{what}: graph output differs from eager"
        for a, b, name in zip(got_state, state, ("key_cache", "value_cache", "k_scale", "v_scale")):
            assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan()), \
                f"{what}: {name} differs from eager"
        check_paged(want, q, {"key_cache": kc, "value_cache": vc, "k_scale": ks, "v_scale": vs,
                              "block_tables": tables, "seq_lens": seq_lens}, torch.arange(B + 1, device="cuda"), what)


@gpu
@pytest.mark.parametrize("path", ["fast", "generic", "paged"])
def test_non_default_stream(path, cgen):
    """The kernels run on the caller's current stream: torch's side streams do not synchronize
    with the legacy default stream, so a kernel sent there would read inputs before they are
    written (the copies below wait behind a long sleep on the side stream). The paged step is
    validated before the sleep (lowbit.ops.PagedStep): validation reads the metadata, which
    waits for the stream and would hide a wrong one."""
    if path == "paged":
        lens = [5000, 37, 1]
        args = make_paged(cgen, lens, 8, 128, 128, BF16, I8)
        srcs = [randn((3, 32, 128), cgen, BF16), randn((3, 8, 128), cgen, BF16), randn((3, 8, 128), cgen, BF16)]
        srcs += [args[n] for n in ("key_cache", "value_cache", "k_scale", "v_scale")]
        new_slots = torch.stack([seq_slots(args["block_tables"], s, n + 1, 16)[-1] for s, n in enumerate(lens)])
        step = ops.PagedStep(*srcs[3:], args["block_tables"], args["seq_lens"] + 1, new_slots)

        def f(q, k, v, kc, vc, ks, vs):
            step.write(k, v, kc, vc, ks, vs)
            y = step.attention(q, kc, vc, ks, vs)
            return torch.cat([y.flatten().float(), kc.flatten().float(), vc.flatten().float(), ks.flatten(),
                              vs.flatten()])
    else:
        dtype, d = (F16, 128) if path == "fast" else (F32, 128)
        srcs = list(qkv(cgen, 2, 16, 4, 1000 if path == "fast" else 1, 2000, d, dtype=dtype))

        def f(q, k, v):
            return attention(q, k, v, enable_gqa=True, is_causal=True, causal_alignment="bottom_right")
    want = f(*[t.clone() for t in srcs])
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        assert _native.stream_of(srcs[0]) == stream.cuda_stream
        xs = [torch.empty_like(t) for t in srcs]
        torch.cuda._sleep(50_000_000)  # keep the stream busy for tens of ms
        for x, t in zip(xs, srcs):
            x.copy_(t)
        y = f(*xs)
    stream.synchronize()
    assert torch.equal(y.nan_to_num(), want.nan_to_num()), f"{path}: result on a side stream differs"


@gpu
def test_compile_fullgraph_cuda(cgen):
    """torch.compile(fullgraph=True) traces both ops on CUDA tensors (through the fake impls) and
    runs lowbit's kernels: the same bits as eager."""
    q, k, v = qkv(cgen, 1, 8, 2, 33, 70, 128, dtype=BF16)
    args = make_paged(cgen, [40, 1, 17], 2, 64, 64, F16, I8)
    qp = randn((3, 4, 64), cgen, F16)

    def f(q, k, v, qp, kc, vc, bt, sl, ks, vs):
        a = lowbit.attention(q, k, v, is_causal=True, enable_gqa=True, causal_alignment="bottom_right",
                             window=(8, 0)) * 2
        b = ops.paged_attention(qp, kc, vc, bt, sl, k_scale=ks, v_scale=vs) + 1
        return a, b

    inputs = (q, k, v, qp, args["key_cache"], args["value_cache"], args["block_tables"], args["seq_lens"],
              args["k_scale"], args["v_scale"])
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*inputs)
    want = f(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(got, want)), "compiled result differs from eager"

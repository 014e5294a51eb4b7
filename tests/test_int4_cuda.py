"""CUDA INT4 kernels (lowbit._cuda, csrc/cuda/int4.cu): W4A16 on tensor cores against the
float64 reference of lowbit.ref.int4 on the canonical weights.

GPU tests carry ``@gpu`` (skipped cleanly without lowbit's CUDA kernels and a GPU); the
CUDA layout (lowbit.formats.int4.pack_cuda) and the build checks run everywhere. Names
with ``small`` use tiny shapes: bench/gpu_check.sh runs them under compute-sanitizer.

Tolerance: max |y - ref64| <= f x (the same for torch's F.linear at x's dtype on the
dequantized weight) + 1 ulp of max |ref|, f = 2 for fp16 and 3 for bf16: the kernel rounds d
and m + 8 d to bf16 before its fma, which measured up to 1.8x torch's own error on CPU
emulation.
"""
from __future__ import annotations

import copy
import zlib

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit import _native, ref
from lowbit.formats import int4 as fmt
from lowbit.nn import Int4ActOrderLinear, Int4Linear
from lowbit.ops import int4 as int4_ops

from conftest import built_cuda_module, capture_graph, cuda_detail, default_plan

_REASON = _native.cuda_unavailable_reason()


def gpu(fn):
    fn = pytest.mark.skipif(_REASON is not None, reason=f"lowbit CUDA kernels unavailable: {_REASON}")(fn)
    return pytest.mark.cuda(fn)


DT_ID = {torch.float16: "fp16", torch.bfloat16: "bf16"}
TOL = {torch.float16: 2.0, torch.bfloat16: 3.0}


def _ids(v):
    return DT_ID.get(v) if isinstance(v, torch.dtype) else None


w4a16 = cuda_detail(int4_ops.int4_linear_w4a16)


def rand_canonical(n, k, g, symmetric, gen, device="cpu", scale_dtype=torch.float16):
    """Random canonical INT4 weights: codes, d > 0 and m (or None), exactly representable in scale_dtype."""
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8, device=device)
    d = (torch.rand((n, k // g), generator=gen, device=device) * 0.02 + 0.002).to(scale_dtype).float()
    m = None if symmetric else (-d * 8 + torch.randn((n, k // g), generator=gen, device=device) * 0.01
                                ).to(scale_dtype).float()
    return codes, d, m


@pytest.fixture
def gen(request):
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


# ---------------------------------------------------------------- the layout (runs everywhere)
@pytest.mark.parametrize("n,k,g", [(1, 32, 32), (16, 64, 64), (37, 192, 64), (24, 100, 100), (130, 384, 128),
                                   (8, 96, 32)])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_pack_cuda_round_trip(n, k, g, symmetric, gen):
    codes, d, m = rand_canonical(n, k, g, symmetric, gen)
    q, table = fmt.pack_cuda(codes, d, m)
    assert q.dtype == torch.int32 and tuple(q.shape) == fmt.packed_cuda_shape(n, k)
    assert tuple(table.shape) == fmt.packed_cuda_scales_shape(n, k // g) and table.dtype == torch.float16
    c2, d2, m2 = fmt.unpack_cuda(q, table, n, k, symmetric)
    assert torch.equal(c2, codes) and torch.equal(d2, d)
    assert m2 is None if symmetric else torch.equal(m2, m)
    if symmetric:
        assert torch.equal(table[:, :n, 1].float().t(), -8 * d)


def test_pack_cuda_words_follow_the_mma_fragments(gen):
    """The bit-level contract csrc/cuda/int4.cu relies on: in word j of lane 4 gid + tig of tile
    (p, t), (word >> (8 sub + 4 h)) & 0x000f000f holds the codes of column 16 p + 8 sub + gid at
    k = 64 t + 16 tig + 4 j + 2 h (low half) and + 1 (high half)."""
    n, k = 48, 192
    codes, d, _ = rand_canonical(n, k, 64, True, gen)
    q, _ = fmt.pack_cuda(codes, d)
    words = q.to(torch.int64) & 0xFFFFFFFF
    for p in range(n // 16):
        for t in range(k // 64):
            for lane in range(32):
                gid, tig = lane >> 2, lane & 3
                for j in range(4):
                    w = int(words[p, t, lane, j])
                    kb = 64 * t + 16 * tig + 4 * j
                    for sub in range(2):
                        for h in range(2):
                            v = (w >> (8 * sub + 4 * h)) & 0x000F000F
                            col = 16 * p + 8 * sub + gid
                            assert v & 0xF == codes[col, kb + 2 * h] and v >> 16 == codes[col, kb + 2 * h + 1]


def test_pack_cuda_pads_with_zeros(gen):
    codes, d, m = rand_canonical(20, 70, 70, False, gen)
    q, table = fmt.pack_cuda(codes, d, m)
    c_all, _, _ = fmt.unpack_cuda(q, table, 32, 128, False)
    assert int(c_all[20:].sum()) == 0 and int(c_all[:, 70:].sum()) == 0
    assert int(table[:, 20:].abs().sum()) == 0


def test_pack_cuda_keeps_fp32_scales_exact(gen):
    codes, d, m = rand_canonical(16, 64, 32, False, gen, scale_dtype=torch.float32)
    d = d * (1 + 2**-20)  # not float16 values
    q, table = fmt.pack_cuda(codes, d, m)
    assert table.dtype == torch.float32
    _, d2, m2 = fmt.unpack_cuda(q, table, 16, 64, False)
    assert torch.equal(d2, d) and torch.equal(m2, m)


def test_cuda_build_has_int4():
    """With nvcc present, lowbit._cuda carries the INT4 entry points, which answer bad
    arguments without touching a device, and the K-split plan is host arithmetic."""
    mod = built_cuda_module()
    bad, ok = _native.INVALID_ARGUMENT, _native.OK
    f16, bf16, f32 = (_native.DTYPE_CODE[t] for t in (torch.float16, torch.bfloat16, torch.float32))
    # x, x_dtype, M, K, ldx, qweight, scales, scales_dtype, groups, N, bias, bias_dtype, y, ldy, splits,
    # partial, counters, device, stream
    args = [0, f16, 0, 64, 64, 0, 0, f16, 2, 16, 0, 0, 0, 16, 1, 0, 0, 0, 0]

    def call(**kw):
        a = list(args)
        names = ["x", "x_dtype", "M", "K", "ldx", "qweight", "scales", "scales_dtype", "groups", "N", "bias",
                 "bias_dtype", "y", "ldy", "splits", "partial", "counters", "device", "stream"]
        for key, v in kw.items():
            a[names.index(key)] = v
        return mod.int4_linear_w4a16(*a)

    assert call() == ok                                  # M == 0: nothing to do
    assert call(x_dtype=f32) == bad                      # fp32 activations: not on tensor cores
    assert call(x_dtype=bf16) == ok
    assert call(scales_dtype=bf16) == bad                # scales are fp16 or fp32
    assert call(groups=3) == bad                         # groups must divide K
    assert call(groups=8, M=2, x=16, qweight=16, scales=16, y=16) == bad  # groups of 8: a lane's 16 k span two
    assert call(M=2, x=16, qweight=8, scales=16, y=16) == bad            # qweight not 16-byte aligned
    assert call(M=2, x=16, qweight=16, scales=18, y=16) == bad           # scales: whole (d, m) pairs
    assert call(M=2, x=16, qweight=16, scales=20, scales_dtype=f32, y=16) == bad
    assert call(N=0) == bad
    assert call(ldy=8) == bad                            # ldy < N
    assert call(ldx=32) == bad                           # ldx < K
    assert call(splits=0) == bad
    assert call(M=2) == bad                              # null pointers with M > 0
    assert call(M=2, K=2**31 - 64, ldx=2**31, groups=1, x=16, qweight=16, scales=16, y=16) == bad  # K > the bound
    # the plan (device -1: for the launch bound): N = 4096 needs a K split on a 132-SM GPU to fill
    # it; a large M does not
    splits, counters = mod.int4_w4a16_plan(1, 11008, 4096, f16, f16, 132, -1)
    assert 1 < splits <= 16 and counters == 4096 // 64
    assert mod.int4_w4a16_plan(2048, 4096, 4096, f16, f16, 132, -1) == (1, 0)
    assert mod.int4_w4a16_plan(1, 64, 16, bf16, f32, 132, -1) == (1, 0)  # one k tile: nothing to split


@pytest.mark.parametrize("var,splits,splits16", [("LOWBIT_CUDA_WOQ_BLOCKS=8", 16, 10),
                                                 ("LOWBIT_CUDA_WOQ_TILES=2", 16, 16),
                                                 ("LOWBIT_CUDA_WOQ_BLOCKS=6", 12, 10)])
def test_cuda_plan_fills_the_blocks_the_kernel_keeps_resident(var, splits, splits16, monkeypatch):
    """The K split fills one wave of the resident blocks of the kernel the call will run: 4 per SM
    by default; 6 or 8 for the M <= 8 kernel with more warps (LOWBIT_CUDA_WOQ_BLOCKS; then M =
    9-16 on 5), 8 with two column tiles per warp (LOWBIT_CUDA_WOQ_TILES=2, 8 blocks of 2 warps,
    M <= 16), read per call. At 4096 x 11008 on 132 SMs: 64 column blocks, so
    132 * 4 / 64 -> 8 splits, or 10, 12, 16."""
    mod = built_cuda_module()
    f16, f32 = _native.DTYPE_CODE[torch.float16], _native.DTYPE_CODE[torch.float32]
    plans = {M: mod.int4_w4a16_plan(M, 11008, 4096, f16, f32, 132, -1) for M in (1, 16, 17)}
    assert plans[1] == plans[16] == (8, 64)
    name, value = var.split("=")
    monkeypatch.setenv(name, value)
    assert mod.int4_w4a16_plan(1, 11008, 4096, f16, f32, 132, -1) == (splits, 64)
    assert mod.int4_w4a16_plan(16, 11008, 4096, f16, f32, 132, -1) == (splits16, 64)
    assert mod.int4_w4a16_plan(17, 11008, 4096, f16, f32, 132, -1) == plans[17]  # M > 16: the default kernel
    code = _native.DTYPE_CODE[torch.bfloat16]
    assert mod.int8_w8a16_plan(1, 11008, 4096, code, 132, -1) == (splits, 64)  # W8A16's kernel alike


def test_cuda_plan_cluster_reduce(monkeypatch):
    """LOWBIT_CUDA_WOQ_REDUCE=cluster (M <= 16, an experiment): the blocks of a K split form one
    thread-block cluster and add their sums through distributed shared memory, so the plan makes
    at most 8 splits (the portable cluster size) and asks for no counters; M > 16 plans as by
    default. W8A16's decode kernel alike."""
    mod = built_cuda_module()
    f16 = _native.DTYPE_CODE[torch.float16]
    default = {(M, N): mod.int4_w4a16_plan(M, 11008, N, f16, f16, 132, -1) for M in (1, 16, 17) for N in (4096, 1024)}
    monkeypatch.setenv("LOWBIT_CUDA_WOQ_REDUCE", "cluster")
    for M in (1, 16):
        assert mod.int4_w4a16_plan(M, 11008, 4096, f16, f16, 132, -1) == (default[M, 4096][0], 0) == (8, 0)
        assert default[M, 1024] == (16, 16) and mod.int4_w4a16_plan(M, 11008, 1024, f16, f16, 132, -1) == (8, 0)
        assert mod.int8_w8a16_plan(M, 11008, 1024, f16, 132, -1) == (8, 0)
    assert mod.int4_w4a16_plan(17, 11008, 4096, f16, f16, 132, -1) == default[17, 4096]
    assert mod.int4_w4a16_plan(1, 64, 16, f16, f16, 132, -1) == (1, 0)  # one k tile: nothing to split


def test_cuda_layout_checked_by_the_fake_impl():
    """The validation the CUDA op runs, exercised without a GPU through the fake impl on fake
    CUDA tensors (what torch.compile traces): shapes, dtypes and mins of the CUDA layout."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = torch.ops.lowbit.int4_linear_w4a16
    with FakeTensorMode():
        try:
            x = torch.empty(3, 256, dtype=torch.float16, device="cuda")
        except RuntimeError as e:
            pytest.skip(f"this torch cannot make fake CUDA tensors: {e}")
        q = torch.empty(fmt.packed_cuda_shape(100, 256), dtype=torch.int32, device="cuda")

        def table(groups, n=112, dtype=torch.float16):
            return torch.empty(groups, n, 2, dtype=dtype, device="cuda")

        y = op(x, q, table(2), None, 100)
        assert y.shape == (3, 100) and y.dtype == torch.float16 and y.device.type == "cuda"
        assert op(x, q, table(1), None, 100).shape == (3, 100)          # per channel
        with pytest.raises(ValueError, match="3 groups, which does not divide K=256"):
            op(x, q, table(3), None, 100)
        with pytest.raises(ValueError, match=r"must have shape \(2, 112, 2\)"):
            op(x, q, table(2, n=96), None, 100)
        with pytest.raises(TypeError, match="float16 or float32"):
            op(x, q, table(2, dtype=torch.bfloat16), None, 100)
        with pytest.raises(ValueError, match="mins must be None on CUDA"):
            op(x, q, table(2), table(2), 100)
        with pytest.raises(ValueError, match="qweight"):
            op(x, torch.empty(7, 5, 32, 4, dtype=torch.int32, device="cuda"), table(2), None, 100)
        with pytest.raises(TypeError, match="qweight"):
            op(x, q.to(torch.uint8), table(2), None, 100)
        # the kernels' 32-bit offsets: K (a lane's k), groups x roundup(N, 16) (the scale table)
        big = 2**31
        xb = torch.empty(1, big, dtype=torch.float16, device="cuda")
        qb = torch.empty(fmt.packed_cuda_shape(16, big), dtype=torch.int32, device="cuda")
        with pytest.raises(ValueError, match="K must be at most 2147483583"):
            op(xb, qb, table(1, n=16), None, 16)
        xg = torch.empty(1, 2**17, dtype=torch.float16, device="cuda")
        n = 2**19  # groups of 32: 2^12 groups x 2^19 columns = 2^31 pairs
        qg = torch.empty(fmt.packed_cuda_shape(n, 2**17), dtype=torch.int32, device="cuda")
        with pytest.raises(ValueError, match="groups x roundup"):
            op(xg, qg, table(2**12, n=n), None, n)


def test_w4a8_on_cuda_is_refused_clearly():
    """W4A8 has no CUDA kernel: the op says so (the fake impl still traces)."""
    with pytest.raises(NotImplementedError, match="CPU only"):
        int4_ops.linear_w4a8_cuda(None, None, None, None, 1)


# ---------------------------------------------------------------- GPU
def poison_allocator(*nbytes):
    bufs = [torch.full((max(int(n), 1),), -1, dtype=torch.int8, device="cuda") for n in nbytes]
    del bufs


def check(dtype, M, N, K, g, symmetric, gen, bias=True, scale_dtype=torch.float16, x=None):
    codes, d, m = rand_canonical(N, K, g, symmetric, gen, scale_dtype=scale_dtype)
    q, table = (t.cuda() for t in fmt.pack_cuda(codes, d, m))
    if x is None:
        x = torch.randn((M, K), generator=gen).to(dtype).cuda()
    b = (torch.randn((N,), generator=gen) * 0.1).to(dtype).cuda() if bias else None
    poison_allocator(M * N * 2, 16 * M * N * 4)
    y = w4a16(x, q, table, None, N, b)
    w64 = ref.int4.dequantize_int4(codes, d, m).double().cuda()
    y64 = x.double() @ w64.T + (0 if b is None else b.double())
    theirs = F.linear(x, w64.to(dtype), b)
    what = f"{DT_ID[dtype]} M={M} N={N} K={K} g={g} {'sym' if symmetric else 'asym'}"
    assert y.dtype == dtype and y.shape == y64.shape, what
    assert bool(torch.isfinite(y).all()), f"{what}: NaN/Inf outputs (unwritten?)"
    err = (y.double() - y64).abs().max().item()
    top = y64.abs().max().item()
    tol = TOL[dtype] * (theirs.double() - y64).abs().max().item() + torch.finfo(dtype).eps * top
    assert err <= tol, f"{what}: max abs err {err:.3e} > {tol:.3e} (max |ref| {top:.3e})"
    return y


# M <= 16 takes the swapped product (one or two blocks of 8 rows), M = 17-48 the m16-tile kernel,
# M > 48 the dense path (ops/int8.py DENSE_MIN_M): a dequantization kernel, then cuBLAS
SMALL = [(1, 16, 64, 64), (3, 24, 96, 32), (1, 40, 100, 100), (17, 48, 128, 128), (5, 8, 320, 64),
         (9, 24, 96, 32), (12, 40, 100, 100), (16, 8, 320, 64),
         (40, 20, 192, 64), (129, 24, 98, 98), (160, 20, 192, 64)]
LARGE = [(1, 4096, 4096, 128), (16, 4096, 11008, 128), (1, 11008, 4096, 32), (33, 1000, 2048, 64),
         (64, 512, 4096, 128), (65, 300, 1024, 32), (200, 256, 512, 64)]
# ids name the size class: the small ones run under compute-sanitizer (-k small)
SHAPES = [pytest.param(*c, id=f"{size}-M{c[0]}-N{c[1]}-K{c[2]}-g{c[3]}")
          for size, cases in (("small", SMALL), ("large", LARGE)) for c in cases]


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_ids)
@pytest.mark.parametrize("M,N,K,g", SHAPES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_w4a16(dtype, M, N, K, g, symmetric, gen):
    check(dtype, M, N, K, g, symmetric, gen)


@gpu
@pytest.mark.parametrize("M", [1, 2048])
def test_w4a16_per_channel_fp32_scales_nobias(M, gen):
    check(torch.float16, M, 96, 192, 192, False, gen, bias=False, scale_dtype=torch.float32)


@gpu
def test_w4a16_wider_than_the_dense_path(gen):
    """N past the dense path's dequantization grid (65535 tiles of 16 columns): a large M runs on
    the tensor-core kernel instead, correct all the same."""
    check(torch.float16, 49, int4_ops.DEQUANT_MAX_N + 24, 64, 64, False, gen)


@gpu
def test_w4a16_strided_and_misaligned_x_small(gen):
    """A column slice (rows ldx apart) and an x whose data is 2-byte but not 16-byte aligned."""
    big = torch.randn((5, 300), generator=gen).half().cuda()
    check(torch.float16, 5, 24, 256, 64, False, gen, x=big[:, 3:259])
    flat = torch.randn(1 + 2 * 128, generator=gen).half().cuda()
    check(torch.float16, 2, 16, 128, 32, True, gen, x=flat[1:].view(2, 128))


# The opt-in decode kernels: two column tiles per warp (M <= 16), and 6 or 8 resident blocks per SM
# (M <= 8; 5 at M = 9-16).
DECODE_SWITCHES = [pytest.param("LOWBIT_CUDA_WOQ_TILES", "2", id="tiles2"),
                   pytest.param("LOWBIT_CUDA_WOQ_BLOCKS", "6", id="blocks6"),
                   pytest.param("LOWBIT_CUDA_WOQ_BLOCKS", "8", id="blocks8")]


@gpu
@pytest.mark.parametrize("var,value", DECODE_SWITCHES)
@pytest.mark.parametrize("M,N,K,g", [(1, 4096, 4096, 128), (8, 4096, 11008, 32), (5, 40, 100, 100),
                                     (3, 48, 2048, 64), (1, 11008, 4096, 4096), (2, 24, 192, 192),
                                     (16, 4096, 4096, 128), (11, 40, 100, 100)])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32], ids=["s16", "s32"])
def test_w4a16_opt_in_decode_kernels_agree(var, value, M, N, K, g, scale_dtype, gen, monkeypatch):
    """The opt-in decode kernels give the default kernel's bits at its K split (the same sums in
    the same order), and their own plan's results match the reference (check()): K splits,
    groups of 32, ragged K, odd counts of 16-column tiles (N = 40, 48: with two tiles per warp, a
    warp's second tile past the last), per-channel and fp32 scales.
    * LOWBIT_CUDA_WOQ_TILES=2: each warp takes two column tiles, sharing activation loads and
      ring waits (M = 11, 16: with two blocks of 8 rows of x);
    * LOWBIT_CUDA_WOQ_BLOCKS=6 / 8: the one-tile kernel in 80 / 64 registers, 6 / 8 blocks
      resident per SM, and M = 9-16 on 5 (their plans split K more finely)."""
    mod = built_cuda_module()
    codes, d, m = rand_canonical(N, K, g, False, gen, scale_dtype=scale_dtype)
    q, table = (t.cuda() for t in fmt.pack_cuda(codes, d, m))
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn((M, K), generator=gen).to(dtype).cuda()
        y = w4a16(x, q, table, None, N)
        monkeypatch.setenv(var, value)
        with monkeypatch.context() as mp:
            mp.setattr(mod, "int4_w4a16_plan", default_plan(mod.int4_w4a16_plan, var))
            assert torch.equal(w4a16(x, q, table, None, N), y), dtype
        monkeypatch.delenv(var)
    monkeypatch.setenv(var, value)
    check(torch.bfloat16 if M % 2 else torch.float16, M, N, K, g, M % 3 == 0, gen, scale_dtype=scale_dtype)


@gpu
@pytest.mark.parametrize("M,N,K,g", [(1, 4096, 4096, 128), (16, 4096, 11008, 64), (3, 11008, 4096, 32),
                                     (1, 1024, 11008, 128), (11, 40, 2048, 2048), (2, 24, 192, 192)])
def test_w4a16_cluster_reduce_agrees(M, N, K, g, gen, monkeypatch):
    """LOWBIT_CUDA_WOQ_REDUCE=cluster (an experiment; sm_90a, else the default runs): the K split
    adds its partial sums through a cluster's shared memory in split order, as the counter path
    adds them from global memory: the same bits at the same split (up to 8), the reference's
    results at its own plan (at most 8 splits where the default makes 16: N = 1024, 40, 24), and
    in a CUDA graph, whose replays need no zeroed counters."""
    mod = built_cuda_module()
    codes, d, m = rand_canonical(N, K, g, False, gen)
    q, table = (t.cuda() for t in fmt.pack_cuda(codes, d, m))
    x = torch.randn((M, K), generator=gen).half().cuda()
    y = w4a16(x, q, table, None, N)
    default_splits = mod.int4_w4a16_plan(M, K, N, _native.DTYPE_CODE[torch.float16], _native.DTYPE_CODE[table.dtype],
                                         _native.sm_count(x.device), x.device.index)[0]
    monkeypatch.setenv("LOWBIT_CUDA_WOQ_REDUCE", "cluster")
    if default_splits <= 8:
        with monkeypatch.context() as mp:
            mp.setattr(mod, "int4_w4a16_plan", default_plan(mod.int4_w4a16_plan, "LOWBIT_CUDA_WOQ_REDUCE"))
            assert torch.equal(w4a16(x, q, table, None, N), y)
    check(torch.bfloat16 if M % 2 else torch.float16, M, N, K, g, False, gen)
    g_, y_graph = capture_graph(lambda: w4a16(x, q, table, None, N))
    x_new = torch.randn((M, K), generator=gen).half().cuda()
    x.copy_(x_new)
    g_.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_graph, w4a16(x_new, q, table, None, N)), "graph replay differs from eager"


@gpu
def test_w4a16_deterministic_small(gen):
    """The K split adds partial sums in a fixed order: repeated calls agree bitwise."""
    codes, d, m = rand_canonical(4096, 4096, 128, False, gen)
    q, table = (t.cuda() for t in fmt.pack_cuda(codes, d, m))
    x = torch.randn((3, 4096), generator=gen).half().cuda()
    ys = [w4a16(x, q, table, None, 4096) for _ in range(5)]
    assert all(torch.equal(ys[0], y) for y in ys[1:])


@gpu
def test_w4a16_bad_input_small(gen):
    codes, d, m = rand_canonical(32, 64, 32, False, gen)
    q, table = (t.cuda() for t in fmt.pack_cuda(codes, d, m))
    x = torch.randn((2, 64)).half().cuda()
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        w4a16(x.float(), q, table, None, 32)
    with pytest.raises(ValueError, match="mins must be None on CUDA"):
        w4a16(x, q, table, table, 32)
    with pytest.raises(ValueError, match="K=32"):
        w4a16(x[:, :32], q, table, None, 32)
    with pytest.raises(ValueError, match="qweight"):
        w4a16(x, q[:1], table, None, 32)
    with pytest.raises(ValueError, match="x is on cpu"):
        w4a16(x.cpu(), q, table, None, 32)
    with pytest.raises(ValueError, match="scales"):
        w4a16(x, q, table[:, :16], None, 32)
    # views that start mid-way: the kernels copy 16-byte words and whole (d, m) pairs
    flat_q = torch.empty(q.numel() + 1, dtype=torch.int32, device="cuda")
    flat_q[1:] = q.flatten()
    with pytest.raises(ValueError, match="16-byte aligned"):
        w4a16(x, flat_q[1:].view(q.shape), table, None, 32)
    flat_t = torch.empty(table.numel() + 1, dtype=table.dtype, device="cuda")
    flat_t[1:] = table.flatten()
    with pytest.raises(ValueError, match="4-byte aligned"):
        w4a16(x, q, flat_t[1:].view(table.shape), None, 32)


@gpu
def test_w4a16_x_without_rows_small(gen):
    """M = 0 gives an empty y [..., 0, N] on x's device without a launch (a graph captures
    nothing for it); the arguments are still checked."""
    codes, d, m = rand_canonical(32, 64, 32, False, gen)
    q, table = (t.cuda() for t in fmt.pack_cuda(codes, d, m))
    for shape in ((0, 64), (3, 0, 64)):
        for dtype in (torch.float16, torch.bfloat16):
            y = w4a16(torch.empty(shape, dtype=dtype, device="cuda"), q, table, None, 32)
            assert y.shape == (*shape[:-1], 32) and y.dtype == dtype and y.device == q.device
    x = torch.empty(0, 64, dtype=torch.float16, device="cuda")
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        w4a16(x.float(), q, table, None, 32)
    with pytest.raises(ValueError, match="K=32"):
        w4a16(x[:, :32], q, table, None, 32)
    with pytest.raises(ValueError, match="x is on cpu"):
        w4a16(x.cpu(), q, table, None, 32)


@gpu
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_module_cuda_round_trip(symmetric, gen):
    """Int4Linear.cuda() converts to the CUDA layout and .cpu() restores the CPU layout exactly;
    CPU and CUDA results agree (fp16 on CUDA vs fp32 on CPU, to fp16 accuracy)."""
    lin = torch.nn.Linear(256, 200)
    m_cpu = Int4Linear.from_float(lin, group_size=64, symmetric=symmetric)
    sd = {k: v.clone() for k, v in m_cpu.state_dict().items()}
    m_gpu = Int4Linear.from_float(lin, group_size=64, symmetric=symmetric).cuda().half()
    assert m_gpu.qweight.dtype == torch.int32 and m_gpu.mins is None
    x = torch.randn(7, 256, generator=gen)
    y_cpu = m_cpu(x)
    y_gpu = m_gpu(x.half().cuda()).float().cpu()
    assert (y_gpu - y_cpu).abs().max() <= 2e-3 * y_cpu.abs().max() + 1e-3
    back = m_gpu.cpu()
    got = back.state_dict()
    for key in ("qweight", "scales", "mins"):
        assert (key in got) == (key in sd), key
        if key in sd:
            assert got[key].dtype == sd[key].dtype and torch.equal(got[key], sd[key]), key
    assert torch.equal(back.qweight, m_cpu.qweight)


@gpu
@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_module_autocast_small(low, gen):
    """An fp32 model under torch.autocast("cuda"): Int4Linear takes x in autocast's dtype (the
    tensor-core kernel takes no fp32 x: without autocast that is a TypeError), as nn.Linear
    does; the same bits as casting x by hand."""
    m = Int4Linear.from_float(torch.nn.Linear(128, 48), group_size=32).cuda()
    x = torch.randn(3, 128, generator=gen).cuda()
    want = m(x.to(low))
    with torch.autocast("cuda", dtype=low):
        got = m(x)
    assert got.dtype == low and torch.equal(got, want)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        m(x)


@gpu
def test_module_eager_path_matches_the_op_small(gen):
    """The module's eager CUDA path (x checked, then the op's launch code) gives the op's bits, on a
    split K, the decode kernel and the dense path, and refuses bad x as the op does."""
    for n, k, m in ((64, 1024, 1), (48, 128, 5), (40, 256, 60)):
        mod = Int4Linear.from_float(torch.nn.Linear(k, n), group_size=64).cuda()
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(m, k, generator=gen).to(dtype).cuda()
            assert torch.equal(mod(x), w4a16(x, mod.qweight, mod.scales, None, n, mod.bias))
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        mod(torch.randn(2, k, device="cuda"))
    with pytest.raises(ValueError, match="K="):
        mod(torch.randn(2, k + 1, device="cuda").half())


@gpu
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_module_gradient_small(symmetric, gen):
    """x's gradient through a CUDA Int4Linear: grad_y . W with the weight it multiplies by (the
    CUDA table's pairs dequantized, the same weight as the CPU module's)."""
    m = Int4Linear.from_float(torch.nn.Linear(128, 48), group_size=32, symmetric=symmetric)
    w = m.dequantized_weight()
    m = m.cuda()
    x = torch.randn(2, 3, 128, generator=gen).half().cuda().requires_grad_()
    g = torch.randn(2, 3, 48, generator=gen).half().cuda()
    m(x).backward(g)
    want = g @ w.cuda().half()  # (symmetric: the table's d * q + m may round apart from d * (q - 8) in fp32)
    torch.testing.assert_close(x.grad, want, rtol=4e-3, atol=4e-3 * want.abs().max().item())


@gpu
def test_act_order_module_small(gen):
    """Int4ActOrderLinear on CUDA: .cuda() moves perm with the layer; the same product as the CPU
    module, to fp16 accuracy."""
    perm = torch.randperm(128, generator=gen)
    m_cpu = Int4ActOrderLinear(Int4Linear.from_float(torch.nn.Linear(128, 48), group_size=32), perm)
    x = torch.randn(3, 128, generator=gen)
    y_cpu = m_cpu(x)
    m_gpu = copy.deepcopy(m_cpu).cuda().half()
    assert m_gpu.perm.is_cuda and m_gpu.inner.qweight.is_cuda
    y = m_gpu(x.half().cuda()).float().cpu()
    assert (y - y_cpu).abs().max() <= 2e-3 * y_cpu.abs().max() + 1e-3


@gpu
def test_quantize_model_cuda(gen):
    """lowbit.quantize on a CUDA model: Int4Linear in the CUDA layout, computing with exactly the
    weights it quantized to (compared with the float model holding the dequantized weights)."""
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.SiLU(), torch.nn.Linear(256, 64)).cuda()
    x = torch.randn(4, 128, generator=gen).cuda()
    lowbit.quantize(model, "w4a16", group_size=32)
    assert isinstance(model[0], Int4Linear) and model[0].qweight.device.type == "cuda"
    deq = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.SiLU(), torch.nn.Linear(256, 64)).cuda()
    for i in (0, 2):
        deq[i].weight.data = model[i].dequantized_weight().cuda()
        deq[i].bias.data = model[i].bias.float()
    want = deq(x)
    got = model.half()(x.half()).float()
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()


@gpu
def test_non_default_stream(gen):
    codes, d, m = rand_canonical(4096, 4096, 128, True, gen)
    q, table = (t.cuda() for t in fmt.pack_cuda(codes, d, m))
    src = torch.randn((4, 4096), generator=gen).half().cuda()
    want = w4a16(src, q, table, None, 4096)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x = torch.empty_like(src)
        torch.cuda._sleep(50_000_000)
        x.copy_(src)
        y = w4a16(x, q, table, None, 4096)
    stream.synchronize()
    assert torch.equal(y, want)


@gpu
@pytest.mark.parametrize("M", [1, 16])
def test_cuda_graph_shared_counters_small(M, gen, monkeypatch):
    """LOWBIT_CUDA_GRAPH_COUNTERS=shared (an experiment): calls captured in a CUDA graph share the
    device's K-split counters (zeroed by an eager call under the switch before the capture)
    instead of zeroing a fresh buffer in the graph per call. Two W4A16 and one W8A16 call with K splits in one graph,
    replayed with fresh x: the eager results, and the counters left at zero."""
    from lowbit.ops import int8 as int8_ops

    N, K = 4096, 4096
    codes, d, m = rand_canonical(N, K, 128, False, gen)
    q, table = (t.cuda() for t in fmt.pack_cuda(codes, d, m))
    q8, s8 = ref.int8.quantize_weight_per_channel(torch.randn(N, K, generator=gen).cuda() * 0.02)
    x = torch.randn((M, K), generator=gen).half().cuda()
    monkeypatch.setenv("LOWBIT_CUDA_GRAPH_COUNTERS", "shared")
    w4a16(x, q, table, None, N)  # eager: the device's shared counters exist
    shared = int8_ops._graph_counters[x.device.index]
    captured = []  # the counters each captured call was given

    def spy(counters):
        def given(*args):
            buf = counters(*args)
            if torch.cuda.is_current_stream_capturing():
                captured.append(buf.data_ptr())
            return buf
        return given

    monkeypatch.setattr(int8_ops, "cuda_counters", spy(int8_ops.cuda_counters))
    monkeypatch.setattr(int4_ops, "cuda_counters", spy(int4_ops.cuda_counters))
    g, ys = capture_graph(lambda: (w4a16(x, q, table, None, N), w4a16(x, q, table, None, N),
                                   int8_ops.int8_linear_w8a16(x, q8, s8)))
    assert captured == [shared.data_ptr()] * 3, "a captured call did not take the shared counters"
    for _ in range(3):
        x_new = torch.randn((M, K), generator=gen).half().cuda()
        x.copy_(x_new)
        g.replay()
        torch.cuda.synchronize()
        want = w4a16(x_new, q, table, None, N)
        assert torch.equal(ys[0], want) and torch.equal(ys[1], want), "W4A16 replay differs from eager"
        assert torch.equal(ys[2], int8_ops.int8_linear_w8a16(x_new, q8, s8)), "W8A16 replay differs from eager"
        assert not shared.any(), "the shared counters were not left at zero"


@gpu
@pytest.mark.parametrize("n,k", [(384, 256), (4096, 4096)])  # without and with a K split
def test_cuda_graph_capture(n, k, gen):
    m = Int4Linear.from_float(torch.nn.Linear(k, n).cuda(), group_size=128).half()
    x = torch.randn((2, k), generator=gen).half().cuda()
    g, (y, y2) = capture_graph(lambda: (m(x), m(x)))
    for _ in range(3):
        x_new = torch.randn((2, k), generator=gen).half().cuda()
        x.copy_(x_new)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, m(x_new)) and torch.equal(y2, y), "graph replay differs from eager"

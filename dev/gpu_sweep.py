#!/usr/bin/env python3
"""Design-space sweep on a GPU (a developer tool, not part of gpu_check): times the CUDA
kernels with their launch plan forced to other values than the shipped plan picks, and the
paged decode with sequential instead of random block tables, so that a tuning decision rests
on one run's numbers. Prints one line per measurement.

    python3 dev/gpu_sweep.py [decode] [layout] [woq] [dense] [dequant] [w8a8] | profile
    (from the checkout, lowbit installed)

decode: paged decode (Hq 32, Hkv 8, D 128, block 16) at batch x tokens in {8, 64} x {4k, 32k},
        bf16 / INT8 cache, random tables: the plan's key splits with the merge launched to overlap
        the split kernel (LOWBIT_CUDA_PDL) or not, half the splits, and 4 resident blocks per SM
        instead of 2 (LOWBIT_CUDA_DECODE_RESIDENT).
layout: the same decode bytes as 8 interleaved kv heads or as 1 (does the paged layout cost?).
woq:    the fixed cost per call (a one-element fill; fp16 F.linear, W4A16, W8A16 on 128 x 128), then
        W4A16 and W8A16 at M in {1, 16} on 4096 x 11008 and 11008 x 4096, K splits forced, and the
        plan's splits with two column tiles per warp (LOWBIT_CUDA_WOQ_TILES=2), with 6 or
        8 resident blocks per SM (M = 1; 6 means 5 at M = 16; LOWBIT_CUDA_WOQ_BLOCKS=6|8) and on W8A16's bulk-copy ring
        (LOWBIT_CUDA_WOQ_COPY=bulk), and with the K split adding up in a cluster
        (LOWBIT_CUDA_WOQ_REDUCE=cluster).
dense:  W4A16 and W8A16 at M = 32 .. 256, tensor-core kernel vs dequantize + cuBLAS.
dequant: the dense path's dequantization kernels alone (GB/s read + written).
w8a8:   W8A8 by default (the TMA kernel or mma.sync, by shape), on mma.sync, on the TMA kernel,
        on the TMA kernel in clusters of two and of four (LOWBIT_CUDA_W8A8=cluster / cluster4), by
        default again, and its quantizer alone (both kernels; and W8A8 by default with
        LOWBIT_CUDA_QUANT=vec), at M in {512, 1024, 2048, 4096}.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from gpu_matmul import ROTATE_BYTES, env_var, measure_copy_bw, time_per_call, w4_weights  # noqa: E402

from lowbit import _native, ops, ref  # noqa: E402
from lowbit.ops import int4 as int4_ops  # noqa: E402
from lowbit.ops import int8 as int8_ops  # noqa: E402

REPS = 15
MOD = _native.cuda_module()


def force_plan(name: str, splits_of):
    """Replaces MOD.<name> (a plan function returning (splits, n)) by one whose splits are
    splits_of(original splits, *args); n is recomputed by the caller's rule."""
    orig = getattr(MOD, name)

    def plan(*args):
        s, n = orig(*args)
        want = max(1, splits_of(s, *args))
        if name == "attention_plan":
            tokens, hq, _, _, dv = args[:5]
            return want, (tokens * hq * want * (dv + 2) if want > 1 else 0)
        n_cols = args[2]
        col_blocks = -(-(-(-n_cols // 16)) // 4)  # cdiv(cdiv(N, 16), 4); M <= 16: one m block
        return want, (col_blocks if want > 1 else 0)
    setattr(MOD, name, plan)
    return orig


def decode(copy_bw: float) -> None:
    hq, hkv, D, bs = 32, 8, 128, 16
    for B, S in ((8, 4096), (8, 32768), (64, 4096), (64, 32768)):
        nblk = S // bs
        bytes_bf16 = B * S * hkv * D * 2 * 2
        nbuf = max(1, math.ceil(ROTATE_BYTES / bytes_bf16))
        nb = nbuf * B * nblk
        kc = torch.randn(nb, bs, hkv, D, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        kc8 = torch.empty(nb, bs, hkv, D, device="cuda", dtype=torch.int8)
        vc8 = torch.empty_like(kc8)
        ks, vs = torch.empty(nb, bs, hkv, device="cuda"), torch.empty(nb, bs, hkv, device="cuda")
        ops.reshape_and_cache(kc.view(-1, hkv, D), vc.view(-1, hkv, D), kc8, vc8, torch.arange(nb * bs, device="cuda"),
                              ks, vs)
        q = torch.randn(B, hq, D, device="cuda", dtype=torch.bfloat16)
        seq = torch.full((B,), S, dtype=torch.int32, device="cuda")
        perm = torch.randperm(nb, device="cuda").to(torch.int32)
        tables = [perm[i * B * nblk:(i + 1) * B * nblk].view(B, nblk).contiguous() for i in range(nbuf)]
        for factor, pdl, resident in ((1, "1", "2"), (1, "0", "2"), (0.5, "1", "2"), (1, "1", "4")):
            orig = force_plan("attention_plan", lambda s, *a: int(s * factor))
            try:
                for cache in ("bf16", "int8"):
                    if cache == "bf16":
                        def make(i):
                            return lambda: ops.paged_attention(q, kc, vc, tables[i], seq)
                        nbytes = bytes_bf16
                    else:
                        def make(i):
                            return lambda: ops.paged_attention(q, kc8, vc8, tables[i], seq, k_scale=ks, v_scale=vs)
                        nbytes = bytes_bf16 // 2 + B * S * hkv * 4 * 2
                    with env_var("LOWBIT_CUDA_PDL", pdl), env_var("LOWBIT_CUDA_DECODE_RESIDENT", resident):
                        us = time_per_call(make, nbuf, REPS)
                    s0 = orig(B, hq, hkv, S, D, _native.sm_count(q.device))[0]
                    print(f"decode B={B} S={S} {cache} splits={max(1, int(s0 * factor))} (plan {s0}) "
                          f"merge overlap={pdl} resident={resident}/SM: {us:.1f} us, "
                          f"{100 * nbytes / (us * 1e3) / copy_bw:.0f}% copy BW",
                          flush=True)
            finally:
                setattr(MOD, "attention_plan", orig)
        torch.cuda.empty_cache()


def decode_layout(copy_bw: float) -> None:
    """Whether the paged layout's interleaving of kv heads costs bandwidth: the same bytes and
    the same 64 (sequence, kv head) streams, as batch 8 x 8 kv heads (a head's 16-token block
    is 16 pieces of 256 bytes, 2 KB apart) and as batch 64 x 1 kv head (one 4 KB piece), bf16,
    32k tokens, sequential tables. If the second is clearly faster, a CTA that reads every kv
    head of its tokens together is worth building."""
    D, bs, S = 128, 16, 32768
    for B, hkv in ((8, 8), (64, 1)):
        nb = B * S // bs
        kc = torch.randn(nb, bs, hkv, D, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        tab = torch.arange(nb, device="cuda", dtype=torch.int32).view(B, S // bs)
        q = torch.randn(B, 8 * hkv, D, device="cuda", dtype=torch.bfloat16)
        seq = torch.full((B,), S, dtype=torch.int32, device="cuda")
        us = time_per_call(lambda i: (lambda: ops.paged_attention(q, kc, vc, tab, seq)), 1, REPS)
        nbytes = 2 * kc.numel() * 2
        print(f"decode layout B={B} Hkv={hkv} Hq={8 * hkv} S={S}: {us:.1f} us, "
              f"{100 * nbytes / (us * 1e3) / copy_bw:.0f}% copy BW", flush=True)
        torch.cuda.empty_cache()


def woq() -> None:
    # The fixed cost of a call, apart from its bytes: a one-element fill (the graph's own floor
    # per kernel), then fp16 F.linear and W4A16 / W8A16 on a 128 x 128 weight (nothing to stream).
    t = torch.zeros(1, device="cuda")
    print(f"woq fixed: one-element fill {time_per_call(lambda i: t.zero_, 1, REPS):.1f} us", flush=True)
    x, w16 = torch.randn(1, 128, device="cuda", dtype=torch.float16), torch.randn(128, 128, device="cuda").half()
    w4, w8 = w4_weights(128, 128), ref.int8.quantize_weight_per_channel(w16.float())
    for name, call in (("torch fp16", lambda: F.linear(x, w16)),
                       ("w4a16", lambda: int4_ops.int4_linear_w4a16(x, *w4, None, 128)),
                       ("w8a16", lambda: int8_ops.int8_linear_w8a16(x, *w8))):
        print(f"woq fixed: {name} 128x128 M=1 {time_per_call(lambda i: call, 1, REPS):.1f} us", flush=True)
    # ... and with the plan's K split (16 splits of 4 tiles: the partial sums, the counters, the
    # last block's reduction), still almost no bytes
    xk, w4k = torch.randn(1, 4096, device="cuda", dtype=torch.float16), w4_weights(128, 4096)
    f16 = _native.DTYPE_CODE[torch.float16]
    splits = MOD.int4_w4a16_plan(1, 4096, 128, f16, f16, _native.sm_count(xk.device), xk.device.index)[0]
    us = time_per_call(lambda i: (lambda: int4_ops.int4_linear_w4a16(xk, *w4k, None, 128)), 1, REPS)
    print(f"woq fixed: w4a16 128x4096 M=1 ({splits} K splits) {us:.1f} us", flush=True)
    for N, K in ((4096, 11008), (11008, 4096)):
        nbuf4 = max(2, -(-ROTATE_BYTES // (N * K // 2)))
        w4s = [w4_weights(N, K) for _ in range(nbuf4)]
        nbuf8 = max(2, -(-ROTATE_BYTES // (N * K)))
        w8s = [ref.int8.quantize_weight_per_channel(torch.randn(N, K, device="cuda") * 0.02) for _ in range(nbuf8)]
        w16 = [torch.randn(N, K, device="cuda", dtype=torch.float16) for _ in range(max(2, nbuf8 // 2))]
        for M in (1, 16):
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            base = time_per_call(lambda i: (lambda: F.linear(x, w16[i])), len(w16), REPS)
            print(f"woq {N}x{K} M={M} torch fp16: {base:.1f} us", flush=True)
            for name, plan, make, nbuf in (
                    ("w4a16", "int4_w4a16_plan", lambda i: (lambda: int4_ops.int4_linear_w4a16(x, w4s[i][0], w4s[i][1],
                                                                                            None, N)), nbuf4),
                    ("w8a16", "int8_w8a16_plan", lambda i: (lambda: int8_ops.int8_linear_w8a16(x, *w8s[i])), nbuf8)):
                for forced in (None, 1, 2, 4, 8, 12, 16):
                    orig = force_plan(plan, (lambda s, *a: s) if forced is None else (lambda s, *a: forced))
                    try:
                        us = time_per_call(make, nbuf, REPS)
                    except Exception as e:  # noqa: BLE001 - a split the kernel refuses
                        print(f"woq {N}x{K} M={M} {name} splits={forced}: {type(e).__name__}: {e}", flush=True)
                        continue
                    finally:
                        setattr(MOD, plan, orig)
                    print(f"woq {N}x{K} M={M} {name} splits={'plan' if forced is None else forced}: {us:.1f} us, "
                          f"{base / us:.2f}x fp16", flush=True)
                # the plan's splits with two column tiles per warp, 6 or 8 resident blocks per SM
                # (M <= 8; 5 at M = 9-16), adding up in a cluster, on W8A16's bulk-copy ring
                configs = [("LOWBIT_CUDA_WOQ_TILES", "2", "two tiles per warp"),
                           ("LOWBIT_CUDA_WOQ_BLOCKS", "6", "6 blocks per SM" if M <= 8 else "5 blocks per SM")]
                if M <= 8:
                    configs.append(("LOWBIT_CUDA_WOQ_BLOCKS", "8", "8 blocks per SM"))
                configs.append(("LOWBIT_CUDA_WOQ_REDUCE", "cluster", "K split adds up in a cluster"))
                if name == "w8a16":
                    configs.append(("LOWBIT_CUDA_WOQ_COPY", "bulk", "bulk copies"))
                for var, value, what in configs:
                    try:
                        with env_var(var, value):
                            us = time_per_call(make, nbuf, REPS)
                    except Exception as e:  # noqa: BLE001 - an opt-in kernel failing: record and go on
                        print(f"woq {N}x{K} M={M} {name} {what}: {type(e).__name__}: {e}", flush=True)
                        continue
                    print(f"woq {N}x{K} M={M} {name} {what}: {us:.1f} us, {base / us:.2f}x fp16", flush=True)
        torch.cuda.empty_cache()


def dense() -> None:
    """Where the weight-only layers should switch to the dense path (ops/int8.py DENSE_MIN_M):
    W4A16 and W8A16 at M in 32 .. 256 through the tensor-core kernel and through dequantize +
    cuBLAS, forced by moving the threshold."""
    for N, K in ((4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)):
        w4 = w4_weights(N, K)
        w8 = ref.int8.quantize_weight_per_channel(torch.randn(N, K, device="cuda") * 0.02)
        for M in (32, 64, 96, 128, 192, 256):
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            line = f"dense {N}x{K} M={M}:"
            for name, call in (("w4a16", lambda: int4_ops.int4_linear_w4a16(x, *w4, None, N)),
                               ("w8a16", lambda: int8_ops.int8_linear_w8a16(x, *w8))):
                for path, threshold in (("kernel", 1 << 30), ("dense", 0)):
                    saved = int8_ops.DENSE_MIN_M
                    int8_ops.DENSE_MIN_M = int4_ops.DENSE_MIN_M = threshold
                    try:
                        us = time_per_call(lambda i: call, 1, REPS)
                    finally:
                        int8_ops.DENSE_MIN_M = int4_ops.DENSE_MIN_M = saved
                    line += f" {name} {path} {us:.1f} us"
            print(line, flush=True)
        torch.cuda.empty_cache()


def dequant() -> None:
    """The dense path's dequantization kernels alone: GB/s read + written (the copy bandwidth
    is the ceiling)."""
    for N, K in ((4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)):
        w4 = w4_weights(N, K)
        w8 = ref.int8.quantize_weight_per_channel(torch.randn(N, K, device="cuda") * 0.02)
        w = torch.empty(N, K, device="cuda", dtype=torch.float16)
        code = _native.DTYPE_CODE[w.dtype]
        dev = w.device.index
        for name, call, nbytes in (  # (the stream read at each call: the capturing one in the graph)
                ("w4a16", lambda: MOD.int4_dequantize_w4a16(w4[0].data_ptr(), w4[1].data_ptr(),
                                                            _native.DTYPE_CODE[w4[1].dtype], w4[1].shape[0], N, K,
                                                            w.data_ptr(), code, dev, _native.stream_of(w)),
                 N * K // 2 + w4[1].numel() * w4[1].element_size() + 2 * N * K),
                ("w8a16", lambda: MOD.int8_dequantize_w8a16(w8[0].data_ptr(), w8[1].data_ptr(), N, K, w.data_ptr(),
                                                            code, dev, _native.stream_of(w)),
                 N * K + 4 * N + 2 * N * K)):
            us = time_per_call(lambda i: call, 1, REPS)
            print(f"dequantize {name} {N}x{K}: {us:.1f} us, {nbytes / (us * 1e3):.0f} GB/s", flush=True)
        torch.cuda.empty_cache()


def w8a8() -> None:
    for N, K in ((4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)):
        q, s = ref.int8.quantize_weight_per_channel(torch.randn(N, K, device="cuda") * 0.02)
        w16 = q.to(torch.float16)
        for M in (512, 1024, 2048, 4096):
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            base = time_per_call(lambda i: (lambda: F.linear(x, w16)), 1, REPS)
            quant = time_per_call(lambda i: (lambda: int8_ops.int8_quantize_per_token(x)), 1, REPS)
            with env_var("LOWBIT_CUDA_QUANT", "vec"):
                quant_vec = time_per_call(lambda i: (lambda: int8_ops.int8_quantize_per_token(x)), 1, REPS)
                with_vec = time_per_call(lambda i: (lambda: int8_ops.int8_linear_w8a8(x, q, s)), 1, REPS)
            line = (f"w8a8 {N}x{K} M={M}: fp16 {base:.1f} us, quantizer alone {quant:.1f} us (vec {quant_vec:.1f} us), "
                    f"default with the vec quantizer {with_vec:.1f} us ({base / with_vec:.2f}x)")
            # the default again last: a shape's first timing can run a few % slow (H200: up to 7%)
            kernels = ("default", "mma", "tma", "cluster", "cluster4", "default")
            for n, kernel in enumerate(kernels):
                with env_var("LOWBIT_CUDA_W8A8", kernel) if kernel != "default" else contextlib.nullcontext():
                    us = time_per_call(lambda i: (lambda: int8_ops.int8_linear_w8a8(x, q, s)), 1, REPS)
                label = "default again" if n and kernel == "default" else kernel
                line += f", {label} {us:.1f} us ({base / us:.2f}x)"
            print(line, flush=True)
        torch.cuda.empty_cache()


def profile() -> None:
    """A few eager calls of the decode kernel (B 64, S 32k, bf16, random tables) and of W4A16
    at M = 1 (4096 x 11008), for Nsight Compute."""
    B, S, hkv, D = 64, 32768, 8, 128
    nb = B * S // 16
    kc = torch.randn(nb, 16, hkv, D, device="cuda", dtype=torch.bfloat16)
    tab = torch.randperm(nb, device="cuda").to(torch.int32).view(B, S // 16)
    q = torch.randn(B, 32, D, device="cuda", dtype=torch.bfloat16)
    seq = torch.full((B,), S, dtype=torch.int32, device="cuda")
    for _ in range(3):
        ops.paged_attention(q, kc, kc, tab, seq)
    del kc
    qw, sc = w4_weights(4096, 11008)
    x = torch.randn(1, 11008, device="cuda", dtype=torch.float16)
    for _ in range(3):
        int4_ops.int4_linear_w4a16(x, qw, sc, None, 4096)
    torch.cuda.synchronize()


def main(argv: list) -> int:
    parts = argv or ["decode", "layout", "woq", "dense", "w8a8"]
    if parts == ["profile"]:
        profile()
        return 0
    torch.manual_seed(0)
    copy_bw = measure_copy_bw()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_bw:.0f} GB/s", flush=True)
    status = 0
    for p in parts:
        try:  # one failing part (a kernel refusing a shape, a bug here) must not cost the others
            {"decode": lambda: decode(copy_bw), "layout": lambda: decode_layout(copy_bw), "woq": woq, "dense": dense,
             "w8a8": w8a8, "dequant": dequant}[p]()
        except Exception as e:  # noqa: BLE001
            print(f"{p}: FAILED: {type(e).__name__}: {e}", flush=True)
            status = 1
            torch.cuda.synchronize()  # (raises again if the context is gone: then nothing else could run)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""GPU microbenchmark of lowbit's quantized linear kernels against torch, in one run.

    python3 bench/gpu_matmul.py --out gpu_bench.json        (bench/gpu_check.sh runs this)

Measures the machine first (device-to-device copy bandwidth, counting bytes read
plus written; fp16 matmul peak on 8192^3), then for each weight shape (N, K) and
activation rows M: lowbit W4A16 (group 128, asymmetric: Q4_1 / GPTQ-style), W8A16 and
W8A8 (fp16 activations), torch fp16 F.linear and, for M >= 16 where its shape rules allow,
torch._int_mm (the bare int8 GEMM, without activation quantization or scaling). Also, for
comparison, each under its switch (ROW_ENV): the kernels the newest replaced (W8A16's
CUDA-core GEMV; on Hopper, W8A8 on mma.sync and on the TMA kernel everywhere), and the
opt-in ones: W8A8's TMA kernel in clusters of two and of four (M >= 64; at M = 2048 also
with the vec quantizer), W8A8 with its product kernel overlapping the quantizer (M <= 16 and
2048), W8A8 on tensor cores from M = 16 and its tensor-core decode (M <= 8), W8A8's
per-token quantizer alone (M >= 256; also LOWBIT_CUDA_QUANT=vec), W8A16's bulk-copy ring
(Hopper, M <= 16) and W4A16 / W8A16 with two column tiles per warp (M <= 16) or 6 or 8
resident blocks per SM (M <= 8; 8 also at M = 16, where it means 5), with the captured
calls sharing the device's K-split counters instead of zeroing fresh ones in the graph (M <= 16),
or with the K split adding up in a thread-block cluster (Hopper, M <= 16); and the targets'
combinations: W8A8 at M = 2048 with clusters, the vec quantizer and the overlap at once, W4A16
at M <= 16 on 8 blocks per SM with shared counters.

Timing: every op is captured R times in one CUDA graph (so Python and launch
overhead stay out of the numbers, as in a real decode loop), cycling through
several weight buffers whose total exceeds 2.5x the L2 cache (cold weights on
every call); the graph is replayed after warm-up and each replay is timed with
CUDA events. Reported: median time per call.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)]  # (N, K)
MS = [1, 16, 64]
W8A16_SIMT = "lowbit w8a16 (CUDA cores)"
W8A8_MMA = "lowbit w8a8 (mma.sync)"
W8A8_TMA = "lowbit w8a8 (TMA everywhere)"
W8A8_CLUSTER = "lowbit w8a8 (TMA, clusters of 2, opt-in)"
W8A8_CLUSTER_VEC = "lowbit w8a8 (TMA, clusters of 2, vec quantizer, opt-in)"
W8A8_CLUSTER4 = "lowbit w8a8 (TMA, clusters of 4, opt-in)"
W8A8_CLUSTER4_VEC = "lowbit w8a8 (TMA, clusters of 4, vec quantizer, opt-in)"
W8A8_ALL2 = "lowbit w8a8 (TMA, clusters of 2, vec quantizer, overlap, opt-in)"
W8A8_ALL4 = "lowbit w8a8 (TMA, clusters of 4, vec quantizer, overlap, opt-in)"
W8A8_PDL = "lowbit w8a8 (product overlaps the quantizer, opt-in)"
W8A8_TC16 = "lowbit w8a8 (tensor cores from M = 16, opt-in)"
W8A8_DECODE = "lowbit w8a8 (tensor-core decode, opt-in)"
W8A16_BULK = "lowbit w8a16 (bulk copies, opt-in)"
QUANT = "lowbit per-token quantizer (part of w8a8)"
QUANT_VEC = "lowbit per-token quantizer, vec (opt-in)"
W4A16_TILES2 = "lowbit w4a16 (2 column tiles per warp, opt-in)"
W8A16_TILES2 = "lowbit w8a16 (2 column tiles per warp, opt-in)"
W4A16_SHARED = "lowbit w4a16 (graph shares the K-split counters, opt-in)"
W8A16_SHARED = "lowbit w8a16 (graph shares the K-split counters, opt-in)"
W4A16_CLUSTER = "lowbit w4a16 (K split adds up in a cluster, opt-in)"
W8A16_CLUSTER = "lowbit w8a16 (K split adds up in a cluster, opt-in)"
W4A16_BLOCKS6 = "lowbit w4a16 (6 blocks per SM, opt-in)"
W8A16_BLOCKS6 = "lowbit w8a16 (6 blocks per SM, opt-in)"
W4A16_BLOCKS8 = "lowbit w4a16 (8 blocks per SM; 5 at M > 8, opt-in)"
W4A16_BLOCKS8_SHARED = "lowbit w4a16 (8 blocks per SM; 5 at M > 8, graph shares the counters, opt-in)"
W8A16_BLOCKS8 = "lowbit w8a16 (8 blocks per SM; 5 at M > 8, opt-in)"
# the switches each comparison row is timed under
ROW_ENV = {
    W8A16_SIMT: [("LOWBIT_CUDA_W8A16", "simt")],
    W8A8_MMA: [("LOWBIT_CUDA_W8A8", "mma")],
    W8A8_TMA: [("LOWBIT_CUDA_W8A8", "tma")],
    W8A8_CLUSTER: [("LOWBIT_CUDA_W8A8", "cluster")],
    W8A8_CLUSTER_VEC: [("LOWBIT_CUDA_W8A8", "cluster"), ("LOWBIT_CUDA_QUANT", "vec")],
    W8A8_CLUSTER4: [("LOWBIT_CUDA_W8A8", "cluster4")],
    W8A8_CLUSTER4_VEC: [("LOWBIT_CUDA_W8A8", "cluster4"), ("LOWBIT_CUDA_QUANT", "vec")],
    W8A8_ALL2: [("LOWBIT_CUDA_W8A8", "cluster"), ("LOWBIT_CUDA_QUANT", "vec"), ("LOWBIT_CUDA_W8A8_PDL", "1")],
    W8A8_ALL4: [("LOWBIT_CUDA_W8A8", "cluster4"), ("LOWBIT_CUDA_QUANT", "vec"), ("LOWBIT_CUDA_W8A8_PDL", "1")],
    W8A8_PDL: [("LOWBIT_CUDA_W8A8_PDL", "1")],
    W8A8_TC16: [("LOWBIT_CUDA_W8A8_MIN_M", "16")],
    W8A8_DECODE: [("LOWBIT_CUDA_W8A8_DECODE", "mma")],
    QUANT_VEC: [("LOWBIT_CUDA_QUANT", "vec")],
    W8A16_BULK: [("LOWBIT_CUDA_WOQ_COPY", "bulk")],
    W4A16_TILES2: [("LOWBIT_CUDA_WOQ_TILES", "2")],
    W8A16_TILES2: [("LOWBIT_CUDA_WOQ_TILES", "2")],
    W4A16_SHARED: [("LOWBIT_CUDA_GRAPH_COUNTERS", "shared")],
    W8A16_SHARED: [("LOWBIT_CUDA_GRAPH_COUNTERS", "shared")],
    W4A16_CLUSTER: [("LOWBIT_CUDA_WOQ_REDUCE", "cluster")],
    W8A16_CLUSTER: [("LOWBIT_CUDA_WOQ_REDUCE", "cluster")],
    W4A16_BLOCKS6: [("LOWBIT_CUDA_WOQ_BLOCKS", "6")],
    W8A16_BLOCKS6: [("LOWBIT_CUDA_WOQ_BLOCKS", "6")],
    W4A16_BLOCKS8: [("LOWBIT_CUDA_WOQ_BLOCKS", "8")],
    W4A16_BLOCKS8_SHARED: [("LOWBIT_CUDA_WOQ_BLOCKS", "8"), ("LOWBIT_CUDA_GRAPH_COUNTERS", "shared")],
    W8A16_BLOCKS8: [("LOWBIT_CUDA_WOQ_BLOCKS", "8")],
}
EXTRA = [((4096, 4096), 256), ((4096, 4096), 2048)]
W4_GROUP = 128
ROTATE_BYTES = 128 << 20  # weight bytes cycled through per op (H100 L2: 50 MB)
CALLS_PER_GRAPH = 24
PROBE_SWITCH_S = 20  # seconds a switch set's probe may take (probe_switches)


@contextlib.contextmanager
def env_var(name: str, value: str):
    """os.environ[name] = value inside the block (lowbit's kernel switches are read when a call
    is launched or captured), restored after it."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def events_ms(fn, reps: int, warmup: int) -> list:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


def start_run(name: str):
    """(start time, the run's header) after logging what runs, or None (logged) when lowbit's CUDA
    kernels cannot run here. Seeds torch. The header (device, sm_count, torch, lowbit, cuda_archs,
    copy_bw_GBps: the measured copy bandwidth) opens the bench's JSON result."""
    import lowbit
    from lowbit import _native

    reason = _native.cuda_unavailable_reason()
    if reason is not None:
        log(f"{name}: lowbit's CUDA kernels are unavailable: {reason}")
        return None
    t0 = time.time()
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    log(f"{name}: {device}, {props.multi_processor_count} SMs, lowbit {lowbit.__version__} "
        f"(archs {_native.cuda_built_archs()}), torch {torch.__version__}")
    copy_bw = measure_copy_bw()
    log(f"copy bandwidth: {copy_bw:.0f} GB/s")
    return t0, {"device": device, "sm_count": props.multi_processor_count, "torch": torch.__version__,
                "lowbit": lowbit.__version__, "cuda_archs": _native.cuda_built_archs(), "copy_bw_GBps": copy_bw}


def write_result(path: str, result: dict, t0: float, final: bool = True) -> None:
    """The run's JSON (with its markdown table under "table_md", printed last) to path. The
    benches also write it after every shape / row with final=False ("partial": true, nothing
    printed), so a run cut off by its time limit still leaves its table."""
    result = {**result, "partial": not final, "seconds": time.time() - t0}
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    if final:
        print(result["table_md"])
        log(f"done in {time.time() - t0:.0f}s; JSON in {path}")


def measure_copy_bw() -> float:
    """GB/s of a ~1 GB device-to-device copy, bytes read + written."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = statistics.median(events_ms(lambda: dst.copy_(src), reps=20, warmup=3))
    del src, dst
    return 2 * n / (ms * 1e-3) / 1e9


def measure_fp16_peak() -> float:
    """TFLOP/s of an 8192^3 fp16 torch.matmul on random data."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    ms = statistics.median(events_ms(lambda: torch.matmul(a, b), reps=10, warmup=3))
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def time_per_call(make_call, nbuf: int, reps: int) -> float:
    """Median µs per call: CALLS_PER_GRAPH calls (buffer i % nbuf) captured in one graph."""
    for i in range(min(nbuf, 3)):  # eager warm-up (module load, cuBLAS handles)
        make_call(i)()
    torch.cuda.synchronize()
    calls = [make_call(i % nbuf) for i in range(CALLS_PER_GRAPH)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls[:2]:
            c()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    ms = events_ms(g.replay, reps=reps, warmup=2)
    del g
    return statistics.median(ms) * 1e3 / CALLS_PER_GRAPH


def bench_shape(N: int, K: int, Ms: list, copy_bw: float, reps: int, broken: dict) -> list:
    from lowbit import ref
    from lowbit.ops import int8 as int8_ops

    from lowbit.ops import int4 as int4_ops

    nbuf_w4 = max(2, -(-ROTATE_BYTES // (N * K // 2)))
    *w4_first, w4_deq = w4_weights(N, K, dequantized=True)  # the first copy also in fp16 (error check)
    w4s = [tuple(w4_first)] + [w4_weights(N, K) for _ in range(nbuf_w4 - 1)]
    nbuf_i8 = max(2, -(-ROTATE_BYTES // (N * K)))
    nbuf_f16 = max(2, -(-ROTATE_BYTES // (2 * N * K)))
    w16, qws, scs = [], [], []
    for _ in range(max(nbuf_i8, nbuf_f16)):
        w = torch.randn(N, K, device="cuda") * 0.02
        q, s = ref.int8.quantize_weight_per_channel(w)
        if len(qws) < nbuf_i8:
            qws.append(q)
            scs.append(s)
        if len(w16) < nbuf_f16:
            w16.append(ref.int8.dequantize_weight(q, s).to(torch.float16))
        del w
    rows = []
    for M in Ms:
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        xq, _ = ref.int8.quantize_per_token(x)
        # correctness tell: lowbit vs fp16 F.linear on the same dequantized weight
        y_ref = F.linear(x.float(), w16[0].float())
        relerr = {}
        for name, fn in (("lowbit w8a16", int8_ops.int8_linear_w8a16), ("lowbit w8a8", int8_ops.int8_linear_w8a8)):
            y = fn(x, qws[0], scs[0]).float()
            relerr[name] = ((y - y_ref).abs().max() / y_ref.abs().max()).item()
        y4_ref = F.linear(x.float(), w4_deq.float())
        y4 = int4_ops.int4_linear_w4a16(x, w4s[0][0], w4s[0][1], None, N).float()
        relerr["lowbit w4a16"] = ((y4 - y4_ref).abs().max() / y4_ref.abs().max()).item()

        ops = {
            "torch fp16 F.linear": (lambda i: (lambda: F.linear(x, w16[i])), nbuf_f16,
                                    2 * N * K + 2 * M * K + 2 * M * N),
            "lowbit w4a16": (lambda i: (lambda: int4_ops.int4_linear_w4a16(x, w4s[i][0], w4s[i][1], None, N)),
                             nbuf_w4, N * K // 2 + 4 * N * (K // W4_GROUP) + 2 * M * K + 2 * M * N),
            "lowbit w8a16": (lambda i: (lambda: int8_ops.int8_linear_w8a16(x, qws[i], scs[i])), nbuf_i8,
                             N * K + 4 * N + 2 * M * K + 2 * M * N),
            "lowbit w8a8": (lambda i: (lambda: int8_ops.int8_linear_w8a8(x, qws[i], scs[i])), nbuf_i8,
                            N * K + 4 * N + 2 * M * K + 2 * M * N),
        }
        # the kernels the newest ones replaced, for comparison: W8A16's CUDA-core GEMV (M <= 128;
        # larger M takes the dequantize + cuBLAS path either way), and on Hopper W8A8 (M >= 64) on
        # mma.sync and on the TMA kernel for every shape (the default picks one by shape), the
        # latter also in clusters of two and four (and at M = 2048 with the vec quantizer: the
        # target row)
        if M <= int8_ops.DENSE_MIN_M:
            ops[W8A16_SIMT] = ops["lowbit w8a16"]
        hopper = torch.cuda.get_device_capability()[0] == 9
        if M >= 64 and hopper:
            ops[W8A8_MMA] = ops["lowbit w8a8"]
            ops[W8A8_TMA] = ops["lowbit w8a8"]
            ops[W8A8_CLUSTER] = ops["lowbit w8a8"]
            ops[W8A8_CLUSTER4] = ops["lowbit w8a8"]
        if M >= 2048 and hopper:
            ops[W8A8_CLUSTER_VEC] = ops["lowbit w8a8"]
            ops[W8A8_CLUSTER4_VEC] = ops["lowbit w8a8"]
            ops[W8A8_ALL2] = ops["lowbit w8a8"]  # (the target row: every W8A8 experiment at once)
            ops[W8A8_ALL4] = ops["lowbit w8a8"]
        if 16 <= M < 64:
            ops[W8A8_TC16] = ops["lowbit w8a8"]
        if M <= 16 or M >= 2048:  # (decode, where a launch gap weighs most, and the target row)
            ops[W8A8_PDL] = ops["lowbit w8a8"]
        if M <= 8:
            ops[W8A8_DECODE] = ops["lowbit w8a8"]
        if M <= 16 and hopper:
            ops[W8A16_BULK] = ops["lowbit w8a16"]
        if M <= 16:
            ops[W4A16_TILES2] = ops["lowbit w4a16"]
            ops[W8A16_TILES2] = ops["lowbit w8a16"]
            ops[W4A16_SHARED] = ops["lowbit w4a16"]
            ops[W8A16_SHARED] = ops["lowbit w8a16"]
            if hopper:
                ops[W4A16_CLUSTER] = ops["lowbit w4a16"]
                ops[W8A16_CLUSTER] = ops["lowbit w8a16"]
        if M <= 8:
            ops[W4A16_BLOCKS6] = ops["lowbit w4a16"]
            ops[W8A16_BLOCKS6] = ops["lowbit w8a16"]
        if M <= 16:  # (M = 9-16: 5 blocks per SM under either value)
            ops[W4A16_BLOCKS8] = ops["lowbit w4a16"]
            ops[W4A16_BLOCKS8_SHARED] = ops["lowbit w4a16"]  # (the target rows: the two experiments at once)
            ops[W8A16_BLOCKS8] = ops["lowbit w8a16"]
        if M >= 256:  # W8A8's first pass over x, timed alone
            ops[QUANT] = (lambda i: (lambda: int8_ops.int8_quantize_per_token(x)), 1, 2 * M * K + M * K + 4 * M)
            ops[QUANT_VEC] = ops[QUANT]
        if M >= 16:
            ops["torch._int_mm (int8 GEMM only)"] = (lambda i: (lambda: torch._int_mm(xq, qws[i].t())), nbuf_i8,
                                                     N * K + M * K + 4 * M * N)
        t_fp16 = None
        for op, (make_call, nbuf, nbytes) in ops.items():
            row = {"N": N, "K": K, "M": M, "op": op, "bytes": nbytes, "flops": 2 * M * N * K}
            key = switch_key(ROW_ENV.get(op, []))
            if key in broken:
                row["error"] = f"skipped: its switch probe failed ({broken[key]})"
                rows.append(row)
                continue
            try:
                with contextlib.ExitStack() as switches:
                    for name, value in ROW_ENV.get(op, []):
                        switches.enter_context(env_var(name, value))
                    us = time_per_call(make_call, nbuf, reps)
            except Exception as e:  # noqa: BLE001 - e.g. _int_mm shape rules; record and go on
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                log(f"  {N}x{K} M={M} {op}: {row['error']}")
                rows.append(row)
                continue
            gbps = nbytes / (us * 1e-6) / 1e9
            row.update(us=us, gbps=gbps, pct_bw=100 * gbps / copy_bw, tflops=2 * M * N * K / (us * 1e-6) / 1e12)
            if op.startswith("torch fp16"):
                t_fp16 = us
            row["speedup_vs_fp16"] = (t_fp16 / us) if t_fp16 else None
            if op in relerr:
                row["max_rel_err_vs_fp16_deq"] = relerr[op]
            rows.append(row)
            log(f"  {N}x{K} M={M} {op}: {us:.1f} us, {gbps:.0f} GB/s, {row['tflops']:.2f} TFLOP/s")
        del x, xq
    del w16, qws, scs, w4s, w4_first, w4_deq
    torch.cuda.empty_cache()
    return rows


def table(rows: list, copy_bw: float, peak: float, device: str) -> str:
    out = [f"GPU: {device}; measured copy bandwidth {copy_bw:.0f} GB/s (read+write), "
           f"fp16 matmul {peak:.0f} TFLOP/s. Median per call, cold weights, CUDA-graph replay.",
           "",
           "| shape (N x K) | M | op | µs | GB/s | % copy BW | TFLOP/s | speedup vs fp16 F.linear |",
           "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        shape = f"{r['N']}x{r['K']}"
        if "error" in r:
            out.append(f"| {shape} | {r['M']} | {r['op']} | n/a | | | | ({r['error'][:60]}) |")
            continue
        sp = f"{r['speedup_vs_fp16']:.2f}x" if r.get("speedup_vs_fp16") else ""
        out.append(f"| {shape} | {r['M']} | {r['op']} | {r['us']:.1f} | {r['gbps']:.0f} | {r['pct_bw']:.0f}% | "
                   f"{r['tflops']:.2f} | {sp} |")
    return "\n".join(out)


def switch_table(rows: list, broken: dict) -> str:
    """Each switch row (ROW_ENV) against the kernel it would replace, timed in the same run on
    the same shape and M: default µs / switched µs (> 1: the switch is faster), and their
    geometric mean. What decides whether an opt-in kernel becomes the default. Switches whose
    probe failed (switch_health) say so instead."""
    us = {(r["N"], r["K"], r["M"], r["op"]): r["us"] for r in rows if "us" in r}
    out = ["| switch (vs default) | env | default µs / switched µs, per N x K / M | geo-mean |", "|---|---|---|---:|"]
    for op, env in ROW_ENV.items():
        if switch_key(env) in broken:
            out.append(f"| {op} | {switch_key(env)} | skipped: its probe FAILED ({broken[switch_key(env)]}) | – |")
            continue
        base = QUANT if op == QUANT_VEC else op.split(" (")[0]
        pairs = [(f"{N}x{K}/{M}", us[(N, K, M, base)] / t) for (N, K, M, o), t in us.items()
                 if o == op and (N, K, M, base) in us]
        if not pairs:
            continue
        geo = statistics.geometric_mean([r for _, r in pairs])
        cells = ", ".join(f"{where} {r:.2f}" for where, r in pairs)
        out.append(f"| {op} | {' '.join(f'{k}={v}' for k, v in env)} | {cells} | {geo:.2f} |")
    return "\n".join(out)


def w4_weights(N: int, K: int, dequantized: bool = False) -> tuple:
    """Random asymmetric INT4 weights (groups of W4_GROUP, fp16 d and m) in the CUDA layout:
    (qweight, scales), plus the same weight dequantized in fp16 when asked."""
    from lowbit import ref
    from lowbit.formats import int4 as fmt4

    codes = torch.randint(0, 16, (N, K), dtype=torch.uint8, device="cuda")
    d = (torch.rand(N, K // W4_GROUP, device="cuda") * 0.004 + 0.001).half().float()
    mn = (-7.5 * d + torch.randn_like(d) * 0.002).half().float()
    packed = fmt4.pack_cuda(codes, d, mn)
    return (*packed, ref.int4.dequantize_int4(codes, d, mn).half()) if dequantized else packed


def profile_w4a16() -> int:
    """A few W4A16 calls for a profiler: 4096x11008 (N x K), group 128: M = 1 three times (the
    profiler skips two), M = 16, and M = 1 with 8 resident blocks per SM (LOWBIT_CUDA_WOQ_BLOCKS=8)."""
    from lowbit.ops import int4 as int4_ops

    N, K = 4096, 11008
    q, table = w4_weights(N, K)
    x1, x16 = (torch.randn(M, K, device="cuda", dtype=torch.float16) for M in (1, 16))
    for x in (x1, x1, x1, x16):
        int4_ops.int4_linear_w4a16(x, q, table, None, N)
    with env_var("LOWBIT_CUDA_WOQ_BLOCKS", "8"):
        int4_ops.int4_linear_w4a16(x1, q, table, None, N)
    torch.cuda.synchronize()
    return 0


def profile_w8a8() -> int:
    """W8A8 at M = 2048 on 4096 x 4096 for a profiler: one call on the TMA kernel alone, one in
    clusters of two, one in clusters of four."""
    from lowbit import ref
    from lowbit.ops import int8 as int8_ops

    q, s = ref.int8.quantize_weight_per_channel(torch.randn(4096, 4096, device="cuda") * 0.02)
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.float16)
    for kernel in ("tma", "cluster", "cluster4"):
        with env_var("LOWBIT_CUDA_W8A8", kernel):
            int8_ops.int8_linear_w8a8(x, q, s)
    torch.cuda.synchronize()
    return 0


def probe() -> int:
    """Whether the newest kernels agree with the ones they replaced: W8A16 on tensor cores vs
    its CUDA-core GEMV (LOWBIT_CUDA_W8A16=simt), to rounding, on a few decode shapes; W8A8 by
    default (on Hopper: the TMA kernel, by shape) vs mma.sync (LOWBIT_CUDA_W8A8=mma), bit for
    bit. Exit status: bit 0 set if W8A16 failed, bit 1 if W8A8 did. Run in its own process
    before the benchmark (bench/gpu_check.sh), so a wrong or faulting kernel cannot take the
    benchmark down."""
    from lowbit import ref
    from lowbit.ops import int8 as int8_ops

    status = 0
    try:
        status |= 0 if probe_w8a16(ref, int8_ops) else 1
    except Exception as e:  # noqa: BLE001 - a fault is a failed probe
        log(f"probe w8a16: {type(e).__name__}: {e}")
        return 3  # the CUDA context may be gone: no second probe
    try:
        same = True
        # (the TMA kernel at both tile widths on Hopper)
        for M, N, K in ((64, 4096, 4096), (300, 1000, 1040), (2048, 4096, 11008)):
            q, s = ref.int8.quantize_weight_per_channel(torch.randn(N, K, device="cuda") * 0.02)
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            y = int8_ops.int8_linear_w8a8(x, q, s)
            with env_var("LOWBIT_CUDA_W8A8", "mma"):
                same &= torch.equal(y, int8_ops.int8_linear_w8a8(x, q, s))
        torch.cuda.synchronize()
        log(f"probe w8a8 (default vs mma.sync, bitwise): {'ok' if same else 'FAILED'}")
        status |= 0 if same else 2
    except Exception as e:  # noqa: BLE001
        log(f"probe w8a8: {type(e).__name__}: {e}")
        status |= 2
    return status


def switch_key(env: list) -> str:
    """A ROW_ENV entry as one string: "NAME=VALUE,NAME=VALUE"."""
    return ",".join(f"{name}={value}" for name, value in env)


def probe_switches(keys: list) -> int:
    """Child mode (--probe-switches): for each switch set (switch_key form), W4A16, W8A16 and
    W8A8 on a few shapes (decode, M = 16, the tensor-core W8A8 kernels, M = 2048), eagerly and
    replayed in a CUDA graph, against the same calls without the switches. Prints "trying KEY"
    before and "ok KEY" / "bad KEY: why" after each, flushed, so that a parent sees which set a
    crash or a hang belongs to; after an exception it stops (the CUDA context may be gone) and
    the parent starts another for the rest, and a set that takes over PROBE_SWITCH_S (a hung
    kernel) ends the process. Agreement to 2% of max |y| (a switch may change the K split, so the
    rounding; the tests check bits)."""
    from lowbit import ref
    from lowbit.ops import int4 as int4_ops
    from lowbit.ops import int8 as int8_ops

    cases = []
    for M, N, K in ((1, 4096, 4096), (16, 4096, 4096), (300, 1024, 1040), (2048, 512, 1024)):
        q4 = w4_weights(N, K)
        q8 = ref.int8.quantize_weight_per_channel(torch.randn(N, K, device="cuda") * 0.02)
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        for name, call in (("w4a16", lambda x=x, q4=q4, N=N: int4_ops.int4_linear_w4a16(x, *q4, None, N)),
                           ("w8a16", lambda x=x, q8=q8: int8_ops.int8_linear_w8a16(x, *q8)),
                           ("w8a8", lambda x=x, q8=q8: int8_ops.int8_linear_w8a8(x, *q8))):
            cases.append((f"{name} M={M} {N}x{K}", call, call().float()))
    torch.cuda.synchronize()
    for key in keys:
        print(f"trying {key}", flush=True)
        watchdog = threading.Timer(PROBE_SWITCH_S, lambda: os._exit(3))
        watchdog.start()
        why = ""
        try:
            with contextlib.ExitStack() as stack:
                for item in key.split(","):
                    stack.enter_context(env_var(*item.split("=", 1)))
                for what, call, want in cases:
                    g = torch.cuda.CUDAGraph()
                    call()  # (eager first: lazy set-up outside the capture)
                    with torch.cuda.graph(g):
                        y_graph = call()
                    g.replay()
                    for how, y in (("eager", call()), ("graph", y_graph)):
                        torch.cuda.synchronize()
                        err = ((y.float() - want).abs().max() / want.abs().max()).item()
                        if not err < 2e-2:
                            why = why or f"{what} ({how}): rel. diff {err:.2e}"
        except Exception as e:  # noqa: BLE001 - a failed probe; the rest in a fresh process
            print(f"bad {key}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}", flush=True)
            return 1
        watchdog.cancel()
        print(f"bad {key}: {why}" if why else f"ok {key}", flush=True)
    return 0


def switch_health(timeout_s: float = 240.0) -> dict:
    """{switch key: why} of the switch sets of ROW_ENV whose probe (probe_switches, in a child
    process) failed, crashed or hung: the benchmark skips their rows, so one broken opt-in kernel
    cannot take the others' rows (or a hung process, the whole table) with it. A child that dies
    is restarted after the set it was trying."""
    keys = list(dict.fromkeys(switch_key(env) for env in ROW_ENV.values()))
    broken = {}
    while keys:
        try:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe-switches", ";".join(keys)],
                                 capture_output=True, text=True, timeout=timeout_s).stdout
            died = None
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            died = f"hung (no answer in {timeout_s:.0f} s)"
        trying, progress = None, False
        for line in out.splitlines():
            verb, _, rest = line.partition(" ")
            if verb == "trying":
                trying = rest
            elif verb in ("ok", "bad"):
                key, _, why = rest.partition(": ")
                if verb == "bad":
                    broken[key] = why
                keys.remove(key)
                trying, progress = None, True
        if trying is not None:  # it crashed or hung on this one
            broken[trying] = died or f"the probe process crashed, or hung past {PROBE_SWITCH_S} s"
            keys.remove(trying)
        elif not progress:  # it answered nothing (it cannot run at all): give up on the rest
            broken.update({k: died or "the probe process failed" for k in keys})
            break
    for key, why in broken.items():
        log(f"switch {key}: probe FAILED ({why}); its rows are skipped")
    log(f"switch probes: {len(broken)} of {len(set(switch_key(e) for e in ROW_ENV.values()))} failed")
    return broken


def probe_w8a16(ref, int8_ops) -> bool:
    worst = 0.0
    for dtype in (torch.float16, torch.bfloat16):
        for M, N, K in ((1, 4096, 4096), (5, 576, 1536), (16, 1024, 4096), (33, 300, 4112)):
            q, s = ref.int8.quantize_weight_per_channel(torch.randn(N, K, device="cuda") * 0.02)
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            y = int8_ops.int8_linear_w8a16(x, q, s).float()
            with env_var("LOWBIT_CUDA_W8A16", "simt"):
                y_simt = int8_ops.int8_linear_w8a16(x, q, s).float()
            torch.cuda.synchronize()
            worst = max(worst, ((y - y_simt).abs().max() / y_simt.abs().max()).item())
    ok = worst < 2e-2  # both round once to the dtype from fp32 sums (bf16: 2^-8)
    log(f"probe w8a16 (tensor cores vs CUDA cores): max rel diff {worst:.2e}: {'ok' if ok else 'FAILED'}")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="JSON output path (required unless --profile / --probe)")
    ap.add_argument("--reps", type=int, default=15, help="timed graph replays per op (default 15)")
    ap.add_argument("--quick", action="store_true", help="one shape, M=1 only (smoke test)")
    ap.add_argument("--profile", nargs="?", const="w4a16", choices=["w4a16", "w8a8"],
                    help="only a few calls for ncu, no timing: W4A16 on 4096x11008 at M=1 and 16, and M=1 on 8 "
                         "blocks per SM (default), "
                         "or W8A8 at M=2048 on 4096x4096 (TMA kernel alone, then in clusters of 2 and 4)")
    ap.add_argument("--probe", action="store_true",
                    help="only compare the newest kernels with the ones they replaced (see probe())")
    ap.add_argument("--probe-switches", metavar="KEYS",
                    help="(internal) probe these switch sets, ';'-separated (see probe_switches())")
    args = ap.parse_args(argv)
    if args.profile:
        return profile_w8a8() if args.profile == "w8a8" else profile_w4a16()
    if args.probe:
        return probe()
    if args.probe_switches:
        return probe_switches(args.probe_switches.split(";"))
    if not args.out:
        ap.error("--out is required")

    run = start_run("gpu_matmul")
    if run is None:
        return 2
    t0, header = run
    device, copy_bw = header["device"], header["copy_bw_GBps"]
    broken = header["broken_switches"] = {} if args.quick else switch_health()
    peak = measure_fp16_peak()
    log(f"fp16 matmul 8192^3: {peak:.0f} TFLOP/s")

    plan = {}
    for shape in SHAPES[:1] if args.quick else SHAPES:
        plan[shape] = [1] if args.quick else list(MS)
    if not args.quick:
        for shape, m in EXTRA:
            plan[shape].append(m)
    rows = []

    def result() -> dict:
        return {**header, "fp16_matmul_TFLOPs": peak, "calls_per_graph": CALLS_PER_GRAPH, "reps": args.reps,
                "rows": rows, "table_md": table(rows, copy_bw, peak, device), "switch_md": switch_table(rows, broken)}

    for i, ((N, K), Ms) in enumerate(plan.items()):
        log(f"[{i + 1}/{len(plan)}] N={N} K={K} M={Ms} ({time.time() - t0:.0f}s)")
        rows += bench_shape(N, K, Ms, copy_bw, args.reps, broken)
        write_result(args.out, result(), t0, final=False)
    write_result(args.out, result(), t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

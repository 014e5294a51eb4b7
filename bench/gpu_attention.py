#!/usr/bin/env python3
"""GPU microbenchmark of lowbit's CUDA attention kernels against torch, in one run.

    python3 bench/gpu_attention.py --out gpu_attention.json     (bench/gpu_check.sh runs this)

Measures the device-to-device copy bandwidth first (bench/gpu_matmul.py's measure_copy_bw:
bytes read + written), then:

* Prefill: causal self-attention, H = 32 query and kv heads, D = 128, bf16 (and one fp16 row),
  (B, L) in (1, 1024), (1, 4096), (1, 8192), (4, 4096), (8, 1024): lowbit.attention against
  torch SDPA with the flash backend forced. FLOPs: 4 B H L^2 D (Q.K^T and P.V), halved for the
  causal mask. Target: B = 1, L = 4096, bf16 at least as fast as torch flash (>= 1.0x).
* Decode: lowbit.ops.paged_attention, one query per sequence, block size 16, Hq = 32, Hkv = 8,
  D = 128, random block tables, batch in (1, 8, 64) x cached tokens in (1024, 4096, 32768), with
  a bf16 cache and an INT8 cache (fp32 scale per token and head); torch SDPA (flash, GQA) on a
  contiguous bf16 [B, Hkv, S, D] cache for reference; and the bf16 cache again with
  LOWBIT_CUDA_DECODE=simt (the CUDA-core kernel the tensor-core one replaced), whose output
  is compared with the default's. Bytes: the K and V read (+ the INT8 scales); % of the copy
  bandwidth. Targets: bf16 >= 80% of copy bandwidth at batch >= 8 and
  >= 4k tokens; INT8 >= 1.6x bf16 there.

Timing: gpu_matmul.time_per_call: every op is captured CALLS_PER_GRAPH times in one CUDA graph
and each replay is timed with CUDA events; median per call. Decode calls rotate over block
tables into a cache larger than 2.5x the L2 cache (cold K / V on every call, as in a real
decode step over many layers). A failing row is reported in the table ("error: ...") and the
run goes on.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

try:  # run as a script from the checkout (bench/gpu_check.sh): bench/ is on sys.path
    from gpu_matmul import ROTATE_BYTES, env_var, log, start_run, time_per_call, write_result
except ImportError:  # imported as bench.gpu_attention
    from bench.gpu_matmul import ROTATE_BYTES, env_var, log, start_run, time_per_call, write_result

PREFILL = [(1, 1024, "bf16"), (1, 4096, "bf16"), (1, 8192, "bf16"), (4, 4096, "bf16"), (8, 1024, "bf16"),
           (1, 4096, "fp16")]  # (B, L, dtype)
PREFILL_HEADS, HEAD_DIM = 32, 128
DECODE_BATCH = [1, 8, 64]
DECODE_TOKENS = [1024, 4096, 32768]
DECODE_HQ, DECODE_HKV, BLOCK = 32, 8, 16
MAX_CACHE_BYTES = 20e9  # decode combos whose bf16 K + V cache needs more are skipped
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TARGET_PREFILL = (1, 4096, "bf16", 1.0)
TARGET_BF16_PCT_BW, TARGET_INT8_SPEEDUP = 80.0, 1.6
MMA_VS_SIMT_MAX = 2e-2  # max rel diff of the two decode kernels' bf16 outputs beyond which a row is flagged


# ---------------------------------------------------------------- arithmetic (no GPU needed)
def prefill_flops(B: int, L: int, H: int = PREFILL_HEADS, D: int = HEAD_DIM, causal: bool = True) -> float:
    """Q.K^T and P.V: 2 matmuls of 2 B H L L D flops; a causal mask computes about half of them."""
    full = 4.0 * B * H * L * L * D
    return full / 2 if causal else full


def decode_bytes(B: int, S: int, cache: str, hkv: int = DECODE_HKV, d: int = HEAD_DIM) -> int:
    """Bytes one decode step reads from the cache: K and V (+ the INT8 cache's fp32 scale per
    token, head and tensor). Queries, outputs and block tables are negligible and not counted."""
    elem = {"bf16": 2, "fp16": 2, "int8": 1}[cache]
    per_token = hkv * d * elem * 2 + (hkv * 4 * 2 if cache == "int8" else 0)
    return B * S * per_token


def decode_plan(batches=DECODE_BATCH, tokens=DECODE_TOKENS) -> list:
    """(B, S, skipped?) for every decode combo; skipped when its bf16 cache exceeds MAX_CACHE_BYTES."""
    return [(B, S, decode_bytes(B, S, "bf16") > MAX_CACHE_BYTES) for B in batches for S in tokens]


def _fmt(v, spec: str, suffix: str = "") -> str:
    return "" if v is None else f"{v:{spec}}{suffix}"


def table(prefill_rows: list, decode_rows: list, copy_bw: float, device: str, targets: list) -> str:
    """The markdown report: a prefill table, a decode table, the targets."""
    out = [f"GPU: {device}; measured copy bandwidth {copy_bw:.0f} GB/s (read+write). Median per call, "
           "CUDA-graph replay.", ""]
    if prefill_rows:
        out += [f"Prefill, causal, H={PREFILL_HEADS} (kv {PREFILL_HEADS}), D={HEAD_DIM}: lowbit.attention vs torch "
                "SDPA (flash backend forced).", "",
                "| dtype | B | L | lowbit ms | lowbit TFLOP/s | torch flash ms | torch TFLOP/s | lowbit speedup | "
                "max rel diff |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in prefill_rows:
            head = f"| {r['dtype']} | {r['B']} | {r['L']} |"
            last = f"error: {r['error'][:90]}" if "error" in r else _fmt(r.get("max_rel_diff"), ".1e")
            out.append(f"{head} {_fmt(r.get('lowbit_ms'), '.3f')} | {_fmt(r.get('lowbit_tflops'), '.0f')} | "
                       f"{_fmt(r.get('torch_ms'), '.3f')} | {_fmt(r.get('torch_tflops'), '.0f')} | "
                       f"{_fmt(r.get('speedup'), '.2f', 'x')} | {last} |")
        out.append("")
    if decode_rows:
        out += [f"Decode (paged, block {BLOCK}, Hq={DECODE_HQ}, Hkv={DECODE_HKV}, D={HEAD_DIM}, one query per "
                "sequence, random block tables): GB/s of K + V (+ INT8 scales) read; torch: SDPA flash on a "
                "contiguous bf16 cache.", "",
                "| batch | tokens | bf16 µs | bf16 GB/s | bf16 % BW | int8 µs | int8 GB/s | int8 % BW | "
                "int8 / bf16 | torch flash µs | torch GB/s | bf16 CUDA-core µs |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in decode_rows:
            head = f"| {r['B']} | {r['S']} |"
            if r.get("skipped"):
                out.append(f"{head} skipped: the cache needs {r['cache_GB']:.1f} GB | | | | | | | | | |")
                continue
            cells = []
            for c in ("bf16", "int8"):
                if f"{c}_error" in r:
                    cells += [f"error: {r[c + '_error'][:60]}", "", ""]
                else:
                    cells += [_fmt(r.get(f"{c}_us"), ".1f"), _fmt(r.get(f"{c}_gbps"), ".0f"),
                              _fmt(r.get(f"{c}_pct_bw"), ".0f", "%")]
            cells.append(_fmt(r.get("int8_speedup"), ".2f", "x"))
            if "torch_error" in r:
                cells += [f"error: {r['torch_error'][:60]}", ""]
            else:
                cells += [_fmt(r.get("torch_us"), ".1f"), _fmt(r.get("torch_gbps"), ".0f")]
            # the CUDA-core kernel's time, flagged if the two kernels disagree (the tests say which is wrong)
            simt = f"error: {r['bf16_simt_error'][:60]}" if "bf16_simt_error" in r else _fmt(r.get("bf16_simt_us"), ".1f")
            if (r.get("mma_vs_simt_rel_diff") or 0.0) > MMA_VS_SIMT_MAX:
                simt += f" (outputs differ: {r['mma_vs_simt_rel_diff']:.1e})"
            cells.append(simt)
            out.append(f"{head} " + " | ".join(cells) + " |")
        out.append("")
    for t in targets:
        out.append(f"- {t['what']}: {t['verdict']} ({t['detail']})")
    return "\n".join(out).rstrip() + "\n"


def evaluate_targets(prefill_rows: list, decode_rows: list) -> list:
    """PASS / FAIL / n/a for the three targets of the CUDA attention issue."""
    out = []
    b, L, dt, want = TARGET_PREFILL
    row = next((r for r in prefill_rows if (r["B"], r["L"], r["dtype"]) == (b, L, dt)), None)
    sp = None if row is None else row.get("speedup")
    out.append({"what": f"prefill B={b} L={L} {dt}: lowbit >= {want:.1f}x torch flash",
                "verdict": "n/a" if sp is None else ("PASS" if sp >= want else "FAIL"),
                "detail": "not measured" if sp is None else f"{sp:.2f}x"})
    big = [r for r in decode_rows if r["B"] >= 8 and r["S"] >= 4096 and not r.get("skipped")]
    pct = [r["bf16_pct_bw"] for r in big if r.get("bf16_pct_bw") is not None]
    out.append({"what": f"decode bf16 >= {TARGET_BF16_PCT_BW:.0f}% of copy bandwidth (batch >= 8, >= 4k tokens)",
                "verdict": "n/a" if not pct else ("PASS" if min(pct) >= TARGET_BF16_PCT_BW else "FAIL"),
                "detail": "not measured" if not pct else f"min {min(pct):.0f}% over {len(pct)} rows"})
    sps = [r["int8_speedup"] for r in big if r.get("int8_speedup") is not None]
    out.append({"what": f"decode int8 >= {TARGET_INT8_SPEEDUP:.1f}x bf16 (batch >= 8, >= 4k tokens)",
                "verdict": "n/a" if not sps else ("PASS" if min(sps) >= TARGET_INT8_SPEEDUP else "FAIL"),
                "detail": "not measured" if not sps else f"min {min(sps):.2f}x over {len(sps)} rows"})
    return out


def _err_text(e: BaseException) -> str:
    lines = str(e).strip().splitlines() or [""]
    return f"{type(e).__name__}: {lines[0][:160]}"


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- prefill
def bench_prefill(B: int, L: int, dtype_name: str, reps: int) -> dict:
    import lowbit
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = DTYPES[dtype_name]
    H, D = PREFILL_HEADS, HEAD_DIM
    row = {"kind": "prefill", "B": B, "L": L, "dtype": dtype_name, "H": H, "Hkv": H, "D": D,
           "flops": prefill_flops(B, L)}
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype) for _ in range(3))

    def ours():
        return lowbit.attention(q, k, v, is_causal=True)

    def theirs():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    try:
        row["max_rel_diff"] = _rel_diff(ours(), theirs())
    except Exception as e:  # noqa: BLE001 - reported in the row
        row["error"] = _err_text(e)
    for name, fn in (("lowbit", ours), ("torch", theirs)):
        try:
            us = time_per_call(lambda i, fn=fn: fn, 1, reps)
        except Exception as e:  # noqa: BLE001
            row[f"{name}_error"] = _err_text(e)
            row.setdefault("error", f"{name}: {row[name + '_error']}")
            continue
        row[f"{name}_ms"] = us / 1e3
        row[f"{name}_tflops"] = row["flops"] / (us * 1e-6) / 1e12
    if row.get("lowbit_ms") and row.get("torch_ms"):
        row["speedup"] = row["torch_ms"] / row["lowbit_ms"]
    del q, k, v
    torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------- decode
def bench_decode(B: int, S: int, copy_bw: float, reps: int) -> dict:
    from lowbit import ops
    from torch.nn.attention import SDPBackend, sdpa_kernel

    hq, hkv, D, bs = DECODE_HQ, DECODE_HKV, HEAD_DIM, BLOCK
    row = {"kind": "decode", "B": B, "S": S, "Hq": hq, "Hkv": hkv, "D": D, "block_size": bs,
           "cache_GB": decode_bytes(B, S, "bf16") / 1e9}
    nblk = -(-S // bs)                                                   # blocks per sequence
    nbuf = max(1, math.ceil(ROTATE_BYTES / decode_bytes(B, S, "bf16")))  # tables rotated over
    nb = nbuf * B * nblk
    row["tables"] = nbuf
    kc = torch.randn(nb, bs, hkv, D, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn(nb, bs, hkv, D, device="cuda", dtype=torch.bfloat16)
    perm = torch.randperm(nb, device="cuda", dtype=torch.int64).to(torch.int32)
    tables = [perm[i * B * nblk:(i + 1) * B * nblk].view(B, nblk).contiguous() for i in range(nbuf)]
    seq_lens = torch.full((B,), S, dtype=torch.int32, device="cuda")
    q = torch.randn(B, hq, D, device="cuda", dtype=torch.bfloat16)
    outs = {}

    def timed(name, make_call, nbytes):
        try:
            outs[name] = make_call(0)()
            us = time_per_call(make_call, nbuf, reps)
        except Exception as e:  # noqa: BLE001 - reported in the row
            row[f"{name}_error"] = _err_text(e)
            log(f"  decode B={B} S={S} {name}: {row[name + '_error']}")
            return
        gbps = nbytes / (us * 1e-6) / 1e9
        row.update({f"{name}_us": us, f"{name}_gbps": gbps, f"{name}_pct_bw": 100 * gbps / copy_bw})

    def bf16_call(i):
        return lambda: ops.paged_attention(q, kc, vc, tables[i], seq_lens)

    timed("bf16", bf16_call, decode_bytes(B, S, "bf16"))
    with env_var("LOWBIT_CUDA_DECODE", "simt"):  # the CUDA-core kernel, for comparison (and as a cross-check)
        timed("bf16_simt", bf16_call, decode_bytes(B, S, "bf16"))
    if "bf16" in outs and "bf16_simt" in outs:
        row["mma_vs_simt_rel_diff"] = _rel_diff(outs["bf16"], outs["bf16_simt"])

    # torch: flash on contiguous [B, Hkv, S, D] caches; the first holds what table 0 reaches
    try:
        def contiguous(c, t):
            return c[t.long()].reshape(B, nblk * bs, hkv, D)[:, :S].transpose(1, 2).contiguous()

        kv_t = [(contiguous(kc, tables[0]), contiguous(vc, tables[0]))]
        kv_t += [(torch.randn_like(kv_t[0][0]), torch.randn_like(kv_t[0][1])) for _ in range(nbuf - 1)]
        q4 = q[:, :, None, :]

        def torch_call(i):
            kt, vt = kv_t[i]

            def call():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q4, kt, vt, enable_gqa=True)
            return call

        timed("torch", torch_call, decode_bytes(B, S, "bf16"))
        if "bf16" in outs and "torch" in outs:
            row["bf16_max_rel_diff"] = _rel_diff(outs["bf16"], outs["torch"][:, :, 0])
        del kv_t
    except Exception as e:  # noqa: BLE001
        row["torch_error"] = _err_text(e)
    torch.cuda.empty_cache()

    # INT8: the same values quantized per token and head by lowbit's own write
    try:
        kc8 = torch.empty(nb, bs, hkv, D, device="cuda", dtype=torch.int8)
        vc8 = torch.empty_like(kc8)
        ks = torch.empty(nb, bs, hkv, device="cuda")
        vs = torch.empty_like(ks)
        ops.reshape_and_cache(kc.view(-1, hkv, D), vc.view(-1, hkv, D), kc8, vc8,
                              torch.arange(nb * bs, device="cuda"), ks, vs)
        del kc, vc
        torch.cuda.empty_cache()
        timed("int8", lambda i: (lambda: ops.paged_attention(q, kc8, vc8, tables[i], seq_lens, k_scale=ks,
                                                             v_scale=vs)),
              decode_bytes(B, S, "int8"))
        if "int8" in outs and "torch" in outs:
            row["int8_max_rel_diff"] = _rel_diff(outs["int8"], outs["torch"][:, :, 0])
        del kc8, vc8, ks, vs
    except Exception as e:  # noqa: BLE001
        row["int8_error"] = _err_text(e)
    if row.get("bf16_us") and row.get("int8_us"):
        row["int8_speedup"] = row["bf16_us"] / row["int8_us"]
    outs.clear()
    torch.cuda.empty_cache()
    return row


def probe_decode() -> int:
    """Whether the tensor-core decode kernel agrees with the CUDA-core one
    (LOWBIT_CUDA_DECODE=simt) on small paged bf16 and INT8 caches: exit status 0 if so. Run
    in its own process before the benchmark (bench/gpu_check.sh), so a wrong or faulting
    kernel cannot take the benchmark down."""
    from lowbit import ops

    B, S, hq, hkv, D, bs = 4, 1000, DECODE_HQ, DECODE_HKV, HEAD_DIM, BLOCK
    nblk = -(-S // bs)
    kc = torch.randn(B * nblk, bs, hkv, D, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    table = torch.randperm(B * nblk, device="cuda").to(torch.int32).view(B, nblk)
    lens = torch.tensor([S, 1, S // 3, 17], dtype=torch.int32, device="cuda")
    q = torch.randn(B, hq, D, device="cuda", dtype=torch.bfloat16)
    kc8, vc8 = torch.empty_like(kc, dtype=torch.int8), torch.empty_like(vc, dtype=torch.int8)
    ks = torch.empty(B * nblk, bs, hkv, device="cuda")
    vs = torch.empty_like(ks)
    ops.reshape_and_cache(kc.view(-1, hkv, D), vc.view(-1, hkv, D), kc8, vc8,
                          torch.arange(B * nblk * bs, device="cuda"), ks, vs)
    worst = 0.0
    for args, kw in (((q, kc, vc, table, lens), {}), ((q, kc8, vc8, table, lens), {"k_scale": ks, "v_scale": vs})):
        y = ops.paged_attention(*args, **kw).float()
        with env_var("LOWBIT_CUDA_DECODE", "simt"):
            y_simt = ops.paged_attention(*args, **kw).float()
        torch.cuda.synchronize()
        worst = max(worst, _rel_diff(y, y_simt))
    ok = worst < MMA_VS_SIMT_MAX
    log(f"probe decode (tensor cores vs CUDA cores): max rel diff {worst:.2e}: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="JSON output path (required unless --probe)")
    ap.add_argument("--probe", action="store_true",
                    help="only compare the two decode kernels (exit status 1 if they disagree)")
    ap.add_argument("--reps", type=int, default=5, help="timed graph replays per op (default 5)")
    ap.add_argument("--only", choices=["prefill", "decode"], help="run one half only")
    ap.add_argument("--quick", action="store_true", help="one prefill and one decode row (smoke test)")
    args = ap.parse_args(argv)
    if args.probe:
        return probe_decode()
    if not args.out:
        ap.error("--out is required")

    run = start_run("gpu_attention")
    if run is None:
        return 2
    t0, header = run
    device, copy_bw = header["device"], header["copy_bw_GBps"]

    prefill_plan = [] if args.only == "decode" else (PREFILL[1:2] if args.quick else PREFILL)
    decode_plan_ = [] if args.only == "prefill" else (decode_plan([8], [4096]) if args.quick else decode_plan())
    prefill_rows, decode_rows = [], []

    def save(final: bool = False) -> None:  # after every row: a cut-off run still leaves its table
        targets = evaluate_targets(prefill_rows, decode_rows)
        md = table(prefill_rows, decode_rows, copy_bw, device, targets)
        write_result(args.out, {**header, "reps": args.reps, "prefill": prefill_rows, "decode": decode_rows,
                                "targets": targets, "table_md": md}, t0, final=final)

    for i, (B, L, dt) in enumerate(prefill_plan):
        log(f"[prefill {i + 1}/{len(prefill_plan)}] B={B} L={L} {dt} ({time.time() - t0:.0f}s)")
        try:
            r = bench_prefill(B, L, dt, args.reps)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: reported, the run goes on
            r = {"kind": "prefill", "B": B, "L": L, "dtype": dt, "error": _err_text(e)}
            torch.cuda.empty_cache()
        log("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                             if k not in ("kind",)))
        prefill_rows.append(r)
        save()
    for i, (B, S, skip) in enumerate(decode_plan_):
        log(f"[decode {i + 1}/{len(decode_plan_)}] batch={B} tokens={S} ({time.time() - t0:.0f}s)")
        if skip:
            decode_rows.append({"kind": "decode", "B": B, "S": S, "skipped": True,
                                "cache_GB": decode_bytes(B, S, "bf16") / 1e9})
            continue
        try:
            r = bench_decode(B, S, copy_bw, args.reps)
        except Exception as e:  # noqa: BLE001
            r = {"kind": "decode", "B": B, "S": S, "cache_GB": decode_bytes(B, S, "bf16") / 1e9,
                 "bf16_error": _err_text(e), "int8_error": _err_text(e), "torch_error": _err_text(e)}
            torch.cuda.empty_cache()
        log("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                             if k not in ("kind",)))
        decode_rows.append(r)
        save()
    save(final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

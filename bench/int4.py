"""INT4 rows: lowbit.nn.Int4Linear (W4A16, W4A8) against torch's int4, int8 and fp32 paths.

Shapes and M as the INT8 rows (bench/int8.py): Llama-7B's 4096x4096, 11008x4096, 4096x11008 at
M = 1, 16, 512 and SmolLM2-135M's layers at M = 1; weights N x K = out x in features.
lowbit is timed as users call it: an Int4Linear module (asymmetric, group 32 unless the row
says otherwise: "sym" = symmetric Q4_0-style, "g128" = groups of 128), with the codes, scales
and mins of lowbit.ref.int4.quantize_weight_int4 rounded to fp16 (as Int4Linear.from_float does).
Baselines, in the same group:
  torch int4 bf16     aten._weight_int4pack_mm_for_cpu(x bf16, w packed by
                      _convert_weight_to_int4pack_for_cpu, group 32, bf16 scales and zeros):
                      torch's own CPU int4 GEMM, bf16 activations (its best case here); the same
                      weight codes (its zero = m + 8d)
  FBGEMM dyn int8     torch.ao dynamic int8 Linear (bench/int8.py)
  fp32 F.linear       torch.nn.functional.linear in fp32
Bytes counted for lowbit: packed codes + scales + mins (+ activations and outputs).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

import lowbit
from lowbit.formats import int4 as fmt

from .harness import ROOFLINE, Config, Group, Impl, Target
from .int8 import FBGEMM, FP32, Problem, f_linear, fbgemm, method_errors, outlier_problem, plan

TORCH_INT4 = "torch int4 bf16"

TARGETS = [
    Target("W4A8 GEMV M=1 11008x4096 g32 vs torch int4", "w4a8 11008x4096 M=1", TORCH_INT4, 2.5),
    Target("W4A8 GEMV M=1 11008x4096 g32 vs FBGEMM dyn int8", "w4a8 11008x4096 M=1", FBGEMM, 1.4),
    Target("W4A8 GEMV M=1 11008x4096 g32: fraction of the read-bandwidth roofline", "w4a8 11008x4096 M=1",
           ROOFLINE, 0.8),
    Target("W4A16 GEMV M=1 11008x4096 g32 vs torch int4", "w4a16 11008x4096 M=1", TORCH_INT4, 2.0),
    Target("W4A8 GEMM M=512 4096x4096 g32 vs fp32 F.linear", "w4a8 4096x4096 M=512", FP32, 3.0),
]


class Problem4(Problem):
    """A Problem (bench/int8.py) plus its INT4 quantization per (group size, symmetric)."""

    @functools.lru_cache(maxsize=None)
    def int4(self, group: int, symmetric: bool) -> tuple:
        q = lowbit.ref.int4.quantize_weight_int4(self.linear.weight, group, symmetric)
        return (q["codes"], *fmt.round_scales_fp16(q["scales"], q["mins"]))


def lowbit_impl(p: Problem4, scheme: str, row: str, group: int = 32, symmetric: bool = False) -> Impl:
    def make():
        codes, scales, mins = p.int4(group, symmetric)
        mod = lowbit.nn.Int4Linear.from_int4(codes, scales, mins, None, scheme)
        x = p.x
        return lambda: mod(x)

    groups = p.k // group
    s_bytes = 2 * math.prod(fmt.packed_scales_shape(p.n, groups)) * (1 if symmetric else 2)  # fp16 scales (+ mins)
    w_bytes = math.prod(fmt.packed_cpu_shape(p.n, p.k)) + s_bytes
    name = f"lowbit {scheme.upper()}" + (" sym" if symmetric else "") + ("" if group == 32 else f" g{group}")
    return Impl(name, make, w_bytes + p.io_bytes(4, 4), w_bytes, 2 * p.m * p.n * p.k,
                "int8" if scheme == "w4a8" else "fp32", row=row)


def torch_int4(p: Problem4) -> Impl:
    def make():
        codes, scales, mins = p.int4(32, False)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        # aten's int4 weight is (q - 8) * scale + zero, so zero = m + 8 d
        sz = torch.stack([scales, mins + 8 * scales], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
        x = p.x.to(torch.bfloat16)
        return lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)

    w_bytes = p.n * p.k // 2 + 4 * p.n * (p.k // 32)
    return Impl(TORCH_INT4, make, w_bytes + p.io_bytes(2, 2), w_bytes, 2 * p.m * p.n * p.k, "bf16",
                note="aten._weight_int4pack_mm_for_cpu, bf16 activations, bf16 scales and zeros, group 32")


def groups(cfg: Config) -> list:
    out = []
    for n, k, m, hot in plan(cfg.quick):  # the INT8 rows' shapes
        p = Problem4(n, k, m)
        tag = f"{n}x{k} M={m}" + (" hot" if hot else "")
        subjects = [lowbit_impl(p, s, f"{s} {tag}") for s in ("w4a16", "w4a8")]
        if (n, k, m) == (11008, 4096, 1) and not hot:
            subjects += [lowbit_impl(p, "w4a8", f"w4a8 {tag} sym", symmetric=True),
                         lowbit_impl(p, "w4a8", f"w4a8 {tag} g128", group=128),
                         lowbit_impl(p, "w4a16", f"w4a16 {tag} sym", symmetric=True)]
        subjects = [s for s in subjects if cfg.wants(s.row)]
        if not subjects:
            continue
        baselines = [torch_int4(p), fbgemm(p), f_linear(p, torch.float32)]
        out.append(Group(f"int4 {tag}", subjects + baselines, rotate=not hot and m <= 16, roofline=not hot,
                         reference=p.reference, meta={"N": n, "K": k, "M": m, "hot": hot}, max_rel_err=0.15))
    return out


# ---------------------------------------------------------------- accuracy
def accuracy(cfg: Config) -> dict:
    """Relative error vs the exact x @ W^T (float64), as bench/int8.py's accuracy (same activations:
    Gaussian with 4 outlier columns x50, and the same with a per-token spread), for the INT4 schemes
    and their alternatives. The summary isolates W4A8's activation error (vs x @ Wq^T with the
    dequantized INT4 weight): per block of 32 (lowbit) against per token."""
    lin, cols, cases = outlier_problem()
    w = lin.weight
    n, k = w.shape
    m = next(iter(cases.values())).shape[0]

    asym = lowbit.nn.Int4Linear.from_float(lin, "w4a16")
    wq = asym.dequantized_weight().double()

    def per_token_w4a8(xc):
        qx, sx = lowbit.ref.int8.quantize_per_token(xc)
        return (qx.double() * sx.double()[:, None]) @ wq.T

    methods = {
        "lowbit W4A16 g32 asym": asym,
        "lowbit W4A16 g32 asym, clip search": lowbit.nn.Int4Linear.from_float(lin, "w4a16", clip_search=True),
        "lowbit W4A16 g32 sym": lowbit.nn.Int4Linear.from_float(lin, "w4a16", symmetric=True),
        "lowbit W4A16 g128 asym": lowbit.nn.Int4Linear.from_float(lin, "w4a16", group_size=128),
        "lowbit W4A8 g32 asym (act. per 32)": lowbit.nn.Int4Linear.from_float(lin, "w4a8"),
        "W4A8 act. per token (torch, same W)": per_token_w4a8,
        "bf16 F.linear": lambda xc: F.linear(xc.bfloat16(), w.bfloat16()),
    }
    errors = method_errors(methods, cases, w)
    w4a8 = {"per 32": methods["lowbit W4A8 g32 asym (act. per 32)"], "per token": per_token_w4a8}
    act_only = {c: {name: e[c]["frob"] for name, e in method_errors(w4a8, cases, wq).items()} for c in cases}
    return {
        "title": (f"INT4 accuracy ({m}x{k} activations, {n}x{k} Gaussian weights, {len(cols)} activation columns "
                  "x50; error vs exact x @ W^T)"),
        "shape": {"N": n, "K": k, "M": m, "outlier_columns": cols.tolist(), "outlier_factor": 50},
        "cases": list(cases), "metrics": ["frob", "token"], "errors": errors, "activation_only": act_only,
        "summary": "W4A8 activation error alone (vs x @ Wq^T, Frobenius): " + ", ".join(
            f"{c}: per 32 {v['per 32']:.2e}, per token {v['per token']:.2e}" for c, v in act_only.items()),
    }

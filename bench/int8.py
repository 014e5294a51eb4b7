"""INT8 rows: lowbit.nn.Int8Linear (W8A16, W8A8) against torch's fp32 / bf16 / int8 paths.

Shapes are nn.Linear weights written out_features x in_features (N x K): Llama-7B's
4096x4096 (q/k/v/o), 11008x4096 (gate/up), 4096x11008 (down) at M = 1, 16, 512 tokens, and
SmolLM2-135M's 576x576, 1536x576, 576x1536 at M = 1. No bias (as in those models).

lowbit is timed as users call it: the Int8Linear module built by ``from_float`` of an nn.Linear.
Baselines, each timed the same way in the same group:
  fp32 F.linear         torch.nn.functional.linear, fp32 weight and activation
  bf16 F.linear         the same in bf16 (weight and activation)
  FBGEMM dyn int8       torch.ao.nn.quantized.dynamic.Linear from quantize_dynamic (fbgemm engine,
                        per-channel int8 weights like lowbit's; activations quantized per tensor)
  int8pack_mm bf16      aten._weight_int8pack_mm(x, w_int8 [N, K], scales [N]) with bf16 x and
                        scales: its fastest dtype here (fp32 x runs 5-15x slower on this build)
  torch._int_mm*        torch._int_mm on pre-quantized int8 inputs -> int32 (M >= 16 only): the bare
                        int8 GEMM, with no activation quantization and no dequantization
"""
from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F

import lowbit
from lowbit.formats import int8 as fmt

from .harness import Config, Group, Impl, Target

LLAMA = [(4096, 4096), (11008, 4096), (4096, 11008)]   # (out_features N, in_features K)
SMOL = [(576, 576), (1536, 576), (576, 1536)]

FP32, BF16, FBGEMM, INT8PACK, INT_MM = ("fp32 F.linear", "bf16 F.linear", "FBGEMM dyn int8", "int8pack_mm bf16",
                                        "torch._int_mm*")

TARGETS = [
    Target("W8A8 GEMV M=1 11008x4096 vs FBGEMM dyn int8", "w8a8 11008x4096 M=1", FBGEMM, 1.0),
    Target("W8A8 GEMV M=1 11008x4096 vs fp32 F.linear", "w8a8 11008x4096 M=1", FP32, 4.0),
    Target("W8A16 GEMV M=1 11008x4096 vs FBGEMM dyn int8", "w8a16 11008x4096 M=1", FBGEMM, 0.8),
    Target("W8A16 GEMV M=1 11008x4096 vs fp32 F.linear", "w8a16 11008x4096 M=1", FP32, 4.0),
    Target("W8A8 GEMM M=512 4096x4096 vs FBGEMM dyn int8", "w8a8 4096x4096 M=512", FBGEMM, 1.0),
    Target("W8A8 GEMM M=512 4096x4096 vs fp32 F.linear", "w8a8 4096x4096 M=512", FP32, 3.5),
    Target("Int8Linear W8A16 576x576 M=1 hot (per-call overhead) vs fp32 F.linear",
           "w8a16 576x576 M=1 hot", FP32, 1.0),
    Target("Int8Linear W8A8 576x576 M=1 hot (per-call overhead) vs fp32 F.linear",
           "w8a8 576x576 M=1 hot", FP32, 1.0),
]


def _quiet_quantize_dynamic(lin: torch.nn.Linear) -> torch.nn.Module:
    """FBGEMM's dynamic int8 Linear, per-channel weights, from a Sequential holding `lin`."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    torch.backends.quantized.engine = "fbgemm"
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                dtype=torch.qint8)[0]


class Problem:
    """One shape: the float weight, activations and their int8 codes, made on first use."""

    def __init__(self, n: int, k: int, m: int):
        self.n, self.k, self.m = n, k, m

    @functools.cached_property
    def linear(self) -> torch.nn.Linear:
        lin = torch.nn.Linear(self.k, self.n, bias=False)
        lin.weight.data = torch.randn(self.n, self.k) / math.sqrt(self.k)
        return lin.requires_grad_(False)

    @functools.cached_property
    def x(self) -> torch.Tensor:
        return torch.randn(self.m, self.k)

    @functools.cached_property
    def codes(self) -> tuple:
        """lowbit's reference quantization: (x codes, x scales per token, W codes [N, K], W scales)."""
        return (*lowbit.ref.int8.quantize_per_token(self.x),
                *lowbit.ref.int8.quantize_weight_per_channel(self.linear.weight))

    def reference(self) -> torch.Tensor:
        return self.x @ self.linear.weight.T

    def io_bytes(self, x_elt: int, y_elt: int) -> int:
        return self.m * self.k * x_elt + self.m * self.n * y_elt


# ---------------------------------------------------------------- implementations
def lowbit_impl(p: Problem, scheme: str, row: str, x_dtype=torch.float32, via_op: bool = False) -> Impl:
    """Int8Linear.from_float(...)(x); via_op: through torch.ops.lowbit (the dispatcher) instead."""
    op = getattr(torch.ops.lowbit, f"int8_linear_{scheme}")

    def make():
        mod, x = lowbit.nn.Int8Linear.from_float(p.linear, scheme), p.x.to(x_dtype)
        return (lambda: op(x, mod.qweight, mod.scale, None)) if via_op else (lambda: mod(x))

    w_bytes = math.prod(fmt.packed_cpu_shape(p.n, p.k)) + 4 * p.n
    elt = torch.finfo(x_dtype).bits // 8
    name = (f"lowbit {scheme.upper()}" + ("" if x_dtype == torch.float32 else f" {str(x_dtype)[6:]} x")
            + (" (torch.ops)" if via_op else ""))
    return Impl(name, make, w_bytes + p.io_bytes(elt, elt), w_bytes, 2 * p.m * p.n * p.k,
                "int8" if scheme == "w8a8" else "fp32", row=row)


def f_linear(p: Problem, dtype) -> Impl:
    def make():
        w, x = p.linear.weight.to(dtype, copy=True), p.x.to(dtype)
        return lambda: F.linear(x, w)

    elt = torch.finfo(dtype).bits // 8
    w_bytes = elt * p.n * p.k
    return Impl(FP32 if dtype == torch.float32 else BF16, make, w_bytes + p.io_bytes(elt, elt), w_bytes,
                2 * p.m * p.n * p.k, "fp32" if dtype == torch.float32 else "bf16")


def fbgemm(p: Problem) -> Impl:
    def make():
        mod, x = _quiet_quantize_dynamic(p.linear), p.x
        return lambda: mod(x)

    w_bytes = p.n * p.k + 8 * p.n  # int8 codes + per-channel scale / zero point
    return Impl(FBGEMM, make, w_bytes + p.io_bytes(4, 4), w_bytes, 2 * p.m * p.n * p.k, "int8",
                note="per-channel int8 weights, per-tensor dynamic activations (fbgemm)")


def int8pack(p: Problem) -> Impl:
    def make():
        _, _, qw, sw = p.codes
        w, s, x = qw.clone(), sw.to(torch.bfloat16), p.x.to(torch.bfloat16)
        return lambda: torch.ops.aten._weight_int8pack_mm(x, w, s)

    w_bytes = p.n * p.k + 2 * p.n
    return Impl(INT8PACK, make, w_bytes + p.io_bytes(2, 2), w_bytes, 2 * p.m * p.n * p.k, "bf16",
                note="aten._weight_int8pack_mm, bf16 activations and scales")


def int_mm(p: Problem) -> Impl:
    def make():
        qx, _, qw, _ = p.codes
        w = qw.t().contiguous()  # [K, N]: its faster layout here
        return lambda: torch._int_mm(qx, w)

    def to_float(y):
        _, sx, _, sw = p.codes
        return y.float() * sx[:, None] * sw

    w_bytes = p.n * p.k
    return Impl(INT_MM, make, w_bytes + p.m * p.k + 4 * p.m * p.n, w_bytes, 2 * p.m * p.n * p.k, "int8",
                note="bare int8 GEMM on pre-quantized inputs (int32 out): no quantization or dequantization",
                to_float=to_float)


# ---------------------------------------------------------------- the rows
def plan(quick: bool) -> list:
    """(N, K, M, hot) per group; hot: one weight copy, to see per-call overhead."""
    if quick:
        llama = [(n, k, 1) for n, k in LLAMA] + [(4096, 4096, 16), (4096, 4096, 512)]
    else:
        llama = [(n, k, m) for n, k in LLAMA for m in (1, 16, 512)]
    return [(n, k, m, False) for n, k, m in llama] + [(n, k, 1, False) for n, k in SMOL] + [(576, 576, 1, True)]


def groups(cfg: Config) -> list:
    out = []
    for n, k, m, hot in plan(cfg.quick):
        p = Problem(n, k, m)
        tag = f"{n}x{k} M={m}" + (" hot" if hot else "")
        subjects = [lowbit_impl(p, s, f"{s} {tag}") for s in ("w8a16", "w8a8")]
        if (n, k, m) == (11008, 4096, 1) and not hot:
            subjects.append(lowbit_impl(p, "w8a16", f"w8a16 {tag} bf16-x", x_dtype=torch.bfloat16))
        if hot:
            subjects.append(lowbit_impl(p, "w8a8", f"w8a8-op {tag}", via_op=True))
        subjects = [s for s in subjects if cfg.wants(s.row)]
        if not subjects:
            continue
        baselines = [f_linear(p, torch.float32), f_linear(p, torch.bfloat16), fbgemm(p), int8pack(p)]
        if m >= 16:
            baselines.append(int_mm(p))
        out.append(Group(tag, subjects + baselines, rotate=not hot and m <= 16, roofline=not hot,
                         reference=p.reference, meta={"N": n, "K": k, "M": m, "hot": hot}))
    return out


# ---------------------------------------------------------------- accuracy
def outlier_problem(n: int = 2048, k: int = 4096, m: int = 64) -> tuple:
    """The accuracy sections' problem: (Linear with Gaussian weights / sqrt(K), the 4 outlier
    columns, {case name: activations}) with activations Gaussian, 4 columns x50 in every
    token, and the same with each token scaled by a log-uniform factor in [1/16, 16]."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False).requires_grad_(False)
    lin.weight.data = torch.randn(n, k, generator=g) / math.sqrt(k)
    cols = torch.randperm(k, generator=g)[:4]
    x = torch.randn(m, k, generator=g)
    x[:, cols] *= 50
    spread = torch.exp((torch.rand(m, 1, generator=g) * 2 - 1) * math.log(16))
    return lin, cols, {"outlier channels": x, "+ token spread": x * spread}


def method_errors(methods: dict, cases: dict, w: torch.Tensor) -> dict:
    """{method: {case: {"frob", "token"}}}: each method's error vs the exact x @ w^T (float64),
    Frobenius over the whole output and the median over tokens of each token's relative error."""
    errors = {name: {} for name in methods}
    for case, xc in cases.items():
        ref = xc.double() @ w.double().T
        for name, fn in methods.items():
            d = fn(xc).double() - ref
            errors[name][case] = {"frob": float(d.norm() / ref.norm()),
                                  "token": float((d.norm(dim=1) / ref.norm(dim=1)).median())}
    return errors


def accuracy(cfg: Config) -> dict:
    """Relative error vs the exact x @ W^T (float64) with outlier activation channels: Frobenius
    over the whole output ("frob"), and the median over tokens of each token's relative error
    ("token"; a per-tensor scale hurts the small tokens, which the Frobenius norm hides).

    Case "outlier channels": Gaussian x with 4 columns x50, the same columns in every token.
    Case "+ token spread": the same, each token also scaled by a log-uniform factor in
    [1/16, 16] (LLM activations vary per token as well as per channel).
    """
    lin, cols, cases = outlier_problem()
    w = lin.weight
    n, k = w.shape
    m = next(iter(cases.values())).shape[0]

    qw, sw = lowbit.ref.int8.quantize_weight_per_channel(w)

    def per_tensor_w8a8(x):
        sx = x.abs().max() / 127
        qx = torch.round(x / sx).clamp(-127, 127)
        return (qx.double() @ qw.double().T) * sx.double() * sw.double()

    methods = {
        "lowbit W8A16": lowbit.nn.Int8Linear.from_float(lin, "w8a16"),
        "lowbit W8A8 (per-token act.)": lowbit.nn.Int8Linear.from_float(lin, "w8a8"),
        "W8A8 per-tensor act. (torch, same W codes)": per_tensor_w8a8,
        "FBGEMM dyn int8 (per-tensor act.)": _quiet_quantize_dynamic(lin),
        "bf16 F.linear": lambda x: F.linear(x.bfloat16(), w.bfloat16()),
    }
    errors = method_errors(methods, cases, w)
    pt, tok = "W8A8 per-tensor act. (torch, same W codes)", "lowbit W8A8 (per-token act.)"
    metrics = ["frob", "token"]
    ratios = {c: {mt: errors[pt][c][mt] / errors[tok][c][mt] for mt in metrics} for c in cases}
    return {
        "title": (f"INT8 accuracy ({m}x{k} activations, {n}x{k} Gaussian weights, {len(cols)} activation columns "
                  f"x50; error vs exact x @ W^T)"),
        "shape": {"N": n, "K": k, "M": m, "outlier_columns": cols.tolist(), "outlier_factor": 50},
        "cases": list(cases), "metrics": metrics, "errors": errors, "per_tensor_over_per_token": ratios,
        "summary": "per-tensor / per-token W8A8 error: " + ", ".join(
            f"{c}, {mt}: {ratios[c][mt]:.1f}x" for c in cases for mt in metrics),
    }

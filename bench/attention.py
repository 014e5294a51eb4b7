"""Attention rows: lowbit.attention (prefill) and lowbit.ops.paged_attention (decode) against
torch.nn.functional.scaled_dot_product_attention on the same inputs.

  prefill    B=1, H=32, L=S=2048, D=128, causal (Llama-7B-like), fp32 and bf16; SmolLM2-like
             H=9 query / 3 KV heads, L=512, D=64, causal. Baseline: SDPA at the same dtype (GQA
             through enable_gqa; K / V heads repeated on torch 2.4), which on CPU runs torch's own
             flash-attention kernel.
  decode     1 query per sequence, 32 heads, D=128, against 2048 and 8192 cached tokens: lowbit's
             paged cache (block size 16, shuffled block table) in fp32 and INT8, against SDPA on
             contiguous fp32 K/V [1, 32, S, 128]. Caches rotate through > 3x LLC like GEMV weights.
Bytes counted: q + K + V (+ INT8 scales) + out; ops: 4 * H * L * S * D (halved for causal L = S).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import lowbit
from lowbit.ref.attention import torch_sdpa

from .harness import Config, Group, Impl, Target

SDPA_FP32, SDPA_BF16 = "SDPA fp32", "SDPA bf16"
DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16"}

TARGETS = [
    Target("Prefill L=2048 D=128 causal fp32 vs SDPA fp32", "attn prefill H32 L2048 D128 fp32", SDPA_FP32, 1.0),
    Target("Prefill L=2048 D=128 causal bf16 vs SDPA bf16", "attn prefill H32 L2048 D128 bf16", SDPA_BF16, 1.5),
    Target("Decode 2048 tokens, 32 heads, D=128: INT8 paged vs SDPA fp32 contiguous",
           "decode S2048 H32 D128 paged int8", SDPA_FP32, 2.0),
    Target("Decode 2048 tokens, 32 heads, D=128: fp32 paged vs SDPA fp32 contiguous",
           "decode S2048 H32 D128 paged fp32", SDPA_FP32, 0.9),
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def prefill_group(hq: int, hkv: int, L: int, D: int, dtype: torch.dtype, cfg: Config):
    row = f"attn prefill H{hq}" + (f"/{hkv}" if hkv != hq else "") + f" L{L} D{D} {DTYPE_NAME[dtype]}"
    if not cfg.wants(row):
        return None
    g = _gen(L + hq)
    q = torch.randn(1, hq, L, D, generator=g).to(dtype)
    k, v = (torch.randn(1, hkv, L, D, generator=g).to(dtype) for _ in range(2))
    gqa = hq != hkv
    nbytes = (q.numel() * 2 + k.numel() * 2) * q.element_size()
    ops = 4 * hq * L * L * D // 2
    peak = "fp32" if dtype == torch.float32 else "bf16"

    def mine():
        return lambda: lowbit.attention(q, k, v, is_causal=True, enable_gqa=gqa)

    def sdpa():
        return lambda: torch_sdpa(q, k, v, is_causal=True, enable_gqa=gqa)  # (K / V repeated on torch 2.4)

    base = SDPA_FP32 if dtype == torch.float32 else SDPA_BF16
    return Group(row, [Impl("lowbit attention", mine, nbytes, 0, ops, peak, row=row),
                       Impl(base, sdpa, nbytes, 0, ops, peak, note="torch SDPA (CPU flash kernel), same dtype")],
                 rotate=False, reference=lambda: torch_sdpa(q.float(), k.float(), v.float(), is_causal=True,
                                                            enable_gqa=gqa),
                 meta={"kind": "prefill", "H": hq, "Hkv": hkv, "L": L, "D": D, "dtype": str(dtype)})


def decode_group(S: int, H: int, D: int, cfg: Config):
    rows = {f"decode S{S} H{H} D{D} paged {kind}": kind for kind in ("fp32", "int8")}
    rows = {r: k for r, k in rows.items() if cfg.wants(r)}
    if not rows:
        return None
    g = _gen(S)
    q = torch.randn(1, H, D, generator=g)
    K, V = torch.randn(S, H, D, generator=g), torch.randn(S, H, D, generator=g)
    bs = 16
    nblocks = (S + bs - 1) // bs

    def paged(kind):
        def make():
            perm = torch.randperm(nblocks, generator=_gen(S + 1)).to(torch.int32)
            dt = torch.int8 if kind == "int8" else torch.float32
            kc, vc = (torch.zeros(nblocks, bs, H, D, dtype=dt) for _ in range(2))
            ks, vs = (torch.zeros(nblocks, bs, H) for _ in range(2)) if kind == "int8" else (None, None)
            pos = torch.arange(S)
            slots = perm.to(torch.int64)[pos // bs] * bs + pos % bs
            lowbit.ops.reshape_and_cache(K, V, kc, vc, slots, ks, vs)
            bt, sl = perm.view(1, -1), torch.tensor([S], dtype=torch.int32)
            return lambda: lowbit.ops.paged_attention(q, kc, vc, bt, sl, k_scale=ks, v_scale=vs)

        elt = 1 if kind == "int8" else 4
        cache = 2 * S * H * D * elt + (2 * S * H * 4 if kind == "int8" else 0)
        return Impl(f"lowbit paged {kind}", make, cache + 2 * q.numel() * 4, cache, 4 * H * S * D, "fp32",
                    row=next(r for r, k in rows.items() if k == kind),
                    to_float=lambda y: y.view(1, H, 1, D))

    def sdpa():
        k4, v4 = K.transpose(0, 1).unsqueeze(0).contiguous(), V.transpose(0, 1).unsqueeze(0).contiguous()
        q4 = q.view(1, H, 1, D)
        return lambda: F.scaled_dot_product_attention(q4, k4, v4)

    cache32 = 2 * S * H * D * 4
    impls = [paged(k) for k in rows.values()]
    impls.append(Impl(SDPA_FP32, sdpa, cache32 + 2 * q.numel() * 4, cache32, 4 * H * S * D, "fp32",
                      note="torch SDPA on contiguous fp32 K/V [1, H, S, D]"))
    ref = lambda: F.scaled_dot_product_attention(q.view(1, H, 1, D), K.transpose(0, 1)[None], V.transpose(0, 1)[None])
    return Group(f"decode S{S} H{H} D{D}", impls, rotate=True, reference=ref,
                 meta={"kind": "decode", "S": S, "H": H, "D": D}, max_rel_err=0.05)


def groups(cfg: Config) -> list:
    out = [prefill_group(32, 32, 2048, 128, torch.float32, cfg), prefill_group(32, 32, 2048, 128, torch.bfloat16, cfg)]
    if not cfg.quick:
        out += [prefill_group(9, 3, 512, 64, torch.float32, cfg), prefill_group(9, 3, 512, 64, torch.bfloat16, cfg)]
    out += [decode_group(2048, 32, 128, cfg)]
    if not cfg.quick:
        out += [decode_group(8192, 32, 128, cfg)]
    return [g for g in out if g is not None]


def accuracy(cfg: Config) -> dict:
    """INT8 KV cache vs the fp32 cache: relative error of decode outputs against the exact
    (float64) attention, Gaussian K/V, 32 heads, D = 128, 2048 tokens."""
    S, H, D, bs = 2048, 32, 128, 16
    g = _gen(7)
    q = torch.randn(4, H, D, generator=g)
    K, V = torch.randn(4, S, H, D, generator=g), torch.randn(4, S, H, D, generator=g)
    exact = torch.stack([lowbit.ref.attention.attention(q[i].double().view(H, 1, D), K[i].transpose(0, 1).double(),
                                                        V[i].transpose(0, 1).double()).view(H, D) for i in range(4)])
    errors = {}
    for kind in ("fp32", "int8"):
        cache = lowbit.PagedKVCache(1, 4 * S // bs, bs, H, D, cache_dtype=torch.int8 if kind == "int8" else None)
        for i in range(4):
            cache.add(i)
            cache.write(0, K[i], V[i], cache.append(i, S))
        y = cache.attention(0, q, list(range(4))).double()
        d = y - exact
        errors[f"lowbit paged {kind} cache"] = {"decode": {
            "frob": float(d.norm() / exact.norm()),
            "token": float((d.flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)).median())}}
    return {"title": f"KV-cache accuracy (decode, {H} heads, D={D}, {S} Gaussian tokens; error vs float64 attention)",
            "cases": ["decode"], "metrics": ["frob", "token"], "errors": errors, "summary": ""}

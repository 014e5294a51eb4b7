"""Reference attention (explicit softmax in float64): the ground truth for lowbit.attention.

Semantics (lowbit.ops.attention documents the same):

* query [..., Hq, L, D], key [..., Hkv, S, D], value [..., Hkv, S, Dv]; Hq a multiple of Hkv
  (grouped-query attention: query head h reads key/value head h // (Hq / Hkv)).
* scores = scale * q . k^T (scale defaults to 1 / sqrt(D)); attn_mask: boolean (True = may
  attend) or additive (added to the scores), broadcastable to [..., Hq, L, S].
* causal: query i may attend key j <= i + offset, where offset = 0 for "top_left" alignment
  (torch SDPA's is_causal) and S - L for "bottom_right" (FlashAttention >= 2.1: the last query
  sits at the last key, which decoding and chunked prefill need).
* window (left, right): query i may attend key j with i + offset - left <= j <= i + offset + right
  (offset as above, top-left when not causal); -1 = unbounded on that side.
* A query row that may attend no key at all gives zeros (as torch SDPA and FlashAttention do).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# torch's SDPA takes enable_gqa from 2.5 on; lowbit supports torch >= 2.4.
_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def torch_sdpa(query, key, value, enable_gqa: bool = False, **kw) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention with grouped-query heads on any torch
    lowbit supports: enable_gqa where torch has it (without copying K / V), else key and value
    heads repeated so that query head h reads head h // (Hq / Hkv), the same product."""
    if enable_gqa and _SDPA_GQA:
        kw["enable_gqa"] = True
    elif enable_gqa:
        group = query.shape[-3] // key.shape[-3]
        key, value = (t.repeat_interleave(group, dim=-3) for t in (key, value))
    return F.scaled_dot_product_attention(query, key, value, **kw)


def allowed_mask(L: int, S: int, causal: bool, alignment: str, window) -> torch.Tensor:
    """bool [L, S]: which keys each query may attend under causal / window (before attn_mask)."""
    offset = S - L if alignment == "bottom_right" else 0
    i = torch.arange(L).view(L, 1) + offset
    j = torch.arange(S).view(1, S)
    ok = torch.ones(L, S, dtype=torch.bool)
    if causal:
        ok &= j <= i
    if window is not None:
        left, right = window
        if left >= 0:
            ok &= j >= i - left
        if right >= 0:
            ok &= j <= i + right
    return ok


def sdpa_mask(L: int, S: int, causal: bool, alignment: str, window, attn_mask=None) -> torch.Tensor:
    """The single attn_mask that gives torch's SDPA these semantics (causal with either alignment,
    window, and attn_mask combined): bool, or additive with -inf where a key is not allowed.
    Built on the current default device (e.g. inside ``torch.device("cuda")``)."""
    allowed = allowed_mask(L, S, causal, alignment, window)
    if attn_mask is None:
        return allowed
    if attn_mask.dtype == torch.bool:
        return attn_mask & allowed
    return attn_mask.masked_fill(~allowed, float("-inf"))


def attention(query, key, value, attn_mask=None, is_causal=False, scale=None, causal_alignment="top_left",
              window=None, return_lse=False):
    """float64 attention, returned in query's dtype (and the log-sum-exp of the scaled, masked
    scores per query row, float64, -inf for rows that attend nothing, if return_lse)."""
    q, k, v = query.double(), key.double(), value.double()
    hq, hkv = q.shape[-3], k.shape[-3]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=-3)
        v = v.repeat_interleave(hq // hkv, dim=-3)
    L, S = q.shape[-2], k.shape[-2]
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    ok = allowed_mask(L, S, is_causal, causal_alignment, window)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            ok = ok & attn_mask
        else:
            s = s + attn_mask.double()
    s = torch.where(ok, s, torch.full_like(s, -math.inf))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    p = torch.where(torch.isfinite(lse)[..., None], p, torch.zeros_like(p))
    out = (p @ v).to(query.dtype)
    return (out, lse) if return_lse else out

"""Fused scaled dot-product attention (flash-style, never materializing L x S).

Schema (namespace ``lowbit``)::

    attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, bool is_causal, float? scale,
              bool enable_gqa, bool bottom_right, int window_left, int window_right) -> Tensor

The public ``lowbit.attention`` has the signature and semantics of
``torch.nn.functional.scaled_dot_product_attention``, plus two keyword-only options:

* ``causal_alignment``: SDPA's ``is_causal`` aligns the causal mask top-left (query i attends
  keys j <= i); with L < S (decoding, chunked prefill) the queries are usually the *last* L
  positions, which is FlashAttention's (>= 2.1) bottom-right alignment: query i attends
  j <= i + S - L. ``"top_left"`` (default, SDPA's meaning) or ``"bottom_right"``.
* ``window=(left, right)``: a sliding window (FlashAttention's ``window_size``): query i attends
  keys j with i + offset - left <= j <= i + offset + right, offset = S - L for bottom-right
  alignment else 0; -1 leaves that side unbounded. With is_causal the right side is 0 anyway.

query [..., Hq, L, D], key [..., Hkv, S, D], value [..., Hkv, S, Dv] (the same leading dims),
fp32 / fp16 / bf16 (all three the same); Hq == Hkv, or with enable_gqa a multiple of it (query head
h reads key/value head h // (Hq / Hkv)). attn_mask: bool (True = may attend) or additive with
query's dtype, broadcastable to [..., Hq, L, S]; not together with is_causal (as SDPA). Scores,
softmax and the output accumulate in fp32; the output has query's dtype. A query row that may
attend no key gives zeros (as torch's SDPA and FlashAttention do). dropout_p must be 0
(inference kernels): anything else raises ValueError.

On CUDA, fp16 / bf16 with D == Dv in {64, 128}, no attn_mask and 16-byte aligned rows run the
tensor-core prefill kernel (csrc/cuda/attention_flash.cu, FlashAttention-2's scheme; P is
rounded to the input dtype before P.V, as there); everything else with head dims up to 256 runs
the split-KV kernel (csrc/cuda/attention.cu: fp32 arithmetic throughout); larger head dims raise
NotImplementedError.
"""
from __future__ import annotations

import math

import torch

from .. import _native
from . import _check as chk

OP = "attention"
CUDA_MAX_HEAD_DIM = 256  # the CUDA split-KV kernel's per-lane accumulators (csrc/cuda/attention.h)
ALIGNMENTS = ("top_left", "bottom_right")

_lib = torch.library.Library("lowbit", "FRAGMENT")
_lib.define("attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, bool is_causal, float? scale, "
            "bool enable_gqa, bool bottom_right, int window_left, int window_right) -> Tensor")


# ---------------------------------------------------------------- validation
def validate(query, key, value, attn_mask, is_causal, scale, enable_gqa, window_left, window_right) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        chk.float_tensor(t, name, OP)
        if t.dim() < 3:
            raise ValueError(f"lowbit.{OP}: {name} must be [..., heads, seq, head_dim] (at least 3-D), "
                             f"got shape {tuple(t.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"lowbit.{OP}: {name} has dtype {t.dtype} but query has {query.dtype}")
        if t.device != query.device:
            raise ValueError(f"lowbit.{OP}: {name} is on {t.device} but query is on {query.device}")
        if t.dim() != query.dim() or t.shape[:-3] != query.shape[:-3]:
            raise ValueError(f"lowbit.{OP}: {name} has leading (batch) dims {tuple(t.shape[:-3])}, query has "
                             f"{tuple(query.shape[:-3])}")
    hq, hkv = query.shape[-3], key.shape[-3]
    if value.shape[-3] != hkv or value.shape[-2] != key.shape[-2]:
        raise ValueError(f"lowbit.{OP}: value [..., {value.shape[-3]}, {value.shape[-2]}, Dv] must have key's heads "
                         f"and length [..., {hkv}, {key.shape[-2]}, Dv]")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"lowbit.{OP}: key head_dim {key.shape[-1]} differs from query's {query.shape[-1]}")
    if hq != hkv:
        if not enable_gqa:
            raise ValueError(f"lowbit.{OP}: query has {hq} heads and key {hkv}: pass enable_gqa=True for "
                             "grouped-query attention")
        if hkv == 0 or hq % hkv:
            raise ValueError(f"lowbit.{OP}: query heads ({hq}) must be a multiple of key heads ({hkv})")
    if attn_mask is not None:
        chk.tensor(attn_mask, "attn_mask", OP)
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise TypeError(f"lowbit.{OP}: attn_mask must be bool or query's dtype {query.dtype}, got "
                            f"{attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ValueError(f"lowbit.{OP}: attn_mask is on {attn_mask.device} but query is on {query.device}")
        full = (*query.shape[:-1], key.shape[-2])
        try:
            fits = torch.broadcast_shapes(attn_mask.shape, full) == full
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"lowbit.{OP}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"[..., Hq, L, S] = {full}")
        if is_causal:
            raise ValueError(f"lowbit.{OP}: pass either attn_mask or is_causal, not both (as SDPA)")
    check_scalars(scale, window_left, window_right)


def parse_window(window, op: str) -> tuple:
    """None -> (-1, -1); a (left, right) pair as is (checked by check_scalars)."""
    if window is None:
        return -1, -1
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"lowbit.{op}: window must be a (left, right) pair (-1 = unbounded), got {window!r}")
    return window[0], window[1]


def check_scalars(scale, window_left, window_right) -> None:
    """(Also run by the public wrapper: the dispatcher would turn a wrong type into a RuntimeError.)"""
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"lowbit.{OP}: scale must be a finite float or None, got {scale!r}")
    for name, w in (("window left", window_left), ("window right", window_right)):
        if not isinstance(w, int) or isinstance(w, bool) or w < -1:
            raise ValueError(f"lowbit.{OP}: {name} must be an int >= -1 (-1: unbounded), got {w!r}")


def check_head_dims(device, d: int, dv: int, op: str) -> None:
    """The CUDA kernels' head-dim limit (also run by the fake impls, so torch.compile meets it
    while tracing)."""
    if device.type == "cuda" and max(d, dv) > CUDA_MAX_HEAD_DIM:
        raise NotImplementedError(f"lowbit.{op}: on CUDA head dims up to {CUDA_MAX_HEAD_DIM} are supported, got "
                                  f"query {d} / value {dv}")


def _out_shape(query, value) -> tuple:
    return (*query.shape[:-1], value.shape[-1])


# ---------------------------------------------------------------- fake impl
@torch.library.register_fake("lowbit::attention", lib=_lib)
def _attention_fake(query, key, value, attn_mask, is_causal, scale, enable_gqa, bottom_right, window_left,
                    window_right):
    validate(query, key, value, attn_mask, is_causal, scale, enable_gqa, window_left, window_right)
    check_head_dims(query.device, query.shape[-1], value.shape[-1], OP)
    return query.new_empty(_out_shape(query, value))


# ---------------------------------------------------------------- CPU
def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """[..., H, N, E] -> [B, H, N, E] with unit stride along E (a view where possible)."""
    t4 = t.reshape(-1, *t.shape[-3:])
    return t4 if t4.stride(-1) == 1 else t4.contiguous()


def _mask_4d(mask: torch.Tensor, full: tuple) -> torch.Tensor:
    """attn_mask broadcast to [B, Hq, L, S] without copying (zero strides) where the leading dims allow."""
    m = mask.expand(full)
    lead = full[:-3]
    if len(lead) == 1:
        return m
    if len(lead) == 0:
        return m.unsqueeze(0)
    try:
        return m.view(-1, *full[-3:])
    except RuntimeError:  # leading dims that do not collapse: materialize
        return m.reshape(-1, *full[-3:])


def _run(query, key, value, attn_mask, is_causal, scale, enable_gqa, bottom_right, window_left, window_right):
    """Validates, allocates the output and runs the device's kernel (shared arguments in the
    order of the native AttentionParams; each device appends its own tail)."""
    validate(query, key, value, attn_mask, is_causal, scale, enable_gqa, window_left, window_right)
    cuda = query.device.type == "cuda"
    L, S, D, Dv = query.shape[-2], key.shape[-2], query.shape[-1], value.shape[-1]
    check_head_dims(query.device, D, Dv, OP)
    out = query.new_empty(_out_shape(query, value))
    if out.numel() == 0:
        return out
    if S == 0:  # no key at all: every row attends nothing
        return out.zero_()
    q, k, v = _as_4d(query), _as_4d(key), _as_4d(value)
    o = out.view(-1, *out.shape[-3:])
    mask_ptr, mask_dtype, mask_strides = 0, 0, (0, 0, 0, 0)
    if attn_mask is not None:
        m4 = _mask_4d(attn_mask, (*query.shape[:-1], S))
        mask_ptr, mask_dtype, mask_strides = m4.data_ptr(), _native.DTYPE_CODE[m4.dtype], tuple(m4.stride())
    code = _native.DTYPE_CODE[query.dtype]
    args = (q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), code, code, q.shape[0], q.shape[1], k.shape[1], L,
            S, D, Dv, tuple(q.stride()[:3]), tuple(k.stride()[:3]), tuple(v.stride()[:3]), tuple(o.stride()[:3]), 0, 0,
            0, 0, 0, 0, 0, mask_ptr, mask_dtype, mask_strides, resolve_scale(scale, D), int(is_causal),
            int(bottom_right), window_left, window_right)
    if cuda:
        tail, scratch = cuda_tail(query, q.shape[0] * L, q.shape[1], k.shape[1], S, Dv, num_blocks=0)
        st = _native.cuda_module().attention(*args, *tail)
        del scratch  # (freed in stream order: the kernels are queued before any reuse)
    else:
        st = _native._C.attention(*args, _native.get_num_threads())
    _native.check(st, OP)
    return out


def resolve_scale(scale, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def cuda_tail(query, tokens: int, hq: int, hkv: int, max_keys: int, dv: int, num_blocks: int) -> tuple:
    """The CUDA kernel's arguments after the shared ones: num_blocks, tokens, its key-split plan
    and scratch, device, stream; and the scratch tensor (keep it until the call is queued)."""
    dev = query.device
    splits, n = _native.cuda_module().attention_plan(tokens, hq, hkv, max_keys, dv, _native.sm_count(dev))
    scratch = torch.empty(n, dtype=torch.float32, device=dev) if n else None
    return ((num_blocks, tokens, splits, 0 if scratch is None else scratch.data_ptr(), dev.index,
             _native.stream_of(query)), scratch)


_lib.impl("attention", _run, "CPU")
chk.no_backward("attention", _lib, "torch.nn.functional.scaled_dot_product_attention")
_lib.impl("attention", _run, "CUDA")


# ---------------------------------------------------------------- public
def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
              causal_alignment: str = "top_left", window=None) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention's signature and meaning, on lowbit's kernels;
    see this module's docstring for causal_alignment and window."""
    chk.tensors(OP, ("attn_mask",), query=query, key=key, value=value, attn_mask=attn_mask)
    if dropout_p != 0.0:
        raise ValueError(f"lowbit.{OP}: dropout_p must be 0 (inference kernels), got {dropout_p!r}")
    if causal_alignment not in ALIGNMENTS:
        raise ValueError(f"lowbit.{OP}: causal_alignment must be one of {ALIGNMENTS}, got {causal_alignment!r}")
    left, right = parse_window(window, OP)
    for name, v in (("is_causal", is_causal), ("enable_gqa", enable_gqa)):
        if not isinstance(v, bool):
            raise TypeError(f"lowbit.{OP}: {name} must be a bool, got {type(v).__name__}")
    check_scalars(scale, left, right)
    return torch.ops.lowbit.attention(query, key, value, attn_mask, is_causal, scale, enable_gqa,
                                      causal_alignment == "bottom_right", left, right)

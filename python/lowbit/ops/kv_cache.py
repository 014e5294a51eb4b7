"""Paged KV-cache ops (vLLM / IPEX conventions, so users can move over).

Cache tensors are ``[num_blocks, block_size, num_kv_heads, head_dim]`` for keys and values (the
value head dim may differ). A token's *slot* is ``block * block_size + offset``. The cache
dtype is any float dtype (it need not be the model's: float32 activations with a float16 cache
halve the bytes decode reads, as llama.cpp's default F16 cache does; writes round to it), or
``torch.int8`` with one fp32 scale per token and head
(``k_scale`` / ``v_scale``: ``[num_blocks, block_size, num_kv_heads]``): values are quantized on
write (symmetric, scale = amax / 127 over the head dim, round half to even: the rule of
lowbit.ops.int8_quantize_per_token) and dequantized inside attention, as the tiles are loaded.

* ``reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, k_scale=None, v_scale=None)``:
  key / value ``[num_tokens, num_kv_heads, head_dim]`` written to their slots (int64
  ``slot_mapping [num_tokens]``; slot -1 = skip, e.g. padding).
* ``paged_attention(query, key_cache, value_cache, block_tables, seq_lens, scale=None, *,
  query_start_loc=None, k_scale=None, v_scale=None, window=None)``: decode, query
  ``[num_seqs, num_heads, head_dim]``; or chunked prefill, query ``[total_tokens, ...]`` with
  ``query_start_loc`` (int32 ``[num_seqs + 1]``, cumulative): sequence s has the queries
  ``query_start_loc[s] : query_start_loc[s + 1]``, the *last* positions of its ``seq_lens[s]``
  keys, causal within the sequence (bottom-right aligned). ``block_tables`` int32
  ``[num_seqs, max_blocks]``, ``seq_lens`` int32 ``[num_seqs]``. GQA when num_heads is a multiple
  of num_kv_heads. Returns ``[tokens, num_heads, value_head_dim]`` in query's dtype; a sequence
  with no keys (seq_lens 0) gives zeros.
* ``copy_blocks(key_caches, value_caches, block_mapping, k_scales=None, v_scales=None)``:
  copy-on-write; for every layer's caches, block dst becomes a copy of block src for each row
  ``(src, dst)`` of int64 ``block_mapping [n, 2]``.
* ``swap_blocks(src, dst, block_mapping)``: ``dst[d] = src[s]`` for each ``(s, d)`` row, between a
  CPU cache and another (e.g. a GPU one), one tensor at a time.

Every block id, slot and length is validated (ValueError naming the argument): nothing reads or
writes outside the caches.

On CUDA caches the same ops run on the GPU (csrc/cuda/kv_cache.cu, attention.cu): one kernel
writes (and INT8-quantizes, with the same rule) ``reshape_and_cache``'s rows; ``paged_attention``
is the split-KV (flash-decoding) kernel for decode and chunked prefill, head dims up to 256;
``copy_blocks`` / ``swap_blocks`` queue their copies on the current stream (a swap to or from
pinned CPU memory does not wait for the GPU: synchronize before reading it). While a CUDA graph is
being captured the metadata's contents cannot be read, so they are not checked then; the kernels
skip block ids and slots outside the caches themselves, so a bad table still touches nothing
outside them.
"""
from __future__ import annotations

import torch

from .. import _native
from . import _check as chk
from .attention import check_head_dims, check_scalars, cuda_tail, parse_window, resolve_scale

_lib = torch.library.Library("lowbit", "FRAGMENT")
_lib.define("paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
            "Tensor seq_lens, Tensor? query_start_loc, float? scale, Tensor? k_scale, Tensor? v_scale, "
            "int window_left, int window_right) -> Tensor")


# ---------------------------------------------------------------- validation
def check_caches(key_cache, value_cache, k_scale, v_scale, op: str) -> tuple:
    """Validates a (key, value) cache pair (and scales for INT8); returns (num_blocks, block_size, heads)."""
    for name, c in (("key_cache", key_cache), ("value_cache", value_cache)):
        chk.tensor(c, name, op)
        if c.dim() != 4:
            raise ValueError(f"lowbit.{op}: {name} must be [num_blocks, block_size, num_kv_heads, head_dim], got "
                             f"shape {tuple(c.shape)}")
        if c.dtype not in chk.FLOAT_DTYPES and c.dtype != torch.int8:
            raise TypeError(f"lowbit.{op}: {name} must be float32 / float16 / bfloat16 or int8, got {c.dtype}")
        chk.contiguous(c, name, op)
    if value_cache.dtype != key_cache.dtype:
        raise TypeError(f"lowbit.{op}: value_cache is {value_cache.dtype} but key_cache is {key_cache.dtype}")
    if value_cache.shape[:3] != key_cache.shape[:3]:
        raise ValueError(f"lowbit.{op}: value_cache {tuple(value_cache.shape)} and key_cache {tuple(key_cache.shape)} "
                         "must agree in num_blocks, block_size and num_kv_heads")
    if value_cache.device != key_cache.device:
        raise ValueError(f"lowbit.{op}: value_cache is on {value_cache.device} but key_cache is on {key_cache.device}")
    nb, bs, h = key_cache.shape[:3]
    if nb == 0 or bs == 0 or h == 0:
        raise ValueError(f"lowbit.{op}: empty cache of shape {tuple(key_cache.shape)}")
    int8 = key_cache.dtype == torch.int8
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not int8:
            if s is not None:
                raise ValueError(f"lowbit.{op}: {name} is only for INT8 caches (the cache is {key_cache.dtype})")
            continue
        if s is None:
            raise ValueError(f"lowbit.{op}: an INT8 cache needs {name} (fp32 [num_blocks, block_size, num_kv_heads])")
        chk.tensor(s, name, op)
        chk.dtype(s, torch.float32, name, op)
        chk.shape(s, (nb, bs, h), name, op)
        chk.contiguous(s, name, op)
        if s.device != key_cache.device:
            raise ValueError(f"lowbit.{op}: {name} is on {s.device} but key_cache is on {key_cache.device}")
    return nb, bs, h


def _int_tensor(t, name: str, dtype: torch.dtype, dim: int, op: str, device) -> None:
    chk.tensor(t, name, op)
    chk.dtype(t, dtype, name, op)
    if t.dim() != dim:
        raise ValueError(f"lowbit.{op}: {name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"lowbit.{op}: {name} is on {t.device} but the cache is on {device}")


# ---------------------------------------------------------------- reshape_and_cache
def _check_kv(key, value, key_cache, value_cache, op: str) -> None:
    for name, t, c in (("key", key, key_cache), ("value", value, value_cache)):
        chk.float_tensor(t, name, op)
        if t.dim() != 3 or t.shape[1:] != c.shape[2:]:
            raise ValueError(f"lowbit.{op}: {name} must be [num_tokens, {c.shape[2]}, {c.shape[3]}] to fit its cache, "
                             f"got shape {tuple(t.shape)}")
        if t.device != c.device:
            raise ValueError(f"lowbit.{op}: {name} is on {t.device} but its cache is on {c.device}")
    if value.shape[0] != key.shape[0]:
        raise ValueError(f"lowbit.{op}: value has {value.shape[0]} tokens, key {key.shape[0]}")


def _check_slots(slot_mapping, tokens: int, nb: int, bs: int, device, op: str) -> None:
    _int_tensor(slot_mapping, "slot_mapping", torch.int64, 1, op, device)
    if slot_mapping.shape[0] != tokens:
        raise ValueError(f"lowbit.{op}: slot_mapping has {slot_mapping.shape[0]} entries for {tokens} tokens")
    if slot_mapping.numel() and not chk.capturing(device) and bool(((slot_mapping < -1) | (slot_mapping >= nb * bs)).any()):
        bad = slot_mapping[(slot_mapping < -1) | (slot_mapping >= nb * bs)][0]
        raise ValueError(f"lowbit.{op}: slot_mapping holds {int(bad)}, outside [-1, {nb * bs}) (num_blocks * "
                         "block_size; -1 = skip)")


def _write_args(t, cache, scale, slots) -> tuple:
    """kv_cache_write arguments for one of key / value (unit inner stride), without the device's tail."""
    return (t.data_ptr(), _native.DTYPE_CODE[t.dtype], t.shape[0], t.shape[1], t.shape[2], t.stride(0), t.stride(1),
            slots.data_ptr(), cache.data_ptr(), _native.DTYPE_CODE[cache.dtype], 0 if scale is None else scale.data_ptr())


def _write(key, value, key_cache, value_cache, k_scale, v_scale, slots) -> None:
    """Stores key / value at the validated slots (-1: skipped)."""
    cuda = key_cache.device.type == "cuda"
    for t, c, s in ((key, key_cache, k_scale), (value, value_cache, v_scale)):
        t = t if t.stride(-1) == 1 else t.contiguous()
        if cuda:  # the kernel also skips slots outside the cache: nothing is written out of bounds
            st = _native.cuda_module().kv_cache_write(*_write_args(t, c, s, slots), c.shape[0] * c.shape[1],
                                                      c.device.index, _native.stream_of(c))
        else:
            st = _native._C.kv_cache_write(*_write_args(t, c, s, slots), _native.get_num_threads())
        _native.check(st, "reshape_and_cache")


def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    """Writes key / value [num_tokens, num_kv_heads, head_dim] into their cache slots (see module docstring)."""
    op = "reshape_and_cache"
    nb, bs, h = check_caches(key_cache, value_cache, k_scale, v_scale, op)
    _check_kv(key, value, key_cache, value_cache, op)
    _check_slots(slot_mapping, key.shape[0], nb, bs, key_cache.device, op)
    if key.shape[0]:
        _write(key, value, key_cache, value_cache, k_scale, v_scale, slot_mapping.contiguous())


# ---------------------------------------------------------------- paged_attention
def _check_query(query, key_cache, op: str) -> None:
    chk.float_tensor(query, "query", op)
    if query.dim() != 3:
        raise ValueError(f"lowbit.{op}: query must be [tokens, num_heads, head_dim], got shape {tuple(query.shape)}")
    if query.device != key_cache.device:
        raise ValueError(f"lowbit.{op}: query is on {query.device} but key_cache is on {key_cache.device}")
    if query.shape[2] != key_cache.shape[3]:
        raise ValueError(f"lowbit.{op}: query head_dim {query.shape[2]} differs from key_cache's {key_cache.shape[3]}")
    if query.shape[1] % key_cache.shape[2]:
        raise ValueError(f"lowbit.{op}: query heads ({query.shape[1]}) must be a multiple of the cache's kv heads "
                         f"({key_cache.shape[2]})")


def _check_tables(block_tables, seq_lens, query_start_loc, tokens: int, nb: int, bs: int, device, op: str) -> None:
    """The sequences' metadata: every block id used is in [0, nb), queries fit their sequences
    (query_start_loc None: decode, one query per sequence; tokens -1: not known here)."""
    _int_tensor(block_tables, "block_tables", torch.int32, 2, op, device)
    _int_tensor(seq_lens, "seq_lens", torch.int32, 1, op, device)
    n = seq_lens.shape[0]
    if block_tables.shape[0] != n:
        raise ValueError(f"lowbit.{op}: block_tables has {block_tables.shape[0]} rows for {n} sequences (seq_lens)")
    if query_start_loc is None:
        if tokens not in (-1, n):
            raise ValueError(f"lowbit.{op}: decode takes one query per sequence: {tokens} query tokens for {n} "
                             "sequences (pass query_start_loc for chunked prefill)")
    else:
        _int_tensor(query_start_loc, "query_start_loc", torch.int32, 1, op, device)
        if query_start_loc.shape[0] != n + 1:
            raise ValueError(f"lowbit.{op}: query_start_loc must have num_seqs + 1 = {n + 1} entries, got "
                             f"{query_start_loc.shape[0]}")
    chk.contiguous(block_tables, "block_tables", op)
    if n == 0 or chk.capturing(device):
        return
    if bool((seq_lens < 0).any()):
        raise ValueError(f"lowbit.{op}: seq_lens must be >= 0, got {int(seq_lens.min())}")
    need = (seq_lens.to(torch.int64) + bs - 1) // bs
    if bool((need > block_tables.shape[1]).any()):
        raise ValueError(f"lowbit.{op}: seq_lens up to {int(seq_lens.max())} need {int(need.max())} blocks of "
                         f"{bs}, but block_tables has {block_tables.shape[1]} columns")
    used = torch.arange(block_tables.shape[1], device=block_tables.device)[None, :] < need[:, None]
    bad = used & ((block_tables < 0) | (block_tables >= nb))
    if bool(bad.any()):
        raise ValueError(f"lowbit.{op}: block_tables holds block {int(block_tables[bad][0])}, outside the cache's "
                         f"[0, {nb}) blocks")
    if query_start_loc is None:
        return
    qsl = query_start_loc.to(torch.int64)
    qlen = qsl[1:] - qsl[:-1]
    if int(qsl[0]) != 0 or int(qsl[-1]) != tokens or bool((qlen < 0).any()):
        raise ValueError(f"lowbit.{op}: query_start_loc must rise from 0 to the number of query tokens "
                         f"({tokens}), got {query_start_loc.tolist() if n < 10 else '...'}")
    if bool(((qlen > seq_lens.to(torch.int64)) & (seq_lens > 0)).any()):
        raise ValueError(f"lowbit.{op}: a sequence has more queries (query_start_loc) than keys (seq_lens): the "
                         "queries are the last positions of their sequence")


def validate_paged(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, k_scale, v_scale,
                   window_left, window_right, op: str = "paged_attention") -> None:
    nb, bs, _ = check_caches(key_cache, value_cache, k_scale, v_scale, op)
    _check_query(query, key_cache, op)
    check_scalars(None, window_left, window_right)
    _check_tables(block_tables, seq_lens, query_start_loc, query.shape[0], nb, bs, key_cache.device, op)


@torch.library.register_fake("lowbit::paged_attention", lib=_lib)
def _paged_fake(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, k_scale, v_scale,
                window_left, window_right):
    check_head_dims(query.device, query.shape[-1], value_cache.shape[-1], "paged_attention")
    return query.new_empty((query.shape[0], query.shape[1], value_cache.shape[3]))


def _paged_args(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, k_scale, v_scale,
                window_left, window_right, out) -> tuple:
    """The attention kernel's shared arguments (query with unit inner stride, out [tokens, hq, dv]
    contiguous), without the device's tail. Decode (query_start_loc None) is L = 1 query per
    sequence, token b the query of sequence b: no query_start_loc to build or to search."""
    tokens, hq, d = query.shape
    dv = value_cache.shape[3]
    nb, bs, hkv = key_cache.shape[:3]
    if query_start_loc is None:  # (batch, head, query) strides
        L, q_st, out_st, qsl_ptr = 1, (query.stride(0), query.stride(1), 0), (hq * dv, dv, 0), 0
    else:
        L, q_st, out_st = 0, (0, query.stride(1), query.stride(0)), (0, dv, hq * dv)
        qsl_ptr = query_start_loc.data_ptr()
    return (query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(), out.data_ptr(),
            _native.DTYPE_CODE[query.dtype], _native.DTYPE_CODE[key_cache.dtype], seq_lens.shape[0], hq, hkv, L, 0, d,
            dv, q_st, (0, d, hkv * d), (0, dv, hkv * dv), out_st, qsl_ptr, seq_lens.data_ptr(),
            block_tables.data_ptr(), block_tables.shape[1], bs,
            0 if k_scale is None else k_scale.data_ptr(), 0 if v_scale is None else v_scale.data_ptr(), 0, 0,
            (0, 0, 0, 0), resolve_scale(scale, d), 1, 1, window_left, window_right)


def _run_paged(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, k_scale, v_scale,
               window_left, window_right) -> torch.Tensor:
    """The device's kernel on validated arguments (contiguous seq_lens / query_start_loc, or None)."""
    tokens, hq, d = query.shape
    dv = value_cache.shape[3]
    check_head_dims(query.device, d, dv, "paged_attention")
    out = query.new_empty((tokens, hq, dv))
    if tokens == 0 or seq_lens.shape[0] == 0:
        return out
    q = query if query.stride(-1) == 1 else query.contiguous()
    args = _paged_args(q, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, k_scale, v_scale,
                       window_left, window_right, out)
    if query.device.type == "cuda":
        nb, bs, hkv = key_cache.shape[:3]
        tail, scratch = cuda_tail(query, tokens, hq, hkv, block_tables.shape[1] * bs, dv, num_blocks=nb)
        st = _native.cuda_module().attention(*args, *tail)
        del scratch
    else:
        st = _native._C.attention(*args, _native.get_num_threads())
    _native.check(st, "paged_attention")
    return out


def _paged(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, k_scale,
                        v_scale, window_left, window_right):
    # The kernel reads these through raw pointers: dense copies of any strided views.
    seq_lens = seq_lens.contiguous()
    query_start_loc = None if query_start_loc is None else query_start_loc.contiguous()
    validate_paged(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, k_scale, v_scale,
                   window_left, window_right)
    return _run_paged(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, k_scale, v_scale,
                      window_left, window_right)


_lib.impl("paged_attention", _paged, "CPU")
chk.no_backward("paged_attention", _lib, "scaled_dot_product_attention on the gathered keys and values")
_lib.impl("paged_attention", _paged, "CUDA")


def paged_attention(query, key_cache, value_cache, block_tables, seq_lens, scale=None, *, query_start_loc=None,
                    k_scale=None, v_scale=None, window=None) -> torch.Tensor:
    """Attention of query tokens against their sequences' paged caches (see module docstring)."""
    op = "paged_attention"
    chk.tensors(op, ("query_start_loc", "k_scale", "v_scale"), query=query, key_cache=key_cache,
                value_cache=value_cache, block_tables=block_tables, seq_lens=seq_lens,
                query_start_loc=query_start_loc, k_scale=k_scale, v_scale=v_scale)
    left, right = parse_window(window, op)
    check_scalars(scale, left, right)
    return torch.ops.lowbit.paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
                                            scale, k_scale, v_scale, left, right)


class PagedStep:
    """One model step over per-layer paged caches of one geometry (what lowbit.PagedKVCache holds):
    the token slots and the sequences' block tables, lengths and query ranges are validated once
    here, then every layer's write and attention only checks its own tensors (a model calls both
    once per layer and token; re-validating the tables each time cost more than the kernels).

        step = PagedStep(key_caches[0], value_caches[0], k_scales0, v_scales0, block_tables, seq_lens,
                         slot_mapping, query_start_loc=None)   # None: decode, one query per sequence
        step.write(key, value, key_caches[i], value_caches[i], k_scale_i, v_scale_i)  # reshape_and_cache
        out = step.attention(query, key_caches[i], value_caches[i], k_scale_i, v_scale_i, scale)

    The metadata tensors must not change while the step is used (they are read by the kernels).
    """

    def __init__(self, key_cache, value_cache, k_scale, v_scale, block_tables, seq_lens, slot_mapping,
                 query_start_loc=None, window=None):
        op = "PagedStep"
        chk.tensors(op, ("query_start_loc", "k_scale", "v_scale"), key_cache=key_cache, value_cache=value_cache,
                    block_tables=block_tables, seq_lens=seq_lens, slot_mapping=slot_mapping,
                    query_start_loc=query_start_loc, k_scale=k_scale, v_scale=v_scale)
        nb, bs, _ = check_caches(key_cache, value_cache, k_scale, v_scale, op)
        tokens = slot_mapping.shape[0] if slot_mapping.dim() == 1 else -1
        self.window = parse_window(window, op)
        check_scalars(None, *self.window)
        seq_lens = seq_lens.contiguous()
        query_start_loc = None if query_start_loc is None else query_start_loc.contiguous()
        _check_tables(block_tables, seq_lens, query_start_loc, tokens, nb, bs, key_cache.device, op)
        _check_slots(slot_mapping, tokens, nb, bs, key_cache.device, op)
        self.slots = slot_mapping.contiguous()
        self.tables = (block_tables, seq_lens, query_start_loc)
        self.tokens = tokens
        self.layout = (key_cache.shape, value_cache.shape, key_cache.dtype, key_cache.device)

    def _check_caches(self, key_cache, value_cache, k_scale, v_scale, op: str) -> None:
        if (key_cache.shape, value_cache.shape, key_cache.dtype, key_cache.device) != self.layout:
            check_caches(key_cache, value_cache, k_scale, v_scale, op)  # names what is wrong, if anything
            raise ValueError(f"lowbit.{op}: the caches differ in shape, dtype or device from the step's "
                             f"{self.layout[:3]}")
        if not (key_cache.is_contiguous() and value_cache.is_contiguous() and value_cache.dtype == key_cache.dtype):
            check_caches(key_cache, value_cache, k_scale, v_scale, op)
        if key_cache.dtype == torch.int8 or k_scale is not None or v_scale is not None:
            check_caches(key_cache, value_cache, k_scale, v_scale, op)

    def write(self, key, value, key_cache, value_cache, k_scale=None, v_scale=None) -> None:
        """reshape_and_cache of this step's tokens into one layer's caches."""
        op = "PagedStep.write"
        self._check_caches(key_cache, value_cache, k_scale, v_scale, op)
        _check_kv(key, value, key_cache, value_cache, op)
        if key.shape[0] != self.tokens:
            raise ValueError(f"lowbit.{op}: key has {key.shape[0]} tokens, the step {self.tokens}")
        if self.tokens:
            _write(key, value, key_cache, value_cache, k_scale, v_scale, self.slots)

    def attention(self, query, key_cache, value_cache, k_scale=None, v_scale=None, scale=None) -> torch.Tensor:
        """paged_attention of this step's queries against one layer's caches."""
        op = "PagedStep.attention"
        self._check_caches(key_cache, value_cache, k_scale, v_scale, op)
        _check_query(query, key_cache, op)
        if query.shape[0] != self.tokens:
            raise ValueError(f"lowbit.{op}: query has {query.shape[0]} tokens, the step {self.tokens}")
        check_scalars(scale, *self.window)
        return _run_paged(query, key_cache, value_cache, *self.tables, scale, k_scale, v_scale, *self.window)


def bind_step(key_cache, value_cache, k_scale, v_scale, block_tables, seq_lens, query_start_loc, slot_mapping,
              window=None):
    """For a replayed decode step (lowbit.models.replay): the metadata tensors a step reads, whose
    contents change between calls (the callables bound below read them at each call). Checks what
    cannot change now and returns check_contents(), which validates their current contents (call it
    after each update, before the bound callables run: nothing then reads outside the caches)."""
    op = "bind_step"
    nb, bs, _ = check_caches(key_cache, value_cache, k_scale, v_scale, op)
    tokens = slot_mapping.shape[0] if isinstance(slot_mapping, torch.Tensor) and slot_mapping.dim() == 1 else -1
    left, right = parse_window(window, op)
    check_scalars(None, left, right)
    for name, t in (("seq_lens", seq_lens), ("query_start_loc", query_start_loc), ("slot_mapping", slot_mapping)):
        chk.tensor(t, name, op)
        chk.contiguous(t, name, op)

    def check_contents():
        _check_tables(block_tables, seq_lens, query_start_loc, tokens, nb, bs, key_cache.device, op)
        _check_slots(slot_mapping, tokens, nb, bs, key_cache.device, op)

    check_contents()
    return check_contents


def _bound_on_cpu(key_cache, op: str) -> None:
    # The bound callables call the CPU kernels with raw pointers.
    if key_cache.device.type != "cpu":
        raise ValueError(f"lowbit.{op}: bound (replayed) calls run on CPU caches only; the cache is on "
                         f"{key_cache.device}")


def bind_write(key, value, key_cache, value_cache, k_scale, v_scale, slot_mapping):
    """A callable doing reshape_and_cache(key, value, ...) with the current slot_mapping (whose
    contents bind_step's check validates)."""
    op = "reshape_and_cache"
    check_caches(key_cache, value_cache, k_scale, v_scale, op)
    _bound_on_cpu(key_cache, op)
    _check_kv(key, value, key_cache, value_cache, op)
    _int_tensor(slot_mapping, "slot_mapping", torch.int64, 1, op, key_cache.device)
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"lowbit.{op}: slot_mapping has {slot_mapping.shape[0]} entries for {key.shape[0]} tokens")
    if key.stride(-1) != 1 or value.stride(-1) != 1 or not slot_mapping.is_contiguous():
        raise ValueError(f"lowbit.{op}: bound key / value need unit inner stride, slot_mapping contiguous")
    nt = _native.get_num_threads()
    args = [(*_write_args(key, key_cache, k_scale, slot_mapping), nt),
            (*_write_args(value, value_cache, v_scale, slot_mapping), nt)]
    alive = (key, value, key_cache, value_cache, k_scale, v_scale, slot_mapping)

    def run(alive=alive):
        for a in args:
            _native.check(_native._C.kv_cache_write(*a), op)

    return run


def bind_attention(query, key_cache, value_cache, k_scale, v_scale, block_tables, seq_lens, query_start_loc, out,
                   scale=None, window=None):
    """A callable computing paged_attention into out [tokens, heads, value_head_dim] (contiguous),
    reading the metadata tensors' contents at each call (validated by bind_step's check)."""
    op = "paged_attention"
    left, right = parse_window(window, op)
    check_scalars(scale, left, right)
    nb, bs, _ = check_caches(key_cache, value_cache, k_scale, v_scale, op)
    _bound_on_cpu(key_cache, op)
    _check_query(query, key_cache, op)
    if query.stride(-1) != 1:
        raise ValueError(f"lowbit.{op}: a bound query must have unit inner stride")
    want = (query.shape[0], query.shape[1], value_cache.shape[3])
    if not isinstance(out, torch.Tensor) or out.shape != want or out.dtype != query.dtype or not out.is_contiguous():
        raise ValueError(f"lowbit.{op}: out must be a contiguous {query.dtype} tensor of shape {want}")
    _check_tables(block_tables, seq_lens, query_start_loc, query.shape[0], nb, bs, key_cache.device, op)
    args = (*_paged_args(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, k_scale,
                         v_scale, left, right, out), _native.get_num_threads())
    alive = (query, key_cache, value_cache, k_scale, v_scale, block_tables, seq_lens, query_start_loc, out)
    return lambda alive=alive: _native.check(_native._C.attention(*args), op)


# ---------------------------------------------------------------- block copies
def _check_mapping(block_mapping, nb_src: int, nb_dst: int, op: str) -> tuple:
    chk.tensor(block_mapping, "block_mapping", op)
    chk.dtype(block_mapping, torch.int64, "block_mapping", op)
    if block_mapping.dim() != 2 or block_mapping.shape[1] != 2:
        raise ValueError(f"lowbit.{op}: block_mapping must be [n, 2] (src, dst) pairs, got {tuple(block_mapping.shape)}")
    m = block_mapping.to("cpu")
    src, dst = m[:, 0], m[:, 1]
    for name, ids, nb in (("source", src, nb_src), ("destination", dst, nb_dst)):
        if ids.numel() and bool(((ids < 0) | (ids >= nb)).any()):
            raise ValueError(f"lowbit.{op}: block_mapping has a {name} block {int(ids[(ids < 0) | (ids >= nb)][0])} "
                             f"outside [0, {nb})")
    return src, dst


def copy_blocks(key_caches, value_caches, block_mapping, k_scales=None, v_scales=None) -> None:
    """For every layer, block dst of the key / value caches (and INT8 scales) becomes a copy of block src."""
    op = "copy_blocks"
    if not isinstance(key_caches, (list, tuple)) or not isinstance(value_caches, (list, tuple)):
        raise TypeError(f"lowbit.{op}: key_caches and value_caches must be lists of per-layer cache tensors")
    if len(key_caches) != len(value_caches):
        raise ValueError(f"lowbit.{op}: {len(key_caches)} key caches but {len(value_caches)} value caches")
    ks = k_scales if k_scales is not None else [None] * len(key_caches)
    vs = v_scales if v_scales is not None else [None] * len(key_caches)
    if len(ks) != len(key_caches) or len(vs) != len(key_caches):
        raise ValueError(f"lowbit.{op}: k_scales / v_scales must have one entry per layer")
    pairs = []  # every layer is checked before any is touched
    for kc, vc, k_s, v_s in zip(key_caches, value_caches, ks, vs):
        nb, _, _ = check_caches(kc, vc, k_s, v_s, op)
        pairs.append(_check_mapping(block_mapping, nb, nb, op))
    for (src, dst), *tensors in zip(pairs, key_caches, value_caches, ks, vs):
        for t in tensors:
            if t is not None:
                t[dst.to(t.device)] = t[src.to(t.device)]


def swap_blocks(src, dst, block_mapping) -> None:
    """dst[d] = src[s] for each (s, d) row of block_mapping; src and dst may live on different devices."""
    op = "swap_blocks"
    for name, t in (("src", src), ("dst", dst)):
        chk.tensor(t, name, op)
        if t.dim() < 1:
            raise ValueError(f"lowbit.{op}: {name} must have a leading num_blocks dim")
    if src.dtype != dst.dtype or src.shape[1:] != dst.shape[1:]:
        raise ValueError(f"lowbit.{op}: src {src.dtype} {tuple(src.shape)} and dst {dst.dtype} {tuple(dst.shape)} "
                         "must agree in dtype and block shape")
    s, d = _check_mapping(block_mapping, src.shape[0], dst.shape[0], op)
    if src.device == dst.device:
        dst[d.to(dst.device)] = src[s.to(src.device)]
        return
    for i, j in zip(s.tolist(), d.tolist()):  # one copy per block, queued on the current stream
        dst[j].copy_(src[i], non_blocking=True)

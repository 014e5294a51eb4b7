"""lowbit.PagedKVCache: paged key/value caches for a model's layers, with a block allocator.

    cache = lowbit.PagedKVCache(num_layers=32, num_blocks=512, block_size=16, num_kv_heads=8, head_dim=128,
                                dtype=torch.bfloat16)            # cache_dtype=torch.int8: INT8 cache
    cache.add(seq)                                   # a new, empty sequence
    slots = cache.append(seq, n)                     # room for n more tokens: their slots (int64 [n])
    for layer in ...:
        cache.write(layer, key, value, slots)        # key / value [n, num_kv_heads, head_dim]
        out = cache.attention(layer, query, [seq])   # decode; query_start_loc= for chunked prefill
    cache.fork(seq, child)                           # the child shares every block (prefix sharing)
    cache.free(seq)

Blocks are reference counted: fork shares them, and appending into a shared, partly filled last
block first copies it (copy-on-write, through lowbit.ops.copy_blocks). free returns a block to
the free list when its last user is gone. Running out of blocks raises RuntimeError before
anything changes. The tensors (key_caches[layer], value_caches[layer], and for INT8 k_scales /
v_scales) follow lowbit.ops.kv_cache's layout, so the ops can also be used directly.
"""
from __future__ import annotations

import numpy as np
import torch

from ..ops import _check as chk
from ..ops import kv_cache as ops


_NUMPY_OF = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16, torch.int8: np.int8}


def _zeros(shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """Zero-filled cache memory. On the CPU from calloc (numpy.zeros): the OS maps zero pages lazily, so a
    cache costs nothing until it is written; torch.zeros would write every byte, with threads."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.zeros(shape, dtype=_NUMPY_OF[dtype])).view(dtype)


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, cache_dtype=None, value_head_dim=None, device="cpu"):
        for name, v in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"PagedKVCache: {name} must be a positive int, got {v!r}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"PagedKVCache: dtype must be float32, float16 or bfloat16, got {dtype}")
        cache_dtype = dtype if cache_dtype is None else cache_dtype
        if cache_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.int8):
            raise TypeError(f"PagedKVCache: cache_dtype must be float32, float16, bfloat16 or torch.int8, got "
                            f"{cache_dtype}")
        dv = head_dim if value_head_dim is None else value_head_dim
        if not isinstance(dv, int) or isinstance(dv, bool) or dv < 1:
            raise ValueError(f"PagedKVCache: value_head_dim must be a positive int, got {value_head_dim!r}")
        elem = torch.empty(0, dtype=cache_dtype).element_size()
        per_token = num_kv_heads * ((head_dim + dv) * elem + (8 if cache_dtype == torch.int8 else 0))
        chk.allocation(num_layers * num_blocks * block_size * per_token,
                       f"{num_layers} layers x {num_blocks} blocks x {block_size} tokens of cache", "PagedKVCache",
                       device)
        self.num_blocks, self.block_size, self.dtype, self.cache_dtype = num_blocks, block_size, dtype, cache_dtype
        shape_k = (num_blocks, block_size, num_kv_heads, head_dim)
        shape_v = (num_blocks, block_size, num_kv_heads, dv)
        self.key_caches = [_zeros(shape_k, cache_dtype, device) for _ in range(num_layers)]
        self.value_caches = [_zeros(shape_v, cache_dtype, device) for _ in range(num_layers)]
        int8 = cache_dtype == torch.int8
        self.k_scales = [_zeros(shape_k[:3], torch.float32, device) for _ in range(num_layers)] if int8 else None
        self.v_scales = [_zeros(shape_k[:3], torch.float32, device) for _ in range(num_layers)] if int8 else None
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives the lowest id first
        self._refs = [0] * num_blocks
        self._tables: dict = {}   # seq id -> list of block ids
        self._lens: dict = {}     # seq id -> tokens stored

    # ---- bookkeeping
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def __contains__(self, seq) -> bool:
        return seq in self._tables

    def seq_len(self, seq) -> int:
        return self._lens[self._known(seq)]

    def _known(self, seq):
        if seq not in self._tables:
            raise KeyError(f"PagedKVCache: unknown sequence {seq!r}")
        return seq

    def _take(self, n: int) -> list:
        if n > len(self._free):
            raise RuntimeError(f"PagedKVCache: out of cache blocks (need {n}, {len(self._free)} free of "
                               f"{self.num_blocks}); free finished sequences or allocate a larger cache")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def _release(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)

    # ---- sequences
    def add(self, seq) -> None:
        """Registers a new, empty sequence."""
        if seq in self._tables:
            raise ValueError(f"PagedKVCache: sequence {seq!r} already exists")
        self._tables[seq], self._lens[seq] = [], 0

    def append(self, seq, n: int) -> torch.Tensor:
        """Reserves n more token slots for seq (new blocks as needed; a shared, partly filled last
        block is copied first) and returns their slots, int64 [n]. All or nothing."""
        table, length = self._tables[self._known(seq)], self._lens[seq]
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"PagedKVCache: n must be an int >= 0, got {n!r}")
        bs = self.block_size
        shared_tail = length % bs != 0 and self._refs[table[-1]] > 1
        new = (length + n + bs - 1) // bs - len(table)
        fresh = self._take(new + (1 if shared_tail and n > 0 else 0))
        if shared_tail and n > 0:  # copy-on-write of the block this sequence will write into
            copy = fresh.pop()
            ops.copy_blocks(self.key_caches, self.value_caches, torch.tensor([[table[-1], copy]]), self.k_scales,
                            self.v_scales)
            self._release(table[-1])
            table[-1] = copy
        table.extend(fresh)
        pos = torch.arange(length, length + n)
        self._lens[seq] = length + n
        slots = torch.tensor(table, dtype=torch.int64)[pos // bs] * bs + pos % bs
        return slots.to(self.key_caches[0].device)  # the ops want metadata where the caches are

    def fork(self, parent, child) -> None:
        """child starts as a copy of parent, sharing all its blocks (no data is copied)."""
        table = self._tables[self._known(parent)]
        if child in self._tables:
            raise ValueError(f"PagedKVCache: sequence {child!r} already exists")
        for b in table:
            self._refs[b] += 1
        self._tables[child], self._lens[child] = list(table), self._lens[parent]

    def free(self, seq) -> None:
        """Forgets seq; its blocks return to the free list once no other sequence uses them."""
        for b in self._tables.pop(self._known(seq)):
            self._release(b)
        del self._lens[seq]

    # ---- tensors for the ops
    def block_tables(self, seqs) -> torch.Tensor:
        """int32 [len(seqs), max blocks] (unused entries 0)."""
        tables = [self._tables[self._known(s)] for s in seqs]
        out = torch.zeros(len(tables), max([len(t) for t in tables] + [1]), dtype=torch.int32)
        for i, t in enumerate(tables):
            out[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        return out.to(self.key_caches[0].device)

    def seq_lens(self, seqs) -> torch.Tensor:
        return torch.tensor([self.seq_len(s) for s in seqs], dtype=torch.int32, device=self.key_caches[0].device)

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        """Stores key / value [n, num_kv_heads, head_dim] of layer at slots (from append)."""
        ops.reshape_and_cache(key, value, self.key_caches[layer], self.value_caches[layer], slots,
                              None if self.k_scales is None else self.k_scales[layer],
                              None if self.v_scales is None else self.v_scales[layer])

    def attention(self, layer: int, query: torch.Tensor, seqs, scale=None, query_start_loc=None,
                  window=None) -> torch.Tensor:
        """paged_attention of query (one token per sequence, or query_start_loc for several) over seqs."""
        return ops.paged_attention(query, self.key_caches[layer], self.value_caches[layer], self.block_tables(seqs),
                                   self.seq_lens(seqs), scale, query_start_loc=query_start_loc,
                                   k_scale=None if self.k_scales is None else self.k_scales[layer],
                                   v_scale=None if self.v_scales is None else self.v_scales[layer], window=window)

    def step(self, seqs, slots: torch.Tensor, query_start_loc=None, window=None) -> "CacheStep":
        """One forward pass of a model over seqs, whose token slots (from append) are slots:
        the tables are built and validated once (lowbit.ops.PagedStep) and shared by all layers:
        ``step.write(layer, key, value)``, ``step.attention(layer, query, scale)``."""
        return CacheStep(self, ops.PagedStep(self.key_caches[0], self.value_caches[0],
                                             None if self.k_scales is None else self.k_scales[0],
                                             None if self.v_scales is None else self.v_scales[0],
                                             self.block_tables(seqs), self.seq_lens(seqs), slots, query_start_loc,
                                             window))

    def check_invariants(self) -> None:
        """AssertionError if the allocator's books are inconsistent (tests call it after every step)."""
        refs = [0] * self.num_blocks
        for seq, table in self._tables.items():
            assert len(table) == (self._lens[seq] + self.block_size - 1) // self.block_size, seq
            for b in table:
                refs[b] += 1
        assert refs == self._refs, "reference counts"
        assert sorted(self._free) == [b for b in range(self.num_blocks) if refs[b] == 0], "free list"


class CacheStep:
    """PagedKVCache.step's result: a lowbit.ops.PagedStep bound to the cache's layers."""

    def __init__(self, cache: PagedKVCache, step):
        self.cache, self.step = cache, step

    def _layer(self, layer: int) -> tuple:
        c = self.cache
        return (c.key_caches[layer], c.value_caches[layer], None if c.k_scales is None else c.k_scales[layer],
                None if c.v_scales is None else c.v_scales[layer])

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        self.step.write(key, value, *self._layer(layer))

    def attention(self, layer: int, query: torch.Tensor, scale=None) -> torch.Tensor:
        return self.step.attention(query, *self._layer(layer), scale)

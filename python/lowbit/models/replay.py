"""Decode-step replay: a CPU analog of capturing a CUDA graph.

A decode step of a 30-layer model is ~330 kernel calls on the same shapes, buffers and weights
every token. Run eagerly, each call pays Python work (validation, output allocation, pointer
lookups, module dispatch) that costs as much as the small GEMVs themselves. DecodeReplay does
that work once: it preallocates every activation buffer for a batch of B sequences, binds each
kernel to its buffers (``bind`` of the lowbit modules and lowbit.ops.fused / kv_cache: all
arguments checked at bind time) and then runs a step as a flat list of calls. What changes
between steps (token ids, positions, cache slots, block tables, sequence lengths) lives in
metadata buffers that are updated in place and validated before each step, so nothing can read
or write outside the caches. The results are bitwise those of the eager path (same kernels,
same order, same threads); tests/test_models.py checks it.
"""
from __future__ import annotations

import torch

from ..ops import fused as fused_ops
from ..ops import kv_cache as kv_ops


def _bind_linear(module, x: torch.Tensor, y: torch.Tensor):
    if hasattr(module, "bind"):
        return module.bind(x, y)
    if type(module) is torch.nn.Linear:  # float weights: a matmul into y
        w, b = module.weight.detach(), None if module.bias is None else module.bias.detach()
        if b is None:
            return lambda: torch.mm(x, w.t(), out=y)
        return lambda: torch.addmm(b, x, w.t(), out=y)
    return lambda: y.copy_(module(x))  # anything else: correct, just not faster


class DecodeReplay:
    """Decode steps (one new token for each of B sequences) of a lowbit.models.Llama over a
    PagedKVCache. step(ids, positions, slots, seqs) -> logits [B, vocab]."""

    def __init__(self, model, cache, batch: int, max_blocks: int):
        cfg = model.config
        self.model, self.cache, self.B = model, cache, batch
        dt = torch.float32
        hq, hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        B, D = batch, cfg.dim
        self.residual = torch.empty(B, D, dtype=dt)
        h, o, down = torch.empty(B, D, dtype=dt), torch.empty(B, D, dtype=dt), torch.empty(B, D, dtype=dt)
        qkv = torch.empty(B, (hq + 2 * hkv) * hd, dtype=dt)
        attn = torch.empty(B, hq, hd, dtype=dt)
        gu, act = torch.empty(B, 2 * cfg.ffn_dim, dtype=dt), torch.empty(B, cfg.ffn_dim, dtype=dt)
        self.logits = torch.empty(B, cfg.vocab_size, dtype=dt)
        r = cfg.rotary_dim // 2
        self.cos, self.sin = torch.zeros(B, r), torch.zeros(B, r)
        self.slots = torch.zeros(B, dtype=torch.int64)
        self.block_tables = torch.zeros(B, max_blocks, dtype=torch.int32)
        self.seq_lens = torch.ones(B, dtype=torch.int32)
        self.qsl = torch.arange(B + 1, dtype=torch.int32)
        self.slots.copy_(torch.arange(B) * cache.block_size)  # valid until the first update
        self.block_tables[:, 0] = torch.arange(B, dtype=torch.int32) % cache.num_blocks
        kc0, vc0 = cache.key_caches[0], cache.value_caches[0]
        ks = cache.k_scales or [None] * len(cache.key_caches)
        vs = cache.v_scales or [None] * len(cache.key_caches)
        self.check = kv_ops.bind_step(kc0, vc0, ks[0], vs[0], self.block_tables, self.seq_lens, self.qsl, self.slots)

        qkv3 = qkv.view(B, hq + 2 * hkv, hd)
        q, k, v = qkv3[:, :hq], qkv3[:, hq: hq + hkv], qkv3[:, hq + hkv:]
        calls = []
        x, res = self.residual, None  # the first norm reads the embeddings, later ones add the block output
        for i, layer in enumerate(model.layers):
            a = layer.attn
            calls += [
                fused_ops.bind_rms_norm(x, layer.attn_norm, layer.eps, res, h, None if res is None else self.residual),
                _bind_linear(a.wqkv, h, qkv),
                fused_ops.bind_rope(qkv3[:, : hq + hkv], self.cos, self.sin, cfg.rope_neox),
                kv_ops.bind_write(k, v, cache.key_caches[i], cache.value_caches[i], ks[i], vs[i], self.slots),
                kv_ops.bind_attention(q, cache.key_caches[i], cache.value_caches[i], ks[i], vs[i], self.block_tables,
                                      self.seq_lens, self.qsl, attn, a.scale),
                _bind_linear(a.wo, attn.view(B, hq * hd), o),
                fused_ops.bind_rms_norm(o, layer.ffn_norm, layer.eps, self.residual, h, self.residual),
                _bind_linear(layer.ffn.w13, h, gu),
                fused_ops.bind_silu_and_mul(gu, act),
                _bind_linear(layer.ffn.w2, act, down),
            ]
            x, res = down, self.residual
        calls += [fused_ops.bind_rms_norm(x, model.norm, cfg.norm_eps, res, h, self.residual),
                  _bind_linear(model.output, h, self.logits)]
        self.calls = calls

    def step(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, seqs: list) -> torch.Tensor:
        """Runs one decode step; returns the logits buffer [B, vocab] (overwritten by the next step)."""
        cache, B = self.cache, self.B
        if ids.shape != (B,) or positions.shape != (B,) or slots.shape != (B,) or len(seqs) != B:
            raise ValueError(f"DecodeReplay.step: expected {B} sequences, ids / positions / slots of shape ({B},)")
        self.model._check_ids(ids)
        cos, sin = self.model.rope_cache(positions)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        self.slots.copy_(slots)
        tables = cache.block_tables(seqs)
        if tables.shape[1] > self.block_tables.shape[1]:
            raise ValueError(f"DecodeReplay.step: the sequences need {tables.shape[1]} blocks, the replay was built "
                             f"for {self.block_tables.shape[1]}")
        self.block_tables[:, : tables.shape[1]] = tables
        self.seq_lens.copy_(cache.seq_lens(seqs))
        self.check()
        self.residual.copy_(self.model.embedding(ids))
        for call in self.calls:
            call()
        return self.logits

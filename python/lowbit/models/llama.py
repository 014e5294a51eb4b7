"""A Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2) built from lowbit modules.

gpt-fast in spirit: a few small modules, weights in whatever lowbit Linear the loader chose
(lowbit.models.gguf), attention through lowbit.attention (no cache) or the paged KV cache
(lowbit.PagedKVCache + lowbit.ops.paged_attention). Activations are float32 on the CPU.

Every forward is over a flat list of tokens, as vLLM runs batches: ``Step`` carries what all
layers share (RoPE angles of each token's position, and for the paged path the cache slots,
block tables and sequence lengths), computed once per step rather than once per layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..ops.fused import rms_norm_cpu, rope_cpu, silu_and_mul_cpu

from ..ops.attention import attention as lowbit_attention
from .config import LlamaConfig


@dataclass
class Step:
    """What one forward pass shares across layers."""
    cos: torch.Tensor                          # [T, rotary_dim / 2]
    sin: torch.Tensor
    cache: Optional[object] = None             # PagedKVCache.step(...) (None: no cache, causal over [B, S])
    batch: int = 1                             # no-cache path: T = batch * seq


class Embedding(torch.nn.Module):
    """Token embedding kept in the file's type; looked-up rows are dequantized (exactly)."""

    def __init__(self, tensor):
        super().__init__()
        self.kind = tensor.kind
        if self.kind in ("q4_0", "q4_1", "q8_0"):
            c = tensor.canonical()
            self.register_buffer("codes", c["codes"])
            self.register_buffer("scales", c["scales"])
            self.register_buffer("mins", c.get("mins"))
        else:
            self.register_buffer("weight", tensor.float())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.kind in ("f32", "f16", "bf16"):
            return F.embedding(ids, self.weight)
        q = self.codes[ids].float().unflatten(-1, (-1, 32))  # [..., blocks, 32]
        d = self.scales[ids].unsqueeze(-1)
        if self.kind == "q4_0":
            w = (q - 8) * d
        elif self.kind == "q4_1":
            w = q * d + self.mins[ids].unsqueeze(-1)
        else:
            w = q * d
        return w.flatten(-2)


def rope_angles(cfg: LlamaConfig, positions: torch.Tensor) -> tuple:
    """cos, sin [T, rotary_dim / 2] of theta_i = rope_theta^(-2i / rotary_dim) at each position."""
    r = cfg.rotary_dim
    inv = cfg.rope_theta ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]
    return torch.cos(ang).float(), torch.sin(ang).float()


_ROPE_TABLE_CHUNK = 1024


class Attention(torch.nn.Module):
    def __init__(self, cfg: LlamaConfig, wqkv: torch.nn.Module, wo: torch.nn.Module):
        super().__init__()
        self.cfg, self.wqkv, self.wo = cfg, wqkv, wo
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x: torch.Tensor, layer: int, step: Step) -> torch.Tensor:
        cfg = self.cfg
        t, hq, hkv, hd = x.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv = self.wqkv(x).view(t, hq + 2 * hkv, hd)
        rope_cpu(qkv[:, : hq + hkv], step.cos, step.sin, cfg.rope_neox)  # Q and K heads, in place
        q, k, v = qkv[:, :hq], qkv[:, hq: hq + hkv], qkv[:, hq + hkv:]
        if step.cache is None:
            b = step.batch
            s = t // b
            as_bhsd = lambda z: z.reshape(b, s, z.shape[1], hd).transpose(1, 2)
            o = lowbit_attention(as_bhsd(q), as_bhsd(k), as_bhsd(v), is_causal=True, scale=self.scale,
                                 enable_gqa=True)
            o = o.transpose(1, 2).reshape(t, hq * hd)
        else:
            step.cache.write(layer, k, v)
            o = step.cache.attention(layer, q, self.scale).reshape(t, hq * hd)
        return self.wo(o)


class FeedForward(torch.nn.Module):
    """SwiGLU: w2(silu(gate(x)) * up(x)), with gate and up fused into w13."""

    def __init__(self, w13: torch.nn.Module, w2: torch.nn.Module):
        super().__init__()
        self.w13, self.w2 = w13, w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(silu_and_mul_cpu(self.w13(x)))


class Block(torch.nn.Module):
    """Pre-norm residual block. The residual stream is added inside the norms (fused add +
    RMSNorm, as vLLM does): forward takes the previous block's output and the stream before it."""

    def __init__(self, cfg: LlamaConfig, attn_norm: torch.Tensor, attn: Attention, ffn_norm: torch.Tensor,
                 ffn: FeedForward):
        super().__init__()
        self.eps = cfg.norm_eps
        self.attn_norm = torch.nn.Parameter(attn_norm, requires_grad=False)
        self.ffn_norm = torch.nn.Parameter(ffn_norm, requires_grad=False)
        self.attn, self.ffn = attn, ffn

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor], layer: int, step: Step) -> tuple:
        """(output, residual stream before it); residual None: x is the stream itself (first block)."""
        h, residual = rms_norm_cpu(x, self.attn_norm, self.eps, residual)
        h, residual = rms_norm_cpu(self.attn(h, layer, step), self.ffn_norm, self.eps, residual)
        return self.ffn(h), residual


class Llama(torch.nn.Module):
    """model(input_ids [B, S]) -> logits [B, S, vocab] (causal, no cache); generate() for text."""

    def __init__(self, cfg: LlamaConfig, embedding: Embedding, blocks: list, norm: torch.Tensor,
                 output: torch.nn.Module):
        super().__init__()
        self.config = cfg
        self.embedding = embedding
        self.layers = torch.nn.ModuleList(blocks)
        self.norm = torch.nn.Parameter(norm, requires_grad=False)
        self.output = output
        self.gguf_path = None
        self.chat_template = None
        self._tokenizer = None
        self._rope_table = None

    def rope_cache(self, positions: torch.Tensor) -> tuple:
        """rope_angles(config, positions), looked up in a table grown on demand (decode asks every step)."""
        top = int(positions.max()) + 1 if positions.numel() else 0
        if self._rope_table is None or self._rope_table[0].shape[0] < top:
            n = -(-top // _ROPE_TABLE_CHUNK) * _ROPE_TABLE_CHUNK
            self._rope_table = rope_angles(self.config, torch.arange(n))
        cos, sin = self._rope_table
        return cos[positions], sin[positions]

    def _check_ids(self, ids: torch.Tensor) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"Llama: input_ids must be an int64 / int32 tensor, got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"Llama: token ids must lie in [0, {self.config.vocab_size}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")

    def hidden(self, ids: torch.Tensor, step: Step) -> torch.Tensor:
        """Final-normed hidden states [T, dim] of the flat token list ids [T]."""
        x, residual = self.embedding(ids), None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, i, step)
        return rms_norm_cpu(x, self.norm, self.config.norm_eps, residual)[0]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._check_ids(input_ids)
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"Llama: input_ids must be [batch, seq] with seq >= 1, got {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        cos, sin = self.rope_cache(torch.arange(s).repeat(b))
        h = self.hidden(input_ids.reshape(-1), Step(cos, sin, batch=b))
        return self.output(h).reshape(b, s, -1)

    @torch.inference_mode()
    def forward_paged(self, ids: torch.Tensor, positions: torch.Tensor, cache, seqs: list,
                      query_start_loc: Optional[torch.Tensor] = None, slots: Optional[torch.Tensor] = None,
                      last_only: bool = True) -> torch.Tensor:
        """Runs the flat tokens ids [T] (positions [T]) of sequences seqs through the paged cache,
        whose slots (cache.append) are already reserved: slots [T]. Decode: one token per sequence
        (query_start_loc None); prefill: query_start_loc int32 [len(seqs) + 1]. Returns logits of the
        last token of each sequence [len(seqs), vocab] (last_only) or of every token [T, vocab]."""
        self._check_ids(ids)
        cos, sin = self.rope_cache(positions)
        step = Step(cos, sin, cache.step(seqs, slots, query_start_loc))
        h = self.hidden(ids, step)
        if last_only and query_start_loc is not None:
            h = h[query_start_loc[1:].to(torch.int64) - 1]
        return self.output(h)

    # ---- tokenizer and generation
    @property
    def tokenizer(self):
        """The file's tokenizer (transformers' GGUF support; pip install 'lowbit[hf]')."""
        if self._tokenizer is None:
            if self.gguf_path is None:
                raise RuntimeError("Llama.tokenizer: the model was not loaded from a GGUF file")
            from .tokenizer import load_tokenizer
            self._tokenizer = load_tokenizer(self.gguf_path, self.chat_template)
        return self._tokenizer

    def generate(self, prompts, max_new_tokens: int = 128, **kw):
        """See lowbit.models.generate.generate."""
        from .generate import generate
        return generate(self, prompts, max_new_tokens, **kw)

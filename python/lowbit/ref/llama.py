"""Reference Llama-family decoder in plain torch: the ground truth for lowbit.models' tests, and the
"plain torch" baseline of the benchmark. Written for clarity (gpt-fast style), from llama.cpp's
graph (llm_build_llama / llm_build_qwen2), independently of lowbit.models.llama.

    x = token_embd[ids]
    per layer:  h = rmsnorm(x) * attn_norm
                q, k, v = h @ Wq.T (+ bq), h @ Wk.T (+ bk), h @ Wv.T (+ bv)    (qwen2 has biases)
                q, k = rope(q), rope(k)
                x = x + attention(q, k, v) @ Wo.T            causal, GQA, scale 1 / sqrt(head_dim)
                h = rmsnorm(x) * ffn_norm
                x = x + (silu(h @ Wgate.T) * (h @ Wup.T)) @ Wdown.T
    logits = (rmsnorm(x) * output_norm) @ output.T           output = token_embd when absent (tied)

rmsnorm(x) = x / sqrt(mean(x^2) + eps). RoPE (llama.cpp's ggml_rope, on the first rotary_dim dims
of each head; the rest pass through), theta_i = pos * rope_theta^(-2i / rotary_dim):
  "llama" / "mistral" (rope_neox False): rotates adjacent pairs (x[2i], x[2i+1]);
  "qwen2" (rope_neox True): rotates (x[i], x[i + rotary_dim/2]).

Every tensor of the file is dequantized with gguf-py's own ``gguf.quants.dequantize``, so the
reference sees exactly the weights the file holds.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..models.config import LlamaConfig
from .attention import torch_sdpa


def read_fields(reader) -> dict:
    """{key: python value} of a gguf.GGUFReader's metadata (arrays of strings/numbers as lists)."""
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            out[name] = field.contents()
        except Exception:  # noqa: BLE001 - a field gguf-py cannot decode is not needed here
            pass
    return out


def load_reference_weights(path, with_types: bool = False):
    """Read a GGUF file -> (LlamaConfig, {tensor name: float32 tensor}); matmul weights are [out, in].
    with_types: also return {tensor name: GGML type name, e.g. "Q4_0"} as a third item."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    weights, types = {}, {}
    for t in reader.tensors:
        shape = [int(n) for n in reversed(t.shape.tolist())]   # ggml ne = [in, out] -> [out, in]
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        weights[t.name] = torch.from_numpy(w.astype("float32", copy=True)).reshape(shape)
        types[t.name] = t.tensor_type.name
    cfg = LlamaConfig.from_gguf_fields(read_fields(reader), weights["token_embd.weight"].shape[0])
    return (cfg, weights, types) if with_types else (cfg, weights)


QUANT_TYPES = ("Q4_0", "Q4_1", "Q8_0")


def round_to_q8_blocks(x: torch.Tensor, fp16_scale: bool = False) -> torch.Tensor:
    """x [..., K] rounded as int8 activations per block of 32 (K a multiple of 32): per block
    d = max|x| / 127, q = round_half_even(x * (127 / max|x|)) in [-127, 127], returns q * d
    (0 for an all-zero block). fp16_scale: d is stored as fp16, as llama.cpp's block_q8_0 does
    (q is still computed from the fp32 scale, as ggml's quantize_row_q8_0)."""
    b = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / torch.where(amax > 0, amax, 1), 0)
    d = amax / 127
    if fp16_scale:
        b, inv = b.float(), inv.float()
        d = d.float().half().to(x.dtype)
    q = torch.round(b * inv).to(x.dtype)
    return (q * d).reshape(x.shape)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, pos: torch.Tensor, cfg: LlamaConfig) -> torch.Tensor:
    """x [B, H, S, head_dim], pos [S] (absolute positions) -> x rotated (llama.cpp's convention)."""
    d = cfg.rotary_dim
    inv_freq = cfg.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)  # [d/2]
    ang = pos.to(torch.float64)[:, None] * inv_freq[None, :]                          # [S, d/2]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    xr, rest = x[..., :d], x[..., d:]
    if cfg.rope_neox:
        a, b = xr[..., : d // 2], xr[..., d // 2:]
        out = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    else:
        a, b = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return torch.cat([out, rest], dim=-1)


class ReferenceLlama(torch.nn.Module):
    def __init__(self, config: LlamaConfig, weights: dict, dtype: torch.dtype = torch.float64, device=None,
                 int8_inputs=(), fp16_scales: bool = False):
        """int8_inputs: names of linears ("blk.0.attn_q", "output", ...) whose input is rounded to
        int8 blocks of 32 first (round_to_q8_blocks, fp16_scales): the W4A8 / W8A8 emulation of
        lowbit's activations="int8" (fp32 block scales) or of llama.cpp's CPU backend (fp16 ones)."""
        super().__init__()
        self.config = config
        self.int8_inputs = frozenset(int8_inputs)
        self.fp16_scales = fp16_scales
        self.w = {name: t.to(device=device, dtype=dtype) for name, t in weights.items()}
        if "output.weight" not in self.w:
            self.w["output.weight"] = self.w["token_embd.weight"]
        self.dtype = dtype
        self.device = self.w["token_embd.weight"].device

    @classmethod
    def from_gguf(cls, path, dtype: torch.dtype = torch.float64, device=None,
                  int8_activations=False) -> "ReferenceLlama":
        """int8_activations: round the inputs of every linear whose weight is Q4_0 / Q4_1 / Q8_0 in
        the file to int8 blocks of 32 (see __init__'s int8_inputs): True (or "lowbit") with fp32
        block scales, as lowbit's activations="int8"; "llama.cpp" with fp16 block scales, as
        llama.cpp's CPU backend (bit-for-bit for Q8_0 / Q4_0 weights; for Q4_1 llama.cpp's Q8_1
        blocks also round the block sum to fp16, which is not modelled)."""
        if int8_activations not in (False, True, "lowbit", "llama.cpp"):
            raise ValueError(f"int8_activations: expected False, True, 'lowbit' or 'llama.cpp', "
                             f"got {int8_activations!r}")
        cfg, weights, types = load_reference_weights(path, with_types=True)
        if "output.weight" not in types:
            types["output.weight"] = types["token_embd.weight"]
        quantized = [n[:-len(".weight")] for n, t in types.items()
                     if t in QUANT_TYPES and n.endswith(".weight") and n != "token_embd.weight"]
        return cls(cfg, weights, dtype, device, quantized if int8_activations else (),
                   fp16_scales=int8_activations == "llama.cpp")

    def new_cache(self, batch: int, max_len: int) -> list:
        """One (k, v) pair per layer, each [batch, n_kv_heads, max_len, head_dim], written in place."""
        c = self.config
        shape = (batch, c.n_kv_heads, max_len, c.head_dim)
        return [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                 torch.zeros(shape, dtype=self.dtype, device=self.device))
                for _ in range(c.n_layers)]

    def _linear(self, x, name):
        if name in self.int8_inputs:
            x = round_to_q8_blocks(x, self.fp16_scales)
        y = x @ self.w[name + ".weight"].T
        bias = self.w.get(name + ".bias")
        return y if bias is None else y + bias

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, start_pos: int = 0, cache: list | None = None) -> torch.Tensor:
        """input_ids int64 [B, S] at positions start_pos.. -> logits [B, S, vocab] (module dtype).

        Without a cache, attends over the S tokens only (start_pos shifts RoPE positions). With a
        cache (from new_cache), writes this step's K/V at [start_pos, start_pos + S) and attends
        over [0, start_pos + S)."""
        c = self.config
        B, S = input_ids.shape
        hd, nh, nkv = c.head_dim, c.n_heads, c.n_kv_heads
        pos = torch.arange(start_pos, start_pos + S, device=self.device)
        x = self.w["token_embd.weight"][input_ids]
        for i in range(c.n_layers):
            p = f"blk.{i}."
            h = rms_norm(x, self.w[p + "attn_norm.weight"], c.norm_eps)
            q = self._linear(h, p + "attn_q").view(B, S, nh, hd).transpose(1, 2)
            k = self._linear(h, p + "attn_k").view(B, S, nkv, hd).transpose(1, 2)
            v = self._linear(h, p + "attn_v").view(B, S, nkv, hd).transpose(1, 2)
            q, k = rope(q, pos, c), rope(k, pos, c)
            if cache is None:
                mask = torch.ones(S, S, dtype=torch.bool, device=self.device).tril()
            else:
                kc, vc = cache[i]
                kc[:, :, start_pos:start_pos + S] = k
                vc[:, :, start_pos:start_pos + S] = v
                k, v = kc[:, :, :start_pos + S], vc[:, :, :start_pos + S]
                # query j (absolute start_pos + j) sees keys 0 .. start_pos + j
                mask = torch.arange(start_pos + S, device=self.device)[None, :] <= pos[:, None]
            if S == 1:
                mask = None  # one query at the end: it sees every key
            a = torch_sdpa(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(hd), enable_gqa=nh != nkv)
            x = x + self._linear(a.transpose(1, 2).reshape(B, S, nh * hd), p + "attn_output")
            h = rms_norm(x, self.w[p + "ffn_norm.weight"], c.norm_eps)
            gate, up = self._linear(h, p + "ffn_gate"), self._linear(h, p + "ffn_up")
            x = x + self._linear(F.silu(gate) * up, p + "ffn_down")
        x = rms_norm(x, self.w["output_norm.weight"], c.norm_eps)
        return self._linear(x, "output")

    @torch.no_grad()
    def greedy_generate(self, prompt_ids: list, max_new_tokens: int) -> list:
        """Greedy decoding with the KV cache: prefill the prompt, then one token per step (no stop tokens)."""
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        cache = self.new_cache(1, ids.shape[1] + max_new_tokens)
        logits = self(ids, 0, cache)
        out, pos = [], ids.shape[1]
        for _ in range(max_new_tokens):
            tok = int(logits[0, -1].argmax())
            out.append(tok)
            logits = self(torch.tensor([[tok]], device=self.device), pos, cache)
            pos += 1
        return out

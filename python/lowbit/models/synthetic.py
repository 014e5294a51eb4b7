"""Random-weight Llama-family GGUF files, written the way llama.cpp writes them (tests, benchmarks).

``write_synthetic_gguf(path, ...)`` writes a complete model file with ``gguf.GGUFWriter``:

* metadata under llama.cpp's keys (``general.architecture``, ``{arch}.block_count``,
  ``.context_length``, ``.embedding_length``, ``.feed_forward_length``, ``.attention.head_count``,
  ``.attention.head_count_kv``, ``.attention.key_length`` / ``.value_length`` when head_dim is not
  dim / heads, ``.attention.layer_norm_rms_epsilon``, ``.rope.freq_base``,
  ``.rope.dimension_count``, ``.vocab_size``, ``general.file_type``);
* tensors under llama.cpp's names (``token_embd.weight``, ``blk.{i}.attn_norm.weight``,
  ``blk.{i}.attn_{q,k,v,output}.weight``, qwen2: ``blk.{i}.attn_{q,k,v}.bias`` (F32),
  ``blk.{i}.ffn_norm.weight``, ``blk.{i}.ffn_{gate,up,down}.weight``, ``output_norm.weight``,
  ``output.weight`` unless tied). numpy shapes are [out_features, in_features] (ggml ne = [in, out]);
* a GPT-2 style byte-level BPE tokenizer (``tokenizer.ggml.model = "gpt2"``, pre-tokenizer
  ``"gpt-2"``): the 256 byte symbols of GPT-2's ``bytes_to_unicode``, merges that build about a
  hundred frequent English words (with and without their leading space), the special tokens
  ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` (CONTROL), then ``<|filler_N|>`` (NORMAL,
  unreachable by the merges) up to ``vocab_size``.

Weights are random normal (seeded by ``seed``, torch's generator) with scales chosen so that
activations and logits stay O(1) and greedy decoding is neither degenerate nor a coin toss:
linears std 1 / sqrt(fan_in), norm weights 1 + 0.1 N(0, 1), embeddings std 1.6 / sqrt(dim) (the
tied output's logits then have std ~1.6 and the current token's own embedding does not dominate
them), and attn_q / attn_k std (1.5 + 2 / n_layers) / sqrt(fan_in): peaked attention makes the
next token depend on the context, not only on the current token (with flat attention a 2-layer
random net loops on one token), but the deeper the net, the more peaked attention amplifies small
perturbations, so it is tempered with depth. Measured:

* default shape (2 layers, f32, 4 x 32 random ids): logit std ~1.6, median top-1/top-2 margin
  ~0.3, ~1-2% of margins below 0.01; 32 greedy tokens from a 5-token prompt hold ~20 distinct ids;
  int8 activations (W4A8) move logits by ~4% (relative Frobenius).
* SmolLM2-135M shape (30 layers, 9/3 heads, dim 576): logit std ~1.6, margin ~0.27, ~18 distinct
  ids in 24 greedy tokens; int8 activations move logits by ~5% (a trained model: ~1%; at the
  2-layer tuning the 30-layer net would be chaotic: ~40%).

Quantized types are written with ``gguf.quants.quantize`` (gguf-py's numpy port of llama.cpp's
reference quantizers, ~90 M values / s here: the SmolLM2-135M shape takes ~5 s). The files load
in llama.cpp and in transformers' GGUF support, whose logits and tokenizers agree with
lowbit.ref.llama's (tests/test_models.py).
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from .config import ARCHITECTURES, LlamaConfig

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Frequent English words, most frequent first: the merges build each of them (with a leading
# space, then bare) as a chain of prefix merges, truncated to what vocab_size leaves room for.
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there one all we their been has when who will more no if out "
    "so said what up its about into than them can only other new some could time these two may then "
    "do first any my now such like our over man me even most made after also did many before must "
    "through back years where much your way well down should because each just those people how too "
    "little state good very make world still own see men work long get here between both life being "
    "under never day same another know while last might us great old year off come since against go "
    "came right used take three hello model token text"
).split()

_MATMUL_TYPES = ("q4_0", "q4_1", "q8_0", "f32", "f16", "bf16")
_EMB_STD = 1.6      # x 1 / sqrt(dim): token embedding std (also the untied output's)


def _qk_scale(n_layers: int) -> float:
    """attn_q / attn_k std x sqrt(fan_in): 2.5 for 2 layers, ~1.57 for 30 (see the module docstring)."""
    return 1.5 + 2.0 / n_layers


def bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable unicode character map (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + \
        list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_vocab(vocab_size: int):
    """(tokens, token_types, merges) of the synthetic byte-level BPE vocabulary."""
    import gguf

    b2u = bytes_to_unicode()
    byte_tokens = [b2u[b] for b in range(256)]
    n_fixed = len(byte_tokens) + len(SPECIAL_TOKENS)
    if vocab_size < n_fixed:
        raise ValueError(f"vocab_size: {vocab_size} is too small; the synthetic vocabulary needs at least "
                         f"{n_fixed} (256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
    budget = vocab_size - n_fixed
    known = set(byte_tokens)
    merges, merged = [], []
    for word in WORDS:
        for piece in (" " + word, word):
            sym = "".join(b2u[b] for b in piece.encode("utf-8"))
            left = sym[0]
            for ch in sym[1:]:
                new = left + ch
                if new not in known:
                    if len(merged) == budget:
                        break
                    known.add(new)
                    merges.append(f"{left} {ch}")
                    merged.append(new)
                left = new
    tokens = byte_tokens + merged + list(SPECIAL_TOKENS)
    types = [gguf.TokenType.NORMAL] * (len(byte_tokens) + len(merged)) + [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
    n_fill = vocab_size - len(tokens)
    tokens += [f"<|filler_{i}|>" for i in range(n_fill)]
    types += [gguf.TokenType.NORMAL] * n_fill
    return tokens, [int(t) for t in types], merges


def _qtype(name: str, what: str):
    import gguf

    try:
        return gguf.GGMLQuantizationType[name.upper()]
    except KeyError:
        raise ValueError(f"{what}: unknown GGML type {name!r}; expected one of {', '.join(_MATMUL_TYPES)} "
                         f"(or another GGML type, e.g. q5_0, to test loaders)") from None


def _encode(w: np.ndarray, qtype):
    """float32 [out, in] -> (array, raw_dtype) for GGUFWriter.add_tensor."""
    import gguf
    from gguf import GGMLQuantizationType as T

    if qtype == T.F32:
        return np.ascontiguousarray(w, dtype=np.float32), None
    if qtype == T.F16:
        return w.astype(np.float16), None
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if w.shape[-1] % block:
        raise ValueError(f"{qtype.name}: the input dimension {w.shape[-1]} is not a multiple of its block "
                         f"size {block}")
    try:
        return gguf.quants.quantize(w, qtype), qtype
    except NotImplementedError:
        # gguf-py has no quantizer for this type (K-quants, IQ*): write all-zero blocks, a valid
        # tensor of that type (every scale 0), so that loaders can be tested on rejecting it
        nbytes = gguf.GGML_QUANT_SIZES[qtype][1]
        return np.zeros((w.shape[0], w.shape[1] // block * nbytes), dtype=np.uint8), qtype


def write_synthetic_gguf(path, *, arch: str = "llama", vocab_size: int = 512, dim: int = 64, n_layers: int = 2,
                         n_heads: int = 4, n_kv_heads: int = 2, head_dim: int | None = None, ffn_dim: int = 128,
                         rope_theta: float = 10000.0, norm_eps: float = 1e-5, context_length: int = 2048,
                         tensor_type: str = "q4_1", embedding_type: str | None = None, tied: bool = True,
                         qkv_bias: bool | None = None, seed: int = 0, chat_template: str | None = None,
                         rope_dim: int | None = None) -> LlamaConfig:
    """Write a random-weight Llama-family GGUF to ``path``; return its LlamaConfig.

    tensor_type: GGML type of the 2-D matmul weights ("q4_0", "q4_1", "q8_0", "f32", "f16", "bf16";
    any other GGML type is accepted too, to make files a loader must reject: quantized with
    gguf.quants where it can (e.g. "q5_0"), else all-zero blocks (e.g. "q6_k", whose 256-element
    blocks need dims that are multiples of 256)). embedding_type (default tensor_type): type of
    token_embd (and output when not tied). Norms and biases are always F32. qkv_bias (default:
    arch == "qwen2") adds F32 Q/K/V biases. rope_dim (default head_dim) is written as
    rope.dimension_count (llama.cpp refuses rope_dim != head_dim for "llama": "invalid n_rot";
    lowbit and lowbit.ref.llama support it). chat_template (a Jinja string, e.g. CHATML_TEMPLATE) is written as
    tokenizer.chat_template and makes <|im_end|> the eos token (as SmolLM2 does); otherwise
    eos = bos = <|endoftext|>. Raises ValueError for a vocab_size below 259 (bytes + specials),
    an unknown type or architecture. ~5 s for the SmolLM2-135M shape.
    """
    import gguf
    from gguf import GGMLQuantizationType as T

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch: unsupported architecture {arch!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    head_dim = head_dim or dim // n_heads
    rope_dim = rope_dim or head_dim
    qkv_bias = (arch == "qwen2") if qkv_bias is None else bool(qkv_bias)
    wtype = _qtype(tensor_type, "tensor_type")
    etype = _qtype(embedding_type or tensor_type, "embedding_type")
    tokens, token_types, merges = build_vocab(vocab_size)
    bos = tokens.index("<|endoftext|>")
    eos = tokens.index("<|im_end|>") if chat_template else bos
    f32 = lambda v: float(np.float32(v))  # noqa: E731 - GGUF stores these as float32
    # the config as LlamaConfig.from_gguf_fields reads it back from the file
    cfg = LlamaConfig(arch=arch, vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads,
                      n_kv_heads=n_kv_heads, head_dim=head_dim, ffn_dim=ffn_dim, norm_eps=f32(norm_eps),
                      rope_theta=f32(rope_theta), rope_dim=rope_dim, context_length=context_length,
                      bos_token_id=bos, eos_token_id=eos)

    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0, mean=0.0):
        return (torch.randn(*shape, generator=g) * std + mean).numpy()

    w = gguf.GGUFWriter(os.fspath(path), arch)
    w.add_name(f"synthetic-{arch}")
    w.add_block_count(n_layers)
    w.add_context_length(context_length)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn_dim)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    if head_dim != dim // n_heads or dim % n_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(norm_eps)
    w.add_rope_freq_base(rope_theta)
    w.add_rope_dimension_count(rope_dim)
    w.add_vocab_size(vocab_size)
    file_types = {T.F32: gguf.LlamaFileType.ALL_F32, T.F16: gguf.LlamaFileType.MOSTLY_F16,
                  T.BF16: gguf.LlamaFileType.MOSTLY_BF16, T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
                  T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}
    if wtype in file_types:
        w.add_file_type(file_types[wtype])

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)

    def matmul(name, out_f, in_f, qtype=wtype, scale=1.0):
        arr, raw = _encode(randn(out_f, in_f, std=scale / math.sqrt(in_f)), qtype)
        w.add_tensor(name, arr, raw_dtype=raw)

    def norm(name, arr):
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))

    arr, raw = _encode(randn(vocab_size, dim, std=_EMB_STD / math.sqrt(dim)), etype)
    w.add_tensor("token_embd.weight", arr, raw_dtype=raw)
    q_out, kv_out = n_heads * head_dim, n_kv_heads * head_dim
    qk = _qk_scale(n_layers)
    for i in range(n_layers):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight", randn(dim, std=0.1, mean=1.0))
        matmul(p + "attn_q.weight", q_out, dim, scale=qk)
        matmul(p + "attn_k.weight", kv_out, dim, scale=qk)
        matmul(p + "attn_v.weight", kv_out, dim)
        if qkv_bias:
            norm(p + "attn_q.bias", randn(q_out, std=0.2))
            norm(p + "attn_k.bias", randn(kv_out, std=0.2))
            norm(p + "attn_v.bias", randn(kv_out, std=0.2))
        matmul(p + "attn_output.weight", dim, q_out)
        norm(p + "ffn_norm.weight", randn(dim, std=0.1, mean=1.0))
        matmul(p + "ffn_gate.weight", ffn_dim, dim)
        matmul(p + "ffn_up.weight", ffn_dim, dim)
        matmul(p + "ffn_down.weight", dim, ffn_dim)
    norm("output_norm.weight", randn(dim, std=0.1, mean=1.0))
    if not tied:
        arr, raw = _encode(randn(vocab_size, dim, std=_EMB_STD / math.sqrt(dim)), etype)
        w.add_tensor("output.weight", arr, raw_dtype=raw)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return cfg

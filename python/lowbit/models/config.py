"""LlamaConfig: the shapes and constants of a Llama-family decoder, read from GGUF metadata.

GGUF keys (llama.cpp's names, ``{arch}`` = general.architecture)::

    {arch}.block_count, .embedding_length, .feed_forward_length, .attention.head_count,
    .attention.head_count_kv (default head_count), .attention.key_length (default dim / heads),
    .attention.layer_norm_rms_epsilon, .rope.freq_base (default 10000),
    .rope.dimension_count (default head_dim), .context_length, .vocab_size (default: rows of
    token_embd), tokenizer.ggml.bos_token_id / eos_token_id

RoPE pairs: llama.cpp rotates adjacent pairs (x[2i], x[2i+1]) for "llama" / "mistral" (their
converter permutes the Q/K rows of Hugging Face checkpoints into that order) and the two halves
(x[i], x[i + d/2], "NeoX" style) for "qwen2"; ``rope_neox`` records which.
"""
from __future__ import annotations

from dataclasses import dataclass

# architecture -> rotates the two halves (NeoX) rather than adjacent pairs
ARCHITECTURES = {"llama": False, "mistral": False, "qwen2": True}


@dataclass(frozen=True)
class LlamaConfig:
    arch: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_dim: int = 0            # rotated dims per head (0: head_dim)
    context_length: int = 2048
    bos_token_id: int = -1       # -1: none in the file
    eos_token_id: int = -1

    @property
    def rope_neox(self) -> bool:
        return ARCHITECTURES[self.arch]

    @property
    def rotary_dim(self) -> int:
        return self.rope_dim or self.head_dim

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"LlamaConfig: unsupported architecture {self.arch!r}; supported: "
                             f"{', '.join(sorted(ARCHITECTURES))}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                     "context_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"LlamaConfig: {name} must be a positive int, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LlamaConfig: n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                             f"({self.n_kv_heads})")
        if not (0 < self.rotary_dim <= self.head_dim) or self.rotary_dim % 2:
            raise ValueError(f"LlamaConfig: rope_dim {self.rope_dim} must be even and at most head_dim "
                             f"{self.head_dim}")
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError(f"LlamaConfig: norm_eps and rope_theta must be > 0, got {self.norm_eps}, "
                             f"{self.rope_theta}")

    @classmethod
    def from_gguf_fields(cls, fields: dict, vocab_rows: int) -> "LlamaConfig":
        """From a {key: python value} dict of GGUF metadata (see lowbit.models.gguf.read_metadata);
        vocab_rows: rows of token_embd (used when the file has no vocab_size)."""
        arch = fields.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; lowbit.models supports "
                             f"{', '.join(sorted(ARCHITECTURES))}")

        def get(key, default=None, kind=int):
            v = fields.get(f"{arch}.{key}", default)
            if v is None:
                raise ValueError(f"GGUF metadata: missing {arch}.{key}")
            try:
                return kind(v)
            except (TypeError, ValueError):
                raise ValueError(f"GGUF metadata: {arch}.{key} = {v!r} is not a {kind.__name__}") from None

        dim, heads = get("embedding_length"), get("attention.head_count")
        head_dim = get("attention.key_length", dim // heads if heads else 0)
        return cls(arch=arch, vocab_size=get("vocab_size", vocab_rows), dim=dim, n_layers=get("block_count"),
                   n_heads=heads, n_kv_heads=get("attention.head_count_kv", heads), head_dim=head_dim,
                   ffn_dim=get("feed_forward_length"),
                   norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5, float),
                   rope_theta=get("rope.freq_base", 10000.0, float), rope_dim=get("rope.dimension_count", 0),
                   context_length=get("context_length", 2048),
                   bos_token_id=int(fields.get("tokenizer.ggml.bos_token_id", -1)),
                   eos_token_id=int(fields.get("tokenizer.ggml.eos_token_id", -1)))

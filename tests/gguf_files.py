"""Small GGUF files for the model tests (written once per session by test_models.py's fixtures).

VARIANTS: name -> write_synthetic_gguf keyword arguments. All share the default small shape
(vocab 512, dim 64, 2 layers, 4 heads / 2 KV heads, head_dim 16, ffn 128) unless they say otherwise.
Bad files (not GGUF, truncated, unsupported type or architecture) come from the write_* helpers.
"""
from __future__ import annotations

import os

import numpy as np

from lowbit.models.synthetic import CHATML_TEMPLATE, write_synthetic_gguf

VARIANTS = {
    "q4_0": dict(tensor_type="q4_0"),
    # SmolLM2-135M-Instruct Q4_1's mix: Q4_1 matmuls, Q8_0 tied embedding, ChatML template
    "q4_1": dict(tensor_type="q4_1", embedding_type="q8_0", chat_template=CHATML_TEMPLATE),
    "q8_0": dict(tensor_type="q8_0", tied=False),
    "f32": dict(tensor_type="f32"),
    "f16": dict(tensor_type="f16"),
    "q4_0-f16emb": dict(tensor_type="q4_0", embedding_type="f16", tied=False),
    "q8_0-bf16emb": dict(tensor_type="q8_0", embedding_type="bf16"),
    # NeoX RoPE + Q/K/V biases
    "qwen2": dict(arch="qwen2", tensor_type="q4_1", tied=False),
    "qwen2-f32": dict(arch="qwen2", tensor_type="f32"),
    # head_dim 32 != dim / heads (key_length in the metadata), MQA (1 KV head), another rope base
    "mqa-hd32": dict(tensor_type="q8_0", n_heads=4, n_kv_heads=1, head_dim=32, rope_theta=500000.0),
    # partial RoPE (rope.dimension_count 8 < head_dim 16): lowbit and the reference support it; llama.cpp
    # rejects it for "llama" ("invalid n_rot"), transformers ignores it
    "rope8": dict(tensor_type="q4_0", rope_dim=8),
}


def write_variant(directory, name: str) -> tuple:
    """Writes VARIANTS[name] into directory -> (path, LlamaConfig)."""
    path = os.path.join(os.fspath(directory), f"{name}.gguf")
    seed = sorted(VARIANTS).index(name)
    cfg = write_synthetic_gguf(path, seed=seed, **VARIANTS[name])
    return path, cfg


def write_unsupported_arch(path, arch: str = "gpt2") -> None:
    """A small GGUF whose general.architecture is arch (with gpt2-style metadata and tensors)."""
    import gguf

    w = gguf.GGUFWriter(os.fspath(path), arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(256)
    w.add_head_count(4)
    w.add_layer_norm_eps(1e-5)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((512, 64), dtype=np.float32))
    w.add_tensor("position_embd.weight", rng.standard_normal((128, 64), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    w.add_tensor("output_norm.bias", np.zeros(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_truncated(src, dst, keep: float) -> None:
    """dst = the first keep fraction of src's bytes (keep < 1)."""
    data = open(src, "rb").read()
    with open(dst, "wb") as f:
        f.write(data[: int(len(data) * keep)])

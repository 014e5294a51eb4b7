"""End-to-end models on lowbit kernels: a Llama-family decoder loaded from GGUF files.

    model = lowbit.models.load_gguf("SmolLM2-135M-Instruct-Q4_1.gguf")
    res = model.generate("The capital of France is", max_new_tokens=32)
    print(res.text[0], res.decode_tok_s)
"""
from .config import LlamaConfig
from .generate import GenerationResult, generate
from .gguf import SUPPORTED_TYPES, load_gguf, read_gguf
from .llama import Llama

__all__ = ["LlamaConfig", "Llama", "load_gguf", "read_gguf", "generate", "GenerationResult", "SUPPORTED_TYPES"]

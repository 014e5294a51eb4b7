"""Drop-in modules: quantized Linear layers (attention and KV caches come later)."""
from .linear import Int4Linear, Int8Linear

__all__ = ["Int8Linear", "Int4Linear"]

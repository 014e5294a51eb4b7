"""Drop-in modules: quantized Linear layers and the paged KV cache."""
from .kv_cache import PagedKVCache
from .linear import Int4ActOrderLinear, Int4Linear, Int8BlockLinear, Int8Linear

__all__ = ["Int8Linear", "Int4Linear", "Int4ActOrderLinear", "Int8BlockLinear", "PagedKVCache"]

"""lowbit's operators, registered with torch.library (namespace ``lowbit``).

Each module defines its ops' schemas, fake (meta) implementations for
torch.compile, input validation with clear messages, and the CPU / CUDA
implementations that call the native kernels.
"""
from . import attention, fused, int4, int8, kv_cache  # noqa: F401  (register torch.ops.lowbit.*)
from .fused import rms_norm, rope_, silu_and_mul
from .int4 import int4_linear_w4a8, int4_linear_w4a16
from .int8 import int8_linear_w8a8, int8_linear_w8a16, int8_quantize_per_token
from .kv_cache import PagedStep, copy_blocks, paged_attention, reshape_and_cache, swap_blocks

__all__ = ["int8_linear_w8a16", "int8_linear_w8a8", "int8_quantize_per_token", "int4_linear_w4a16",
           "int4_linear_w4a8", "reshape_and_cache", "paged_attention", "PagedStep", "copy_blocks", "swap_blocks",
           "rms_norm", "silu_and_mul", "rope_"]

"""lowbit: hand-written low-bit kernels for LLM inference, as drop-in torch modules.

    import lowbit
    model = lowbit.quantize(model, "w8a8")     # every nn.Linear -> lowbit.nn.Int8Linear
    python -m lowbit.info                      # build, ISA levels, threads, CUDA
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import _native, formats, ops, ref  # noqa: F401  (ops registers torch.ops.lowbit.*)
from ._native import (
    best_cpu_isa,
    cpu_isa,
    get_num_threads,
    set_cpu_isa,
    set_num_threads,
    supported_cpu_isas,
)
from . import nn  # noqa: E402
from .nn import PagedKVCache  # noqa: E402
from .ops.attention import attention  # noqa: E402
from .quantize import SCHEMES, quantize  # noqa: E402

__all__ = [
    "quantize",
    "attention",
    "PagedKVCache",
    "SCHEMES",
    "nn",
    "ops",
    "ref",
    "formats",
    "set_num_threads",
    "get_num_threads",
    "cpu_isa",
    "set_cpu_isa",
    "best_cpu_isa",
    "supported_cpu_isas",
    "__version__",
]

"""The bridge to the compiled kernels: loading, status codes, dtypes, ISA and threads.

`lowbit._C` (CPU) is always built. `lowbit._cuda` is imported lazily, on the first
CUDA call, so that `import lowbit` works on machines without a GPU or driver;
`cuda_unavailable_reason()` says why it can't be used.
"""
from __future__ import annotations

import os
import threading

import torch

from . import _C

# lowbit::Status (csrc/include/lowbit/status.h)
OK, INVALID_ARGUMENT, UNSUPPORTED_ISA, OUT_OF_MEMORY, CUDA_ERROR = range(5)
_STATUS_TEXT = {
    INVALID_ARGUMENT: "invalid argument",
    UNSUPPORTED_ISA: "ISA level not supported by this CPU",
    OUT_OF_MEMORY: "out of memory",
    CUDA_ERROR: "CUDA error",
}

# lowbit::DType
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.bool: 3, torch.int8: 4}


def check(status: int, op: str) -> None:
    """Turn a native status code into a Python exception."""
    if status == OK:
        return
    text = _STATUS_TEXT.get(status, f"status {status}")
    if status == OUT_OF_MEMORY:
        raise MemoryError(f"lowbit.{op}: {text}")
    if status == CUDA_ERROR:
        detail = _cuda_mod.last_error() if _cuda_mod is not None else ""
        raise RuntimeError(f"lowbit.{op}: {text}: {detail} (CUDA_LAUNCH_BLOCKING=1 pins it to the failing call)")
    # The ops layer validates first, so reaching this is a lowbit bug, not a user error.
    raise RuntimeError(f"lowbit.{op}: kernel rejected its arguments ({text}); please report this")


# ---------------------------------------------------------------- CPU ISA
ISA_LEVELS: tuple = tuple(_C.isa_levels())


def best_cpu_isa() -> str:
    """The best ISA level this CPU (and OS) supports."""
    return _C.best_isa()


def cpu_isa() -> str:
    """The ISA level the CPU kernels currently run at."""
    return _C.selected_isa()


def supported_cpu_isas() -> list:
    """Every level this machine can run, lowest first."""
    return list(ISA_LEVELS[: ISA_LEVELS.index(best_cpu_isa()) + 1])


def set_cpu_isa(level: str) -> None:
    """Run the CPU kernels at `level` (one of ISA_LEVELS, at most best_cpu_isa())."""
    if level not in ISA_LEVELS:
        raise ValueError(f"unknown CPU ISA level {level!r}; expected one of {', '.join(ISA_LEVELS)}")
    if _C.select_isa(level) != OK:
        raise ValueError(f"CPU ISA level {level!r} is not supported here (best: {best_cpu_isa()})")


def _apply_env_isa() -> None:
    level = os.environ.get("LOWBIT_CPU_ISA", "").strip().lower()
    if level:
        try:
            set_cpu_isa(level)
        except ValueError as e:
            raise ValueError(f"LOWBIT_CPU_ISA={level!r}: {e}") from None


_apply_env_isa()

# ---------------------------------------------------------------- threads
_num_threads: int | None = None


def set_num_threads(n: int | None) -> None:
    """Threads for lowbit's CPU kernels; None follows torch.get_num_threads()."""
    global _num_threads
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"set_num_threads: n must be a positive int or None, got {n!r}")
    _num_threads = n


def get_num_threads() -> int:
    return _num_threads if _num_threads is not None else torch.get_num_threads()


# ---------------------------------------------------------------- CUDA
_cuda_lock = threading.Lock()
_cuda_mod = None
_cuda_error: str | None = None


def _load_cuda():
    global _cuda_mod, _cuda_error
    with _cuda_lock:
        if _cuda_mod is None and _cuda_error is None:
            try:
                from . import _cuda as mod  # noqa: PLC0415 - lazy on purpose
            except ImportError as e:
                _cuda_error = f"lowbit was built without CUDA kernels ({e})"
            else:
                _cuda_mod = mod
    return _cuda_mod


def cuda_module():
    """lowbit._cuda, or a RuntimeError saying why it is unavailable."""
    mod = _load_cuda()
    if mod is None:
        raise RuntimeError(_cuda_error)
    return mod


def cuda_built_archs() -> str | None:
    mod = _load_cuda()
    return mod.archs() if mod is not None else None


def cuda_unavailable_reason() -> str | None:
    """None if lowbit's CUDA kernels can run here, else a sentence saying why not."""
    if _load_cuda() is None:
        return _cuda_error
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no usable CUDA device"
    return None


def stream_of(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


_sm_counts: dict = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the kernels' split plans use it per call)."""
    n = _sm_counts.get(device.index)
    if n is None:
        n = _sm_counts[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return n

"""`python -m lowbit.info`: what this lowbit build is and what it can use here."""
from __future__ import annotations

import platform

import torch

from . import __version__, _native


def report() -> dict:
    return {
        "lowbit": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_isa_levels": list(_native.ISA_LEVELS),
        "cpu_isa_supported": _native.supported_cpu_isas(),
        "cpu_isa_selected": _native.cpu_isa(),
        "threads": _native.get_num_threads(),
        "cuda_kernels_built": _native.cuda_built_archs() is not None,
        "cuda_archs": _native.cuda_built_archs(),
        "cuda_usable": _native.cuda_unavailable_reason() is None,
        "cuda_unavailable_reason": _native.cuda_unavailable_reason(),
        "gpu": torch.cuda.get_device_name() if _native.cuda_unavailable_reason() is None else None,
    }


def main() -> None:
    for k, v in report().items():
        print(f"{k:26s} {v}")


if __name__ == "__main__":
    main()

"""lowbit.quantize: swap every nn.Linear of a model for a lowbit quantized Linear."""
from __future__ import annotations

import sys
from typing import Callable, Optional

import torch

from .nn.linear import INT8_SCHEMES, Int8Linear

SCHEMES = INT8_SCHEMES  # "w4a16" and "w4a8" arrive with the INT4 kernels
_PROGRESS_MIN_LAYERS = 32


def quantize(model: torch.nn.Module, scheme: str, *, skip: Optional[Callable] = None,
             progress: Optional[bool] = None) -> torch.nn.Module:
    """Replace every torch.nn.Linear in `model` (recursively, in place) and return the model.

    scheme: "w8a16" (int8 weights, float activations) or "w8a8" (int8 weights and
    per-token int8 activations). skip(name, module) -> True keeps that Linear as is.
    progress: show a progress bar on stderr (default: when there are 32+ layers).
    The quantized weights stay on the device the Linear was on.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"quantize: model must be a torch.nn.Module, got {type(model).__name__}")
    if scheme not in SCHEMES:
        raise ValueError(f"quantize: unknown scheme {scheme!r}; supported: {', '.join(SCHEMES)}")
    if skip is not None and not callable(skip):
        raise TypeError("quantize: skip must be a callable skip(name, module) -> bool")
    # Every place a Linear appears (a shared Linear sits under several names) ...
    places = [(name, m) for name, m in model.named_modules(remove_duplicate=False)
              if type(m) is torch.nn.Linear and not (skip and skip(name, m))]
    if any(name == "" for name, _ in places):
        raise ValueError("quantize: model is itself an nn.Linear; use lowbit.nn.Int8Linear.from_float(model)")
    # ... is quantized once, and only when all succeeded is the model touched.
    converted = {}
    unique = list({id(m): m for _, m in places}.values())
    show = progress if progress is not None else len(unique) >= _PROGRESS_MIN_LAYERS
    for i, linear in enumerate(unique):
        converted[id(linear)] = Int8Linear.from_float(linear, scheme)
        if show:
            _bar(i + 1, len(unique), scheme)
    for name, linear in places:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, converted[id(linear)])
    return model


def _bar(done: int, total: int, scheme: str, width: int = 30) -> None:
    filled = width * done // total
    sys.stderr.write(f"\rlowbit.quantize {scheme} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()

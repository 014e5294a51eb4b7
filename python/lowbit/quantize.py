"""lowbit.quantize: swap every nn.Linear of a model for a lowbit quantized Linear."""
from __future__ import annotations

import sys
from typing import Callable, Optional

import torch

from .nn.linear import INT4_SCHEMES, INT8_SCHEMES, Int4Linear, Int8Linear

SCHEMES = INT8_SCHEMES + INT4_SCHEMES
_PROGRESS_MIN_LAYERS = 32


def quantize(model: torch.nn.Module, scheme: str, *, group_size: int = 32, symmetric: bool = False,
             clip_search: bool = False, skip: Optional[Callable] = None,
             progress: Optional[bool] = None) -> torch.nn.Module:
    """Replace every torch.nn.Linear in `model` (recursively, in place) and return the model.

    scheme: "w8a16" (int8 weights, float activations), "w8a8" (int8 weights and per-token
    int8 activations) -> lowbit.nn.Int8Linear; "w4a16" (group-wise int4 weights, float
    activations), "w4a8" (int4 weights, int8 activations per block of 32) -> lowbit.nn.Int4Linear.
    group_size (32, 64, 128, or a Linear's in_features for per channel), symmetric and
    clip_search apply to the int4 schemes (see Int4Linear.from_float); a Linear whose
    in_features the group size does not divide raises ValueError (nothing is changed:
    skip it, or pick another group size). skip(name, module) -> True keeps that Linear as is.
    progress: show a progress bar on stderr (default: when there are 32+ layers).
    The quantized weights stay on the device the Linear was on.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"quantize: model must be a torch.nn.Module, got {type(model).__name__}")
    if scheme not in SCHEMES:
        raise ValueError(f"quantize: unknown scheme {scheme!r}; supported: {', '.join(SCHEMES)}")
    if scheme in INT8_SCHEMES and (group_size != 32 or symmetric or clip_search):
        raise ValueError(f"quantize: group_size / symmetric / clip_search apply to the int4 schemes, not {scheme!r} "
                         "(int8 weights are per channel and symmetric)")
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
        try:
            if scheme in INT4_SCHEMES:
                converted[id(linear)] = Int4Linear.from_float(linear, scheme, group_size, symmetric, clip_search)
            else:
                converted[id(linear)] = Int8Linear.from_float(linear, scheme)
        except ValueError as e:
            name = next(n for n, m in places if m is linear)
            raise ValueError(f"quantize: {name}: {e}") from None
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

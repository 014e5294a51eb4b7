"""Input validation shared by the ops: cheap, and every message names the argument."""
from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tensor(t, name: str, op: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"lowbit.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def tensors(op: str, optional: tuple = (), **args) -> None:
    """TypeError for any argument that is not a tensor (None allowed for the `optional` names).
    The public wrappers call it first: the dispatcher would reject a non-tensor with a RuntimeError."""
    for name, t in args.items():
        if t is not None or name not in optional:
            tensor(t, name, op)


def float_tensor(t, name: str, op: str) -> torch.Tensor:
    tensor(t, name, op)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"lowbit.{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    return t


def dtype(t: torch.Tensor, want: torch.dtype, name: str, op: str) -> None:
    if t.dtype != want:
        raise TypeError(f"lowbit.{op}: {name} must be {want}, got {t.dtype}")


def same_device(t: torch.Tensor, ref: torch.Tensor, name: str, op: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"lowbit.{op}: {name} is on {t.device} but x is on {ref.device}")


def contiguous(t: torch.Tensor, name: str, op: str) -> None:
    if not t.is_contiguous():
        raise ValueError(f"lowbit.{op}: {name} must be contiguous (got strides {tuple(t.stride())})")


def shape(t: torch.Tensor, want: tuple, name: str, op: str) -> None:
    if tuple(t.shape) != tuple(want):
        raise ValueError(f"lowbit.{op}: {name} must have shape {tuple(want)}, got {tuple(t.shape)}")


def not_empty(t: torch.Tensor, name: str, op: str) -> None:
    if t.numel() == 0:
        raise ValueError(f"lowbit.{op}: {name} is empty (shape {tuple(t.shape)})")


def features(x: torch.Tensor, op: str) -> None:
    """x [..., K] needs K >= 1; rows it may lack (M = 0: an empty batch gives an empty result,
    as torch.nn.functional.linear does)."""
    if x.shape[-1] == 0:
        raise ValueError(f"lowbit.{op}: x has no features (K = 0; shape {tuple(x.shape)})")


def bias(b, n: int, device: torch.device, op: str) -> None:
    """None, or a contiguous float [N] tensor on the weights' device."""
    if b is None:
        return
    float_tensor(b, "bias", op)
    if b.device != device:
        raise ValueError(f"lowbit.{op}: bias is on {b.device} but the weights are on {device}")
    shape(b, (n,), "bias", op)
    contiguous(b, "bias", op)


def autocast(x):
    """x in the dtype a torch.autocast region active on its device asks for (float32 / float16 /
    bfloat16 x; float64 stays, as autocast leaves it), the way torch.nn.functional.linear casts
    its input there; else x itself. The linear modules and public linear ops call it; the raw
    torch.ops.lowbit ops take the dtypes they are given (their weights' float tensors must keep
    theirs, which autocast's cast-every-input rule for custom ops would not)."""
    if not isinstance(x, torch.Tensor):
        return x
    dev = "cpu" if x.is_cpu else "cuda" if x.is_cuda else None  # (cheaper than x.device.type: every call pays it)
    if dev is None or not torch.is_autocast_enabled(dev) or x.dtype not in FLOAT_DTYPES:
        return x
    return x.to(torch.get_autocast_dtype(dev))


def rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> a 2-D [M, K] view (or copy) with unit inner stride, as the kernels read it."""
    if x.dim() == 2 and x.is_contiguous():
        return x
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < x2.shape[1]):
        x2 = x2.contiguous()
    return x2


def row_stride(x2: torch.Tensor) -> int:
    return x2.stride(0) if x2.shape[0] > 1 else x2.shape[1]


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no limit known
        return 1 << 62


def allocation(nbytes: int, what: str, op: str, device="cpu") -> None:
    """ValueError, before anything is allocated, for a size this machine cannot hold (more bytes than
    its physical memory; on CUDA, than the device's): a clear error instead of an allocator failure."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        limit, where = torch.cuda.get_device_properties(dev).total_memory, f"{dev}'s"
    elif dev.type == "meta":
        return
    else:
        limit, where = _physical_memory(), "this machine's"
    if nbytes > limit:
        raise ValueError(f"{op}: {what} would need {nbytes / 2**30:.1f} GiB, more than {where} "
                         f"{limit / 2**30:.1f} GiB of memory")


def capturing(device) -> bool:
    """True while a CUDA graph is being captured on the device's current stream: tensor contents
    cannot be read then (the CUDA kernels bound-check block ids and slots themselves)."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def no_backward(op: str, lib, instead: str) -> None:
    """Gives lowbit::op (an inference kernel without a backward) a backward that raises: calls on
    tensors that require grad still run, but backpropagating through them is a clear error, where
    torch would otherwise drop their gradients (None for x) or warn and go on. `instead`: what to
    train with."""
    def backward(ctx, *grads):
        raise NotImplementedError(f"lowbit.{op} has no backward (an inference kernel): to train, use {instead}; "
                                  "or detach its inputs")

    torch.library.register_autograd(f"lowbit::{op}", backward, setup_context=lambda ctx, inputs, output: None,
                                    lib=lib)


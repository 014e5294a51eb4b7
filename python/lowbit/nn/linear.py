"""Quantized replacements for torch.nn.Linear: Int8Linear and Int4Linear.

Both keep their weights in buffers in the layout of their device (the CPU kernels' packed
layouts), while state_dict always holds the canonical form, so a checkpoint loads on any
device; ``.to()`` / ``.cuda()`` / ``.cpu()`` convert the layout. The eager CPU / CUDA forward
checks x only and runs the kernel directly (measurably cheaper per decode step); torch.compile,
x's gradient and other devices go through torch.ops.lowbit. Both run the same validation.
"""
from __future__ import annotations

import torch

from .. import _native, ref
from ..formats import gguf as gguf_fmt
from ..formats import gptq as gptq_fmt
from ..formats import int4 as fmt4
from ..formats import int8 as fmt8
from ..ops import int4 as int4_ops
from ..ops import int8 as int8_ops
from ..ops import _check as chk
from ..ops._check import FLOAT_DTYPES

# scheme -> (op name = native CPU kernel name, torch.library op). The kernel is looked up in
# lowbit._native._C at each call (cheap), so the benchmark can swap in no-op kernels to measure
# the Python overhead of a model.
_OPS = {
    "w8a16": ("int8_linear_w8a16", torch.ops.lowbit.int8_linear_w8a16),
    "w8a8": ("int8_linear_w8a8", torch.ops.lowbit.int8_linear_w8a8),
    "w4a16": ("int4_linear_w4a16", torch.ops.lowbit.int4_linear_w4a16),
    "w4a8": ("int4_linear_w4a8", torch.ops.lowbit.int4_linear_w4a8),
}
INT8_SCHEMES = ("w8a16", "w8a8")
INT4_SCHEMES = ("w4a16", "w4a8")


class _QuantizedLinear(torch.nn.Module):
    """What Int8Linear and Int4Linear share. A subclass names its layout-dependent buffers
    (_WEIGHTS), converts between canonical and device layout (canonical_weights /
    _device_weights), checks its weights (_check_weights) and runs its kernel (_run_cpu, _run_op)."""

    _SCHEMES: tuple = ()
    _WEIGHTS: tuple = ()

    def _init_common(self, in_features, out_features, scheme, name, device) -> torch.device:
        """Checks the arguments every quantized Linear takes; returns the device (default CPU)."""
        if scheme not in self._SCHEMES:
            raise ValueError(f"{name}: scheme must be one of {self._SCHEMES}, got {scheme!r}")
        for arg, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: {arg} must be a positive int, got {v!r}")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        # device None: torch's default device, as nn.Linear (torch.set_default_device, or a
        # `with torch.device("meta"):` block around the model's construction)
        device = torch.device(device) if device is not None else torch.empty(0).device
        chk.allocation(in_features * out_features, f"a {out_features} x {in_features} weight", name, device)
        return device

    def _init_bias(self, bias: bool, device, dtype):
        if bias:
            self.register_buffer("bias", torch.zeros(self.out_features, dtype=dtype or torch.float32, device=device))
        else:
            self.bias = None

    def _set_bias(self, bias, device) -> None:
        if bias is not None:
            self.bias = bias.detach().to(device).contiguous()

    def _set_canonical(self, canonical: dict) -> None:
        """(Re)registers the weight buffers in device layout (dtype and shape may change)."""
        for name, t in self._device_weights(canonical).items():
            self.register_buffer(name, t)
        self.__dict__["_weights_checked"] = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = chk.autocast(x)  # (inside torch.autocast, as nn.Linear)
        # Eager calls skip the dispatcher and the op's per-call weight checks: the weights are
        # validated once after each change (see __setattr__), x every call. Compiled graphs and
        # x's gradient go through the op (it has the fake impl and the backward).
        dev = x.device.type
        if dev in ("cpu", "cuda") and not torch.compiler.is_compiling() and not (x.requires_grad and
                                                                               torch.is_grad_enabled()):
            if not self._weights_checked:
                self._check_weights()
            return self._run_cpu(x) if dev == "cpu" else self._run_cuda(x)
        return self._run_op(x)

    def _run_cpu(self, x):
        name = _OPS[self.scheme][0]
        int8_ops.validate_x(x, self.in_features, self._weight_device(), name)
        return int8_ops.run_cpu_kernel(getattr(_native._C, name), name, x, self.in_features, self._cpu_weight_args(),
                                       self.out_features, self.bias)

    def bind(self, x: torch.Tensor, y: torch.Tensor):
        """A callable with no arguments that computes y = self(x) into y: everything is checked
        and every pointer resolved now, once (lowbit.models.replay calls it every decode step).
        x [M, K] and y [M, N]: contiguous CPU tensors of one float dtype; the callable keeps them
        and the weights alive, and reads x's current values each call."""
        if self._weight_device().type != "cpu":  # the bound call is a CPU kernel taking raw pointers
            raise ValueError(f"{type(self).__name__}.bind: binds CPU modules only; this one is on "
                             f"{self._weight_device()}")
        if not self._weights_checked:
            self._check_weights()
        name = _OPS[self.scheme][0]
        int8_ops.validate_x(x, self.in_features, self._weight_device(), name)
        n = self.out_features
        if x.dim() != 2 or not x.is_contiguous() or x.shape[0] == 0:
            raise ValueError(f"{type(self).__name__}.bind: x must be a contiguous [M, K] tensor with M >= 1")
        if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0], n) or y.dtype != x.dtype or not y.is_contiguous():
            raise ValueError(f"{type(self).__name__}.bind: y must be a contiguous {x.dtype} tensor of shape "
                             f"{(x.shape[0], n)}")
        kernel = getattr(_native._C, name)
        args = (x.data_ptr(), _native.DTYPE_CODE[x.dtype], x.shape[0], self.in_features, self.in_features,
                *self._cpu_weight_args(), *int8_ops.bias_args(self.bias), y.data_ptr(), n, _native.get_num_threads())
        alive = (x, y, [getattr(self, w) for w in self._WEIGHTS], self.bias)

        def run(alive=alive):
            _native.check(kernel(*args), name)

        return run

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in self._WEIGHTS or name == "bias":  # a replaced buffer is re-validated before use
            self.__dict__["_weights_checked"] = False

    def _checked(self) -> None:
        self.__dict__["_weights_checked"] = True

    # ---- state_dict: the canonical form, whatever the device layout
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, t in self.canonical_weights().items():
            destination[prefix + name] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        canonical = {}
        for name in self._WEIGHTS:
            if prefix + name in state_dict:
                canonical[name] = state_dict[prefix + name]
        if len(canonical) == len(self.canonical_weights()):
            err = self._canonical_error(canonical)
            if err:
                error_msgs.append(f"{prefix}{err}")
                return
            # Registered here rather than copied in by the default loader: the layout's
            # dtype (float16 / float32 scales) may differ from what the module held. With
            # load_state_dict(assign=True) the weights take the state_dict's device, as
            # nn.Module's assign does (a model built on the meta device, then loaded).
            assign = local_metadata.get("assign_to_params_buffers", False)
            device = next(iter(canonical.values())).device if assign else self._weight_device()
            self._set_canonical({k: v.to(device) for k, v in canonical.items()})
            state_dict = dict(state_dict)
            for name in self._WEIGHTS:
                if getattr(self, name) is not None:
                    state_dict[prefix + name] = getattr(self, name)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        try:
            self._check_weights()
        except (TypeError, ValueError) as e:
            error_msgs.append(f"{prefix}: {e}")

    # ---- device moves: convert the layout; scales keep their dtype whatever .half() says
    def _apply(self, fn, recurse=True):
        canonical, bias = self.canonical_weights(), self.bias
        for name in self._WEIGHTS:
            self._buffers.pop(name, None)
        try:
            super()._apply(fn, recurse)  # moves / casts bias like nn.Linear's
            canonical = {k: v.to(fn(torch.empty(0, dtype=torch.uint8, device=v.device)).device)
                         for k, v in canonical.items()}
            if self.bias is not None and self.bias.dtype not in FLOAT_DTYPES:
                bad, self._buffers["bias"] = self.bias.dtype, bias  # leave the module as it was
                raise TypeError(f"{type(self).__name__}: bias cannot become {bad}; the kernels take float32, float16 "
                                "or bfloat16")
        finally:
            for name, t in self._device_weights(canonical).items():
                self.register_buffer(name, t)
            self.__dict__["_weights_checked"] = False
        return self


class Int8Linear(_QuantizedLinear):
    """nn.Linear with per-output-channel symmetric INT8 weights (inference only).

    scheme "w8a16" keeps activations in float (fp32 / fp16 / bf16); "w8a8" quantizes
    them per token to int8 on the fly and runs int8 dot products.

    Buffers: ``qweight`` int8 in the layout of the module's device (packed panels on
    CPU, canonical [N, K] on CUDA), ``scale`` fp32 [N], ``bias`` (float, optional).
    state_dict always holds the canonical [N, K] codes, so it loads on any device;
    ``.to()`` / ``.cuda()`` / ``.cpu()`` convert the layout.
    """

    _SCHEMES = INT8_SCHEMES
    _WEIGHTS = ("qweight", "scale")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scheme: str = "w8a16",
                 device=None, dtype=None):
        super().__init__()
        device = self._init_common(in_features, out_features, scheme, "Int8Linear", device)
        self._set_canonical({"qweight": torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                             "scale": torch.zeros(out_features, dtype=torch.float32, device=device)})
        self._init_bias(bias, device, dtype)

    @classmethod
    def from_float(cls, linear: torch.nn.Linear, scheme: str = "w8a16") -> "Int8Linear":
        """Quantize an nn.Linear (on any device) with the reference per-channel quantizer."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"Int8Linear.from_float: expected torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if not bool(torch.isfinite(w).all()):
            raise ValueError("Int8Linear.from_float: linear.weight contains NaN or Inf; cannot quantize")
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, device="meta")
        q, s = ref.int8.quantize_weight_per_channel(w)
        fmt8.check_codes(q, "qweight")
        mod._set_canonical({"qweight": q, "scale": s})
        mod._set_bias(linear.bias, q.device)
        mod._check_weights()
        return mod

    def canonical_weights(self) -> dict:
        return {"qweight": self.canonical_qweight(), "scale": self.scale}

    def _device_weights(self, canonical: dict) -> dict:
        q = canonical["qweight"]
        return {"qweight": fmt8.pack_cpu(q) if q.device.type == "cpu" else q.contiguous(),
                "scale": canonical["scale"].to(device=q.device, dtype=torch.float32).contiguous()}

    def _weight_device(self) -> torch.device:
        return self.scale.device

    def _canonical_error(self, c: dict):
        q, want = c["qweight"], (self.out_features, self.in_features)
        if not isinstance(q, torch.Tensor) or q.dtype != torch.int8 or tuple(q.shape) != want:
            return (f"qweight: expected int8 codes of shape {want}, got "
                    f"{getattr(q, 'dtype', type(q))} {tuple(getattr(q, 'shape', ()))}")
        return None

    def canonical_qweight(self) -> torch.Tensor:
        """The int8 codes as [out_features, in_features], whatever the device layout."""
        if self.qweight.device.type == "cpu":
            return fmt8.unpack_cpu(self.qweight, self.out_features, self.in_features)
        return self.qweight

    def dequantized_weight(self) -> torch.Tensor:
        return self.canonical_qweight().to(torch.float32) * self.scale[:, None]

    def _cpu_weight_args(self) -> tuple:
        return int8_ops.weight_args(self.qweight, self.scale, self.out_features)

    def _run_op(self, x):
        return _OPS[self.scheme][1](x, self.qweight, self.scale, self.bias)

    def _run_cuda(self, x):
        name = _OPS[self.scheme][0]
        int8_ops.validate_x(x, self.in_features, self._weight_device(), name)
        return int8_ops.run_linear_cuda(name, x, self.qweight, self.scale, self.bias, self.out_features,
                                        self.in_features)

    def _check_weights(self) -> None:
        int8_ops.validate_weights(self.qweight, self.scale, self.bias, self.in_features, "Int8Linear")
        if self.scale.shape[0] != self.out_features:
            raise ValueError(f"Int8Linear: scale has {self.scale.shape[0]} entries, expected out_features="
                             f"{self.out_features}")
        self._checked()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme!r}")


class Int4Linear(_QuantizedLinear):
    """nn.Linear with group-wise INT4 weights (inference only).

    Weights: w = d * q + m (asymmetric, GGUF Q4_1 / GPTQ / AWQ semantics) or w = d * (q - 8)
    (symmetric, GGUF Q4_0), q in [0, 15], one d (and m) per group of ``group_size`` consecutive
    inputs: 32, 64, 128, or in_features (per channel). scheme "w4a16" keeps activations in float;
    "w4a8" quantizes them to int8 per block of 32 on the fly (lowbit.ops.int4).

    Buffers: ``qweight``, ``scales`` and ``mins`` in the layout of the module's device
    (lowbit.formats.int4): the CPU packed layout (mins None when symmetric), or on CUDA the
    tensor-core layout (scales holds (d, m) pairs, mins None), ``bias`` (float, optional).
    state_dict holds the canonical form: ``qweight`` uint8 [N, ceil(K/2)] (lowbit.formats.int4
    nibble order: element 2j low, 2j + 1 high; a zero pad nibble when K is odd), ``scales`` and
    ``mins`` [N, K/g] in float16 or float32 (float16 whenever that is lossless).

    Build it with from_float (round-to-nearest min/max per group, optional clipping search),
    from_int4 (canonical codes/scales/mins), from_gguf (Q4_0 / Q4_1 block bytes) or from_gptq.
    """

    _SCHEMES = INT4_SCHEMES
    _WEIGHTS = ("qweight", "scales", "mins")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scheme: str = "w4a16",
                 group_size: int = 32, symmetric: bool = False, device=None, dtype=None):
        super().__init__()
        device = self._init_common(in_features, out_features, scheme, "Int4Linear", device)
        try:
            fmt4.check_group_size(in_features, group_size)
        except ValueError as e:
            raise ValueError(f"Int4Linear: {e}") from None
        self.group_size, self.symmetric = group_size, bool(symmetric)
        groups = in_features // group_size
        zeros = torch.zeros(out_features, groups, dtype=torch.float16, device=device)
        self._set_canonical({"codes": torch.zeros(out_features, in_features, dtype=torch.uint8, device=device),
                             "scales": zeros, "mins": None if symmetric else zeros})
        self._init_bias(bias, device, dtype)

    # ---- constructors
    @classmethod
    def from_int4(cls, codes, scales, mins=None, bias=None, scheme: str = "w4a16") -> "Int4Linear":
        """From canonical INT4 (lowbit.formats.int4): codes uint8 [N, K], scales [N, K/g], mins or None."""
        g = fmt4.check_canonical(codes, scales, mins)
        n, k = codes.shape
        mod = cls(k, n, bias is not None, scheme, group_size=g, symmetric=mins is None, device="meta")
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,):
                raise ValueError(f"Int4Linear: bias must be a tensor of shape ({n},)")
        mod._set_canonical({"codes": codes.detach(), "scales": scales.detach(),
                            "mins": None if mins is None else mins.detach()})
        mod._set_bias(bias, codes.device)
        mod._check_weights()
        return mod

    @classmethod
    def from_float(cls, linear: torch.nn.Linear, scheme: str = "w4a16", group_size: int = 32,
                   symmetric: bool = False, clip_search: bool = False) -> "Int4Linear":
        """Quantize an nn.Linear with lowbit.ref.int4.quantize_weight_int4 (round-to-nearest min/max per
        group; clip_search=True also tries shrunken ranges per group and keeps the least squared error).
        Scales and mins are then rounded to float16 as llama.cpp stores them (see
        lowbit.formats.int4.round_scales_fp16: they stay float32 if out of float16's normal range)."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"Int4Linear.from_float: expected torch.nn.Linear, got {type(linear).__name__}")
        try:
            fmt4.check_group_size(linear.in_features, group_size)
        except ValueError as e:
            raise ValueError(f"Int4Linear.from_float: {e}") from None
        w = linear.weight.detach()
        if not bool(torch.isfinite(w).all()):
            raise ValueError("Int4Linear.from_float: linear.weight contains NaN or Inf; cannot quantize")
        q = ref.int4.quantize_weight_int4(w, group_size, symmetric, clip_search)
        scales, mins = fmt4.round_scales_fp16(q["scales"], q["mins"])
        dev = w.device
        return cls.from_int4(q["codes"].to(dev), scales.to(dev), None if mins is None else mins.to(dev),
                             linear.bias, scheme)

    @classmethod
    def from_gguf(cls, raw, kind: str, out_features: int, in_features: int, bias=None,
                  scheme: str = "w4a16") -> "Int4Linear":
        """From the bytes of a GGUF Q4_0 or Q4_1 tensor (kind "q4_0" / "q4_1"; shape [N, K] as
        ggml stores a Linear weight: ne[0] = K). Lossless: the module computes with exactly the
        weights llama.cpp dequantizes."""
        convert = {"q4_0": gguf_fmt.from_gguf_q4_0, "q4_1": gguf_fmt.from_gguf_q4_1}
        if kind not in convert:
            raise ValueError(f"Int4Linear.from_gguf: kind must be 'q4_0' or 'q4_1', got {kind!r}")
        c = convert[kind](raw, out_features, in_features)
        return cls.from_int4(c["codes"], c["scales"], c.get("mins"), bias, scheme)

    @classmethod
    def from_gptq(cls, qweight, qzeros, scales, g_idx=None, bias=None, scheme: str = "w4a16",
                  zero_offset: int = 0) -> "Int4Linear":
        """From GPTQ tensors (lowbit.formats.gptq.from_gptq); an act-order g_idx needs
        Int4ActOrderLinear.from_gptq (a ValueError says so)."""
        c = gptq_fmt.from_gptq(qweight, qzeros, scales, g_idx, zero_offset=zero_offset)
        if "perm" in c:
            raise ValueError("Int4Linear.from_gptq: g_idx is an act-order (desc_act) permutation; use "
                             "lowbit.nn.Int4ActOrderLinear.from_gptq, which permutes x's features to match")
        return cls.from_int4(c["codes"], c["scales"], c["mins"], bias, scheme)

    @classmethod
    def from_awq(cls, qweight, qzeros, scales, bias=None, scheme: str = "w4a16") -> "Int4Linear":
        """From AutoAWQ "gemm" tensors (lowbit.formats.gptq.from_awq)."""
        c = gptq_fmt.from_awq(qweight, qzeros, scales)
        return cls.from_int4(c["codes"], c["scales"], c["mins"], bias, scheme)

    # ---- layouts
    def canonical(self) -> tuple:
        """(codes uint8 [N, K], scales [N, K/g], mins or None) in float32, whatever the device layout."""
        if self.qweight.device.type == "cpu":
            return fmt4.unpack_cpu(self.qweight, self.scales, self.mins, self.out_features, self.in_features)
        if self.qweight.device.type == "cuda":
            return fmt4.unpack_cuda(self.qweight, self.scales, self.out_features, self.in_features, self.symmetric)
        f = lambda t: None if t is None else t.to(torch.float32)
        return self.qweight, f(self.scales), f(self.mins)

    def canonical_weights(self) -> dict:
        codes, scales, mins = self.canonical()
        if self.in_features % 2:
            codes = torch.cat([codes, codes.new_zeros(codes.shape[0], 1)], dim=1)
        dt = self.scales.dtype
        out = {"qweight": fmt4.pack_nibbles(codes), "scales": scales.to(dt)}
        if mins is not None:
            out["mins"] = mins.to(dt)
        return out

    def _device_weights(self, c: dict) -> dict:
        if "codes" in c:
            codes = c["codes"]
        else:  # a state_dict's nibbles
            codes = fmt4.unpack_nibbles(c["qweight"])[:, : self.in_features]
        scales, mins = c["scales"], c.get("mins")
        if codes.device.type == "cpu":
            q, s, m = fmt4.pack_cpu(codes, scales, mins)
        elif codes.device.type == "cuda":
            (q, s), m = fmt4.pack_cuda(codes, scales, mins), None
        else:  # (a meta module, made by the constructors, has no values to inspect)
            dt = scales.dtype if scales.device.type == "meta" else fmt4.storage_dtype(scales, mins)
            q, s, m = codes.contiguous(), scales.to(dt).contiguous(), None if mins is None else mins.to(dt).contiguous()
        return {"qweight": q, "scales": s, "mins": m}

    def _weight_device(self) -> torch.device:
        return self.scales.device

    def _canonical_error(self, c: dict):
        n, k = self.out_features, self.in_features
        q, want = c["qweight"], (n, (k + 1) // 2)
        if not isinstance(q, torch.Tensor) or q.dtype != torch.uint8 or tuple(q.shape) != want:
            return (f"qweight: expected nibble-packed uint8 codes of shape {want}, got "
                    f"{getattr(q, 'dtype', type(q))} {tuple(getattr(q, 'shape', ()))}")
        for name in ("scales", "mins"):
            t = c.get(name)
            if t is None:
                continue
            want = (n, k // self.group_size)
            if not isinstance(t, torch.Tensor) or t.dtype not in (torch.float16, torch.float32) or tuple(t.shape) != want:
                return (f"{name}: expected float16/float32 of shape {want}, got "
                        f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
        return None

    def dequantized_weight(self) -> torch.Tensor:
        return ref.int4.dequantize_int4(*self.canonical())

    # ---- kernels
    def _cpu_weight_args(self) -> tuple:
        return int4_ops.weight_args(self.qweight, self.scales, self.mins, self.out_features, self.group_size)

    def _run_op(self, x):
        return _OPS[self.scheme][1](x, self.qweight, self.scales, self.mins, self.out_features, self.bias)

    def _run_cuda(self, x):
        if self.scheme != "w4a16":
            return self._run_op(x)  # (which says W4A8 runs on the CPU only)
        name = _OPS[self.scheme][0]
        int8_ops.validate_x(x, self.in_features, self._weight_device(), name)
        int4_ops.check_cuda_x(x, name)
        return int4_ops.run_w4a16_cuda(x, self.qweight, self.scales, self.out_features, self.bias, self.in_features)

    def _check_weights(self) -> None:
        cpu = self.qweight.device.type == "cpu"
        if cpu and (self.mins is None) != self.symmetric:
            raise ValueError("Int4Linear: mins must be None exactly when the module is symmetric")
        if cpu or self.qweight.device.type == "cuda":
            g = int4_ops.validate_weights(self.qweight, self.scales, self.mins, self.out_features, self.bias,
                                          self.in_features, "Int4Linear")
            if g != self.group_size:
                raise ValueError(f"Int4Linear: scales imply group size {g}, expected {self.group_size}")
            if not cpu:
                int4_ops.check_cuda_alignment(self.qweight, self.scales, "Int4Linear")
        self._checked()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme!r}, group_size={self.group_size}, symmetric={self.symmetric}")


class Int8BlockLinear(torch.nn.Module):
    """nn.Linear with INT8 weights and one scale per block of 32 inputs: GGUF Q8_0,
    w[n, k] = d[n, k // 32] * q[n, k], q int8 (inference only).

    It runs on the INT4 kernels, exactly: with u = q + 128 in [0, 255] split into nibbles
    hi = u >> 4 and lo = u & 15,  w = (16 d) * hi + (-128 d) + d * lo,  i.e. two asymmetric 4-bit
    planes with the same groups. ``planes`` is one Int4Linear over 2K inputs (hi plane, then lo
    plane) fed [x, x]: one kernel call, the bytes of Q8_0 (K bytes of codes per row), and no new
    kernel family. scheme "w8a16" keeps activations in float (planes "w4a16"); "w8a8" quantizes
    them per block of 32 (planes "w4a8"), which is llama.cpp's Q8_0 x Q8_0 product: both halves
    of [x, x] get the same int8 blocks. Scales 16 d and mins -128 d are exact (powers of two).
    """

    _PLANES = {"w8a16": "w4a16", "w8a8": "w4a8"}

    def __init__(self, planes: Int4Linear, scheme: str):
        super().__init__()
        self.planes, self.scheme = planes, scheme
        self.in_features, self.out_features = planes.in_features // 2, planes.out_features

    @classmethod
    def from_int8(cls, codes, scales, bias=None, scheme: str = "w8a16") -> "Int8BlockLinear":
        """codes int8 [N, K] (K a multiple of 32), scales float [N, K / 32] (lowbit.formats.gguf.from_gguf_q8_0)."""
        if scheme not in cls._PLANES:
            raise ValueError(f"Int8BlockLinear: scheme must be one of {tuple(cls._PLANES)}, got {scheme!r}")
        if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int8 or codes.dim() != 2:
            raise TypeError("Int8BlockLinear: codes must be a 2-D torch.int8 tensor [N, K]")
        n, k = codes.shape
        if k % 32 or n == 0:
            raise ValueError(f"Int8BlockLinear: codes shape {(n, k)}: K must be a positive multiple of 32")
        if not isinstance(scales, torch.Tensor) or tuple(scales.shape) != (n, k // 32):
            raise ValueError(f"Int8BlockLinear: scales must have shape {(n, k // 32)}")
        d = scales.detach().to(torch.float32)
        if not bool(torch.isfinite(d).all()):
            raise ValueError("Int8BlockLinear: scales contain NaN or Inf")
        u = codes.detach().to(torch.int16) + 128
        planes = torch.cat([u >> 4, u & 15], dim=1).to(torch.uint8)
        return cls(Int4Linear.from_int4(planes, torch.cat([16 * d, d], dim=1),
                                        torch.cat([-128 * d, torch.zeros_like(d)], dim=1), bias,
                                        cls._PLANES[scheme]), scheme)

    def canonical(self) -> tuple:
        """(codes int8 [N, K], scales fp32 [N, K / 32]): the Q8_0 weight, recovered exactly."""
        codes, scales, _ = self.planes.canonical()
        k = self.in_features
        q = codes[:, :k].to(torch.int16) * 16 + codes[:, k:].to(torch.int16) - 128
        return q.to(torch.int8), scales[:, k // 32:].contiguous()

    @property
    def bias(self):
        return self.planes.bias

    def dequantized_weight(self) -> torch.Tensor:
        codes, scales = self.canonical()
        return codes.float() * scales.repeat_interleave(32, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.planes(torch.cat([x, x], dim=-1))

    def bind(self, x: torch.Tensor, y: torch.Tensor):
        """As Int4Linear.bind: a callable computing y = self(x) into y."""
        xx = x.new_empty((x.shape[0], 2 * x.shape[1])) if x.dim() == 2 else x
        run_planes = self.planes.bind(xx, y)
        lo, hi = xx[:, : self.in_features], xx[:, self.in_features:]

        def run():
            lo.copy_(x)
            hi.copy_(x)
            run_planes()

        return run

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme!r}"


class Int4ActOrderLinear(torch.nn.Module):
    """A GPTQ act-order (desc_act) layer: its g_idx puts input k in group g_idx[k], so a group's
    inputs are scattered over K. ``inner`` is an Int4Linear over the inputs reordered by ``perm``
    (int64 [K] buffer; each group's inputs contiguous), and forward gathers x's features into that
    order first: y = inner(x[..., perm]), the same product (Marlin's way with act order: one gather
    of x per call, the kernels unchanged)."""

    def __init__(self, inner: Int4Linear, perm: torch.Tensor):
        super().__init__()
        k = inner.in_features
        gptq_fmt.check_perm(perm, k, "Int4ActOrderLinear: perm")
        self.inner = inner
        self.register_buffer("perm", perm.detach().to(inner.scales.device))
        self.in_features, self.out_features, self.scheme = k, inner.out_features, inner.scheme

    @classmethod
    def from_gptq(cls, qweight, qzeros, scales, g_idx, bias=None, scheme: str = "w4a16",
                  zero_offset: int = 0) -> "Int4ActOrderLinear":
        """From GPTQ tensors with any valid g_idx (lowbit.formats.gptq.from_gptq)."""
        c = gptq_fmt.from_gptq(qweight, qzeros, scales, g_idx, zero_offset=zero_offset)
        perm = c.get("perm", torch.arange(c["codes"].shape[1]))
        return cls(Int4Linear.from_int4(c["codes"], c["scales"], c["mins"], bias, scheme), perm)

    @property
    def bias(self):
        return self.inner.bias

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 [N, K] in the original input order."""
        w = self.inner.dequantized_weight()
        out = torch.empty_like(w)
        out[:, self.perm.to(w.device)] = w
        return out

    def _gather(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"Int4ActOrderLinear: x must be [..., K={self.in_features}], got {shape}")
        return x.index_select(-1, self.perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self._gather(x))

    def bind(self, x: torch.Tensor, y: torch.Tensor):
        """As Int4Linear.bind: a callable computing y = self(x) into y."""
        self._gather(x)  # (the checks)
        xp = x.new_empty(x.shape)
        run_inner = self.inner.bind(xp, y)

        def run():
            torch.index_select(x, -1, self.perm, out=xp)
            run_inner()

        return run

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme!r}, act_order"


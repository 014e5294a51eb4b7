"""Quantized replacements for torch.nn.Linear."""
from __future__ import annotations

import torch

from .. import _native, ref
from ..formats import int8 as fmt
from ..ops import int8 as int8_ops
from ..ops._check import FLOAT_DTYPES

# scheme -> (op name, native CPU kernel, torch.library op)
_OPS = {
    "w8a16": ("int8_linear_w8a16", _native._C.int8_linear_w8a16, torch.ops.lowbit.int8_linear_w8a16),
    "w8a8": ("int8_linear_w8a8", _native._C.int8_linear_w8a8, torch.ops.lowbit.int8_linear_w8a8),
}
INT8_SCHEMES = tuple(_OPS)


class Int8Linear(torch.nn.Module):
    """nn.Linear with per-output-channel symmetric INT8 weights (inference only).

    scheme "w8a16" keeps activations in float (fp32 / fp16 / bf16); "w8a8" quantizes
    them per token to int8 on the fly and runs int8 dot products.

    Buffers: ``qweight`` int8 in the layout of the module's device (packed panels on
    CPU, canonical [N, K] on CUDA), ``scale`` fp32 [N], ``bias`` (float, optional).
    state_dict always holds the canonical [N, K] codes, so it loads on any device;
    ``.to()`` / ``.cuda()`` / ``.cpu()`` convert the layout.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scheme: str = "w8a16",
                 device=None, dtype=None):
        super().__init__()
        if scheme not in INT8_SCHEMES:
            raise ValueError(f"Int8Linear: scheme must be one of {INT8_SCHEMES}, got {scheme!r}")
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Int8Linear: {name} must be a positive int, got {v!r}")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        device = torch.device(device) if device is not None else torch.device("cpu")
        canonical = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        self.register_buffer("qweight", _device_layout(canonical))
        self.register_buffer("scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype or torch.float32, device=device))
        else:
            self.bias = None

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
        mod._set_weights(q, s, None if linear.bias is None else linear.bias.detach().clone())
        return mod

    def _set_weights(self, canonical: torch.Tensor, scale: torch.Tensor, bias) -> None:
        fmt.check_codes(canonical, "qweight")
        self.qweight = _device_layout(canonical)
        self.scale = scale.to(device=canonical.device, dtype=torch.float32).contiguous()
        if bias is not None:
            self.bias = bias.to(canonical.device).contiguous()
        self._check_weights()

    def canonical_qweight(self) -> torch.Tensor:
        """The int8 codes as [out_features, in_features], whatever the device layout."""
        if self.qweight.device.type == "cpu":
            return fmt.unpack_cpu(self.qweight, self.out_features, self.in_features)
        return self.qweight

    def dequantized_weight(self) -> torch.Tensor:
        return self.canonical_qweight().to(torch.float32) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Eager CPU calls skip the dispatcher (measurably cheaper per decode step);
        # torch.compile and CUDA go through torch.ops.lowbit. Same validation either way.
        name, kernel, op = _OPS[self.scheme]
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            # The weights are validated once after each change (see __setattr__); x every call.
            if not self._weights_checked:
                self._check_weights()
            int8_ops.validate_x(x, self.in_features, self.scale.device, name)
            return int8_ops.run_linear_cpu(kernel, name, x, self.qweight, self.scale, self.bias,
                                           self.out_features, self.in_features)
        return op(x, self.qweight, self.scale, self.bias)

    def _check_weights(self) -> None:
        int8_ops.validate_weights(self.qweight, self.scale, self.bias, self.in_features, "Int8Linear")
        if self.scale.shape[0] != self.out_features:
            raise ValueError(f"Int8Linear: scale has {self.scale.shape[0]} entries, expected out_features="
                             f"{self.out_features}")
        self.__dict__["_weights_checked"] = True

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in ("qweight", "scale", "bias"):  # a replaced buffer is re-validated before use
            self.__dict__["_weights_checked"] = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme!r}")

    # ---- state_dict: canonical codes, whatever the device layout
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "qweight"] = self.canonical_qweight()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "qweight"
        if key in state_dict:
            q = state_dict[key]
            want = (self.out_features, self.in_features)
            if not isinstance(q, torch.Tensor) or q.dtype != torch.int8 or tuple(q.shape) != want:
                error_msgs.append(f"{key}: expected int8 codes of shape {want}, got "
                                  f"{getattr(q, 'dtype', type(q))} {tuple(getattr(q, 'shape', ()))}")
                return
            state_dict = dict(state_dict)
            state_dict[key] = _device_layout(q.to(self.scale.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        try:
            self._check_weights()
        except (TypeError, ValueError) as e:
            error_msgs.append(f"{prefix}: {e}")

    # ---- device moves: convert the layout; scale stays fp32 whatever .half() says
    def _apply(self, fn, recurse=True):
        canonical, scale, bias = self.canonical_qweight(), self.scale, self.bias
        del self._buffers["qweight"], self._buffers["scale"]
        try:
            super()._apply(fn, recurse)  # moves / casts bias like nn.Linear's
            canonical = fn(canonical)  # integer tensors only change device
            if self.bias is not None and self.bias.dtype not in FLOAT_DTYPES:
                bad, self._buffers["bias"] = self.bias.dtype, bias  # leave the module as it was
                raise TypeError(f"Int8Linear: bias cannot become {bad}; the kernels take float32, float16 or "
                                "bfloat16")
        finally:
            self.register_buffer("qweight", _device_layout(canonical))
            self.register_buffer("scale", scale.to(canonical.device))
            self.__dict__["_weights_checked"] = False
        return self


def _device_layout(canonical: torch.Tensor) -> torch.Tensor:
    if canonical.device.type == "cpu":
        return fmt.pack_cpu(canonical)
    return canonical.contiguous()

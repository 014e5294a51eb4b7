"""load_gguf: a GGUF file (llama.cpp's format) -> a lowbit Llama-family model.

The file is read with llama.cpp's own reader (the ``gguf`` package, memory-mapped); this module
only checks what it reads and maps each tensor onto lowbit's formats, losslessly:

    Q4_0 / Q4_1   -> lowbit.nn.Int4Linear (group 32; symmetric / asymmetric), codes and fp16
                     scales exactly as stored (lowbit.formats.gguf)
    Q8_0          -> lowbit.nn.Int8BlockLinear (int8 codes, one fp16 scale per 32)
    F32/F16/BF16  -> float32 torch.nn.Linear, or quantized by ``scheme`` (lowbit.quantize)

Embeddings keep the file's type (rows are dequantized when looked up). Q, K and V (and gate and
up) projections of the same type are fused into one module along the output dimension, which is
exact (rows are independent) and saves kernel calls per token.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

from ..quantize import quantize
from ..formats import gguf as gguf_fmt
from ..nn.linear import Int4Linear, Int8BlockLinear
from .config import LlamaConfig
from .llama import Attention, Block, Embedding, FeedForward, Llama

try:
    import gguf
except ImportError:  # pragma: no cover - the gguf extra
    gguf = None

# GGML type name -> (lowbit kind, elements per block, bytes per block)
_TYPES = {"F32": ("f32", 1, 4), "F16": ("f16", 1, 2), "BF16": ("bf16", 1, 2),
          "Q4_0": ("q4_0", 32, 18), "Q4_1": ("q4_1", 32, 20), "Q8_0": ("q8_0", 32, 34)}
SUPPORTED_TYPES = tuple(_TYPES)
SCHEMES = (None, "w8a16", "w8a8", "w4a16", "w4a8")
ACTIVATIONS = ("float", "int8")


class GGUFTensor:
    """One tensor of the file: kind (see _TYPES), ggml shape [rows, cols] (cols = ne[0]) and its bytes."""

    def __init__(self, name: str, kind: str, shape: tuple, data: np.ndarray):
        self.name, self.kind, self.shape, self.data = name, kind, shape, data

    def float(self) -> torch.Tensor:
        """Dequantized (exactly: every supported type's values are fp32 values) float32 tensor."""
        rows, cols = self.shape if len(self.shape) == 2 else (1, self.shape[0])
        raw = np.ascontiguousarray(self.data).reshape(-1)
        if self.kind == "f32":
            t = torch.from_numpy(raw.view(np.float32).copy())
        elif self.kind == "f16":
            t = torch.from_numpy(raw.view(np.float16).astype(np.float32))
        elif self.kind == "bf16":
            t = torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).float()
        else:
            c = self.canonical()
            d = c["scales"].repeat_interleave(32, dim=1)
            if self.kind == "q8_0":
                t = c["codes"].float() * d
            elif c["mins"] is None:  # q4_0: w = d * (q - 8)
                t = (c["codes"].float() - 8) * d
            else:
                t = c["codes"].float() * d + c["mins"].repeat_interleave(32, dim=1)
        return t.reshape(self.shape)

    def canonical(self) -> dict:
        """lowbit canonical form of a quantized tensor (lowbit.formats.gguf.from_gguf_*)."""
        rows, cols = self.shape
        raw = np.array(self.data, dtype=np.uint8, copy=True).reshape(-1)  # writable, owned by torch
        return getattr(gguf_fmt, f"from_gguf_{self.kind}")(raw, rows, cols)


def _require_gguf():
    if gguf is None:
        raise ImportError("lowbit.models.load_gguf needs the gguf package: pip install 'lowbit[gguf]'")


def read_gguf(path) -> tuple:
    """(metadata {key: scalar value}, {name: GGUFTensor}). ValueError for anything malformed."""
    _require_gguf()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_gguf: no such file: {path}")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # gguf-py raises ValueError / struct / numpy errors on bad headers or short data
        raise ValueError(f"load_gguf: {path} is not a readable GGUF file (malformed, or truncated at "
                         f"{os.path.getsize(path)} bytes): {type(e).__name__}: {e}") from None
    meta = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] != gguf.GGUFValueType.ARRAY:
            try:
                meta[key] = field.contents()
            except Exception:  # a malformed scalar: leave it out (a needed key is then reported missing)
                pass
        elif key == "tokenizer.chat_template":
            meta[key] = field.contents()
    size = os.path.getsize(path)
    tensors = {}
    for t in reader.tensors:
        type_name = getattr(t.tensor_type, "name", str(t.tensor_type))
        if type_name not in _TYPES:
            raise ValueError(f"load_gguf: tensor {t.name!r} has type {type_name}, which lowbit cannot import; "
                             f"supported types: {', '.join(SUPPORTED_TYPES)}")
        kind, block, block_bytes = _TYPES[type_name]
        ne = [int(v) for v in t.shape]  # ggml order: ne[0] is the contiguous (input) dimension
        if len(ne) not in (1, 2) or min(ne) < 1:
            raise ValueError(f"load_gguf: tensor {t.name!r} has shape {ne}; expected 1-D or 2-D")
        if ne[0] % block:
            raise ValueError(f"load_gguf: tensor {t.name!r}: {ne[0]} columns is not a multiple of the "
                             f"{type_name} block of {block}")
        want = int(np.prod(ne)) // block * block_bytes
        if t.n_bytes != want or t.data.nbytes != want or int(t.data_offset) + want > size:
            raise ValueError(f"load_gguf: tensor {t.name!r} ({type_name} {ne}) needs {want} bytes but the file "
                             f"holds {min(t.data.nbytes, max(0, size - int(t.data_offset)))}: truncated or corrupt")
        shape = (ne[1], ne[0]) if len(ne) == 2 else (ne[0],)
        tensors[t.name] = GGUFTensor(t.name, kind, shape, t.data)
    return meta, tensors


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled

    def step(self, what: str) -> None:
        self.done += 1
        if self.enabled:
            width = 30
            fill = width * self.done // self.total
            sys.stderr.write(f"\rloading [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {what:<24}")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def _linear(parts: list, activations: str, bias=None) -> torch.nn.Module:
    """One module computing the concatenated outputs of the weights in parts (GGUFTensors of one
    input size). Fused when they share a quantized type, or are all float."""
    kinds = {p.kind for p in parts}
    quant = kinds & {"q4_0", "q4_1", "q8_0"}
    if len(kinds) > 1 and quant:  # mixed types: one module per part, outputs concatenated
        return Concat([_linear([p], activations, b) for p, b in
                       zip(parts, bias.split([p.shape[0] for p in parts]) if bias is not None else [None] * len(parts))])
    if quant:
        kind = quant.pop()
        cs = [p.canonical() for p in parts]
        cat = {k: None if cs[0][k] is None else torch.cat([c[k] for c in cs]) for k in cs[0]}
        if kind == "q8_0":
            return Int8BlockLinear.from_int8(cat["codes"], cat["scales"], bias, "w8a16" if activations == "float" else "w8a8")
        return Int4Linear.from_int4(cat["codes"], cat["scales"], cat["mins"], bias,
                                    "w4a16" if activations == "float" else "w4a8")
    w = torch.cat([p.float() for p in parts])
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


class Concat(torch.nn.Module):
    """Outputs of several linears on the same input, concatenated (fallback for mixed types)."""

    def __init__(self, parts: list):
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)

    def forward(self, x):
        return torch.cat([p(x) for p in self.parts], dim=-1)


def load_gguf(path, device="cpu", scheme=None, activations: str = "float", progress=None) -> Llama:
    """A Llama-family GGUF file -> lowbit.models.Llama (see the module docstring).

    scheme: None keeps float matmul weights (F32/F16/BF16) in float32; "w8a16" / "w8a8" /
    "w4a16" / "w4a8" quantizes them with lowbit.quantize (quantized tensors of the file are
    always imported as they are). activations: "float" (W4A16 / W8A16 kernels: fp32
    activations) or "int8" (W4A8 / W8A8: activations quantized to int8 per block of 32, as
    llama.cpp's CPU backend does; lowbit keeps the block scales in fp32 where llama.cpp rounds them to
    fp16, so the two differ by that rounding). progress: a bar on stderr (default: when stderr is a terminal).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"load_gguf: scheme must be one of {SCHEMES}, got {scheme!r}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"load_gguf: activations must be one of {ACTIVATIONS}, got {activations!r}")
    meta, tensors = read_gguf(path)
    if "token_embd.weight" not in tensors:
        raise ValueError("load_gguf: the file has no token_embd.weight tensor")
    emb = tensors["token_embd.weight"]
    if len(emb.shape) != 2:
        raise ValueError(f"load_gguf: token_embd.weight has shape {emb.shape}; expected 2-D")
    cfg = LlamaConfig.from_gguf_fields(meta, emb.shape[0])

    def get(name: str, shape: tuple) -> GGUFTensor:
        if name not in tensors:
            raise ValueError(f"load_gguf: missing tensor {name!r}")
        t = tensors[name]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"load_gguf: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)} "
                             f"for this {cfg.arch} configuration")
        return t

    def opt_float(name: str, shape: tuple):
        return get(name, shape).float() if name in tensors else None

    d, hd, f = cfg.dim, cfg.head_dim, cfg.ffn_dim
    q_out, kv_out = cfg.n_heads * hd, cfg.n_kv_heads * hd
    bar = _Progress(cfg.n_layers + 2, progress if progress is not None else sys.stderr.isatty())
    embedding = Embedding(get("token_embd.weight", (cfg.vocab_size, d)))
    bar.step("token_embd")
    blocks = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        qkv = [get(p + "attn_q.weight", (q_out, d)), get(p + "attn_k.weight", (kv_out, d)),
               get(p + "attn_v.weight", (kv_out, d))]
        biases = [opt_float(p + f"attn_{x}.bias", (n,)) for x, n in (("q", q_out), ("k", kv_out), ("v", kv_out))]
        if any(b is not None for b in biases):
            biases = [torch.zeros(n) if b is None else b for b, n in zip(biases, (q_out, kv_out, kv_out))]
            bias = torch.cat(biases)
        else:
            bias = None
        attn = Attention(cfg, _linear(qkv, activations, bias),
                         _linear([get(p + "attn_output.weight", (d, q_out))], activations))
        ffn = FeedForward(_linear([get(p + "ffn_gate.weight", (f, d)), get(p + "ffn_up.weight", (f, d))],
                                  activations),
                          _linear([get(p + "ffn_down.weight", (d, f))], activations))
        blocks.append(Block(cfg, get(p + "attn_norm.weight", (d,)).float(), attn,
                            get(p + "ffn_norm.weight", (d,)).float(), ffn))
        bar.step(f"blk.{i}")
    out_w = tensors.get("output.weight", emb)  # tied embeddings: the output reuses token_embd
    output = _linear([get(out_w.name, (cfg.vocab_size, d))], activations)
    model = Llama(cfg, embedding, blocks, get("output_norm.weight", (d,)).float(), output)
    model.gguf_path = os.path.abspath(os.fspath(path))
    model.chat_template = meta.get("tokenizer.chat_template")
    if scheme is not None:  # the float matmul weights (quantized ones are lowbit modules already)
        quantize(model, scheme, progress=False)
    bar.step("output")
    if torch.device(device).type != "cpu":  # (a move re-lays the weights out: skip the no-op one)
        model = model.to(device)
    return model.eval()

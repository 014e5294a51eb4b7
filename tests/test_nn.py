"""lowbit.nn (Int8Linear) and lowbit.quantize."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

import lowbit
from lowbit.nn import Int8Linear
from lowbit.ref import int8 as ref

from conftest import (
    assert_within_torch_error,
    awq_pack_reference,
    run_concurrently,
    assert_all_finite,
    assert_bitwise_equal,
    assert_close_to_ref,
    dtype_id,
    nmse,
    randn,
    rel_err,
)

SCHEMES = ["w8a16", "w8a8"]
OPS = {"w8a16": lowbit.ops.int8_linear_w8a16, "w8a8": lowbit.ops.int8_linear_w8a8}
REFS = {"w8a16": ref.linear_w8a16, "w8a8": ref.linear_w8a8}
schemes = pytest.mark.parametrize("scheme", SCHEMES)


def make_linear(k, n, bias, gen, dtype=torch.float32):
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return lin.to(dtype)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.act = nn.GELU()
        self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        return x + self.down(self.act(self.up(x)))


def make_mlp(gen, d_in=23, d=48, d_out=10):
    """Linear -> Block -> (Block, LayerNorm) -> Linear: six nn.Linear at three nesting depths."""
    with torch.random.fork_rng(devices=[]):  # default init, seeded from the test, global RNG untouched
        torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
        return nn.Sequential(
            nn.Linear(d_in, d),
            Block(d),
            nn.Sequential(Block(d), nn.LayerNorm(d)),
            nn.Linear(d, d_out),
        ).eval()


def count(model, cls):
    return sum(1 for m in model.modules() if type(m) is cls)


# =====================================================================================
# Int8Linear
# =====================================================================================
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("nk", [(1, 1), (37, 23), (100, 300)], ids=lambda nk: f"N{nk[0]}K{nk[1]}")
@schemes
def test_from_float_matches_ref(isa, gen, scheme, nk, bias):
    n, k = nk
    lin = make_linear(k, n, bias, gen)
    mod = Int8Linear.from_float(lin, scheme)
    q, s = ref.quantize_weight_per_channel(lin.weight)
    assert_bitwise_equal(mod.canonical_qweight(), q, "codes")
    assert_bitwise_equal(mod.scale, s, "scales")
    assert mod.in_features == k and mod.out_features == n and mod.scheme == scheme
    assert (mod.bias is None) == (not bias)
    if bias:
        assert_bitwise_equal(mod.bias, lin.bias.detach(), "bias")
    x = randn((3, 5, k), gen)
    with torch.no_grad():
        y = mod(x)
    b = None if lin.bias is None else lin.bias.detach()
    assert y.shape == (3, 5, n)
    assert_close_to_ref(y, REFS[scheme](x.double(), q, s, b), 2e-6, scheme)
    # the module's eager fast path and the registered op give the same bits
    assert_bitwise_equal(y, OPS[scheme](x, mod.qweight, mod.scale, mod.bias), "module vs op")
    # and the dequantized weight is what the module claims
    assert_bitwise_equal(mod.dequantized_weight(), q.float() * s[:, None], "dequantized_weight")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@schemes
def test_from_float_half_linear(gen, scheme, dtype):
    lin = make_linear(31, 20, True, gen, dtype)
    mod = Int8Linear.from_float(lin, scheme)
    assert mod.scale.dtype == torch.float32 and mod.bias.dtype == dtype
    q, s = ref.quantize_weight_per_channel(lin.weight)
    assert_bitwise_equal(mod.canonical_qweight(), q, "codes")
    x = randn((4, 31), gen, dtype)
    with torch.no_grad():
        y = mod(x)
    assert y.dtype == dtype
    assert_bitwise_equal(y, OPS[scheme](x, mod.qweight, mod.scale, mod.bias), "module vs op")


@schemes
def test_repr_shows_scheme(gen, scheme):
    mod = Int8Linear.from_float(make_linear(8, 4, True, gen), scheme)
    r = repr(mod)
    assert f"scheme='{scheme}'" in r and "in_features=8" in r and "out_features=4" in r and "bias=True" in r


def test_constructor_and_from_float_validation():
    with pytest.raises(ValueError, match="scheme"):
        Int8Linear(4, 4, scheme="w4a4")
    with pytest.raises(ValueError, match="in_features"):
        Int8Linear(0, 4)
    with pytest.raises(ValueError, match="out_features"):
        Int8Linear(4, -1)
    with pytest.raises(TypeError, match="nn.Linear"):
        Int8Linear.from_float(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="scheme"):
        Int8Linear.from_float(nn.Linear(3, 3), "int8")


def assert_forward_rejects_bad_x(mod, k):
    """Wrong K and non-float / float64 x raise errors naming x (checked by every module), also
    without rows; x without rows but of the right K gives y without rows, as nn.Linear does."""
    for m in (2, 0):
        with pytest.raises(ValueError, match="K=31"):
            mod(torch.randn(m, 31))
        with pytest.raises(TypeError, match="x must be"):
            mod(torch.ones(m, k, dtype=torch.int64))
        with pytest.raises(TypeError, match="x must be"):
            mod(torch.randn(m, k, dtype=torch.float64))
    for x in (torch.randn(0, k), torch.randn(5, 0, k, dtype=torch.bfloat16)):
        y = mod(x)
        assert y.shape == (*x.shape[:-1], mod.out_features) and y.dtype == x.dtype


@schemes
def test_forward_bad_input(gen, scheme):
    mod = Int8Linear.from_float(make_linear(23, 37, True, gen), scheme)
    assert_forward_rejects_bad_x(mod, 23)


REPLACED_BUFFERS = {
    "short_scale": ("scale", lambda m: torch.rand(3)),
    "float64_scale": ("scale", lambda m: m.scale.double()),
    "short_bias": ("bias", lambda m: torch.randn(2)),
    "float64_bias": ("bias", lambda m: m.bias.double()),
    "int_bias": ("bias", lambda m: torch.ones(37, dtype=torch.int32)),
    "small_qweight": ("qweight", lambda m: torch.zeros(1, 2, 16, 4, dtype=torch.int8)),
    "canonical_qweight": ("qweight", lambda m: m.canonical_qweight()),
}


@pytest.mark.parametrize("case", list(REPLACED_BUFFERS))
@schemes
def test_replaced_buffers_are_validated(gen, scheme, case):
    """A buffer replaced by plain assignment (mod.scale = ...) must be rejected with a clear error, at
    assignment or at the next forward; the kernel must never read past a too-small buffer."""
    name, make = REPLACED_BUFFERS[case]
    mod = Int8Linear.from_float(make_linear(23, 37, True, gen), scheme)
    x = randn((2, 23), gen)
    with pytest.raises((ValueError, TypeError), match=name):
        setattr(mod, name, make(mod))
        with torch.no_grad():
            mod(x)


def assert_rejected_in_subprocess(code: str, tmp_path, name: str) -> None:
    """Runs code in a fresh interpreter: it must survive and print 'rejected: <error naming name>'."""
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(os.environ), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"the process died (exit code {r.returncode}): {r.stderr[-500:]}"
    assert r.stdout.startswith("rejected:") and name in r.stdout, r.stdout


def test_replaced_qweight_does_not_crash(tmp_path):
    """The same, at a size where reading past the buffer segfaults (so it runs in a subprocess)."""

    code = """
import torch, lowbit
from lowbit.nn import Int8Linear
m = Int8Linear(4096, 4096, scheme="w8a16")
try:
    m.qweight = torch.zeros(1, 2, 16, 4, dtype=torch.int8)
    m(torch.randn(1, 4096))
except (ValueError, TypeError) as e:
    print("rejected:", e)
else:
    print("accepted")
"""
    assert_rejected_in_subprocess(code, tmp_path, "qweight")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_from_float_rejects_nonfinite_weight(bad):
    lin = nn.Linear(5, 3)
    with torch.no_grad():
        lin.weight[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        Int8Linear.from_float(lin)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@schemes
def test_state_dict_round_trip(gen, scheme, bias):
    n, k = 37, 23
    lin = make_linear(k, n, bias, gen)
    mod = Int8Linear.from_float(lin, scheme)
    sd = mod.state_dict()
    assert set(sd) == ({"qweight", "scale", "bias"} if bias else {"qweight", "scale"})
    assert sd["qweight"].dtype == torch.int8 and tuple(sd["qweight"].shape) == (n, k), "canonical [N, K] codes"
    assert_bitwise_equal(sd["qweight"], ref.quantize_weight_per_channel(lin.weight)[0], "state_dict codes")
    assert sd["scale"].dtype == torch.float32 and tuple(sd["scale"].shape) == (n,)
    # survives torch.save / torch.load
    import io

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd2 = torch.load(buf, weights_only=True)
    fresh = Int8Linear(k, n, bias=bias, scheme=scheme)
    fresh.load_state_dict(sd2)
    x = randn((5, k), gen)
    with torch.no_grad():
        assert_bitwise_equal(fresh(x), mod(x), "loaded module vs original")
    assert_bitwise_equal(fresh.qweight, mod.qweight, "packed buffers")


@schemes
def test_load_state_dict_rejects_bad_qweight(gen, scheme):
    mod = Int8Linear.from_float(make_linear(23, 37, True, gen), scheme)
    sd = mod.state_dict()
    for bad in (sd["qweight"][:, :-1].contiguous(), sd["qweight"].float(), mod.qweight.clone()):
        fresh = Int8Linear(23, 37, scheme=scheme)
        with pytest.raises(RuntimeError, match="qweight"):
            fresh.load_state_dict({**sd, "qweight": bad})


@pytest.mark.parametrize("conv", ["half", "bfloat16", "to_bf16", "to_fp16_then_float"])
@schemes
def test_dtype_conversion_keeps_codes_and_fp32_scale(gen, scheme, conv):
    n, k = 37, 23
    mod = Int8Linear.from_float(make_linear(k, n, True, gen), scheme)
    q0, s0, b0 = mod.qweight.clone(), mod.scale.clone(), mod.bias.clone()
    if conv == "half":
        out = mod.half()
        want_bias = torch.float16
    elif conv == "bfloat16":
        out = mod.bfloat16()
        want_bias = torch.bfloat16
    elif conv == "to_bf16":
        out = mod.to(torch.bfloat16)
        want_bias = torch.bfloat16
    else:
        out = mod.to(torch.float16).float()
        want_bias = torch.float32
        b0 = b0.half()  # the bias went through fp16
    assert out is mod
    assert mod.scale.dtype == torch.float32
    assert_bitwise_equal(mod.scale, s0, "scale unchanged")
    assert mod.qweight.dtype == torch.int8
    assert_bitwise_equal(mod.qweight, q0, "qweight unchanged")
    assert mod.bias.dtype == want_bias
    assert "qweight" in dict(mod.named_buffers()) and "scale" in dict(mod.named_buffers())
    x = randn((3, k), gen, want_bias)
    with torch.no_grad():
        y = mod(x)
    assert y.dtype == want_bias
    assert_bitwise_equal(y, OPS[scheme](x, q0, s0, b0.to(want_bias)), "after conversion")


# =====================================================================================
# lowbit.quantize
# =====================================================================================
@schemes
def test_quantize_mlp(gen, scheme, capsys):
    model = make_mlp(gen)
    n_linear = count(model, nn.Linear)
    x = torch.randn(7, 23, generator=gen)
    with torch.no_grad():
        y_float = model(x)
    out = lowbit.quantize(model, scheme)
    assert out is model, "quantize works in place and returns the model"
    assert count(model, nn.Linear) == 0
    assert count(model, Int8Linear) == n_linear
    assert all(m.scheme == scheme for m in model.modules() if isinstance(m, Int8Linear))
    with torch.no_grad():
        y = model(x)
    assert_all_finite(y, scheme)
    err = rel_err(y, y_float)
    assert capsys.readouterr().err == "", "no progress bar for a small model"
    with capsys.disabled():
        print(f"\n  quantize({scheme}) MLP: rel err vs float model {err:.3e}, NMSE {nmse(y, y_float):.3e}")
    assert err < {"w8a16": 0.02, "w8a8": 0.04}[scheme], f"rel err vs float model {err:.3e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@schemes
def test_quantize_half_model(gen, scheme, dtype):
    model = make_mlp(gen).to(dtype)
    x = torch.randn(7, 23, generator=gen).to(dtype)
    with torch.no_grad():
        y_float = model.float()(x.float())
        model.to(dtype)
        lowbit.quantize(model, scheme)
        y = model(x)
    assert y.dtype == dtype
    err = rel_err(y, y_float)
    assert err < 0.05, f"rel err vs fp32 float model {err:.3e}"


def test_quantize_skip(gen):
    model = make_mlp(gen)
    seen = []

    def skip(name, module):
        seen.append((name, type(module)))
        return name.endswith(".down") or name == "0"

    lowbit.quantize(model, "w8a16", skip=skip)
    names = {n for n, m in model.named_modules()}
    assert {n for n, _ in seen} == {"0", "1.up", "1.down", "2.0.up", "2.0.down", "3"} and names >= {n for n, _ in seen}
    assert all(t is nn.Linear for _, t in seen), "skip gets the nn.Linear itself"
    kept = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert kept == {"0", "1.down", "2.0.down"}
    assert {n for n, m in model.named_modules() if isinstance(m, Int8Linear)} == {"1.up", "2.0.up", "3"}


def test_quantize_shared_linear_is_replaced_everywhere(gen):
    """A Linear reachable under two names (weight tying / reuse) must not stay a float nn.Linear."""
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(2, 8, generator=gen)
    lowbit.quantize(model, "w8a16")
    left = [i for i, m in enumerate(model) if type(m) is nn.Linear]
    assert not left, f"positions {left} still hold a float nn.Linear"
    assert model[0] is model[2], "the shared layer stays shared"
    with torch.no_grad():
        assert_all_finite(model(x))


def test_quantize_bad_arguments(gen):
    model = make_mlp(gen)
    n_linear = count(model, nn.Linear)
    with pytest.raises(ValueError, match="scheme"):
        lowbit.quantize(model, "w4a4")
    with pytest.raises(ValueError, match="scheme"):
        lowbit.quantize(model, "W8A8")
    with pytest.raises(TypeError, match="model"):
        lowbit.quantize({"0": nn.Linear(2, 2)}, "w8a16")
    with pytest.raises(TypeError, match="model"):
        lowbit.quantize(None, "w8a16")
    with pytest.raises(TypeError, match="skip"):
        lowbit.quantize(model, "w8a16", skip="down")
    with pytest.raises(ValueError, match="from_float"):
        lowbit.quantize(nn.Linear(4, 4), "w8a16")
    assert count(model, nn.Linear) == n_linear and count(model, Int8Linear) == 0, "failed calls leave the model alone"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_quantize_rejects_nonfinite_weights(gen, bad):
    model = make_mlp(gen)
    with torch.no_grad():
        model[2][0].up.weight[3, 4] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        lowbit.quantize(model, "w8a8")


def test_quantize_failure_leaves_model_unchanged(gen):
    """A model with a NaN in its *last* Linear: quantize raises, and must not leave it half quantized."""
    model = make_mlp(gen)
    with torch.no_grad():
        model[3].weight[0, 0] = float("nan")
    with pytest.raises(ValueError):
        lowbit.quantize(model, "w8a16")
    assert count(model, Int8Linear) == 0, f"{count(model, Int8Linear)} layers were already replaced"


def test_progress_bar(capsys):
    big = nn.Sequential(*[nn.Linear(4, 4) for _ in range(32)])
    lowbit.quantize(big, "w8a16")
    err = capsys.readouterr().err
    assert "lowbit.quantize" in err and "32/32" in err and err.endswith("\n"), repr(err[-200:])

    small = nn.Sequential(*[nn.Linear(4, 4) for _ in range(31)])
    lowbit.quantize(small, "w8a16")
    assert capsys.readouterr().err == ""

    lowbit.quantize(nn.Sequential(*[nn.Linear(4, 4) for _ in range(40)]), "w8a8", progress=False)
    assert capsys.readouterr().err == ""
    lowbit.quantize(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), "w8a8", progress=True)
    assert "2/2" in capsys.readouterr().err


# =====================================================================================
# torch.compile
# =====================================================================================
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@schemes
def test_compile_fullgraph_matches_eager(gen, scheme, backend):
    torch._dynamo.reset()
    model = lowbit.quantize(make_mlp(gen), scheme)
    x = torch.randn(5, 23, generator=gen)
    with torch.no_grad():
        want = model(x)
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        got = compiled(x)
        got3d = compiled(x.view(1, 5, 23))
    assert_bitwise_equal(got, want, f"compiled ({backend}) vs eager")
    assert_bitwise_equal(got3d.view(5, -1), want, f"compiled ({backend}) 3-D vs eager")


def test_compile_inductor_small(gen):
    torch._dynamo.reset()
    model = lowbit.quantize(nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8)).eval(), "w8a8")
    x = torch.randn(3, 16, generator=gen)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, backend="inductor", fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# =====================================================================================
# threads
# =====================================================================================
@schemes
def test_concurrent_calls_match_serial(gen, scheme, restore_threads):
    mod = Int8Linear.from_float(make_linear(576, 576, True, gen), scheme)
    inputs = [torch.randn((1, 3, 17)[i % 3], 576, generator=gen) for i in range(8 * 50)]
    with torch.no_grad():
        serial = [mod(x) for x in inputs]
    results = run_concurrently(mod, inputs, 8)
    for i, (a, b) in enumerate(zip(results, serial)):
        assert_bitwise_equal(a, b, f"call {i}")


@schemes
def test_set_num_threads_mid_run(gen, scheme, restore_threads):
    mod = Int8Linear.from_float(make_linear(300, 257, True, gen), scheme)
    inputs = [torch.randn((1, 17, 64)[i % 3], 300, generator=gen) for i in range(60)]
    with torch.no_grad():
        serial = [mod(x) for x in inputs]
    stop = threading.Event()
    errors = []

    def toggler():
        i = 0
        while not stop.is_set():
            lowbit.set_num_threads((1, None, 2, 3)[i % 4])
            i += 1

    def caller(out):
        try:
            with torch.no_grad():
                for x in inputs:
                    out.append(mod(x))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    outs = [[], []]
    tt = threading.Thread(target=toggler)
    callers = [threading.Thread(target=caller, args=(o,)) for o in outs]
    tt.start()
    for c in callers:
        c.start()
    for c in callers:
        c.join(timeout=120)
    stop.set()
    tt.join(timeout=10)
    assert not errors, errors[0]
    for o in outs:
        assert len(o) == len(serial)
        for i, (a, b) in enumerate(zip(o, serial)):
            assert_bitwise_equal(a, b, f"call {i}")


# =====================================================================================
# Int4Linear
# =====================================================================================
import io  # noqa: E402

import numpy as np  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lowbit.formats import gptq as gptq_fmt  # noqa: E402
from lowbit.formats import int4 as fmt4  # noqa: E402
from lowbit.nn import Int4ActOrderLinear, Int4Linear  # noqa: E402
from lowbit.ref import int4 as ref4  # noqa: E402

INT4_SCHEMES = ["w4a16", "w4a8"]
INT4_OPS = {"w4a16": torch.ops.lowbit.int4_linear_w4a16, "w4a8": torch.ops.lowbit.int4_linear_w4a8}
INT4_REFS = {"w4a16": ref4.linear_w4a16, "w4a8": ref4.linear_w4a8}
int4_schemes = pytest.mark.parametrize("scheme", INT4_SCHEMES)
symmetries = pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
# (N, K, group, bias): N = 1, ragged N (37, 5), every group size, per channel with an odd K
INT4_CASES = [(1, 32, 32, False), (37, 128, 32, True), (37, 256, 64, False), (5, 384, 128, True),
              (37, 75, "K", True)]
# float16 output: the final rounding alone is up to 2^-11 of the largest |y|; bfloat16: 2^-8
HALF_TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _gsize(k, group):
    return k if group == "K" else group


def int4_ref_weights(w, group_size, symmetric, clip_search=False):
    """What Int4Linear.from_float must hold: the reference quantizer, then scales (and mins) rounded to fp16."""
    q = ref4.quantize_weight_int4(w, group_size, symmetric, clip_search)
    scales, mins = fmt4.round_scales_fp16(q["scales"], q["mins"])
    return q["codes"], scales, mins


def assert_canonical_equal(mod, codes, scales, mins, what=""):
    __tracebackhide__ = True
    c, s, m = mod.canonical()
    assert_bitwise_equal(c, codes, f"{what} codes")
    assert_bitwise_equal(s, scales.to(torch.float32), f"{what} scales")
    assert (m is None) == (mins is None), f"{what}: mins is {m!r}, expected {'None' if mins is None else 'a tensor'}"
    if mins is not None:
        assert_bitwise_equal(m, mins.to(torch.float32), f"{what} mins")


def assert_close_scaled(y, ref64, x, w, bias, tol, what=""):
    """|y - ref| <= tol * (|x| . |W|^T + |bias|) elementwise, in float64.

    A float32 dot product's rounding error is relative to the sum of the magnitudes of its terms, not
    to |y| (which cancellation can make arbitrarily small: with N = 1 the INT8 tests' max|ref|
    normalisation then measures cancellation, not the kernel), so the bound is scaled by those."""
    __tracebackhide__ = True
    assert y.shape == ref64.shape, f"{what}: shape {tuple(y.shape)} != {tuple(ref64.shape)}"
    assert_all_finite(y, what)
    scale = x.to(torch.float64).abs() @ w.to(torch.float64).abs().T
    if bias is not None:
        scale = scale + bias.to(torch.float64).abs()
    e = float(((y.to(torch.float64) - ref64.to(torch.float64)).abs() / scale.clamp_min(1e-300)).max())
    assert e <= tol, f"{what}: err {e:.3e} x (|x|.|W|^T + |b|) > {tol:.1e}"


# fp32 accumulation error measured at up to ~1e-6 of sum |x w| (K <= 384: the kernels' partial sums, e.g.
# d * sum(q x) and m * sum(x), can exceed sum |x w|); one wrong code costs ~ d |x_k| / sum |x w| ~ 1e-3 here
FP32_TOL = 4e-6


def int4_op(mod, x):
    return INT4_OPS[mod.scheme](x, mod.qweight, mod.scales, mod.mins, mod.out_features, mod.bias)


@symmetries
@pytest.mark.parametrize("case", INT4_CASES, ids=lambda c: f"N{c[0]}K{c[1]}g{c[2]}{'b' if c[3] else ''}")
@int4_schemes
def test_int4_from_float_matches_ref(isa, gen, scheme, case, symmetric):
    n, k, group, bias = case
    g = _gsize(k, group)
    lin = make_linear(k, n, bias, gen)
    mod = Int4Linear.from_float(lin, scheme, group_size=g, symmetric=symmetric)
    codes, scales, mins = int4_ref_weights(lin.weight, g, symmetric)
    assert_canonical_equal(mod, codes, scales, mins, "from_float")
    assert (mod.in_features, mod.out_features, mod.scheme) == (k, n, scheme)
    assert (mod.group_size, mod.symmetric) == (g, symmetric)
    assert (mod.bias is None) == (not bias)
    if bias:
        assert_bitwise_equal(mod.bias, lin.bias.detach(), "bias")
    assert_bitwise_equal(mod.dequantized_weight(), ref4.dequantize_int4(codes, scales, mins), "dequantized_weight")
    b = None if lin.bias is None else lin.bias.detach()
    for shape in [(3, 5, k), (k,)]:  # M = 15 (GEMM tiles, 3-D) and M = 1 (GEMV, 1-D)
        x = randn(shape, gen)
        with torch.no_grad():
            y = mod(x)
        assert y.shape == (*shape[:-1], n) and y.dtype == torch.float32
        y64 = INT4_REFS[scheme](x.double(), codes, scales, mins, b)
        assert_close_scaled(y, y64, x, mod.dequantized_weight(), b, FP32_TOL, f"{scheme} x{shape}")
        # the eager fast path and the registered op give the same bits
        assert_bitwise_equal(y, int4_op(mod, x), f"module vs op, x{shape}")


@pytest.mark.parametrize("lin_dtype,x_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.bfloat16), (torch.float32, torch.float16)],
                         ids=lambda d: dtype_id(d))
@symmetries
@int4_schemes
def test_int4_from_float_half(gen, scheme, symmetric, lin_dtype, x_dtype):
    n, k, g = 37, 96, 32
    lin = make_linear(k, n, True, gen, lin_dtype)
    mod = Int4Linear.from_float(lin, scheme, group_size=g, symmetric=symmetric)
    codes, scales, mins = int4_ref_weights(lin.weight.float(), g, symmetric)  # half weights widen exactly
    assert_canonical_equal(mod, codes, scales, mins, dtype_id(lin_dtype))
    assert mod.bias.dtype == lin_dtype and mod.scales.dtype == torch.float16
    x = randn((4, k), gen, x_dtype)
    with torch.no_grad():
        y = mod(x)
    assert y.dtype == x_dtype
    y64 = INT4_REFS[scheme](x.double(), codes, scales, mins, mod.bias)
    assert_close_to_ref(y, y64, HALF_TOL[x_dtype], f"{scheme} {dtype_id(lin_dtype)} linear, {dtype_id(x_dtype)} x")
    assert_bitwise_equal(y, int4_op(mod, x), "module vs op")


@pytest.mark.parametrize("group,symmetric", [(32, False), (128, True)], ids=["g32-asym", "g128-sym"])
def test_int4_clip_search(gen, group, symmetric):
    n, k = 19, 256
    lin = make_linear(k, n, False, gen)
    with torch.no_grad():  # outliers make clipping pay off
        lin.weight[1, 7] = 1.0
        lin.weight[4, 200] = -1.2
    w = lin.weight.detach().double()
    plain = Int4Linear.from_float(lin, "w4a16", group_size=group, symmetric=symmetric)
    clip = Int4Linear.from_float(lin, "w4a16", group_size=group, symmetric=symmetric, clip_search=True)
    assert_canonical_equal(clip, *int4_ref_weights(lin.weight, group, symmetric, clip_search=True), "clip_search")
    mse_plain = float(((plain.dequantized_weight().double() - w) ** 2).mean())
    mse_clip = float(((clip.dequantized_weight().double() - w) ** 2).mean())
    assert mse_clip <= mse_plain, f"clip_search MSE {mse_clip:.3e} > plain {mse_plain:.3e}"
    assert mse_clip < mse_plain, "with outliers, clip search should find a better range somewhere"


@int4_schemes
def test_int4_repr(gen, scheme):
    mod = Int4Linear.from_float(make_linear(64, 4, True, gen), scheme, group_size=64, symmetric=True)
    r = repr(mod)
    for part in ("Int4Linear(", "in_features=64", "out_features=4", "bias=True", f"scheme='{scheme}'",
                 "group_size=64", "symmetric=True"):
        assert part in r, f"{part!r} not in {r!r}"
    r = repr(Int4Linear(96, 3, bias=False, scheme=scheme))
    assert "group_size=32" in r and "symmetric=False" in r and "bias=False" in r


def test_int4_constructor_and_from_float_validation(gen):
    with pytest.raises(ValueError, match="scheme"):
        Int4Linear(64, 4, scheme="w8a16")
    with pytest.raises(ValueError, match="scheme"):
        Int4Linear(64, 4, scheme="W4A16")
    with pytest.raises(ValueError, match="in_features"):
        Int4Linear(0, 4)
    with pytest.raises(ValueError, match="out_features"):
        Int4Linear(64, -1)
    with pytest.raises(ValueError, match="group_size.*(does not divide|64)"):
        Int4Linear(96, 4, group_size=64)
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear(96, 4, group_size=48)
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear(23, 4)                                      # default 32 does not divide 23
    Int4Linear(23, 4, group_size=23)                           # per channel
    with pytest.raises(TypeError, match="nn.Linear"):
        Int4Linear.from_float(nn.Conv1d(32, 2, 1))
    with pytest.raises(TypeError, match="nn.Linear"):
        Int4Linear.from_float(Int4Linear(32, 2))
    lin = make_linear(80, 4, True, gen)
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear.from_float(lin, group_size=32)              # 32 does not divide 80
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear.from_float(lin, group_size=40)              # divides, but is not 32/64/128/K
    with pytest.raises(ValueError, match="scheme"):
        Int4Linear.from_float(make_linear(64, 4, True, gen), "int4")
    with torch.no_grad():
        lin.weight[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        Int4Linear.from_float(lin, group_size=80)
    # from_int4
    codes = torch.randint(0, 16, (4, 64), generator=gen, dtype=torch.uint8)
    s = torch.rand(4, 2, generator=gen)
    with pytest.raises(ValueError, match="codes"):
        Int4Linear.from_int4(codes | 16, s)
    with pytest.raises(TypeError, match="codes"):
        Int4Linear.from_int4(codes.to(torch.int8), s)
    with pytest.raises(ValueError, match="scales"):
        Int4Linear.from_int4(codes, torch.rand(3, 2))
    with pytest.raises(ValueError, match="mins"):
        Int4Linear.from_int4(codes, s, torch.rand(4, 1))
    with pytest.raises(ValueError, match="bias"):
        Int4Linear.from_int4(codes, s, bias=torch.zeros(5))


@int4_schemes
def test_int4_forward_bad_input(gen, scheme):
    mod = Int4Linear.from_float(make_linear(64, 37, True, gen), scheme)
    assert_forward_rejects_bad_x(mod, 64)


# ---------------------------------------------------------------- quantization quality
@pytest.mark.parametrize("group", [32, 64, 128, "K"])
@symmetries
def test_int4_quantization_quality(gen, group, symmetric):
    """Output error of a quantized random Linear against the float Linear.

    Round-to-nearest leaves an error uniform in [-d/2, d/2] on each weight (variance d^2 / 12),
    and for x with iid entries the output NMSE equals the weight NMSE, so the module's own
    scales predict it: sum(g * d^2 / 12) / ||W||^2 (a little less: the group's extremes are
    exact). For W ~ N(0, 0.05^2), asymmetric g = 32: d = range / 15 with E[range of 32
    normals] = 4.1 sigma, so NMSE ~ 0.0063 (RMS relative error ~8%). W4A8 adds the int8
    activation error: step amax / 127 per block of 32 (E[amax] ~ 2.4 sigma_x), i.e. an
    NMSE ~ (2.4 / 127)^2 / 12 ~ 3e-5 against the W4A16 output.
    """
    n, k = 64, 256
    g = _gsize(k, group)
    lin = make_linear(k, n, True, gen)
    x = randn((16, k), gen)
    with torch.no_grad():
        y_float = lin(x)
        a16 = Int4Linear.from_float(lin, "w4a16", group_size=g, symmetric=symmetric)
        a8 = Int4Linear.from_float(lin, "w4a8", group_size=g, symmetric=symmetric)
        y16, y8 = a16(x), a8(x)
    w = lin.weight.detach().double()
    d = a16.canonical()[1].double()
    predicted = float((d ** 2).sum() * g / 12 / (w ** 2).sum())
    e16, e8, e8_16 = nmse(y16, y_float), nmse(y8, y_float), nmse(y8, y16)
    assert e16 <= 1.5 * predicted, f"w4a16 NMSE {e16:.2e} > 1.5 x predicted {predicted:.2e}"
    if group == 32 and not symmetric:
        assert e16 < 0.0095, f"asym g32 NMSE {e16:.2e} (RMS rel err {e16 ** 0.5:.1%}); expected ~0.0063"
    assert e8_16 < 1e-4, f"w4a8 vs w4a16 NMSE {e8_16:.2e}, expected ~3e-5"
    assert e8 <= e16 * 1.05 + 1e-4, f"w4a8 NMSE {e8:.2e} vs w4a16 {e16:.2e}"


# ---------------------------------------------------------------- state_dict
@symmetries
@pytest.mark.parametrize("nkg", [(37, 75, "K"), (37, 128, 32), (20, 256, 64), (3, 33, "K")],
                         ids=lambda c: f"N{c[0]}K{c[1]}g{c[2]}")
@int4_schemes
def test_int4_state_dict_round_trip(gen, scheme, nkg, symmetric):
    n, k, group = nkg
    g = _gsize(k, group)
    bias = n != 20
    lin = make_linear(k, n, bias, gen)
    mod = Int4Linear.from_float(lin, scheme, group_size=g, symmetric=symmetric)
    codes, scales, mins = int4_ref_weights(lin.weight, g, symmetric)
    sd = mod.state_dict()
    want_keys = {"qweight", "scales"} | ({"bias"} if bias else set()) | (set() if symmetric else {"mins"})
    assert set(sd) == want_keys
    kh = (k + 1) // 2
    assert sd["qweight"].dtype == torch.uint8 and tuple(sd["qweight"].shape) == (n, kh)
    # nibble order: element 2j in the low nibble, 2j + 1 in the high one, a zero pad nibble for odd K
    padded = torch.zeros(n, 2 * kh, dtype=torch.uint8)
    padded[:, :k] = codes
    assert_bitwise_equal(sd["qweight"] & 0x0F, padded[:, 0::2], "low nibbles")
    assert_bitwise_equal(sd["qweight"] >> 4, padded[:, 1::2], "high nibbles")
    for name, want in (("scales", scales), ("mins", mins)):
        if want is None:
            continue
        assert sd[name].dtype == torch.float16, f"{name}: fp16-exact values are stored in fp16"
        assert tuple(sd[name].shape) == (n, k // g)
        assert_bitwise_equal(sd[name].float(), want, name)
    # through torch.save / torch.load into a fresh module of the same configuration
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd2 = torch.load(buf, weights_only=True)
    fresh = Int4Linear(k, n, bias=bias, scheme=scheme, group_size=g, symmetric=symmetric)
    fresh.load_state_dict(sd2)
    assert_canonical_equal(fresh, codes, scales, mins, "loaded")
    for name in ("qweight", "scales", "mins"):
        a, b = getattr(fresh, name), getattr(mod, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert_bitwise_equal(a, b, f"packed {name}")
    x = randn((5, k), gen)
    with torch.no_grad():
        assert_bitwise_equal(fresh(x), mod(x), "loaded module vs original")
    # and the state_dict of the loaded module is the same again
    sd3 = fresh.state_dict()
    assert set(sd3) == set(sd)
    for key in sd:
        assert_bitwise_equal(sd3[key], sd[key], f"state_dict[{key!r}] after a round trip")


# case -> (the key the error must name, the state_dict made bad)
INT4_BAD_STATE_DICTS = {
    "short_qweight": ("qweight", lambda sd, n, k: {**sd, "qweight": sd["qweight"][:, :-1].contiguous()}),
    "unpacked_qweight": ("qweight", lambda sd, n, k: {**sd, "qweight": torch.zeros(n, k, dtype=torch.uint8)}),
    "int8_qweight": ("qweight", lambda sd, n, k: {**sd, "qweight": sd["qweight"].to(torch.int8)}),
    "float_qweight": ("qweight", lambda sd, n, k: {**sd, "qweight": sd["qweight"].float()}),
    "short_scales": ("scales", lambda sd, n, k: {**sd, "scales": sd["scales"][:, :-1].contiguous()}),
    "scales_rows": ("scales", lambda sd, n, k: {**sd, "scales": sd["scales"][:-1].contiguous()}),
    "float64_scales": ("scales", lambda sd, n, k: {**sd, "scales": sd["scales"].double()}),
    "bf16_scales": ("scales", lambda sd, n, k: {**sd, "scales": sd["scales"].bfloat16()}),
    "short_mins": ("mins", lambda sd, n, k: {**sd, "mins": sd["mins"][:, :-1].contiguous()}),
    "missing_mins": ("mins", lambda sd, n, k: {key: v for key, v in sd.items() if key != "mins"}),
}


@pytest.mark.parametrize("case", list(INT4_BAD_STATE_DICTS))
def test_int4_load_state_dict_rejects_bad(gen, case):
    n, k = 37, 128
    mod = Int4Linear.from_float(make_linear(k, n, True, gen), "w4a16", group_size=64)
    sd = mod.state_dict()
    name, make = INT4_BAD_STATE_DICTS[case]
    bad = make(sd, n, k)
    fresh = Int4Linear(k, n, scheme="w4a16", group_size=64)
    before = {key: v.clone() for key, v in fresh.state_dict().items()}
    with pytest.raises(RuntimeError, match=name):
        fresh.load_state_dict(bad)
    # the module is left usable (no half-loaded layout) and forward does not crash
    after = fresh.state_dict()
    assert set(after) == set(before)
    x = randn((3, k), gen)
    with torch.no_grad():
        assert_all_finite(fresh(x), f"after rejected {case}")


def test_int4_load_state_dict_symmetry_mismatch(gen):
    n, k = 16, 64
    lin = make_linear(k, n, True, gen)
    sd_sym = Int4Linear.from_float(lin, symmetric=True).state_dict()
    sd_asym = Int4Linear.from_float(lin, symmetric=False).state_dict()
    with pytest.raises(RuntimeError, match="mins"):
        Int4Linear(k, n, symmetric=True).load_state_dict(sd_asym)
    with pytest.raises(RuntimeError, match="mins"):
        Int4Linear(k, n, symmetric=False).load_state_dict(sd_sym)


@pytest.mark.filterwarnings("ignore:.*to a meta parameter.*no-op")  # (torch's, for the bias of `stays`)
@pytest.mark.parametrize("config", ["w8a16", "w8a8", "w4a16", "w4a16-sym", "w4a8", "w4a8-sym"])
def test_meta_model_then_load_with_assign(gen, config):
    """The big-model loading pattern (accelerate's init_empty_weights, torch's meta device): a
    model built under `with torch.device("meta")` gets meta buffers (as nn.Linear does; before,
    the default device was ignored), its state_dict has the real keys, shapes and dtypes without
    values, and load_state_dict(assign=True) makes it the saved model (the weights take the
    state_dict's device); without assign the meta module stays meta (torch's no-op)."""
    scheme, symmetric = config.split("-")[0], config.endswith("-sym")
    int4 = scheme.startswith("w4")

    def build(device=None):
        kw = {"group_size": 32, "symmetric": symmetric} if int4 else {}
        cls = Int4Linear if int4 else Int8Linear
        return nn.Sequential(cls(64, 96, scheme=scheme, device=device, **kw), nn.ReLU(),
                             cls(96, 33, bias=False, scheme=scheme, device=device, **kw))

    src = build()
    src.load_state_dict(lowbit.quantize(nn.Sequential(make_linear(64, 96, True, gen), nn.ReLU(),
                                                      make_linear(96, 33, False, gen)), scheme,
                                        **({"group_size": 32, "symmetric": symmetric} if int4 else {})).state_dict())
    x = randn((5, 64), gen)
    with torch.no_grad():
        want = src(x)
    sd = src.state_dict()
    with torch.device("meta"):
        empty = build()
    assert all(t.device.type == "meta" for t in empty.buffers()), "built under torch.device('meta')"
    meta_sd = empty.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in meta_sd.items()} == \
        {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()}, "a meta module's state_dict: the real entries"
    stays = build("meta")
    stays.load_state_dict(dict(sd))  # (a copy: torch's assign=True writes into a state_dict's _metadata)
    assert all(t.device.type == "meta" for t in stays.buffers()), "copying into meta buffers is a no-op"
    empty.load_state_dict(sd, assign=True)
    assert all(t.device.type == "cpu" for t in empty.buffers())
    with torch.no_grad():
        assert_bitwise_equal(empty(x), want, "meta model after load_state_dict(assign=True)")


@symmetries
@int4_schemes
def test_int4_fp32_scales_survive_round_trip(gen, scheme, symmetric):
    """Scales that are not float16 values (1/3, ...) are kept in float32, exactly, through state_dict."""
    n, k, g = 21, 96, 32
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.randint(1, 50, (n, k // g), generator=gen).float() / 3.0) * 1e-3
    assert fmt4.storage_dtype(scales) == torch.float32, "the test needs scales that are not fp16 values"
    mins = None if symmetric else -(torch.randint(1, 20, (n, k // g), generator=gen).float() / 7.0) * 1e-2
    bias = randn((n,), gen)
    mod = Int4Linear.from_int4(codes, scales, mins, bias, scheme)
    assert mod.scales.dtype == torch.float32 and mod.group_size == g and mod.symmetric == symmetric
    assert_canonical_equal(mod, codes, scales, mins, "from_int4")
    sd = mod.state_dict()
    assert sd["scales"].dtype == torch.float32
    assert_bitwise_equal(sd["scales"], scales, "state_dict scales")
    if mins is not None:
        assert sd["mins"].dtype == torch.float32
        assert_bitwise_equal(sd["mins"], mins, "state_dict mins")
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = Int4Linear(k, n, scheme=scheme, group_size=g, symmetric=symmetric)  # holds fp16 zeros
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.scales.dtype == torch.float32
    assert_canonical_equal(fresh, codes, scales, mins, "loaded")
    x = randn((4, k), gen)
    with torch.no_grad():
        y = fresh(x)
        assert_bitwise_equal(y, mod(x), "loaded vs original")
    assert_close_scaled(y, INT4_REFS[scheme](x.double(), codes, scales, mins, bias), x, fresh.dequantized_weight(),
                        bias, FP32_TOL, scheme)


# ---------------------------------------------------------------- from_gguf / from_gptq
@pytest.mark.parametrize("kind", ["q4_0", "q4_1"])
@pytest.mark.parametrize("nk", [(37, 256), (3, 64)], ids=lambda nk: f"N{nk[0]}K{nk[1]}")
@int4_schemes
def test_int4_from_gguf(gen, scheme, nk, kind):
    gq = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType as T

    n, k = nk
    qt = {"q4_0": T.Q4_0, "q4_1": T.Q4_1}[kind]
    w = (torch.randn(n, k, generator=gen) * 0.05).numpy()
    raw = gq.quantize(w, qt)
    deq = torch.from_numpy(gq.dequantize(raw, qt).reshape(n, k).copy())
    bias = randn((n,), gen, scale=0.1)
    mod = Int4Linear.from_gguf(raw, kind, n, k, bias=bias, scheme=scheme)
    assert mod.group_size == 32 and mod.symmetric == (kind == "q4_0") and mod.scheme == scheme
    assert mod.scales.dtype == torch.float16, "GGUF d and m are fp16 values"
    assert_bitwise_equal(mod.dequantized_weight(), deq, "dequantized_weight vs gguf.quants.dequantize")
    x = randn((6, k), gen)
    with torch.no_grad():
        y = mod(x)
    if scheme == "w4a16":
        y64 = x.double() @ deq.double().T + bias.double()
        assert_close_scaled(y, y64, x, deq, bias, FP32_TOL, "vs float64 F.linear of gguf's weight")
        # torch's own fp32 error is of the same kind, so against it allow both
        assert_close_scaled(y, F.linear(x, deq, bias), x, deq, bias, 2 * FP32_TOL, "vs fp32 F.linear")
    else:
        codes, scales, mins = mod.canonical()
        assert_close_scaled(y, ref4.linear_w4a8(x.double(), codes, scales, mins, bias), x, deq, bias, FP32_TOL,
                            "w4a8")
        # and it is gguf's weight times int8 activations (~3e-5 expected; few outputs here, so loose)
        assert nmse(y, F.linear(x, deq, bias)) < 1e-3
    with pytest.raises(ValueError, match="kind"):
        Int4Linear.from_gguf(raw, "q8_0", n, k)
    with pytest.raises(ValueError, match="raw"):
        Int4Linear.from_gguf(raw, kind, n + 1, k)


def _gptq_pack(q_kn, z_gn, zero_offset):
    """AutoGPTQ packing, loop by loop (independent of lowbit.formats.gptq): qweight int32 [K/8, N], qzeros
    int32 [K/g, ceil(N/8)], value i of each word in bits 4i..4i+3."""
    k, n = q_kn.shape
    qweight = np.zeros((k // 8, n), dtype=np.uint32)
    for row in range(k // 8):
        for i in range(8):
            qweight[row] |= q_kn[row * 8 + i].astype(np.uint32) << np.uint32(4 * i)
    qzeros = np.zeros((z_gn.shape[0], (n + 7) // 8), dtype=np.uint32)
    stored = (z_gn - zero_offset).astype(np.uint32)
    for col in range(n):
        qzeros[:, col // 8] |= stored[:, col] << np.uint32(4 * (col % 8))
    return torch.from_numpy(qweight.view(np.int32)), torch.from_numpy(qzeros.view(np.int32))


def _random_qzs(gen, n, k, g, zero_offset=0):
    """(numpy rng, codes [K, N], zero points [K/g, N] in [zero_offset, 15 + zero_offset], fp16 scales
    [K/g, N] of both signs): a GPTQ / AWQ layer's contents, in their [K, N] orientation."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    q = rng.integers(0, 16, (k, n)).astype(np.uint8)
    z = rng.integers(zero_offset, 16 + zero_offset, (k // g, n))
    s = (rng.uniform(1e-3, 5e-2, (k // g, n)) * rng.choice([-1, 1], (k // g, n))).astype(np.float16)
    return rng, q, z, s


def _assert_computes_with_scale_q_minus_z(mod, gen, q, z, s, g, bias, scheme):
    """mod (an Int4Linear of K = q.shape[0] inputs, groups of g) holds w[n, k] = s[k // g, n] *
    (q[k, n] - z[k // g, n]) exactly (in float64 and fp32 alike: an fp16 scale times an integer in
    [-16, 15]) and computes with it; returns (x, y, w_ref)."""
    k, n = q.shape
    assert mod.group_size == g and not mod.symmetric and (mod.in_features, mod.out_features) == (k, n)
    w_ref = torch.from_numpy((s.astype(np.float64).repeat(g, axis=0) * (q.astype(np.float64) - z.repeat(g, axis=0))).T)
    assert torch.equal(mod.dequantized_weight().double(), w_ref), "dequantized weight != scales * (q - z)"
    x = randn((5, k), gen)
    with torch.no_grad():
        y = mod(x)
    codes, sc, mins = mod.canonical()
    assert_close_scaled(y, INT4_REFS[scheme](x.double(), codes, sc, mins, bias), x, w_ref, bias, FP32_TOL, scheme)
    return x, y, w_ref


@pytest.mark.parametrize("nkg", [(24, 256, 128), (16, 64, 32)], ids=lambda c: f"N{c[0]}K{c[1]}g{c[2]}")
@int4_schemes
def test_int4_from_awq(gen, scheme, nkg):
    """An AutoAWQ "gemm" layer (packed loop by loop, independent of lowbit): the module computes with
    w = scale * (q - z) exactly."""
    n, k, g = nkg
    _, q, z, s = _random_qzs(gen, n, k, g)
    bias = randn((n,), gen, scale=0.1)
    mod = Int4Linear.from_awq(awq_pack_reference(q), awq_pack_reference(z), torch.from_numpy(s), bias=bias,
                              scheme=scheme)
    _assert_computes_with_scale_q_minus_z(mod, gen, q, z, s, g, bias, scheme)


@pytest.mark.parametrize("zero_offset", [0, 1])
@pytest.mark.parametrize("nkg", [(24, 256, 128), (13, 64, 32), (40, 128, 64)], ids=lambda c: f"N{c[0]}K{c[1]}g{c[2]}")
@int4_schemes
def test_int4_from_gptq(gen, scheme, nkg, zero_offset):
    n, k, g = nkg
    _, q, z, s = _random_qzs(gen, n, k, g, zero_offset)
    qweight, qzeros = _gptq_pack(q, z, zero_offset)
    scales = torch.from_numpy(s)
    bias = randn((n,), gen, scale=0.1)
    mod = Int4Linear.from_gptq(qweight, qzeros, scales, bias=bias, scheme=scheme, zero_offset=zero_offset)
    x, y, w_ref = _assert_computes_with_scale_q_minus_z(mod, gen, q, z, s, g, bias, scheme)
    if scheme == "w4a16":
        assert_close_scaled(y, x.double() @ w_ref.T + bias.double(), x, w_ref, bias, FP32_TOL, "vs scales * (q - z)")
    # the trivial g_idx is fine, an act-order permutation is rejected
    trivial = torch.arange(k, dtype=torch.int32) // g
    same = Int4Linear.from_gptq(qweight, qzeros, scales, g_idx=trivial, bias=bias, scheme=scheme,
                                zero_offset=zero_offset)
    assert_bitwise_equal(same.qweight, mod.qweight, "trivial g_idx")
    act_order = trivial[torch.randperm(k, generator=gen)]
    with pytest.raises(ValueError, match="g_idx"):
        Int4Linear.from_gptq(qweight, qzeros, scales, g_idx=act_order, scheme=scheme, zero_offset=zero_offset)


@pytest.mark.parametrize("nkg", [(24, 256, 128), (13, 64, 32), (40, 128, 64)], ids=lambda c: f"N{c[0]}K{c[1]}g{c[2]}")
@int4_schemes
def test_int4_act_order_from_gptq(gen, scheme, nkg):
    """A GPTQ act-order layer (desc_act: input k in group g_idx[k], the groups' inputs scattered,
    packed loop by loop): Int4ActOrderLinear computes with w[n, k] = scale[g_idx[k], n] * (q - z)
    exactly, eagerly, bound and after a state_dict round trip; Int4Linear.from_gptq points to it,
    and a g_idx with groups of unequal size is refused."""
    n, k, g = nkg
    rng, q, z, s = _random_qzs(gen, n, k, g)
    order = rng.permutation(k)                      # the act order: the j-th input quantized is order[j]
    g_idx = np.empty(k, dtype=np.int64)
    g_idx[order] = np.arange(k) // g
    qweight, qzeros = _gptq_pack(q, z, 0)
    scales, gi = torch.from_numpy(s), torch.from_numpy(g_idx).to(torch.int32)
    w_ref = torch.from_numpy((s.astype(np.float64)[g_idx] * (q.astype(np.float64) - z[g_idx])).T)
    bias = randn((n,), gen, scale=0.1)
    mod = Int4ActOrderLinear.from_gptq(qweight, qzeros, scales, gi, bias=bias, scheme=scheme)
    assert (mod.in_features, mod.out_features) == (k, n) and mod.inner.group_size == g
    assert torch.equal(mod.dequantized_weight().double(), w_ref), "dequantized weight != scale[g_idx] * (q - z)"
    x = randn((5, k), gen)
    with torch.no_grad():
        y = mod(x)
        assert_bitwise_equal(y, mod.inner(x[:, mod.perm]), "x gathered, then the INT4 layer")
        if scheme == "w4a16":
            assert_close_scaled(y, x.double() @ w_ref.T + bias.double(), x, w_ref, bias, FP32_TOL, "vs float64")
        y_bound = torch.full_like(y, float("nan"))
        mod.bind(x, y_bound)()
        assert_bitwise_equal(y_bound, y, "bound call")
        again = Int4ActOrderLinear(Int4Linear(k, n, scheme=scheme, group_size=g), torch.arange(k))
        again.load_state_dict(mod.state_dict())
        assert_bitwise_equal(again(x), y, "state_dict round trip")
    with pytest.raises(ValueError, match="Int4ActOrderLinear"):
        Int4Linear.from_gptq(qweight, qzeros, scales, g_idx=gi, scheme=scheme)
    with pytest.raises(ValueError, match="K=" + str(k)):
        mod(randn((5, k + 1), gen))
    uneven = gi.clone()
    uneven[0] = (uneven[0] + 1) % (k // g)
    with pytest.raises(ValueError, match="g_idx"):
        Int4ActOrderLinear.from_gptq(qweight, qzeros, scales, uneven, scheme=scheme)
    trivial = Int4ActOrderLinear.from_gptq(qweight, qzeros, scales, torch.arange(k) // g, bias=bias, scheme=scheme)
    assert torch.equal(trivial.perm, torch.arange(k))
    back = gptq_fmt.to_gptq(*mod.inner.canonical(), perm=mod.perm)  # the export, act order kept
    for name, want in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales), ("g_idx", gi)):
        assert torch.equal(back[name], want), name


# ---------------------------------------------------------------- dtype conversions and replaced buffers
@pytest.mark.parametrize("conv", ["half", "bfloat16", "to_fp16", "to_bf16", "to_fp16_then_float"])
@symmetries
@int4_schemes
def test_int4_dtype_conversion_keeps_weights(gen, scheme, symmetric, conv):
    n, k = 37, 64
    mod = Int4Linear.from_float(make_linear(k, n, True, gen), scheme, group_size=32, symmetric=symmetric)
    q0, s0, b0 = mod.qweight.clone(), mod.scales.clone(), mod.bias.clone()
    m0 = None if mod.mins is None else mod.mins.clone()
    canon0 = mod.canonical()
    out, want_bias = {
        "half": (lambda: mod.half(), torch.float16),
        "bfloat16": (lambda: mod.bfloat16(), torch.bfloat16),
        "to_fp16": (lambda: mod.to(torch.float16), torch.float16),
        "to_bf16": (lambda: mod.to(torch.bfloat16), torch.bfloat16),
        "to_fp16_then_float": (lambda: mod.to(torch.float16).float(), torch.float32),
    }[conv]
    assert out() is mod
    if conv == "to_fp16_then_float":
        b0 = b0.half()  # the bias went through fp16
    assert mod.qweight.dtype == torch.uint8
    assert_bitwise_equal(mod.qweight, q0, "qweight unchanged")
    assert_bitwise_equal(mod.scales, s0, "scales unchanged (dtype and bits)")
    if m0 is None:
        assert mod.mins is None
    else:
        assert_bitwise_equal(mod.mins, m0, "mins unchanged")
    assert_canonical_equal(mod, *canon0, conv)
    assert mod.bias.dtype == want_bias
    assert_bitwise_equal(mod.bias, b0.to(want_bias), "bias cast")
    bufs = dict(mod.named_buffers())
    assert "qweight" in bufs and "scales" in bufs and ("mins" in bufs) == (not symmetric)
    x = randn((3, k), gen, want_bias)
    with torch.no_grad():
        y = mod(x)
    assert y.dtype == want_bias
    assert_bitwise_equal(y, INT4_OPS[scheme](x, q0, s0, m0, n, b0.to(want_bias)), "after conversion")
    sd = mod.state_dict()
    assert sd["scales"].dtype == torch.float16 and sd["bias"].dtype == want_bias


INT4_REPLACED_BUFFERS = {
    "short_scales": ("scales", lambda m: torch.rand(3)),
    "float64_scales": ("scales", lambda m: m.scales.double()),
    "bf16_scales": ("scales", lambda m: m.scales.bfloat16()),
    "scales_fewer_groups": ("scales", lambda m: m.scales[:, :1].contiguous()),
    "noncontiguous_scales": ("scales", lambda m: m.scales.transpose(0, 2).contiguous().transpose(0, 2)),
    "short_mins": ("mins", lambda m: m.mins[:, :1].contiguous()),
    "fp32_mins": ("mins", lambda m: m.mins.float()),
    "no_mins": ("mins", lambda m: None),
    "short_bias": ("bias", lambda m: torch.randn(2)),
    "float64_bias": ("bias", lambda m: m.bias.double()),
    "int_bias": ("bias", lambda m: torch.ones(37, dtype=torch.int32)),
    "small_qweight": ("qweight", lambda m: torch.zeros(1, 2, 64, dtype=torch.uint8)),
    "int8_qweight": ("qweight", lambda m: m.qweight.to(torch.int8)),
    "nibble_qweight": ("qweight", lambda m: m.canonical_weights()["qweight"]),
    "canonical_codes": ("qweight", lambda m: m.canonical()[0]),
}


@pytest.mark.parametrize("case", list(INT4_REPLACED_BUFFERS))
@int4_schemes
def test_int4_replaced_buffers_are_validated(gen, scheme, case):
    """A buffer replaced by plain assignment must be rejected with a clear error naming it, at assignment
    or at the next forward; the kernel must never read past a too-small buffer."""
    name, make = INT4_REPLACED_BUFFERS[case]
    mod = Int4Linear.from_float(make_linear(64, 37, True, gen), scheme, group_size=32)
    x = randn((2, 64), gen)
    with torch.no_grad():
        mod(x)  # validated once ...
    with pytest.raises((ValueError, TypeError), match=name):
        setattr(mod, name, make(mod))  # ... and again after the change
        with torch.no_grad():
            mod(x)


def test_int4_replaced_qweight_does_not_crash(tmp_path):
    """The same, at a size where reading past the buffer segfaults (so it runs in a subprocess)."""

    code = """
import torch, lowbit
from lowbit.nn import Int4Linear
m = Int4Linear(4096, 4096, scheme="w4a16")
m(torch.randn(1, 4096))
try:
    m.qweight = torch.zeros(1, 2, 64, dtype=torch.uint8)
    m(torch.randn(1, 4096))
except (ValueError, TypeError) as e:
    print("rejected:", e)
else:
    print("accepted")
"""
    assert_rejected_in_subprocess(code, tmp_path, "qweight")


# ---------------------------------------------------------------- lowbit.quantize
def _int4_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}


@symmetries
@int4_schemes
def test_int4_quantize_mlp(gen, scheme, symmetric, capsys):
    model = make_mlp(gen, d_in=32, d=32)  # every in_features (32, 128) is a multiple of 32
    n_linear = count(model, nn.Linear)
    x = torch.randn(7, 32, generator=gen)
    with torch.no_grad():
        y_float = model(x)
        want = {name: Int4Linear.from_float(m, scheme, 32, symmetric)
                for name, m in model.named_modules() if type(m) is nn.Linear}
    out = lowbit.quantize(model, scheme, group_size=32, symmetric=symmetric)
    assert out is model
    assert count(model, nn.Linear) == 0 and count(model, Int4Linear) == n_linear
    layers = _int4_layers(model)
    assert set(layers) == set(want)
    for name, m in layers.items():
        assert (m.scheme, m.group_size, m.symmetric) == (scheme, 32, symmetric), name
        assert_canonical_equal(m, *want[name].canonical(), name)
    with torch.no_grad():
        y = model(x)
    assert_all_finite(y, scheme)
    assert capsys.readouterr().err == "", "no progress bar for a small model"
    e = nmse(y, y_float)
    with capsys.disabled():
        print(f"\n  quantize({scheme}, sym={symmetric}) MLP: NMSE vs float model {e:.3e}")
    # ~0.006-0.008 per layer (test_int4_quantization_quality); the residual blocks keep it from compounding
    assert e < 0.03, f"NMSE vs float model {e:.3e}"


def test_int4_quantize_group_sizes_and_skip(gen):
    # d_in = 23: only per channel (group 23) fits layer "0"; a group size must fit every layer it touches
    model = make_mlp(gen)                                      # in_features 23, 48, 192, 48, 192, 48
    n_linear = count(model, nn.Linear)
    for g, bad in [(32, "0"), (64, "0"), (128, "0"), (48, "0")]:
        with pytest.raises(ValueError, match=rf"quantize: {bad}: .*group_size"):
            lowbit.quantize(model, "w4a16", group_size=g)
        assert count(model, nn.Linear) == n_linear and count(model, Int4Linear) == 0, "model left unchanged"
    # the first bad layer is not necessarily the first layer
    model64 = make_mlp(gen, d_in=64)                           # in_features 64, 48, ...
    with pytest.raises(ValueError, match=r"quantize: 1\.up: .*group_size"):
        lowbit.quantize(model64, "w4a8", group_size=64)
    assert count(model64, Int4Linear) == 0, "a failure after the first layer leaves nothing replaced"
    # skip the layers the group size does not fit
    x = torch.randn(5, 23, generator=gen)
    lowbit.quantize(model, "w4a16", group_size=32, skip=lambda name, m: m.in_features % 32 != 0)
    assert set(_int4_layers(model)) == {"1.down", "2.0.down"}
    assert {n for n, m in model.named_modules() if type(m) is nn.Linear} == {"0", "1.up", "2.0.up", "3"}
    with torch.no_grad():
        assert_all_finite(model(x))


def test_int4_quantize_shared_linear(gen):
    shared = nn.Linear(64, 64)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(2, 64, generator=gen)
    with torch.no_grad():
        want = Int4Linear.from_float(shared, "w4a8", 64, True)(torch.relu(Int4Linear.from_float(
            shared, "w4a8", 64, True)(x)))
    lowbit.quantize(model, "w4a8", group_size=64, symmetric=True)
    assert not [i for i, m in enumerate(model) if type(m) is nn.Linear]
    assert model[0] is model[2] and isinstance(model[0], Int4Linear), "the shared layer stays shared"
    with torch.no_grad():
        assert_bitwise_equal(model(x), want, "shared layer")


def test_int4_quantize_bad_arguments(gen):
    model = make_mlp(gen, d_in=32, d=32)
    n_linear = count(model, nn.Linear)
    for scheme in SCHEMES:  # int8
        for kw in ({"group_size": 64}, {"symmetric": True}, {"clip_search": True}):
            with pytest.raises(ValueError, match="int4"):
                lowbit.quantize(model, scheme, **kw)
    with pytest.raises(ValueError, match="group_size"):
        lowbit.quantize(model, "w4a16", group_size=0)
    with pytest.raises(ValueError, match="group_size"):
        lowbit.quantize(model, "w4a16", group_size=16)
    with pytest.raises(ValueError, match="from_float"):
        lowbit.quantize(nn.Linear(32, 4), "w4a16")
    with torch.no_grad():
        model[3].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="3: .*NaN or Inf"):
        lowbit.quantize(model, "w4a8")
    assert count(model, nn.Linear) == n_linear and count(model, Int4Linear) == 0, "failed calls leave the model alone"


def test_int4_quantize_clip_search(gen):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    want = {n: Int4Linear.from_float(m, "w4a16", 32, True, clip_search=True)
            for n, m in model.named_modules() if type(m) is nn.Linear}
    lowbit.quantize(model, "w4a16", symmetric=True, clip_search=True)
    assert set(_int4_layers(model)) == set(want)
    for name, m in _int4_layers(model).items():
        assert_canonical_equal(m, *want[name].canonical(), name)


@int4_schemes
def test_int4_compile_fullgraph_matches_eager(gen, scheme):
    torch._dynamo.reset()
    model = lowbit.quantize(make_mlp(gen, d_in=64, d=32), scheme, group_size=32, symmetric=scheme == "w4a8")
    x = torch.randn(5, 64, generator=gen)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    assert_bitwise_equal(got, want, "compiled (aot_eager) vs eager")


@pytest.mark.parametrize("how", ["recompile_3d", "dynamic_true"])
def test_int4_compile_dynamic_shapes(gen, how):
    torch._dynamo.reset()
    model = lowbit.quantize(make_mlp(gen, d_in=64, d=32), "w4a16", group_size=32)
    x = torch.randn(5, 64, generator=gen)
    with torch.no_grad():
        want = model(x)
        if how == "recompile_3d":  # as test_compile_fullgraph_matches_eager does for Int8Linear
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
            assert_bitwise_equal(compiled(x), want, "compiled 2-D")
            got = compiled(x.view(1, 5, 64)).view(5, -1)
        else:
            got = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)(x)
    assert_bitwise_equal(got, want, f"compiled ({how}) vs eager")


# ---------------------------------------------------------------- threads
@int4_schemes
def test_int4_concurrent_calls_match_serial(gen, scheme, restore_threads):
    mod = Int4Linear.from_float(make_linear(512, 300, True, gen), scheme, group_size=64)
    inputs = [torch.randn((1, 3, 17)[i % 3], 512, generator=gen) for i in range(4 * 40)]
    with torch.no_grad():
        serial = [mod(x) for x in inputs]
    results = run_concurrently(mod, inputs, 4)
    for i, (a, b) in enumerate(zip(results, serial)):
        assert_bitwise_equal(a, b, f"call {i}")


# ---------------------------------------------------------------- torch.autocast
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("scheme", SCHEMES + INT4_SCHEMES)
def test_autocast_casts_x_like_nn_linear(gen, scheme, low):
    """Inside torch.autocast a module (and the public op) takes x in autocast's dtype and
    returns that dtype, as nn.Linear does: the same bits as calling it on x cast by hand, eagerly
    and compiled; outside the region, or with it disabled, x's own dtype."""
    lin = make_linear(64, 37, True, gen)
    mod = (Int8Linear if scheme in SCHEMES else Int4Linear).from_float(lin, scheme)
    x = randn((5, 64), gen)
    want = mod(x.to(low))
    torch._dynamo.reset()
    compiled = torch.compile(mod, backend="eager", fullgraph=True)
    with torch.autocast("cpu", dtype=low):
        assert lin(x).dtype == low  # what nn.Linear does in this region
        for got in (mod(x), compiled(x)):
            assert got.dtype == low
            assert_bitwise_equal(got, want, "autocast x")
        with torch.autocast("cpu", enabled=False):
            assert mod(x).dtype == torch.float32
        if scheme in SCHEMES:
            got = OPS[scheme](x, mod.qweight, mod.scale, mod.bias)
        else:
            got = getattr(lowbit.ops, f"int4_linear_{scheme}")(x, mod.qweight, mod.scales, mod.mins,
                                                             mod.out_features, mod.bias)
        assert_bitwise_equal(got, want, "public op under autocast")
    assert mod(x).dtype == torch.float32


# ---------------------------------------------------------------- autograd (x and bias)
def _op_args(mod, scheme, x, bias):
    """The public op and its arguments computing mod(x) with the given bias."""
    if scheme in SCHEMES:
        return OPS[scheme], (x, mod.qweight, mod.scale, bias)
    return getattr(lowbit.ops, f"int4_linear_{scheme}"), (x, mod.qweight, mod.scales, mod.mins, mod.out_features,
                                                           bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("scheme", SCHEMES + INT4_SCHEMES)
def test_gradients_flow_to_x_and_bias(gen, scheme, dtype):
    """A frozen quantized layer passes gradients on as nn.Linear with its dequantized weight does
    (adapters trained around it, QLoRA-style): grad_x = grad_y . W (W8A8: straight through its
    activation rounding) through the module, eagerly and compiled, and to a bias that requires
    grad through the op; weights that require grad are refused instead of silently left out."""
    mod = (Int8Linear if scheme in SCHEMES else Int4Linear).from_float(make_linear(64, 37, True, gen), scheme)
    w = mod.dequantized_weight()
    x = randn((2, 3, 64), gen).to(dtype).requires_grad_()
    g = randn((2, 3, 37), gen).to(dtype)
    want64, torch_grad = g.double() @ w.double(), g @ w.to(dtype)  # (the latter: nn.Linear's backward in dtype)
    torch._dynamo.reset()
    for fn in (mod, torch.compile(mod, backend="eager", fullgraph=True)):
        x.grad = None
        y = fn(x)
        assert y.requires_grad
        y.backward(g)
        assert_within_torch_error(x.grad, want64, torch_grad, f"grad_x ({fn.__class__.__name__})")
    with torch.no_grad():
        assert not mod(x).requires_grad
    bias = randn((37,), gen).requires_grad_()
    op, args = _op_args(mod, scheme, x.detach(), bias)
    op(*args).backward(g)
    torch.testing.assert_close(bias.grad, g.float().sum((0, 1)), rtol=1e-5, atol=1e-5)
    frozen = mod.scale if scheme in SCHEMES else mod.scales
    op, args = _op_args(mod, scheme, x, None)
    args = tuple(frozen.detach().clone().requires_grad_() if a is frozen else a for a in args)
    with pytest.raises(ValueError, match="weights take no gradient"):
        op(*args)


@pytest.mark.parametrize("scheme", SCHEMES + INT4_SCHEMES)
def test_opcheck_with_gradients(gen, scheme):
    """torch.library.opcheck with x and bias requiring grad: the autograd registration and AOT
    dispatch (forward and backward traced) agree with eager."""
    mod = (Int8Linear if scheme in SCHEMES else Int4Linear).from_float(make_linear(64, 37, True, gen), scheme)
    op, args = _op_args(mod, scheme, randn((5, 64), gen).requires_grad_(), randn((37,), gen).requires_grad_())
    torch.library.opcheck(getattr(torch.ops.lowbit, op.__name__).default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_static", "test_aot_dispatch_dynamic"))


def test_inference_ops_refuse_backward(gen):
    """The ops without a backward (attention, paged attention, rms_norm, silu_and_mul, the per-token
    quantizer) still run on tensors that require grad, but backpropagating through them raises a
    NotImplementedError naming the op (torch alone would drop their gradient silently or warn)."""
    q = randn((1, 2, 4, 16), gen).requires_grad_()
    kv = randn((1, 2, 4, 16), gen)
    cache = randn((2, 16, 2, 16), gen)
    tables, lens = torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([20], dtype=torch.int32)
    calls = {
        "attention": lambda: lowbit.attention(q, kv, kv),
        "paged_attention": lambda: lowbit.ops.paged_attention(q[0, :, :1].transpose(0, 1), cache, cache, tables, lens),
        "rms_norm": lambda: lowbit.ops.fused.rms_norm(q, torch.ones(16)),
        "silu_and_mul": lambda: lowbit.ops.fused.silu_and_mul(q),
        "int8_quantize_per_token": lambda: lowbit.ops.int8_quantize_per_token(q)[1],
    }
    for op, call in calls.items():
        y = call()
        assert y.requires_grad, op
        with pytest.raises(NotImplementedError, match=f"lowbit.{op} has no backward"):
            y.sum().backward()
        with torch.no_grad():
            assert not call().requires_grad
    assert q.grad is None

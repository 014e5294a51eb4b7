"""lowbit.nn (Int8Linear) and lowbit.quantize."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import lowbit
from lowbit.nn import Int8Linear
from lowbit.ref import int8 as ref

from conftest import (
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


@schemes
def test_forward_bad_input(gen, scheme):
    mod = Int8Linear.from_float(make_linear(23, 37, True, gen), scheme)
    with pytest.raises(ValueError, match="K=31"):
        mod(torch.randn(2, 31))
    with pytest.raises(TypeError, match="x must be"):
        mod(torch.ones(2, 23, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be"):
        mod(torch.randn(2, 23, dtype=torch.float64))
    with pytest.raises(ValueError, match="x is empty"):
        mod(torch.randn(0, 23))


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


def test_replaced_qweight_does_not_crash(tmp_path):
    """The same, at a size where reading past the buffer segfaults (so it runs in a subprocess)."""
    import os
    import subprocess
    import sys

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
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(os.environ), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"the process died (exit code {r.returncode}): {r.stderr[-500:]}"
    assert r.stdout.startswith("rejected:") and "qweight" in r.stdout, r.stdout


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
    results = [None] * len(inputs)
    errors = []
    start = threading.Barrier(8)

    def worker(t):
        try:
            start.wait()
            with torch.no_grad():
                for i in range(t, len(inputs), 8):
                    results[i] = mod(inputs[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a worker thread hung"
    assert not errors, errors[0]
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

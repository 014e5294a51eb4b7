"""lowbit.ops.fused (rms_norm, silu_and_mul, rope_) against lowbit.ref.fused (float64), on every
ISA level, ragged shapes, fp32 / fp16 / bf16, with poisoned outputs and bad inputs."""
import pytest
import torch

import lowbit
from lowbit import ops, ref
from lowbit.ops import fused

from conftest import dtype_id, randn

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Tolerance: one rounding of the result to its dtype (fp32 arithmetic inside), relative to the row scale.
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SHAPES = [(1, 1), (1, 576), (3, 17), (7, 64), (2, 5, 33), (40, 130)]  # rows cross the 8-row task size


def close(got, want, dtype, what):
    scale = want.double().abs().amax(-1, keepdim=True).clamp_min(1e-30)
    err = float(((got.double() - want.double()).abs() / scale).max()) if got.numel() else 0.0
    assert err <= TOL[dtype], f"{what}: max relative error {err:.3g} > {TOL[dtype]}"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm(isa, gen, dtype, shape, with_residual):
    x, w = randn(shape, gen, dtype, 3.0), randn(shape[-1:], gen, torch.float32)
    r = randn(shape, gen, dtype) if with_residual else None
    got = fused.rms_norm_cpu(x, w, 1e-5, r)
    want = ref.fused.rms_norm(x, w, 1e-5, r)
    if with_residual:
        close(got[0], want[0], dtype, f"{isa} rms_norm")
        assert torch.equal(got[1], want[1]), "the residual sum is x + residual rounded once"
    else:
        close(got[0], want, dtype, f"{isa} rms_norm")
        assert got[1] is x or torch.equal(got[1], x)


def test_rms_norm_public_op_and_weight_dtype(gen):
    x, w = randn((4, 96), gen, torch.bfloat16), randn((96,), gen, torch.bfloat16)
    r = randn((4, 96), gen, torch.bfloat16)
    out, s = ops.rms_norm(x, w, 1e-6, residual=r)
    want, ws = ref.fused.rms_norm(x, w, 1e-6, r)
    close(out, want, torch.bfloat16, "public rms_norm")
    assert torch.equal(s, ws)
    close(ops.rms_norm(x, w, 1e-6), ref.fused.rms_norm(x, w, 1e-6), torch.bfloat16, "no residual")


def test_rms_norm_zero_row_and_nonfinite(gen):
    x = randn((3, 40), gen)
    x[0] = 0
    x[1, 5] = float("inf")
    x[2, 7] = float("nan")
    out, _ = fused.rms_norm_cpu(x, torch.ones(40), 1e-5)
    assert torch.equal(out[0], torch.zeros(40)), "eps keeps an all-zero row finite (zeros)"
    assert torch.isnan(out[1]).any() or torch.isinf(out[1]).any()  # torch gives NaN here too (inf / inf)
    assert torch.isnan(out[2]).all(), "a NaN poisons its whole row, as in torch"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(1, 2), (1, 3072), (5, 34), (9, 2 * 1536), (2, 3, 130)], ids=str)
def test_silu_and_mul(isa, gen, dtype, shape):
    x = randn(shape, gen, dtype, 4.0)
    f = shape[-1] // 2
    gate = x.view(-1, shape[-1])[0, :f]
    gate[: min(3, f)] = torch.tensor([-100.0, 90.0, 0.0], dtype=dtype)[: min(3, f)]  # exp's clamped ends
    got = fused.silu_and_mul_cpu(x)
    assert got.shape == (*shape[:-1], shape[-1] // 2)
    want = ref.fused.silu_and_mul(x)
    err = float(((got.double() - want.double()).abs() / want.double().abs().clamp_min(1e-6 if dtype == torch.float32
                                                                                         else 1e-2)).max())
    assert err <= 4 * TOL[dtype] + 2e-6, f"{isa} silu_and_mul: relative error {err:.3g}"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("neox", [False, True], ids=["pairs", "neox"])
@pytest.mark.parametrize("t,h,d,r", [(1, 1, 2, 1), (1, 12, 64, 32), (5, 3, 64, 16), (17, 4, 128, 64), (9, 2, 80, 33)])
def test_rope(isa, gen, dtype, neox, t, h, d, r):
    x = randn((t, h + 3, d), gen, dtype)  # rotate a strided head slice of a bigger buffer, as the model does
    cos, sin = randn((t, r), gen), randn((t, r), gen)
    before = x.clone()
    view = x[:, :h]
    out = fused.rope_cpu(view, cos, sin, neox)
    assert out is None
    close(view, ref.fused.rope(before[:, :h], cos, sin, neox), dtype, f"{isa} rope")
    assert torch.equal(x[:, h:], before[:, h:]), "heads outside the view are untouched"


def test_rope_public_op_returns_x(gen):
    x = randn((3, 2, 8), gen)
    c, s = torch.cos(randn((3, 4), gen)), torch.sin(randn((3, 4), gen))
    want = ref.fused.rope(x, c, s, True)
    assert ops.rope_(x, c, s, True) is x
    close(x, want, torch.float32, "rope_")


def test_compile_and_opcheck(gen):
    x, w, r = randn((3, 16), gen), randn((16,), gen), randn((3, 16), gen)
    torch.library.opcheck(torch.ops.lowbit.rms_norm.default, (x, w, 1e-5, r))
    torch.library.opcheck(torch.ops.lowbit.silu_and_mul.default, (randn((3, 16), gen),))
    c, s = randn((3, 4), gen), randn((3, 4), gen)
    torch.library.opcheck(torch.ops.lowbit.rope_.default, (randn((3, 2, 8), gen), c, s, False))

    @torch.compile(fullgraph=True, backend="eager")
    def f(x, w, r):
        h, s = ops.rms_norm(x, w, 1e-5, residual=r)
        return ops.silu_and_mul(torch.cat([h, s], -1))

    torch.testing.assert_close(f(x, w, r), ops.silu_and_mul(torch.cat(list(ops.rms_norm(x, w, 1e-5, residual=r)), -1)))


def test_threads_agree(gen, restore_threads):
    x, w = randn((100, 96), gen), randn((96,), gen)
    lowbit.set_num_threads(1)
    one = fused.rms_norm_cpu(x, w, 1e-5)[0]
    lowbit.set_num_threads(2)
    assert torch.equal(one, fused.rms_norm_cpu(x, w, 1e-5)[0])


BAD = {
    "rms_x_int": (lambda: ops.rms_norm(torch.ones(2, 4, dtype=torch.int32), torch.ones(4)), TypeError, "x"),
    "rms_weight_shape": (lambda: ops.rms_norm(torch.ones(2, 4), torch.ones(5)), ValueError, "weight"),
    "rms_eps": (lambda: ops.rms_norm(torch.ones(2, 4), torch.ones(4), -1.0), ValueError, "eps"),
    "rms_residual_shape": (lambda: ops.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-5, torch.ones(3, 4)), ValueError,
                           "residual"),
    "rms_residual_dtype": (lambda: ops.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-5, torch.ones(2, 4).half()),
                           ValueError, "residual"),
    "rms_empty_k": (lambda: ops.rms_norm(torch.ones(2, 0), torch.ones(0)), ValueError, "x"),
    "rms_not_tensor": (lambda: ops.rms_norm([1.0], torch.ones(1)), TypeError, "x"),
    "silu_odd": (lambda: ops.silu_and_mul(torch.ones(2, 5)), ValueError, "x"),
    "silu_int": (lambda: ops.silu_and_mul(torch.ones(2, 4, dtype=torch.int64)), TypeError, "x"),
    "rope_2d": (lambda: ops.rope_(torch.ones(2, 8), torch.ones(2, 4), torch.ones(2, 4)), ValueError, "x"),
    "rope_cos_dtype": (lambda: ops.rope_(torch.ones(2, 1, 8), torch.ones(2, 4).double(), torch.ones(2, 4)), TypeError,
                       "cos"),
    "rope_cos_tokens": (lambda: ops.rope_(torch.ones(2, 1, 8), torch.ones(3, 4), torch.ones(3, 4)), ValueError, "cos"),
    "rope_too_wide": (lambda: ops.rope_(torch.ones(2, 1, 8), torch.ones(2, 5), torch.ones(2, 5)), ValueError, "2R"),
    "rope_sin_shape": (lambda: ops.rope_(torch.ones(2, 1, 8), torch.ones(2, 4), torch.ones(2, 3)), ValueError, "sin"),
    "rope_inner_stride": (lambda: ops.rope_(torch.ones(2, 1, 16)[..., ::2], torch.ones(2, 4), torch.ones(2, 4)),
                          ValueError, "stride"),
    "rope_neox_type": (lambda: ops.rope_(torch.ones(2, 1, 8), torch.ones(2, 4), torch.ones(2, 4), 1), TypeError, "neox"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input(case):
    call, exc, word = BAD[case]
    with pytest.raises(exc, match=word):
        call()


def test_empty_rows(gen):
    """x without rows (tokens) gives outputs without rows, as torch's row ops do (rope_ already
    did); the bound calls, made for fixed buffers of a model's steps, refuse empty x up front."""
    w = randn((8,), gen)
    for x in (torch.empty(0, 8), torch.empty(2, 0, 8, dtype=torch.bfloat16)):
        out = ops.rms_norm(x, w.to(x.dtype))
        assert out.shape == x.shape and out.dtype == x.dtype
        out, s = ops.rms_norm(x, w.to(x.dtype), residual=torch.empty_like(x))
        assert out.shape == s.shape == x.shape
        y = ops.silu_and_mul(x)
        assert y.shape == (*x.shape[:-1], 4) and y.dtype == x.dtype
    x = torch.empty(0, 8)
    with pytest.raises(ValueError, match="x is empty"):
        fused.bind_rms_norm(x, w, 1e-5, None, torch.empty(0, 8), None)
    with pytest.raises(ValueError, match="x is empty"):
        fused.bind_silu_and_mul(x, torch.empty(0, 4))

"""Shared fixtures and helpers for the lowbit test suite.

* ``isa``: runs a test once per CPU ISA level this machine supports (restoring the
  previously selected level afterwards).
* ``gen``: a torch.Generator seeded from the test's id, so every parametrization
  gets its own fresh (but reproducible) random inputs.
* helpers (import them with ``from conftest import ...``): tolerance checks
  computed in float64, bitwise comparisons that treat NaN == NaN, random inputs.
* ``LOWBIT_TEST_TIMEOUT_S=n`` (bench/gpu_check.sh sets it for the CUDA tests): a test still
  running after n seconds (a hung kernel) ends the run instead of holding it until an outer
  timeout, after writing its id and every thread's stack to ``LOWBIT_TEST_TIMEOUT_LOG`` (a
  file: pytest's capture would swallow stderr) or stderr.
"""
from __future__ import annotations

import faulthandler
import os
import shutil
import sys
import threading
import zlib

import pytest
import torch

import lowbit

ISAS = lowbit.supported_cpu_isas()
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def dtype_id(dt) -> str:
    return DTYPE_IDS.get(dt, str(dt))


_timeout_log = None


@pytest.fixture(autouse=True)
def _test_timeout(request):
    seconds = float(os.environ.get("LOWBIT_TEST_TIMEOUT_S", "0") or 0)
    if seconds <= 0:
        yield
        return
    global _timeout_log
    if _timeout_log is None:
        path = os.environ.get("LOWBIT_TEST_TIMEOUT_LOG")
        _timeout_log = open(path, "a") if path else sys.stderr
    _timeout_log.write(f"{request.node.nodeid}: started, timeout {seconds:g} s\n")
    _timeout_log.flush()
    faulthandler.dump_traceback_later(seconds, exit=True, file=_timeout_log)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(params=ISAS)
def isa(request):
    """Select each supported CPU ISA level in turn; restore the previous one after the test."""
    prev = lowbit.cpu_isa()
    lowbit.set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        lowbit.set_cpu_isa(prev)


@pytest.fixture
def gen(request):
    """A generator seeded from the test id (fresh inputs per parametrization, reproducible)."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def restore_threads():
    """Restores lowbit's thread setting (lowbit.set_num_threads) after the test."""
    from lowbit import _native

    prev = _native._num_threads
    try:
        yield
    finally:
        lowbit.set_num_threads(prev)


# ---------------------------------------------------------------- random inputs
def randn(shape, gen, dtype=torch.float32, scale=1.0):
    """Standard normal values (never all zero), rounded to dtype."""
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(dtype)


def rand_codes(n, k, gen, low=-127, high=127):
    """Random int8 weight codes in [low, high]; each row gets at least one +-127 like real weights."""
    q = torch.randint(low, high + 1, (n, k), generator=gen, dtype=torch.int16)
    if low <= -127 and high >= 127:
        col = torch.randint(0, k, (n,), generator=gen)
        sign = torch.where(torch.rand(n, generator=gen) < 0.5, -127, 127).to(torch.int16)
        q[torch.arange(n), col] = sign
    return q.to(torch.int8)


def rand_scale(n, gen, lo=1e-3, hi=1e-1):
    """Positive fp32 per-channel scales, log-uniform in [lo, hi]."""
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    return torch.exp(torch.log(torch.tensor(lo, dtype=torch.float64)) * (1 - u)
                     + torch.log(torch.tensor(hi, dtype=torch.float64)) * u).to(torch.float32)


# ---------------------------------------------------------------- tolerance helpers
def max_abs_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| in float64; NaN if either holds a NaN (so a comparison with it fails)."""
    d = (a.to(torch.float64) - ref.to(torch.float64)).abs()
    return float(d.max()) if d.numel() else 0.0


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|, in float64 (NaN propagates, so `rel_err(...) < tol` fails on NaN)."""
    ref64 = ref.to(torch.float64)
    denom = float(ref64.abs().max())
    err = max_abs_err(a, ref64)
    if denom == 0.0:
        return err
    return err / denom


def nmse(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref||^2 / ||ref||^2 in float64."""
    a64, r64 = a.to(torch.float64), ref.to(torch.float64)
    return float(((a64 - r64) ** 2).sum() / (r64 ** 2).sum().clamp_min(1e-300))


def assert_all_finite(y, what=""):
    """Every element finite (an unwritten or garbage element usually is not)."""
    __tracebackhide__ = True
    bad = int((~torch.isfinite(y)).sum())
    if bad:
        raise AssertionError(f"{what}: {bad} of {y.numel()} output elements are NaN/Inf (unwritten or garbage?)")


def assert_close_to_ref(y, ref64, tol, what=""):
    """All elements finite where ref is finite, and rel_err(y, ref64) <= tol."""
    __tracebackhide__ = True
    assert y.shape == ref64.shape, f"{what}: shape {tuple(y.shape)} != {tuple(ref64.shape)}"
    assert_all_finite(y, what)
    e = rel_err(y, ref64)
    assert e <= tol, f"{what}: rel err {e:.3e} > {tol:.1e}"


def assert_within_torch_error(y, ref64, torch_y, what="", factor=2.0, atol_rel=1e-6):
    """err(y) <= factor * err(torch at the same dtype) + a tiny atol (relative to max|ref|).

    All errors are max-abs vs the float64 reference ref64.
    """
    __tracebackhide__ = True
    assert y.shape == ref64.shape, f"{what}: shape {tuple(y.shape)} != {tuple(ref64.shape)}"
    assert y.dtype == torch_y.dtype, f"{what}: dtype {y.dtype} != {torch_y.dtype}"
    assert_all_finite(y, what)
    ours = max_abs_err(y, ref64)
    theirs = max_abs_err(torch_y, ref64)
    atol = atol_rel * float(ref64.abs().max()) + 1e-30
    assert ours <= factor * theirs + atol, (
        f"{what}: max abs err {ours:.3e} > {factor} x torch's {theirs:.3e} + {atol:.1e}")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of a float tensor, as an integer tensor of the same width."""
    view = {4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(view)


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, what=""):
    """Same dtype, shape and bits; NaNs compare equal to NaNs (payload ignored)."""
    __tracebackhide__ = True
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    if a.is_floating_point():
        na, nb = torch.isnan(a), torch.isnan(b)
        nan_diff = int((na != nb).sum())
        if nan_diff:
            raise AssertionError(f"{what}: NaN positions differ ({nan_diff} elements)")
        ba, bb = bits(a), bits(b)
        diff = (ba != bb) & ~na
        if bool(diff.any()):
            idx = diff.nonzero()[0].tolist()
            raise AssertionError(
                f"{what}: {int(diff.sum())} of {a.numel()} elements differ bitwise; first at {idx}: "
                f"{a[tuple(idx)].item()!r} vs {b[tuple(idx)].item()!r}")
    else:
        ndiff = int((a != b).sum())
        if ndiff:
            idx = (a != b).nonzero()[0].tolist()
            raise AssertionError(f"{what}: {ndiff} of {a.numel()} elements differ; first at {idx}: "
                                 f"{a[tuple(idx)].item()} vs {b[tuple(idx)].item()}")


def poison_allocator(nbytes: int) -> None:
    """Best effort: make the allocator's next block of about nbytes hold NaN bytes, so an
    output element the kernel forgets to write is likely to show up as NaN (outputs are
    allocated inside the ops, so they can't be poisoned directly)."""
    t = torch.full((max(nbytes, 4) // 4,), float("nan"), dtype=torch.float32)
    del t


# ---------------------------------------------------------------- activation layouts
ACTIVATION_VIEWS = ("transposed", "sliced_cols", "row_step", "offset", "3d", "4d", "3d_permuted", "3d_sliced",
                    "expanded", "1d")


def activation_view(view, m, k, gen, dtype=torch.float32):
    """x [..., K] in one of ACTIVATION_VIEWS: strided, offset, broadcast or N-d views (m rows where 2-D)."""
    if view == "transposed":
        return randn((k, m), gen, dtype).t()
    if view == "sliced_cols":
        return randn((m, k + 7), gen, dtype)[:, 3:3 + k]
    if view == "row_step":
        return randn((2 * m, k), gen, dtype)[::2]
    if view == "offset":
        return randn((m * k + 5,), gen, dtype)[5:].view(m, k)
    if view == "3d":
        return randn((2, 9, k), gen, dtype)
    if view == "4d":
        return randn((2, 1, 3, k), gen, dtype)
    if view == "3d_permuted":
        return randn((3, k, 2), gen, dtype).permute(0, 2, 1)
    if view == "3d_sliced":
        return randn((2, 9, k + 4), gen, dtype)[:, 1:, 2:2 + k]
    if view == "expanded":
        return randn((1, k), gen, dtype).expand(m, k)
    if view == "1d":
        return randn((k,), gen, dtype)
    raise AssertionError(view)


# ---------------------------------------------------------------- concurrency
def run_concurrently(fn, inputs, nthreads):
    """[fn(x) for x in inputs], computed by nthreads Python threads started together (thread t
    takes inputs t, t + nthreads, ...). Fails on a hung worker; re-raises a worker's error."""
    results = [None] * len(inputs)
    errors = []
    start = threading.Barrier(nthreads)

    def worker(t):
        try:
            start.wait()
            with torch.no_grad():
                for i in range(t, len(inputs), nthreads):
                    results[i] = fn(inputs[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a worker thread hung"
    assert not errors, errors[0]
    return results


def cuda_detail(fn):
    """fn, with lowbit._cuda.last_error() added to a "CUDA error" RuntimeError (which CUDA error it was)."""
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:
            if "CUDA error" not in str(e):
                raise
            raise RuntimeError(f"{e} [lowbit._cuda.last_error(): {lowbit._native.cuda_module().last_error()!r}]") from e
    return call


def copied_blocks(groups, mapping) -> list:
    """What copy_blocks must leave: clones of every tensor of groups (lists of per-layer caches)
    with block dst set to block src for each (src, dst) row of mapping, in order."""
    want = [[t.clone() for t in g] for g in groups]
    for g in want:
        for t in g:
            for src, dst in mapping.tolist():
                t[dst] = t[src]
    return want


def built_cuda_module():
    """lowbit._cuda when nvcc was there to build it; skips the test when lowbit was built without
    it (no nvcc, or LOWBIT_CUDA=off). Any other ImportError (undefined symbol, bad link) fails."""
    if shutil.which("nvcc") is None and not os.environ.get("CUDACXX"):
        pytest.skip("no nvcc here: lowbit was built without lowbit._cuda")
    try:
        import lowbit._cuda as mod  # noqa: PLC0415
    except ModuleNotFoundError as e:
        pytest.skip(f"lowbit._cuda was not built (LOWBIT_CUDA=off?): {e}")
    return mod


def default_plan(plan, var: str):
    """plan (a K-split plan function of lowbit._cuda) as the default kernels plan it: with the
    kernel switch `var` (set) unset while it runs. An opt-in kernel that plans for more resident
    blocks then runs the default's split, to compare bits."""
    def planned(*args):
        saved = os.environ.pop(var)
        try:
            return plan(*args)
        finally:
            os.environ[var] = saved
    return planned


def capture_graph(fn, warmup: int = 3):
    """(graph, fn's result inside it): fn run warmup times on a side stream (lazy init, allocator
    warm-up), then captured once in a torch.cuda.CUDAGraph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def awq_pack_reference(v) -> torch.Tensor:
    """AutoAWQ's published "gemm" packing, written element by element (independent of
    lowbit.formats.gptq): uint8 values [R, 8 C] -> int32 [R, C], column 8c + order[i] in bits
    4i..4i+3 of word c (AutoAWQ's interleaved order)."""
    import numpy as np

    order = [0, 2, 4, 6, 1, 3, 5, 7]
    out = np.zeros((v.shape[0], v.shape[1] // 8), dtype=np.uint32)
    for c in range(v.shape[1] // 8):
        for i in range(8):
            out[:, c] |= v[:, 8 * c + order[i]].astype(np.uint32) << np.uint32(4 * i)
    return torch.from_numpy(out.view(np.int32))

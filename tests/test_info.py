"""`python -m lowbit.info` and lowbit.info.report()."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lowbit
import lowbit.info

KEYS = {
    "lowbit", "torch", "python", "machine", "cpu_isa_levels", "cpu_isa_supported", "cpu_isa_selected", "threads",
    "cuda_kernels_built", "cuda_archs", "cuda_usable", "cuda_unavailable_reason", "gpu",
}


def _run_info(tmp_path, **env_extra):
    env = dict(os.environ)
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "lowbit.info"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_info_cli(tmp_path):
    r = _run_info(tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    lines = {ln.split(None, 1)[0]: (ln.split(None, 1) + [""])[1] for ln in out.splitlines() if ln.strip()}
    for level in lowbit._native.ISA_LEVELS:
        assert level in lines["cpu_isa_levels"], out
    for level in lowbit.supported_cpu_isas():
        assert level in lines["cpu_isa_supported"], out
    assert lines["cpu_isa_selected"].strip() == lowbit.best_cpu_isa()
    assert int(lines["threads"]) >= 1
    assert lines["torch"].strip() == torch.__version__
    assert lines["lowbit"].strip() == lowbit.__version__
    assert any(k.startswith("cuda") for k in lines), f"no CUDA line:\n{out}"
    usable = lines["cuda_usable"].strip()
    assert usable in ("True", "False")
    if usable == "False":
        reason = lines["cuda_unavailable_reason"].strip()
        assert reason and reason != "None", "an unusable CUDA must come with a reason"


def test_info_cli_follows_env(tmp_path):
    r = _run_info(tmp_path, LOWBIT_CPU_ISA="scalar")
    assert r.returncode == 0, r.stderr
    assert any(ln.split() == ["cpu_isa_selected", "scalar"] for ln in r.stdout.splitlines()), r.stdout


def test_report_keys_and_types():
    rep = lowbit.info.report()
    assert set(rep) == KEYS
    assert rep["lowbit"] == lowbit.__version__
    assert rep["torch"] == torch.__version__
    assert rep["cpu_isa_levels"] == list(lowbit._native.ISA_LEVELS)
    assert rep["cpu_isa_supported"] == lowbit.supported_cpu_isas()
    assert rep["cpu_isa_selected"] == lowbit.cpu_isa()
    assert isinstance(rep["threads"], int) and rep["threads"] == lowbit.get_num_threads()
    assert isinstance(rep["cuda_kernels_built"], bool) and isinstance(rep["cuda_usable"], bool)
    if rep["cuda_usable"]:
        assert rep["cuda_unavailable_reason"] is None and rep["gpu"]
    else:
        assert isinstance(rep["cuda_unavailable_reason"], str) and rep["cuda_unavailable_reason"]
        assert rep["gpu"] is None
    if not rep["cuda_kernels_built"]:
        assert rep["cuda_archs"] is None and not rep["cuda_usable"]


def test_report_follows_selected_isa(isa):
    assert lowbit.info.report()["cpu_isa_selected"] == isa


def test_report_follows_threads(restore_threads):
    lowbit.set_num_threads(3)
    assert lowbit.info.report()["threads"] == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_unavailable_reason_without_gpu():
    reason = lowbit._native.cuda_unavailable_reason()
    assert isinstance(reason, str) and reason
    if lowbit._native.cuda_built_archs() is None:
        with pytest.raises(RuntimeError):
            lowbit._native.cuda_module()

"""lowbit microbenchmarks: ``python -m bench [--quick] [--threads N] [--out DIR] [--only PATTERN] [--gguf FILE]``.

Run from a checkout with lowbit installed. Methodology:

1. Machine first (bench/machine.py), at the fixed thread count: read bandwidth (best of a sum
   over 1 GiB fp32 and an amax over 1 GiB int8), copy bandwidth (512 MiB, read + write
   counted), and fp32 / bf16 / int8 GEMM peaks (torch.mm, torch._int_mm; best over a few large
   shapes and repeats). The roofline time of an op is max(bytes / read bandwidth, ops / peak
   of its arithmetic); "% roofline" is roofline time / measured time, and the table says which
   bound applied (mem / com); it is n/a for the cache-resident "hot" rows. Ceilings are the
   best of their repeats; torch's reductions may not saturate DRAM, so a GEMV can show > 100%.
2. Threads: ``--threads N`` (default torch.get_num_threads()) sets torch.set_num_threads and
   lowbit.set_num_threads, so lowbit and every baseline run on the same number of threads.
3. Each row group (one shape) holds the lowbit implementations and their torch baselines
   (bench/int8.py, bench/int4.py and bench/attention.py document them). GEMV-like groups (M <= 16) give every implementation, lowbit
   and baselines alike, enough weight copies to add up to 3x the last-level cache (at least 2,
   at most 2 GiB) and rotate through them, so each call reads its weights from DRAM, as in
   decoding. M = 512 groups use one copy (compute-bound). The "hot" group uses one copy on
   purpose: it measures per-call overhead of a small (576x576) layer called from Python.
4. Timing: time.perf_counter_ns around samples of back-to-back calls (as many as fill ~0.2 ms,
   so timer overhead vanishes for small calls); warm-up first (every copy at least once); the
   implementations of a group are timed round-robin over several rounds, so a burst of noise on
   this shared machine hits all of them; each reports the median per-call time of its samples.
5. Reported: time, GB/s (bytes the op must move: weights + scales + activations + outputs) and
   GOP/s (2*M*N*K), % of roofline, and per lowbit row the ratio baseline time / lowbit time
   (> 1: lowbit faster). Absolute times on a shared machine are noise; a ratio in one run is
   a figure. Every implementation's first output is also checked against the fp32 x @ W^T
   (relative error in the JSON; a warning above 5%).
6. Accuracy: relative error vs the exact product (Frobenius over the whole output, and the
   median over tokens of each token's relative error), with outlier activation channels.
7. Output: a markdown table (stdout and DIR/bench.md), DIR/bench.json (every sample, machine,
   roofline, git commit, lowbit.info.report()), DIR/ratios.png and DIR/roofline.png, and a
   Targets block with pass / miss from this run's ratios.

8. End to end (bench/e2e.py documents it): prefill and decode tok/s of a whole GGUF model
   (SmolLM2-135M shapes, or ``--gguf FILE``) on lowbit W4A8 / W4A16, torch fp32 and llama.cpp,
   and lowbit's per-token Python overhead (no-op kernels).

``--only PATTERN`` keeps the table rows whose name matches the regular expression (e.g.
``--only 'w8a8 11008x4096'``); baselines of a kept group always run. The accuracy section runs
unless --only is given without matching the word "accuracy"; the end-to-end rows are named
"e2e lowbit W4A8" and "e2e lowbit W4A16" (``--only e2e`` runs only them).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time

import torch

import lowbit
import lowbit.info

from . import attention, e2e, harness, int4, int8, machine
from .harness import Config, OtherLoad, log

SUITES = [int8, int4, attention]  # each: groups(cfg), accuracy(cfg), TARGETS


def git_commit() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def accuracy_text(acc: dict) -> str:
    """A suite's accuracy section: its title, a table of errors per method and case, its summary."""
    cols = [(c, metric) for c in acc["cases"] for metric in acc["metrics"]]
    headers = ["method"] + [f"{c}: {metric}" for c, metric in cols]
    rows = [[name] + [f"{errs[c][metric]:.2e}" for c, metric in cols] for name, errs in acc["errors"].items()]
    return f"{acc['title']}:\n\n" + harness.md_table(headers, rows) + (f"\n\n{acc['summary']}" if acc["summary"] else "")


def measure(cfg: Config) -> tuple:
    """Roofline, every group, accuracy, end to end; returns (roofline, groups, accuracy, e2e, other processes'
    CPU share)."""
    with torch.inference_mode(), OtherLoad() as run_load:
        with OtherLoad() as roof_load:
            roof = machine.measure(cfg)
        cfg.rotate_bytes = 3 * roof.llc_bytes
        todo = [g for suite in SUITES for g in suite.groups(cfg)]
        if not todo and not e2e.wanted(cfg):
            log(f"no benchmark row matches --only {cfg.only!r}")
        groups = harness.run_groups(todo, cfg)

        roof_busy = roof_load.share
        if harness.is_busy(roof_busy, cfg) and cfg.retries:
            log("machine: measuring the roofline again (the machine was busy the first time)")
            with OtherLoad() as again:
                roof = roof.best_of(machine.measure(cfg))
            roof_busy = min(roof_busy, again.share if again.share is not None else 1.0)
        if harness.is_busy(roof_busy, cfg):
            roof.notes.append(f"other processes took {roof_busy:.0%} of the CPU time while the roofline was measured: "
                              "ceilings may be low (% roofline > 100)")
            log("  " + roof.notes[-1])
        harness.apply_roofline(groups, roof)

        acc = {}
        if cfg.wants("accuracy"):
            log("accuracy ...")
            acc = {suite.__name__.split(".")[-1]: suite.accuracy(cfg) for suite in SUITES}
        e2e_res = e2e.run(cfg)
    return roof, groups, acc, e2e_res, run_load.share


def markdown(cfg: Config, roof, groups: list, acc: dict, e2e_res, targets: list, git: dict, load, wall: float) -> str:
    sections = [
        f"# lowbit benchmarks ({'quick' if cfg.quick else 'full'} run, {cfg.threads} thread(s))",
        f"{machine.machine_info().get('cpu', '?')}; lowbit {lowbit.__version__} ({lowbit.cpu_isa()}), "
        f"torch {torch.__version__}; commit {git['commit']}{' (dirty)' if git['dirty'] else ''}; "
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}; other processes took {harness.fmt_load(load)} of the CPU "
        "time during the run",
        harness.roofline_text(roof, groups),
        "Ratios: baseline time / lowbit time (> 1: lowbit faster). % roofline: mem = read bandwidth bound, "
        "com = compute bound (int8 peak for W8A8 / FBGEMM / _int_mm, fp32 for W8A16, bf16 for bf16 ops). "
        "torch._int_mm* is the bare int8 GEMM on pre-quantized inputs (no quantize / dequantize work). "
        "'hot' rows: one weight copy, cache-warm, to expose per-call overhead; other M<=16 rows rotate "
        "weights through > 3x LLC. med/min: spread of the samples; others: share of the CPU time other "
        "processes took while the group was timed.",
        harness.busy_warning(groups, cfg),
        harness.results_table(groups),
        "Baselines:\n\n" + harness.baseline_notes(groups),
        harness.baselines_table(groups),
        *(accuracy_text(a) for a in acc.values()),
        e2e.markdown(e2e_res),
        "```\n" + harness.targets_block(targets, cfg) + "\n```",
        f"Wall time: {wall:.0f} s",
    ]
    return "\n\n".join(x for x in sections if x) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0],
                                 epilog="Methodology: see the docstring of bench/__main__.py.")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats (1-2 minutes)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="threads for torch and lowbit (default: torch.get_num_threads() = %(default)s)")
    ap.add_argument("--out", default="bench_out", help="output folder (default: %(default)s)")
    ap.add_argument("--only", metavar="PATTERN", help="run only rows whose name matches this regex")
    ap.add_argument("--gguf", metavar="FILE", default=os.environ.get("LOWBIT_BENCH_GGUF"),
                    help="GGUF model of the end-to-end rows (default: $LOWBIT_BENCH_GGUF, else a synthetic "
                         "SmolLM2-135M-shaped file written to the output folder)")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    if args.only is not None:
        try:
            re.compile(args.only)
        except re.error as e:
            ap.error(f"--only: not a regular expression ({e})")

    t_start = time.time()
    torch.set_num_threads(args.threads)
    lowbit.set_num_threads(args.threads)
    cfg = Config.preset(args.quick, threads=args.threads, out=args.out, only=args.only)
    cfg.gguf = args.gguf  # read by bench/e2e.py
    os.makedirs(cfg.out, exist_ok=True)
    log(f"lowbit {lowbit.__version__} ({lowbit.cpu_isa()}), torch {torch.__version__}, {cfg.threads} thread(s), "
        f"{'quick' if cfg.quick else 'full'} run -> {cfg.out}/")

    roof, groups, acc, e2e_res, load = measure(cfg)
    targets = harness.check_targets([t for suite in SUITES for t in suite.TARGETS], groups) + e2e.check_targets(e2e_res)
    wall, git = time.time() - t_start, git_commit()
    md = markdown(cfg, roof, groups, acc, e2e_res, targets, git, load, wall)
    report = {
        "argv": sys.argv, "config": vars(cfg), "time": datetime.datetime.now().isoformat(), "wall_s": wall,
        "other_load": load, "git": git, "lowbit_path": lowbit.__file__, "python": platform.python_version(), "machine": machine.machine_info(),
        "roofline": roof.to_json(), "lowbit_info": lowbit.info.report(), "groups": groups, "accuracy": acc,
        "e2e": e2e_res, "targets": targets,
    }
    with open(os.path.join(cfg.out, "bench.md"), "w") as f:
        f.write(md)
    harness.write_json(os.path.join(cfg.out, "bench.json"), report)
    pngs = harness.write_plots(cfg.out, groups)
    print(md)
    log(f"wrote {cfg.out}/bench.md, {cfg.out}/bench.json" + "".join(f", {p}" for p in pngs) + f" in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

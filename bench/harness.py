"""Timing, buffer rotation, results, and the table / JSON / PNG writers shared by every suite.

A suite (bench/int8.py, ...) describes its work as Groups: one input shape, the lowbit
implementations under test (Impl with ``row`` set: each is one line of the table) and the
torch baselines they are compared with (Impl without ``row``). The harness builds every
Impl's buffers, times all of them interleaved, and derives throughput, % of roofline and
ratios from the medians.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import lowbit

GiB = 1 << 30


# ---------------------------------------------------------------- configuration
@dataclass
class Config:
    threads: int
    out: str
    quick: bool = False
    only: Optional[str] = None
    budget_s: float = 2.0          # timing budget per implementation per group
    rounds: int = 5                # the group's implementations are timed round-robin, this many rounds
    min_samples: int = 6
    max_samples: int = 2000
    warmup: int = 3                # calls before timing (and at least one per rotated copy)
    sample_ns: int = 200_000       # a sample is as many back-to-back calls as fill about this
    rotate_bytes: int = 96 << 20   # rotated weight copies of one Impl add up to at least this (3 x LLC)
    max_copy_bytes: int = 2 * GiB  # ... and at most this
    busy: float = 0.15             # other processes' share of CPU time above which a group is "busy"
    retries: int = 1               # re-run the busy groups at the end this many times (keeping the quietest)

    @classmethod
    def preset(cls, quick: bool, **kw) -> "Config":
        if quick:
            return cls(quick=True, budget_s=0.25, rounds=3, min_samples=3, max_samples=100, retries=0, **kw)
        return cls(**kw)

    def wants(self, name: str) -> bool:
        return self.only is None or re.search(self.only, name) is not None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- what is measured
@dataclass
class Impl:
    """One implementation of a group's op: lowbit (``row`` names its table line) or a baseline."""
    name: str                          # e.g. "lowbit W8A8", "fp32 F.linear"
    make: Callable[[], Callable]       # builds one copy of the weights; returns the zero-argument call
    nbytes: int                        # bytes one call must move (weights + scales + activations + outputs)
    weight_bytes: int                  # bytes of one copy's weights (decides how many copies rotate)
    ops: int                           # 2 * M * N * K
    peak: str                          # compute peak that bounds it: "fp32" | "bf16" | "int8"
    row: Optional[str] = None          # table row name; None for a baseline
    note: str = ""
    to_float: Optional[Callable] = lambda y: y  # output -> float result for the sanity check; None: no check


@dataclass
class Group:
    name: str
    impls: list
    rotate: bool                       # rotate weight copies past the LLC (GEMV-like rows)
    roofline: bool = True              # False for cache-resident ("hot") groups: DRAM roofline n/a
    reference: Optional[Callable] = None  # () -> fp32 reference output for the sanity check
    meta: dict = field(default_factory=dict)
    max_rel_err: float = 0.05          # the sanity check warns above this (INT4 weights lose ~8%)


# ---------------------------------------------------------------- timing
def time_calls(calls: list, n_samples: int, inner: int, start: int = 0) -> tuple:
    """The one timing loop: n_samples samples of `inner` back-to-back calls, rotating through
    `calls` (one per weight copy). Returns (per-call ns of each sample, next rotation index)."""
    n, out = len(calls), []
    for _ in range(n_samples):
        block = [calls[(start + i) % n] for i in range(inner)]
        start = (start + inner) % n
        t0 = time.perf_counter_ns()
        for f in block:
            f()
        out.append((time.perf_counter_ns() - t0) / inner)
    return out, start


def repeat_ns(fn: Callable, reps: int, warmup: int = 1) -> list:
    """Per-call ns of `reps` single calls of fn, after `warmup` calls."""
    time_calls([fn], warmup, 1)
    return time_calls([fn], reps, 1)[0]


class OtherLoad:
    """Share of the machine's CPU time taken by other processes (and hypervisor steal) inside a
    ``with`` block, from /proc/stat minus this process's own time; None where /proc is missing.
    On a 2-core machine torch's OpenMP ops lose a scheduler tick (~4 ms) whenever one of their
    threads is preempted, so a busy machine distorts ratios: the harness measures it."""
    share = None

    @staticmethod
    def _read():
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            own = sum(int(t) for t in f.read().rsplit(")", 1)[1].split()[11:13])  # utime + stime
        busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]                             # ... + irq, softirq, steal
        return busy, busy + v[3] + v[4], own

    def __enter__(self):
        try:
            self._t0 = self._read()
        except (OSError, ValueError, IndexError):
            self._t0 = None
        return self

    def __exit__(self, *exc):
        if self._t0 is not None:
            b1, t1, o1 = self._read()
            b0, t0, o0 = self._t0
            self.share = max(0.0, (b1 - b0) - (o1 - o0)) / max(t1 - t0, 1)
        return False


@contextlib.contextmanager
def threads(n: int):
    """Run torch and lowbit on n threads inside the block."""
    old = torch.get_num_threads(), lowbit.get_num_threads()
    torch.set_num_threads(n)
    lowbit.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old[0])
        lowbit.set_num_threads(old[1])


def _n_copies(weight_bytes: int, rotate: bool, cfg: Config) -> int:
    if not rotate:
        return 1
    want = max(2, math.ceil(cfg.rotate_bytes / max(weight_bytes, 1)))
    return max(1, min(want, cfg.max_copy_bytes // max(weight_bytes, 1)))


def _rel_err(y, ref) -> float:
    y = y.float()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def run_group(group: Group, cfg: Config, idx: int, total: int) -> dict:
    """Builds, checks and times every Impl of the group; returns its results (roofline: see
    apply_roofline)."""
    t_start = time.time()
    log(f"[{idx}/{total}] {group.name}: building {len(group.impls)} implementations")
    with threads(1):  # building is many small torch ops: on a busy machine 2-thread ones stall for ticks
        calls = {impl.name: [impl.make() for _ in range(_n_copies(impl.weight_bytes, group.rotate, cfg))]
                 for impl in group.impls}

    ref = group.reference() if group.reference else None
    errs = {}
    for impl in group.impls:
        if ref is not None and impl.to_float is not None:
            errs[impl.name] = _rel_err(impl.to_float(calls[impl.name][0]()), ref)
            if errs[impl.name] > group.max_rel_err:
                log(f"  WARNING: {impl.name} differs from the fp32 reference by {errs[impl.name]:.3g} (relative)")

    plan = {}
    for impl in group.impls:  # warm up every copy (slow calls: once); calibrate sample size and count
        cs = calls[impl.name]
        slow = time_calls(cs, 1, 1)[0][0] > 50e6
        est = statistics.median(time_calls(cs, len(cs) if slow else max(cfg.warmup, len(cs)), 1)[0][-cfg.warmup:])
        inner = max(1, round(cfg.sample_ns / est))
        n = int(min(max(cfg.budget_s * 1e9 / (inner * est), cfg.min_samples), cfg.max_samples))
        plan[impl.name] = (inner, n)

    samples = {impl.name: [] for impl in group.impls}
    starts = dict.fromkeys(samples, 0)
    with OtherLoad() as load:
        for r in range(cfg.rounds):  # interleaved, so a burst of machine noise hits every Impl alike
            for impl in group.impls:
                inner, n = plan[impl.name]
                k = n * (r + 1) // cfg.rounds - n * r // cfg.rounds
                s, starts[impl.name] = time_calls(calls[impl.name], k, inner, starts[impl.name])
                samples[impl.name] += s
    del calls

    results = {}
    for impl in group.impls:
        s = sorted(samples[impl.name])
        med = statistics.median(s)
        results[impl.name] = {
            "name": impl.name, "row": impl.row, "lowbit": impl.row is not None, "note": impl.note,
            "copies": _n_copies(impl.weight_bytes, group.rotate, cfg), "inner": plan[impl.name][0],
            "median_us": med / 1e3, "min_us": s[0] / 1e3, "p10_us": s[len(s) // 10] / 1e3,
            "p90_us": s[(len(s) * 9) // 10] / 1e3, "samples_ns": s,
            "bytes": impl.nbytes, "ops": impl.ops, "gbs": impl.nbytes / med, "gops": impl.ops / med,
            "peak": impl.peak, "rel_err_vs_fp32": errs.get(impl.name),
        }
        r = results[impl.name]
        log(f"  {impl.name:24s} {_fmt_us(r['median_us']):>10s}  {r['gbs']:7.1f} GB/s  {r['gops']:8.1f} GOP/s  "
            f"med/min {med / s[0]:4.2f}  ({r['copies']} cop{'y' if r['copies'] == 1 else 'ies'})")
    log(f"  other processes took {fmt_load(load.share)} of the CPU time while timing")

    base = [i.name for i in group.impls if i.row is None]
    rows = []
    for impl in group.impls:
        if impl.row is not None:
            r = results[impl.name]
            rows.append({"row": impl.row, "impl": impl.name,
                         "ratios": {b: results[b]["median_us"] / r["median_us"] for b in base},
                         "ratios_of_min": {b: results[b]["min_us"] / r["min_us"] for b in base}})
    return {"group": group.name, "meta": group.meta, "rotate": group.rotate, "roofline": group.roofline,
            "other_load": load.share, "wall_s": time.time() - t_start, "results": results, "rows": rows}


def is_busy(share, cfg: Config) -> bool:
    return share is not None and share >= cfg.busy


def run_groups(groups: list, cfg: Config) -> list:
    """Runs every group; then, cfg.retries times, re-runs those that met a busy machine and
    keeps the quieter attempt (load on a shared machine comes and goes)."""
    out = [run_group(g, cfg, i + 1, len(groups)) for i, g in enumerate(groups)]
    for _ in range(cfg.retries):
        busy = [i for i, r in enumerate(out) if is_busy(r["other_load"], cfg)]
        if not busy:
            break
        log(f"re-timing {len(busy)} group(s) that met a busy machine")
        for j, i in enumerate(busy):
            again = run_group(groups[i], cfg, j + 1, len(busy))
            if again["other_load"] < out[i]["other_load"]:
                out[i] = again
    return out


def apply_roofline(groups: list, roof) -> None:
    """Adds roofline time, bound and % of roofline to every result (n/a for cache-resident groups)."""
    for g in groups:
        for r in g["results"].values():
            t_roof, bound = roof.time_ns(r["bytes"], r["ops"], r["peak"]) if g["roofline"] else (None, "n/a")
            r.update(roofline_us=t_roof and t_roof / 1e3, bound=bound,
                     pct_roofline=t_roof and 100 * t_roof / (r["median_us"] * 1e3))


# ---------------------------------------------------------------- targets
ROOFLINE = "roofline"  # a Target "baseline" meaning: the row's fraction of its roofline time


@dataclass
class Target:
    text: str
    row: str
    baseline: str      # a baseline's name, or ROOFLINE
    at_least: float


def _roofline_fraction(r: dict, g: dict, key: str):
    res = g["results"][r["impl"]]
    t_roof = res["roofline_us"]
    return t_roof and t_roof / res[key]


def check_targets(targets: list, groups: list) -> list:
    found = {(r["row"], b): (r, g) for g in groups for r in g["rows"] for b in [*r["ratios"], ROOFLINE]}
    out = []
    for t in targets:
        r, g = found.get((t.row, t.baseline), (None, None))
        if r is not None and t.baseline == ROOFLINE:
            v, v_min = _roofline_fraction(r, g, "median_us"), _roofline_fraction(r, g, "min_us")
        else:
            v, v_min = r and r["ratios"][t.baseline], r and r["ratios_of_min"][t.baseline]
        out.append({"target": t.text, "row": t.row, "baseline": t.baseline, "at_least": t.at_least, "ratio": v,
                    "ratio_of_min": v_min, "other_load": g and g["other_load"],
                    "status": "not run" if v is None else ("PASS" if v >= t.at_least else "MISS")})
    return out


def targets_block(checked: list, cfg: Config) -> str:
    lines = ["Targets (ratio = baseline median / lowbit median, or roofline time / lowbit median, this run; "
             "[the same of the minima; others' CPU share]):"]
    for c in checked:
        got, extra = "   --", ""
        if c["ratio"] is not None:
            got = f"{c['ratio']:5.2f}x"
            extra = (f"  [{c['ratio_of_min']:.2f}x; others {fmt_load(c['other_load'])}"
                     + ("; busy machine: unreliable]" if is_busy(c["other_load"], cfg) else "]"))
        lines.append(f"  [{c['status']:7s}] {got}  {c['target']} (need >= {c['at_least']:.2f}x){extra}")
    return "\n".join(lines)


def busy_warning(groups: list, cfg: Config) -> str:
    """A paragraph for the report when other processes disturbed the run, else ''."""
    busy = [g for g in groups if is_busy(g["other_load"], cfg)]
    if not busy:
        return ""
    return (f"**Busy machine:** other processes took >= {cfg.busy:.0%} of the CPU time during {len(busy)} of "
            f"{len(groups)} groups (column 'others'). torch's OpenMP kernels lose whole scheduler ticks when "
            "a thread is preempted (medians stuck at multiples of ~4 ms), lowbit's pool less so: ratios of those "
            "groups flatter lowbit. The JSON keeps every sample; 'med/min' shows the spread.")


# ---------------------------------------------------------------- formatting
def _fmt_us(us: float) -> str:
    return f"{us / 1e3:.2f} ms" if us >= 1e4 else f"{us:.1f} µs"


def fmt_load(share) -> str:
    return "n/a" if share is None else f"{share:.0%}"


def _fmt_roof(r: dict) -> str:
    return "n/a" if r["pct_roofline"] is None else f"{r['pct_roofline']:.0f}% ({r['bound'][:3]})"


def md_table(headers: list, rows: list) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def baseline_names(groups: list) -> list:
    names = []
    for g in groups:
        for r in g["results"].values():
            if not r["lowbit"] and r["name"] not in names:
                names.append(r["name"])
    return names


def results_table(groups: list) -> str:
    bases = baseline_names(groups)
    headers = ["row", "time", "GB/s", "GOP/s", "% roofline"] + [f"× {b}" for b in bases] + ["med/min", "others"]
    rows = []
    for g in groups:
        for row in g["rows"]:
            r = g["results"][row["impl"]]
            ratios = [f"{row['ratios'][b]:.2f}" if b in row["ratios"] else "–" for b in bases]
            rows.append([row["row"], _fmt_us(r["median_us"]), f"{r['gbs']:.1f}", f"{r['gops']:.1f}",
                         _fmt_roof(r)] + ratios + [f"{r['median_us'] / r['min_us']:.2f}",
                                                   fmt_load(g["other_load"])])
    return md_table(headers, rows)


def baselines_table(groups: list) -> str:
    headers = ["group", "baseline", "time", "GB/s", "GOP/s", "% roofline", "med/min"]
    rows = []
    for g in groups:
        for r in g["results"].values():
            if not r["lowbit"]:
                rows.append([g["group"], r["name"], _fmt_us(r["median_us"]), f"{r['gbs']:.1f}", f"{r['gops']:.1f}",
                             _fmt_roof(r), f"{r['median_us'] / r['min_us']:.2f}"])
    return md_table(headers, rows)


def baseline_notes(groups: list) -> str:
    notes = {}
    for g in groups:
        for r in g["results"].values():
            if not r["lowbit"] and r["note"]:
                notes.setdefault(r["name"], r["note"])
    return "\n".join(f"- {name}: {note}" for name, note in notes.items())


def roofline_text(roof, groups: list) -> str:
    p = roof.peak_gops
    peaks = ", ".join(f"{k} {v:.0f} GOP/s" if v else f"{k} n/a" for k, v in p.items())
    lines = [f"Roofline: read {roof.read_gbs:.1f} GB/s, copy {roof.copy_gbs:.1f} GB/s (r+w); peaks {peaks}; "
             f"LLC {roof.llc_bytes >> 20} MiB."]
    mem = [(r["gbs"], r["name"], g["group"]) for g in groups for r in g["results"].values() if r["bound"] == "memory"]
    if mem:
        gbs, name, group = max(mem)
        lines.append(f"Highest bandwidth any memory-bound implementation reached in this run: {gbs:.1f} GB/s "
                     f"({name}, {group}){' -- above the measured read ceiling' if gbs > roof.read_gbs else ''}.")
    return " ".join(lines + [f"Note: {n}." for n in roof.notes])


# ---------------------------------------------------------------- files
def write_json(path: str, report: dict) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)


def write_plots(out: str, groups: list) -> list:
    """ratios.png: lowbit vs each baseline per row; roofline.png: % of roofline of every Impl."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plots (pip install matplotlib)")
        return []
    rows = [(g, r) for g in groups for r in g["rows"]]
    if not rows:
        return []
    roof_rows = [(g, r) for g, r in rows if g["results"][r["impl"]]["pct_roofline"] is not None]
    bases = baseline_names(groups)

    def grouped_bars(name, labels, series, ref_line, ylabel, title, log_y=False):
        """One bar per (row, series); series: [(legend, {row index: value})]."""
        fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(labels) + 2), 5))
        width = 0.8 / max(len(series), 1)
        for j, (legend, values) in enumerate(series):
            xs = [i + (j - (len(series) - 1) / 2) * width for i in values]
            ax.bar(xs, list(values.values()), width, label=legend)
        ax.axhline(ref_line, color="k", lw=0.8)
        if log_y:
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=7)
        ax.set_title(title)
        fig.tight_layout()
        path = os.path.join(out, name)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    ratio_series = [(f"vs {b}", {i: r["ratios"][b] for i, (_, r) in enumerate(rows) if b in r["ratios"]})
                    for b in bases]
    roof_series = []
    for name in ["lowbit"] + bases:
        values = {}
        for i, (g, r) in enumerate(roof_rows):
            key = r["impl"] if name == "lowbit" else name
            if key in g["results"] and g["results"][key]["pct_roofline"] is not None:
                values[i] = g["results"][key]["pct_roofline"]
        roof_series.append((name, values))
    paths = [
        grouped_bars("ratios.png", [r["row"] for _, r in rows], ratio_series, 1.0,
                     "baseline time / lowbit time (>1: lowbit faster)", "lowbit vs torch baselines (same run)",
                     log_y=True),
        grouped_bars("roofline.png", [r["row"] for _, r in roof_rows], roof_series, 100.0, "% of measured roofline",
                     "% of roofline (memory: read bandwidth; compute: measured GEMM peak)"),
    ]
    return paths

"""The machine's roofline, measured with torch at the fixed thread count before any kernel runs.

* read bandwidth: the best of ``sum`` over a 1 GiB fp32 tensor and ``amax`` over a 1 GiB int8
  one (bytes read / time) -- the GEMV ceiling, since a GEMV only reads its weights. These torch
  reductions may not saturate DRAM (2 threads), so a kernel can land somewhat above 100%;
* copy bandwidth: ``dst.copy_(src)`` of 512 MiB, counted as read + write bytes (2 x 512 MiB;
  write-allocate traffic not counted), reported for reference;
* compute peaks: the best GEMM rate over a few large shapes, fp32 and bf16 by
  ``torch.mm``, int8 by ``torch._int_mm`` (int8 x int8 -> int32, oneDNN/VNNI), in GOP/s
  (2 ops per multiply-add).

Ceilings are the best of their repeats (kernels are reported by the median): on a shared
machine noise only ever lowers a measured ceiling, and an underestimated ceiling would show
kernels above 100%. The roofline time of an op is ``max(bytes / read_bw, ops / peak)``;
"% of roofline" is that time over the measured one.
"""
from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass, field

import torch

from .harness import Config, log, repeat_ns

GiB = 1 << 30


@dataclass
class Roofline:
    read_gbs: float                      # GB/s (1e9 bytes/s)
    copy_gbs: float                      # read + write bytes counted
    peak_gops: dict                      # "fp32" | "bf16" | "int8" -> GOP/s, or None if not measurable
    llc_bytes: int
    notes: list = field(default_factory=list)
    details: dict = field(default_factory=dict)  # every shape that was measured

    def time_ns(self, nbytes: int, ops: int, peak: str) -> tuple:
        """Roofline time of an op and what bounds it ("memory" or "compute")."""
        t_mem = nbytes / self.read_gbs
        p = self.peak_gops.get(peak)
        t_cmp = ops / p if p else 0.0
        return (t_mem, "memory") if t_mem >= t_cmp else (t_cmp, "compute")

    def best_of(self, other: "Roofline") -> "Roofline":
        """Ceilings from two measurements: the best of each (noise only ever lowers a ceiling)."""
        peaks = {k: max((v for v in (self.peak_gops.get(k), other.peak_gops.get(k)) if v), default=None)
                 for k in self.peak_gops}
        details = {**self.details, **{f"{k} (again)": v for k, v in other.details.items()}}
        return Roofline(max(self.read_gbs, other.read_gbs), max(self.copy_gbs, other.copy_gbs), peaks,
                        self.llc_bytes, self.notes + [n for n in other.notes if n not in self.notes], details)

    def to_json(self) -> dict:
        return asdict(self)


def llc_bytes() -> int:
    """Size of the largest cache level (sysfs), 32 MiB if it can't be read."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            if not d.startswith("index"):
                continue
            with open(os.path.join(base, d, "size")) as f:
                txt = f.read().strip()
            m = re.fullmatch(r"(\d+)([KMG]?)", txt)
            if m:
                best = max(best, int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)])
    except OSError:
        pass
    return best or 32 << 20


def machine_info() -> dict:
    """What the numbers were measured on."""
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "llc_bytes": llc_bytes()}
    try:
        with open("/proc/cpuinfo") as f:
            txt = f.read()
        m = re.search(r"^model name\s*:\s*(.*)$", txt, re.M)
        info["cpu"] = m.group(1) if m else platform.processor()
        flags = set((re.search(r"^flags\s*:\s*(.*)$", txt, re.M) or [None, ""])[1].split())
        info["isa_flags"] = sorted(flags & {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                                            "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"})
        info["hypervisor"] = "hypervisor" in flags
    except OSError:
        info["cpu"] = platform.processor()
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"MemTotal:\s*(\d+) kB", f.read())
        info["mem_bytes"] = int(m.group(1)) * 1024 if m else None
    except OSError:
        pass
    return info


def _best_gemm(kind: str, shapes: list, make, reps: int, details: dict) -> float:
    """Best GOP/s over shapes and repeats of a GEMM built by make(m, k, n) -> callable."""
    best = 0.0
    for m, k, n in shapes:
        fn = make(m, k, n)
        ts = repeat_ns(fn, reps)
        t = min(ts)
        gops = 2 * m * n * k / t
        details[f"{kind} {m}x{k}x{n}"] = {"best_ns": t, "gops": gops, "samples_ns": ts}
        log(f"  {kind:5s} GEMM {m}x{k}x{n}: {gops:7.1f} GOP/s")
        best = max(best, gops)
    return best


def _mm(dtype):
    def make(m, k, n):
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        return lambda: torch.mm(a, b)
    return make


def _int_mm(m, k, n):
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (k, n), dtype=torch.int8)
    return lambda: torch._int_mm(a, b)


def measure(cfg: Config) -> Roofline:
    log(f"machine: measuring the roofline with {cfg.threads} thread(s)")
    reps = 3 if cfg.quick else 7
    details, notes = {}, []

    read_gbs = 0.0
    for name, make, op in (("fp32 sum", lambda: torch.rand(GiB // 4), torch.sum),
                           ("int8 amax", lambda: torch.randint(-127, 128, (GiB,), dtype=torch.int8), torch.amax)):
        a = make()
        ts = repeat_ns(lambda: op(a), reps)
        t = min(ts)
        details[f"read 1 GiB {name}"] = {"best_ns": t, "gbs": a.nbytes / t, "samples_ns": ts}
        read_gbs = max(read_gbs, a.nbytes / t)
        log(f"  read  {a.nbytes / t:6.1f} GB/s ({name} over 1 GiB)")
        del a

    src, dst = torch.rand(GiB // 8), torch.empty(GiB // 8)
    ts = repeat_ns(lambda: dst.copy_(src), reps)
    t = min(ts)
    copy_gbs = 2 * src.nbytes / t
    details["copy 512 MiB fp32"] = {"best_ns": t, "gbs": copy_gbs, "samples_ns": ts}
    del src, dst
    log(f"  copy  {copy_gbs:6.1f} GB/s (512 MiB, read + write counted)")

    sizes = [2048, 3072] if cfg.quick else [2048, 4096]
    cubes = [(s, s, s) for s in sizes]
    peaks = {
        "fp32": _best_gemm("fp32", cubes, _mm(torch.float32), reps, details),
        "bf16": _best_gemm("bf16", cubes, _mm(torch.bfloat16), reps, details),
    }
    try:
        int8_shapes = [(2048, 4096, 4096)] + ([] if cfg.quick else [(4096, 4096, 4096)])
        peaks["int8"] = _best_gemm("int8", int8_shapes, _int_mm, reps, details)
    except RuntimeError as e:  # not every CPU build of torch has a CPU _int_mm
        peaks["int8"] = None
        notes.append(f"int8 peak not measurable (torch._int_mm failed: {e}); int8 ops use the memory roofline only")
        log("  " + notes[-1])
    return Roofline(read_gbs, copy_gbs, peaks, llc_bytes(), notes, details)

#!/usr/bin/env python3
"""What the CUDA kernels compile to, on a machine without a GPU: the checks behind the
"compile-verified" changes (README, GPU section). A developer tool, not part of the tests.

    python3 dev/sass.py build FILE.cu [-o OUT.cubin] [--arch 90a] [--root DIR]
        nvcc with the project's flags: one cubin of csrc/cuda/FILE.cu (from DIR, default this
        checkout: point it at an exported older tree to compare), plus ptxas' report.
    python3 dev/sass.py regs FILE.cu [--arch 90a] [--root DIR] [--match SUBSTR]
        per kernel: registers, spill stores / loads, shared memory (ptxas -v).
    python3 dev/sass.py loops OUT.cubin [--match SUBSTR]
        per kernel: the innermost loop holding an MMA (HMMA / IMMA / HGMMA...), its size in
        instructions and its mix; the main loop an instruction-count change is about.
    python3 dev/sass.py diff OLD.cubin NEW.cubin
        per kernel (matched by name): whether the SASS is identical (constant-bank offsets
        ignored); a change meant to leave the code alone shows "same" for every kernel.

cuobjdump comes with the CUDA toolkit; where the toolkit lacks it, `pip download
nvidia-cuda-cuobjdump` and unpack the wheel, and point CUOBJDUMP at its binary.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]
MMA = re.compile(r"\b(HMMA|IMMA|HGMMA|IGMMA|QGMMA)\b")


def cuobjdump() -> str:
    exe = os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")
    for cand in (exe, "/usr/local/cuda/bin/cuobjdump"):
        if cand and os.path.exists(cand):
            return cand
    sys.exit("cuobjdump not found: set CUOBJDUMP (pip download nvidia-cuda-cuobjdump has one)")


def nvcc(root: str, name: str, arch: str, out: str) -> str:
    """Compiles csrc/cuda/<name> of root into out (a cubin); returns ptxas' -v report."""
    src = os.path.join(root, "csrc", "cuda", name)
    cmd = ["nvcc", *FLAGS, f"-I{root}/csrc/include", f"-I{root}/csrc/cuda",
           f"--generate-code=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-cubin", src, "-o", out]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(run.stderr)
    return run.stderr


def functions(cubin: str) -> dict:
    """{kernel name: [(address, instruction text)]} of a cubin."""
    out = subprocess.run([cuobjdump(), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    res = {}
    for f in re.split(r"\n\s*Function : ", out)[1:]:
        name = f.split("\n", 1)[0].strip()
        res[name] = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", f)]
    return res


def opcode(ins: str) -> str:
    return re.sub(r"^@!?U?P[0-9T]+\s+", "", ins).split(" ")[0].split(".")[0]


def innermost_mma_loop(ins: list) -> list | None:
    """The shortest backward-branch range of [(address, text)] holding an MMA instruction."""
    index = {addr: i for i, (addr, _) in enumerate(ins)}
    best = None
    for i, (_, text) in enumerate(ins):
        m = re.search(r"BRA\s.*?(0x[0-9a-f]+)", text)
        j = index.get(int(m.group(1), 16)) if m else None
        if j is None or j >= i:
            continue
        body = [t for _, t in ins[j:i + 1]]
        if any(MMA.search(t) for t in body) and (best is None or len(body) < len(best)):
            best = body
    return best


def demangled_short(name: str) -> str:
    """Anonymous-namespace hashes out: the same kernel of two builds gets the same name."""
    return re.sub(r"_GLOBAL__N__[0-9a-f]+_\d+_\w+?_cu_[0-9a-f]+", "ANON", name)


def cmd_build(a) -> None:
    out = a.o or os.path.splitext(os.path.basename(a.file))[0] + ".cubin"
    sys.stdout.write(nvcc(a.root, a.file, a.arch, out))
    print(f"wrote {out}")


def cmd_regs(a) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report = nvcc(a.root, a.file, a.arch, os.path.join(tmp, "k.cubin"))
    name = spill = None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            spill = m.groups()
        m = re.search(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?", line)  # no smem: dynamic only
        if m and name and a.match in name:
            print(f"{m.group(1):>4} regs  spills {spill[0]}/{spill[1]} B  smem {m.group(2) or 0:>6} B  {name}")
            name = None


def cmd_loops(a) -> None:
    for name, ins in functions(a.cubin).items():
        if a.match not in name:
            continue
        loop = innermost_mma_loop(ins)
        if loop is None:
            continue
        mix = collections.Counter(opcode(t) for t in loop).most_common(8)
        print(f"{len(loop):>5} instructions  {' '.join(f'{k}:{v}' for k, v in mix)}  {name}")


def cmd_diff(a) -> None:
    def norm(cubin):
        return {demangled_short(n): [re.sub(r"c\[0x0\]\[0x[0-9a-f]+\]", "c[param]", t) for _, t in ins]
                for n, ins in functions(cubin).items()}
    old, new = norm(a.old), norm(a.new)
    same = 0
    for n in sorted(new):
        if n not in old:
            print(f"new only: {n}")
        elif old[n] == new[n]:
            same += 1
        else:
            print(f"changed ({len(old[n])} -> {len(new[n])} instructions): {n}")
    for n in sorted(set(old) - set(new)):
        print(f"old only: {n}")
    print(f"{same} of {len(new)} kernels identical")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("build", "regs"):
        p = sub.add_parser(name)
        p.add_argument("file", help="a file of csrc/cuda, e.g. int4.cu")
        p.add_argument("--arch", default="90a")
        p.add_argument("--root", default=ROOT, help="the tree to compile (default: this checkout)")
        if name == "build":
            p.add_argument("-o", help="output cubin (default: FILE.cubin here)")
        else:
            p.add_argument("--match", default="", help="only kernels whose mangled name contains this")
    p = sub.add_parser("loops")
    p.add_argument("cubin")
    p.add_argument("--match", default="")
    p = sub.add_parser("diff")
    p.add_argument("old")
    p.add_argument("new")
    a = ap.parse_args(argv)
    {"build": cmd_build, "regs": cmd_regs, "loops": cmd_loops, "diff": cmd_diff}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())

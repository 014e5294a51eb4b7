#!/usr/bin/env python3
"""Thread model of quantize_per_token_vec_kernel (csrc/cuda/int8.cu, LOWBIT_CUDA_QUANT=vec).

Replays, for one row, what every thread of the block loads, scans and stores: the launch's
block size (launch_quantize), the chunks of blockDim * kQuantVecs vectors, QuantChunk's
element indices, its zero fill past K, the vector / element-by-element paths and the reuse of
the registers in pass 2 when the row fits in one chunk. Checks, for fp32 (4 per vector) and
16-bit (8 per vector) elements, ragged and aligned K, single- and multi-chunk rows:
  * no load or store outside the row (a 16-byte load or a kVec-byte store only of whole vectors
    inside it);
  * pass 1 sees every element of the row exactly once (so amax and the NaN/Inf test are the
    row's), pass 2 stores every code exactly once, each from the element of the same index;
  * a 16-byte access is 16-byte aligned (x and q rows start 16-byte aligned on the vector path).
Then the same under 3 mutations of the index math, each of which must fail a check.
Exit status 0 = pass.
"""
from __future__ import annotations

import sys

K_QUANT_VECS = 4
K_MAX_THREADS = 1024


def block_threads(K: int, kvec: int) -> int:
    """launch_quantize: enough warps that a thread holds at most kQuantVecs vectors, up to 32."""
    warps = ((K + kvec - 1) // kvec + 32 * K_QUANT_VECS - 1) // (32 * K_QUANT_VECS)
    return 32 * min(warps, K_MAX_THREADS // 32)


def first(base: int, i: int, tid: int, threads: int, kvec: int, mutation: str) -> int:
    if mutation == "no_block_stride":  # vectors of a thread not strided by blockDim
        return (base + i + tid) * kvec
    return (base + i * threads + tid) * kvec


def replay(K: int, kvec: int, elem_bytes: int, ldx: int, mutation: str = "") -> list:
    """Runs the kernel's index math for one row; returns a list of failures (empty = pass)."""
    errors = []
    vec = K % kvec == 0 and ldx % kvec == 0
    threads = block_threads(K, kvec)
    chunk = threads * K_QUANT_VECS * kvec
    if mutation == "chunk_in_vectors":  # the loop steps by vectors, not elements
        chunk = threads * K_QUANT_VECS
    row = list(range(K))  # element k holds the value k: a load's value tells its index
    seen = [0] * K
    regs = {}  # (tid, i) -> the values a thread holds after its last load
    loads = 0

    def load(base: int) -> None:
        nonlocal loads
        for tid in range(threads):
            for i in range(K_QUANT_VECS):
                e0 = first(base, i, tid, threads, kvec, mutation)
                vals = []
                if vec:
                    if e0 < K:
                        if (e0 * elem_bytes) % 16:
                            errors.append(f"misaligned 16-byte load at element {e0}")
                        if e0 + kvec > K:
                            errors.append(f"16-byte load past the row at element {e0}")
                        vals = [row[e] if e < K else None for e in range(e0, e0 + kvec)]
                    else:
                        vals = [0] * kvec  # make_int4(0, ...)
                else:
                    vals = [row[e] if e < K else 0 for e in range(e0, e0 + kvec)]
                regs[(tid, i)] = (e0, vals)
                loads += 1

    def scan() -> None:
        for (tid, i), (e0, vals) in regs.items():
            for j, v in enumerate(vals):
                e = e0 + j
                if e < K:
                    if v != e:
                        errors.append(f"element {e} scanned as {v}")
                    else:
                        seen[e] += 1

    stored = [0] * K

    def store(base: int) -> None:
        for tid in range(threads):
            for i in range(K_QUANT_VECS):
                e0 = first(base, i, tid, threads, kvec, mutation)
                if e0 >= K:
                    continue
                held_e0, vals = regs[(tid, i)]
                if held_e0 != e0:
                    errors.append(f"thread {tid} stores vector {e0} from registers holding {held_e0}")
                if vec and (e0 % kvec or e0 + kvec > K):  # q rows start 16-byte aligned; kVec-byte stores
                    errors.append(f"bad {kvec}-byte store at {e0}")
                for j in range(kvec):
                    e = e0 + j
                    if e < K:
                        if vals[j] != e:
                            errors.append(f"code {e} computed from element {vals[j]}")
                        stored[e] += 1

    for k in range(0, K, chunk):
        load(k // kvec)
        scan()
    for k in range(0, K, chunk):
        if K > chunk and mutation != "no_reload":  # no_reload: a row past one chunk goes wrong
            load(k // kvec)
        store(k // kvec)
    if any(c != 1 for c in seen):
        errors.append(f"pass 1 saw elements {sorted({c for c in seen})} times")
    if any(c != 1 for c in stored):
        errors.append(f"pass 2 stored codes {sorted({c for c in stored})} times")
    return errors[:3]


def main() -> int:
    cases = []
    for kvec, elem_bytes in ((8, 2), (4, 4)):
        for K in (1, 7, 8, 23, 40, 300, 4096, 4100, 11008, 16384, 16385, 32768, 33001, 40000, 70000):
            for ldx in (K, K + 3, K + kvec):
                cases.append((K, kvec, elem_bytes, ldx))
    failed = 0
    for K, kvec, elem_bytes, ldx in cases:
        errs = replay(K, kvec, elem_bytes, ldx)
        if errs:
            failed += 1
            print(f"FAIL K={K} kVec={kvec} ldx={ldx}: {errs}")
    print(f"{len(cases) - failed}/{len(cases)} cases pass")
    caught = 0
    mutations = ("no_block_stride", "chunk_in_vectors", "no_reload")
    for mutation in mutations:
        found = False
        for K, kvec, elem_bytes, ldx in cases:
            errs = replay(K, kvec, elem_bytes, ldx, mutation)
            if errs:
                found = True
                break
        print(f"mutation {mutation}: {'caught' if found else 'NOT caught'}")
        caught += found
    return 0 if failed == 0 and caught == len(mutations) else 1



if __name__ == "__main__":
    sys.exit(main())

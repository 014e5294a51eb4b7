"""Lane model of w8a8_decode_kernel (csrc/cuda/int8.cu, LOWBIT_CUDA_W8A8_DECODE=mma), for
checking its index math without a GPU.

One block: 16 output columns, kWarps = 4 warps splitting the 64-k tiles (a quarter each).
Each lane holds, per tile, Int8W's slots (16 codes of weight rows na = gid and na + 8 from
k0 = 64 t + 16 tig, zeros past N and K) and 16 codes of activation row gid (row M - 1 past M,
zeros past K); step s of the tile runs mma.m16n8k32 s8 with A = weight words (2 s of row na,
2 s of row na + 8, 2 s + 1 of na, 2 s + 1 of na + 8) and B = activation words (2 s, 2 s + 1),
fragments as in the PTX ISA. The warps' int32 sums are added and lane (gid, tig)'s acc[e]
goes to column 16 nt + gid + 8 (e >> 1), row 2 tig + (e & 1). The result must equal the
exact integer product q(x) . q(w)^T on every stored output, each stored once (K % 16 == 0,
as the kernel requires). Mutations (A words in the wrong order, B words swapped, the warps'
k ranges overlapping, rows and columns of the output swapped) must each be caught.

Run: python3 dev/lane_models/w8a8_decode.py   (numpy only; not part of the test suite)
"""

from __future__ import annotations

import numpy as np

WARPS = 4
MUTATIONS = ("a_order", "b_swap", "warp_overlap", "out_swap")


def words(codes16: np.ndarray) -> list[np.ndarray]:
    """16 int8 codes as 4 words of 4 (word j: codes 4 j .. 4 j + 3)."""
    return [codes16[4 * j:4 * j + 4] for j in range(4)]


def mma_s8(c, a, b):
    """c[lane][4] += A . B for mma.m16n8k32 s8 fragments: a[lane][4] and b[lane][2] words of 4 codes."""
    A = np.zeros((16, 32), dtype=np.int64)
    B = np.zeros((32, 8), dtype=np.int64)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for reg, (r, k) in enumerate([(g, 4 * t), (g + 8, 4 * t), (g, 16 + 4 * t), (g + 8, 16 + 4 * t)]):
            A[r, k:k + 4] = a[lane][reg]
        for reg, k in enumerate([4 * t, 16 + 4 * t]):
            B[k:k + 4, g] = b[lane][reg]
    C = A @ B
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for e, (r, n) in enumerate([(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]):
            c[lane][e] += C[r, n]


def block(qx: np.ndarray, qw: np.ndarray, nt: int, mut: str = "") -> dict:
    """The outputs (m, n) -> int sum one block stores."""
    M, K = qx.shape
    N = qw.shape[0]
    ktiles = -(-K // 64)
    per = -(-ktiles // WARPS)
    sums = np.zeros((WARPS, 32, 4), dtype=np.int64)
    for warp in range(WARPS):
        t0 = warp * (per - 1 if mut == "warp_overlap" and per > 1 else per)
        count = max(0, min(per, ktiles - t0))
        acc = [[0] * 4 for _ in range(32)]
        for i in range(count):
            t = t0 + i
            a_all, b_all = [], []
            for lane in range(32):
                g, tig = lane >> 2, lane & 3
                k0 = 64 * t + 16 * tig
                rows = []
                for sub in range(2):  # Int8W's slots: rows na, na + 8, zeros past N and K
                    na = 16 * nt + g + 8 * sub
                    v = np.zeros(16, dtype=np.int64)
                    if na < N:
                        n = max(0, min(16, K - k0))
                        v[:n] = qw[na, k0:k0 + n]
                    rows.append(words(v))
                xv = np.zeros(16, dtype=np.int64)
                if k0 + 16 <= K:  # K % 16 == 0: whole or nothing
                    xv[:] = qx[g if g < M else M - 1, k0:k0 + 16]
                xw = words(xv)
                a_all.append([[rows[0][2 * s], rows[1][2 * s], rows[0][2 * s + 1], rows[1][2 * s + 1]]
                              if mut != "a_order" else
                              [rows[0][2 * s], rows[0][2 * s + 1], rows[1][2 * s], rows[1][2 * s + 1]]
                              for s in range(2)])
                b_all.append([[xw[2 * s], xw[2 * s + 1]] if mut != "b_swap" else [xw[2 * s + 1], xw[2 * s]]
                              for s in range(2)])
            for s in range(2):
                mma_s8(acc, [a_all[ln][s] for ln in range(32)], [b_all[ln][s] for ln in range(32)])
        sums[warp] = np.array(acc)
    out = {}
    total = sums.sum(axis=0)
    for lane in range(32):
        g, tig = lane >> 2, lane & 3
        for e in range(4):
            n, m = 16 * nt + g + 8 * (e >> 1), 2 * tig + (e & 1)
            if mut == "out_swap":
                n, m = 16 * nt + 2 * tig + (e & 1), g + 8 * (e >> 1)
            if m < M and n < N:
                assert (m, n) not in out, f"output ({m}, {n}) stored twice"
                out[(m, n)] = int(total[lane][e])
    return out


def check(M: int, N: int, K: int, mut: str = "", seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    qx = rng.integers(-127, 128, (M, K))
    qw = rng.integers(-127, 128, (N, K))
    ref = qx @ qw.T
    got = {}
    for nt in range(-(-N // 16)):
        got.update(block(qx, qw, nt, mut))
    if len(got) != M * N:
        return f"{M * N - len(got)} outputs not stored"
    bad = [(m, n) for (m, n), v in got.items() if v != ref[m, n]]
    return f"{len(bad)} outputs wrong, e.g. {bad[0]}" if bad else ""


def main() -> int:
    ok = True
    cases = [(1, 16, 64), (1, 37, 48), (3, 40, 1040), (8, 33, 640), (5, 20, 16), (7, 16, 1024), (2, 9, 272)]
    for M, N, K in cases:
        err = check(M, N, K)
        ok &= not err
        print(f"M={M} N={N} K={K}: {'ok' if not err else 'FAIL ' + err}")
    for mut in MUTATIONS:
        err = check(5, 20, 640, mut)
        ok &= bool(err)
        print(f"mutation {mut}: {'caught (' + err + ')' if err else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

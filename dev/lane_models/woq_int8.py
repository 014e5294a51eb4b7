"""Lane-level model of the W8A16 tensor-core path (woq_kernel with the Int8W format of
csrc/cuda/int8.cu), for checking its index math without a GPU.

One warp, one 16-column tile, one m16 tile of activations (M <= 16: woq's swapped product,
one n8 block of rows for M <= 8, two for M <= 16), K in 64-k tiles: each lane copies
the 16 codes k = 64 t + 16 tig .. + 16 of rows na = gid and na + 8 (zeros past N and K),
turns word j of each row into B registers with CodePair (bytes 0, 1 and 2, 3), loads its 16
activations of rows gid and gid + 8 as the A fragments of woq's k order (zeros past K; a row
past M reads row M - 1, whose products land only in outputs that are not stored), runs the m16n8k16
mma per step j and sub-tile, and stores with the accumulator map; the result must equal the
float64 product x . (codes * scale)^T (and so must the unswapped form, which woq runs from
M = 17). Mutations of the byte pairs, the row of sub-tile 1, the activation order, the weight
quad and the second block of 8 rows fail.

Run: python3 dev/lane_models/woq_int8.py   (numpy only; not part of the test suite)
"""

from __future__ import annotations

import numpy as np

from decode_mma import code_pair, dec16, enc16, flip, mma, pack16


def warp_tile(x16, codes, scale, kind, mut=""):
    """x16 [M <= 16, K] uint16 patterns, codes int8 [N <= 16, K], scale [N]: y [M, N] float64.
    M <= 16 takes the swapped product (woq's SW: y^T = W . x^T, one mma per step and block of
    8 rows); mut "unswapped" runs the x . W^T form (woq's SW = 0, used from M = 17)."""
    M, K = x16.shape
    N = codes.shape[0]
    swapped = M <= 16 and mut != "unswapped"
    blocks = 1 if M <= 8 else 2
    tiles = -(-K // 64)
    acc = [[[0.0] * 4 for _ in range(32)] for _ in range(2)]  # [sub][lane][e] (swapped: sub = row block)
    for t in range(tiles):
        b = [[[[0, 0] for _ in range(2)] for _ in range(4)] for _ in range(32)]  # [lane][j][sub][h]
        a = [[None] * 4 for _ in range(32)]  # [lane][j] A fragment
        for lane in range(32):
            g, tig = lane >> 2, lane & 3
            k0 = 64 * t + 16 * tig
            for sub in range(2):
                na = g + 8 * sub if "row" not in mut else g + sub
                row = bytearray(16)
                if na < N:
                    n = max(0, min(16, K - k0))
                    row[:n] = codes[na, k0:k0 + n].tobytes()
                for j in range(4):
                    u = int.from_bytes(row[4 * j:4 * j + 4], "little") ^ flip(kind)
                    sel = ((0, 1), (2, 3)) if "pair" not in mut else ((0, 2), (1, 3))
                    b[lane][j][sub] = [code_pair(u, *sel[0], kind), code_pair(u, *sel[1], kind)]
            xs = []
            for r in (g, g + 8):  # XRows::load16: the lane's 16 activations as 8 pairs
                rr = r if r < M else M - 1  # a row past M reads row M - 1 (its outputs are not stored)
                v = [0] * 16
                for i in range(16):
                    if k0 + i < K:
                        v[i] = int(x16[rr, k0 + i])
                if "xorder" in mut:
                    v = v[::-1]
                xs.append([pack16(v[2 * i], v[2 * i + 1]) for i in range(8)])
            lo, hi = xs
            for j in range(4):
                a[lane][j] = [lo[2 * j], hi[2 * j], lo[2 * j + 1], hi[2 * j + 1]]
        for j in range(4):
            if swapped:  # A = the weights of step j (rows: column na | na + 8), B = rows gid (+ 8)
                wa = [[b[ln][j][0][0], b[ln][j][1][0], b[ln][j][0][1], b[ln][j][1][1]] for ln in range(32)]
                if "quad" in mut:
                    wa = [[b[ln][j][0][0], b[ln][j][0][1], b[ln][j][1][0], b[ln][j][1][1]] for ln in range(32)]
                for blk in range(blocks):  # lo[2 j], lo[2 j + 1] (row gid); hi (row gid + 8)
                    lo_hi = (0, 2) if blk == 0 or "block" in mut else (1, 3)
                    xb = [[a[ln][j][lo_hi[0]], a[ln][j][lo_hi[1]]] for ln in range(32)]
                    mma(acc[blk], wa, xb, kind)
            else:
                for sub in range(2):
                    mma(acc[sub], [a[ln][j] for ln in range(32)], [b[ln][j][sub] for ln in range(32)], kind)
    y = np.zeros((M, N))
    for sub in range(blocks if swapped else 2):
        for lane in range(32):
            g, tig = lane >> 2, lane & 3
            for e in range(4):
                if swapped:  # woq's elem_pos
                    r, n = 8 * sub + 2 * tig + (e & 1), g + 8 * (e >> 1)
                else:
                    r, n = g + 8 * (e >> 1), 8 * sub + 2 * tig + (e & 1)
                if r < M and n < N:
                    y[r, n] = acc[sub][lane][e] * scale[n]  # Int8W::finish
    return y


def check(kind, M, N, K, mut="", seed=0):
    rng = np.random.default_rng(seed)
    x16 = enc16(rng.standard_normal((M, K)), kind)
    codes = rng.integers(-128, 128, (N, K), dtype=np.int8)
    scale = rng.random(N) * 0.01 + 0.001
    y = warp_tile(x16, codes, scale, kind, mut)
    ref = dec16(x16, kind) @ (codes.astype(np.float64) * scale[:, None]).T
    return float(np.abs(y - ref).max() / np.abs(ref).max())


def main() -> int:
    ok = True
    for kind in ("f16", "bf16"):
        for M, N, K, form in ((1, 16, 64, ""), (5, 13, 160, ""), (8, 16, 64, ""), (9, 16, 64, ""),
                              (16, 9, 48, ""), (13, 16, 160, ""), (16, 9, 48, "unswapped"),
                              (12, 13, 160, "unswapped")):
            err = check(kind, M, N, K, form)
            good = err < 1e-6  # codes and activations are exact in the mma; fp32 sums
            ok &= good
            print(f"{kind} M={M} N={N} K={K} {form or 'swapped'}: rel err {err:.1e} {'ok' if good else 'FAIL'}")
    for M, mut in ((5, "pair"), (5, "row"), (5, "xorder"), (5, "quad"), (12, "pair"), (12, "xorder"), (12, "quad"),
                   (12, "block")):
        err = check("f16", M, 13, 160, mut)
        caught = err > 1e-2
        ok &= caught
        print(f"mutation {mut} (M={M}): rel err {err:.1e} {'caught' if caught else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

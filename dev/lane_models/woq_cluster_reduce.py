"""Thread model of cluster_reduce (csrc/cuda/woq_mma.cuh, LOWBIT_CUDA_WOQ_REDUCE=cluster), for
checking its index math without a GPU.

A column block's K split runs as one cluster of `splits` blocks (rank = split). After the K
loop each thread t of each block holds its accumulators acc[j][sub][e] (NT column tiles per
warp, kSubs = SW blocks of 8 rows, 4 elements of an mma fragment) and writes element
q = (j kSubs + sub) 4 + e to red[q kT + t] of its own block. Each block then walks
i = rank kT + t, stepping splits kT, adds red[i] of every block in split order and stores
the sum at the (row, column) that the per-thread path (elem_pos) gives thread i % kT's
element i / kT. Checked for NT in {1, 2}, SW in {1, 2}, splits 1..8, ragged M and N: every
output of the column block stored exactly once, nothing past M or N or past the last column
tile, with the sum over the splits of exactly the accumulators the counter path adds for that
output, in split order. Mutations of the step, the element decode, the tile of a warp and the
slot index must each be caught.

Run: python3 dev/lane_models/woq_cluster_reduce.py   (standard library only; not part of the test suite)
"""

from __future__ import annotations

K_WARPS, K_TILE_N = 4, 16


def elem_pos(sw: int, lane: int, m0: int, nt: int, sub: int, e: int) -> tuple:
    """woq_mma.cuh's elem_pos for the swapped product (SW > 0): (row, column)."""
    gid, tig = lane >> 2, lane & 3
    return m0 + 8 * sub + 2 * tig + (e & 1), nt * K_TILE_N + gid + 8 * (e >> 1)


def counter_path(nt_: int, sw: int, splits: int, M: int, N: int, bx: int) -> dict:
    """What the counter path stores: (row, col) -> the list of (split, thread, slot) it adds, in
    split order (each split's partial[s, r, n] comes from one thread's accumulator)."""
    k_t, k_subs = 128 // nt_, 1 if sw == 1 else 2
    tiles_n = -(-N // K_TILE_N)
    out = {}
    for s in range(splits):
        for t in range(k_t):
            warp, lane = t >> 5, t & 31
            for j in range(nt_):
                tile = bx * K_WARPS + nt_ * warp + j
                if tile >= tiles_n:
                    continue
                for sub in range(k_subs):
                    for e in range(4):
                        r, n = elem_pos(sw, lane, 0, tile, sub, e)
                        if r < M and n < N:
                            out.setdefault((r, n), []).append((s, t, (j * k_subs + sub) * 4 + e))
    return out


def cluster_path(nt_: int, sw: int, splits: int, M: int, N: int, bx: int, mut: str = "") -> dict:
    """cluster_reduce's stores: (row, col) -> [(split, thread, slot) read, in order]; raises on
    a second store of one output."""
    k_t, k_subs = 128 // nt_, 1 if sw == 1 else 2
    k_elems = nt_ * k_subs * 4
    tiles_n = -(-N // K_TILE_N)
    # red[i] of block s holds (s, thread, slot): the write side
    red = [{} for _ in range(splits)]
    for s in range(splits):
        for t in range(k_t):
            for j in range(nt_):
                for sub in range(k_subs):
                    for e in range(4):
                        q = (j * k_subs + sub) * 4 + e
                        idx = t * k_elems + q if mut == "slot_major" else q * k_t + t
                        red[s][idx] = (s, t, q)
    out = {}
    step = k_t if mut == "step" else splits * k_t
    for rank in range(splits):
        for t0 in range(k_t):
            i = rank * k_t + t0
            while i < k_elems * k_t:
                reads = [red[s][i] for s in range(splits)]
                t, q = i % k_t, i // k_t
                j = q // (k_subs * 4) if mut != "decode" else q // 4
                sub, e = (q // 4) % k_subs, q % 4
                tile = bx * K_WARPS + (t >> 5) + j if mut == "tile" else bx * K_WARPS + nt_ * (t >> 5) + j
                r, n = elem_pos(sw, t & 31, 0, tile, sub, e)
                if tile < tiles_n and r < M and n < N:
                    if (r, n) in out:
                        raise AssertionError(f"output ({r}, {n}) stored twice")
                    out[(r, n)] = reads
                i += step
    return out


def check(nt_: int, sw: int, splits: int, M: int, N: int, bx: int, mut: str = "") -> str:
    try:
        got = cluster_path(nt_, sw, splits, M, N, bx, mut)
    except (AssertionError, KeyError, IndexError) as e:
        return str(e) or type(e).__name__
    want = counter_path(nt_, sw, splits, M, N, bx)
    if got.keys() != want.keys():
        return f"outputs differ: {len(got)} stored, {len(want)} expected"
    for pos, reads in got.items():
        if reads != want[pos]:
            return f"output {pos}: adds {reads[:2]}..., the counter path {want[pos][:2]}..."
    return ""


def main() -> int:
    ok = True
    cases = [(M, N, bx) for M in (1, 5, 8) for N, bx in ((64, 0), (4096, 3), (40, 0), (37, 0), (100, 1))]
    cases16 = [(M, N, bx) for M in (9, 16) for N, bx in ((64, 0), (40, 0), (100, 1))]
    for nt_ in (1, 2):
        for sw, shapes in ((1, cases), (2, cases16)):
            bad = [(splits, M, N, bx, err) for splits in range(1, 9) for M, N, bx in shapes
                   if (err := check(nt_, sw, splits, M, N, bx))]
            ok &= not bad
            print(f"NT={nt_} SW={sw}: {'ok' if not bad else 'FAIL ' + str(bad[0])}")
    for mut in ("step", "decode", "tile", "slot_major"):
        caught = [err for nt_ in (1, 2) for sw, shapes in ((1, cases), (2, cases16)) for splits in (1, 3, 8)
                  for M, N, bx in shapes if (err := check(nt_, sw, splits, M, N, bx, mut))]
        ok &= bool(caught)
        print(f"mutation {mut}: {'caught (' + caught[0] + ')' if caught else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

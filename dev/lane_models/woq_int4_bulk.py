"""Lane-level model of the W4A16 bulk-copy ring's scale rows (Int4Bulk, csrc/cuda/int4.cu)
against the cp.async ring's (Int4), for checking its index math without a GPU.

Per tile of a warp, the cp.async ring has each lane copy the (d, m) pairs of its own columns
na = 16 nt + gid and na + 8 from the group of its own 16 k (Int4Cursor::group_at of its k =
64 t + 16 tig); the bulk ring has lane 0 copy two whole rows of 16 pairs, the groups of the
tile's k 0 and k 32, and each lane read row tig >> 1 at columns gid and gid + 8. Both must
give every lane the same two pairs, for every group size (32, 64, 128, per channel), K
(ragged: past K the last group), split start and column tile. Mutations (the row picked by
tig & 1, the second row at k + 16, one row only) must fail.

Run: python3 dev/lane_models/woq_int4_bulk.py   (standard library only; not part of the test suite)
"""

from __future__ import annotations

TILE_K, TILE_N = 64, 16


def group_at(k0: int, groups: int, g_shift: int) -> int:
    """Int4Cursor::group_at: the group of k0, the last one past K."""
    last = groups - 1
    grp = 0 if last == 0 else k0 >> g_shift
    return min(grp, last)


def cp_async_pairs(lane: int, nt: int, t: int, groups: int, g_shift: int, np_: int):
    """(index of na's pair, index of na + 8's pair) in the [groups, Np] table, cp.async ring."""
    gid, tig = lane >> 2, lane & 3
    row = group_at(t * TILE_K + 16 * tig, groups, g_shift) * np_
    return row + nt * TILE_N + gid, row + nt * TILE_N + gid + 8


def bulk_pairs(lane: int, nt: int, t: int, groups: int, g_shift: int, np_: int, mut: str = ""):
    """The same through the bulk ring: lane 0's two row copies, then the lane's read."""
    k0 = t * TILE_K  # lane 0's k (tig 0): the tile's first
    second = 16 if mut == "second_at_16" else 32
    rows = [group_at(k0, groups, g_shift) * np_ + nt * TILE_N,  # slot row 0: 16 pairs from column 16 nt
            group_at(k0 + second, groups, g_shift) * np_ + nt * TILE_N]
    if mut == "one_row":
        rows[1] = rows[0]
    gid, tig = lane >> 2, lane & 3
    half = (tig & 1) if mut == "tig_and_1" else tig >> 1
    return rows[half] + gid, rows[half] + gid + 8


def check(mut: str = "") -> str:
    """'' if every lane of every case gets the same pairs, else the first difference."""
    for K in (64, 96, 128, 320, 4096, 4160):
        for g in (32, 64, 128, K):
            if K % g:
                continue
            groups = K // g
            g_shift = 0 if groups == 1 else (g.bit_length() - 1)
            ktiles = -(-K // TILE_K)
            np_ = 48
            for nt in range(np_ // TILE_N):
                for t in range(ktiles):
                    for lane in range(32):
                        a = cp_async_pairs(lane, nt, t, groups, g_shift, np_)
                        b = bulk_pairs(lane, nt, t, groups, g_shift, np_, mut)
                        if a != b:
                            return f"K={K} g={g} nt={nt} t={t} lane={lane}: cp.async {a}, bulk {b}"
    return ""


def main() -> int:
    err = check()
    ok = not err
    print(f"bulk scale rows = cp.async scale pairs: {'ok' if ok else 'FAIL ' + err}")
    for mut in ("tig_and_1", "second_at_16", "one_row"):
        err = check(mut)
        ok &= bool(err)
        print(f"mutation {mut}: {'caught (' + err + ')' if err else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

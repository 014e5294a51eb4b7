"""Lane model of the tensor-core W8A8 kernels' epilogue (csrc/cuda/int8.cu: W8A8Out, the
tail of w8a8_mma_kernel, store_wgmma_tile and the factor staging in w8a8_tma_kernel), for
checking its index math on a machine without a GPU.

Every thread of a tile is walked as the kernel's code walks it: the m16 x n8 fragments it
holds (mma.sync: acc[i][j][2 h + e]; wgmma: acc[4 i + 2 h + e]), the rows r, r + 8 and columns
n, n + 1 they belong to, the factors it reads (sx of its rows from global memory, ws and bias
of its columns from registers or from the warpgroup's shared slice, as staged by the tile's
threads c = ct, ct + 128, ...), and W8A8Out's stores: inside() picks the unchecked stores
for the whole tile, else store2 checks m < M, then stores a pair where y keeps pairs aligned
(`pairs`) and n + 1 < N, else each element where n < N.

y is a flat array of elements with a row stride ldy and a base offset (in elements) that sets
its alignment; a pair store needs an address that is a multiple of two elements.

Checks, over ragged M, N, ldy >= N, base offsets, both element sizes and both kernels (BN =
128, 256 for wgmma): every y[m, n] of M x N is written exactly once, with the accumulator,
sx, ws and bias of (m, n); nothing else is written (no column >= N of a row, no row >= M);
every pair store is aligned. Mutations (a wrong column stride, pairs ignored by inside(), a
pair stored where only n < N holds, one staged column per thread (no loop), the unchecked stores on
every tile) must each be caught.

Run: python3 dev/lane_models/w8a8_epilogue.py   (standard library only; not part of the test suite)
"""

from __future__ import annotations

import itertools
import random

MUTATIONS = ("column_stride", "inside_ignores_pairs", "pair_without_bound", "staging_once", "never_checked")


class Out:
    """W8A8Out: the stores into y, recorded per element."""

    def __init__(self, M, N, ldy, base, elem, mutation):
        self.M, self.N, self.ldy, self.base, self.elem, self.mut = M, N, ldy, base, elem, mutation
        # y + m * ldy + n is aligned to two elements for every even n iff base and ldy are even
        self.pairs = (base * elem) % (2 * elem) == 0 and (ldy * elem) % (2 * elem) == 0
        self.writes: dict = {}

    def inside(self, m_end, n_end):
        if self.mut == "never_checked":
            return True
        if self.mut == "inside_ignores_pairs":
            return m_end <= self.M and n_end <= self.N
        return self.pairs and m_end <= self.M and n_end <= self.N

    def _write(self, m, n, value):
        addr = self.base + m * self.ldy + n
        self.writes.setdefault(addr, []).append((m, n, value))

    def _pair(self, m, n, v0, v1):
        addr = self.base + m * self.ldy + n
        assert (addr * self.elem) % (2 * self.elem) == 0, f"misaligned pair store at y[{m}, {n}]"
        self._write(m, n, v0)
        self._write(m, n + 1, v1)

    def store2(self, checked, m, n, v0, v1):
        assert n % 2 == 0
        if not checked:
            return self._pair(m, n, v0, v1)
        if m >= self.M:
            return
        bound = n < self.N if self.mut == "pair_without_bound" else n + 1 < self.N
        if self.pairs and bound:
            self._pair(m, n, v0, v1)
        else:
            if n < self.N:
                self._write(m, n, v0)
            if n + 1 < self.N:
                self._write(m, n + 1, v1)

    def fragment(self, checked, c, r, n, sxr, wsn, bn):
        for h in range(2):
            self.store2(checked, r + 8 * h, n, (c[2 * h], sxr[h], wsn[0], bn[0]), (c[2 * h + 1], sxr[h], wsn[1], bn[1]))


def load(arr, i, N):
    return arr[i] if i < N else 0.0


def acc_of(m, n):
    return ("acc", m, n)  # the exact int32 sum of output (m, n): its identity is all that matters


def mma_kernel(out, sx, ws, bias, mut):
    """w8a8_mma_kernel: 128 x 128 tiles, 8 warps as 2 (m) x 4 (n), warp tile 64 x 32."""
    kBM = kBN = 128
    M, N = out.M, out.N
    step = 4 if mut == "column_stride" else 2
    for m0, n0 in itertools.product(range(0, M, kBM), range(0, N, kBN)):
        checked = not out.inside(m0 + kBM, n0 + kBN)
        for warp, lane in itertools.product(range(8), range(32)):
            wm, wn, g, t = warp // 4, warp % 4, lane >> 2, lane & 3
            ncol = [n0 + wn * 32 + j * 8 + step * t for j in range(4)]
            wsv = [(load(ws, n, N), load(ws, n + 1, N)) for n in ncol]
            bv = [(load(bias, n, N), load(bias, n + 1, N)) for n in ncol]
            for i in range(4):
                r = m0 + wm * 64 + i * 16 + g
                sxr = (load(sx, r, M), load(sx, r + 8, M))
                for j in range(4):
                    n = ncol[j]
                    # the fragment the mma left in this thread: rows r, r + 8, columns n, n + 1 (2 t)
                    nn = n0 + wn * 32 + j * 8 + 2 * t
                    c = [acc_of(r + 8 * h, nn + e) for h in range(2) for e in range(2)]
                    out.fragment(checked, c, r, n, sxr, wsv[j], bv[j])


def tma_kernel(out, sx, ws, bias, BN, mut):
    """w8a8_tma_kernel: 128 x BN tiles, two consumer warpgroups of 64 rows, factors staged."""
    kBM = 128
    M, N = out.M, out.N
    step = 4 if mut == "column_stride" else 2
    stride = 2 * BN if mut == "staging_once" else 128
    for m0, n0 in itertools.product(range(0, (M + kBM - 1) // kBM), range(0, (N + BN - 1) // BN)):
        for cw in range(2):
            fs = [None] * (2 * BN)  # the warpgroup's shared slice, fresh each tile (barrier)
            for ct in range(128):
                for c in range(ct, BN, stride):
                    n = n0 * BN + c
                    fs[c] = load(ws, n, N)
                    fs[BN + c] = load(bias, n, N)
            checked = not out.inside(m0 * kBM + cw * 64 + 64, n0 * BN + BN)
            for w, lane in itertools.product(range(4), range(32)):
                g, t = lane >> 2, lane & 3
                r = m0 * kBM + cw * 64 + w * 16 + g
                sxr = (load(sx, r, M), load(sx, r + 8, M))
                for i in range(BN // 8):
                    c = 8 * i + step * t
                    frag = [acc_of(r + 8 * h, n0 * BN + 8 * i + 2 * t + e) for h in range(2) for e in range(2)]
                    assert c + 1 < BN, "a factor read past the warpgroup's slice"
                    wsn, bn = (fs[c], fs[c + 1]), (fs[BN + c], fs[BN + c + 1])
                    assert None not in wsn + bn, "a factor read before any thread staged it"
                    out.fragment(checked, frag, r, n0 * BN + c, sxr, wsn, bn)


def run_case(kernel, M, N, ldy, base, elem, mutation=None):
    sx = [("sx", m) for m in range(M)]
    ws = [("ws", n) for n in range(N)]
    bias = [("b", n) for n in range(N)]
    out = Out(M, N, ldy, base, elem, mutation)
    if kernel == "mma":
        mma_kernel(out, sx, ws, bias, mutation)
    else:
        tma_kernel(out, sx, ws, bias, int(kernel[3:]), mutation)
    seen = set()
    for addr, ws_ in out.writes.items():
        assert len(ws_) == 1, f"y element at offset {addr} written {len(ws_)} times"
        m, n, value = ws_[0]
        assert 0 <= m < M and 0 <= n < N, f"write outside y: ({m}, {n})"
        assert value == (acc_of(m, n), sx[m], ws[n], bias[n]), f"y[{m}, {n}] got {value}"
        seen.add((m, n))
    assert len(seen) == M * N, f"{M * N - len(seen)} outputs never written"


def cases(rng, n):
    fixed = [(1, 1), (128, 128), (128, 256), (129, 257), (64, 130), (200, 384), (17, 255), (256, 512)]
    out = [(M, N, 0, 0) for M, N in fixed]
    for _ in range(n):
        M, N = rng.randint(1, 300), rng.randint(1, 600)
        out.append((M, N, rng.choice([0, 1, 2, 3]), rng.choice([0, 1])))
    return out


def main():
    rng = random.Random(1)
    kernels = ("mma", "tma128", "tma256")
    count = 0
    for M, N, pad, base in cases(rng, 15):
        for kernel in kernels:
            for elem in (2, 4):
                run_case(kernel, M, N, N + pad, base, elem)
                count += 1
    print(f"{count} cases pass")
    # each mutation must fail somewhere in a small, varied set
    for mutation in MUTATIONS:
        caught = False
        for (M, N, pad, base), kernel in itertools.product(cases(random.Random(2), 10), kernels):
            try:
                run_case(kernel, M, N, N + pad, base, 2, mutation)
            except AssertionError:
                caught = True
                break
        assert caught, f"mutation {mutation} not caught"
        print(f"mutation {mutation}: caught")


if __name__ == "__main__":
    main()

"""Lane-level model of split_kernel_mma (csrc/cuda/attention_split_mma.cuh), for checking
its index math on a machine without a GPU.

It replays, lane by lane, what one warp of the kernel does with its tiles: the cp.async
copies into the swizzled ring item, ldmatrix (.x4, .trans) on those bytes, the int8 code
pairs (byte_perm + magic), the m16n8k16 mma fragments, the masking by the ballot of valid
keys, the online softmax, movmatrix for P^T, and the O^T -> output column map of the end,
with the semantics of the PTX ISA. The result must match float64 attention over the same
keys. A wrong swizzle, fragment, byte order or column map gives a wrong answer here, which
is how this model was checked itself (mutations of each of those fail; see main()).

Run: python3 dev/lane_models/decode_mma.py   (numpy only; not part of the test suite)
"""

from __future__ import annotations

import numpy as np

D = 128
KEYS = 16


# ---- 16-bit element encodings ---------------------------------------------------------
def enc16(x: np.ndarray, kind: str) -> np.ndarray:
    """float -> uint16 bit patterns (fp16, or bf16 by round-to-nearest-even)."""
    if kind == "f16":
        return np.asarray(x, np.float16).view(np.uint16)
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def dec16(h: np.ndarray, kind: str) -> np.ndarray:
    h = np.asarray(h, np.uint16)
    if kind == "f16":
        return h.view(np.float16).astype(np.float64)
    return (h.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def lo16(r: int) -> int:
    return r & 0xFFFF


def hi16(r: int) -> int:
    return (r >> 16) & 0xFFFF


def pack16(lo: int, hi: int) -> int:
    return (int(lo) & 0xFFFF) | ((int(hi) & 0xFFFF) << 16)


# ---- PTX semantics ---------------------------------------------------------------------
def ldmatrix_x4(smem: bytes, addrs: list[int], trans: bool) -> list[list[int]]:
    """regs[lane][mi]: lane l gives the row address of matrix l // 8 (row l % 8)."""
    regs = [[0] * 4 for _ in range(32)]
    for mi in range(4):
        rows = []
        for j in range(8):
            a = addrs[8 * mi + j]
            rows.append([int.from_bytes(smem[a + 2 * e:a + 2 * e + 2], "little") for e in range(8)])
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            if trans:
                regs[lane][mi] = pack16(rows[2 * t][g], rows[2 * t + 1][g])
            else:
                regs[lane][mi] = pack16(rows[g][2 * t], rows[g][2 * t + 1])
    return regs


def movmatrix_trans(x: list[int]) -> list[int]:
    m = [[0] * 8 for _ in range(8)]
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        m[g][2 * t], m[g][2 * t + 1] = lo16(x[lane]), hi16(x[lane])
    return [pack16(m[2 * (l & 3)][l >> 2], m[2 * (l & 3) + 1][l >> 2]) for l in range(32)]


def mma(c, a, b, kind):
    """c[lane][4] += A . B for the m16n8k16 fragments a[lane][4], b[lane][2]."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for reg, (r, k) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
            A[r, k], A[r, k + 1] = dec16([lo16(a[lane][reg]), hi16(a[lane][reg])], kind)
        for reg, k in enumerate([2 * t, 2 * t + 8]):
            B[k, g], B[k + 1, g] = dec16([lo16(b[lane][reg]), hi16(b[lane][reg])], kind)
    C = A @ B
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for e, (r, n) in enumerate([(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]):
            c[lane][e] += C[r, n]


def byte_perm(x: int, y: int, s: int) -> int:
    b = list(x.to_bytes(4, "little")) + list(y.to_bytes(4, "little"))
    return sum(b[(s >> (4 * i)) & 7] << (8 * i) for i in range(4))


def flip(kind: str) -> int:
    """CodePair<E>::kFlip: what the kernel XORs into each word of codes first."""
    return 0x80808080 if kind == "f16" else 0


def code_pair(u: int, i: int, j: int, kind: str) -> int:
    """CodePair<E>::get<I, J>: exact packed pair of the codes in bytes i, j (u = word ^ flip(kind))."""
    if kind == "f16":  # 0x64XX is 1024 + XX (XX = code + 128)
        t = byte_perm(u, 0x64646464, i | 4 << 4 | j << 8 | 4 << 12)
        vals = dec16([lo16(t), hi16(t)], "f16") - 1152.0
        return pack16(*enc16(vals, "f16"))
    x = byte_perm(u, 0x43434343, i | 4 << 4 | j << 8 | 4 << 12)  # 0x43 | c: halves of 128 + (c & 0x7f) ...
    t, sub = x & 0xFF7FFF7F, x & 0xFF80FF80                       # ... minus 128 or 256 (sign)
    vals = dec16([lo16(t), hi16(t)], "bf16") - dec16([lo16(sub), hi16(sub)], "bf16")
    return pack16(*enc16(vals, "bf16"))


# ---- the kernel, one warp ------------------------------------------------------------------
def warp_attention(q, k_rows, v_rows, valid, scale, kind, int8, k_scale=None, v_scale=None, mut=""):
    """q [8, D] (uint16 patterns, heads of the block), k_rows / v_rows [tiles * 16, D] (uint16
    patterns or int8 codes), valid [tiles * 16] bool. Returns out [8, D] float64 (per head)."""
    row_bytes = D * (1 if int8 else 2)
    chunks = row_bytes // 16
    tiles = len(valid) // KEYS
    kt16 = D // 16
    cm = scale * np.log2(np.e)
    kind_k = "f16" if int8 else kind  # Q.K^T of an INT8 cache runs in fp16

    # qb[lane][ks][hh]; bf16 q with an INT8 cache: fp16 times 2^-e per head (max |q| to [2^14, 2^15))
    qexp = np.ones(8)
    qf = dec16(q, kind)
    if kind_k != kind:
        for g in range(8):
            mx = np.abs(qf[g]).max()
            if 0 < mx < np.inf:
                qexp[g] = 2.0 ** min(100, max(-100, int(np.floor(np.log2(mx))) - 14))
    qb = [[[0, 0] for _ in range(kt16)] for _ in range(32)]
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for ks in range(kt16):
            for hh in range(2):
                d = 16 * ks + 4 * t + 2 * hh if int8 else 16 * ks + 8 * hh + 2 * t
                if "qmap" in mut:
                    d = 16 * ks + 8 * hh + 2 * t
                if kind_k == kind:
                    qb[lane][ks][hh] = pack16(q[g, d], q[g, d + 1])
                else:
                    qb[lane][ks][hh] = pack16(*enc16(qf[g, d:d + 2] / qexp[g], "f16"))
    cmh = [[cm * (qexp[2 * (l & 3) + hh] if "qexp" not in mut else 1.0) for hh in range(2)] for l in range(32)]

    def fill(rows: np.ndarray, base: int) -> bytes:  # the cp.async copies of one item
        item = bytearray(KEYS * row_bytes)
        for lane in range(32):
            row, half = lane >> 1, lane & 1
            src = rows[base + row].tobytes()
            for i in range(chunks // 2):
                c = 2 * i + half
                pc = c ^ (row & 7)
                if valid[base + row]:
                    item[row * row_bytes + 16 * pc:row * row_bytes + 16 * pc + 16] = src[16 * c:16 * c + 16]
        return bytes(item)

    krow = [(l & 7) + 8 * ((l >> 3) & 1) for l in range(32)]
    kc = [l >> 4 for l in range(32)]
    vrow = krow if int8 else [(l & 7) + 8 * (l >> 4) for l in range(32)]
    vc = kc if int8 else [(l >> 3) & 1 for l in range(32)]

    o = [[[0.0] * 4 for _ in range(kt16)] for _ in range(32)]
    m = [[-np.inf, -np.inf] for _ in range(32)]
    lsum = [[0.0, 0.0] for _ in range(32)]
    for tile in range(tiles):
        base = KEYS * tile
        ballot = sum(1 << l for l in range(32) if valid[base + (l >> 1)])
        kt = fill(k_rows, base)
        s = [[0.0] * 4 for _ in range(32)]
        for c in range(0, chunks, 2):
            addrs = [krow[l] * row_bytes + (((c + kc[l]) ^ (krow[l] & 7)) << 4) for l in range(32)]
            if "swz" in mut:
                addrs = [krow[l] * row_bytes + ((c + kc[l]) << 4) for l in range(32)]
            w = ldmatrix_x4(kt, addrs, trans=False)
            if int8:
                for cc in range(2):
                    a = []
                    for l in range(32):
                        u0, u1 = w[l][2 * cc] ^ flip(kind_k), w[l][2 * cc + 1] ^ flip(kind_k)
                        lo0, hi0 = code_pair(u0, 0, 1, kind_k), code_pair(u0, 2, 3, kind_k)
                        lo1, hi1 = code_pair(u1, 0, 1, kind_k), code_pair(u1, 2, 3, kind_k)
                        a.append([lo0, lo1, hi0, hi1] if "afrag" not in mut else [lo0, hi0, lo1, hi1])
                    mma(s, a, [qb[l][c + cc] for l in range(32)], kind_k)
            else:
                mma(s, [w[l] for l in range(32)], [qb[l][c // 2] for l in range(32)], kind)
        p = [[0.0] * 4 for _ in range(32)]
        alpha = [[0.0] * 2 for _ in range(32)]
        for lane in range(32):
            g = lane >> 2
            k0 = k1 = 1.0
            if int8:
                k0 = k_scale[base + g] if valid[base + g] else 0.0
                k1 = k_scale[base + g + 8] if valid[base + g + 8] else 0.0
            ok0, ok1 = (ballot >> (2 * g)) & 1, (ballot >> (2 * g + 16)) & 1
            for e in range(4):
                ok, k = (ok0, k0) if e < 2 else (ok1, k1)
                s[lane][e] = s[lane][e] * (k * cmh[lane][e & 1]) if ok else -np.inf
        for hh in range(2):  # column max over the 8 lanes of each tig (xor 4, 8, 16)
            for t in range(4):
                lanes = [4 * g + t for g in range(8)]
                mx = max(max(s[l][hh], s[l][2 + hh]) for l in lanes)
                for l in lanes:
                    m_new = max(m[l][hh], mx)
                    m_use = 0.0 if m_new == -np.inf else m_new
                    alpha[l][hh] = 2.0 ** (m[l][hh] - m_use)
                    p[l][hh] = 2.0 ** (s[l][hh] - m_use)
                    p[l][2 + hh] = 2.0 ** (s[l][2 + hh] - m_use)
                    lsum[l][hh] = lsum[l][hh] * alpha[l][hh] + p[l][hh] + p[l][2 + hh]
                    m[l][hh] = m_new
        for l in range(32):
            for mt in range(kt16):
                for e in range(4):
                    o[l][mt][e] *= alpha[l][e & 1]
        vt = fill(v_rows, base)
        if int8:
            for l in range(32):
                g = l >> 2
                v0 = v_scale[base + g] if valid[base + g] else 0.0
                v1 = v_scale[base + g + 8] if valid[base + g + 8] else 0.0
                p[l] = [p[l][0] * v0, p[l][1] * v0, p[l][2] * v1, p[l][3] * v1]
        x0 = [pack16(*enc16(np.array(p[l][0:2]), kind)) for l in range(32)]
        x1 = [pack16(*enc16(np.array(p[l][2:4]), kind)) for l in range(32)]
        b = list(zip(movmatrix_trans(x0), movmatrix_trans(x1)))
        if "movm" in mut:
            b = list(zip(x0, x1))
        for c in range(0, chunks, 2):
            addrs = [vrow[l] * row_bytes + (((c + vc[l]) ^ (vrow[l] & 7)) << 4) for l in range(32)]
            w = ldmatrix_x4(vt, addrs, trans=True)
            if int8:
                for cc in range(2):
                    a = []
                    for l in range(32):
                        u0, u1 = w[l][2 * cc] ^ flip(kind), w[l][2 * cc + 1] ^ flip(kind)
                        sel = ((0, 2), (1, 3)) if "vperm" not in mut else ((0, 1), (2, 3))
                        a.append([code_pair(u0, *sel[0], kind), code_pair(u0, *sel[1], kind),
                                  code_pair(u1, *sel[0], kind), code_pair(u1, *sel[1], kind)])
                    sub = [o[l][c + cc] for l in range(32)]
                    mma(sub, a, b, kind)
            else:
                sub = [o[l][c // 2] for l in range(32)]
                mma(sub, [w[l] for l in range(32)], b, kind)

    # the end: l over the 8 lanes of a column, O^T element -> (head, d)
    out = np.zeros((8, D))
    lt = np.zeros(8)
    for l in range(32):
        g, t = l >> 2, l & 3
        for hh in range(2):
            if g == 0:
                lt[2 * t + hh] = sum(lsum[4 * gg + t][hh] for gg in range(8))
        for mt in range(kt16):
            for e in range(4):
                if int8:
                    d = 16 * mt + 2 * g + (e >> 1)
                    if "dmap" in mut:
                        d = 16 * mt + g + 8 * (e >> 1)
                else:
                    d = 16 * mt + g + 8 * (e >> 1)
                out[2 * t + (e & 1), d] = o[l][mt][e]
    return out / np.where(lt == 0, 1.0, lt)[:, None]


def reference(qf, kf, vf, valid, scale):
    s = (qf @ kf.T) * scale
    s[:, ~valid] = -np.inf
    p = np.exp(s - s.max(axis=1, keepdims=True))
    return (p @ vf) / p.sum(axis=1, keepdims=True)


def check(kind: str, int8: bool, tiles: int = 2, mut: str = "", seed: int = 0, empty_first: bool = False,
          qscale: float = 1.0) -> float:
    rng = np.random.default_rng(seed)
    n = tiles * KEYS
    q16 = enc16(rng.standard_normal((8, D)) * qscale * np.exp2(rng.integers(-3, 4, (8, 1))), kind)
    valid = rng.random(n) > 0.2
    valid[0] = True
    if empty_first:  # a whole tile without keys before the first one (bad block ids)
        valid[:KEYS] = False
        valid[KEYS] = True
    scale = D ** -0.5
    if int8:
        kc = rng.integers(-128, 128, (n, D), dtype=np.int8)
        vc = rng.integers(-128, 128, (n, D), dtype=np.int8)
        ks = rng.random(n) * 0.05 + 0.01
        vs = rng.random(n) * 0.05 + 0.01
        out = warp_attention(q16, kc, vc, valid, scale / qscale, kind, True, ks, vs, mut)
        kf, vf = kc * ks[:, None], vc * vs[:, None]
    else:
        k16 = enc16(rng.standard_normal((n, D)), kind)
        v16 = enc16(rng.standard_normal((n, D)), kind)
        out = warp_attention(q16, k16, v16, valid, scale / qscale, kind, False, mut=mut)
        kf, vf = dec16(k16, kind), dec16(v16, kind)
    ref = reference(dec16(q16, kind), kf, vf, valid, scale / qscale)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def main() -> int:
    ok = True
    for kind in ("f16", "bf16"):  # every code, both magics: exact
        for c in range(-128, 128):
            word = (c & 0xFF) * 0x01010101
            got = dec16([lo16(code_pair(word ^ flip(kind), 0, 1, kind))], kind)[0]
            if got != c:
                ok = False
                print(f"code_pair {kind}: code {c} gives {got}")
    for kind in ("f16", "bf16"):
        for int8 in (False, True):
            err = max(check(kind, int8, seed=1), check(kind, int8, tiles=3, seed=2, empty_first=True))
            if kind == "bf16" and int8:  # queries beyond fp16's range and deep in its subnormals
                err = max(err, check(kind, int8, seed=3, qscale=1e6), check(kind, int8, seed=4, qscale=1e-7))
            tol = 2e-2 if kind == "bf16" else 4e-3  # P rounded to the element type, as FlashAttention
            good = err < tol
            ok &= good
            print(f"{kind} {'int8' if int8 else 'same'}: rel err {err:.2e} {'ok' if good else 'FAIL'}")
    # the model must notice each kind of mistake it is meant to catch
    for kind, int8, mut in (("f16", False, "swz"), ("f16", False, "movm"), ("f16", True, "qmap"),
                            ("f16", True, "afrag"), ("f16", True, "vperm"), ("f16", True, "dmap"),
                            ("bf16", True, "qexp")):
        err = check(kind, int8, tiles=1, mut=mut, qscale=1e3 if mut == "qexp" else 1.0)
        caught = err > 0.05
        ok &= caught
        print(f"mutation {mut} ({'int8' if int8 else 'same'}): rel err {err:.2e} {'caught' if caught else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

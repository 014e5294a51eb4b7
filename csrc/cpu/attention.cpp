// Scaled dot-product attention on the CPU, flash-style: the scores of a block of
// query rows against a tile of keys live only in a small scratch, an online softmax
// (running max m and sum l per row) rescales the output accumulator as tiles go by,
// so L x S is never materialized. Compiled once per ISA level; vectors from simd.h.
//
// Work: the query rows of one (batch, kv head) are ordered position-major, GQA head
// minor (row r = position r / g, query head kv * g + r % g), so every K/V tile loaded
// serves all g query heads that share it; blocks of kRowBlock such rows are the
// thread tasks. When there are too few blocks to keep the threads busy (decode: one
// query per sequence), the keys are split into chunks too, each task keeps its own
// (O, m, l), and a second pass merges the chunks by log-sum-exp.
// fp16 / bf16 inputs are converted to fp32 as tiles are loaded; everything
// accumulates in fp32 and the output is rounded once.
#include <cmath>
#include <limits>

#include "kernels.h"
#include "rows.h"

namespace lowbit::cpu::LOWBIT_ISA {
namespace {

constexpr int kKeyTile = 64;   // keys per tile: a multiple of every kW
constexpr int kRowBlock = 32;  // query rows per task
constexpr int kTileVecs = kKeyTile / kW;
constexpr int64_t kMinKeysPerSplit = 256;
#if LOWBIT_SIMD_AVX512
constexpr int kRT = 4;  // query rows per register tile (scores: 4 x 64 keys; P.V: 4 x 4 vectors)
#else
constexpr int kRT = 1;
#endif
constexpr int kPV = 4;  // output vectors per P.V register tile (fewer at the end of a row)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Shape of the work and the allowed key range of each query position.
struct Geometry {
  const AttentionParams& p;
  int64_t g;     // query heads per kv head
  int64_t rows;  // query rows per (batch, kv head): g * L
  int64_t Dvp;   // Dv rounded up to 16: the scratch row length of V and O

  explicit Geometry(const AttentionParams& prm)
      : p(prm), g(prm.Hq / prm.Hkv), rows(prm.Hq / prm.Hkv * prm.L), Dvp((prm.Dv + 15) / 16 * 16) {}

  int64_t head(int64_t kv, int64_t r) const { return kv * g + r % g; }
  int64_t pos(int64_t r) const { return r / g; }

  // Keys [lo, hi) that query position i may attend (before the mask); empty when hi <= lo.
  void key_range(int64_t i, int64_t& lo, int64_t& hi) const {
    const int64_t at = i + p.offset;
    lo = 0;
    hi = p.S;
    if (p.causal) hi = std::min(hi, at + 1);
    if (p.window_right >= 0) hi = std::min(hi, at + p.window_right + 1);
    if (p.window_left >= 0) lo = std::max(lo, at - p.window_left);
  }

  const char* row_ptr(const void* base, const int64_t* st, int64_t b, int64_t h, int64_t i) const {
    return static_cast<const char*>(base) + (b * st[0] + h * st[1] + i * st[2]) * elem_size(p.dtype);
  }
};

// Per-thread scratch, reused across tasks and calls (a task needs ~200 KB at D = 256:
// too much to allocate per task without page faults).
struct Scratch {
  float* p = nullptr;
  int64_t cap = 0;
  ~Scratch() { std::free(p); }
  float* get(int64_t n) {
    if (n > cap) {
      std::free(p);
      p = alloc<float>(n);
      cap = p ? n : 0;
    }
    return p;
  }
};
thread_local Scratch tls_scratch;

// The state of one block of rows: output accumulators O [rows, Dvp], running max m and sum l.
struct BlockState {
  float* O;
  float* m;
  float* l;
};

// S[r][0..64) = Q[r] . KT[:, 0..64) for RT rows (Q rows D apart, KT: D rows of 64 keys).
template <int RT>
void qk_tile(const float* Q, int64_t D, const float* KT, float* S) {
  VF acc[RT][kTileVecs];
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < kTileVecs; ++c) acc[r][c] = vf_set1(0.0f);
  for (int64_t d = 0; d < D; ++d) {
    VF q[RT];
    for (int r = 0; r < RT; ++r) q[r] = vf_set1(Q[r * D + d]);
    for (int c = 0; c < kTileVecs; ++c) {
      const VF k = vf_load(KT + d * kKeyTile + c * kW);
      for (int r = 0; r < RT; ++r) acc[r][c] = vf_fma(q[r], k, acc[r][c]);
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < kTileVecs; ++c) vf_store(S + r * kKeyTile + c * kW, acc[r][c]);
}

// O[r][c0 .. c0 + CV kW) = alpha[r] * O[r][...] + sum_{j < n} P[r][j] * V[j][...] for RT rows.
template <int RT, int CV>
void pv_tile(const float* P, const float* alpha, const float* V, int64_t ldv, int n, float* O, int64_t c0) {
  VF acc[RT][CV];
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < CV; ++c) acc[r][c] = vf_mul(vf_load(O + r * ldv + c0 + c * kW), vf_set1(alpha[r]));
  for (int j = 0; j < n; ++j) {
    VF v[CV];
    for (int c = 0; c < CV; ++c) v[c] = vf_load(V + j * ldv + c0 + c * kW);
    for (int r = 0; r < RT; ++r) {
      const VF pj = vf_set1(P[r * kKeyTile + j]);
      for (int c = 0; c < CV; ++c) acc[r][c] = vf_fma(pj, v[c], acc[r][c]);
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < CV; ++c) vf_store(O + r * ldv + c0 + c * kW, acc[r][c]);
}

template <int RT>
void pv_rows(const float* P, const float* alpha, const float* V, int64_t ldv, int n, float* O) {
  const int64_t vecs = ldv / kW;
  int64_t c = 0;
  for (; c + kPV <= vecs; c += kPV) pv_tile<RT, kPV>(P, alpha, V, ldv, n, O, c * kW);
  for (; c < vecs; ++c) pv_tile<RT, 1>(P, alpha, V, ldv, n, O, c * kW);
}

// Turns the raw scores of one row into this tile's probabilities (in place) and updates
// the row's m and l; returns alpha = exp(m_old - m_new), the factor for its old output.
// Keys outside [a, e) or refused by the mask score -inf; a row with no finite score yet
// keeps p = 0 (and alpha = 1: its output is still all zero); a NaN score makes the row NaN.
float softmax_row(const Geometry& G, float* s, int a, int e, const char* mask_row, int64_t t0, float& m,
                  float& l) {
  const AttentionParams& p = G.p;
  for (int c = 0; c < kTileVecs; ++c) vf_store(s + c * kW, vf_mul(vf_load(s + c * kW), vf_set1(p.scale)));
  for (int j = 0; j < a; ++j) s[j] = kNegInf;
  for (int j = e; j < kKeyTile; ++j) s[j] = kNegInf;
  if (mask_row) {
    const int64_t ms = p.mask_stride[3];
    for (int j = a; j < e; ++j) {
      const int64_t col = (t0 + j) * ms;
      if (p.mask_dtype == kBool)
        s[j] = mask_row[col] ? s[j] : kNegInf;
      else
        s[j] += load_elem(mask_row, p.mask_dtype, col);
    }
  }
  VF vmax = vf_set1(kNegInf);
  bool nan = false;
  for (int c = 0; c < kTileVecs; ++c) {
    const VF v = vf_load(s + c * kW);
    vmax = vf_max(vmax, v);
    nan |= vf_any_nan(v);
  }
  if (nan || std::isnan(m)) {  // a NaN score makes the row NaN (as torch): through m, l and P
    m = l = NAN;
    std::fill(s, s + kKeyTile, NAN);
    return NAN;
  }
  const float m_new = std::max(m, vf_hmax(vmax));
  if (m_new == kNegInf) {  // nothing attended yet
    std::fill(s, s + kKeyTile, 0.0f);
    return 1.0f;
  }
  VF vsum = vf_set1(0.0f);
  for (int c = 0; c < kTileVecs; ++c) {
    const VF pj = vf_exp(vf_sub(vf_load(s + c * kW), vf_set1(m_new)));
    vf_store(s + c * kW, pj);
    vsum = vf_add(vsum, pj);
  }
  const float alpha = std::exp(m - m_new);  // 0 when m was -inf
  l = l * alpha + vf_hsum(vsum);
  m = m_new;
  return alpha;
}

// Rows [r0, r0 + nr) of (b, kv) against keys [s0, s1): accumulates into st (initialized by the caller).
void attend_block(const Geometry& G, int64_t b, int64_t kv, int64_t r0, int nr, int64_t s0, int64_t s1,
                  const BlockState& st, float* scratch) {
  const AttentionParams& p = G.p;
  const int64_t D = p.D, Dv = p.Dv, ldv = G.Dvp;
  float* Q = scratch;                      // [kRowBlock, D]
  float* KT = Q + kRowBlock * D;           // [D, kKeyTile]
  float* V = KT + D * kKeyTile;            // [kKeyTile, Dvp]
  float* S = V + kKeyTile * ldv;           // [kRowBlock, kKeyTile]
  float* krow = S + kRowBlock * kKeyTile;  // [D]
  float alpha[kRowBlock];
  int64_t lo[kRowBlock], hi[kRowBlock];

  int64_t blo = s1, bhi = s0;  // the keys any row of the block may attend
  for (int r = 0; r < nr; ++r) {
    const int64_t row = r0 + r;
    row_to_f32(G.row_ptr(p.q, p.q_stride, b, G.head(kv, row), G.pos(row)), p.dtype, D, Q + r * D);
    G.key_range(G.pos(row), lo[r], hi[r]);
    lo[r] = std::max(lo[r], s0);
    hi[r] = std::min(hi[r], s1);
    if (lo[r] < hi[r]) {
      blo = std::min(blo, lo[r]);
      bhi = std::max(bhi, hi[r]);
    }
  }
  for (int64_t t0 = blo; t0 < bhi; t0 += kKeyTile) {
    const int n = static_cast<int>(std::min<int64_t>(kKeyTile, bhi - t0));
    for (int j = 0; j < n; ++j) {  // K tile, transposed; V tile, rows padded to Dvp
      row_to_f32(G.row_ptr(p.k, p.k_stride, b, kv, t0 + j), p.dtype, D, krow);
      for (int64_t d = 0; d < D; ++d) KT[d * kKeyTile + j] = krow[d];
      row_to_f32(G.row_ptr(p.v, p.v_stride, b, kv, t0 + j), p.dtype, Dv, V + j * ldv);
      std::fill(V + j * ldv + Dv, V + (j + 1) * ldv, 0.0f);
    }
    for (int64_t d = 0; n < kKeyTile && d < D; ++d) std::fill(KT + d * kKeyTile + n, KT + (d + 1) * kKeyTile, 0.0f);

    int r = 0;
    for (; r + kRT <= nr; r += kRT) qk_tile<kRT>(Q + r * D, D, KT, S + r * kKeyTile);
    for (; r < nr; ++r) qk_tile<1>(Q + r * D, D, KT, S + r * kKeyTile);
    for (r = 0; r < nr; ++r) {
      const int a = static_cast<int>(std::clamp<int64_t>(lo[r] - t0, 0, n));
      const int e = static_cast<int>(std::clamp<int64_t>(hi[r] - t0, 0, n));
      const int64_t row = r0 + r;
      const char* mask_row = nullptr;
      if (p.mask)
        mask_row = static_cast<const char*>(p.mask) +
                   (b * p.mask_stride[0] + G.head(kv, row) * p.mask_stride[1] + G.pos(row) * p.mask_stride[2]) *
                       (p.mask_dtype == kBool ? 1 : elem_size(p.mask_dtype));
      alpha[r] = softmax_row(G, S + r * kKeyTile, a, std::max(a, e), mask_row, t0, st.m[r], st.l[r]);
    }
    for (r = 0; r + kRT <= nr; r += kRT) pv_rows<kRT>(S + r * kKeyTile, alpha + r, V, ldv, n, st.O + r * ldv);
    for (; r < nr; ++r) pv_rows<1>(S + r * kKeyTile, alpha + r, V, ldv, n, st.O + r * ldv);
  }
}

void init_state(const BlockState& st, int nr, int64_t ldv) {
  std::fill(st.O, st.O + nr * ldv, 0.0f);
  std::fill(st.m, st.m + nr, kNegInf);
  std::fill(st.l, st.l + nr, 0.0f);
}

// out row = O / l (zeros for a row that attended nothing).
void store_rows(const Geometry& G, int64_t b, int64_t kv, int64_t r0, int nr, const BlockState& st) {
  const AttentionParams& p = G.p;
  for (int r = 0; r < nr; ++r) {
    float* o = st.O + r * G.Dvp;
    const float inv = st.l[r] > 0.0f ? 1.0f / st.l[r] : 0.0f;
    for (int64_t c = 0; c < G.Dvp; c += kW) vf_store(o + c, vf_mul(vf_load(o + c), vf_set1(inv)));
    const int64_t row = r0 + r;
    row_from_f32(o, p.dtype, p.Dv,
                 const_cast<char*>(G.row_ptr(p.out, p.out_stride, b, G.head(kv, row), G.pos(row))));
  }
}

int check(const AttentionParams& p) {
  if (!p.q || !p.k || !p.v || !p.out) return kInvalidArgument;
  if (p.B < 1 || p.Hq < 1 || p.Hkv < 1 || p.Hq % p.Hkv || p.L < 1 || p.S < 1 || p.D < 1 || p.Dv < 1)
    return kInvalidArgument;
  if (!valid_dtype(p.dtype) || (p.mask && p.mask_dtype != kBool && !valid_dtype(p.mask_dtype)))
    return kInvalidArgument;
  return kOk;
}

int attention(const AttentionParams& p) {
  if (int s = check(p)) return s;
  const Geometry G(p);
  const int64_t nblocks = (G.rows + kRowBlock - 1) / kRowBlock;
  const int64_t base = p.B * p.Hkv * nblocks;
  const int nthreads = std::max(1, p.nthreads);
  int64_t splits = 1;
  if (base < 2 * nthreads)
    splits = std::max<int64_t>(1, std::min((2 * nthreads + base - 1) / base, p.S / kMinKeysPerSplit));
  const int64_t state_floats = kRowBlock * (G.Dvp + 2);
  const int64_t scratch_floats = kRowBlock * p.D + p.D * kKeyTile + kKeyTile * G.Dvp + kRowBlock * kKeyTile + p.D;

  // Split keys: every (block, chunk) keeps its own state here, merged afterwards.
  Buffer<float> partial;
  if (splits > 1 && !partial.allocate(base * splits * state_floats)) return kOutOfMemory;
  std::atomic<bool> oom{false};
  parallel_for(base * splits, nthreads, [&](int64_t t) {
    const int64_t blk = t / splits, chunk = t % splits;
    const int64_t b = blk / (p.Hkv * nblocks), kv = blk / nblocks % p.Hkv, r0 = blk % nblocks * kRowBlock;
    const int nr = static_cast<int>(std::min<int64_t>(kRowBlock, G.rows - r0));
    float* scratch = tls_scratch.get(scratch_floats + (splits > 1 ? 0 : state_floats));
    if (!scratch) {
      oom = true;
      return;
    }
    float* sp = splits > 1 ? partial.p + t * state_floats : scratch + scratch_floats;
    const BlockState st{sp, sp + kRowBlock * G.Dvp, sp + kRowBlock * G.Dvp + kRowBlock};
    init_state(st, nr, G.Dvp);
    attend_block(G, b, kv, r0, nr, chunk * p.S / splits, (chunk + 1) * p.S / splits, st, scratch);
    if (splits == 1) store_rows(G, b, kv, r0, nr, st);
  });
  if (oom) return kOutOfMemory;
  if (splits == 1) return kOk;

  // Merge the chunks of each block: m = max m_c, l = sum l_c e^(m_c - m), O = sum O_c e^(m_c - m).
  parallel_for(base, nthreads, [&](int64_t blk) {
    const int64_t b = blk / (p.Hkv * nblocks), kv = blk / nblocks % p.Hkv, r0 = blk % nblocks * kRowBlock;
    const int nr = static_cast<int>(std::min<int64_t>(kRowBlock, G.rows - r0));
    float* first = partial.p + blk * splits * state_floats;
    const BlockState acc{first, first + kRowBlock * G.Dvp, first + kRowBlock * G.Dvp + kRowBlock};
    for (int64_t c = 1; c < splits; ++c) {
      float* sp = first + c * state_floats;
      const BlockState part{sp, sp + kRowBlock * G.Dvp, sp + kRowBlock * G.Dvp + kRowBlock};
      for (int r = 0; r < nr; ++r) {
        const float m = std::max(acc.m[r], part.m[r]);
        if (m == kNegInf) continue;
        const float wa = std::exp(acc.m[r] - m), wp = std::exp(part.m[r] - m);
        float* oa = acc.O + r * G.Dvp;
        const float* op = part.O + r * G.Dvp;
        for (int64_t d = 0; d < G.Dvp; d += kW)
          vf_store(oa + d, vf_fma(vf_load(op + d), vf_set1(wp), vf_mul(vf_load(oa + d), vf_set1(wa))));
        acc.l[r] = acc.l[r] * wa + part.l[r] * wp;
        acc.m[r] = m;
      }
    }
    store_rows(G, b, kv, r0, nr, acc);
  });
  return kOk;
}

}  // namespace

void register_attention(KernelTable& t) { t.attention = attention; }

}  // namespace lowbit::cpu::LOWBIT_ISA

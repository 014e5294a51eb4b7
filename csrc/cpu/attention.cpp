// Scaled dot-product attention on the CPU, flash-style: the scores of a block of
// query rows against a tile of keys live only in a small scratch, an online softmax
// (running max m and sum l per row) rescales the output accumulator as tiles go by,
// so L x S is never materialized. Compiled once per ISA level; vectors from simd.h.
//
// Keys and values come from contiguous tensors or from a paged cache (a block table per
// sequence, vLLM's layout), in a float dtype or INT8 with one scale per token and head,
// dequantized as the tiles are loaded; batches may have their own query and key lengths.
//
// Work: blocks of up to kRowBlock query rows are the thread tasks; in prefill a block's
// rows share one kv head (position-major, GQA head minor, so every K/V tile loaded serves
// all g query heads that use it), in decode a block spans the heads (see Geometry). When there are too few blocks to keep the threads busy (decode: one
// query per sequence), the keys are split into chunks too, each task keeps its own
// (O, m, l), and a second pass merges the chunks by log-sum-exp.
// fp16 / bf16 inputs are converted to fp32 as tiles are loaded; everything
// accumulates in fp32 and the output is rounded once. Exception, at the avx512_bf16 level:
// bf16 queries and keys / values in tile mode multiply as bf16 pairs with vdpbf16ps (exact
// products, fp32 sums: the scores are as exact as before) and P . V takes the probabilities
// rounded to bf16, as FlashAttention and torch's CPU flash attention do for bf16 inputs.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"
#include "rows.h"

namespace lowbit::cpu::LOWBIT_ISA {
namespace {

constexpr int kKeyTile = 64;   // keys per tile: a multiple of every kW
constexpr int kRowBlock = 64;  // query rows per task
constexpr int kTileVecs = kKeyTile / kW;
constexpr int64_t kMinKeysPerSplit = 256;
#if LOWBIT_SIMD_AVX512
constexpr int kRT = 4;  // query rows per register tile (scores: 4 x 64 keys; P.V: 4 x 4 vectors)
#else
constexpr int kRT = 1;
#endif
constexpr int kPV = 4;  // output vectors per P.V register tile (fewer at the end of a row)
// Blocks of at most this many rows (decode: one query per sequence and kv head, or a few GQA
// heads) skip the tile copies: each key / value row is used straight from the source (or
// from one converted row) while it streams by, which is what a memory-bound decode wants.
constexpr int kDirectRows = 4;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Shape of the work, the allowed key range of each query position, and where rows live.
//
// Two ways to walk the work. Tiles (prefill): a block holds rows of one kv head (position
// major, GQA head minor), K / V tiles are converted once into scratch and multiplied as small
// matrices. Direct (decode-like: at most kDirectRows query rows per kv head): each key /
// value row is used straight from the source while it streams by. When the heads of one key
// lie closer together than consecutive keys (the paged layout [slot, head, dim], or a
// [B, S, H, D] view), a direct block spans every head of its batch (position major, head
// minor), so each slot is read contiguously instead of one slot stride apart per head.
struct Geometry {
  const AttentionParams& p;
  int64_t g;    // query heads per kv head
  int64_t Dvp;  // Dv rounded up to 16: the scratch row length of V and O
  bool direct, span_heads;
  bool pairs;   // tile mode on bf16 pairs (see the file comment)

  explicit Geometry(const AttentionParams& prm)
      : p(prm), g(prm.Hq / prm.Hkv), Dvp((prm.Dv + 15) / 16 * 16) {
    int64_t max_l = 0;
    for (int64_t b = 0; b < p.B; ++b) max_l = std::max(max_l, L(b));
    direct = max_l * g <= kDirectRows;
    span_heads = direct && p.k_stride[1] < p.k_stride[2] && p.v_stride[1] < p.v_stride[2];
#if LOWBIT_SIMD_BF16
    pairs = !direct && p.dtype == kBF16 && p.kv_dtype == kBF16 && p.D % 2 == 0;
#else
    pairs = false;
#endif
  }

  int64_t qbase(int64_t b) const { return p.q_start ? p.q_start[b] : 0; }
  int64_t L(int64_t b) const { return p.q_start ? p.q_start[b + 1] - p.q_start[b] : p.L; }
  int64_t S(int64_t b) const { return p.seq_lens ? p.seq_lens[b] : p.S; }
  // Rows of a block of batch b (and kv head kv, in tile mode): how many, and row r's query
  // head, position and kv head.
  int64_t rows(int64_t b) const { return (span_heads ? p.Hq : g) * L(b); }
  int64_t head(int64_t kv, int64_t r) const { return span_heads ? r % p.Hq : kv * g + r % g; }
  int64_t pos(int64_t r) const { return span_heads ? r / p.Hq : r / g; }
  int64_t kv_of(int64_t kv, int64_t r) const { return span_heads ? r % p.Hq / g : kv; }

  // Keys [lo, hi) that query i of batch b may attend (before the mask); empty when hi <= lo.
  void key_range(int64_t b, int64_t i, int64_t& lo, int64_t& hi) const {
    const int64_t at = i + (p.bottom_right ? S(b) - L(b) : 0);
    lo = 0;
    hi = S(b);
    if (p.causal) hi = std::min(hi, at + 1);
    if (p.window_right >= 0) hi = std::min(hi, at + p.window_right + 1);
    if (p.window_left >= 0) lo = std::max(lo, at - p.window_left);
  }

  const char* q_row(int64_t b, int64_t h, int64_t i) const {
    return static_cast<const char*>(p.q) +
           (b * p.q_stride[0] + h * p.q_stride[1] + (qbase(b) + i) * p.q_stride[2]) * elem_size(p.dtype);
  }
  char* out_row(int64_t b, int64_t h, int64_t i) const {
    return static_cast<char*>(p.out) +
           (b * p.out_stride[0] + h * p.out_stride[1] + (qbase(b) + i) * p.out_stride[2]) * elem_size(p.dtype);
  }

  // Row j of kv head kv of batch b (of k or v) as n fp32 values: dst, filled, or (fp32 data)
  // the row itself.
  // Element offset of row j of kv head kv of batch b (and its cache slot, paged).
  int64_t kv_at(const int64_t* st, int64_t b, int64_t kv, int64_t j, int64_t& slot) const {
    slot = 0;
    if (!p.block_table) return b * st[0] + kv * st[1] + j * st[2];
    slot = int64_t(p.block_table[b * p.max_blocks + j / p.block_size]) * p.block_size + j % p.block_size;
    return slot * st[2] + kv * st[1];
  }
  // The row itself, for 16-bit kv dtypes.
  const uint16_t* kv_row16(const void* base, const int64_t* st, int64_t b, int64_t kv, int64_t j) const {
    int64_t slot;
    return static_cast<const uint16_t*>(base) + kv_at(st, b, kv, j, slot);
  }
  const float* kv_row(const void* base, const int64_t* st, const float* scales, int64_t b, int64_t kv, int64_t j,
                      int64_t n, float* dst) const {
    int64_t slot;
    const int64_t at = kv_at(st, b, kv, j, slot);
    if (p.kv_dtype == kF32) return static_cast<const float*>(base) + at;
    if (p.kv_dtype != kI8) {
      row_to_f32(static_cast<const char*>(base) + at * elem_size(p.kv_dtype), p.kv_dtype, n, dst);
      return dst;
    }
    const int8_t* codes = static_cast<const int8_t*>(base) + at;
    const VF sc = vf_set1(scales[slot * p.Hkv + kv]);
    int64_t d = 0;
    for (; d + kW <= n; d += kW) vf_store(dst + d, vf_mul(vf_load_i8(codes + d), sc));
    for (; d < n; ++d) dst[d] = scales[slot * p.Hkv + kv] * float(codes[d]);
    return dst;
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

// sum_d a[d] * b[d]
inline float dot(const float* a, const float* b, int64_t n) {
  VF acc = vf_set1(0.0f);
  int64_t d = 0;
  for (; d + kW <= n; d += kW) acc = vf_fma(vf_load(a + d), vf_load(b + d), acc);
  float s = vf_hsum(acc);
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

// y[0..n) += a * x[0..n)
inline void axpy(float a, const float* x, int64_t n, float* y) {
  int64_t d = 0;
  for (; d + kW <= n; d += kW) vf_store(y + d, vf_fma(vf_set1(a), vf_load(x + d), vf_load(y + d)));
  for (; d < n; ++d) y[d] += a * x[d];
}

inline void scale_row(float* y, float a, int64_t n) {
  for (int64_t d = 0; d < n; d += kW) vf_store(y + d, vf_mul(vf_load(y + d), vf_set1(a)));
}

// The small matrix products of tile mode, on fp32 operands (T = float) or, at the avx512_bf16
// level, on bf16 pairs (T = uint32_t: two bf16, the lower-indexed in the low half). mac() is
// acc + a * b for one operand a broadcast against a row b of kW operands: an FMA, or vdpbf16ps
// (the sum of the two products of each pair).
inline VF mac(VF acc, float a, VF b) { return vf_fma(vf_set1(a), b, acc); }
inline VF load_row(const float* p) { return vf_load(p); }
#if LOWBIT_SIMD_BF16
inline VF mac(VF acc, uint32_t a, VP b) { return vf_dot_pairs(acc, a, b); }
inline VP load_row(const uint32_t* p) { return vp_load(p); }
#endif

// S[r][0..64) = Q[r] . KT[:, 0..64) for RT rows (Q rows D operands apart, KT: D rows of 64 keys'
// operands; a pair holds two consecutive dims of one key).
template <int RT, class T>
void qk_tile(const T* Q, int64_t D, const T* KT, float* S) {
  VF acc[RT][kTileVecs];
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < kTileVecs; ++c) acc[r][c] = vf_set1(0.0f);
  for (int64_t d = 0; d < D; ++d)
    for (int c = 0; c < kTileVecs; ++c) {
      const auto k = load_row(KT + d * kKeyTile + c * kW);
      for (int r = 0; r < RT; ++r) acc[r][c] = mac(acc[r][c], Q[r * D + d], k);
    }
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < kTileVecs; ++c) vf_store(S + r * kKeyTile + c * kW, acc[r][c]);
}

// O[r][c0 .. c0 + CV kW) = alpha[r] * O[r][...] + sum_{j < n} P[r][j] * V[j][...] for RT rows
// (P rows ldp operands apart; with pairs, j counts pairs of consecutive keys).
template <int RT, int CV, class T>
void pv_tile(const T* P, int64_t ldp, const float* alpha, const T* V, int64_t ldv, int n, float* O, int64_t c0) {
  VF acc[RT][CV];
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < CV; ++c) acc[r][c] = vf_mul(vf_load(O + r * ldv + c0 + c * kW), vf_set1(alpha[r]));
  for (int j = 0; j < n; ++j) {
    decltype(load_row(V)) v[CV];
    for (int c = 0; c < CV; ++c) v[c] = load_row(V + j * ldv + c0 + c * kW);
    for (int r = 0; r < RT; ++r)
      for (int c = 0; c < CV; ++c) acc[r][c] = mac(acc[r][c], P[r * ldp + j], v[c]);
  }
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < CV; ++c) vf_store(O + r * ldv + c0 + c * kW, acc[r][c]);
}

template <int RT, class T>
void pv_rows(const T* P, int64_t ldp, const float* alpha, const T* V, int64_t ldv, int n, float* O) {
  const int64_t vecs = ldv / kW;
  int64_t c = 0;
  for (; c + kPV <= vecs; c += kPV) pv_tile<RT, kPV>(P, ldp, alpha, V, ldv, n, O, c * kW);
  for (; c < vecs; ++c) pv_tile<RT, 1>(P, ldp, alpha, V, ldv, n, O, c * kW);
}

#if LOWBIT_SIMD_BF16
inline uint32_t pair_at(const float* row, int64_t d) {
  uint32_t u;
  std::memcpy(&u, row + d, sizeof u);
  return u;
}

// The K tile as KT2 (keys' pairs transposed, zero past n) and the V tile as V2, straight from
// the bf16 rows of keys [t0, t0 + n) of (b, kv).
void load_tile_pairs(const Geometry& G, int64_t b, int64_t kv, int64_t t0, int n, uint32_t* KT2, uint32_t* V2) {
  const AttentionParams& p = G.p;
  const int64_t D2 = p.D / 2, Dv = p.Dv, ldv = G.Dvp;
  const float* krows[kKeyTile];  // a key row as D2 32-bit pairs (moved as bits, never as floats)
  for (int j = 0; j < n; ++j) krows[j] = reinterpret_cast<const float*>(G.kv_row16(p.k, p.k_stride, b, kv, t0 + j));
  float* KT2f = reinterpret_cast<float*>(KT2);
  int j0 = 0;
  for (; j0 + kW <= n; j0 += kW) {
    int64_t d0 = 0;
    for (; d0 + kW <= D2; d0 += kW) transpose_kw(krows + j0, d0, KT2f + d0 * kKeyTile + j0, kKeyTile);
    for (; d0 < D2; ++d0)
      for (int i = 0; i < kW; ++i) KT2[d0 * kKeyTile + j0 + i] = pair_at(krows[j0 + i], d0);
  }
  for (; j0 < n; ++j0)
    for (int64_t d = 0; d < D2; ++d) KT2[d * kKeyTile + j0] = pair_at(krows[j0], d);
  for (int64_t d = 0; n < kKeyTile && d < D2; ++d) std::fill(KT2 + d * kKeyTile + n, KT2 + (d + 1) * kKeyTile, 0u);
  for (int j = 0; j < n; j += 2) {  // values of keys j and j + 1 (zeros past n and past Dv)
    const uint16_t* va = G.kv_row16(p.v, p.v_stride, b, kv, t0 + j);
    const uint16_t* vb = j + 1 < n ? G.kv_row16(p.v, p.v_stride, b, kv, t0 + j + 1) : nullptr;
    uint32_t* out = V2 + (j / 2) * ldv;
    int64_t c = 0;
    if (vb)
      for (; c + kW <= Dv; c += kW) interleave_pairs16(va + c, vb + c, out + c);
    for (; c < ldv; ++c) out[c] = (c < Dv ? va[c] : 0u) | ((vb && c < Dv ? uint32_t(vb[c]) : 0u) << 16);
  }
}
#endif

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

// Rows [r0, r0 + nr) of (b, kv) against keys [s0, s1) (Geometry: the two modes): accumulates
// into st (initialized by the caller).
void attend_block(const Geometry& G, int64_t b, int64_t kv, int64_t r0, int nr, int64_t s0, int64_t s1,
                  const BlockState& st, float* scratch) {
  const AttentionParams& p = G.p;
  const int64_t D = p.D, Dv = p.Dv, ldv = G.Dvp;
  float* Q = scratch;                      // [kRowBlock, D]
  float* KT = Q + kRowBlock * D;           // [D, kKeyTile]
  float* V = KT + D * kKeyTile;            // [kKeyTile, Dvp]
  float* S = V + kKeyTile * ldv;           // [kRowBlock, kKeyTile]
  float* krow = S + kRowBlock * kKeyTile;  // [max(D, Dv)]
  float* Kstage = krow + std::max(D, Dv);   // [kKeyTile, D]: converted key rows (non-fp32 sources)
  const bool direct = G.direct;
  float alpha[kRowBlock];
  int64_t lo[kRowBlock], hi[kRowBlock], kvh[kRowBlock];

  int64_t blo = s1, bhi = s0;  // the keys any row of the block may attend
#if LOWBIT_SIMD_BF16
  uint32_t* const Q2 = reinterpret_cast<uint32_t*>(Q);    // pairs mode: [kRowBlock, D / 2]
  uint32_t* const KT2 = reinterpret_cast<uint32_t*>(KT);  // [D / 2, kKeyTile]
  uint32_t* const V2 = reinterpret_cast<uint32_t*>(V);    // [kKeyTile / 2, Dvp]
  alignas(64) uint32_t P2[kRowBlock * kKeyTile / 2];
#endif
  for (int r = 0; r < nr; ++r) {
    const int64_t row = r0 + r;
#if LOWBIT_SIMD_BF16
    if (G.pairs)
      std::memcpy(Q2 + r * (D / 2), G.q_row(b, G.head(kv, row), G.pos(row)), D * sizeof(uint16_t));
    else
#endif
      row_to_f32(G.q_row(b, G.head(kv, row), G.pos(row)), p.dtype, D, Q + r * D);
    kvh[r] = G.kv_of(kv, row);
    G.key_range(b, G.pos(row), lo[r], hi[r]);
    lo[r] = std::max(lo[r], s0);
    hi[r] = std::min(hi[r], s1);
    if (lo[r] < hi[r]) {
      blo = std::min(blo, lo[r]);
      bhi = std::max(bhi, hi[r]);
    }
  }
  for (int64_t t0 = blo; t0 < bhi; t0 += kKeyTile) {
    const int n = static_cast<int>(std::min<int64_t>(kKeyTile, bhi - t0));
    int r = 0;
    if (direct) {  // dot each key row with the rows of its kv head as it streams by
      for (int j = 0; j < n; ++j) {
        const float* kr = nullptr;
        for (r = 0; r < nr; ++r) {
          if (r == 0 || kvh[r] != kvh[r - 1]) kr = G.kv_row(p.k, p.k_stride, p.k_scale, b, kvh[r], t0 + j, D, krow);
          S[r * kKeyTile + j] = dot(Q + r * D, kr, D);
        }
      }
    }
#if LOWBIT_SIMD_BF16
    else if (G.pairs) {
      load_tile_pairs(G, b, kv, t0, n, KT2, V2);
      for (; r + kRT <= nr; r += kRT) qk_tile<kRT>(Q2 + r * (D / 2), D / 2, KT2, S + r * kKeyTile);
      for (; r < nr; ++r) qk_tile<1>(Q2 + r * (D / 2), D / 2, KT2, S + r * kKeyTile);
    }
#endif
    else {  // K tile, transposed (kW x kW blocks in registers); V tile, rows padded to Dvp
      const float* krows[kKeyTile];
      for (int j = 0; j < n; ++j) krows[j] = G.kv_row(p.k, p.k_stride, p.k_scale, b, kv, t0 + j, D, Kstage + j * D);
      int j0 = 0;
      for (; j0 + kW <= n; j0 += kW) {
        int64_t d0 = 0;
        for (; d0 + kW <= D; d0 += kW) transpose_kw(krows + j0, d0, KT + d0 * kKeyTile + j0, kKeyTile);
        for (; d0 < D; ++d0)
          for (int i = 0; i < kW; ++i) KT[d0 * kKeyTile + j0 + i] = krows[j0 + i][d0];
      }
      for (; j0 < n; ++j0)
        for (int64_t d = 0; d < D; ++d) KT[d * kKeyTile + j0] = krows[j0][d];
      for (int j = 0; j < n; ++j) {
        float* vr = V + j * ldv;
        const float* src = G.kv_row(p.v, p.v_stride, p.v_scale, b, kv, t0 + j, Dv, vr);
        if (src != vr) std::copy(src, src + Dv, vr);
        std::fill(vr + Dv, vr + ldv, 0.0f);
      }
      for (int64_t d = 0; n < kKeyTile && d < D; ++d) std::fill(KT + d * kKeyTile + n, KT + (d + 1) * kKeyTile, 0.0f);
      for (; r + kRT <= nr; r += kRT) qk_tile<kRT>(Q + r * D, D, KT, S + r * kKeyTile);
      for (; r < nr; ++r) qk_tile<1>(Q + r * D, D, KT, S + r * kKeyTile);
    }
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
    if (direct) {
      for (r = 0; r < nr; ++r) scale_row(st.O + r * ldv, alpha[r], ldv);
      for (int j = 0; j < n; ++j) {
        const float* vr = nullptr;
        for (r = 0; r < nr; ++r) {
          if (r == 0 || kvh[r] != kvh[r - 1]) vr = G.kv_row(p.v, p.v_stride, p.v_scale, b, kvh[r], t0 + j, Dv, krow);
          if (S[r * kKeyTile + j] != 0.0f) axpy(S[r * kKeyTile + j], vr, Dv, st.O + r * ldv);
        }
      }
      continue;
    }
#if LOWBIT_SIMD_BF16
    if (G.pairs) {  // P rounded to bf16 pairs (zeros past n: softmax_row leaves p = 0 there)
      const int n2 = (n + 1) / 2;
      for (r = 0; r < nr; ++r)
        for (int j = 0; j < kKeyTile; j += 2 * kW) pack_pairs32(S + r * kKeyTile + j, P2 + r * (kKeyTile / 2) + j / 2);
      constexpr int64_t ldp = kKeyTile / 2;
      for (r = 0; r + kRT <= nr; r += kRT) pv_rows<kRT>(P2 + r * ldp, ldp, alpha + r, V2, ldv, n2, st.O + r * ldv);
      for (; r < nr; ++r) pv_rows<1>(P2 + r * ldp, ldp, alpha + r, V2, ldv, n2, st.O + r * ldv);
      continue;
    }
#endif
    for (r = 0; r + kRT <= nr; r += kRT)
      pv_rows<kRT>(S + r * kKeyTile, kKeyTile, alpha + r, V, ldv, n, st.O + r * ldv);
    for (; r < nr; ++r) pv_rows<1>(S + r * kKeyTile, kKeyTile, alpha + r, V, ldv, n, st.O + r * ldv);
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
    row_from_f32(o, p.dtype, p.Dv, G.out_row(b, G.head(kv, row), G.pos(row)));
  }
}

int check(const AttentionParams& p) {
  if (!p.q || !p.k || !p.v || !p.out) return kInvalidArgument;
  if (p.B < 1 || p.Hq < 1 || p.Hkv < 1 || p.Hq % p.Hkv || p.L < 0 || p.S < 0 || p.D < 1 || p.Dv < 1)
    return kInvalidArgument;
  if (!valid_dtype(p.dtype) || (p.mask && p.mask_dtype != kBool && !valid_dtype(p.mask_dtype)))
    return kInvalidArgument;
  if (p.kv_dtype == kI8 ? !(p.block_table && p.k_scale && p.v_scale) : !valid_dtype(p.kv_dtype))
    return kInvalidArgument;
  if (p.block_table && (p.block_size < 1 || p.max_blocks < 1 || !p.seq_lens)) return kInvalidArgument;
  if (p.mask && (p.q_start || p.seq_lens)) return kInvalidArgument;
  return kOk;
}

// A block of query rows: rows [r0, r0 + nr) of (batch b, kv head kv; kv = 0 when blocks span heads).
struct Task {
  int64_t b, kv, r0;
  int nr;
};

int attention(const AttentionParams& p) {
  if (int s = check(p)) return s;
  const Geometry G(p);
  std::vector<Task> blocks;
  int64_t max_s = 0;
  for (int64_t b = 0; b < p.B; ++b) {
    max_s = std::max(max_s, G.S(b));
    for (int64_t kv = 0; kv < (G.span_heads ? 1 : p.Hkv); ++kv)
      for (int64_t r0 = 0; r0 < G.rows(b); r0 += kRowBlock)
        blocks.push_back({b, kv, r0, static_cast<int>(std::min<int64_t>(kRowBlock, G.rows(b) - r0))});
  }
  const int64_t base = static_cast<int64_t>(blocks.size());
  const int nthreads = std::max(1, p.nthreads);
  int64_t splits = 1;
  if (base < 2 * nthreads)
    splits = std::max<int64_t>(1, std::min((2 * nthreads + base - 1) / std::max<int64_t>(base, 1),
                                           max_s / kMinKeysPerSplit));
  const int64_t state_floats = kRowBlock * (G.Dvp + 2);
  const int64_t scratch_floats = kRowBlock * p.D + p.D * kKeyTile + kKeyTile * G.Dvp + kRowBlock * kKeyTile +
                                 std::max(p.D, p.Dv) + kKeyTile * p.D;
  auto state_at = [&](float* sp) {
    return BlockState{sp, sp + kRowBlock * G.Dvp, sp + kRowBlock * G.Dvp + kRowBlock};
  };

  // Split keys: every (block, chunk) keeps its own state here, merged afterwards.
  Buffer<float> partial;
  if (splits > 1 && !partial.allocate(base * splits * state_floats)) return kOutOfMemory;
  std::atomic<bool> oom{false};
  parallel_for(base * splits, nthreads, [&](int64_t t) {
    const Task& tk = blocks[t / splits];
    const int64_t chunk = t % splits, S = G.S(tk.b);
    float* scratch = tls_scratch.get(scratch_floats + (splits > 1 ? 0 : state_floats));
    if (!scratch) {
      oom = true;
      return;
    }
    const BlockState st = state_at(splits > 1 ? partial.p + t * state_floats : scratch + scratch_floats);
    init_state(st, tk.nr, G.Dvp);
    attend_block(G, tk.b, tk.kv, tk.r0, tk.nr, chunk * S / splits, (chunk + 1) * S / splits, st, scratch);
    if (splits == 1) store_rows(G, tk.b, tk.kv, tk.r0, tk.nr, st);
  });
  if (oom) return kOutOfMemory;
  if (splits == 1) return kOk;

  // Merge the chunks of each block: m = max m_c, l = sum l_c e^(m_c - m), O = sum O_c e^(m_c - m).
  parallel_for(base, nthreads, [&](int64_t i) {
    const Task& tk = blocks[i];
    float* first = partial.p + i * splits * state_floats;
    const BlockState acc = state_at(first);
    for (int64_t c = 1; c < splits; ++c) {
      const BlockState part = state_at(first + c * state_floats);
      for (int r = 0; r < tk.nr; ++r) {
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
    store_rows(G, tk.b, tk.kv, tk.r0, tk.nr, acc);
  });
  return kOk;
}

// reshape_and_cache: row (t, h) of src -> cache slot slots[t] (-1: skipped), converted to the cache's
// float dtype, or for INT8 caches quantized per (token, head) by quantize_row (the int8_quantize_per_token
// rule) with its scale stored at scales[slot * H + h]. Slots were validated by the caller.
int kv_cache_write(const void* src, int src_dtype, int64_t T, int64_t H, int64_t D, int64_t ld_t, int64_t ld_h,
                   const int64_t* slots, void* cache, int cache_dtype, float* scales, int nthreads) {
  if (!src || !slots || !cache || !valid_dtype(src_dtype) || (cache_dtype != kI8 && !valid_dtype(cache_dtype)) ||
      (cache_dtype == kI8 && !scales) ||
      T < 0 || H <= 0 || D <= 0)
    return kInvalidArgument;
  constexpr int64_t kTokensPerTask = 16;
  std::atomic<bool> oom{false};
  const int64_t tasks = (T + kTokensPerTask - 1) / kTokensPerTask;
  parallel_for(tasks, tasks > 1 ? nthreads : 1, [&](int64_t task) {
    Buffer<float> row;
    if (!row.allocate(D)) {
      oom = true;
      return;
    }
    for (int64_t t = task * kTokensPerTask; t < std::min(T, (task + 1) * kTokensPerTask); ++t) {
      if (slots[t] < 0) continue;
      for (int64_t h = 0; h < H; ++h) {
        row_to_f32(static_cast<const char*>(src) + (t * ld_t + h * ld_h) * elem_size(src_dtype), src_dtype, D, row.p);
        const int64_t at = (slots[t] * H + h) * D;
        if (cache_dtype == kI8)
          scales[slots[t] * H + h] = quantize_row(row.p, D, static_cast<int8_t*>(cache) + at);
        else
          row_from_f32(row.p, cache_dtype, D, static_cast<char*>(cache) + at * elem_size(cache_dtype));
      }
    }
  });
  return oom ? kOutOfMemory : kOk;
}

}  // namespace

void register_attention(KernelTable& t) {
  t.attention = attention;
  t.kv_cache_write = kv_cache_write;
}

}  // namespace lowbit::cpu::LOWBIT_ISA

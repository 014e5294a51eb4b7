// INT8 linear layers on the CPU: W8A16 (fp32 FMA on dequantized weights), W8A8
// (per-token int8 activations, int8 dot products) and the per-token quantizer.
// Compiled once per ISA level (CMakeLists.txt); every vector instruction comes
// from simd.h, so this file is the same algorithm for scalar, AVX2 and AVX-512.
//
// Shape of the work: y[M, N] = x[M, K] . W[N, K]^T with W in the packed panel
// layout of lowbit/int8_format.h. linear.h cuts it into threads and tiles; here
// an MB x NB register tile (MB rows of x, NB panels of 16 rows) walks K one quad
// at a time, so each weight quad loaded is used MB times and each activation
// quad NB times.
#include <type_traits>

#include "kernels.h"
#include "linear.h"

namespace lowbit::cpu::LOWBIT_ISA {
namespace {

namespace fmt = lowbit::int8_format;

// Quantizes M rows of x into q (rows ldq apart, zero-padded from K to ldq).
int quantize_rows(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, int8_t* q, int64_t ldq,
                  float* scale, int nthreads) {
  return for_each_row_f32(x, x_dtype, M, K, ldx, nthreads, [&](int64_t m, const float* row) {
    scale[m] = quantize_row(row, K, q + m * ldq);
    std::fill(q + m * ldq + K, q + (m + 1) * ldq, int8_t(0));
  });
}

// Activations prepared for the microkernel: rows of Kp elements (zero padded).
template <class X>
struct Prepared {
  Buffer<X> xs;
  Buffer<float> sx;  // per-row activation scale (W8A8 only)
  int64_t ld = 0;
};

// ---- the two paths, as policies for one microkernel -------------------------
struct PathF32 {  // W8A16: fp32 activations x dequantized weights
  using X = float;
  using W = WF32;
  using XP = XF32;
  using Acc = AccF32;
  using Out = float;  // what a tile's sums are kept in between K chunks
#if LOWBIT_SIMD_AVX512
  // 4 accumulators per (row, panel): 6 x 1 fills the registers at prefill sizes;
  // for 1-2 rows (decode) the spare registers go to more panels, i.e. more
  // concurrent weight streams.
  static constexpr int kMB = 6, kNB = 3;
  static constexpr int nb_for(int mb) { return mb == 1 ? 3 : (mb == 2 ? 2 : 1); }
#else
  static constexpr int kMB = 1, kNB = 1;
  static constexpr int nb_for(int) { return kNB; }
#endif
  static constexpr int64_t kChunkQuads = INT64_MAX / 2;  // no chunking (no overflow to avoid)
  static W load_w(const int8_t* p) { return load_wf32(p); }
  static XP prep_x(const float* x4) { return prep_xf32(x4); }
  static Acc zero() { return acc_f32_zero(); }
  static Acc dot(Acc a, const XP& x, const W& w) { return dot_f32(a, x, w); }
  static void flush(const Acc& a, float* out16) {
    alignas(64) float t[64];
    acc_f32_store(t, a);
    for (int i = 0; i < 16; ++i) out16[i] += (t[4 * i] + t[4 * i + 1]) + (t[4 * i + 2] + t[4 * i + 3]);
  }

  static int prepare(const LinearArgs& a, int64_t Kp, Prepared<float>& p) {
    p.ld = Kp;
    if (!p.xs.allocate(a.M * Kp)) return kOutOfMemory;
    return for_each_row_f32(a.x, a.x_dtype, a.M, a.K, a.ldx, a.nthreads, [&](int64_t m, const float* row) {
      std::copy(row, row + a.K, p.xs.p + m * Kp);
      std::fill(p.xs.p + m * Kp + a.K, p.xs.p + (m + 1) * Kp, 0.0f);
    });
  }
};

struct PathI8 {  // W8A8: per-token int8 activations x int8 weights
  using X = int8_t;
  using W = WI8;
  using XP = XI8;
  using Acc = AccI32;
  using Out = int64_t;  // exact integer sums across K chunks; one rounding, in the epilogue
#if LOWBIT_SIMD_AVX512
  static constexpr int kMB = 6, kNB = 4;
#elif LOWBIT_SIMD_AVX2
  static constexpr int kMB = 2, kNB = 2;
#else
  static constexpr int kMB = 1, kNB = 1;
#endif
  static constexpr int nb_for(int) { return kNB; }
  // int32 partial sums are flushed to int64 every 32768 k: |u8 * s8| * 32768 < 2^31.
  static constexpr int64_t kChunkQuads = 32768 / fmt::kQuad;
  static W load_w(const int8_t* p) { return load_wi8(p); }
  static XP prep_x(const int8_t* x4) { return prep_xi8(x4); }
  static Acc zero() { return acc_i32_zero(); }
  static Acc dot(Acc a, const XP& x, const W& w) { return dot_i8(a, x, w); }
  static void flush(const Acc& a, int64_t* out16) {
    alignas(64) int32_t t[16];
    acc_i32_store(t, a);
    for (int i = 0; i < 16; ++i) out16[i] += t[i];
  }

  static int prepare(const LinearArgs& a, int64_t Kp, Prepared<int8_t>& p) {
    p.ld = Kp;
    if (!p.xs.allocate(a.M * Kp) || !p.sx.allocate(a.M)) return kOutOfMemory;
    int s = quantize_rows(a.x, a.x_dtype, a.M, a.K, a.ldx, p.xs.p, Kp, p.sx.p, a.nthreads);
    offset_activations(p.xs.p, a.M * Kp);
    return s;
  }
};

// acc[m][n] += the quads [q0, q1) of x rows m against panels n. Kept out of
// line: with the accumulators passed in and out of one tight loop GCC keeps all
// MB x NB of them in registers (inlined into the chunk loop it copies them).
template <class P, int MB, int NB>
__attribute__((noinline)) void accumulate(typename P::Acc (&acc)[MB][NB], const typename P::X* x, int64_t ldx,
                                          const int8_t* w, int64_t panel_bytes, int64_t q0, int64_t q1) {
  typename P::Acc a[MB][NB];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) a[m][n] = acc[m][n];
  for (int64_t q = q0; q < q1; ++q) {
    typename P::W wv[NB];
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) wv[n] = P::load_w(w + n * panel_bytes + q * fmt::kQuadBytes);
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      typename P::XP xv = P::prep_x(x + m * ldx + q * fmt::kQuad);
#pragma GCC unroll 8
      for (int n = 0; n < NB; ++n) a[m][n] = P::dot(a[m][n], xv, wv[n]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) acc[m][n] = a[m][n];
}

// out[m * NB + n][i] += sum over k of x[m, k] * w[panel n, row i, k]
template <class P, int MB, int NB>
void microkernel(const typename P::X* x, int64_t ldx, const int8_t* w, int64_t panel_bytes, int64_t nquads,
                 typename P::Out (*out)[16]) {
  for (int64_t q0 = 0; q0 < nquads; q0 += P::kChunkQuads) {
    typename P::Acc acc[MB][NB];
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < NB; ++n) acc[m][n] = P::zero();
    accumulate<P, MB, NB>(acc, x, ldx, w, panel_bytes, q0, std::min(nquads, q0 + P::kChunkQuads));
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < NB; ++n) P::flush(acc[m][n], out[m * NB + n]);
  }
}

// One path's weights and prepared activations, as linear.h's tile provider.
template <class P>
struct Int8Tiles {
  static constexpr int kMB = P::kMB, kNB = P::kNB;
  static constexpr int nb_for(int mb) { return P::nb_for(mb); }
  const LinearArgs& a;
  const int8_t* packed;
  const float* wscale;
  int64_t panel_bytes, nquads;
  const Prepared<typename P::X>& x;

  // out = (sum - offset) * sx * wscale: the rowsum quad after a panel's K quads holds
  // the row sums that undo the u8 activation offset (128 * rowsum).
  template <int MB, int NB>
  void tile(int64_t m0, int64_t p0, float (*out)[kPanelRows]) const {
    typename P::Out sums[MB * NB][kPanelRows] = {};
    const int8_t* w = packed + p0 * panel_bytes;
    microkernel<P, MB, NB>(x.xs.p + m0 * x.ld, x.ld, w, panel_bytes, nquads, sums);
    for (int n = 0; n < NB; ++n) {
      int32_t rowsum[kPanelRows];
      std::memcpy(rowsum, w + n * panel_bytes + nquads * fmt::kQuadBytes, sizeof rowsum);
      const int64_t col0 = (p0 + n) * kPanelRows;
      const int cols = panel_cols(a, p0 + n);
      for (int m = 0; m < MB; ++m) {
        const float sx = x.sx.p ? x.sx.p[m0 + m] : 1.0f;
        for (int i = 0; i < cols; ++i) {
          typename P::Out v = sums[m * NB + n][i];
          if constexpr (std::is_same_v<typename P::Out, int64_t>)
            v -= kU8Activations ? 128 * int64_t(rowsum[i]) : 0;
          out[m * kNB + n][i] = static_cast<float>(v) * sx * wscale[col0 + i];
        }
      }
    }
  }
};

template <class P>
int linear(const LinearArgs& a, const int8_t* packed, const float* wscale) {
  if (int s = check_linear_args(a)) return s;
  if (!packed || !wscale) return kInvalidArgument;
  if (a.M == 0) return kOk;
  Prepared<typename P::X> prep;
  if (int s = P::prepare(a, fmt::round_up(a.K, fmt::kQuad), prep)) return s;
  run_panels(a, Int8Tiles<P>{a, packed, wscale, fmt::panel_bytes(a.K), fmt::quads(a.K), prep});
  return kOk;
}

int linear_w8a16(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const int8_t* packed,
                 const float* wscale, int64_t N, const void* bias, int bias_dtype, void* y, int64_t ldy,
                 int nthreads) {
  return linear<PathF32>({x, x_dtype, M, K, ldx, N, bias, bias_dtype, y, ldy, nthreads}, packed, wscale);
}

int linear_w8a8(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const int8_t* packed,
                const float* wscale, int64_t N, const void* bias, int bias_dtype, void* y, int64_t ldy,
                int nthreads) {
  return linear<PathI8>({x, x_dtype, M, K, ldx, N, bias, bias_dtype, y, ldy, nthreads}, packed, wscale);
}

int quantize_per_token(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, int8_t* q, float* scale,
                       int nthreads) {
  if (!x || !q || !scale || M < 0 || K <= 0 || ldx < K || !valid_dtype(x_dtype)) return kInvalidArgument;
  return quantize_rows(x, x_dtype, M, K, ldx, q, K, scale, nthreads);
}

}  // namespace

void register_int8(KernelTable& t) {
  t.int8_quantize_per_token = quantize_per_token;
  t.int8_linear_w8a16 = linear_w8a16;
  t.int8_linear_w8a8 = linear_w8a8;
}

}  // namespace lowbit::cpu::LOWBIT_ISA

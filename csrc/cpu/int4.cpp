// INT4 group-wise linear layers on the CPU: W4A16 (fp32 activations) and W4A8
// (activations quantized to int8 per block of 32 along K, as llama.cpp's Q8 blocks).
// Compiled once per ISA level; every vector instruction comes from simd.h.
//
// Weights are w = d * q + m per group of g k (symmetric: m = -8 * d), in the packed
// layout of lowbit/int4_format.h. Both paths take K in blocks of 32 and factor the
// scales out of each block's dot product:
//   W4A16:  y += d * sum(q * x)          + m * sum(x)              (fp32 FMAs)
//   W4A8:   y += d * sx * sum(q * qx)    + m * sx * sum(qx)        (int8 dots, exact int32 sums)
// with x = sx * qx the block's quantized activations; sum(x) and sx * sum(qx) are computed
// once per row and block when the activations are prepared. The inner loops then see
// only codes and activations; per block and output row the epilogue costs two FMAs.
#include "kernels.h"
#include "linear.h"
#include "lowbit/int4_format.h"

namespace lowbit::cpu::LOWBIT_ISA {
namespace {

namespace fmt = lowbit::int4_format;

constexpr int kBlockK = 32;  // the epilogue unit, and the W4A8 activation block
constexpr int kBlockOctets = kBlockK / fmt::kOctet;

struct Int4Weights {
  const uint8_t* packed;
  const void* scales;  // [panels, groups, 16] of ScaleT
  const void* mins;    // same, or null (symmetric)
  int64_t group;       // g: 32, 64, 128, or K
};

// Activations per block of 32 k, rows ld elements apart (zero-padded to whole blocks).
template <class X>
struct Blocks {
  Buffer<X> x;        // W4A16: fp32 values; W4A8: int8 codes
  Buffer<float> sx;   // W4A8: the block scales [M, nblocks]
  Buffer<float> sum;  // [M, nblocks]: sum(x) (W4A16) or sx * sum(qx) (W4A8)
  int64_t ld = 0, nblocks = 0;
};

// The two paths: the activations they take, how they prepare them, one octet's dot
// products, and one block's epilogue.
// Register tiles of both paths (accumulators + as many running outputs per row x panel).
struct TileShape {
#if LOWBIT_SIMD_AVX512
  // Up to 4 rows x 2 panels; 1-2 rows (decode) span more panels instead: more
  // concurrent weight streams. kNB is the widest tile.
  static constexpr int kMB = 4, kNB = 4;
  static constexpr int nb_for(int mb) { return mb == 1 ? 4 : (mb == 2 ? 3 : 2); }
#elif LOWBIT_SIMD_AVX2
  static constexpr int kMB = 2, kNB = 1;
  static constexpr int nb_for(int) { return kNB; }
#else
  static constexpr int kMB = 1, kNB = 1;
  static constexpr int nb_for(int) { return kNB; }
#endif
};

struct PathF32 : TileShape {  // W4A16
  using X = float;
  using Acc = PF;
  static Acc zero() { return pf_zero(); }

  static int prepare(const LinearArgs& a, Blocks<float>& b) {
    if (!b.x.allocate(a.M * b.ld) || !b.sum.allocate(a.M * b.nblocks)) return kOutOfMemory;
    return for_each_row_f32(a.x, a.x_dtype, a.M, a.K, a.ldx, a.nthreads, [&](int64_t m, const float* row) {
      float* xs = b.x.p + m * b.ld;
      std::copy(row, row + a.K, xs);
      std::fill(xs + a.K, xs + b.ld, 0.0f);
      for (int64_t blk = 0; blk < b.nblocks; ++blk) {
        float s = 0.0f;
        for (int k = 0; k < kBlockK; ++k) s += xs[blk * kBlockK + k];
        b.sum.p[m * b.nblocks + blk] = s;
      }
    });
  }

  // acc[m][n] += sum over the octet's 8 k of x[m, k] * q[panel n, row, k]
  template <int MB, int NB>
  static void dot_octet(Acc (&acc)[MB][NB], const float* x, int64_t ldx, const uint8_t* w, int64_t panel_bytes) {
    WN4 wv[NB];
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) wv[n] = load_wn4(w + n * panel_bytes);
#pragma GCC unroll 8
    for (int s = 0; s < fmt::kOctet; ++s) {
      PF q[NB];
#pragma GCC unroll 8
      for (int n = 0; n < NB; ++n) q[n] = nibble_f32(wv[n], s);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        const PF xb = pf_set1(x[m * ldx + fmt::nibble_k(s)]);
#pragma GCC unroll 8
        for (int n = 0; n < NB; ++n) acc[m][n] = pf_fma(q[n], xb, acc[m][n]);
      }
    }
  }

  // A block adds acc * d (W4A16) or acc * (d * sx) (W4A8) to the outputs.
  static PF block_sums(const Acc& acc) { return acc; }
  static PF block_scale(PF d, float /*sx*/) { return d; }
};

struct PathI8 : TileShape {  // W4A8
  using X = int8_t;
  using Acc = AccI32;
  static Acc zero() { return acc_i32_zero(); }

  static int prepare(const LinearArgs& a, Blocks<int8_t>& b) {
    if (!b.x.allocate(a.M * b.ld) || !b.sx.allocate(a.M * b.nblocks) || !b.sum.allocate(a.M * b.nblocks))
      return kOutOfMemory;
    return for_each_row_f32(a.x, a.x_dtype, a.M, a.K, a.ldx, a.nthreads, [&](int64_t m, const float* row) {
      int8_t* q = b.x.p + m * b.ld;
      std::fill(q + a.K, q + b.ld, int8_t(0));
      for (int64_t blk = 0; blk < b.nblocks; ++blk) {
        const int64_t k0 = blk * kBlockK, len = std::min<int64_t>(kBlockK, a.K - k0);
        const float sx = quantize_row(row + k0, len, q + k0);
        int32_t s = 0;
        for (int64_t k = 0; k < len; ++k) s += q[k0 + k];
        b.sx.p[m * b.nblocks + blk] = sx;
        b.sum.p[m * b.nblocks + blk] = sx * static_cast<float>(s);
      }
    });
  }

  template <int MB, int NB>
  static void dot_octet(Acc (&acc)[MB][NB], const int8_t* x, int64_t ldx, const uint8_t* w, int64_t panel_bytes) {
    WQ4 lo[NB], hi[NB];
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) load_q4(w + n * panel_bytes, lo[n], hi[n]);
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const XS8 x0 = prep_xs8(x + m * ldx), x1 = prep_xs8(x + m * ldx + 4);
#pragma GCC unroll 8
      for (int n = 0; n < NB; ++n) acc[m][n] = dot_q4(dot_q4(acc[m][n], x0, lo[n]), x1, hi[n]);
    }
  }

  // |sum| <= 32 * 15 * 128 < 2^24: the int32 -> fp32 conversion is exact.
  static PF block_sums(const Acc& acc) { return pf_from_i32(acc); }
  static PF block_scale(PF d, float sx) { return pf_mul(d, pf_set1(sx)); }
};

// y[m][n] (running outputs of an MB x NB tile) += every block of K. Out of line so
// that GCC keeps the accumulators and outputs of this one loop nest in registers.
template <class P, class ScaleT, int MB, int NB>
__attribute__((noinline)) void block_loop(PF (&y)[MB][NB], const Blocks<typename P::X>& xb, int64_t m0,
                                          const Int4Weights& wt, int64_t p0, int64_t K) {
  const int64_t panel_bytes = fmt::panel_bytes(K), noct = fmt::octets(K);
  const int64_t groups = K / wt.group;
  const uint8_t* w = wt.packed + p0 * panel_bytes;
  const ScaleT* scales = static_cast<const ScaleT*>(wt.scales) + p0 * groups * kPanelRows;
  const ScaleT* mins = static_cast<const ScaleT*>(wt.mins);
  if (mins) mins += p0 * groups * kPanelRows;
  const typename P::X* x = xb.x.p + m0 * xb.ld;
  for (int64_t blk = 0; blk < xb.nblocks; ++blk) {
    typename P::Acc acc[MB][NB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
      for (int n = 0; n < NB; ++n) acc[m][n] = P::zero();
    const int64_t o1 = std::min(noct, (blk + 1) * kBlockOctets);
    for (int64_t o = blk * kBlockOctets; o < o1; ++o)
      P::template dot_octet<MB, NB>(acc, x + o * fmt::kOctet, xb.ld, w + o * fmt::kBlockBytes, panel_bytes);
    const int64_t g = blk * kBlockK / wt.group;  // g = K: every block is in group 0
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) {
      const int64_t at = (n * groups + g) * kPanelRows;
      const PF d = pf_load(scales + at);
      const PF mn = mins ? pf_load(mins + at) : pf_mul(d, pf_set1(-8.0f));
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        const int64_t mb = (m0 + m) * xb.nblocks + blk;
        const PF scale = P::block_scale(d, xb.sx.p ? xb.sx.p[mb] : 1.0f);
        y[m][n] = pf_fma(mn, pf_set1(xb.sum.p[mb]), pf_fma(P::block_sums(acc[m][n]), scale, y[m][n]));
      }
    }
  }
}

template <class P, class ScaleT>
struct Int4Tiles {
  static constexpr int kMB = P::kMB, kNB = P::kNB;
  static constexpr int nb_for(int mb) { return P::nb_for(mb); }
  const LinearArgs& a;
  const Int4Weights& w;
  const Blocks<typename P::X>& x;

  template <int MB, int NB>
  void tile(int64_t m0, int64_t p0, float (*out)[kPanelRows]) const {
    PF y[MB][NB];
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < NB; ++n) y[m][n] = pf_zero();
    block_loop<P, ScaleT, MB, NB>(y, x, m0, w, p0, a.K);
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < NB; ++n) pf_store(out[m * kNB + n], y[m][n]);
  }
};

template <class P>
int linear(const LinearArgs& a, const Int4Weights& w, int scale_dtype) {
  if (int s = check_linear_args(a)) return s;
  if (!w.packed || !w.scales || (scale_dtype != kF32 && scale_dtype != kF16)) return kInvalidArgument;
  if (w.group <= 0 || a.K % w.group != 0 || (w.group != a.K && w.group % kBlockK != 0)) return kInvalidArgument;
  if (a.M == 0) return kOk;
  Blocks<typename P::X> xb;
  xb.nblocks = (a.K + kBlockK - 1) / kBlockK;
  xb.ld = xb.nblocks * kBlockK;
  if (int s = P::prepare(a, xb)) return s;
  if (scale_dtype == kF16)
    run_panels(a, Int4Tiles<P, uint16_t>{a, w, xb});
  else
    run_panels(a, Int4Tiles<P, float>{a, w, xb});
  return kOk;
}

int linear_w4a16(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const uint8_t* packed,
                 const void* scales, const void* mins, int scale_dtype, int64_t group, int64_t N, const void* bias,
                 int bias_dtype, void* y, int64_t ldy, int nthreads) {
  return linear<PathF32>({x, x_dtype, M, K, ldx, N, bias, bias_dtype, y, ldy, nthreads},
                         {packed, scales, mins, group}, scale_dtype);
}

int linear_w4a8(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const uint8_t* packed,
                const void* scales, const void* mins, int scale_dtype, int64_t group, int64_t N, const void* bias,
                int bias_dtype, void* y, int64_t ldy, int nthreads) {
  return linear<PathI8>({x, x_dtype, M, K, ldx, N, bias, bias_dtype, y, ldy, nthreads},
                        {packed, scales, mins, group}, scale_dtype);
}

}  // namespace

void register_int4(KernelTable& t) {
  t.int4_linear_w4a16 = linear_w4a16;
  t.int4_linear_w4a8 = linear_w4a8;
}

}  // namespace lowbit::cpu::LOWBIT_ISA

// INT8 linear layers on the CPU: W8A16 (fp32 FMA on dequantized weights), W8A8
// (per-token int8 activations, int8 dot products) and the per-token quantizer.
// Compiled once per ISA level (CMakeLists.txt); every vector instruction comes
// from simd.h, so this file is the same algorithm for scalar, AVX2 and AVX-512.
//
// Shape of the work: y[M, N] = x[M, K] . W[N, K]^T with W in the packed panel
// layout of lowbit/int8_format.h. Threads split N into tasks of a few panels;
// inside a task, an MB x NB register tile (MB rows of x, NB panels of 16 rows)
// walks K one quad at a time, so each weight quad loaded is used MB times and
// each activation quad NB times.
#include <algorithm>
#include <atomic>
#include <type_traits>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "kernels.h"
#include "lowbit/int8_format.h"
#include "simd.h"
#include "threadpool.h"

namespace lowbit::cpu::LOWBIT_ISA {
namespace {

namespace fmt = lowbit::int8_format;

constexpr int kTaskPanels = 4;     // 64 output rows per task
constexpr int64_t kRowsPerQuantTask = 16;

inline float load_elem(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kF16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case kBF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

inline void store_elem(void* p, int dtype, int64_t i, float v) {
  switch (dtype) {
    case kF16: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
    case kBF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// kW consecutive elements of any float dtype, as fp32 lanes (and back).
inline VF load_vec(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kF16: return vf_load_f16(static_cast<const uint16_t*>(p) + i);
    case kBF16: return vf_load_bf16(static_cast<const uint16_t*>(p) + i);
    default: return vf_load(static_cast<const float*>(p) + i);
  }
}

inline void store_vec(void* p, int dtype, int64_t i, VF v) {
  switch (dtype) {
    case kF16: vf_store_f16(static_cast<uint16_t*>(p) + i, v); break;
    case kBF16: vf_store_bf16(static_cast<uint16_t*>(p) + i, v); break;
    default: vf_store(static_cast<float*>(p) + i, v);
  }
}

inline size_t elem_size(int dtype) { return dtype == kF32 ? 4 : 2; }
inline bool valid_dtype(int dtype) { return dtype == kF32 || dtype == kF16 || dtype == kBF16; }

// x[0..K) of any float dtype -> out[0..K) fp32.
void row_to_f32(const void* x, int dtype, int64_t K, float* out) {
  int64_t k = 0;
  if (dtype == kF32) {
    std::memcpy(out, x, K * sizeof(float));
    return;
  }
  for (; k + kW <= K; k += kW) vf_store(out + k, load_vec(x, dtype, k));
  for (; k < K; ++k) out[k] = load_elem(x, dtype, k);
}

// Symmetric per-row quantization (formula in lowbit/int8_format.h): scale = amax / 127,
// q = round_half_even((x * pre) * (127 / (amax * pre))).
// A row holding NaN or Inf gets scale NaN (so its outputs are NaN, as torch
// would propagate) and zero codes; an all-zero row gets scale 0.
float quantize_row(const float* x, int64_t K, int8_t* q) {
  VF vmax = vf_set1(0.0f);
  bool nonfinite = false;
  int64_t k = 0;
  for (; k + kW <= K; k += kW) {
    VF v = vf_load(x + k);
    nonfinite |= vf_any_nonfinite(v);
    vmax = vf_max(vmax, vf_abs(v));
  }
  float amax = vf_hmax(vmax);
  for (int64_t t = k; t < K; ++t) {
    float a = std::fabs(x[t]);
    nonfinite |= !std::isfinite(a);
    amax = std::max(amax, a);
  }
  if (nonfinite || amax == 0.0f) {
    std::memset(q, 0, K);
    return nonfinite ? NAN : 0.0f;
  }
  const float pre = fmt::per_token_prescale(amax), inv = 127.0f / (amax * pre);
  for (k = 0; k + kW <= K; k += kW) vf_store_i8(q + k, vf_mul(vf_mul(vf_load(x + k), vf_set1(pre)), vf_set1(inv)));
  for (; k < K; ++k) q[k] = static_cast<int8_t>(std::nearbyint((x[k] * pre) * inv));
  return amax / 127.0f;
}

template <class T>
T* alloc(int64_t count) {
  size_t bytes = (static_cast<size_t>(count) * sizeof(T) + 63) / 64 * 64;
  return static_cast<T*>(std::aligned_alloc(64, bytes ? bytes : 64));
}

// Quantizes M rows of x into q (rows ldq apart, zero-padded from K to ldq).
int quantize_rows(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, int8_t* q, int64_t ldq,
                  float* scale, int nthreads) {
  std::atomic<bool> oom{false};
  int64_t tasks = (M + kRowsPerQuantTask - 1) / kRowsPerQuantTask;
  parallel_for(tasks, nthreads, [&](int64_t t) {
    float* tmp = x_dtype == kF32 ? nullptr : alloc<float>(K);  // fp16/bf16 rows go through fp32
    if (x_dtype != kF32 && !tmp) {
      oom = true;
      return;
    }
    for (int64_t m = t * kRowsPerQuantTask; m < std::min(M, (t + 1) * kRowsPerQuantTask); ++m) {
      const void* src = static_cast<const char*>(x) + m * ldx * elem_size(x_dtype);
      if (tmp) row_to_f32(src, x_dtype, K, tmp);
      scale[m] = quantize_row(tmp ? tmp : static_cast<const float*>(src), K, q + m * ldq);
      std::fill(q + m * ldq + K, q + (m + 1) * ldq, int8_t(0));
    }
    std::free(tmp);
  });
  return oom ? kOutOfMemory : kOk;
}

struct LinearArgs {
  const void* x;
  int x_dtype;
  int64_t M, K, ldx;
  const int8_t* packed;
  const float* wscale;
  int64_t N;
  const void* bias;
  int bias_dtype;
  void* y;
  int64_t ldy;
  int nthreads;
};

int check_linear(const LinearArgs& a) {
  if (!a.x || !a.packed || !a.wscale || !a.y) return kInvalidArgument;
  if (a.M < 0 || a.K <= 0 || a.N <= 0 || a.ldx < a.K || a.ldy < a.N) return kInvalidArgument;
  if (!valid_dtype(a.x_dtype) || (a.bias && !valid_dtype(a.bias_dtype))) return kInvalidArgument;
  return kOk;
}

// Activations prepared for the microkernel: rows of Kp elements (zero padded).
template <class X>
struct Prepared {
  X* xs = nullptr;
  float* sx = nullptr;  // per-row activation scale (W8A8 only)
  int64_t ld = 0;
  ~Prepared() { std::free(xs); std::free(sx); }
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
    if (!(p.xs = alloc<float>(a.M * Kp))) return kOutOfMemory;
    int64_t tasks = (a.M + kRowsPerQuantTask - 1) / kRowsPerQuantTask;
    parallel_for(tasks, a.nthreads, [&](int64_t t) {
      for (int64_t m = t * kRowsPerQuantTask; m < std::min(a.M, (t + 1) * kRowsPerQuantTask); ++m) {
        float* row = p.xs + m * Kp;
        row_to_f32(static_cast<const char*>(a.x) + m * a.ldx * elem_size(a.x_dtype), a.x_dtype, a.K, row);
        std::fill(row + a.K, row + Kp, 0.0f);
      }
    });
    return kOk;
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
    if (!(p.xs = alloc<int8_t>(a.M * Kp)) || !(p.sx = alloc<float>(a.M))) return kOutOfMemory;
    int s = quantize_rows(a.x, a.x_dtype, a.M, a.K, a.ldx, p.xs, Kp, p.sx, a.nthreads);
    offset_activations(p.xs, a.M * Kp);
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

// out[m * P::kNB + n][i] += sum over k of x[m, k] * w[panel n, row i, k]
template <class P, int MB, int NB>
void microkernel(const typename P::X* x, int64_t ldx, const int8_t* w, int64_t panel_bytes, int64_t nquads,
                 typename P::Out (*out)[16]) {
  for (int64_t q0 = 0; q0 < nquads; q0 += P::kChunkQuads) {
    typename P::Acc acc[MB][NB];
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < NB; ++n) acc[m][n] = P::zero();
    accumulate<P, MB, NB>(acc, x, ldx, w, panel_bytes, q0, std::min(nquads, q0 + P::kChunkQuads));
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < NB; ++n) P::flush(acc[m][n], out[m * P::kNB + n]);
  }
}

// Picks the microkernel instance for a (possibly partial) mb x nb tile.
template <class P, int MB = P::kMB, int NB = P::kNB>
void run_tile(int mb, int nb, const typename P::X* x, int64_t ldx, const int8_t* w, int64_t panel_bytes,
              int64_t nquads, typename P::Out (*out)[16]) {
  if constexpr (MB > 1) {
    if (mb < MB) return run_tile<P, MB - 1, NB>(mb, nb, x, ldx, w, panel_bytes, nquads, out);
  }
  if constexpr (NB > 1) {
    if (nb < NB) return run_tile<P, MB, NB - 1>(mb, nb, x, ldx, w, panel_bytes, nquads, out);
  }
  microkernel<P, MB, NB>(x, ldx, w, panel_bytes, nquads, out);
}

// One row of one panel: y[col0 + i] = (sum[i] - offset) * sx * wscale + bias, cast to y's dtype.
// `rowsum` points at the panel's row-sum quad (the u8-activation offset: 128 * rowsum).
template <class P>
void epilogue(const LinearArgs& a, const typename P::Out* sum, const int8_t* rowsum, float sx, int64_t col0,
              void* yrow) {
  alignas(64) float acc[16];
  if constexpr (std::is_same_v<typename P::Out, int64_t>) {
    int32_t rs[16];
    std::memcpy(rs, rowsum, sizeof rs);
    for (int i = 0; i < 16; ++i) acc[i] = static_cast<float>(sum[i] - (kU8Activations ? 128 * int64_t(rs[i]) : 0));
  } else {
    std::memcpy(acc, sum, sizeof acc);
  }
  if (col0 + 16 <= a.N) {
    for (int i = 0; i < 16; i += kW) {
      VF v = vf_mul(vf_mul(vf_load(acc + i), vf_set1(sx)), vf_load(a.wscale + col0 + i));
      if (a.bias) v = vf_add(v, load_vec(a.bias, a.bias_dtype, col0 + i));
      store_vec(yrow, a.x_dtype, col0 + i, v);
    }
    return;
  }
  for (int i = 0; col0 + i < a.N; ++i) {  // the last, partial panel
    float v = acc[i] * sx * a.wscale[col0 + i];
    if (a.bias) v += load_elem(a.bias, a.bias_dtype, col0 + i);
    store_elem(yrow, a.x_dtype, col0 + i, v);
  }
}

template <class P>
int linear(const LinearArgs& a) {
  if (int s = check_linear(a)) return s;
  if (a.M == 0) return kOk;
  const int64_t Kp = fmt::round_up(a.K, fmt::kQuad), nquads = fmt::quads(a.K);
  const int64_t panel_bytes = fmt::panel_bytes(a.K), npanels = fmt::panels(a.N);
  Prepared<typename P::X> prep;
  if (int s = P::prepare(a, Kp, prep)) return s;

  const size_t ysize = elem_size(a.x_dtype);
  int64_t tasks = (npanels + kTaskPanels - 1) / kTaskPanels;
  parallel_for(tasks, a.nthreads, [&](int64_t t) {
    const int64_t p_end = std::min(npanels, (t + 1) * kTaskPanels);
    for (int64_t m0 = 0; m0 < a.M; m0 += P::kMB) {
      const int mb = static_cast<int>(std::min<int64_t>(P::kMB, a.M - m0));
      const int nb_step = P::nb_for(mb);
      for (int64_t p0 = t * kTaskPanels; p0 < p_end; p0 += nb_step) {
        const int nb = static_cast<int>(std::min<int64_t>(nb_step, p_end - p0));
        typename P::Out out[P::kMB * P::kNB][16] = {};
        const int8_t* w = a.packed + p0 * panel_bytes;
        run_tile<P>(mb, nb, prep.xs + m0 * prep.ld, prep.ld, w, panel_bytes, nquads, out);
        for (int n = 0; n < nb; ++n)
          for (int m = 0; m < mb; ++m)
            epilogue<P>(a, out[m * P::kNB + n], w + n * panel_bytes + nquads * fmt::kQuadBytes,
                        prep.sx ? prep.sx[m0 + m] : 1.0f, (p0 + n) * fmt::kPanelRows,
                        static_cast<char*>(a.y) + (m0 + m) * a.ldy * ysize);
      }
    }
  });
  return kOk;
}

int linear_w8a16(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const int8_t* packed,
                 const float* wscale, int64_t N, const void* bias, int bias_dtype, void* y, int64_t ldy,
                 int nthreads) {
  return linear<PathF32>({x, x_dtype, M, K, ldx, packed, wscale, N, bias, bias_dtype, y, ldy, nthreads});
}

int linear_w8a8(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const int8_t* packed,
                const float* wscale, int64_t N, const void* bias, int bias_dtype, void* y, int64_t ldy,
                int nthreads) {
  return linear<PathI8>({x, x_dtype, M, K, ldx, packed, wscale, N, bias, bias_dtype, y, ldy, nthreads});
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

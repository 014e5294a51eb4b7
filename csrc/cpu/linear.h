// What the quantized linear layers of every family share (int8.cpp, int4.cpp):
// float row helpers, the per-token int8 quantizer, and the driver that cuts
// y[M, N] = x[M, K] . W^T into threads (tasks of a few 16-row panels) and
// register tiles (MB rows of x by NB panels), picks the tile instance for the
// ragged edges, and stores the results with the bias in y's dtype.
// Included by the per-ISA copies only; everything lives in lowbit::cpu::LOWBIT_ISA.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "lowbit/int8_format.h"
#include "simd.h"
#include "threadpool.h"

namespace lowbit::cpu::LOWBIT_ISA {

constexpr int kPanelRows = 16;     // every CPU weight layout groups output rows by 16
constexpr int kTaskPanels = 4;     // 64 output rows per thread task
constexpr int64_t kRowsPerPrepTask = 16;

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
inline void row_to_f32(const void* x, int dtype, int64_t K, float* out) {
  int64_t k = 0;
  if (dtype == kF32) {
    std::memcpy(out, x, K * sizeof(float));
    return;
  }
  for (; k + kW <= K; k += kW) vf_store(out + k, load_vec(x, dtype, k));
  for (; k < K; ++k) out[k] = load_elem(x, dtype, k);
}

// Symmetric int8 quantization of x[0..K) (formula in lowbit/int8_format.h): scale = amax / 127,
// q = round_half_even((x * pre) * (127 / (amax * pre))). Values holding NaN or Inf get
// scale NaN (so their outputs are NaN, as torch would propagate) and zero codes; all
// zeros get scale 0. Used per token (W8A8) and per block of 32 (W4A8).
inline float quantize_row(const float* x, int64_t K, int8_t* q) {
  if (K <= 0) return 0.0f;
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
    std::fill(q, q + K, int8_t(0));
    return nonfinite ? NAN : 0.0f;
  }
  const float pre = int8_format::per_token_prescale(amax), inv = 127.0f / (amax * pre);
  for (k = 0; k + kW <= K; k += kW) vf_store_i8(q + k, vf_mul(vf_mul(vf_load(x + k), vf_set1(pre)), vf_set1(inv)));
  for (; k < K; ++k) q[k] = static_cast<int8_t>(std::nearbyint((x[k] * pre) * inv));
  return amax / 127.0f;
}

template <class T>
T* alloc(int64_t count) {
  size_t bytes = (static_cast<size_t>(count) * sizeof(T) + 63) / 64 * 64;
  return static_cast<T*>(std::aligned_alloc(64, bytes ? bytes : 64));
}

// A heap buffer freed on scope exit.
template <class T>
struct Buffer {
  T* p = nullptr;
  bool allocate(int64_t count) { return (p = alloc<T>(count)) != nullptr; }
  ~Buffer() { std::free(p); }
};

// Runs row_fn(m, fp32 row of x) for every row of x, threaded. fp16 / bf16 rows are
// converted into a per-task fp32 scratch row first. Returns kOutOfMemory if that fails.
template <class F>
int for_each_row_f32(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, int nthreads, F&& row_fn) {
  std::atomic<bool> oom{false};
  int64_t tasks = (M + kRowsPerPrepTask - 1) / kRowsPerPrepTask;
  parallel_for(tasks, nthreads, [&](int64_t t) {
    Buffer<float> tmp;
    if (x_dtype != kF32 && !tmp.allocate(K)) {
      oom = true;
      return;
    }
    for (int64_t m = t * kRowsPerPrepTask; m < std::min(M, (t + 1) * kRowsPerPrepTask); ++m) {
      const void* src = static_cast<const char*>(x) + m * ldx * elem_size(x_dtype);
      if (tmp.p) row_to_f32(src, x_dtype, K, tmp.p);
      row_fn(m, tmp.p ? tmp.p : static_cast<const float*>(src));
    }
  });
  return oom ? kOutOfMemory : kOk;
}

// The arguments every linear kernel takes besides its weights. x: [M, K] rows ldx elements
// apart; y: [M, N] rows ldy apart, both of dtype x_dtype; bias: [N] of bias_dtype or null.
struct LinearArgs {
  const void* x;
  int x_dtype;
  int64_t M, K, ldx;
  int64_t N;
  const void* bias;
  int bias_dtype;
  void* y;
  int64_t ldy;
  int nthreads;
};

inline int check_linear_args(const LinearArgs& a) {
  if (!a.x || !a.y) return kInvalidArgument;
  if (a.M < 0 || a.K <= 0 || a.N <= 0 || a.ldx < a.K || a.ldy < a.N) return kInvalidArgument;
  if (!valid_dtype(a.x_dtype) || (a.bias && !valid_dtype(a.bias_dtype))) return kInvalidArgument;
  return kOk;
}

// Columns of output panel p that exist (16, or fewer in the last panel).
inline int panel_cols(const LinearArgs& a, int64_t p) {
  return static_cast<int>(std::min<int64_t>(kPanelRows, a.N - p * kPanelRows));
}

// yrow[col0 + i] = acc[i] + bias[col0 + i] in y's dtype, for the `cols` columns of a panel.
inline void store_panel_row(const LinearArgs& a, const float* acc, int64_t col0, int cols, void* yrow) {
  if (cols == kPanelRows) {
    for (int i = 0; i < kPanelRows; i += kW) {
      VF v = vf_load(acc + i);
      if (a.bias) v = vf_add(v, load_vec(a.bias, a.bias_dtype, col0 + i));
      store_vec(yrow, a.x_dtype, col0 + i, v);
    }
    return;
  }
  for (int i = 0; i < cols; ++i) {
    float v = acc[i];
    if (a.bias) v += load_elem(a.bias, a.bias_dtype, col0 + i);
    store_elem(yrow, a.x_dtype, col0 + i, v);
  }
}

// Picks the tile instance for a (possibly partial) mb x nb tile: T::tile<MB, NB> writes
// out[m * T::kNB + n][0..16) = the fp32 results (before bias) of row m0 + m, panel p0 + n.
template <class T, int MB = T::kMB, int NB = T::kNB>
void run_tile(const T& t, int mb, int nb, int64_t m0, int64_t p0, float (*out)[kPanelRows]) {
  if constexpr (MB > 1) {
    if (mb < MB) return run_tile<T, MB - 1, NB>(t, mb, nb, m0, p0, out);
  }
  if constexpr (NB > 1) {
    if (nb < NB) return run_tile<T, MB, NB - 1>(t, mb, nb, m0, p0, out);
  }
  t.template tile<MB, NB>(m0, p0, out);
}

// The driver: threads take tasks of kTaskPanels panels; inside a task the rows of x go
// by T::kMB and the panels by T::nb_for(mb) <= T::kNB (decode-sized tiles may span more panels).
template <class T>
void run_panels(const LinearArgs& a, const T& t) {
  const int64_t npanels = (a.N + kPanelRows - 1) / kPanelRows;
  const size_t ysize = elem_size(a.x_dtype);
  int64_t tasks = (npanels + kTaskPanels - 1) / kTaskPanels;
  parallel_for(tasks, a.nthreads, [&](int64_t task) {
    const int64_t p_end = std::min(npanels, (task + 1) * kTaskPanels);
    for (int64_t m0 = 0; m0 < a.M; m0 += T::kMB) {
      const int mb = static_cast<int>(std::min<int64_t>(T::kMB, a.M - m0));
      const int nb_step = T::nb_for(mb);
      for (int64_t p0 = task * kTaskPanels; p0 < p_end; p0 += nb_step) {
        const int nb = static_cast<int>(std::min<int64_t>(nb_step, p_end - p0));
        alignas(64) float out[T::kMB * T::kNB][kPanelRows];
        run_tile(t, mb, nb, m0, p0, out);
        for (int n = 0; n < nb; ++n)
          for (int m = 0; m < mb; ++m)
            store_panel_row(a, out[m * T::kNB + n], (p0 + n) * kPanelRows, panel_cols(a, p0 + n),
                            static_cast<char*>(a.y) + (m0 + m) * a.ldy * ysize);
      }
    }
  });
}

}  // namespace lowbit::cpu::LOWBIT_ISA

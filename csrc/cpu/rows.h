// Row helpers every CPU op family shares: fp32 / fp16 / bf16 element and vector
// access, row conversion to fp32, symmetric int8 row quantization, aligned buffers,
// and a threaded loop over the rows of an activation matrix.
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

// in[0..K) fp32 -> out[0..K) of any float dtype (rounded to nearest even).
inline void row_from_f32(const float* in, int dtype, int64_t K, void* out) {
  int64_t k = 0;
  for (; k + kW <= K; k += kW) store_vec(out, dtype, k, vf_load(in + k));
  for (; k < K; ++k) store_elem(out, dtype, k, in[k]);
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

}  // namespace lowbit::cpu::LOWBIT_ISA

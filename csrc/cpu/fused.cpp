// The row ops a decoder layer runs between its matmuls, each one native call so a
// decode step does not pay several small torch ops (and their dispatch) per layer:
//   rms_norm      out = s * rsqrt(mean(s^2) + eps) * w,  s = x (+ residual, also stored)
//   silu_and_mul  out = silu(x[:, :F]) * x[:, F:]        (SwiGLU's gate and up, fused)
//   rope          rotates the first 2R dims of every head in place by angles cos / sin [T, R]
// All arithmetic is fp32 whatever the storage dtype; rows are contiguous.
#include "kernels.h"
#include "rows.h"

namespace lowbit::cpu::LOWBIT_ISA {
namespace {

constexpr int64_t kRowsPerTask = 8;

template <class F>
void rows_parallel(int64_t M, int nthreads, F&& f) {
  int64_t tasks = (M + kRowsPerTask - 1) / kRowsPerTask;
  parallel_for(tasks, tasks > 1 ? nthreads : 1, [&](int64_t t) {
    for (int64_t m = t * kRowsPerTask; m < std::min(M, (t + 1) * kRowsPerTask); ++m) f(m);
  });
}

int rms_norm(const void* x, const void* residual, const void* weight, int w_dtype, void* out, void* sum_out,
             int dtype, int64_t M, int64_t K, float eps, int nthreads) {
  if (!x || !weight || !out || (residual && !sum_out) || !valid_dtype(dtype) || !valid_dtype(w_dtype) || M < 0 ||
      K <= 0)
    return kInvalidArgument;
  std::atomic<bool> oom{false};
  const size_t es = elem_size(dtype);
  rows_parallel(M, nthreads, [&](int64_t m) {
    Buffer<float> s;
    if (!s.allocate(K)) {
      oom = true;
      return;
    }
    const int64_t off = m * K;
    row_to_f32(static_cast<const char*>(x) + off * es, dtype, K, s.p);
    int64_t k = 0;
    if (residual) {
      const void* r = static_cast<const char*>(residual) + off * es;
      for (; k + kW <= K; k += kW) vf_store(s.p + k, vf_add(vf_load(s.p + k), load_vec(r, dtype, k)));
      for (; k < K; ++k) s.p[k] += load_elem(r, dtype, k);
      row_from_f32(s.p, dtype, K, static_cast<char*>(sum_out) + off * es);
    }
    VF acc = vf_set1(0.0f);
    float tail = 0.0f;
    for (k = 0; k + kW <= K; k += kW) acc = vf_fma(vf_load(s.p + k), vf_load(s.p + k), acc);
    for (; k < K; ++k) tail += s.p[k] * s.p[k];
    const float inv = 1.0f / std::sqrt((vf_hsum(acc) + tail) / static_cast<float>(K) + eps);
    const VF vinv = vf_set1(inv);
    for (k = 0; k + kW <= K; k += kW) vf_store(s.p + k, vf_mul(vf_mul(vf_load(s.p + k), vinv), load_vec(weight, w_dtype, k)));
    for (; k < K; ++k) s.p[k] = s.p[k] * inv * load_elem(weight, w_dtype, k);
    row_from_f32(s.p, dtype, K, static_cast<char*>(out) + off * es);
  });
  return oom ? kOutOfMemory : kOk;
}

inline float silu(float g) { return g / (1.0f + std::exp(-std::max(g, -88.0f))); }

int silu_and_mul(const void* x, void* out, int dtype, int64_t M, int64_t F, int nthreads) {
  if (!x || !out || !valid_dtype(dtype) || M < 0 || F <= 0) return kInvalidArgument;
  const size_t es = elem_size(dtype);
  rows_parallel(M, nthreads, [&](int64_t m) {
    const char* g = static_cast<const char*>(x) + m * 2 * F * es;
    const char* u = g + F * es;
    char* o = static_cast<char*>(out) + m * F * es;
    int64_t k = 0;
    for (; k + kW <= F; k += kW) {
      const VF gv = load_vec(g, dtype, k);
      // silu(g) = g / (1 + exp(-g)), with g clamped at -88 inside exp so that it stays finite
      // (silu(-88) ~ -1e-36: zero for every purpose); NaN passes through vf_max
      const VF e = vf_exp(vf_sub(vf_set1(0.0f), vf_max(vf_set1(-88.0f), gv)));
      store_vec(o, dtype, k, vf_mul(vf_div(gv, vf_add(vf_set1(1.0f), e)), load_vec(u, dtype, k)));
    }
    for (; k < F; ++k) store_elem(o, dtype, k, silu(load_elem(g, dtype, k)) * load_elem(u, dtype, k));
  });
  return kOk;
}

int rope(void* x, int dtype, int64_t T, int64_t H, int64_t ld_t, int64_t ld_h, const float* cos, const float* sin,
         int64_t R, int neox, int nthreads) {
  if (!x || !cos || !sin || !valid_dtype(dtype) || T < 0 || H <= 0 || R <= 0) return kInvalidArgument;
  const size_t es = elem_size(dtype);
  rows_parallel(T, nthreads, [&](int64_t t) {
    const float* c = cos + t * R;
    const float* s = sin + t * R;
    for (int64_t h = 0; h < H; ++h) {
      char* row = static_cast<char*>(x) + (t * ld_t + h * ld_h) * es;
      // pair i is (i, i + R) for NeoX, (2i, 2i + 1) otherwise
      const int64_t stride = neox ? 1 : 2, other = neox ? R : 1;
      for (int64_t i = 0; i < R; ++i) {
        const int64_t ia = i * stride, ib = ia + other;
        const float a = load_elem(row, dtype, ia), b = load_elem(row, dtype, ib);
        store_elem(row, dtype, ia, a * c[i] - b * s[i]);
        store_elem(row, dtype, ib, a * s[i] + b * c[i]);
      }
    }
  });
  return kOk;
}

}  // namespace

void register_fused(KernelTable& t) {
  t.rms_norm = rms_norm;
  t.silu_and_mul = silu_and_mul;
  t.rope = rope;
}

}  // namespace lowbit::cpu::LOWBIT_ISA

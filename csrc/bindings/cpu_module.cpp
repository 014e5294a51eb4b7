// lowbit._C: the CPU kernels. Thin on purpose: pointers arrive as integers
// (tensor.data_ptr()), every kernel runs with the GIL released, and errors come
// back as lowbit::Status codes that python/lowbit/_native.py turns into exceptions.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

#include "kernels.h"
#include "lowbit/status.h"
#include "raw_args.h"

namespace py = pybind11;
using namespace lowbit;
using namespace lowbit::bindings;
using lowbit::cpu::kernels;
using lowbit::cpu::KernelTable;

namespace {

int int8_quantize_per_token(uintptr_t x, int x_dtype, int64_t M, int64_t K, int64_t ldx, uintptr_t q,
                            uintptr_t scale, int nthreads) {
  return kernels().int8_quantize_per_token(ptr<const void>(x), x_dtype, M, K, ldx, ptr<int8_t>(q),
                                           ptr<float>(scale), nthreads);
}

// Both linear variants share one signature; the table slot is the only difference.
template <auto KernelTable::*slot>
int int8_linear(uintptr_t x, int x_dtype, int64_t M, int64_t K, int64_t ldx, uintptr_t packed, uintptr_t wscale,
                int64_t N, uintptr_t bias, int bias_dtype, uintptr_t y, int64_t ldy, int nthreads) {
  return (kernels().*slot)(ptr<const void>(x), x_dtype, M, K, ldx, ptr<const int8_t>(packed),
                           ptr<const float>(wscale), N, ptr<const void>(bias), bias_dtype, ptr<void>(y), ldy,
                           nthreads);
}

template <auto KernelTable::*slot>
int int4_linear(uintptr_t x, int x_dtype, int64_t M, int64_t K, int64_t ldx, uintptr_t packed, uintptr_t scales,
                uintptr_t mins, int scale_dtype, int64_t group, int64_t N, uintptr_t bias, int bias_dtype, uintptr_t y,
                int64_t ldy, int nthreads) {
  return (kernels().*slot)(ptr<const void>(x), x_dtype, M, K, ldx, ptr<const uint8_t>(packed),
                           ptr<const void>(scales), ptr<const void>(mins), scale_dtype, group, N,
                           ptr<const void>(bias), bias_dtype, ptr<void>(y), ldy, nthreads);
}

// Arguments in AttentionParams' order; pointers as integers (0 = null).
int attention(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, int dtype, int kv_dtype, int64_t B, int64_t Hq,
              int64_t Hkv, int64_t L, int64_t S, int64_t D, int64_t Dv, Strides3 qs, Strides3 ks, Strides3 vs,
              Strides3 os, uintptr_t q_start, uintptr_t seq_lens, uintptr_t block_table, int64_t max_blocks,
              int64_t block_size, uintptr_t k_scale, uintptr_t v_scale, uintptr_t mask, int mask_dtype,
              Strides4 ms, float scale, int causal, int bottom_right, int64_t window_left,
              int64_t window_right, int nthreads) {
  cpu::AttentionParams p{ptr<const void>(q), ptr<const void>(k), ptr<const void>(v), ptr<void>(out), dtype,
                         kv_dtype, B, Hq, Hkv, L, S, D, Dv, {}, {}, {}, {}, ptr<const int32_t>(q_start),
                         ptr<const int32_t>(seq_lens), ptr<const int32_t>(block_table), max_blocks, block_size,
                         ptr<const float>(k_scale), ptr<const float>(v_scale), ptr<const void>(mask), mask_dtype,
                         {}, scale, causal, bottom_right, window_left, window_right, nthreads};
  set_attention_strides(p, qs, ks, vs, os, ms);
  return kernels().attention(p);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lowbit CPU kernels (raw-pointer API; use lowbit.ops, not this module)";

  m.def("best_isa", [] { return cpu::isa_name(cpu::best_supported_isa()); });
  m.def("selected_isa", [] { return cpu::isa_name(cpu::selected_isa()); });
  m.def("isa_levels", [] {
    py::list l;
    for (int i = 0; i < cpu::kIsaCount; ++i) l.append(cpu::isa_name(cpu::Isa(i)));
    return l;
  });
  m.def("select_isa", [](const std::string& name) {
    for (int i = 0; i < cpu::kIsaCount; ++i)
      if (name == cpu::isa_name(cpu::Isa(i))) return cpu::select_isa(cpu::Isa(i));
    return int(kInvalidArgument);
  });

  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("int8_quantize_per_token", &int8_quantize_per_token, nogil);
  m.def("int8_linear_w8a16", &int8_linear<&KernelTable::int8_linear_w8a16>, nogil);
  m.def("int8_linear_w8a8", &int8_linear<&KernelTable::int8_linear_w8a8>, nogil);
  m.def("int4_linear_w4a16", &int4_linear<&KernelTable::int4_linear_w4a16>, nogil);
  m.def("int4_linear_w4a8", &int4_linear<&KernelTable::int4_linear_w4a8>, nogil);
  m.def("attention", &attention, nogil);
  m.def("kv_cache_write", [](uintptr_t src, int src_dtype, int64_t T, int64_t H, int64_t D, int64_t ld_t,
                             int64_t ld_h, uintptr_t slots, uintptr_t cache, int cache_dtype, uintptr_t scales,
                             int nthreads) {
    return kernels().kv_cache_write(ptr<const void>(src), src_dtype, T, H, D, ld_t, ld_h, ptr<const int64_t>(slots),
                                    ptr<void>(cache), cache_dtype, ptr<float>(scales), nthreads);
  }, nogil);
  m.def("rms_norm", [](uintptr_t x, uintptr_t residual, uintptr_t weight, int w_dtype, uintptr_t out,
                       uintptr_t sum_out, int dtype, int64_t M, int64_t K, float eps, int nthreads) {
    return kernels().rms_norm(ptr<const void>(x), ptr<const void>(residual), ptr<const void>(weight), w_dtype,
                              ptr<void>(out), ptr<void>(sum_out), dtype, M, K, eps, nthreads);
  }, nogil);
  m.def("silu_and_mul", [](uintptr_t x, uintptr_t out, int dtype, int64_t M, int64_t F, int nthreads) {
    return kernels().silu_and_mul(ptr<const void>(x), ptr<void>(out), dtype, M, F, nthreads);
  }, nogil);
  m.def("rope", [](uintptr_t x, int dtype, int64_t T, int64_t H, int64_t ld_t, int64_t ld_h, uintptr_t cos,
                   uintptr_t sin, int64_t R, int neox, int nthreads) {
    return kernels().rope(ptr<void>(x), dtype, T, H, ld_t, ld_h, ptr<const float>(cos), ptr<const float>(sin), R,
                          neox, nthreads);
  }, nogil);
}

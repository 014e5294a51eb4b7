// Host entry points of the CUDA INT8 kernels (csrc/cuda/int8.cu), in plain C++
// so that csrc/bindings/cuda_module.cpp (built by the host compiler) needs no
// CUDA types: the stream travels as void* (a cudaStream_t; nullptr = legacy
// default stream). Every entry point returns a lowbit::Status and never aborts.
//
// Shapes (elements, row-major):
//   x        [M, K]  rows ldx apart, dtype x_dtype (lowbit::DType)
//   qweight  int8 [N, K] contiguous (canonical layout, lowbit/int8_format.h)
//   wscale   fp32 [N]
//   bias     [N] of bias_dtype, or nullptr
//   y        [M, N]  rows ldy apart, dtype x_dtype
//   q        int8 [M, K] contiguous;  scale fp32 [M]
//   qx, sx   W8A8 scratch: int8 [M, K] contiguous and fp32 [M]
// The launchers run on the caller's current device; the bindings select it.
#pragma once
#include <cstdint>

#include "common.h"

namespace lowbit::cuda {

// Argument checks, shared by the bindings (which run them before touching the
// device, so a bad call never needs a GPU) and the launchers.
inline int check_quantize_args(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const void* q,
                               const void* scale) {
  if (M < 0 || K < 1 || ldx < K || !valid_dtype_code(x_dtype)) return kInvalidArgument;
  if (M > 0 && (!x || !q || !scale)) return kInvalidArgument;
  return kOk;
}

inline int check_linear_args(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const void* qweight,
                             const void* wscale, int64_t N, const void* bias, int bias_dtype, const void* y,
                             int64_t ldy) {
  if (M < 0 || K < 1 || N < 1 || ldx < K || ldy < N) return kInvalidArgument;
  if (!valid_dtype_code(x_dtype) || (bias && !valid_dtype_code(bias_dtype))) return kInvalidArgument;
  if (M > 0 && (!x || !qweight || !wscale || !y)) return kInvalidArgument;
  return kOk;
}

int int8_quantize_per_token(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, int8_t* q, float* scale,
                            void* stream);

// W8A16 runs on the tensor cores (woq_mma.cuh, split K like W4A16) for fp16 / bf16 x and
// K % 16 == 0: int8_w8a16_plan gives its K splits and counters (1 and 0 where it does not
// apply; device as in int4_w4a16_plan); with splits > 1, partial is fp32 [splits, M,
// roundup(N, 16)] and counters int32 [count], zero before the call and left zero after it.
void int8_w8a16_plan(int64_t M, int64_t K, int64_t N, int x_dtype, int sm_count, int device, int* splits,
                     int64_t* counters);

int int8_linear_w8a16(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const int8_t* qweight,
                      const float* wscale, int64_t N, const void* bias, int bias_dtype, void* y, int64_t ldy,
                      int splits, float* partial, int* counters, void* stream);

// w [N, K] (row-major, w_dtype) = qweight * wscale per row: the dense weight that large-M
// W8A16 multiplies on cuBLAS.
int int8_dequantize_w8a16(const int8_t* qweight, const float* wscale, int64_t N, int64_t K, void* w, int w_dtype,
                          void* stream);

int int8_linear_w8a8(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const int8_t* qweight,
                     const float* wscale, int64_t N, const void* bias, int bias_dtype, void* y, int64_t ldy,
                     int8_t* qx, float* sx, void* stream);

}  // namespace lowbit::cuda

// Host entry points of the CUDA INT4 kernels (csrc/cuda/int4.cu), plain C++ like
// int8.h. Every entry point returns a lowbit::Status and never aborts.
//
// W4A16 on tensor cores: y[M, N] = x[M, K] . W^T + bias, W = d * q + m per group of
// g = K / groups consecutive k (symmetric weights carry m = -8 d), x and y fp16 or
// bf16. Weights in the CUDA layout of lowbit.formats.int4.pack_cuda:
//   qweight  uint32 [Np/16, Kp/64, 32, 4]   Np = roundup(N, 16), Kp = roundup(K, 64)
//   scales   [groups, Np, 2]                (d, m) pairs, fp16 or fp32 (scales_dtype)
// Large-N-small-M shapes split K across blocks (`splits`, from int4_w4a16_plan):
// partial fp32 [splits, M, Np] holds the per-split sums and counters int32 [n_counters]
// (zero before the call, and left zero after it) elects the block that adds them up.
#pragma once
#include <cstdint>

#include "common.h"

namespace lowbit::cuda {

// The kernels' 32-bit offsets: K up to kW4a16MaxK (a lane's k), groups x Np below 2^31 (the
// scale table's index); lowbit.ops.int4 raises on anything larger before calling.
constexpr int64_t kW4a16MaxK = 2147483647 - 64;

// Packed weights for K inputs and N outputs the kernels can take: groups of a power of two
// >= 16 (a lane's 16 consecutive k share one group; the ops allow 32, 64, 128) or K, fp16 or
// fp32 (d, m) pairs, qweight 16-byte and scales pair aligned (the ring copies whole words and
// pairs), offsets within 32 bits. (Pointers are only checked for alignment: null passes.)
inline int check_w4a16_weights(int64_t K, int64_t N, const void* qweight, const void* scales, int scales_dtype,
                               int64_t groups) {
  if (K < 1 || K > kW4a16MaxK || N < 1 || groups < 1 || K % groups != 0) return kInvalidArgument;
  const int64_t g = K / groups;
  if (groups > 1 && (g < 16 || (g & (g - 1)) != 0)) return kInvalidArgument;
  if (scales_dtype != kF16 && scales_dtype != kF32) return kInvalidArgument;
  const uintptr_t pair_bytes = scales_dtype == kF16 ? 4 : 8;
  if (reinterpret_cast<uintptr_t>(qweight) % 16 != 0 || reinterpret_cast<uintptr_t>(scales) % pair_bytes != 0)
    return kInvalidArgument;
  if (groups * ((N + 15) / 16 * 16) >= (int64_t(1) << 31)) return kInvalidArgument;
  return kOk;
}

inline int check_w4a16_args(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const void* qweight,
                            const void* scales, int scales_dtype, int64_t groups, int64_t N, const void* bias,
                            int bias_dtype, const void* y, int64_t ldy, int splits) {
  if (int st = check_w4a16_weights(K, N, qweight, scales, scales_dtype, groups)) return st;
  if (M < 0 || ldx < K || ldy < N || (x_dtype != kF16 && x_dtype != kBF16)) return kInvalidArgument;
  if (bias && !valid_dtype_code(bias_dtype)) return kInvalidArgument;
  if (splits < 1) return kInvalidArgument;
  if (M > 0 && (!x || !qweight || !scales || !y)) return kInvalidArgument;
  return kOk;
}

// How to run an [M, K] x [N, K]^T W4A16 product (x_dtype activations, scales_dtype scales) on
// a GPU with sm_count SMs: the number of K splits and of int32 counters the call needs (0 when
// splits == 1). device >= 0: the current device, whose shared memory may hold fewer resident
// blocks than the kernel's launch bound; device < 0: planned for the launch bound.
void int4_w4a16_plan(int64_t M, int64_t K, int64_t N, int x_dtype, int scales_dtype, int sm_count, int device,
                     int* splits, int64_t* counters);

int int4_linear_w4a16(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const uint32_t* qweight,
                      const void* scales, int scales_dtype, int64_t groups, int64_t N, const void* bias,
                      int bias_dtype, void* y, int64_t ldy, int splits, float* partial, int* counters, void* stream);

// The weights dequantized as int4_linear_w4a16 dequantizes them: w [N, K] row-major in
// w_dtype (fp16 / bf16), for large M (one GEMM on the dense weight). qweight and w 16-byte
// aligned, N <= 65535 * 16.
int int4_dequantize_w4a16(const uint32_t* qweight, const void* scales, int scales_dtype, int64_t groups, int64_t N,
                          int64_t K, void* w, int w_dtype, void* stream);

}  // namespace lowbit::cuda

// Host entry point of the CUDA KV-cache write (csrc/cuda/kv_cache.cu), plain C++ for
// the bindings: lowbit._C's kv_cache_write on the device.
//   src    [T, H, D] (token stride ld_t, head stride ld_h, unit inner stride), src_dtype
//   slots  int64 [T]: cache row of each token; -1 = skip; rows outside [0, num_slots) are
//          skipped too (so the kernel never writes outside the cache)
//   cache  [num_slots, H, D] of cache_dtype (a float dtype or kI8, then scales fp32
//          [num_slots, H]: per token and head, the rule of lowbit.ref.int8)
#pragma once
#include <cstdint>

#include "common.h"

namespace lowbit::cuda {

inline int check_kv_cache_write_args(const void* src, int src_dtype, int64_t T, int64_t H, int64_t D,
                                     const void* slots, const void* cache, int cache_dtype, const void* scales,
                                     int64_t num_slots) {
  if (T < 0 || H < 1 || D < 1 || num_slots < 1 || !valid_dtype_code(src_dtype)) return kInvalidArgument;
  if (cache_dtype != kI8 && !valid_dtype_code(cache_dtype)) return kInvalidArgument;
  if ((cache_dtype == kI8) != (scales != nullptr)) return kInvalidArgument;
  if (T > 0 && (!src || !slots || !cache)) return kInvalidArgument;
  return kOk;
}

int kv_cache_write(const void* src, int src_dtype, int64_t T, int64_t H, int64_t D, int64_t ld_t, int64_t ld_h,
                   const int64_t* slots, void* cache, int cache_dtype, float* scales, int64_t num_slots,
                   void* stream);

}  // namespace lowbit::cuda

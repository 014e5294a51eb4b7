// The KV-cache write on CUDA: one warp per (token, head) row copies it into its slot,
// converting to the cache's dtype, or quantizing it per row (INT8 caches) with the
// arithmetic of the CUDA per-token quantizer (int8.cu), which is lowbit.ref.int8's rule:
// the same codes and scales as the CPU kernel. Memory-bound and tiny next to attention.
#include <cuda_runtime.h>

#include <cstdint>

#include "kv_cache.h"
#include "lowbit/cuda_common.cuh"
#include "lowbit/int8_format.h"

namespace lowbit::cuda {
namespace {

constexpr int kWarps = 4;

__global__ void __launch_bounds__(kWarps * 32)
    kv_cache_write_kernel(const void* __restrict__ src, int src_dtype, int64_t T, int64_t H, int64_t D, int64_t ld_t,
                          int64_t ld_h, const int64_t* __restrict__ slots, void* __restrict__ cache, int cache_dtype,
                          float* __restrict__ scales, int64_t num_slots) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= T * H) return;
  const int64_t t = row / H, h = row % H;
  const int64_t slot = slots[t];
  if (slot < 0 || slot >= num_slots) return;  // -1: padding; the ops layer refuses the rest
  const int64_t from = t * ld_t + h * ld_h, to = (slot * H + h) * D;
  if (cache_dtype != kI8) {
    for (int64_t d = lane; d < D; d += 32) store_f32(cache, cache_dtype, to + d, load_f32(src, src_dtype, from + d));
    return;
  }
  float amax = 0.0f;
  int bad = 0;
  for (int64_t d = lane; d < D; d += 32) {
    const float v = load_f32(src, src_dtype, from + d);
    bad |= !isfinite(v);
    amax = fmaxf(amax, fabsf(v));
  }
  amax = warp_max(amax);
  bad = __any_sync(0xffffffffu, bad);
  const float pre = int8_format::per_token_prescale(amax);
  const float inv = (bad || amax == 0.0f) ? 0.0f : per_token_inv(amax, pre);
  int8_t* q = static_cast<int8_t*>(cache) + to;
  for (int64_t d = lane; d < D; d += 32) {
    int c = 0;
    if (!bad) {
      c = __float2int_rn(__fmul_rn(__fmul_rn(load_f32(src, src_dtype, from + d), pre), inv));  // half to even
      c = min(127, max(-127, c));
    }
    q[d] = int8_t(c);
  }
  if (lane == 0) scales[slot * H + h] = bad ? __int_as_float(0x7fc00000) : per_token_scale(amax);
}

}  // namespace

int kv_cache_write(const void* src, int src_dtype, int64_t T, int64_t H, int64_t D, int64_t ld_t, int64_t ld_h,
                   const int64_t* slots, void* cache, int cache_dtype, float* scales, int64_t num_slots,
                   void* stream) {
  if (int st = check_kv_cache_write_args(src, src_dtype, T, H, D, slots, cache, cache_dtype, scales, num_slots))
    return st;
  if (T == 0) return kOk;
  const int64_t blocks = (T * H + kWarps - 1) / kWarps;
  if (blocks > 2147483647LL) return kInvalidArgument;
  kv_cache_write_kernel<<<unsigned(blocks), kWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(
      src, src_dtype, T, H, D, ld_t, ld_h, slots, cache, cache_dtype, scales, num_slots);
  return launch_status("kv_cache_write");
}

}  // namespace lowbit::cuda

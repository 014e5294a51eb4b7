// Small helpers shared by the CUDA kernels (csrc/cuda/*.cu): element types as
// template tags, the dtype-code -> type dispatch, warp reductions.
// Only included from .cu files (nvcc); the scalar conversions themselves live in
// half.h so the CPU build and its tests run the same bit-twiddling code.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "lowbit/half.h"
#include "lowbit/status.h"

namespace lowbit::cuda {

// ---- element types ---------------------------------------------------------
// Storage is float or the raw 16-bit pattern; arithmetic is always fp32.
// fp16 -> fp32 uses the hardware conversion on the device: it is exact, so it
// equals half.h's f16_to_f32 bit for bit (which the host side uses). fp32 -> 16 bits
// rounds to nearest-even (as torch does): on the device (sm_80+) one cvt.rn instruction
// instead of half.h's branches, with NaN rewritten to half.h's pattern (cvt gives the
// canonical 0x7fff) so that host and device store the same bits for every input.
struct F32 {
  using T = float;
  static constexpr int kCode = kF32;
  LOWBIT_HD static float to_f32(float v) { return v; }
  LOWBIT_HD static float from_f32(float v) { return v; }
};

struct F16 {
  using T = uint16_t;
  static constexpr int kCode = kF16;
  LOWBIT_HD static float to_f32(uint16_t h) {
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(h));
#else
    return f16_to_f32(h);
#endif
  }
  LOWBIT_HD static uint16_t from_f32(float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const uint32_t u = __float_as_uint(v);
    const uint16_t h = __half_as_ushort(__float2half_rn(v));
    return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(((u >> 16) & 0x8000u) | 0x7e00u) : h;
#else
    return f32_to_f16(v);
#endif
  }
};

struct BF16 {
  using T = uint16_t;
  static constexpr int kCode = kBF16;
  LOWBIT_HD static float to_f32(uint16_t h) { return bf16_to_f32(h); }
  LOWBIT_HD static uint16_t from_f32(float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const uint32_t u = __float_as_uint(v);
    const uint16_t h = __bfloat16_as_ushort(__float2bfloat16_rn(v));
    return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t((u >> 16) | 0x40u) : h;
#else
    return f32_to_bf16(v);
#endif
  }
};

// D::from_f32(lo) | D::from_f32(hi) << 16 for a 16-bit D: on the device one cvt for both
// (unless one is NaN, which takes from_f32's pattern).
template <class D>
LOWBIT_HD uint32_t from_f32x2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if (!(lo != lo || hi != hi)) {
    if constexpr (D::kCode == kF16) {
      const __half2 h = __floats2half2_rn(lo, hi);
      return *reinterpret_cast<const uint32_t*>(&h);
    } else {
      const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
      return *reinterpret_cast<const uint32_t*>(&h);
    }
  }
#endif
  return uint32_t(D::from_f32(lo)) | uint32_t(D::from_f32(hi)) << 16;
}

LOWBIT_HD bool valid_dtype(int code) { return code == kF32 || code == kF16 || code == kBF16; }
LOWBIT_HD int64_t dtype_size(int code) { return code == kF32 ? 4 : 2; }

// Element i of a float array whose dtype is only known at run time (bias).
LOWBIT_HD float load_f32(const void* p, int code, int64_t i) {
  switch (code) {
    case kF16: return F16::to_f32(static_cast<const uint16_t*>(p)[i]);
    case kBF16: return BF16::to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// Element i of a float array whose dtype is only known at run time (outputs written
// once per row, where a per-element switch costs nothing next to the row's work).
LOWBIT_HD void store_f32(void* p, int code, int64_t i, float v) {
  switch (code) {
    case kF16: static_cast<uint16_t*>(p)[i] = F16::from_f32(v); break;
    case kBF16: static_cast<uint16_t*>(p)[i] = BF16::from_f32(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// A type as a value, for generic lambdas that dispatch on it (typename decltype(t)::type).
template <class T>
struct TypeTag {
  using type = T;
};

// LOWBIT_DISPATCH_DTYPE(code, D, ...): runs the statements with D bound to F32,
// F16 or BF16 (so kernels stay templates and launchers stay short); an unknown
// code returns kInvalidArgument from the enclosing function.
#define LOWBIT_DISPATCH_DTYPE(code, D, ...)                   \
  switch (code) {                                             \
    case ::lowbit::kF32: {                                    \
      using D = ::lowbit::cuda::F32;                          \
      __VA_ARGS__;                                            \
    } break;                                                  \
    case ::lowbit::kF16: {                                    \
      using D = ::lowbit::cuda::F16;                          \
      __VA_ARGS__;                                            \
    } break;                                                  \
    case ::lowbit::kBF16: {                                   \
      using D = ::lowbit::cuda::BF16;                         \
      __VA_ARGS__;                                            \
    } break;                                                  \
    default:                                                  \
      return ::lowbit::kInvalidArgument;                      \
  }

// ---- per-token quantization arithmetic ---------------------------------------
// The documented formula (lowbit/ref/int8.py docstring, and what the CPU kernels
// do): inv = 127 / amax and scale = amax / 127, each one correctly rounded fp32
// division; q = round_half_even(x * inv). (torch evaluates the reference's
// `127.0 / amax` as amax.reciprocal() * 127, which is an ulp off for ~1/4 of amax
// values and flips about one code in a million; tests/test_int8_cuda.py checks the
// kernels against the documented formula.)
// 127 / (amax * pre), pre = int8_format::per_token_prescale(amax).
LOWBIT_HD float per_token_inv(float amax, float pre) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(127.0f, amax * pre);
#else
  return 127.0f / (amax * pre);
#endif
}

LOWBIT_HD float per_token_scale(float amax) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(amax, 127.0f);
#else
  return amax / 127.0f;
#endif
}

// ---- warp reductions ---------------------------------------------------------
#if defined(__CUDACC__)
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ---- programmatic dependent launch (sm_90 and newer; no-ops in older code) -----------
// A grid launched with cudaLaunchAttributeProgrammaticStreamSerialization may start once
// every block of the grid before it has called launch_dependents() (or ended); it must
// call wait_prerequisites() before it reads what that grid writes (the wait returns when
// that grid has completed and its writes are visible; at once without the attribute).
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_prerequisites() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
#endif

}  // namespace lowbit::cuda

// The CPU kernel table: one set of entry points per ISA level, filled by each
// per-ISA copy of csrc/cpu/<family>.cpp and chosen at run time (dispatch.cpp).
#pragma once
#include <cstdint>

namespace lowbit::cpu {

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vnni = 3, kIsaCount = 4 };

struct KernelTable {
  // int8 family (csrc/cpu/int8.cpp). x: [M, K] rows ldx elements apart, dtype x_dtype.
  // y: [M, N] rows ldy apart, dtype x_dtype. bias: [N] of bias_dtype or null.
  int (*int8_quantize_per_token)(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx,
                                 int8_t* q, float* scale, int nthreads);
  int (*int8_linear_w8a16)(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx,
                           const int8_t* packed, const float* wscale, int64_t N,
                           const void* bias, int bias_dtype, void* y, int64_t ldy, int nthreads);
  int (*int8_linear_w8a8)(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx,
                          const int8_t* packed, const float* wscale, int64_t N,
                          const void* bias, int bias_dtype, void* y, int64_t ldy, int nthreads);
  // int4 family (csrc/cpu/int4.cpp): packed weights in lowbit/int4_format.h's CPU layout,
  // scales / mins (null = symmetric) of scale_dtype (kF16 or kF32), groups of `group` k.
  int (*int4_linear_w4a16)(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const uint8_t* packed,
                           const void* scales, const void* mins, int scale_dtype, int64_t group, int64_t N,
                           const void* bias, int bias_dtype, void* y, int64_t ldy, int nthreads);
  int (*int4_linear_w4a8)(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const uint8_t* packed,
                          const void* scales, const void* mins, int scale_dtype, int64_t group, int64_t N,
                          const void* bias, int bias_dtype, void* y, int64_t ldy, int nthreads);
};

// Each ISA copy of a family registers its kernels into the table.
#define LOWBIT_DECLARE_ISA(isa) \
  namespace isa {               \
  void register_int8(KernelTable& t); \
  void register_int4(KernelTable& t); \
  }
LOWBIT_DECLARE_ISA(scalar)
LOWBIT_DECLARE_ISA(avx2)
LOWBIT_DECLARE_ISA(avx512)
LOWBIT_DECLARE_ISA(avx512_vnni)
#undef LOWBIT_DECLARE_ISA

// dispatch.cpp
Isa best_supported_isa();             // from cpuid + XCR0
const char* isa_name(Isa isa);
int select_isa(Isa isa);              // kUnsupportedIsa if this CPU lacks it
Isa selected_isa();
const KernelTable& kernels();         // the selected level's table

}  // namespace lowbit::cpu

// The CPU kernel table: one set of entry points per ISA level, filled by each
// per-ISA copy of csrc/cpu/<family>.cpp and chosen at run time (dispatch.cpp).
#pragma once
#include <cstdint>

namespace lowbit::cpu {

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vnni = 3, kIsaCount = 4 };

// Scaled dot-product attention (csrc/cpu/attention.cpp). query [B, Hq, L, D], key [B, Hkv, S, D],
// value [B, Hkv, S, Dv], out [B, Hq, L, Dv], all of `dtype`; *_stride give the element strides of
// dims batch, head, row (the last dim is contiguous). Query head h reads key/value head
// h / (Hq / Hkv). Query i may attend key j when lo <= j < hi, with pos = i + offset:
// hi = min(S, pos + 1 if causal, pos + window_right + 1 if window_right >= 0),
// lo = max(0, pos - window_left if window_left >= 0); and then where the mask allows.
// mask (optional) is boolean (mask_dtype kBool: nonzero = may attend) or additive (a float
// dtype), indexed with mask_stride (batch, head, row, col; 0 = broadcast). A row that may
// attend nothing gives zeros.
struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  int dtype;
  int64_t B, Hq, Hkv, L, S, D, Dv;
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3];
  const void* mask;
  int mask_dtype;
  int64_t mask_stride[4];
  float scale;
  int causal;
  int64_t offset, window_left, window_right;
  int nthreads;
};

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
  int (*attention)(const AttentionParams& p);
};

// Each ISA copy of a family registers its kernels into the table.
#define LOWBIT_DECLARE_ISA(isa) \
  namespace isa {               \
  void register_int8(KernelTable& t); \
  void register_int4(KernelTable& t); \
  void register_attention(KernelTable& t); \
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

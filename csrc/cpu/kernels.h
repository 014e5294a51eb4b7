// The CPU kernel table: one set of entry points per ISA level, filled by each
// per-ISA copy of csrc/cpu/<family>.cpp and chosen at run time (dispatch.cpp).
#pragma once
#include <cstdint>

namespace lowbit::cpu {

// Each level includes the ones before it (avx512_bf16: AVX512-BF16 dot products on top of VNNI).
enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vnni = 3, kAvx512Bf16 = 4, kIsaCount = 5 };

// Scaled dot-product attention (csrc/cpu/attention.cpp), contiguous or paged.
// Queries: row i of query head h in batch b is at q + b*q_stride[0] + h*q_stride[1] + (qbase + i)*q_stride[2]
// elements (qbase = q_start[b] for variable-length batches, else 0); out likewise with out_stride.
// b has L_b = q_start[b+1] - q_start[b] (or L) queries and S_b = seq_lens[b] (or S) keys.
// Keys / values: key j of kv head h at k + b*k_stride[0] + h*k_stride[1] + j*k_stride[2] (contiguous), or,
// with a block table, at k + (block_table[b][j / block_size] * block_size + j % block_size)*k_stride[2] +
// h*k_stride[1] (the vLLM cache layout [num_blocks, block_size, heads, head_dim]); kv_dtype may be kI8
// (an INT8 cache): then element d of that row is k_scale[slot * Hkv + h] * code (v likewise).
// Query head h reads kv head h / (Hq / Hkv). Query i may attend key j when lo <= j < hi, with
// pos = i + (bottom_right ? S_b - L_b : 0): hi = min(S_b, pos + 1 if causal, pos + window_right + 1
// if window_right >= 0), lo = max(0, pos - window_left if window_left >= 0); and then where the mask
// allows. mask (optional, contiguous batches only) is boolean (mask_dtype kBool: nonzero = may
// attend) or additive (a float dtype), indexed with mask_stride (batch, head, row, col; 0 =
// broadcast). A row that may attend nothing gives zeros.
struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  int dtype;     // of q and out
  int kv_dtype;  // of k and v: a float dtype or kI8
  int64_t B, Hq, Hkv, L, S, D, Dv;
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3];
  const int32_t* q_start;   // [B + 1] or null
  const int32_t* seq_lens;  // [B] or null
  const int32_t* block_table;  // [B, max_blocks] or null
  int64_t max_blocks, block_size;
  const float* k_scale;  // INT8 caches: [num_blocks * block_size, Hkv]
  const float* v_scale;
  const void* mask;
  int mask_dtype;
  int64_t mask_stride[4];
  float scale;
  int causal, bottom_right;
  int64_t window_left, window_right;
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
  // reshape_and_cache of one tensor: src [T, H, D] (element strides ld_t, ld_h; unit inner) -> cache rows
  // [slots[t], h] of a [num_slots, H, D] cache (float: converted; kI8: quantized, scale -> scales[slot * H + h]).
  int (*kv_cache_write)(const void* src, int src_dtype, int64_t T, int64_t H, int64_t D, int64_t ld_t, int64_t ld_h,
                        const int64_t* slots, void* cache, int cache_dtype, float* scales, int nthreads);
  // fused family (csrc/cpu/fused.cpp): contiguous rows of dtype, fp32 arithmetic.
  // rms_norm: s = x (+ residual, then stored to sum_out; null residual: no add), out = s * rsqrt(mean(s^2) + eps) * w.
  int (*rms_norm)(const void* x, const void* residual, const void* weight, int w_dtype, void* out, void* sum_out,
                  int dtype, int64_t M, int64_t K, float eps, int nthreads);
  // silu_and_mul: x [M, 2F] (gate | up) -> out [M, F] = silu(gate) * up.
  int (*silu_and_mul)(const void* x, void* out, int dtype, int64_t M, int64_t F, int nthreads);
  // rope: x [T, H, >= 2R] (element strides ld_t, ld_h; unit inner), in place; cos / sin fp32 [T, R].
  int (*rope)(void* x, int dtype, int64_t T, int64_t H, int64_t ld_t, int64_t ld_h, const float* cos,
              const float* sin, int64_t R, int neox, int nthreads);
};

// Each ISA copy of a family registers its kernels into the table.
#define LOWBIT_DECLARE_ISA(isa) \
  namespace isa {               \
  void register_int8(KernelTable& t); \
  void register_int4(KernelTable& t); \
  void register_attention(KernelTable& t); \
  void register_fused(KernelTable& t); \
  }
LOWBIT_DECLARE_ISA(scalar)
LOWBIT_DECLARE_ISA(avx2)
LOWBIT_DECLARE_ISA(avx512)
LOWBIT_DECLARE_ISA(avx512_vnni)
LOWBIT_DECLARE_ISA(avx512_bf16)
#undef LOWBIT_DECLARE_ISA

// dispatch.cpp
Isa best_supported_isa();             // from cpuid + XCR0
const char* isa_name(Isa isa);
int select_isa(Isa isa);              // kUnsupportedIsa if this CPU lacks it
Isa selected_isa();
const KernelTable& kernels();         // the selected level's table

}  // namespace lowbit::cpu

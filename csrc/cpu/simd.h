// Per-ISA primitives for the CPU kernels. This header is included by the
// per-ISA copies of csrc/cpu/*.cpp only, inside namespace lowbit::cpu::LOWBIT_ISA,
// so every definition here is private to one ISA level (no ODR clash between a
// scalar and an AVX-512 copy of the same inline function).
//
// Two families of primitives:
//  * row ops on fp32 vectors of kW lanes (conversion, abs-max, int8 rounding);
//  * panel ops on one 64-byte quad of the CPU int8 layout (16 rows x 4 k, see
//    lowbit/int8_format.h): an int8 dot product (W8A8) and an fp32 FMA (W8A16).
// The kernels in int8.cpp are written once against these names.
// Everything below lives in namespace lowbit::cpu::LOWBIT_ISA.
#pragma once
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "lowbit/half.h"
#include "lowbit/status.h"

#ifndef LOWBIT_ISA
#error "simd.h is for the per-ISA copies of csrc/cpu/*.cpp (LOWBIT_ISA names the copy)"
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define LOWBIT_SIMD_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LOWBIT_SIMD_AVX2 1
#else
#define LOWBIT_SIMD_SCALAR 1
#endif

namespace lowbit::cpu::LOWBIT_ISA {

// ------------------------------------------------------------------ row ops
#if LOWBIT_SIMD_AVX512
constexpr int kW = 16;
struct VF { __m512 v; };
inline VF vf_load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline VF vf_load_f16(const uint16_t* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p))}; }
inline VF vf_load_bf16(const uint16_t* p) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16))};
}
inline void vf_store(float* p, VF a) { _mm512_storeu_ps(p, a.v); }
inline VF vf_load_i8(const int8_t* p) { return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)))}; }
inline VF vf_set1(float f) { return {_mm512_set1_ps(f)}; }
inline VF vf_abs(VF a) { return {_mm512_abs_ps(a.v)}; }
inline VF vf_max(VF a, VF b) { return {_mm512_max_ps(a.v, b.v)}; }
inline VF vf_mul(VF a, VF b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline VF vf_add(VF a, VF b) { return {_mm512_add_ps(a.v, b.v)}; }
inline void vf_store_f16(uint16_t* p, VF a) {
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// Round to nearest-even like f32_to_bf16 in half.h; NaN stays a quiet NaN.
inline void vf_store_bf16(uint16_t* p, VF a) {
  __m512i u = _mm512_castps_si512(a.v);
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                   _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
  r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q), u, _mm512_set1_epi32(0x400000));
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}
inline float vf_hmax(VF a) { return _mm512_reduce_max_ps(a.v); }
inline float vf_hsum(VF a) { return _mm512_reduce_add_ps(a.v); }
inline bool vf_any_nan(VF a) { return _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q) != 0; }
inline VF vf_sub(VF a, VF b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline VF vf_div(VF a, VF b) { return {_mm512_div_ps(a.v, b.v)}; }
inline VF vf_fma(VF a, VF b, VF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline VF vf_round(VF a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline VF vf_pow2i(VF p, VF n) { return {_mm512_scalef_ps(p.v, n.v)}; }  // p * 2^n, n integral
inline VF vf_zero_where_neg_inf(VF x, VF y) {                              // x == -inf ? 0 : y
  return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x.v, _mm512_set1_ps(-INFINITY), _CMP_NEQ_UQ), y.v)};
}
// True if any lane is NaN or +-Inf.
inline bool vf_any_nonfinite(VF a) {
  return _mm512_cmp_ps_mask(_mm512_abs_ps(a.v), _mm512_set1_ps(INFINITY), _CMP_NLT_UQ) != 0;
}
// Round half-to-even (MXCSR default), saturate, store kW int8.
inline void vf_store_i8(int8_t* p, VF a) { _mm_storeu_si128((__m128i*)p, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(a.v))); }

#elif LOWBIT_SIMD_AVX2
constexpr int kW = 8;
struct VF { __m256 v; };
inline VF vf_load(const float* p) { return {_mm256_loadu_ps(p)}; }
inline VF vf_load_f16(const uint16_t* p) { return {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p))}; }
inline VF vf_load_bf16(const uint16_t* p) {
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16))};
}
inline void vf_store(float* p, VF a) { _mm256_storeu_ps(p, a.v); }
inline VF vf_load_i8(const int8_t* p) { return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)))}; }
inline VF vf_set1(float f) { return {_mm256_set1_ps(f)}; }
inline VF vf_abs(VF a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v)}; }
inline VF vf_max(VF a, VF b) { return {_mm256_max_ps(a.v, b.v)}; }
inline VF vf_mul(VF a, VF b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline VF vf_add(VF a, VF b) { return {_mm256_add_ps(a.v, b.v)}; }
inline void vf_store_f16(uint16_t* p, VF a) {
  _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void vf_store_bf16(uint16_t* p, VF a) {
  __m256i u = _mm256_castps_si256(a.v);
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                   _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
  r = _mm256_srli_epi32(r, 16);
  _mm_storeu_si128((__m128i*)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
inline float vf_hmax(VF a) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
inline float vf_hsum(VF a) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  m = _mm_add_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
inline bool vf_any_nan(VF a) { return _mm256_movemask_ps(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q)) != 0; }
inline VF vf_sub(VF a, VF b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline VF vf_div(VF a, VF b) { return {_mm256_div_ps(a.v, b.v)}; }
inline VF vf_fma(VF a, VF b, VF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline VF vf_round(VF a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
// p * 2^n for integral n in [-126, 127]: n goes straight into an exponent field.
inline VF vf_pow2i(VF p, VF n) {
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23);
  return {_mm256_mul_ps(p.v, _mm256_castsi256_ps(e))};
}
inline VF vf_zero_where_neg_inf(VF x, VF y) {
  return {_mm256_andnot_ps(_mm256_cmp_ps(x.v, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ), y.v)};
}
inline bool vf_any_nonfinite(VF a) {
  return _mm256_movemask_ps(_mm256_cmp_ps(vf_abs(a).v, _mm256_set1_ps(INFINITY), _CMP_NLT_UQ)) != 0;
}
inline void vf_store_i8(int8_t* p, VF a) {
  __m256i i = _mm256_cvtps_epi32(a.v);
  __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
  _mm_storel_epi64((__m128i*)p, _mm_packs_epi16(w, w));
}

#else
constexpr int kW = 1;
struct VF { float v; };
inline VF vf_load(const float* p) { return {*p}; }
inline VF vf_load_f16(const uint16_t* p) { return {f16_to_f32(*p)}; }
inline VF vf_load_bf16(const uint16_t* p) { return {bf16_to_f32(*p)}; }
inline void vf_store(float* p, VF a) { *p = a.v; }
inline VF vf_load_i8(const int8_t* p) { return {float(*p)}; }
inline VF vf_set1(float f) { return {f}; }
inline VF vf_abs(VF a) { return {std::fabs(a.v)}; }
inline VF vf_max(VF a, VF b) { return {a.v > b.v ? a.v : b.v}; }
inline VF vf_mul(VF a, VF b) { return {a.v * b.v}; }
inline VF vf_add(VF a, VF b) { return {a.v + b.v}; }
inline void vf_store_f16(uint16_t* p, VF a) { *p = f32_to_f16(a.v); }
inline void vf_store_bf16(uint16_t* p, VF a) { *p = f32_to_bf16(a.v); }
inline float vf_hmax(VF a) { return a.v; }
inline float vf_hsum(VF a) { return a.v; }
inline bool vf_any_nan(VF a) { return std::isnan(a.v); }
inline VF vf_sub(VF a, VF b) { return {a.v - b.v}; }
inline VF vf_div(VF a, VF b) { return {a.v / b.v}; }
inline VF vf_fma(VF a, VF b, VF c) { return {std::fma(a.v, b.v, c.v)}; }
inline VF vf_round(VF a) { return {std::nearbyint(a.v)}; }
inline VF vf_pow2i(VF p, VF n) { return {std::ldexp(p.v, static_cast<int>(n.v))}; }
inline VF vf_zero_where_neg_inf(VF x, VF y) { return {x.v == -INFINITY ? 0.0f : y.v}; }
inline bool vf_any_nonfinite(VF a) { return !std::isfinite(a.v); }
inline void vf_store_i8(int8_t* p, VF a) {
  float r = std::nearbyint(a.v);  // half-to-even, as cvtps2dq
  *p = static_cast<int8_t>(r > 127.f ? 127.f : (r < -128.f ? -128.f : r));
}
#endif

// exp(x) on every lane, written once over the primitives above: n = round(x / ln 2),
// r = x - n ln 2 (ln 2 in two parts, so r is exact), exp(r) by Cephes' degree-6
// polynomial on |r| <= ln(2) / 2 (about 1 ulp), times 2^n. x is clamped below at -87
// (exp(-87) ~ 1.6e-38) so 2^n stays a normal number, and x = -inf gives exactly 0: a
// masked score must contribute nothing. NaN propagates.
inline VF vf_exp(VF x) {
  const VF xc = vf_max(vf_set1(-87.0f), x);  // (max returns its second operand for NaN)
  const VF n = vf_round(vf_mul(xc, vf_set1(1.44269504088896341f)));
  VF r = vf_fma(n, vf_set1(-0.693359375f), xc);
  r = vf_fma(n, vf_set1(2.12194440e-4f), r);
  VF p = vf_set1(1.9875691500e-4f);
  p = vf_fma(p, r, vf_set1(1.3981999507e-3f));
  p = vf_fma(p, r, vf_set1(8.3334519073e-3f));
  p = vf_fma(p, r, vf_set1(4.1665795894e-2f));
  p = vf_fma(p, r, vf_set1(1.6666665459e-1f));
  p = vf_fma(p, r, vf_set1(5.0000001201e-1f));
  p = vf_fma(vf_mul(p, r), r, vf_add(r, vf_set1(1.0f)));
  return vf_zero_where_neg_inf(x, vf_pow2i(p, n));
}

// Transposes a kW x kW block: dst[c * ld + i] = rows[i][d0 + c] (i, c < kW).
#if LOWBIT_SIMD_AVX512
inline void transpose_kw(const float* const* rows, int64_t d0, float* dst, int64_t ld) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(rows[i] + d0);
  for (int i = 0; i < 8; ++i) {  // 32-bit pairs: lane L of t[2i] = (row 2i, 2i+1) x cols 4L, 4L+1
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // 64-bit pairs: lane L of r[4i + k] = rows 4i..4i+3 at col 4L + k
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int k = 0; k < 4; ++k) {  // 128-bit lanes, twice: column c = 4L + k gathers its 4 row groups
    t[k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88);
    t[k + 4] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);
    t[k + 8] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
    t[k + 12] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0x88);
    r[k + 8] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0xDD);
    r[k + 4] = _mm512_shuffle_f32x4(t[k + 4], t[k + 12], 0x88);
    r[k + 12] = _mm512_shuffle_f32x4(t[k + 4], t[k + 12], 0xDD);
  }
  for (int c = 0; c < 16; ++c) _mm512_storeu_ps(dst + c * ld, r[c]);
}
#elif LOWBIT_SIMD_AVX2
inline void transpose_kw(const float* const* rows, int64_t d0, float* dst, int64_t ld) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(rows[i] + d0);
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {  // lane L of r[4i + k] = rows 4i..4i+3 at col 4L + k
    r[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_ps(dst + k * ld, _mm256_permute2f128_ps(r[k], r[4 + k], 0x20));
    _mm256_storeu_ps(dst + (4 + k) * ld, _mm256_permute2f128_ps(r[k], r[4 + k], 0x31));
  }
}
#else
inline void transpose_kw(const float* const* rows, int64_t d0, float* dst, int64_t) { dst[0] = rows[0][d0]; }
#endif

// ---------------------------------------------------------------- bf16 pair dot products
// AVX512-BF16 (the avx512_bf16 level): vdpbf16ps adds, per fp32 lane, the two products of a
// pair of bf16 values (exact products, fp32 sums). A "pair" is a uint32 holding two bf16,
// the lower-indexed one in the low half (how two consecutive bf16 lie in memory).
#if defined(__AVX512BF16__)
#define LOWBIT_SIMD_BF16 1
struct VP { __m512i v; };  // 16 pairs
inline VP vp_load(const uint32_t* p) { return {_mm512_loadu_si512(p)}; }
// acc[i] += a.lo * b[i].lo + a.hi * b[i].hi for the 16 pairs of b and one pair a.
inline VF vf_dot_pairs(VF acc, uint32_t a, VP b) {
  return {_mm512_dpbf16_ps(acc.v, (__m512bh)_mm512_set1_epi32(int(a)), (__m512bh)b.v)};
}
// x[0..32) -> 16 pairs (x[2i], x[2i + 1]), rounded to nearest-even bf16.
inline void pack_pairs32(const float* x, uint32_t* out) {
  _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + 16), _mm512_loadu_ps(x)));
}
// 16 columns of two bf16 rows as pairs: out[i] = (a[i], b[i]).
inline void interleave_pairs16(const uint16_t* a, const uint16_t* b, uint32_t* out) {
  const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)a));
  const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)b));
  _mm512_storeu_si512(out, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
}
#endif

// ---------------------------------------------------------------- panel ops
// AccI32: 16 int32, one per row of a panel.  XI8: one activation quad, prepared.
// kU8Activations: the dot product takes activations as u8 = x + 128 (the
// quantized rows are offset once, by offset_activations) and the caller
// subtracts 128 * rowsum (VNNI); otherwise products are exact s8 x s8.
#if LOWBIT_SIMD_AVX512
struct WI8 { __m512i v; };
struct AccI32 { __m512i v; };
inline WI8 load_wi8(const int8_t* p) { return {_mm512_loadu_si512(p)}; }
inline AccI32 acc_i32_zero() { return {_mm512_setzero_si512()}; }
inline void acc_i32_store(int32_t* out16, AccI32 a) { _mm512_storeu_si512(out16, a.v); }
#if defined(__AVX512VNNI__)
constexpr bool kU8Activations = true;
struct XI8 { __m512i u8; };
inline XI8 prep_xi8(const int8_t* x4) {
  int32_t quad;
  std::memcpy(&quad, x4, 4);
  return {_mm512_set1_epi32(quad)};
}
inline AccI32 dot_i8(AccI32 acc, XI8 x, WI8 w) { return {_mm512_dpbusd_epi32(acc.v, x.u8, w.v)}; }
#else
// No VNNI: maddubs(|x|, w * sign(x)). |x| <= 127 and |w| <= 127 keep each
// pair sum <= 2 * 127 * 127 < 32767, so the int16 saturation never fires.
constexpr bool kU8Activations = false;
struct XI8 { __m512i abs; __mmask64 neg; };
inline XI8 prep_xi8(const int8_t* x4) {
  int32_t quad;
  std::memcpy(&quad, x4, 4);
  __m512i x = _mm512_set1_epi32(quad);
  return {_mm512_abs_epi8(x), _mm512_movepi8_mask(x)};
}
inline AccI32 dot_i8(AccI32 acc, XI8 x, WI8 w) {
  __m512i ws = _mm512_mask_sub_epi8(w.v, x.neg, _mm512_setzero_si512(), w.v);
  __m512i p16 = _mm512_maddubs_epi16(x.abs, ws);
  return {_mm512_add_epi32(acc.v, _mm512_madd_epi16(p16, _mm512_set1_epi16(1)))};
}
#endif

#elif LOWBIT_SIMD_AVX2
constexpr bool kU8Activations = false;
struct WI8 { __m256i lo, hi; };  // rows 0-7, rows 8-15
struct AccI32 { __m256i lo, hi; };
struct XI8 { __m256i abs, raw; };
inline WI8 load_wi8(const int8_t* p) {
  return {_mm256_loadu_si256((const __m256i*)p), _mm256_loadu_si256((const __m256i*)(p + 32))};
}
inline AccI32 acc_i32_zero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline void acc_i32_store(int32_t* out16, AccI32 a) {
  _mm256_storeu_si256((__m256i*)out16, a.lo);
  _mm256_storeu_si256((__m256i*)(out16 + 8), a.hi);
}
inline XI8 prep_xi8(const int8_t* x4) {
  int32_t quad;
  std::memcpy(&quad, x4, 4);
  __m256i x = _mm256_set1_epi32(quad);
  return {_mm256_abs_epi8(x), x};
}
// Same sign trick as AVX-512 without VNNI (see there for the overflow bound).
inline __m256i dot_half(__m256i acc, const XI8& x, __m256i w) {
  __m256i p16 = _mm256_maddubs_epi16(x.abs, _mm256_sign_epi8(w, x.raw));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}
inline AccI32 dot_i8(AccI32 acc, const XI8& x, const WI8& w) {
  return {dot_half(acc.lo, x, w.lo), dot_half(acc.hi, x, w.hi)};
}

#else
constexpr bool kU8Activations = false;
struct WI8 { const int8_t* p; };
struct AccI32 { int32_t v[16]; };
struct XI8 { int8_t v[4]; };
inline WI8 load_wi8(const int8_t* p) { return {p}; }
inline AccI32 acc_i32_zero() { return {}; }
inline void acc_i32_store(int32_t* out16, const AccI32& a) { std::memcpy(out16, a.v, sizeof a.v); }
inline XI8 prep_xi8(const int8_t* x4) {
  XI8 x;
  std::memcpy(x.v, x4, 4);
  return x;
}
inline AccI32 dot_i8(AccI32 acc, const XI8& x, WI8 w) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 4; ++j) acc.v[i] += int32_t(x.v[j]) * int32_t(w.p[4 * i + j]);
  return acc;
}
#endif

// Turns quantized activations into what dot_i8 takes (x + 128 as u8 for VNNI).
inline void offset_activations(int8_t* q, int64_t n) {
  if constexpr (kU8Activations)
    for (int64_t i = 0; i < n; ++i) q[i] = static_cast<int8_t>(q[i] ^ 0x80);
}

// WF32: one quad dequantized to fp32, lanes (row i, k-offset j) in memory order.
// XF32: x[k..k+3] repeated so each lane meets its k.  AccF32 sums per lane; the
// four k-offsets of a row are added once, at the end (acc_f32_rowsums).
#if LOWBIT_SIMD_AVX512
struct WF32 { __m512 v[4]; };
struct XF32 { __m512 v; };
struct AccF32 { __m512 v[4]; };
inline WF32 load_wf32(const int8_t* p) {
  WF32 w;
  for (int i = 0; i < 4; ++i)
    w.v[i] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 16 * i))));
  return w;
}
inline XF32 prep_xf32(const float* x4) { return {_mm512_broadcast_f32x4(_mm_loadu_ps(x4))}; }
inline AccF32 acc_f32_zero() { return {{_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()}}; }
inline AccF32 dot_f32(AccF32 acc, XF32 x, const WF32& w) {
  for (int i = 0; i < 4; ++i) acc.v[i] = _mm512_fmadd_ps(w.v[i], x.v, acc.v[i]);
  return acc;
}
inline void acc_f32_store(float* out64, const AccF32& a) {
  for (int i = 0; i < 4; ++i) _mm512_storeu_ps(out64 + 16 * i, a.v[i]);
}

#elif LOWBIT_SIMD_AVX2
struct WF32 { __m256 v[8]; };
struct XF32 { __m256 v; };
struct AccF32 { __m256 v[8]; };
inline WF32 load_wf32(const int8_t* p) {
  WF32 w;
  for (int i = 0; i < 8; ++i)
    w.v[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8 * i))));
  return w;
}
inline XF32 prep_xf32(const float* x4) { return {_mm256_broadcast_ps((const __m128*)x4)}; }
inline AccF32 acc_f32_zero() {
  AccF32 a;
  for (auto& v : a.v) v = _mm256_setzero_ps();
  return a;
}
inline AccF32 dot_f32(AccF32 acc, XF32 x, const WF32& w) {
  for (int i = 0; i < 8; ++i) acc.v[i] = _mm256_fmadd_ps(w.v[i], x.v, acc.v[i]);
  return acc;
}
inline void acc_f32_store(float* out64, const AccF32& a) {
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out64 + 8 * i, a.v[i]);
}

#else
struct WF32 { float v[64]; };
struct XF32 { float v[4]; };
struct AccF32 { float v[64]; };
inline WF32 load_wf32(const int8_t* p) {
  WF32 w;
  for (int i = 0; i < 64; ++i) w.v[i] = float(p[i]);
  return w;
}
inline XF32 prep_xf32(const float* x4) { return {{x4[0], x4[1], x4[2], x4[3]}}; }
inline AccF32 acc_f32_zero() { return {}; }
inline AccF32 dot_f32(AccF32 acc, const XF32& x, const WF32& w) {
  for (int i = 0; i < 64; ++i) acc.v[i] += w.v[i] * x.v[i % 4];
  return acc;
}
inline void acc_f32_store(float* out64, const AccF32& a) { std::memcpy(out64, a.v, sizeof a.v); }
#endif

// ------------------------------------------------------------ int4 block ops
// One 64-byte block of the INT4 layout (lowbit/int4_format.h) holds 16 rows x 8 k:
// byte 4i + j = code (row i, k j) | code (row i, k 4 + j) << 4.
//  * W4A8: load_q4 splits it into two u8 quads (k 0-3 and k 4-7, lanes (row i, k j)),
//    dot_q4 multiplies one by a broadcast signed int8 activation quad.
//  * W4A16: lane i (32 bits) holds row i's 8 codes; nibble_f32 turns nibble s of
//    every lane into fp32 (it holds k = nibble_k(s)).
// PF: 16 fp32 lanes, one per row of a panel (accumulators and per-row scales).
#if LOWBIT_SIMD_AVX512
struct WQ4 { __m512i v; };
struct XS8 { __m512i v; };
struct WN4 { __m512i v; };
struct PF { __m512 v; };
inline void load_q4(const uint8_t* p, WQ4& lo, WQ4& hi) {
  const __m512i b = _mm512_loadu_si512(p), m = _mm512_set1_epi8(0x0F);
  lo.v = _mm512_and_si512(b, m);
  hi.v = _mm512_and_si512(_mm512_srli_epi16(b, 4), m);
}
inline XS8 prep_xs8(const int8_t* x4) {
  int32_t quad;
  std::memcpy(&quad, x4, 4);
  return {_mm512_set1_epi32(quad)};
}
#if defined(__AVX512VNNI__)
inline AccI32 dot_q4(AccI32 acc, XS8 x, WQ4 w) { return {_mm512_dpbusd_epi32(acc.v, w.v, x.v)}; }
#else
// maddubs(u8 code, s8 x): a pair sum is at most 2 * 15 * 128 in magnitude, far from int16 saturation.
inline AccI32 dot_q4(AccI32 acc, XS8 x, WQ4 w) {
  return {_mm512_add_epi32(acc.v, _mm512_madd_epi16(_mm512_maddubs_epi16(w.v, x.v), _mm512_set1_epi16(1)))};
}
#endif
inline WN4 load_wn4(const uint8_t* p) { return {_mm512_loadu_si512(p)}; }
// vpermps reads only the low 4 bits of each index lane: the shifted codes index [0, 1, ..., 15].
inline PF nibble_f32(WN4 w, int s) {
  const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return {_mm512_permutexvar_ps(s ? _mm512_srli_epi32(w.v, 4 * s) : w.v, table)};
}
inline PF pf_zero() { return {_mm512_setzero_ps()}; }
inline PF pf_set1(float f) { return {_mm512_set1_ps(f)}; }
inline PF pf_load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline PF pf_load(const uint16_t* f16) { return {_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)f16))}; }
inline void pf_store(float* p, PF a) { _mm512_storeu_ps(p, a.v); }
inline PF pf_mul(PF a, PF b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline PF pf_fma(PF a, PF b, PF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline PF pf_from_i32(AccI32 a) { return {_mm512_cvtepi32_ps(a.v)}; }

#elif LOWBIT_SIMD_AVX2
struct WQ4 { __m256i lo, hi; };  // rows 0-7, rows 8-15
struct XS8 { __m256i v; };
struct WN4 { __m256i lo, hi; };
struct PF { __m256 lo, hi; };
inline void load_q4(const uint8_t* p, WQ4& lo, WQ4& hi) {
  const __m256i b0 = _mm256_loadu_si256((const __m256i*)p), b1 = _mm256_loadu_si256((const __m256i*)(p + 32));
  const __m256i m = _mm256_set1_epi8(0x0F);
  lo = {_mm256_and_si256(b0, m), _mm256_and_si256(b1, m)};
  hi = {_mm256_and_si256(_mm256_srli_epi16(b0, 4), m), _mm256_and_si256(_mm256_srli_epi16(b1, 4), m)};
}
inline XS8 prep_xs8(const int8_t* x4) {
  int32_t quad;
  std::memcpy(&quad, x4, 4);
  return {_mm256_set1_epi32(quad)};
}
// Same maddubs bound as AVX-512 without VNNI.
inline __m256i dot_q4_half(__m256i acc, __m256i x, __m256i w) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}
inline AccI32 dot_q4(AccI32 acc, XS8 x, const WQ4& w) { return {dot_q4_half(acc.lo, x.v, w.lo), dot_q4_half(acc.hi, x.v, w.hi)}; }
inline WN4 load_wn4(const uint8_t* p) {
  return {_mm256_loadu_si256((const __m256i*)p), _mm256_loadu_si256((const __m256i*)(p + 32))};
}
inline PF nibble_f32(const WN4& w, int s) {
  const __m256i m = _mm256_set1_epi32(0x0F);
  return {_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w.lo, 4 * s), m)),
          _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w.hi, 4 * s), m))};
}
inline PF pf_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline PF pf_set1(float f) { return {_mm256_set1_ps(f), _mm256_set1_ps(f)}; }
inline PF pf_load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline PF pf_load(const uint16_t* f16) {
  return {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)f16)), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(f16 + 8)))};
}
inline void pf_store(float* p, const PF& a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline PF pf_mul(const PF& a, const PF& b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline PF pf_fma(const PF& a, const PF& b, const PF& c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline PF pf_from_i32(const AccI32& a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }

#else
struct WQ4 { uint8_t v[64]; };
struct XS8 { int8_t v[4]; };
struct WN4 { uint32_t v[16]; };
struct PF { float v[16]; };
inline void load_q4(const uint8_t* p, WQ4& lo, WQ4& hi) {
  for (int i = 0; i < 64; ++i) {
    lo.v[i] = p[i] & 0x0F;
    hi.v[i] = p[i] >> 4;
  }
}
inline XS8 prep_xs8(const int8_t* x4) {
  XS8 x;
  std::memcpy(x.v, x4, 4);
  return x;
}
inline AccI32 dot_q4(AccI32 acc, const XS8& x, const WQ4& w) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 4; ++j) acc.v[i] += int32_t(w.v[4 * i + j]) * int32_t(x.v[j]);
  return acc;
}
inline WN4 load_wn4(const uint8_t* p) {
  WN4 w;
  std::memcpy(w.v, p, sizeof w.v);  // little-endian lanes, as the vector loads
  return w;
}
inline PF nibble_f32(const WN4& w, int s) {
  PF r;
  for (int i = 0; i < 16; ++i) r.v[i] = float((w.v[i] >> (4 * s)) & 0x0F);
  return r;
}
inline PF pf_zero() { return {}; }
inline PF pf_set1(float f) {
  PF r;
  for (float& v : r.v) v = f;
  return r;
}
inline PF pf_load(const float* p) {
  PF r;
  std::memcpy(r.v, p, sizeof r.v);
  return r;
}
inline PF pf_load(const uint16_t* f16) {
  PF r;
  for (int i = 0; i < 16; ++i) r.v[i] = f16_to_f32(f16[i]);
  return r;
}
inline void pf_store(float* p, const PF& a) { std::memcpy(p, a.v, sizeof a.v); }
inline PF pf_mul(const PF& a, const PF& b) {
  PF r;
  for (int i = 0; i < 16; ++i) r.v[i] = a.v[i] * b.v[i];
  return r;
}
inline PF pf_fma(const PF& a, const PF& b, const PF& c) {
  PF r;
  for (int i = 0; i < 16; ++i) r.v[i] = std::fma(a.v[i], b.v[i], c.v[i]);
  return r;
}
inline PF pf_from_i32(const AccI32& a) {
  PF r;
  for (int i = 0; i < 16; ++i) r.v[i] = float(a.v[i]);
  return r;
}
#endif

}  // namespace lowbit::cpu::LOWBIT_ISA

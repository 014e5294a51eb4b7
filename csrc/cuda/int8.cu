// INT8 on CUDA: the per-token activation quantizer and the W8A16 / W8A8 linear
// layers, built for decode (M = 1..16 rows of activations) and correct for any
// M, N, K >= 1.
//
// Linear layers: y[M, N] = x[M, K] . (qweight[N, K] * wscale[N])^T + bias[N].
// A warp owns kRowsPerWarp output rows n and a tile of up to MT activation rows
// m; its lanes split K. Each weight element is loaded once per M tile (16-byte
// loads along K when K % 16 == 0 and the pointers are aligned, byte loads
// otherwise), converted once and used for all MT rows of x; the partial sums
// are reduced across the warp with shuffles and lane (r * MT + m) writes output
// (m, n0 + r). M is walked in tiles of at most 16 rows (gridDim.y, then a
// grid-stride loop), N in blocks of kRowsPerBlock rows (gridDim.x, then a
// grid-stride loop), so no grid limit cuts a shape short.
//
// W8A16 with fp16 / bf16 activations and K % 16 == 0 runs on the tensor cores: the
// weight-only kernel of woq_mma.cuh (shared with W4A16) with the Int8W format below,
// reading the canonical rows directly. Otherwise (fp32, ragged K, misaligned weights,
// or LOWBIT_CUDA_W8A16=simt) the CUDA-core W8A16 kernel accumulates x * q in fp32 and
// applies wscale once per output; W8A8
// first quantizes x per token into Python-allocated scratch (qx, sx) with the
// quantizer below, then accumulates q(x) . q(w) exactly with __dp4a in int32
// (flushed to fp32 every kChunkK products, so any K is safe) and applies
// sx[m] * wscale[n] in the epilogue. For prefill-size M (>= 64, K % 16 == 0) the
// W8A8 product runs on the tensor cores instead (w8a8_mma_kernel: mma.sync
// m16n8k32 s8, a cp.async pipeline); both paths apply the same fp32 epilogue
// (w8a8_value) to the same exact int32 sum, so they agree bit for bit.
#include <cuda.h>  // CUtensorMap (a type only: the driver entry point is found at run time)
#include <cuda_runtime.h>

#include <atomic>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "int8.h"
#include "lowbit/cuda_common.cuh"
#include "lowbit/int8_format.h"
#include "ptx.cuh"
#include "wgmma.cuh"
#include "woq_mma.cuh"

namespace lowbit::cuda {
namespace {

constexpr int kWarps = 4;                            // warps per block (linear kernels)
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 2;                      // output rows n per warp
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kMaxMTile = 16;                        // activation rows per tile
constexpr int kVecK = 16;                            // k per lane per step, vector paths (16 int8 = 16 bytes)
constexpr int kStepVec = 32 * kVecK;                 // k per warp per step, vector paths
constexpr int kStepQuad = 32 * 4;                    // k per warp per step, W8A8 byte path
constexpr int64_t kChunkK = 131072;                  // products summed in int32 before flushing to fp32
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;
constexpr int kQuantMaxThreads = 512;

// Each lane writes at most one output of its warp: lane = r * MT + m.
static_assert(kRowsPerWarp * kMaxMTile <= 32, "one output per lane");
static_assert(kChunkK % kStepVec == 0 && kChunkK % kStepQuad == 0, "chunks hold whole steps");
// |q(x)| <= 127 and |q(w)| <= 128: a chunk's int32 sum cannot overflow.
static_assert(kChunkK * 127 * 128 <= 2147483647LL, "int32 chunk sums");

__device__ __forceinline__ int4 ldg16(const void* p) { return __ldg(reinterpret_cast<const int4*>(p)); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// 4 int8 packed in a word -> 4 exact floats: byte b becomes the float
// 2^23 + (b + 128) (a prmt into the mantissa), minus 2^23 + 128.
__device__ __forceinline__ void i8x4_to_f32(uint32_t w, float* out) {
  const uint32_t u = w ^ 0x80808080u;  // signed byte b -> unsigned byte b + 128
  out[0] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540)) - 8388736.0f;
  out[1] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7541)) - 8388736.0f;
  out[2] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7542)) - 8388736.0f;
  out[3] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7543)) - 8388736.0f;
}

__device__ __forceinline__ void i8x16_to_f32(int4 v, float* out) {
  i8x4_to_f32(uint32_t(v.x), out);
  i8x4_to_f32(uint32_t(v.y), out + 4);
  i8x4_to_f32(uint32_t(v.z), out + 8);
  i8x4_to_f32(uint32_t(v.w), out + 12);
}

// 16 consecutive activations (16-byte aligned) -> fp32. fp16 / bf16: two elements
// per 32-bit word, the first in the low half.
template <class D>
__device__ __forceinline__ void load_x16(const typename D::T* p, float* out) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int4 v = ldg16(p + 8 * i);
    const uint32_t w[4] = {uint32_t(v.x), uint32_t(v.y), uint32_t(v.z), uint32_t(v.w)};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      out[8 * i + 2 * j] = D::to_f32(uint16_t(w[j] & 0xffffu));
      out[8 * i + 2 * j + 1] = D::to_f32(uint16_t(w[j] >> 16));
    }
  }
}

template <>
__device__ __forceinline__ void load_x16<F32>(const float* p, float* out) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(p) + i);
    out[4 * i + 0] = v.x;
    out[4 * i + 1] = v.y;
    out[4 * i + 2] = v.z;
    out[4 * i + 3] = v.w;
  }
}

// Bytes row[k0 .. k0+3] packed little-endian, zeros past K (the dp4a tail).
__device__ __forceinline__ int load_i8x4(const int8_t* row, int64_t k0, int64_t K) {
  uint32_t v = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (k0 + j < K) v |= uint32_t(uint8_t(row[k0 + j])) << (8 * j);
  return int(v);
}

// ---------------------------------------------------------------- quantizer
// One block per row (grid-stride over rows): pass 1 finds amax and whether the
// row holds NaN/Inf, pass 2 writes the codes. Same arithmetic as the reference
// (see per_token_inv / per_token_scale in cuda_common.cuh). Two kernels:
//   * quantize_per_token_kernel, the default: one element per thread and iteration.
//     Latency-bound (H200: 25 us for 2048 x 4096 fp16, four times the bandwidth floor):
//     a thread has one 2-byte load in flight at a time, and pass 2 reads x again.
//   * quantize_per_token_vec_kernel (LOWBIT_CUDA_QUANT=vec, compile-verified only): a thread
//     loads kQuantVecs 16-byte vectors of the row before it looks at any, so the whole row
//     is in flight at once, and pass 2 reuses them from registers when the row fits in one
//     chunk (blockDim * kQuantVecs vectors; K <= 32768 at 16 bits).
constexpr int kQuantVecs = 4;
constexpr int kQuantVecMaxThreads = 1024;

// The row's amax and NaN/Inf flag from every thread's share (the whole block calls it; the
// caller syncs before the next row reuses the shared slots).
__device__ __forceinline__ float block_row_amax(float amax, int& bad) {
  __shared__ float warp_amax[32];
  __shared__ float row_amax;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  bad = __syncthreads_or(bad);
  amax = warp_max(amax);
  if (lane == 0) warp_amax[warp] = amax;
  __syncthreads();
  if (warp == 0) {
    float v = lane < nwarps ? warp_amax[lane] : 0.0f;
    v = warp_max(v);
    if (lane == 0) row_amax = v;
  }
  __syncthreads();
  return row_amax;
}

// Pass 2's arithmetic for one row: every code 0 in a row with NaN/Inf (and in a row of
// zeros, through inv = 0).
struct QuantRowScale {
  bool bad;
  float pre, inv;
  __device__ QuantRowScale(float amax, int bad_)
      : bad(bad_ != 0),
        pre(int8_format::per_token_prescale(amax)),
        inv(amax == 0.0f ? 0.0f : per_token_inv(amax, pre)) {}
  __device__ int8_t code(float v) const {
    if (bad) return 0;
    const int c = __float2int_rn(__fmul_rn(__fmul_rn(v, pre), inv));  // round half to even
    return int8_t(min(127, max(-127, c)));
  }
};

__device__ __forceinline__ float row_scale(float amax, int bad) {
  return bad ? __int_as_float(0x7fc00000) : per_token_scale(amax);
}

template <class D>
__global__ void quantize_per_token_kernel(
    const typename D::T* __restrict__ x, int64_t M, int64_t K, int64_t ldx, int8_t* __restrict__ q,
    float* __restrict__ scale) {
  launch_dependents();  // W8A8's product kernel may start (it waits for this grid: see overlaps_quantizer)
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const typename D::T* xr = x + row * ldx;
    float amax = 0.0f;
    int bad = 0;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const float v = D::to_f32(xr[k]);
      bad |= !isfinite(v);
      amax = fmaxf(amax, fabsf(v));
    }
    amax = block_row_amax(amax, bad);
    const QuantRowScale qs(amax, bad);
    int8_t* qr = q + row * K;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) qr[k] = qs.code(D::to_f32(xr[k]));
    if (threadIdx.x == 0) scale[row] = row_scale(amax, bad);
    __syncthreads();  // block_row_amax's slots are reused by the next row
  }
}

// A thread's share of one chunk of a row for quantize_per_token_vec_kernel: vector i of the
// chunk at vector `base` holds elements [e0, e0 + kVec), zeros past K (+0.0 in every dtype,
// so they change neither amax nor the NaN/Inf test). `vec`: whole 16-byte vectors of x and
// kVec-byte stores of q; else element by element.
template <class D>
struct QuantChunk {
  using T = typename D::T;
  static constexpr int kVec = 16 / int(sizeof(T));
  union Vec {
    int4 raw;
    T e[kVec];
  };
  Vec v[kQuantVecs];

  __device__ static int64_t first(int64_t base, int i) { return (base + int64_t(i) * blockDim.x + threadIdx.x) * kVec; }

  __device__ void load(const T* xr, int64_t K, int64_t base, bool vec) {
#pragma unroll
    for (int i = 0; i < kQuantVecs; ++i) {
      const int64_t e0 = first(base, i);
      if (vec) {
        v[i].raw = e0 < K ? ldg16(xr + e0) : make_int4(0, 0, 0, 0);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) v[i].e[j] = e0 + j < K ? xr[e0 + j] : T(0);
      }
    }
  }
  __device__ void scan(float& amax, int& bad) const {
#pragma unroll
    for (int i = 0; i < kQuantVecs; ++i)
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float f = D::to_f32(v[i].e[j]);
        bad |= !isfinite(f);
        amax = fmaxf(amax, fabsf(f));
      }
  }
  __device__ void store(int8_t* qr, int64_t K, int64_t base, bool vec, const QuantRowScale& qs) const {
#pragma unroll
    for (int i = 0; i < kQuantVecs; ++i) {
      const int64_t e0 = first(base, i);
      if (e0 >= K) continue;
      union {
        int8_t c[kVec];
        typename std::conditional<kVec == 8, uint2, uint32_t>::type packed;
      } out;
#pragma unroll
      for (int j = 0; j < kVec; ++j) out.c[j] = qs.code(D::to_f32(v[i].e[j]));
      if (vec) {
        *reinterpret_cast<decltype(out.packed)*>(qr + e0) = out.packed;
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j)
          if (e0 + j < K) qr[e0 + j] = out.c[j];
      }
    }
  }
};

template <class D>
__global__ void __launch_bounds__(kQuantVecMaxThreads) quantize_per_token_vec_kernel(
    const typename D::T* __restrict__ x, int64_t M, int64_t K, int64_t ldx, int8_t* __restrict__ q,
    float* __restrict__ scale, bool vec) {
  constexpr int kVec = QuantChunk<D>::kVec;
  const int64_t chunk = int64_t(blockDim.x) * kQuantVecs * kVec;  // elements
  QuantChunk<D> c;
  launch_dependents();  // as in quantize_per_token_kernel
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const typename D::T* xr = x + row * ldx;
    float amax = 0.0f;
    int bad = 0;
    for (int64_t k = 0; k < K; k += chunk) {
      c.load(xr, K, k / kVec, vec);
      c.scan(amax, bad);
    }
    amax = block_row_amax(amax, bad);
    const QuantRowScale qs(amax, bad);
    int8_t* qr = q + row * K;
    for (int64_t k = 0; k < K; k += chunk) {
      if (K > chunk) c.load(xr, K, k / kVec, vec);  // else the row is still in registers
      c.store(qr, K, k / kVec, vec, qs);
    }
    if (threadIdx.x == 0) scale[row] = row_scale(amax, bad);
    __syncthreads();  // block_row_amax's slots are reused by the next row
  }
}

template <class D>
void launch_quantize(const void* x, int64_t M, int64_t K, int64_t ldx, int8_t* q, float* scale, cudaStream_t s) {
  const auto xt = static_cast<const typename D::T*>(x);
  const int64_t grid = M < kMaxGridX ? M : kMaxGridX;
  int64_t warps;
  if (env_is("LOWBIT_CUDA_QUANT", "vec")) {
    constexpr int kVec = QuantChunk<D>::kVec;
    const bool vec = K % kVec == 0 && ldx % kVec == 0 && aligned16(x) && aligned16(q);
    // Enough warps that a thread holds at most kQuantVecs vectors of a row, up to 32.
    warps = ((K + kVec - 1) / kVec + 32 * kQuantVecs - 1) / (32 * kQuantVecs);
    warps = warps > kQuantVecMaxThreads / 32 ? kQuantVecMaxThreads / 32 : warps;
    quantize_per_token_vec_kernel<D><<<dim3(unsigned(grid)), dim3(unsigned(warps * 32)), 0, s>>>(xt, M, K, ldx, q,
                                                                                                 scale, vec);
    return;
  }
  // About 8 elements per thread, 1 to 16 warps.
  warps = (K + 8 * 32 - 1) / (8 * 32);
  warps = warps < 1 ? 1 : (warps > kQuantMaxThreads / 32 ? kQuantMaxThreads / 32 : warps);
  quantize_per_token_kernel<D><<<dim3(unsigned(grid)), dim3(unsigned(warps * 32)), 0, s>>>(xt, M, K, ldx, q, scale);
}

// ---------------------------------------------------------------- warp tiles
// Calls body(n0, nr, m0, mc) for each tile this warp owns: output rows
// [n0, n0 + nr) x activation rows [m0, m0 + mc), grid-stride over N blocks
// (gridDim.x) and M tiles (gridDim.y).
template <int MT, class Body>
__device__ __forceinline__ void for_each_warp_tile(int64_t M, int64_t N, Body&& body) {
  const int warp = threadIdx.x >> 5;
  const int64_t nblocks = (N + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t mtiles = (M + MT - 1) / MT;
  for (int64_t nb = blockIdx.x; nb < nblocks; nb += gridDim.x) {
    const int64_t n0 = nb * kRowsPerBlock + warp * kRowsPerWarp;
    if (n0 >= N) continue;  // warp-uniform; no block barriers below
    const int nr = int(N - n0 < kRowsPerWarp ? N - n0 : kRowsPerWarp);
    for (int64_t mt = blockIdx.y; mt < mtiles; mt += gridDim.y) {
      const int64_t m0 = mt * MT;
      body(n0, nr, m0, int(M - m0 < MT ? M - m0 : MT));
    }
  }
}

// Sums each lane's partial acc[r][m] across the warp; lane r * MT + m adds the
// total for output (m, r) to `mine`.
template <int MT, class A>
__device__ __forceinline__ void warp_reduce_tile(const A (&acc)[kRowsPerWarp][MT], int nr, int mc, float& mine) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (r < nr && m < mc) {  // warp-uniform
        const A s = warp_sum(acc[r][m]);
        if (lane == r * MT + m) mine += float(s);
      }
}

// The W8A8 epilogue, in fp32: ((acc * sx[m]) * ws[n]) + bias[n], each step one
// correctly rounded operation (the _rn intrinsics are never contracted into an
// fma), so the dp4a and the tensor-core kernels give the same bits for the same
// int32 accumulator, and both round like the reference's float arithmetic.
__device__ __forceinline__ float w8a8_value(float acc, float sxm, float wsn, bool has_bias, float b) {
  const float v = __fmul_rn(__fmul_rn(acc, sxm), wsn);
  return has_bias ? __fadd_rn(v, b) : v;
}

// ---- the tensor-core W8A8 kernels' epilogue. mma.sync and wgmma leave the same m16 x n8
// fragment per 8 columns in a thread: c[0], c[1] at row r, columns n, n + 1 (n even), and
// c[2], c[3] at row r + 8. Why not element by element: a per-element load of ws (each waited
// for before its store) and a branchy fp32 -> fp16 conversion made the epilogue cost as much
// as the whole K loop at K = 4096 (H200 sweep: ~45 us a 128 x 256 tile).

// p[n], p[n + 1] as floats (a dtype code: ws is kF32, bias any), 0 past N.
__device__ __forceinline__ float2 column_pair(const void* p, int code, int64_t n, int64_t N) {
  return make_float2(n < N ? load_f32(p, code, n) : 0.0f, n + 1 < N ? load_f32(p, code, n + 1) : 0.0f);
}

// Two adjacent elements in one 4-byte (16-bit types) or 8-byte (fp32) store.
template <class D>
__device__ __forceinline__ void store_pair(typename D::T* p, float v0, float v1) {
  if constexpr (std::is_same_v<typename D::T, float>)
    *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
  else
    *reinterpret_cast<uint32_t*>(p) = from_f32x2<D>(v0, v1);
}

template <class D>
struct W8A8Out {
  using T = typename D::T;
  T* y;
  int64_t ldy, M, N;
  bool pairs;  // every even column of every row starts an aligned pair: store_pair

  __device__ W8A8Out(T* y_, int64_t ldy_, int64_t M_, int64_t N_)
      : y(y_), ldy(ldy_), M(M_), N(N_),
        pairs((reinterpret_cast<uintptr_t>(y_) | uintptr_t(ldy_) * sizeof(T)) % (2 * sizeof(T)) == 0) {}

  // Whether rows [m, m_end) and columns [n, n_end) (n even) all lie inside y with aligned
  // pairs: the tile's stores need no checks (kChecked = false below).
  __device__ __forceinline__ bool inside(int64_t m_end, int64_t n_end) const {
    return pairs && m_end <= M && n_end <= N;
  }

  // y[m, n] = v0 and y[m, n + 1] = v1 (n even): where inside y if kChecked, else both are.
  template <bool kChecked>
  __device__ __forceinline__ void store2(int64_t m, int64_t n, float v0, float v1) const {
    T* p = y + m * ldy + n;
    if (!kChecked) return store_pair<D>(p, v0, v1);
    if (m >= M) return;
    if (pairs && n + 1 < N) {
      store_pair<D>(p, v0, v1);
    } else {
      if (n < N) p[0] = D::from_f32(v0);
      if (n + 1 < N) p[1] = D::from_f32(v1);
    }
  }

  // The fragment c of rows r, r + 8 (sx: sxr) and columns n, n + 1 (ws, bias: wsn, bn).
  template <bool kChecked>
  __device__ __forceinline__ void fragment(const int* c, int64_t r, int64_t n, const float (&sxr)[2], float2 wsn,
                                           float2 bn, bool has_bias) const {
#pragma unroll
    for (int h = 0; h < 2; ++h)
      store2<kChecked>(r + 8 * h, n, w8a8_value(float(c[2 * h]), sxr[h], wsn.x, has_bias, bn.x),
                       w8a8_value(float(c[2 * h + 1]), sxr[h], wsn.y, has_bias, bn.y));
  }
};

// Lane r * MT + m writes y[m0 + m, n0 + r] = mine * sx[m0 + m] (if sx) * ws[n] + bias[n].
template <class D, int MT>
__device__ __forceinline__ void store_tile(float mine, int64_t n0, int nr, int64_t m0, int mc, const float* sx,
                                           const float* ws, const void* bias, int bias_dtype,
                                           typename D::T* y, int64_t ldy) {
  const int lane = threadIdx.x & 31, r = lane / MT, m = lane % MT;
  if (lane < kRowsPerWarp * MT && r < nr && m < mc) {
    const int64_t n = n0 + r;
    float v;
    if (sx) {
      v = w8a8_value(mine, sx[m0 + m], ws[n], bias != nullptr, bias ? load_f32(bias, bias_dtype, n) : 0.0f);
    } else {
      v = mine * ws[n];
      if (bias) v += load_f32(bias, bias_dtype, n);
    }
    y[(m0 + m) * ldy + n] = D::from_f32(v);
  }
}

// ---------------------------------------------------------------- W8A16
template <class D, int MT, bool VEC>
__global__ void __launch_bounds__(kThreads)
    w8a16_kernel(const typename D::T* __restrict__ x, int64_t M, int64_t K, int64_t ldx,
                 const int8_t* __restrict__ qw, const float* __restrict__ ws, int64_t N,
                 const void* __restrict__ bias, int bias_dtype, typename D::T* __restrict__ y, int64_t ldy) {
  using T = typename D::T;
  const int lane = threadIdx.x & 31;
  for_each_warp_tile<MT>(M, N, [&](int64_t n0, int nr, int64_t m0, int mc) {
    const T* xt = x + m0 * ldx;
    float acc[kRowsPerWarp][MT];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[r][m] = 0.0f;

    if constexpr (VEC) {
#pragma unroll(MT <= 4 ? 2 : 1)
      for (int64_t k0 = int64_t(lane) * kVecK; k0 < K; k0 += kStepVec) {
        float w[kRowsPerWarp][kVecK];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          if (r < nr) {
            i8x16_to_f32(ldg16(qw + (n0 + r) * K + k0), w[r]);
          } else {
#pragma unroll
            for (int j = 0; j < kVecK; ++j) w[r][j] = 0.0f;
          }
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < mc) {
            float xv[kVecK];
            load_x16<D>(xt + m * ldx + k0, xv);
#pragma unroll
            for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
              for (int j = 0; j < kVecK; ++j) acc[r][m] = fmaf(xv[j], w[r][j], acc[r][m]);
          }
        }
      }
    } else {
      for (int64_t k = lane; k < K; k += 32) {
        float w[kRowsPerWarp];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) w[r] = r < nr ? float(qw[(n0 + r) * K + k]) : 0.0f;
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < mc) {
            const float xv = D::to_f32(xt[m * ldx + k]);
#pragma unroll
            for (int r = 0; r < kRowsPerWarp; ++r) acc[r][m] = fmaf(xv, w[r], acc[r][m]);
          }
        }
      }
    }
    float mine = 0.0f;
    warp_reduce_tile<MT>(acc, nr, mc, mine);
    store_tile<D, MT>(mine, n0, nr, m0, mc, nullptr, ws, bias, bias_dtype, y, ldy);
  });
}

// The weight format of woq_kernel (woq_mma.cuh) for W8A16: the canonical int8 [N, K] rows
// (K % 16 == 0, 16-byte aligned), the per-channel scale applied to the fp32 sums. Per tile
// a lane copies the 16 codes k = 64 t + 16 tig .. + 16 of rows na and na + 8 (woq's k order:
// word j of a row holds step j's slot pairs, bytes 0, 1 for B register 0 and 2, 3 for 1);
// codes become fp16 / bf16 exactly (ptx::CodePair).
struct Int8W {
  struct Ring {
    uint4 w[woq::kWarps][woq::kStages][2][32];
  };
  struct Tile {
    uint4 w[2];
  };
  // A lane's walk along rows na and na + 8 of its column tile, one tile per issue.
  struct Cursor : woq::CpAsyncSync {
    const int8_t* base;  // any valid address, for copies that read nothing
    const int8_t* row;   // row na at the lane's first k of the next tile to issue
    int64_t ld8;         // 8 K: from row na to row na + 8
    int left;            // codes of the row from there to K
    bool ok[2];          // rows na, na + 8 exist
    __device__ Cursor(const woq::Args& a, int64_t nt, int64_t t_begin, int lane) {
      const int64_t na = nt * woq::kTileN + (lane >> 2), k = t_begin * woq::kTileK + 16 * (lane & 3);
      base = static_cast<const int8_t*>(a.qweight);
      ok[0] = na < a.N, ok[1] = na + 8 < a.N;
      row = base + (ok[0] ? na * a.K + k : 0);
      ld8 = 8 * a.K;
      left = int(a.K - k);
    }
    __device__ void issue(Ring& r, int warp, int slot, int lane) {
      uint4* dst = &r.w[warp][slot][0][lane];  // sub 1: 32 slots on
      if (ok[1] && left >= 16) {  // both rows, 16 codes each: plain copies (all but the edges)
        ptx::cp_async16(ptx::smem_addr(dst), row);
        ptx::cp_async16(ptx::smem_addr(dst + 32), row + ld8);
      } else {  // the first (n) codes of each row that exists, zeros after them
        const int n = left < 0 ? 0 : left > 16 ? 16 : left;
#pragma unroll
        for (int sub = 0; sub < 2; ++sub) {
          const bool live = ok[sub] && n > 0;
          ptx::cp_async16_zfill_n(dst + 32 * sub, live ? row + sub * ld8 : base, live ? n : 0);
        }
      }
      row += woq::kTileK;
      left -= woq::kTileK;
    }
  };
  template <class R>  // (Int8WBulk's ring too: the same slots, plus its barriers)
  __device__ static Tile read(const R& r, int warp, int slot, int lane) {
    return {{r.w[warp][slot][0][lane], r.w[warp][slot][1][lane]}};
  }
  template <class D>
  __device__ static void dequant(const Tile& t, uint32_t (&b)[4][2][2]) {
#pragma unroll
    for (int sub = 0; sub < 2; ++sub) {
      const uint32_t words[4] = {t.w[sub].x, t.w[sub].y, t.w[sub].z, t.w[sub].w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t u = words[j] ^ ptx::CodePair<D>::kFlip;
        b[j][sub][0] = ptx::CodePair<D>::template get<0, 1>(u);
        b[j][sub][1] = ptx::CodePair<D>::template get<2, 3>(u);
      }
    }
  }
  __device__ static float finish(const woq::Args& a, int64_t n, float v) {
    return v * static_cast<const float*>(a.scales)[n];
  }
};

// The same format with each tile copied by one TMA box (woq::BulkSync; sm_90a, opt-in:
// LOWBIT_CUDA_WOQ_COPY=bulk, M <= 16): the box of 64 k x 16 rows at (64 t, 16 nt) of the
// weights' tensor map lands row-major, row 8 sub + gid at 64 (8 sub + gid) + 16 tig, which is
// Int8W's slot layout [sub][lane]; rows past N and k past K arrive as zeros, as with the
// zero-filling cp.async. Lane 0 issues it.
struct Int8WBulk : Int8W {  // Int8W's Tile, read, dequant and finish; its own ring and cursor
  struct alignas(128) Ring {  // (TMA writes 128-byte aligned boxes)
    uint4 w[woq::kWarps][woq::kStages][2][32];
    uint64_t bar[woq::kWarps][woq::kStages];
  };
  struct Cursor : woq::BulkSync {
    int k0, n0;  // the next tile's first k and row
    __device__ Cursor(const woq::Args&, int64_t nt, int64_t t_begin, int)
        : k0(int(t_begin) * woq::kTileK), n0(int(nt) * woq::kTileN) {}
    __device__ void issue(Ring& r, int warp, int slot, int lane) {
#if defined(LOWBIT_WGMMA)
      if (lane == 0) {
        wgmma::mbar_arrive_expect_tx(&r.bar[warp][slot], sizeof(r.w[0][0]));
        wgmma::tma_load_2d(&r.w[warp][slot][0][0], map, k0, n0, &r.bar[warp][slot]);
      }
#else
      (void)r, (void)warp, (void)slot, (void)lane;
#endif
      k0 += woq::kTileK;
    }
  };
};

// ---------------------------------------------------------------- W8A8
template <class D, int MT, bool VEC>
__global__ void __launch_bounds__(kThreads)
    w8a8_kernel(const int8_t* __restrict__ qx, const float* __restrict__ sx, int64_t M, int64_t K,
                const int8_t* __restrict__ qw, const float* __restrict__ ws, int64_t N,
                const void* __restrict__ bias, int bias_dtype, typename D::T* __restrict__ y, int64_t ldy) {
  const int lane = threadIdx.x & 31;
  wait_prerequisites();  // the quantizer's qx, sx (see overlaps_quantizer)
  for_each_warp_tile<MT>(M, N, [&](int64_t n0, int nr, int64_t m0, int mc) {
    const int8_t* xt = qx + m0 * K;  // scratch rows are contiguous
    float mine = 0.0f;
    for (int64_t kc = 0; kc < K; kc += kChunkK) {
      const int64_t kend = K - kc < kChunkK ? K : kc + kChunkK;
      int acc[kRowsPerWarp][MT];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = 0;

      if constexpr (VEC) {
#pragma unroll(MT <= 4 ? 2 : 1)
        for (int64_t k0 = kc + int64_t(lane) * kVecK; k0 < kend; k0 += kStepVec) {
          int4 w[kRowsPerWarp];
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) w[r] = r < nr ? ldg16(qw + (n0 + r) * K + k0) : make_int4(0, 0, 0, 0);
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            if (m < mc) {
              const int4 a = ldg16(xt + m * K + k0);
#pragma unroll
              for (int r = 0; r < kRowsPerWarp; ++r) {
                acc[r][m] = __dp4a(a.x, w[r].x, acc[r][m]);
                acc[r][m] = __dp4a(a.y, w[r].y, acc[r][m]);
                acc[r][m] = __dp4a(a.z, w[r].z, acc[r][m]);
                acc[r][m] = __dp4a(a.w, w[r].w, acc[r][m]);
              }
            }
          }
        }
      } else {
        for (int64_t k0 = kc + int64_t(lane) * 4; k0 < kend; k0 += kStepQuad) {
          int w[kRowsPerWarp];
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) w[r] = r < nr ? load_i8x4(qw + (n0 + r) * K, k0, K) : 0;
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            if (m < mc) {
              const int a = load_i8x4(xt + m * K, k0, K);
#pragma unroll
              for (int r = 0; r < kRowsPerWarp; ++r) acc[r][m] = __dp4a(a, w[r], acc[r][m]);
            }
          }
        }
      }
      warp_reduce_tile<MT>(acc, nr, mc, mine);  // int32 chunk sums, exact, added in fp32
    }
    store_tile<D, MT>(mine, n0, nr, m0, mc, sx, ws, bias, bias_dtype, y, ldy);
  });
}

// ---------------------------------------------------------------- W8A8, tensor-core decode (M <= 8)
// LOWBIT_CUDA_W8A8_DECODE=mma (opt-in, compile-verified only): the decode product on int8
// tensor cores, with nothing to dequantize. A block owns 16 output columns and its kWarps
// warps split K (a quarter of the k tiles each, so that N = 4096 still gives 256 blocks x 4
// streams); each warp streams its weight rows through W8A16's cp.async ring (Int8W: a lane's
// 16 codes of rows na, na + 8 per 64-k tile) and runs the swapped product of woq's M <= 8
// kernel, y^T = W . q(x)^T, on mma.m16n8k32 s8: per 64-k tile two steps s, whose A are the
// weight words 2 s and 2 s + 1 of both rows and B the same words of the lane's 16 codes of
// activation row gid. (Slot group 4 tig .. 4 tig + 3 of step s is real k 16 tig + 8 s .. + 3,
// group 16 + 4 tig .. is k 16 tig + 8 s + 4 .. + 7, for A and B alike: the slots cover each k
// once.) The warps' int32 sums add exactly through shared memory, and the epilogue is every
// W8A8 kernel's (w8a8_value): the same bits as the dp4a kernel. Needs K % 16 == 0 (the
// activation rows load 16 codes at a time), K <= kChunkK (one exact int32 sum), qx and
// qweight 16-byte aligned.
template <class D>
__global__ void __launch_bounds__(woq::kThreads, woq::kBlocksPerSm)
    w8a8_decode_kernel(const int8_t* __restrict__ qx, const float* __restrict__ sx, int64_t M, int64_t K,
                       const int8_t* __restrict__ qw, const float* __restrict__ ws, int64_t N,
                       const void* __restrict__ bias, int bias_dtype, typename D::T* __restrict__ y, int64_t ldy) {
  using woq::kStages;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
  const int64_t nt = blockIdx.x;  // this block's 16 columns
  __shared__ Int8W::Ring ring;
  __shared__ int sums[woq::kWarps][32][4];
  woq::Args a{};  // what Int8W's cursor reads
  a.qweight = qw, a.N = N, a.K = K;
  const int ktiles = int((K + woq::kTileK - 1) / woq::kTileK), per = (ktiles + woq::kWarps - 1) / woq::kWarps;
  const int t0 = min(warp * per, ktiles), count = min(per, ktiles - t0);  // this warp's k tiles
  int acc[4] = {0, 0, 0, 0};
  Int8W::Cursor cur(a, nt, t0, lane);
  auto issue = [&](int i) {  // tile i into slot i % kStages
    if (i < count) cur.issue(ring, warp, i & (kStages - 1), lane);
    cur.commit();
  };
  for (int i = 0; i < kStages - 1; ++i) issue(i);
  wait_prerequisites();  // the weights above need not wait for the quantizer; qx, sx do (overlaps_quantizer)
  // Row gid of q(x) (row M - 1 past M: its products land only in outputs that are not stored),
  // the lane's 16 codes of each tile, one tile ahead; zeros past K (the weights are zero there).
  const int k_lane = t0 * woq::kTileK + 16 * tig;
  const int8_t* xp = qx + (gid < M ? gid : M - 1) * K + k_lane;
  auto load_x = [&](int i) {
    return k_lane + i * woq::kTileK < K ? ldg16(xp + i * woq::kTileK) : make_int4(0, 0, 0, 0);
  };
  int4 x_next = count > 0 ? load_x(0) : make_int4(0, 0, 0, 0);
  for (int i = 0; i < count; ++i) {
    cur.wait(ring, warp, i & (kStages - 1));
    const Int8W::Tile w = Int8W::read(ring, warp, i & (kStages - 1), lane);
    issue(i + kStages - 1);  // into the slot tile i - 1 used (already read)
    const int4 x = x_next;
    if (i + 1 < count) x_next = load_x(i + 1);
    const uint32_t w0[4] = {w.w[0].x, w.w[0].y, w.w[0].z, w.w[0].w}, w1[4] = {w.w[1].x, w.w[1].y, w.w[1].z, w.w[1].w};
    const uint32_t xs[4] = {uint32_t(x.x), uint32_t(x.y), uint32_t(x.z), uint32_t(x.w)};
#pragma unroll
    for (int st = 0; st < 2; ++st) {
      const uint32_t wa[4] = {w0[2 * st], w1[2 * st], w0[2 * st + 1], w1[2 * st + 1]};
      ptx::mma_s8(acc, wa, xs[2 * st], xs[2 * st + 1]);
    }
  }
  cur.drain();
#pragma unroll
  for (int e = 0; e < 4; ++e) sums[warp][lane][e] = acc[e];
  __syncthreads();
  if (warp != 0) return;
  // acc[e]: column nt * 16 + gid + 8 (e >> 1), row 2 tig + (e & 1)
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    int sum = 0;
#pragma unroll
    for (int w = 0; w < woq::kWarps; ++w) sum += sums[w][lane][e];
    const int64_t n = nt * woq::kTileN + gid + 8 * (e >> 1), m = 2 * tig + (e & 1);
    if (m < M && n < N)
      y[m * ldy + n] = D::from_f32(w8a8_value(float(sum), sx[m], ws[n], bias != nullptr,
                                              bias ? load_f32(bias, bias_dtype, n) : 0.0f));
  }
}

// ---------------------------------------------------------------- W8A8, tensor cores (large M)
// y = (qx . qweight^T) * sx[m] * ws[n] + bias[n] with mma.sync.m16n8k32 s8 x s8 -> s32.
// Used when M >= kMinM (64: below that the dp4a kernel above, tuned for decode-size
// M, won or tied when measured, and a 128-row tile is mostly padding; an experiment,
// LOWBIT_CUDA_W8A8_MIN_M=16 lowers it to 16, where the dp4a kernel measured 0.25-0.35x
// fp16 cuBLAS on an H200 while the tensor-core kernels' epilogue then was slow), K % 16 == 0 (every
// row of qx and qweight is a run of whole 16-byte cp.async chunks), K <= kChunkK
// (the int32 accumulators cannot overflow, and equal the dp4a kernel's single int32
// chunk sum, so both paths give the same bits) and qx, qweight 16-byte aligned.
//
// Tiling: a CTA computes a kBM x kBN = 128 x 128 tile of y, walking K in kBK = 64
// byte (= 64 int8) steps through a kStages = 4 deep cp.async ring in dynamic shared
// memory (4 x (128 + 128) x 64 B = 64 KiB; two CTAs fit an SM). 8 warps as 2 (M) x 4
// (N), each a 64 x 32 warp tile = 4 x 4 mma tiles of m16n8, 64 int32 accumulators per
// thread. Per k32 step a warp loads its A fragments with 4 ldmatrix.x4 (one per m16:
// the 16 x 32 B A tile is a 16 x 16 b16 tile) and its B fragments with 2 ldmatrix.x4
// (one per pair of n8 tiles: qweight rows [n][k] are K-major, which is what the "col"
// B operand wants, so no .trans), then issues 16 mma.
// Shared tiles are rows of 64 B = four 16-byte chunks; chunk c of row r is stored at
// chunk c ^ ((r >> 1) & 3), so the 8 row addresses of each 8x8 ldmatrix matrix (8
// consecutive rows, one logical chunk) fall in 8 distinct 16-byte bank groups.
// Ragged edges: rows past M / N and chunks past K are zero-filled by cp.async (no
// global read), so they add 0; stores are guarded by m < M, n < N. Tiles are visited
// in groups of kGroupM row tiles (tile id -> (row tile, column tile) column-major
// inside a group) so CTAs running together share A and B tiles in L2; the grid is
// capped at 2^31 - 1 CTAs and strides over tiles beyond that.
//
// Roofline (M = 2048, N = K = 4096, H100 SXM): 2*M*N*K = 68.7 G int8 ops. Dense int8
// peak is ~1979 TOPS, but only through wgmma (sm_90a); mma.sync, used here, is the
// Ampere-style path and reaches a fraction of that on Hopper (roughly 60 % of peak at
// best in published microbenchmarks), i.e. ~35 us at peak, ~60 us at mma.sync's
// ceiling. fp16 cuBLAS F.linear at this shape takes ~0.1 ms (~690 TFLOPS). The
// per-token quantizer adds a pass over x (16 MiB read + 8 MiB written at fp16, ~10 us).
// Reaching 1.6x fp16 F.linear (<= ~62 us in all) needs this kernel near mma.sync's
// ceiling; the next step is a wgmma + TMA mainloop on sm_90a.
namespace mma_tc {
constexpr int kBM = 128, kBN = 128, kBK = 64;  // tile of y; k bytes (= int8 elements) per stage
constexpr int kStages = 4;
constexpr int kWarpsM = 2, kWarpsN = 4;
constexpr int kThreads = kWarpsM * kWarpsN * 32;
constexpr int kWM = kBM / kWarpsM, kWN = kBN / kWarpsN;  // warp tile 64 x 32
constexpr int kMTiles = kWM / 16, kNTiles = kWN / 8;     // m16 x n8 mma tiles per warp
constexpr int kChunks = kBK / 16;                        // 16-byte chunks per tile row
constexpr int kLoadsA = kBM * kChunks / kThreads;        // cp.async per thread per stage
constexpr int kLoadsB = kBN * kChunks / kThreads;
constexpr int kRowStep = kThreads / kChunks;             // tile rows between a thread's chunks
constexpr int kBytesA = kBM * kBK, kBytesB = kBN * kBK;
constexpr int kStageBytes = kBytesA + kBytesB;
constexpr int kSmemBytes = kStages * kStageBytes;
constexpr int64_t kMinM = 64;

static_assert(kChunks == 4, "the swizzle below permutes the 4 chunks of a 64-byte row");
static_assert(kWM % 16 == 0 && kWN % 16 == 0, "A: one ldmatrix.x4 per m16; B: one per n16");
static_assert(kBK % 32 == 0, "whole k32 mma steps");
static_assert(kBM * kChunks % kThreads == 0 && kBN * kChunks % kThreads == 0, "whole loads per thread");
static_assert(kStages >= 2, "pipeline depth");

// Byte offset of chunk `chunk` (16 B) of row `row` in a tile of 64-byte rows.
__device__ __forceinline__ int swz(int row, int chunk) { return row * kBK + ((chunk ^ ((row >> 1) & 3)) << 4); }
}  // namespace mma_tc

// The tensor-core GEMMs' tile order: kGroupM row tiles x all column tiles, column-major
// inside the group (so a wave of CTAs shares weight tiles in L2). Tile indices (m, n).
__device__ __forceinline__ void grouped_tile(int64_t tile, int64_t tiles_m, int64_t tiles_n, int64_t& m,
                                             int64_t& n) {
  constexpr int64_t kGroupM = 8;
  const int64_t per_group = kGroupM * tiles_n;
  const int64_t group = tile / per_group;
  const int64_t first_m = group * kGroupM;
  const int64_t group_m = tiles_m - first_m < kGroupM ? tiles_m - first_m : kGroupM;
  const int64_t in_group = tile - group * per_group;  // < group_m * tiles_n
  m = first_m + in_group % group_m;
  n = in_group / group_m;
}

template <class D>
__global__ void __launch_bounds__(mma_tc::kThreads, 2)
    w8a8_mma_kernel(const int8_t* __restrict__ qx, const float* __restrict__ sx, int64_t M, int64_t K,
                    const int8_t* __restrict__ qw, const float* __restrict__ ws, int64_t N,
                    const void* __restrict__ bias, int bias_dtype, typename D::T* __restrict__ y, int64_t ldy) {
  using namespace mma_tc;
  namespace ptx = lowbit::cuda::ptx;
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int ld_row = tid / kChunks, ld_chunk = tid % kChunks;  // this thread's first chunk of a stage
  const int64_t tiles_m = (M + kBM - 1) / kBM, tiles_n = (N + kBN - 1) / kBN;
  const int64_t ntiles = tiles_m * tiles_n;
  const int ktiles = int((K + kBK - 1) / kBK);  // K <= kChunkK
  wait_prerequisites();  // the quantizer's qx, sx (see overlaps_quantizer)

  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    int64_t m0, n0;
    grouped_tile(tile, tiles_m, tiles_n, m0, n0);
    m0 *= kBM, n0 *= kBN;

    // Stage `stage` <- k tile kt of A (qx rows m0..) and B (qweight rows n0..).
    auto load_stage = [&](int stage, int kt) {
      uint8_t* sa = smem + stage * kStageBytes;
      uint8_t* sb = sa + kBytesA;
      const int64_t k = int64_t(kt) * kBK + ld_chunk * 16;
      const bool kin = k < K;  // K % 16 == 0: a chunk is all in or all out
#pragma unroll
      for (int i = 0; i < kLoadsA; ++i) {
        const int r = ld_row + i * kRowStep;
        const bool ok = kin && m0 + r < M;
        ptx::cp_async16_zfill(sa + swz(r, ld_chunk), ok ? qx + (m0 + r) * K + k : qx, ok);
      }
#pragma unroll
      for (int i = 0; i < kLoadsB; ++i) {
        const int r = ld_row + i * kRowStep;
        const bool ok = kin && n0 + r < N;
        ptx::cp_async16_zfill(sb + swz(r, ld_chunk), ok ? qw + (n0 + r) * K + k : qw, ok);
      }
    };

    int acc[kMTiles][kNTiles][4];
#pragma unroll
    for (int i = 0; i < kMTiles; ++i)
#pragma unroll
      for (int j = 0; j < kNTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

    // Prologue: k tiles 0 .. kStages-2, one commit group each (empty past the end,
    // so that group g always holds k tile g).
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < ktiles) load_stage(s, s);
      ptx::cp_async_commit();
    }

    for (int kt = 0; kt < ktiles; ++kt) {
      // kStages-1+kt groups committed; all but the newest kStages-2 done -> group kt
      // (k tile kt) has landed for this thread; the barrier makes it everyone's, and
      // ensures every warp finished computing k tile kt-1, whose stage is refilled next.
      ptx::cp_async_wait<kStages - 2>();
      __syncthreads();
      const int next = kt + kStages - 1;
      if (next < ktiles) load_stage(next % kStages, next);
      ptx::cp_async_commit();

      const uint8_t* sa = smem + (kt % kStages) * kStageBytes;
      const uint8_t* sb = sa + kBytesA;
#pragma unroll
      for (int ks = 0; ks < kBK / 32; ++ks) {
        // A, m16 x k32: matrices (rows 0-7, k 0-15), (rows 8-15, k 0-15), (rows 0-7,
        // k 16-31), (rows 8-15, k 16-31) = a0..a3; lane l addresses row l & 15, chunk l >> 4.
        uint32_t a[kMTiles][4];
#pragma unroll
        for (int i = 0; i < kMTiles; ++i)
          ptx::ldmatrix_x4(a[i], sa + swz(wm * kWM + i * 16 + (lane & 15), ks * 2 + (lane >> 4)));
        // B, two n8 tiles x k32: matrices (n 0-7, k 0-15) = b0 and (n 0-7, k 16-31) = b1
        // of n tile 2j, then the same for n 8-15 (n tile 2j+1); lane l addresses
        // n row (l & 7) + 8 * (l >> 4), chunk (l >> 3) & 1.
        uint32_t b[kNTiles][2];
#pragma unroll
        for (int j = 0; j < kNTiles / 2; ++j) {
          uint32_t r[4];
          ptx::ldmatrix_x4(r, sb + swz(wn * kWN + j * 16 + (lane & 7) + ((lane >> 4) << 3),
                                      ks * 2 + ((lane >> 3) & 1)));
          b[2 * j][0] = r[0];
          b[2 * j][1] = r[1];
          b[2 * j + 1][0] = r[2];
          b[2 * j + 1][1] = r[3];
        }
#pragma unroll
        for (int i = 0; i < kMTiles; ++i)
#pragma unroll
          for (int j = 0; j < kNTiles; ++j) ptx::mma_s8(acc[i][j], a[i], b[j][0], b[j][1]);
      }
    }
    ptx::cp_async_wait<0>();  // only empty groups can be pending; keep the count clean
    __syncthreads();          // every warp is done reading shared memory before the next tile's prologue

    // Epilogue from the accumulator fragments (W8A8Out), every load issued before the stores.
    const int g = lane >> 2, t = lane & 3;
    const W8A8Out<D> out(y, ldy, M, N);
    float2 wsv[kNTiles], bv[kNTiles];
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
      const int64_t n = n0 + wn * kWN + j * 8 + 2 * t;
      wsv[j] = column_pair(ws, kF32, n, N);
      bv[j] = bias ? column_pair(bias, bias_dtype, n, N) : make_float2(0.0f, 0.0f);
    }
    auto store = [&](auto checked) {
#pragma unroll
      for (int i = 0; i < kMTiles; ++i) {
        const int64_t r = m0 + wm * kWM + i * 16 + g;
        const float sxr[2] = {r < M ? sx[r] : 0.0f, r + 8 < M ? sx[r + 8] : 0.0f};
#pragma unroll
        for (int j = 0; j < kNTiles; ++j)
          out.template fragment<decltype(checked)::value>(acc[i][j], r, n0 + wn * kWN + j * 8 + 2 * t, sxr, wsv[j],
                                                          bv[j], bias != nullptr);
      }
    };
    if (out.inside(m0 + kBM, n0 + kBN))
      store(std::false_type{});
    else
      store(std::true_type{});
  }
}

// The epilogue of a warpgroup's 64 x BN wgmma accumulators: acc[4 i .. 4 i + 3] is the
// m16 x n8 fragment of columns n0 + 8 i .. and this warp's rows r, r + 8 (sx: sxr); fs holds
// ws and bias of the tile's BN columns (staged in shared memory, see w8a8_tma_kernel).
template <class D, int BN, bool kChecked>
__device__ __forceinline__ void store_wgmma_tile(const int (&acc)[BN / 2], int64_t r, int64_t n0, const float (&sxr)[2],
                                                 const float* fs, bool has_bias, const W8A8Out<D>& out) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int i = 0; i < BN / 8; ++i) {
    const int c = 8 * i + 2 * t;
    out.template fragment<kChecked>(acc + 4 * i, r, n0 + c, sxr, *reinterpret_cast<const float2*>(fs + c),
                                    *reinterpret_cast<const float2*>(fs + BN + c), has_bias);
  }
}

// ---------------------------------------------------------------- W8A8, Hopper TMA + wgmma
// The same GEMM as w8a8_mma_kernel (same 128 x BN tiles, tile order, epilogue, so the same
// bits) on sm_90a's warpgroup MMA (wgmma.m64nBNk32, s8 x s8 -> s32, both operands read from
// shared memory by descriptor), organised the way Hopper is meant to be fed. Why: mma.sync
// reaches about half of Hopper's int8 tensor peak. BN = 256 where such tiles give every SM
// one, else 128: per stage the SM's shared memory takes the copies plus every wgmma's operand
// reads, 80 KB per 512 cycles of tensor work at BN = 128 (above its 128 B/cycle), 128 KB per
// 1024 at BN = 256.
//   * Persistent: one CTA per SM walks the tiles (grouped_tile order, grid stride).
//   * Warp-specialized: warpgroup 0 is the producer, in which one thread issues, per k stage,
//     two TMA copies (a 128 x 128-byte box of qx, a BN x 128 box of qweight; the tensor
//     maps give the 128-byte swizzle wgmma reads and zero-fill past M, N and K); warpgroups 1
//     and 2 each multiply 64 rows with four m64nBNk32 wgmma per stage.
//   * The ring: 4 stages of 48 KB (BN = 256) or 6 of 32 KB, each with a "full" mbarrier (the
//     producer's expect_tx arrival + the bytes TMA delivers) and an "empty" one (one arrival
//     per consumer warpgroup once its wgmma of that stage finished: wait_group 1 after the
//     next stage's batch). The producer runs ahead across tiles, so the next tile's first
//     stages load while the consumers store this one. dev/lane_models/w8a8_tma_ring.py models
//     this protocol under random schedules of the copies and mma batches.
//   * CL = 2 or 4 (LOWBIT_CUDA_W8A8=cluster / cluster4, opt-in until a GPU has timed them):
//     clusters of CL CTAs take the CL tiles (CL p + rank, n) stacked along M together, and
//     each CTA's producer copies its 1 / CL of the shared weight box (BN / CL rows) into every
//     CTA's stage at once (TMA multicast): 48 -> 32 (CL = 2) or 24 KB (CL = 4) read from L2
//     per stage and CTA. Why: the H200 sweep's K loop ran at ~0.9 us per 128 x 256 x 128
//     stage, ~55% of the int8 peak, while its copies drew ~7 TB/s from L2 over the 132 SMs,
//     about what Hopper's L2 delivers; at the int8 peak (~0.56 us a stage) 32 KB a stage would
//     still draw ~7.5 TB/s, 24 KB ~5.6. A stage is then written by all CL producers, so each
//     consumer releases it on the "empty" barrier of every CTA of the cluster (remote
//     arrivals: 2 x CL per use), and a CTA exits only after its peers (cluster barrier).
// Its weak spot: both consumer warpgroups store a tile together, so the tensor cores idle
// during each epilogue; where tiles are many and K short, mma.sync's two CTAs per SM
// (one computing while the other stores) won before the epilogue was made cheap (see
// int8_linear_w8a8).
namespace wgmma_ws {
constexpr int kBM = 128, kBK = 128;  // rows of y per tile; k bytes per stage (one swizzle row)
constexpr int kConsumers = 2;        // warpgroups of 64 rows
constexpr int kThreads = (kConsumers + 1) * 128;
constexpr int kBytesA = kBM * kBK;
template <int BN> constexpr int kStage = kBytesA + BN * kBK;
template <int BN> constexpr int kStages = 196608 / kStage<BN>;  // a 192 KB ring
template <int BN>  // the ring, its barriers, each consumer's ws and bias of a tile (fp32), room to align
constexpr int kSmemBytes = kStages<BN> * kStage<BN> + 2 * kStages<BN> * 8 + kConsumers * 2 * BN * 4 + 1024;
static_assert(kBytesA % 1024 == 0 && kStage<128> % 1024 == 0, "tiles start swizzle atoms");
}  // namespace wgmma_ws

template <class D, int BN, int CL>
__global__ void __launch_bounds__(wgmma_ws::kThreads, 1)
    w8a8_tma_kernel(const __grid_constant__ CUtensorMap map_x, const __grid_constant__ CUtensorMap map_w,
                    const float* __restrict__ sx, int64_t M, int64_t K, const float* __restrict__ ws, int64_t N,
                    const void* __restrict__ bias, int bias_dtype, typename D::T* __restrict__ y, int64_t ldy) {
#if defined(LOWBIT_WGMMA)
  using namespace wgmma_ws;
  constexpr int kStage = wgmma_ws::kStage<BN>, kStages = wgmma_ws::kStages<BN>;
  constexpr int kRowsW = BN / CL;  // weight rows each CTA of a cluster copies per stage
  static_assert(CL == 1 || CL == 2 || CL == 4, "clusters of 1, 2 or 4 CTAs");
  static_assert(kRowsW * kBK % 1024 == 0, "each CTA's piece of the weight box starts a swizzle atom");
  extern __shared__ __align__(16) uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (ptx::smem_addr(smem_raw) & 1023)) & 1023);  // 1024-byte aligned
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kStage);
  uint64_t* empty = full + kStages;
  float* factors = reinterpret_cast<float*>(empty + kStages);
  const int tid = threadIdx.x, wg = tid >> 7;
  const uint32_t rank = CL > 1 ? wgmma::cluster_ctarank() : 0;
  // A cluster walks groups of CL tiles stacked along M (the same n0): tile (CL g_m + rank, n).
  const int64_t tiles_m = (M + kBM - 1) / kBM, tiles_n = (N + BN - 1) / BN;
  const int64_t groups_m = (tiles_m + CL - 1) / CL, groups = groups_m * tiles_n;
  const int64_t first = blockIdx.x / CL, stride = gridDim.x / CL;
  const int ktiles = int((K + kBK - 1) / kBK);
  auto tile_of = [&](int64_t group, int64_t& m0, int64_t& n0) {
    grouped_tile(group, groups_m, tiles_n, m0, n0);
    m0 = m0 * CL + rank;  // past tiles_m for the last CTAs of a last, partial group: all rows
  };                      // zero-filled, nothing stored
  if (tid == 0) {
    for (int st = 0; st < kStages; ++st) {
      wgmma::mbar_init(full + st, 1);
      wgmma::mbar_init(empty + st, kConsumers * CL);
    }
    wgmma::mbar_init_fence();
  }
  if constexpr (CL > 1)
    wgmma::cluster_sync();  // the peer's barriers exist before anything lands in or arrives on them
  else
    __syncthreads();
  wait_prerequisites();  // the quantizer's qx, sx (see overlaps_quantizer)

  // Both roles walk the same (tile, k tile) sequence through the ring: stage st, and the
  // parity of the stage's current use.
  int st = 0;
  uint32_t parity = 0;
  auto advance = [&] {
    if (++st == kStages) st = 0, parity ^= 1;
  };
  if (wg == 0) {
    if (tid == 0) {  // the producer is one thread
      wgmma::tma_prefetch_map(&map_x);
      wgmma::tma_prefetch_map(&map_w);
      for (int64_t group = first; group < groups; group += stride) {
        int64_t m0, n0;
        tile_of(group, m0, n0);
        for (int kt = 0; kt < ktiles; ++kt, advance()) {
          wgmma::mbar_wait(empty + st, parity ^ 1);  // every consumer writing-to-be is done with the stage's last use
          uint8_t* sa = smem + st * kStage;
          wgmma::mbar_arrive_expect_tx(full + st, kStage);
          wgmma::tma_load_2d(sa, &map_x, kt * kBK, int(m0 * kBM), full + st);
          uint8_t* sb = sa + kBytesA + rank * kRowsW * kBK;
          if constexpr (CL > 1)
            wgmma::tma_load_2d_multicast(sb, &map_w, kt * kBK, int(n0 * BN + rank * kRowsW), full + st,
                                         uint16_t((1u << CL) - 1));
          else
            wgmma::tma_load_2d(sb, &map_w, kt * kBK, int(n0 * BN), full + st);
        }
      }
    }
  } else {
    const int cw = wg - 1;  // this consumer's 64 rows of the tile
    float* fs = factors + cw * 2 * BN;  // its ws and bias of the tile's columns
    const W8A8Out<D> out(y, ldy, M, N);
    auto release = [&](int stage) {  // this warpgroup's wgmma batches on the stage have finished
      if ((tid & 127) != 0) return;
      if constexpr (CL > 1)
        for (uint32_t c = 0; c < CL; ++c) wgmma::mbar_arrive_cluster(empty + stage, c);
      else
        wgmma::mbar_arrive(empty + stage);
    };
    for (int64_t group = first; group < groups; group += stride) {
      int64_t m0, n0;
      tile_of(group, m0, n0);
      // The tile's epilogue factors, loaded before the k loop (which hides their latency):
      // sx of this thread's rows r, r + 8 in registers; ws and bias of the BN columns into
      // fs, once every warp of the warpgroup has stored the previous tile (named barrier).
      const int64_t r = m0 * kBM + cw * 64 + ((tid >> 5) & 3) * 16 + ((tid & 31) >> 2);
      const float sxr[2] = {r < M ? sx[r] : 0.0f, r + 8 < M ? sx[r + 8] : 0.0f};
      ptx::bar_sync(1 + cw, 128);
      for (int c = tid & 127; c < BN; c += 128) {
        const int64_t n = n0 * BN + c;
        fs[c] = n < N ? ws[n] : 0.0f;
        fs[BN + c] = bias && n < N ? load_f32(bias, bias_dtype, n) : 0.0f;
      }
      int acc[BN / 2];
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) acc[i] = 0;
      int prev = -1;  // the stage of the previous k tile, released once its wgmma finished
      for (int kt = 0; kt < ktiles; ++kt, advance()) {
        wgmma::mbar_wait(full + st, parity);
        const uint8_t* sa = smem + st * kStage;
        wgmma::fence();
#pragma unroll
        for (int ks = 0; ks < kBK / 32; ++ks)
          wgmma::mma_s8<BN>(acc, wgmma::desc_sw128(sa + cw * 64 * kBK + 32 * ks),
                             wgmma::desc_sw128(sa + kBytesA + 32 * ks));
        wgmma::commit();
        wgmma::wait<1>();  // the previous k tile's batch has finished reading its stage
        if (prev >= 0) release(prev);
        prev = st;
      }
      wgmma::wait<0>();
      wgmma::fence_operands(acc);
      if (prev >= 0) release(prev);
      ptx::bar_sync(1 + cw, 128);  // fs as the whole warpgroup wrote it
      if (out.inside(m0 * kBM + cw * 64 + 64, n0 * BN + BN))
        store_wgmma_tile<D, BN, false>(acc, r, n0 * BN, sxr, fs, bias != nullptr, out);
      else
        store_wgmma_tile<D, BN, true>(acc, r, n0 * BN, sxr, fs, bias != nullptr, out);
    }
  }
  if constexpr (CL > 1) wgmma::cluster_sync();  // no CTA leaves while its peer may still write into it
#else
  __trap();  // built without sm_90a code: the host never launches it (w8a8_tma_ok)
#endif
}

// ---------------------------------------------------------------- launch helpers
// Rows of x per tile: the smallest of 1, 2, 4, 8, 16 holding min(M, 16).
int pick_mtile(int64_t M) {
  if (M <= 1) return 1;
  if (M <= 2) return 2;
  if (M <= 4) return 4;
  if (M <= 8) return 8;
  return kMaxMTile;
}

struct LinearGrid {
  dim3 grid, block;
};

LinearGrid linear_grid(int64_t M, int64_t N, int mt) {
  const int64_t nblocks = (N + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t mtiles = (M + mt - 1) / mt;
  return {dim3(unsigned(nblocks < kMaxGridX ? nblocks : kMaxGridX), unsigned(mtiles < kMaxGridY ? mtiles : kMaxGridY)),
          dim3(kThreads)};
}

// Whether W8A8's product kernels (the ones after the quantizer) are launched to overlap the
// quantizer's end (ExLaunch's overlap): their launch latency and set-up (barriers, tensor maps,
// the decode kernel's first weight copies) then hide behind the quantizer's last blocks, and
// each waits for the quantizer (wait_prerequisites) before it reads qx or sx. Yes with
// LOWBIT_CUDA_W8A8_PDL=1 (opt-in until a GPU has timed it; never with LOWBIT_CUDA_PDL=0, read
// per call) on a device of compute capability 9+ running this build's sm_90+ code (code
// JIT-compiled from older PTX lacks the wait; every kernel of the module is built for the same
// archs, so the dp4a kernel answers for all). Per device, cached.
bool overlaps_quantizer() {
  if (!env_is("LOWBIT_CUDA_W8A8_PDL", "1") || env_is("LOWBIT_CUDA_PDL", "0")) return false;
  static std::atomic<uint64_t> known{0}, ok{0};
  return cached_per_device(known, ok,
                           [](int dev) { return runs_sm90_code(dev, w8a8_kernel<F16, 1, true>, 1 << 30); });
}

// kernel<<<grid, block, smem, s>>>(args...) as a W8A8 product kernel (a launch error is left
// for launch_status, as with <<<>>>).
template <class... P, class... A>
void launch_product(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, A... args) {
  const ExLaunch l(grid, block, smem, s, dim3(1, 1, 1), overlaps_quantizer());
  (void)cudaLaunchKernelEx(&l.cfg, kernel, args...);
}

template <class D, int MT>
void launch_w8a16_mt(bool vec, const void* x, int64_t M, int64_t K, int64_t ldx, const int8_t* qw, const float* ws,
                     int64_t N, const void* bias, int bias_dtype, void* y, int64_t ldy, cudaStream_t s) {
  using T = typename D::T;
  const LinearGrid g = linear_grid(M, N, MT);
  auto kernel = vec ? w8a16_kernel<D, MT, true> : w8a16_kernel<D, MT, false>;
  kernel<<<g.grid, g.block, 0, s>>>(static_cast<const T*>(x), M, K, ldx, qw, ws, N, bias, bias_dtype,
                                    static_cast<T*>(y), ldy);
}

template <class D>
void launch_w8a16(bool vec, const void* x, int64_t M, int64_t K, int64_t ldx, const int8_t* qw, const float* ws,
                  int64_t N, const void* bias, int bias_dtype, void* y, int64_t ldy, cudaStream_t s) {
  switch (pick_mtile(M)) {
    case 1: return launch_w8a16_mt<D, 1>(vec, x, M, K, ldx, qw, ws, N, bias, bias_dtype, y, ldy, s);
    case 2: return launch_w8a16_mt<D, 2>(vec, x, M, K, ldx, qw, ws, N, bias, bias_dtype, y, ldy, s);
    case 4: return launch_w8a16_mt<D, 4>(vec, x, M, K, ldx, qw, ws, N, bias, bias_dtype, y, ldy, s);
    case 8: return launch_w8a16_mt<D, 8>(vec, x, M, K, ldx, qw, ws, N, bias, bias_dtype, y, ldy, s);
    default: return launch_w8a16_mt<D, kMaxMTile>(vec, x, M, K, ldx, qw, ws, N, bias, bias_dtype, y, ldy, s);
  }
}

template <class D, int MT>
void launch_w8a8_mt(bool vec, const int8_t* qx, const float* sx, int64_t M, int64_t K, const int8_t* qw,
                    const float* ws, int64_t N, const void* bias, int bias_dtype, void* y, int64_t ldy,
                    cudaStream_t s) {
  const LinearGrid g = linear_grid(M, N, MT);
  auto kernel = vec ? w8a8_kernel<D, MT, true> : w8a8_kernel<D, MT, false>;
  launch_product(kernel, g.grid, g.block, 0, s, qx, sx, M, K, qw, ws, N, bias, bias_dtype,
                 static_cast<typename D::T*>(y), ldy);
}

template <class D>
void launch_w8a8(bool vec, const int8_t* qx, const float* sx, int64_t M, int64_t K, const int8_t* qw,
                 const float* ws, int64_t N, const void* bias, int bias_dtype, void* y, int64_t ldy,
                 cudaStream_t s) {
  switch (pick_mtile(M)) {
    case 1: return launch_w8a8_mt<D, 1>(vec, qx, sx, M, K, qw, ws, N, bias, bias_dtype, y, ldy, s);
    case 2: return launch_w8a8_mt<D, 2>(vec, qx, sx, M, K, qw, ws, N, bias, bias_dtype, y, ldy, s);
    case 4: return launch_w8a8_mt<D, 4>(vec, qx, sx, M, K, qw, ws, N, bias, bias_dtype, y, ldy, s);
    case 8: return launch_w8a8_mt<D, 8>(vec, qx, sx, M, K, qw, ws, N, bias, bias_dtype, y, ldy, s);
    default: return launch_w8a8_mt<D, kMaxMTile>(vec, qx, sx, M, K, qw, ws, N, bias, bias_dtype, y, ldy, s);
  }
}

template <class D>
int prepare_w8a8_mma() {
  static std::atomic<uint64_t> done{0};
  return opt_in_smem(w8a8_mma_kernel<D>, mma_tc::kSmemBytes, done, "int8_linear_w8a8");
}

template <class D, int BN, int CL>
int prepare_w8a8_tma() {
  static std::atomic<uint64_t> done{0};
  return opt_in_smem(w8a8_tma_kernel<D, BN, CL>, wgmma_ws::kSmemBytes<BN>, done, "int8_linear_w8a8");
}

// The current device's SM count (1 if it cannot be read).
int sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    (void)cudaGetLastError();
  return n > 0 ? n : 1;
}

// cuTensorMapEncodeTiled, from the driver at run time (the module links only the static
// runtime); null if the driver lacks it.
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const cudaError_t e =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &found);
#endif
    (void)cudaGetLastError();
    return e == cudaSuccess && found == cudaDriverEntryPointSuccess ? reinterpret_cast<EncodeTiled>(p) : nullptr;
  }();
  return fn;
}

// The tensor map of an int8 [rows, K] row-major matrix: boxes of box_k x box_rows, zeros past
// the edges; w8a8_tma_kernel's operands take 128-byte swizzled boxes of 128 k, W8A16's bulk
// ring plain boxes of 64 k x 16 rows. False if the driver refuses it (K % 16 == 0 and a
// 16-byte aligned base are the caller's).
bool int8_tensor_map(CUtensorMap* map, const int8_t* base, int64_t rows, int64_t K, int box_k, int box_rows,
                     CUtensorMapSwizzle swizzle) {
  const EncodeTiled encode = encode_tiled();
  if (!encode) return false;
  const cuuint64_t dims[2] = {cuuint64_t(K), cuuint64_t(rows)}, strides[1] = {cuuint64_t(K)};
  const cuuint32_t box[2] = {cuuint32_t(box_k), cuuint32_t(box_rows)}, unit[2] = {1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<int8_t*>(base), dims, strides, box, unit,
                CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Whether W8A8 may take w8a8_tma_kernel: an sm_90 GPU running this build's sm_90a code
// (runs_sm90a_code), a driver with tensor maps, and not LOWBIT_CUDA_W8A8=mma (read per call).
// Per device, cached.
bool w8a8_tma_ok() {
  if (env_is("LOWBIT_CUDA_W8A8", "mma")) return false;
  static std::atomic<uint64_t> known{0}, ok{0};
  return cached_per_device(known, ok, [](int dev) {
    return runs_sm90a_code(dev, w8a8_tma_kernel<F16, 128, 1>) && encode_tiled() != nullptr;
  });
}

// How many clusters of w8a8_tma_kernel<D, BN, CL> fit on the current device at once (an SM may
// not pair with another of its GPC: not always sms / CL); sms / CL if the runtime cannot say.
// Per variant and device, cached.
template <class D, int BN, int CL>
int resident_clusters(int sms) {
  static std::atomic<int> cache[64];
  return cached_count_per_device(cache, [sms] {
    const ExLaunch launch(dim3(unsigned(sms / CL * CL)), dim3(wgmma_ws::kThreads), wgmma_ws::kSmemBytes<BN>, nullptr,
                          dim3(CL, 1, 1), false);
    int n = 0;
    if (cudaOccupancyMaxActiveClusters(&n, w8a8_tma_kernel<D, BN, CL>, &launch.cfg) != cudaSuccess || n < 1) {
      (void)cudaGetLastError();
      return sms / CL > 0 ? sms / CL : 1;
    }
    return n;
  });
}

// w8a8_tma_kernel on a persistent grid (one CTA per SM, at most one per tile; with CL > 1 as
// many clusters as fit at once, at most one per group of CL tiles); kCudaError (recorded for
// last_error) if the driver would not build the tensor maps or launch the clusters.
template <class D, int BN, int CL>
int launch_w8a8_tma(const int8_t* qx, const float* sx, int64_t M, int64_t K, const int8_t* qw, const float* ws,
                    int64_t N, const void* bias, int bias_dtype, void* y, int64_t ldy, int sms, cudaStream_t s) {
  using namespace wgmma_ws;
  CUtensorMap map_x, map_w;
  if (!int8_tensor_map(&map_x, qx, M, K, kBK, kBM, CU_TENSOR_MAP_SWIZZLE_128B) ||
      !int8_tensor_map(&map_w, qw, N, K, kBK, BN / CL, CU_TENSOR_MAP_SWIZZLE_128B)) {
    record_cuda_error("int8_linear_w8a8", "cuTensorMapEncodeTiled", "the driver refused a tensor map");
    return kCudaError;
  }
  auto kernel = w8a8_tma_kernel<D, BN, CL>;
  auto* yt = static_cast<typename D::T*>(y);
  const int64_t groups = ((M + kBM * CL - 1) / (kBM * CL)) * ((N + BN - 1) / BN);
  int64_t fit = sms;  // CTAs (CL = 1) or clusters that run at once
  if constexpr (CL > 1) fit = resident_clusters<D, BN, CL>(sms);
  const ExLaunch launch(dim3(unsigned((groups < fit ? groups : fit) * CL)), dim3(wgmma_ws::kThreads),
                        kSmemBytes<BN>, s, dim3(CL, 1, 1), overlaps_quantizer());
  const cudaError_t e =
      cudaLaunchKernelEx(&launch.cfg, kernel, map_x, map_w, sx, M, K, ws, N, bias, bias_dtype, yt, ldy);
  if (e == cudaSuccess) return kOk;
  (void)cudaGetLastError();
  record_cuda_error(CL > 1 ? "int8_linear_w8a8 (cluster launch)" : "int8_linear_w8a8", cudaGetErrorName(e),
                    cudaGetErrorString(e));
  return kCudaError;
}

// The TMA kernel's variants: tiles 128 x 256 (wide) or 128 x 128, clusters of cl = 1, 2 or 4.
template <class D>
struct W8A8Tma {
  int (*prepare)();
  int (*launch)(const int8_t*, const float*, int64_t, int64_t, const int8_t*, const float*, int64_t, const void*, int,
                void*, int64_t, int, cudaStream_t);
};
template <class D, int BN>
W8A8Tma<D> w8a8_tma_variant_bn(int cl) {
  if (cl == 4) return {prepare_w8a8_tma<D, BN, 4>, launch_w8a8_tma<D, BN, 4>};
  if (cl == 2) return {prepare_w8a8_tma<D, BN, 2>, launch_w8a8_tma<D, BN, 2>};
  return {prepare_w8a8_tma<D, BN, 1>, launch_w8a8_tma<D, BN, 1>};
}
template <class D>
W8A8Tma<D> w8a8_tma_variant(bool wide, int cl) {
  return wide ? w8a8_tma_variant_bn<D, 256>(cl) : w8a8_tma_variant_bn<D, 128>(cl);
}

// w8a8_mma_kernel: a CTA per tile of y, grid-striding past kMaxGridX tiles.
template <class D>
void launch_w8a8_mma(const int8_t* qx, const float* sx, int64_t M, int64_t K, const int8_t* qw, const float* ws,
                     int64_t N, const void* bias, int bias_dtype, void* y, int64_t ldy, cudaStream_t s) {
  const int64_t tiles = ((M + mma_tc::kBM - 1) / mma_tc::kBM) * ((N + mma_tc::kBN - 1) / mma_tc::kBN);
  const int64_t grid = tiles < kMaxGridX ? tiles : kMaxGridX;
  launch_product(w8a8_mma_kernel<D>, dim3(unsigned(grid)), dim3(mma_tc::kThreads), mma_tc::kSmemBytes, s, qx, sx, M, K,
                 qw, ws, N, bias, bias_dtype, static_cast<typename D::T*>(y), ldy);
}

}  // namespace

// ---------------------------------------------------------------- entry points
int int8_quantize_per_token(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, int8_t* q, float* scale,
                            void* stream) {
  if (int st = check_quantize_args(x, x_dtype, M, K, ldx, q, scale)) return st;
  if (M == 0) return kOk;
  (void)cudaGetLastError();  // report only what our launches do
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  LOWBIT_DISPATCH_DTYPE(x_dtype, D, launch_quantize<D>(x, M, K, ldx, q, scale, s));
  return launch_status("int8_quantize_per_token");
}

namespace {
// Whether W8A16 takes the tensor-core kernel (woq_mma.cuh): fp16 / bf16 activations,
// K % 16 == 0 (16-byte weight rows), unless LOWBIT_CUDA_W8A16=simt (read per call).
bool w8a16_tensor_cores(int x_dtype, int64_t K) {
  if (env_is("LOWBIT_CUDA_W8A16", "simt")) return false;
  return (x_dtype == kF16 || x_dtype == kBF16) && K % 16 == 0 && K <= woq::kMaxK;
}

// Whether W8A16 at M <= 16 takes the TMA ring (Int8WBulk): LOWBIT_CUDA_WOQ_COPY=bulk (read per
// call) on a device running this build's sm_90a code, with a driver that makes tensor maps.
bool w8a16_bulk_ok() {
  if (!env_is("LOWBIT_CUDA_WOQ_COPY", "bulk")) return false;
  static std::atomic<uint64_t> known{0}, ok{0};
  return cached_per_device(known, ok, [](int dev) {
    return runs_sm90a_code(dev, woq::woq_kernel<F16, Int8WBulk, 1, 1>) && encode_tiled() != nullptr;
  });
}

// w[n, k] = q[n, k] * scale[n] in D (row-major [N, K]): the dense weight of large-M W8A16.
// A block per row (no index division), 16 consecutive k per thread: vec, one 16-byte load
// and two 16-byte stores.
constexpr int kDequantThreads = 256;
template <class D>
__global__ void __launch_bounds__(kDequantThreads)
    dequantize_w8_kernel(const int8_t* __restrict__ q, const float* __restrict__ scale, int64_t K, bool vec,
                         typename D::T* __restrict__ w) {
  const int64_t n = blockIdx.x;
  const float s = __ldg(scale + n);
  for (int64_t k = 16 * int64_t(threadIdx.x); k < K; k += 16 * kDequantThreads) {
    const int8_t* src = q + n * K + k;
    typename D::T* dst = w + n * K + k;
    if constexpr (sizeof(typename D::T) == 2) {
      if (vec) {
        const int4 c = __ldg(reinterpret_cast<const int4*>(src));
        const uint32_t words[4] = {uint32_t(c.x), uint32_t(c.y), uint32_t(c.z), uint32_t(c.w)};
        uint32_t h[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {  // codes 2 i, 2 i + 1 (little-endian bytes of words[i / 2])
          const uint32_t pair = words[i >> 1] >> (16 * (i & 1));
          h[i] = D::from_f32(float(int8_t(pair)) * s) | uint32_t(D::from_f32(float(int8_t(pair >> 8)) * s)) << 16;
        }
        reinterpret_cast<uint4*>(dst)[0] = make_uint4(h[0], h[1], h[2], h[3]);
        reinterpret_cast<uint4*>(dst)[1] = make_uint4(h[4], h[5], h[6], h[7]);
        continue;
      }
    }
    for (int e = 0; e < 16 && k + e < K; ++e) dst[e] = D::from_f32(src[e] * s);
  }
}

}  // namespace

void int8_w8a16_plan(int64_t M, int64_t K, int64_t N, int x_dtype, int sm_count, int device, int* splits,
                     int64_t* counters) {
  *splits = 1, *counters = 0;
  if (!w8a16_tensor_cores(x_dtype, K)) return;
  // the bulk-copy ring where int8_linear_w8a16 launches it (unless the driver then refuses its
  // tensor map: the other kernel runs, and a split it cannot take is a clear error)
  const bool bulk = M <= 16 && N < (int64_t(1) << 31) && device >= 0 && w8a16_bulk_ok();
  auto plan = [&](auto d) {
    using D = typename decltype(d)::type;
    bulk ? woq::plan_for<D, Int8WBulk, true>(M, K, N, sm_count, device, splits, counters)
         : woq::plan_for<D, Int8W>(M, K, N, sm_count, device, splits, counters);
  };
  x_dtype == kF16 ? plan(TypeTag<F16>{}) : plan(TypeTag<BF16>{});
}

int int8_linear_w8a16(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const int8_t* qweight,
                      const float* wscale, int64_t N, const void* bias, int bias_dtype, void* y, int64_t ldy,
                      int splits, float* partial, int* counters, void* stream) {
  if (int st = check_linear_args(x, x_dtype, M, K, ldx, qweight, wscale, N, bias, bias_dtype, y, ldy)) return st;
  if (splits < 1) return kInvalidArgument;
  if (M == 0) return kOk;
  (void)cudaGetLastError();
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (w8a16_tensor_cores(x_dtype, K) && aligned16(qweight)) {
    woq::Args a{};
    if (woq::set_shape(a, M, K, ldx, N, splits, partial, counters) != kOk) return kInvalidArgument;
    a.x = x;
    a.xvec = aligned16(x) && (ldx * 2) % 16 == 0;
    a.qweight = qweight, a.scales = wscale, a.groups = 1;
    a.bias = bias, a.bias_dtype = bias_dtype, a.y = y, a.ldy = ldy;
    CUtensorMap map{};
    const int st =
        M <= 16 && N < (int64_t(1) << 31) && w8a16_bulk_ok() &&
                int8_tensor_map(&map, qweight, N, K, woq::kTileK, woq::kTileN, CU_TENSOR_MAP_SWIZZLE_NONE)
            ? (x_dtype == kF16 ? woq::launch<F16, Int8WBulk, true>(a, s, map)
                               : woq::launch<BF16, Int8WBulk, true>(a, s, map))
            : (x_dtype == kF16 ? woq::launch<F16, Int8W>(a, s) : woq::launch<BF16, Int8W>(a, s));
    if (st != kOk) return st;
  } else {  // the CUDA-core kernel (needs no split scratch: any plan is fine)
    const bool vec = K % kVecK == 0 && aligned16(qweight) && aligned16(x) && (ldx * dtype_size(x_dtype)) % 16 == 0;
    LOWBIT_DISPATCH_DTYPE(x_dtype, D,
                          launch_w8a16<D>(vec, x, M, K, ldx, qweight, wscale, N, bias, bias_dtype, y, ldy, s));
  }
  return launch_status("int8_linear_w8a16");
}

int int8_dequantize_w8a16(const int8_t* qweight, const float* wscale, int64_t N, int64_t K, void* w, int w_dtype,
                          void* stream) {
  if (N < 1 || K < 1 || !qweight || !wscale || !w || !valid_dtype_code(w_dtype)) return kInvalidArgument;
  const bool vec = K % 16 == 0 && aligned16(w) && aligned16(qweight) && dtype_size(w_dtype) == 2;
  if (N > 2147483647LL) return kInvalidArgument;
  (void)cudaGetLastError();
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  LOWBIT_DISPATCH_DTYPE(w_dtype, D,
                        (dequantize_w8_kernel<D><<<unsigned(N), kDequantThreads, 0, s>>>(
                            qweight, wscale, K, vec, static_cast<typename D::T*>(w))));
  return launch_status("int8_dequantize_w8a16");
}

int int8_linear_w8a8(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const int8_t* qweight,
                     const float* wscale, int64_t N, const void* bias, int bias_dtype, void* y, int64_t ldy,
                     int8_t* qx, float* sx, void* stream) {
  if (int st = check_linear_args(x, x_dtype, M, K, ldx, qweight, wscale, N, bias, bias_dtype, y, ldy)) return st;
  if (M == 0) return kOk;
  if (!qx || !sx) return kInvalidArgument;
  (void)cudaGetLastError();
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  // The quantizer writes qx as M contiguous rows of K codes; the int8 kernel reads them in stream order.
  const bool vec = K % kVecK == 0 && aligned16(qweight) && aligned16(qx);
  // What every int8 tensor-core kernel takes (see w8a8_mma_kernel): whole 16-byte chunks of
  // aligned rows, one exact int32 sum. Prefill-size M runs on them; dp4a otherwise, but with
  // LOWBIT_CUDA_W8A8_DECODE=mma M <= 8 on w8a8_decode_kernel.
  const bool tc_shapes = K % 16 == 0 && K <= kChunkK && aligned16(qweight) && aligned16(qx);
  const bool decode = tc_shapes && M <= 8 && (N + woq::kTileN - 1) / woq::kTileN <= kMaxGridX &&
                      env_is("LOWBIT_CUDA_W8A8_DECODE", "mma");
  const int64_t min_m = env_is("LOWBIT_CUDA_W8A8_MIN_M", "16") ? 16 : mma_tc::kMinM;
  const bool mma = tc_shapes && M >= min_m;
  // On sm_90a, the same GEMM on w8a8_tma_kernel (same bits), where it measured faster than
  // mma.sync (H200, dev/gpu_sweep.py w8a8: M = 64-4096 on four Llama shapes): outputs up to
  // 4M elements (few tiles: 1.05-1.25x), and a K of 8192 or more at any size (the epilogue
  // that idles its tensor cores is amortized over >= 64 k tiles: 1.08-1.27x at M >= 1024). It
  // loses (0.75-0.95x) on many tiles of short K, e.g. M = 2048 on 4096 x 4096, where
  // mma.sync's two CTAs per SM overlap one's epilogue with the other's MMAs.
  // LOWBIT_CUDA_W8A8=tma takes it wherever a tensor-core kernel runs, =cluster / =cluster4
  // the same with clusters of two / four CTAs sharing the weight copies, =mma never. Its
  // tensor maps take M, N < 2^31 rows. 256-wide tiles when those still give every SM one.
  const int cl = env_is("LOWBIT_CUDA_W8A8", "cluster4") ? 4 : env_is("LOWBIT_CUDA_W8A8", "cluster") ? 2 : 1;
  const bool tma = mma && M < (int64_t(1) << 31) && N < (int64_t(1) << 31) && w8a8_tma_ok() &&
                   (M * N <= (int64_t(4) << 20) || K >= 8192 || env_is("LOWBIT_CUDA_W8A8", "tma") || cl > 1);
  const int sms = tma ? sm_count() : 1;
  const bool wide = tma && ((M + wgmma_ws::kBM - 1) / wgmma_ws::kBM) * ((N + 255) / 256) >= sms;
  int st = kOk;
  LOWBIT_DISPATCH_DTYPE(x_dtype, D, {
    const W8A8Tma<D> variant = w8a8_tma_variant<D>(wide, cl);
    if (mma) st = tma ? variant.prepare() : prepare_w8a8_mma<D>();
    if (st == kOk) {
      launch_quantize<D>(x, M, K, ldx, qx, sx, s);
      if (tma)
        st = variant.launch(qx, sx, M, K, qweight, wscale, N, bias, bias_dtype, y, ldy, sms, s);
      else if (mma)
        launch_w8a8_mma<D>(qx, sx, M, K, qweight, wscale, N, bias, bias_dtype, y, ldy, s);
      else if (decode)
        launch_product(w8a8_decode_kernel<D>, dim3(unsigned((N + woq::kTileN - 1) / woq::kTileN)),
                       dim3(woq::kThreads), 0, s, qx, sx, M, K, qweight, wscale, N, bias, bias_dtype,
                       static_cast<typename D::T*>(y), ldy);
      else
        launch_w8a8<D>(vec, qx, sx, M, K, qweight, wscale, N, bias, bias_dtype, y, ldy, s);
    }
  });
  if (st != kOk) return st;
  return launch_status("int8_linear_w8a8");
}

}  // namespace lowbit::cuda

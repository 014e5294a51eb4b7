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
// W8A16 accumulates x * q in fp32 and applies wscale once per output; W8A8
// first quantizes x per token into Python-allocated scratch (qx, sx) with the
// quantizer below, then accumulates q(x) . q(w) exactly with __dp4a in int32
// (flushed to fp32 every kChunkK products, so any K is safe) and applies
// sx[m] * wscale[n] in the epilogue.
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "int8.h"
#include "lowbit/cuda_common.cuh"
#include "lowbit/int8_format.h"

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
// (see per_token_inv / per_token_scale in cuda_common.cuh).
template <class D>
__global__ void quantize_per_token_kernel(const typename D::T* __restrict__ x, int64_t M, int64_t K, int64_t ldx,
                                          int8_t* __restrict__ q, float* __restrict__ scale) {
  __shared__ float warp_amax[32];
  __shared__ float row_amax;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const typename D::T* xr = x + row * ldx;
    float amax = 0.0f;
    int bad = 0;
    for (int64_t k = tid; k < K; k += blockDim.x) {
      const float v = D::to_f32(xr[k]);
      bad |= !isfinite(v);
      amax = fmaxf(amax, fabsf(v));
    }
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
    amax = row_amax;
    const float pre = int8_format::per_token_prescale(amax);
    const float inv = (bad || amax == 0.0f) ? 0.0f : per_token_inv(amax, pre);
    int8_t* qr = q + row * K;
    for (int64_t k = tid; k < K; k += blockDim.x) {
      int c = 0;
      if (!bad) {
        c = __float2int_rn(__fmul_rn(__fmul_rn(D::to_f32(xr[k]), pre), inv));  // round half to even
        c = min(127, max(-127, c));
      }
      qr[k] = int8_t(c);
    }
    if (tid == 0) scale[row] = bad ? __int_as_float(0x7fc00000) : per_token_scale(amax);
    __syncthreads();  // warp_amax / row_amax are reused by the next row
  }
}

template <class D>
void launch_quantize(const void* x, int64_t M, int64_t K, int64_t ldx, int8_t* q, float* scale, cudaStream_t s) {
  // About 8 elements per thread, 1 to 16 warps.
  int64_t warps = (K + 8 * 32 - 1) / (8 * 32);
  warps = warps < 1 ? 1 : (warps > kQuantMaxThreads / 32 ? kQuantMaxThreads / 32 : warps);
  const int64_t grid = M < kMaxGridX ? M : kMaxGridX;
  quantize_per_token_kernel<D><<<dim3(unsigned(grid)), dim3(unsigned(warps * 32)), 0, s>>>(
      static_cast<const typename D::T*>(x), M, K, ldx, q, scale);
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

// Lane r * MT + m writes y[m0 + m, n0 + r] = mine * sx[m0 + m] (if sx) * ws[n] + bias[n].
template <class D, int MT>
__device__ __forceinline__ void store_tile(float mine, int64_t n0, int nr, int64_t m0, int mc, const float* sx,
                                           const float* ws, const void* bias, int bias_dtype,
                                           typename D::T* y, int64_t ldy) {
  const int lane = threadIdx.x & 31, r = lane / MT, m = lane % MT;
  if (lane < kRowsPerWarp * MT && r < nr && m < mc) {
    const int64_t n = n0 + r;
    float v = sx ? mine * sx[m0 + m] * ws[n] : mine * ws[n];
    if (bias) v += load_f32(bias, bias_dtype, n);
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

// ---------------------------------------------------------------- W8A8
template <class D, int MT, bool VEC>
__global__ void __launch_bounds__(kThreads)
    w8a8_kernel(const int8_t* __restrict__ qx, const float* __restrict__ sx, int64_t M, int64_t K,
                const int8_t* __restrict__ qw, const float* __restrict__ ws, int64_t N,
                const void* __restrict__ bias, int bias_dtype, typename D::T* __restrict__ y, int64_t ldy) {
  const int lane = threadIdx.x & 31;
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
  kernel<<<g.grid, g.block, 0, s>>>(qx, sx, M, K, qw, ws, N, bias, bias_dtype, static_cast<typename D::T*>(y), ldy);
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

int int8_linear_w8a16(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const int8_t* qweight,
                      const float* wscale, int64_t N, const void* bias, int bias_dtype, void* y, int64_t ldy,
                      void* stream) {
  if (int st = check_linear_args(x, x_dtype, M, K, ldx, qweight, wscale, N, bias, bias_dtype, y, ldy)) return st;
  if (M == 0) return kOk;
  (void)cudaGetLastError();
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool vec = K % kVecK == 0 && aligned16(qweight) && aligned16(x) && (ldx * dtype_size(x_dtype)) % 16 == 0;
  LOWBIT_DISPATCH_DTYPE(x_dtype, D, launch_w8a16<D>(vec, x, M, K, ldx, qweight, wscale, N, bias, bias_dtype, y, ldy, s));
  return launch_status("int8_linear_w8a16");
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
  LOWBIT_DISPATCH_DTYPE(x_dtype, D, {
    launch_quantize<D>(x, M, K, ldx, qx, sx, s);
    launch_w8a8<D>(vec, qx, sx, M, K, qweight, wscale, N, bias, bias_dtype, y, ldy, s);
  });
  return launch_status("int8_linear_w8a8");
}

}  // namespace lowbit::cuda

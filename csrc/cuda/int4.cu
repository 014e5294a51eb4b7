// INT4 on CUDA: the W4A16 linear layer, the weight-only tensor-core kernel of
// woq_mma.cuh (work split, K split, activation order) with this file's weight format.
//
// Weight layout (lowbit.formats.int4.pack_cuda; one 16-byte load per lane per
// tile): for column tile p and k tile t, lane l = 4 * gid + tig holds 4 words, word j
// for mma step j. Word j holds, for columns na = 16 p + gid (sub 0) and na + 8 (sub 1),
// the codes of k = kb + e (kb = 64 t + 16 tig + 4 j, woq_mma.cuh's k order) in nibble
// 2 sub + (e >> 1) + 4 (e & 1): so (word >> (8 sub + 4 h)) & 0x000f000f holds the two
// codes of B register h of sub.
//
// Dequantization in registers: OR-ing a 4-bit code into the mantissa of 1024.0
// (fp16 0x6400) or 128.0 (bf16 0x4300) gives 1024 + q / 128 + q exactly; subtracting
// 1032 / 136 gives q - 8 exactly; w = (q - 8) * d + (m + 8 d) is one fma2. (The
// centred form keeps the fma's inputs small, which matters for bf16's 8-bit
// significand: (q - 8) * d + (m + 8 d) rounds d and m + 8 d, both of order d.) With fp16
// activations the codes of register h = 1 (each byte's upper nibble) are used in place, as
// 1024 + 16 q (Magic).
// The (d, m) pair of a lane's group is copied with its tile into the ring.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "int4.h"
#include "lowbit/cuda_common.cuh"
#include "ptx.cuh"
#include "woq_mma.cuh"

namespace lowbit::cuda {
namespace {

static_assert(kW4a16MaxK == woq::kMaxK, "int4.h's bound is the kernel's");

using woq::kStages;
using woq::kTileK;
using woq::kWarps;
using namespace ptx;

// ---- the two activation types: their magic bias B (a code in a half's low nibble gives
// B + q), and what takes B + q back to q - 8 exactly: (B + q) - (B + 8). fp16's 10-bit
// significand also holds a code in the next nibble, B + 16 q, which one exact fma takes back,
// (B + 16 q) / 16 - (B / 16 + 8): so fp16 needs one shift a word instead of three. (bf16's
// 7-bit significand does not: there that nibble reaches the exponent.)
template <class D> struct Magic;
template <> struct Magic<F16> {
  static constexpr uint32_t kBias = 0x64006400u;  // 1024.0 in each half
  static constexpr bool kNibble1 = true;          // B + 16 q
  __device__ static __half2 bias_plus_8() { return __float2half2_rn(1032.0f); }
  __device__ static __half2 minus_bias16_plus_8() { return __float2half2_rn(-72.0f); }
};
template <> struct Magic<BF16> {
  static constexpr uint32_t kBias = 0x43004300u;  // 128.0 in each half
  static constexpr bool kNibble1 = false;
  __device__ static __nv_bfloat162 bias_plus_8() { return __float2bfloat162_rn(136.0f); }
};

template <class H2>
__device__ __forceinline__ uint32_t bits(H2 h) {
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <class H2>
__device__ __forceinline__ H2 from_bits(uint32_t u) {
  return *reinterpret_cast<const H2*>(&u);
}

// ---- (d, m) pairs in fp16 or fp32 storage
template <class S> struct Pair;
template <> struct Pair<uint16_t> {  // fp16 storage: 4 bytes a pair
  using Raw = uint32_t;
  __device__ static void copy(uint32_t dst, const Raw* src) { cp_async4(dst, src); }
  __device__ static float2 to_f32(Raw r) { return __half22float2(from_bits<__half2>(r)); }
};
template <> struct Pair<float> {
  using Raw = float2;
  __device__ static void copy(uint32_t dst, const Raw* src) { cp_async8(dst, src); }
  __device__ static float2 to_f32(Raw r) { return r; }
};

// A lane's walk over the packed words of its column tile and over the scale groups (the
// (d, m) pairs of its columns na, na + 8), one tile per issue. 32-bit offsets (the host
// checks groups x Np < 2^31).
template <class S> struct Int4Cursor {
  using Raw = typename Pair<S>::Raw;
  const uint4* wp;   // the lane's word of the next tile to issue
  const Raw* scales;  // the table (a kernel parameter: uniform registers)
  uint32_t s0;       // column na of group 0: scales[s0]
  int Np, k, last_grp, g_shift;  // k: the lane's first k of the next tile to issue
  __device__ Int4Cursor(const woq::Args& a, int64_t nt, int64_t t_begin, int lane)
      : wp(static_cast<const uint4*>(a.qweight) + (nt * a.ktiles + t_begin) * 32 + lane),
        scales(static_cast<const Raw*>(a.scales)),
        s0(uint32_t(nt * woq::kTileN + (lane >> 2))),
        Np(int(a.Np)),
        k(int(t_begin) * kTileK + 16 * (lane & 3)),
        last_grp(int(a.groups) - 1),
        g_shift(a.g_shift) {}
  // The group of the lane's 16 k at k0 (k past K, where x is zero, takes the last; one group:
  // g_shift 0, and last_grp 0 clamps k0 to it).
  __device__ int group_at(int k0) const {
    const int grp = k0 >> g_shift;
    return grp < last_grp ? grp : last_grp;
  }
  // The next tile's word and scale row; then the cursor moves to the tile after it. (The
  // scale index stays 32-bit unsigned: one wide multiply-add from the table, where a 64-bit
  // index cost the loop ~10 instructions a tile.)
  __device__ const Raw* next(const uint4*& word) {
    word = wp;
    wp += 32;
    const Raw* src = scales + (s0 + uint32_t(group_at(k) * Np));
    k += kTileK;
    return src;
  }
};

// The 16 B registers of a tile with each code as a magic value: B + q, but B + 16 q for h = 1
// where Magic<D>::kNibble1 (the nibble left where it is).
template <class D>
__device__ __forceinline__ void magic_codes(const uint4& w, uint32_t (&b)[4][2][2]) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int sub = 0; sub < 2; ++sub) {
      const uint32_t u = words[j] >> (8 * sub);
      b[j][sub][0] = and_or<0x000f000fu, Magic<D>::kBias>(u);
      b[j][sub][1] = Magic<D>::kNibble1 ? and_or<0x00f000f0u, Magic<D>::kBias>(u)
                                        : and_or<0x000f000fu, Magic<D>::kBias>(u >> 4);
    }
}

// Weight format of woq_kernel, any M and group size: dequantized in registers. A lane copies
// the (d, m) pairs of the columns it holds in B (na, na + 8).
template <class S> struct Int4 {
  using Raw = typename Pair<S>::Raw;
  struct Ring {
    uint4 w[kWarps][kStages][32];
    Raw dm[kWarps][kStages][32][2];
  };
  struct Tile {
    uint4 w;
    Raw dm[2];
  };
  struct Cursor : Int4Cursor<S>, woq::CpAsyncSync {
    using Int4Cursor<S>::Int4Cursor;
    uint32_t w0, dm0;  // shared addresses of the lane's word and pairs in slot 0
    __device__ void start(Ring& r, int warp, int lane, const CUtensorMap* map) {
      w0 = smem_addr(&r.w[warp][0][lane]), dm0 = smem_addr(&r.dm[warp][0][lane][0]);
      CpAsyncSync::start(r, warp, lane, map);
    }
    __device__ void issue(Ring&, int, int slot, int) {
      const uint4* word;
      const Raw* src = this->next(word);
      cp_async16(w0 + slot * uint32_t(sizeof(Ring::w[0][0])), word);
      const uint32_t dm = dm0 + slot * uint32_t(sizeof(Ring::dm[0][0]));
      Pair<S>::copy(dm, src);
      Pair<S>::copy(dm + sizeof(Raw), src + 8);
    }
  };
  __device__ static Tile read(const Ring& r, int warp, int slot, int lane) {
    return {r.w[warp][slot][lane], {r.dm[warp][slot][lane][0], r.dm[warp][slot][lane][1]}};
  }
  template <class D>
  __device__ static void dequant(const Tile& t, uint32_t (&b)[4][2][2]) {
    using H2 = typename Mma16<D>::H2;
    H2 d2[2], c2[2];
#pragma unroll
    for (int sub = 0; sub < 2; ++sub) {
      const float2 v = Pair<S>::to_f32(t.dm[sub]);
      d2[sub] = Mma16<D>::splat(v.x);
      c2[sub] = Mma16<D>::splat(fmaf(8.0f, v.x, v.y));  // m + 8 d
    }
    const H2 off = Magic<D>::bias_plus_8();
    magic_codes<D>(t.w, b);
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int sub = 0; sub < 2; ++sub) {
        H2 q[2];  // q - 8 of the two codes of each register, exact
        q[0] = __hsub2(from_bits<H2>(b[j][sub][0]), off);
        if constexpr (Magic<D>::kNibble1)
          q[1] = __hfma2(from_bits<H2>(b[j][sub][1]), Mma16<D>::splat(0.0625f), Magic<D>::minus_bias16_plus_8());
        else
          q[1] = __hsub2(from_bits<H2>(b[j][sub][1]), off);
#pragma unroll
        for (int h = 0; h < 2; ++h) b[j][sub][h] = bits(__hfma2(q[h], d2[sub], c2[sub]));
      }
  }
  __device__ static float finish(const woq::Args&, int64_t, float v) { return v; }  // scaled while dequantizing
};

// The dense weight W [N, K] (row-major, x's type) exactly as the tensor-core kernel's
// dequantization gives it: for large M, one cuBLAS GEMM on it beats dequantizing every
// weight again for each block of rows. A block takes one column tile (16 rows of W) and
// kDequantWarps k tiles, a warp per k tile and a lane per word of the packed layout, whose
// registers b[j][sub][h] hold columns 8 sub + gid at k = 64 t + 16 tig + 4 j + 2 h + {0, 1}:
// 16 consecutive k of each of two rows. Written straight to W, a warp's store would put 64
// bytes into each of 8 rows; so the tile goes through shared memory first and each warp
// then writes 512 contiguous bytes of one row per store (whole 128-byte lines).
constexpr int kDequantWarps = 8;
constexpr int kDequantK = kDequantWarps * kTileK;  // k of a block
constexpr int kDequantPitch = kDequantK + 8;       // elements per staged row (+16 bytes: no bank conflicts)
template <class D, class S>
__global__ void __launch_bounds__(kDequantWarps * 32) dequantize_kernel(const woq::Args a, uint16_t* __restrict__ w) {
  __shared__ __align__(16) uint16_t tile[woq::kTileN][kDequantPitch];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
  const int64_t k0 = int64_t(blockIdx.x) * kDequantK, t = k0 / kTileK + warp, p = blockIdx.y;
  if (t < a.ktiles) {
    Int4Cursor<S> cur(a, p, t, lane);
    const uint4* word;
    const typename Pair<S>::Raw* dm = cur.next(word);
    const typename Int4<S>::Tile tl{__ldg(word), {dm[0], dm[8]}};
    uint32_t b[4][2][2];
    Int4<S>::template dequant<D>(tl, b);
#pragma unroll
    for (int sub = 0; sub < 2; ++sub)
#pragma unroll
      for (int half = 0; half < 2; ++half)  // k + 8 half .. + 7: steps j = 2 half, 2 half + 1
        *reinterpret_cast<uint4*>(&tile[8 * sub + gid][kTileK * warp + 16 * tig + 8 * half]) =
            make_uint4(b[2 * half][sub][0], b[2 * half][sub][1], b[2 * half + 1][sub][0], b[2 * half + 1][sub][1]);
  }
  __syncthreads();
  const bool vec = a.K % 8 == 0;  // 16-byte stores stay aligned
  constexpr int kChunks = kDequantK / 8;  // 16-byte chunks per staged row
  for (int i = threadIdx.x; i < woq::kTileN * kChunks; i += kDequantWarps * 32) {
    const int r = i / kChunks, c = 8 * (i % kChunks);
    const int64_t n = p * woq::kTileN + r, k = k0 + c;
    if (n >= a.N || k >= a.K) continue;
    uint16_t* dst = w + n * a.K + k;
    if (vec && k + 8 <= a.K) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(&tile[r][c]);
    } else {
      for (int e = 0; e < 8 && k + e < a.K; ++e) dst[e] = tile[r][c + e];
    }
  }
}

// The packed weights' fields of `a` (a.K set; weights that passed check_w4a16_weights): g_shift =
// log2 of the group size when groups > 1.
void set_weights(woq::Args& a, const uint32_t* qweight, const void* scales, int64_t groups) {
  a.qweight = qweight, a.scales = scales, a.groups = groups, a.g_shift = 0;
  while (groups > 1 && (int64_t(1) << a.g_shift) < a.K / groups) ++a.g_shift;
}

// fn(TypeTag<D>{}, TypeTag<Int4<S>>{}) for x's dtype D and the scales' storage S (fp16 / fp32).
template <class Fn>
void with_w4a16_types(int x_dtype, int scales_dtype, Fn&& fn) {
  auto with_scales = [&](auto d) {
    scales_dtype == kF16 ? fn(d, TypeTag<Int4<uint16_t>>{}) : fn(d, TypeTag<Int4<float>>{});
  };
  x_dtype == kF16 ? with_scales(TypeTag<F16>{}) : with_scales(TypeTag<BF16>{});
}

}  // namespace

void int4_w4a16_plan(int64_t M, int64_t K, int64_t N, int x_dtype, int scales_dtype, int sm_count, int device,
                     int* splits, int64_t* counters) {
  with_w4a16_types(x_dtype, scales_dtype, [&](auto d, auto f) {
    woq::plan_for<typename decltype(d)::type, typename decltype(f)::type>(M, K, N, sm_count, device, splits, counters);
  });
}

int int4_linear_w4a16(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const uint32_t* qweight,
                      const void* scales, int scales_dtype, int64_t groups, int64_t N, const void* bias,
                      int bias_dtype, void* y, int64_t ldy, int splits, float* partial, int* counters, void* stream) {
  if (int st = check_w4a16_args(x, x_dtype, M, K, ldx, qweight, scales, scales_dtype, groups, N, bias, bias_dtype, y,
                                ldy, splits))
    return st;
  if (M == 0) return kOk;
  woq::Args a{};
  if (woq::set_shape(a, M, K, ldx, N, splits, partial, counters) != kOk) return kInvalidArgument;
  a.x = x;
  a.xvec = (reinterpret_cast<uintptr_t>(x) & 15u) == 0 && (ldx * 2) % 16 == 0;
  set_weights(a, qweight, scales, groups);
  a.bias = bias, a.bias_dtype = bias_dtype, a.y = y, a.ldy = ldy;
  (void)cudaGetLastError();  // report only what our launch does
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  int st = kOk;
  with_w4a16_types(x_dtype, scales_dtype, [&](auto d, auto f) {
    st = woq::launch<typename decltype(d)::type, typename decltype(f)::type>(a, s);
  });
  return st != kOk ? st : launch_status("int4_linear_w4a16");
}

int int4_dequantize_w4a16(const uint32_t* qweight, const void* scales, int scales_dtype, int64_t groups, int64_t N,
                          int64_t K, void* w, int w_dtype, void* stream) {
  if (check_w4a16_weights(K, N, qweight, scales, scales_dtype, groups) != kOk) return kInvalidArgument;
  if (!qweight || !scales || !w || (w_dtype != kF16 && w_dtype != kBF16)) return kInvalidArgument;
  woq::Args a{};
  a.N = N, a.K = K, a.Np = woq::cdiv(N, woq::kTileN) * woq::kTileN, a.ktiles = woq::cdiv(K, kTileK);
  set_weights(a, qweight, scales, groups);
  if (a.Np / woq::kTileN > 65535 || reinterpret_cast<uintptr_t>(w) % 16 != 0) return kInvalidArgument;
  (void)cudaGetLastError();
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  auto* wp = static_cast<uint16_t*>(w);
  const dim3 grid(unsigned(woq::cdiv(K, kDequantK)), unsigned(a.Np / woq::kTileN));
  constexpr int kThreads = kDequantWarps * 32;
  if (w_dtype == kF16) {
    scales_dtype == kF16 ? dequantize_kernel<F16, uint16_t><<<grid, kThreads, 0, s>>>(a, wp)
                         : dequantize_kernel<F16, float><<<grid, kThreads, 0, s>>>(a, wp);
  } else {
    scales_dtype == kF16 ? dequantize_kernel<BF16, uint16_t><<<grid, kThreads, 0, s>>>(a, wp)
                         : dequantize_kernel<BF16, float><<<grid, kThreads, 0, s>>>(a, wp);
  }
  return launch_status("int4_dequantize_w4a16");
}

}  // namespace lowbit::cuda

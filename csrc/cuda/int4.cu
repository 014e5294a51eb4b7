// INT4 on CUDA: the W4A16 linear layer on tensor cores (mma.sync m16n8k16, fp32
// accumulation), built for decode and small batches (M = 1..64 per block) and
// correct for any M, N, K >= 1.
//
// Work split. A warp owns 16 output columns (two n8 mma tiles) and walks its share
// of K in tiles of 64; a block is kWarps such warps side by side (64 columns, so
// they read the same activations and share them through L1) times up to MT m16
// tiles of activation rows. Each warp streams its weights through a kStages-deep
// cp.async ring in shared memory, so about 3.5 KB per warp are always in flight
// (what hides HBM latency: the loads need no registers while the warp computes).
// When N is too small to fill one wave of resident blocks (N = 4096 gives 64 blocks
// for 132 SMs), K is split across gridDim.y blocks:
// each writes its fp32 partial sums, and the last block of a column tile to finish
// (elected by an atomic counter, which it then resets) adds them up in split order
// (so results do not depend on timing) and writes y.
//
// Weight layout (lowbit.formats.int4.pack_cuda; one 16-byte load per lane per
// tile): for column tile p and k tile t, lane l = 4 * gid + tig holds 4 words, word j
// for mma step j. The mma's k slots are mapped to real k so that each lane's 16
// activations of a tile are contiguous: slot pair (2 tig, 2 tig + 1) of step j is
// k = 64 t + 16 tig + 4 j + {0, 1}, slot pair (2 tig + 8, 2 tig + 9) is + {2, 3}.
// A and B use the same map, so the sum over slots is the sum over real k. Word j
// holds, for columns na = 16 p + gid (sub 0) and na + 8 (sub 1), the codes of
// k = kb + e (kb = 64 t + 16 tig + 4 j) in nibble 2 sub + (e >> 1) + 4 (e & 1): so
// (word >> (8 sub + 4 h)) & 0x000f000f holds the two codes of B register h of sub.
//
// Dequantization in registers: OR-ing a 4-bit code into the mantissa of 1024.0
// (fp16 0x6400) or 128.0 (bf16 0x4300) gives 1024 + q / 128 + q exactly; subtracting
// 1032 / 136 gives q - 8 exactly; w = (q - 8) * d + (m + 8 d) is one fma2. (The
// centred form keeps the fma's inputs small, which matters for bf16's 8-bit
// significand: (q - 8) * d + (m + 8 d) rounds d and m + 8 d, both of order d.)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "int4.h"
#include "lowbit/cuda_common.cuh"
#include "ptx.cuh"

namespace lowbit::cuda {
namespace {

constexpr int kWarps = 4;                     // warps per block, side by side along N
constexpr int kThreads = kWarps * 32;
constexpr int kTileN = 16;                    // output columns per warp
constexpr int kBlockN = kWarps * kTileN;      // output columns per block
constexpr int kTileK = 64;                    // k per warp step (one 16-byte load per lane)
constexpr int kStages = 8;                    // k tiles a warp keeps in flight (cp.async ring; a power of 2)
constexpr int kMaxSplits = 16;
constexpr int kMinTilesPerSplit = 2;
constexpr int kBlocksPerSm = 4;               // resident blocks per SM (launch bound); the split aims at one wave
constexpr int64_t kMaxGridZ = 65535;

using namespace ptx;

// ---- the two activation types: their mma and packed pairs (ptx.cuh), their magic bias
struct F16Mma : Mma16<F16> {
  static constexpr uint32_t kBias = 0x64006400u;  // 1024.0 in each half
  __device__ static H2 bias_plus_8() { return __float2half2_rn(1032.0f); }
};

struct BF16Mma : Mma16<BF16> {
  static constexpr uint32_t kBias = 0x43004300u;  // 128.0 in each half
  __device__ static H2 bias_plus_8() { return __float2bfloat162_rn(136.0f); }
};

template <class D> struct MmaOf;
template <> struct MmaOf<F16> { using type = F16Mma; };
template <> struct MmaOf<BF16> { using type = BF16Mma; };

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
  __device__ static void copy(Raw* dst, const Raw* src) { cp_async4(dst, src); }
  __device__ static float2 to_f32(Raw r) { return __half22float2(from_bits<__half2>(r)); }
};
template <> struct Pair<float> {
  using Raw = float2;
  __device__ static void copy(Raw* dst, const Raw* src) { cp_async8(dst, src); }
  __device__ static float2 to_f32(Raw r) { return r; }
};

struct W4A16Args {
  const void* x;
  int64_t M, K, ldx;
  bool xvec;  // x rows may be read 16 bytes at a time
  const uint4* qweight;
  const void* scales;
  int64_t groups, N, Np, ktiles;
  int g_shift;  // log2 of the group size when groups > 1 (then g is 32, 64 or 128)
  int splits;
  int64_t tiles_per_split;
  const void* bias;
  int bias_dtype;
  void* y;
  int64_t ldy;
  float* partial;
  int* counters;
};

// The 16 activations x[r, k0 .. k0 + 16) as 8 packed pairs (zeros past M and K).
template <class D>
__device__ __forceinline__ void load_x16(const W4A16Args& a, int64_t r, int64_t k0, uint32_t (&out)[8]) {
  using T = typename D::T;
  if (r >= a.M) {
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = 0;
    return;
  }
  const T* p = static_cast<const T*>(a.x) + r * a.ldx + k0;
  if (a.xvec && k0 + 16 <= a.K) {
    const uint4 lo = __ldg(reinterpret_cast<const uint4*>(p)), hi = __ldg(reinterpret_cast<const uint4*>(p + 8));
    out[0] = lo.x, out[1] = lo.y, out[2] = lo.z, out[3] = lo.w;
    out[4] = hi.x, out[5] = hi.y, out[6] = hi.z, out[7] = hi.w;
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t e0 = k0 + 2 * i < a.K ? p[2 * i] : 0, e1 = k0 + 2 * i + 1 < a.K ? p[2 * i + 1] : 0;
    out[i] = e0 | (e1 << 16);
  }
}

// The activation fragments of one m16 tile for one k tile: rows gid and gid + 8, the lane's 16 k.
struct XFrag {
  uint32_t lo[8], hi[8];
};

template <class D>
__device__ __forceinline__ void load_xfrag(const W4A16Args& a, int64_t row0, int64_t k0, XFrag& f) {
  const int gid = (threadIdx.x & 31) >> 2;
  load_x16<D>(a, row0 + gid, k0, f.lo);
  load_x16<D>(a, row0 + gid + 8, k0, f.hi);
}

// One k tile of one warp: dequantize the 16 B registers (4 steps x 2 n8 tiles x 2),
// then run them against each m16 tile of activations (m tile 0's loaded ahead by the caller).
template <class D, class S, int MT>
__device__ __forceinline__ void tile_mma(const W4A16Args& a, float (&acc)[MT][2][4], uint4 w,
                                         const typename Pair<S>::Raw (&dm)[2], int64_t m0, int64_t k0,
                                         const XFrag& first) {
  using Mma = typename MmaOf<D>::type;
  using H2 = typename Mma::H2;
  H2 d2[2], c2[2];
#pragma unroll
  for (int sub = 0; sub < 2; ++sub) {
    const float2 v = Pair<S>::to_f32(dm[sub]);
    d2[sub] = Mma::splat(v.x);
    c2[sub] = Mma::splat(fmaf(8.0f, v.x, v.y));  // m + 8 d
  }
  const H2 off = Mma::bias_plus_8();
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  uint32_t b[4][2][2];
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int sub = 0; sub < 2; ++sub)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t t = ((words[j] >> (8 * sub + 4 * h)) & 0x000f000fu) | Mma::kBias;
        b[j][sub][h] = bits(__hfma2(__hsub2(from_bits<H2>(t), off), d2[sub], c2[sub]));
      }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    if (m0 + 16 * mt >= a.M) break;  // warp-uniform
    XFrag other;
    if (mt > 0) load_xfrag<D>(a, m0 + 16 * mt, k0, other);
    const XFrag& x = mt == 0 ? first : other;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t frag[4] = {x.lo[2 * j], x.hi[2 * j], x.lo[2 * j + 1], x.hi[2 * j + 1]};
#pragma unroll
      for (int sub = 0; sub < 2; ++sub) Mma::mma(acc[mt][sub], frag, b[j][sub][0], b[j][sub][1]);
    }
  }
}

template <class D>
__device__ __forceinline__ void store_y(const W4A16Args& a, int64_t r, int64_t n, float v) {
  if (a.bias) v += load_f32(a.bias, a.bias_dtype, n);
  static_cast<typename D::T*>(a.y)[r * a.ldy + n] = D::from_f32(v);
}

template <class D, class S, int MT>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) w4a16_kernel(W4A16Args a) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
  const int64_t nt = int64_t(blockIdx.x) * kWarps + warp;  // this warp's 16-column tile
  const bool active = nt < a.Np / kTileN;                   // warp-uniform; idle warps still meet the barriers
  const int64_t na = nt * kTileN + gid;                     // column of this lane's sub-tile 0 (sub 1: na + 8)
  const int split = blockIdx.y;
  const int64_t t_begin = split * a.tiles_per_split;
  const int64_t t_end = t_begin + a.tiles_per_split < a.ktiles ? t_begin + a.tiles_per_split : a.ktiles;
  const int64_t mblocks = (a.M + 16 * MT - 1) / (16 * MT);

  for (int64_t mb = blockIdx.z; mb < mblocks; mb += gridDim.z) {
    const int64_t m0 = mb * 16 * MT;
    float acc[MT][2][4] = {};
    if (active) {
      // Ring of kStages tiles per warp; each lane copies and later reads only its own slots,
      // so cp.async.wait_group alone orders them (no warp or block barrier).
      using Raw = typename Pair<S>::Raw;
      __shared__ uint4 ring_w[kWarps][kStages][32];
      __shared__ Raw ring_dm[kWarps][kStages][32][2];
      // 32-bit tile arithmetic from here (K < 2^37); the per-tile loop is instruction-bound.
      const uint4* wp = a.qweight + (nt * a.ktiles + t_begin) * 32 + lane;
      const typename Pair<S>::Raw* sp = static_cast<const typename Pair<S>::Raw*>(a.scales) + na;
      const int count = int(t_end - t_begin), k_lane = int(t_begin) * kTileK + 16 * tig, last_grp = int(a.groups) - 1;
      auto issue = [&](int i) {  // tile t_begin + i into slot i % kStages (always one commit group)
        if (i < count) {
          const int slot = i & (kStages - 1);
          cp_async16(&ring_w[warp][slot][lane], wp + i * 32);
          // a lane's 16 k lie in one group; k past K (x is zero there) takes the last group
          int grp = last_grp == 0 ? 0 : (k_lane + i * kTileK) >> a.g_shift;
          grp = grp < last_grp ? grp : last_grp;
          const typename Pair<S>::Raw* src = sp + int64_t(grp) * a.Np;
          Pair<S>::copy(&ring_dm[warp][slot][lane][0], src);
          Pair<S>::copy(&ring_dm[warp][slot][lane][1], src + 8);
        }
        cp_async_commit();
      };
      for (int i = 0; i < kStages - 1; ++i) issue(i);
      XFrag x_cur, x_next;  // m tile 0's activations, one k tile ahead (an L1/L2 round trip off the chain)
      if (count > 0) load_xfrag<D>(a, m0, k_lane, x_cur);
      for (int i = 0; i < count; ++i) {
        cp_async_wait<kStages - 2>();  // tile i has landed
        const int slot = i & (kStages - 1);
        const uint4 w = ring_w[warp][slot][lane];
        const Raw dm[2] = {ring_dm[warp][slot][lane][0], ring_dm[warp][slot][lane][1]};
        issue(i + kStages - 1);  // into the slot tile i - 1 used (already read)
        if (i + 1 < count) load_xfrag<D>(a, m0, k_lane + (i + 1) * kTileK, x_next);
        tile_mma<D, S, MT>(a, acc, w, dm, m0, k_lane + i * kTileK, x_cur);
        x_cur = x_next;
      }
      cp_async_wait<0>();  // (empty groups) before the ring is reused
    }

    // Fragment (mt, sub) element e: row m0 + 16 mt + gid + 8 (e >> 1), column nt * 16 + 8 sub + 2 tig + (e & 1).
    if (a.splits == 1) {
      if (!active) continue;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int sub = 0; sub < 2; ++sub)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int64_t r = m0 + 16 * mt + gid + 8 * (e >> 1), n = nt * kTileN + 8 * sub + 2 * tig + (e & 1);
            if (r < a.M && n < a.N) store_y<D>(a, r, n, acc[mt][sub][e]);
          }
      continue;
    }
    // Split K (then gridDim.z == mblocks): partial[split, r, n], then the last block adds up.
    if (active) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int sub = 0; sub < 2; ++sub)
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            const int64_t r = m0 + 16 * mt + gid + 8 * hr, n = nt * kTileN + 8 * sub + 2 * tig;
            if (r < a.M)
              *reinterpret_cast<float2*>(a.partial + (split * a.M + r) * a.Np + n) =
                  make_float2(acc[mt][sub][2 * hr], acc[mt][sub][2 * hr + 1]);
          }
    }
    __threadfence();  // our partials are visible device-wide before we are counted
    __syncthreads();
    __shared__ int last;
    int* counter = a.counters + blockIdx.z * gridDim.x + blockIdx.x;
    if (threadIdx.x == 0) last = atomicAdd(counter, 1) == a.splits - 1;
    __syncthreads();
    if (!last) continue;
    __threadfence();
    const int64_t n0 = int64_t(blockIdx.x) * kBlockN;
    const int64_t rows = a.M - m0 < 16 * MT ? a.M - m0 : 16 * MT;
    for (int64_t i = threadIdx.x; i < rows * kBlockN; i += kThreads) {
      const int64_t r = m0 + i / kBlockN, n = n0 + i % kBlockN;
      if (n >= a.N) continue;
      float v = 0.0f;
      for (int s = 0; s < a.splits; ++s) v += __ldcg(a.partial + (s * a.M + r) * a.Np + n);  // L2: other SMs wrote it
      store_y<D>(a, r, n, v);
    }
    if (threadIdx.x == 0) *counter = 0;  // ready for the next call on this stream
  }
}

int pick_mt(int64_t M) { return M <= 16 ? 1 : M <= 32 ? 2 : 4; }

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <class D, class S, int MT>
void launch_mt(const W4A16Args& a, cudaStream_t s) {
  const int64_t mblocks = cdiv(a.M, 16 * MT);
  const dim3 grid(unsigned(cdiv(a.Np / kTileN, kWarps)), unsigned(a.splits),
                  unsigned(mblocks < kMaxGridZ ? mblocks : kMaxGridZ));
  w4a16_kernel<D, S, MT><<<grid, kThreads, 0, s>>>(a);
}

template <class D, class S>
void launch(const W4A16Args& a, cudaStream_t s) {
  switch (pick_mt(a.M)) {
    case 1: return launch_mt<D, S, 1>(a, s);
    case 2: return launch_mt<D, S, 2>(a, s);
    default: return launch_mt<D, S, 4>(a, s);
  }
}

}  // namespace

void int4_w4a16_plan(int64_t M, int64_t K, int64_t N, int sm_count, int* splits, int64_t* counters) {
  const int64_t ntiles = cdiv(N, kTileN), ktiles = cdiv(K, kTileK);
  const int64_t mblocks = cdiv(M < 1 ? 1 : M, 16 * pick_mt(M));
  // As many splits as fit in one wave of resident blocks (a second, partial wave would idle most SMs).
  int64_t s = int64_t(sm_count < 1 ? 1 : sm_count) * kBlocksPerSm / (cdiv(ntiles, kWarps) * mblocks);
  const int64_t most = ktiles / kMinTilesPerSplit < kMaxSplits ? ktiles / kMinTilesPerSplit : kMaxSplits;
  if (s > most) s = most;
  if (s < 1 || mblocks > kMaxGridZ) s = 1;
  s = cdiv(ktiles, cdiv(ktiles, s));  // no empty split
  *splits = int(s);
  *counters = s > 1 ? cdiv(ntiles, kWarps) * mblocks : 0;
}

int int4_linear_w4a16(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const uint32_t* qweight,
                      const void* scales, int scales_dtype, int64_t groups, int64_t N, const void* bias,
                      int bias_dtype, void* y, int64_t ldy, int splits, float* partial, int* counters, void* stream) {
  if (int st = check_w4a16_args(x, x_dtype, M, K, ldx, qweight, scales, scales_dtype, groups, N, bias, bias_dtype, y,
                                ldy, splits))
    return st;
  if (M == 0) return kOk;
  W4A16Args a{};
  a.x = x, a.M = M, a.K = K, a.ldx = ldx;
  a.xvec = (reinterpret_cast<uintptr_t>(x) & 15u) == 0 && (ldx * 2) % 16 == 0;
  a.qweight = reinterpret_cast<const uint4*>(qweight), a.scales = scales;
  int g_shift = 0;
  while (groups > 1 && (int64_t(1) << g_shift) < K / groups) ++g_shift;
  if (groups > 1 && (int64_t(1) << g_shift) != K / groups) return kInvalidArgument;  // g = 32, 64, 128 (or K)
  a.groups = groups, a.g_shift = g_shift, a.N = N, a.Np = cdiv(N, kTileN) * kTileN, a.ktiles = cdiv(K, kTileK);
  a.splits = splits, a.tiles_per_split = cdiv(a.ktiles, splits);
  a.bias = bias, a.bias_dtype = bias_dtype, a.y = y, a.ldy = ldy, a.partial = partial, a.counters = counters;
  if (splits > a.ktiles || (reinterpret_cast<uintptr_t>(qweight) & 15u) != 0) return kInvalidArgument;
  if (splits > 1 && (!partial || !counters || cdiv(M, 16 * pick_mt(M)) > kMaxGridZ)) return kInvalidArgument;
  (void)cudaGetLastError();  // report only what our launch does
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (x_dtype == kF16) {
    scales_dtype == kF16 ? launch<F16, uint16_t>(a, s) : launch<F16, float>(a, s);
  } else {
    scales_dtype == kF16 ? launch<BF16, uint16_t>(a, s) : launch<BF16, float>(a, s);
  }
  return launch_status("int4_linear_w4a16");
}

}  // namespace lowbit::cuda

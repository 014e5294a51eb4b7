// Weight-only quantized linear layers on tensor cores (mma.sync m16n8k16, fp32
// accumulation): y[M, N] = x[M, K] . W^T (+ bias), x and y fp16 or bf16, for decode and
// small batches (M = 1..64 per block; the ops take M > 48 to a dequantized weight and
// cuBLAS, ops/int8.py DENSE_MIN_M) and correct for any M, N, K >= 1. One kernel
// template; the weight format is a policy: W4A16 (int4.cu: packed nibbles, group scales
// applied while dequantizing) and W8A16 (int8.cu: the canonical int8 [N, K] rows, the
// per-channel scale applied to the sums).
//
// Work split. A warp owns 16 output columns (two n8 mma tiles) and walks its share of K
// in tiles of 64; a block is kWarps such warps side by side (64 columns, so they read the
// same activations and share them through L1) times up to MT m16 tiles of activation
// rows. Each warp streams its weights through a kStages-deep cp.async ring in shared
// memory (what hides HBM latency: the loads need no registers while the warp computes);
// each lane copies and later reads only its own slots, so cp.async.wait_group alone
// orders them (no warp or block barrier). When N is too small to fill one wave of
// resident blocks (N = 4096 gives 64 blocks for 132 SMs), K is split across gridDim.y
// blocks: each writes its fp32 partial sums, and the last block of a column tile to
// finish (elected by an atomic counter, which it then resets) adds them up in split
// order (so results do not depend on timing) and writes y.
//
// M <= 16 (decode) swaps the operands: y^T = W . x^T, the 16 columns of a warp on the mma's
// m16 and the rows of x on its n8 (SW = 1 block of 8 rows for M <= 8, 2 for M <= 16), so a
// step is SW mmas on one weight fragment, and the activations need no zero halves nor
// fragment shuffles. A warp takes its tiles two at a time (two activation fragments used
// alternately: no register copies), and its cursor moves through the weights by pointer
// increments (the loop is short: every address computation shows).
// Opt-in for M <= 16: two column tiles per warp (LOWBIT_CUDA_WOQ_TILES=2) or more resident
// warps (LOWBIT_CUDA_WOQ_BLOCKS=6|8); see pick().
//
// The k order. The mma's k slots are mapped to real k so that each lane's 16 k of a tile
// are contiguous: slot pair (2 tig, 2 tig + 1) of mma step j is k = 64 t + 16 tig + 4 j +
// {0, 1}, slot pair (2 tig + 8, 2 tig + 9) is + {2, 3} (gid = lane / 4, tig = lane % 4).
// A and B use the same map, so the sum over slots is the sum over real k: a lane loads its
// 16 activations of a row with two 16-byte loads, and its weights as 16 (W4) or 2 x 16
// (W8) contiguous bytes per tile.
#pragma once
#include <cuda.h>  // CUtensorMap (a type only)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "common.h"
#include "lowbit/cuda_common.cuh"
#include "ptx.cuh"
#include "wgmma.cuh"

namespace lowbit::cuda::woq {

constexpr int kWarps = 4;                 // warps per block, side by side along N
constexpr int kThreads = kWarps * 32;
template <int NT> constexpr int kThreadsOf = kThreads / NT;  // a block's threads with NT column tiles per warp
constexpr int kTileN = 16;                // output columns per warp
constexpr int kBlockN = kWarps * kTileN;  // output columns per block
constexpr int kTileK = 64;                // k per warp step
constexpr int kStages = 8;                // k tiles a warp keeps in flight (cp.async ring; a power of 2)
constexpr int kMaxSplits = 16;
constexpr int kMaxClusterSplits = 8;      // with the splits as one cluster (the portable cluster size)
constexpr int kMinTilesPerSplit = 2;
constexpr int kBlocksPerSm = 4;           // resident blocks per SM by default (launch bound); the split aims at one wave
constexpr int64_t kMaxGridZ = 65535;
constexpr int64_t kMaxK = 2147483647 - kTileK;  // a lane's k is 32-bit (the loop's tile arithmetic)

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Args {
  const void* x;
  int64_t M, K, ldx;
  bool xvec;  // x rows may be read 16 bytes at a time
  const void* qweight;
  const void* scales;
  int64_t groups;  // W4: scale groups along K
  int64_t N, Np, ktiles;
  int g_shift;  // W4: log2 of the group size when groups > 1 (then g is 32, 64 or 128)
  int splits;
  int64_t tiles_per_split;
  const void* bias;
  int bias_dtype;
  void* y;
  int64_t ldy;
  float* partial;  // [splits, M, Np] fp32 when splits > 1
  int* counters;   // one per (column block, m block), zero before and after a call
};

// ---- activations ---------------------------------------------------------------------
// A lane's activation rows of an m16 tile (row gid, and gid + 8 unless SW == 1), at its first k,
// and how far its 16-byte loads stay inside K: set up once per m tile, so a k tile costs an
// address add and one compare per row. Rows past M read row M - 1 instead of zeros: their
// products land only in outputs past M (an mma never mixes rows), which are never stored.
// (Opaque values: else the compiler recomputes them from the kernel's arguments every tile.)
template <class D>
struct XRows {
  using T = typename D::T;
  const T* p[2];
  int vec_end;  // k0 < vec_end: the lane's 16 k from k0 are inside K and x rows 16-byte aligned
  __device__ XRows(const Args& a, int64_t row0, int k0) {
    const int gid = (threadIdx.x & 31) >> 2;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t r = row0 + gid + 8 * h;
      p[h] = ptx::opaque(static_cast<const T*>(a.x) + (r < a.M ? r : a.M - 1) * a.ldx + k0);
    }
    vec_end = ptx::opaque(a.xvec ? int(a.K - 15 < 2147483647 ? a.K - 15 : 2147483647) : -2147483647 - 1);
  }
  // The 16 activations q[0 .. 16) (k0 .. k0 + 16) as 8 packed pairs, zeros past K.
  __device__ void load16(const Args& a, const T* q, int k0, uint32_t (&out)[8]) const {
    if (k0 < vec_end) {
      const uint4 lo = __ldg(reinterpret_cast<const uint4*>(q)), hi = __ldg(reinterpret_cast<const uint4*>(q + 8));
      out[0] = lo.x, out[1] = lo.y, out[2] = lo.z, out[3] = lo.w;
      out[4] = hi.x, out[5] = hi.y, out[6] = hi.z, out[7] = hi.w;
      return;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t e0 = k0 + 2 * i < a.K ? q[2 * i] : 0, e1 = k0 + 2 * i + 1 < a.K ? q[2 * i + 1] : 0;
      out[i] = e0 | (e1 << 16);
    }
  }
  template <class Frag>
  __device__ void load(const Args& a, int dk, int k, Frag& f) const {  // dk: from the first k
    load16(a, p[0] + dk, k, f.lo);
    if constexpr (Frag::kRows == 2) load16(a, p[1] + dk, k, f.hi);
  }
};

// The activations of one k tile: rows gid and gid + 8 of an m16 tile, the lane's 16 k, as
// the A operand of x . W^T; with SW > 0 (M <= 16) as the B operands of the swapped product
// W . x^T, one per block of 8 rows: row gid (lo), row gid + 8 if SW == 2 (hi) (see tile_mma).
template <int SW>
struct XFrag {
  static constexpr int kRows = SW == 1 ? 1 : 2;
  uint32_t lo[8], hi[kRows == 1 ? 1 : 8];
  // The A operand of mma step j (rows gid | gid + 8) x (slot pairs 2 tig | 2 tig + 8).
  __device__ void frag(int j, uint32_t (&f)[4]) const {
    static_assert(SW == 0, "the swapped product's activations are B operands");
    f[0] = lo[2 * j], f[1] = hi[2 * j], f[2] = lo[2 * j + 1], f[3] = hi[2 * j + 1];
  }
};

// One k tile of one warp: the 16 dequantized weight registers b[j][sub][h] (4 steps x 2 n8
// column halves x 2) against each m16 tile of activations (m tile 0's loaded ahead by the
// caller; the others here). SW > 0 (M <= 16) swaps the operands, y^T = W . x^T: the
// weights of a step are one A operand (rows = the 16 columns, gid | gid + 8 = sub 0 | 1; k
// slot pairs 2 tig | 2 tig + 8 = h 0 | 1) and each block of 8 rows of x a B operand (n8 =
// the rows; row gid's activations, and row gid + 8's into acc[0][1] if SW == 2), with no
// zero halves or fragment shuffles to assemble.
template <class D, int MT, int SW>
__device__ __forceinline__ void tile_mma(const Args& a, float (&acc)[MT][2][4], const uint32_t (&b)[4][2][2],
                                         int64_t m0, int k0, const XFrag<SW>& first) {
  if constexpr (SW > 0) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t w[4] = {b[j][0][0], b[j][1][0], b[j][0][1], b[j][1][1]};
      ptx::Mma16<D>::mma(acc[0][0], w, first.lo[2 * j], first.lo[2 * j + 1]);
      if constexpr (SW == 2) ptx::Mma16<D>::mma(acc[0][1], w, first.hi[2 * j], first.hi[2 * j + 1]);
    }
  } else {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if (m0 + 16 * mt >= a.M) break;  // warp-uniform
      XFrag<SW> other;
      if (mt > 0) XRows<D>(a, m0 + 16 * mt, k0).load(a, 0, k0, other);
      const XFrag<SW>& x = mt == 0 ? first : other;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t frag[4];
        x.frag(j, frag);
#pragma unroll
        for (int sub = 0; sub < 2; ++sub) ptx::Mma16<D>::mma(acc[mt][sub], frag, b[j][sub][0], b[j][sub][1]);
      }
    }
  }
}

// Where accumulator element (mt, sub, e) of lane `lane` lands in y: x . W^T's layout (row
// m0 + 16 mt + gid + 8 (e >> 1), column 16 nt + 8 sub + 2 tig + (e & 1)), or with SW > 0 the
// swapped product's (sub: the block of 8 rows; row m0 + 8 sub + 2 tig + (e & 1), column
// 16 nt + gid + 8 (e >> 1)).
template <int SW>
__device__ __forceinline__ void elem_pos(int lane, int64_t m0, int64_t nt, int mt, int sub, int e, int64_t& r,
                                         int64_t& n) {
  const int gid = lane >> 2, tig = lane & 3;
  if constexpr (SW > 0) {
    r = m0 + 8 * sub + 2 * tig + (e & 1), n = nt * kTileN + gid + 8 * (e >> 1);
  } else {
    r = m0 + 16 * mt + gid + 8 * (e >> 1), n = nt * kTileN + 8 * sub + 2 * tig + (e & 1);
  }
}

// y[r, n] = F's finish of the sum v (its scale, if any) + bias.
template <class D, class F>
__device__ __forceinline__ void store_y(const Args& a, int64_t r, int64_t n, float v) {
  v = F::finish(a, n, v);
  if (a.bias) v += load_f32(a.bias, a.bias_dtype, n);
  static_cast<typename D::T*>(a.y)[r * a.ldy + n] = D::from_f32(v);
}

// ---- the K split's sums through a cluster (opt-in, LOWBIT_CUDA_WOQ_REDUCE=cluster) ----------
// The splits of a column block are one thread-block cluster (1 x splits x 1; the split is the
// cluster rank, sm_90a builds): each block writes its sums into its shared memory `red` (element
// q of thread t at q * threads + t), a cluster barrier publishes them, and each block adds up
// the elements q = rank, rank + splits, ... of every thread from every block's copy, in split
// order from 0.0f (the same sums in the same order as the counter path below: the same bits),
// and writes y; a second barrier keeps each block's copy alive until all have read it. No
// partial buffer, counters or fences, and so nothing to zero before a call (a CUDA graph of
// such calls holds one kernel a call). The decode kernels only (MT == 1, M <= 16).
template <class D, class F, int SW, int NT>
__device__ void cluster_reduce(const Args& a, const float (&acc)[NT][1][2][4], int64_t m0) {
#if defined(LOWBIT_WGMMA)
  constexpr int kSubs = SW == 1 ? 1 : 2, kT = kThreadsOf<NT>, kElems = NT * kSubs * 4;  // slots per thread
  __shared__ float red[kElems * kT];
  const int tid = threadIdx.x;
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int sub = 0; sub < kSubs; ++sub)
#pragma unroll
      for (int e = 0; e < 4; ++e) red[((j * kSubs + sub) * 4 + e) * kT + tid] = acc[j][0][sub][e];
  wgmma::cluster_sync();
  const int splits = a.splits, rank = int(wgmma::cluster_ctarank());
  const int64_t tiles_n = a.Np / kTileN;
  for (int i = rank * kT + tid; i < kElems * kT; i += splits * kT) {
    float v = 0.0f;
    for (int s = 0; s < splits; ++s) v += wgmma::ld_cluster_f32(red + i, uint32_t(s));
    const int t = i % kT, q = i / kT, j = q / (kSubs * 4), sub = (q / 4) % kSubs, e = q % 4;
    const int64_t tile = int64_t(blockIdx.x) * kWarps + NT * (t >> 5) + j;
    int64_t r, n;
    elem_pos<SW>(t & 31, m0, tile, 0, sub, e, r, n);
    if (tile < tiles_n && r < a.M && n < a.N) store_y<D, F>(a, r, n, v);
  }
  wgmma::cluster_sync();
#else
  (void)a, (void)acc, (void)m0;
  __trap();  // built without sm_90a code: the host never launches it (pick())
#endif
}

// ---- how a warp's ring is synchronized ------------------------------------------------
// The cursor of a format derives from one of these. CpAsyncSync: every lane copies its own
// slots with cp.async and waits for its own commit groups, so no barrier is needed at all.
struct CpAsyncSync {
  template <class Ring>
  __device__ void start(Ring&, int, int, const CUtensorMap*) {}
  __device__ static void commit() { ptx::cp_async_commit(); }  // one group per tile issued (or not)
  template <class Ring>
  __device__ void wait(Ring&, int, int) {  // tile i has landed (kStages - 2 newer groups may not)
    ptx::cp_async_wait<kStages - 2>();
  }
  __device__ static void release() {}
  __device__ static void drain() { ptx::cp_async_wait<0>(); }  // (empty groups) before the ring is reused
};

// BulkSync (sm_90a builds; opt-in, LOWBIT_CUDA_WOQ_COPY=bulk): lane 0 copies each whole tile
// with TMA copies counted on the slot's mbarrier (Ring::bar[warp][slot]); every lane waits on
// it, with the parity of the slot's use in bit `slot` of `phase`. Lane 0 refills the slot the
// warp read one tile earlier, so release() is a __syncwarp between the reads and that. `map`:
// the weights' tensor map, for formats that copy boxes of a 2-D tensor (the kernel parameter).
struct BulkSync {
  uint32_t phase = 0;
  const CUtensorMap* map = nullptr;
  template <class Ring>
  __device__ void start(Ring& r, int warp, int lane, const CUtensorMap* tensor_map) {
    map = tensor_map;
#if defined(LOWBIT_WGMMA)
    if (lane == 0) {
      for (int s = 0; s < kStages; ++s) wgmma::mbar_init(&r.bar[warp][s], 1);
      wgmma::mbar_init_fence();
    }
    __syncwarp();
    phase = 0;
#else
    __trap();  // built without sm_90a code: the host never launches it
#endif
  }
  __device__ static void commit() {}
  template <class Ring>
  __device__ void wait(Ring& r, int warp, int slot) {
#if defined(LOWBIT_WGMMA)
    wgmma::mbar_wait(&r.bar[warp][slot], (phase >> slot) & 1u);
    phase ^= 1u << slot;
#endif
  }
  __device__ static void release() { __syncwarp(); }
  __device__ static void drain() {}  // every tile issued was waited for
};

// ---- the kernel -----------------------------------------------------------------------
// F, the weight format: F::Ring (the block's rings: kWarps x kStages slots of 32 lanes, one
// row of slots per column tile of the block), F::Cursor (a lane's position in its column
// tile: constructed at the warp's first tile, issue(ring, c, slot, lane) copies its next tile
// into slot `slot` of row c and moves on; and the ring's synchronization, CpAsyncSync or
// BulkSync above), F::Tile / F::read(ring, c, slot, lane) (a lane's slot back in registers),
// F::dequant<D>(tile, b) (the 16 weight registers) and F::finish(a, n, sum).
// map: the weights' tensor map, for the formats whose cursor copies boxes by TMA (unused by
// the others).
// NT: column tiles per warp. 1 by default; 2 (opt-in, LOWBIT_CUDA_WOQ_TILES=2, M <= 16): the
// block's kWarps column tiles on kWarps / 2 warps, each sharing its activation loads, its ring
// waits and its loop between two tiles, i.e. fewer instructions per weight byte for a loop that
// is issue-bound, and (M = 9-16) half the activation bytes per weight byte (README). The sums
// are the same, in the same order: the same bits.
// BPS: the resident blocks per SM the launch bound promises (see pick()); code only.
// CR: the K split's sums meet through a cluster (cluster_reduce; opt-in, see pick()) instead of
// the partial buffer and the counters.
template <class C, int NT> struct Cursors {
  C c[NT];
  template <int... J>
  __device__ Cursors(const Args& a, const int64_t* nt, int64_t t_begin, int lane, std::integer_sequence<int, J...>)
      : c{C(a, nt[J], t_begin, lane)...} {}
};

template <class D, class F, int MT, int SW, int NT = 1, int BPS = kBlocksPerSm, bool CR = false>
__global__ void __launch_bounds__(kThreadsOf<NT>, BPS)
    woq_kernel(Args a, const __grid_constant__ CUtensorMap map) {
  static_assert(SW == 0 || MT == 1, "the swapped product takes one m tile");
  static_assert(!CR || SW > 0, "cluster reduction: the decode kernels");
  static_assert(NT == 1 || std::is_base_of<CpAsyncSync, typename F::Cursor>::value,
                "two column tiles share one cp.async group per tile");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tig = lane & 3;
  // This warp's column tiles: row c[j] of the ring, 16-column tile nt[j]. With NT = 2 a second
  // tile past the last real one re-reads the last (valid addresses) and stores nothing.
  const int64_t tiles_n = a.Np / kTileN;
  int c[NT];
  int64_t nt[NT];
  bool live[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    c[j] = NT * warp + j;
    const int64_t t = int64_t(blockIdx.x) * kWarps + c[j];
    live[j] = t < tiles_n;
    nt[j] = NT == 1 || live[j] ? t : tiles_n - 1;
  }
  const bool active = live[0];  // warp-uniform; idle warps still meet the barriers
  const int split = blockIdx.y;
  const int64_t t_begin = split * a.tiles_per_split;
  const int64_t t_end = t_begin + a.tiles_per_split < a.ktiles ? t_begin + a.tiles_per_split : a.ktiles;
  const int64_t mblocks = (a.M + 16 * MT - 1) / (16 * MT);
  __shared__ typename F::Ring ring;

  for (int64_t mb = blockIdx.z; mb < mblocks; mb += gridDim.z) {
    const int64_t m0 = mb * 16 * MT;
    float acc[NT][MT][2][4] = {};
    if (active) {
      // 32-bit k from here (K <= kMaxK: set_shape); the per-tile loop is instruction-bound.
      // The cursors issue tiles 0, 1, ... in order; cur.c[0] also keeps the ring's sync.
      Cursors<typename F::Cursor, NT> cur(a, nt, t_begin, lane, std::make_integer_sequence<int, NT>{});
#pragma unroll
      for (int j = 0; j < NT; ++j) cur.c[j].start(ring, c[j], lane, &map);
      const int count = int(t_end - t_begin), k_lane = int(t_begin) * kTileK + 16 * tig;
      auto issue = [&](int i) {  // tile i into slot i % kStages
        if (i < count) {
#pragma unroll
          for (int j = 0; j < NT; ++j) cur.c[j].issue(ring, c[j], i & (kStages - 1), lane);
        }
        cur.c[0].commit();
      };
      for (int i = 0; i < kStages - 1; ++i) issue(i);
      const XRows<D> xr(a, m0, k_lane);
      // Tile i: its weights from the ring, m tile 0's activations loaded one tile ahead (an
      // L1 / L2 round trip off the chain) into the other fragment.
      auto step = [&](int i, const XFrag<SW>& x, XFrag<SW>& x_next) {
        cur.c[0].wait(ring, c[0], i & (kStages - 1));  // tile i has landed
        typename F::Tile w[NT];
#pragma unroll
        for (int j = 0; j < NT; ++j) w[j] = F::read(ring, c[j], i & (kStages - 1), lane);
        cur.c[0].release();
        issue(i + kStages - 1);  // into the slot tile i - 1 used (already read)
        if (i + 1 < count) xr.load(a, (i + 1) * kTileK, k_lane + (i + 1) * kTileK, x_next);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          uint32_t b[4][2][2];
          F::template dequant<D>(w[j], b);
          tile_mma<D, MT, SW>(a, acc[j], b, m0, k_lane + i * kTileK, x);
        }
      };
      XFrag<SW> xa, xb;
      if (count > 0) xr.load(a, 0, k_lane, xa);
      if constexpr (MT == 1) {  // two by two: no copies between the fragments
        for (int i = 0; i < count; i += 2) {
          step(i, xa, xb);
          if (i + 1 < count) step(i + 1, xb, xa);
        }
      } else {  // (the twice-unrolled body of several m tiles would spill)
        for (int i = 0; i < count; ++i) {
          step(i, xa, xb);
          xa = xb;
        }
      }
      cur.c[0].drain();
    }

    constexpr int kSubs = SW == 1 ? 1 : 2;  // accumulator quads per m tile
    if constexpr (CR) {
      if (a.splits > 1) {  // (then gridDim.z == mblocks: every block of the cluster has this m block)
        cluster_reduce<D, F, SW, NT>(a, acc, m0);
        continue;
      }
    }
    // y, or with split K (then gridDim.z == mblocks) partial[split, r, n] for the last block to add up.
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      if (!live[j]) continue;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int sub = 0; sub < kSubs; ++sub)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            int64_t r, n;
            elem_pos<SW>(lane, m0, nt[j], mt, sub, e, r, n);
            if (r >= a.M) continue;
            if (a.splits == 1) {
              if (n < a.N) store_y<D, F>(a, r, n, acc[j][mt][sub][e]);
            } else {
              a.partial[(split * a.M + r) * a.Np + n] = acc[j][mt][sub][e];  // n < Np always
            }
          }
    }
    if (a.splits == 1) continue;
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
    for (int64_t i = threadIdx.x; i < rows * kBlockN; i += kThreadsOf<NT>) {
      const int64_t r = m0 + i / kBlockN, n = n0 + i % kBlockN;
      if (n >= a.N) continue;
      float v = 0.0f;
      for (int s = 0; s < a.splits; ++s) v += __ldcg(a.partial + (s * a.M + r) * a.Np + n);  // L2: other SMs wrote it
      store_y<D, F>(a, r, n, v);
    }
    if (threadIdx.x == 0) *counter = 0;  // ready for the next call on this stream
  }
}

// ---- host ---------------------------------------------------------------------------------
inline int pick_mt(int64_t M) { return M <= 16 ? 1 : M <= 32 ? 2 : 4; }

// The kernel an M-row product runs on, as launched: threads and rows of x per block, and the
// resident blocks per SM its launch bound promises (what the compiler fitted its registers to).
// fit(): that many, or fewer where the current device's shared memory holds fewer (e.g. the
// 100 KB of sm_86 / sm_89), from the occupancy calculator, per device and cached.
struct Launch {
  void (*kernel)(Args, CUtensorMap);
  int threads, rows, bound;
  int (*fit)();
  bool cluster_reduce;  // a K split runs as clusters (CR)
};

template <class D, class F, int MT, int SW, int NT, int BPS, bool CR>
int fit_blocks() {
  static std::atomic<int> cache[64];
  return cached_count_per_device(cache, [] {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, woq_kernel<D, F, MT, SW, NT, BPS, CR>, kThreadsOf<NT>, 0) !=
            cudaSuccess ||
        n < 1) {
      (void)cudaGetLastError();
      return BPS;  // the runtime cannot say: trust the bound
    }
    return n < BPS ? n : BPS;
  });
}

template <class D, class F, int MT, int SW, int NT = 1, int BPS = kBlocksPerSm, bool CR = false>
Launch launch_of() {
  return {woq_kernel<D, F, MT, SW, NT, BPS, CR>, kThreadsOf<NT>, 16 * MT, BPS, fit_blocks<D, F, MT, SW, NT, BPS, CR>,
          CR};
}

// The decode kernel of SW with its K split's sums meeting through a cluster, where the switch
// asks for it (LOWBIT_CUDA_WOQ_REDUCE=cluster, read per call) and, on_device, the current device
// runs this build's sm_90a code of it (per device, cached); else the default kernel.
template <class D, class F, int SW>
Launch decode_launch(bool on_device) {
  if (env_is("LOWBIT_CUDA_WOQ_REDUCE", "cluster")) {
    static std::atomic<uint64_t> known{0}, ok{0};
    auto runs = [](int dev) { return runs_sm90a_code(dev, woq_kernel<D, F, 1, SW, 1, kBlocksPerSm, true>); };
    if (!on_device || cached_per_device(known, ok, runs)) return launch_of<D, F, 1, SW, 1, kBlocksPerSm, true>();
  }
  return launch_of<D, F, 1, SW>();
}

// The launch for M rows (read per call: the switches). M <= 16 takes the swapped product (one
// or two blocks of 8 rows on the mma's n8). At M <= 16, opt-in: LOWBIT_CUDA_WOQ_TILES=2, two
// column tiles per warp, 8 blocks of 2 warps per SM (as many warps as by default, each with two
// chains of work; at M = 9-16 in up to 128 registers, which 8 blocks of 64 threads leave).
// Else, at M <= 8, LOWBIT_CUDA_WOQ_BLOCKS=6 or 8, 6 or 8 blocks of 4 warps per SM (1.5 or
// 2 times the warps to hide each one's latency, in 80 or 64 registers instead of 96; shared
// memory holds 6 of W4A16 with fp32 scales and of W8A16 on an H100), and with either the
// M = 9-16 kernel for 5 blocks (its ~95 registers fit 5 without spilling, not 6). kSwappedOnly:
// a format compiled for M <= 16 only (W8A16's TMA ring). Otherwise, opt-in, at M <= 16:
// LOWBIT_CUDA_WOQ_REDUCE=cluster, the K split as clusters (cluster_reduce; on_device: only where
// the current device runs it, else as a device that does, for host-only planning).
template <class D, class F, bool kSwappedOnly = false>
Launch pick(int64_t M, bool on_device = true) {
  if constexpr (kSwappedOnly) {
    return M <= 8 ? launch_of<D, F, 1, 1>() : launch_of<D, F, 1, 2>();
  } else {
    const int mt = pick_mt(M);
    if (mt == 2) return launch_of<D, F, 2, 0>();
    if (mt == 4) return launch_of<D, F, 4, 0>();
    const bool blocks6 = env_is("LOWBIT_CUDA_WOQ_BLOCKS", "6"), blocks8 = env_is("LOWBIT_CUDA_WOQ_BLOCKS", "8");
    const bool tiles2 = env_is("LOWBIT_CUDA_WOQ_TILES", "2");
    if (M > 8) {
      if (tiles2) return launch_of<D, F, 1, 2, 2, 8>();
      return blocks6 || blocks8 ? launch_of<D, F, 1, 2, 1, 5>() : decode_launch<D, F, 2>(on_device);
    }
    if (tiles2) return launch_of<D, F, 1, 1, 2, 8>();
    if (blocks6) return launch_of<D, F, 1, 1, 1, 6>();
    return blocks8 ? launch_of<D, F, 1, 1, 1, 8>() : decode_launch<D, F, 1>(on_device);
  }
}

// How to run an [M, K] x [N, K]^T product on a GPU with sm_count SMs that keeps blocks_per_sm
// of the kernel resident: the number of K splits and of int32 counters the call needs (0 when
// splits == 1, or when the splits meet through clusters: cluster_reduce, at most
// kMaxClusterSplits of them).
inline void plan(int64_t M, int64_t K, int64_t N, int sm_count, int blocks_per_sm, bool cluster_reduce, int* splits,
                 int64_t* counters) {
  const int64_t ntiles = cdiv(N, kTileN), ktiles = cdiv(K, kTileK);
  const int64_t mblocks = cdiv(M < 1 ? 1 : M, 16 * pick_mt(M));
  // As many splits as fit in one wave of resident blocks (a second, partial wave would idle most SMs).
  int64_t s = int64_t(sm_count < 1 ? 1 : sm_count) * (blocks_per_sm < 1 ? 1 : blocks_per_sm) /
              (cdiv(ntiles, kWarps) * mblocks);
  const int64_t cap = cluster_reduce ? kMaxClusterSplits : kMaxSplits;
  const int64_t most = ktiles / kMinTilesPerSplit < cap ? ktiles / kMinTilesPerSplit : cap;
  if (s > most) s = most;
  if (s < 1 || mblocks > kMaxGridZ) s = 1;
  s = cdiv(ktiles, cdiv(ktiles, s));  // no empty split
  *splits = int(s);
  *counters = s > 1 && !cluster_reduce ? cdiv(ntiles, kWarps) * mblocks : 0;
}

// plan() for the kernel pick() gives: device >= 0 (current) counts the blocks that fit there,
// device < 0 (host-only planning) the launch bound.
template <class D, class F, bool kSwappedOnly = false>
void plan_for(int64_t M, int64_t K, int64_t N, int sm_count, int device, int* splits, int64_t* counters) {
  const Launch l = pick<D, F, kSwappedOnly>(M, device >= 0);
  plan(M, K, N, sm_count, device >= 0 ? l.fit() : l.bound, l.cluster_reduce, splits, counters);
}

// The shape and split fields of a (x, weights, bias and y are the caller's); kOk, or
// kInvalidArgument for a split the plan would not make (its scratch: launch()).
inline int set_shape(Args& a, int64_t M, int64_t K, int64_t ldx, int64_t N, int splits, float* partial,
                     int* counters) {
  a.M = M, a.K = K, a.ldx = ldx, a.N = N;
  a.Np = cdiv(N, kTileN) * kTileN, a.ktiles = cdiv(K, kTileK);
  a.splits = splits, a.tiles_per_split = cdiv(a.ktiles, splits), a.partial = partial, a.counters = counters;
  if (splits < 1 || splits > a.ktiles || K > kMaxK) return kInvalidArgument;
  if (splits > 1 && cdiv(M, 16 * pick_mt(M)) > kMaxGridZ) return kInvalidArgument;
  return kOk;
}

// Launches the kernel pick() gives for a (a K split as clusters of its splits where it says so);
// kOk, or kInvalidArgument when a's split does not suit it: scratch missing (the partial sums
// and counters), or more splits than a cluster takes. (Launch errors: launch_status.)
template <class D, class F, bool kSwappedOnly = false>
int launch(const Args& a, cudaStream_t s, const CUtensorMap& map = CUtensorMap{}) {
  const Launch l = pick<D, F, kSwappedOnly>(a.M);
  const bool clusters = l.cluster_reduce && a.splits > 1;
  if (clusters ? a.splits > kMaxClusterSplits : a.splits > 1 && (!a.partial || !a.counters)) return kInvalidArgument;
  const int64_t mblocks = cdiv(a.M, l.rows);
  const dim3 grid(unsigned(cdiv(a.Np / kTileN, kWarps)), unsigned(a.splits),
                  unsigned(mblocks < kMaxGridZ ? mblocks : kMaxGridZ));
  if (!clusters) {
    l.kernel<<<grid, l.threads, 0, s>>>(a, map);
    return kOk;
  }
  const ExLaunch ex(grid, dim3(unsigned(l.threads)), 0, s, dim3(1, unsigned(a.splits), 1), false);
  (void)cudaLaunchKernelEx(&ex.cfg, l.kernel, a, map);
  return kOk;
}

}  // namespace lowbit::cuda::woq

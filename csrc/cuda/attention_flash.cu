// FlashAttention-2-style prefill on tensor cores (mma.sync m16n8k16, fp32 accumulation):
// O = softmax(scale * Q K^T, masked) V for fp16 / bf16, head dim 64 or 128, causal or not,
// sliding windows, GQA, any L and S >= 1. Semantics in attention_flash.h.
//
// Work split. A CTA owns kBr = 128 query rows of one (batch, head): 8 warps, each 16 rows
// (one m16 tile), so a warp's Q fragments (D / 16 A operands, 32 registers at D = 128) stay
// in registers for the whole key loop and the O accumulator is 16 x D per warp (64 fp32
// registers at D = 128). The CTA walks the key tiles its rows may see (kBc = 64 keys at
// D = 128, 128 at D = 64), from the last to the first as FlashAttention does, and for
// each: S = Q K^T (ldmatrix K rows, non-transposed: K[key][dim] is exactly the "col" B
// operand), mask (only on tiles that cross a causal / window / S boundary), online
// softmax in registers, O += P V (ldmatrix.trans of V[key][dim] gives the B operand).
// Why 8 x 16 rows and not FA2's 4 warps x 32 rows: 32 rows need 128 O + 64 S registers
// and then Q cannot stay in registers (FA2 reloads it from shared memory every k step);
// 16 rows per warp keep everything in registers (one CTA of 8 warps per SM) at the cost of
// twice the K/V ldmatrix traffic per query row. Measured on an H100 (B=1 L=4096 D=128 causal
// bf16): 1.10x torch SDPA flash for this layout vs 1.04x for the FA2 one, which was dropped.
//
// Pipeline. K and V tiles go global -> shared by cp.async into a 3-stage ring (one
// commit group per tile, always one group per iteration so the counting stays uniform):
// tile i + 2 is issued while tile i is computed, and one __syncthreads per tile both
// publishes tile i and proves that every warp is done with tile i - 1, whose stage the
// issue of tile i + 2 overwrites. Q is staged once through stage 2 (loaded into
// registers before the first barrier of the loop); the output goes out through stage 0
// after the loop (each warp its own 16 rows, then 16-byte coalesced stores).
// The PTX wrappers come from ptx.cuh; the one added here is fast_exp2 (ex2.approx.ftz).
// Shared memory: 3 stages x (K + V) x kBc x D x 2 bytes = 96 KB for both head dims (fits
// the 99 KB opt-in of sm_86 / sm_89 too).
//
// Swizzle. A row of D elements is D / 8 16-byte chunks; chunk c of row r is stored at
// chunk c ^ (r & 7). Every ldmatrix phase reads 8 consecutive rows at one logical chunk,
// i.e. 8 distinct physical chunks of the same 128-byte bank window: conflict-free. The
// rows every lane addresses are 8-aligned bases plus lane & 7, so the XOR key is lane & 7.
//
// Softmax. Scores are kept raw (q.k); with c = |scale| log2(e), p = exp2(q.k c - m c)
// (one FFMA + ex2.approx), the running max m and the per-thread partial row sums l stay
// fp32; the quad (4 lanes of a row) reduces the max every tile, the sum only at the end.
// A negative scale is folded into Q by flipping its sign bits (exact), so the max of the
// raw scores is the max of the scaled ones. Masked scores are -inf; a row with no allowed
// key so far has m = -inf and uses m c = 0, so nothing is inf - inf. P is rounded to the
// element type for the PV mma (as FlashAttention does): the accumulator layout of two n8
// tiles of S (keys 16 kk .. 16 kk + 15) is exactly the A layout of one k16 step, so P
// never leaves the registers. The end divides O by l in fp32 (l == 0: zeros).
//
// Masking / skipping. For query row i (position p = i + offset) the allowed keys form one
// interval [lo(i), hi(i)], both non-decreasing in i. A CTA visits tiles from
// lo(first row) to hi(last row) only (causal: nothing above the diagonal; windows:
// O(window) tiles), and a tile needs the element mask only if it is not inside every
// row's interval, i.e. unless lo(last row) <= first key and last key <= hi(first row)
// (hi <= S - 1 covers the ragged end of S). Rows past L (the ragged last query tile) read
// zero-filled Q and are never stored; keys past S are zero-filled (V must be: 0 x garbage
// could be NaN) and masked.
//
// Grid. One dimension (B Hq ceil(L / kBr) may pass 65535), sequence by sequence: block id
// -> (sequence, m block, head), head fastest, so CTAs of one wave share K/V heads (GQA groups
// are adjacent) and, when causal, m blocks are taken last first: the longest rows start
// first. Sequence-major keeps the K/V that a wave reads to one sequence's heads (64 MB at
// L = 4096, H = 32, D = 128 bf16: about the L2), where the head-major order over all B
// sequences it replaced had every wave read B times that (with it, B = 4 measured 0.82x
// torch flash on an H200, B = 1 1.10x; for B = 1 both orders are the same).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "attention_flash.h"
#include "lowbit/cuda_common.cuh"
#include "ptx.cuh"

namespace lowbit::cuda {
namespace {

constexpr int kBr = 128;                    // query rows per CTA
constexpr float kLog2e = 1.4426950408889634f;

// A CTA's 128 rows (see the header comment): 8 warps x one m16 tile, Q fragments in registers,
// 3-stage K/V ring (Q staged through the last stage, O through stage 0), one CTA per SM (about
// 230 registers).
template <int D> struct Tile {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kStages = 3;                 // K/V tiles in the cp.async ring
  static constexpr int kBc = D == 128 ? 64 : 128;   // keys per tile
  static constexpr int kChunks = D / 8;             // 16-byte chunks per row
  static constexpr int kTileElems = kBc * D;        // one K (or V) tile
  static constexpr int kStageElems = 2 * kTileElems;
  static constexpr int kQOffset = (kStages - 1) * kStageElems;
  static constexpr int kSmemBytes = kStages * kStageElems * 2;
  static_assert(kBr == kWarps * 16, "the warps cover the CTA's rows");
  static_assert(kBr * D <= kStageElems, "Q and O are staged through one stage");
  static_assert(kBc * kChunks % kThreads == 0 && kBr * kChunks % kThreads == 0, "whole copies per thread");
  static_assert(kChunks >= 8, "the swizzle permutes 8 chunks");
};
using namespace ptx;

// ex2.approx (what exp2f becomes under --use_fast_math, as FlashAttention builds): 2^-inf = +0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

struct Params {
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  uint16_t* o;
  int64_t q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, o_sb, o_sh, o_ss;
  int Hq, group, num_m, per_b;  // group = Hq / Hkv, num_m = ceil(L / kBr), per_b = num_m Hq
  int L, S;
  int64_t offset;            // key position of query 0
  int64_t wl, wr;            // window sides, -1 = unbounded (clamped to <= L + S by the host)
  bool causal;
  float c;                   // |scale| log2(e), > 0
  uint32_t qflip;            // 0x80008000 when scale < 0 (negates Q), else 0
};

// The allowed keys of query row i: [row_lo, row_hi] (empty when row_lo > row_hi).
__device__ __forceinline__ int row_lo(const Params& p, int i) {
  if (p.wl < 0) return 0;
  const int64_t v = int64_t(i) + p.offset - p.wl;
  return v < 0 ? 0 : v > p.S ? p.S : int(v);
}
__device__ __forceinline__ int row_hi(const Params& p, int i) {
  const int64_t pos = int64_t(i) + p.offset;
  int64_t v = p.S - 1;
  if (p.causal && pos < v) v = pos;
  if (p.wr >= 0 && pos + p.wr < v) v = pos + p.wr;
  return v < -1 ? -1 : int(v);
}

template <class E, int D>
__global__ void __launch_bounds__(Tile<D>::kThreads, 1) attention_flash_kernel(const Params p) {
  using Op = Mma16<E>;
  using T = Tile<D>;
  constexpr int kBc = T::kBc, kChunks = T::kChunks, kThreads = T::kThreads, kStages = T::kStages;
  constexpr int kRows = 16;  // rows per warp: one m16 tile
  extern __shared__ __align__(128) unsigned char smem_raw[];
  uint16_t* const smem = reinterpret_cast<uint16_t*>(smem_raw);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tig = lane & 3;
  const int sw = lane & 7;  // swizzle key of every row this lane addresses in ldmatrix

  // ---- which rows: sequence b, m block (last first when causal), head h
  const unsigned bid = blockIdx.x;
  const int b = int(bid / unsigned(p.per_b));
  const unsigned in_b = bid - unsigned(b) * unsigned(p.per_b);
  const int mlin = int(in_b / unsigned(p.Hq)), h = int(in_b - unsigned(mlin) * unsigned(p.Hq));
  const int mb = p.causal ? p.num_m - 1 - mlin : mlin;
  const int hk = h / p.group;
  const int q0 = mb * kBr;
  const uint16_t* const qg = p.q + int64_t(b) * p.q_sb + int64_t(h) * p.q_sh;
  const uint16_t* const kg = p.k + int64_t(b) * p.k_sb + int64_t(hk) * p.k_sh;
  const uint16_t* const vg = p.v + int64_t(b) * p.v_sb + int64_t(hk) * p.v_sh;
  uint16_t* const og = p.o + int64_t(b) * p.o_sb + int64_t(h) * p.o_sh;

  // ---- which key tiles: the union of the rows' intervals, and which need the element mask
  const int q_last = (q0 + kBr < p.L ? q0 + kBr : p.L) - 1;
  const int lo_first = row_lo(p, q0), hi_last = row_hi(p, q_last);
  const int lo_last = row_lo(p, q_last), hi_first = row_hi(p, q0);
  const int t_top = hi_last / kBc;  // first tile visited (hi_last >= 0 whenever any is)
  const int n_tiles = lo_first <= hi_last ? t_top - lo_first / kBc + 1 : 0;

  // ---- cp.async of one K/V tile (keys t kBc ..) into a stage; keys past S read as zeros
  auto issue_kv = [&](int t, int stage) {
    uint16_t* const ks = smem + stage * T::kStageElems;
    uint16_t* const vs = ks + T::kTileElems;
#pragma unroll
    for (int it = 0; it < kBc * kChunks / kThreads; ++it) {
      const int c = tid + it * kThreads, r = c / kChunks, ch = c % kChunks;
      const int key = t * kBc + r;
      const bool ok = key < p.S;
      const int64_t row = ok ? key : 0;
      const int so = r * D + ((ch ^ (r & 7)) << 3);
      cp_async16_zfill(ks + so, kg + row * p.k_ss + ch * 8, ok);
      cp_async16_zfill(vs + so, vg + row * p.v_ss + ch * 8, ok);
    }
  };

  // ---- prologue: Q (one group), then tiles 0 .. kStages - 2 into stages 0 .. kStages - 2
  uint16_t* const qs = smem + T::kQOffset;
  {
#pragma unroll
    for (int it = 0; it < kBr * kChunks / kThreads; ++it) {
      const int c = tid + it * kThreads, r = c / kChunks, ch = c % kChunks;
      const bool ok = q0 + r < p.L;
      const int64_t row = ok ? q0 + r : 0;
      cp_async16_zfill(qs + r * D + ((ch ^ (r & 7)) << 3), qg + row * p.q_ss + ch * 8, ok);
    }
    cp_async_commit();
  }
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < n_tiles) issue_kv(t_top - i, i);
    cp_async_commit();
  }

  // Q fragments: A operand of k step kk = rows warp*kRows + 0..15, dims 16 kk .. 16 kk + 15.
  // ldmatrix_x4: lanes 0-7 rows 0-7 / dims 0-7 (a0), lanes 8-15 rows 8-15 / dims 0-7 (a1),
  // lanes 16-23 rows 0-7 / dims 8-15 (a2), lanes 24-31 rows 8-15 / dims 8-15 (a3).
  const uint16_t* const qrow = qs + (warp * kRows + (lane & 15)) * D;
  uint32_t qf[D / 16][4];
  cp_async_wait<kStages - 1>();  // Q has landed (this thread's copies) ...
  __syncthreads();               // ... and everyone's; the loop's first barrier precedes the
#pragma unroll                   // first write into Q's stage
  for (int kk = 0; kk < D / 16; ++kk) {
    ldmatrix_x4(qf[kk], qrow + (((2 * kk + (lane >> 4)) ^ sw) << 3));
#pragma unroll
    for (int j = 0; j < 4; ++j) qf[kk][j] ^= p.qflip;
  }

  // This thread's rows: accumulator rows gid (hr = 0) and gid + 8 (hr = 1).
  int lo_r[2], hi_r[2];
  float m_r[2], l_r[2];
  float oacc[D / 8][4];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int i = q0 + warp * kRows + gid + 8 * hr;
    lo_r[hr] = row_lo(p, i);
    hi_r[hr] = row_hi(p, i);
    m_r[hr] = -INFINITY;
    l_r[hr] = 0.0f;
  }
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) oacc[dt][e] = 0.0f;

  // Per-lane ldmatrix rows. K (non-trans, B of S = Q K^T): lanes 0-7 keys 0-7 / dims 0-7 (b0 of
  // n tile 2nn), 8-15 keys 0-7 / dims 8-15 (b1), 16-23 keys 8-15 / dims 0-7 (b0 of 2nn + 1),
  // 24-31 keys 8-15 / dims 8-15 (b1). V (trans, B of O += P V): lanes 0-7 keys 0-7 / dims 0-7
  // (b0 of d tile 2dd), 8-15 keys 8-15 / dims 0-7 (b1), 16-23 keys 0-7 / dims 8-15 (b0 of
  // 2dd + 1), 24-31 keys 8-15 / dims 8-15 (b1).
  const int k_row = (lane & 7) + ((lane >> 4) << 3), k_cb = (lane >> 3) & 1;
  const int v_row = (lane & 7) + (((lane >> 3) & 1) << 3), v_cb = lane >> 4;
  const float c = p.c;

  int st = 0;  // stage of tile i (i mod kStages)
  for (int i = 0; i < n_tiles; ++i) {
    cp_async_wait<kStages - 2>();  // tile i (and Q) landed; only later tiles may be in flight ...
    __syncthreads();               // ... for every thread, and every warp is done with tile i - 1
    const int st_next = st == 0 ? kStages - 1 : st - 1;  // (i + kStages - 1) mod kStages
    if (i + kStages - 1 < n_tiles) issue_kv(t_top - i - (kStages - 1), st_next);
    cp_async_commit();

    const uint16_t* const ks = smem + st * T::kStageElems;
    const uint16_t* const vs = ks + T::kTileElems;
    const int k0 = (t_top - i) * kBc;  // first key of this tile

    // S = Q K^T: s[nt] is keys k0 + 8 nt .. + 7; element e is row gid + 8 (e >> 1), key
    // k0 + 8 nt + 2 tig + (e & 1).
    float s[kBc / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBc / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int nn = 0; nn < kBc / 16; ++nn) {
        uint32_t bk[4];
        ldmatrix_x4(bk, ks + (16 * nn + k_row) * D + (((2 * kk + k_cb) ^ sw) << 3));
        Op::mma(s[2 * nn], qf[kk], bk[0], bk[1]);
        Op::mma(s[2 * nn + 1], qf[kk], bk[2], bk[3]);
      }
    }

    if (k0 < lo_last || k0 + kBc - 1 > hi_first) {  // CTA-uniform: a tile on a boundary
#pragma unroll
      for (int nt = 0; nt < kBc / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = k0 + 8 * nt + 2 * tig + (e & 1);
          if (j < lo_r[e >> 1] || j > hi_r[e >> 1]) s[nt][e] = -INFINITY;
        }
    }

    // Online softmax (raw scores; see the header comment).
    float mx[2] = {m_r[0], m_r[1]};
#pragma unroll
    for (int nt = 0; nt < kBc / 8; ++nt) {
      mx[0] = fmaxf(mx[0], fmaxf(s[nt][0], s[nt][1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[nt][2], s[nt][3]));
    }
    float mc[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 1));
      mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 2));
      mc[hr] = mx[hr] == -INFINITY ? 0.0f : mx[hr] * c;
      const float alpha = fast_exp2(fmaf(m_r[hr], c, -mc[hr]));  // m_r == -inf: 0
      m_r[hr] = mx[hr];
      l_r[hr] *= alpha;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        oacc[dt][2 * hr] *= alpha;
        oacc[dt][2 * hr + 1] *= alpha;
      }
    }
#pragma unroll
    for (int nt = 0; nt < kBc / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = fast_exp2(fmaf(s[nt][e], c, -mc[e >> 1]));
        l_r[e >> 1] += s[nt][e];
      }

    // O += P V. A operand of key step kk: a0 = (row gid, keys 16 kk + 2 tig, +1) = s[2kk][0..1],
    // a1 = row gid + 8 = s[2kk][2..3], a2 = keys + 8 = s[2kk+1][0..1], a3 = s[2kk+1][2..3].
#pragma unroll
    for (int kk = 0; kk < kBc / 16; ++kk) {
      uint32_t a[4];
      a[0] = Op::pack(s[2 * kk][0], s[2 * kk][1]);
      a[1] = Op::pack(s[2 * kk][2], s[2 * kk][3]);
      a[2] = Op::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = Op::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, vs + (16 * kk + v_row) * D + (((2 * dd + v_cb) ^ sw) << 3));
        Op::mma(oacc[2 * dd], a, bv[0], bv[1]);
        Op::mma(oacc[2 * dd + 1], a, bv[2], bv[3]);
      }
    }
    st = st == kStages - 1 ? 0 : st + 1;
  }
  cp_async_wait<0>();  // (only empty groups can remain)
  __syncthreads();     // every warp is done with the stages and Q: O is staged over them now

  // ---- epilogue: O / l, rounded, through this warp's rows of stage 0, swizzled like Q, then
  // 16-byte stores of the rows below L. oacc[dt] element e: row gid + 8 (e >> 1), dim
  // 8 dt + 2 tig + (e & 1).
  uint16_t* const os = smem + warp * kRows * D;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float l = l_r[hr];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    const int r = gid + 8 * hr;  // r & 7 == gid
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      *reinterpret_cast<uint32_t*>(os + r * D + ((dt ^ gid) << 3) + 2 * tig) =
          Op::pack(oacc[dt][2 * hr] * inv, oacc[dt][2 * hr + 1] * inv);
  }
  __syncwarp();
#pragma unroll
  for (int it = 0; it < kRows * kChunks / 32; ++it) {
    const int cidx = lane + 32 * it, r = cidx / kChunks, ch = cidx % kChunks;
    const int row = q0 + warp * kRows + r;
    if (row < p.L)
      *reinterpret_cast<uint4*>(og + int64_t(row) * p.o_ss + ch * 8) =
          *reinterpret_cast<const uint4*>(os + r * D + ((ch ^ (r & 7)) << 3));
  }
}

template <class E, int D>
int launch(const Params& p, unsigned blocks, cudaStream_t stream) {
  auto kernel = attention_flash_kernel<E, D>;
  constexpr int bytes = Tile<D>::kSmemBytes;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) {
    record_cuda_error("attention_flash", cudaGetErrorName(e), cudaGetErrorString(e));
    (void)cudaGetLastError();
    return kCudaError;
  }
  kernel<<<blocks, Tile<D>::kThreads, bytes, stream>>>(p);
  return launch_status("attention_flash");
}

}  // namespace

int attention_flash(const void* q, const void* k, const void* v, void* o, int dtype, int64_t B, int64_t Hq,
                    int64_t Hkv, int64_t L, int64_t S, int64_t D, const int64_t (&strides)[12], float scale,
                    bool causal, bool bottom_right, int64_t window_left, int64_t window_right, void* stream) {
  if (!attention_flash_supported(dtype, D, D, q, k, v, o, strides)) return kInvalidArgument;
  if (B < 0 || Hq < 1 || Hkv < 1 || Hq % Hkv != 0 || L < 0 || S < 1) return kInvalidArgument;
  if (B == 0 || L == 0) return kOk;
  constexpr int64_t kMaxSeq = int64_t(1) << 30;  // row / key indices and their sums stay in int
  if (L > kMaxSeq || S > kMaxSeq || B * Hq > (int64_t(1) << 31) - 1) return kInvalidArgument;
  if (!q || !k || !v || !o) return kInvalidArgument;
  const int64_t num_m = (L + kBr - 1) / kBr, blocks = num_m * B * Hq;
  if (blocks > (int64_t(1) << 31) - 1) return kInvalidArgument;

  Params p{};
  p.q = static_cast<const uint16_t*>(q), p.k = static_cast<const uint16_t*>(k);
  p.v = static_cast<const uint16_t*>(v), p.o = static_cast<uint16_t*>(o);
  p.q_sb = strides[0], p.q_sh = strides[1], p.q_ss = strides[2];
  p.k_sb = strides[3], p.k_sh = strides[4], p.k_ss = strides[5];
  p.v_sb = strides[6], p.v_sh = strides[7], p.v_ss = strides[8];
  p.o_sb = strides[9], p.o_sh = strides[10], p.o_ss = strides[11];
  p.Hq = int(Hq), p.group = int(Hq / Hkv), p.num_m = int(num_m), p.per_b = int(num_m * Hq);
  p.L = int(L), p.S = int(S);
  p.offset = bottom_right ? S - L : 0;
  // A side longer than L + S allows every key the other conditions allow: unbounded.
  p.wl = window_left < 0 || window_left > L + S ? -1 : window_left;
  p.wr = window_right < 0 || window_right > L + S ? -1 : window_right;
  p.causal = causal;
  float c = std::fabs(scale) * kLog2e;
  if (c == 0.0f) c = 1e-30f;  // scale 0: uniform weights; keeps -inf * c == -inf (never NaN)
  p.c = c;
  p.qflip = scale < 0.0f ? 0x80008000u : 0u;

  (void)cudaGetLastError();  // report only what our launch does
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const unsigned nb = unsigned(blocks);
  if (dtype == kF16) return D == 128 ? launch<F16, 128>(p, nb, s) : launch<F16, 64>(p, nb, s);
  return D == 128 ? launch<BF16, 128>(p, nb, s) : launch<BF16, 64>(p, nb, s);
}

}  // namespace lowbit::cuda

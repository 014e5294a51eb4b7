// The split-KV kernel on tensor cores (mma.sync m16n8k16, fp32 accumulation): what decode
// runs for head dim 128 (D = Dv), fp16 / bf16 queries, a cache of the same type or INT8,
// no mask. Same grid, key split, bounds rules and output as the CUDA-core split_kernel
// (attention_split.cuh, attention.cu); only the inner loop differs.
//
// Why. The CUDA-core kernel keeps its loads in registers (one round trip per K step and
// per 8 V rows) and spends ~850 warp instructions per 4 KB of bf16 cache at 4 heads per
// block (an fp32 FMA per element and head; from its SASS loops), where an H100 issues about
// 1100 per 4 KB at full HBM bandwidth: it reached 39-48% of the copy bandwidth, and the
// INT8 cache (half the bytes, as many instructions and round trips) gained nothing. Here
// the bytes in flight sit in shared memory and the products run on tensor cores: 450
// instructions per 16-key tile (8 KB of bf16 cache), 649 / 841 per INT8 tile (4 KB).
//
// Layout: the heads of a block sit on the mma's n8 (G <= 8 of them), the keys on m16, so
// S^T = K Q^T needs no padding of the heads to 16:
//   S^T [16 keys x 8 heads]  += K [16 keys x 16 d]  . Q^T [16 d x 8 heads]   (D / 16 mmas)
//   O^T [16 d x 8 heads]     += V^T [16 d x 16 keys] . P^T [16 keys x 8 heads] (D / 16 mmas)
// K (A operand) comes from the key rows by ldmatrix, V^T by ldmatrix.trans, Q^T (B) stays
// in registers for the whole loop; P^T is the score accumulator transposed, which one
// movmatrix per 8 keys does in registers. A lane holds scores of keys gid, gid + 8 for
// heads 2 tig, 2 tig + 1 (gid = lane / 4, tig = lane % 4): the per-head max reduces over
// the 8 lanes of a column (3 shuffles), the sum only at the end.
//
// INT8 caches. ldmatrix moves 16-bit pairs, so a lane receives 4 consecutive codes of a K
// row (d = 4 tig .. 4 tig + 3 of a 16-d chunk): the mma's k slots are mapped to those d
// (slots 2 tig, 2 tig + 1 -> d 4 tig, 4 tig + 1; slots 2 tig + 8, 2 tig + 9 -> d 4 tig + 2,
// 4 tig + 3) and Q's registers use the same map, so the sum over slots is the sum over d.
// For V^T a lane receives codes of d = 2 gid, 2 gid + 1 of two keys: the A rows gid /
// gid + 8 of a 16-d tile are taken as d = 2 gid / 2 gid + 1, and the output store undoes
// that. Codes become fp16 exactly by the 0x6400 magic (1024 + code + 128, minus 1152) and
// bf16 exactly as a difference of two halves (ptx::CodePair). Q.K^T of an INT8 cache
// always runs in fp16 (2 instructions per code pair against 4 for bf16): bf16 queries are
// converted with a power-of-two scale per head that puts max |q| in [2^14, 2^15), exact
// (fp16 has 3 more significand bits than bf16) and undone on the fp32 scores, so the scores
// are the bf16 path's. The key's scale multiplies its score, the value's scale its
// probability.
//
// Pipeline. Each warp owns every 4th tile of 16 keys of the block's range and streams
// that tile's K and V (two "items", one cp.async group each) through its own ring of
// kRing items in shared memory, kAhead items in flight while it computes one: no block
// barrier in the loop (__syncwarp publishes the other lanes' copies). An item is 16 rows
// of D codes, 16-byte chunk c of row r stored at c ^ (r & 7) so every ldmatrix phase
// reads 8 distinct bank groups; the copies go 32 bytes per lane pair and row, so each
// request is one whole L2 sector. A lane pair copies one key row: its slot (paged: the
// block id, read ahead) is looked up once per tile, and whether the key
// exists (inside the range, valid block id) travels as a ballot in registers to the lanes
// that mask its scores; invalid rows are zero-filled, so 0 x garbage never meets a P. The
// block ids are read as many tiles ahead as K items are in flight, so in the INT8 kernel's
// deeper pipeline no copy waits for its table lookup either.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "attention_split.cuh"
#include "ptx.cuh"

namespace lowbit::cuda::split_kv {

constexpr int kMmaHeadDim = 128;
constexpr int kMmaKeys = 16;  // keys per tile (the m16 of S^T)

// Shared-memory shapes for one cache element type.
template <class KV> struct MmaRing {
  static constexpr bool kInt8 = std::is_same_v<KV, I8>;
  static constexpr int kRowBytes = kMmaHeadDim * (kInt8 ? 1 : 2);
  static constexpr int kChunks = kRowBytes / 16;                 // 16-byte chunks per row
  static constexpr int kScaleBytes = kInt8 ? kMmaKeys * 4 : 0;   // the 16 keys' fp32 scales
  static constexpr int kItemBytes = kMmaKeys * kRowBytes + kScaleBytes;
  static constexpr int kAhead = kInt8 ? 4 : 2;                   // items in flight (even: whole tiles)
  static constexpr int kRing = kAhead + 1;
  static constexpr int kSmemBytes = kWarps * kRing * kItemBytes;  // 48 KB (bf16), 41 KB (int8)
  static_assert(kSmemBytes <= 48 * 1024, "more needs the opt-in shared-memory attribute");
  static_assert(sizeof(WarpStates<kMaxG, kMmaHeadDim>) <= kSmemBytes, "the end state reuses the rings");
  static_assert(kChunks >= 8, "the swizzle permutes 8 chunks");
};

// E: query / mma element type (F16 or BF16); KV: E or I8. hpb: query heads per block
// (heads_per_block of the GQA group, <= 8).
template <class E, class KV>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    split_kernel_mma(const AttentionArgs a, int hpb, int groups, int splits, int64_t chunk, float* __restrict__ part) {
  using R = MmaRing<KV>;
  constexpr bool kInt8 = R::kInt8;
  using EK = std::conditional_t<kInt8, F16, E>;  // the type of the Q.K^T mma
  using MK = ptx::Mma16<EK>;
  using MV = ptx::Mma16<E>;
  constexpr int kTiles16 = kMmaHeadDim / 16;  // k steps of S^T, m tiles of O^T
  extern __shared__ __align__(16) unsigned char smem[];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
  const int row = lane >> 1, half = lane & 1;  // the copy side: lane pair (2 row, 2 row + 1) copies key row `row`
  // Paged: the block ids of this lane's key in the next kTilesAhead tiles whose K is issued.
  // Decode (no q_start: sequence = query row) reads the first ones before block_work has the
  // sequence length, taking the block's first key to be its chunk's (no window moved it; if
  // one did, they are read again below): the first copies then wait for one memory round
  // trip, not two.
  constexpr int kTilesAhead = R::kAhead / 2;
  const bool speculate = a.block_table && !a.q_start;
  const int64_t spec_first = int64_t(blockIdx.z) * chunk + kMmaKeys * warp;
  const int bs = int(a.block_size);
  int32_t blocks[kTilesAhead];
#pragma unroll
  for (int i = 0; i < kTilesAhead; ++i) {
    const int64_t j = spec_first + kMmaKeys * kWarps * i + row;
    blocks[i] = speculate && j < a.max_blocks * bs ? __ldg(a.block_table + blockIdx.x * a.max_blocks + int(j) / bs) : -1;
  }
  const BlockWork bw = block_work(a, hpb, groups, chunk);
  const Row& r = bw.r;
  const int64_t kv = bw.kv, lo = bw.lo, hi = bw.hi;
  const int nh = bw.nh;
  const bool row_ok = bw.row_ok;

  // Q^T as B operands (the softmax scale goes on the fp32 scores): qb[ks][0] holds the d of
  // k slots 2 tig, 2 tig + 1 of step ks for head gid, qb[ks][1] those of slots + 8, + 9; raw,
  // or (bf16 queries, INT8 cache) in fp16 times 2^-e, with 2^e of head gid in q_exp.
  uint32_t qb[kTiles16][2];
  float q_exp = 1.0f;
  {
    const bool mine = row_ok && gid < nh;
    const uint16_t* qp = static_cast<const uint16_t*>(a.q) + (mine ? row_offset(a, a.q_stride, r, bw.h0 + gid) : 0);
#pragma unroll
    for (int ks = 0; ks < kTiles16; ++ks)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int d = kInt8 ? 16 * ks + 4 * tig + 2 * hh : 16 * ks + 8 * hh + 2 * tig;
        qb[ks][hh] = mine ? uint32_t(qp[d]) | uint32_t(qp[d + 1]) << 16 : 0u;
      }
    if constexpr (!std::is_same_v<EK, E>) {  // bf16 -> fp16: max |q| of the head (its 4 lanes)
      float mx = 0.0f;
#pragma unroll
      for (int ks = 0; ks < kTiles16; ++ks)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh)
          mx = fmaxf(mx, fmaxf(fabsf(__uint_as_float(qb[ks][hh] << 16)), fabsf(__uint_as_float(qb[ks][hh] & 0xffff0000u))));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // (0, inf and NaN keep e = 0; |e| <= 100 keeps 2^e and 2^-e normal floats)
      const int e = mx > 0.0f && mx <= 3.0e38f ? max(-100, min(100, ilogbf(mx) - 14)) : 0;
      q_exp = ldexpf(1.0f, e);
      const float down = ldexpf(1.0f, -e);
#pragma unroll
      for (int ks = 0; ks < kTiles16; ++ks)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh)
          qb[ks][hh] = MK::pack(__uint_as_float(qb[ks][hh] << 16) * down,
                                __uint_as_float(qb[ks][hh] & 0xffff0000u) * down);
    }
  }

  // ---- the copy side
  const int64_t first = lo + kMmaKeys * warp;  // this warp's tiles: first + 64 i
  const int tiles = first < hi ? int((hi - first + kMmaKeys * kWarps - 1) / (kMmaKeys * kWarps)) : 0;
  unsigned char* ring = smem + warp * (R::kRing * R::kItemBytes);
  const auto* K = static_cast<const unsigned char*>(a.k);
  const auto* V = static_cast<const unsigned char*>(a.v);
  constexpr int kElem = kInt8 ? 1 : 2;
  const int32_t* table = a.block_table ? a.block_table + r.b * a.max_blocks : nullptr;
  auto block_of = [&](int tile) -> int32_t {
    const int64_t j = first + kMmaKeys * kWarps * int64_t(tile) + row;
    return (table && tile < tiles && j < hi) ? __ldg(table + int(j) / bs) : -1;
  };
  if (!speculate || first != spec_first) {
#pragma unroll
    for (int i = 0; i < kTilesAhead; ++i) blocks[i] = block_of(i);
  }
  int64_t slot = -1;  // this lane's key row of the last K issued (the V after it reuses it)
  // valid[0]: ballot of "key row exists" for the oldest tile not yet computed (bit 2 k: key k)
  constexpr int kFifo = R::kAhead / 2 + 1;
  uint32_t valid[kFifo] = {};

  auto issue = [&](int n) {  // item n: K (even) or V (odd) of tile n / 2, into slot n % kRing
    const int tile = n >> 1;
    if (!(n & 1)) {
      const int64_t j = first + kMmaKeys * kWarps * int64_t(tile) + row;
      bool ok = tile < tiles && j < hi;
      if (table) {  // (a speculated id past the range is never used: ok is false there)
        const int32_t blk = blocks[0];
#pragma unroll
        for (int i = 0; i + 1 < kTilesAhead; ++i) blocks[i] = blocks[i + 1];
        blocks[kTilesAhead - 1] = block_of(tile + kTilesAhead);
        ok = ok && blk >= 0 && blk < a.num_blocks;
        slot = ok ? int64_t(blk) * bs + int(j) % bs : -1;
      } else {
        slot = ok ? j : -1;
      }
#pragma unroll
      for (int i = 0; i + 1 < kFifo; ++i) valid[i] = valid[i + 1];
      valid[kFifo - 1] = __ballot_sync(0xffffffffu, ok);
    }
    if (tile < tiles) {
      const bool ok = slot >= 0;
      const bool is_v = n & 1;
      unsigned char* dst = ring + (n % R::kRing) * R::kItemBytes + row * R::kRowBytes;
      const unsigned char* src =
          (is_v ? V : K) + (ok ? kv_offset(a, is_v ? a.v_stride : a.k_stride, r.b, kv, slot) * kElem : 0);
#pragma unroll
      for (int i = 0; i < R::kChunks / 2; ++i) {
        const int c = 2 * i + half;
        ptx::cp_async16_zfill(dst + ((c ^ (row & 7)) << 4), src + 16 * c, ok);
      }
      if constexpr (kInt8) {
        if (!half) {
          const float* sc = is_v ? a.v_scale : a.k_scale;
          ptx::cp_async4_zfill(ring + (n % R::kRing) * R::kItemBytes + kMmaKeys * R::kRowBytes + 4 * row,
                               sc + (ok ? slot * a.Hkv + kv : 0), ok);
        }
      }
    }
    ptx::cp_async_commit();  // one group per item, empty or not: the wait counts stay uniform
  };

  // ---- the compute side
  float o[kTiles16][4] = {};  // O^T tile mt: rows d (mapped at the end), heads 2 tig, 2 tig + 1
  float m[2] = {kNegInf, kNegInf}, l[2] = {0.0f, 0.0f};  // per head 2 tig + hh; l: this lane's keys only
  const float cm = a.scale * kLog2e;
  float cmh[2] = {cm, cm};  // the scores' multipliers per column (heads 2 tig, 2 tig + 1)
  if constexpr (!std::is_same_v<EK, E>) {  // times the heads' 2^e (head h's lanes: 4 h ..)
    cmh[0] *= __shfl_sync(0xffffffffu, q_exp, 8 * tig);
    cmh[1] *= __shfl_sync(0xffffffffu, q_exp, 8 * tig + 4);
  }
  // ldmatrix row addresses: K (and int8 V) take matrices (keys 0-7 | 8-15) x (chunk c | c + 1)
  // in that order; 16-bit V^T takes (chunk c | c + 1) x (keys 0-7 | 8-15).
  const int krow = (lane & 7) + 8 * ((lane >> 3) & 1), kc = lane >> 4;
  const int vrow = kInt8 ? krow : (lane & 7) + 8 * (lane >> 4), vc = kInt8 ? kc : (lane >> 3) & 1;

  for (int i = 0; i < R::kAhead; ++i) issue(i);
  for (int tile = 0; tile < tiles; ++tile) {
    // -- K: scores of this tile, then the online softmax
    const int nk = 2 * tile;
    ptx::cp_async_wait<R::kAhead - 1>();  // item nk has landed (this lane's copies) ...
    __syncwarp();                          // ... and the other lanes' (and all are done with item nk - 1)
    issue(nk + R::kAhead);                 // into the slot of item nk - 1
    const unsigned char* kt = ring + (nk % R::kRing) * R::kItemBytes;
    float s[4] = {};  // keys gid, gid, gid + 8, gid + 8 x heads 2 tig, 2 tig + 1, 2 tig, 2 tig + 1
#pragma unroll
    for (int c = 0; c < R::kChunks; c += 2) {
      uint32_t w[4];
      ptx::ldmatrix_x4(w, kt + krow * R::kRowBytes + (((c + kc) ^ (krow & 7)) << 4));
      if constexpr (kInt8) {
        using C = ptx::CodePair<EK>;  // keys 0-7 | 8-15 x d pairs (0, 1) | (2, 3) of the 4 codes
#pragma unroll
        for (int x = 0; x < 4; ++x) w[x] ^= C::kFlip;
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {  // chunk c + cc is k step c + cc
          const uint32_t lo0 = C::template get<0, 1>(w[2 * cc]), hi0 = C::template get<2, 3>(w[2 * cc]);
          const uint32_t lo1 = C::template get<0, 1>(w[2 * cc + 1]), hi1 = C::template get<2, 3>(w[2 * cc + 1]);
          const uint32_t afr[4] = {lo0, lo1, hi0, hi1};
          MK::mma(s, afr, qb[c + cc][0], qb[c + cc][1]);
        }
      } else {
        const uint32_t afr[4] = {w[0], w[1], w[2], w[3]};
        MK::mma(s, afr, qb[c / 2][0], qb[c / 2][1]);
      }
    }
    const uint32_t ok = valid[0];
    float k0 = 1.0f, k1 = 1.0f;  // the scales of keys gid, gid + 8 (INT8)
    if constexpr (kInt8) {
      const float* ksc = reinterpret_cast<const float*>(kt + kMmaKeys * R::kRowBytes);
      k0 = ksc[gid];
      k1 = ksc[gid + 8];
    }
    const bool ok0 = (ok >> (2 * gid)) & 1u, ok1 = (ok >> (2 * gid + 16)) & 1u;
    s[0] = ok0 ? s[0] * (k0 * cmh[0]) : kNegInf;
    s[1] = ok0 ? s[1] * (k0 * cmh[1]) : kNegInf;
    s[2] = ok1 ? s[2] * (k1 * cmh[0]) : kNegInf;
    s[3] = ok1 ? s[3] * (k1 * cmh[1]) : kNegInf;
    float p[4], alpha[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float mx = fmaxf(s[hh], s[2 + hh]);
#pragma unroll
      for (int x = 4; x < 32; x <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, x));
      const float m_new = fmaxf(m[hh], mx);
      const float m_use = m_new == kNegInf ? 0.0f : m_new;  // no finite score yet: keep zeros
      alpha[hh] = exp2f(m[hh] - m_use);
      p[hh] = exp2f(s[hh] - m_use);
      p[2 + hh] = exp2f(s[2 + hh] - m_use);
      l[hh] = l[hh] * alpha[hh] + p[hh] + p[2 + hh];
      m[hh] = m_new;
    }
#pragma unroll
    for (int mt = 0; mt < kTiles16; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mt][e] *= alpha[e & 1];

    // -- V: O^T += V^T P^T
    const int nv = nk + 1;
    ptx::cp_async_wait<R::kAhead - 1>();
    __syncwarp();
    issue(nv + R::kAhead);
    const unsigned char* vt = ring + (nv % R::kRing) * R::kItemBytes;
    if constexpr (kInt8) {
      const float* vsc = reinterpret_cast<const float*>(vt + kMmaKeys * R::kRowBytes);
      const float v0 = vsc[gid], v1 = vsc[gid + 8];
      p[0] *= v0, p[1] *= v0, p[2] *= v1, p[3] *= v1;
    }
    // P^T as B: the accumulator layout of keys 0-7 (rows) x heads is one 8x8 fragment;
    // its transpose is exactly b0 (keys 2 tig, 2 tig + 1 of head gid); keys 8-15 give b1.
    const uint32_t b0 = ptx::movmatrix_trans(MV::pack(p[0], p[1]));
    const uint32_t b1 = ptx::movmatrix_trans(MV::pack(p[2], p[3]));
#pragma unroll
    for (int c = 0; c < R::kChunks; c += 2) {
      uint32_t w[4];
      ptx::ldmatrix_x4_trans(w, vt + vrow * R::kRowBytes + (((c + vc) ^ (vrow & 7)) << 4));
      if constexpr (kInt8) {
        using C = ptx::CodePair<E>;  // rows d even | odd x keys 0-7 | 8-15
#pragma unroll
        for (int x = 0; x < 4; ++x) w[x] ^= C::kFlip;
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {  // chunk c + cc is O^T tile c + cc: rows d even | odd
          const uint32_t afr[4] = {C::template get<0, 2>(w[2 * cc]), C::template get<1, 3>(w[2 * cc]),
                                   C::template get<0, 2>(w[2 * cc + 1]), C::template get<1, 3>(w[2 * cc + 1])};
          MV::mma(o[c + cc], afr, b0, b1);
        }
      } else {
        const uint32_t afr[4] = {w[0], w[1], w[2], w[3]};
        MV::mma(o[c / 2], afr, b0, b1);
      }
    }
  }
  ptx::cp_async_wait<0>();  // (empty groups) before the rings become the end state

  // ---- the end: every warp's state into shared memory (over the rings), then one merge
#pragma unroll
  for (int hh = 0; hh < 2; ++hh)
#pragma unroll
    for (int x = 4; x < 32; x <<= 1) l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], x);
  __syncthreads();
  auto& red = *reinterpret_cast<WarpStates<kMaxG, kMmaHeadDim>*>(smem);
  if (gid == 0) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      red.m[warp][2 * tig + hh] = m[hh];
      red.l[warp][2 * tig + hh] = l[hh];
    }
  }
#pragma unroll
  for (int mt = 0; mt < kTiles16; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      // O^T row of element e: 16-bit caches d = 16 mt + gid (+ 8); INT8 d = 16 mt + 2 gid (+ 1)
      const int d = kInt8 ? 16 * mt + 2 * gid + (e >> 1) : 16 * mt + gid + 8 * (e >> 1);
      red.o[warp][2 * tig + (e & 1)][d] = o[mt][e];
    }
  __syncthreads();
  if (row_ok) finish_block(a, red, r, bw.t, bw.h0, nh, bw.split, splits, part);
}

// ---- launch (host) --------------------------------------------------------------------
// Whether split_kernel_mma takes the call: D = Dv = 128, fp16 / bf16 queries with a cache
// of their type or INT8, no mask, cache rows on 16-byte boundaries, key indices in int32.
inline bool mma_takes(const AttentionArgs& a) {
  if (!decode_mma_allowed() || a.mask || a.D != kMmaHeadDim || a.Dv != kMmaHeadDim) return false;
  if ((a.dtype != kF16 && a.dtype != kBF16) || (a.kv_dtype != a.dtype && a.kv_dtype != kI8)) return false;
  if (max_keys(a) > 2147483647LL - kMmaKeys * kWarps) return false;
  const int kb = elem_bytes(a.kv_dtype);
  return rows_aligned(a.k, a.k_stride, 16 / kb, kb) && rows_aligned(a.v, a.v_stride, 16 / kb, kb);
}

template <class E, class KV>
int launch_split_mma(const AttentionArgs& a, int splits, float* scratch, cudaStream_t stream) {
  const int hpb = heads_per_block(a.Hq / a.Hkv);
  const SplitGrid sg = split_grid(a, hpb, splits);
  static std::atomic<uint64_t> opted{0};
  const int smem =
      decode_smem_bytes(reinterpret_cast<const void*>(split_kernel_mma<E, KV>), MmaRing<KV>::kSmemBytes, opted);
  if (smem < 0) return kCudaError;
  split_kernel_mma<E, KV><<<sg.grid, kThreads, smem, stream>>>(a, hpb, sg.groups, splits, sg.chunk, scratch);
  return kOk;
}

template <class KV>
int launch_split_kv(const AttentionArgs& a, int splits, float* scratch, cudaStream_t s) {
  if constexpr (std::is_same_v<KV, F16> || std::is_same_v<KV, BF16>) {
    if (mma_takes(a)) return launch_split_mma<KV, KV>(a, splits, scratch, s);
  } else if constexpr (std::is_same_v<KV, I8>) {
    if (mma_takes(a))
      return a.dtype == kF16 ? launch_split_mma<F16, I8>(a, splits, scratch, s)
                             : launch_split_mma<BF16, I8>(a, splits, scratch, s);
  }
  launch_split_simt<KV>(a, splits, scratch, s);
  return kOk;
}

}  // namespace lowbit::cuda::split_kv

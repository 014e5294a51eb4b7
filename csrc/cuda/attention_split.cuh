// The split-KV attention kernel on CUDA cores (see attention.cu for the design), as
// templates: included by attention.cu (the device helpers, for merge_kernel) and by
// attention_split_mma.cuh, the tensor-core kernel for the common decode shapes, whose
// launch_split_kv picks between the two. The files that instantiate it per cache element
// type (attention_split_f16.cu: fp16 / bf16, attention_split_f32_i8.cu: fp32 / int8)
// compile in parallel.
#pragma once
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "attention.h"
#include "lowbit/cuda_common.cuh"

namespace lowbit::cuda::split_kv {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxG = 8;                  // query heads per block (larger GQA groups take several blocks)
constexpr int kBlocksPerSm = 4;           // resident blocks per SM the launch bounds guarantee
// Blocks per SM of the tensor-core split kernel (its launch pads the shared memory so that no
// more fit) and what the key splits aim at. Fewer concurrent key streams per SM stream faster:
// 2 against 4 measured (H100, one run) 80-81% -> 87-89% of the copy bandwidth at batch 64
// (bf16; INT8 +3-4%), and at batch 8 half the splits (4, not 8) 5-8% faster.
constexpr int kDecodeBlocksPerSm = 2;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -__builtin_huge_valf();

struct I8 {
  using T = int8_t;
  __device__ static float to_f32(int8_t v) { return float(v); }
};

inline int elem_bytes(int code) { return code == kI8 ? 1 : int(dtype_size(code)); }

// ---- loads of N consecutive K / V elements as fp32 --------------------------
template <int BYTES> struct VecOf;
template <> struct VecOf<2> { using T = uint16_t; };
template <> struct VecOf<4> { using T = uint32_t; };
template <> struct VecOf<8> { using T = uint2; };
template <> struct VecOf<16> { using T = uint4; };

// f[0..N) = p[0..N) (zeros past n). vec: p is aligned to N elements (then one or two
// vector loads when n >= N).
template <class KV, int N>
__device__ __forceinline__ void load_n(const typename KV::T* p, bool vec, int64_t n, float (&f)[N]) {
  using T = typename KV::T;
  constexpr int kBytes = N * int(sizeof(T));
  if (vec && n >= N) {
    constexpr int kParts = kBytes > 16 ? kBytes / 16 : 1;
    using V = typename VecOf<(kBytes > 16 ? 16 : kBytes)>::T;
    union {
      V v[kParts];
      T e[N];
    } u;
#pragma unroll
    for (int i = 0; i < kParts; ++i) u.v[i] = __ldg(reinterpret_cast<const V*>(p) + i);
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = KV::to_f32(u.e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = i < n ? KV::to_f32(p[i]) : 0.0f;
  }
}

// ---- where a query row lives -------------------------------------------------
struct Row {
  int64_t b, i;    // batch (sequence) and query index within it
  int64_t Lb, Sb;  // its queries and keys
};

__device__ __forceinline__ Row locate(const AttentionArgs& a, int64_t t) {
  Row r;
  if (a.q_start) {  // the last b with q_start[b] <= t
    int64_t lo = 0, hi = a.B - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (a.q_start[mid] <= t) lo = mid; else hi = mid - 1;
    }
    r.b = lo;
    r.i = t - a.q_start[lo];
    r.Lb = int64_t(a.q_start[lo + 1]) - a.q_start[lo];
  } else {
    r.b = t / a.L;
    r.i = t % a.L;
    r.Lb = a.L;
  }
  r.Sb = a.seq_lens ? a.seq_lens[r.b] : a.S;
  if (a.block_table) r.Sb = min(max(r.Sb, int64_t(0)), a.max_blocks * a.block_size);
  return r;
}

// Element offset of query (or output) row (b, h, i) under strides st.
__device__ __forceinline__ int64_t row_offset(const AttentionArgs& a, const int64_t* st, const Row& r, int64_t h) {
  const int64_t base = a.q_start ? a.q_start[r.b] : 0;
  return r.b * st[0] + h * st[1] + (base + r.i) * st[2];
}

// The cache row of key j: its slot (paged) or j, or -1 for a block id outside the cache.
__device__ __forceinline__ int64_t key_slot(const AttentionArgs& a, int64_t b, int64_t j) {
  if (!a.block_table) return j;
  const int64_t blk = a.block_table[b * a.max_blocks + j / a.block_size];
  return (blk >= 0 && blk < a.num_blocks) ? blk * a.block_size + j % a.block_size : -1;
}

__device__ __forceinline__ int64_t kv_offset(const AttentionArgs& a, const int64_t* st, int64_t b, int64_t kv,
                                             int64_t slot) {
  return (a.block_table ? 0 : b * st[0]) + kv * st[1] + slot * st[2];
}

// ---- what a block works on, shared by both split kernels -------------------------
// Grid: x = query row t, y = kv head x head group of hpb heads, z = split of the keys.
struct BlockWork {
  Row r;
  bool row_ok;
  int64_t t, kv, h0;  // query row, kv head, first query head
  int nh;             // query heads of this block (<= hpb)
  int split;
  int64_t lo, hi;     // keys [lo, hi) of this row in this block's chunk
};

__device__ __forceinline__ BlockWork block_work(const AttentionArgs& a, int hpb, int groups, int64_t chunk) {
  launch_dependents();  // merge_kernel's blocks may start now (they wait for this grid to end)
  BlockWork w;
  w.t = blockIdx.x;
  const int64_t g = a.Hq / a.Hkv;
  w.kv = blockIdx.y / groups;
  w.h0 = w.kv * g + int64_t(blockIdx.y % groups) * hpb;
  w.nh = int(min(int64_t(hpb), w.kv * g + g - w.h0));
  w.split = blockIdx.z;
  w.r = locate(a, w.t);
  w.row_ok = w.r.i >= 0 && w.r.i < w.r.Lb;
  // Keys this row may attend, cut to the chunk.
  const int64_t at = w.r.i + (a.bottom_right ? w.r.Sb - w.r.Lb : 0);
  w.lo = 0, w.hi = w.r.Sb;
  if (a.causal) w.hi = min(w.hi, at + 1);
  if (a.window_right >= 0) w.hi = min(w.hi, at + a.window_right + 1);
  if (a.window_left >= 0) w.lo = max(w.lo, at - a.window_left);
  w.lo = max(w.lo, w.split * chunk);
  w.hi = min(w.hi, (w.split + 1) * chunk);
  if (!w.row_ok) w.hi = w.lo;
  return w;
}

// ---- the end of a block, shared by both split kernels ---------------------------
// The online-softmax state of every warp of a block for its G heads: running max m
// (log2 domain), sum l and unnormalized O (columns 0 .. Dv).
template <int G, int DMAX> struct WarpStates {
  float m[kWarps][G], l[kWarps][G], o[kWarps][G][DMAX];
};

// After a barrier that publishes `st`: combines the warps' states and writes head
// h0 + h (h < nh) of query row r: its output (splits == 1) or this split's partial
// (O, m, l) for merge_kernel.
template <int G, int DMAX>
__device__ void finish_block(const AttentionArgs& a, const WarpStates<G, DMAX>& st, const Row& r, int64_t t,
                             int64_t h0, int nh, int split, int splits, float* __restrict__ part) {
  for (int idx = threadIdx.x; idx < G * DMAX; idx += kThreads) {
    const int h = idx / DMAX, d = idx % DMAX;
    if (h >= nh || d >= a.Dv) continue;
    float mx = kNegInf;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, st.m[w][h]);
    const float m_use = mx == kNegInf ? 0.0f : mx;
    float acc = 0.0f, lt = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float c = exp2f(st.m[w][h] - m_use);
      acc += c * st.o[w][h][d];
      lt += c * st.l[w][h];
    }
    if (splits == 1) {
      // lt == 0: no key at all (zeros, as SDPA); NaN inputs give NaN
      store_f32(a.out, a.dtype, row_offset(a, a.out_stride, r, h0 + h) + d, lt == 0.0f ? 0.0f : acc / lt);
    } else {
      float* pr = part + ((t * a.Hq + h0 + h) * splits + split) * (a.Dv + 2);
      pr[d] = acc;
      if (d == 0) {
        pr[a.Dv] = mx;
        pr[a.Dv + 1] = lt;
      }
    }
  }
}

// ---- the split kernel (CUDA cores) ----------------------------------------------------------
// Template: KV element type, DMAX >= max(D, Dv) (per-lane accumulators hold DMAX / 32
// values of the output row), G query heads per block.
template <class KV, int DMAX, int G>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    split_kernel(const AttentionArgs a, int groups, int splits, int64_t chunk, bool vec_k, bool vec_v,
                 float* __restrict__ part) {
  constexpr int E = DMAX / 32;  // output elements per lane
  constexpr int U = 32 / E;     // V rows in flight per lane (32 registers of them)
  constexpr bool kInt8 = std::is_same_v<KV, I8>;
  using T = typename KV::T;
  __shared__ __align__(16) float qs[G][DMAX];
  __shared__ WarpStates<G, DMAX> red;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const BlockWork bw = block_work(a, G, groups, chunk);
  const Row& r = bw.r;
  const int64_t t = bw.t, kv = bw.kv, h0 = bw.h0, lo = bw.lo, hi = bw.hi;
  const int nh = bw.nh, split = bw.split;
  const bool row_ok = bw.row_ok;

  const float qmul = a.scale * kLog2e;
  for (int idx = threadIdx.x; idx < G * DMAX; idx += kThreads) {
    const int h = idx / DMAX, d = idx % DMAX;
    float v = 0.0f;
    if (row_ok && h < nh && d < a.D) v = load_f32(a.q, a.dtype, row_offset(a, a.q_stride, r, h0 + h) + d) * qmul;
    qs[h][d] = v;
  }
  __syncthreads();

  const T* K = static_cast<const T*>(a.k);
  const T* V = static_cast<const T*>(a.v);
  float m[G], l[G], o[G][E];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    m[h] = kNegInf;
    l[h] = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) o[h][e] = 0.0f;
  }

  for (int64_t base = lo + 32 * warp; base < hi; base += 32 * kWarps) {
    const int64_t j = base + lane;
    const int64_t slot = j < hi ? key_slot(a, r.b, j) : -1;
    float s[G];
#pragma unroll
    for (int h = 0; h < G; ++h) s[h] = 0.0f;
    if (slot >= 0) {
      const T* kp = K + kv_offset(a, a.k_stride, r.b, kv, slot);
#pragma unroll
      for (int c = 0; c < DMAX / 8; ++c) {
        if (c * 8 >= a.D) break;
        float f[8];
        load_n<KV, 8>(kp + c * 8, vec_k, a.D - c * 8, f);
#pragma unroll
        for (int h = 0; h < G; ++h) {
          const float4 q0 = *reinterpret_cast<const float4*>(&qs[h][c * 8]);
          const float4 q1 = *reinterpret_cast<const float4*>(&qs[h][c * 8 + 4]);
          s[h] += q0.x * f[0] + q0.y * f[1] + q0.z * f[2] + q0.w * f[3] + q1.x * f[4] + q1.y * f[5] + q1.z * f[6] +
                  q1.w * f[7];
        }
      }
      if constexpr (kInt8) {
        const float ks = a.k_scale[slot * a.Hkv + kv];
#pragma unroll
        for (int h = 0; h < G; ++h) s[h] *= ks;
      }
      if (a.mask) {
#pragma unroll
        for (int h = 0; h < G; ++h) {
          if (h >= nh) break;
          const int64_t mi =
              r.b * a.mask_stride[0] + (h0 + h) * a.mask_stride[1] + r.i * a.mask_stride[2] + j * a.mask_stride[3];
          if (a.mask_dtype == kBool)
            s[h] = static_cast<const uint8_t*>(a.mask)[mi] ? s[h] : kNegInf;
          else
            s[h] += load_f32(a.mask, a.mask_dtype, mi) * kLog2e;
        }
      }
    } else {
#pragma unroll
      for (int h = 0; h < G; ++h) s[h] = kNegInf;
    }

    // Online softmax over these 32 keys; p of this lane's key, times its value scale.
    float p[G];
    const float vs = (kInt8 && slot >= 0) ? a.v_scale[slot * a.Hkv + kv] : 1.0f;
#pragma unroll
    for (int h = 0; h < G; ++h) {
      const float m_new = fmaxf(m[h], warp_max(s[h]));
      const float m_use = m_new == kNegInf ? 0.0f : m_new;  // no finite score yet: keep zeros
      const float alpha = exp2f(m[h] - m_use);
      const float ph = exp2f(s[h] - m_use);
      l[h] = l[h] * alpha + ph;
      p[h] = ph * vs;
      m[h] = m_new;
#pragma unroll
      for (int e = 0; e < E; ++e) o[h][e] *= alpha;
    }

    // P.V: the lanes along the value row. Keys go in groups of U whose V rows are all
    // requested before any is used, so U loads per lane are in flight at once (one key at a
    // time left each warp waiting a full memory latency per key).
    const int n = int(min(int64_t(32), hi - base));
    const int64_t d0 = int64_t(lane) * E;
    for (int j0 = 0; j0 < n; j0 += U) {
      float f[U][E];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const long long sj = __shfl_sync(0xffffffffu, (long long)slot, (j0 + u) & 31);
        if (j0 + u < n && sj >= 0 && d0 < a.Dv)
          load_n<KV, E>(V + kv_offset(a, a.v_stride, r.b, kv, sj) + d0, vec_v, a.Dv - d0, f[u]);
        else
#pragma unroll
          for (int e = 0; e < E; ++e) f[u][e] = 0.0f;
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int h = 0; h < G; ++h) {
          // p is 0 for keys past n or without a slot (their scores are -inf)
          const float pj = __shfl_sync(0xffffffffu, p[h], (j0 + u) & 31);
#pragma unroll
          for (int e = 0; e < E; ++e) o[h][e] += pj * f[u][e];
        }
      }
    }
  }

  // Merge the warps' states.
#pragma unroll
  for (int h = 0; h < G; ++h) {
    const float lw = warp_sum(l[h]);
    if (lane == 0) {
      red.m[warp][h] = m[h];
      red.l[warp][h] = lw;
    }
#pragma unroll
    for (int e = 0; e < E; ++e) red.o[warp][h][lane * E + e] = o[h][e];
  }
  __syncthreads();
  if (row_ok) finish_block(a, red, r, t, h0, nh, split, splits, part);
}

// ---- launch (host) --------------------------------------------------------------------
inline int heads_per_block(int64_t g) { return g >= 8 ? 8 : g >= 4 ? 4 : g >= 2 ? 2 : 1; }

inline int64_t max_keys(const AttentionArgs& a) { return a.block_table ? a.max_blocks * a.block_size : a.S; }

// vec: the base pointer and every stride keep rows aligned to `elems` elements.
inline bool rows_aligned(const void* p, const int64_t* st, int64_t elems, int bytes) {
  if (reinterpret_cast<uintptr_t>(p) % (elems * bytes)) return false;
  for (int i = 0; i < 3; ++i)
    if (st[i] % elems) return false;
  return true;
}

// The grid of block_work and its key chunk (a multiple of 32 keys: whole steps of both kernels).
struct SplitGrid {
  dim3 grid;
  int groups;
  int64_t chunk;
};

inline SplitGrid split_grid(const AttentionArgs& a, int hpb, int splits) {
  const int64_t g = a.Hq / a.Hkv;
  SplitGrid s;
  s.groups = int((g + hpb - 1) / hpb);
  s.chunk = (max_keys(a) + splits - 1) / splits;
  s.chunk = (s.chunk + 31) / 32 * 32;
  s.grid = dim3(unsigned(a.tokens), unsigned(a.Hkv * s.groups), unsigned(splits));
  return s;
}

template <class KV, int DMAX, int G>
void launch_split(const AttentionArgs& a, int splits, float* scratch, cudaStream_t stream) {
  const SplitGrid sg = split_grid(a, G, splits);
  const int kb = elem_bytes(a.kv_dtype);
  const bool vec_k = rows_aligned(a.k, a.k_stride, 8, kb);
  const bool vec_v = rows_aligned(a.v, a.v_stride, DMAX / 32, kb);
  split_kernel<KV, DMAX, G><<<sg.grid, kThreads, 0, stream>>>(a, sg.groups, splits, sg.chunk, vec_k, vec_v, scratch);
}

template <class KV, int DMAX>
void dispatch_g(const AttentionArgs& a, int splits, float* scratch, cudaStream_t s) {
  switch (heads_per_block(a.Hq / a.Hkv)) {
    case 8: launch_split<KV, DMAX, 8>(a, splits, scratch, s); break;
    case 4: launch_split<KV, DMAX, 4>(a, splits, scratch, s); break;
    case 2: launch_split<KV, DMAX, 2>(a, splits, scratch, s); break;
    default: launch_split<KV, DMAX, 1>(a, splits, scratch, s); break;
  }
}

// Head dims up to 128 share one accumulator size (D = 64 leaves half the lanes idle in
// P.V, which a memory-bound kernel does not feel), so the build stays two sizes.
template <class KV>
void launch_split_simt(const AttentionArgs& a, int splits, float* scratch, cudaStream_t s) {
  if ((a.D > a.Dv ? a.D : a.Dv) <= 128)
    dispatch_g<KV, 128>(a, splits, scratch, s);
  else
    dispatch_g<KV, 256>(a, splits, scratch, s);
}

// Runs the split kernel for a KV cache element type: the tensor-core one where it takes
// the call (attention_split_mma.cuh, which defines this), else the CUDA-core one.
// Instantiated per element type in attention_split_f16.cu / attention_split_f32_i8.cu.
// kOk, or kCudaError (recorded) when the launch could not be set up.
template <class KV>
int launch_split_kv(const AttentionArgs& a, int splits, float* scratch, cudaStream_t s);

// False when LOWBIT_CUDA_DECODE=simt asks for the CUDA-core kernel everywhere (read at
// every call, so tests and benchmarks can compare the two kernels in one process).
bool decode_mma_allowed();

// The dynamic shared memory of a tensor-core split kernel launch: its rings' `bytes` padded so
// that only kDecodeBlocksPerSm blocks fit on an SM (LOWBIT_CUDA_DECODE_RESIDENT=n, read per
// call, asks for n instead; n >= kBlocksPerSm: no padding). Opts the kernel in above 48 KB
// once per device (`opted`, as opt_in_smem); -1 if that fails (the error recorded).
int decode_smem_bytes(const void* kernel, int bytes, std::atomic<uint64_t>& opted);

}  // namespace lowbit::cuda::split_kv

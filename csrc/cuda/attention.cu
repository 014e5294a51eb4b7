// Attention on CUDA, split-KV (flash-decoding): the kernel for decode, paged caches,
// INT8 caches, masks, fp32 and head dims the tensor-core prefill (attention_flash.cu)
// does not take. Memory-bound by design: a decode step reads every cached key and value
// once, and that is the whole cost.
//
// Work split. A block (4 warps) owns G query heads that share one kv head (GQA: every K
// / V row it loads serves all G heads), one query row, and one of `splits` contiguous
// chunks of the keys. Within the block, warp w takes keys base + 32 w + lane, base
// stepping by 128: lane-per-key for Q.K (each lane reads its own key row, 16 bytes at a
// time, against q broadcast from shared memory: no shuffles per key), one online-softmax
// update per head and 32 keys (warp max), then P.V with the lanes along the head dim
// (each V row is read as one coalesced line, p broadcast by shuffle). The 4 warps'
// (m, l, O) merge in shared memory at the end; with splits > 1 each block writes its
// unnormalized O and (m, l) to fp32 scratch and merge_kernel combines the chunks by
// log-sum-exp (splits are picked so that short batches still fill the GPU).
//
// Scores live in the log2 domain: q is pre-multiplied by scale * log2(e) (and an
// additive mask by log2(e)), so the softmax is exp2. INT8 caches: the key's scale
// multiplies its score and the value's scale its probability (both per token and head),
// so codes are dequantized for free.
//
// Bounds: a block id outside [0, num_blocks) makes its keys count as masked (nothing is
// read), seq_lens are clamped to the table's width, slots never leave the cache.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>

#include "attention.h"
#include "attention_flash.h"
#include "attention_split.cuh"
#include "lowbit/cuda_common.cuh"

namespace lowbit::cuda {
// Instantiated in attention_split_f16.cu and attention_split_f32_i8.cu.
extern template int split_kv::launch_split_kv<F32>(const AttentionArgs&, int, float*, cudaStream_t);
extern template int split_kv::launch_split_kv<F16>(const AttentionArgs&, int, float*, cudaStream_t);
extern template int split_kv::launch_split_kv<BF16>(const AttentionArgs&, int, float*, cudaStream_t);
extern template int split_kv::launch_split_kv<split_kv::I8>(const AttentionArgs&, int, float*, cudaStream_t);

namespace {

using namespace split_kv;
constexpr int64_t kMinKeysPerSplit = 128;
constexpr int kMaxSplits = 64;

// Combines the splits of each (token, head) row: one warp per row.
__global__ void __launch_bounds__(kThreads)
    merge_kernel(const AttentionArgs a, int splits, const float* __restrict__ part) {
  __shared__ float weight[kWarps][kMaxSplits];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row = int64_t(blockIdx.x) * kWarps + warp;
  if (row >= a.tokens * a.Hq) return;
  const int64_t t = row / a.Hq, h = row % a.Hq;
  // Where the row goes (the sequence metadata are inputs, not the split kernel's output: read
  // while it finishes).
  const int64_t out = row_offset(a, a.out_stride, locate(a, t), h);
  wait_prerequisites();  // the split kernel's partials are complete (launched to overlap its end)
  const float* pr = part + row * splits * (a.Dv + 2);
  float mx = kNegInf;
  for (int s = lane; s < splits; s += 32) mx = fmaxf(mx, pr[s * (a.Dv + 2) + a.Dv]);
  mx = warp_max(mx);
  const float m_use = mx == kNegInf ? 0.0f : mx;
  float lt = 0.0f;
  for (int s = lane; s < splits; s += 32) {
    const float c = exp2f(pr[s * (a.Dv + 2) + a.Dv] - m_use);
    weight[warp][s] = c;
    lt += c * pr[s * (a.Dv + 2) + a.Dv + 1];
  }
  lt = warp_sum(lt);
  __syncwarp();
  for (int64_t d = lane; d < a.Dv; d += 32) {
    float acc = 0.0f;
    for (int s = 0; s < splits; ++s) acc += weight[warp][s] * pr[s * (a.Dv + 2) + d];
    store_f32(a.out, a.dtype, out + d, lt == 0.0f ? 0.0f : acc / lt);
  }
}

// q, k, v, out: (batch, head, seq) strides, in attention_flash's order.
void flash_strides(const AttentionArgs& a, int64_t (&st)[12]) {
  for (int i = 0; i < 3; ++i) {
    st[i] = a.q_stride[i];
    st[3 + i] = a.k_stride[i];
    st[6 + i] = a.v_stride[i];
    st[9 + i] = a.out_stride[i];
  }
}

// Whether merge_kernel may be launched to overlap the split kernel's end (programmatic
// dependent launch, which hides its launch latency): a device of compute capability 9+
// running this build's sm_90+ code of it (so that it waits for the partials: code JIT-compiled
// from older PTX lacks the wait), unless LOWBIT_CUDA_PDL=0 (read per call). Per device, cached.
bool merge_overlaps() {
  if (env_is("LOWBIT_CUDA_PDL", "0")) return false;
  static std::atomic<uint64_t> known{0}, ok{0};
  return cached_per_device(known, ok, [](int dev) { return runs_sm90_code(dev, merge_kernel, 1 << 30); });
}

void launch_merge(const AttentionArgs& a, int splits, const float* scratch, cudaStream_t s) {
  const int64_t rows = a.tokens * a.Hq;
  const ExLaunch l(dim3(unsigned((rows + kWarps - 1) / kWarps)), dim3(kThreads), 0, s, dim3(1, 1, 1),
                   merge_overlaps());
  (void)cudaLaunchKernelEx(&l.cfg, merge_kernel, a, splits, scratch);  // (errors: launch_status)
}

}  // namespace

bool split_kv::decode_mma_allowed() { return !env_is("LOWBIT_CUDA_DECODE", "simt"); }

int split_kv::decode_smem_bytes(const void* kernel, int bytes, std::atomic<uint64_t>& opted) {
  const char* v = std::getenv("LOWBIT_CUDA_DECODE_RESIDENT");
  const int n = v ? std::atoi(v) : kDecodeBlocksPerSm;
  int dev = 0, per_sm = 0;
  if (n < 1 || n >= kBlocksPerSm || cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return bytes;
  }
  constexpr int kReservedPerBlock = 1024;  // what the runtime keeps per block (sm_80+)
  const int padded = per_sm / n - kReservedPerBlock;
  if (padded <= bytes) return bytes;
  // once per device, the most any n asks for (one block per SM: the per-block opt-in limit)
  if (opt_in_smem(kernel, per_sm - kReservedPerBlock, opted, "paged_attention") != kOk) return -1;
  return padded;
}

int check_attention_args(const AttentionArgs& a) {
  if (!valid_dtype_code(a.dtype) || (a.kv_dtype != kI8 && !valid_dtype_code(a.kv_dtype))) return kInvalidArgument;
  if (!a.q || !a.k || !a.v || !a.out) return kInvalidArgument;
  if (a.B < 1 || a.Hq < 1 || a.Hkv < 1 || a.Hq % a.Hkv || a.D < 1 || a.Dv < 1 || a.tokens < 0) return kInvalidArgument;
  if (a.D > kAttentionMaxHeadDim || a.Dv > kAttentionMaxHeadDim) return kInvalidArgument;
  if (a.Hkv * ((a.Hq / a.Hkv + kMaxG - 1) / kMaxG) > 65535) return kInvalidArgument;
  if (a.tokens > 2147483647LL) return kInvalidArgument;
  const bool paged = a.block_table != nullptr;
  // Paged: variable query counts (q_start) or decode (no q_start: L = 1, token b is sequence b's query).
  if (paged != (a.seq_lens != nullptr) || (a.q_start && !paged)) return kInvalidArgument;
  if (paged && !a.q_start && (a.L != 1 || a.tokens != a.B)) return kInvalidArgument;
  if (paged && (a.max_blocks < 1 || a.block_size < 1 || a.num_blocks < 1 || a.mask)) return kInvalidArgument;
  if (!paged && (a.L < 0 || a.S < 0 || a.tokens != a.B * a.L)) return kInvalidArgument;
  if ((a.kv_dtype == kI8) != (a.k_scale && a.v_scale)) return kInvalidArgument;
  if (a.mask && a.mask_dtype != kBool && !valid_dtype_code(a.mask_dtype)) return kInvalidArgument;
  if (a.window_left < -1 || a.window_right < -1) return kInvalidArgument;
  return kOk;
}

void attention_plan(int64_t tokens, int64_t Hq, int64_t Hkv, int64_t max_keys, int64_t Dv, int sm_count,
                    int* splits, int64_t* scratch_floats) {
  *splits = 1;
  *scratch_floats = 0;
  if (tokens < 1 || Hq < 1 || Hkv < 1 || Hq % Hkv || max_keys < 1) return;
  const int64_t g = Hq / Hkv, G = heads_per_block(g);
  const int64_t blocks = tokens * Hkv * ((g + G - 1) / G);
  const int64_t target = int64_t(sm_count > 0 ? sm_count : 1) * kDecodeBlocksPerSm;
  // As many splits as fit in one wave of resident blocks, never more: a few blocks past a
  // full wave would double the time (measured at 4 per SM: 576 blocks for 528 slots ran at half speed).
  int64_t s = target / blocks;
  const int64_t by_keys = (max_keys + kMinKeysPerSplit - 1) / kMinKeysPerSplit;
  s = s < by_keys ? s : by_keys;
  s = s < kMaxSplits ? s : kMaxSplits;
  if (s <= 1) return;
  *splits = int(s);
  *scratch_floats = tokens * Hq * s * (Dv + 2);
}

int attention(const AttentionArgs& a, int splits, float* scratch, void* stream) {
  if (int st = check_attention_args(a)) return st;
  if (splits < 1 || splits > kMaxSplits || (splits > 1 && !scratch)) return kInvalidArgument;
  if (a.tokens == 0) return kOk;
  int64_t st[12];
  flash_strides(a, st);
  // The tensor-core kernel: contiguous fp16 / bf16 without mask, head dims it has tiles for.
  if (!a.block_table && !a.mask && a.kv_dtype == a.dtype &&
      attention_flash_supported(a.dtype, a.D, a.Dv, a.q, a.k, a.v, a.out, st))
    return attention_flash(a.q, a.k, a.v, a.out, a.dtype, a.B, a.Hq, a.Hkv, a.L, a.S, a.D, st, a.scale,
                           a.causal != 0, a.bottom_right != 0, a.window_left, a.window_right, stream);
  const auto s = static_cast<cudaStream_t>(stream);
  int st_split = kOk;
  switch (a.kv_dtype) {
    case kF32: st_split = launch_split_kv<F32>(a, splits, scratch, s); break;
    case kF16: st_split = launch_split_kv<F16>(a, splits, scratch, s); break;
    case kBF16: st_split = launch_split_kv<BF16>(a, splits, scratch, s); break;
    case kI8: st_split = launch_split_kv<I8>(a, splits, scratch, s); break;
    default: return kInvalidArgument;
  }
  if (st_split != kOk) return st_split;  // nothing launched (the error is recorded)
  if (splits > 1) launch_merge(a, splits, scratch, s);
  return launch_status("attention");
}

}  // namespace lowbit::cuda

// Host entry points of the CUDA attention kernels (csrc/cuda/attention.cu and, for the
// tensor-core prefill, attention_flash.cu), in plain C++ for the bindings.
//
// AttentionArgs mirrors the CPU kernel's AttentionParams (csrc/cpu/kernels.h) field by
// field, so python/lowbit/ops builds one argument list for both devices: contiguous
// q [B, Hq, L, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv], out [B, Hq, L, Dv] with element
// strides (batch, head, seq) and a unit inner stride; or a paged cache (block_table not
// null): k / v rows at slot * stride[2] + head * stride[1] (stride[0] unused), queries of
// sequence b at rows q_start[b] .. q_start[b + 1] (bottom-right causal within it), or
// for decode (q_start null, L = 1) at row b, keys seq_lens[b]. Two fields only the GPU needs: num_blocks (block ids outside [0,
// num_blocks) are skipped, so a bad table cannot make the kernel read outside the cache
// even when the ops layer could not check it, e.g. while a CUDA graph is being captured)
// and tokens (query rows per head in all: B * L, or q_start[B]).
#pragma once
#include <cstdint>

#include "common.h"

namespace lowbit::cuda {

struct AttentionArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  int dtype;     // of q and out: kF32 / kF16 / kBF16
  int kv_dtype;  // of k and v: a float dtype or kI8 (then k_scale / v_scale [slots, Hkv])
  int64_t B, Hq, Hkv, L, S, D, Dv;
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3];
  const int32_t* q_start;      // [B + 1] or null
  const int32_t* seq_lens;     // [B] or null
  const int32_t* block_table;  // [B, max_blocks] or null
  int64_t max_blocks, block_size, num_blocks;
  const float* k_scale;
  const float* v_scale;
  const void* mask;  // contiguous layout only: bool or additive, element strides (B, Hq, L, S)
  int mask_dtype;
  int64_t mask_stride[4];
  float scale;
  int causal, bottom_right;
  int64_t window_left, window_right;
  int64_t tokens;
};

// The largest head dims the split-KV kernel takes (its per-lane accumulators are sized
// at compile time).
constexpr int64_t kAttentionMaxHeadDim = 256;

// kOk or kInvalidArgument; run by the bindings before the device is touched.
int check_attention_args(const AttentionArgs& a);

// Host-only arithmetic: how many key splits the split-KV kernel uses for a call with
// `tokens` query rows per head and at most max_keys keys per row on a GPU with sm_count
// SMs, and the fp32 scratch it then needs (0 when splits == 1).
void attention_plan(int64_t tokens, int64_t Hq, int64_t Hkv, int64_t max_keys, int64_t Dv, int sm_count,
                    int* splits, int64_t* scratch_floats);

// Runs the call: the tensor-core prefill kernel when it takes the shape (contiguous,
// fp16 / bf16, no mask, see attention_flash_supported), else the split-KV kernel with
// `splits` (from attention_plan) and `scratch` (its fp32 buffer, null when splits == 1).
int attention(const AttentionArgs& a, int splits, float* scratch, void* stream);

}  // namespace lowbit::cuda

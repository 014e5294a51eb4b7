// Host entry points of the FlashAttention-2-style prefill kernel
// (csrc/cuda/attention_flash.cu), plain C++ like int8.h: no CUDA types, the stream
// travels as void* (a cudaStream_t; nullptr = legacy default stream). Returns a
// lowbit::Status and never aborts.
//
// Tensors (elements; the last dim has unit stride, the others are given):
//   q  [B, Hq,  L, D]   strides[0..2]  (batch, head, seq)
//   k  [B, Hkv, S, D]   strides[3..5]
//   v  [B, Hkv, S, D]   strides[6..8]
//   o  [B, Hq,  L, D]   strides[9..11]
// dtype kF16 or kBF16 (all four tensors), D in {64, 128}. Query head h reads kv head
// h / (Hq / Hkv). Semantics are lowbit.ref.attention's: scores = scale * q.k; query i
// sits at key position p = i + (bottom_right ? S - L : 0) and may attend key j iff
// (!causal || j <= p) && (window_left < 0 || j >= p - window_left) &&
// (window_right < 0 || j <= p + window_right); a row that may attend no key is zeros.
#pragma once
#include <cstdint>
#include <initializer_list>

#include "common.h"

namespace lowbit::cuda {

// true if attention_flash takes this call: dtype kF16 or kBF16, D == Dv and D in {64, 128},
// q/k/v/o 16-byte aligned and every stride a multiple of 8 elements.
inline bool attention_flash_supported(int dtype, int64_t D, int64_t Dv, const void* q, const void* k, const void* v,
                                      const void* o, const int64_t (&strides)[12]) {
  if (dtype != kF16 && dtype != kBF16) return false;
  if (D != Dv || (D != 64 && D != 128)) return false;
  for (const void* p : {q, k, v, o})
    if ((reinterpret_cast<uintptr_t>(p) & 15u) != 0) return false;
  for (int64_t s : strides)
    if (s % 8 != 0) return false;
  return true;
}

int attention_flash(const void* q, const void* k, const void* v, void* o, int dtype, int64_t B, int64_t Hq,
                    int64_t Hkv, int64_t L, int64_t S, int64_t D, const int64_t (&strides)[12], float scale,
                    bool causal, bool bottom_right, int64_t window_left, int64_t window_right, void* stream);

}  // namespace lowbit::cuda

// INT8 weight formats shared by the CPU kernels, the CUDA kernels and
// python/lowbit/formats/int8.py (which documents the same layout in torch).
//
// Canonical (what state_dicts hold, and the CUDA layout):
//   qweight  int8  [N, K]   codes in [-127, 127] (symmetric, never -128)
//   scale    fp32  [N]      w[n, k] = scale[n] * qweight[n, k]
//
// CPU packed layout: the weight is cut into panels of kPanelRows = 16 output
// rows; inside a panel, K is walked in quads of kQuad = 4. One quad of one
// panel is 64 contiguous bytes: byte 4*i + j holds qweight[16*p + i, 4*q + j].
// This is exactly what one 512-bit vpdpbusd (or two 256-bit maddubs) consumes
// with the activation quad broadcast, so the GEMV needs no horizontal sums.
//   packed   int8  [Np / 16, Kp / 4 + 1, 16, 4]    Np = roundup(N, 16), Kp = roundup(K, 4)
// Rows n >= N and columns k >= K are zero. The extra last quad of each panel
// holds the 16 row sums  sum_k qweight[n, k]  as little-endian int32: the VNNI
// kernel feeds activations as u8 (x + 128) and subtracts 128 * rowsum.
#pragma once
#include <cstdint>

#include "lowbit/half.h"  // LOWBIT_HD

namespace lowbit::int8_format {

constexpr int kPanelRows = 16;
constexpr int kQuad = 4;
constexpr int kQuadBytes = kPanelRows * kQuad;  // 64

constexpr int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
constexpr int64_t panels(int64_t n) { return round_up(n, kPanelRows) / kPanelRows; }
constexpr int64_t quads(int64_t k) { return round_up(k, kQuad) / kQuad; }
// Bytes of one panel: its K quads plus the row-sum quad.
constexpr int64_t panel_bytes(int64_t k) { return (quads(k) + 1) * kQuadBytes; }
// Byte offset of qweight[n, k] in the packed buffer.
constexpr int64_t packed_offset(int64_t n, int64_t k, int64_t K) {
  return (n / kPanelRows) * panel_bytes(K) + (k / kQuad) * kQuadBytes + (n % kPanelRows) * kQuad + k % kQuad;
}

// Per-token (W8A8) activation quantization, the same on every backend and in
// python/lowbit/ref/int8.py:
//   pre = per_token_prescale(amax)         (2^64 for rows with amax < 2^-64, else 1)
//   q   = round_half_even((x * pre) * (127 / (amax * pre))),   scale = amax / 127
// The exact power-of-two prescale keeps 127 / amax finite for tiny (even
// subnormal) rows; for every other row it is 1 and changes nothing.
LOWBIT_HD float per_token_prescale(float amax) { return amax < 0x1p-64f ? 0x1p64f : 1.0f; }

}  // namespace lowbit::int8_format

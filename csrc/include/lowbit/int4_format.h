// INT4 group-wise weight formats shared by the CPU kernels, the CUDA kernels and
// python/lowbit/formats/int4.py (which documents the same layouts in torch).
//
// Canonical (what state_dicts hold; GGUF / GPTQ converters produce it):
//   codes   uint8 [N, K]     q in [0, 15]
//   scales  [N, K/g]         d, one per group of g consecutive k (g in {32, 64, 128} or g = K)
//   mins    [N, K/g]         m (asymmetric); absent for symmetric
//   asymmetric (GGUF Q4_1):  w = d * q + m          symmetric (GGUF Q4_0):  w = d * (q - 8)
// The kernels treat symmetric as asymmetric with m = -8 * d (exact: a power-of-two product).
//
// CPU packed layout: panels of kPanelRows = 16 output rows; inside a panel K goes by
// octets of kOctet = 8, and one octet of one panel is one 64-byte block:
//   byte 4*i + j  =  q[16p + i, 8o + j]  |  q[16p + i, 8o + 4 + j] << 4       (i < 16, j < 4)
// so the low nibbles of a block are a 16-row x 4-k int8 quad (as in int8_format.h) and the
// high nibbles the next one: one AND / one shift+AND give the two u8 quads that vpdpbusd
// (or maddubs) takes, and the 32-bit lane i holds the 8 codes of row i (the fp32 path
// extracts nibble s with a shift; nibble s holds k = kNibbleK[s]).
//   qweight  uint8  [Np / 16, Kp / 8, 64]          Np = roundup(N, 16), Kp = roundup(K, 8)
//   scales   [Np / 16, K / g, 16]  fp16 or fp32    scales[p, G, i] = d[16p + i, G]
//   mins     same shape and dtype as scales (asymmetric only)
// Rows n >= N and columns k >= K hold code 0 (and scale / min 0). Scales are kept in
// fp16 when every d and m is exactly an fp16 value (GGUF, GPTQ and lowbit's own quantizer
// give such), else fp32: packing is always lossless.
#pragma once
#include <cstdint>

#include "lowbit/half.h"  // LOWBIT_HD

namespace lowbit::int4_format {

constexpr int kPanelRows = 16;
constexpr int kOctet = 8;
constexpr int kBlockBytes = kPanelRows * kOctet / 2;  // 64

// k offset (inside an octet) of the code in nibble s (bits 4s..4s+3) of a row's 32-bit lane.
LOWBIT_HD constexpr int nibble_k(int s) { return (s & 1) ? 4 + s / 2 : s / 2; }

constexpr int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
constexpr int64_t panels(int64_t n) { return round_up(n, kPanelRows) / kPanelRows; }
constexpr int64_t octets(int64_t k) { return round_up(k, kOctet) / kOctet; }
constexpr int64_t panel_bytes(int64_t k) { return octets(k) * kBlockBytes; }

}  // namespace lowbit::int4_format

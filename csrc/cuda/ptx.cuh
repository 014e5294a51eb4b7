// Thin wrappers over the PTX instructions the tensor-core kernels share (cp.async,
// ldmatrix, mma.sync), so each kernel file spells an instruction once, by name.
// Device code only: include from .cu files.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "lowbit/cuda_common.cuh"

namespace lowbit::cuda::ptx {

// ---- cp.async: global -> shared copies that need no registers, so a warp can keep
// several tiles in flight whatever it is computing.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// (cp_async16 / 8 / 4 take the shared-window address itself: a loop that keeps it in a
// register does not convert a generic pointer at every copy.)
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
// 16 bytes if pred, else 16 zero bytes (nothing is read): the tail of a tile.
__device__ __forceinline__ void cp_async16_zfill(void* dst, const void* src, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(pred ? 16 : 0));
}
// The first `bytes` (0..16) of 16 bytes, zeros after them: a row that ends inside the chunk.
__device__ __forceinline__ void cp_async16_zfill_n(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async8(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}
// 4 bytes if pred, else 4 zero bytes (nothing is read).
__device__ __forceinline__ void cp_async4_zfill(void* dst, const void* src, bool pred) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(pred ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// (The memory clobber: shared-memory reads in plain C++ that follow must not be moved above it.)
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// p (or v), as a value the compiler cannot see through: it stays in a register instead of
// being re-derived from kernel parameters at every use in a loop.
template <class T>
__device__ __forceinline__ T* opaque(T* p) {
  asm("" : "+l"(p));
  return p;
}
__device__ __forceinline__ int opaque(int v) {
  asm("" : "+r"(v));
  return v;
}

// ---- named barrier `id` (1..15; 0 is __syncthreads) over `count` threads (a multiple of
// 32): one warpgroup's warps meet without stopping the rest of the block.
__device__ __forceinline__ void bar_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// ---- ldmatrix: four 8x8 b16 matrices from shared memory (lane l gives the row
// address of matrix l / 8); .trans transposes each (B operands stored k-minor).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row)));
}

// ---- movmatrix: the transpose of an 8x8 b16 matrix held in the fragment layout (lane l
// holds row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1), returned in the same layout.
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t r;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(r) : "r"(x));
  return r;
}

// ---- mma.sync: C += A B with A 16 x k (row), B k x 8 (col); fragments as in the PTX ISA.
// m16n8k16 with fp32 accumulation; AB names the operand type ("f16" or "bf16").
#define LOWBIT_MMA_M16N8K16(AB, c, a, b0, b1)                                                        \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." AB "." AB ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, " \
               "{%8,%9}, {%0,%1,%2,%3};\n"                                                          \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                      \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
__device__ __forceinline__ void mma_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  LOWBIT_MMA_M16N8K16("f16", c, a, b0, b1);
}
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  LOWBIT_MMA_M16N8K16("bf16", c, a, b0, b1);
}
#undef LOWBIT_MMA_M16N8K16

// The two 16-bit input types of that mma by their element tag (lowbit::cuda::F16 /
// BF16): the packed pair H2, the mma, a pair packed from two floats (round to nearest
// even, lo in the low half) and a float in both halves.
template <class E> struct Mma16;
template <> struct Mma16<F16> {
  using H2 = __half2;
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_f16(c, a, b0, b1);
  }
  __device__ static uint32_t pack(float lo, float hi) {
    const H2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ static H2 splat(float v) { return __float2half2_rn(v); }
};
template <> struct Mma16<BF16> {
  using H2 = __nv_bfloat162;
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_bf16(c, a, b0, b1);
  }
  __device__ static uint32_t pack(float lo, float hi) {
    const H2 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ static H2 splat(float v) { return __float2bfloat162_rn(v); }
};

// (a & B) | C in one LOP3 (truth table 0xEA = (0xF0 & 0xCC) | 0xAA). Written as C++, the
// same expression with two immediates compiles to two LOP3s, one per immediate.
template <uint32_t B, uint32_t C>
__device__ __forceinline__ uint32_t and_or(uint32_t a) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(a), "n"(B), "n"(C));
  return r;
}

// Two int8 codes of a word (bytes I and J) as an exact packed pair of the mma type E,
// from u = word ^ kFlip (XOR-ed once per word by the caller).
template <class E> struct CodePair;
template <> struct CodePair<F16> {
  static constexpr uint32_t kFlip = 0x80808080u;  // each code + 128, as an unsigned byte
  template <int I, int J>
  __device__ static uint32_t get(uint32_t u) {
    // fp16 0x64XX is 1024 + XX; minus 1152 leaves the code.
    const uint32_t t = __byte_perm(u, 0x64646464u, I | 4 << 4 | J << 8 | 4 << 12);
    const __half2 h = __hsub2(*reinterpret_cast<const __half2*>(&t), __float2half2_rn(1152.0f));
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};
template <> struct CodePair<BF16> {
  static constexpr uint32_t kFlip = 0;  // the signed codes themselves
  template <int I, int J>
  __device__ static uint32_t get(uint32_t u) {
    // bf16 has no magic that spans 256 codes, but two halves do: with c the code's byte,
    // 0x43 | (c & 0x7f) is 128 + (c & 0x7f) and 0x43 | (c & 0x80) is 128 or 256 (sign
    // set), so their difference is the signed code, exactly.
    const uint32_t x = __byte_perm(u, 0x43434343u, I | 4 << 4 | J << 8 | 4 << 12);
    const uint32_t t = x & 0xff7fff7fu, s = x & 0xff80ff80u;
    const __nv_bfloat162 h =
        __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&t), *reinterpret_cast<const __nv_bfloat162*>(&s));
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};

// m16n8k32 int8 x int8 with int32 accumulation (exact).
__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace lowbit::cuda::ptx

// Run-time ISA selection: cpuid says what the CPU has, XCR0 says whether the
// OS saves the AVX / AVX-512 register state; the best level both allow is the
// default, and select_isa() may pick any lower one (LOWBIT_CPU_ISA, tests).
#include <cpuid.h>

#include <atomic>
#include <cstdint>

#include "kernels.h"
#include "lowbit/status.h"

namespace lowbit::cpu {
namespace {

uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));  // no -mxsave needed
  return (uint64_t(edx) << 32) | eax;
}

Isa detect() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return kScalar;
  bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!osxsave) return kScalar;
  uint64_t xcr0 = xgetbv0();
  bool os_avx = (xcr0 & 0x6) == 0x6;        // XMM + YMM state
  bool os_avx512 = (xcr0 & 0xe6) == 0xe6;   // + opmask, ZMM_Hi256, Hi16_ZMM
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return kScalar;
  bool avx2 = b & (1u << 5);
  bool avx512 = (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31));  // F DQ BW VL
  bool vnni = c & (1u << 11);
  if (!(os_avx && avx2 && fma && f16c)) return kScalar;
  if (!(os_avx512 && avx512)) return kAvx2;
  if (!vnni) return kAvx512;
  bool bf16 = __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5));  // AVX512_BF16
  return bf16 ? kAvx512Bf16 : kAvx512Vnni;
}

// Every op family of one ISA copy fills its entries (a new family adds one line here).
#define LOWBIT_REGISTER_ALL(isa) \
  isa::register_int8(t);         \
  isa::register_int4(t);         \
  isa::register_attention(t);    \
  isa::register_fused(t)

KernelTable make_table(Isa isa) {
  KernelTable t{};
  switch (isa) {
    case kScalar: LOWBIT_REGISTER_ALL(scalar); break;
    case kAvx2: LOWBIT_REGISTER_ALL(avx2); break;
    case kAvx512: LOWBIT_REGISTER_ALL(avx512); break;
    case kAvx512Vnni: LOWBIT_REGISTER_ALL(avx512_vnni); break;
    case kAvx512Bf16: LOWBIT_REGISTER_ALL(avx512_bf16); break;
    default: break;
  }
#undef LOWBIT_REGISTER_ALL
  return t;
}

const Isa g_best = detect();
const KernelTable g_tables[kIsaCount] = {make_table(kScalar), make_table(kAvx2), make_table(kAvx512),
                                         make_table(kAvx512Vnni), make_table(kAvx512Bf16)};
std::atomic<int> g_selected{g_best};

}  // namespace

Isa best_supported_isa() { return g_best; }

const char* isa_name(Isa isa) {
  static const char* names[kIsaCount] = {"scalar", "avx2", "avx512", "avx512_vnni", "avx512_bf16"};
  return (isa >= 0 && isa < kIsaCount) ? names[isa] : "unknown";
}

int select_isa(Isa isa) {
  if (isa < 0 || isa > g_best) return kUnsupportedIsa;
  g_selected.store(isa, std::memory_order_relaxed);
  return kOk;
}

Isa selected_isa() { return Isa(g_selected.load(std::memory_order_relaxed)); }

const KernelTable& kernels() { return g_tables[g_selected.load(std::memory_order_relaxed)]; }

}  // namespace lowbit::cpu

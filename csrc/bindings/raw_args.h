// What the two binding modules (cpu_module.cpp, cuda_module.cpp) share: pointers
// arrive as integers (tensor.data_ptr(), 0 = null) and attention's strides as
// arrays, copied into the kernels' argument structs (whose stride fields match).
#pragma once
#include <array>
#include <cstdint>

namespace lowbit::bindings {

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

using Strides3 = std::array<int64_t, 3>;
using Strides4 = std::array<int64_t, 4>;

// q / k / v / out strides (batch, head, row) and the mask's (batch, head, row, col).
template <class Args>
void set_attention_strides(Args& a, const Strides3& qs, const Strides3& ks, const Strides3& vs, const Strides3& os,
                           const Strides4& ms) {
  for (int i = 0; i < 3; ++i) {
    a.q_stride[i] = qs[i];
    a.k_stride[i] = ks[i];
    a.v_stride[i] = vs[i];
    a.out_stride[i] = os[i];
  }
  for (int i = 0; i < 4; ++i) a.mask_stride[i] = ms[i];
}

}  // namespace lowbit::bindings

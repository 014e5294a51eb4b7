// lowbit._cuda: the CUDA kernels. Thin on purpose, like cpu_module.cpp: pointers
// arrive as integers (tensor.data_ptr()), the stream as an integer
// (torch.cuda.current_stream().cuda_stream), every kernel runs with the GIL
// released, and errors come back as lowbit::Status codes that
// python/lowbit/_native.py turns into exceptions.
//
// Arguments are checked before the device is touched, so a bad call (or an empty
// one, M == 0) answers without a GPU. Then `device` is made current for the call
// (switching only when it differs, and switching back after) and the launcher
// enqueues its kernels on `stream`.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "attention.h"
#include "int4.h"
#include "int8.h"
#include "kv_cache.h"
#include "lowbit/status.h"
#include "raw_args.h"

#ifndef LOWBIT_CUDA_ARCHS
#define LOWBIT_CUDA_ARCHS "unknown"
#endif

namespace py = pybind11;
using namespace lowbit;
using namespace lowbit::bindings;

namespace {

void* stream_ptr(uintptr_t s) { return reinterpret_cast<void*>(s); }

// Makes `device` current for its lifetime, restoring the previous device after.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    cudaError_t e = cudaGetDevice(&prev_);
    if (e == cudaSuccess && prev_ != device) {
      e = cudaSetDevice(device);
      switched_ = e == cudaSuccess;
    }
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      cuda::record_cuda_error("selecting the device", cudaGetErrorName(e), cudaGetErrorString(e));
      return;
    }
    ok_ = true;
  }
  ~DeviceScope() {
    if (switched_) cudaSetDevice(prev_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
  bool ok() const { return ok_; }

 private:
  int prev_ = 0;
  bool switched_ = false;
  bool ok_ = false;
};

int int8_quantize_per_token(uintptr_t x, int x_dtype, int64_t M, int64_t K, int64_t ldx, uintptr_t q,
                            uintptr_t scale, int device, uintptr_t stream) {
  if (int st = cuda::check_quantize_args(ptr<const void>(x), x_dtype, M, K, ldx, ptr<const void>(q),
                                         ptr<const void>(scale)))
    return st;
  if (M == 0) return kOk;
  if (device < 0) return kInvalidArgument;
  DeviceScope scope(device);
  if (!scope.ok()) return kCudaError;
  return cuda::int8_quantize_per_token(ptr<const void>(x), x_dtype, M, K, ldx, ptr<int8_t>(q), ptr<float>(scale),
                                       stream_ptr(stream));
}

// The K-split plans: device >= 0 plans for the blocks that fit on it (switched to for the
// occupancy query), device < 0 for the kernel's launch bound (host arithmetic only).
template <class Plan>
py::tuple split_plan(int device, Plan plan) {
  int splits = 1;
  int64_t counters = 0;
  if (device >= 0) {
    DeviceScope scope(device);
    plan(scope.ok() ? device : -1, &splits, &counters);
  } else {
    plan(-1, &splits, &counters);
  }
  return py::make_tuple(splits, counters);
}

py::tuple int8_w8a16_plan(int64_t M, int64_t K, int64_t N, int x_dtype, int sm_count, int device) {
  return split_plan(device, [&](int dev, int* splits, int64_t* counters) {
    cuda::int8_w8a16_plan(M, K, N, x_dtype, sm_count, dev, splits, counters);
  });
}

int int8_linear_w8a16(uintptr_t x, int x_dtype, int64_t M, int64_t K, int64_t ldx, uintptr_t qweight,
                      uintptr_t wscale, int64_t N, uintptr_t bias, int bias_dtype, uintptr_t y, int64_t ldy,
                      int splits, uintptr_t partial, uintptr_t counters, int device, uintptr_t stream) {
  if (splits < 1) return kInvalidArgument;
  if (int st = cuda::check_linear_args(ptr<const void>(x), x_dtype, M, K, ldx, ptr<const void>(qweight),
                                       ptr<const void>(wscale), N, ptr<const void>(bias), bias_dtype,
                                       ptr<const void>(y), ldy))
    return st;
  if (M == 0) return kOk;
  if (device < 0) return kInvalidArgument;
  DeviceScope scope(device);
  if (!scope.ok()) return kCudaError;
  return cuda::int8_linear_w8a16(ptr<const void>(x), x_dtype, M, K, ldx, ptr<const int8_t>(qweight),
                                 ptr<const float>(wscale), N, ptr<const void>(bias), bias_dtype, ptr<void>(y), ldy,
                                 splits, ptr<float>(partial), ptr<int>(counters), stream_ptr(stream));
}

int int8_linear_w8a8(uintptr_t x, int x_dtype, int64_t M, int64_t K, int64_t ldx, uintptr_t qweight,
                     uintptr_t wscale, int64_t N, uintptr_t bias, int bias_dtype, uintptr_t y, int64_t ldy,
                     uintptr_t qx, uintptr_t sx, int device, uintptr_t stream) {
  if (int st = cuda::check_linear_args(ptr<const void>(x), x_dtype, M, K, ldx, ptr<const void>(qweight),
                                       ptr<const void>(wscale), N, ptr<const void>(bias), bias_dtype,
                                       ptr<const void>(y), ldy))
    return st;
  if (M == 0) return kOk;
  if (!qx || !sx || device < 0) return kInvalidArgument;
  DeviceScope scope(device);
  if (!scope.ok()) return kCudaError;
  return cuda::int8_linear_w8a8(ptr<const void>(x), x_dtype, M, K, ldx, ptr<const int8_t>(qweight),
                                ptr<const float>(wscale), N, ptr<const void>(bias), bias_dtype, ptr<void>(y), ldy,
                                ptr<int8_t>(qx), ptr<float>(sx), stream_ptr(stream));
}

py::tuple int4_w4a16_plan(int64_t M, int64_t K, int64_t N, int x_dtype, int scales_dtype, int sm_count,
                          int device) {
  return split_plan(device, [&](int dev, int* splits, int64_t* counters) {
    cuda::int4_w4a16_plan(M, K, N, x_dtype, scales_dtype, sm_count, dev, splits, counters);
  });
}

int int4_linear_w4a16(uintptr_t x, int x_dtype, int64_t M, int64_t K, int64_t ldx, uintptr_t qweight,
                      uintptr_t scales, int scales_dtype, int64_t groups, int64_t N, uintptr_t bias, int bias_dtype,
                      uintptr_t y, int64_t ldy, int splits, uintptr_t partial, uintptr_t counters, int device,
                      uintptr_t stream) {
  if (int st = cuda::check_w4a16_args(ptr<const void>(x), x_dtype, M, K, ldx, ptr<const void>(qweight),
                                      ptr<const void>(scales), scales_dtype, groups, N, ptr<const void>(bias),
                                      bias_dtype, ptr<const void>(y), ldy, splits))
    return st;
  if (M == 0) return kOk;
  if (device < 0) return kInvalidArgument;
  DeviceScope scope(device);
  if (!scope.ok()) return kCudaError;
  return cuda::int4_linear_w4a16(ptr<const void>(x), x_dtype, M, K, ldx, ptr<const uint32_t>(qweight),
                                 ptr<const void>(scales), scales_dtype, groups, N, ptr<const void>(bias), bias_dtype,
                                 ptr<void>(y), ldy, splits, ptr<float>(partial), ptr<int>(counters),
                                 stream_ptr(stream));
}

// The dense weights of large-M W4A16 / W8A16 (then one cuBLAS GEMM from torch).
int int4_dequantize_w4a16(uintptr_t qweight, uintptr_t scales, int scales_dtype, int64_t groups, int64_t N, int64_t K,
                          uintptr_t w, int w_dtype, int device, uintptr_t stream) {
  if (device < 0) return kInvalidArgument;
  DeviceScope scope(device);
  if (!scope.ok()) return kCudaError;
  return cuda::int4_dequantize_w4a16(ptr<const uint32_t>(qweight), ptr<const void>(scales), scales_dtype, groups, N, K,
                                     ptr<void>(w), w_dtype, stream_ptr(stream));
}

int int8_dequantize_w8a16(uintptr_t qweight, uintptr_t wscale, int64_t N, int64_t K, uintptr_t w, int w_dtype,
                          int device, uintptr_t stream) {
  if (device < 0) return kInvalidArgument;
  DeviceScope scope(device);
  if (!scope.ok()) return kCudaError;
  return cuda::int8_dequantize_w8a16(ptr<const int8_t>(qweight), ptr<const float>(wscale), N, K, ptr<void>(w), w_dtype,
                                     stream_ptr(stream));
}

// Arguments in the order of lowbit._C.attention (AttentionArgs' fields), then what only the
// GPU takes: num_blocks, tokens, the split plan and its scratch, device and stream.
int attention(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, int dtype, int kv_dtype, int64_t B, int64_t Hq,
              int64_t Hkv, int64_t L, int64_t S, int64_t D, int64_t Dv, Strides3 qs, Strides3 ks, Strides3 vs,
              Strides3 os, uintptr_t q_start, uintptr_t seq_lens, uintptr_t block_table, int64_t max_blocks,
              int64_t block_size, uintptr_t k_scale, uintptr_t v_scale, uintptr_t mask, int mask_dtype,
              Strides4 ms, float scale, int causal, int bottom_right, int64_t window_left,
              int64_t window_right, int64_t num_blocks, int64_t tokens, int splits, uintptr_t scratch, int device,
              uintptr_t stream) {
  cuda::AttentionArgs a{ptr<const void>(q), ptr<const void>(k), ptr<const void>(v), ptr<void>(out), dtype, kv_dtype,
                        B, Hq, Hkv, L, S, D, Dv, {}, {}, {}, {}, ptr<const int32_t>(q_start),
                        ptr<const int32_t>(seq_lens), ptr<const int32_t>(block_table), max_blocks, block_size,
                        num_blocks, ptr<const float>(k_scale), ptr<const float>(v_scale), ptr<const void>(mask),
                        mask_dtype, {}, scale, causal, bottom_right, window_left, window_right, tokens};
  set_attention_strides(a, qs, ks, vs, os, ms);
  if (int st = cuda::check_attention_args(a)) return st;
  if (tokens == 0) return kOk;
  if (device < 0) return kInvalidArgument;
  DeviceScope scope(device);
  if (!scope.ok()) return kCudaError;
  return cuda::attention(a, splits, ptr<float>(scratch), stream_ptr(stream));
}

py::tuple attention_plan(int64_t tokens, int64_t Hq, int64_t Hkv, int64_t max_keys, int64_t Dv, int sm_count) {
  int splits = 1;
  int64_t scratch = 0;
  cuda::attention_plan(tokens, Hq, Hkv, max_keys, Dv, sm_count, &splits, &scratch);
  return py::make_tuple(splits, scratch);
}

int kv_cache_write(uintptr_t src, int src_dtype, int64_t T, int64_t H, int64_t D, int64_t ld_t, int64_t ld_h,
                   uintptr_t slots, uintptr_t cache, int cache_dtype, uintptr_t scales, int64_t num_slots, int device,
                   uintptr_t stream) {
  if (int st = cuda::check_kv_cache_write_args(ptr<const void>(src), src_dtype, T, H, D, ptr<const void>(slots),
                                               ptr<const void>(cache), cache_dtype, ptr<const void>(scales),
                                               num_slots))
    return st;
  if (T == 0) return kOk;
  if (device < 0) return kInvalidArgument;
  DeviceScope scope(device);
  if (!scope.ok()) return kCudaError;
  return cuda::kv_cache_write(ptr<const void>(src), src_dtype, T, H, D, ld_t, ld_h, ptr<const int64_t>(slots),
                              ptr<void>(cache), cache_dtype, ptr<float>(scales), num_slots, stream_ptr(stream));
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "lowbit CUDA kernels (raw-pointer API; use lowbit.ops, not this module)";

  m.def(
      "archs",
      [] {
        std::string s(LOWBIT_CUDA_ARCHS);  // CMake passes the list with ',' for ';'
        for (char& c : s)
          if (c == ',') c = ';';
        return s;
      },
      "The CUDA architectures this module was compiled for (LOWBIT_CUDA_ARCHS, e.g. \"80;86;89;90a\").");

  m.def(
      "last_error", [] { return cuda::last_cuda_error(); },
      "The last CUDA error a call of this module met on this thread (\"\" if none), behind a CUDA_ERROR status.");

  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("int8_quantize_per_token", &int8_quantize_per_token, nogil, py::arg("x"), py::arg("x_dtype"), py::arg("M"),
        py::arg("K"), py::arg("ldx"), py::arg("q"), py::arg("scale"), py::arg("device"), py::arg("stream"));
  m.def("int8_w8a16_plan", &int8_w8a16_plan, py::arg("M"), py::arg("K"), py::arg("N"), py::arg("x_dtype"),
        py::arg("sm_count"), py::arg("device"),
        "(splits, counters): how int8_linear_w8a16 runs this shape on device (< 0: for the kernel's launch bound, "
        "host-only arithmetic).");
  m.def("int8_linear_w8a16", &int8_linear_w8a16, nogil, py::arg("x"), py::arg("x_dtype"), py::arg("M"), py::arg("K"),
        py::arg("ldx"), py::arg("qweight"), py::arg("wscale"), py::arg("N"), py::arg("bias"), py::arg("bias_dtype"),
        py::arg("y"), py::arg("ldy"), py::arg("splits"), py::arg("partial"), py::arg("counters"), py::arg("device"),
        py::arg("stream"));
  m.def("int8_linear_w8a8", &int8_linear_w8a8, nogil, py::arg("x"), py::arg("x_dtype"), py::arg("M"), py::arg("K"),
        py::arg("ldx"), py::arg("qweight"), py::arg("wscale"), py::arg("N"), py::arg("bias"), py::arg("bias_dtype"),
        py::arg("y"), py::arg("ldy"), py::arg("qx"), py::arg("sx"), py::arg("device"), py::arg("stream"));
  m.def("int4_w4a16_plan", &int4_w4a16_plan, py::arg("M"), py::arg("K"), py::arg("N"), py::arg("x_dtype"),
        py::arg("scales_dtype"), py::arg("sm_count"), py::arg("device"),
        "(splits, counters): how int4_linear_w4a16 runs this shape on device (< 0: for the kernel's launch bound, "
        "host-only arithmetic).");
  m.def("int4_linear_w4a16", &int4_linear_w4a16, nogil, py::arg("x"), py::arg("x_dtype"), py::arg("M"), py::arg("K"),
        py::arg("ldx"), py::arg("qweight"), py::arg("scales"), py::arg("scales_dtype"), py::arg("groups"),
        py::arg("N"), py::arg("bias"), py::arg("bias_dtype"), py::arg("y"), py::arg("ldy"), py::arg("splits"),
        py::arg("partial"), py::arg("counters"), py::arg("device"), py::arg("stream"));
  m.def("int4_dequantize_w4a16", &int4_dequantize_w4a16, nogil, py::arg("qweight"), py::arg("scales"),
        py::arg("scales_dtype"), py::arg("groups"), py::arg("N"), py::arg("K"), py::arg("w"), py::arg("w_dtype"),
        py::arg("device"), py::arg("stream"));
  m.def("int8_dequantize_w8a16", &int8_dequantize_w8a16, nogil, py::arg("qweight"), py::arg("wscale"), py::arg("N"),
        py::arg("K"), py::arg("w"), py::arg("w_dtype"), py::arg("device"), py::arg("stream"));
  m.def("attention", &attention, nogil);
  m.def("attention_plan", &attention_plan, py::arg("tokens"), py::arg("Hq"), py::arg("Hkv"), py::arg("max_keys"),
        py::arg("Dv"), py::arg("sm_count"),
        "(splits, scratch_floats): how attention splits the keys of this call (host-only arithmetic).");
  m.def("kv_cache_write", &kv_cache_write, nogil);
}

// Host-side helpers every CUDA op family shares: the per-thread last CUDA error
// (for lowbit._cuda.last_error()), the dtype-code check and the launch status.
// Plain C++ (no CUDA types beyond the runtime API) so that the bindings, built by
// the host compiler, can include the family headers that include this one.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "lowbit/status.h"

namespace lowbit::cuda {

// The last CUDA error an entry point of lowbit._cuda met on this thread ("" if
// none): a status code alone cannot say which error it was.
inline std::string& last_cuda_error() {
  static thread_local std::string s;
  return s;
}

inline void record_cuda_error(const char* where, const char* name, const char* text) {
  last_cuda_error() = std::string(where) + ": " + name + " (" + text + ")";
}

inline bool valid_dtype_code(int code) { return code == kF32 || code == kF16 || code == kBF16; }

// Whether environment variable `name` is set to `value`: the kernel switches
// (LOWBIT_CUDA_DECODE=simt, LOWBIT_CUDA_W8A16=simt, LOWBIT_CUDA_W8A8=mma, LOWBIT_CUDA_PDL=0), read at every
// call so tests and benchmarks can compare kernels in one process.
inline bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v && std::strcmp(v, value) == 0;
}

// kOk, or kCudaError (recorded) if the launches since the last check failed.
inline int launch_status(const char* where) {
  const cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return kOk;
  record_cuda_error(where, cudaGetErrorName(e), cudaGetErrorString(e));
  return kCudaError;
}

}  // namespace lowbit::cuda

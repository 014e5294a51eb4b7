// Host-side helpers every CUDA op family shares: the per-thread last CUDA error
// (for lowbit._cuda.last_error()), the dtype-code check and the launch status.
// Plain C++ (no CUDA types beyond the runtime API) so that the bindings, built by
// the host compiler, can include the family headers that include this one.
#pragma once
#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdint>
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
// (LOWBIT_CUDA_DECODE=simt, LOWBIT_CUDA_W8A16=simt, LOWBIT_CUDA_W8A8=mma|tma|cluster|cluster4,
// LOWBIT_CUDA_W8A8_MIN_M=16, LOWBIT_CUDA_W8A8_DECODE=mma, LOWBIT_CUDA_W8A8_PDL=1, LOWBIT_CUDA_PDL=0,
// LOWBIT_CUDA_WOQ_COPY=bulk, LOWBIT_CUDA_WOQ_TILES=2, LOWBIT_CUDA_WOQ_BLOCKS=6|8,
// LOWBIT_CUDA_WOQ_REDUCE=cluster, LOWBIT_CUDA_QUANT=vec; and, in Python,
// LOWBIT_CUDA_GRAPH_COUNTERS=shared), read at every call so
// tests and benchmarks can compare kernels in one process.
inline bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v && std::strcmp(v, value) == 0;
}

// A yes / no about the current device, worked out once by check(device) and cached: bit d of
// `known` says device d was checked, bit d of `ok` the answer. False if the device is unknown.
template <class Check>
bool cached_per_device(std::atomic<uint64_t>& known, std::atomic<uint64_t>& ok, Check check) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  const uint64_t bit = uint64_t(1) << dev;
  if (known.load(std::memory_order_acquire) & bit) return ok.load(std::memory_order_relaxed) & bit;
  const bool yes = check(dev);
  (void)cudaGetLastError();
  if (yes) ok.fetch_or(bit, std::memory_order_relaxed);
  known.fetch_or(bit, std::memory_order_release);
  return yes;
}

// A count (> 0) about the current device, worked out once by count() and cached in cache[d]
// for device d (0..63; others count every call).
template <class Count>
int cached_count_per_device(std::atomic<int> (&cache)[64], Count count) {
  int dev = 0;
  const bool known = cudaGetDevice(&dev) == cudaSuccess && dev >= 0 && dev < 64;
  if (known) {
    const int n = cache[dev].load(std::memory_order_relaxed);
    if (n > 0) return n;
  }
  const int n = count();
  if (known) cache[dev].store(n, std::memory_order_relaxed);
  return n;
}

// Whether this build's code for an sm_90 device is sm_90a's, the only one with wgmma (and the
// only one lowbit compiles its TMA and mbarrier code for): LOWBIT_CUDA_ARCHS (CMake's list,
// ',' for ';') names 90a and no plain 90 the driver could pick instead.
inline bool built_for_sm90a() {
#if defined(LOWBIT_CUDA_ARCHS)
  bool a = false, plain = false;
  const char* p = LOWBIT_CUDA_ARCHS;
  while (*p) {
    const char* end = std::strchr(p, ',');
    const size_t n = end ? size_t(end - p) : std::strlen(p);
    if (n >= 2 && p[0] == '9' && p[1] == '0') (n > 2 && p[2] == 'a' ? a : plain) = true;
    if (!end) break;
    p = end + 1;
  }
  return a && !plain;
#else
  return false;
#endif
}

// Whether device `dev` (compute capability 9 .. max_major) runs `kernel` from code built for
// sm_90 or newer: its PTX version is 9.0+, so it is not an older arch's PTX JIT-compiled,
// which lacks the sm_90 instructions (wgmma, griddepcontrol) the kernel then does without.
template <class Kernel>
bool runs_sm90_code(int dev, Kernel kernel, int max_major) {
  int major = 0;
  cudaFuncAttributes attr{};
  return cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 9 &&
         major <= max_major && cudaFuncGetAttributes(&attr, kernel) == cudaSuccess && attr.ptxVersion >= 90;
}

// Whether device `dev` (compute capability 9) runs this build's sm_90a code of `kernel`: the
// kernels with wgmma, TMA or mbarriers, which are traps in every other build of them.
template <class Kernel>
bool runs_sm90a_code(int dev, Kernel kernel) {
  return built_for_sm90a() && runs_sm90_code(dev, kernel, 9);
}

// Opts `kernel` into `bytes` of dynamic shared memory (> 48 KiB needs it), once per device
// (the attribute belongs to the device's context; `done` bit d: device d is set up, devices
// 0..63, others every call); kOk or kCudaError (recorded for `where`).
template <class Kernel>
int opt_in_smem(Kernel kernel, int bytes, std::atomic<uint64_t>& done, const char* where) {
  int dev = 0;
  const bool known = cudaGetDevice(&dev) == cudaSuccess && dev >= 0 && dev < 64;
  if (known && ((done.load(std::memory_order_acquire) >> dev) & 1u)) return kOk;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    record_cuda_error((std::string(where) + " (cudaFuncSetAttribute)").c_str(), cudaGetErrorName(e),
                      cudaGetErrorString(e));
    return kCudaError;
  }
  if (known) done.fetch_or(uint64_t(1) << dev, std::memory_order_release);
  return kOk;
}

// A cudaLaunchKernelEx configuration, built in place (cfg points at attrs: never copied):
// clusters of `cluster` CTAs unless 1 x 1 x 1, and with `overlap` a programmatic dependent
// launch (the kernel may start before the previous one in the stream has ended, and must call
// wait_prerequisites() before it reads what that one writes).
struct ExLaunch {
  cudaLaunchAttribute attrs[2]{};
  cudaLaunchConfig_t cfg{};
  ExLaunch(const ExLaunch&) = delete;
  ExLaunch& operator=(const ExLaunch&) = delete;
  ExLaunch(dim3 grid, dim3 block, size_t smem, cudaStream_t s, dim3 cluster, bool overlap) {
    cfg.gridDim = grid, cfg.blockDim = block, cfg.dynamicSmemBytes = smem, cfg.stream = s, cfg.attrs = attrs;
    if (cluster.x * cluster.y * cluster.z > 1) {
      cudaLaunchAttribute& a = attrs[cfg.numAttrs++];
      a.id = cudaLaunchAttributeClusterDimension;
      a.val.clusterDim.x = cluster.x, a.val.clusterDim.y = cluster.y, a.val.clusterDim.z = cluster.z;
    }
    if (overlap) {
      cudaLaunchAttribute& a = attrs[cfg.numAttrs++];
      a.id = cudaLaunchAttributeProgrammaticStreamSerialization;
      a.val.programmaticStreamSerializationAllowed = 1;
    }
  }
};

// kOk, or kCudaError (recorded) if the launches since the last check failed.
inline int launch_status(const char* where) {
  const cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return kOk;
  record_cuda_error(where, cudaGetErrorName(e), cudaGetErrorString(e));
  return kCudaError;
}

}  // namespace lowbit::cuda

// Status codes returned by every native entry point (CPU and CUDA).
// Kernels never abort: the Python ops layer turns a non-zero code into an
// exception (see python/lowbit/_native.py, which mirrors this list).
#pragma once

namespace lowbit {

enum Status : int {
  kOk = 0,
  kInvalidArgument = 1,   // a size, stride or enum value the kernel cannot take
  kUnsupportedIsa = 2,    // asked for an ISA level this CPU (or build) lacks
  kOutOfMemory = 3,       // scratch allocation failed
  kCudaError = 4,         // a CUDA runtime call failed (launch, stream, ...)
};

// Element types crossing the native boundary. Values are part of the ABI with
// python/lowbit/_native.py.
enum DType : int {
  kF32 = 0,
  kF16 = 1,
  kBF16 = 2,
  kBool = 3,  // one byte per element, nonzero = true (torch.bool)
  kI8 = 4,    // int8 codes (INT8 KV caches)
};

}  // namespace lowbit

// Instantiates the split-KV attention kernels for fp32 and int8 caches: the CUDA-core one
// (attention_split.cuh) and, where it applies, the tensor-core one (attention_split_mma.cuh).
#include "attention_split_mma.cuh"

namespace lowbit::cuda::split_kv {
template int launch_split_kv<F32>(const AttentionArgs&, int, float*, cudaStream_t);
template int launch_split_kv<I8>(const AttentionArgs&, int, float*, cudaStream_t);
}  // namespace lowbit::cuda::split_kv

// Instantiates the split-KV attention kernels for fp16 and bf16 caches: the CUDA-core one
// (attention_split.cuh) and, where it applies, the tensor-core one (attention_split_mma.cuh).
#include "attention_split_mma.cuh"

namespace lowbit::cuda::split_kv {
template int launch_split_kv<F16>(const AttentionArgs&, int, float*, cudaStream_t);
template int launch_split_kv<BF16>(const AttentionArgs&, int, float*, cudaStream_t);
}  // namespace lowbit::cuda::split_kv

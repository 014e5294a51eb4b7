// Instantiates the split-KV attention kernels for fp32 and int8 caches (attention_split.cuh).
#include "attention_split.cuh"

namespace lowbit::cuda::split_kv {
template void launch_split_kv<F32>(const AttentionArgs&, int, float*, cudaStream_t);
template void launch_split_kv<I8>(const AttentionArgs&, int, float*, cudaStream_t);
}  // namespace lowbit::cuda::split_kv

// Instantiates the split-KV attention kernels for fp16 and bf16 caches (attention_split.cuh).
#include "attention_split.cuh"

namespace lowbit::cuda::split_kv {
template void launch_split_kv<F16>(const AttentionArgs&, int, float*, cudaStream_t);
template void launch_split_kv<BF16>(const AttentionArgs&, int, float*, cudaStream_t);
}  // namespace lowbit::cuda::split_kv

// A small fork-safe thread pool for the CPU kernels. Its size is given per call
// (the Python side passes torch.get_num_threads() or lowbit.set_num_threads()),
// the calling thread takes part, and workers spin briefly before sleeping so
// that back-to-back decode GEMVs don't pay a futex wake each. A second caller
// arriving while the pool is busy (several Python threads, GIL released) runs
// its job inline instead of queueing: correct, and never oversubscribed.
#pragma once
#include <cstdint>

namespace lowbit::cpu {

using TaskFn = void (*)(void* ctx, int64_t task);

// Runs fn(ctx, t) for every t in [0, ntasks), on at most nthreads threads.
void parallel_run(int64_t ntasks, int nthreads, TaskFn fn, void* ctx);

// Template sugar: parallel_for(n, threads, [&](int64_t t) { ... }).
template <class F>
inline void parallel_for(int64_t ntasks, int nthreads, F&& f) {
  parallel_run(ntasks, nthreads, [](void* c, int64_t t) { (*static_cast<F*>(c))(t); },
               const_cast<void*>(static_cast<const void*>(&f)));
}

}  // namespace lowbit::cpu

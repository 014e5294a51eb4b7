#include "threadpool.h"

#include <pthread.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LOWBIT_PAUSE() _mm_pause()
#else
#define LOWBIT_PAUSE() ((void)0)
#endif

namespace lowbit::cpu {
namespace {

// How long an idle worker keeps polling before it sleeps. Long enough to cover
// the gap between the GEMVs of one decode step, short enough not to steal a
// core from torch's own threads for long.
constexpr auto kSpin = std::chrono::microseconds(100);
constexpr int kMaxThreads = 256;

class Pool {
 public:
  void run(int64_t ntasks, int nthreads, TaskFn fn, void* ctx) {
    std::unique_lock<std::mutex> lock(busy_, std::try_to_lock);
    if (!lock.owns_lock()) {  // another caller holds the pool: do our job inline
      for (int64_t t = 0; t < ntasks; ++t) fn(ctx, t);
      return;
    }
    int nworkers = static_cast<int>(std::min<int64_t>(nthreads, ntasks)) - 1;
    grow(nworkers);
    fn_ = fn;
    ctx_ = ctx;
    ntasks_ = ntasks;
    next_.store(0, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    open_.store(true);
    // One word carries the job's generation and its worker count, so a worker
    // decides whether it takes part from the same read that told it of the job.
    uint64_t gen = (state_.load(std::memory_order_relaxed) >> 16) + 1;
    state_.store(gen << 16 | uint64_t(nworkers), std::memory_order_release);
    state_.notify_all();
    work();
    // Wait for tasks, not for workers: a worker the OS has not scheduled yet
    // must not hold up a small job that the caller finished alone.
    spin_until([&] { return done_.load(std::memory_order_acquire) == ntasks_; });
    open_.store(false);
    spin_until([&] { return joined_.load() == 0; });
  }

 private:
  template <class Pred>
  static void spin_until(Pred done) {
    for (int spins = 0; !done(); ++spins) {
      if (spins < 4096) LOWBIT_PAUSE();
      else std::this_thread::yield();  // oversubscribed: let the straggler run
    }
  }

  void work() {
    for (int64_t t; (t = next_.fetch_add(1, std::memory_order_relaxed)) < ntasks_;) {
      fn_(ctx_, t);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void grow(int n) {
    while (static_cast<int>(threads_) < n) {
      int id = static_cast<int>(threads_++);
      // The worker must compare against the state from before this job is
      // published, or it could sleep through the job it was made for.
      uint64_t before = state_.load(std::memory_order_relaxed);
      std::thread([this, id, before] { worker(id, before); }).detach();
    }
  }

  void worker(int id, uint64_t seen) {
    for (;;) {
      auto until = std::chrono::steady_clock::now() + kSpin;
      uint64_t s;
      int polls = 0;
      while ((s = state_.load(std::memory_order_acquire)) == seen) {
        LOWBIT_PAUSE();
        if (++polls % 64 == 0 && std::chrono::steady_clock::now() > until) {
          state_.wait(seen, std::memory_order_acquire);
        }
      }
      seen = s;
      if (id < static_cast<int>(s & 0xffff)) {
        // Join, then check the job is still open: run() closes it before
        // waiting for joined_ to drain, so nobody touches a finished job.
        joined_.fetch_add(1);
        if (open_.load() && state_.load() == s) work();
        joined_.fetch_sub(1);
      }
    }
  }

  std::mutex busy_;
  size_t threads_ = 0;
  std::atomic<uint64_t> state_{0};  // generation << 16 | workers taking part
  std::atomic<bool> open_{false};
  std::atomic<int> joined_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int64_t> next_{0};
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t ntasks_ = 0;
};

// Leaked on purpose: detached workers may still be parked in it at exit.
Pool* g_pool = new Pool();
std::once_flag g_atfork_once;

}  // namespace

void parallel_run(int64_t ntasks, int nthreads, TaskFn fn, void* ctx) {
  if (ntasks <= 0) return;
  if (nthreads > kMaxThreads) nthreads = kMaxThreads;
  if (nthreads <= 1 || ntasks == 1) {
    for (int64_t t = 0; t < ntasks; ++t) fn(ctx, t);
    return;
  }
  // A forked child has none of the parent's workers: give it a fresh pool.
  std::call_once(g_atfork_once, [] { pthread_atfork(nullptr, nullptr, [] { g_pool = new Pool(); }); });
  g_pool->run(ntasks, nthreads, fn, ctx);
}

}  // namespace lowbit::cpu

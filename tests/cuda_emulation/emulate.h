// CUDA device code on the CPU, for tests/test_cuda_emulation.py: one thread per CUDA thread
// of a block, a barrier for __syncthreads and one per warp for __syncwarp, shuffles through a
// per-block exchange array, atomicAdd through std::atomic_ref. Blocks run one after another, all
// at once, or spread over a few workers (Schedule), so that ThreadSanitizer sees two blocks' plain
// writes to one address as the race they are on a GPU.
// Shared memory starts filled with NaN patterns, so that reading what no thread wrote shows.
// Threads of a block are numbered x fastest (warps of 32 in that order), as on a GPU. Only what
// the emulated kernels use.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <vector>

#include <pthread.h>

namespace emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

struct Block {
  std::vector<unsigned char> shared;
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<double> exchange;  // one value per thread, for the shuffles
};

struct ThreadState {
  Dim3 thread, block, dim;
  int tid = 0;  // the thread's number in its block, x fastest
  Block* own = nullptr;
};
inline thread_local ThreadState state;

// this thread's block: none under Schedule::kWorkers, where a barrier or shuffle is a mistake
inline Block& own() {
  if (state.own == nullptr) {
    std::fprintf(stderr, "emulate.h: a barrier, shuffle or shared memory under kWorkers\n");
    std::abort();
  }
  return *state.own;
}
inline unsigned char* shared() { return own().shared.data(); }
inline void sync_block() { own().all->arrive_and_wait(); }
inline void sync_warp() { own().warps[state.tid / 32]->arrive_and_wait(); }

// the warp's lanes whose pred is true, one bit each
inline unsigned ballot(bool pred) {
  const int lane = state.tid % 32, base = state.tid - lane;
  own().exchange[state.tid] = pred ? 1.0 : 0.0;
  sync_warp();
  unsigned mask = 0;
  for (int l = 0; l < 32; ++l) mask |= own().exchange[base + l] != 0.0 ? 1u << l : 0u;
  sync_warp();
  return mask;
}

template <typename T>
T shuffle_down(T v, int offset) {
  const int lane = state.tid % 32, base = state.tid - lane;
  own().exchange[state.tid] = static_cast<double>(v);
  sync_warp();
  const T out = lane + offset < 32 ? static_cast<T>(own().exchange[base + lane + offset]) : v;
  sync_warp();
  return out;
}

// CUDA's atomicAdd: the old value
template <typename T>
T atomic_add(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

// std::thread's stacks are 8 MB, which the sanitizers map and clear for every CUDA thread; these
// threads take 256 KB (the kernels keep a few KB of registers on it)
class Threads {
 public:
  void start(std::function<void()> body) {
    bodies_.push_back(std::make_unique<std::function<void()>>(std::move(body)));
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    pthread_t id;
    if (pthread_create(&id, &attr, &run, bodies_.back().get()) != 0) std::abort();
    pthread_attr_destroy(&attr);
    ids_.push_back(id);
  }
  void join() {
    for (pthread_t id : ids_) pthread_join(id, nullptr);
    ids_.clear();
    bodies_.clear();
  }

 private:
  static void* run(void* body) {
    (*static_cast<std::function<void()>*>(body))();
    return nullptr;
  }
  std::vector<pthread_t> ids_;
  std::vector<std::unique_ptr<std::function<void()>>> bodies_;
};

// How launch runs a grid's CUDA threads: each its own thread, block after block (kBlocks) or
// every block at once (kGrid); or, for kernels with no barrier, shuffle or shared memory, spread
// over kWorkers threads (CUDA thread k on worker k mod kWorkers, so that neighbouring threads,
// which share addresses most, run side by side) with no thread of their own: fast, and two
// workers' plain writes to one address are a race ThreadSanitizer reports.
enum class Schedule { kBlocks, kGrid, kWorkers };
constexpr unsigned kWorkers = 8;

// kernel() for every thread of a grid (gx, gy) of blocks of threads.x * threads.y threads (a
// multiple of 32) with ``shared_bytes`` of shared memory each
template <typename F>
void launch(Dim3 grid, Dim3 threads, size_t shared_bytes, const F& kernel,
            Schedule schedule = Schedule::kBlocks) {
  const unsigned size = threads.x * threads.y, blocks_in_grid = grid.x * grid.y;
  Threads pool;
  // the calling thread becomes thread t of block (bx, by), of block ``own``
  auto enter = [&](unsigned bx, unsigned by, unsigned t, Block* own) {
    state.thread = {t % threads.x, t / threads.x, 0};
    state.block = {bx, by, 0};
    state.dim = {threads.x, threads.y, 1};
    state.tid = static_cast<int>(t);
    state.own = own;
  };
  if (schedule == Schedule::kWorkers) {
    const uint64_t total = uint64_t(blocks_in_grid) * size;
    for (unsigned w = 0; w < kWorkers; ++w) {
      pool.start([&, w] {
        for (uint64_t k = w; k < total; k += kWorkers) {
          const unsigned b = static_cast<unsigned>(k / size), t = static_cast<unsigned>(k % size);
          enter(b % grid.x, b / grid.x, t, nullptr);  // no barriers, shuffles or shared memory
          kernel();
        }
      });
    }
    pool.join();
    return;
  }
  const bool together = schedule == Schedule::kGrid;
  std::vector<Block> blocks(together ? blocks_in_grid : 1);
  auto start = [&](unsigned bx, unsigned by, Block& b) {
    b.shared.assign(shared_bytes, 0xFF);
    b.all = std::make_unique<std::barrier<>>(size);
    b.warps.clear();
    for (unsigned w = 0; w < size / 32; ++w) {
      b.warps.push_back(std::make_unique<std::barrier<>>(32));
    }
    b.exchange.assign(size, 0.0);
    for (unsigned t = 0; t < size; ++t) {
      pool.start([&, bx, by, t] {
        enter(bx, by, t, &b);
        kernel();
      });
    }
  };
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      start(bx, by, blocks[together ? by * grid.x + bx : 0]);
      if (!together) pool.join();
    }
  }
  pool.join();
}

// the one-dimensional form: gx by gy blocks of ``threads`` threads
template <typename F>
void launch(unsigned gx, unsigned gy, unsigned threads, size_t shared_bytes, const F& kernel,
            Schedule schedule = Schedule::kBlocks) {
  launch(Dim3{gx, gy, 1}, Dim3{threads, 1, 1}, shared_bytes, kernel, schedule);
}

}  // namespace emu

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define threadIdx (emu::state.thread)
#define blockIdx (emu::state.block)
#define blockDim (emu::state.dim)
#define __syncthreads() emu::sync_block()
#define __syncwarp() emu::sync_warp()
#define __shfl_down_sync(mask, v, offset) emu::shuffle_down(v, offset)
#define __ballot_sync(mask, pred) emu::ballot(pred)
#define __popc(x) __builtin_popcount(x)
#define atomicAdd(address, value) emu::atomic_add(address, value)
#define CUDA_KERNEL_ASSERT(cond) \
  do {                           \
    if (!(cond)) std::abort();   \
  } while (0)

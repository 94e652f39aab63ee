// CUDA device code on the CPU, for tests/test_cuda_emulation.py: one std::thread per CUDA thread
// of a block (blocks one after another), a barrier for __syncthreads and one per warp for
// __syncwarp, shuffles through a per-block exchange array. Shared memory starts filled with
// NaN patterns, so that reading what no thread wrote shows. Only what the emulated kernels use.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdlib>
#include <cstddef>
#include <memory>
#include <thread>
#include <vector>

namespace emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

struct ThreadState {
  Dim3 thread, block, dim;
  int tid = 0;
};
inline thread_local ThreadState state;

struct Block {
  std::vector<unsigned char> shared;
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<double> exchange;  // one value per thread, for the shuffles
};
inline Block* block = nullptr;

inline unsigned char* shared() { return block->shared.data(); }
inline void sync_block() { block->all->arrive_and_wait(); }
inline void sync_warp() { block->warps[state.tid / 32]->arrive_and_wait(); }

// the warp's lanes whose pred is true, one bit each
inline unsigned ballot(bool pred) {
  const int lane = state.tid % 32, base = state.tid - lane;
  block->exchange[state.tid] = pred ? 1.0 : 0.0;
  sync_warp();
  unsigned mask = 0;
  for (int l = 0; l < 32; ++l) mask |= block->exchange[base + l] != 0.0 ? 1u << l : 0u;
  sync_warp();
  return mask;
}

template <typename T>
T shuffle_down(T v, int offset) {
  const int lane = state.tid % 32, base = state.tid - lane;
  block->exchange[state.tid] = static_cast<double>(v);
  sync_warp();
  const T out = lane + offset < 32 ? static_cast<T>(block->exchange[base + lane + offset]) : v;
  sync_warp();
  return out;
}

// kernel() for every thread of a grid (gx, gy) of blocks of ``threads`` threads (a multiple of
// 32) with ``shared_bytes`` of shared memory
template <typename F>
void launch(unsigned gx, unsigned gy, unsigned threads, size_t shared_bytes, const F& kernel) {
  for (unsigned by = 0; by < gy; ++by) {
    for (unsigned bx = 0; bx < gx; ++bx) {
      Block b;
      b.shared.assign(shared_bytes, 0xFF);
      b.all = std::make_unique<std::barrier<>>(threads);
      for (unsigned w = 0; w < threads / 32; ++w) {
        b.warps.push_back(std::make_unique<std::barrier<>>(32));
      }
      b.exchange.assign(threads, 0.0);
      block = &b;
      std::vector<std::thread> pool;
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          state.thread = {t, 0, 0};
          state.block = {bx, by, 0};
          state.dim = {threads, 1, 1};
          state.tid = static_cast<int>(t);
          kernel();
        });
      }
      for (std::thread& th : pool) th.join();
      block = nullptr;
    }
  }
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
#define CUDA_KERNEL_ASSERT(cond) \
  do {                           \
    if (!(cond)) std::abort();   \
  } while (0)

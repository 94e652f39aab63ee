// CUDA device code on the CPU, for tests/test_cuda_emulation.py: one thread per CUDA thread
// of a block, a barrier for __syncthreads and one per warp for __syncwarp, shuffles through a
// per-block exchange array, atomicAdd through std::atomic_ref. Blocks run one after another, all
// at once, or spread over a few workers (Schedule), so that ThreadSanitizer sees two blocks' plain
// writes to one address as the race they are on a GPU; or, for the emulated operators
// (operators.py, through cuda_host.h), a block's threads as fibers and small grids in turn.
// Shared memory starts filled with NaN patterns, so that reading what no thread wrote shows.
// Threads of a block are numbered x fastest (warps of 32 in that order), as on a GPU. Only what
// the emulated kernels use.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
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
  std::vector<std::vector<unsigned char>> statics;  // static __shared__ arrays, in order
  std::mutex statics_lock;
};

struct ThreadState {
  Dim3 thread, block, dim;
  int tid = 0;  // the thread's number in its block, x fastest
  Block* own = nullptr;
  size_t statics = 0;  // static __shared__ arrays this thread has declared so far
  bool fiber = false;  // Schedule::kFibers: barriers switch to the block's next CUDA thread
};
inline thread_local ThreadState state;

// A failed device assertion: the harnesses stop there; the emulated operators (EMU_ASSERT_THROWS)
// end the launch with an error, as a GPU reports one at its next synchronisation.
struct DeviceAssertion : std::runtime_error {
  using std::runtime_error::runtime_error;
};
[[noreturn]] inline void assertion_failed(const char* cond, const char* file, int line) {
  const std::string what = std::string("device-side assertion `") + cond + "` failed (" + file +
                           ":" + std::to_string(line) + ")";
#ifdef EMU_ASSERT_THROWS
  throw DeviceAssertion(what);
#else
  std::fprintf(stderr, "%s\n", what.c_str());
  std::abort();
#endif
}

// the first failure of a launch's threads, raised when the launch ends
struct Failure {
  std::mutex lock;
  std::exception_ptr first;
  std::atomic<bool> failed{false};
  void record() {
    const std::lock_guard<std::mutex> hold(lock);
    if (!first) first = std::current_exception();
    failed = true;
  }
  void raise() {
    if (first) std::rethrow_exception(first);
  }
};

// Schedule::kFibers: a block's CUDA threads as fibers of one OS thread, each running until it
// reaches a barrier or ends; a warp's threads pass a __syncwarp once all of them wait at one, a
// block's pass a __syncthreads once all that have not ended wait at one. No thread is made per
// CUDA thread and a switch is a few instructions (fiber_switch: no system call, as ucontext's
// has), so kernels with barriers run far faster than under kBlocks; not under the sanitizers,
// whose thread checks know nothing of fibers. x86-64 only.
enum Waiting { kRunnable, kAtWarp, kAtBlock, kEnded };
struct Fiber {
  void* sp = nullptr;  // its saved stack pointer
  unsigned char* stack = nullptr;
  ThreadState state;
  Waiting waiting = kRunnable;
};
struct Fibers {
  void* scheduler = nullptr;  // the OS thread's own stack pointer, while a fiber runs
  std::vector<Fiber> threads;
  Fiber* current = nullptr;
  const std::function<void()>* kernel = nullptr;
  Failure* failure = nullptr;
};
inline thread_local Fibers* fibers = nullptr;

// saves the callee-saved registers and the floating-point control words on this stack, stores
// its pointer in *from and continues on the stack at ``to`` (x86-64 System V)
extern "C" void emu_fiber_switch(void** from, void* to);
#if defined(__x86_64__)
asm(R"(
    .text
    .p2align 4
    .weak emu_fiber_switch
    .type emu_fiber_switch, @function
emu_fiber_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_fiber_switch, .-emu_fiber_switch
)");
#endif

inline void fiber_wait(Waiting at) {
  Fiber& f = *fibers->current;
  f.waiting = at;
  f.state = state;
  emu_fiber_switch(&f.sp, fibers->scheduler);
}

// this thread's block: none under Schedule::kWorkers, where a barrier or shuffle is a mistake
inline Block& own() {
  if (state.own == nullptr) {
    std::fprintf(stderr, "emulate.h: a barrier, shuffle or shared memory under kWorkers\n");
    std::abort();
  }
  return *state.own;
}
inline unsigned char* shared() { return own().shared.data(); }

// a static ``__shared__ T name[n]``: the block's next such array (every thread of a block
// declares them in the same order), made by the first thread to reach it, NaN patterns as above
template <typename T>
T* static_shared(size_t n) {
  Block& b = own();
  const std::lock_guard<std::mutex> hold(b.statics_lock);
  if (b.statics.size() <= state.statics) b.statics.emplace_back(n * sizeof(T), 0xFF);
  return reinterpret_cast<T*>(b.statics[state.statics++].data());
}
inline void sync_block() {
  if (state.fiber) return fiber_wait(kAtBlock);
  own().all->arrive_and_wait();
}
inline void sync_warp() {
  if (state.fiber) return fiber_wait(kAtWarp);
  own().warps[state.tid / 32]->arrive_and_wait();
}

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
// workers' plain writes to one address are a race ThreadSanitizer reports; or as fibers, the
// blocks spread over kFiberWorkers threads (see Fibers above); or, for kernels with no barrier,
// every CUDA thread in turn on the calling thread (kSerial: small grids, no thread started).
enum class Schedule { kBlocks, kGrid, kWorkers, kFibers, kSerial };
constexpr unsigned kWorkers = 8, kFiberWorkers = 4;
constexpr size_t kSharedGuard = 1024;  // kFibers: bytes past the shared memory, to stay untouched

[[noreturn]] inline void fiber_entry() {
  try {
    (*fibers->kernel)();
  } catch (...) {
    fibers->failure->record();
  }
  Fiber& f = *fibers->current;
  f.waiting = kEnded;
  emu_fiber_switch(&f.sp, fibers->scheduler);
  std::abort();  // an ended fiber is never resumed
}

// fiber stacks, kept for the next launch (taken and given back by the workers)
constexpr size_t kFiberStack = 64 * 1024;
struct Stacks {
  std::mutex lock;
  std::vector<std::unique_ptr<unsigned char[]>> all;
  std::vector<unsigned char*> free;
};
inline Stacks& stacks() {
  static Stacks s;
  return s;
}
inline unsigned char* take_stack() {
  Stacks& s = stacks();
  const std::lock_guard<std::mutex> hold(s.lock);
  if (s.free.empty()) {
    s.all.push_back(std::make_unique<unsigned char[]>(kFiberStack));
    return s.all.back().get();
  }
  unsigned char* stack = s.free.back();
  s.free.pop_back();
  return stack;
}
inline void give_stacks(const std::vector<Fiber>& threads) {
  Stacks& s = stacks();
  const std::lock_guard<std::mutex> hold(s.lock);
  for (const Fiber& f : threads) s.free.push_back(f.stack);
}

// a new fiber's stack: what emu_fiber_switch pops, with fiber_entry as the return address
inline void* fiber_start(unsigned char* stack) {
  auto top = (reinterpret_cast<uintptr_t>(stack) + kFiberStack) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;  // fiber_entry's own return address (it never returns)
  *--sp = reinterpret_cast<void*>(&fiber_entry);
  for (int r = 0; r < 6; ++r) *--sp = nullptr;  // rbp, rbx, r12-r15
  --sp;
  auto* words = reinterpret_cast<uint32_t*>(sp);
  words[0] = 0x1F80;  // MXCSR and the x87 control word as at a program's start
  words[1] = 0x037F;
  return sp;
}

// the CUDA threads of one block (states[t]: thread t's) as fibers until all have ended
inline void run_fibers(Fibers& fs, const std::vector<ThreadState>& states) {
  const size_t size = states.size();
  if (fs.threads.size() != size) {
    fs.threads.resize(size);
    for (Fiber& f : fs.threads) f.stack = take_stack();
  }
  for (size_t t = 0; t < size; ++t) {
    Fiber& f = fs.threads[t];
    f.sp = fiber_start(f.stack);
    f.state = states[t];
    f.waiting = kRunnable;
  }
  for (;;) {
    for (Fiber& f : fs.threads) {
      if (f.waiting != kRunnable) continue;
      fs.current = &f;
      state = f.state;
      emu_fiber_switch(&fs.scheduler, f.sp);
    }
    if (fs.failure->failed) return;  // the block's other threads are dropped
    // every thread now waits at a barrier or has ended: release the warps whose threads all
    // wait at __syncwarp, else the block if all its threads wait at __syncthreads
    bool released = false, ended = true, block = true;
    for (size_t w = 0; w < size; w += 32) {
      bool all = true, any = false;
      for (size_t t = w; t < w + 32; ++t) {
        all = all && (fs.threads[t].waiting == kAtWarp || fs.threads[t].waiting == kEnded);
        any = any || fs.threads[t].waiting == kAtWarp;
      }
      if (all && any) {
        for (size_t t = w; t < w + 32; ++t) {
          if (fs.threads[t].waiting == kAtWarp) fs.threads[t].waiting = kRunnable;
        }
        released = true;
      }
    }
    if (released) continue;
    for (Fiber& f : fs.threads) {
      block = block && (f.waiting == kAtBlock || f.waiting == kEnded);
      ended = ended && f.waiting == kEnded;
    }
    if (ended) return;
    if (!block) {
      std::fprintf(stderr, "emulate.h: a block's threads wait at different barriers\n");
      std::abort();
    }
    for (Fiber& f : fs.threads) {
      if (f.waiting == kAtBlock) f.waiting = kRunnable;
    }
  }
}

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
    state.statics = 0;
    state.fiber = false;
  };
  Failure failure;
  if (schedule == Schedule::kWorkers) {
    const uint64_t total = uint64_t(blocks_in_grid) * size;
    for (unsigned w = 0; w < kWorkers; ++w) {
      pool.start([&, w] {
        try {
          for (uint64_t k = w; k < total && !failure.failed; k += kWorkers) {
            const unsigned b = static_cast<unsigned>(k / size);
            const unsigned t = static_cast<unsigned>(k % size);
            enter(b % grid.x, b / grid.x, t, nullptr);  // no barriers, shuffles or shared memory
            kernel();
          }
        } catch (...) {
          failure.record();
        }
      });
    }
    pool.join();
    failure.raise();
    return;
  }
  if (schedule == Schedule::kSerial) {
    for (uint64_t k = 0; k < uint64_t(blocks_in_grid) * size; ++k) {
      enter(static_cast<unsigned>(k / size % grid.x), static_cast<unsigned>(k / size / grid.x),
            static_cast<unsigned>(k % size), nullptr);
      kernel();
    }
    state = ThreadState{};
    return;
  }
  if (schedule == Schedule::kFibers) {
    const std::function<void()> body = [&] { kernel(); };
    const unsigned workers = std::min(kFiberWorkers, blocks_in_grid);
    for (unsigned w = 0; w < workers; ++w) {
      pool.start([&, w, workers] {
        Fibers fs;
        fs.kernel = &body;
        fs.failure = &failure;
        fibers = &fs;
        Block b;
        std::vector<ThreadState> states(size);
        for (unsigned k = w; k < blocks_in_grid && !failure.failed; k += workers) {
          b.shared.assign(shared_bytes + kSharedGuard, 0xFF);
          b.exchange.assign(size, 0.0);
          b.statics.clear();
          for (unsigned t = 0; t < size; ++t) {
            enter(k % grid.x, k / grid.x, t, &b);
            state.fiber = true;
            states[t] = state;
          }
          run_fibers(fs, states);
          for (size_t i = shared_bytes; i < b.shared.size() && !failure.failed; ++i) {
            if (b.shared[i] == 0xFF) continue;
            try {
              throw DeviceAssertion("a thread wrote past its block's dynamic shared memory");
            } catch (...) {
              failure.record();
            }
          }
        }
        give_stacks(fs.threads);
        fibers = nullptr;
        state = ThreadState{};
      });
    }
    pool.join();
    failure.raise();
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
    b.statics.clear();
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
#define __launch_bounds__(...)
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
#define CUDA_KERNEL_ASSERT(cond)                                  \
  do {                                                            \
    if (!(cond)) emu::assertion_failed(#cond, __FILE__, __LINE__); \
  } while (0)

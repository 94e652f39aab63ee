// The CUDA runtime and c10 CUDA pieces that pair_ops_cuda.cu's host code (its launchers) uses,
// for its emulated build on the CPU (tests/cuda_emulation/operators.py): the tensors stay on
// the CPU, and every kernel launch, rewritten by operators.py from `kernel<<<grid, block,
// shared, stream>>>(args)` to emu::cuda_launch, runs the kernel's CUDA threads through
// emulate.h. The launchers themselves (their grids, shared memory, tensors, the order of their
// arguments) are compiled unchanged.
#pragma once

#include <torch/extension.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#define EMU_ASSERT_THROWS  // a failed device assertion: an error from the operator
#include "emulate.h"

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount, cudaDevAttrMaxSharedMemoryPerBlockOptin };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

namespace emu {
// the whole number in environment variable `name` (at least `least`), or an error that names
// the variable, its value and what it takes, where it holds anything else
inline int64_t env_number(const char* name, const char* value, int64_t least, const char* what) {
  char* end = nullptr;
  errno = 0;
  const long long n = std::strtoll(value, &end, 10);
  TORCH_CHECK(*value != '\0' && *end == '\0' && errno == 0 && n >= least, name, "='", value,
              "' is not ", what, ": unset it, or set e.g. ", name, "=", least);
  return n;
}
}  // namespace emu

// TN_EMULATED_MULTIPROCESSORS (default 132, an H100's): how many the launchers see; a block's
// shared memory by opt-in: an H100's 227 KB
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) {
    *value = 227 * 1024;
    return cudaSuccess;
  }
  const char* v = std::getenv("TN_EMULATED_MULTIPROCESSORS");
  *value = v == nullptr ? 132
                        : static_cast<int>(emu::env_number("TN_EMULATED_MULTIPROCESSORS", v, 1,
                                                           "a count of multiprocessors"));
  return cudaSuccess;
}

#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, #expr " failed")
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct CUDAStream {};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace c10::cuda

namespace emu {

// each kernel's limit of dynamic shared memory raised by cudaFuncSetAttribute (else 48 KB)
struct SharedLimits {
  std::mutex lock;
  std::map<const void*, size_t> bytes;
};
inline SharedLimits& shared_limits() {
  static SharedLimits l;
  return l;
}

inline size_t shared_limit(const void* kernel) {
  SharedLimits& l = shared_limits();
  const std::lock_guard<std::mutex> hold(l.lock);
  const auto it = l.bytes.find(kernel);
  return it == l.bytes.end() ? 48 * 1024 : it->second;
}
}  // namespace emu

template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute, int value) {
  if (value < 0 || value > 227 * 1024) return 1;  // (cudaErrorInvalidValue)
  emu::SharedLimits& l = emu::shared_limits();
  const std::lock_guard<std::mutex> hold(l.lock);
  l.bytes[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}

namespace emu {

// TN_EMULATED_GATHER_WORK, where set: the pairs x channels from which pair sums are gathered
// per atom (pair_ops_cuda.cu's kGatherWork, 2^21 on a GPU), or "random": each sum takes the
// gathered or the scattered path by a fixed pseudo-random sequence, so that the tests' small
// systems run both (and a gradient often takes the other path than its forward)
inline int64_t gather_work(int64_t on_a_gpu) {
  static std::atomic<uint64_t> calls{0};
  const char* v = std::getenv("TN_EMULATED_GATHER_WORK");
  if (v == nullptr) return on_a_gpu;
  if (std::string(v) != "random") {
    return env_number("TN_EMULATED_GATHER_WORK", v, 0,
                      "\"random\" or a whole number of pairs x channels");
  }
  uint64_t z = (calls++ + 1) * 0x9E3779B97F4A7C15ull;  // splitmix64
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return (z ^ (z >> 31)) & 1 ? 0 : std::numeric_limits<int64_t>::max();
}

// the launches so far, by kernel: "name count" lines (tn_emulated_launches, for the tests)
struct Launches {
  std::mutex lock;
  std::map<std::string, int64_t> counts;
  std::string report;
};
inline Launches& launches() {
  static Launches l;
  return l;
}
inline const char* launch_report() {
  Launches& l = launches();
  const std::lock_guard<std::mutex> hold(l.lock);
  std::ostringstream out;
  for (const auto& [name, count] : l.counts) out << name << ' ' << count << '\n';
  l.report = out.str();
  return l.report.c_str();
}

// a launch: the arguments converted to the kernel's parameters once, as CUDA does, then the
// kernel run by every CUDA thread of the grid; kernels with barriers, shuffles or shared memory
// (``barriers``, found by operators.py) as fibers, block by block, the others in turn on this
// thread (small grids) or spread over a few workers
template <typename... P, typename... A>
void cuda_launch(void (*kernel)(P...), const char* name, bool barriers, dim3 grid, dim3 block, size_t shared,
                 c10::cuda::CUDAStream, A&&... args) {
  TORCH_CHECK(grid.z == 1 && block.z == 1, "emulated launches: two-dimensional grids and blocks");
  TORCH_CHECK(grid.x > 0 && grid.y > 0 && block.x * block.y > 0,
              "an empty launch (CUDA's invalid configuration)");
  TORCH_CHECK(block.x * block.y <= 1024, "more than 1024 threads a block");
  TORCH_CHECK((block.x * block.y) % 32 == 0, "emulated blocks are whole warps");
  TORCH_CHECK(shared <= shared_limit(reinterpret_cast<const void*>(kernel)),
              "more dynamic shared memory than the kernel's limit (48 KB unless "
              "cudaFuncSetAttribute raised it): a GPU refuses the launch");
  {
    const std::lock_guard<std::mutex> hold(launches().lock);
    ++launches().counts[name];
  }
  std::tuple<std::decay_t<P>...> values(std::forward<A>(args)...);
  const uint64_t threads = uint64_t(grid.x) * grid.y * block.x * block.y;
  const Schedule schedule = barriers              ? Schedule::kFibers
                            : threads <= 1u << 16 ? Schedule::kSerial
                                                  : Schedule::kWorkers;
  launch(Dim3{grid.x, grid.y, 1}, Dim3{block.x, block.y, 1}, shared,
         [&] { std::apply(kernel, values); }, schedule);
}

}  // namespace emu

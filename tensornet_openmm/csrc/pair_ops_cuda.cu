// CUDA kernels of the fused operators (pair_ops.cpp has the CPU ones and the autograd
// functions, which call these for CUDA tensors).
//
// On a GPU a force call is a sequence of kernels (replayed from a CUDA graph in OpenMM), and its
// time is roughly their number times a few microseconds for small molecules and their memory
// traffic for large systems. In PyTorch every message sum is a gather, a product and a scatter,
// each writing a (pairs, 10, channels) tensor; every 3x3 product is an unpacking, a batched
// matrix product and a decomposition. Here each is one kernel (two for the embedding's backward),
// reading the per-atom rows and writing only the result.
//
// Layouts as on the CPU: packed per-atom tensors (atoms, 10, channels), filters (pairs, 3,
// channels), pair indices int64. Threads run over (pair, channel) or (atom, channel), channels
// fastest, so that neighbouring threads touch neighbouring memory. Sums onto atoms use atomic
// adds (the order of the additions, and so the last bits of a result, can differ between runs),
// except the message and embedding sums of long pair lists, gathered per atom in a fixed order.
// Kernels run on the current stream and never synchronise with the host (CUDA-graph capture).
// Pair indices are not range-checked on the host (that would synchronise): a device assertion
// stops the kernel at an index outside [0, atoms).

#include <cuda_runtime.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <tuple>
#include <vector>

#include "packed_math.h"

namespace tn_cuda {
namespace {

// ---- emulated on the CPU by tests/test_cuda_emulation.py: from here ----
constexpr int kComps = 10;
constexpr int kParts = 3;
constexpr int kThreads = 256;

__device__ __forceinline__ int group_of(int c) { return c == 0 ? 0 : (c < 4 ? 1 : 2); }
template <typename T>
__device__ __forceinline__ T reversed_sign(int c) {
  return (c >= 1 && c <= 3) ? T(-1) : T(1);
}

int blocks_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 1 ? 1 : blocks);
}

__device__ __forceinline__ void check_pair(int64_t i, int64_t j, int64_t atoms) {
  CUDA_KERNEL_ASSERT(i >= 0 && i < atoms && j >= 0 && j < atoms);
}

// Consecutive pairs per thread in the pair sums. The pairs come sorted by their first atom (the
// searches' order: atoms in turn), so a thread sums a run's terms for that atom in registers and
// adds them to memory once per atom, instead of one atomic add per pair and component; the second
// atoms' terms still go one by one. Runs are long only where the sums still get some 2^18
// threads (a GPU's worth): a small molecule's sums are latency-bound, one pair a thread.
int run_length(int64_t pairs, int64_t f_len) {
  const int64_t run = (pairs * f_len) >> 18;
  return static_cast<int>(run < 1 ? 1 : (run > 8 ? 8 : run));
}

// the threads of the pair sums: one per run of ``run`` pairs and channel
__host__ __device__ __forceinline__ int64_t run_threads(int64_t pairs, int64_t f_len, int run) {
  return (pairs + run - 1) / run * f_len;
}

// this thread's run of pairs [first, last) and its channel f; false past the last run
struct PairRun {
  int64_t first, last, f;
};
__device__ __forceinline__ bool pair_run(int64_t pairs, int64_t f_len, int run, PairRun& r) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= run_threads(pairs, f_len, run)) return false;
  const int64_t q = t / f_len;
  r.f = t - q * f_len;
  r.first = q * run;
  r.last = r.first + run < pairs ? r.first + run : pairs;
  return true;
}

// out[atom, c, f] += sum[c] (atomically; nothing for atom -1, no run's atom yet), and sum zeroed
template <typename T>
__device__ __forceinline__ void add_run_sums(T* out, int64_t atom, int64_t f, int64_t f_len,
                                             T (&sum)[kComps]) {
#pragma unroll
  for (int c = 0; c < kComps; ++c) {
    if (atom >= 0) atomicAdd(out + (atom * kComps + c) * f_len + f, sum[c]);
    sum[c] = T(0);
  }
}

// out[i, c] += filt[p, GROUP[c]] * y[j, c] (and out[j, c] += ... * y[i, c] when half), a run of
// pairs per thread (run_length)
template <typename T>
__global__ void messages_kernel(const T* __restrict__ y, const T* __restrict__ filt,
                                const int64_t* __restrict__ src, const int64_t* __restrict__ dst,
                                T* __restrict__ out, int64_t pairs, int64_t f_len, int64_t atoms,
                                bool half, int run) {
  PairRun r;
  if (!pair_run(pairs, f_len, run, r)) return;
  const int64_t f = r.f;
  T sum[kComps], y_i[kComps];
  int64_t at = -1;  // the atom whose terms ``sum`` holds
  for (int64_t p = r.first; p < r.last; ++p) {
    const int64_t i = src[p], j = dst[p];
    check_pair(i, j, atoms);
    if (i != at) {
      add_run_sums(out, at, f, f_len, sum);
#pragma unroll
      for (int c = 0; c < kComps; ++c) y_i[c] = half ? y[(i * kComps + c) * f_len + f] : T(0);
      at = i;
    }
    const T w[kParts] = {filt[(p * kParts) * f_len + f], filt[(p * kParts + 1) * f_len + f],
                         filt[(p * kParts + 2) * f_len + f]};
#pragma unroll
    for (int c = 0; c < kComps; ++c) {
      const T wc = w[group_of(c)];
      sum[c] += wc * y[(j * kComps + c) * f_len + f];
      if (half) atomicAdd(out + (j * kComps + c) * f_len + f, wc * y_i[c]);
    }
  }
  add_run_sums(out, at, f, f_len, sum);
}

// out[n, c] = self_filt[GROUP[c]] * y[n, c]: the self pair's messages, which the pair sums start
// from (one thread per atom, component and channel)
template <typename T>
__global__ void self_messages_kernel(const T* __restrict__ y, const T* __restrict__ self_filt,
                                     T* __restrict__ out, int64_t atoms, int64_t f_len) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= atoms * kComps * f_len) return;
  const int64_t row = t / f_len, f = t - row * f_len;
  const int c = static_cast<int>(row % kComps);
  out[t] = self_filt[group_of(c) * f_len + f] * y[t];
}

// grad_filt[p, g] = sum over c in part g of grad[i, c] * y[j, c] (+ grad[j, c] * y[i, c]), a
// run of pairs per thread (run_length): the first atom's rows read once per run
template <typename T>
__global__ void filter_grad_kernel(const T* __restrict__ grad, const T* __restrict__ y,
                                   const int64_t* __restrict__ src,
                                   const int64_t* __restrict__ dst, T* __restrict__ out,
                                   int64_t pairs, int64_t f_len, int64_t atoms, bool half,
                                   int run) {
  PairRun r;
  if (!pair_run(pairs, f_len, run, r)) return;
  const int64_t f = r.f;
  T g_i[kComps], y_i[kComps];
  int64_t at = -1;  // the atom whose rows g_i and y_i hold
  for (int64_t p = r.first; p < r.last; ++p) {
    const int64_t i = src[p], j = dst[p];
    check_pair(i, j, atoms);
    if (i != at) {
#pragma unroll
      for (int c = 0; c < kComps; ++c) {
        g_i[c] = grad[(i * kComps + c) * f_len + f];
        if (half) y_i[c] = y[(i * kComps + c) * f_len + f];
      }
      at = i;
    }
    T acc[kParts] = {T(0), T(0), T(0)};
#pragma unroll
    for (int c = 0; c < kComps; ++c) {
      T v = g_i[c] * y[(j * kComps + c) * f_len + f];
      if (half) v += grad[(j * kComps + c) * f_len + f] * y_i[c];
      acc[group_of(c)] += v;
    }
    for (int g = 0; g < kParts; ++g) out[(p * kParts + g) * f_len + f] = acc[g];
  }
}

// out[i, c] += radial[p, GROUP[c]] * (z_recv[i] + z_send[j]) * geom[p, c], and when half
// out[j, c] += radial[p, GROUP[c]] * (z_recv[j] + z_send[i]) * SIGN[c] * geom[p, c]; a run of
// pairs per thread, as messages_kernel
template <typename T>
__global__ void embedding_kernel(const T* __restrict__ radial, const T* __restrict__ z_recv,
                                 const T* __restrict__ z_send, const T* __restrict__ geom,
                                 const int64_t* __restrict__ src, const int64_t* __restrict__ dst,
                                 T* __restrict__ out, int64_t pairs, int64_t f_len, int64_t atoms,
                                 bool half, int run) {
  PairRun r;
  if (!pair_run(pairs, f_len, run, r)) return;
  const int64_t f = r.f;
  T sum[kComps];
  T recv_i = T(0), send_i = T(0);
  int64_t at = -1;  // the atom whose terms ``sum`` holds
  for (int64_t p = r.first; p < r.last; ++p) {
    const int64_t i = src[p], j = dst[p];
    check_pair(i, j, atoms);
    if (i != at) {
      add_run_sums(out, at, f, f_len, sum);
      at = i;
      recv_i = z_recv[i * f_len + f];
      send_i = z_send[i * f_len + f];
    }
    const T r[kParts] = {radial[(p * kParts) * f_len + f], radial[(p * kParts + 1) * f_len + f],
                         radial[(p * kParts + 2) * f_len + f]};
    const T s_ij = recv_i + z_send[j * f_len + f];
#pragma unroll
    for (int c = 0; c < kComps; ++c) sum[c] += geom[p * kComps + c] * r[group_of(c)] * s_ij;
    if (half) {
      const T s_ji = z_recv[j * f_len + f] + send_i;
#pragma unroll
      for (int c = 0; c < kComps; ++c) {
        const T a = reversed_sign<T>(c) * geom[p * kComps + c];
        atomicAdd(out + (j * kComps + c) * f_len + f, a * r[group_of(c)] * s_ji);
      }
    }
  }
  add_run_sums(out, at, f, f_len, sum);
}

// ---- Pair sums gathered per atom (no atomic adds), for long pair lists ----------------------
// Above kGatherWork pairs x channels (and at least as many pairs as atoms) the sums onto atoms
// are gathered instead of scattered: each (atom, channel) thread runs over the atom's
// incidences, the pair slots that add onto it, in a fixed order, and writes its sums once.
// Incidence e < pairs: pair e seen from its first atom (the other atom its second); e >= pairs
// (half lists): pair e - pairs seen from its second atom, the pair reversed. ``order`` lists the
// incidences grouped by the atom they add onto, in their own order (as a stable sort of
// [src, dst] would), ``starts`` (atoms + 1) bounds each atom's group. No atomic adds: the same
// bits on every run, and the scattered kernels' atomic traffic (one per pair, component and
// channel on the second atom's side) becomes reads of rows the L2 cache holds.
constexpr int64_t kGatherWork = int64_t(1) << 21;

// the atom incidence e adds onto
__device__ __forceinline__ int64_t incidence_atom(int64_t e, const int64_t* __restrict__ src,
                                                  const int64_t* __restrict__ dst,
                                                  int64_t pairs) {
  return e < pairs ? src[e] : dst[e - pairs];
}

__device__ __forceinline__ int64_t add_index(int64_t* address, int64_t value) {
  return static_cast<int64_t>(atomicAdd(reinterpret_cast<unsigned long long*>(address),
                                        static_cast<unsigned long long>(value)));
}

// The incidences grouped by atom in three kernels and a prefix sum (no sort, nothing that a CUDA
// graph cannot capture): count each atom's (into counts[atom + 1], zeroed), the counts' inclusive
// sums (starts), each incidence into its atom's group at a slot taken atomically (scratch, at
// cursor: a copy of starts), then each incidence moved to its rank within its group (order), so
// that the order is the incidences' own, the same on every run.
__global__ void incidence_count_kernel(const int64_t* __restrict__ src,
                                       const int64_t* __restrict__ dst, int64_t pairs,
                                       int64_t count, int64_t atoms,
                                       int64_t* __restrict__ counts) {
  const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (e >= count) return;
  const int64_t n = incidence_atom(e, src, dst, pairs);
  CUDA_KERNEL_ASSERT(n >= 0 && n < atoms);
  add_index(counts + n + 1, 1);
}

__global__ void incidence_fill_kernel(const int64_t* __restrict__ src,
                                      const int64_t* __restrict__ dst, int64_t pairs,
                                      int64_t count, int64_t* __restrict__ cursor,
                                      int64_t* __restrict__ order) {
  const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (e >= count) return;
  order[add_index(cursor + incidence_atom(e, src, dst, pairs), 1)] = e;
}

// One thread per incidence: its rank among its group's (the entries are distinct, so the ranks
// are a permutation of the group's slots) places it where a stable sort by atom would. A group of
// k entries costs k reads a thread, read alike by the group's neighbouring threads; the insertion
// sort by one thread per atom this replaces took some k * k / 4 dependent moves in a row.
__global__ void incidence_rank_kernel(const int64_t* __restrict__ src,
                                      const int64_t* __restrict__ dst, int64_t pairs,
                                      int64_t count, const int64_t* __restrict__ starts,
                                      const int64_t* __restrict__ scratch,
                                      int64_t* __restrict__ order) {
  const int64_t a = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (a >= count) return;
  const int64_t e = scratch[a];
  const int64_t n = incidence_atom(e, src, dst, pairs);
  const int64_t begin = starts[n], end = starts[n + 1];
  int64_t rank = 0;
  for (int64_t b = begin; b < end; ++b) rank += scratch[b] < e;
  order[begin + rank] = e;
}

// a gather's pair list (src, dst), its incidences (order, starts) and sizes
struct GatherList {
  const int64_t* src = nullptr;
  const int64_t* dst = nullptr;
  const int64_t* order = nullptr;
  const int64_t* starts = nullptr;
  int64_t pairs = 0, f_len = 0, atoms = 0;
};

// this thread's atom n and channel f (false past the last)
__device__ __forceinline__ bool atom_channel(const GatherList& g, int64_t& n, int64_t& f) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= g.atoms * g.f_len) return false;
  n = t / g.f_len;
  f = t - n * g.f_len;
  return true;
}

// the incidence at q of an atom's group: its pair, the atom it adds onto's partner, and whether
// it is reversed
struct Incident {
  int64_t pair, other;
  bool reversed;
};
__device__ __forceinline__ Incident incident(const GatherList& g, int64_t q) {
  const int64_t e = g.order[q];
  const bool reversed = e >= g.pairs;
  const int64_t p = reversed ? e - g.pairs : e;
  const int64_t i = g.src[p], j = g.dst[p];
  check_pair(i, j, g.atoms);
  return {p, reversed ? i : j, reversed};
}

// out[n, c] += sum over n's incidences of filt[p, GROUP[c]] * y[other, c] (messages_kernel's
// sums), one thread per atom and channel
template <typename T>
__global__ void messages_gather_kernel(const T* __restrict__ y, const T* __restrict__ filt,
                                       GatherList g, T* __restrict__ out) {
  int64_t n, f;
  if (!atom_channel(g, n, f)) return;
  const int64_t f_len = g.f_len;
  T sum[kComps];
#pragma unroll
  for (int c = 0; c < kComps; ++c) sum[c] = T(0);
  for (int64_t q = g.starts[n]; q < g.starts[n + 1]; ++q) {
    const Incident e = incident(g, q);
    const T w[kParts] = {filt[(e.pair * kParts) * f_len + f],
                         filt[(e.pair * kParts + 1) * f_len + f],
                         filt[(e.pair * kParts + 2) * f_len + f]};
#pragma unroll
    for (int c = 0; c < kComps; ++c) {
      sum[c] += w[group_of(c)] * y[(e.other * kComps + c) * f_len + f];
    }
  }
#pragma unroll
  for (int c = 0; c < kComps; ++c) out[(n * kComps + c) * f_len + f] += sum[c];
}

// out[n, c] += sum over n's incidences of radial[p, GROUP[c]] (z_recv[n] + z_send[other])
// geom[p, c], times SIGN[c] for a reversed pair (embedding_kernel's sums), one thread per atom
// and channel
template <typename T>
__global__ void embedding_gather_kernel(const T* __restrict__ radial, const T* __restrict__ z_recv,
                                        const T* __restrict__ z_send, const T* __restrict__ geom,
                                        GatherList g, T* __restrict__ out) {
  int64_t n, f;
  if (!atom_channel(g, n, f)) return;
  const int64_t f_len = g.f_len;
  const T recv = z_recv[n * f_len + f];
  T sum[kComps];
#pragma unroll
  for (int c = 0; c < kComps; ++c) sum[c] = T(0);
  for (int64_t q = g.starts[n]; q < g.starts[n + 1]; ++q) {
    const Incident e = incident(g, q);
    const T s = recv + z_send[e.other * f_len + f];
    const T r[kParts] = {radial[(e.pair * kParts) * f_len + f] * s,
                         radial[(e.pair * kParts + 1) * f_len + f] * s,
                         radial[(e.pair * kParts + 2) * f_len + f] * s};
#pragma unroll
    for (int c = 0; c < kComps; ++c) {
      const T a = e.reversed ? reversed_sign<T>(c) * geom[e.pair * kComps + c]
                             : geom[e.pair * kComps + c];
      sum[c] += a * r[group_of(c)];
    }
  }
#pragma unroll
  for (int c = 0; c < kComps; ++c) out[(n * kComps + c) * f_len + f] += sum[c];
}

// The species terms' gradients of a half list's embedding sums (embedding_grads_kernel's
// atomic adds onto g_recv and g_send), gathered: with t_ij = sum_c geom[p, c] radial[p,
// GROUP[c]] grad[i, c] and t_ji the same with SIGN[c] and grad[j, c], a pair adds t_ij to
// g_recv[i] and g_send[j], t_ji to g_recv[j] and g_send[i]; so an atom's g_recv sums the terms
// of its own rows over its incidences (signed where it is the second atom) and its g_send the
// partner's (signed where it is the first). One thread per atom and channel, written once.
template <typename T>
__global__ void embedding_species_gather_kernel(const T* __restrict__ grad,
                                                const T* __restrict__ radial,
                                                const T* __restrict__ geom, GatherList g,
                                                T* __restrict__ g_recv, T* __restrict__ g_send) {
  int64_t n, f;
  if (!atom_channel(g, n, f)) return;
  const int64_t f_len = g.f_len;
  T own_rows[kComps];
#pragma unroll
  for (int c = 0; c < kComps; ++c) own_rows[c] = grad[(n * kComps + c) * f_len + f];
  T recv = T(0), send = T(0);
  for (int64_t q = g.starts[n]; q < g.starts[n + 1]; ++q) {
    const Incident e = incident(g, q);
    const T r[kParts] = {radial[(e.pair * kParts) * f_len + f],
                         radial[(e.pair * kParts + 1) * f_len + f],
                         radial[(e.pair * kParts + 2) * f_len + f]};
    T own = T(0), partner = T(0);
#pragma unroll
    for (int c = 0; c < kComps; ++c) {
      const T w = geom[e.pair * kComps + c] * r[group_of(c)];
      const T sign = reversed_sign<T>(c);
      own += (e.reversed ? sign * w : w) * own_rows[c];
      partner += (e.reversed ? w : sign * w) * grad[(e.other * kComps + c) * f_len + f];
    }
    recv += own;
    send += partner;
  }
  g_recv[n * f_len + f] = recv;
  g_send[n * f_len + f] = send;
}

// The embedding's backward per pair and channel: with h_ij[c] = grad[i, c] s_ij and
// h_ji[c] = SIGN[c] grad[j, c] s_ji, grad_radial[p, g] = sum_{c in g} geom[p, c] (h_ij[c] +
// h_ji[c]); each side adds t = sum_c a_c radial[p, GROUP[c]] grad[to, c] to z_recv's gradient at
// its receiver and z_send's at its sender; and grad_geom[p, c] = sum over channels of
// radial[p, GROUP[c]] (h_ij[c] + h_ji[c]), summed in the block (one block row per pair,
// blockDim.x threads over its channels). Any output may be null.
template <typename T>
__global__ void embedding_grads_kernel(const T* __restrict__ grad, const T* __restrict__ radial,
                                       const T* __restrict__ z_recv, const T* __restrict__ z_send,
                                       const T* __restrict__ geom,
                                       const int64_t* __restrict__ src,
                                       const int64_t* __restrict__ dst, T* __restrict__ g_radial,
                                       T* __restrict__ g_recv, T* __restrict__ g_send,
                                       T* __restrict__ g_geom, int64_t pairs, int64_t f_len,
                                       int64_t atoms, bool half) {
  extern __shared__ unsigned char shared_bytes[];
  T* dots = reinterpret_cast<T*>(shared_bytes);  // (blockDim.y, kComps)
  const int64_t p = blockIdx.x * int64_t(blockDim.y) + threadIdx.y;
  const bool active = p < pairs;
  T dot[kComps];
  for (int c = 0; c < kComps; ++c) dot[c] = T(0);
  if (active) {
    const int64_t i = src[p], j = dst[p];
    check_pair(i, j, atoms);
    for (int64_t f = threadIdx.x; f < f_len; f += blockDim.x) {
      const T r[kParts] = {radial[(p * kParts) * f_len + f],
                           radial[(p * kParts + 1) * f_len + f],
                           radial[(p * kParts + 2) * f_len + f]};
      const T s_ij = z_recv[i * f_len + f] + z_send[j * f_len + f];
      const T s_ji = half ? z_recv[j * f_len + f] + z_send[i * f_len + f] : T(0);
      T acc[kParts] = {T(0), T(0), T(0)};
      T t_ij = 0, t_ji = 0;
      for (int c = 0; c < kComps; ++c) {
        const int g = group_of(c);
        const T a = geom[p * kComps + c], g_i = grad[(i * kComps + c) * f_len + f];
        T h = g_i * s_ij;
        t_ij += a * r[g] * g_i;
        if (half) {
          const T sign = reversed_sign<T>(c), g_j = grad[(j * kComps + c) * f_len + f];
          h += sign * g_j * s_ji;
          t_ji += sign * a * r[g] * g_j;
        }
        acc[g] += a * h;
        dot[c] += r[g] * h;
      }
      if (g_radial != nullptr) {
        for (int g = 0; g < kParts; ++g) g_radial[(p * kParts + g) * f_len + f] = acc[g];
      }
      if (g_recv != nullptr) {
        atomicAdd(g_recv + i * f_len + f, t_ij);
        atomicAdd(g_send + j * f_len + f, t_ij);
        if (half) {
          atomicAdd(g_recv + j * f_len + f, t_ji);
          atomicAdd(g_send + i * f_len + f, t_ji);
        }
      }
    }
  }
  if (g_geom == nullptr) return;
  // sum each dot over the block row's threads: within warps, then across them
  for (int c = 0; c < kComps; ++c) {
    T v = dot[c];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    dot[c] = v;
  }
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
  T* row = dots + threadIdx.y * kComps;
  if (threadIdx.x < kComps) row[threadIdx.x] = T(0);
  __syncthreads();
  if (lane == 0 && warps > 1) {
    for (int c = 0; c < kComps; ++c) atomicAdd(row + c, dot[c]);
  }
  __syncthreads();
  if (active && threadIdx.x == 0) {
    for (int c = 0; c < kComps; ++c) g_geom[p * kComps + c] = warps > 1 ? row[c] : dot[c];
  }
}

// ---- Per atom and channel steps (packed_math.h's cores), one thread per atom and channel ----
enum class AtomStep {
  kProduct,              // u = packed(A B) (+ B A when flag); a, b
  kProductGrad,          // u, v = gradients to a, b (either null: not wanted); a = grad, b, c
  kNormalize,            // u = a / (|a|^2 + 1)
  kNormalizeGrad,        // u = gradient to p; a = grad, b = p
  kProductNormalize,     // u = normalize(packed(A B) q); a, b, q
  kProductNormalizeGrad, // u, v = gradients to a, b; a = grad, b, c = the product's a, b; q
  kSquareAdd,            // u = a + b + packed(B B) q
  kSquareAddGrad,        // u = gradient to d; a = grad, b = d; q
  kEmbeddingPrepare,     // u = X, row_out = |X|^2; a = the pair sums, row_in = self terms
  kEmbeddingPrepareGrad  // u = gradient to the sums; a = X, b = grad of X, row_in = of |X|^2
};

// A step's tensors: packed (atoms, 10, F) inputs a, b, c and outputs u, v, per-atom factors q,
// and (atoms, F) rows in and out; null where a step has none (an input: zero; an output: not
// written)
template <typename T>
struct AtomArgs {
  const T* a = nullptr;
  const T* b = nullptr;
  const T* c = nullptr;
  const T* q = nullptr;
  const T* row_in = nullptr;
  T* u = nullptr;
  T* v = nullptr;
  T* row_out = nullptr;
  int64_t atoms = 0, f_len = 0;
  bool flag = false;  // the products' ``symmetric``
};

template <typename T, AtomStep S>
__global__ void atom_step_kernel(AtomArgs<T> g) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= g.atoms * g.f_len) return;
  const int64_t n = t / g.f_len, base = n * kComps * g.f_len + (t - n * g.f_len);
  T pa[kComps] = {}, pb[kComps] = {}, pc[kComps] = {}, pu[kComps], pv[kComps];
  if (g.a != nullptr) tn_math::load(g.a + base, g.f_len, pa);
  if (g.b != nullptr) tn_math::load(g.b + base, g.f_len, pb);
  if (g.c != nullptr) tn_math::load(g.c + base, g.f_len, pc);
  const bool scaled = g.q != nullptr;
  const T q = scaled ? g.q[n] : T(1);
  const T row = g.row_in != nullptr ? g.row_in[t] : T(0);
  T* want_u = g.u != nullptr ? pu : nullptr;
  T* want_v = g.v != nullptr ? pv : nullptr;
  if constexpr (S == AtomStep::kProduct) {
    tn_math::product_values(pa, pb, pu, g.flag);
  } else if constexpr (S == AtomStep::kProductGrad) {
    tn_math::product_grad_values(pa, pb, pc, want_u, want_v, g.flag);
  } else if constexpr (S == AtomStep::kNormalize) {
    tn_math::normalize_values(pa, pu);
  } else if constexpr (S == AtomStep::kNormalizeGrad) {
    tn_math::normalize_grad_values(pa, pb, pu);
  } else if constexpr (S == AtomStep::kProductNormalize) {
    tn_math::product_normalize_values(pa, pb, pu, g.flag, scaled, q);
  } else if constexpr (S == AtomStep::kProductNormalizeGrad) {
    tn_math::product_normalize_grad_values(pa, pb, pc, want_u, want_v, g.flag, scaled, q);
  } else if constexpr (S == AtomStep::kSquareAdd) {
    tn_math::square_add_values(pa, pb, pu, scaled, q);
  } else if constexpr (S == AtomStep::kSquareAddGrad) {
    tn_math::square_add_grad_values(pa, pb, pu, scaled, q);
  } else if constexpr (S == AtomStep::kEmbeddingPrepare) {
    T norm;
    tn_math::embedding_prepare_values(pa, row, pu, norm);
    g.row_out[t] = norm;
  } else {
    tn_math::embedding_prepare_grad_values(pb, row, pa, pu);
  }
  if (g.u != nullptr) tn_math::store(pu, g.u + base, g.f_len);
  if (g.v != nullptr) tn_math::store(pv, g.v + base, g.f_len);
}

// the output head's features (tn_math::part_norms_values) and their gradient, one thread per
// atom and channel: p (atoms, 10, F), out and grad (atoms, 3, F)
template <typename T>
__global__ void part_norms_kernel(const T* __restrict__ p, T* __restrict__ out, int64_t atoms,
                                  int64_t f_len) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= atoms * f_len) return;
  const int64_t n = t / f_len, f = t - n * f_len;
  T v[kComps], o[kParts];
  tn_math::load(p + n * kComps * f_len + f, f_len, v);
  tn_math::part_norms_values(v, o);
  for (int k = 0; k < kParts; ++k) out[(n * kParts + k) * f_len + f] = o[k];
}

template <typename T>
__global__ void part_norms_grad_kernel(const T* __restrict__ grad, const T* __restrict__ p,
                                       T* __restrict__ g_p, int64_t atoms, int64_t f_len) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= atoms * f_len) return;
  const int64_t n = t / f_len, f = t - n * f_len;
  T g[kParts], v[kComps], o[kComps];
  for (int k = 0; k < kParts; ++k) g[k] = grad[(n * kParts + k) * f_len + f];
  tn_math::load(p + n * kComps * f_len + f, f_len, v);
  tn_math::part_norms_grad_values(g, v, o);
  tn_math::store(o, g_p + n * kComps * f_len + f, f_len);
}

// ---- A scaled network's last layer, act(z) * scale (pair_ops.cpp's mlp) -------------------------
constexpr int kSiLU = 0, kTanh = 1;  // pair_ops.cpp's activation codes (2: none)

template <typename T>
__device__ __forceinline__ T activated(int activation, T z) {
  if (activation == kSiLU) return z / (T(1) + exp(-z));
  if (activation == kTanh) return tanh(z);
  return z;
}

template <typename T>
__device__ __forceinline__ T activation_slope(int activation, T z) {
  if (activation == kSiLU) {
    const T s = T(1) / (T(1) + exp(-z));
    return s * (T(1) + z * (T(1) - s));
  }
  if (activation == kTanh) {
    const T t = tanh(z);
    return T(1) - t * t;
  }
  return T(1);
}


// out[r, f] = act(z[r, f]) scale[r], one thread per value (z's rows ld_z apart)
template <typename T>
__global__ void activate_scaled_kernel(int activation, const T* __restrict__ z, int64_t ld_z,
                                       const T* __restrict__ scale, T* __restrict__ out,
                                       int64_t rows, int64_t width) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= rows * width) return;
  const int64_t r = t / width;
  out[t] = activated(activation, z[r * ld_z + (t - r * width)]) * scale[r];
}

// d[r, f] = act'(z[r, f]) g[r, f] scale[r] and g_scale[r] = sum_f g[r, f] act(z[r, f]) (if
// wanted): one warp per row
// (z's rows ld_z apart, d's ld_d apart)
template <typename T>
__global__ void activate_scaled_grad_kernel(int activation, const T* __restrict__ g,
                                            const T* __restrict__ z, int64_t ld_z,
                                            const T* __restrict__ scale, T* __restrict__ d,
                                            int64_t ld_d, T* __restrict__ g_scale, int64_t rows,
                                            int64_t width) {
  const int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // the whole warp: the shuffles below see all its lanes
  const T s = scale[row];
  T sum = T(0);
  for (int64_t f = lane; f < width; f += 32) {
    const int64_t k = row * width + f;
    const T zk = z[row * ld_z + f];
    d[row * ld_d + f] = activation_slope(activation, zk) * g[k] * s;
    sum += g[k] * activated(activation, zk);
  }
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
  if (lane == 0 && g_scale != nullptr) g_scale[row] = sum;
}

// ---- A small network in one kernel each way (pair_ops.cpp's mlp and radial_networks) --------
// For a few rows (a small molecule's atoms and pairs) a network is latency-bound: cuBLAS's
// products (often with a split-K reduction, an epilogue or a scaling of their own), one
// activation kernel per layer and the gradients' products each cost a launch of a few
// microseconds for a few microseconds of arithmetic. Here a block takes R rows through every
// layer with the activations in shared memory: the first layer (the ``proj`` projection
// columns, unactivated and scaled, then each network's share), then each network's further
// layers, the last activated and times the scale. The backward kernel takes the same rows back
// through every network to the input, recomputing the activations from the saved
// pre-activations. Above kNetworkRows rows cuBLAS is faster and the ATen path runs.
constexpr int kNetLayers = tn_math::kNetLayers;  // further layers of all networks, at most
constexpr size_t kNetworkShared = 48 * 1024;  // bytes of shared memory a block may take
// Threads of a backward block. Its layers are latency-bound: a thread sums its input's terms
// over the layer's outputs one after another, each a read of the weights from L2, so a block of
// kThreads takes 384 reads in turn for a 256 -> 384 layer; a block of 1024 splits the outputs
// between four groups of threads (dense_backward) and waits a quarter as long, with four times
// the warps to overlap. The kernel is compiled for it (__launch_bounds__: at most 64 registers
// a thread); TENSORNET_OPENMM_NETWORK_BACKWARD_THREADS=256 or 512 launches fewer.
constexpr int kNetBackwardThreads = 1024;

template <typename T>
struct NetArgs {
  const T* x = nullptr;      // (rows, k) input
  const T* scale = nullptr;  // (rows) or null: no scale
  int64_t rows = 0, k = 0;
  const T* w0 = nullptr;     // first layer (t0, k), bias (t0)
  const T* b0 = nullptr;
  T* z0 = nullptr;           // its pre-activations (rows, t0)
  int64_t t0 = 0, proj = 0, first = 0;  // first: each network's share of the first layer
  int networks = 0, depth = 0, activation = 0, chunks = 1;
  int last_activation = 0;      // after each network's last layer (mlp: none, for the head)
  const T* w[kNetLayers] = {};  // network n's layer l: index n * depth + l, (width, its input)
  const T* b[kNetLayers] = {};
  T* z[kNetLayers] = {};        // pre-activations (rows, width)
  int64_t width[kNetLayers] = {};
  T* out_proj = nullptr;        // (rows, proj)
  T* out[kNetLayers] = {};      // network n's output (rows, its last width)
  const T* g_proj = nullptr;    // the backward's output gradients (null: zero), their rows
  const T* g_out[kNetLayers] = {};  // ld_g apart (0: one row for all, an energy sum's)
  int64_t ld_g_proj = 0;
  int64_t ld_g[kNetLayers] = {};
  const T* tx = nullptr;        // the tangent forward's (TAN): d x / dr (rows, k), d scale / dr
  const T* tscale = nullptr;    // (rows), and the outputs' derivatives, rows ld_t apart
  T* t_proj = nullptr;
  T* t_out[kNetLayers] = {};
  int64_t ld_t = 0;
  T* g_x = nullptr;             // gradients wanted (null: not)
  T* g_scale = nullptr;
  int64_t mid = 0;     // the widest hidden (not last) further layer
  int64_t widest = 0;  // the widest further layer
};

// the networks' shape, as the kernels read it (weights: network n's layer l at n * depth + l)
struct NetShape {
  int64_t rows, k, t0, proj, first, networks, depth, mid, widest, last;
};

// the bytes of a weight row a warp stages at a time in the forward (see dense_forward); 64 by
// TENSORNET_OPENMM_NETWORK_TILE_BYTES=64 (session 19's)
constexpr size_t kTileRowBytes = 128;

// the bytes of shared memory a block of r rows takes (elements of ``bytes`` each), as the
// kernels below lay it out, forward and backward
size_t forward_shared(const NetShape& s, int r, size_t bytes, size_t tile_bytes) {
  const int warps = kThreads / 32, kt = static_cast<int>(tile_bytes / bytes);
  return bytes * (r * (s.k + s.first + 2 * s.mid) + warps * kt * 33);
}

size_t backward_shared(const NetShape& s, int r, size_t bytes, int threads) {
  return bytes * (r * (s.t0 + 2 * s.widest + threads + threads / 32));
}

// the forward's blocks of last-layer outputs per network (blockDim.x = kThreads each)
int64_t forward_chunks(const NetShape& s) { return (s.last + kThreads - 1) / kThreads; }

// acc[r] = b[o] + sum_k w[o, k] h[r, k] for the block's R rows and outputs o in [o_begin,
// o_end), a warp per 32 outputs; epilogue(o, acc) for each. Warp-synchronous only.
// Each warp stages 32 weight rows by KT columns in shared memory, transposed (a column's 32 rows
// 33 entries apart, against bank conflicts): the weight's rows read in pieces by neighbouring
// lanes, then each lane runs its output's sum down its row of the tile. A layer is a chain of
// such stages, each waiting for its reads from L2, so the wider a stage the shorter the chain:
// KT of 128 bytes of a row (float: 32 columns; 64 bytes until session 29), a warp's tile 4.2 KB
// with the padding, a block's 8 warps' 34 KB of the 48
// (B: the rows that take the bias, the first; the tangent forward's further R - B rows are
// derivatives, which do not)
template <typename T, int R, int KT, int B = R, typename Epilogue>
__device__ __forceinline__ void dense_forward(const T* __restrict__ w, const T* __restrict__ b,
                                              int64_t in, int64_t o_begin, int64_t o_end,
                                              const T* h, int64_t ldh, T* tiles,
                                              Epilogue epilogue) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  T* tile = tiles + warp * KT * 33;
  for (int64_t o0 = o_begin + 32 * int64_t(warp); o0 < o_end; o0 += 32 * int64_t(warps)) {
    const int64_t o = o0 + lane;
    const bool ok = o < o_end;
    const T bias = ok ? b[o] : T(0);
    T acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = r < B ? bias : T(0);
    // a stage's reads into registers: lanes read KT-long pieces of 32 / KT rows at a time; the
    // next stage's are issued before this one is summed, so that their wait overlaps the sums
    T v[KT];
    auto read = [&](int64_t k0) {
#pragma unroll
      for (int m = 0; m < KT; ++m) {
        const int e = lane + 32 * m, oo = e / KT, kk = e % KT;
        const int64_t row = o0 + oo, col = k0 + kk;
        v[m] = row < o_end && col < in ? w[row * in + col] : T(0);
      }
    };
    read(0);
    for (int64_t k0 = 0; k0 < in; k0 += KT) {
#pragma unroll
      for (int m = 0; m < KT; ++m) {
        const int e = lane + 32 * m;
        tile[(e % KT) * 33 + e / KT] = v[m];
      }
      __syncwarp();
      if (k0 + KT < in) read(k0 + KT);
      const int kn = in - k0 < KT ? static_cast<int>(in - k0) : KT;
      for (int kk = 0; kk < kn; ++kk) {
        const T wk = tile[kk * 33 + lane];
        const T* hk = h + k0 + kk;
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] += wk * hk[r * ldh];
      }
      __syncwarp();
    }
    if (ok) epilogue(o, acc);
  }
}

// acc[r] = sum_o d[r, o] w[o, i] for inputs i < in: a thread per input (whole rows of w read by
// neighbouring threads); where the input is narrower than the block, groups of threads take
// ranges of o and add up through red (R x blockDim.x). epilogue(i, acc) by the first group.
// Every thread of the block calls it (it may synchronise the block).
template <typename T, int R, typename Epilogue>
__device__ __forceinline__ void dense_backward(const T* __restrict__ w, int64_t out, int64_t in,
                                               const T* d, int64_t ldd, T* red,
                                               Epilogue epilogue) {
  const int threads = blockDim.x;
  const int cols = in >= threads ? threads : static_cast<int>((in + 31) / 32 * 32);
  const int groups = threads / cols;
  const int g = threadIdx.x / cols, c = threadIdx.x % cols;  // g == groups: idle
  const int64_t per = (out + groups - 1) / groups;
  for (int64_t i0 = 0; i0 < in; i0 += cols) {  // one pass where groups > 1
    const int64_t i = i0 + c;
    T acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = T(0);
    if (g < groups && i < in) {
      const int64_t o_end = (g + 1) * per < out ? (g + 1) * per : out;
#pragma unroll 4  // four reads of the weights in flight at a time
      for (int64_t o = g * per; o < o_end; ++o) {
        const T wo = w[o * in + i];
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] += d[r * ldd + o] * wo;
      }
    }
    if (groups > 1) {
      if (g > 0 && g < groups) {
#pragma unroll
        for (int r = 0; r < R; ++r) red[(r * groups + g) * cols + c] = acc[r];
      }
      __syncthreads();
      if (g == 0) {
        for (int q = 1; q < groups; ++q) {
#pragma unroll
          for (int r = 0; r < R; ++r) acc[r] += red[(r * groups + q) * cols + c];
        }
      }
      __syncthreads();
    }
    if (g == 0 && i < in) epilogue(i, acc);
  }
}

// Forward: block (row block, network n * chunks + chunk); the chunk is the part of the last
// layer's outputs this block makes (blockDim.x of them), the layers before it made by each.
// Shared: the input rows (R x k), the first layer's activations of network n (R x first), two
// hidden layers' (R x mid each), the warps' weight tiles.
// TAN (tangent_radial_networks): the rows' derivatives d/dr go along, R more rows of each
// (shared: 2R rows, the values then the derivatives), through the same products with the same
// weight tiles (no bias), each layer's t' = act'(z) W t; the outputs' derivatives (times the
// scale, plus act(z) times the scale's derivative) go to t_proj and t_out, and no z is kept: the
// backward is then a sum per row (tangent_grad_kernel), not a pass back through the layers.
// (at most 128 registers a thread: two blocks to a multiprocessor. Unbounded, a block of 4 rows
// with 32-column tiles took 166, so the radial networks' 232 blocks at alanine dipeptide's 231
// pairs would have run in two waves; ptxas -v of NVRTC's PTX, scripts/nvrtc_check.py)
template <typename T, int R, int KT, bool TAN = false>
__global__ void __launch_bounds__(kThreads, 2) network_forward_kernel(NetArgs<T> a) {
  constexpr int RR = TAN ? 2 * R : R;  // rows in shared memory: values (then derivatives)
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* xs = reinterpret_cast<T*>(shared_bytes);
  T* a0 = xs + RR * a.k;
  T* hidden[2] = {a0 + RR * a.first, a0 + RR * a.first + RR * a.mid};
  T* tiles = hidden[1] + RR * a.mid;
  const int64_t row0 = blockIdx.x * int64_t(R);
  const int rows = a.rows - row0 < R ? static_cast<int>(a.rows - row0) : R;
  const int n = blockIdx.y / a.chunks, chunk = blockIdx.y % a.chunks;
  for (int64_t e = threadIdx.x; e < RR * a.k; e += blockDim.x) {
    if constexpr (TAN) {
      const int64_t q = e / a.k, r = q % R;  // (q >= R: a derivative's row)
      const T* x = q < R ? a.x : a.tx;
      xs[e] = r < rows ? x[(row0 + r) * a.k + (e - q * a.k)] : T(0);
    } else {
      const int64_t r = e / a.k;
      xs[e] = r < rows ? a.x[(row0 + r) * a.k + (e - r * a.k)] : T(0);
    }
  }
  __syncthreads();
  // the tangent forward's epilogue of a hidden layer: act(z) and act'(z) t into rows r and
  // R + r of `to` (ld apart)
  auto tangent_rows = [&](int64_t o, const T(&acc)[RR], T* to, int64_t ld) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      to[r * ld + o] = activated(a.activation, acc[r]);
      to[(R + r) * ld + o] = activation_slope(a.activation, acc[r]) * acc[RR - R + r];
    }
  };
  if (n == 0 && chunk == 0 && a.proj > 0) {  // the projection: no activation, times the scale
    dense_forward<T, RR, KT, R>(a.w0, a.b0, a.k, 0, a.proj, xs, a.k, tiles,
                                [&](int64_t o, const T(&acc)[RR]) {
#pragma unroll
                                  for (int r = 0; r < R; ++r) {
                                    if (r >= rows) continue;
                                    const int64_t row = row0 + r;
                                    if constexpr (TAN) {
                                      const T t = acc[RR - R + r];
                                      a.out_proj[row * a.proj + o] =
                                          a.scale != nullptr ? acc[r] * a.scale[row] : acc[r];
                                      a.t_proj[row * a.ld_t + o] =
                                          a.scale != nullptr
                                              ? t * a.scale[row] + acc[r] * a.tscale[row]
                                              : t;
                                    } else {
                                      a.z0[row * a.t0 + o] = acc[r];
                                      a.out_proj[row * a.proj + o] =
                                          a.scale != nullptr ? acc[r] * a.scale[row] : acc[r];
                                    }
                                  }
                                });
  }
  const int64_t col0 = a.proj + n * a.first;  // network n's columns of the first layer
  dense_forward<T, RR, KT, R>(a.w0, a.b0, a.k, col0, col0 + a.first, xs, a.k, tiles,
                              [&](int64_t o, const T(&acc)[RR]) {
                                if constexpr (TAN) {
                                  tangent_rows(o - col0, acc, a0, a.first);
                                } else {
#pragma unroll
                                  for (int r = 0; r < R; ++r) {
                                    if (chunk == 0 && r < rows) a.z0[(row0 + r) * a.t0 + o] = acc[r];
                                    a0[r * a.first + (o - col0)] = activated(a.activation, acc[r]);
                                  }
                                }
                              });
  __syncthreads();
  const T* h = a0;
  int64_t width_in = a.first;
  for (int l = 0; l < a.depth; ++l) {
    const int q = n * a.depth + l;
    const int64_t width = a.width[q];
    T* zq = a.z[q];
    if (l + 1 < a.depth) {  // a hidden layer, into shared memory (every chunk's block makes it)
      T* next = hidden[l % 2];
      dense_forward<T, RR, KT, R>(a.w[q], a.b[q], width_in, 0, width, h, width_in, tiles,
                                  [&](int64_t o, const T(&acc)[RR]) {
                                    if constexpr (TAN) {
                                      tangent_rows(o, acc, next, width);
                                    } else {
#pragma unroll
                                      for (int r = 0; r < R; ++r) {
                                        if (chunk == 0 && r < rows) zq[(row0 + r) * width + o] = acc[r];
                                        next[r * width + o] = activated(a.activation, acc[r]);
                                      }
                                    }
                                  });
      __syncthreads();
      h = next;
      width_in = width;
    } else {  // the last: this chunk's outputs, activated and scaled
      const int64_t o_begin = chunk * int64_t(blockDim.x);
      const int64_t o_end = o_begin + blockDim.x < width ? o_begin + blockDim.x : width;
      T* out = a.out[n];
      T* t_out = a.t_out[n];
      dense_forward<T, RR, KT, R>(
          a.w[q], a.b[q], width_in, o_begin, o_end, h, width_in, tiles,
          [&](int64_t o, const T(&acc)[RR]) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
              if (r >= rows) continue;
              const int64_t row = row0 + r;
              if constexpr (TAN) {
                const T v = activated(a.last_activation, acc[r]);
                const T dv = activation_slope(a.last_activation, acc[r]) * acc[RR - R + r];
                out[row * width + o] = a.scale != nullptr ? v * a.scale[row] : v;
                t_out[row * a.ld_t + o] =
                    a.scale != nullptr ? dv * a.scale[row] + v * a.tscale[row] : dv;
              } else {
                zq[row * width + o] = acc[r];
                const T v = activated(a.last_activation, acc[r]);
                out[row * width + o] = a.scale != nullptr ? v * a.scale[row] : v;
              }
            }
          });
    }
  }
}

// Backward: block (row block), every network in turn, then the projection, then back to the
// input. Shared: the gradient at the first layer's pre-activations (R x t0), two further
// layers' (R x widest each), the groups' partial sums (R x blockDim.x), the scale's gradient
// per warp (R x warps).
template <typename T, int R>
__global__ void __launch_bounds__(kNetBackwardThreads) network_backward_kernel(NetArgs<T> a) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* d0 = reinterpret_cast<T*>(shared_bytes);
  T* d[2] = {d0 + R * a.t0, d0 + R * a.t0 + R * a.widest};
  T* red = d[1] + R * a.widest;
  T* part = red + R * int64_t(blockDim.x);
  const int64_t row0 = blockIdx.x * int64_t(R);
  const int rows = a.rows - row0 < R ? static_cast<int>(a.rows - row0) : R;
  const bool scaled = a.scale != nullptr;
  T s[R], g_scale[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    s[r] = scaled && r < rows ? a.scale[row0 + r] : T(1);
    g_scale[r] = T(0);
  }
  for (int n = 0; n < a.networks; ++n) {
    const int top = n * a.depth + a.depth - 1;
    const int64_t width = a.width[top];
    const T *g = a.g_out[n], *z = a.z[top];
    const int64_t ld_g = a.ld_g[n];
    for (int64_t o = threadIdx.x; o < width; o += blockDim.x) {  // out = act(z) s
#pragma unroll
      for (int r = 0; r < R; ++r) {
        T v = T(0);
        if (r < rows) {
          const int64_t row = row0 + r;
          const T gv = g != nullptr ? g[row * ld_g + o] : T(0), zv = z[row * width + o];
          v = gv * s[r] * activation_slope(a.last_activation, zv);
          if (scaled) g_scale[r] += gv * activated(a.last_activation, zv);
        }
        d[0][r * width + o] = v;
      }
    }
    __syncthreads();
    int cur = 0;
    for (int l = a.depth - 1; l >= 0; --l) {
      const int q = n * a.depth + l;
      const int64_t width_out = a.width[q];
      if (l > 0) {  // to the hidden layer below, through its activation
        const int64_t width_in = a.width[q - 1];
        T* next = d[1 - cur];
        const T* zb = a.z[q - 1];
        dense_backward<T, R>(a.w[q], width_out, width_in, d[cur], width_out, red,
                             [&](int64_t i, const T(&acc)[R]) {
#pragma unroll
                               for (int r = 0; r < R; ++r) {
                                 next[r * width_in + i] =
                                     r < rows ? acc[r] * activation_slope(
                                                             a.activation,
                                                             zb[(row0 + r) * width_in + i])
                                              : T(0);
                               }
                             });
        cur = 1 - cur;
      } else {  // to network n's columns of the first layer
        const int64_t col0 = a.proj + n * a.first;
        dense_backward<T, R>(a.w[q], width_out, a.first, d[cur], width_out, red,
                             [&](int64_t i, const T(&acc)[R]) {
#pragma unroll
                               for (int r = 0; r < R; ++r) {
                                 d0[r * a.t0 + col0 + i] =
                                     r < rows ? acc[r] * activation_slope(
                                                             a.activation,
                                                             a.z0[(row0 + r) * a.t0 + col0 + i])
                                              : T(0);
                               }
                             });
      }
      __syncthreads();
    }
  }
  for (int64_t o = threadIdx.x; o < a.proj; o += blockDim.x) {  // out_proj = z0 s
#pragma unroll
    for (int r = 0; r < R; ++r) {
      T v = T(0);
      if (r < rows) {
        const T gv = a.g_proj != nullptr ? a.g_proj[(row0 + r) * a.ld_g_proj + o] : T(0);
        v = gv * s[r];
        if (scaled) g_scale[r] += gv * a.z0[(row0 + r) * a.t0 + o];
      }
      d0[r * a.t0 + o] = v;
    }
  }
  __syncthreads();
  if (a.g_x != nullptr) {
    dense_backward<T, R>(a.w0, a.t0, a.k, d0, a.t0, red, [&](int64_t i, const T(&acc)[R]) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < rows) a.g_x[(row0 + r) * a.k + i] = acc[r];
      }
    });
  }
  if (a.g_scale != nullptr) {  // each row's sum: within the warps, then across them
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      T v = g_scale[r];
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
      if (lane == 0) part[r * warps + warp] = v;
    }
    __syncthreads();
    if (threadIdx.x < rows) {
      T sum = T(0);
      for (int w = 0; w < warps; ++w) sum += part[threadIdx.x * warps + w];
      a.g_scale[row0 + threadIdx.x] = sum;
    }
  }
}

// ---- The radial networks differentiated forward (tangent_radial_networks) ---------------------
// With the outputs' derivatives d/dr made in the forward, a pair's gradient is one sum: dE/dr =
// sum over the outputs of g . dout/dr, to which the vector's gradient through the cutoff and
// the geometry (tn_math::geometry_grad, geometry_grad_kernel's) adds. A warp per pair.
template <typename T>
struct TangentArgs {
  const T* g_cut = nullptr;   // the cutoff's and the geometry's gradients (null: zero)
  const T* g_geom = nullptr;
  const T* g[kNetLayers + 1] = {};  // each output's gradient (null: zero), rows ld_g apart
  int64_t ld_g[kNetLayers + 1] = {};
  int64_t width[kNetLayers + 1] = {};
  int outputs = 0;
  const T* tan = nullptr;  // the outputs' derivatives side by side, rows ld_t apart
  int64_t ld_t = 0;
  const T* vec = nullptr;  // (rows, 3) pair vectors
  T* g_vec = nullptr;      // (rows, 3)
  int64_t rows = 0;
};

template <typename T>
__global__ void tangent_grad_kernel(TangentArgs<T> a, tn_math::GeometryParams<T> geo) {
  const int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= a.rows) return;  // the whole warp: the shuffles below see all its lanes
  const T* t = a.tan + row * a.ld_t;
  T sum = T(0);
  for (int o = 0; o < a.outputs; ++o) {
    if (a.g[o] != nullptr) {
      const T* g = a.g[o] + row * a.ld_g[o];
      for (int64_t f = lane; f < a.width[o]; f += 32) sum += g[f] * t[f];
    }
    t += a.width[o];
  }
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
  if (lane == 0) {
    tn_math::geometry_grad(geo, a.vec + 3 * row, a.g_cut == nullptr ? nullptr : a.g_cut + row,
                           a.g_geom == nullptr ? nullptr : a.g_geom + tn_math::kGeometry * row,
                           static_cast<const T*>(nullptr), a.g_vec + 3 * row, sum);
  }
}

// The tangent forward's activation for rows of any length (the products cuBLAS's): h = act(z) s
// and th = act'(z) t s + act(z) ts, with s and ts per row (null: 1 and 0), one thread per value
template <typename T>
__global__ void tangent_activate_kernel(int activation, const T* __restrict__ z, int64_t ld_z,
                                        const T* __restrict__ t, int64_t ld_t,
                                        const T* __restrict__ scale, const T* __restrict__ tscale,
                                        T* __restrict__ h, int64_t ld_h, T* __restrict__ th,
                                        int64_t ld_th, int64_t rows, int64_t width) {
  const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (e >= rows * width) return;
  const int64_t r = e / width, f = e - r * width;
  const T zv = z[r * ld_z + f], v = activated(activation, zv);
  const T dv = activation_slope(activation, zv) * t[r * ld_t + f];
  if (scale != nullptr) {
    h[r * ld_h + f] = v * scale[r];
    th[r * ld_th + f] = dv * scale[r] + v * tscale[r];
  } else {
    h[r * ld_h + f] = v;
    th[r * ld_th + f] = dv;
  }
}

// r[p] = scale (pos[src[p]] - pos[dst[p]]), at its minimum image in the box (times the scale)
// if one is given, one thread per pair; NaN if the box is narrower than min_width
template <typename T>
__global__ void pair_difference_kernel(const T* __restrict__ pos, const int64_t* __restrict__ src,
                                       const int64_t* __restrict__ dst, T scale,
                                       const T* __restrict__ box, T min_width,
                                       T* __restrict__ out, int64_t pairs, int64_t atoms) {
  const int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (p >= pairs) return;
  const int64_t i = src[p], j = dst[p];
  check_pair(i, j, atoms);
  T r[3];
  for (int c = 0; c < 3; ++c) r[c] = tn_math::mul_rn(scale, pos[3 * i + c] - pos[3 * j + c]);
  if (box != nullptr) {
    T b[9];
    for (int e = 0; e < 9; ++e) b[e] = tn_math::mul_rn(box[e], scale);
    tn_math::minimum_image(r, b);
  }
  const bool fail = tn_math::box_too_small(box, scale, min_width);
  for (int c = 0; c < 3; ++c) out[3 * p + c] = fail ? T(NAN) : r[c];
}

// the positions' gradient before the scatter: zeros, or NaN everywhere for a box too narrow
template <typename T>
__global__ void difference_grad_fill_kernel(T* __restrict__ g_pos, int64_t n, const T* __restrict__ box,
                                            T scale, T min_width) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k >= n) return;
  g_pos[k] = tn_math::box_too_small(box, scale, min_width) ? T(NAN) : T(0);
}

// g_pos[src[p]] += scale g[p] and g_pos[dst[p]] -= scale g[p] (g_pos zeroed), atomically
template <typename T>
__global__ void pair_difference_grad_kernel(const T* __restrict__ grad,
                                            const int64_t* __restrict__ src,
                                            const int64_t* __restrict__ dst, T scale,
                                            T* __restrict__ g_pos, int64_t pairs) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k >= 3 * pairs) return;
  const int64_t p = k / 3, c = k - 3 * p;
  const T v = scale * grad[k];
  atomicAdd(g_pos + 3 * src[p] + c, v);
  atomicAdd(g_pos + 3 * dst[p] + c, -v);
}

// The pair search (pair_ops.cpp describes it): a warp per atom over its candidate ranges, 32
// candidates at a time. The count pass (pairs null) writes each atom's count; the write pass puts
// its pairs from its offset on (ends: the counts' inclusive sums), in candidate order (a ballot
// and a prefix count per 32), dropping those from ``slots`` on.
template <typename T>
__global__ void pair_search_kernel(const T* __restrict__ pos, const int64_t* __restrict__ order,
                                   const int64_t* __restrict__ start,
                                   const int64_t* __restrict__ end, int64_t atoms, int64_t ranges,
                                   int64_t listed, const T* __restrict__ box, T cutoff2, bool half,
                                   int64_t* __restrict__ counts, const int64_t* __restrict__ ends,
                                   int64_t* __restrict__ pairs, T* __restrict__ shift,
                                   int64_t slots) {
  const int64_t i = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (i >= atoms) return;  // (the whole warp: the ballots below need its 32 lanes)
  const bool write = pairs != nullptr;
  const int64_t first = write ? ends[i] - counts[i] : 0;
  int64_t found = 0;
  for (int64_t r = 0; r < ranges; ++r) {
    const int64_t k0 = start[i * ranges + r], k1 = end[i * ranges + r];
    CUDA_KERNEL_ASSERT(k0 >= 0 && k1 <= listed);
    for (int64_t k = k0; k < k1; k += 32) {
      bool ok = k + lane < k1;
      int64_t j = 0;
      T s[3] = {T(0), T(0), T(0)};
      if (ok) {
        j = order[k + lane];
        CUDA_KERNEL_ASSERT(j >= 0 && j < atoms);
        ok = (half ? i < j : i != j) &&
             tn_math::pair_within(pos + 3 * i, pos + 3 * j, box, cutoff2, s);
      }
      const unsigned mask = __ballot_sync(0xffffffffu, ok);
      if (write && ok) {
        const int64_t slot = first + found + __popc(mask & ((1u << lane) - 1u));
        if (slot < slots) {
          pairs[slot] = i;
          pairs[slots + slot] = j;
          for (int e = 0; e < 3; ++e) shift[3 * slot + e] = s[e];
        }
      }
      found += __popc(mask);
    }
  }
  if (!write && lane == 0) counts[i] = found;
}

// The count (ends' last) and the unused slots, from the count on: self pairs (k mod n) with the
// shift (pad, 0, 0), beyond the cutoff
template <typename T>
__global__ void pair_padding_kernel(const int64_t* __restrict__ ends, int64_t atoms, T pad,
                                    int64_t* __restrict__ pairs, T* __restrict__ shift,
                                    int64_t slots, int64_t* __restrict__ count) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t total = ends[atoms - 1];
  if (k == 0) *count = total;
  if (k >= slots || k < total) return;
  pairs[k] = pairs[slots + k] = k % atoms;
  shift[3 * k] = pad;
  shift[3 * k + 1] = shift[3 * k + 2] = T(0);
}

// ---- Channel mixing of a few atoms (component_mix) ---------------------------------------------
// out[n, c, o] = sum_k p[n, c, k] w[c, k, o] for packed p (atoms, 10, f_in) and one weight per
// component, w (10, f_in, f_out) at any strides (the backward's is the forward's transposed).
// cuBLAS's batched product of a small molecule (alanine dipeptide: 10 products of 22 x 128 by
// 128 x 128) took about 5 us a call on the H100 (2026-11-26), ten calls a step: a tile of 32
// outputs by 32 atoms per block, kMixK inputs a stage, is some 40 blocks of a few hundred
// multiply-adds a thread. Atoms up to tn_math::kSmallMixAtoms (the launcher's rule); above,
// cuBLAS.
constexpr int kMixOut = 32;                         // a block's outputs: a warp's lanes
constexpr int kMixAtoms = 32;                       // a block's atoms: each warp every 8th
constexpr int kMixK = 64;                           // the inputs of a stage
constexpr int kMixWeightTile = kMixK * (kMixOut + 1);  // (padded against bank conflicts)
constexpr int kMixInputTile = kMixAtoms * (kMixK + 1);

template <typename T>
struct MixArgs {
  const T* p = nullptr;  // (atoms, 10, f_in), contiguous
  const T* w = nullptr;  // w[c, k, o] at c * ws_c + k * ws_k + o * ws_o
  T* out = nullptr;      // (atoms, 10, f_out), contiguous
  int64_t atoms = 0, f_in = 0, f_out = 0, ws_c = 0, ws_k = 0, ws_o = 0;
  // gated_mix's gates per part (atoms, 3, F), or null: p's entries times gate_in[n, GROUP[c],
  // k] as they are read (its backward); the outputs times gate_out[n, GROUP[c], o], and before
  // that into plain (its forward)
  const T* gate_in = nullptr;
  const T* gate_out = nullptr;
  T* plain = nullptr;
};

// block (32 atoms times 10 components, 32 outputs), kThreads threads: lane = output, warp =
// the atoms warp, warp + 8, ... of the block's
template <typename T>
__global__ void small_mix_kernel(MixArgs<T> a) {
  __shared__ T ws[kMixWeightTile];
  __shared__ T ps[kMixInputTile];
  const int c = static_cast<int>(blockIdx.x % kComps);
  const int64_t o0 = blockIdx.y * int64_t(kMixOut);
  const int64_t n0 = (blockIdx.x / kComps) * int64_t(kMixAtoms);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  constexpr int kWarps = kThreads / 32, kPerThread = kMixAtoms / kWarps;  // (launched so)
  // the weights' tile read along their unit stride (the forward's inputs, the backward's
  // outputs), so that neighbouring threads read neighbouring addresses
  const bool inputs_fastest = a.ws_k < a.ws_o;
  T acc[kPerThread];
#pragma unroll
  for (int m = 0; m < kPerThread; ++m) acc[m] = T(0);
  for (int64_t k0 = 0; k0 < a.f_in; k0 += kMixK) {
    for (int e = threadIdx.x; e < kMixK * kMixOut; e += blockDim.x) {
      const int kk = inputs_fastest ? e % kMixK : e / kMixOut;
      const int oo = inputs_fastest ? e / kMixK : e % kMixOut;
      const int64_t k = k0 + kk, o = o0 + oo;
      ws[kk * (kMixOut + 1) + oo] =
          k < a.f_in && o < a.f_out ? a.w[c * a.ws_c + k * a.ws_k + o * a.ws_o] : T(0);
    }
    for (int e = threadIdx.x; e < kMixAtoms * kMixK; e += blockDim.x) {
      const int nn = e / kMixK, kk = e % kMixK;
      const int64_t n = n0 + nn, k = k0 + kk;
      T v = T(0);
      if (n < a.atoms && k < a.f_in) {
        v = a.p[(n * kComps + c) * a.f_in + k];
        if (a.gate_in != nullptr) v *= a.gate_in[(n * kParts + group_of(c)) * a.f_in + k];
      }
      ps[nn * (kMixK + 1) + kk] = v;
    }
    __syncthreads();
    for (int kk = 0; kk < kMixK; ++kk) {
      const T wk = ws[kk * (kMixOut + 1) + lane];
#pragma unroll
      for (int m = 0; m < kPerThread; ++m) {
        acc[m] += ps[(warp + kWarps * m) * (kMixK + 1) + kk] * wk;
      }
    }
    __syncthreads();
  }
  const int64_t o = o0 + lane;
  if (o >= a.f_out) return;
#pragma unroll
  for (int m = 0; m < kPerThread; ++m) {
    const int64_t n = n0 + warp + kWarps * m;
    if (n >= a.atoms) continue;
    const int64_t at = (n * kComps + c) * a.f_out + o;
    if (a.plain != nullptr) a.plain[at] = acc[m];
    const int64_t gate = (n * kParts + group_of(c)) * a.f_out + o;
    a.out[at] = a.gate_out != nullptr ? acc[m] * a.gate_out[gate] : acc[m];
  }
}

// g_gates[n, g, f] = sum over the components c of part g of grad[n, c, f] plain[n, c, f]: the
// gradient of gated_mix's gates (one thread per atom and channel)
template <typename T>
__global__ void gate_grad_kernel(const T* __restrict__ grad, const T* __restrict__ plain,
                                 T* __restrict__ g_gates, int64_t atoms, int64_t f_len) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= atoms * f_len) return;
  const int64_t n = t / f_len, f = t - n * f_len;
  T g[kComps], v[kComps], sum[kParts] = {T(0), T(0), T(0)};
  tn_math::load(grad + n * kComps * f_len + f, f_len, g);
  tn_math::load(plain + n * kComps * f_len + f, f_len, v);
#pragma unroll
  for (int c = 0; c < kComps; ++c) sum[group_of(c)] += g[c] * v[c];
#pragma unroll
  for (int k = 0; k < kParts; ++k) g_gates[(n * kParts + k) * f_len + f] = sum[k];
}

// ---- emulated on the CPU by tests/test_cuda_emulation.py: to here ----

template <typename T>
__global__ void geometry_kernel(tn_math::GeometryParams<T> g, const T* __restrict__ vec,
                                T* __restrict__ cut, T* __restrict__ geom, T* __restrict__ basis,
                                int64_t pairs) {
  const int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (p >= pairs) return;
  tn_math::geometry(g, vec + 3 * p, cut + p, geom + tn_math::kGeometry * p, basis + g.k * p);
}

// geometry's values and the derivatives d/dr of the cutoff and the basis
// (tn_math::radial_tangent), a thread per pair
template <typename T>
__global__ void radial_tangent_kernel(tn_math::GeometryParams<T> g, const T* __restrict__ vec,
                                      T* __restrict__ cut, T* __restrict__ cut_slope,
                                      T* __restrict__ geom, T* __restrict__ basis,
                                      T* __restrict__ basis_slope, int64_t pairs) {
  const int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (p >= pairs) return;
  tn_math::radial_tangent(g, vec + 3 * p, cut + p, cut_slope + p, geom + tn_math::kGeometry * p,
                          basis + g.k * p, basis_slope + g.k * p);
}

template <typename T>
__global__ void geometry_grad_kernel(tn_math::GeometryParams<T> g, const T* __restrict__ vec,
                                     const T* __restrict__ g_cut, const T* __restrict__ g_geom,
                                     const T* __restrict__ g_basis, T* __restrict__ g_vec,
                                     int64_t pairs) {
  const int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (p >= pairs) return;
  tn_math::geometry_grad(g, vec + 3 * p, g_cut == nullptr ? nullptr : g_cut + p,
                         g_geom == nullptr ? nullptr : g_geom + tn_math::kGeometry * p,
                         g_basis == nullptr ? nullptr : g_basis + g.k * p, g_vec + 3 * p);
}

// cut(r) g(r) from a table (tn_math::table_weights): one thread per pair and value, so that
// neighbouring threads read neighbouring table entries
template <typename T>
__global__ void radial_table_kernel(tn_math::TableParams<T> t, const T* __restrict__ table,
                                    const T* __restrict__ vec, T* __restrict__ out, int64_t pairs,
                                    int64_t width) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= pairs * width) return;
  const int64_t p = i / width, f = i - p * width;
  const T* v = vec + 3 * p;
  T w[4], dw[4];
  const int64_t k = tn_math::table_weights(t, sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]), w, dw);
  const T* row = table + 4 * k * width + f;
  out[i] = w[0] * row[0] + w[1] * row[width] + w[2] * row[2 * width] + w[3] * row[3 * width];
}

// dL/dv of each pair: one block per pair, its threads summing over the values
template <typename T>
__global__ void radial_table_grad_kernel(tn_math::TableParams<T> t, const T* __restrict__ table,
                                         const T* __restrict__ vec, const T* __restrict__ grad,
                                         T* __restrict__ g_vec, int64_t width) {
  __shared__ T partial[kThreads];
  const int64_t p = blockIdx.x;
  const T* v = vec + 3 * p;
  const T r = sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]);
  T w[4], dw[4];
  const int64_t k = tn_math::table_weights(t, r, w, dw);
  const T* row = table + 4 * k * width;
  const T* g = grad + p * width;
  T sum = T(0);
  for (int64_t f = threadIdx.x; f < width; f += blockDim.x) {
    sum += g[f] * (dw[0] * row[f] + dw[1] * row[width + f] + dw[2] * row[2 * width + f] +
                   dw[3] * row[3 * width + f]);
  }
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x < 3) {
    g_vec[3 * p + threadIdx.x] = r > T(0) ? partial[0] / r * v[threadIdx.x] : T(0);
  }
}

template <typename T>
const T* const_data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
T* data_or_null(at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

// A per atom and channel step on the current stream, for the atoms and channels of ``like``
// (atoms, 10, F) (nothing to do for none)
template <AtomStep S, typename T>
void launch_atom_step(AtomArgs<T> g, const at::Tensor& like) {
  g.atoms = like.size(0);
  g.f_len = like.size(2);
  if (g.atoms * g.f_len == 0) return;
  atom_step_kernel<T, S><<<blocks_for(g.atoms * g.f_len), kThreads, 0,
                           c10::cuda::getCurrentCUDAStream()>>>(g);
  check_launch();
}

// the charge factors' data, null for none (empty)
template <typename T>
const T* factors_or_null(const at::Tensor& q) {
  return q.numel() == 0 ? nullptr : q.data_ptr<T>();
}

// TENSORNET_OPENMM_GATHER_SUMS=0 keeps the scattered (atomic) pair sums at every size
bool gather_sums_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("TENSORNET_OPENMM_GATHER_SUMS");
    return v == nullptr || std::string(v) != "0";
  }();
  return enabled;
}

// gathered: long lists, and not a low-memory block of a few pairs among many atoms (a gather
// costs a thread per atom and channel however few the pairs)
bool gathered(int64_t pairs, int64_t f_len, int64_t atoms) {
  return pairs * f_len >= kGatherWork && pairs >= atoms && gather_sums_enabled();
}

// The incidences of a pair list grouped by the atom they add onto, each group in slot order
// (first the atom's pairs as their first atom, then as their second), with the gathers' view of
// them (see messages_gather_kernel). On the current stream, no host synchronisation.
struct Gather {
  at::Tensor order, starts;  // (kept alive for the launches)
  GatherList list;
};

Gather incidences(const at::Tensor& src, const at::Tensor& dst, int64_t atoms, int64_t f_len,
                  bool half) {
  const int64_t pairs = src.size(0), count = half ? 2 * pairs : pairs;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor counts = at::zeros({atoms + 1}, src.options());
  Gather g;
  g.order = at::empty({count}, src.options());
  incidence_count_kernel<<<blocks_for(count), kThreads, 0, stream>>>(
      src.data_ptr<int64_t>(), dst.data_ptr<int64_t>(), pairs, count, atoms,
      counts.data_ptr<int64_t>());
  check_launch();
  g.starts = at::cumsum(counts, 0);
  at::Tensor cursor = g.starts.clone();
  const at::Tensor scratch = at::empty({count}, src.options());
  incidence_fill_kernel<<<blocks_for(count), kThreads, 0, stream>>>(
      src.data_ptr<int64_t>(), dst.data_ptr<int64_t>(), pairs, count, cursor.data_ptr<int64_t>(),
      scratch.data_ptr<int64_t>());
  check_launch();
  incidence_rank_kernel<<<blocks_for(count), kThreads, 0, stream>>>(
      src.data_ptr<int64_t>(), dst.data_ptr<int64_t>(), pairs, count,
      g.starts.data_ptr<int64_t>(), scratch.data_ptr<int64_t>(), g.order.data_ptr<int64_t>());
  check_launch();
  g.list = {src.data_ptr<int64_t>(), dst.data_ptr<int64_t>(), g.order.data_ptr<int64_t>(),
            g.starts.data_ptr<int64_t>(), pairs, f_len, atoms};
  return g;
}

}  // namespace

// ---- Host entry points (inputs checked and made contiguous by pair_ops.cpp) -------------------

// The message sums added onto out (contiguous, shaped as y).
void messages_into(const at::Tensor& out, const at::Tensor& y, const at::Tensor& filt,
                   const at::Tensor& src, const at::Tensor& dst, bool half) {
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t pairs = filt.size(0), f_len = y.size(2);
  if (pairs == 0 || f_len == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (gathered(pairs, f_len, y.size(0))) {
    const int64_t atoms = y.size(0);
    const Gather g = incidences(src, dst, atoms, f_len, half);
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "tensornet_openmm_messages_gather_cuda", [&] {
      messages_gather_kernel<scalar_t><<<blocks_for(atoms * f_len), kThreads, 0, stream>>>(
          y.data_ptr<scalar_t>(), filt.data_ptr<scalar_t>(), g.list, out.data_ptr<scalar_t>());
    });
    check_launch();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "tensornet_openmm_messages_cuda", [&] {
    const int run = run_length(pairs, f_len);
    const int blocks = blocks_for(run_threads(pairs, f_len, run));
    messages_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        y.data_ptr<scalar_t>(), filt.data_ptr<scalar_t>(), src.data_ptr<int64_t>(),
        dst.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), pairs, f_len, y.size(0), half, run);
  });
  check_launch();
}

at::Tensor messages(const at::Tensor& y, const at::Tensor& filt, const at::Tensor& src,
                    const at::Tensor& dst, bool half) {
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor out = at::zeros_like(y, at::MemoryFormat::Contiguous);
  messages_into(out, y, filt, src, dst, half);
  return out;
}

// The message sums started from the self pair's messages (two kernels: no zeroing, no sum).
at::Tensor messages_self(const at::Tensor& y, const at::Tensor& filt, const at::Tensor& src,
                         const at::Tensor& dst, bool half, const at::Tensor& self_filt) {
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor out = at::empty_like(y, at::MemoryFormat::Contiguous);
  const int64_t atoms = y.size(0), f_len = y.size(2);
  if (atoms * f_len == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "tensornet_openmm_self_messages_cuda", [&] {
    self_messages_kernel<scalar_t><<<blocks_for(atoms * kComps * f_len), kThreads, 0, stream>>>(
        y.data_ptr<scalar_t>(), self_filt.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), atoms,
        f_len);
  });
  check_launch();
  messages_into(out, y, filt, src, dst, half);
  return out;
}

at::Tensor filter_grad(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& src,
                       const at::Tensor& dst, int64_t pairs, bool half) {
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t f_len = y.size(2);
  at::Tensor out = at::empty({pairs, kParts, f_len}, y.options());
  if (pairs == 0 || f_len == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "tensornet_openmm_filter_grad_cuda", [&] {
    const int run = run_length(pairs, f_len);
    const int blocks = blocks_for(run_threads(pairs, f_len, run));
    filter_grad_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), src.data_ptr<int64_t>(),
        dst.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), pairs, f_len, y.size(0), half, run);
  });
  check_launch();
  return out;
}

// The embedding's pair sums added onto out (contiguous, (atoms, 10, F)).
void embedding_into(const at::Tensor& out, const at::Tensor& radial, const at::Tensor& z_recv,
                    const at::Tensor& z_send, const at::Tensor& geom, const at::Tensor& src,
                    const at::Tensor& dst, bool half) {
  const c10::cuda::CUDAGuard guard(radial.device());
  const int64_t pairs = radial.size(0), f_len = radial.size(2), atoms = z_recv.size(0);
  if (pairs == 0 || f_len == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (gathered(pairs, f_len, atoms)) {
    const Gather g = incidences(src, dst, atoms, f_len, half);
    AT_DISPATCH_FLOATING_TYPES(radial.scalar_type(), "tensornet_openmm_embedding_gather_cuda", [&] {
      embedding_gather_kernel<scalar_t><<<blocks_for(atoms * f_len), kThreads, 0, stream>>>(
          radial.data_ptr<scalar_t>(), z_recv.data_ptr<scalar_t>(), z_send.data_ptr<scalar_t>(),
          geom.data_ptr<scalar_t>(), g.list, out.data_ptr<scalar_t>());
    });
    check_launch();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(radial.scalar_type(), "tensornet_openmm_embedding_cuda", [&] {
    const int run = run_length(pairs, f_len);
    const int blocks = blocks_for(run_threads(pairs, f_len, run));
    embedding_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        radial.data_ptr<scalar_t>(), z_recv.data_ptr<scalar_t>(), z_send.data_ptr<scalar_t>(),
        geom.data_ptr<scalar_t>(), src.data_ptr<int64_t>(), dst.data_ptr<int64_t>(),
        out.data_ptr<scalar_t>(), pairs, f_len, atoms, half, run);
  });
  check_launch();
}

at::Tensor embedding(const at::Tensor& radial, const at::Tensor& z_recv,
                     const at::Tensor& z_send, const at::Tensor& geom, const at::Tensor& src,
                     const at::Tensor& dst, bool half) {
  const c10::cuda::CUDAGuard guard(radial.device());
  at::Tensor out = at::zeros({z_recv.size(0), kComps, radial.size(2)}, radial.options());
  embedding_into(out, radial, z_recv, z_send, geom, src, dst, half);
  return out;
}

// Gradients of embedding() for radial, the species terms and geom, each only when asked (an
// undefined tensor otherwise).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> embedding_grads(
    const at::Tensor& grad, const at::Tensor& radial, const at::Tensor& z_recv,
    const at::Tensor& z_send, const at::Tensor& geom, const at::Tensor& src, const at::Tensor& dst,
    bool half, bool want_radial, bool want_species, bool want_geom) {
  const c10::cuda::CUDAGuard guard(radial.device());
  const int64_t pairs = radial.size(0), f_len = radial.size(2), atoms = z_recv.size(0);
  at::Tensor g_radial, g_recv, g_send, g_geom;
  if (want_radial) g_radial = at::empty_like(radial);  // every entry written once
  // a half list's species gradients gathered per atom (each entry written once), else atomic
  const bool gather_species = want_species && half && gathered(pairs, f_len, atoms);
  if (want_species) {
    g_recv = gather_species ? at::empty_like(z_recv) : at::zeros_like(z_recv);
    g_send = gather_species ? at::empty_like(z_send) : at::zeros_like(z_send);
  }
  if (want_geom) g_geom = at::empty_like(geom);
  if (pairs == 0 || f_len == 0 || !(want_radial || want_species || want_geom)) {
    return {g_radial, g_recv, g_send, g_geom};
  }
  // a block row of threads per pair: 32 to 128 of them over its channels
  int tx = 32;
  while (tx < 128 && tx < f_len) tx *= 2;
  const dim3 block(tx, kThreads / tx);
  const int64_t grid = (pairs + block.y - 1) / block.y;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(radial.scalar_type(), "tensornet_openmm_embedding_grads_cuda", [&] {
    const size_t shared = sizeof(scalar_t) * block.y * kComps;
    if (want_radial || want_geom || !gather_species) {
      at::Tensor scattered_recv = gather_species ? at::Tensor() : g_recv;
      at::Tensor scattered_send = gather_species ? at::Tensor() : g_send;
      embedding_grads_kernel<scalar_t><<<static_cast<unsigned>(grid), block, shared, stream>>>(
          grad.data_ptr<scalar_t>(), radial.data_ptr<scalar_t>(), z_recv.data_ptr<scalar_t>(),
          z_send.data_ptr<scalar_t>(), geom.data_ptr<scalar_t>(), src.data_ptr<int64_t>(),
          dst.data_ptr<int64_t>(), data_or_null<scalar_t>(g_radial),
          data_or_null<scalar_t>(scattered_recv), data_or_null<scalar_t>(scattered_send),
          data_or_null<scalar_t>(g_geom), pairs, f_len, atoms, half);
      check_launch();
    }
    if (gather_species) {
      const Gather g = incidences(src, dst, atoms, f_len, true);
      embedding_species_gather_kernel<scalar_t><<<blocks_for(atoms * f_len), kThreads, 0,
                                                  stream>>>(
          grad.data_ptr<scalar_t>(), radial.data_ptr<scalar_t>(), geom.data_ptr<scalar_t>(),
          g.list, g_recv.data_ptr<scalar_t>(), g_send.data_ptr<scalar_t>());
      check_launch();
    }
  });
  return {g_radial, g_recv, g_send, g_geom};
}

// The per atom and channel steps (inputs contiguous, outputs made here)
at::Tensor product(const at::Tensor& a, const at::Tensor& b, bool symmetric) {
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty_like(a, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "tensornet_openmm_packed_product_cuda", [&] {
    AtomArgs<scalar_t> g;
    g.a = a.data_ptr<scalar_t>();
    g.b = b.data_ptr<scalar_t>();
    g.u = out.data_ptr<scalar_t>();
    g.flag = symmetric;
    launch_atom_step<AtomStep::kProduct>(g, a);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> product_grad(const at::Tensor& grad, const at::Tensor& a,
                                                const at::Tensor& b, bool symmetric, bool want_a,
                                                bool want_b) {
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor g_a, g_b;
  if (want_a) g_a = at::empty_like(a, at::MemoryFormat::Contiguous);
  if (want_b) g_b = at::empty_like(b, at::MemoryFormat::Contiguous);
  if (!(want_a || want_b)) return {g_a, g_b};
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "tensornet_openmm_packed_product_grad_cuda", [&] {
    AtomArgs<scalar_t> g;
    g.a = grad.data_ptr<scalar_t>();
    g.b = a.data_ptr<scalar_t>();
    g.c = b.data_ptr<scalar_t>();
    g.u = data_or_null<scalar_t>(g_a);
    g.v = data_or_null<scalar_t>(g_b);
    g.flag = symmetric;
    launch_atom_step<AtomStep::kProductGrad>(g, a);
  });
  return {g_a, g_b};
}

at::Tensor normalize(const at::Tensor& p) {
  const c10::cuda::CUDAGuard guard(p.device());
  at::Tensor out = at::empty_like(p, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "tensornet_openmm_packed_normalize_cuda", [&] {
    AtomArgs<scalar_t> g;
    g.a = p.data_ptr<scalar_t>();
    g.u = out.data_ptr<scalar_t>();
    launch_atom_step<AtomStep::kNormalize>(g, p);
  });
  return out;
}

// 3 I^2, |A|^2, |S|^2 per atom and channel (pair_ops.cpp), one thread per atom and channel
at::Tensor part_norms(const at::Tensor& p) {
  const c10::cuda::CUDAGuard guard(p.device());
  const int64_t atoms = p.size(0), f_len = p.size(2);
  at::Tensor out = at::empty({atoms, kParts, f_len}, p.options());
  if (atoms * f_len == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "tensornet_openmm_packed_part_norms_cuda", [&] {
    part_norms_kernel<scalar_t><<<blocks_for(atoms * f_len), kThreads, 0,
                                  c10::cuda::getCurrentCUDAStream()>>>(
        p.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), atoms, f_len);
  });
  check_launch();
  return out;
}

at::Tensor part_norms_grad(const at::Tensor& grad, const at::Tensor& p) {
  const c10::cuda::CUDAGuard guard(p.device());
  const int64_t atoms = p.size(0), f_len = p.size(2);
  at::Tensor g_p = at::empty_like(p, at::MemoryFormat::Contiguous);
  if (atoms * f_len == 0) return g_p;
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "tensornet_openmm_packed_part_norms_grad_cuda", [&] {
    part_norms_grad_kernel<scalar_t><<<blocks_for(atoms * f_len), kThreads, 0,
                                       c10::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), g_p.data_ptr<scalar_t>(), atoms,
        f_len);
  });
  check_launch();
  return g_p;
}

at::Tensor normalize_grad(const at::Tensor& grad, const at::Tensor& p) {
  const c10::cuda::CUDAGuard guard(p.device());
  at::Tensor g_p = at::empty_like(p, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "tensornet_openmm_packed_normalize_grad_cuda", [&] {
    AtomArgs<scalar_t> g;
    g.a = grad.data_ptr<scalar_t>();
    g.b = p.data_ptr<scalar_t>();
    g.u = g_p.data_ptr<scalar_t>();
    launch_atom_step<AtomStep::kNormalizeGrad>(g, p);
  });
  return g_p;
}

at::Tensor product_normalize(const at::Tensor& a, const at::Tensor& b, bool symmetric,
                             const at::Tensor& q) {
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty_like(a, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "tensornet_openmm_product_normalize_cuda", [&] {
    AtomArgs<scalar_t> g;
    g.a = a.data_ptr<scalar_t>();
    g.b = b.data_ptr<scalar_t>();
    g.q = factors_or_null<scalar_t>(q);
    g.u = out.data_ptr<scalar_t>();
    g.flag = symmetric;
    launch_atom_step<AtomStep::kProductNormalize>(g, a);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> product_normalize_grad(const at::Tensor& grad,
                                                          const at::Tensor& a, const at::Tensor& b,
                                                          bool symmetric, const at::Tensor& q,
                                                          bool want_a, bool want_b) {
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor g_a, g_b;
  if (want_a) g_a = at::empty_like(a, at::MemoryFormat::Contiguous);
  if (want_b) g_b = at::empty_like(b, at::MemoryFormat::Contiguous);
  if (!(want_a || want_b)) return {g_a, g_b};
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "tensornet_openmm_product_normalize_grad_cuda", [&] {
    AtomArgs<scalar_t> g;
    g.a = grad.data_ptr<scalar_t>();
    g.b = a.data_ptr<scalar_t>();
    g.c = b.data_ptr<scalar_t>();
    g.q = factors_or_null<scalar_t>(q);
    g.u = data_or_null<scalar_t>(g_a);
    g.v = data_or_null<scalar_t>(g_b);
    g.flag = symmetric;
    launch_atom_step<AtomStep::kProductNormalizeGrad>(g, a);
  });
  return {g_a, g_b};
}

at::Tensor square_add(const at::Tensor& x, const at::Tensor& d, const at::Tensor& q) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tensornet_openmm_square_add_cuda", [&] {
    AtomArgs<scalar_t> g;
    g.a = x.data_ptr<scalar_t>();
    g.b = d.data_ptr<scalar_t>();
    g.q = factors_or_null<scalar_t>(q);
    g.u = out.data_ptr<scalar_t>();
    launch_atom_step<AtomStep::kSquareAdd>(g, x);
  });
  return out;
}

at::Tensor square_add_grad(const at::Tensor& grad, const at::Tensor& d, const at::Tensor& q) {
  const c10::cuda::CUDAGuard guard(d.device());
  at::Tensor g_d = at::empty_like(d, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "tensornet_openmm_square_add_grad_cuda", [&] {
    AtomArgs<scalar_t> g;
    g.a = grad.data_ptr<scalar_t>();
    g.b = d.data_ptr<scalar_t>();
    g.q = factors_or_null<scalar_t>(q);
    g.u = g_d.data_ptr<scalar_t>();
    launch_atom_step<AtomStep::kSquareAddGrad>(g, d);
  });
  return g_d;
}

std::tuple<at::Tensor, at::Tensor> embedding_prepare(const at::Tensor& s, const at::Tensor& e) {
  const c10::cuda::CUDAGuard guard(s.device());
  at::Tensor x = at::empty_like(s, at::MemoryFormat::Contiguous);
  at::Tensor sq = at::empty_like(e, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "tensornet_openmm_embedding_prepare_cuda", [&] {
    AtomArgs<scalar_t> g;
    g.a = s.data_ptr<scalar_t>();
    g.row_in = e.data_ptr<scalar_t>();
    g.u = x.data_ptr<scalar_t>();
    g.row_out = sq.data_ptr<scalar_t>();
    launch_atom_step<AtomStep::kEmbeddingPrepare>(g, s);
  });
  return {x, sq};
}

at::Tensor embedding_prepare_grad(const at::Tensor& x, const at::Tensor& g_x,
                                  const at::Tensor& g_sq) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor g_s = at::empty_like(x, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tensornet_openmm_embedding_prepare_grad_cuda", [&] {
    AtomArgs<scalar_t> g;
    g.a = x.data_ptr<scalar_t>();
    g.b = const_data_or_null<scalar_t>(g_x);
    g.row_in = const_data_or_null<scalar_t>(g_sq);
    g.u = g_s.data_ptr<scalar_t>();
    launch_atom_step<AtomStep::kEmbeddingPrepareGrad>(g, x);
  });
  return g_s;
}

// rows of unit stride, one row of z after another or further apart
static at::Tensor unit_rows(const at::Tensor& t) {
  return t.dim() == 2 && t.stride(1) == 1 && t.stride(0) >= t.size(1) ? t : t.contiguous();
}

void activate_scaled(int64_t activation, const at::Tensor& z_in, const at::Tensor& scale_in,
                     const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor z = unit_rows(z_in), scale = scale_in.contiguous();
  TORCH_CHECK(out.is_contiguous(), "activate_scaled: the output must be contiguous");
  const int64_t rows = z.size(0), width = z.size(1);
  if (rows * width == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "tensornet_openmm_activate_scaled_cuda", [&] {
    activate_scaled_kernel<scalar_t><<<blocks_for(rows * width), kThreads, 0, stream>>>(
        static_cast<int>(activation), z.data_ptr<scalar_t>(), z.stride(0),
        scale.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, width);
  });
  check_launch();
}

// The gradient at the pre-activation; the scale's written into g_scale (rows, 1), contiguous, if
// it is defined (no copy from a tensor of its own).
// (into d_out, rows of unit stride, if it is defined)
at::Tensor activate_scaled_grad(int64_t activation, const at::Tensor& g_in, const at::Tensor& z_in,
                                const at::Tensor& scale_in, at::Tensor g_scale, at::Tensor d_out) {
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor g = g_in.contiguous(), z = unit_rows(z_in), scale = scale_in.contiguous();
  const int64_t rows = z.size(0), width = z.size(1);
  TORCH_CHECK(!d_out.defined() || (d_out.sizes() == z.sizes() && d_out.stride(1) == 1 &&
                                   d_out.stride(0) >= width),
              "activate_scaled_grad: the output must be ", z.sizes(), " in rows of unit stride");
  at::Tensor d = d_out.defined() ? d_out : at::empty_like(z, at::MemoryFormat::Contiguous);
  TORCH_CHECK(!g_scale.defined() || (g_scale.is_contiguous() && g_scale.numel() == rows),
              "activate_scaled_grad: the scale's gradient must be contiguous, one per row");
  if (rows == 0) return d;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows_per_block = kThreads / 32;
  const int blocks = static_cast<int>((rows + rows_per_block - 1) / rows_per_block);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "tensornet_openmm_activate_scaled_grad_cuda", [&] {
    activate_scaled_grad_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        static_cast<int>(activation), g.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), z.stride(0),
        scale.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(), d.stride(0),
        data_or_null<scalar_t>(g_scale), rows, width);
  });
  check_launch();
  return d;
}

// ---- Small networks: launchers --------------------------------------------------------------
namespace {

bool small_networks_enabled() {  // TENSORNET_OPENMM_SMALL_NETWORKS=0 turns the kernels off
  static const bool enabled = [] {
    const char* v = std::getenv("TENSORNET_OPENMM_SMALL_NETWORKS");
    return v == nullptr || std::string(v) != "0";
  }();
  return enabled;
}

// the networks' shape from the first layer's and the further layers' weights
NetShape net_shape(int64_t rows, int64_t k, int64_t t0, int64_t proj, int64_t networks,
                   at::TensorList weights) {
  NetShape s{rows, k, t0, proj, 0, networks, 0, 0, 0, 0};
  s.first = networks > 0 ? (t0 - proj) / networks : 0;
  s.depth = networks > 0 ? static_cast<int64_t>(weights.size()) / networks : 0;
  for (int64_t q = 0; q < static_cast<int64_t>(weights.size()); ++q) {
    const int64_t width = weights[q].size(0);
    s.widest = std::max(s.widest, width);
    if (s.depth > 0 && q % s.depth == s.depth - 1) {
      s.last = std::max(s.last, width);
    } else {
      s.mid = std::max(s.mid, width);
    }
  }
  return s;
}

// an attribute of the current device, asked once per device (no synchronisation); `outside`
// for a device index beyond the first 64
template <cudaDeviceAttr A>
int device_attribute(int outside) {
  static int values[64] = {};
  static bool asked[64] = {};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 0 || device >= 64) return outside;
  if (!asked[device]) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&values[device], A, device));
    asked[device] = true;
  }
  return values[device];
}

// the current device's multiprocessors
int64_t multiprocessors() {
  const int count = device_attribute<cudaDevAttrMultiProcessorCount>(132);
  return count > 0 ? count : 1;
}

// A launcher's setting, read from the environment: one of ``allowed`` (unset or empty: the
// default); any other value is an error that names the variable, the value and the choices
int64_t setting(const char* name, std::initializer_list<int64_t> allowed, int64_t fallback,
                const char* what) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  const std::string text(v);
  std::string choices;
  for (const int64_t choice : allowed) {
    if (text == std::to_string(choice)) return choice;
    choices += (choices.empty() ? "" : ", ") + std::to_string(choice);
  }
  TORCH_CHECK(false, name, "='", text, "' is not ", what, ": give one of ", choices,
              ", or leave it unset for ", fallback);
  return fallback;  // (not reached: TORCH_CHECK throws)
}

// TENSORNET_OPENMM_NETWORK_BACKWARD_THREADS: 256, 512 or 1024 (the default, kNetBackwardThreads)
int backward_threads_setting() {
  static const int threads = static_cast<int>(
      setting("TENSORNET_OPENMM_NETWORK_BACKWARD_THREADS", {256, 512, 1024}, kNetBackwardThreads,
              "a block size of the small networks' backward"));
  return threads;
}

// TENSORNET_OPENMM_NETWORK_TILE_BYTES: 64 or 128 (the default, kTileRowBytes)
size_t tile_bytes_setting() {
  static const size_t bytes = static_cast<size_t>(
      setting("TENSORNET_OPENMM_NETWORK_TILE_BYTES", {64, 128}, kTileRowBytes,
              "a width of the small networks' weight tiles"));
  return bytes;
}

// A block's threads: the forward's kThreads; the backward's setting, or kThreads where a row's
// shared memory at that setting would not fit (the widest networks in double)
int block_threads(const NetShape& s, bool backward, size_t bytes) {
  if (!backward) return kThreads;
  const int threads = backward_threads_setting();
  return backward_shared(s, 1, bytes, threads) <= kNetworkShared ? threads : kThreads;
}

// the shared memory of a block of r rows, as launched (tangent: the forward with the rows'
// derivatives, twice the rows' shared memory)
size_t block_shared(const NetShape& s, int r, bool backward, size_t bytes, bool tangent = false) {
  return backward ? backward_shared(s, r, bytes, block_threads(s, true, bytes))
                  : forward_shared(s, tangent ? 2 * r : r, bytes, tile_bytes_setting());
}

// The shared memory a block of the tangent forward may take: up to kTangentShared where the
// device lets a kernel opt in to more than the default 48 KB. The derivatives' rows double the rows' part of a block's shared memory: in
// 48 KB alanine dipeptide's radial networks would run 2 rows a block, 464 blocks, about two
// waves of two blocks a multiprocessor, where the plain forward runs 4 rows in 232 blocks (one
// wave); in 56 KB the tangent forward runs 4 rows too.
constexpr size_t kTangentShared = 96 * 1024;

size_t tangent_shared_limit() {
  const int optin = device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(0);
  return std::max(kNetworkShared, std::min(kTangentShared, static_cast<size_t>(optin)));
}

// A tangent forward kernel's limit of dynamic shared memory raised to tangent_shared_limit(),
// once per device (raised: the kernel's flags by device), so in the eager calls before a CUDA
// graph is captured
template <typename K>
void raise_shared_limit(K kernel, bool* raised) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device >= 0 && device < 64 && raised[device]) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(tangent_shared_limit())));
  if (device >= 0 && device < 64) raised[device] = true;
}

// Rows per block: the most (up to 8; the tangent forward's up to 4, whose 8 accumulators a
// thread are the plain one's at 8) that still give half the GPU's multiprocessors a block,
// within the shared memory; 0 if not even one row fits.
int rows_per_block(const NetShape& s, int64_t columns, bool backward, size_t bytes,
                   bool tangent = false) {
  const int64_t sms = multiprocessors();
  const size_t limit = tangent ? tangent_shared_limit() : kNetworkShared;
  for (int r : {8, 4, 2, 1}) {
    if (tangent && r > 4) continue;
    if (block_shared(s, r, backward, bytes, tangent) > limit) continue;
    if (r == 1 || (s.rows + r - 1) / r * columns >= (sms + 1) / 2) return r;
  }
  return 0;
}

template <typename T>
NetArgs<T> net_args(const NetShape& s, int64_t activation, const at::Tensor& scale,
                    const at::Tensor& w0, at::TensorList weights, const at::Tensor& z0,
                    at::TensorList z) {
  NetArgs<T> a;
  a.scale = scale.numel() > 0 ? scale.data_ptr<T>() : nullptr;
  a.rows = s.rows;
  a.k = s.k;
  a.w0 = w0.data_ptr<T>();
  a.z0 = z0.defined() ? z0.data_ptr<T>() : nullptr;  // (the tangent forward keeps no z)
  a.t0 = s.t0;
  a.proj = s.proj;
  a.first = s.first;
  a.networks = static_cast<int>(s.networks);
  a.depth = static_cast<int>(s.depth);
  a.activation = static_cast<int>(activation & 3);  // mlp's code: + 4, none after the last
  a.last_activation = (activation & 4) != 0 ? 2 : a.activation;
  a.mid = s.mid;
  a.widest = s.widest;
  for (size_t q = 0; q < weights.size(); ++q) {
    a.w[q] = weights[q].data_ptr<T>();
    a.z[q] = q < z.size() ? z[q].data_ptr<T>() : nullptr;
    a.width[q] = weights[q].size(0);
  }
  return a;
}

template <typename T, int R>
void launch_network(const NetArgs<T>& a, bool backward, int64_t columns, size_t shared,
                    int threads) {
  const dim3 grid(static_cast<unsigned>((a.rows + R - 1) / R), static_cast<unsigned>(columns));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kNarrow = static_cast<int>(64 / sizeof(T));  // a tile's columns
  constexpr int kWide = static_cast<int>(kTileRowBytes / sizeof(T));
  if constexpr (R <= 4) {
    if (a.tx != nullptr) {  // the tangent forward
      static bool raised[2][64] = {};  // (this R's two kernels, by device)
      if (tile_bytes_setting() == 64) {
        if (shared > kNetworkShared) {
          raise_shared_limit(network_forward_kernel<T, R, kNarrow, true>, raised[0]);
        }
        network_forward_kernel<T, R, kNarrow, true><<<grid, kThreads, shared, stream>>>(a);
      } else {
        if (shared > kNetworkShared) {
          raise_shared_limit(network_forward_kernel<T, R, kWide, true>, raised[1]);
        }
        network_forward_kernel<T, R, kWide, true><<<grid, kThreads, shared, stream>>>(a);
      }
      check_launch();
      return;
    }
  }
  TORCH_CHECK(a.tx == nullptr, "small networks: the tangent forward takes at most 4 rows a block");
  if (backward) {
    network_backward_kernel<T, R><<<grid, threads, shared, stream>>>(a);
  } else if (tile_bytes_setting() == 64) {
    network_forward_kernel<T, R, kNarrow><<<grid, kThreads, shared, stream>>>(a);
  } else {
    network_forward_kernel<T, R, kWide><<<grid, kThreads, shared, stream>>>(a);
  }
  check_launch();
}

template <typename T>
void launch_network_rows(const NetArgs<T>& a, const NetShape& s, bool backward, int64_t columns) {
  const bool tangent = a.tx != nullptr;
  const int r = rows_per_block(s, columns, backward, sizeof(T), tangent);
  const int threads = block_threads(s, backward, sizeof(T));
  const size_t shared = block_shared(s, r, backward, sizeof(T), tangent);
  switch (r) {
    case 8: launch_network<T, 8>(a, backward, columns, shared, threads); break;
    case 4: launch_network<T, 4>(a, backward, columns, shared, threads); break;
    case 2: launch_network<T, 2>(a, backward, columns, shared, threads); break;
    default: launch_network<T, 1>(a, backward, columns, shared, threads); break;
  }
}

}  // namespace

// Whether the networks (their shapes checked by the caller) run as the small-network kernels:
// CUDA, at most kNetworkRows rows and kNetLayers further layers, contiguous weights and biases,
// and shared memory for a row each way.
bool small_network(const at::Tensor& x, const at::Tensor& w0, const at::Tensor& b0, int64_t proj,
                   int64_t networks, at::TensorList weights, at::TensorList biases) {
  if (!x.is_cuda() || !small_networks_enabled()) return false;
  const int64_t rows = x.size(0), layers = static_cast<int64_t>(weights.size());
  const int64_t t0 = w0.size(0);
  if (!tn_math::small_network_shape(rows, layers, networks) || proj < 0 ||
      (t0 - proj) % networks != 0 || t0 - proj < networks) {
    return false;
  }
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) return false;
  bool contiguous = w0.is_contiguous() && b0.is_contiguous();
  for (const at::Tensor& t : weights) contiguous = contiguous && t.is_contiguous();
  for (const at::Tensor& t : biases) contiguous = contiguous && t.is_contiguous();
  if (!contiguous) return false;
  const c10::cuda::CUDAGuard guard(x.device());
  const NetShape s = net_shape(rows, x.size(1), t0, proj, networks, weights);
  const size_t bytes = x.element_size();
  return rows_per_block(s, networks * forward_chunks(s), false, bytes) > 0 &&
         rows_per_block(s, 1, true, bytes) > 0;
}

// The networks' outputs (out_proj, outs: one per network) and every layer's pre-activations (z0,
// z), all contiguous and made by the caller; weights as small_network accepted them.
void network_forward(const at::Tensor& x_in, const at::Tensor& scale_in, const at::Tensor& w0,
                     const at::Tensor& b0, int64_t proj, int64_t networks,
                     at::TensorList weights, at::TensorList biases, int64_t activation,
                     const at::Tensor& z0, at::TensorList z, const at::Tensor& out_proj,
                     at::TensorList outs) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), scale = scale_in.contiguous();
  const NetShape s = net_shape(x.size(0), x.size(1), w0.size(0), proj, networks, weights);
  const int64_t columns = networks * forward_chunks(s);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tensornet_openmm_network_forward_cuda", [&] {
    NetArgs<scalar_t> a = net_args<scalar_t>(s, activation, scale, w0, weights, z0, z);
    a.x = x.data_ptr<scalar_t>();
    a.b0 = b0.data_ptr<scalar_t>();
    a.chunks = static_cast<int>(forward_chunks(s));
    a.out_proj = proj > 0 ? out_proj.data_ptr<scalar_t>() : nullptr;
    for (size_t q = 0; q < weights.size(); ++q) a.b[q] = biases[q].data_ptr<scalar_t>();
    for (int64_t n = 0; n < networks; ++n) a.out[n] = outs[n].data_ptr<scalar_t>();
    launch_network_rows(a, s, false, columns);
  });
}

// The gradients g_x (rows, k) and g_scale (rows), contiguous, where defined, from the outputs'
// (undefined: zero; columns of unit stride or one column, rows any stride apart).
void network_backward(const at::Tensor& scale_in, const at::Tensor& w0, int64_t proj,
                      int64_t networks, at::TensorList weights, int64_t activation,
                      const at::Tensor& z0, at::TensorList z, const at::Tensor& g_proj,
                      at::TensorList g_outs, const at::Tensor& g_x, const at::Tensor& g_scale,
                      int64_t k) {
  const c10::cuda::CUDAGuard guard(z0.device());
  const at::Tensor scale = scale_in.contiguous();
  const NetShape s = net_shape(z0.size(0), k, w0.size(0), proj, networks, weights);
  AT_DISPATCH_FLOATING_TYPES(z0.scalar_type(), "tensornet_openmm_network_backward_cuda", [&] {
    NetArgs<scalar_t> a = net_args<scalar_t>(s, activation, scale, w0, weights, z0, z);
    a.g_proj = g_proj.defined() ? g_proj.data_ptr<scalar_t>() : nullptr;
    a.ld_g_proj = g_proj.defined() ? g_proj.stride(0) : 0;
    for (int64_t n = 0; n < networks; ++n) {
      a.g_out[n] = g_outs[n].defined() ? g_outs[n].data_ptr<scalar_t>() : nullptr;
      a.ld_g[n] = g_outs[n].defined() ? g_outs[n].stride(0) : 0;
    }
    a.g_x = g_x.defined() ? g_x.data_ptr<scalar_t>() : nullptr;
    a.g_scale = g_scale.defined() ? g_scale.data_ptr<scalar_t>() : nullptr;
    launch_network_rows(a, s, true, 1);
  });
}

// Whether the tangent forward (network_tangent_forward) runs these networks: as small_network,
// with the shared memory of the rows' derivatives too
bool small_tangent_network(const at::Tensor& x, const at::Tensor& w0, const at::Tensor& b0,
                           int64_t proj, int64_t networks, at::TensorList weights,
                           at::TensorList biases) {
  if (!small_network(x, w0, b0, proj, networks, weights, biases)) return false;
  const c10::cuda::CUDAGuard guard(x.device());
  const NetShape s = net_shape(x.size(0), x.size(1), w0.size(0), proj, networks, weights);
  return rows_per_block(s, networks * forward_chunks(s), false, x.element_size(), true) > 0;
}

// The networks' outputs (out_proj, outs) and their derivatives d/dr side by side in ``tan``
// (rows, proj + each network's last width), from x and tx = dx/dr (rows, k) and the scale and
// its derivative (rows); all contiguous, made by the caller
void network_tangent_forward(const at::Tensor& x_in, const at::Tensor& tx_in,
                             const at::Tensor& scale_in, const at::Tensor& tscale_in,
                             const at::Tensor& w0, const at::Tensor& b0, int64_t proj,
                             int64_t networks, at::TensorList weights, at::TensorList biases,
                             int64_t activation, const at::Tensor& out_proj, at::TensorList outs,
                             const at::Tensor& tan) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), tx = tx_in.contiguous();
  const at::Tensor scale = scale_in.contiguous(), tscale = tscale_in.contiguous();
  const NetShape s = net_shape(x.size(0), x.size(1), w0.size(0), proj, networks, weights);
  const int64_t columns = networks * forward_chunks(s);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tensornet_openmm_network_tangent_cuda", [&] {
    NetArgs<scalar_t> a = net_args<scalar_t>(s, activation, scale, w0, weights, at::Tensor(), {});
    a.x = x.data_ptr<scalar_t>();
    a.tx = tx.data_ptr<scalar_t>();
    a.tscale = scale.numel() > 0 ? tscale.data_ptr<scalar_t>() : nullptr;
    a.b0 = b0.data_ptr<scalar_t>();
    a.chunks = static_cast<int>(forward_chunks(s));
    a.out_proj = proj > 0 ? out_proj.data_ptr<scalar_t>() : nullptr;
    a.ld_t = tan.stride(0);
    a.t_proj = tan.data_ptr<scalar_t>();
    int64_t offset = proj;
    for (size_t q = 0; q < weights.size(); ++q) a.b[q] = biases[q].data_ptr<scalar_t>();
    for (int64_t n = 0; n < networks; ++n) {
      a.out[n] = outs[n].data_ptr<scalar_t>();
      a.t_out[n] = tan.data_ptr<scalar_t>() + offset;
      offset += outs[n].size(1);
    }
    launch_network_rows(a, s, false, columns);
  });
}

// h = act(z) s, th = act'(z) t s + act(z) ts (scale empty: s = 1, ts = 0); rows of unit-stride
// columns, any distance apart
void tangent_activate(int64_t activation, const at::Tensor& z, const at::Tensor& t,
                      const at::Tensor& scale_in, const at::Tensor& tscale_in, const at::Tensor& h,
                      const at::Tensor& th) {
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t rows = z.size(0), width = z.size(1);
  if (rows * width == 0) return;
  const at::Tensor scale = scale_in.contiguous(), tscale = tscale_in.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "tensornet_openmm_tangent_activate_cuda", [&] {
    const bool scaled = scale.numel() > 0;
    tangent_activate_kernel<scalar_t><<<blocks_for(rows * width), kThreads, 0, stream>>>(
        static_cast<int>(activation), z.data_ptr<scalar_t>(), z.stride(0),
        t.data_ptr<scalar_t>(), t.stride(0), scaled ? scale.data_ptr<scalar_t>() : nullptr,
        scaled ? tscale.data_ptr<scalar_t>() : nullptr, h.data_ptr<scalar_t>(), h.stride(0),
        th.data_ptr<scalar_t>(), th.stride(0), rows, width);
  });
  check_launch();
}

// The pair vectors' gradient: u sum_o g_o . tan_o (g_outs: each output's gradient or
// undefined, columns of unit stride; tan: their derivatives side by side) plus geometry_grad's
// from the cutoff's and the geometry's (each undefined: zero)
at::Tensor tangent_grad(const at::Tensor& vec, const at::Tensor& centers, const at::Tensor& widths_,
                        int64_t kind, double alpha, double basis_lower, double lower, double upper,
                        const at::Tensor& g_cut_in, const at::Tensor& g_geom_in,
                        at::TensorList g_outs, at::IntArrayRef widths, const at::Tensor& tan) {
  const c10::cuda::CUDAGuard guard(vec.device());
  const int64_t rows = vec.size(0);
  at::Tensor g_vec = at::empty({rows, 3}, vec.options());
  if (rows == 0) return g_vec;
  TORCH_CHECK(static_cast<int64_t>(g_outs.size()) <= kNetLayers + 1,
              "tangent_radial_networks: at most ", kNetLayers + 1, " outputs");
  const at::Tensor v = vec.contiguous();
  const at::Tensor g_cut = g_cut_in.defined() ? g_cut_in.contiguous() : at::Tensor();
  const at::Tensor g_geom = g_geom_in.defined() ? g_geom_in.contiguous() : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "tensornet_openmm_tangent_grad_cuda", [&] {
    const tn_math::GeometryParams<scalar_t> geo(kind, alpha, basis_lower, lower, upper,
                                                centers.data_ptr<scalar_t>(),
                                                widths_.data_ptr<scalar_t>(), centers.size(0));
    TangentArgs<scalar_t> a;
    a.g_cut = const_data_or_null<scalar_t>(g_cut);
    a.g_geom = const_data_or_null<scalar_t>(g_geom);
    a.outputs = static_cast<int>(g_outs.size());
    for (size_t o = 0; o < g_outs.size(); ++o) {
      a.g[o] = g_outs[o].defined() ? g_outs[o].data_ptr<scalar_t>() : nullptr;
      a.ld_g[o] = g_outs[o].defined() ? g_outs[o].stride(0) : 0;
      a.width[o] = widths[o];
    }
    a.tan = tan.data_ptr<scalar_t>();
    a.ld_t = tan.stride(0);
    a.vec = v.data_ptr<scalar_t>();
    a.g_vec = g_vec.data_ptr<scalar_t>();
    a.rows = rows;
    const int64_t per_block = kThreads / 32;  // a warp per pair
    const auto blocks = static_cast<unsigned>((rows + per_block - 1) / per_block);
    tangent_grad_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(a, geo);
  });
  check_launch();
  return g_vec;
}

// ---- Channel mixing of a few atoms: launcher ---------------------------------------------------
namespace {
bool small_mix_enabled() {  // TENSORNET_OPENMM_SMALL_MIX=0: cuBLAS's batched product instead
  static const bool enabled = [] {
    const char* v = std::getenv("TENSORNET_OPENMM_SMALL_MIX");
    return v == nullptr || std::string(v) != "0";
  }();
  return enabled;
}
}  // namespace

// Whether component_mix of p (atoms, 10, F) runs as small_mix_kernel: CUDA, float or double,
// at most tn_math::kSmallMixAtoms atoms (a small molecule, whose products are latency-bound;
// cuBLAS's tiles fill the GPU from a few thousand)
bool small_mix(const at::Tensor& p) {
  return p.is_cuda() && small_mix_enabled() && p.dim() == 3 &&
         p.size(0) <= tn_math::kSmallMixAtoms &&
         (p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble);
}

// out (atoms, 10, w.size(2)) with out[:, c] = p[:, c] @ w[c]: w any (10, F, F') view. With
// gates (atoms, 3, F), contiguous: gate_in multiplies p's rows by them (part by part), or
// gate_out the outputs, whose values before it go into plain (made here)
at::Tensor mix(const at::Tensor& p_in, const at::Tensor& w, const at::Tensor& gate_in,
               const at::Tensor& gate_out, at::Tensor* plain) {
  const c10::cuda::CUDAGuard guard(p_in.device());
  const at::Tensor p = p_in.contiguous();
  const int64_t atoms = p.size(0), f_in = p.size(2), f_out = w.size(2);
  at::Tensor out = at::empty({atoms, kComps, f_out}, p.options());
  if (plain != nullptr) *plain = at::empty_like(out);
  if (atoms == 0 || f_out == 0) return out;
  const int64_t atom_blocks = (atoms + kMixAtoms - 1) / kMixAtoms;
  const dim3 grid(static_cast<unsigned>(kComps * atom_blocks),
                  static_cast<unsigned>((f_out + kMixOut - 1) / kMixOut));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "tensornet_openmm_mix_cuda", [&] {
    MixArgs<scalar_t> a;
    a.p = p.data_ptr<scalar_t>();
    a.w = w.data_ptr<scalar_t>();
    a.out = out.data_ptr<scalar_t>();
    a.atoms = atoms;
    a.f_in = f_in;
    a.f_out = f_out;
    a.ws_c = w.stride(0);
    a.ws_k = w.stride(1);
    a.ws_o = w.stride(2);
    a.gate_in = gate_in.defined() ? gate_in.data_ptr<scalar_t>() : nullptr;
    a.gate_out = gate_out.defined() ? gate_out.data_ptr<scalar_t>() : nullptr;
    a.plain = plain != nullptr ? plain->data_ptr<scalar_t>() : nullptr;
    small_mix_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(a);
  });
  check_launch();
  return out;
}

// gated_mix's gradient of its gates (atoms, 3, F) from the outputs' (atoms, 10, F) and the
// values before the gates (plain), both contiguous
at::Tensor gate_grad(const at::Tensor& grad, const at::Tensor& plain) {
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t atoms = grad.size(0), f_len = grad.size(2);
  at::Tensor out = at::empty({atoms, kParts, f_len}, grad.options());
  if (atoms * f_len == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "tensornet_openmm_gate_grad_cuda", [&] {
    gate_grad_kernel<scalar_t><<<blocks_for(atoms * f_len), kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), plain.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), atoms,
        f_len);
  });
  check_launch();
  return out;
}

at::Tensor pair_difference(const at::Tensor& pos, const at::Tensor& src, const at::Tensor& dst,
                           double scale, const at::Tensor& box, double min_width) {
  const c10::cuda::CUDAGuard guard(pos.device());
  const int64_t pairs = src.size(0);
  at::Tensor out = at::empty({pairs, 3}, pos.options());
  if (pairs == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(pos.scalar_type(), "tensornet_openmm_pair_difference_cuda", [&] {
    pair_difference_kernel<scalar_t><<<blocks_for(pairs), kThreads, 0, stream>>>(
        pos.data_ptr<scalar_t>(), src.data_ptr<int64_t>(), dst.data_ptr<int64_t>(),
        static_cast<scalar_t>(scale), box.numel() > 0 ? box.data_ptr<scalar_t>() : nullptr,
        static_cast<scalar_t>(min_width), out.data_ptr<scalar_t>(), pairs, pos.size(0));
  });
  check_launch();
  return out;
}

at::Tensor pair_difference_grad(const at::Tensor& grad, const at::Tensor& src,
                                const at::Tensor& dst, int64_t atoms, double scale,
                                const at::Tensor& box, double min_width) {
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t pairs = src.size(0);
  at::Tensor out = at::empty({atoms, 3}, grad.options());
  if (atoms == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "tensornet_openmm_pair_difference_grad_cuda", [&] {
    difference_grad_fill_kernel<scalar_t><<<blocks_for(3 * atoms), kThreads, 0, stream>>>(
        out.data_ptr<scalar_t>(), 3 * atoms,
        box.numel() > 0 ? box.data_ptr<scalar_t>() : nullptr, static_cast<scalar_t>(scale),
        static_cast<scalar_t>(min_width));
    if (pairs == 0) return;
    pair_difference_grad_kernel<scalar_t><<<blocks_for(3 * pairs), kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), src.data_ptr<int64_t>(), dst.data_ptr<int64_t>(),
        static_cast<scalar_t>(scale), out.data_ptr<scalar_t>(), pairs);
  });
  check_launch();
  return out;
}

// The pair search (pair_ops.cpp): count, the counts' sums, write, pad. The dynamic mode reads
// the total back to size its outputs (one host synchronisation); a fixed capacity does not.
std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_search(const at::Tensor& pos,
                                                           const at::Tensor& order,
                                                           const at::Tensor& start,
                                                           const at::Tensor& end, double cutoff,
                                                           const at::Tensor& box,
                                                           int64_t capacity, bool half) {
  const c10::cuda::CUDAGuard guard(pos.device());
  const int64_t atoms = pos.size(0), ranges = start.size(1), listed = order.size(0);
  const auto index_options = order.options();
  if (atoms == 0) {  // (dynamic: a fixed capacity needs atoms, checked before)
    return {at::empty({2, 0}, index_options), at::empty({0, 3}, pos.options()),
            at::zeros({}, index_options)};
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor counts = at::empty({atoms}, index_options);
  at::Tensor ends, pairs, shift;
  at::Tensor count = at::empty({}, index_options);
  AT_DISPATCH_FLOATING_TYPES(pos.scalar_type(), "tensornet_openmm_pair_search_cuda", [&] {
    const scalar_t* x = pos.data_ptr<scalar_t>();
    const scalar_t* b = box.numel() > 0 ? box.data_ptr<scalar_t>() : nullptr;
    const scalar_t cutoff2 = static_cast<scalar_t>(cutoff * cutoff);
    const int blocks = blocks_for(atoms * 32);
    pair_search_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        x, order.data_ptr<int64_t>(), start.data_ptr<int64_t>(), end.data_ptr<int64_t>(), atoms,
        ranges, listed, b, cutoff2, half, counts.data_ptr<int64_t>(), nullptr, nullptr, nullptr,
        0);
    check_launch();
    ends = at::cumsum(counts, 0);
    const int64_t slots = capacity >= 0 ? capacity : ends[atoms - 1].item<int64_t>();
    pairs = at::empty({2, slots}, index_options);
    shift = at::empty({slots, 3}, pos.options());
    if (slots > 0) {
      pair_search_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          x, order.data_ptr<int64_t>(), start.data_ptr<int64_t>(), end.data_ptr<int64_t>(),
          atoms, ranges, listed, b, cutoff2, half, counts.data_ptr<int64_t>(),
          ends.data_ptr<int64_t>(), pairs.data_ptr<int64_t>(), shift.data_ptr<scalar_t>(), slots);
      check_launch();
    }
    pair_padding_kernel<scalar_t><<<blocks_for(slots), kThreads, 0, stream>>>(
        ends.data_ptr<int64_t>(), atoms, static_cast<scalar_t>(2 * cutoff),
        pairs.data_ptr<int64_t>(), shift.data_ptr<scalar_t>(), slots, count.data_ptr<int64_t>());
    check_launch();
  });
  return {pairs, shift, count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> geometry(const at::Tensor& vec,
                                                        const at::Tensor& centers,
                                                        const at::Tensor& widths, int64_t kind,
                                                        double alpha, double basis_lower,
                                                        double lower, double upper) {
  const c10::cuda::CUDAGuard guard(vec.device());
  const int64_t pairs = vec.size(0), k = centers.size(0);
  at::Tensor cut = at::empty({pairs}, vec.options());
  at::Tensor geom = at::empty({pairs, tn_math::kGeometry}, vec.options());
  at::Tensor basis = at::empty({pairs, k}, vec.options());
  if (pairs == 0) return {cut, geom, basis};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "tensornet_openmm_geometry_cuda", [&] {
    const tn_math::GeometryParams<scalar_t> g(kind, alpha, basis_lower, lower, upper,
                                              centers.data_ptr<scalar_t>(),
                                              widths.data_ptr<scalar_t>(), centers.size(0));
    geometry_kernel<scalar_t><<<blocks_for(pairs), kThreads, 0, stream>>>(
        g, vec.data_ptr<scalar_t>(), cut.data_ptr<scalar_t>(), geom.data_ptr<scalar_t>(),
        basis.data_ptr<scalar_t>(), pairs);
  });
  check_launch();
  return {cut, geom, basis};
}

// (cut, its d/dr, geom, basis, its d/dr) of contiguous vectors and basis parameters
std::vector<at::Tensor> radial_tangent(const at::Tensor& vec, const at::Tensor& centers,
                                       const at::Tensor& widths, int64_t kind, double alpha,
                                       double basis_lower, double lower, double upper) {
  const c10::cuda::CUDAGuard guard(vec.device());
  const int64_t pairs = vec.size(0), k = centers.size(0);
  std::vector<at::Tensor> out = {at::empty({pairs}, vec.options()), at::empty({pairs}, vec.options()),
                                 at::empty({pairs, tn_math::kGeometry}, vec.options()),
                                 at::empty({pairs, k}, vec.options()),
                                 at::empty({pairs, k}, vec.options())};
  if (pairs == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "tensornet_openmm_radial_tangent_cuda", [&] {
    const tn_math::GeometryParams<scalar_t> g(kind, alpha, basis_lower, lower, upper,
                                              centers.data_ptr<scalar_t>(),
                                              widths.data_ptr<scalar_t>(), k);
    radial_tangent_kernel<scalar_t><<<blocks_for(pairs), kThreads, 0, stream>>>(
        g, vec.data_ptr<scalar_t>(), out[0].data_ptr<scalar_t>(), out[1].data_ptr<scalar_t>(),
        out[2].data_ptr<scalar_t>(), out[3].data_ptr<scalar_t>(), out[4].data_ptr<scalar_t>(),
        pairs);
  });
  check_launch();
  return out;
}

at::Tensor geometry_grad(const at::Tensor& vec, const at::Tensor& centers,
                         const at::Tensor& widths, int64_t kind, double alpha, double basis_lower,
                         double lower, double upper, const at::Tensor& g_cut,
                         const at::Tensor& g_geom, const at::Tensor& g_basis) {
  const c10::cuda::CUDAGuard guard(vec.device());
  const int64_t pairs = vec.size(0);
  at::Tensor g_vec = at::empty_like(vec, at::MemoryFormat::Contiguous);
  if (pairs == 0) return g_vec;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "tensornet_openmm_geometry_grad_cuda", [&] {
    const tn_math::GeometryParams<scalar_t> g(kind, alpha, basis_lower, lower, upper,
                                              centers.data_ptr<scalar_t>(),
                                              widths.data_ptr<scalar_t>(), centers.size(0));
    geometry_grad_kernel<scalar_t><<<blocks_for(pairs), kThreads, 0, stream>>>(
        g, vec.data_ptr<scalar_t>(), const_data_or_null<scalar_t>(g_cut),
        const_data_or_null<scalar_t>(g_geom), const_data_or_null<scalar_t>(g_basis),
        g_vec.data_ptr<scalar_t>(), pairs);
  });
  check_launch();
  return g_vec;
}

at::Tensor radial_table(const at::Tensor& vec, const at::Tensor& table, double a, double alpha,
                        double c, double inv_h, double lower, double upper) {
  const c10::cuda::CUDAGuard guard(vec.device());
  const int64_t pairs = vec.size(0), width = table.size(2);
  at::Tensor out = at::empty({pairs, width}, vec.options());
  if (pairs * width == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "tensornet_openmm_radial_table_cuda", [&] {
    const tn_math::TableParams<scalar_t> t(a, alpha, c, inv_h, lower, upper, table.size(0));
    radial_table_kernel<scalar_t><<<blocks_for(pairs * width), kThreads, 0, stream>>>(
        t, table.data_ptr<scalar_t>(), vec.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), pairs,
        width);
  });
  check_launch();
  return out;
}

at::Tensor radial_table_grad(const at::Tensor& grad, const at::Tensor& vec, const at::Tensor& table,
                             double a, double alpha, double c, double inv_h, double lower,
                             double upper) {
  const c10::cuda::CUDAGuard guard(vec.device());
  const int64_t pairs = vec.size(0), width = table.size(2);
  at::Tensor g_vec = at::zeros_like(vec, at::MemoryFormat::Contiguous);
  if (pairs == 0) return g_vec;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "tensornet_openmm_radial_table_grad_cuda", [&] {
    const tn_math::TableParams<scalar_t> t(a, alpha, c, inv_h, lower, upper, table.size(0));
    radial_table_grad_kernel<scalar_t><<<static_cast<unsigned>(pairs), kThreads, 0, stream>>>(
        t, table.data_ptr<scalar_t>(), vec.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
        g_vec.data_ptr<scalar_t>(), width);
  });
  check_launch();
  return g_vec;
}

}  // namespace tn_cuda

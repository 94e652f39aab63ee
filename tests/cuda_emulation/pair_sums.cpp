// The pair sums of pair_ops_cuda.cu run on the CPU (emulate.h), as their launchers run them:
// messages_kernel (with and without self_messages_kernel first), filter_grad_kernel,
// embedding_kernel, embedding_grads_kernel, the gathered sums of long pair lists
// (messages_gather_kernel, embedding_gather_kernel, embedding_species_gather_kernel, over the
// launcher's incidences), and the pair differences (pair_difference_kernel,
// difference_grad_fill_kernel, pair_difference_grad_kernel). The scattered sums onto atoms go
// through atomic adds and take runs of consecutive pairs per thread; here every run length the
// launcher can pick (1, 2, 3, 8 and run_length's own), pairs in the searches' order (sorted by
// the first atom, padded with self pairs) and shuffled, half and full lists, channel counts that
// fill no block exactly. The blocks of a launch run side by side (emulate.h's Schedule; built
// under ThreadSanitizer too, a plain write that two threads make shows).
//
// Checks, in double and float: the forward sums against a plain loop; each gradient as the
// adjoint of its forward (every sum is linear in each input, so <gradient, d> must equal the
// forward loop's sum of grad * f(d) for a random direction d). Outputs the kernels must write
// whole start as NaN. Built and run by tests/test_cuda_emulation.py. Prints one line per case and
// "N failures".
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "emulate.h"
#include "packed_math.h"

using std::exp;
using std::sqrt;
using std::tanh;

namespace {
#include "kernels.inc"

using V = std::vector<double>;
constexpr int kGroup[kComps] = {0, 1, 1, 1, 2, 2, 2, 2, 2, 2};
constexpr double kSign[kComps] = {1, -1, -1, -1, 1, 1, 1, 1, 1, 1};  // transposed: A flips

// a kernel with barriers: every block at once if the grid's threads are few enough for one
// thread each
emu::Schedule with_barriers(int64_t blocks, int64_t threads) {
  return blocks * threads <= 4096 ? emu::Schedule::kGrid : emu::Schedule::kBlocks;
}
constexpr emu::Schedule kFree = emu::Schedule::kWorkers;  // kernels with no barrier

template <typename T>
std::vector<T> as(const V& v) {
  return std::vector<T>(v.begin(), v.end());
}

struct Pairs {
  std::vector<int64_t> src, dst;
  int64_t atoms = 0;
  bool half = true;
};

// about ``density`` of the candidate pairs, first atom ascending as the searches give them (or
// shuffled), then ``pad`` self pairs (k mod atoms)
Pairs make_pairs(std::mt19937_64& rng, int64_t atoms, bool half, double density, bool shuffled,
                 int64_t pad) {
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  Pairs p;
  p.atoms = atoms;
  p.half = half;
  for (int64_t i = 0; i < atoms; ++i) {
    for (int64_t j = 0; j < atoms; ++j) {
      if ((half ? i < j : i != j) && unit(rng) < density) {
        p.src.push_back(i);
        p.dst.push_back(j);
      }
    }
  }
  if (shuffled) {
    std::vector<size_t> order(p.src.size());
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    Pairs q = p;
    for (size_t k = 0; k < order.size(); ++k) {
      q.src[k] = p.src[order[k]];
      q.dst[k] = p.dst[order[k]];
    }
    p = q;
  }
  const int64_t real = static_cast<int64_t>(p.src.size());
  for (int64_t k = real; k < real + pad; ++k) {
    p.src.push_back(k % atoms);
    p.dst.push_back(k % atoms);
  }
  return p;
}

// the launcher's incidences (pair_ops_cuda.cu, incidences): its kernels (count, fill, rank per
// incidence) with the prefix sum between them on the host
struct Incidences {
  std::vector<int64_t> order, starts;
  GatherList list(const Pairs& q, int64_t f_len) const {
    return {q.src.data(), q.dst.data(), order.data(), starts.data(),
            static_cast<int64_t>(q.src.size()), f_len, q.atoms};
  }
};
Incidences incidences(const Pairs& q) {
  const int64_t pairs = static_cast<int64_t>(q.src.size()), count = q.half ? 2 * pairs : pairs;
  const int64_t atoms = q.atoms;
  std::vector<int64_t> counts(atoms + 1, 0);
  Incidences r;
  r.order.assign(count, -1);
  const unsigned blocks = static_cast<unsigned>(blocks_for(count));
  emu::launch(blocks, 1, kThreads, 0, [&] {
    incidence_count_kernel(q.src.data(), q.dst.data(), pairs, count, atoms, counts.data());
  }, emu::Schedule::kWorkers);
  r.starts.resize(atoms + 1);
  std::partial_sum(counts.begin(), counts.end(), r.starts.begin());
  std::vector<int64_t> cursor = r.starts, scratch(count, -1);
  emu::launch(blocks, 1, kThreads, 0, [&] {
    incidence_fill_kernel(q.src.data(), q.dst.data(), pairs, count, cursor.data(),
                          scratch.data());
  }, emu::Schedule::kWorkers);
  emu::launch(blocks, 1, kThreads, 0, [&] {
    incidence_rank_kernel(q.src.data(), q.dst.data(), pairs, count, r.starts.data(),
                          scratch.data(), r.order.data());
  }, emu::Schedule::kWorkers);
  return r;
}

// the same from a stable sort of [src, dst] (of src for a full list): the kernels' result must
// be this, entry for entry
bool incidences_as_sorted(const Pairs& q, const Incidences& got) {
  std::vector<int64_t> keys = q.src;
  if (q.half) keys.insert(keys.end(), q.dst.begin(), q.dst.end());
  std::vector<int64_t> order(keys.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return keys[a] < keys[b]; });
  std::vector<int64_t> starts;
  for (int64_t n = 0; n <= q.atoms; ++n) {
    starts.push_back(std::count_if(keys.begin(), keys.end(), [n](int64_t k) { return k < n; }));
  }
  return order == got.order && starts == got.starts;
}

V random(std::mt19937_64& rng, size_t n) {
  std::normal_distribution<double> normal;
  V v(n);
  for (double& x : v) x = normal(rng);
  return v;
}

// messages: out[i, c] += filt[p, GROUP[c]] y[j, c] (and out[j, c] += ... y[i, c] when half)
V messages_ref(const Pairs& q, const V& y, const V& filt, int64_t f_len) {
  V out(q.atoms * kComps * f_len, 0.0);
  for (size_t p = 0; p < q.src.size(); ++p) {
    const int64_t i = q.src[p], j = q.dst[p];
    for (int c = 0; c < kComps; ++c) {
      for (int64_t f = 0; f < f_len; ++f) {
        const double w = filt[(p * kParts + kGroup[c]) * f_len + f];
        out[(i * kComps + c) * f_len + f] += w * y[(j * kComps + c) * f_len + f];
        if (q.half) out[(j * kComps + c) * f_len + f] += w * y[(i * kComps + c) * f_len + f];
      }
    }
  }
  return out;
}

// the embedding's sums: out[i, c] += radial[p, GROUP[c]] (recv[i] + send[j]) geom[p, c], and when
// half out[j, c] += radial[p, GROUP[c]] (recv[j] + send[i]) SIGN[c] geom[p, c]
V embedding_ref(const Pairs& q, const V& radial, const V& recv, const V& send, const V& geom,
                int64_t f_len) {
  V out(q.atoms * kComps * f_len, 0.0);
  for (size_t p = 0; p < q.src.size(); ++p) {
    const int64_t i = q.src[p], j = q.dst[p];
    for (int c = 0; c < kComps; ++c) {
      for (int64_t f = 0; f < f_len; ++f) {
        const double r = radial[(p * kParts + kGroup[c]) * f_len + f];
        out[(i * kComps + c) * f_len + f] +=
            r * (recv[i * f_len + f] + send[j * f_len + f]) * geom[p * kComps + c];
        if (q.half) {
          out[(j * kComps + c) * f_len + f] += r * (recv[j * f_len + f] + send[i * f_len + f]) *
                                               kSign[c] * geom[p * kComps + c];
        }
      }
    }
  }
  return out;
}

// a sum and the sum of its terms' sizes, for the tolerance
struct Dot {
  double value = 0, size = 0;
};
template <typename A, typename B>
Dot dot(const A& a, const B& b) {
  Dot d;
  for (size_t k = 0; k < a.size(); ++k) {
    d.value += double(a[k]) * double(b[k]);
    d.size += std::fabs(double(a[k]) * double(b[k]));
  }
  return d;
}

template <typename T>
constexpr double tolerance() {
  return sizeof(T) == 8 ? 1e-12 : 2e-5;
}

int failures = 0;

// |got - want| within tolerance of the values' scale (NaN fails)
template <typename T>
double relative_error(const std::vector<T>& got, const V& want) {
  double err = 0, size = 1e-300;
  for (size_t k = 0; k < want.size(); ++k) {
    const double d = std::fabs(double(got[k]) - want[k]);
    err = std::isnan(d) || std::isnan(err) ? INFINITY : std::max(err, d);
    size = std::max(size, std::fabs(want[k]));
  }
  return err / size;
}

double dot_error(const Dot& got, const Dot& want) {
  const double d = std::fabs(got.value - want.value) / (want.size + 1e-300);
  return std::isnan(d) ? INFINITY : d;
}

template <typename T>
void report(const char* what, const char* name, double err) {
  const bool ok = err <= tolerance<T>();
  failures += ok ? 0 : 1;
  std::printf("%-4s %-7s %-26s %-40s error %.2e\n", ok ? "ok" : "FAIL",
              sizeof(T) == 8 ? "double" : "float", what, name, err);
}

// the run lengths a launcher can pick here: 1, 2, 3, 8 and run_length's choice
std::vector<int> runs_for(int64_t pairs, int64_t f_len) {
  std::vector<int> runs = {1, 2, 3, 8};
  const int own = run_length(pairs, f_len);
  if (std::find(runs.begin(), runs.end(), own) == runs.end()) runs.push_back(own);
  return runs;
}

template <typename T>
void launch_pairs(int64_t pairs, int64_t f_len, int run, const auto& kernel) {
  const int64_t blocks = blocks_for(run_threads(pairs, f_len, run));
  emu::launch(blocks, 1, kThreads, 0, kernel, kFree);
}

// messages (plain and from the self terms) and the filter gradient, every run length
template <typename T>
void check_messages(const char* name, const Pairs& q, int64_t f_len, unsigned seed) {
  std::mt19937_64 rng(seed);
  const int64_t pairs = static_cast<int64_t>(q.src.size()), atoms = q.atoms;
  const V y = random(rng, atoms * kComps * f_len), filt = random(rng, pairs * kParts * f_len);
  const V self_filt = random(rng, kParts * f_len), grad = random(rng, atoms * kComps * f_len);
  const V d = random(rng, pairs * kParts * f_len);
  const std::vector<T> ty = as<T>(y), tfilt = as<T>(filt), tself = as<T>(self_filt);
  const std::vector<T> tgrad = as<T>(grad);
  V want = messages_ref(q, y, filt, f_len), want_self = want;
  for (int64_t n = 0; n < atoms; ++n) {
    for (int c = 0; c < kComps; ++c) {
      for (int64_t f = 0; f < f_len; ++f) {
        const int64_t k = (n * kComps + c) * f_len + f;
        want_self[k] += self_filt[kGroup[c] * f_len + f] * y[k];
      }
    }
  }
  const Dot want_dot = dot(grad, messages_ref(q, y, d, f_len));
  double err = 0, err_self = 0, err_grad = 0;
  for (int run : runs_for(pairs, f_len)) {
    std::vector<T> out(want.size(), T(0));
    launch_pairs<T>(pairs, f_len, run, [&] {
      messages_kernel<T>(ty.data(), tfilt.data(), q.src.data(), q.dst.data(), out.data(), pairs,
                         f_len, atoms, q.half, run);
    });
    err = std::max(err, relative_error(out, want));
    // messages_self: the self terms written first (over NaN), then the pair sums
    std::vector<T> self(want.size(), T(NAN));
    const int64_t blocks = blocks_for(atoms * kComps * f_len);
    emu::launch(blocks, 1, kThreads, 0, [&] {
      self_messages_kernel<T>(ty.data(), tself.data(), self.data(), atoms, f_len);
    }, kFree);
    launch_pairs<T>(pairs, f_len, run, [&] {
      messages_kernel<T>(ty.data(), tfilt.data(), q.src.data(), q.dst.data(), self.data(), pairs,
                         f_len, atoms, q.half, run);
    });
    err_self = std::max(err_self, relative_error(self, want_self));
    std::vector<T> g_filt(pairs * kParts * f_len, T(NAN));
    launch_pairs<T>(pairs, f_len, run, [&] {
      filter_grad_kernel<T>(tgrad.data(), ty.data(), q.src.data(), q.dst.data(), g_filt.data(),
                            pairs, f_len, atoms, q.half, run);
    });
    err_grad = std::max(err_grad, dot_error(dot(g_filt, d), want_dot));
  }
  // gathered per atom (long lists): onto the self terms, as messages_self's launcher adds
  const Incidences inc = incidences(q);
  std::vector<T> gathered(want.size(), T(NAN));
  const int64_t atom_blocks = blocks_for(atoms * f_len);
  emu::launch(blocks_for(atoms * kComps * f_len), 1, kThreads, 0, [&] {
    self_messages_kernel<T>(ty.data(), tself.data(), gathered.data(), atoms, f_len);
  }, kFree);
  emu::launch(atom_blocks, 1, kThreads, 0, [&] {
    messages_gather_kernel<T>(ty.data(), tfilt.data(), inc.list(q, f_len), gathered.data());
  }, kFree);
  report<T>("messages", name, err);
  report<T>("messages from self", name, err_self);
  const double err_inc = incidences_as_sorted(q, inc) ? 0.0 : INFINITY;
  report<T>("messages gathered", name, std::max(err_inc, relative_error(gathered, want_self)));
  report<T>("filter gradient", name, err_grad);
}

// the embedding's sums at every run length, and its gradients as the launcher runs them: each
// subset the autograd function asks for
template <typename T>
void check_embedding(const char* name, const Pairs& q, int64_t f_len, unsigned seed) {
  std::mt19937_64 rng(seed);
  const int64_t pairs = static_cast<int64_t>(q.src.size()), atoms = q.atoms;
  const V radial = random(rng, pairs * kParts * f_len), recv = random(rng, atoms * f_len);
  const V send = random(rng, atoms * f_len), geom = random(rng, pairs * kComps);
  const V grad = random(rng, atoms * kComps * f_len);
  const V d_radial = random(rng, radial.size()), d_recv = random(rng, recv.size());
  const V d_send = random(rng, send.size()), d_geom = random(rng, geom.size());
  const std::vector<T> t_radial = as<T>(radial), t_recv = as<T>(recv), t_send = as<T>(send);
  const std::vector<T> t_geom = as<T>(geom), t_grad = as<T>(grad);
  const V want = embedding_ref(q, radial, recv, send, geom, f_len);
  double err = 0;
  for (int run : runs_for(pairs, f_len)) {
    std::vector<T> out(want.size(), T(0));
    launch_pairs<T>(pairs, f_len, run, [&] {
      embedding_kernel<T>(t_radial.data(), t_recv.data(), t_send.data(), t_geom.data(),
                          q.src.data(), q.dst.data(), out.data(), pairs, f_len, atoms, q.half,
                          run);
    });
    err = std::max(err, relative_error(out, want));
  }
  const Incidences inc = incidences(q);
  std::vector<T> gathered(want.size(), T(0));
  const unsigned atom_blocks = static_cast<unsigned>(blocks_for(atoms * f_len));
  emu::launch(atom_blocks, 1, kThreads, 0, [&] {
    embedding_gather_kernel<T>(t_radial.data(), t_recv.data(), t_send.data(), t_geom.data(),
                               inc.list(q, f_len), gathered.data());
  }, kFree);
  report<T>("embedding", name, err);
  report<T>("embedding gathered", name, relative_error(gathered, want));
  // the gradients: L = sum grad * embedding is linear in radial, in (recv, send) and in geom
  const Dot want_radial = dot(grad, embedding_ref(q, d_radial, recv, send, geom, f_len));
  const Dot want_species = dot(grad, embedding_ref(q, radial, d_recv, d_send, geom, f_len));
  const Dot want_geom = dot(grad, embedding_ref(q, radial, recv, send, d_geom, f_len));
  int tx = 32;  // the launcher's block: a row of 32 to 128 threads per pair
  while (tx < 128 && tx < f_len) tx *= 2;
  const emu::Dim3 block{unsigned(tx), unsigned(kThreads / tx), 1};
  const int64_t grid = (pairs + block.y - 1) / block.y;
  const size_t shared = sizeof(T) * block.y * kComps;
  double err_grads = 0;
  // bits: radial, species, geom; under ThreadSanitizer (slow with a thread per CUDA thread) all
#if defined(__SANITIZE_THREAD__)
  const int subsets[] = {7};
#else
  const int subsets[] = {7, 1, 2, 4};
#endif
  for (int wanted : subsets) {
    const bool w_radial = wanted & 1, w_species = wanted & 2, w_geom = wanted & 4;
    std::vector<T> g_radial(radial.size(), T(NAN)), g_geom(geom.size(), T(NAN));
    std::vector<T> g_recv(recv.size(), T(0)), g_send(send.size(), T(0));
    emu::launch(emu::Dim3{unsigned(grid), 1, 1}, block, shared, [&] {
      embedding_grads_kernel<T>(t_grad.data(), t_radial.data(), t_recv.data(), t_send.data(),
                                t_geom.data(), q.src.data(), q.dst.data(),
                                w_radial ? g_radial.data() : nullptr,
                                w_species ? g_recv.data() : nullptr,
                                w_species ? g_send.data() : nullptr,
                                w_geom ? g_geom.data() : nullptr, pairs, f_len, atoms, q.half);
    }, with_barriers(grid, kThreads));
    if (w_radial) err_grads = std::max(err_grads, dot_error(dot(g_radial, d_radial), want_radial));
    if (w_species) {
      Dot got = dot(g_recv, d_recv);
      const Dot more = dot(g_send, d_send);
      got.value += more.value;
      err_grads = std::max(err_grads, dot_error(got, want_species));
    } else if (std::any_of(g_recv.begin(), g_recv.end(), [](T v) { return v != T(0); })) {
      err_grads = INFINITY;  // written though not asked for
    }
    if (w_geom) err_grads = std::max(err_grads, dot_error(dot(g_geom, d_geom), want_geom));
  }
  report<T>("embedding gradients", name, err_grads);
  if (!q.half) return;  // (the launcher gathers the species gradients of half lists only)
  // the species gradients gathered, beside the kernel above for the rest (species not asked)
  std::vector<T> g_recv(recv.size(), T(NAN)), g_send(send.size(), T(NAN));
  emu::launch(atom_blocks, 1, kThreads, 0, [&] {
    embedding_species_gather_kernel<T>(t_grad.data(), t_radial.data(), t_geom.data(),
                                       inc.list(q, f_len), g_recv.data(), g_send.data());
  }, kFree);
  Dot got = dot(g_recv, d_recv);
  got.value += dot(g_send, d_send).value;
  report<T>("species gradients gathered", name, dot_error(got, want_species));
}

// the pair differences: vectors (in vacuum: scale (pos_i - pos_j), to the last bit; in a box,
// at their minimum image) and the positions' gradient as the adjoint of the vacuum's (the box
// only shifts by constants), NaN everywhere for a box narrower than min_width
template <typename T>
void check_differences(const char* name, const Pairs& q, unsigned seed) {
  std::mt19937_64 rng(seed);
  const int64_t pairs = static_cast<int64_t>(q.src.size()), atoms = q.atoms;
  const T scale = T(10);
  const std::vector<T> pos = as<T>(random(rng, 3 * atoms)), grad = as<T>(random(rng, 3 * pairs));
  const V d = random(rng, 3 * atoms);
  const std::vector<T> box = {T(2.0), T(0), T(0), T(0.3), T(2.2), T(0), T(-0.4), T(0.5), T(2.5)};
  const unsigned blocks = static_cast<unsigned>(blocks_for(pairs));
  double err = 0;
  for (const T* b : {static_cast<const T*>(nullptr), box.data()}) {
    std::vector<T> out(3 * pairs, T(NAN));
    emu::launch(blocks, 1, kThreads, 0, [&] {
      pair_difference_kernel<T>(pos.data(), q.src.data(), q.dst.data(), scale, b, T(0.5),
                                out.data(), pairs, atoms);
    }, kFree);
    for (int64_t p = 0; p < pairs; ++p) {
      T r[3], sb[9];
      for (int c = 0; c < 3; ++c) r[c] = scale * (pos[3 * q.src[p] + c] - pos[3 * q.dst[p] + c]);
      if (b != nullptr) {
        for (int e = 0; e < 9; ++e) sb[e] = b[e] * scale;
        tn_math::minimum_image(r, sb);
      }
      for (int c = 0; c < 3; ++c) err = out[3 * p + c] == r[c] ? err : INFINITY;
    }
  }
  report<T>("pair differences", name, err);
  double err_grad = 0;
  for (const T min_width : {T(0.5), T(30)}) {  // a box wide enough (in nm, scaled), one too narrow
    std::vector<T> g_pos(3 * atoms, T(-7));
    const unsigned fill = static_cast<unsigned>(blocks_for(3 * atoms));
    emu::launch(fill, 1, kThreads, 0, [&] {
      difference_grad_fill_kernel<T>(g_pos.data(), 3 * atoms, box.data(), scale, min_width);
    }, kFree);
    const unsigned grad_blocks = static_cast<unsigned>(blocks_for(3 * pairs));
    emu::launch(grad_blocks, 1, kThreads, 0, [&] {
      pair_difference_grad_kernel<T>(grad.data(), q.src.data(), q.dst.data(), scale,
                                     g_pos.data(), pairs);
    }, kFree);
    if (min_width > T(1)) {
      const bool all_nan = std::all_of(g_pos.begin(), g_pos.end(), [](T v) { return v != v; });
      err_grad = all_nan ? err_grad : INFINITY;
      continue;
    }
    Dot want;
    for (int64_t p = 0; p < pairs; ++p) {
      for (int c = 0; c < 3; ++c) {
        const double t = double(grad[3 * p + c]) * double(scale) *
                         (d[3 * q.src[p] + c] - d[3 * q.dst[p] + c]);
        want.value += t;
        want.size += std::fabs(t);
      }
    }
    err_grad = std::max(err_grad, dot_error(dot(g_pos, d), want));
  }
  report<T>("difference gradient", name, err_grad);
}

template <typename T>
void check_all(const char* name, const Pairs& q, int64_t f_len, unsigned seed) {
  check_messages<T>(name, q, f_len, seed);
  check_embedding<T>(name, q, f_len, seed + 1);
}

}  // namespace

int main() {
  std::mt19937_64 rng(2026);
  const Pairs sorted_half = make_pairs(rng, 12, true, 0.6, false, 5);
  const Pairs sorted_full = make_pairs(rng, 9, false, 0.4, false, 3);
  const Pairs shuffled_half = make_pairs(rng, 8, true, 0.7, true, 0);
  const Pairs one_atom = make_pairs(rng, 1, true, 1.0, false, 3);  // padding only
  check_all<double>("sorted, half, padded, 19 channels", sorted_half, 19, 1);
  check_all<double>("sorted, full, padded, 64 channels", sorted_full, 64, 2);
  check_differences<double>("sorted, half, padded", sorted_half, 5);
#if !defined(__SANITIZE_THREAD__)  // (races show in double as in float)
  check_all<float>("sorted, half, padded, 19 channels", sorted_half, 19, 1);
  check_all<float>("sorted, full, padded, 64 channels", sorted_full, 64, 2);
  check_all<double>("shuffled, half, 130 channels", shuffled_half, 130, 3);
  check_all<double>("one atom, padding only, 7 channels", one_atom, 7, 4);
  check_differences<float>("sorted, full, padded", sorted_full, 6);
#endif
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}

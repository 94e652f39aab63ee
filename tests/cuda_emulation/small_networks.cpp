// The small-network kernels of pair_ops_cuda.cu (network_forward_kernel, network_backward_kernel)
// run on the CPU (emulate.h), against a plain reference: outputs to 1e-12 in double (the same
// order of sums: the same bits, in fact), the gradients of the input and the scale against
// central differences of the reference, and float32 against the double results. Built and run
// by tests/test_cuda_emulation.py, which writes the kernels' code (the marked parts of the .cu)
// to kernels.inc beside this file's copy. Prints one line per case and "N failures".
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "emulate.h"
#include "packed_math.h"

using std::exp;
using std::tanh;

namespace {
#include "kernels.inc"

double act(int a, double z) { return a == 0 ? z / (1 + std::exp(-z)) : a == 1 ? std::tanh(z) : z; }

template <typename T>
struct Net {
  NetShape s{};
  int activation = 0;
  bool scaled = false;
  bool linear_last = false;  // no activation after each network's last layer (mlp's code + 4)
  std::vector<T> x, scale, w0, b0;
  std::vector<std::vector<T>> w, b;
};

// outputs (the projection's, then each network's), row-major, one after another
std::vector<double> reference(const Net<double>& n, const std::vector<double>& x,
                              const std::vector<double>& scale) {
  const NetShape& s = n.s;
  std::vector<std::vector<double>> outs(s.networks + 1);
  for (int64_t r = 0; r < s.rows; ++r) {
    std::vector<double> z0(s.t0);
    for (int64_t o = 0; o < s.t0; ++o) {
      double acc = n.b0[o];
      for (int64_t k = 0; k < s.k; ++k) acc += n.w0[o * s.k + k] * x[r * s.k + k];
      z0[o] = acc;
    }
    const double sv = n.scaled ? scale[r] : 1.0;
    for (int64_t o = 0; o < s.proj; ++o) outs[0].push_back(z0[o] * sv);
    for (int64_t q = 0; q < s.networks; ++q) {
      std::vector<double> h(s.first);
      for (int64_t i = 0; i < s.first; ++i) h[i] = act(n.activation, z0[s.proj + q * s.first + i]);
      for (int64_t l = 0; l < s.depth; ++l) {
        const auto &W = n.w[q * s.depth + l], &B = n.b[q * s.depth + l];
        const int64_t width = static_cast<int64_t>(B.size()), in = static_cast<int64_t>(h.size());
        std::vector<double> next(width);
        for (int64_t o = 0; o < width; ++o) {
          double acc = B[o];
          for (int64_t i = 0; i < in; ++i) acc += W[o * in + i] * h[i];
          next[o] = n.linear_last && l == s.depth - 1 ? acc : act(n.activation, acc);
        }
        h = next;
      }
      for (double v : h) outs[1 + q].push_back(v * sv);
    }
  }
  std::vector<double> all;
  for (const auto& o : outs) all.insert(all.end(), o.begin(), o.end());
  return all;
}

int backward_threads = kThreads;  // the backward's block size under test (main sets it), and
                                  // with it the forward's tiles (see kernels)

template <typename T>
struct Result {
  std::vector<T> out, g_x, g_scale;
};

// both kernels, R rows a block; g: the outputs' gradients laid out as the outputs; no_proj and
// no_net: outputs passed without a gradient (null); expanded: each output's gradient read from
// its first row for every row (rows 0 apart, as autograd gives an energy sum's)
template <typename T, int R>
Result<T> kernels(const Net<T>& n, const std::vector<T>& g, bool no_proj, int no_net,
                  bool expanded) {
  const NetShape& s = n.s;
  const int64_t layers = s.networks * s.depth;
  NetArgs<T> a;
  std::vector<T> z0(s.rows * s.t0), out_proj(s.rows * s.proj);
  std::vector<std::vector<T>> z(layers), outs(s.networks);
  a.x = n.x.data();
  a.scale = n.scaled ? n.scale.data() : nullptr;
  a.rows = s.rows;
  a.k = s.k;
  a.w0 = n.w0.data();
  a.b0 = n.b0.data();
  a.z0 = z0.data();
  a.t0 = s.t0;
  a.proj = s.proj;
  a.first = s.first;
  a.networks = static_cast<int>(s.networks);
  a.depth = static_cast<int>(s.depth);
  a.activation = n.activation;
  a.last_activation = n.linear_last ? 2 : n.activation;
  a.mid = s.mid;
  a.widest = s.widest;
  a.chunks = static_cast<int>(forward_chunks(s));
  for (int64_t q = 0; q < layers; ++q) {
    a.w[q] = n.w[q].data();
    a.b[q] = n.b[q].data();
    a.width[q] = static_cast<int64_t>(n.b[q].size());
    z[q].assign(s.rows * a.width[q], T(0));
    a.z[q] = z[q].data();
  }
  a.out_proj = s.proj > 0 ? out_proj.data() : nullptr;
  for (int64_t q = 0; q < s.networks; ++q) {
    outs[q].assign(s.rows * a.width[q * s.depth + s.depth - 1], T(0));
    a.out[q] = outs[q].data();
  }
  const unsigned blocks = static_cast<unsigned>((s.rows + R - 1) / R);
  // the forward's weight tiles: 64 bytes of a row with backward blocks of 256 (session 19's
  // kernels), 128 with the others (session 29's)
  const size_t tile_bytes = backward_threads == kThreads ? 64 : kTileRowBytes;
  constexpr int narrow = static_cast<int>(64 / sizeof(T));
  constexpr int wide = static_cast<int>(kTileRowBytes / sizeof(T));
  emu::launch(blocks, static_cast<unsigned>(s.networks * a.chunks), kThreads,
              forward_shared(s, R, sizeof(T), tile_bytes), [&] {
                if (tile_bytes == 64) {
                  network_forward_kernel<T, R, narrow>(a);
                } else {
                  network_forward_kernel<T, R, wide>(a);
                }
              });
  Result<T> result;
  result.out = out_proj;
  for (const auto& o : outs) result.out.insert(result.out.end(), o.begin(), o.end());
  result.g_x.assign(s.rows * s.k, T(-7));
  result.g_scale.assign(s.rows, T(-7));
  size_t at = s.rows * s.proj;
  a.g_proj = no_proj ? nullptr : g.data();
  a.ld_g_proj = expanded ? 0 : s.proj;
  for (int64_t q = 0; q < s.networks; ++q) {
    a.g_out[q] = q == no_net ? nullptr : g.data() + at;
    a.ld_g[q] = expanded ? 0 : a.width[q * s.depth + s.depth - 1];
    at += outs[q].size();
  }
  a.g_x = result.g_x.data();
  a.g_scale = n.scaled ? result.g_scale.data() : nullptr;
  // the backward's block: the size under test, or kThreads where its shared memory would not
  // fit (as the launcher chooses)
  const int threads = backward_shared(s, R, sizeof(T), backward_threads) <= kNetworkShared
                          ? backward_threads
                          : kThreads;
  emu::launch(blocks, 1, static_cast<unsigned>(threads), backward_shared(s, R, sizeof(T), threads),
              [&] { network_backward_kernel<T, R>(a); });
  return result;
}

double worse(double so_far, double d) {  // a NaN is the worst
  return std::isnan(d) || std::isnan(so_far) ? INFINITY : std::max(so_far, d);
}

int failures = 0;

template <int R>
void check(const char* name, int64_t rows, int64_t k, int64_t proj, int64_t networks,
           int64_t first, std::vector<int64_t> widths, int activation, bool scaled, bool no_proj,
           int no_net, unsigned seed, bool linear_last = false, bool expanded = false) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> uniform(0.5, 1.5);
  Net<double> n;
  n.activation = activation;
  n.scaled = scaled;
  n.linear_last = linear_last;
  NetShape& s = n.s;
  s = {rows, k, proj + networks * first, proj, first, networks,
       static_cast<int64_t>(widths.size()), 0, 0, widths.back()};
  for (size_t l = 0; l < widths.size(); ++l) {
    s.widest = std::max(s.widest, widths[l]);
    if (l + 1 < widths.size()) s.mid = std::max(s.mid, widths[l]);
  }
  for (int64_t i = 0; i < rows * k; ++i) n.x.push_back(normal(rng));
  for (int64_t i = 0; i < rows; ++i) n.scale.push_back(uniform(rng));
  for (int64_t i = 0; i < s.t0 * k; ++i) n.w0.push_back(normal(rng) / std::sqrt(double(k)));
  for (int64_t i = 0; i < s.t0; ++i) n.b0.push_back(normal(rng));
  for (int64_t q = 0; q < networks; ++q) {
    int64_t in = first;
    for (int64_t width : widths) {
      std::vector<double> W, B;
      for (int64_t i = 0; i < width * in; ++i) W.push_back(normal(rng) / std::sqrt(double(in)));
      for (int64_t i = 0; i < width; ++i) B.push_back(normal(rng));
      n.w.push_back(W);
      n.b.push_back(B);
      in = width;
    }
  }
  const std::vector<double> expected = reference(n, n.x, n.scale);
  std::vector<double> g(expected.size());
  for (double& v : g) v = normal(rng);
  size_t at = rows * proj;
  if (no_proj) std::fill(g.begin(), g.begin() + at, 0.0);
  for (int64_t r = 1; expanded && r < rows; ++r) {
    std::copy(g.begin(), g.begin() + proj, g.begin() + r * proj);
  }
  for (int64_t q = 0; q < networks; ++q) {
    const int64_t width = widths.back();
    const size_t len = rows * width;
    if (q == no_net) std::fill(g.begin() + at, g.begin() + at + len, 0.0);
    for (int64_t r = 1; expanded && r < rows; ++r) {
      std::copy(g.begin() + at, g.begin() + at + width, g.begin() + at + r * width);
    }
    at += len;
  }
  const Result<double> got = kernels<double, R>(n, g, no_proj, no_net, expanded);
  double err = 0, size = 1e-300;
  for (size_t i = 0; i < expected.size(); ++i) {
    err = worse(err, std::fabs(got.out[i] - expected[i]));
    size = std::max(size, std::fabs(expected[i]));
  }
  auto loss = [&](const std::vector<double>& x, const std::vector<double>& scale) {
    const std::vector<double> o = reference(n, x, scale);
    double sum = 0;
    for (size_t i = 0; i < o.size(); ++i) sum += o[i] * g[i];
    return sum;
  };
  const double h = 1e-6;
  double g_err = 0, g_size = 1e-300;
  for (int64_t i = 0; i < rows * k; ++i) {
    std::vector<double> up = n.x, down = n.x;
    up[i] += h;
    down[i] -= h;
    const double fd = (loss(up, n.scale) - loss(down, n.scale)) / (2 * h);
    g_err = worse(g_err, std::fabs(fd - got.g_x[i]));
    g_size = std::max(g_size, std::fabs(fd));
  }
  for (int64_t i = 0; scaled && i < rows; ++i) {
    std::vector<double> up = n.scale, down = n.scale;
    up[i] += h;
    down[i] -= h;
    const double fd = (loss(n.x, up) - loss(n.x, down)) / (2 * h);
    g_err = worse(g_err, std::fabs(fd - got.g_scale[i]));
    g_size = std::max(g_size, std::fabs(fd));
  }
  // float32: the same network against the double kernels
  auto narrow = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
  Net<float> nf;
  nf.s = s;
  nf.activation = activation;
  nf.scaled = scaled;
  nf.linear_last = linear_last;
  nf.x = narrow(n.x);
  nf.scale = narrow(n.scale);
  nf.w0 = narrow(n.w0);
  nf.b0 = narrow(n.b0);
  for (const auto& W : n.w) nf.w.push_back(narrow(W));
  for (const auto& B : n.b) nf.b.push_back(narrow(B));
  const Result<float> single = kernels<float, R>(nf, narrow(g), no_proj, no_net, expanded);
  double f_err = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    f_err = worse(f_err, std::fabs(single.out[i] - got.out[i]) / std::max(1.0, size));
  }
  for (size_t i = 0; i < got.g_x.size(); ++i) {
    f_err = worse(f_err, std::fabs(single.g_x[i] - got.g_x[i]) / std::max(1.0, g_size));
  }
  for (size_t i = 0; scaled && i < got.g_scale.size(); ++i) {
    f_err = worse(f_err, std::fabs(single.g_scale[i] - got.g_scale[i]) / std::max(1.0, g_size));
  }
  const bool ok = err <= 1e-12 * size && g_err <= 1e-6 * g_size && f_err <= 1e-4;
  failures += ok ? 0 : 1;
  std::printf("%-4s %4d R=%d %-40s outputs %.1e of %.1e, gradients %.1e of %.1e, float32 %.1e\n",
              ok ? "ok" : "FAIL", backward_threads, R, name, err, size, g_err, g_size, f_err);
}

}  // namespace

int main() {
  // session 19's kernels (backward blocks of 256, forward tiles of 64 bytes), then session 29's
  for (int threads : {kThreads, kNetBackwardThreads}) {
  backward_threads = threads;
  // mlp's chains (no projection, one network): rows, k, 0, 1, first layer, further layers
  check<1>("one row 13-50-37 SiLU scaled", 1, 13, 0, 1, 50, {37}, 0, true, false, -1, 1);
  check<2>("5 rows 13-50-37 SiLU scaled", 5, 13, 0, 1, 50, {37}, 0, true, false, -1, 2);
  check<1>("gates 3 rows 128-256-1280", 3, 128, 0, 1, 256, {1280}, 0, false, false, -1, 3);
  check<4>("head 9 rows 384-128-64", 9, 384, 0, 1, 128, {64}, 0, false, false, -1, 4);
  check<8>("11 rows 13-300-45-33 tanh", 11, 13, 0, 1, 300, {45, 33}, 1, true, false, -1, 5);
  check<2>("7 rows 9-40-70-20-30 identity", 7, 9, 0, 1, 40, {70, 20, 30}, 2, true, false, -1, 6);
  check<2>("head 22 rows 384-128-64-1, linear last", 22, 384, 0, 1, 128, {64, 1}, 0, false, false,
           -1, 11, true, true);  // (the energy sum's gradient: rows 0 apart)
  check<1>("3 rows 13-50-37 tanh, linear last, scaled", 3, 13, 0, 1, 50, {37}, 1, true, false, -1,
           12, true);
  // radial_networks: a projection and networks sharing the first layer
  check<4>("13 rows 32: 384 + 2 x 128-256-384", 13, 32, 384, 2, 128, {256, 384}, 0, true, false,
           -1, 7);
  check<1>("5 rows 8: 24 + 3 x 20-45-33 tanh, no grad 1", 5, 8, 24, 3, 20, {45, 33}, 1, true,
           false, 1, 8);
  check<8>("19 rows 16: 30 + 10-21, no grad proj", 19, 16, 30, 1, 10, {21}, 0, true, true, -1, 9);
  check<2>("6 rows 8: 40 + 2 x 16-40-48, no grad 0", 6, 8, 40, 2, 16, {40, 48}, 0, true, false, 0,
           10);
  check<4>("9 rows 8: 16 + 2 x 12-20, gradients 0 apart", 9, 8, 16, 2, 12, {20}, 1, true, false,
           -1, 13, false, true);
  }
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}

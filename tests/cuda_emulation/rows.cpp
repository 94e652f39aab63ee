// Per-row kernels of pair_ops_cuda.cu that came after the last GPU lease, run on the CPU
// (emulate.h) as their launchers run them: part_norms_kernel and part_norms_grad_kernel (the
// output head's 3 I^2, |A|^2, |S|^2 per atom and channel), activate_scaled_kernel and
// activate_scaled_grad_kernel (a scaled network's last layer, act(z) scale, reading z and writing
// the gradient through rows of any stride; a warp per row sums the scale's gradient). Checked
// against plain loops (the norms from the full 3x3 matrices) and central differences, in double
// and float. Built and run by tests/test_cuda_emulation.py. Prints one line per case and
// "N failures".
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

int failures = 0;

template <typename T>
void report(const char* what, const char* name, double err) {
  const double tol = sizeof(T) == 8 ? 1e-9 : 1e-4;
  const bool ok = err <= tol;  // (NaN fails)
  failures += ok ? 0 : 1;
  std::printf("%-4s %-7s %-22s %-34s error %.2e\n", ok ? "ok" : "FAIL",
              sizeof(T) == 8 ? "double" : "float", what, name, err);
}

double worse(double so_far, double got, double want, double size) {
  const double d = std::fabs(got - want) / size;
  return std::isnan(d) || std::isnan(so_far) ? INFINITY : std::max(so_far, d);
}

// the three parts' squared Frobenius norms of the full matrix of packed p ([I, vx, vy, vz, Sxx,
// Syy, Szz, Sxy, Sxz, Syz], S traceless): I Id, the antisymmetric part of v, S
void norms_from_matrix(const double* p, double out[3]) {
  const double x[3][3] = {{p[0] + p[4], p[7] - p[3], p[8] + p[2]},
                          {p[7] + p[3], p[0] + p[5], p[9] - p[1]},
                          {p[8] - p[2], p[9] + p[1], p[0] + p[6]}};
  const double iso = (x[0][0] + x[1][1] + x[2][2]) / 3;
  out[0] = out[1] = out[2] = 0;
  for (int r = 0; r < 3; ++r) {
    for (int c = 0; c < 3; ++c) {
      const double a = 0.5 * (x[r][c] - x[c][r]), s = 0.5 * (x[r][c] + x[c][r]);
      const double i = r == c ? iso : 0.0;
      out[0] += i * i;
      out[1] += a * a;
      out[2] += (s - i) * (s - i);
    }
  }
}

template <typename T>
void check_part_norms(const char* name, int64_t atoms, int64_t f_len, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  std::vector<double> p(atoms * 10 * f_len), g(atoms * 3 * f_len);
  for (double& v : p) v = normal(rng);
  for (int64_t n = 0; n < atoms; ++n) {  // S traceless, as the model's
    for (int64_t f = 0; f < f_len; ++f) {
      p[(n * 10 + 6) * f_len + f] = -p[(n * 10 + 4) * f_len + f] - p[(n * 10 + 5) * f_len + f];
    }
  }
  for (double& v : g) v = normal(rng);
  const std::vector<T> tp(p.begin(), p.end()), tg(g.begin(), g.end());
  std::vector<T> out(atoms * 3 * f_len, T(NAN)), g_p(p.size(), T(NAN));
  const unsigned blocks = static_cast<unsigned>(blocks_for(atoms * f_len));
  emu::launch(blocks, 1, kThreads, 0, [&] {
    part_norms_kernel<T>(tp.data(), out.data(), atoms, f_len);
  }, emu::Schedule::kWorkers);
  emu::launch(blocks, 1, kThreads, 0, [&] {
    part_norms_grad_kernel<T>(tg.data(), tp.data(), g_p.data(), atoms, f_len);
  }, emu::Schedule::kWorkers);
  double err = 0, err_grad = 0;
  const double h = 1e-3;
  for (int64_t n = 0; n < atoms; ++n) {
    for (int64_t f = 0; f < f_len; ++f) {
      double v[10], want[3];
      for (int c = 0; c < 10; ++c) v[c] = double(tp[(n * 10 + c) * f_len + f]);
      norms_from_matrix(v, want);
      for (int k = 0; k < 3; ++k) {
        err = worse(err, double(out[(n * 3 + k) * f_len + f]), want[k], 1 + std::fabs(want[k]));
      }
      // the gradient of sum_k g_k out_k: central differences, each component on its own (the
      // kernel's parts are functions of the components, as packed_math.h defines them)
      for (int c = 0; c < 10; ++c) {
        auto loss = [&](double shift) {
          double w[10], o[3];
          std::copy(v, v + 10, w);
          w[c] += shift;
          o[0] = 3 * w[0] * w[0];
          o[1] = 2 * (w[1] * w[1] + w[2] * w[2] + w[3] * w[3]);
          o[2] = w[4] * w[4] + w[5] * w[5] + w[6] * w[6] +
                 2 * (w[7] * w[7] + w[8] * w[8] + w[9] * w[9]);
          double sum = 0;
          for (int k = 0; k < 3; ++k) sum += double(tg[(n * 3 + k) * f_len + f]) * o[k];
          return sum;
        };
        const double want_g = (loss(h) - loss(-h)) / (2 * h);
        err_grad = worse(err_grad, double(g_p[(n * 10 + c) * f_len + f]), want_g,
                         1 + std::fabs(want_g));
      }
    }
  }
  report<T>("part norms", name, err);
  report<T>("part norms gradient", name, err_grad);
}

double act(int a, double z) { return a == 0 ? z / (1 + std::exp(-z)) : a == 1 ? std::tanh(z) : z; }

// act(z) scale and its gradient, z's rows ld_z apart and d's ld_d apart (strided views of a
// wider tensor, as the radial networks' last layers pass them); no_scale_grad: g_scale null
template <typename T>
void check_activate_scaled(const char* name, int activation, int64_t rows, int64_t width,
                           int64_t ld_z, int64_t ld_d, bool no_scale_grad, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  std::vector<T> z(rows * ld_z), scale(rows), g(rows * width);
  for (T& v : z) v = T(normal(rng));
  for (T& v : scale) v = T(0.5 + std::fabs(normal(rng)));
  for (T& v : g) v = T(normal(rng));
  std::vector<T> out(rows * width, T(NAN)), d(rows * ld_d, T(-7)), g_scale(rows, T(-7));
  const unsigned blocks = static_cast<unsigned>(blocks_for(rows * width));
  emu::launch(blocks, 1, kThreads, 0, [&] {
    activate_scaled_kernel<T>(activation, z.data(), ld_z, scale.data(), out.data(), rows, width);
  }, emu::Schedule::kWorkers);
  const int64_t rows_per_block = kThreads / 32;  // the launcher's: a warp per row
  const unsigned grad_blocks = static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block);
  emu::launch(grad_blocks, 1, kThreads, 0, [&] {
    activate_scaled_grad_kernel<T>(activation, g.data(), z.data(), ld_z, scale.data(), d.data(),
                                   ld_d, no_scale_grad ? nullptr : g_scale.data(), rows, width);
  });
  double err = 0, err_d = 0, err_s = 0;
  const double h = 1e-5;
  for (int64_t r = 0; r < rows; ++r) {
    double sum = 0;
    for (int64_t f = 0; f < width; ++f) {
      const double zv = double(z[r * ld_z + f]), s = double(scale[r]), gv = double(g[r * width + f]);
      err = worse(err, double(out[r * width + f]), act(activation, zv) * s, 1.0);
      const double slope = (act(activation, zv + h) - act(activation, zv - h)) / (2 * h);
      err_d = worse(err_d, double(d[r * ld_d + f]), slope * gv * s, 1.0);
      sum += gv * act(activation, zv);
    }
    for (int64_t f = width; f < ld_d; ++f) {  // the rest of d's rows untouched
      err_d = d[r * ld_d + f] == T(-7) ? err_d : INFINITY;
    }
    const double want_s = no_scale_grad ? -7.0 : sum;
    err_s = worse(err_s, double(g_scale[r]), want_s, 1 + std::fabs(sum));
  }
  report<T>("activate scaled", name, err);
  report<T>("its input gradient", name, err_d);
  report<T>("its scale gradient", name, err_s);
}

}  // namespace

int main() {
  check_part_norms<double>("22 atoms, 128 channels", 22, 128, 1);
  check_part_norms<float>("5 atoms, 37 channels", 5, 37, 2);
  check_activate_scaled<double>("SiLU, 45 rows x 130, strided", 0, 45, 130, 389, 200, false, 3);
  check_activate_scaled<float>("tanh, 9 rows x 33, strided", 1, 9, 33, 40, 35, false, 4);
  check_activate_scaled<double>("none, 17 rows x 7, no scale gradient", 2, 17, 7, 7, 7, true, 5);
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}

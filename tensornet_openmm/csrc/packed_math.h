// Per atom and channel arithmetic of packed 3x3 tensors, shared by the CPU kernels
// (pair_ops.cpp) and the CUDA kernels (pair_ops_cuda.cu).
//
// A packed tensor has 10 components per channel, [I, vx, vy, vz, Sxx, Syy, Szz, Sxy, Sxz, Syz]
// (tensornet_openmm/nn/algebra.py). The functions take a pointer to component 0 of one atom and
// channel and the distance between components (the channel count in an (atoms, 10, channels)
// tensor).
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define TN_MATH __host__ __device__ __forceinline__
#define TN_MATH_CTOR __host__ __device__
#else
#define TN_MATH static inline __attribute__((always_inline))
#define TN_MATH_CTOR
#endif

namespace tn_math {

constexpr int kComps = 10;

// The scalar type of T: T, or the element type where T holds several channels' values side by
// side (pair_ops.cpp's Lanes, which specialises this). Constants are of this type: a vector
// times a scalar is one instruction, where a constant vector might be built lane by lane.
template <typename T>
struct ScalarOf {
  typedef T type;
};

// |X|^2 = sum_c NORM[c] p_c^2 (the squared Frobenius norm: off-diagonal entries count twice)
template <typename S>
TN_MATH S norm_weight(int c) {
  return c == 0 ? S(3) : (c >= 4 && c <= 6) ? S(1) : S(2);
}

template <typename T>
TN_MATH void unpack(const T p[kComps], T x[9]) {
  x[0] = p[0] + p[4]; x[1] = p[7] - p[3]; x[2] = p[8] + p[2];
  x[3] = p[7] + p[3]; x[4] = p[0] + p[5]; x[5] = p[9] - p[1];
  x[6] = p[8] - p[2]; x[7] = p[9] + p[1]; x[8] = p[0] + p[6];
}

template <typename T>
TN_MATH void pack(const T x[9], T p[kComps]) {
  typedef typename ScalarOf<T>::type S;
  const T iso = (x[0] + x[4] + x[8]) / S(3);
  p[0] = iso;
  p[1] = S(0.5) * (x[7] - x[5]); p[2] = S(0.5) * (x[2] - x[6]); p[3] = S(0.5) * (x[3] - x[1]);
  p[4] = x[0] - iso; p[5] = x[4] - iso; p[6] = x[8] - iso;
  p[7] = S(0.5) * (x[1] + x[3]); p[8] = S(0.5) * (x[2] + x[6]); p[9] = S(0.5) * (x[5] + x[7]);
}

// transposes of unpack and pack (their vector-Jacobian products)
template <typename T>
TN_MATH void unpack_t(const T x[9], T p[kComps]) {
  p[0] = x[0] + x[4] + x[8];
  p[1] = x[7] - x[5]; p[2] = x[2] - x[6]; p[3] = x[3] - x[1];
  p[4] = x[0]; p[5] = x[4]; p[6] = x[8];
  p[7] = x[1] + x[3]; p[8] = x[2] + x[6]; p[9] = x[5] + x[7];
}

template <typename T>
TN_MATH void pack_t(const T p[kComps], T x[9]) {
  typedef typename ScalarOf<T>::type S;
  const T t = (p[0] - p[4] - p[5] - p[6]) / S(3);
  x[0] = t + p[4]; x[4] = t + p[5]; x[8] = t + p[6];
  x[1] = S(0.5) * (p[7] - p[3]); x[3] = S(0.5) * (p[7] + p[3]);
  x[2] = S(0.5) * (p[8] + p[2]); x[6] = S(0.5) * (p[8] - p[2]);
  x[5] = S(0.5) * (p[9] - p[1]); x[7] = S(0.5) * (p[9] + p[1]);
}

template <typename T>
TN_MATH void mat3(const T a[9], const T b[9], T c[9]) {  // c = a b
  for (int r = 0; r < 3; ++r)
    for (int k = 0; k < 3; ++k)
      c[3 * r + k] = a[3 * r] * b[k] + a[3 * r + 1] * b[3 + k] + a[3 * r + 2] * b[6 + k];
}

// The per atom and channel functions below come twice: on values (arrays of the 10 components,
// the core) and on memory (a pointer to component 0 and the stride between components). The
// CPU kernels run the cores on 16 channels at once (T a vector type: pair_ops.cpp, Lanes), the
// CUDA kernels on one channel per thread; same arithmetic, in the same order, either way.

// out = packed(A B), or packed(A B + B A) when symmetric
template <typename T>
TN_MATH void product_values(const T pa[kComps], const T pb[kComps], T pc[kComps],
                            bool symmetric) {
  T xa[9], xb[9], xc[9];
  unpack(pa, xa);
  unpack(pb, xb);
  mat3(xa, xb, xc);
  if (symmetric) {
    T xd[9];
    mat3(xb, xa, xd);
    for (int k = 0; k < 9; ++k) xc[k] += xd[k];
  }
  pack(xc, pc);
}

// gradients of packed(A B) (+ packed(B A) when symmetric) with respect to a and b (either may
// be null): G = pack^T g; dA = G B^T (+ B^T G), dB = A^T G (+ G A^T); then unpack^T
template <typename T>
TN_MATH void product_grad_values(const T pg[kComps], const T pa[kComps], const T pb[kComps],
                                 T* g_a, T* g_b, bool symmetric) {
  T xg[9], xa[9], xb[9], d[9], e[9];
  pack_t(pg, xg);
  unpack(pa, xa);
  unpack(pb, xb);
  if (g_a != nullptr) {
    const T bt[9] = {xb[0], xb[3], xb[6], xb[1], xb[4], xb[7], xb[2], xb[5], xb[8]};
    mat3(xg, bt, d);
    if (symmetric) {
      mat3(bt, xg, e);
      for (int k = 0; k < 9; ++k) d[k] += e[k];
    }
    unpack_t(d, g_a);
  }
  if (g_b != nullptr) {
    const T at[9] = {xa[0], xa[3], xa[6], xa[1], xa[4], xa[7], xa[2], xa[5], xa[8]};
    mat3(at, xg, d);
    if (symmetric) {
      mat3(xg, at, e);
      for (int k = 0; k < 9; ++k) d[k] += e[k];
    }
    unpack_t(d, g_b);
  }
}

// out = p / (|p|^2 + 1)
template <typename T>
TN_MATH void normalize_values(const T p[kComps], T out[kComps]) {
  typedef typename ScalarOf<T>::type S;
  T s = T(S(1));
  for (int c = 0; c < kComps; ++c) s += norm_weight<S>(c) * p[c] * p[c];
  const T inv = S(1) / s;
  for (int c = 0; c < kComps; ++c) out[c] = p[c] * inv;
}

// g_p[k] = g[k] / s - 2 NORM[k] p[k] (sum_c g[c] p[c]) / s^2
template <typename T>
TN_MATH void normalize_grad_values(const T g[kComps], const T p[kComps], T g_p[kComps]) {
  typedef typename ScalarOf<T>::type S;
  T s = T(S(1)), dot = T(S(0));
  for (int c = 0; c < kComps; ++c) {
    s += norm_weight<S>(c) * p[c] * p[c];
    dot += g[c] * p[c];
  }
  const T inv = S(1) / s, k = S(2) * dot * inv * inv;
  for (int c = 0; c < kComps; ++c) g_p[c] = g[c] * inv - norm_weight<S>(c) * p[c] * k;
}

// Two steps of an interaction layer in one pass (pair_ops.cpp, packed_product_normalize and
// packed_square_add), each in the order of the separate operators it replaces; ``scaled``: times
// the atom's charge factor q (else no multiplication at all, as in the model).

// out = normalize(packed(A B) q), or of packed(A B + B A) q when symmetric
template <typename T>
TN_MATH void product_normalize_values(const T pa[kComps], const T pb[kComps], T out[kComps],
                                      bool symmetric, bool scaled,
                                      typename ScalarOf<T>::type q) {
  T pc[kComps];
  product_values(pa, pb, pc, symmetric);
  if (scaled) {
    for (int c = 0; c < kComps; ++c) pc[c] = q * pc[c];
  }
  normalize_values(pc, out);
}

// its gradients with respect to a and b (either may be null) for the gradient g of out
template <typename T>
TN_MATH void product_normalize_grad_values(const T g[kComps], const T pa[kComps],
                                           const T pb[kComps], T* g_a, T* g_b, bool symmetric,
                                           bool scaled, typename ScalarOf<T>::type q) {
  T pc[kComps], gc[kComps];
  product_values(pa, pb, pc, symmetric);
  if (scaled) {
    for (int c = 0; c < kComps; ++c) pc[c] = q * pc[c];
  }
  normalize_grad_values(g, pc, gc);
  if (scaled) {
    for (int c = 0; c < kComps; ++c) gc[c] = q * gc[c];
  }
  product_grad_values(gc, pa, pb, g_a, g_b, symmetric);
}

// out = x + d + packed(D D) q
template <typename T>
TN_MATH void square_add_values(const T px[kComps], const T pd[kComps], T out[kComps], bool scaled,
                               typename ScalarOf<T>::type q) {
  T sq[kComps];
  product_values(pd, pd, sq, false);
  for (int c = 0; c < kComps; ++c) out[c] = px[c] + pd[c] + (scaled ? q * sq[c] : sq[c]);
}

// its gradient with respect to d for the gradient g of out (that to x is g itself)
template <typename T>
TN_MATH void square_add_grad_values(const T g[kComps], const T pd[kComps], T g_d[kComps],
                                    bool scaled, typename ScalarOf<T>::type q) {
  T gs[kComps], da[kComps], db[kComps];
  for (int c = 0; c < kComps; ++c) gs[c] = scaled ? q * g[c] : g[c];
  product_grad_values(gs, pd, pd, da, db, false);
  for (int c = 0; c < kComps; ++c) g_d[c] = g[c] + (da[c] + db[c]);
}

// The embedding's packed X from its pair sums s and the self pair's term e (I only): I + e, A,
// S made traceless; and |X|^2 (what its layer norm and gates take)
template <typename T>
TN_MATH void embedding_prepare_values(const T s[kComps], T e, T x[kComps], T& sq) {
  typedef typename ScalarOf<T>::type S;
  x[0] = s[0] + e;
  for (int c = 1; c < kComps; ++c) x[c] = s[c];
  const T mean = (s[4] + s[5] + s[6]) / S(3);
  for (int c = 4; c < 7; ++c) x[c] = s[c] - mean;
  sq = T(S(0));
  for (int c = 0; c < kComps; ++c) sq += norm_weight<S>(c) * x[c] * x[c];
}

// its gradient with respect to s for the gradients g of X and g_sq of |X|^2 (that to e is
// g_s[0])
template <typename T>
TN_MATH void embedding_prepare_grad_values(const T g[kComps], T g_sq, const T x[kComps],
                                           T g_s[kComps]) {
  typedef typename ScalarOf<T>::type S;
  for (int c = 0; c < kComps; ++c) g_s[c] = g[c] + S(2) * norm_weight<S>(c) * x[c] * g_sq;
  const T mean = (g_s[4] + g_s[5] + g_s[6]) / S(3);
  for (int c = 4; c < 7; ++c) g_s[c] = g_s[c] - mean;
}

template <typename T>
TN_MATH void load(const T* p, int64_t stride, T v[kComps]) {
  for (int c = 0; c < kComps; ++c) v[c] = p[c * stride];
}

template <typename T>
TN_MATH void store(const T v[kComps], T* p, int64_t stride) {
  for (int c = 0; c < kComps; ++c) p[c * stride] = v[c];
}

// the same on memory, for one atom and channel
template <typename T>
TN_MATH void product(const T* a, const T* b, T* out, int64_t stride, bool symmetric) {
  T pa[kComps], pb[kComps], pc[kComps];
  load(a, stride, pa);
  load(b, stride, pb);
  product_values(pa, pb, pc, symmetric);
  store(pc, out, stride);
}

template <typename T>
TN_MATH void product_grad(const T* grad, const T* a, const T* b, T* g_a, T* g_b, int64_t stride,
                          bool symmetric) {
  T pg[kComps], pa[kComps], pb[kComps], da[kComps], db[kComps];
  load(grad, stride, pg);
  load(a, stride, pa);
  load(b, stride, pb);
  product_grad_values(pg, pa, pb, g_a == nullptr ? nullptr : da, g_b == nullptr ? nullptr : db,
                      symmetric);
  if (g_a != nullptr) store(da, g_a, stride);
  if (g_b != nullptr) store(db, g_b, stride);
}

// 3 I^2, |A|^2 and |S|^2 (the output head's features, algebra.part_norms): each part's
// sum_c NORM[c] p_c^2, in component order (scalar T only)
template <typename T>
TN_MATH void part_norms_values(const T p[kComps], T out[3]) {
  out[0] = norm_weight<T>(0) * (p[0] * p[0]);
  out[1] = norm_weight<T>(1) * (p[1] * p[1]);
  out[2] = norm_weight<T>(4) * (p[4] * p[4]);
  for (int c = 2; c < 4; ++c) out[1] += norm_weight<T>(c) * (p[c] * p[c]);
  for (int c = 5; c < kComps; ++c) out[2] += norm_weight<T>(c) * (p[c] * p[c]);
}

// their gradient: g_p[c] = 2 NORM[c] p[c] g[part of c]
template <typename T>
TN_MATH void part_norms_grad_values(const T g[3], const T p[kComps], T g_p[kComps]) {
  for (int c = 0; c < kComps; ++c) {
    g_p[c] = T(2) * norm_weight<T>(c) * p[c] * g[c == 0 ? 0 : (c < 4 ? 1 : 2)];
  }
}

template <typename T>
TN_MATH void normalize(const T* p, T* out, int64_t stride) {
  T v[kComps], o[kComps];
  load(p, stride, v);
  normalize_values(v, o);
  store(o, out, stride);
}

template <typename T>
TN_MATH void normalize_grad(const T* grad, const T* p, T* g_p, int64_t stride) {
  T g[kComps], v[kComps], o[kComps];
  load(grad, stride, g);
  load(p, stride, v);
  normalize_grad_values(g, v, o);
  store(o, g_p, stride);
}

}  // namespace tn_math

// ---- Pair geometry ------------------------------------------------------------------------------
// From a pair vector r_ij to what the layers take: the cosine cutoff of its length, the packed
// geometry (1, u, u u^T as [xx, yy, zz, xy, xz, yz]) of its unit vector u, and the radial basis
// (tensornet_openmm/nn/radial.py), with the gradient back to r_ij. kind 0: exp-normal basis,
// c(r) exp(-width_k (exp(alpha (basis_lower - r)) - center_k)^2) with c the cosine cutoff with
// lower edge 0; kind 1: Gaussian, exp(width_k (r - center_k)^2).
namespace tn_math {

using std::cos;  // float and double overloads, on the host and (CUDA's) on the device
using std::exp;
using std::floor;
using std::sin;
using std::sqrt;

constexpr int kGeometry = 10;
constexpr int kExpNormal = 0;
constexpr int kGaussian = 1;

template <typename T>
struct GeometryParams {
  int kind;
  T alpha, basis_lower, lower, upper;
  const T* centers;
  const T* widths;
  int64_t k;

  TN_MATH_CTOR GeometryParams(int64_t kind_, double alpha_, double basis_lower_, double lower_,
                              double upper_, const T* centers_, const T* widths_, int64_t k_)
      : kind(static_cast<int>(kind_)), alpha(static_cast<T>(alpha_)),
        basis_lower(static_cast<T>(basis_lower_)), lower(static_cast<T>(lower_)),
        upper(static_cast<T>(upper_)), centers(centers_), widths(widths_), k(k_) {}
};

// Cosine cutoff at r and its derivative d/dr (lower > 0: the shifted form).
template <typename T>
TN_MATH T cosine_cut(T r, T lower, T upper, T* derivative) {
  const T pi = T(3.14159265358979323846);
  T arg, slope;
  bool inside;
  if (lower > T(0)) {
    arg = pi * (T(2) * (r - lower) / (upper - lower) + T(1));
    slope = pi * T(2) / (upper - lower);
    inside = r > lower && r < upper;
  } else {
    arg = r * (pi / upper);
    slope = pi / upper;
    inside = r < upper;
  }
  if (!inside) {
    *derivative = T(0);
    return T(0);
  }
  *derivative = T(-0.5) * sin(arg) * slope;
  return T(0.5) * (cos(arg) + T(1));
}

// The smallest normal number (FLT_MIN, DBL_MIN) and its natural logarithm, -126 ln 2 and
// -1022 ln 2 (overloads: the same on the host and, CUDA's, on the device).
TN_MATH float smallest_normal(float) { return 1.17549435e-38f; }
TN_MATH double smallest_normal(double) { return 2.2250738585072014e-308; }
TN_MATH float log_smallest_normal(float) { return -87.33654475f; }
TN_MATH double log_smallest_normal(double) { return -708.39641853226410; }

// Basis value k at r and its derivative d/dr. A value below the smallest normal number is 0,
// with slope 0: far from its centre a basis function underflows to a subnormal number (5% of a
// water box's values in float), which x86 CPUs handle in microcode. Fed to the radial networks'
// first matrix product on the CPU, they made it four times slower (1,443-atom water box, float,
// 2 threads: 7.7 against 1.9 ms a block of pairs). Such a number rounds away when added to a
// term of 1e-31 or more (a bias, the functions near their centres): the 1,443-atom box's forces
// came out the same to the last bit. (A GPU takes subnormal numbers at full speed; it flushes
// them too, for the same values everywhere.)
template <typename T>
TN_MATH T basis_value(const GeometryParams<T>& g, int64_t k, T r, T c0, T c0_slope, T e,
                      T* derivative) {
  *derivative = T(0);
  if (g.kind == kExpNormal) {
    const T shifted = e - g.centers[k];
    const T exponent = -g.widths[k] * shifted * shifted;
    if (exponent < log_smallest_normal(r)) return T(0);  // (NaN goes on: it is not below)
    const T gauss = exp(exponent);
    const T value = c0 * gauss;
    if (value < smallest_normal(r)) return T(0);
    // d shifted / dr = -alpha e
    *derivative = c0_slope * gauss + c0 * gauss * (T(2) * g.widths[k] * shifted * g.alpha * e);
    return value;
  }
  const T d = r - g.centers[k];
  const T exponent = g.widths[k] * d * d;
  if (exponent < log_smallest_normal(r)) return T(0);
  const T value = exp(exponent);
  if (value < smallest_normal(r)) return T(0);
  *derivative = value * T(2) * g.widths[k] * d;
  return value;
}

// the factors every basis value at r shares (basis_value's c0, its slope and e): the
// exp-normal basis's inner cutoff and exp(alpha (basis_lower - r)); 1, 0 and 0 for Gaussians
template <typename T>
TN_MATH void basis_factors(const GeometryParams<T>& g, T r, T* c0, T* c0_slope, T* e) {
  *c0 = T(1);
  *c0_slope = T(0);
  *e = T(0);
  if (g.kind == kExpNormal) {
    *c0 = cosine_cut(r, T(0), g.upper, c0_slope);
    *e = exp(g.alpha * (g.basis_lower - r));
  }
}

// geom (kGeometry) = (1, u, u u^T as [xx, yy, zz, xy, xz, yz]) of u = v / r
template <typename T>
TN_MATH void packed_direction(const T* v, T r, T* geom) {
  const T u[3] = {v[0] / r, v[1] / r, v[2] / r};
  geom[0] = T(1);
  geom[1] = u[0]; geom[2] = u[1]; geom[3] = u[2];
  geom[4] = u[0] * u[0]; geom[5] = u[1] * u[1]; geom[6] = u[2] * u[2];
  geom[7] = u[0] * u[1]; geom[8] = u[0] * u[2]; geom[9] = u[1] * u[2];
}

// cut (1), geom (kGeometry) and basis (k) of one pair vector v (3).
template <typename T>
TN_MATH void geometry(const GeometryParams<T>& g, const T* v, T* cut, T* geom, T* basis) {
  const T r = sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]);
  T slope;
  *cut = cosine_cut(r, g.lower, g.upper, &slope);
  packed_direction(v, r, geom);
  T c0, c0_slope, e;
  basis_factors(g, r, &c0, &c0_slope, &e);
  for (int64_t k = 0; k < g.k; ++k) {
    T unused;
    basis[k] = basis_value(g, k, r, c0, c0_slope, e, &unused);
  }
}

// geometry's values (cut, geom and basis, the same bits) and, for the radial networks
// differentiated forward (tangent_radial_networks), the derivatives d/dr of the cutoff and the
// basis, of one pair vector v
template <typename T>
TN_MATH void radial_tangent(const GeometryParams<T>& g, const T* v, T* cut, T* cut_slope,
                            T* geom, T* basis, T* basis_slope) {
  const T r = sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]);
  *cut = cosine_cut(r, g.lower, g.upper, cut_slope);
  packed_direction(v, r, geom);
  T c0, c0_slope, e;
  basis_factors(g, r, &c0, &c0_slope, &e);
  for (int64_t k = 0; k < g.k; ++k) basis[k] = basis_value(g, k, r, c0, c0_slope, e, basis_slope + k);
}

// The gradient with respect to v (3) from those of cut, geom and basis (each may be null), and
// any further dL/dr (d_r_more: the radial networks', tangent_radial_networks).
template <typename T>
TN_MATH void geometry_grad(const GeometryParams<T>& g, const T* v, const T* g_cut,
                           const T* g_geom, const T* g_basis, T* g_v, T d_r_more = T(0)) {
  const T r = sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]);
  const T u[3] = {v[0] / r, v[1] / r, v[2] / r};
  T d_r = d_r_more;  // dL/dr
  if (g_cut != nullptr) {
    T slope;
    cosine_cut(r, g.lower, g.upper, &slope);
    d_r += *g_cut * slope;
  }
  if (g_basis != nullptr) {
    T c0, c0_slope, e;
    basis_factors(g, r, &c0, &c0_slope, &e);
    for (int64_t k = 0; k < g.k; ++k) {
      T slope;
      basis_value(g, k, r, c0, c0_slope, e, &slope);
      d_r += g_basis[k] * slope;
    }
  }
  T g_u[3] = {T(0), T(0), T(0)};
  if (g_geom != nullptr) {
    g_u[0] = g_geom[1] + T(2) * u[0] * g_geom[4] + u[1] * g_geom[7] + u[2] * g_geom[8];
    g_u[1] = g_geom[2] + T(2) * u[1] * g_geom[5] + u[0] * g_geom[7] + u[2] * g_geom[9];
    g_u[2] = g_geom[3] + T(2) * u[2] * g_geom[6] + u[0] * g_geom[8] + u[1] * g_geom[9];
  }
  // u = v / r: du_a / dv_b = (delta_ab - u_a u_b) / r; dr / dv = u
  const T along = g_u[0] * u[0] + g_u[1] * u[1] + g_u[2] * u[2];
  for (int a = 0; a < 3; ++a) g_v[a] = (g_u[a] - along * u[a]) / r + d_r * u[a];
}

}  // namespace tn_math

// ---- Tabulated radial functions -----------------------------------------------------------------
// cut(r) g(r), g a pair's radial functions (the filters of a layer, say: width values) read from a
// table (tensornet_openmm/nn/tables.py) of cubic polynomials. The intervals lie evenly in
// v(r) = a (1 - exp(-alpha r)) + c r, interval k = [k h, (k + 1) h), and rows 4k .. 4k + 3 of
// the table hold the coefficients of g on it in the position u = v / h - k in [0, 1]:
//   g = c0 + c1 u + c2 u^2 + c3 u^3
// (coefficients rather than values at the knots: the derivative then takes no difference of
// nearly equal numbers, which float32 would round to a few 1e-6).
namespace tn_math {

template <typename T>
struct TableParams {
  T a, alpha, c, inv_h, lower, upper;
  int64_t intervals;

  TN_MATH_CTOR TableParams(double a_, double alpha_, double c_, double inv_h_, double lower_,
                           double upper_, int64_t intervals_)
      : a(static_cast<T>(a_)), alpha(static_cast<T>(alpha_)), c(static_cast<T>(c_)),
        inv_h(static_cast<T>(inv_h_)), lower(static_cast<T>(lower_)),
        upper(static_cast<T>(upper_)), intervals(intervals_) {}
};

// The interval k of distance r, the weights w of its four rows (times the cosine cutoff) and
// the weights dw of d(cut g)/dr. Beyond the cutoff every weight is 0 (and k stays in the table).
template <typename T>
TN_MATH int64_t table_weights(const TableParams<T>& t, T r, T w[4], T dw[4]) {
  T cut_slope;
  const T cut = cosine_cut(r, t.lower, t.upper, &cut_slope);
  const T e = exp(-t.alpha * r);
  const T x = (t.a * (T(1) - e) + t.c * r) * t.inv_h;  // in intervals
  const T dx = (t.a * t.alpha * e + t.c) * t.inv_h;     // dx/dr
  const T last = T(t.intervals - 1);
  const T k = x > T(0) ? (x < last ? floor(x) : last) : T(0);  // also for NaN r
  T u = x - k;
  u = u > T(0) ? (u < T(1) ? u : T(1)) : T(0);
  const T powers[4] = {T(1), u, u * u, u * u * u};
  const T slopes[4] = {T(0), T(1), T(2) * u, T(3) * u * u};  // d/du
  for (int i = 0; i < 4; ++i) {
    w[i] = cut * powers[i];
    dw[i] = cut_slope * powers[i] + cut * slopes[i] * dx;
  }
  return static_cast<int64_t>(k);
}

// a * b rounded on its own, never fused into a multiply-add (nvcc fuses by default): PyTorch's
// separate elementwise operators round each product, and the minimum image below is theirs
template <typename T>
TN_MATH T mul_rn(T a, T b) {
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(T) == sizeof(float)) {
    return __fmul_rn(a, b);
  } else {
    return __dmul_rn(a, b);
  }
#else
  return a * b;
#endif
}

// whether a box (3x3, row major; null: none) times the scale is narrower than min_width (not
// above 0: no check), by its smallest diagonal entry, each product rounded as PyTorch rounds it
template <typename T>
TN_MATH bool box_too_small(const T* box, T scale, T min_width) {
  if (box == nullptr || !(min_width > T(0))) return false;
  const T a = mul_rn(box[0], scale), b = mul_rn(box[4], scale), c = mul_rn(box[8], scale);
  const T width = a < b ? (a < c ? a : c) : (b < c ? b : c);
  return width < min_width;
}

// The lattice shift (image - d) that brings d (3 values) to its minimum image in a reduced
// triclinic box b (rows a, b, c; 9 values, row major): c, then b, then a, as
// tensornet_openmm.neighbors.minimum_image; minimum_image adds it to d as the PyTorch paths add
// it (d + (image - d), neighbors._lattice_shift), the same numbers
template <typename T>
TN_MATH void lattice_shift(const T d[3], const T b[9], T shift[3]) {
  T m[3] = {d[0], d[1], d[2]};
  for (int c = 2; c >= 0; --c) {
    const T s = nearbyint(m[c] / b[4 * c]);
    for (int e = 0; e < 3; ++e) m[e] = m[e] - mul_rn(s, b[3 * c + e]);
  }
  for (int e = 0; e < 3; ++e) shift[e] = m[e] - d[e];
}

template <typename T>
TN_MATH void minimum_image(T d[3], const T b[9]) {
  T shift[3];
  lattice_shift(d, b, shift);
  for (int e = 0; e < 3; ++e) d[e] = d[e] + shift[e];
}

// Whether the pair (i, j) at positions xi, xj (3 values each) is closer than the cutoff (its
// square: cutoff2) at its minimum image in the box b (9 values; null: none), with the lattice
// shift that brings xi - xj there (zero without a box): the numbers of the PyTorch search
// (tensornet_openmm.neighbors._close: the difference, the shift added, the squares' sum)
template <typename T>
TN_MATH bool pair_within(const T* xi, const T* xj, const T* b, T cutoff2, T shift[3]) {
  T d[3] = {xi[0] - xj[0], xi[1] - xj[1], xi[2] - xj[2]};
  if (b != nullptr) {
    lattice_shift(d, b, shift);
    for (int e = 0; e < 3; ++e) d[e] = d[e] + shift[e];
  } else {
    for (int e = 0; e < 3; ++e) shift[e] = T(0);
  }
  const T r2 = (mul_rn(d[0], d[0]) + mul_rn(d[1], d[1])) + mul_rn(d[2], d[2]);
  return r2 < cutoff2;
}

// The small-network CUDA kernels' limits (pair_ops_cuda.cu): networks of at most kNetworkRows
// rows and kNetLayers layers after the first run as one kernel each way. pair_ops.cpp reads them
// too: on the CPU it marks such networks as one launch for benchmarks/kernels.py's count.
constexpr int64_t kNetworkRows = 2048;
constexpr int kNetLayers = 8;

// Whether networks of ``rows`` rows and ``further`` layers after the first, in ``networks``
// networks of one depth, are within those limits (the kernels also need the shared memory)
TN_MATH bool small_network_shape(int64_t rows, int64_t further, int64_t networks) {
  return rows >= 1 && rows <= kNetworkRows && networks >= 1 && further >= networks &&
         further <= kNetLayers && further % networks == 0;
}

// The channel mixing (component_mix, gated_mix) of at most this many atoms runs as the CUDA
// file's small_mix_kernel (cuBLAS's batched product above); the CPU marks such a gated_mix's
// backward as the GPU's two launches for benchmarks/kernels.py's count.
constexpr int64_t kSmallMixAtoms = 512;

}  // namespace tn_math

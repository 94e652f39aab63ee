// Per atom and channel arithmetic of packed 3x3 tensors, shared by the CPU kernels
// (pair_ops.cpp) and the CUDA kernels (pair_ops_cuda.cu).
//
// A packed tensor has 10 components per channel, [I, vx, vy, vz, Sxx, Syy, Szz, Sxy, Sxz, Syz]
// (tensornet_openmm/nn/algebra.py). The functions take a pointer to component 0 of one atom and
// channel and the distance between components (the channel count in an (atoms, 10, channels)
// tensor).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define TN_MATH __host__ __device__ __forceinline__
#else
#define TN_MATH static inline __attribute__((always_inline))
#endif

namespace tn_math {

constexpr int kComps = 10;
// |X|^2 = sum_c NORM[c] p_c^2 (the squared Frobenius norm: off-diagonal entries count twice)
template <typename T>
TN_MATH T norm_weight(int c) {
  return c == 0 ? T(3) : (c >= 4 && c <= 6) ? T(1) : T(2);
}

template <typename T>
TN_MATH void unpack(const T p[kComps], T x[9]) {
  x[0] = p[0] + p[4]; x[1] = p[7] - p[3]; x[2] = p[8] + p[2];
  x[3] = p[7] + p[3]; x[4] = p[0] + p[5]; x[5] = p[9] - p[1];
  x[6] = p[8] - p[2]; x[7] = p[9] + p[1]; x[8] = p[0] + p[6];
}

template <typename T>
TN_MATH void pack(const T x[9], T p[kComps]) {
  const T iso = (x[0] + x[4] + x[8]) / T(3);
  p[0] = iso;
  p[1] = T(0.5) * (x[7] - x[5]); p[2] = T(0.5) * (x[2] - x[6]); p[3] = T(0.5) * (x[3] - x[1]);
  p[4] = x[0] - iso; p[5] = x[4] - iso; p[6] = x[8] - iso;
  p[7] = T(0.5) * (x[1] + x[3]); p[8] = T(0.5) * (x[2] + x[6]); p[9] = T(0.5) * (x[5] + x[7]);
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
  const T t = (p[0] - p[4] - p[5] - p[6]) / T(3);
  x[0] = t + p[4]; x[4] = t + p[5]; x[8] = t + p[6];
  x[1] = T(0.5) * (p[7] - p[3]); x[3] = T(0.5) * (p[7] + p[3]);
  x[2] = T(0.5) * (p[8] + p[2]); x[6] = T(0.5) * (p[8] - p[2]);
  x[5] = T(0.5) * (p[9] - p[1]); x[7] = T(0.5) * (p[9] + p[1]);
}

template <typename T>
TN_MATH void mat3(const T a[9], const T b[9], T c[9]) {  // c = a b
  for (int r = 0; r < 3; ++r)
    for (int k = 0; k < 3; ++k)
      c[3 * r + k] = a[3 * r] * b[k] + a[3 * r + 1] * b[3 + k] + a[3 * r + 2] * b[6 + k];
}

// out = packed(A B), or packed(A B + B A) when symmetric, for one atom and channel
template <typename T>
TN_MATH void product(const T* a, const T* b, T* out, int64_t stride, bool symmetric) {
  T pa[kComps], pb[kComps], xa[9], xb[9], xc[9], xd[9], pc[kComps];
  for (int c = 0; c < kComps; ++c) {
    pa[c] = a[c * stride];
    pb[c] = b[c * stride];
  }
  unpack(pa, xa);
  unpack(pb, xb);
  mat3(xa, xb, xc);
  if (symmetric) {
    mat3(xb, xa, xd);
    for (int k = 0; k < 9; ++k) xc[k] += xd[k];
  }
  pack(xc, pc);
  for (int c = 0; c < kComps; ++c) out[c * stride] = pc[c];
}

// gradients of packed(A B) (+ packed(B A) when symmetric) with respect to a and b (either may
// be null), for one atom and channel: G = pack^T g; dA = G B^T (+ B^T G), dB = A^T G (+ G A^T);
// then unpack^T
template <typename T>
TN_MATH void product_grad(const T* grad, const T* a, const T* b, T* g_a, T* g_b, int64_t stride,
                          bool symmetric) {
  T pg[kComps], pa[kComps], pb[kComps], xg[9], xa[9], xb[9], d[9], e[9], pd[kComps];
  for (int c = 0; c < kComps; ++c) {
    pg[c] = grad[c * stride];
    pa[c] = a[c * stride];
    pb[c] = b[c * stride];
  }
  pack_t(pg, xg);
  unpack(pa, xa);
  unpack(pb, xb);
  const T at[9] = {xa[0], xa[3], xa[6], xa[1], xa[4], xa[7], xa[2], xa[5], xa[8]};
  const T bt[9] = {xb[0], xb[3], xb[6], xb[1], xb[4], xb[7], xb[2], xb[5], xb[8]};
  if (g_a != nullptr) {
    mat3(xg, bt, d);
    if (symmetric) {
      mat3(bt, xg, e);
      for (int k = 0; k < 9; ++k) d[k] += e[k];
    }
    unpack_t(d, pd);
    for (int c = 0; c < kComps; ++c) g_a[c * stride] = pd[c];
  }
  if (g_b != nullptr) {
    mat3(at, xg, d);
    if (symmetric) {
      mat3(xg, at, e);
      for (int k = 0; k < 9; ++k) d[k] += e[k];
    }
    unpack_t(d, pd);
    for (int c = 0; c < kComps; ++c) g_b[c * stride] = pd[c];
  }
}

// out = p / (|p|^2 + 1), for one atom and channel
template <typename T>
TN_MATH void normalize(const T* p, T* out, int64_t stride) {
  T s = 1;
  for (int c = 0; c < kComps; ++c) s += norm_weight<T>(c) * p[c * stride] * p[c * stride];
  const T inv = T(1) / s;
  for (int c = 0; c < kComps; ++c) out[c * stride] = p[c * stride] * inv;
}

// g_p[k] = g[k] / s - 2 NORM[k] p[k] (sum_c g[c] p[c]) / s^2, for one atom and channel
template <typename T>
TN_MATH void normalize_grad(const T* grad, const T* p, T* g_p, int64_t stride) {
  T s = 1, dot = 0;
  for (int c = 0; c < kComps; ++c) {
    const T v = p[c * stride];
    s += norm_weight<T>(c) * v * v;
    dot += grad[c * stride] * v;
  }
  const T inv = T(1) / s, k = T(2) * dot * inv * inv;
  for (int c = 0; c < kComps; ++c) {
    g_p[c * stride] = grad[c * stride] * inv - norm_weight<T>(c) * p[c * stride] * k;
  }
}

}  // namespace tn_math

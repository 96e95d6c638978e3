// The scalar formulas of docs/spec.md §1 and §3, shared by the CPU (.cpp) and CUDA (.cu) kernels.
// Torch-free on purpose: nvcc compiles it without torch's headers. The eager reference in
// ree_kernels/reference.py is the specification; every function here names its counterpart.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define REE_HD __host__ __device__ __forceinline__
#else
#define REE_HD inline
#endif

namespace ree {

using std::sqrt;

// reference.NORM_EPS and reference.SIN_EPS.
constexpr double kNormEps = 1e-12;
constexpr double kSinEps = 1e-12;

enum class MarginMode : int32_t { ArcFace = 0, ArcFaceEasy = 1, ArcFaceStraightThrough = 2, CosFace = 3 };

// The margin's constants, computed once on the host (make_margin in csrc/common.h).
struct MarginParams {
  MarginMode mode;
  double margin;
  double cos_m;      // cos m
  double sin_m;      // sin m
  double threshold;  // cos(π − m): below it, θ + m > π and arcface falls back to linear
  double fallback;   // m · sin m, the linear fallback's shift
};

template <typename T>
struct MarginValue {
  T phi;   // φ(c), the target cosine after the margin
  T dphi;  // dφ/dc, as the reference's autograd computes it
};

// reference.margin_logit: φ(c) and its derivative.
template <typename T>
REE_HD MarginValue<T> margin_logit(T c, const MarginParams& p) {
  if (p.mode == MarginMode::CosFace) return {c - static_cast<T>(p.margin), T(1)};
  const T one_minus = T(1) - c * c;
  // sqrt(max(1 − c², ε)): the clamp cuts the gradient below ε, keeping dφ/dc finite at |c| = 1.
  const bool open = one_minus > static_cast<T>(kSinEps);
  const T sin = open ? sqrt(one_minus) : static_cast<T>(sqrt(kSinEps));
  const T cos_m = static_cast<T>(p.cos_m), sin_m = static_cast<T>(p.sin_m);
  const T shifted = c * cos_m - sin * sin_m;
  const T dshifted = cos_m + (open ? c / sin * sin_m : T(0));
  switch (p.mode) {
    case MarginMode::ArcFace:
      if (c > static_cast<T>(p.threshold)) return {shifted, dshifted};
      return {c - static_cast<T>(p.fallback), T(1)};
    case MarginMode::ArcFaceEasy:
      if (c > T(0)) return {shifted, dshifted};
      return {c, T(1)};
    default:  // ArcFaceStraightThrough: the forward of cos(θ + m), the gradient of the identity
      return {shifted, T(1)};
  }
}

// reference.smooth_l1 (torch's smooth_l1_loss with beta) and its derivative.
template <typename T>
REE_HD T smooth_l1(T x, T beta) {
  const T a = x < T(0) ? -x : x;
  return a < beta ? T(0.5) * x * x / beta : a - T(0.5) * beta;
}

template <typename T>
REE_HD T smooth_l1_grad(T x, T beta) {
  if (x < -beta) return T(-1);
  if (x > beta) return T(1);
  return x / beta;
}

// reference.index_diversion: max(0, μ + τ − ξ̂); its gradient in ξ̂ is −1 where positive.
template <typename T>
REE_HD T index_diversion(T ri_pred, T mu, T tau) {
  const T gap = mu + tau - ri_pred;
  return gap > T(0) ? gap : T(0);
}

template <typename T>
REE_HD T index_diversion_grad(T ri_pred, T mu, T tau) {
  return mu + tau - ri_pred > T(0) ? T(-1) : T(0);
}

// 1 / max(‖x‖, ε) from ‖x‖², as F.normalize divides.
template <typename T>
REE_HD T inv_norm(T squared_norm) {
  const T n = sqrt(squared_norm);
  return T(1) / (n > static_cast<T>(kNormEps) ? n : static_cast<T>(kNormEps));
}

// Whether the norm is clamped (then the normalisation's gradient is a plain scaling).
template <typename T>
REE_HD bool norm_clamped(T squared_norm) {
  return !(sqrt(squared_norm) > static_cast<T>(kNormEps));
}

}  // namespace ree

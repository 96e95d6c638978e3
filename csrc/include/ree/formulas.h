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

// reference.NORM_EPS, reference.SIN_EPS and reference.RATIO_EPS.
constexpr double kNormEps = 1e-12;
constexpr double kSinEps = 1e-12;
constexpr double kRatioEps = 1e-6;

// An ignore_index no label in [0, C) equals: the backward passes it, since its ignored rows
// arrive with row_grad 0 and a label outside [0, C) has no target term either way.
constexpr int64_t kNoIgnoreIndex = -1;

// reference.arcface_logits: whether a row has a target column (its label lies in [0, C) and is
// not ignore_index). Every kernel asks this; none reads a label column without it.
REE_HD bool has_target(int64_t label, int64_t num_classes, int64_t ignore_index) {
  return label >= 0 && label < num_classes && label != ignore_index;
}

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

// 1 / max(‖x‖, ε) from ‖x‖², as F.normalize divides (ree_kernels/triton/formulas.py: the same
// name and meaning).
template <typename T>
REE_HD T inverse_norm(T squared_norm) {
  const T n = sqrt(squared_norm);
  return T(1) / (n > static_cast<T>(kNormEps) ? n : static_cast<T>(kNormEps));
}

// Whether F.normalize's clamp_min(‖x‖, ε) cuts the gradient through the norm (it passes where
// ‖x‖ ≥ ε): then the normalisation's gradient is a plain scaling. False for NaN, whose gradient
// then stays NaN. Triton: formulas.norm_clamped, the same meaning.
template <typename T>
REE_HD bool norm_clamped(T squared_norm) {
  return sqrt(squared_norm) < static_cast<T>(kNormEps);
}

// reference.pam_target before its last normalisation, element d: v̂_d − (v̂·û)·û_d, from the raw
// v_d and u_d, their inverse norms, and along = v̂·û = (v·u)·v_inv·u_inv.
template <typename T>
REE_HD T pam_residual(T v, T u, T v_inv, T u_inv, T along) {
  return v * v_inv - along * (u * u_inv);
}

// The forms of reference.RI_FORMS, in its order.
enum class RiForm : int32_t { Product = 0, Ratio = 1, Sum = 2, CrFiqa = 3 };

// reference.recognizability_index, the same operations in the same order (so a float32 kernel
// gives the reference's bits from the same cosines). has_ui false: no UI centre, d^UI = 1. A NaN
// cosine (a row without target) gives a NaN index: the comparisons let NaN through.
template <typename T>
REE_HD T recognizability_index(T cos_pos, T cos_neg, T cos_ui, bool has_ui, RiForm form) {
  const T eps = static_cast<T>(kRatioEps);
  const T d_pos = T(1) - cos_pos;
  const T d_neg = T(1) - cos_neg;
  const T d_ui = has_ui ? T(1) - cos_ui : T(1);
  switch (form) {
    case RiForm::Product:
      return d_ui * (d_neg - d_pos);
    case RiForm::Ratio:
      return d_ui * d_neg / (d_pos < eps ? eps : d_pos);
    case RiForm::Sum:
      return d_ui + d_neg - d_pos;
    default:  // CrFiqa: CR-FIQA's certainty ratio, not an REE form
      return cos_pos / (cos_neg + T(1) + eps);
  }
}

}  // namespace ree

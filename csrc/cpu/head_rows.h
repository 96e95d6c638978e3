// The CPU head's row arithmetic (reference.arcface_rows over chunks of classes), apart from the
// drivers and ops in head.cpp that run it over blocks of rows and chunks of classes: one row's
// online log-sum-exp, its nearest negative (candidates re-scored exactly, so that ties do not
// depend on the chunking), ∂L/∂cos of a chunk, and the row's outputs. Included by head.cpp only.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "../common.h"
#include "lanes.h"

namespace ree {
namespace cpu {
template <typename T>
inline constexpr T kInf = std::numeric_limits<T>::infinity();
template <typename T>
inline constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();

template <typename To, typename From>
inline To bit_cast(From x) {
  To y;
  std::memcpy(&y, &x, sizeof(y));
  return y;
}

// e^x for float32 within 1 ulp (0.92 ulp measured over [-87, 88]; libm's expf does not
// vectorise). e^x = 2^n · e^r with n = round(x / ln 2), r = x − n·ln 2 in two steps (ln 2
// split so that n·ln2_hi is exact), e^r by its Taylor polynomial of degree 7 (|r| ≤ ln2/2: the
// truncation is 0.04 ulp). Below −88 the result is 0 (the true value is a denormal). NaN stays
// NaN.
inline float fast_exp(float x) {
  x = x < -88.0f ? -88.0f : (x > 88.0f ? 88.0f : x);
  constexpr float kShifter = 12582912.0f;  // 1.5 · 2^23: adding it leaves round(x / ln 2) in t's low bits
  const float t = x * 1.44269504088896341f + kShifter;
  const float n = t - kShifter;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const uint32_t pow2 = (bit_cast<uint32_t>(t) - bit_cast<uint32_t>(kShifter) + 127u) << 23;
  return p * bit_cast<float>(pow2);
}

// float64 runs the gradcheck-sized problems: libm's accuracy matters more than speed there.
inline double fast_exp(double x) { return std::exp(x); }

// torch.clamp(r, −1, 1) and where its gradient passes (−1 ≤ r ≤ 1; not at NaN).
template <typename T>
inline T clamp_cos(T r) {
  return r < T(-1) ? T(-1) : (r > T(1) ? T(1) : r);
}

template <typename T>
inline bool clamp_passes(T r) {
  return r >= T(-1) && r <= T(1);
}

// The nearest candidate class over ranges of one row's raw dot products x (cosine = x · inv_w):
// the largest clamped cosine, the lowest index on ties. NaN cosines are skipped here (a NaN
// shows up in the row's exp-sum, and row_forward_chunk then looks for it).
template <typename T>
struct Nearest {
  T value[kLanes];
  int32_t index[kLanes];

  Nearest() {
    std::fill(value, value + kLanes, -kInf<T>);
    std::fill(index, index + kLanes, int32_t(-1));
  }

  REE_LANES void scan(const T* x, const T* inv_w, int64_t begin, int64_t end) {
    int64_t j = begin;
    for (; j + kLanes <= end; j += kLanes) {
      for (int64_t k = 0; k < kLanes; ++k) {
        const T c = clamp_cos(x[j + k] * inv_w[j + k]);
        const bool better = c > value[k];
        value[k] = better ? c : value[k];
        index[k] = better ? static_cast<int32_t>(j + k) : index[k];
      }
    }
    for (; j < end; ++j) {
      const T c = clamp_cos(x[j] * inv_w[j]);
      const int64_t k = j % kLanes;
      if (c > value[k]) {
        value[k] = c;
        index[k] = static_cast<int32_t>(j);
      }
    }
  }

  // (value, index), index −1 when the ranges held no candidate.
  std::pair<T, int64_t> best() const {
    T v = -kInf<T>;
    int64_t at = -1;
    for (int64_t k = 0; k < kLanes; ++k) {
      if (index[k] < 0) continue;
      if (at < 0 || value[k] > v || (value[k] == v && index[k] < at)) {
        v = value[k];
        at = index[k];
      }
    }
    return {v, at};
  }
};

// Σ_j exp(scale · c_j − shift) over the columns of [begin, end) with c_j = clamp(x_j · inv_w_j)
// below `near`, and how many reach it (the candidates, whose terms the caller adds from their
// exact cosines). A NaN cosine is below nothing: its term turns the sum NaN.
template <typename T>
REE_LANES std::pair<T, T> exp_sum(const T* x, const T* inv_w, int64_t begin, int64_t end, T scale, T shift,
                                  T near) {
  T acc[kLanes] = {};
  T count[kLanes] = {};
  int64_t j = begin;
  for (; j + kLanes <= end; j += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      const T c = clamp_cos(x[j + k] * inv_w[j + k]);
      // A 0/1 factor rather than a conditional add, which GCC would not vectorise; the term is
      // finite (at most e^88), so the product is exact.
      const T candidate = c >= near ? T(1) : T(0);
      acc[k] += (T(1) - candidate) * fast_exp(scale * c - shift);
      count[k] += candidate;
    }
  }
  for (; j < end; ++j) {
    const T c = clamp_cos(x[j] * inv_w[j]);
    const T candidate = c >= near ? T(1) : T(0);
    acc[j % kLanes] += (T(1) - candidate) * fast_exp(scale * c - shift);
    count[j % kLanes] += candidate;
  }
  return {sum_lanes(acc), sum_lanes(count)};
}

// How many columns of [begin, end) have clamp(x_j · inv_w_j) ≥ near: exp_sum's count alone.
template <typename T>
REE_LANES T count_at_least(const T* x, const T* inv_w, int64_t begin, int64_t end, T near) {
  T count[kLanes] = {};
  int64_t j = begin;
  for (; j + kLanes <= end; j += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) count[k] += clamp_cos(x[j + k] * inv_w[j + k]) >= near ? T(1) : T(0);
  }
  for (; j < end; ++j) count[j % kLanes] += clamp_cos(x[j] * inv_w[j]) >= near ? T(1) : T(0);
  return sum_lanes(count);
}

// x_j ← coef_scale · softmax_j · inv_w_j where the clamp passes the gradient, else 0:
// ∂L/∂cos_j of a column without the target, times the inverse norm the products need.
template <typename T>
REE_LANES void write_softmax_grad(T* x, const T* inv_w, int64_t n, T scale, T lse, T coef_scale) {
  for (int64_t j = 0; j < n; ++j) {
    const T r = x[j] * inv_w[j];
    const T p = fast_exp(scale * clamp_cos(r) - lse);
    x[j] = clamp_passes(r) ? coef_scale * p * inv_w[j] : T(0);
  }
}

// Calls f(begin, end) on [0, n) without the column `skip` (none when skip < 0).
template <typename F>
void around(int64_t n, int64_t skip, F f) {
  if (skip < 0) {
    f(int64_t(0), n);
    return;
  }
  f(int64_t(0), skip);
  f(skip + 1, n);
}

// ---------------------------------------------------------------------------------------------
// One row of the head (reference.arcface_rows) over chunks of classes.
// ---------------------------------------------------------------------------------------------

template <typename T>
struct Problem {
  T scale;
  MarginParams margin;
  int64_t ignore_index;
  int64_t classes;

  bool has_target(int64_t label) const { return ree::has_target(label, classes, ignore_index); }

  // The label's column within the chunk [c0, c0 + n), or −1.
  int64_t label_in(int64_t label, int64_t c0, int64_t n) const {
    return has_target(label) && label >= c0 && label < c0 + n ? label - c0 : -1;
  }
};

// What a row has accumulated over the chunks seen so far.
template <typename T>
struct RowState {
  T max_logit = -kInf<T>;  // the shift of `sum`
  T sum = 0;               // Σ exp(logit − max_logit)
  T nearest = -kInf<T>;
  int64_t nearest_index = -1;
  T cos_label = kNaN<T>;
  T phi = kNaN<T>;

  // A candidate from classes after every one seen so far: an equal value keeps the earlier
  // index; a NaN wins and then stays (torch.max).
  void offer_nearest(T value, int64_t index) {
    const bool have_nan = nearest != nearest;
    if (index >= 0 && !have_nan && (value != value || value > nearest || nearest_index < 0)) {
      nearest = value;
      nearest_index = index;
    }
  }

  // Appends the state of a range of classes that follows this one's.
  void merge(const RowState& later) {
    const T shift = max_logit > later.max_logit ? max_logit : later.max_logit;
    sum = sum * fast_exp(max_logit - shift) + later.sum * fast_exp(later.max_logit - shift);
    max_logit = shift;
    offer_nearest(later.nearest, later.nearest_index);
    if (later.cos_label == later.cos_label) {
      cos_label = later.cos_label;
      phi = later.phi;
    }
  }
};

// The nearest negative's cosine recomputed in one fixed order. BLAS rounds a product differently
// depending on where a column falls in its tiles, so two identical prototypes can get cosines
// that differ in the last bits, and which one wins would depend on the chunking; the candidates
// for the maximum are recomputed here (double accumulation), so that ties go to the lowest index
// in every chunking and dtype.
template <typename scalar_t, typename T>
struct ExactCosine {
  const scalar_t* v;  // the row's embedding
  double inv_v;
  const scalar_t* protos;  // all C rows
  const int64_t* index;    // class_index (column j reads row index[c0 + j]), or null (row c0 + j)
  int64_t c0;              // the chunk's first column
  const double* sq_w;      // the chunk's squared norms, by column
  int64_t dim;

  // Two cosines closer than this may be ordered differently by BLAS than by exact arithmetic:
  // a dot product of length D has a rounding error of at most D·u relative to ‖v̂‖‖ŵ‖ = 1.
  T slack() const { return T(2 * (dim + 4)) * std::numeric_limits<T>::epsilon(); }

  // The cosine before the clamp.
  T raw(int64_t j) const {
    const scalar_t* w = protos + (index ? index[c0 + j] : c0 + j) * dim;
    return static_cast<T>(dot<double>(v, w, dim) * inv_v * inverse_norm(sq_w[j]));
  }
};

// The columns of one row's chunk that take their cosine from ExactCosine, not from BLAS: besides
// the label, the candidates for the nearest negative, i.e. the columns whose BLAS cosine lies
// within the rounding bound `slack` of the chunk's best. With the label's, their terms dominate
// the row's lse. The forward and every gradient pass pick this set by the same rule from the
// same BLAS values (the same chunking gives the same products), so they see the same cosines:
// with a logit scale s, a cosine one rounding apart would move the softmax by s·u relative
// (docs/design.md, "Large logit scales").
template <typename T>
struct Candidates {
  T best = -kInf<T>;     // the chunk's largest BLAS cosine besides the label
  int64_t best_at = -1;  // its column; −1 when the chunk has no other column (or only NaN ones)
  T near = kInf<T>;      // best − slack: the candidates are the columns (not the label) at or above it
  int64_t count = 0;

  // Calls f(j) for every candidate column j, in column order; x must still hold the products.
  template <typename F>
  void for_each(const T* x, const T* inv_w, int64_t n, int64_t label_col, F f) const {
    for (int64_t j = 0; j < n; ++j) {
      if (j != label_col && clamp_cos(x[j] * inv_w[j]) >= near) f(j);
    }
  }
};

// The best column of a chunk and the candidates' threshold (their count is left to the caller).
template <typename T>
Candidates<T> scan_best(const T* x, const T* inv_w, int64_t n, int64_t label_col, T slack) {
  Nearest<T> lanes;
  around(n, label_col, [&](int64_t b, int64_t e) { lanes.scan(x, inv_w, b, e); });
  Candidates<T> cand;
  std::tie(cand.best, cand.best_at) = lanes.best();
  if (cand.best_at >= 0) cand.near = cand.best - slack;
  return cand;
}

// The candidates of a chunk, as row_forward_chunk picks them.
template <typename T>
Candidates<T> find_candidates(const T* x, const T* inv_w, int64_t n, int64_t label_col, T slack) {
  Candidates<T> cand = scan_best(x, inv_w, n, label_col, slack);
  if (cand.best_at < 0) return cand;
  T count = 0;
  around(n, label_col, [&](int64_t b, int64_t e) { count += count_at_least(x, inv_w, b, e, cand.near); });
  cand.count = static_cast<int64_t>(count);
  return cand;
}

// Merges the chunk [c0, c0 + n) into the row's state and returns its candidates; x holds the
// row's raw dot products v̂·w_j, inv_w the chunk's inverse prototype norms, label_col the
// label's column or −1. The shift of the sum is the largest logit the sum takes (the label's,
// the best candidate's exact one, or an earlier chunk's), so the row's sum is at least 1 and its
// lse finite at any scale.
template <typename scalar_t, typename T>
Candidates<T> row_forward_chunk(RowState<T>& st, const T* x, const T* inv_w, int64_t n, int64_t c0,
                                int64_t label_col, const ExactCosine<scalar_t, T>& exact, const Problem<T>& p) {
  T shift = st.max_logit;
  if (label_col >= 0) {
    st.cos_label = clamp_cos(exact.raw(label_col));
    st.phi = margin_logit(st.cos_label, p.margin).phi;
    if (p.scale * st.phi > shift) shift = p.scale * st.phi;
  }
  Candidates<T> cand = scan_best(x, inv_w, n, label_col, exact.slack());
  T best = cand.best;  // exact from here on, except where NaN decides
  if (cand.best_at >= 0) {
    best = clamp_cos(exact.raw(cand.best_at));
    if (p.scale * best > shift) shift = p.scale * best;
  }

  T sum = 0, count = 0;
  around(n, label_col, [&](int64_t b, int64_t e) {
    const auto [part, reached] = exp_sum(x, inv_w, b, e, p.scale, shift, cand.near);
    sum += part;
    count += reached;
  });
  cand.count = static_cast<int64_t>(count);
  if (label_col >= 0) sum += fast_exp(p.scale * st.phi - shift);

  int64_t best_at = cand.best_at;
  if (sum != sum) {
    // A NaN cosine: like torch.max, the nearest negative is the first NaN.
    for (int64_t j = 0; j < n; ++j) {
      const T c = x[j] * inv_w[j];
      if (j != label_col && c != c) {
        best = c;
        best_at = j;
        break;
      }
    }
  } else if (cand.count == 1) {
    sum += fast_exp(p.scale * best - shift);
  } else if (cand.count > 1) {
    // Several candidates (ties within the rounding bound): every one's exact cosine, the largest
    // (lowest column on ties) the nearest. One may pass the shift by up to scale · slack.
    std::vector<std::pair<int64_t, T>> exact_cos;
    cand.for_each(x, inv_w, n, label_col, [&](int64_t j) { exact_cos.emplace_back(j, clamp_cos(exact.raw(j))); });
    best_at = -1;
    for (const auto& [j, c] : exact_cos) {
      if (best_at < 0 || c > best) {
        best = c;
        best_at = j;
      }
    }
    if (p.scale * best > shift) {
      sum *= fast_exp(shift - p.scale * best);
      shift = p.scale * best;
    }
    for (const auto& [j, c] : exact_cos) sum += fast_exp(p.scale * c - shift);
  }
  st.sum = st.sum * fast_exp(st.max_logit - shift) + sum;
  st.max_logit = shift;
  st.offer_nearest(best, best_at < 0 ? -1 : c0 + best_at);
  return cand;
}

// Overwrites the chunk's raw dot products x with coef · ∂loss/∂cos_j · inv_w_j given the row's
// lse (softmax − one-hot, the margin's derivative at the label, the clamp's mask), with the
// cosines row_forward_chunk took: exact at the label and at the chunk's candidates `cand`.
template <typename scalar_t, typename T>
void row_grad_chunk(T* x, const T* inv_w, int64_t n, int64_t label_col, T lse, T coef, const Candidates<T>& cand,
                    const ExactCosine<scalar_t, T>& exact, const Problem<T>& p) {
  const T coef_scale = coef * p.scale;
  // The candidates are found from the products, which the gradient overwrites: ties first.
  std::vector<int64_t> tied;
  if (cand.count > 1) cand.for_each(x, inv_w, n, label_col, [&](int64_t j) { tied.push_back(j); });
  write_softmax_grad(x, inv_w, n, p.scale, lse, coef_scale);
  auto exact_grad = [&](int64_t j) {
    const T r = exact.raw(j);
    x[j] = clamp_passes(r) ? coef_scale * fast_exp(p.scale * clamp_cos(r) - lse) * inv_w[j] : T(0);
  };
  if (cand.count == 1) exact_grad(cand.best_at);
  for (const int64_t j : tied) exact_grad(j);
  if (label_col >= 0) {
    const T r_label = exact.raw(label_col);
    const auto m = margin_logit(clamp_cos(r_label), p.margin);
    const T grad = coef_scale * (fast_exp(p.scale * m.phi - lse) - T(1)) * m.dphi;
    x[label_col] = clamp_passes(r_label) ? grad * inv_w[label_col] : T(0);
  }
}

// The per-row outputs of head_forward; cos_ui (reference.cosine_to_ui) is written beforehand.
template <typename T>
struct RowOutputs {
  T* loss;
  T* cos_pos;
  T* cos_neg;
  int64_t* neg_index;
  T* lse;
  const T* cos_ui;
  T* ri;
  bool has_ui;
  RiForm ri_form;

  void write(int64_t i, const RowState<T>& st, int64_t label, const Problem<T>& p) const {
    const T row_lse = st.max_logit + std::log(st.sum);
    const bool target = p.has_target(label);
    lse[i] = row_lse;
    if (target) {
      loss[i] = row_lse - p.scale * st.phi;
    } else {
      // Outside [0, C) only when validation was skipped (torch.compile): poison the row.
      loss[i] = label == p.ignore_index ? T(0) : kNaN<T>;
    }
    cos_pos[i] = target ? st.cos_label : kNaN<T>;
    const bool none = st.nearest_index < 0;  // C = 1 and the only class is the label
    cos_neg[i] = none ? T(-1) : st.nearest;
    neg_index[i] = st.nearest_index;
    ri[i] = recognizability_index(cos_pos[i], cos_neg[i], cos_ui[i], has_ui, ri_form);
  }
};

}  // namespace cpu
}  // namespace ree

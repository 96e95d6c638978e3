// arcface_head on CUDA, the device side: the epilogues that run on each chunk of raw products
// v_i · w_j (which cuBLAS computes, via at::mm in head.cpp), and the normalisation kernels.
// reference.arcface_rows is the specification; docs/design.md (## CUDA backend) the design.
//
// NaN discipline: a non-finite input must give a non-finite loss, so no fminf/fmaxf (they drop
// NaN); clamps and maxima are written with comparisons that let NaN through.
#include "device.cuh"

namespace ree {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// The forward fills the device with at least this many (row, split) blocks per SM.
constexpr int64_t kBlocksPerSm = 8;
constexpr int64_t kMaxSplits = 64;

// torch.clamp(c, −1, 1), which keeps NaN.
__device__ __forceinline__ float clamp_cos(float c) { return c < -1.f ? -1.f : (c > 1.f ? 1.f : c); }

// The logit s·c, rounded on its own: never fused into an FMA with what follows, so the forward
// (which sums exp(logit − max)) and the backward (exp(logit − lse)) see the same logit.
__device__ __forceinline__ float logit_of(float scale, float c) { return __fmul_rn(scale, c); }

// The running state of one row over some columns: online log-sum-exp and nearest negative.
struct Partial {
  float max;      // the largest logit seen (−inf: none)
  float sum;      // Σ exp(logit − max); NaN once a NaN logit was seen
  float best;     // the nearest negative's cosine
  int64_t index;  // its class, −1 for none
};

__device__ __forceinline__ Partial empty_partial() { return {-INFINITY, 0.f, -INFINITY, -1}; }

__device__ __forceinline__ void add_logit(Partial& p, float z) {
  if (z > p.max) {  // false for NaN: then the sum below turns NaN
    p.sum = p.sum * expf(p.max - z) + 1.f;
    p.max = z;
  } else {
    p.sum += expf(z - p.max);
  }
}

// Whether (c, j) beats (best, index) as the nearest negative: NaN above every number (as torch's
// max), then the larger cosine, then the lower index.
__device__ __forceinline__ bool beats(float c, int64_t j, float best, int64_t index) {
  if (j < 0) return false;
  if (index < 0) return true;
  const bool c_nan = isnan(c), best_nan = isnan(best);
  if (c_nan || best_nan) return c_nan && (!best_nan || j < index);
  return c > best || (c == best && j < index);
}

__device__ __forceinline__ void add_negative(Partial& p, float c, int64_t j) {
  if (beats(c, j, p.best, p.index)) {
    p.best = c;
    p.index = j;
  }
}

// The union of two disjoint column sets' states. An empty side has sum 0 and max −inf: its term
// is skipped rather than computed as 0 · exp(−inf + inf) = NaN.
__device__ __forceinline__ Partial merge(Partial a, const Partial& b) {
  if (b.max > a.max) {
    a.sum = b.sum + (a.sum == 0.f ? 0.f : a.sum * expf(a.max - b.max));
    a.max = b.max;
  } else {
    a.sum += b.sum == 0.f ? 0.f : b.sum * expf(b.max - a.max);
  }
  add_negative(a, b.best, b.index);
  return a;
}

__device__ __forceinline__ Partial shuffle_down(const Partial& p, int offset) {
  return {__shfl_down_sync(kFullMask, p.max, offset), __shfl_down_sync(kFullMask, p.sum, offset),
          __shfl_down_sync(kFullMask, p.best, offset),
          static_cast<int64_t>(__shfl_down_sync(kFullMask, static_cast<long long>(p.index), offset))};
}

// The block's merged state, valid in thread 0; a fixed tree, so the bits are reproducible.
__device__ Partial block_merge(Partial p) {
  __shared__ Partial warps[kThreads / kWarp];
  for (int offset = kWarp / 2; offset > 0; offset /= 2) p = merge(p, shuffle_down(p, offset));
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) warps[warp] = p;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / kWarp; ++w) p = merge(p, warps[w]);
  }
  return p;
}

// One warp per row; every operation in float64 (the inputs convert exactly).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    targets_kernel(const T* x, const T* w, const int64_t* labels, int64_t batch, int64_t num_classes, int64_t dim,
                   int64_t ignore_index, float scale, MarginParams margin, HeadTargets targets) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = kThreads / kWarp;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / kWarp; row < batch;
       row += static_cast<int64_t>(gridDim.x) * warps) {
    const int64_t label = labels[row];
    if (!has_target(label, num_classes, ignore_index)) {
      if (lane == 0) {
        targets.cos[row] = quiet_nan();
        targets.logit[row] = targets.dphi[row] = targets.inside[row] = 0.f;
      }
      continue;
    }
    const T* v = x + row * dim;
    const T* u = w + label * dim;
    double vv = 0.0, uu = 0.0, vu = 0.0;
    for (int64_t d = lane; d < dim; d += kWarp) {
      const double a = to_float(v[d]), b = to_float(u[d]);
      vv = fma(a, a, vv);
      uu = fma(b, b, uu);
      vu = fma(a, b, vu);
    }
    const double raw = warp_sum(vu) * inverse_norm(warp_sum(vv)) * inverse_norm(warp_sum(uu));
    const double c = raw < -1.0 ? -1.0 : (raw > 1.0 ? 1.0 : raw);  // keeps NaN
    const MarginValue<double> m = margin_logit(c, margin);
    if (lane == 0) {
      targets.cos[row] = static_cast<float>(c);
      targets.logit[row] = static_cast<float>(static_cast<double>(scale) * m.phi);
      targets.dphi[row] = static_cast<float>(m.dphi);
      targets.inside[row] = raw >= -1.0 && raw <= 1.0 ? 1.f : 0.f;
    }
  }
}

// One warp per row. With `ui`, each warp normalises it once (it stays in cache) and takes
// cos_ui = clamp((x_r · ū) / max(‖x_r‖, ε) / max(‖ū‖, ε)) in the same sweep over the row.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_inv_norms_kernel(const T* x, int64_t rows, int64_t dim, float* inv, const float* ui, float* cos_ui) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = kThreads / kWarp;
  const float ui_inv = ui == nullptr ? 0.f : inverse_norm(warp_row_sum_sq(ui, dim, lane));
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / kWarp; r < rows;
       r += static_cast<int64_t>(gridDim.x) * warps) {
    const T* row = x + r * dim;
    const float sq = warp_row_sum_sq(row, dim, lane);
    float along = 0.f;
    if (ui != nullptr) {
      for (int64_t d = lane; d < dim; d += kWarp) along = fmaf(to_float(row[d]), ui[d], along);
      along = warp_sum(along);
    }
    if (lane == 0) {
      const float row_inv = inverse_norm(sq);
      inv[r] = row_inv;
      if (ui != nullptr) cos_ui[r] = clamp_cos(along * row_inv * ui_inv);
    }
  }
}

// Block (row, split): the split's share of the chunk's columns for one row.
__global__ void __launch_bounds__(kThreads)
    forward_chunk_kernel(const float* dots, int64_t batch, int64_t begin, int64_t cols, int64_t num_classes,
                         const float* inv_rows, const float* inv_classes, const int64_t* labels, int64_t ignore_index,
                         float scale, const float* target_logit, bool first, HeadRowState state) {
  const int64_t row = blockIdx.x, split = blockIdx.y;
  const int64_t per_split = (cols + state.splits - 1) / state.splits;
  const int64_t lo = split * per_split;
  const int64_t hi = lo + per_split < cols ? lo + per_split : cols;
  const int64_t label = labels[row];
  // The label's column within the chunk; −1 (never matched) for a row without target.
  const int64_t target = has_target(label, num_classes, ignore_index) ? label - begin : -1;
  const float inv_row = inv_rows[row];
  const float* row_dots = dots + row * cols;

  Partial p = empty_partial();
  for (int64_t j = lo + threadIdx.x; j < hi; j += kThreads) {
    if (j == target) {
      add_logit(p, target_logit[row]);
    } else {
      const float c = clamp_cos(row_dots[j] * inv_row * inv_classes[begin + j]);
      add_logit(p, logit_of(scale, c));
      add_negative(p, c, begin + j);
    }
  }
  p = block_merge(p);
  if (threadIdx.x == 0) {
    const int64_t slot = split * batch + row;
    if (!first) p = merge({state.max[slot], state.sum[slot], state.best[slot], state.best_index[slot]}, p);
    state.max[slot] = p.max;
    state.sum[slot] = p.sum;
    state.best[slot] = p.best;
    state.best_index[slot] = p.index;
  }
}

__global__ void __launch_bounds__(kThreads)
    forward_finish_kernel(int64_t batch, int64_t num_classes, const int64_t* labels, int64_t ignore_index,
                          HeadTargets targets, HeadRowState state, HeadRowOutputs out) {
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; row < batch;
       row += static_cast<int64_t>(gridDim.x) * kThreads) {
    Partial p = empty_partial();
    for (int64_t split = 0; split < state.splits; ++split) {
      const int64_t slot = split * batch + row;
      p = merge(p, {state.max[slot], state.sum[slot], state.best[slot], state.best_index[slot]});
    }
    const float row_lse = p.max + logf(p.sum);
    out.lse[row] = row_lse;
    const int64_t label = labels[row];
    if (has_target(label, num_classes, ignore_index)) {
      out.loss[row] = row_lse - targets.logit[row];
    } else {
      // reference.arcface_rows: 0 for an ignored row, NaN for a label outside [0, C).
      out.loss[row] = label == ignore_index ? 0.f : quiet_nan();
    }
    const float cos_pos = targets.cos[row];  // NaN without target
    const float cos_neg = p.index < 0 ? -1.f : p.best;
    out.cos_pos[row] = cos_pos;
    out.cos_neg[row] = cos_neg;
    out.neg_index[row] = p.index;
    const float cos_ui = out.has_ui ? out.cos_ui[row] : quiet_nan();
    if (!out.has_ui) out.cos_ui[row] = cos_ui;
    out.ri[row] = recognizability_index(cos_pos, cos_neg, cos_ui, out.has_ui, out.ri_form);
  }
}

// Block (row, column group), grid-stride over the chunk's columns. Reads dots[k] before writing
// grad[k] at the same k, so `grad` may alias `dots`.
template <typename G>
__global__ void __launch_bounds__(kThreads)
    grad_chunk_kernel(const float* dots, G* grad, int64_t begin, int64_t cols, int64_t num_classes,
                      const float* inv_rows, const float* inv_classes, const int64_t* labels, HeadTargets targets,
                      const float* lse, const float* row_mantissa, float scale) {
  const int64_t row = blockIdx.x;
  const int64_t label = labels[row];
  // The op contract: a label outside [0, C) has no target term (there is no ignore_index here:
  // ignored rows come with row_grad 0).
  const int64_t target = has_target(label, num_classes, kNoIgnoreIndex) ? label - begin : -1;
  const float inv_row = inv_rows[row];
  const float row_lse = lse[row];
  const float mantissa = row_mantissa[row];
  const int64_t offset = row * cols;
  for (int64_t j = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x; j < cols;
       j += static_cast<int64_t>(gridDim.y) * kThreads) {
    const float inv_class = inv_classes[begin + j];
    float dcos;  // ∂loss/∂cos against the given lse (softmax − one-hot, with dφ at the label)
    bool inside;  // torch.clamp's backward: where(−1 ≤ raw ≤ 1, grad, 0), which also zeroes a NaN raw
    if (j == target) {
      dcos = (expf(targets.logit[row] - row_lse) - 1.f) * targets.dphi[row];
      inside = targets.inside[row] != 0.f;
    } else {
      const float raw = dots[offset + j] * inv_row * inv_class;
      dcos = expf(logit_of(scale, clamp_cos(raw)) - row_lse);
      inside = raw >= -1.f && raw <= 1.f;
    }
    grad[offset + j] = from_float<G>(inside ? mantissa * dcos * inv_class : 0.f);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    normalize_backward_kernel(const float* q, const float* row_scale, const T* x, int64_t rows, int64_t dim, T* out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = kThreads / kWarp;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / kWarp; r < rows;
       r += static_cast<int64_t>(gridDim.x) * warps) {
    const T* x_row = x + r * dim;
    const float* q_row = q + r * dim;
    const float sq = warp_row_sum_sq(x_row, dim, lane);
    float dot = 0.f;
    for (int64_t d = lane; d < dim; d += kWarp) dot = fmaf(to_float(x_row[d]), q_row[d], dot);
    dot = warp_sum(dot);
    const float inv = inverse_norm(sq);
    // q − x̂ (x̂ · q) = q − x · inv² (x · q); a clamped norm is a constant, with no projection.
    const float k = norm_clamped(sq) ? 0.f : inv * inv * dot;
    const float factor = row_scale == nullptr ? 1.f : row_scale[r];
    T* out_row = out + r * dim;
    for (int64_t d = lane; d < dim; d += kWarp) {
      out_row[d] = from_float<T>(factor * (q_row[d] - to_float(x_row[d]) * k));
    }
  }
}

}  // namespace

const char* status_string(LaunchStatus status) { return cudaGetErrorString(static_cast<cudaError_t>(status)); }

LaunchStatus head_targets(const void* embeddings, const void* prototypes, ElemType type, const int64_t* labels,
                          int64_t batch, int64_t num_classes, int64_t dim, int64_t ignore_index, float scale,
                          const MarginParams& margin, const HeadTargets& targets, cudaStream_t stream) {
  return to_status(dispatch(type, [&](auto tag) {
    using T = decltype(tag);
    targets_kernel<T><<<grid_for(batch, kThreads / kWarp), kThreads, 0, stream>>>(
        static_cast<const T*>(embeddings), static_cast<const T*>(prototypes), labels, batch, num_classes, dim,
        ignore_index, scale, margin, targets);
    return cudaGetLastError();
  }));
}

LaunchStatus row_inv_norms(const void* x, ElemType type, int64_t rows, int64_t dim, float* inv, const float* ui,
                           float* cos_ui, cudaStream_t stream) {
  return to_status(dispatch(type, [&](auto tag) {
    using T = decltype(tag);
    row_inv_norms_kernel<T><<<grid_for(rows, kThreads / kWarp), kThreads, 0, stream>>>(static_cast<const T*>(x), rows,
                                                                                      dim, inv, ui, cos_ui);
    return cudaGetLastError();
  }));
}

int64_t head_row_splits(int64_t batch) {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();  // clear it: the split count is a tuning choice, 1 is always correct
    return 1;
  }
  const int64_t wanted = (kBlocksPerSm * sms + batch - 1) / batch;
  return wanted < 1 ? 1 : (wanted > kMaxSplits ? kMaxSplits : wanted);
}

LaunchStatus head_forward_chunk(const float* dots, int64_t batch, int64_t begin, int64_t cols, int64_t num_classes,
                                const float* inv_rows, const float* inv_classes, const int64_t* labels,
                                int64_t ignore_index, float scale, const float* target_logit, bool first,
                                const HeadRowState& state, cudaStream_t stream) {
  if (batch > 0x7fffffff || state.splits > 65535 || state.splits < 1) {
    return to_status(cudaErrorInvalidConfiguration);
  }
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(state.splits));
  forward_chunk_kernel<<<grid, kThreads, 0, stream>>>(dots, batch, begin, cols, num_classes, inv_rows, inv_classes,
                                                      labels, ignore_index, scale, target_logit, first, state);
  return to_status(cudaGetLastError());
}

LaunchStatus head_forward_finish(int64_t batch, int64_t num_classes, const int64_t* labels, int64_t ignore_index,
                                 const HeadTargets& targets, const HeadRowState& state, const HeadRowOutputs& out,
                                 cudaStream_t stream) {
  forward_finish_kernel<<<grid_for(batch, kThreads), kThreads, 0, stream>>>(batch, num_classes, labels, ignore_index,
                                                                            targets, state, out);
  return to_status(cudaGetLastError());
}

LaunchStatus head_grad_chunk(const float* dots, void* grad, ElemType grad_type, int64_t batch, int64_t begin,
                             int64_t cols, int64_t num_classes, const float* inv_rows, const float* inv_classes,
                             const int64_t* labels, const HeadTargets& targets, const float* lse,
                             const float* row_mantissa, float scale, cudaStream_t stream) {
  if (batch > 0x7fffffff) return to_status(cudaErrorInvalidConfiguration);
  // About four columns per thread; the y extent stays within its 65535 limit (the loop strides).
  const int64_t groups = (cols + 4 * kThreads - 1) / (4 * kThreads);
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(groups > 65535 ? 65535 : groups));
  return to_status(dispatch(grad_type, [&](auto tag) {
    using G = decltype(tag);
    grad_chunk_kernel<G><<<grid, kThreads, 0, stream>>>(dots, static_cast<G*>(grad), begin, cols, num_classes, inv_rows,
                                                        inv_classes, labels, targets, lse, row_mantissa, scale);
    return cudaGetLastError();
  }));
}

LaunchStatus normalize_backward(const float* q, const float* row_scale, const void* x, ElemType type, int64_t rows,
                                int64_t dim, void* out, cudaStream_t stream) {
  return to_status(dispatch(type, [&](auto tag) {
    using T = decltype(tag);
    normalize_backward_kernel<T><<<grid_for(rows, kThreads / kWarp), kThreads, 0, stream>>>(
        q, row_scale, static_cast<const T*>(x), rows, dim, static_cast<T*>(out));
    return cudaGetLastError();
  }));
}

}  // namespace cuda
}  // namespace ree

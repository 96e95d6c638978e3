// ree_aux_loss on CUDA, the device side: one warp per row computes the three per-row losses and
// their gradients (reference.ree_aux_loss is the specification, csrc/cpu/aux_loss.cpp the CPU twin),
// then one block reduces the means in a fixed order. The recognizable count stays on the device.
#include "device.cuh"

namespace ree {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    aux_rows_kernel(const float* pred, const float* target, const float* mu_ptr, float tau, float beta,
                    const bool* keep, const int64_t* kept_ptr, int64_t batch, const T* attn, const T* emb,
                    const float* ui, int64_t dim, float* l1_row, float* id_row, float* mse_row, float* grad_l1,
                    float* grad_id, float* grad_attn) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = kThreads / kWarp;
  const float mu = *mu_ptr;
  const int64_t kept = kept_ptr == nullptr ? batch : *kept_ptr;
  const float per_row = 1.f / static_cast<float>(batch);
  const float per_kept = kept > 0 ? 1.f / static_cast<float>(kept) : 0.f;
  // The UI direction is the same for every row; each warp normalises it once (it stays in cache).
  const float ui_inv = attn == nullptr ? 0.f : inverse_norm(warp_row_sum_sq(ui, dim, lane));

  for (int64_t i = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / kWarp; i < batch;
       i += static_cast<int64_t>(gridDim.x) * warps) {
    const bool counts = keep == nullptr || keep[i];
    if (lane == 0) {
      const float diff = pred[i] - target[i];
      l1_row[i] = smooth_l1(diff, beta);
      grad_l1[i] = smooth_l1_grad(diff, beta) * per_row;
      id_row[i] = counts ? index_diversion(pred[i], mu, tau) : 0.f;
      grad_id[i] = counts ? index_diversion_grad(pred[i], mu, tau) * per_kept : 0.f;
    }
    if (attn == nullptr) continue;
    const T* a = attn + i * dim;
    const T* v = emb + i * dim;
    float* g = grad_attn + i * dim;
    if (!counts) {
      for (int64_t d = lane; d < dim; d += kWarp) g[d] = 0.f;
      if (lane == 0) mse_row[i] = 0.f;
      continue;
    }
    // reference.pam_target: v̇ = normalize(v̂ − (v̂·û)û), then the squared error to attn.
    float vv = 0.f, vu = 0.f;
    for (int64_t d = lane; d < dim; d += kWarp) {
      const float x = to_float(v[d]);
      vv = fmaf(x, x, vv);
      vu = fmaf(x, ui[d], vu);
    }
    vv = warp_sum(vv);
    vu = warp_sum(vu);
    const float v_inv = inverse_norm(vv);
    const float along = vu * v_inv * ui_inv;  // v̂·û
    float pp = 0.f;
    for (int64_t d = lane; d < dim; d += kWarp) {
      const float p = pam_residual(to_float(v[d]), ui[d], v_inv, ui_inv, along);
      pp = fmaf(p, p, pp);
    }
    const float p_inv = inverse_norm(warp_sum(pp));
    const float grad_scale = 2.f * per_kept / static_cast<float>(dim);
    float sq_err = 0.f;
    for (int64_t d = lane; d < dim; d += kWarp) {
      const float err = to_float(a[d]) - pam_residual(to_float(v[d]), ui[d], v_inv, ui_inv, along) * p_inv;
      sq_err = fmaf(err, err, sq_err);
      g[d] = err * grad_scale;
    }
    sq_err = warp_sum(sq_err);
    if (lane == 0) mse_row[i] = sq_err;
  }
}

// One block: thread t sums rows t, t + kThreads, …, then a shared-memory tree (fixed order).
__global__ void __launch_bounds__(kThreads)
    aux_finish_kernel(const float* l1_row, const float* id_row, const float* mse_row, const int64_t* kept_ptr,
                      int64_t batch, int64_t dim, float* l1, float* id, float* mse) {
  __shared__ float sums[3][kThreads];
  float s_l1 = 0.f, s_id = 0.f, s_mse = 0.f;
  for (int64_t i = threadIdx.x; i < batch; i += kThreads) {
    s_l1 += l1_row[i];
    s_id += id_row[i];
    if (mse_row != nullptr) s_mse += mse_row[i];
  }
  sums[0][threadIdx.x] = s_l1;
  sums[1][threadIdx.x] = s_id;
  sums[2][threadIdx.x] = s_mse;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      for (int k = 0; k < 3; ++k) sums[k][threadIdx.x] += sums[k][threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const int64_t kept = kept_ptr == nullptr ? batch : *kept_ptr;
    const float denom = static_cast<float>(kept > 1 ? kept : 1);
    *l1 = sums[0][0] / static_cast<float>(batch);
    *id = sums[1][0] / denom;
    *mse = mse_row == nullptr ? 0.f : sums[2][0] / (denom * static_cast<float>(dim));
  }
}

}  // namespace

LaunchStatus aux_rows(const float* pred, const float* target, const float* mu, float tau, float beta, const bool* keep,
                      const int64_t* kept, int64_t batch, const void* attn, const void* embeddings, ElemType type,
                      const float* ui_center, int64_t dim, float* l1_row, float* id_row, float* mse_row,
                      float* grad_l1, float* grad_id, float* grad_attn, cudaStream_t stream) {
  return to_status(dispatch(type, [&](auto tag) {
    using T = decltype(tag);
    aux_rows_kernel<T><<<grid_for(batch, kThreads / kWarp), kThreads, 0, stream>>>(
        pred, target, mu, tau, beta, keep, kept, batch, static_cast<const T*>(attn), static_cast<const T*>(embeddings),
        ui_center, dim, l1_row, id_row, mse_row, grad_l1, grad_id, grad_attn);
    return cudaGetLastError();
  }));
}

LaunchStatus aux_finish(const float* l1_row, const float* id_row, const float* mse_row, const int64_t* kept,
                        int64_t batch, int64_t dim, float* l1, float* id, float* mse, cudaStream_t stream) {
  aux_finish_kernel<<<1, kThreads, 0, stream>>>(l1_row, id_row, mse_row, kept, batch, dim, l1, id, mse);
  return to_status(cudaGetLastError());
}

}  // namespace cuda
}  // namespace ree

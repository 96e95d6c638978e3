// ree_aux_loss on the CPU: the three losses and their gradients in one pass over the rows
// (reference.ree_aux_loss is the specification).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "../common.h"
#include "lanes.h"

namespace ree {
namespace {

using at::Tensor;

template <typename T>
void aux_rows(const T* pred, const T* target, T mu, T tau, T beta, const bool* keep, int64_t batch,
              int64_t kept, const T* attn, const T* emb, const T* ui, int64_t dim, T* l1_row, T* id_row,
              T* mse_row, T* grad_l1, T* grad_id, T* grad_attn) {
  // The UI direction is the same for every row: normalise it once.
  const T ui_inv = attn != nullptr ? inverse_norm(dot<T>(ui, ui, dim)) : T(0);
  const T per_row = T(1) / static_cast<T>(batch);
  const T per_kept = kept > 0 ? T(1) / static_cast<T>(kept) : T(0);
  at::parallel_for(0, batch, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T diff = pred[i] - target[i];
      l1_row[i] = smooth_l1(diff, beta);
      grad_l1[i] = smooth_l1_grad(diff, beta) * per_row;
      const bool counts = keep == nullptr || keep[i];
      id_row[i] = counts ? index_diversion(pred[i], mu, tau) : T(0);
      grad_id[i] = counts ? index_diversion_grad(pred[i], mu, tau) * per_kept : T(0);
      if (attn == nullptr) continue;
      // reference.pam_target: v̇ = normalize(v̂ − (v̂·û)û), then the squared error to attn.
      const T* a = attn + i * dim;
      const T* v = emb + i * dim;
      T* g = grad_attn + i * dim;
      if (!counts) {
        mse_row[i] = 0;
        for (int64_t d = 0; d < dim; ++d) g[d] = 0;
        continue;
      }
      // g holds p = v̂ − (v̂·û)û, then the error attn − p/‖p‖, then its gradient.
      const T v_inv = inverse_norm(dot<T>(v, v, dim));
      const T along = dot<T>(v, ui, dim) * v_inv * ui_inv;  // v̂·û
      for (int64_t d = 0; d < dim; ++d) g[d] = pam_residual(v[d], ui[d], v_inv, ui_inv, along);
      const T p_inv = inverse_norm(dot<T>(g, g, dim));
      for (int64_t d = 0; d < dim; ++d) g[d] = a[d] - g[d] * p_inv;
      const T sq_err = dot<T>(g, g, dim);
      const T grad_scale = T(2) * per_kept / static_cast<T>(dim);
      for (int64_t d = 0; d < dim; ++d) g[d] *= grad_scale;
      mse_row[i] = sq_err;
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> aux_forward_cpu(
    const Tensor& ri_pred, const Tensor& ri_target, const Tensor& mu_ui, const c10::optional<Tensor>& attn,
    const c10::optional<Tensor>& embeddings, const c10::optional<Tensor>& ui_center,
    const c10::optional<Tensor>& recognizable, double tau, double beta) {
  const auto sdt = stat_type(ri_pred.scalar_type());
  const int64_t batch = ri_pred.size(0);
  const bool with_attn = attn.has_value();
  TORCH_CHECK_VALUE(!with_attn || (embeddings.has_value() && ui_center.has_value()),
                    "attn needs embeddings and ui_center");
  const int64_t dim = with_attn ? attn->size(1) : 0;
  auto as_stat = [&](const Tensor& t) { return t.to(sdt).contiguous(); };
  const Tensor pred = as_stat(ri_pred), target = as_stat(ri_target);
  const Tensor keep = recognizable.has_value() ? recognizable->contiguous() : Tensor();
  const int64_t kept = keep.defined() ? keep.sum().item<int64_t>() : batch;
  const Tensor a = with_attn ? as_stat(*attn) : Tensor();
  const Tensor v = with_attn ? as_stat(*embeddings) : Tensor();
  const Tensor u = with_attn ? as_stat(*ui_center) : Tensor();

  auto opts = pred.options();
  Tensor l1_row = at::empty({batch}, opts), id_row = at::empty({batch}, opts);
  Tensor mse_row = with_attn ? at::empty({batch}, opts) : Tensor();
  Tensor grad_l1 = at::empty({batch}, opts), grad_id = at::empty({batch}, opts);
  Tensor grad_attn = with_attn ? at::empty({batch, dim}, opts) : at::empty({0}, opts);

  AT_DISPATCH_FLOATING_TYPES(sdt, "aux_forward_cpu", [&] {
    const scalar_t mu = mu_ui.to(sdt).item<scalar_t>();
    aux_rows<scalar_t>(pred.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(), mu, static_cast<scalar_t>(tau),
                       static_cast<scalar_t>(beta), keep.defined() ? keep.data_ptr<bool>() : nullptr, batch, kept,
                       with_attn ? a.data_ptr<scalar_t>() : nullptr, with_attn ? v.data_ptr<scalar_t>() : nullptr,
                       with_attn ? u.data_ptr<scalar_t>() : nullptr, dim, l1_row.data_ptr<scalar_t>(),
                       id_row.data_ptr<scalar_t>(), with_attn ? mse_row.data_ptr<scalar_t>() : nullptr, grad_l1.data_ptr<scalar_t>(),
                       grad_id.data_ptr<scalar_t>(), with_attn ? grad_attn.data_ptr<scalar_t>() : nullptr);
  });
  const double kept_div = static_cast<double>(std::max<int64_t>(kept, 1));
  Tensor l1 = l1_row.sum() / static_cast<double>(batch);
  Tensor id = id_row.sum() / kept_div;
  Tensor mse = with_attn ? mse_row.sum() / (kept_div * static_cast<double>(dim)) : at::zeros({}, opts);
  return {l1, id, mse, grad_l1, grad_id, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(ree, CPU, m) { m.impl("aux_forward", &aux_forward_cpu); }

}  // namespace ree

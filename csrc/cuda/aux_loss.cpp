// ree_aux_loss on CUDA, the torch side (the contract is in ree_kernels/aux_loss.py; the kernels in
// aux_kernels.cu). No host synchronisation: μ_UI and the recognizable count are read by the
// kernels from device memory.
#include <torch/library.h>

#include <tuple>

#include "../common.h"
#include "glue.h"

namespace ree {
namespace cuda {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> aux_forward_cuda(
    const Tensor& ri_pred, const Tensor& ri_target, const Tensor& mu_ui, const c10::optional<Tensor>& attn,
    const c10::optional<Tensor>& embeddings, const c10::optional<Tensor>& ui_center,
    const c10::optional<Tensor>& recognizable, double tau, double beta) {
  const c10::Device device = ri_pred.device();
  check_cuda(ri_pred, "ri_pred", device);
  check_cuda(ri_target, "ri_target", device);
  elem_type(ri_pred, "ri_pred");
  elem_type(ri_target, "ri_target");
  TORCH_CHECK_VALUE(ri_pred.dim() == 1 && ri_pred.size(0) > 0, "ri_pred must be [B] with B > 0, got ",
                    ri_pred.sizes());
  const int64_t batch = ri_pred.size(0);
  TORCH_CHECK_VALUE(ri_target.dim() == 1 && ri_target.size(0) == batch, "ri_target must be [B] with B = ", batch);
  TORCH_CHECK_VALUE(mu_ui.numel() == 1, "mu_ui must be a scalar, got ", mu_ui.sizes());
  const bool with_attn = attn.has_value();
  TORCH_CHECK_VALUE(!with_attn || (embeddings.has_value() && ui_center.has_value()),
                    "attn needs embeddings and ui_center");
  c10::DeviceGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  const auto float_opts = ri_pred.options().dtype(at::kFloat);
  auto as_float = [&](const Tensor& t) { return t.to(float_opts).contiguous(); };

  const Tensor pred = as_float(ri_pred), target = as_float(ri_target), mu = as_float(mu_ui.reshape({}));
  Tensor keep, kept;
  if (recognizable.has_value()) {
    check_cuda(*recognizable, "recognizable", device);
    TORCH_CHECK_TYPE(recognizable->scalar_type() == at::kBool, "recognizable must be bool, got ",
                     recognizable->scalar_type());
    TORCH_CHECK_VALUE(recognizable->dim() == 1 && recognizable->size(0) == batch, "recognizable must be [B] with B = ",
                      batch);
    keep = recognizable->contiguous();
    kept = keep.sum();  // int64 on the device, read by the kernels
  }

  int64_t dim = 0;
  Tensor a, v, u;
  ElemType type = ElemType::Float32;
  if (with_attn) {
    check_cuda(*attn, "attn", device);
    check_cuda(*embeddings, "embeddings", device);
    check_cuda(*ui_center, "ui_center", device);
    TORCH_CHECK_VALUE(attn->dim() == 2 && attn->size(0) == batch, "attn must be [B, D] with B = ", batch);
    dim = attn->size(1);
    TORCH_CHECK_VALUE(embeddings->sizes() == attn->sizes(), "embeddings must have attn's shape ", attn->sizes(),
                      ", got ", embeddings->sizes());
    TORCH_CHECK_VALUE(ui_center->dim() == 1 && ui_center->size(0) == dim, "ui_center must be [D] with D = ", dim);
    elem_type(*attn, "attn");
    elem_type(*embeddings, "embeddings");
    // The kernel reads attn and embeddings in one type: theirs when they agree, else float32.
    const bool same = attn->scalar_type() == embeddings->scalar_type();
    a = same ? attn->contiguous() : as_float(*attn);
    v = same ? embeddings->contiguous() : as_float(*embeddings);
    type = elem_type(a, "attn");
    u = as_float(*ui_center);
  }

  Tensor l1_row = at::empty({batch}, float_opts), id_row = at::empty({batch}, float_opts);
  Tensor mse_row = with_attn ? at::empty({batch}, float_opts) : Tensor();
  Tensor grad_l1 = at::empty({batch}, float_opts), grad_id = at::empty({batch}, float_opts);
  Tensor grad_attn = with_attn ? at::empty({batch, dim}, float_opts) : at::empty({0}, float_opts);
  Tensor l1 = at::empty({}, float_opts), id = at::empty({}, float_opts), mse = at::empty({}, float_opts);
  const int64_t* kept_ptr = kept.defined() ? kept.const_data_ptr<int64_t>() : nullptr;

  check_launch(aux_rows(pred.const_data_ptr<float>(), target.const_data_ptr<float>(), mu.const_data_ptr<float>(),
                        static_cast<float>(tau), static_cast<float>(beta),
                        keep.defined() ? keep.const_data_ptr<bool>() : nullptr, kept_ptr, batch,
                        with_attn ? a.const_data_ptr() : nullptr, with_attn ? v.const_data_ptr() : nullptr, type,
                        with_attn ? u.const_data_ptr<float>() : nullptr, dim, l1_row.mutable_data_ptr<float>(),
                        id_row.mutable_data_ptr<float>(), with_attn ? mse_row.mutable_data_ptr<float>() : nullptr,
                        grad_l1.mutable_data_ptr<float>(), grad_id.mutable_data_ptr<float>(),
                        with_attn ? grad_attn.mutable_data_ptr<float>() : nullptr, stream),
               "aux_rows");
  check_launch(aux_finish(l1_row.const_data_ptr<float>(), id_row.const_data_ptr<float>(),
                          with_attn ? mse_row.const_data_ptr<float>() : nullptr, kept_ptr, batch, dim,
                          l1.mutable_data_ptr<float>(), id.mutable_data_ptr<float>(), mse.mutable_data_ptr<float>(),
                          stream),
               "aux_finish");
  return {l1, id, mse, grad_l1, grad_id, grad_attn};
}

}  // namespace

REE_CUDA_LIBRARY_IMPL(m) { m.impl(REE_CUDA_OP("aux_forward"), &aux_forward_cuda); }

}  // namespace cuda
}  // namespace ree

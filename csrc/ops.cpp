// The op schemas of torch.ops.ree (the contract is written out in ree_kernels/head.py and
// ree_kernels/aux_loss.py). Kernels register per device in csrc/cpu and csrc/cuda; the fake
// kernels and the autograd formulas are registered from Python through torch.library.
// class_index (PartialFC sampling): int64 [C'] rows of prototypes that the op reads, in that order;
// labels, neg_index and grad_prototypes ([C', D]) are then in positions of class_index.
#include <torch/library.h>

TORCH_LIBRARY(ree, m) {
  m.def(
      "head_forward(Tensor embeddings, Tensor prototypes, Tensor labels, float scale, float margin, "
      "str margin_mode, int ignore_index, int chunk_size, float grad_filter_eps, Tensor? ui_center=None, "
      "str ri_form=\"product\", Tensor? class_index=None) "
      "-> (Tensor loss_rows, Tensor cos_pos, Tensor cos_neg, Tensor neg_index, Tensor lse, Tensor cos_ui, Tensor ri)");
  m.def(
      "head_forward_with_grad(Tensor embeddings, Tensor prototypes, Tensor labels, Tensor row_coef, "
      "float scale, float margin, str margin_mode, int ignore_index, int chunk_size, float grad_filter_eps, "
      "Tensor? ui_center=None, str ri_form=\"product\", Tensor? class_index=None) "
      "-> (Tensor loss, Tensor loss_rows, Tensor cos_pos, Tensor cos_neg, Tensor neg_index, Tensor lse, "
      "Tensor grad_embeddings, Tensor grad_prototypes, Tensor cos_ui, Tensor ri)");
  m.def(
      "head_backward(Tensor embeddings, Tensor prototypes, Tensor labels, Tensor lse, Tensor row_grad, "
      "float scale, float margin, str margin_mode, int chunk_size, float grad_filter_eps, Tensor? class_index=None) "
      "-> (Tensor grad_embeddings, Tensor grad_prototypes)");
  m.def(
      "aux_forward(Tensor ri_pred, Tensor ri_target, Tensor mu_ui, Tensor? attn, Tensor? embeddings, "
      "Tensor? ui_center, Tensor? recognizable, float tau, float beta) "
      "-> (Tensor l1, Tensor id, Tensor mse, Tensor grad_ri_l1, Tensor grad_ri_id, Tensor grad_attn)");
}

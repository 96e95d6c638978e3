// arcface_head on CUDA, the torch side: streams over chunks of prototypes, one cuBLAS product
// (at::mm) per chunk into a float32 workspace, then the chunk's fused epilogue (head_kernels.cu).
// Nothing of size B × C is allocated: the workspace is B × chunk, the saved state per row.
// With a class index (PartialFC sampling) the columns are its C' entries: each chunk's rows are
// gathered into a chunk × D workspace for its product (cuBLAS needs them contiguous), never all
// C' at once, and grad_prototypes is [C', D].
// The contract of head_forward / head_backward is in ree_kernels/head.py; the design in
// docs/design.md (## CUDA backend).
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "../common.h"
#include "glue.h"

namespace ree {
namespace cuda {
namespace {

using at::Tensor;

// The automatic chunk: about 2^23 float32 products (32 MB) per chunk, which keeps cuBLAS busy
// with few launches while the workspace stays a small multiple of the inputs; in multiples of
// 128 columns (cuBLAS tiles).
constexpr int64_t kTileElements = int64_t(1) << 23;
constexpr int64_t kChunkAlign = 128;

int64_t chunk_columns(int64_t batch, int64_t classes, int64_t chunk_size) {
  TORCH_CHECK_VALUE(chunk_size >= 0, "chunk_size must be >= 0 (0: automatic), got ", chunk_size);
  const int64_t automatic = std::max(kChunkAlign, kTileElements / batch / kChunkAlign * kChunkAlign);
  const int64_t cols = chunk_size > 0 ? chunk_size : automatic;
  return std::min(cols, classes);
}

struct HeadInputs {
  Tensor embeddings, prototypes, labels;
  int64_t batch, classes, dim;  // classes: C, or C' with a class index
  ElemType type;
  Tensor index;  // [C'] int64, or undefined

  // The prototypes of columns [begin, begin + n): a view, or gathered into `buffer` through the index.
  Tensor columns(int64_t begin, int64_t n, Tensor& buffer) const {
    if (!index.defined()) return prototypes.narrow(0, begin, n);
    if (!buffer.defined()) buffer = at::empty({std::min(n, classes) * dim}, prototypes.options());
    Tensor out = buffer.narrow(0, 0, n * dim).view({n, dim});
    return at::index_select_out(out, prototypes, 0, index.narrow(0, begin, n));
  }
};

HeadInputs check_head_inputs(const Tensor& embeddings, const Tensor& prototypes, const Tensor& labels,
                             double grad_filter_eps, const c10::optional<Tensor>& class_index) {
  TORCH_CHECK_VALUE(grad_filter_eps == 0.0,
                    "grad_filter_eps is implemented by the triton backend only; the cuda backend needs 0, got ",
                    grad_filter_eps);
  const c10::Device device = embeddings.device();
  check_cuda(embeddings, "embeddings", device);
  check_cuda(prototypes, "prototypes", device);
  check_cuda(labels, "labels", device);
  TORCH_CHECK_VALUE(embeddings.dim() == 2, "embeddings must be [B, D], got ", embeddings.dim(), " dimensions");
  TORCH_CHECK_VALUE(prototypes.dim() == 2, "prototypes must be [C, D], got ", prototypes.dim(), " dimensions");
  TORCH_CHECK_VALUE(labels.dim() == 1, "labels must be [B], got ", labels.dim(), " dimensions");
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK_TYPE(prototypes.scalar_type() == embeddings.scalar_type(), "prototypes has dtype ",
                   prototypes.scalar_type(), " but embeddings has ", embeddings.scalar_type());
  const ElemType type = elem_type(embeddings, "embeddings");
  const int64_t batch = embeddings.size(0), classes = prototypes.size(0), dim = embeddings.size(1);
  TORCH_CHECK_VALUE(batch > 0, "embeddings has no rows (B = 0)");
  TORCH_CHECK_VALUE(classes > 0, "prototypes has no rows (C = 0)");
  TORCH_CHECK_VALUE(dim > 0, "embeddings has no columns (D = 0)");
  TORCH_CHECK_VALUE(prototypes.size(1) == dim, "prototypes has D = ", prototypes.size(1), " but embeddings has D = ",
                    dim);
  TORCH_CHECK_VALUE(labels.size(0) == batch, "labels has ", labels.size(0), " entries but B is ", batch);
  Tensor index;
  if (class_index.has_value()) {
    index = class_index->contiguous();
    check_cuda(index, "class_index", device);
    TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "class_index must be int64, got ", index.scalar_type());
    TORCH_CHECK_VALUE(index.dim() == 1 && index.size(0) > 0, "class_index must be a non-empty [C'], got ",
                      index.sizes());
  }
  return {embeddings.contiguous(), prototypes.contiguous(), labels.contiguous(), batch,
          index.defined() ? index.size(0) : classes, dim, type, index};
}

// A per-row float32 input of the backward (lse, row_grad), on the inputs' device.
Tensor row_values(const Tensor& t, const char* name, const HeadInputs& in) {
  check_cuda(t, name, in.embeddings.device());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == in.batch, name, " must be [B] with B = ", in.batch, ", got ",
                    t.sizes());
  return t.to(at::kFloat).contiguous();
}

// out = a · b in float32. Half inputs use aten::mm.dtype_out: cuBLAS accumulates in float32 and
// writes float32, so the cosines keep float32 precision (a half-rounded cosine times s = 64 would
// be far too coarse) without a float32 copy of the inputs.
void mm_float(const Tensor& a, const Tensor& b, Tensor& out) {
  if (a.scalar_type() == at::kFloat) {
    at::mm_out(out, a, b);
  } else {
    mm_half_to_float(out, a, b);
  }
}

// The label columns' values (kernels.h: HeadTargets), [4, B] float32.
struct Targets {
  Tensor values;
  HeadTargets view;
};

Targets label_columns(const HeadInputs& in, int64_t ignore_index, double scale, const MarginParams& margin,
                      cudaStream_t stream) {
  Tensor values = at::empty({4, in.batch}, in.embeddings.options().dtype(at::kFloat));
  float* base = values.mutable_data_ptr<float>();
  const HeadTargets view{base, base + in.batch, base + 2 * in.batch, base + 3 * in.batch};
  // With a class index, head_targets reads the label's prototype row through it: a row with a
  // target gets its class id, every other row −1 with −1 as the ignore index (no target); the
  // chunk kernels and the finish keep the positions and the caller's ignore_index.
  Tensor labels = in.labels;
  int64_t targets_ignore = ignore_index;
  int64_t targets_classes = in.classes;
  if (in.index.defined()) {
    const Tensor has = (labels >= 0) & (labels < in.classes) & (labels != ignore_index);
    labels = at::where(has, in.index.index_select(0, labels.clamp(0, in.classes - 1)), -1).contiguous();
    targets_ignore = -1;
    targets_classes = in.prototypes.size(0);
  }
  check_launch(head_targets(in.embeddings.const_data_ptr(), in.prototypes.const_data_ptr(), in.type,
                            labels.const_data_ptr<int64_t>(), in.batch, targets_classes, in.dim, targets_ignore,
                            static_cast<float>(scale), margin, view, stream),
               "head_targets");
  return {values, view};
}

// The inverse norms of the rows of x, float32; with a direction `ui` ([D] float32), also the rows'
// cosines to it, written to `cos_ui`.
Tensor inverse_norms(const Tensor& x, ElemType type, cudaStream_t stream, const Tensor& ui = Tensor(),
                     float* cos_ui = nullptr) {
  Tensor inv = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  check_launch(row_inv_norms(x.const_data_ptr(), type, x.size(0), x.size(1), inv.mutable_data_ptr<float>(),
                             ui.defined() ? ui.const_data_ptr<float>() : nullptr, cos_ui, stream),
               "row_inv_norms");
  return inv;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> head_forward_cuda(
    const Tensor& embeddings, const Tensor& prototypes, const Tensor& labels, double scale, double margin,
    c10::string_view margin_mode, int64_t ignore_index, int64_t chunk_size, double grad_filter_eps,
    const c10::optional<Tensor>& ui_center, c10::string_view ri_form, const c10::optional<Tensor>& class_index) {
  const HeadInputs in = check_head_inputs(embeddings, prototypes, labels, grad_filter_eps, class_index);
  const MarginParams params = make_margin(std::string(margin_mode.data(), margin_mode.size()), margin);
  const RiForm form = make_ri_form(std::string(ri_form.data(), ri_form.size()));
  const int64_t cols = chunk_columns(in.batch, in.classes, chunk_size);
  c10::DeviceGuard guard(in.embeddings.device());
  const Tensor ui = ui_direction(ui_center, in.embeddings);
  const cudaStream_t stream = current_stream(in.embeddings.device());
  const auto float_opts = in.embeddings.options().dtype(at::kFloat);

  Tensor loss = at::empty({in.batch}, float_opts), cos_pos = at::empty({in.batch}, float_opts);
  Tensor cos_neg = at::empty({in.batch}, float_opts), lse = at::empty({in.batch}, float_opts);
  Tensor cos_ui = at::empty({in.batch}, float_opts), ri = at::empty({in.batch}, float_opts);
  Tensor neg_index = at::empty({in.batch}, in.labels.options());
  const HeadRowOutputs out{loss.mutable_data_ptr<float>(),    cos_pos.mutable_data_ptr<float>(),
                           cos_neg.mutable_data_ptr<float>(), neg_index.mutable_data_ptr<int64_t>(),
                           lse.mutable_data_ptr<float>(),     cos_ui.mutable_data_ptr<float>(),
                           ri.mutable_data_ptr<float>(),      ui.defined(),
                           form};

  const Targets targets = label_columns(in, ignore_index, scale, params, stream);
  const Tensor inv_rows = inverse_norms(in.embeddings, in.type, stream, ui, out.cos_ui);
  // With an index, each chunk's inverse norms are written when its rows are gathered.
  Tensor inv_classes = in.index.defined() ? at::empty({in.classes}, float_opts)
                                          : inverse_norms(in.prototypes, in.type, stream);
  Tensor gathered;
  const int64_t splits = head_row_splits(in.batch);
  const int64_t slots = splits * in.batch;
  Tensor state_values = at::empty({3 * slots}, float_opts);
  Tensor state_index = at::empty({slots}, in.labels.options());
  float* values = state_values.mutable_data_ptr<float>();
  const HeadRowState state{values, values + slots, values + 2 * slots, state_index.mutable_data_ptr<int64_t>(), splits};

  Tensor workspace = at::empty({in.batch * cols}, float_opts);
  for (int64_t begin = 0; begin < in.classes; begin += cols) {
    const int64_t n = std::min(cols, in.classes - begin);
    Tensor dots = workspace.narrow(0, 0, in.batch * n).view({in.batch, n});
    const Tensor chunk = in.columns(begin, n, gathered);
    if (in.index.defined()) inv_classes.narrow(0, begin, n).copy_(inverse_norms(chunk, in.type, stream));
    mm_float(in.embeddings, chunk.t(), dots);
    check_launch(head_forward_chunk(dots.const_data_ptr<float>(), in.batch, begin, n, in.classes,
                                    inv_rows.const_data_ptr<float>(), inv_classes.const_data_ptr<float>(),
                                    in.labels.const_data_ptr<int64_t>(), ignore_index, static_cast<float>(scale),
                                    targets.view.logit, begin == 0, state, stream),
                 "head_forward_chunk");
  }
  check_launch(head_forward_finish(in.batch, in.classes, in.labels.const_data_ptr<int64_t>(), ignore_index,
                                   targets.view, state, out, stream),
               "head_forward_finish");
  return {loss, cos_pos, cos_neg, neg_index, lse, cos_ui, ri};
}

std::tuple<Tensor, Tensor> head_backward_cuda(const Tensor& embeddings, const Tensor& prototypes, const Tensor& labels,
                                              const Tensor& lse, const Tensor& row_grad, double scale, double margin,
                                              c10::string_view margin_mode, int64_t chunk_size,
                                              double grad_filter_eps, const c10::optional<Tensor>& class_index) {
  const HeadInputs in = check_head_inputs(embeddings, prototypes, labels, grad_filter_eps, class_index);
  const MarginParams params = make_margin(std::string(margin_mode.data(), margin_mode.size()), margin);
  const int64_t cols = chunk_columns(in.batch, in.classes, chunk_size);
  c10::DeviceGuard guard(in.embeddings.device());
  const cudaStream_t stream = current_stream(in.embeddings.device());
  const auto float_opts = in.embeddings.options().dtype(at::kFloat);
  const Tensor row_lse = row_values(lse, "lse", in);
  const Tensor row_coef = row_values(row_grad, "row_grad", in);

  // The backward's target is any label in [0, C).
  const Targets targets = label_columns(in, kNoIgnoreIndex, scale, params, stream);
  const Tensor inv_rows = inverse_norms(in.embeddings, in.type, stream);
  Tensor inv_classes = in.index.defined() ? at::empty({in.classes}, float_opts)
                                          : inverse_norms(in.prototypes, in.type, stream);
  Tensor gathered;
  // The row factor row_grad_i · s / ‖v_i‖ of ∂/∂cos_ij = mantissa_i · 2^e_i (kernels.h:
  // head_grad_chunk): the mantissa goes into G, the power of two scales V's rows exactly (a
  // rounded scale would tilt them, and the radial part of the gradient would no longer cancel).
  const auto [row_mantissa, row_exponent] = at::frexp(row_coef * inv_rows * scale);
  const Tensor row_power = at::ldexp(at::ones_like(row_mantissa), row_exponent);
  // Float16 rows are scaled by row_power / 2^k instead, k ≥ 0 the least that keeps them below
  // 2^15 (a loss scaler's 2^16 in row_grad would otherwise overflow them although the gradients
  // fit); the float32 products get 2^k back. Powers of two: exact. No host read.
  const Tensor class_shift = in.type == ElemType::Float16
      ? at::ldexp(at::ones({}, float_opts),
                  (std::get<1>(at::frexp((row_power / inv_rows).max())) - 15).clamp_min(0))
      : Tensor();
  const Tensor row_factor = class_shift.defined() ? row_power / class_shift : row_power;
  const Tensor scaled_rows = (in.embeddings.to(at::kFloat) * row_factor.unsqueeze(1)).to(in.embeddings.scalar_type());
  Tensor grad_embeddings = at::empty({in.batch, in.dim}, in.embeddings.options());
  Tensor grad_prototypes = at::empty({in.classes, in.dim}, in.prototypes.options());
  // q accumulates Σ_chunks G · W_chunk in float32, in chunk order (deterministic, no atomics).
  Tensor q = at::empty({in.batch, in.dim}, float_opts);
  Tensor workspace = at::empty({in.batch * cols}, float_opts);
  // Float32 inputs turn the products into G in place; half inputs need G in their own type for
  // cuBLAS, and a float32 buffer for each chunk's G · W_chunk before it is added to q.
  const bool half = in.type != ElemType::Float32;
  Tensor grad_workspace = half ? at::empty({in.batch * cols}, in.embeddings.options()) : workspace;
  Tensor chunk_product = half ? at::empty({in.batch, in.dim}, float_opts) : Tensor();
  Tensor class_workspace = at::empty({cols * in.dim}, float_opts);

  for (int64_t begin = 0; begin < in.classes; begin += cols) {
    const int64_t n = std::min(cols, in.classes - begin);
    const Tensor chunk = in.columns(begin, n, gathered);
    if (in.index.defined()) inv_classes.narrow(0, begin, n).copy_(inverse_norms(chunk, in.type, stream));
    Tensor dots = workspace.narrow(0, 0, in.batch * n).view({in.batch, n});
    mm_float(in.embeddings, chunk.t(), dots);
    Tensor grad = grad_workspace.narrow(0, 0, in.batch * n).view({in.batch, n});
    check_launch(head_grad_chunk(dots.const_data_ptr<float>(), grad.mutable_data_ptr(), in.type, in.batch, begin, n,
                                 in.classes, inv_rows.const_data_ptr<float>(), inv_classes.const_data_ptr<float>(),
                                 in.labels.const_data_ptr<int64_t>(), targets.view, row_lse.const_data_ptr<float>(),
                                 row_mantissa.const_data_ptr<float>(), static_cast<float>(scale), stream),
                 "head_grad_chunk");
    // The chunk's prototype gradients, complete once the normalisation backward has run.
    Tensor class_grad = class_workspace.narrow(0, 0, n * in.dim).view({n, in.dim});
    mm_float(grad.t(), scaled_rows, class_grad);
    if (class_shift.defined()) class_grad.mul_(class_shift);
    check_launch(normalize_backward(class_grad.const_data_ptr<float>(), nullptr, chunk.const_data_ptr(), in.type, n,
                                    in.dim, grad_prototypes.narrow(0, begin, n).mutable_data_ptr(), stream),
                 "normalize_backward");
    if (begin == 0) {
      mm_float(grad, chunk, q);
    } else if (!half) {
      q.addmm_(grad, chunk);
    } else {
      mm_float(grad, chunk, chunk_product);
      q.add_(chunk_product);
    }
  }
  check_launch(normalize_backward(q.const_data_ptr<float>(), row_power.const_data_ptr<float>(),
                                  in.embeddings.const_data_ptr(), in.type, in.batch, in.dim,
                                  grad_embeddings.mutable_data_ptr(), stream),
               "normalize_backward");
  return {grad_embeddings, grad_prototypes};
}

}  // namespace

REE_CUDA_LIBRARY_IMPL(m) {
  m.impl(REE_CUDA_OP("head_forward"), &head_forward_cuda);
  m.impl(REE_CUDA_OP("head_backward"), &head_backward_cuda);
}

}  // namespace cuda
}  // namespace ree

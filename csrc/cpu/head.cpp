// arcface_head on the CPU. The op contract is the docstring of ree_kernels/head.py; the
// specification is reference.arcface_rows (and loss_coefficients for the row coefficients).
// Design and measurements: docs/design.md, "CPU backend".
//
// No B × C tensor and no normalised copy of W: the cosines of one tile exist at a time, as the
// output of a BLAS product of the normalised embeddings with the raw prototypes (at::mm), scaled
// by the prototypes' inverse norms in one fused pass per row that reduces them to the row's
// statistics and, when gradients are wanted, overwrites them with ∂L/∂cos (times the inverse
// norm, so that the next products take the raw prototypes again). Three drivers share the row
// code (head_rows.h):
//   forward_pass:     chunks of classes against all rows, online log-sum-exp (one product);
//   backward_pass:    chunks of classes against all rows, recomputing the cosines with a given
//                     lse (three products per chunk: S = V̂·W_cᵀ, dV̂ += G·W_c, dŴ_c = Gᵀ·V̂);
//   with_grad_pass:   blocks of rows against all classes at once, so that the lse is known before
//                     the gradient: three products and no recompute.
// The UI cosine comes from the pass that normalises the embeddings (Prepared::ui_cosines), the
// RI from the row's epilogue (RowOutputs::write), so that one op call returns the whole row.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "../common.h"
#include "head_rows.h"
#include "lanes.h"

namespace ree {
namespace {

using at::Tensor;

using namespace cpu;  // the row arithmetic (head_rows.h)

// ---------------------------------------------------------------------------------------------
// Norms and the normalisation's backward (F.normalize with eps = kNormEps).
// ---------------------------------------------------------------------------------------------

// Rows of `length` per thread at least: a parallel region for less work costs more than it saves.
int64_t rows_grain(int64_t length) { return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(length, 1)); }

// ‖x_i‖², accumulated in double: the inverse norms then carry one rounding to T.
template <typename scalar_t>
void squared_norms(const scalar_t* x, int64_t rows, int64_t dim, double* out) {
  at::parallel_for(0, rows, rows_grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = dot<double>(x + i * dim, x + i * dim, dim);
  });
}

// ∂L/∂x of x̂ = x / max(‖x‖, ε), from t = ∂L/∂x̂ / max(‖x‖, ε): t − (x̂·t)·x̂, or t where the
// norm is clamped (x̂ is then a plain scaling). `out` may alias `t`.
template <typename scalar_t, typename T>
REE_LANES void normalize_backward(const scalar_t* x, double squared_norm, const T* t, scalar_t* out,
                                  int64_t dim) {
  T along = 0;
  if (!norm_clamped(squared_norm)) {
    const double inv = inverse_norm(squared_norm);
    along = static_cast<T>(dot<T>(x, t, dim) * inv * inv);
  }
  for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<scalar_t>(t[d] - along * static_cast<T>(x[d]));
}

// ---------------------------------------------------------------------------------------------
// The drivers.
// ---------------------------------------------------------------------------------------------

// About this many classes per chunk in forward_pass and backward_pass unless chunk_size says
// otherwise (the time is flat from 1024 to 4096 on one thread; docs/design.md).
constexpr int64_t kClassChunk = 2048;
// Rows per block of with_grad_pass: each block streams W through two products and T through
// a third, so fewer rows are slower; more rows cost rb × C workspace (docs/design.md).
constexpr int64_t kRowBlock = 128;
// The rb × C cosines of with_grad_pass stay below this many elements (128 MB in float32); where
// that leaves fewer than kRowBlock / 2 rows, chunks of classes are faster.
constexpr int64_t kRowBlockElements = int64_t(1) << 25;

// At most kRowBlock rows (fewer where rb × C would pass kRowBlockElements), in equal blocks.
int64_t rows_per_block(int64_t batch, int64_t classes) {
  const int64_t most = std::min({batch, kRowBlock, std::max<int64_t>(1, kRowBlockElements / classes)});
  const int64_t blocks = (batch + most - 1) / most;
  return (batch + blocks - 1) / blocks;
}


// The inputs in the form every driver takes: normalised embeddings in the accumulation type
// (B × D, small), the prototypes as given, the squared norms of both. With a class index (PartialFC
// sampling) the classes are its C' positions: column j reads prototype row index[j], through the
// index (a chunk at a time, never a C' × D copy), and grad_prototypes is [C', D].
template <typename scalar_t, typename T>
struct Prepared {
  Tensor emb, protos, labels;
  Tensor index;     // [C'] int64, or undefined (every row, in order)
  Tensor v_hat;     // [B, D] in T
  Tensor sq_v;      // [B] in double
  Tensor sq_w;      // [C] in double
  Tensor inv_w;     // [C] in T
  int64_t batch, classes, dim;

  Prepared(const Tensor& embeddings, const Tensor& prototypes, const Tensor& labels_in,
           const c10::optional<Tensor>& class_index)
      : emb(embeddings.contiguous()), protos(prototypes.contiguous()), labels(labels_in.contiguous()) {
    if (class_index.has_value()) index = class_index->contiguous();
    batch = emb.size(0);
    classes = index.defined() ? index.size(0) : protos.size(0);
    dim = emb.size(1);
    const auto acc = emb.options().dtype(c10::CppTypeToScalarType<T>::value);
    sq_v = at::empty({batch}, emb.options().dtype(at::kDouble));
    sq_w = at::empty({classes}, sq_v.options());
    squared_norms(emb.data_ptr<scalar_t>(), batch, dim, sq_v.data_ptr<double>());
    if (index.defined()) {
      double* sq = sq_w.data_ptr<double>();
      at::parallel_for(0, classes, rows_grain(dim), [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) squared_norms(row(j), 1, dim, sq + j);
      });
    } else {
      squared_norms(protos.data_ptr<scalar_t>(), classes, dim, sq_w.data_ptr<double>());
    }
    inv_w = at::empty({classes}, acc);
    const double* sq = sq_w.data_ptr<double>();
    T* inv = inv_w.data_ptr<T>();
    for (int64_t j = 0; j < classes; ++j) inv[j] = static_cast<T>(inverse_norm(sq[j]));
    v_hat = at::empty({batch, dim}, acc);
    const scalar_t* v = emb.data_ptr<scalar_t>();
    T* out = v_hat.data_ptr<T>();
    const double* sqv = sq_v.data_ptr<double>();
    for (int64_t i = 0; i < batch; ++i) {
      const double a = inverse_norm(sqv[i]);
      for (int64_t d = 0; d < dim; ++d) out[i * dim + d] = static_cast<T>(static_cast<double>(v[i * dim + d]) * a);
    }
  }

  // cos_ui_i = clamp(v̂_i · û, −1, 1) with û = ū / max(‖ū‖, ε) (reference.cosine_to_ui), from the
  // raw rows with double accumulation; `center` is ū in T, or undefined for NaN (no centre).
  void ui_cosines(const Tensor& center, T* out) const {
    if (!center.defined()) {
      std::fill(out, out + batch, kNaN<T>);
      return;
    }
    const T* u = center.data_ptr<T>();
    const double inv_u = inverse_norm(dot<double>(u, u, dim));
    const scalar_t* v = emb.data_ptr<scalar_t>();
    const double* sqv = sq_v.data_ptr<double>();
    at::parallel_for(0, batch, rows_grain(dim), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        out[i] = clamp_cos(static_cast<T>(dot<double>(v + i * dim, u, dim) * inverse_norm(sqv[i]) * inv_u));
      }
    });
  }

  // The prototype of column j.
  const scalar_t* row(int64_t j) const {
    return protos.data_ptr<scalar_t>() + (index.defined() ? index.data_ptr<int64_t>()[j] : j) * dim;
  }

  ExactCosine<scalar_t, T> exact(int64_t i, int64_t c0) const {
    return {emb.data_ptr<scalar_t>() + i * dim, inverse_norm(sq_v.data_ptr<double>()[i]), protos.data_ptr<scalar_t>(),
            index.defined() ? index.data_ptr<int64_t>() : nullptr, c0, sq_w.data_ptr<double>() + c0, dim};
  }

  // The prototypes of columns [c0, c0 + n) in T: a view, or converted into `buffer` (bfloat16,
  // float16), or gathered into it through the class index (a chunk-sized workspace).
  Tensor prototype_chunk(int64_t c0, int64_t n, Tensor& buffer) const {
    if (std::is_same<scalar_t, T>::value && !index.defined()) return protos.narrow(0, c0, n);
    if (!buffer.defined()) buffer = at::empty({std::min(classes, n) * dim}, v_hat.options());
    Tensor out = buffer.narrow(0, 0, n * dim).view({n, dim});
    if (!index.defined()) return out.copy_(protos.narrow(0, c0, n));
    T* o = out.data_ptr<T>();
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t* w = row(c0 + j);
      for (int64_t d = 0; d < dim; ++d) o[j * dim + d] = static_cast<T>(w[d]);
    }
    return out;
  }

  // grad_embeddings from u = ∂L/∂v̂ ([B, D] in T, overwritten).
  Tensor embedding_grad(Tensor& u) const {
    Tensor grad = at::empty_like(emb);
    T* up = u.data_ptr<T>();
    const double* sqv = sq_v.data_ptr<double>();
    const scalar_t* v = emb.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, batch, rows_grain(dim), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        T* row = up + i * dim;
        const T a = static_cast<T>(inverse_norm(sqv[i]));
        for (int64_t d = 0; d < dim; ++d) row[d] *= a;
        normalize_backward(v + i * dim, sqv[i], row, g + i * dim, dim);
      }
    });
    return grad;
  }

  // grad_prototypes rows (columns) [c0, c0 + n) from t = ∂L/∂ŵ · inv_w ([n, D] in T; may alias the output).
  void prototype_grad(const T* t, int64_t c0, int64_t n, scalar_t* grad) const {
    const double* sq = sq_w.data_ptr<double>() + c0;
    at::parallel_for(0, n, rows_grain(dim), [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        normalize_backward(row(c0 + j), sq[j], t + j * dim, grad + (c0 + j) * dim, dim);
      }
    });
  }
};

// forward_pass and backward_pass give each thread one contiguous range of class chunks, with its
// own buffers and single-threaded products (BLAS runs on one thread inside a parallel region),
// and combine the ranges in class order at the end: one synchronisation per pass rather than
// two per chunk, which on a loaded machine costs a scheduler wake-up each (docs/design.md).
// The worker threads take the caller's thread-local state: the ATen calls there must also run
// below autograd, as the op itself does.

// Class chunks of `chunk` against all rows; one product per chunk, online log-sum-exp. With
// `keep` (B × C in T), each chunk's products stay there, chunk after chunk, for backward_pass.
template <typename scalar_t, typename T>
void forward_pass(const Prepared<scalar_t, T>& in, const Problem<T>& p, int64_t chunk, const RowOutputs<T>& out,
                  T* keep = nullptr) {
  const int64_t chunks = (in.classes + chunk - 1) / chunk;
  std::vector<std::vector<RowState<T>>> ranges(chunks);  // filled at each range's first chunk
  const int64_t* labels = in.labels.template data_ptr<int64_t>();
  const T* inv_w = in.inv_w.template data_ptr<T>();
  const at::ThreadLocalState caller;
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    const at::ThreadLocalStateGuard state(caller);
    std::vector<RowState<T>>& states = ranges[first];
    states.resize(in.batch);
    Tensor w_buffer;
    Tensor s_buffer = at::empty({in.batch * std::min(chunk, in.classes)}, in.v_hat.options());
    for (int64_t c0 = first * chunk; c0 < std::min(last * chunk, in.classes); c0 += chunk) {
      const int64_t n = std::min(chunk, in.classes - c0);
      Tensor s = keep ? at::from_blob(keep + in.batch * c0, {in.batch, n}, in.v_hat.options())
                      : s_buffer.narrow(0, 0, in.batch * n).view({in.batch, n});
      at::mm_out(s, in.v_hat, in.prototype_chunk(c0, n, w_buffer).t());
      const T* sp = s.data_ptr<T>();
      for (int64_t i = 0; i < in.batch; ++i) {
        row_forward_chunk(states[i], sp + i * n, inv_w + c0, n, c0, p.label_in(labels[i], c0, n), in.exact(i, c0), p);
      }
    }
  });
  for (int64_t i = 0; i < in.batch; ++i) {
    RowState<T> st;
    for (const auto& range : ranges) {
      if (!range.empty()) st.merge(range[i]);
    }
    out.write(i, st, labels[i], p);
  }
}

// Gradients of Σ_i coef_i · loss_i given each row's lse; chunks of classes, recomputing the
// cosines, or taking them from `kept` (forward_pass's `keep`, the same chunking; overwritten).
// Returns (grad_embeddings, grad_prototypes).
template <typename scalar_t, typename T>
std::tuple<Tensor, Tensor> backward_pass(const Prepared<scalar_t, T>& in, const Problem<T>& p, int64_t chunk,
                                         const T* lse, const T* coef, T* kept = nullptr) {
  constexpr bool same = std::is_same<scalar_t, T>::value;
  const int64_t chunks = (in.classes + chunk - 1) / chunk;
  Tensor grad_w = at::empty({in.classes, in.dim}, in.protos.options());  // by column
  std::vector<Tensor> range_u(chunks);  // ∂L/∂v̂ of each range, at its first chunk
  const int64_t* labels = in.labels.template data_ptr<int64_t>();
  const T* inv_w = in.inv_w.template data_ptr<T>();
  const at::ThreadLocalState caller;
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    const at::ThreadLocalStateGuard state(caller);
    Tensor u = at::zeros_like(in.v_hat);
    const int64_t width = std::min(chunk, in.classes);
    Tensor s_buffer = at::empty({in.batch * width}, in.v_hat.options());
    Tensor t_buffer = same ? Tensor() : at::empty({width * in.dim}, in.v_hat.options());
    Tensor w_buffer;
    for (int64_t c0 = first * chunk; c0 < std::min(last * chunk, in.classes); c0 += chunk) {
      const int64_t n = std::min(chunk, in.classes - c0);
      const Tensor wc = in.prototype_chunk(c0, n, w_buffer);
      Tensor s;
      if (kept) {
        s = at::from_blob(kept + in.batch * c0, {in.batch, n}, in.v_hat.options());
      } else {
        s = s_buffer.narrow(0, 0, in.batch * n).view({in.batch, n});
        at::mm_out(s, in.v_hat, wc.t());
      }
      T* sp = s.data_ptr<T>();
      for (int64_t i = 0; i < in.batch; ++i) {
        T* row = sp + i * n;
        const int64_t label_col = p.label_in(labels[i], c0, n);
        const ExactCosine<scalar_t, T> exact = in.exact(i, c0);
        const Candidates<T> cand = find_candidates(row, inv_w + c0, n, label_col, exact.slack());
        row_grad_chunk(row, inv_w + c0, n, label_col, lse[i], coef[i], cand, exact, p);
      }
      u.addmm_(s, wc);
      Tensor t = same ? grad_w.narrow(0, c0, n) : t_buffer.narrow(0, 0, n * in.dim).view({n, in.dim});
      at::mm_out(t, s.t(), in.v_hat);
      in.prototype_grad(t.data_ptr<T>(), c0, n, grad_w.data_ptr<scalar_t>());
    }
    range_u[first] = u;
  });
  Tensor u;
  for (const Tensor& part : range_u) {
    if (part.defined()) u = u.defined() ? u.add_(part) : part;
  }
  return {in.embedding_grad(u), grad_w};
}

// Blocks of rows against every class at once: the statistics, then the gradients of
// Σ_i coef_i · loss_i in the same pass, three products per block. Prototypes not in T would be
// converted whole and need a C × D accumulator in T: head_forward_with_grad_cpu avoids that.
template <typename scalar_t, typename T>
std::tuple<Tensor, Tensor> with_grad_pass(const Prepared<scalar_t, T>& in, const Problem<T>& p, int64_t rows,
                                          const T* coef, const RowOutputs<T>& out) {
  constexpr bool same = std::is_same<scalar_t, T>::value;
  const int64_t classes = in.classes;
  Tensor w_buffer;
  const Tensor w = in.prototype_chunk(0, classes, w_buffer);
  Tensor grad_w = at::empty({in.classes, in.dim}, in.protos.options());  // by column
  Tensor t = same ? grad_w : at::empty({classes, in.dim}, in.v_hat.options());  // ∂L/∂ŵ · inv_w
  Tensor u = at::empty_like(in.v_hat);                                          // ∂L/∂v̂
  Tensor s_buffer = at::empty({std::min(rows, in.batch) * classes}, in.v_hat.options());
  const int64_t* labels = in.labels.template data_ptr<int64_t>();
  const T* inv_w = in.inv_w.template data_ptr<T>();
  for (int64_t r0 = 0; r0 < in.batch; r0 += rows) {
    const int64_t m = std::min(rows, in.batch - r0);
    const Tensor v_block = in.v_hat.narrow(0, r0, m);
    Tensor s = s_buffer.narrow(0, 0, m * classes).view({m, classes});
    at::mm_out(s, v_block, w.t());
    T* sp = s.data_ptr<T>();
    at::parallel_for(0, m, rows_grain(classes), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t i = r0 + k;
        const int64_t label_col = p.label_in(labels[i], 0, classes);
        RowState<T> st;
        const ExactCosine<scalar_t, T> exact = in.exact(i, 0);
        const Candidates<T> cand = row_forward_chunk(st, sp + k * classes, inv_w, classes, 0, label_col, exact, p);
        out.write(i, st, labels[i], p);
        row_grad_chunk(sp + k * classes, inv_w, classes, label_col, out.lse[i], coef[i], cand, exact, p);
      }
    });
    Tensor u_block = u.narrow(0, r0, m);
    at::mm_out(u_block, s, w);
    if (r0 == 0) {
      at::mm_out(t, s.t(), v_block);
    } else {
      t.addmm_(s.t(), v_block);
    }
  }
  in.prototype_grad(t.data_ptr<T>(), 0, classes, grad_w.data_ptr<scalar_t>());
  return {in.embedding_grad(u), grad_w};
}

// ---------------------------------------------------------------------------------------------
// The ops.
// ---------------------------------------------------------------------------------------------

void check_inputs(const Tensor& embeddings, const Tensor& prototypes, const Tensor& labels, double scale,
                  int64_t chunk_size, double grad_filter_eps, const c10::optional<Tensor>& class_index) {
  TORCH_CHECK_VALUE(embeddings.dim() == 2, "embeddings must be [B, D], got ", embeddings.sizes());
  TORCH_CHECK_VALUE(prototypes.dim() == 2, "prototypes must be [C, D], got ", prototypes.sizes());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == embeddings.size(0),
                    "labels must be [B] with B = ", embeddings.size(0), ", got ", labels.sizes());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK_TYPE(prototypes.scalar_type() == embeddings.scalar_type(), "prototypes has dtype ",
                   prototypes.scalar_type(), " but embeddings has ", embeddings.scalar_type());
  TORCH_CHECK_VALUE(embeddings.size(0) > 0 && prototypes.size(0) > 0 && embeddings.size(1) > 0,
                    "B, C and D must be positive; got embeddings ", embeddings.sizes(), ", prototypes ",
                    prototypes.sizes());
  TORCH_CHECK_VALUE(prototypes.size(1) == embeddings.size(1), "prototypes has D = ", prototypes.size(1),
                    " but embeddings has D = ", embeddings.size(1));
  TORCH_CHECK_VALUE(prototypes.size(0) <= std::numeric_limits<int32_t>::max(),
                    "prototypes: at most 2^31 − 1 classes, got ", prototypes.size(0));
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "scale must be a finite positive number, got ", scale);
  TORCH_CHECK_VALUE(chunk_size >= 0, "chunk_size must be >= 0 (0: automatic), got ", chunk_size);
  TORCH_CHECK_VALUE(grad_filter_eps == 0.0,
                    "grad_filter_eps is implemented by the triton backend only; the cpu backend is always "
                    "exact (pass 0), got ",
                    grad_filter_eps);
  if (class_index.has_value()) {
    const Tensor& index = *class_index;
    TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "class_index must be int64, got ", index.scalar_type());
    TORCH_CHECK_VALUE(index.dim() == 1 && index.size(0) > 0, "class_index must be a non-empty [C'], got ",
                      index.sizes());
    TORCH_CHECK_VALUE(index.device() == prototypes.device(), "class_index is on ", index.device(),
                      " but prototypes is on ", prototypes.device());
    const int64_t classes = prototypes.size(0);
    TORCH_CHECK_VALUE(((index < 0) | (index >= classes)).any().item<bool>() == false,
                      "class_index must lie in [0, C) with C = ", classes);
  }
}

Tensor row_vector(const Tensor& x, const char* name, int64_t batch, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(x.dim() == 1 && x.size(0) == batch, name, " must be [B] with B = ", batch, ", got ",
                    x.sizes());
  return x.to(dtype).contiguous();
}

// chunk_size, or about kClassChunk classes such that every thread gets as many chunks.
int64_t class_chunk(int64_t chunk_size, int64_t classes) {
  if (chunk_size > 0) return std::min(chunk_size, classes);
  const int64_t threads = at::get_num_threads();
  const int64_t per_thread = std::max<int64_t>(1, (classes + threads * kClassChunk / 2) / (threads * kClassChunk));
  return std::max<int64_t>(1, (classes + threads * per_thread - 1) / (threads * per_thread));
}

// (loss_rows, cos_pos, cos_neg, neg_index, lse, cos_ui, ri): head_forward's outputs.
using ForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

ForwardResult empty_rows(const Tensor& embeddings) {
  const int64_t batch = embeddings.size(0);
  const auto opts = embeddings.options().dtype(stat_type(embeddings.scalar_type()));
  return {at::empty({batch}, opts), at::empty({batch}, opts), at::empty({batch}, opts),
          at::empty({batch}, opts.dtype(at::kLong)), at::empty({batch}, opts), at::empty({batch}, opts),
          at::empty({batch}, opts)};
}

// The row outputs, with cos_ui already computed (the normalisation pre-pass).
template <typename scalar_t, typename T>
RowOutputs<T> outputs_of(ForwardResult& rows, const Prepared<scalar_t, T>& in, const Tensor& ui,
                         c10::string_view ri_form) {
  T* cos_ui = std::get<5>(rows).data_ptr<T>();
  in.ui_cosines(ui, cos_ui);
  return {std::get<0>(rows).data_ptr<T>(),
          std::get<1>(rows).data_ptr<T>(),
          std::get<2>(rows).data_ptr<T>(),
          std::get<3>(rows).data_ptr<int64_t>(),
          std::get<4>(rows).data_ptr<T>(),
          cos_ui,
          std::get<6>(rows).data_ptr<T>(),
          ui.defined(),
          make_ri_form(std::string(ri_form))};
}

template <typename T>
Problem<T> problem_of(double scale, double margin, const std::string& margin_mode, int64_t ignore_index,
                      int64_t classes) {
  return {static_cast<T>(scale), make_margin(margin_mode, margin), ignore_index, classes};
}

#define REE_DISPATCH_HEAD(TYPE, NAME, ...)                                                   \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, [&] {                \
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>; \
    __VA_ARGS__();                                                                           \
  })

ForwardResult head_forward_cpu(const Tensor& embeddings, const Tensor& prototypes, const Tensor& labels,
                               double scale, double margin, c10::string_view margin_mode, int64_t ignore_index,
                               int64_t chunk_size, double grad_filter_eps, const c10::optional<Tensor>& ui_center,
                               c10::string_view ri_form, const c10::optional<Tensor>& class_index) {
  check_inputs(embeddings, prototypes, labels, scale, chunk_size, grad_filter_eps, class_index);
  const Tensor ui = ui_direction(ui_center, embeddings);
  ForwardResult rows = empty_rows(embeddings);
  REE_DISPATCH_HEAD(embeddings.scalar_type(), "head_forward_cpu", [&] {
    const Prepared<scalar_t, acc_t> in(embeddings, prototypes, labels, class_index);
    const auto p = problem_of<acc_t>(scale, margin, std::string(margin_mode), ignore_index, in.classes);
    forward_pass(in, p, class_chunk(chunk_size, in.classes), outputs_of(rows, in, ui, ri_form));
  });
  return rows;
}

std::tuple<Tensor, Tensor> head_backward_cpu(const Tensor& embeddings, const Tensor& prototypes,
                                             const Tensor& labels, const Tensor& lse, const Tensor& row_grad,
                                             double scale, double margin, c10::string_view margin_mode,
                                             int64_t chunk_size, double grad_filter_eps,
                                             const c10::optional<Tensor>& class_index) {
  check_inputs(embeddings, prototypes, labels, scale, chunk_size, grad_filter_eps, class_index);
  const auto sdt = stat_type(embeddings.scalar_type());
  const Tensor lse_c = row_vector(lse, "lse", embeddings.size(0), sdt);
  const Tensor grad_c = row_vector(row_grad, "row_grad", embeddings.size(0), sdt);
  std::tuple<Tensor, Tensor> grads;
  REE_DISPATCH_HEAD(embeddings.scalar_type(), "head_backward_cpu", [&] {
    const Prepared<scalar_t, acc_t> in(embeddings, prototypes, labels, class_index);
    const auto p = problem_of<acc_t>(scale, margin, std::string(margin_mode), kNoIgnoreIndex, in.classes);
    grads = backward_pass(in, p, class_chunk(chunk_size, in.classes), lse_c.data_ptr<acc_t>(),
                          grad_c.data_ptr<acc_t>());
  });
  return grads;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> head_forward_with_grad_cpu(
    const Tensor& embeddings, const Tensor& prototypes, const Tensor& labels, const Tensor& row_coef, double scale,
    double margin, c10::string_view margin_mode, int64_t ignore_index, int64_t chunk_size, double grad_filter_eps,
    const c10::optional<Tensor>& ui_center, c10::string_view ri_form, const c10::optional<Tensor>& class_index) {
  check_inputs(embeddings, prototypes, labels, scale, chunk_size, grad_filter_eps, class_index);
  const auto sdt = stat_type(embeddings.scalar_type());
  const Tensor coef = row_vector(row_coef, "row_coef", embeddings.size(0), sdt);
  const Tensor ui = ui_direction(ui_center, embeddings);
  ForwardResult rows = empty_rows(embeddings);
  Tensor grad_e, grad_w;
  REE_DISPATCH_HEAD(embeddings.scalar_type(), "head_forward_with_grad_cpu", [&] {
    const Prepared<scalar_t, acc_t> in(embeddings, prototypes, labels, class_index);
    const auto p = problem_of<acc_t>(scale, margin, std::string(margin_mode), ignore_index, in.classes);
    const RowOutputs<acc_t> out = outputs_of(rows, in, ui, ri_form);
    const int64_t block = rows_per_block(in.batch, in.classes);
    // Whole rows in row blocks when the inputs are in the accumulation type (a bfloat16 or
    // float16 W would need a float32 C × D accumulator across blocks), the workspace holds
    // enough rows, chunk_size does not ask for smaller chunks of classes, and there is no class
    // index (whole rows would need the C' sampled prototypes gathered at once).
    const bool whole_rows = std::is_same<scalar_t, acc_t>::value && !in.index.defined() &&
                            block >= std::min(in.batch, kRowBlock / 2) &&
                            (chunk_size == 0 || chunk_size >= in.classes);
    if (whole_rows) {
      std::tie(grad_e, grad_w) = with_grad_pass(in, p, block, coef.data_ptr<acc_t>(), out);
      return;
    }
    const int64_t chunk = class_chunk(chunk_size, in.classes);
    // With a class index, the chunks' products are kept for the gradient where they fit the
    // row-block workspace: three products, as whole rows take, without gathering all C' rows.
    Tensor kept;
    if (in.index.defined() && in.batch * in.classes <= kRowBlockElements) {
      kept = at::empty({in.batch * in.classes}, in.v_hat.options());
    }
    acc_t* keep = kept.defined() ? kept.data_ptr<acc_t>() : nullptr;
    forward_pass(in, p, chunk, out, keep);
    std::tie(grad_e, grad_w) = backward_pass(in, p, chunk, out.lse, coef.data_ptr<acc_t>(), keep);
  });
  // Σ_i coef_i · loss_i in a fixed order (ignored rows have coef 0 and loss 0).
  const Tensor loss = (coef.to(at::kDouble) * std::get<0>(rows).to(at::kDouble)).sum().to(sdt);
  return {loss,   std::get<0>(rows), std::get<1>(rows), std::get<2>(rows), std::get<3>(rows),
          std::get<4>(rows), grad_e, grad_w, std::get<5>(rows), std::get<6>(rows)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ree, CPU, m) {
  m.impl("head_forward", &head_forward_cpu);
  m.impl("head_forward_with_grad", &head_forward_with_grad_cpu);
  m.impl("head_backward", &head_backward_cpu);
}

}  // namespace ree

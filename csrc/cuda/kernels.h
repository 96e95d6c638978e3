// The CUDA kernels' launchers: torch-free (raw pointers, sizes, a stream), so that nvcc never
// sees torch's headers, and CUDA-free, so that the glue (head.cpp, aux_loss.cpp) compiles against
// torch's headers alone. Every launcher returns the launch's status (cudaGetLastError), which the
// glue turns into an exception. Sizes and offsets are int64_t throughout: B × C and C × D pass
// 2^31 at face-recognition scale.
#pragma once

#include <cstdint>

#include "ree/formulas.h"

// The runtime's stream handle, declared exactly as cuda_runtime_api.h declares it.
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

namespace ree {
namespace cuda {

// A launcher's result: 0 on success, else the cudaError_t code.
using LaunchStatus = int;

// The CUDA runtime's message for a status.
const char* status_string(LaunchStatus status);

// The element type of an input tensor (the glue maps at::ScalarType to it).
enum class ElemType : int32_t { Float32, BFloat16, Float16 };

// ---- arcface_head ---------------------------------------------------------------------------

// inv[r] = 1 / max(‖x_r‖, ε) for the rows of x [rows, dim] (float32 accumulation). With a
// direction `ui` ([dim] float32; null: none), also cos_ui[r] = clamp(x̂_r · û, −1, 1) in the same
// pass (reference.cosine_to_ui, the embeddings' normalisation pre-pass).
LaunchStatus row_inv_norms(const void* x, ElemType type, int64_t rows, int64_t dim, float* inv, const float* ui,
                           float* cos_ui, cudaStream_t stream);

// The label column of each row, from a float64 dot product: the target logit s·φ(cos) has an
// infinite slope at cos = 1 (easy samples), where a float32 cosine's last bit moves it by ~0.01.
// [batch] each; for a row without target (label outside [0, C) or equal to ignore_index) cos is
// NaN and the rest 0.
struct HeadTargets {
  float* cos;     // clamp(v̂_i · ŵ_{y_i}, −1, 1)
  float* logit;   // s·φ(cos)
  float* dphi;    // dφ/dcos
  float* inside;  // 1 where the unclamped cosine lies in [−1, 1] (torch.clamp's gradient mask), else 0
};

LaunchStatus head_targets(const void* embeddings, const void* prototypes, ElemType type, const int64_t* labels,
                          int64_t batch, int64_t num_classes, int64_t dim, int64_t ignore_index, float scale,
                          const MarginParams& margin, const HeadTargets& targets, cudaStream_t stream);

// How many column splits of each chunk run in parallel per row in the forward (so that B × splits
// blocks fill the device); each split keeps its own running state, merged by the finish.
int64_t head_row_splits(int64_t batch);

// The forward's running per-row state, [splits × batch] each (slot = split · batch + row): the
// online log-sum-exp (max, sum) and the nearest negative (cosine, class; class −1: none yet).
struct HeadRowState {
  float* max;
  float* sum;
  float* best;
  int64_t* best_index;
  int64_t splits;
};

// The forward epilogue of one chunk of classes [begin, begin + cols): `dots` [batch, cols] holds
// the raw products v_i · w_j (float32, row-major). Applies the inverse norms, clamps, takes the
// label column's logit from `target_logit`, and merges the chunk into `state` (`first`: the
// state is not read, only written).
LaunchStatus head_forward_chunk(const float* dots, int64_t batch, int64_t begin, int64_t cols, int64_t num_classes,
                                const float* inv_rows, const float* inv_classes, const int64_t* labels,
                                int64_t ignore_index, float scale, const float* target_logit, bool first,
                                const HeadRowState& state, cudaStream_t stream);

// head_forward's per-row outputs, [batch] each. cos_ui holds the UI cosines (row_inv_norms)
// when has_ui, and is written NaN otherwise; ri is reference.recognizability_index of ri_form.
struct HeadRowOutputs {
  float* loss;
  float* cos_pos;
  float* cos_neg;
  int64_t* neg_index;
  float* lse;
  float* cos_ui;
  float* ri;
  bool has_ui;
  RiForm ri_form;
};

// Merges the splits of `state` and writes the per-row outputs (reference.arcface_rows, then the RI).
LaunchStatus head_forward_finish(int64_t batch, int64_t num_classes, const int64_t* labels, int64_t ignore_index,
                                 const HeadTargets& targets, const HeadRowState& state, const HeadRowOutputs& out,
                                 cudaStream_t stream);

// The backward epilogue of one chunk: turns `dots` (as in head_forward_chunk) into
// G_ij = row_mantissa_i · ∂loss_i/∂cos_ij · inv_classes_j (the softmax against the given lse,
// minus one-hot with dφ at the label; torch.clamp's mask), written to `grad` [batch, cols] in
// `grad_type` (`grad` may be `dots` itself when grad_type is Float32). The label column comes from
// `targets` (computed with kNoIgnoreIndex: the backward's target is any label in [0, C)). Every
// logit is rounded as head_forward_chunk rounds it, so the softmax agrees with the forward's lse.
// The row factor row_grad_i · s · inv_rows_i = row_mantissa_i · 2^e_i is split so that G stays in
// half-precision range: the glue scales V's rows by 2^e_i, exactly, for Gᵀ · V, and G · W by 2^e_i
// in normalize_backward.
LaunchStatus head_grad_chunk(const float* dots, void* grad, ElemType grad_type, int64_t batch, int64_t begin,
                             int64_t cols, int64_t num_classes, const float* inv_rows, const float* inv_classes,
                             const int64_t* labels, const HeadTargets& targets, const float* lse,
                             const float* row_mantissa, float scale, cudaStream_t stream);

// The backward of x̂ = x / max(‖x‖, ε) per row, given q = ∂/∂x̂ · (1 / max(‖x‖, ε)) / row_scale
// [rows, dim] (float32): out = row_scale · (q − x̂ (x̂ · q)), or row_scale · q where the norm is
// clamped. row_scale [rows] may be null (1). out has x's type.
LaunchStatus normalize_backward(const float* q, const float* row_scale, const void* x, ElemType type, int64_t rows,
                                int64_t dim, void* out, cudaStream_t stream);

// ---- ree_aux_loss ---------------------------------------------------------------------------

// Per row: the smooth-L1, index-diversion and PAM squared errors (unnormalised sums) and the
// gradients of the three means. `keep` (nullable: every row) marks the recognizable rows and
// `kept` (nullable: batch) points to their count on the device; `mu` points to μ_UI. attn and
// embeddings ([batch, dim], of `type`) and ui_center (float32 [dim]) are null without the PAM term.
LaunchStatus aux_rows(const float* pred, const float* target, const float* mu, float tau, float beta, const bool* keep,
                      const int64_t* kept, int64_t batch, const void* attn, const void* embeddings, ElemType type,
                      const float* ui_center, int64_t dim, float* l1_row, float* id_row, float* mse_row,
                      float* grad_l1, float* grad_id, float* grad_attn, cudaStream_t stream);

// The three means from the per-row values, in one deterministic block reduction. mse_row may be
// null (then mse = 0).
LaunchStatus aux_finish(const float* l1_row, const float* id_row, const float* mse_row, const int64_t* kept,
                        int64_t batch, int64_t dim, float* l1, float* id, float* mse, cudaStream_t stream);

}  // namespace cuda
}  // namespace ree

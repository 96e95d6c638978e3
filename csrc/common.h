// Torch-side helpers shared by the CPU and CUDA glue (never included by a .cu file).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>

#include "ree/formulas.h"

namespace ree {

// The margin's constants from the op's arguments (reference.margin_logit).
inline MarginParams make_margin(const std::string& mode, double margin) {
  MarginParams p{};
  if (mode == "arcface") {
    p.mode = MarginMode::ArcFace;
  } else if (mode == "arcface_easy") {
    p.mode = MarginMode::ArcFaceEasy;
  } else if (mode == "arcface_st") {
    p.mode = MarginMode::ArcFaceStraightThrough;
  } else if (mode == "cosface") {
    p.mode = MarginMode::CosFace;
  } else {
    TORCH_CHECK_VALUE(false, "margin_mode must be one of arcface, arcface_easy, arcface_st, cosface; got ", mode);
  }
  p.margin = margin;
  p.cos_m = std::cos(margin);
  p.sin_m = std::sin(margin);
  p.threshold = std::cos(M_PI - margin);
  p.fallback = margin * std::sin(margin);
  return p;
}

// The RI form from the op's argument (reference.RI_FORMS).
inline RiForm make_ri_form(const std::string& form) {
  if (form == "product") return RiForm::Product;
  if (form == "ratio") return RiForm::Ratio;
  if (form == "sum") return RiForm::Sum;
  TORCH_CHECK_VALUE(form == "crfiqa", "ri_form must be one of product, ratio, sum, crfiqa; got ", form);
  return RiForm::CrFiqa;
}

// reference.stat_dtype: statistics and losses are float32, or float64 for float64 inputs.
inline at::ScalarType stat_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// The optional UI centre as the kernels read it: [D] on the embeddings' device, contiguous, at the
// statistics' precision; an undefined tensor when there is none.
inline at::Tensor ui_direction(const c10::optional<at::Tensor>& ui_center, const at::Tensor& embeddings) {
  if (!ui_center.has_value()) return at::Tensor();
  const at::Tensor& u = *ui_center;
  TORCH_CHECK_VALUE(u.dim() == 1 && u.size(0) == embeddings.size(1), "ui_center must be [D] with D = ",
                    embeddings.size(1), ", got ", u.sizes());
  TORCH_CHECK_VALUE(u.device() == embeddings.device(), "ui_center is on ", u.device(), " but embeddings is on ",
                    embeddings.device());
  TORCH_CHECK_TYPE(at::isFloatingType(u.scalar_type()), "ui_center must be a floating tensor, got ",
                   u.scalar_type());
  return u.to(stat_type(embeddings.scalar_type())).contiguous();
}

}  // namespace ree

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

}  // namespace ree

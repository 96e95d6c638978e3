// Torch-side helpers for the CUDA glue (head.cpp, aux_loss.cpp). Device-generic ATen/c10 only: this
// torch build may lack c10/cuda's generated headers, so the stream comes through the device
// guard interface, not at::cuda::getCurrentCUDAStream.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "kernels.h"

namespace ree {
namespace cuda {

// The current CUDA stream of `device`, the one at::mm and the caching allocator use.
inline cudaStream_t current_stream(const c10::Device& device) {
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device);
  return static_cast<cudaStream_t>(stream.native_handle());
}

inline void check_launch(LaunchStatus status, const char* kernel) {
  TORCH_CHECK(status == 0, "ree CUDA kernel ", kernel, " failed: ", status_string(status));
}

inline void check_cuda(const at::Tensor& t, const char* name, const c10::Device& device) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.device() == device, name, " is on ", t.device(), " but the first input is on ", device);
}

// The kernels' element type; float64 is a CPU-only dtype of the ops.
inline ElemType elem_type(const at::Tensor& t, const char* name) {
  const at::ScalarType type = t.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf, name,
                   " must be float32, bfloat16 or float16 on CUDA, got ", type);
  return type == at::kFloat ? ElemType::Float32 : (type == at::kBFloat16 ? ElemType::BFloat16 : ElemType::Float16);
}

}  // namespace cuda
}  // namespace ree

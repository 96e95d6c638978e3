// Torch-side helpers for the CUDA glue (head.cpp, aux_loss.cpp). Device-generic ATen/c10 only: this
// torch build may lack c10/cuda's generated headers, so the stream comes through the device
// guard interface, not at::cuda::getCurrentCUDAStream.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include "kernels.h"

// Where the glue's ops are registered. REE_CUDA_EMULATION (tests/cuda_emulation only) builds this
// same glue over the kernels compiled for the CPU: it takes CPU tensors, and its ops are
// ree::cuda_emulated_* (the real CUDA build registers ree::* for CUDA tensors).
#ifdef REE_CUDA_EMULATION
#define REE_CUDA_OP(name) "cuda_emulated_" name
#define REE_CUDA_DISPATCH_KEY CPU
#else
#define REE_CUDA_OP(name) name
#define REE_CUDA_DISPATCH_KEY CUDA
#endif
// Two steps, so that the key macro expands before TORCH_LIBRARY_IMPL pastes it.
#define REE_CUDA_LIBRARY_IMPL_WITH_KEY(key, m) TORCH_LIBRARY_IMPL(ree, key, m)
#define REE_CUDA_LIBRARY_IMPL(m) REE_CUDA_LIBRARY_IMPL_WITH_KEY(REE_CUDA_DISPATCH_KEY, m)

namespace ree {
namespace cuda {

#ifdef REE_CUDA_EMULATION
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;

// The emulated launches run to completion in order: there is no stream.
inline cudaStream_t current_stream(const c10::Device&) { return nullptr; }

// out = a · b in float32 for half inputs, as cuBLAS forms it (float32 products of the exactly
// widened inputs, float32 sums); the CPU has no aten::mm.dtype_out.
inline void mm_half_to_float(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  at::mm_out(out, a.to(at::kFloat), b.to(at::kFloat));
}
#else
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;

// The current CUDA stream of `device`, the one at::mm and the caching allocator use.
inline cudaStream_t current_stream(const c10::Device& device) {
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device);
  return static_cast<cudaStream_t>(stream.native_handle());
}

// out = a · b in float32 for half inputs: cuBLAS accumulates and writes float32 (aten::mm.dtype_out).
inline void mm_half_to_float(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  at::mm_out(out, a, b, at::kFloat);
}
#endif

inline void check_launch(LaunchStatus status, const char* kernel) {
  TORCH_CHECK(status == 0, "ree CUDA kernel ", kernel, " failed: ", status_string(status));
}

inline void check_cuda(const at::Tensor& t, const char* name, const c10::Device& device) {
  TORCH_CHECK_VALUE(t.device().type() == kDeviceType, name, " must be a ", c10::DeviceTypeName(kDeviceType),
                    " tensor, got one on ", t.device());
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

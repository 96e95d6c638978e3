// Device helpers shared by the .cu files: element loads/stores in float32, warp reductions in a
// fixed order (so that results are bitwise reproducible), and the dtype dispatch of launchers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace ree {
namespace cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// Butterfly sum: addition commutes exactly, so every lane ends with the same bits.
template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// Σ x_d² over one row by one warp (lane-strided, explicit FMAs): every kernel that needs a row's
// norm calls this, so they all see the same bits.
template <typename T>
__device__ __forceinline__ float warp_row_sum_sq(const T* row, int64_t dim, int lane) {
  float acc = 0.f;
  for (int64_t d = lane; d < dim; d += kWarp) {
    const float x = to_float(row[d]);
    acc = fmaf(x, x, acc);
  }
  return warp_sum(acc);
}

inline LaunchStatus to_status(cudaError_t err) { return static_cast<LaunchStatus>(err); }

// Runs fn(T{}) with T the C++ type of `type`.
template <typename Fn>
cudaError_t dispatch(ElemType type, Fn&& fn) {
  switch (type) {
    case ElemType::Float32:
      return fn(float{});
    case ElemType::BFloat16:
      return fn(__nv_bfloat16{});
    case ElemType::Float16:
      return fn(__half{});
  }
  return cudaErrorInvalidValue;
}

// Blocks for a grid-stride loop over `items` in blocks of `per_block`, within the grid's x limit.
inline unsigned grid_for(int64_t items, int64_t per_block) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 0x7fffffff ? 0x7fffffff : blocks));
}

}  // namespace cuda
}  // namespace ree

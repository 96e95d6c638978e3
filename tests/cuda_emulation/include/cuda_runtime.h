// CUDA emulation (tests/cuda_emulation): the part of the CUDA runtime that csrc/cuda/*.cu use, for
// g++ on the CPU. The .cu files compile unmodified against it, once rewrite_launches.py has turned
// each `kernel<<<grid, block, shared, stream>>>(args)` into `ree_emulation::launch(kernel, grid,
// block, shared, stream)(args)`. A launch runs to completion before it returns (one in-order
// stream; the stream handle is not used).
#pragma once

#include <math.h>  // the C math functions device code calls unqualified (expf, fmaf, isnan, …)

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <utility>

#include "ree_emulation/block.h"
#include "ree_emulation/warp.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block runs at a time, so one static variable per declaration is its shared memory.
#define __shared__ static

struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

// The codes are the CUDA runtime's (kernels.h passes them on as ints).
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
};

enum cudaDeviceAttr : int { cudaDevAttrMultiProcessorCount = 16 };

namespace ree_emulation {

// The error of the last failed launch on this host thread, until cudaGetLastError reads it.
inline thread_local cudaError_t last_error = cudaSuccess;

// The emulated device's multiprocessor count (csrc/cuda's head_row_splits reads it): 6 by
// default, so that the test batches get several column splits per row (3 at B = 16, 48 at B = 1);
// REE_CUDA_EMULATION_SMS sets it.
inline int multiprocessors() {
  constexpr int kDefault = 6;
  const char* value = std::getenv("REE_CUDA_EMULATION_SMS");
  const int count = value == nullptr ? kDefault : std::atoi(value);
  return count > 0 ? count : kDefault;
}

// CUDA's limits on a launch configuration (compute capability 8.0 and 9.0).
inline bool valid_launch(dim3 grid, dim3 block, std::size_t shared) {
  const std::uint64_t threads = std::uint64_t{block.x} * block.y * block.z;
  return grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 0x7fffffffu && grid.y <= 65535 &&
         grid.z <= 65535 && threads >= 1 && threads <= 1024 && block.z <= 64 && shared <= 48 * 1024;
}

// A configured launch of `kernel`; calling it with the kernel's arguments runs every block.
template <typename... Params>
class Launch {
 public:
  Launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared)
      : kernel_(kernel), grid_(grid), block_(block), shared_(shared) {}

  template <typename... Args>
  void operator()(Args&&... args) const {
    if (!valid_launch(grid_, block_, shared_)) {
      last_error = cudaErrorInvalidConfiguration;
      return;
    }
    // The kernel's parameters, converted once as a launch converts them; every thread gets its own copy.
    const std::tuple<Params...> params(std::forward<Args>(args)...);
    for (unsigned z = 0; z < grid_.z; ++z) {
      for (unsigned y = 0; y < grid_.y; ++y) {
        for (unsigned x = 0; x < grid_.x; ++x) {
          run_block([&] { std::apply(kernel_, params); }, grid_, block_, uint3{x, y, z});
        }
      }
    }
  }

 private:
  void (*kernel_)(Params...);
  dim3 grid_, block_;
  std::size_t shared_;
};

template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared = 0,
                         cudaStream_t = nullptr) {
  return Launch<Params...>(kernel, grid, block, shared);
}

}  // namespace ree_emulation

inline cudaError_t cudaGetLastError() {
  const cudaError_t error = ree_emulation::last_error;
  ree_emulation::last_error = cudaSuccess;
  return error;
}

inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
  }
  return "unrecognized error code";
}

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (device != 0 || attribute != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = ree_emulation::multiprocessors();
  return cudaSuccess;
}

inline float __int_as_float(int bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Round-to-nearest multiplication that is never contracted into an FMA (the emulation is built
// with -ffp-contract=off, so no product is).
inline float __fmul_rn(float a, float b) { return a * b; }

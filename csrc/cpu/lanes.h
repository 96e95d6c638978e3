// Row arithmetic the compiler vectorises, shared by the CPU kernels. We do not compile with
// -ffast-math, so a loop that adds into one scalar would stay scalar (floating-point addition
// may not be reassociated): reductions keep kLanes partial results instead, combined in a fixed
// order, which also makes them bitwise reproducible.
#pragma once

#include <cstdint>

// The functions that hold the lane loops are marked REE_LANES: compiled for AVX-512, AVX2 and
// baseline x86-64, with the widest the CPU has picked when the library loads (GCC/Clang function
// multiversioning, one ifunc each). So the default build runs on any x86-64 CPU and still uses
// 16-float vectors where there are. A native build (setup.py: REE_CPU_NATIVE=1, -march=native)
// compiles them for the building CPU only; elsewhere (not x86-64 ELF) they are plain functions.
#if defined(__x86_64__) && defined(__ELF__) && defined(__GNUC__) && !defined(REE_CPU_NATIVE)
#define REE_LANES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define REE_LANES
#endif

namespace ree {

constexpr int64_t kLanes = 16;

template <typename T>
inline T sum_lanes(const T* acc) {
  T total = 0;
  for (int64_t k = 0; k < kLanes; ++k) total += acc[k];
  return total;
}

template <typename T, typename A, typename B>
REE_LANES T dot(const A* a, const B* b, int64_t n) {
  T acc[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) acc[k] += static_cast<T>(a[d + k]) * static_cast<T>(b[d + k]);
  }
  for (; d < n; ++d) acc[d % kLanes] += static_cast<T>(a[d]) * static_cast<T>(b[d]);
  return sum_lanes(acc);
}

}  // namespace ree

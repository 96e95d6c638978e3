// CUDA emulation (tests/cuda_emulation): __half as a 2-byte IEEE binary16 with CUDA's exact
// widening and round-to-nearest-even narrowing. GCC's _Float16 performs the conversions.
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  std::uint16_t bits;
};
static_assert(sizeof(__half) == 2, "__half must have the layout of at::Half");

inline float __half2float(__half h) {
  _Float16 value;
  std::memcpy(&value, &h.bits, sizeof value);
  return static_cast<float>(value);
}

inline __half __float2half_rn(float f) {
  const _Float16 value = static_cast<_Float16>(f);  // IEEE conversion: round to nearest even
  __half h;
  std::memcpy(&h.bits, &value, sizeof value);
  return h;
}

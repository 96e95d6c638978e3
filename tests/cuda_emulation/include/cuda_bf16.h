// CUDA emulation (tests/cuda_emulation): __nv_bfloat16 as the upper 16 bits of a float32, with
// exact widening and round-to-nearest-even narrowing (NaN stays a quiet NaN of the same sign).
#pragma once

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  std::uint16_t bits;
};
static_assert(sizeof(__nv_bfloat16) == 2, "__nv_bfloat16 must have the layout of at::BFloat16");

inline float __bfloat162float(__nv_bfloat16 h) {
  const std::uint32_t wide = static_cast<std::uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  std::uint32_t wide;
  std::memcpy(&wide, &f, sizeof wide);
  __nv_bfloat16 h;
  if ((wide & 0x7fffffffu) > 0x7f800000u) {
    h.bits = static_cast<std::uint16_t>((wide >> 16) | 0x0040u);
  } else {
    // Adding 0x7fff plus the lowest kept bit carries into the kept half exactly when the dropped
    // half is above one half, or equal to it with an odd kept half (ties to even).
    h.bits = static_cast<std::uint16_t>((wide + 0x7fffu + ((wide >> 16) & 1u)) >> 16);
  }
  return h;
}

// CUDA emulation (tests/cuda_emulation): the warp shuffles. Only the lanes of the calling thread's
// own warp meet (CUDA requires no more), at a barrier of that warp; a lane that has exited no
// longer counts. Only full-warp masks are emulated (what the kernels use).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "block.h"

namespace ree_emulation {

// Every lane publishes `value`; returns the value lane `source` published (its own when `source`
// names no lane of the warp, as CUDA returns the caller's value for a lane outside the width).
template <typename T>
T exchange(unsigned mask, T value, unsigned source) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move 4- or 8-byte values");
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "CUDA emulation: only full-warp shuffle masks are emulated, got %#x\n", mask);
    std::abort();
  }
  ThreadState& me = self;
  Warp& warp = *me.warp;
  std::memcpy(warp.banks[me.bank][me.lane], &value, sizeof(T));
  warp.barrier.arrive_and_wait();
  T result = value;
  if (source < warp.lanes) std::memcpy(&result, warp.banks[me.bank][source], sizeof(T));
  me.bank ^= 1u;
  return result;
}

}  // namespace ree_emulation

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  const unsigned lane = ree_emulation::self.lane;
  const unsigned source = lane ^ static_cast<unsigned>(lane_mask);
  // A source outside the caller's segment of `width` lanes gives the caller's own value.
  const bool inside = source / static_cast<unsigned>(width) == lane / static_cast<unsigned>(width);
  return ree_emulation::exchange(mask, value, inside ? source : ree_emulation::kWarpSize);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  const unsigned lane = ree_emulation::self.lane;
  const bool inside = lane % static_cast<unsigned>(width) + delta < static_cast<unsigned>(width);
  return ree_emulation::exchange(mask, value, inside ? lane + delta : ree_emulation::kWarpSize);
}

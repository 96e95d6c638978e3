// CUDA emulation (tests/cuda_emulation): waiting on a 32-bit word through the Linux futex, with no
// spinning: hundreds of emulated threads share a few cores, so a waiting thread should sleep at
// once rather than spin or yield (what std::atomic::wait does first).
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <climits>
#include <cstdint>

namespace ree_emulation {

// Returns once `word` no longer holds `old` (perhaps spuriously early: callers re-check).
inline void futex_wait(std::atomic<std::uint32_t>& word, std::uint32_t old) {
  static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t), "a futex is a plain 32-bit word");
  syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAIT_PRIVATE, old, nullptr, nullptr, 0);
}

inline void futex_wake_all(std::atomic<std::uint32_t>& word) {
  syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}

}  // namespace ree_emulation

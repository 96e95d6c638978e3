// CUDA emulation (tests/cuda_emulation): the barrier of a block or a warp. std::barrier's
// semantics (arrive_and_wait; arrive_and_drop for a thread that exits), built on one futex word
// so that a phase costs one wake-up per waiting thread: libstdc++'s std::barrier spins, then waits
// on a byte through a shared table of futexes, several times slower with hundreds of threads on a
// few cores.
#pragma once

#include <atomic>
#include <cstdint>

#include "futex.h"

namespace ree_emulation {

class Barrier {
 public:
  explicit Barrier(unsigned count) : expected_(count), remaining_(count) {}
  Barrier(const Barrier&) = delete;
  Barrier& operator=(const Barrier&) = delete;

  // Waits until every thread still counted has arrived at this phase.
  void arrive_and_wait() {
    const std::uint32_t phase = phase_.load(std::memory_order_acquire);
    if (arrive()) return;
    while (phase_.load(std::memory_order_acquire) == phase) futex_wait(phase_, phase);
  }

  // Arrives at this phase and no longer counts in the later ones (an exited thread).
  void arrive_and_drop() {
    // Before arriving: the phase cannot complete, and reload the count, until this thread arrives.
    expected_.fetch_sub(1, std::memory_order_relaxed);
    arrive();
  }

 private:
  // Counts the arrival; the last one opens the next phase and returns true.
  bool arrive() {
    if (remaining_.fetch_sub(1, std::memory_order_acq_rel) != 1) return false;
    remaining_.store(expected_.load(std::memory_order_relaxed), std::memory_order_relaxed);
    phase_.fetch_add(1, std::memory_order_release);
    futex_wake_all(phase_);
    return true;
  }

  std::atomic<unsigned> expected_;
  std::atomic<unsigned> remaining_;
  std::atomic<std::uint32_t> phase_{0};
};

}  // namespace ree_emulation

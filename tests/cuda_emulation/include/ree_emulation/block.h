// CUDA emulation (tests/cuda_emulation): a block of CUDA threads on OS threads. Every CUDA thread
// of a block is its own OS thread, all started together; __syncthreads is a barrier of the block
// (barrier.h); a thread that returns drops out of its block's and its warp's barriers, as an
// exited GPU thread no longer counts at either. Blocks run one after another, so that `__shared__` (a static
// variable) holds one block's shared memory at a time.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "barrier.h"
#include "futex.h"

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The built-in variables, set in each emulated thread before the kernel runs.
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace ree_emulation {

constexpr unsigned kWarpSize = 32;

// The lanes of one warp meet here at each shuffle. Values go through two banks used in turn, so
// one barrier per shuffle suffices: bank k is written again only at shuffle k + 2, after every
// lane has passed shuffle k + 1 and therefore finished reading bank k.
struct Warp {
  explicit Warp(unsigned lanes) : lanes(lanes), barrier(lanes) {}
  const unsigned lanes;
  Barrier barrier;
  alignas(64) unsigned char banks[2][kWarpSize][8] = {};
};

struct Block {
  explicit Block(unsigned threads) : barrier(threads) {
    for (unsigned first = 0; first < threads; first += kWarpSize) {
      warps.push_back(std::make_unique<Warp>(threads - first < kWarpSize ? threads - first : kWarpSize));
    }
  }
  Barrier barrier;
  std::vector<std::unique_ptr<Warp>> warps;
};

// Where the calling emulated thread is.
struct ThreadState {
  Block* block = nullptr;
  Warp* warp = nullptr;
  unsigned lane = 0;
  unsigned bank = 0;  // the bank of the thread's next shuffle
};
inline thread_local ThreadState self;

// Persistent OS threads, one per thread of the largest block so far: block after block, thread t
// of the block runs on OS thread t (starting a fresh OS thread per CUDA thread would cost more
// than the kernels). Started and awaited through futex words, as the barriers are.
class Engine {
 public:
  static Engine& instance() {
    static Engine engine;
    return engine;
  }

  // Runs body(t) for t in [0, threads) on `threads` OS threads at once; returns when all are done.
  void run(unsigned threads, const std::function<void(unsigned)>& body) {
    const std::uint32_t generation = generation_.load(std::memory_order_relaxed);
    while (workers_.size() < threads) {
      const unsigned index = static_cast<unsigned>(workers_.size());
      workers_.emplace_back([this, index, generation] { serve(index, generation); });
    }
    body_ = &body;
    active_ = threads;
    running_.store(threads, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    futex_wake_all(generation_);
    for (std::uint32_t left; (left = running_.load(std::memory_order_acquire)) != 0;) futex_wait(running_, left);
  }

  ~Engine() {
    stop_ = true;
    generation_.fetch_add(1, std::memory_order_release);
    futex_wake_all(generation_);
    for (std::thread& t : workers_) t.join();
  }

 private:
  Engine() = default;

  void serve(unsigned index, std::uint32_t seen) {
    for (;;) {
      futex_wait(generation_, seen);
      const std::uint32_t now = generation_.load(std::memory_order_acquire);
      if (now == seen) continue;
      seen = now;
      if (stop_) return;
      if (index >= active_) continue;
      (*body_)(index);
      if (running_.fetch_sub(1, std::memory_order_acq_rel) == 1) futex_wake_all(running_);
    }
  }

  std::vector<std::thread> workers_;
  const std::function<void(unsigned)>* body_ = nullptr;
  unsigned active_ = 0;
  bool stop_ = false;
  std::atomic<std::uint32_t> generation_{0};
  std::atomic<std::uint32_t> running_{0};
};

// Runs one block of `kernel` (a callable taking no arguments) with the given coordinates.
template <typename Kernel>
void run_block(const Kernel& kernel, dim3 grid, dim3 block_dim, uint3 block_index) {
  const unsigned threads = block_dim.x * block_dim.y * block_dim.z;
  Block block(threads);
  Engine::instance().run(threads, [&](unsigned t) {
    threadIdx = {t % block_dim.x, t / block_dim.x % block_dim.y, t / (block_dim.x * block_dim.y)};
    blockIdx = block_index;
    blockDim = block_dim;
    gridDim = grid;
    self = {&block, block.warps[t / kWarpSize].get(), t % kWarpSize, 0};
    kernel();
    // The thread has exited: no barrier waits for it any more.
    self.warp->barrier.arrive_and_drop();
    block.barrier.arrive_and_drop();
    self = {};
  });
}

}  // namespace ree_emulation

inline void __syncthreads() { ree_emulation::self.block->barrier.arrive_and_wait(); }

// A CPU shared with other busy processes, for the memory-bound decode op (expert_gemv.cpp).
//
// A parallel region ends when its last thread does. With more runnable threads than cores the scheduler sets a
// thread aside for a time slice (milliseconds), and Linux shares the CPU between processes before threads (a
// 2-thread process beside another busy one gets about one core of two): a region's threads then take turns on
// that core, and each waits for the other at the region's end. On the 2-core machine beside another 2-thread
// PyTorch process, a bf16 decode step of one token took 8.0 ms on two threads and 2.3 ms on one thread
// (docs/benchmarks.md). Streaming weights, one thread reaches most of the memory's rate, so on a shared CPU
// such a step is better run on the calling thread alone. Nothing says in advance whether the CPU is shared; the op
// watches its calls:
//
//   * its work is a list of items: each thread streams its contiguous share, then takes what is left of the others'
//     from their ends (a late thread leaves its share to the others), so on a CPU of its own the caller waits at a
//     region's end for at most the item another thread is finishing;
//   * a call's lost time is the longer of the caller's wait for the other threads and the time the scheduler kept
//     the caller itself off the CPU (wall time less the thread's CPU time). Two calls in a row that each lost at
//     least kLateNs and a quarter of their time mark the CPU as shared (one alone is a blip of the host's): the calls
//     of the next window run on the calling thread alone (20 ms, doubling while the two calls after each window
//     still find the CPU shared, up to 1.28 s; a call that finds it free halves the window, to no less than 20 ms);
//   * a call on threads that lost that much but took no longer for its work (bytes streamed) than the calls alone
//     did counts as free: where other parallel ops keep OpenMP's threads spinning, the calling thread alone is no
//     cure and the op's threads still do better.
//
// The items and their order do not depend on the thread count, so neither does any result bit.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/List.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <ctime>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace deepseek_moe {

inline int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// a + b for b >= 0, at most INT64_MAX (times near the limit given to the policy replay must not wrap).
inline int64_t add_saturated(int64_t a, int64_t b) {
  return a > std::numeric_limits<int64_t>::max() - b ? std::numeric_limits<int64_t>::max() : a + b;
}

// The calling thread's CPU time (ns); 0 where POSIX has no per-thread clock (the watch then sees waits only).
inline int64_t thread_cpu_ns() {
#ifdef CLOCK_THREAD_CPUTIME_ID
  timespec t{};
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t) == 0) return int64_t(t.tv_sec) * 1'000'000'000 + t.tv_nsec;
#endif
  return 0;
}

// Whether OpenMP's threads were told to sleep rather than spin while they wait (OMP_WAIT_POLICY=PASSIVE, read once,
// as the OpenMP runtime reads it at start). Their spinning is what makes a shared CPU costly: with it, beside another
// busy process, a 1 ms decode step took 8.0 ms on the op's threads and 2.3 ms with the watch; without it 1.9 ms on
// the threads (docs/benchmarks.md). So the watch starts off where the threads wait passively.
inline bool omp_waits_passively() {
  const char* policy = std::getenv("OMP_WAIT_POLICY");
  if (policy == nullptr) return false;
  std::string value(policy);
  for (char& c : value) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return value == "passive";
}

// The policy above, on times given to it (ns on the steady clock). Shared by every call of the process (the CPU's
// load is the machine's, not a layer's); concurrent calls may race on it, which costs at most one window's choice.
class SharedCpuWatch {
 public:
  static constexpr int64_t kLateNs = 100'000, kStrikes = 2;
  static constexpr int64_t kFirstWindowNs = 20'000'000, kLongestWindowNs = 1'280'000'000;

  // Whether a call starting at `now` runs on the calling thread alone.
  bool solo(int64_t now) const {
    return enabled_.load(std::memory_order_relaxed) && now < solo_until_.load(std::memory_order_relaxed);
  }
  // A call with threads ended at `now` after `elapsed`, having lost `lost` of it (above); `work`: what it did (any
  // unit, the same for every call: the op's bytes of weights streamed).
  void observe(int64_t now, int64_t lost, int64_t elapsed, int64_t work) {
    if (!enabled_.load(std::memory_order_relaxed)) return;
    // Lost time is worth avoiding only where the calling thread alone does better: where other parallel ops of the
    // process keep OpenMP's threads spinning, the op's threads still beat it (docs/benchmarks.md).
    const double alone = alone_ns_per_work_.load(std::memory_order_relaxed);
    if (lost < kLateNs || lost < elapsed / 4 || (alone > 0 && elapsed <= alone * std::max<int64_t>(work, 1))) {
      strikes_.store(0, std::memory_order_relaxed);
      window_.store(std::max(window_.load(std::memory_order_relaxed) / 2, kFirstWindowNs), std::memory_order_relaxed);
      return;
    }
    if (strikes_.fetch_add(1, std::memory_order_relaxed) + 1 < kStrikes) return;
    strikes_.store(0, std::memory_order_relaxed);
    const int64_t window = window_.load(std::memory_order_relaxed);
    solo_until_.store(add_saturated(now, window), std::memory_order_relaxed);
    window_.store(std::min(2 * window, kLongestWindowNs), std::memory_order_relaxed);
  }
  // A call on the calling thread alone took `elapsed` for `work`: the window's running mean of the rate.
  void observe_alone(int64_t elapsed, int64_t work) {
    const double rate = double(elapsed) / double(std::max<int64_t>(work, 1));
    const double mean = alone_ns_per_work_.load(std::memory_order_relaxed);
    alone_ns_per_work_.store(mean > 0 ? 0.75 * mean + 0.25 * rate : rate, std::memory_order_relaxed);
  }
  // Off: every call runs with ATen's threads and nothing is observed (on again, the watch goes on where it was).
  // Returns the previous setting.
  bool enable(bool on) { return enabled_.exchange(on); }
  bool enabled() const { return enabled_.load(std::memory_order_relaxed); }

 private:
  std::atomic<bool> enabled_{!omp_waits_passively()};
  std::atomic<int64_t> solo_until_{0};
  std::atomic<int64_t> window_{kFirstWindowNs};
  std::atomic<int64_t> strikes_{0};  // calls in a row that lost that much
  std::atomic<double> alone_ns_per_work_{0};  // the calls alone: running mean of elapsed / work (0: none yet)
};

// The process's watch over the decode op's calls.
SharedCpuWatch& decode_watch();
// The ops over it (ops.cpp): switch the watch (None: only ask) -> whether it is on; and a fresh watch's choices
// for calls starting at start_ns that took elapsed_ns for work, and lost lost_ns of it where they ran on threads.
bool shared_cpu_watch(std::optional<bool> enable);
c10::List<bool> shared_cpu_policy(at::IntArrayRef start_ns, at::IntArrayRef lost_ns, at::IntArrayRef elapsed_ns,
                                  at::IntArrayRef work);

// A thread's share of the items, [front, back), packed in one word: its owner takes items from the front (streaming
// forward through its contiguous share, its own cache line uncontended) and the other threads, once their shares
// are done, take them from the back.
class alignas(64) Share {
 public:
  void reset(int64_t front, int64_t back) { word_.store(pack(front, back), std::memory_order_relaxed); }
  bool take_front(int64_t& item) { return take(item, true); }
  bool take_back(int64_t& item) { return take(item, false); }

 private:
  static uint64_t pack(int64_t front, int64_t back) { return uint64_t(back) << 32 | uint64_t(front); }
  bool take(int64_t& item, bool front) {
    uint64_t word = word_.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t f = int64_t(word & 0xFFFFFFFFu), b = int64_t(word >> 32);
      if (f >= b) return false;
      const uint64_t next = front ? pack(f + 1, b) : pack(f, b - 1);
      if (word_.compare_exchange_weak(word, next, std::memory_order_relaxed)) {
        item = front ? f : b - 1;
        return true;
      }
    }
  }
  std::atomic<uint64_t> word_{0};
};

// body(i) for every i in [0, items) (items < 2^31), on the calling thread alone when `solo`, otherwise on ATen's
// threads: each takes its contiguous share from the front, then the others' leftovers from their backs. Returns how
// long the caller waited at the region's end for the other threads (ns; 0 alone).
template <typename Body>
int64_t run_shares(int64_t items, bool solo, const Body& body) {
  if (solo || items <= 1 || at::get_num_threads() == 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < items; ++i) body(i);
    return 0;
  }
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), items);
  std::vector<Share> shares(static_cast<size_t>(parts));
  for (int64_t p = 0; p < parts; ++p) shares[p].reset(p * items / parts, (p + 1) * items / parts);
  const std::thread::id caller = std::this_thread::get_id();
  int64_t caller_done = 0;
  at::parallel_for(0, parts, 1, [&](int64_t own, int64_t) {
    int64_t i = 0;
    while (shares[own].take_front(i)) body(i);
    for (int64_t k = 1; k < parts; ++k) {
      Share& other = shares[(own + k) % parts];
      while (other.take_back(i)) body(i);
    }
    if (std::this_thread::get_id() == caller) caller_done = steady_ns();
  });
  return caller_done ? steady_ns() - caller_done : 0;
}

}  // namespace deepseek_moe

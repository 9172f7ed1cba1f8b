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
//     the caller itself off the CPU (wall time less the thread's CPU time). A call that lost at least kLateNs and a
//     quarter of its time is late. Two late calls in a row (one alone is a blip of the host's) send the calls of the
//     next window to the calling thread alone: 20 ms at first (and at least 4 calls), doubling with each window up
//     to 1.28 s;
//   * from then on the running means of the time per unit of work (bytes streamed) decide, of the calls on threads
//     and of the calls alone (a window's first call left out: the threads of the call before still spin into it):
//     a late call on threads opens the next window where the threads' mean is the slower. Beside another busy
//     process most calls on threads may be fast and a few lose ten times that (a T = 1 step: 0.8-0.9 ms or 10-16
//     ms); where other parallel ops of the process keep OpenMP's threads spinning, the calling thread alone is no
//     cure and the threads stay. A free call where the threads' mean is the faster halves the next window; a mean of
//     the calls alone older than 2.56 s is measured again in a 20 ms window.
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

// a + b within int64 (times near the limits given to the policy replay must not wrap).
inline int64_t add_saturated(int64_t a, int64_t b) {
  constexpr int64_t lo = std::numeric_limits<int64_t>::min(), hi = std::numeric_limits<int64_t>::max();
  if (b >= 0) return a > hi - b ? hi : a + b;
  return a < lo - b ? lo : a + b;
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
  static constexpr int64_t kLateNs = 100'000, kStrikes = 2, kWindowCalls = 4;
  static constexpr int64_t kFirstWindowNs = 20'000'000, kLongestWindowNs = 1'280'000'000;
  static constexpr int64_t kStaleNs = 2 * kLongestWindowNs;

  // Whether a call starting at `now` runs on the calling thread alone.
  bool solo(int64_t now) const {
    return enabled_.load(std::memory_order_relaxed) && now < solo_until_.load(std::memory_order_relaxed);
  }
  // A call on threads ended at `now` after `elapsed`, having lost `lost` of it (above); `work`: what it did (any
  // unit, the same for every call: the op's bytes of weights streamed).
  void observe(int64_t now, int64_t lost, int64_t elapsed, int64_t work) {
    if (!enabled_.load(std::memory_order_relaxed)) return;
    const double threads = update(threads_ns_per_work_, elapsed, work);
    const double alone = alone_ns_per_work_.load(std::memory_order_relaxed);
    if (lost < kLateNs || lost < elapsed / 4) {  // a free call
      strikes_.store(0, std::memory_order_relaxed);
      if (alone == 0 || threads < alone) halve_window();
      return;
    }
    if (alone > 0) {
      // Once both are known the means decide: beside another busy process most calls on threads may be fast and a
      // few lose ten times that; and where other parallel ops keep OpenMP's threads spinning, the calling thread
      // alone is no cure and the op's threads do better, late or not (docs/benchmarks.md). A mean of the calls
      // alone older than kStaleNs is measured again in a short window.
      if (threads > alone) {
        open_window(now, elapsed);
      } else if (now - alone_at_.load(std::memory_order_relaxed) > kStaleNs) {
        open_window(now, elapsed, false);
      }
      return;
    }
    if (strikes_.fetch_add(1, std::memory_order_relaxed) + 1 >= kStrikes) open_window(now, elapsed);
  }
  // A call on the calling thread alone took `elapsed` for `work`. A window's first call is left out of the mean: it
  // runs while the threads of the call before still spin.
  void observe_alone(int64_t now, int64_t elapsed, int64_t work) {
    if (first_alone_.exchange(false, std::memory_order_relaxed)) return;
    update(alone_ns_per_work_, elapsed, work);
    alone_at_.store(now, std::memory_order_relaxed);
  }
  // Off: every call runs with ATen's threads and nothing is observed (on again, the watch goes on where it was).
  // Returns the previous setting.
  bool enable(bool on) { return enabled_.exchange(on); }
  bool enabled() const { return enabled_.load(std::memory_order_relaxed); }

 private:
  // mean := 3/4 mean + 1/4 elapsed / work (the first call: its rate) -> the new mean.
  static double update(std::atomic<double>& mean, int64_t elapsed, int64_t work) {
    // At least 1 ns a call: a mean of 0 reads as none yet.
    const double rate = double(std::max<int64_t>(elapsed, 1)) / double(std::max<int64_t>(work, 1));
    const double old = mean.load(std::memory_order_relaxed);
    const double next = old > 0 ? 0.75 * old + 0.25 * rate : rate;
    mean.store(next, std::memory_order_relaxed);
    return next;
  }
  // The calls of the next window (at least kWindowCalls calls of this one's length) run alone; with `grow`, the
  // window is window_ long and the next one twice that, else it is the shortest (a new measure of the calls alone).
  void open_window(int64_t now, int64_t elapsed, bool grow = true) {
    strikes_.store(0, std::memory_order_relaxed);
    const int64_t window = window_.load(std::memory_order_relaxed);
    const int64_t calls = elapsed > kLongestWindowNs / kWindowCalls ? kLongestWindowNs : kWindowCalls * elapsed;
    solo_until_.store(add_saturated(now, std::max(grow ? window : kFirstWindowNs, calls)), std::memory_order_relaxed);
    if (grow) window_.store(std::min(2 * window, kLongestWindowNs), std::memory_order_relaxed);
    first_alone_.store(true, std::memory_order_relaxed);
  }
  void halve_window() {
    window_.store(std::max(window_.load(std::memory_order_relaxed) / 2, kFirstWindowNs), std::memory_order_relaxed);
  }

  std::atomic<bool> enabled_{!omp_waits_passively()};
  std::atomic<int64_t> solo_until_{std::numeric_limits<int64_t>::min()};
  std::atomic<int64_t> window_{kFirstWindowNs};
  std::atomic<int64_t> strikes_{0};  // lost calls in a row, before any call alone
  std::atomic<bool> first_alone_{false};  // the next call alone is a window's first
  std::atomic<int64_t> alone_at_{0};  // when the last call alone counted in its mean ended
  // Running means of elapsed / work (0: no call yet): of the calls on threads, and of the calls alone.
  std::atomic<double> threads_ns_per_work_{0}, alone_ns_per_work_{0};
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

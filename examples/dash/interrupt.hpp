// Ctrl-C (SIGINT) or SIGTERM during a long command: the first asks the running loop to stop at
// the end of its step (it then saves what it has and exits with status 130); another one a
// second or more later ends the process at once, as usual. Signals closer together count as
// one: `timeout` and process-group kills deliver the same signal twice, and a process with
// several threads (the CUDA runtime's) can take both before either is merged.
#pragma once

#include <atomic>
#include <csignal>
#include <ctime>

namespace dash::tool {

inline std::atomic<bool>& interrupt_requested() {
  static std::atomic<bool> flag{false};
  return flag;
}

namespace detail {

// Seconds on the monotonic clock when the first signal came (clock_gettime is async-signal-safe).
inline std::atomic<double>& first_interrupt_at() {
  static std::atomic<double> at{0};
  return at;
}

inline double monotonic_seconds() {
  timespec now{};
  clock_gettime(CLOCK_MONOTONIC, &now);
  return double(now.tv_sec) + 1e-9 * double(now.tv_nsec);
}

}  // namespace detail

extern "C" inline void on_interrupt(int signal) {
  const double now = detail::monotonic_seconds();
  double first = 0;
  if (detail::first_interrupt_at().compare_exchange_strong(first, now)) {
    interrupt_requested().store(true);
    return;
  }
  if (now - first < 1.0) return;
  std::signal(signal, SIG_DFL);
  std::raise(signal);
}

inline void catch_interrupts() {
  std::signal(SIGINT, on_interrupt);
  std::signal(SIGTERM, on_interrupt);
}

inline constexpr int interrupted_status = 130;

}  // namespace dash::tool

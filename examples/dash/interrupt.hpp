// Ctrl-C during a long command: the first SIGINT asks the running loop to stop at the end of
// its step (it then saves what it has and exits with status 130); a second one ends the process
// at once, as usual.
#pragma once

#include <atomic>
#include <csignal>

namespace dash::tool {

inline std::atomic<bool>& interrupt_requested() {
  static std::atomic<bool> flag{false};
  return flag;
}

extern "C" inline void on_interrupt(int) {
  if (interrupt_requested().exchange(true)) {
    std::signal(SIGINT, SIG_DFL);
    std::raise(SIGINT);
  }
}

inline void catch_interrupts() { std::signal(SIGINT, on_interrupt); }

inline constexpr int interrupted_status = 130;

}  // namespace dash::tool

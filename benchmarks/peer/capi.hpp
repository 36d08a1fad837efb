// The C entry points of libdash_peer.so, through which benchmarks/peer/*.py time dash's kernels
// in the same process as the peer libraries (torch tensors' pointers in, torch's stream).
// Every function returns 0 on success, else 1 with the dash::Error's text in dash_last_error().
#pragma once

#include <cstdio>
#include <exception>
#include <string>

namespace dash::peer {

inline std::string& last_error() {
  static thread_local std::string text;
  return text;
}

// Runs f, turning any exception into a return code and the error text.
template <class F>
int guarded(F&& f) noexcept {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error() = e.what();
  } catch (...) {
    last_error() = "unknown exception";
  }
  return 1;
}

}  // namespace dash::peer

// Host loops over large arrays split across the machine's cores: loading a checkpoint converts
// and digests gigabytes of weights, which one core takes tens of seconds to do (and to fault in).
//
//   parallel_for(n, grain, [&](index_t begin, index_t end) { ... });
//
// calls the function on disjoint ranges covering [0, n), each of at least `grain` elements
// (but the last), on at most std::thread::hardware_concurrency() threads, and returns when all
// are done. Ranges depend on n, grain and the thread count only, so a body whose ranges write
// disjoint outputs gives the same result on any machine. An exception thrown by a range is
// rethrown on the calling thread (the first one, once every thread has finished).
#pragma once

#include <algorithm>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include "dash/core/shape.hpp"

namespace dash {

template <class F>
void parallel_for(index_t n, index_t grain, F&& body) {
  if (n <= 0) return;
  const index_t cores = std::max<index_t>(1, index_t(std::thread::hardware_concurrency()));
  const index_t parts = std::clamp<index_t>(n / std::max<index_t>(1, grain), 1, cores);
  if (parts == 1) {
    body(index_t(0), n);
    return;
  }
  std::exception_ptr first_error;
  std::mutex error_mutex;
  const auto run = [&](index_t part) {
    try {
      body(n * part / parts, n * (part + 1) / parts);
    } catch (...) {
      const std::lock_guard lock(error_mutex);
      if (!first_error) first_error = std::current_exception();
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(std::size_t(parts - 1));
  index_t started = 1;
  try {
    for (; started < parts; ++started) threads.emplace_back(run, started);
  } catch (const std::system_error&) {
    // No more threads to be had: the calling thread takes the parts left.
  }
  for (index_t part = started; part < parts; ++part) run(part);
  run(0);
  for (auto& t : threads) t.join();
  if (first_error) std::rethrow_exception(first_error);
}

}  // namespace dash

// Fresh random inputs every run: one seed per process, from DASH_TEST_SEED when set, else
// from the system's entropy; every test case draws its own generator from it.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <random>
#include <string_view>

#include "dash/core/rng.hpp"
#include "dash/core/tensor.hpp"

namespace dash::test {

inline std::uint64_t run_seed() {
  static const std::uint64_t seed = [] {
    if (const char* env = std::getenv("DASH_TEST_SEED")) return std::uint64_t{std::strtoull(env, nullptr, 10)};
    std::random_device device;
    return (std::uint64_t{device()} << 32) ^ device();
  }();
  return seed;
}

// A generator for one test case: the run's seed mixed with the case's name, so that cases do
// not share streams and a case's stream does not depend on which others ran.
inline Rng rng_for(std::string_view test_name) {
  std::uint64_t h = 1469598103934665603ull;
  for (char c : test_name) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
  return Rng(run_seed() ^ h);
}

template <class T>
Tensor<T> random_tensor(Shape shape, Rng& rng, double stddev = 1.0) {
  Tensor<T> t(shape);
  fill_normal(t.view(), rng, 0.0, stddev);
  return t;
}

// Outputs are filled with NaN before a kernel runs, so an element it forgets to write shows.
template <class T>
void poison(TensorView<T> v) {
  for (index_t i = 0; i < v.numel(); ++i) v.data[i] = std::numeric_limits<T>::quiet_NaN();
}

}  // namespace dash::test

// Rng: a seeded, reproducible generator (xoshiro256** seeded through splitmix64) with the
// fills the library needs: uniform, normal (Box-Muller), and Gumbel noise for the search.
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>

#include "dash/core/tensor.hpp"

namespace dash {

class Rng {
 public:
  explicit Rng(std::uint64_t seed = 0) {
    std::uint64_t x = seed;
    for (auto& word : state_) word = splitmix64(x);
  }

  std::uint64_t next_u64() {
    const std::uint64_t result = rotl(state_[1] * 5, 7) * 9;
    const std::uint64_t t = state_[1] << 17;
    state_[2] ^= state_[0];
    state_[3] ^= state_[1];
    state_[1] ^= state_[2];
    state_[0] ^= state_[3];
    state_[2] ^= t;
    state_[3] = rotl(state_[3], 45);
    return result;
  }

  // Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  // Uniform integer in [0, n).
  std::uint64_t below(std::uint64_t n) {
    require(n > 0, "Rng::below: n must be positive");
    return next_u64() % n;
  }

  double normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double u1 = 1.0 - uniform();  // (0, 1]: log is finite
    const double u2 = uniform();
    const double r = std::sqrt(-2.0 * std::log(u1));
    spare_ = r * std::sin(2.0 * std::numbers::pi * u2);
    has_spare_ = true;
    return r * std::cos(2.0 * std::numbers::pi * u2);
  }

  // Standard Gumbel: -log(-log U).
  double gumbel() { return -std::log(-std::log(1.0 - uniform() * (1.0 - 1e-12))); }

  // An independent stream, for giving each worker or layer its own generator.
  Rng split() { return Rng(next_u64()); }

 private:
  static std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  static std::uint64_t splitmix64(std::uint64_t& x) {
    std::uint64_t z = (x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }

  std::uint64_t state_[4]{};
  double spare_ = 0.0;
  bool has_spare_ = false;
};

template <class T>
void fill_normal(TensorView<T> v, Rng& rng, double mean = 0.0, double stddev = 1.0) {
  require_host(v, "fill_normal");
  require(v.contiguous(), "fill_normal: view must be contiguous");
  for (index_t i = 0; i < v.numel(); ++i) v.data[i] = static_cast<T>(mean + stddev * rng.normal());
}

template <class T>
void fill_uniform(TensorView<T> v, Rng& rng, double lo = 0.0, double hi = 1.0) {
  require_host(v, "fill_uniform");
  require(v.contiguous(), "fill_uniform: view must be contiguous");
  for (index_t i = 0; i < v.numel(); ++i) v.data[i] = static_cast<T>(rng.uniform(lo, hi));
}

}  // namespace dash

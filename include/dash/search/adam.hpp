// Adam (Kingma & Ba) on one flat parameter vector, and the learning-rate and temperature
// schedules of the search and of candidate preparation.
//   m ← β1·m + (1−β1)·g,   v ← β2·v + (1−β2)·g²,   x ← x − lr · m̂ / (√v̂ + ε)
// with m̂, v̂ the bias-corrected moments after t steps. The moments are kept in double so that
// a float32 parameter's update does not depend on the rounding of its history.
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>
#include <span>
#include <vector>

#include "dash/core/error.hpp"

namespace dash::search {

struct AdamOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
};

class Adam {
 public:
  Adam() = default;
  explicit Adam(std::size_t n, AdamOptions options = {}) : options_(options), m_(n, 0.0), v_(n, 0.0) {}

  template <class T>
  void step(std::span<T> x, std::span<const T> g, double lr) {
    require(x.size() == m_.size() && g.size() == m_.size(), "Adam::step: ", x.size(), " parameters and ", g.size(),
            " gradients for a state of ", m_.size());
    ++t_;
    const double c1 = 1 - std::pow(options_.beta1, double(t_)), c2 = 1 - std::pow(options_.beta2, double(t_));
    for (std::size_t i = 0; i < x.size(); ++i) {
      const double gi = double(g[i]);
      m_[i] = options_.beta1 * m_[i] + (1 - options_.beta1) * gi;
      v_[i] = options_.beta2 * v_[i] + (1 - options_.beta2) * gi * gi;
      x[i] = T(double(x[i]) - lr * (m_[i] / c1) / (std::sqrt(v_[i] / c2) + options_.eps));
    }
  }

  // The state, for checkpoints.
  std::vector<double>& m() { return m_; }
  std::vector<double>& v() { return v_; }
  std::int64_t& t() { return t_; }

 private:
  AdamOptions options_;
  std::vector<double> m_, v_;
  std::int64_t t_ = 0;
};

// Cosine decay from `lr` to `min_fraction`·lr over `steps`, after a linear warm-up.
inline double cosine_lr(double lr, std::int64_t step, std::int64_t steps, std::int64_t warmup = 0,
                        double min_fraction = 0.1) {
  if (step < warmup) return lr * double(step + 1) / double(warmup);
  const double progress = steps > warmup ? double(step - warmup) / double(steps - warmup) : 1.0;
  const double cosine = 0.5 * (1 + std::cos(std::numbers::pi * std::min(progress, 1.0)));
  return lr * (min_fraction + (1 - min_fraction) * cosine);
}

// Geometric annealing from `start` at step 0 to `end` at the last step.
inline double annealed(double start, double end, std::int64_t step, std::int64_t steps) {
  if (steps <= 1) return end;
  const double progress = std::min(1.0, double(step) / double(steps - 1));
  return start * std::pow(end / start, progress);
}

}  // namespace dash::search

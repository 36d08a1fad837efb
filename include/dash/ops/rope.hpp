// Rotary position embedding. For pair i of a head (i < D/2) and position p:
//   θ_i = theta^(-2i/D),   (x_a, x_b) ← (x_a cos pθ_i − x_b sin pθ_i,  x_a sin pθ_i + x_b cos pθ_i)
// with (a, b) = (2i, 2i+1) in the interleaved convention (llama2.c, GGUF) and (i, i + D/2) in
// the half convention (Hugging Face). The map is a rotation, so its backward is the inverse
// rotation (sin → −sin) applied to the incoming gradient.
#pragma once

#include <cmath>
#include <vector>

#include "dash/core/tensor.hpp"
#include "dash/ops/attention.hpp"

namespace dash {

// cos and sin of p·θ_i for p in [first_position, first_position + T), computed in double.
class RopeTable {
 public:
  RopeTable(const RopeConfig& rope, index_t d_head, index_t first_position, index_t n_positions)
      : style_(rope.style), pairs_(d_head / 2), cos_(n_positions * pairs_), sin_(n_positions * pairs_) {
    for (index_t p = 0; p < n_positions; ++p)
      for (index_t i = 0; i < pairs_; ++i) {
        const double freq = std::pow(rope.theta, -2.0 * double(i) / double(d_head));
        const double angle = double(first_position + p) * freq;
        cos_[p * pairs_ + i] = std::cos(angle);
        sin_[p * pairs_ + i] = std::sin(angle);
      }
  }

  // Rotates x [B, T, H, D] in place; `inverse` applies the transpose (the backward).
  template <class T>
  void apply(TensorView<T> x, bool inverse = false) const {
    if (style_ == RopeConfig::Style::none) return;
    require_rank(x, 4, "rope input");
    require(x.dim(3) == 2 * pairs_, "rope input: d_head ", x.dim(3), ", expected ", 2 * pairs_);
    require(static_cast<std::size_t>(x.dim(1) * pairs_) <= cos_.size(), "rope input: ", x.dim(1),
            " positions, table has ", cos_.size() / std::max<index_t>(pairs_, 1));
    const double sign = inverse ? -1.0 : 1.0;
    const bool interleaved = style_ == RopeConfig::Style::interleaved;
    for (index_t b = 0; b < x.dim(0); ++b)
      for (index_t t = 0; t < x.dim(1); ++t)
        for (index_t h = 0; h < x.dim(2); ++h) {
          T* row = &x(b, t, h, 0);
          for (index_t i = 0; i < pairs_; ++i) {
            const index_t ia = interleaved ? 2 * i : i;
            const index_t ib = interleaved ? 2 * i + 1 : i + pairs_;
            const double c = cos_[t * pairs_ + i], s = sign * sin_[t * pairs_ + i];
            const double xa = static_cast<double>(row[ia * x.stride[3]]);
            const double xb = static_cast<double>(row[ib * x.stride[3]]);
            row[ia * x.stride[3]] = static_cast<T>(xa * c - xb * s);
            row[ib * x.stride[3]] = static_cast<T>(xa * s + xb * c);
          }
        }
  }

 private:
  RopeConfig::Style style_;
  index_t pairs_;
  std::vector<double> cos_, sin_;
};

}  // namespace dash

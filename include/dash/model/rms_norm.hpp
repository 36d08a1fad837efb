// RMSNorm over the last axis:  y = g ⊙ x · r,  r = 1 / sqrt(mean(x²) + ε).
// Backward, with x̂ = x·r:  dx = r · (g⊙dy − x̂ · mean(x̂ ⊙ g⊙dy)),  dg = Σ_rows dy ⊙ x̂.
#pragma once

#include <cmath>

#include "dash/core/eigen.hpp"
#include "dash/core/tensor.hpp"
#include "dash/ops/detail/linear.hpp"

namespace dash::model {

template <class T>
void rms_norm_forward(TensorView<const T> x, TensorView<const T> g, double eps, TensorView<T> y) {
  const index_t d = g.numel();
  const auto X = dash::detail::rows_of(x, d);
  auto Y = dash::detail::rows_of(y, d);
  const auto G = eigen::vector(g).transpose();
  for (index_t r = 0; r < X.rows(); ++r) {
    const double ms = X.row(r).template cast<double>().squaredNorm() / double(d);
    Y.row(r) = X.row(r).cwiseProduct(G) * T(1.0 / std::sqrt(ms + eps));
  }
}

// Adds into dx and, when it is not empty, dg.
template <class T>
void rms_norm_backward(TensorView<const T> x, TensorView<const T> g, double eps, TensorView<const T> dy,
                       TensorView<T> dx, TensorView<T> dg) {
  const index_t d = g.numel();
  const auto X = dash::detail::rows_of(x, d);
  const auto dY = dash::detail::rows_of(dy, d);
  auto dX = dash::detail::rows_of(dx, d);
  const auto G = eigen::vector(g).transpose();
  for (index_t r = 0; r < X.rows(); ++r) {
    const T inv = T(1.0 / std::sqrt(X.row(r).template cast<double>().squaredNorm() / double(d) + eps));
    const auto xhat = (X.row(r) * inv).eval();
    const auto gdy = dY.row(r).cwiseProduct(G).eval();
    const T mean = xhat.dot(gdy) / T(d);
    dX.row(r) += inv * (gdy - mean * xhat);
    if (!dg.empty()) eigen::vector(dg).transpose() += dY.row(r).cwiseProduct(xhat);
  }
}

}  // namespace dash::model

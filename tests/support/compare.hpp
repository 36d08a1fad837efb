// Comparisons stated as identities: normwise relative difference, and central finite
// differences in float64.
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "dash/core/rng.hpp"
#include "dash/core/tensor.hpp"

namespace dash::test {

template <class T>
double max_abs(TensorView<const T> a) {
  double m = 0;
  for (index_t i = 0; i < a.numel(); ++i) m = std::max(m, std::abs(static_cast<double>(a.data[i])));
  return m;
}

// max |a − b| / max |b|; NaN anywhere gives infinity, so a poisoned output cannot pass.
template <class A, class B>
double relative_difference(TensorView<const A> a, TensorView<const B> b) {
  require(a.shape == b.shape, "relative_difference: shapes ", a.shape, " and ", b.shape, " differ");
  double diff = 0, scale = 0;
  for (index_t i = 0; i < a.numel(); ++i) {
    const double x = static_cast<double>(a.data[i]), y = static_cast<double>(b.data[i]);
    if (!std::isfinite(x) || !std::isfinite(y)) return std::numeric_limits<double>::infinity();
    diff = std::max(diff, std::abs(x - y));
    scale = std::max(scale, std::abs(y));
  }
  return scale > 0 ? diff / scale : diff;
}
template <class A, class B>
double relative_difference(const Tensor<A>& a, const Tensor<B>& b) {
  return relative_difference(a.view(), b.view());
}

// Central finite differences of `loss` with respect to the entries of `x` (perturbed in place
// and restored), compared with `analytic`. The fourth-order central stencil
//   D(h) = (f(x−2h) − 8 f(x−h) + 8 f(x+h) − f(x+2h)) / 12h = f'(x) + c·h⁴ + O(h⁶)
// is taken at h and h/2 and combined by Richardson extrapolation, D(h/2) + (D(h/2) − D(h))/15,
// which cancels the h⁴ term. The spread u = |D(h/2) − D(h)| measures the difference's own
// error (truncation where f curves sharply, an L2 normalisation of a short vector say;
// rounding of a loss that sums many terms, where the gradient is small), and only a
// discrepancy beyond it counts:
//   e_i(h) = max(0, |fd_i − an_i| − u_i) / max(|fd_i|, |an_i|, floor),
//   floor = max(1e-3 · max_j |an_j|, 1e7 · ε·|f|/h)
// The floor keeps entries whose gradient is zero, or below what differences of f resolve, from
// dividing noise by (almost) zero. Rounding can still make D(h) and D(h/2) agree by chance
// while both miss f' (a loss of a few hundred summed from thousands of terms carries tens of
// ulps), so an entry counts only what persists at a second step 4h: error_i = min(e_i(h),
// e_i(4h)). Truncation grows with the step and rounding shrinks with it, so the two artefacts
// cannot both survive, while a wrong gradient is off by the same fraction of itself at every
// step, many orders above either. (The second step is skipped where e_i(h) is already below
// 1e-8: the minimum can only be smaller.) At most `max_entries` entries, chosen at random, are
// checked; the largest error is returned.
inline double finite_difference_error(TensorView<double> x, TensorView<const double> analytic,
                                      const std::function<double()>& loss, Rng& rng,
                                      index_t max_entries = 200, double step = 1e-3) {
  require(x.shape == analytic.shape, "finite_difference_error: x ", x.shape, " vs gradient ", analytic.shape);
  require(x.contiguous(), "finite_difference_error: x must be contiguous");
  std::vector<index_t> entries(static_cast<std::size_t>(x.numel()));
  for (index_t i = 0; i < x.numel(); ++i) entries[i] = i;
  if (x.numel() > max_entries) {
    for (index_t i = 0; i < max_entries; ++i) std::swap(entries[i], entries[i + rng.below(x.numel() - i)]);
    entries.resize(static_cast<std::size_t>(max_entries));
  }
  const double f0 = std::abs(loss()), grad_scale = max_abs(analytic);
  const auto at = [&](index_t i, double value) {
    const double saved = x.data[i];
    x.data[i] = value;
    const double f = loss();
    x.data[i] = saved;
    return f;
  };
  const auto stencil = [&](index_t i, double h) {
    const double x0 = x.data[i];
    return (at(i, x0 - 2 * h) - 8 * at(i, x0 - h) + 8 * at(i, x0 + h) - at(i, x0 + 2 * h)) / (12 * h);
  };
  // e_i(h) as above; infinity where either side is not finite.
  const auto error_at = [&](index_t i, double h) {
    const double noise = std::numeric_limits<double>::epsilon() * std::max(1.0, f0) / h;
    const double floor = std::max(1e-3 * grad_scale, 1e7 * noise);
    const double coarse = stencil(i, h), fine = stencil(i, h / 2);
    const double fd = fine + (fine - coarse) / 15, spread = std::abs(fine - coarse);
    const double an = analytic.data[i];
    if (!std::isfinite(fd) || !std::isfinite(an)) return std::numeric_limits<double>::infinity();
    const double excess = std::max(0.0, std::abs(fd - an) - spread);
    return excess / std::max({std::abs(fd), std::abs(an), floor});
  };
  double worst = 0;
  for (index_t i : entries) {
    double error = error_at(i, step);
    if (error > 1e-8) error = std::min(error, error_at(i, 4 * step));
    worst = std::max(worst, error);
  }
  return worst;
}

// Σ w ⊙ y: a scalar loss whose gradient with respect to y is w.
inline double weighted_sum(TensorView<const double> y, TensorView<const double> w) {
  double s = 0;
  for (index_t i = 0; i < y.numel(); ++i) s += y.data[i] * w.data[i];
  return s;
}

}  // namespace dash::test

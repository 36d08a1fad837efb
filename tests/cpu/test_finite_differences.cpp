// The finite-difference instrument every gradient test relies on: it must pass an exact
// gradient of a curved, many-term loss and report an error planted in it at its true size.
#include <doctest/doctest.h>

#include <cmath>

#include "support/compare.hpp"
#include "support/random.hpp"

using namespace dash;

namespace {

// f(x) = Σ_i c_i · softplus(x_i · ‖x‖) over many entries, so that f carries rounding from a
// long sum and curves through the norm; its gradient is written out by hand.
struct CurvedLoss {
  Tensor<double> c;

  double operator()(TensorView<const double> x) const {
    const double norm = std::sqrt(sum_of_squares(x));
    double f = 0;
    for (index_t i = 0; i < x.numel(); ++i) f += c.data()[i] * std::log1p(std::exp(x.data[i] * norm));
    return f;
  }

  Tensor<double> gradient(TensorView<const double> x) const {
    const double norm = std::sqrt(sum_of_squares(x));
    // ∂f/∂x_j = c_j σ(x_j n) n + Σ_i c_i σ(x_i n) x_i · x_j / n
    double coupling = 0;
    for (index_t i = 0; i < x.numel(); ++i) coupling += c.data()[i] * sigmoid(x.data[i] * norm) * x.data[i];
    Tensor<double> g(x.shape);
    for (index_t j = 0; j < x.numel(); ++j)
      g.data()[j] = c.data()[j] * sigmoid(x.data[j] * norm) * norm + coupling * x.data[j] / norm;
    return g;
  }

  static double sigmoid(double z) { return 1 / (1 + std::exp(-z)); }
  static double sum_of_squares(TensorView<const double> x) {
    double s = 0;
    for (index_t i = 0; i < x.numel(); ++i) s += x.data[i] * x.data[i];
    return s;
  }
};

}  // namespace

TEST_CASE("finite differences pass an exact gradient and report a planted error at its size") {
  Rng rng = test::rng_for("finite differences");
  for (int trial = 0; trial < 4; ++trial) {
    const index_t n = 200 + index_t(rng.below(2000));
    Tensor<double> x = test::random_tensor<double>(Shape{n}, rng, 1.0 / std::sqrt(double(n)));
    const CurvedLoss f{test::random_tensor<double>(Shape{n}, rng)};
    const auto loss = [&] { return f(x.view()); };
    Tensor<double> exact = f.gradient(x.view());
    CAPTURE(n);
    CHECK(test::finite_difference_error(x.view(), exact.view(), loss, rng, 64) <= 1e-6);

    for (double planted : {1e-5, 1e-3}) {
      CAPTURE(planted);
      Tensor<double> wrong = clone(exact.view());
      // The largest entry, so that the floor for tiny gradients does not dilute the error.
      index_t at = 0;
      for (index_t i = 1; i < n; ++i)
        if (std::abs(exact.data()[i]) > std::abs(exact.data()[at])) at = i;
      wrong.data()[at] *= 1 + planted;
      const double reported = test::finite_difference_error(x.view(), wrong.view(), loss, rng, n);
      CHECK(reported >= 0.5 * planted);
      CHECK(reported <= 2 * planted);
    }
  }
}

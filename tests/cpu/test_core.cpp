#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "dash/core/dtype.hpp"
#include "dash/core/parallel.hpp"
#include "dash/core/rng.hpp"
#include "dash/core/tensor.hpp"
#include "dash/ops/attention.hpp"
#include "dash/ops/rope.hpp"
#include "support/compare.hpp"
#include "support/errors.hpp"
#include "support/random.hpp"

using namespace dash;

TEST_CASE("bf16 rounds to nearest even and keeps NaN") {
  CHECK(static_cast<float>(bf16(1.0f)) == 1.0f);
  // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
  CHECK(static_cast<float>(bf16(1.0f + 0x1.0p-8f)) == 1.0f);
  // 1 + 3·2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: ties go to 1 + 2^-6.
  CHECK(static_cast<float>(bf16(1.0f + 3 * 0x1.0p-8f)) == 1.0f + 0x1.0p-6f);
  CHECK(std::isnan(static_cast<float>(bf16(std::numeric_limits<float>::quiet_NaN()))));
  Rng rng = test::rng_for("bf16");
  for (int i = 0; i < 1000; ++i) {
    const float x = static_cast<float>(rng.normal() * 100);
    CHECK(std::abs(static_cast<float>(bf16(x)) - x) <= std::abs(x) * 0x1.0p-8f);
  }
}

TEST_CASE("Rng is reproducible for a seed and its normals have unit variance") {
  Rng a(42), b(42), c(43);
  CHECK(a.next_u64() == b.next_u64());
  CHECK(a.next_u64() != c.next_u64());
  Rng rng = test::rng_for("rng moments");
  double sum = 0, sq = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    const double x = rng.normal();
    sum += x, sq += x * x;
  }
  // Standard errors: 1/sqrt(n) for the mean, sqrt(2/n) for the variance; allow 6 of them.
  CHECK(std::abs(sum / n) < 6 / std::sqrt(double(n)));
  CHECK(std::abs(sq / n - 1) < 6 * std::sqrt(2.0 / n));
}

TEST_CASE("parallel_for covers [0, n) once in ranges of at least the grain, and rethrows a range's error") {
  Rng rng = test::rng_for("parallel_for");
  for (int trial = 0; trial < 20; ++trial) {
    const index_t n = index_t(rng.below(100000)), grain = 1 + index_t(rng.below(5000));
    CAPTURE(n);
    CAPTURE(grain);
    std::vector<std::atomic<int>> visits(std::size_t(std::max<index_t>(n, 1)));
    std::mutex ranges_mutex;
    std::vector<std::pair<index_t, index_t>> ranges;
    parallel_for(n, grain, [&](index_t begin, index_t end) {
      for (index_t i = begin; i < end; ++i) ++visits[std::size_t(i)];
      const std::lock_guard lock(ranges_mutex);
      ranges.emplace_back(begin, end);
    });
    for (index_t i = 0; i < n; ++i) REQUIRE(visits[std::size_t(i)] == 1);
    const index_t cores = std::max<index_t>(1, index_t(std::thread::hardware_concurrency()));
    CHECK(ranges.size() == (n == 0 ? 0u : std::size_t(std::clamp<index_t>(n / grain, 1, cores))));
    for (const auto& [begin, end] : ranges) CHECK((end - begin >= grain || ranges.size() == 1));
  }
  const std::string error = test::error_of([] {
    parallel_for(1 << 20, 1, [](index_t begin, index_t) {
      if (begin > 0) fail("range at ", begin);
    });
  });
  CHECK(test::contains(error, "range at"));
}

TEST_CASE("Tensor: zero-filled by default, every element writable when left uninitialised") {
  Rng rng = test::rng_for("tensor construction");
  const Shape s{index_t(1 + rng.below(50)), index_t(1 + rng.below(50))};
  {
    Tensor<float> filled(s, uninitialized);
    for (index_t i = 0; i < filled.numel(); ++i) filled.data()[i] = float(i + 1);
    for (index_t i = 0; i < filled.numel(); ++i) REQUIRE(filled.data()[i] == float(i + 1));
  }
  const Tensor<float> zeros(s);  // most likely in the memory just freed
  for (float x : zeros.flat()) REQUIRE(x == 0.f);
}

TEST_CASE("Tensor views: strides, indexing, const conversion and clone of a strided view") {
  Tensor<double> t(Shape{2, 3, 4});
  for (index_t i = 0; i < t.numel(); ++i) t.data()[i] = double(i);
  CHECK(t(1, 2, 3) == 23.0);
  TensorView<const double> cv = t.view();
  CHECK(cv(1, 0, 2) == 14.0);
  // Transposed view of the last two axes.
  TensorView<const double> tr(t.data(), Shape{2, 4, 3}, {12, 1, 4, 0, 0, 0}, Device::cpu);
  CHECK_FALSE(tr.contiguous());
  const Tensor<double> c = clone(tr);
  CHECK(c(1, 3, 2) == t(1, 2, 3));
  CHECK(c(0, 1, 2) == t(0, 2, 1));
}

TEST_CASE("Bad shapes throw dash::Error naming the tensor") {
  Tensor<float> t(Shape{2, 3});
  CHECK_THROWS_WITH_AS(t.reshape(Shape{4, 2}), doctest::Contains("reshape"), Error);
  CHECK_THROWS_WITH_AS(require_shape(t.view(), Shape{3, 2}, "weights.wq"), doctest::Contains("weights.wq"), Error);
  CHECK_THROWS_AS(Shape({1, -1}), Error);
  t(0, 1) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH_AS(require_finite(t.view(), "h"), doctest::Contains("h: element 1"), Error);
}

TEST_CASE("AttentionShape validation names the field") {
  AttentionShape s{.d_model = 32, .n_heads = 6, .n_kv_heads = 4, .d_head = 8};
  CHECK_THROWS_WITH_AS(s.validate(), doctest::Contains("n_kv_heads"), Error);
  s.n_kv_heads = 3;
  CHECK_NOTHROW(s.validate());
  s.d_head = 7;
  CHECK_THROWS_WITH_AS(s.validate(), doctest::Contains("d_head"), Error);
}

TEST_CASE("RoPE: conventions are permutations of each other, rotation preserves norms, inverse undoes it") {
  Rng rng = test::rng_for("rope");
  const index_t B = 2, T = 9, H = 3, D = 8;
  Tensor<double> x = test::random_tensor<double>(Shape{B, T, H, D}, rng);
  // The half convention on a head whose entries were permuted (2i, 2i+1) → (i, i + D/2)
  // equals the interleaved convention, permuted the same way.
  Tensor<double> inter = x, half(Shape{B, T, H, D});
  for (index_t b = 0; b < B; ++b)
    for (index_t t = 0; t < T; ++t)
      for (index_t h = 0; h < H; ++h)
        for (index_t i = 0; i < D / 2; ++i) {
          half(b, t, h, i) = x(b, t, h, 2 * i);
          half(b, t, h, i + D / 2) = x(b, t, h, 2 * i + 1);
        }
  const double theta = 500.0;
  RopeTable(RopeConfig{RopeConfig::Style::interleaved, theta}, D, 3, T).apply(inter.view());
  RopeTable(RopeConfig{RopeConfig::Style::half, theta}, D, 3, T).apply(half.view());
  double worst = 0;
  for (index_t b = 0; b < B; ++b)
    for (index_t t = 0; t < T; ++t)
      for (index_t h = 0; h < H; ++h)
        for (index_t i = 0; i < D / 2; ++i) {
          worst = std::max(worst, std::abs(half(b, t, h, i) - inter(b, t, h, 2 * i)));
          worst = std::max(worst, std::abs(half(b, t, h, i + D / 2) - inter(b, t, h, 2 * i + 1)));
        }
  CHECK(worst < 1e-13);
  // Position 0 with offset 0 is the identity; the inverse undoes the rotation.
  Tensor<double> y = x;
  const RopeTable table(RopeConfig{RopeConfig::Style::half, theta}, D, 0, T);
  table.apply(y.view());
  for (index_t i = 0; i < D; ++i) CHECK(y(0, 0, 0, i) == x(0, 0, 0, i));
  table.apply(y.view(), /*inverse=*/true);
  CHECK(test::relative_difference(y, x) < 1e-14);
}

#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <ostream>
#include <vector>

#include "dash/ops/operator.hpp"
#include "dash/ops/sliding_window.hpp"
#include "dash/ops/softmax.hpp"
#include "reference/softmax_loops.hpp"
#include "support/attention_case.hpp"
#include "support/compare.hpp"
#include "support/random.hpp"

using namespace dash;
using namespace dash::test::attention;

static_assert(TeacherProjectionOperator<SlidingWindow<>, float>);
static_assert(TeacherProjectionOperator<SlidingWindow<>, double>);
static_assert(TeacherProjectionOperator<SlidingWindow<16>, float>);
static_assert(TeacherProjectionOperator<SlidingWindow<16>, double>);
static_assert(check_operator<SlidingWindow<>>() && check_operator<SlidingWindow<16>>());

namespace {

// A window shorter than the sequence without sinks, the same with sinks, or a window that
// covers the whole sequence (where sinks change nothing).
enum class WindowKind { short_no_sinks, short_with_sinks, covering };

SlidingWindow<> random_window(WindowKind kind, index_t length, Rng& rng) {
  const auto short_window = index_t(1 + rng.below(std::max<index_t>(1, length - 1)));
  switch (kind) {
    case WindowKind::short_no_sinks: return SlidingWindow<>(short_window);
    case WindowKind::short_with_sinks: return SlidingWindow<>(short_window, index_t(1 + rng.below(4)));
    case WindowKind::covering: break;
  }
  return SlidingWindow<>(length + index_t(rng.below(4)), index_t(rng.below(3)));
}

}  // namespace

TEST_CASE("SlidingWindow gradients match central finite differences in float64") {
  Rng rng = test::rng_for("sliding window finite differences");
  constexpr WindowKind kinds[] = {WindowKind::short_no_sinks, WindowKind::short_with_sinks, WindowKind::covering};
  double worst = 0;
  std::size_t length_index = 0;
  for (index_t length : lengths(rng)) {
    for (std::size_t g = 0; g < head_groups.size(); ++g) {
      // Each length sees every group with a different window kind and head size.
      const Layout s = gradient_check_layout(length, head_groups[g], head_dims[(g + 2 * length_index) % 3], rng);
      const SlidingWindow<> op = random_window(kinds[(g + length_index) % 3], length, rng);
      INFO(s, " W=", op.window(), " sinks=", op.sinks());
      const double error = finite_difference_error(op, s, rng);
      CHECK(error <= 1e-6);
      worst = std::max(worst, error);
    }
    ++length_index;
  }
  MESSAGE("largest finite-difference error: ", worst);
}

TEST_CASE("SlidingWindow forward equals the plain-loop reference") {
  Rng rng = test::rng_for("sliding window reference");
  double worst64 = 0, worst32 = 0;
  for (index_t length : lengths(rng))
    for (index_t group : head_groups) {
      // Windows on and around the tile size, each with one of: no sinks, sinks inside the
      // first tile, sinks reaching past it.
      const index_t windows[] = {1, 5, 63, 64, 65, index_t(1 + rng.below(length)), length + 1};
      const index_t sink_counts[] = {0, index_t(1 + rng.below(5)), 70};
      for (std::size_t w = 0; w < std::size(windows); ++w) {
        const SlidingWindow<> op(windows[w], sink_counts[(w + std::size_t(group)) % 3]);
        const Layout s = random_layout(length, group, head_dims[rng.below(head_dims.size())], rng);
        INFO(s, " W=", op.window(), " sinks=", op.sinks());
        const auto reference = [&](const auto& x) {
          return reference::softmax_attention_loops(x.q, x.k, x.v, op.window(), op.sinks());
        };
        const Inputs<double> x64 = random_inputs<double>(s, rng);
        const double e64 = test::relative_difference(run_forward(op, x64), reference(x64));
        // float32 against the reference on the same rounded inputs: the kernel's own float32
        // rounding, some 1e-7 of the output's scale (see test_softmax.cpp).
        const Inputs<float> x32 = random_inputs<float>(s, rng);
        const double e32 = test::relative_difference(run_forward(op, x32), reference(x32));
        CHECK(e64 <= 1e-12);
        CHECK(e32 <= 1e-5);
        worst64 = std::max(worst64, e64), worst32 = std::max(worst32, e32);
      }
    }
  MESSAGE("largest difference from the reference: float64 ", worst64, ", float32 ", worst32);
}

TEST_CASE("SlidingWindow with a window of at least T is Softmax, forward and gradients") {
  Rng rng = test::rng_for("sliding window covering");
  double worst = 0;
  for (index_t length : lengths(rng))
    for (index_t group : head_groups) {
      const Layout s = random_layout(length, group, head_dims[rng.below(head_dims.size())], rng);
      const index_t window = rng.below(2) ? length : length + index_t(1 + rng.below(100));
      const SlidingWindow<> op(window, index_t(rng.below(3)));
      INFO(s, " W=", op.window(), " sinks=", op.sinks());
      const Inputs<double> x = random_inputs<double>(s, rng);
      const Tensor<double> w = test::random_tensor<double>(x.q.shape(), rng);
      const Gradients<double> g = run_backward(op, x, w, rng), f = run_backward(Softmax{}, x, w, rng);
      const double errors[] = {test::relative_difference(run_forward(op, x), run_forward(Softmax{}, x)),
                               test::relative_difference(g.dq, f.dq), test::relative_difference(g.dk, f.dk),
                               test::relative_difference(g.dv, f.dv)};
      for (double e : errors) CHECK(e <= 1e-10);
      worst = std::max(worst, *std::max_element(std::begin(errors), std::end(errors)));
    }
  MESSAGE("largest SlidingWindow(W >= T)/Softmax difference: ", worst);
}

TEST_CASE("SlidingWindow with GQA equals MHA on repeated k/v heads; kv gradients sum over the group") {
  Rng rng = test::rng_for("sliding window gqa");
  double worst = 0;
  for (index_t length : lengths(rng))
    for (index_t group : {index_t(2), index_t(4)}) {
      const Layout s = random_layout(length, group, head_dims[rng.below(head_dims.size())], rng);
      const SlidingWindow<> op = random_window(WindowKind::short_with_sinks, length, rng);
      INFO(s, " W=", op.window(), " sinks=", op.sinks());
      const Inputs<double> gqa = random_inputs<double>(s, rng);
      const Inputs<double> mha{gqa.q, repeat_heads(gqa.k, group), repeat_heads(gqa.v, group)};
      const Tensor<double> w = test::random_tensor<double>(gqa.q.shape(), rng);
      const Gradients<double> g = run_backward(op, gqa, w, rng), m = run_backward(op, mha, w, rng);
      const double errors[] = {test::relative_difference(run_forward(op, gqa), run_forward(op, mha)),
                               test::relative_difference(g.dq, m.dq),
                               test::relative_difference(g.dk, sum_groups(m.dk, group)),
                               test::relative_difference(g.dv, sum_groups(m.dv, group))};
      for (double e : errors) CHECK(e <= 1e-10);
      worst = std::max(worst, *std::max_element(std::begin(errors), std::end(errors)));
    }
  MESSAGE("largest GQA/MHA difference: ", worst);
}

TEST_CASE("SlidingWindow: a compile-time window behaves as the same window given at run time") {
  Rng rng = test::rng_for("sliding window static");
  const SlidingWindow<9> fixed(2);
  const SlidingWindow<> chosen(9, 2);
  CHECK(fixed.window() == 9);
  CHECK(fixed.sinks() == 2);
  CHECK(SlidingWindow<9>{}.sinks() == 0);
  CHECK(chosen.window() == 9);
  CHECK(chosen.sinks() == 2);
  CHECK(SlidingWindow<>(9).sinks() == 0);
  const Inputs<double> x = random_inputs<double>(random_layout(100, 2, 8, rng), rng);
  CHECK(test::relative_difference(run_forward(fixed, x), run_forward(chosen, x)) == 0);
}

TEST_CASE("SlidingWindow rejects bad input with a dash::Error naming the parameter") {
  Rng rng = test::rng_for("sliding window bad input");
  CHECK_THROWS_WITH_AS(SlidingWindow<>(0), doctest::Contains("window = 0"), Error);
  CHECK_THROWS_WITH_AS(SlidingWindow<>(-3, 1), doctest::Contains("window = -3"), Error);
  CHECK_THROWS_WITH_AS(SlidingWindow<>(4, -1), doctest::Contains("sinks = -1"), Error);
  CHECK_THROWS_WITH_AS(SlidingWindow<4>(-2), doctest::Contains("sinks = -2"), Error);

  const SlidingWindow<> op(3, 1);
  Inputs<double> x = random_inputs<double>(Layout{2, 5, 4, 2, 8}, rng);
  Tensor<double> out(x.q.shape());
  SlidingWindow<>::Saved<double> saved;
  REQUIRE_NOTHROW(op.forward(x.q, x.k, x.v, out, saved));
  const Tensor<double> short_k(Shape{2, 4, 2, 8}, 0.0), three_kv_heads(Shape{2, 5, 3, 8}, 0.0);
  Tensor<double> small_out(Shape{2, 5, 2, 8});
  CHECK_THROWS_WITH_AS(op.forward(x.q, short_k, x.v, out, saved), doctest::Contains("k: shape"), Error);
  CHECK_THROWS_WITH_AS(op.forward(x.q, x.k, x.v, small_out, saved), doctest::Contains("out: shape"), Error);
  CHECK_THROWS_WITH_AS(op.forward(x.q, three_kv_heads, three_kv_heads, out, saved),
                       doctest::Contains("n_heads = 4 is not a multiple of n_kv_heads = 3"), Error);
  const Tensor<double> empty_q(Shape{2, 0, 4, 8}), empty_kv(Shape{2, 0, 2, 8});
  Tensor<double> empty_out(Shape{2, 0, 4, 8});
  CHECK_THROWS_WITH_AS(op.forward(empty_q, empty_kv, empty_kv, empty_out, saved),
                       doctest::Contains("sequence length T = 0"), Error);

  Tensor<double> dq(x.q.shape(), 0.0), dk(x.k.shape(), 0.0), dv(x.v.shape(), 0.0);
  CHECK_THROWS_WITH_AS(op.backward(x.q, x.k, x.v, out, saved, small_out, dq, dk, dv),
                       doctest::Contains("d_out: shape"), Error);
  CHECK_THROWS_WITH_AS(op.backward(x.q, x.k, x.v, out, SlidingWindow<>::Saved<double>{}, out, dq, dk, dv),
                       doctest::Contains("saved.lse"), Error);

  x.k(1, 2, 0, 3) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH_AS(op.forward(x.q, x.k, x.v, out, saved), doctest::Contains("k: element"), Error);
}

TEST_CASE("SlidingWindow cost: KV cache of the window and sinks, FLOPs over the pairs attended") {
  const AttentionShape shape{.d_model = 32, .n_heads = 4, .n_kv_heads = 2, .d_head = 8};
  const CostQuery query{.shape = shape, .context = 10, .kv_bytes_per_element = 2};
  const Cost c = SlidingWindow<>(3, 2).cost(query);
  // KV: k and v · 2 kv heads · d_head 8 · min(3 + 2, 10) tokens · 2 bytes.
  CHECK(c.kv_bytes == 2 * 2 * 8 * 5 * 2);
  // Window: queries 0, 1 see 1 and 2 keys, queries 2..9 see 3: 27 pairs. Sinks 0 and 1 lie left
  // of the window for query 3 (key 0 only) and queries 4..9 (both): 13 pairs. 40 pairs at
  // 4·n_heads·d_head = 128 FLOPs each.
  CHECK(c.flops == 40 * 4 * 4 * 8);
  CHECK(c.softmax_layers == 0);

  // A window of at least T: the KV cache and FLOPs of Softmax.
  const Cost covering = SlidingWindow<>(10, 3).cost(query), full = Softmax{}.cost(query);
  CHECK(covering.kv_bytes == full.kv_bytes);
  CHECK(covering.flops == full.flops);
  CHECK(covering.softmax_layers == 0);

  // FLOPs count exactly the pairs the mask admits.
  Rng rng = test::rng_for("sliding window cost");
  for (int trial = 0; trial < 20; ++trial) {
    const auto length = index_t(rng.below(300)), window = index_t(1 + rng.below(100)), sinks = index_t(rng.below(8));
    double pairs = 0;
    for (index_t i = 0; i < length; ++i)
      for (index_t j = 0; j <= i; ++j) pairs += (i - j < window || j < sinks) ? 1 : 0;
    const CostQuery at_length{.shape = shape, .context = length, .kv_bytes_per_element = 2};
    CHECK(SlidingWindow<>(window, sinks).cost(at_length).flops == pairs * 4 * 4 * 8);
  }
}

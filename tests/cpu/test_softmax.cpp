#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <ostream>
#include <vector>

#include "dash/ops/operator.hpp"
#include "dash/ops/softmax.hpp"
#include "reference/softmax_loops.hpp"
#include "support/attention_case.hpp"
#include "support/compare.hpp"
#include "support/random.hpp"

using namespace dash;
using namespace dash::test::attention;

static_assert(TeacherProjectionOperator<Softmax, float> && TeacherProjectionOperator<Softmax, double>);
static_assert(check_operator<Softmax>());


TEST_CASE("Softmax gradients match central finite differences in float64") {
  Rng rng = test::rng_for("softmax finite differences");
  double worst = 0;
  std::size_t case_index = 0;
  for (index_t length : lengths(rng))
    for (index_t group : head_groups) {
      const Layout s = gradient_check_layout(length, group, head_dims[case_index++ % head_dims.size()], rng);
      INFO(s);
      const double error = finite_difference_error(Softmax{}, s, rng);
      CHECK(error <= 1e-6);
      worst = std::max(worst, error);
    }
  MESSAGE("largest finite-difference error: ", worst);
}

TEST_CASE("Softmax forward equals the plain-loop reference") {
  Rng rng = test::rng_for("softmax reference");
  double worst64 = 0, worst32 = 0;
  for (index_t length : lengths(rng))
    for (index_t group : head_groups)
      for (index_t d_head : head_dims) {
        const Layout s = random_layout(length, group, d_head, rng);
        INFO(s);
        const Inputs<double> x64 = random_inputs<double>(s, rng);
        const double e64 = test::relative_difference(run_forward(Softmax{}, x64),
                                                     reference::softmax_attention_loops(x64.q, x64.k, x64.v));
        // float32 against the reference on the same rounded inputs: what remains is the
        // kernel's float32 rounding, a few units of 2^-24 (6e-8) per dot product and per
        // softmax term, some 1e-7 of the output's scale at these lengths.
        const Inputs<float> x32 = random_inputs<float>(s, rng);
        const double e32 = test::relative_difference(run_forward(Softmax{}, x32),
                                                     reference::softmax_attention_loops(x32.q, x32.k, x32.v));
        CHECK(e64 <= 1e-12);
        CHECK(e32 <= 1e-5);
        worst64 = std::max(worst64, e64), worst32 = std::max(worst32, e32);
      }
  MESSAGE("largest difference from the reference: float64 ", worst64, ", float32 ", worst32);
}

TEST_CASE("Softmax float32 gradients agree with float64 to float32 rounding") {
  Rng rng = test::rng_for("softmax float32 gradients");
  double worst = 0;
  for (index_t length : {index_t(65), index_t(130)}) {
    const Layout s = random_layout(length, 2, 16, rng);
    INFO(s);
    const Inputs<double> x64 = random_inputs<double>(s, rng);
    const Inputs<float> x32{cast<float, double>(x64.q), cast<float, double>(x64.k), cast<float, double>(x64.v)};
    const Tensor<double> w64 = test::random_tensor<double>(x64.q.shape(), rng);
    const Tensor<float> w32 = cast<float, double>(w64);
    // Both start from zero: subtracting a float32 start would add rounding of its own.
    const Gradients<double> g64 = run_backward(Softmax{}, x64, w64, rng, 0.0);
    const Gradients<float> g32 = run_backward(Softmax{}, x32, w32, rng, 0.0);
    // Rounding the inputs to float32 (relative 6e-8) and the kernel's float32 arithmetic move
    // the gradients by some 1e-7 of their scale.
    const double eq = test::relative_difference(g32.dq, g64.dq), ek = test::relative_difference(g32.dk, g64.dk),
                 ev = test::relative_difference(g32.dv, g64.dv);
    CHECK(eq <= 1e-5);
    CHECK(ek <= 1e-5);
    CHECK(ev <= 1e-5);
    worst = std::max({worst, eq, ek, ev});
  }
  MESSAGE("largest float32 gradient difference: ", worst);
}

TEST_CASE("Softmax with GQA equals MHA on repeated k/v heads; kv gradients sum over the group") {
  Rng rng = test::rng_for("softmax gqa");
  double worst = 0;
  for (index_t length : lengths(rng))
    for (index_t group : {index_t(2), index_t(4)}) {
      const Layout s = random_layout(length, group, head_dims[rng.below(head_dims.size())], rng);
      INFO(s);
      const Inputs<double> gqa = random_inputs<double>(s, rng);
      const Inputs<double> mha{gqa.q, repeat_heads(gqa.k, group), repeat_heads(gqa.v, group)};
      const Tensor<double> w = test::random_tensor<double>(gqa.q.shape(), rng);
      const Gradients<double> g = run_backward(Softmax{}, gqa, w, rng), m = run_backward(Softmax{}, mha, w, rng);
      const double errors[] = {test::relative_difference(run_forward(Softmax{}, gqa), run_forward(Softmax{}, mha)),
                               test::relative_difference(g.dq, m.dq),
                               test::relative_difference(g.dk, sum_groups(m.dk, group)),
                               test::relative_difference(g.dv, sum_groups(m.dv, group))};
      for (double e : errors) CHECK(e <= 1e-10);
      worst = std::max(worst, *std::max_element(std::begin(errors), std::end(errors)));
    }
  MESSAGE("largest GQA/MHA difference: ", worst);
}

TEST_CASE("Softmax rejects bad input with a dash::Error naming the parameter") {
  Rng rng = test::rng_for("softmax bad input");
  const Softmax op;
  Inputs<double> x = random_inputs<double>(Layout{2, 5, 4, 2, 8}, rng);
  Tensor<double> out(x.q.shape());
  Softmax::Saved<double> saved;
  REQUIRE_NOTHROW(op.forward(x.q, x.k, x.v, out, saved));

  const Tensor<double> flat_q(Shape{2, 5, 32}, 0.0), short_k(Shape{2, 4, 2, 8}, 0.0), wide_v(Shape{2, 5, 2, 16}, 0.0);
  const Tensor<double> three_kv_heads(Shape{2, 5, 3, 8}, 0.0);
  Tensor<double> small_out(Shape{2, 5, 2, 8}), small_dq(Shape{2, 5, 2, 8}), big_dkv(Shape{2, 5, 4, 8});
  CHECK_THROWS_WITH_AS(op.forward(flat_q, x.k, x.v, out, saved), doctest::Contains("q: rank 3"), Error);
  CHECK_THROWS_WITH_AS(op.forward(x.q, short_k, x.v, out, saved), doctest::Contains("k: shape"), Error);
  CHECK_THROWS_WITH_AS(op.forward(x.q, x.k, wide_v, out, saved), doctest::Contains("v: shape"), Error);
  CHECK_THROWS_WITH_AS(op.forward(x.q, x.k, x.v, small_out, saved), doctest::Contains("out: shape"), Error);
  CHECK_THROWS_WITH_AS(op.forward(x.q, three_kv_heads, three_kv_heads, out, saved),
                       doctest::Contains("n_heads = 4 is not a multiple of n_kv_heads = 3"), Error);

  const Tensor<double> empty_q(Shape{2, 0, 4, 8}), empty_kv(Shape{2, 0, 2, 8});
  Tensor<double> empty_out(Shape{2, 0, 4, 8});
  CHECK_THROWS_WITH_AS(op.forward(empty_q, empty_kv, empty_kv, empty_out, saved),
                       doctest::Contains("sequence length T = 0"), Error);

  Tensor<double> dq(x.q.shape(), 0.0), dk(x.k.shape(), 0.0), dv(x.v.shape(), 0.0);
  const Tensor<double> d_out = test::random_tensor<double>(x.q.shape(), rng);
  REQUIRE_NOTHROW(op.backward(x.q, x.k, x.v, out, saved, d_out, dq, dk, dv));
  CHECK_THROWS_WITH_AS(op.backward(x.q, x.k, x.v, small_out, saved, d_out, dq, dk, dv),
                       doctest::Contains("out: shape"), Error);
  CHECK_THROWS_WITH_AS(op.backward(x.q, x.k, x.v, out, saved, small_out, dq, dk, dv),
                       doctest::Contains("d_out: shape"), Error);
  CHECK_THROWS_WITH_AS(op.backward(x.q, x.k, x.v, out, saved, d_out, small_dq, dk, dv),
                       doctest::Contains("dq: shape"), Error);
  CHECK_THROWS_WITH_AS(op.backward(x.q, x.k, x.v, out, saved, d_out, dq, big_dkv, dv),
                       doctest::Contains("dk: shape"), Error);
  CHECK_THROWS_WITH_AS(op.backward(x.q, x.k, x.v, out, saved, d_out, dq, dk, big_dkv),
                       doctest::Contains("dv: shape"), Error);
  CHECK_THROWS_WITH_AS(op.backward(x.q, x.k, x.v, out, Softmax::Saved<double>{}, d_out, dq, dk, dv),
                       doctest::Contains("saved.lse"), Error);

  x.q(1, 3, 2, 5) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH_AS(op.forward(x.q, x.k, x.v, out, saved), doctest::Contains("q: element"), Error);
  x.q(1, 3, 2, 5) = 0;
  x.k(0, 4, 1, 0) = std::numeric_limits<double>::infinity();
  CHECK_THROWS_WITH_AS(op.forward(x.q, x.k, x.v, out, saved), doctest::Contains("k: element"), Error);
  x.k(0, 4, 1, 0) = 0;
  x.v(1, 0, 0, 7) = -std::numeric_limits<double>::infinity();
  CHECK_THROWS_WITH_AS(op.forward(x.q, x.k, x.v, out, saved), doctest::Contains("v: element"), Error);
}

TEST_CASE("Softmax cost: KV cache of every token, FLOPs over the causal triangle, one softmax layer") {
  const AttentionShape shape{.d_model = 32, .n_heads = 4, .n_kv_heads = 2, .d_head = 8};
  const Cost c = Softmax{}.cost(CostQuery{.shape = shape, .context = 10, .kv_bytes_per_element = 2});
  // k and v · 2 kv heads · d_head 8 · 10 tokens · 2 bytes.
  CHECK(c.kv_bytes == 2 * 2 * 8 * 10 * 2);
  // 10·11/2 = 55 (query, key) pairs at 4·n_heads·d_head = 128 FLOPs each.
  CHECK(c.flops == 55 * 4 * 4 * 8);
  CHECK(c.softmax_layers == 1);
  CHECK_THROWS_WITH_AS(Softmax{}.cost(CostQuery{.shape = shape, .context = -1}), doctest::Contains("context"), Error);
}

#include <doctest/doctest.h>

#include "dash/ops/projections.hpp"
#include "support/compare.hpp"
#include "support/random.hpp"

using namespace dash;

TEST_CASE("project_qkv / project_out gradients match central differences in float64") {
  Rng rng = test::rng_for("projections fd");
  for (bool bias : {false, true}) {
    const AttentionShape s{.d_model = 12, .n_heads = 4, .n_kv_heads = 2, .d_head = 4, .qkv_bias = bias};
    const index_t B = 2, T = 5;
    AttentionWeights<double> w = AttentionWeights<double>::random(s, rng);
    Tensor<double> h = test::random_tensor<double>(Shape{B, T, s.d_model}, rng);
    Tensor<double> q(Shape{B, T, s.n_heads, s.d_head}), k(Shape{B, T, s.n_kv_heads, s.d_head}), v = k;
    const Tensor<double> wq = test::random_tensor<double>(q.shape(), rng);
    const Tensor<double> wk = test::random_tensor<double>(k.shape(), rng);
    const Tensor<double> wv = test::random_tensor<double>(v.shape(), rng);
    const Tensor<double> wy = test::random_tensor<double>(Shape{B, T, s.d_model}, rng);
    // loss = <wq, q> + <wk, k> + <wv, v> + <wy, project_out(q)>
    const auto loss = [&] {
      project_qkv<double>(s, w, h, q, k, v);
      Tensor<double> y(Shape{B, T, s.d_model});
      project_out<double>(s, w, q, y);
      return test::weighted_sum(q, wq) + test::weighted_sum(k, wk) + test::weighted_sum(v, wv) +
             test::weighted_sum(y, wy);
    };
    loss();
    Tensor<double> dq = wq, dh(h.shape(), 0.0);
    AttentionWeights<double> grads = AttentionWeights<double>::zeros(s);
    project_out_backward<double>(w, q, wy, dq, &grads);
    project_qkv_backward<double>(w, h, dq, wk, wv, dh, &grads);
    CHECK(test::finite_difference_error(h.view(), dh.view(), loss, rng) <= 1e-6);
    w.for_each([&](const char* name, Tensor<double>& param) {
      Tensor<double>* g = nullptr;
      grads.for_each([&](const char* gname, Tensor<double>& gp) {
        if (std::string_view(gname) == name) g = &gp;
      });
      INFO("parameter ", name);
      CHECK(test::finite_difference_error(param.view(), g->view(), loss, rng) <= 1e-6);
    });
  }
}

TEST_CASE("repeat_kv_heads gives k/v heads that equal the teacher's repeated heads") {
  Rng rng = test::rng_for("repeat kv");
  const AttentionShape s{.d_model = 8, .n_heads = 4, .n_kv_heads = 2, .d_head = 2, .qkv_bias = true};
  const AttentionWeights<double> w = AttentionWeights<double>::random(s, rng);
  AttentionShape wide = s;
  wide.n_kv_heads = 4;
  const AttentionWeights<double> r = repeat_kv_heads(s, w, 4);
  const Tensor<double> h = test::random_tensor<double>(Shape{1, 3, 8}, rng);
  Tensor<double> q(Shape{1, 3, 4, 2}), k(Shape{1, 3, 2, 2}), v = k, k4(Shape{1, 3, 4, 2}), v4 = k4;
  project_qkv<double>(s, w, h, q, k, v);
  project_qkv<double>(wide, r, h, q, k4, v4);
  for (index_t t = 0; t < 3; ++t)
    for (index_t j = 0; j < 4; ++j)
      for (index_t d = 0; d < 2; ++d) {
        CHECK(std::abs(k4(0, t, j, d) - k(0, t, j / 2, d)) < 1e-14);
        CHECK(std::abs(v4(0, t, j, d) - v(0, t, j / 2, d)) < 1e-14);
      }
  CHECK_THROWS_WITH_AS(repeat_kv_heads(s, w, 3), doctest::Contains("n_kv_heads"), Error);
}

#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <string>

#include "dash/mixed_attention.hpp"
#include "dash/ops/gated_delta_net.hpp"
#include "dash/ops/gated_linear.hpp"
#include "dash/ops/sliding_window.hpp"
#include "dash/ops/softmax.hpp"
#include "support/compare.hpp"
#include "support/random.hpp"

using namespace dash;

namespace {

using AllOps = BasicMixedAttention<double, Softmax, SlidingWindow<>, GatedLinear, GatedDeltaNet>;

AllOps make_layer(const AttentionShape& s, Rng& rng, index_t window) {
  GatedLinear gla;
  gla.chunk = 1 + index_t(rng.below(8));  // chunk sizes that do not divide T
  GatedDeltaNet gdn;
  gdn.chunk = 1 + index_t(rng.below(8));
  AllOps layer(s, AttentionWeights<double>::random(s, rng), rng, Softmax{}, SlidingWindow<>(window), gla, gdn);
  AllOps::Weights logits;
  for (auto& a : logits) a = rng.normal();
  layer.set_logits(logits);
  layer.set_temperature(rng.uniform(0.5, 2.0));
  return layer;
}

AttentionShape random_shape(Rng& rng, bool bias) {
  const int kv = 1 + int(rng.below(2));
  const int group = 1 + int(rng.below(2));
  const auto style = rng.below(2) ? RopeConfig::Style::half : RopeConfig::Style::interleaved;
  return AttentionShape{.d_model = 8 + 4 * int(rng.below(3)), .n_heads = kv * group, .n_kv_heads = kv,
                        .d_head = 4, .qkv_bias = bias, .rope = {style, 100.0}};
}

Tensor<double>* find(AllOps::Gradients& g, std::size_t op, std::string_view name) {
  Tensor<double>* hit = nullptr;
  const auto look = [&](auto& params) {
    params.for_each([&](const char* n, Tensor<double>& t) {
      if (n == name) hit = &t;
    });
  };
  if (op == 2) look(std::get<2>(g.params));
  if (op == 3) look(std::get<3>(g.params));
  return hit;
}

}  // namespace

TEST_CASE("MixedAttention gradients (input, logits, every op's parameters, the teacher's) match central differences") {
  Rng rng = test::rng_for("mixed fd");
  for (index_t T : {1, 7, 63, 65, 130}) {
    const AttentionShape s = random_shape(rng, T % 2 == 1);
    AllOps layer = make_layer(s, rng, 1 + index_t(rng.below(T + 4)));
    const index_t B = 1 + index_t(rng.below(2));
    Tensor<double> h = test::random_tensor<double>(Shape{B, T, s.d_model}, rng);
    const Tensor<double> w = test::random_tensor<double>(h.shape(), rng);
    CAPTURE(T);
    CAPTURE(s.n_heads);
    CAPTURE(s.n_kv_heads);
    // The layer's parameters are perturbed in place through these references.
    AttentionWeights<double>& teacher = const_cast<AttentionWeights<double>&>(layer.teacher());
    const auto loss = [&] {
      AllOps::Cache cache;
      Tensor<double> y(h.shape());
      layer.forward(h.view(), y.view(), cache);
      return test::weighted_sum(y.view(), w.view());
    };
    AllOps::Cache cache;
    Tensor<double> y(h.shape()), dh(h.shape(), 0.0);
    test::poison(y.view());
    layer.forward(h.view(), y.view(), cache);
    auto grads = layer.zero_gradients(/*with_teacher=*/true);
    layer.backward(h.view(), cache, w.view(), dh.view(), grads);

    const index_t entries = T > 64 ? 24 : 60;
    CHECK(test::finite_difference_error(h.view(), dh.view(), loss, rng, entries) <= 1e-6);

    Tensor<double> logits(Shape{index_t(AllOps::n_ops)}), dlogits(logits.shape());
    for (std::size_t i = 0; i < AllOps::n_ops; ++i) logits(i) = layer.logits()[i], dlogits(i) = grads.logits[i];
    const auto logit_loss = [&] {
      AllOps::Weights a;
      for (std::size_t i = 0; i < AllOps::n_ops; ++i) a[i] = logits(i);
      layer.set_logits(a);
      return loss();
    };
    CHECK(test::finite_difference_error(logits.view(), dlogits.view(), logit_loss, rng) <= 1e-6);
    logit_loss();  // the layer keeps the last logits it was given: give it the unperturbed ones

    teacher.for_each([&](const char* name, Tensor<double>& param) {
      Tensor<double>* g = nullptr;
      grads.teacher->for_each([&](const char* n, Tensor<double>& t) {
        if (std::string_view(n) == name) g = &t;
      });
      INFO("teacher ", std::string(name));
      CHECK(test::finite_difference_error(param.view(), g->view(), loss, rng, entries) <= 1e-6);
    });
    std::get<2>(layer.params()).for_each([&](const char* name, Tensor<double>& param) {
      INFO("gla ", std::string(name));
      CHECK(test::finite_difference_error(param.view(), find(grads, 2, name)->view(), loss, rng, entries) <= 1e-6);
    });
    std::get<3>(layer.params()).for_each([&](const char* name, Tensor<double>& param) {
      INFO("gdn ", std::string(name));
      CHECK(test::finite_difference_error(param.view(), find(grads, 3, name)->view(), loss, rng, entries) <= 1e-6);
    });
  }
}

TEST_CASE("dL/dπ of a forward with caller-given weights matches central differences") {
  Rng rng = test::rng_for("mixed weights fd");
  const AttentionShape s = random_shape(rng, false);
  AllOps layer = make_layer(s, rng, 3);
  const index_t T = 1 + index_t(rng.below(40));
  const Tensor<double> h = test::random_tensor<double>(Shape{2, T, s.d_model}, rng);
  const Tensor<double> w = test::random_tensor<double>(h.shape(), rng);
  Tensor<double> pi = test::random_tensor<double>(Shape{index_t(AllOps::n_ops)}, rng);
  const auto weights = [&] {
    AllOps::Weights p;
    for (std::size_t i = 0; i < AllOps::n_ops; ++i) p[i] = pi(i);
    return p;
  };
  const auto loss = [&] {
    AllOps::Cache cache;
    Tensor<double> y(h.shape());
    layer.forward(h.view(), y.view(), cache, weights());
    return test::weighted_sum(y.view(), w.view());
  };
  AllOps::Cache cache;
  Tensor<double> y(h.shape()), dh(h.shape(), 0.0);
  layer.forward(h.view(), y.view(), cache, weights());
  auto grads = layer.zero_gradients();
  layer.backward(h.view(), cache, w.view(), dh.view(), grads);
  Tensor<double> dpi(pi.shape());
  for (std::size_t i = 0; i < AllOps::n_ops; ++i) dpi(i) = grads.weights[i];
  CHECK(test::finite_difference_error(pi.view(), dpi.view(), loss, rng) <= 1e-6);
  // The caller chose π, so there is no dL/dα to report.
  for (double g : grads.logits) CHECK(g == 0.0);
}

TEST_CASE("A one-hot mixture equals that operator alone, forward and backward") {
  Rng rng = test::rng_for("mixed one-hot");
  const AttentionShape s = random_shape(rng, true);
  AllOps layer = make_layer(s, rng, 5);
  const index_t B = 2, T = 1 + index_t(rng.below(70));
  const Tensor<double> h = test::random_tensor<double>(Shape{B, T, s.d_model}, rng);
  const Tensor<double> dy = test::random_tensor<double>(h.shape(), rng);
  const Shape heads{B, T, s.n_heads, s.d_head}, kv{B, T, s.n_kv_heads, s.d_head};

  // A teacher-projection op alone: project, rotate, mix, project out; backward through the same.
  const auto shared_alone = [&](const auto& op, Tensor<double>& y, Tensor<double>& dh) {
    Tensor<double> q(heads), k(kv), v(kv), a(heads), dq(heads, 0.0), dk(kv, 0.0), dv(kv, 0.0), da(heads, 0.0);
    project_qkv<double>(s, layer.teacher(), h.view(), q.view(), k.view(), v.view());
    const RopeTable rope(s.rope, s.d_head, 0, T);
    rope.apply(q.view()), rope.apply(k.view());
    typename std::decay_t<decltype(op)>::template Saved<double> saved;
    op.forward(q.view(), k.view(), v.view(), a.view(), saved);
    project_out<double>(s, layer.teacher(), a.view(), y.view());
    project_out_backward<double>(layer.teacher(), a.view(), dy.view(), da.view());
    op.backward(q.view(), k.view(), v.view(), a.view(), saved, da.view(), dq.view(), dk.view(), dv.view());
    rope.apply(dq.view(), true), rope.apply(dk.view(), true);
    project_qkv_backward<double>(layer.teacher(), h.view(), dq.view(), dk.view(), dv.view(), dh.view());
  };
  const auto own_alone = [&](const auto& op, const auto& params, Tensor<double>& y, Tensor<double>& dh) {
    typename std::decay_t<decltype(op)>::template Saved<double> saved;
    op.forward(s, params, h.view(), y.view(), saved);
    auto grads = params;
    grads.for_each([](const char*, Tensor<double>& t) { t.fill(0.0); });
    op.backward(s, params, h.view(), saved, dy.view(), dh.view(), grads);
  };

  for (std::size_t chosen = 0; chosen < AllOps::n_ops; ++chosen) {
    CAPTURE(chosen);
    Tensor<double> y_alone(h.shape()), dh_alone(h.shape(), 0.0);
    if (chosen == 0) shared_alone(std::get<0>(layer.ops()), y_alone, dh_alone);
    if (chosen == 1) shared_alone(std::get<1>(layer.ops()), y_alone, dh_alone);
    if (chosen == 2) own_alone(std::get<2>(layer.ops()), std::get<2>(layer.params()), y_alone, dh_alone);
    if (chosen == 3) own_alone(std::get<3>(layer.ops()), std::get<3>(layer.params()), y_alone, dh_alone);
    for (bool skip : {false, true}) {
      AllOps::Weights one_hot{};
      one_hot[chosen] = 1.0;
      AllOps::Cache cache;
      Tensor<double> y(h.shape()), dh(h.shape(), 0.0);
      test::poison(y.view());
      layer.forward(h.view(), y.view(), cache, one_hot, skip ? AllOps::nonzero(one_hot) : AllOps::all_ops());
      auto grads = layer.zero_gradients();
      layer.backward(h.view(), cache, dy.view(), dh.view(), grads);
      CHECK(test::relative_difference(y, y_alone) <= 1e-10);
      CHECK(test::relative_difference(dh, dh_alone) <= 1e-10);
    }
  }
}

TEST_CASE("Skipping zero-weight operators changes neither the output nor dL/dα") {
  Rng rng = test::rng_for("mixed skip");
  const AttentionShape s = random_shape(rng, false);
  AllOps layer = make_layer(s, rng, 4);
  const Tensor<double> h = test::random_tensor<double>(Shape{1, 20, s.d_model}, rng);
  const Tensor<double> dy = test::random_tensor<double>(h.shape(), rng);
  const AllOps::Weights pi{0.25, 0.0, 0.75, 0.0};
  Tensor<double> y_all(h.shape()), y_skip(h.shape()), dh_all(h.shape(), 0.0), dh_skip(h.shape(), 0.0);
  AllOps::Cache all, skip;
  layer.forward(h.view(), y_all.view(), all, pi);
  layer.forward(h.view(), y_skip.view(), skip, pi, AllOps::nonzero(pi));
  CHECK(test::relative_difference(y_skip, y_all) <= 1e-13);
  auto g_all = layer.zero_gradients(), g_skip = layer.zero_gradients();
  layer.backward(h.view(), all, dy.view(), dh_all.view(), g_all);
  layer.backward(h.view(), skip, dy.view(), dh_skip.view(), g_skip);
  CHECK(test::relative_difference(dh_skip, dh_all) <= 1e-13);
  CHECK(g_skip.weights[1] == 0.0);
  CHECK(g_all.weights[1] != 0.0);
  AllOps::OpMask without_first = AllOps::all_ops();
  without_first[0] = false;  // weight 0.25: leaving it out would silently change y
  CHECK_THROWS_AS(layer.forward(h.view(), y_skip.view(), skip, pi, without_first), Error);
}

TEST_CASE("float32 layer agrees with the float64 layer") {
  Rng rng = test::rng_for("mixed f32");
  const AttentionShape s{.d_model = 32, .n_heads = 4, .n_kv_heads = 2, .d_head = 8};
  Rng same_a(7), same_b(7);
  const AttentionWeights<double> w64 = AttentionWeights<double>::random(s, rng);
  AttentionWeights<float> w32;
  w32.wq = cast<float, double>(w64.wq.view()), w32.wk = cast<float, double>(w64.wk.view());
  w32.wv = cast<float, double>(w64.wv.view()), w32.wo = cast<float, double>(w64.wo.view());
  BasicMixedAttention<double, Softmax, SlidingWindow<8>, GatedLinear, GatedDeltaNet> l64(s, w64, same_a);
  MixedAttention<Softmax, SlidingWindow<8>, GatedLinear, GatedDeltaNet> l32(s, w32, same_b);
  // Initialisation draws the same numbers in both precisions; give both the float32-rounded ones.
  std::get<2>(l32.params()).for_each([&](const char* n, Tensor<float>& t32) {
    std::get<2>(l64.params()).for_each([&](const char* m, Tensor<double>& t64) {
      if (std::string_view(n) == m) t64 = cast<double, float>(t32.view());
    });
  });
  std::get<3>(l32.params()).for_each([&](const char* n, Tensor<float>& t32) {
    std::get<3>(l64.params()).for_each([&](const char* m, Tensor<double>& t64) {
      if (std::string_view(n) == m) t64 = cast<double, float>(t32.view());
    });
  });
  l32.set_logits({0.3f, -0.2f, 0.1f, 0.4f});
  l64.set_logits({0.3, -0.2, 0.1, 0.4});
  const Tensor<float> h32 = test::random_tensor<float>(Shape{2, 100, s.d_model}, rng);
  const Tensor<double> h64 = cast<double, float>(h32.view());
  Tensor<float> y32(h32.shape());
  Tensor<double> y64(h64.shape());
  decltype(l32)::Cache c32;
  decltype(l64)::Cache c64;
  l32.forward(h32.view(), y32.view(), c32);
  l64.forward(h64.view(), y64.view(), c64);
  // float32 rounding (2^-24 ≈ 6e-8) accumulated over sums of a few hundred terms.
  CHECK(test::relative_difference(y32, y64) <= 1e-5);
}

TEST_CASE("MixedAttention rejects bad input with dash::Error naming it") {
  Rng rng = test::rng_for("mixed errors");
  const AttentionShape s{.d_model = 8, .n_heads = 2, .n_kv_heads = 1, .d_head = 4};
  AllOps layer = make_layer(s, rng, 4);
  AllOps::Cache cache;
  Tensor<double> h(Shape{1, 5, 8}, 0.5), y(h.shape());
  Tensor<double> wrong(Shape{1, 5, 9}, 0.5), empty(Shape{1, 0, 8});
  CHECK_THROWS_WITH_AS(layer.forward(wrong.view(), y.view(), cache), doctest::Contains("h: shape"), Error);
  CHECK_THROWS_WITH_AS(layer.forward(empty.view(), y.view(), cache), doctest::Contains("T = 0"), Error);
  h(0, 2, 3) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH_AS(layer.forward(h.view(), y.view(), cache), doctest::Contains("h: element"), Error);
  CHECK_THROWS_WITH_AS(layer.set_temperature(0.0), doctest::Contains("temperature"), Error);
  CHECK_THROWS_WITH_AS(layer.set_logits({0.0, INFINITY, 0.0, 0.0}), doctest::Contains("logit 1 (swa)"), Error);
  h(0, 2, 3) = 0.5;
  CHECK_THROWS_WITH_AS(layer.forward(h.view(), y.view(), cache, {0.5, NAN, 0.5, 0.0}),
                       doctest::Contains("weight 1 (swa)"), Error);
  AttentionWeights<double> bad = AttentionWeights<double>::random(s, rng);
  bad.wo = Tensor<double>(Shape{8, 7});
  CHECK_THROWS_WITH_AS(AllOps(s, bad, rng, Softmax{}, SlidingWindow<>(4), GatedLinear{}, GatedDeltaNet{}),
                       doctest::Contains("AttentionWeights.wo"), Error);
  AttentionShape odd = s;
  odd.n_heads = 3, odd.n_kv_heads = 2;
  CHECK_THROWS_WITH_AS(AllOps(odd, AttentionWeights<double>::random(s, rng), rng, Softmax{}, SlidingWindow<>(4),
                              GatedLinear{}, GatedDeltaNet{}),
                       doctest::Contains("not a multiple of n_kv_heads"), Error);
}

TEST_CASE("π is softmax(α/τ) and the costs are each operator's") {
  Rng rng = test::rng_for("mixed weights");
  const AttentionShape s{.d_model = 16, .n_heads = 4, .n_kv_heads = 2, .d_head = 4};
  AllOps layer = make_layer(s, rng, 64);
  layer.set_logits({1.0, 2.0, 3.0, 4.0});
  layer.set_temperature(0.5);
  const auto pi = layer.weights();
  double z = 0;
  for (int i = 0; i < 4; ++i) z += std::exp((i + 1) / 0.5);
  for (int i = 0; i < 4; ++i) CHECK(std::abs(pi[i] - std::exp((i + 1) / 0.5) / z) < 1e-15);
  const CostQuery query{.shape = s, .context = 1000};
  const auto costs = layer.costs(query);
  CHECK(costs[0].kv_bytes == 2.0 * 2 * 4 * 1000 * 2);  // 2 (k and v) · n_kv · d_head · T · bf16
  CHECK(costs[1].kv_bytes == 2.0 * 2 * 4 * 64 * 2);    // a window of 64
  CHECK(costs[0].softmax_layers == 1);
  CHECK(costs[2].softmax_layers == 0);
  CHECK(costs[2].kv_bytes < costs[1].kv_bytes);
}

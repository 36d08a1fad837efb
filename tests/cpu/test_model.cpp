#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "dash/io/checkpoint.hpp"
#include "dash/mixed_attention.hpp"
#include "dash/model/decoder.hpp"
#include "dash/model/loss.hpp"
#include "dash/ops/gated_linear.hpp"
#include "dash/ops/sliding_window.hpp"
#include "dash/ops/softmax.hpp"
#include "reference/llama_loops.hpp"
#include "support/compare.hpp"
#include "support/random.hpp"
#include "support/random_model.hpp"

using namespace dash;
using test::make_decoder;
using test::random_config;
using test::random_ids;

TEST_CASE("the decoder's logits equal a plain-loop Llama (GQA, both RoPE styles, bias, tied and separate heads)") {
  Rng rng = test::rng_for("decoder logits");
  for (int trial = 0; trial < 6; ++trial) {
    const model::Config c = random_config(rng);
    const model::Weights<double> w = model::Weights<double>::random(c, rng);
    const index_t B = 1 + index_t(rng.below(2)), T = 1 + index_t(rng.below(40));
    const std::vector<int> ids = random_ids(rng, B * T, c.vocab_size);
    const auto expected = reference::llama_logits_loops(c, w, ids, B, T);
    const auto decoder = make_decoder<double>(c, w, rng, Softmax{});
    decltype(decoder)::Activations act;
    decoder.forward({ids, B, T}, act);
    Tensor<double> z(Shape{B, T, c.vocab_size});
    test::poison(z.view());
    model::logits<double>(w.head().view(), act.hidden.view(), z.view());
    const Tensor<double> want = [&] {
      Tensor<double> t(z.shape());
      std::copy(expected.begin(), expected.end(), t.data());
      return t;
    }();
    CAPTURE(trial);
    CHECK(test::relative_difference(z, want) <= 1e-12);
  }
}

TEST_CASE("NLL and KL equal their definitions; KL(p ‖ p) = 0") {
  Rng rng = test::rng_for("losses");
  const index_t V = 37, d = 6, n = 2 + index_t(rng.below(30));  // position 0 is not counted: n − 1 ≥ 1
  const Tensor<double> head = test::random_tensor<double>(Shape{V, d}, rng);
  const Tensor<double> ht = test::random_tensor<double>(Shape{1, n, d}, rng);
  const Tensor<double> hs = test::random_tensor<double>(Shape{1, n, d}, rng);
  std::vector<int> targets = random_ids(rng, n, int(V));
  targets[0] = -1;  // not counted
  double nll = 0, kl = 0;
  for (index_t i = 0; i < n; ++i) {
    std::vector<double> zt(static_cast<std::size_t>(V)), zs(static_cast<std::size_t>(V));
    double st = 0, ss = 0;
    for (index_t v = 0; v < V; ++v) {
      for (index_t j = 0; j < d; ++j) zt[v] += head(v, j) * ht(0, i, j), zs[v] += head(v, j) * hs(0, i, j);
      st += std::exp(zt[v]), ss += std::exp(zs[v]);
    }
    if (targets[std::size_t(i)] >= 0) nll += std::log(ss) - zs[std::size_t(targets[std::size_t(i)])];
    for (index_t v = 0; v < V; ++v) {
      const double p = std::exp(zt[v]) / st, q = std::exp(zs[v]) / ss;
      kl += p * (std::log(p) - std::log(q));
    }
  }
  const auto got_nll = model::nll_loss<double>(head.view(), hs.view(), targets);
  CHECK(got_nll.count == n - 1);
  CHECK(std::abs(got_nll.mean() - nll / double(n - 1)) <= 1e-12 * std::abs(nll));
  const auto got_kl = model::kl_loss<double>(head.view(), ht.view(), hs.view());
  CHECK(std::abs(got_kl.mean() - kl / double(n)) <= 1e-12 * std::max(1.0, kl));
  CHECK(std::abs(model::kl_loss<double>(head.view(), hs.view(), hs.view()).mean()) <= 1e-14);
}

TEST_CASE("loss gradients at the hidden states match central differences") {
  Rng rng = test::rng_for("loss gradients");
  const index_t V = 29, d = 5, n = 1 + index_t(rng.below(20));
  const Tensor<double> head = test::random_tensor<double>(Shape{V, d}, rng);
  const Tensor<double> ht = test::random_tensor<double>(Shape{1, n, d}, rng);
  Tensor<double> hs = test::random_tensor<double>(Shape{1, n, d}, rng);
  const std::vector<int> targets = random_ids(rng, n, int(V));
  Tensor<double> d_nll(hs.shape(), 0.0), d_kl(hs.shape(), 0.0);
  model::nll_loss<double>(head.view(), hs.view(), targets, d_nll.view());
  model::kl_loss<double>(head.view(), ht.view(), hs.view(), d_kl.view());
  CHECK(test::finite_difference_error(hs.view(), d_nll.view(),
                                      [&] { return model::nll_loss<double>(head.view(), hs.view(), targets).mean(); },
                                      rng) <= 1e-6);
  CHECK(test::finite_difference_error(hs.view(), d_kl.view(),
                                      [&] { return model::kl_loss<double>(head.view(), ht.view(), hs.view()).mean(); },
                                      rng) <= 1e-6);
}

TEST_CASE("decoder backward: KL gradients to the mixers' logits, their parameters and the layer inputs") {
  Rng rng = test::rng_for("decoder backward");
  for (int trial = 0; trial < 3; ++trial) {
    model::Config c = random_config(rng);
    c.tied_embeddings = false;  // so that perturbing the embedding moves only x₀, not the head
    const model::Weights<double> w = model::Weights<double>::random(c, rng);
    GatedLinear gla;
    gla.chunk = 1 + index_t(rng.below(5));
    auto student = make_decoder<double>(c, w, rng, Softmax{}, SlidingWindow<>(1 + index_t(rng.below(6))), gla);
    for (auto& m : student.mixers()) {
      std::array<double, 3> a{rng.normal(), rng.normal(), rng.normal()};
      m.set_logits(a);
    }
    const index_t B = 1 + index_t(rng.below(2)), T = 2 + index_t(rng.below(20));
    const std::vector<int> ids = random_ids(rng, B * T, c.vocab_size);
    // The teacher: the same model with every layer softmax.
    using Student = decltype(student);
    Student::Activations teacher;
    student.forward({ids, B, T}, teacher, Student::Architecture::discrete(std::vector<int>(std::size_t(c.n_layers), 0)));
    const auto loss = [&] {
      Student::Activations act;
      student.forward({ids, B, T}, act);
      return model::kl_loss<double>(student.weights().head().view(), teacher.hidden.view(), act.hidden.view()).mean();
    };
    Student::Activations act;
    student.forward({ids, B, T}, act);
    Tensor<double> dh(act.hidden.shape(), 0.0);
    model::kl_loss<double>(student.weights().head().view(), teacher.hidden.view(), act.hidden.view(), dh.view());
    std::vector<Tensor<double>> dx;
    auto grads = student.backward(act, dh.view(), false, &dx);
    CAPTURE(trial);
    for (int l = 0; l < c.n_layers; ++l) {
      auto& mixer = student.mixers()[std::size_t(l)];
      Tensor<double> logits(Shape{3}), dlogits(Shape{3});
      for (int i = 0; i < 3; ++i) logits(i) = mixer.logits()[std::size_t(i)], dlogits(i) = grads[std::size_t(l)].logits[std::size_t(i)];
      CHECK(test::finite_difference_error(logits.view(), dlogits.view(), [&] {
              mixer.set_logits({logits(0), logits(1), logits(2)});
              return loss();
            }, rng) <= 1e-6);
      mixer.set_logits({logits(0), logits(1), logits(2)});
      std::get<2>(mixer.params()).for_each([&](const char* name, Tensor<double>& p) {
        Tensor<double>* g = nullptr;
        std::get<2>(grads[std::size_t(l)].params).for_each([&](const char* n, Tensor<double>& t) {
          if (std::string_view(n) == name) g = &t;
        });
        INFO("gla ", name);
        CHECK(test::finite_difference_error(p.view(), g->view(), loss, rng, 16) <= 1e-6);
      });
    }
    // dL/dx₀ through the embedding rows: perturbing E[v] moves x₀ at every position holding v.
    auto& embedding = const_cast<Tensor<double>&>(student.weights().embedding);
    Tensor<double> d_embedding(embedding.shape(), 0.0);
    for (std::size_t i = 0; i < ids.size(); ++i)
      for (index_t j = 0; j < c.d_model; ++j) d_embedding(index_t(ids[i]), j) += dx[0].data()[index_t(i) * c.d_model + j];
    CHECK(test::finite_difference_error(embedding.view(), d_embedding.view(), loss, rng, 40) <= 1e-6);
  }
}

TEST_CASE("fingerprint: a function of the config and of every weight bit, in each block of a large tensor") {
  Rng rng = test::rng_for("fingerprint");
  model::Config c = test::random_config(rng);
  c.vocab_size = int((std::size_t(3) << 20) / std::size_t(c.d_model)) + int(rng.below(1000));  // embedding: 3 blocks
  const model::Weights<float> w = model::Weights<float>::random(c, rng);
  const std::string fp = io::fingerprint(c, w);
  CHECK(fp.size() == 16);
  CHECK(io::fingerprint(c, model::Weights<float>(w)) == fp);

  // One bit of one element, in a random tensor (the embedding's last block, then any tensor).
  const auto flipped = [&](bool embedding) {
    model::Weights<float> changed = w;
    std::vector<Tensor<float>*> tensors;
    changed.for_each([&](const std::string&, Tensor<float>& t) {
      if (t.numel() > 0) tensors.push_back(&t);
    });
    Tensor<float>& t = embedding ? changed.embedding : *tensors[rng.below(tensors.size())];
    const index_t at = embedding ? t.numel() - 1 - index_t(rng.below(1000)) : index_t(rng.below(std::uint64_t(t.numel())));
    t.data()[at] = std::bit_cast<float>(std::bit_cast<std::uint32_t>(t.data()[at]) ^ (1u << rng.below(32)));
    return io::fingerprint(c, changed);
  };
  for (int trial = 0; trial < 10; ++trial) {
    CHECK(flipped(true) != fp);
    CHECK(flipped(false) != fp);
  }
  model::Config other = c;
  other.rope.theta *= 2;
  CHECK(io::fingerprint(other, w) != fp);
}

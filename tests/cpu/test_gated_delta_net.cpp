#include <doctest/doctest.h>

#include <cmath>
#include <string>
#include <vector>

#include "dash/ops/gated_delta_net.hpp"
#include "reference/gated_delta_net_loops.hpp"
#include "support/compare.hpp"
#include "support/random.hpp"

using namespace dash;
using Form = GatedDeltaNet::Form;

namespace {

// Inputs of the core recurrence: q, k L2-normalised per head (as the layer gives them),
// log decays g < 0, gates β ∈ (0, 1), an initial state.
template <class T>
struct CoreInputs {
  Tensor<T> q, k, v, g, beta, s0;
  index_t chunk_count(index_t chunk) const { return (q.dim(1) + chunk - 1) / chunk; }
  Shape states_shape(index_t chunk) const {
    return Shape{q.dim(0), k.dim(2), chunk_count(chunk) + 1, k.dim(3), v.dim(3)};
  }
};

template <class T>
void normalise_rows(Tensor<T>& x) {
  const index_t D = x.dim(x.rank() - 1);
  for (index_t r = 0; r < x.numel() / D; ++r) {
    double sq = 0;
    for (index_t d = 0; d < D; ++d) sq += double(x.data()[r * D + d]) * double(x.data()[r * D + d]);
    for (index_t d = 0; d < D; ++d) x.data()[r * D + d] = T(double(x.data()[r * D + d]) / std::sqrt(sq));
  }
}

CoreInputs<double> make_core(Rng& rng, index_t B, index_t L, index_t H, index_t Hs, index_t D, index_t Dv,
                             double g_lo = -0.7, double g_hi = -0.01, bool with_s0 = true) {
  CoreInputs<double> in;
  in.q = test::random_tensor<double>(Shape{B, L, H, D}, rng);
  in.k = test::random_tensor<double>(Shape{B, L, Hs, D}, rng);
  normalise_rows(in.q), normalise_rows(in.k);
  in.v = test::random_tensor<double>(Shape{B, L, Hs, Dv}, rng);
  in.g = Tensor<double>(Shape{B, L, Hs});
  in.beta = Tensor<double>(Shape{B, L, Hs});
  fill_uniform(in.g.view(), rng, g_lo, g_hi);
  fill_uniform(in.beta.view(), rng, 0.05, 0.95);
  if (with_s0) in.s0 = test::random_tensor<double>(Shape{B, Hs, D, Dv}, rng, 0.5);
  return in;
}

template <class U>
CoreInputs<U> cast_core(const CoreInputs<double>& in) {
  const auto c = [](const Tensor<double>& t) { return t.empty() ? Tensor<U>{} : cast<U, double>(t.view()); };
  return {c(in.q), c(in.k), c(in.v), c(in.g), c(in.beta), c(in.s0)};
}

template <class T>
struct CoreOut {
  Tensor<T> out, states;
  // The state after the last token.
  Tensor<T> final_state() const {
    const index_t B = states.dim(0), Hs = states.dim(1), last = states.dim(2) - 1, D = states.dim(3),
                  Dv = states.dim(4);
    Tensor<T> f(Shape{B, Hs, D, Dv});
    for (index_t b = 0; b < B; ++b)
      for (index_t s = 0; s < Hs; ++s)
        for (index_t i = 0; i < D; ++i)
          for (index_t e = 0; e < Dv; ++e) f(b, s, i, e) = states(b, s, last, i, e);
    return f;
  }
};

template <class T>
CoreOut<T> run_core(const CoreInputs<T>& in, Form form, index_t chunk, double scale) {
  CoreOut<T> r{Tensor<T>(Shape{in.q.dim(0), in.q.dim(1), in.q.dim(2), in.v.dim(3)}), Tensor<T>(in.states_shape(chunk))};
  test::poison(r.out.view());
  test::poison(r.states.view());
  const auto f = form == Form::chunked ? &eigen::gdn::forward_chunked<T> : &eigen::gdn::forward_recurrent<T>;
  f(in.q, in.k, in.v, in.g, in.beta, in.s0.view(), r.out, r.states, chunk, scale);
  return r;
}

template <class T>
struct CoreGrads {
  Tensor<T> dq, dk, dv, dg, dbeta, ds0;
};

template <class T>
CoreGrads<T> run_core_backward(const CoreInputs<T>& in, const CoreOut<T>& fwd, const Tensor<T>& d_out,
                               const Tensor<T>& d_final, Form form, index_t chunk, double scale) {
  CoreGrads<T> g{
      Tensor<T>(in.q.shape(), T(0)),    Tensor<T>(in.k.shape(), T(0)),
      Tensor<T>(in.v.shape(), T(0)),    Tensor<T>(in.g.shape(), T(0)),
      Tensor<T>(in.beta.shape(), T(0)), Tensor<T>(Shape{in.q.dim(0), in.k.dim(2), in.k.dim(3), in.v.dim(3)}, T(0))};
  const auto f = form == Form::chunked ? &eigen::gdn::backward_chunked<T> : &eigen::gdn::backward_recurrent<T>;
  f(in.q, in.k, in.v, in.g, in.beta, fwd.states, d_out, d_final.view(), g.dq, g.dk, g.dv, g.dg, g.dbeta, g.ds0, chunk,
    scale);
  return g;
}

std::string form_name(Form f) { return f == Form::chunked ? "chunked" : "recurrent"; }

// A small teacher layer and an op configured for it.
struct Layer {
  AttentionShape shape;
  AttentionWeights<double> teacher;
};

Layer make_layer(Rng& rng, bool bias, int n_heads = 4, int n_kv = 2, int d_head = 4, int d_model = 12) {
  const AttentionShape s{.d_model = d_model,
                         .n_heads = n_heads,
                         .n_kv_heads = n_kv,
                         .d_head = d_head,
                         .qkv_bias = bias,
                         .rope = {.style = RopeConfig::Style::none}};
  return {s, AttentionWeights<double>::random(s, rng)};
}

// Gates drawn wider than the init so that every path of the gate backward is exercised.
template <class T>
void spread_gates(GatedDeltaNet::Params<T>& p, Rng& rng, double weight_std = 0.3) {
  fill_normal(p.w_gate.view(), rng, 0.0, weight_std);
  fill_normal(p.w_beta.view(), rng, 0.0, weight_std);
  fill_normal(p.b_gate.view(), rng, 1.0, 1.0);
  fill_normal(p.b_beta.view(), rng, 0.0, 1.0);
}

}  // namespace

TEST_CASE("gdn core: chunked and recurrent forward equal the literal recurrence (float64)") {
  Rng rng = test::rng_for("gdn core forward");
  const index_t B = 2, L = 13, H = 4, Hs = 2, D = 5, Dv = 3;
  for (bool with_s0 : {false, true}) {
    const CoreInputs<double> in = make_core(rng, B, L, H, Hs, D, Dv, -0.7, -0.01, with_s0);
    const double scale = 0.7;
    const auto ref = reference::gated_delta_rule_loops(in.q, in.k, in.v, in.g, in.beta, in.s0, scale);
    for (Form form : {Form::chunked, Form::recurrent})
      for (index_t chunk : {1, 3, 4, 13, 20}) {
        INFO(form_name(form), " chunk ", chunk, " initial state ", with_s0);
        const CoreOut<double> r = run_core(in, form, chunk, scale);
        CHECK(test::relative_difference(r.out, ref.out) < 1e-12);
        CHECK(test::relative_difference(r.final_state(), ref.state) < 1e-12);
        // Checkpoint c is the literal state after c·chunk tokens.
        for (index_t c = 1; c < in.chunk_count(chunk); ++c) {
          const auto cut = [&](const Tensor<double>& x) {
            Shape s = x.shape();
            Tensor<double> y(x.rank() == 4 ? Shape{s[0], c * chunk, s[2], s[3]} : Shape{s[0], c * chunk, s[2]});
            const index_t row = x.numel() / (s[0] * s[1]);
            for (index_t b = 0; b < s[0]; ++b)
              std::copy_n(x.data() + b * s[1] * row, c * chunk * row, y.data() + b * c * chunk * row);
            return y;
          };
          const auto part =
              reference::gated_delta_rule_loops(cut(in.q), cut(in.k), cut(in.v), cut(in.g), cut(in.beta), in.s0, scale);
          double worst = 0;
          for (index_t b = 0; b < B; ++b)
            for (index_t s = 0; s < Hs; ++s)
              for (index_t i = 0; i < D; ++i)
                for (index_t e = 0; e < Dv; ++e)
                  worst = std::max(worst, std::abs(r.states(b, s, c, i, e) - part.state(b, s, i, e)));
          CHECK(worst < 1e-12 * std::max(1.0, test::max_abs<double>(part.state.view())));
        }
      }
  }
}

TEST_CASE("gdn core: GQA equals MHA with k, v, g and beta repeated per query head") {
  Rng rng = test::rng_for("gdn gqa");
  const index_t B = 2, L = 9, H = 6, Hs = 2, D = 4, Dv = 4, group = H / Hs;
  const CoreInputs<double> in = make_core(rng, B, L, H, Hs, D, Dv);
  CoreInputs<double> mha = in;
  mha.k = Tensor<double>(Shape{B, L, H, D}), mha.v = Tensor<double>(Shape{B, L, H, Dv});
  mha.g = Tensor<double>(Shape{B, L, H}), mha.beta = Tensor<double>(Shape{B, L, H});
  mha.s0 = Tensor<double>(Shape{B, H, D, Dv});
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h) {
      for (index_t t = 0; t < L; ++t) {
        for (index_t d = 0; d < D; ++d) mha.k(b, t, h, d) = in.k(b, t, h / group, d);
        for (index_t d = 0; d < Dv; ++d) mha.v(b, t, h, d) = in.v(b, t, h / group, d);
        mha.g(b, t, h) = in.g(b, t, h / group), mha.beta(b, t, h) = in.beta(b, t, h / group);
      }
      for (index_t i = 0; i < D; ++i)
        for (index_t e = 0; e < Dv; ++e) mha.s0(b, h, i, e) = in.s0(b, h / group, i, e);
    }
  for (Form form : {Form::chunked, Form::recurrent}) {
    INFO(form_name(form));
    CHECK(test::relative_difference(run_core(in, form, 4, 1.0).out, run_core(mha, form, 4, 1.0).out) < 1e-13);
  }
}

TEST_CASE("gdn core: chunked backward equals recurrent backward and finite differences (float64)") {
  Rng rng = test::rng_for("gdn core backward");
  // Odd lengths, below and above the chunk sizes and not multiples of them.
  for (index_t L : {1, 7, 63, 65, 130}) {
  const index_t B = 2, H = 4, Hs = 2, D = 4, Dv = 3;
  const index_t entries = L > 64 ? 40 : 200;
  const double scale = 0.9;
  CoreInputs<double> in = make_core(rng, B, L, H, Hs, D, Dv);
  const Tensor<double> w_out = test::random_tensor<double>(Shape{B, L, H, Dv}, rng);
  const Tensor<double> w_final = test::random_tensor<double>(Shape{B, Hs, D, Dv}, rng);
  const auto loss = [&](index_t chunk) {
    return [&, chunk] {
      const CoreOut<double> r = run_core(in, Form::chunked, chunk, scale);
      return test::weighted_sum(r.out, w_out) + test::weighted_sum(r.final_state(), w_final);
    };
  };
  // Reference gradients: the recurrent backward with checkpoints every token.
  const CoreGrads<double> ref =
      run_core_backward(in, run_core(in, Form::recurrent, 1, scale), w_out, w_final, Form::recurrent, 1, scale);
  for (Form form : {Form::chunked, Form::recurrent})
    for (index_t chunk : {1, 3, 4, 11, 16}) {
      INFO("T ", L, " ", form_name(form), " chunk ", chunk);
      // Checkpoints from the other form: either backward takes either forward's checkpoints.
      const Form other = form == Form::chunked ? Form::recurrent : Form::chunked;
      const CoreGrads<double> g =
          run_core_backward(in, run_core(in, other, chunk, scale), w_out, w_final, form, chunk, scale);
      CHECK(test::relative_difference(g.dq, ref.dq) < 1e-11);
      CHECK(test::relative_difference(g.dk, ref.dk) < 1e-11);
      CHECK(test::relative_difference(g.dv, ref.dv) < 1e-11);
      CHECK(test::relative_difference(g.dg, ref.dg) < 1e-11);
      CHECK(test::relative_difference(g.dbeta, ref.dbeta) < 1e-11);
      CHECK(test::relative_difference(g.ds0, ref.ds0) < 1e-11);
      if (form == Form::chunked && (chunk == 4 || chunk == 11)) {
        const auto f = loss(chunk);
        CHECK(test::finite_difference_error(in.q.view(), g.dq.view(), f, rng, entries) <= 1e-6);
        CHECK(test::finite_difference_error(in.k.view(), g.dk.view(), f, rng, entries) <= 1e-6);
        CHECK(test::finite_difference_error(in.v.view(), g.dv.view(), f, rng, entries) <= 1e-6);
        CHECK(test::finite_difference_error(in.g.view(), g.dg.view(), f, rng, entries) <= 1e-6);
        CHECK(test::finite_difference_error(in.beta.view(), g.dbeta.view(), f, rng, entries) <= 1e-6);
        CHECK(test::finite_difference_error(in.s0.view(), g.ds0.view(), f, rng, entries) <= 1e-6);
      }
    }
  }
}

TEST_CASE("gdn core: strong decays and long sequences stay exact in float32") {
  Rng rng = test::rng_for("gdn stability");
  const index_t B = 1, L = 300, H = 2, Hs = 1, D = 16, Dv = 16;
  struct Regime {
    const char* what;
    double g_lo, g_hi;
  };
  // a = e^-8 per token: the cumulative decay of a 64-token chunk is e^-512, which underflows in
  // float32 (and its inverse overflows); a ≈ 1: no forgetting at all over 300 tokens.
  for (const Regime regime :
       {Regime{"strong decay", -8.0, -6.0}, Regime{"mixed decay", -3.0, -1e-4}, Regime{"no decay", -1e-6, -1e-7}}) {
    INFO(std::string(regime.what));
    CoreInputs<double> in = make_core(rng, B, L, H, Hs, D, Dv, regime.g_lo, regime.g_hi);
    if (std::string(regime.what) == "no decay") {
      // β close to 1 and the same few keys again and again: the delta rule must overwrite, not pile up.
      fill_uniform(in.beta.view(), rng, 0.9, 0.999);
      for (index_t t = 4; t < L; ++t)
        for (index_t d = 0; d < D; ++d) in.k(0, t, 0, d) = in.k(0, t % 4, 0, d);
    }
    const CoreInputs<float> in32 = cast_core<float>(in);
    const CoreOut<double> ref = run_core(in, Form::recurrent, 64, 1.0);
    const Tensor<double> w_out = test::random_tensor<double>(ref.out.shape(), rng);
    const CoreGrads<double> gref = run_core_backward(in, ref, w_out, Tensor<double>{}, Form::recurrent, 64, 1.0);
    const Tensor<float> w32 = cast<float, double>(w_out.view());
    for (Form form : {Form::chunked, Form::recurrent}) {
      INFO(form_name(form));
      const CoreOut<float> r = run_core(in32, form, 64, 1.0);
      CHECK(test::relative_difference(r.out, ref.out) < 1e-5);
      CHECK(test::relative_difference(r.final_state(), ref.final_state()) < 1e-5);
      const CoreGrads<float> g = run_core_backward(in32, r, w32, Tensor<float>{}, form, 64, 1.0);
      CHECK(test::relative_difference(g.dq, gref.dq) < 2e-5);
      CHECK(test::relative_difference(g.dk, gref.dk) < 2e-5);
      CHECK(test::relative_difference(g.dv, gref.dv) < 2e-5);
      CHECK(test::relative_difference(g.dg, gref.dg) < 2e-5);
      CHECK(test::relative_difference(g.dbeta, gref.dbeta) < 2e-5);
    }
    if (std::string(regime.what) == "no decay") CHECK(test::max_abs<double>(ref.final_state().view()) < 10);
  }
}

TEST_CASE("gdn core: decode steps continue a prefill exactly") {
  Rng rng = test::rng_for("gdn decode core");
  const index_t B = 2, L = 10, H = 4, Hs = 2, D = 4, Dv = 5, prefix = 6;
  const CoreInputs<double> in = make_core(rng, B, L, H, Hs, D, Dv);
  const CoreOut<double> full = run_core(in, Form::chunked, 4, 1.0);
  // Prefill of the first `prefix` tokens, then one token at a time.
  CoreInputs<double> head = in;
  for (Tensor<double>* x : {&head.q, &head.k, &head.v, &head.g, &head.beta}) {
    Shape s = x->shape();
    Tensor<double> y(s.rank() == 4 ? Shape{s[0], prefix, s[2], s[3]} : Shape{s[0], prefix, s[2]});
    const index_t row = x->numel() / (s[0] * s[1]);
    for (index_t b = 0; b < s[0]; ++b)
      std::copy_n(x->data() + b * s[1] * row, prefix * row, y.data() + b * prefix * row);
    *x = std::move(y);
  }
  Tensor<double> state = run_core(head, Form::chunked, 4, 1.0).final_state();
  double worst = 0;
  for (index_t t = prefix; t < L; ++t) {
    Tensor<double> q(Shape{B, H, D}), k(Shape{B, Hs, D}), v(Shape{B, Hs, Dv}), g(Shape{B, Hs}), beta(Shape{B, Hs}),
        out(Shape{B, H, Dv});
    for (index_t b = 0; b < B; ++b) {
      for (index_t h = 0; h < H; ++h)
        for (index_t d = 0; d < D; ++d) q(b, h, d) = in.q(b, t, h, d);
      for (index_t s = 0; s < Hs; ++s) {
        for (index_t d = 0; d < D; ++d) k(b, s, d) = in.k(b, t, s, d);
        for (index_t d = 0; d < Dv; ++d) v(b, s, d) = in.v(b, t, s, d);
        g(b, s) = in.g(b, t, s), beta(b, s) = in.beta(b, t, s);
      }
    }
    eigen::gdn::decode_step<double>(q, k, v, g, beta, state, out, 1.0);
    for (index_t b = 0; b < B; ++b)
      for (index_t h = 0; h < H; ++h)
        for (index_t d = 0; d < Dv; ++d) worst = std::max(worst, std::abs(out(b, h, d) - full.out(b, t, h, d)));
  }
  CHECK(worst < 1e-12 * test::max_abs<double>(full.out.view()));
  CHECK(test::relative_difference(state, full.final_state()) < 1e-12);
}

TEST_CASE("GatedDeltaNet layer: forward equals the plain-loop layer (float64)") {
  Rng rng = test::rng_for("gdn layer forward");
  for (bool bias : {false, true})
    for (bool per_query : {true, false})
      for (Form form : {Form::chunked, Form::recurrent}) {
        INFO("bias ", bias, " state per query head ", per_query, " ", form_name(form));
        const Layer layer = make_layer(rng, bias);
        const GatedDeltaNet op{.form = form, .chunk = 3, .state_per_query_head = per_query};
        auto p = op.init_from_teacher<double>(layer.shape, layer.teacher, rng);
        spread_gates(p, rng);
        const Tensor<double> h = test::random_tensor<double>(Shape{2, 8, layer.shape.d_model}, rng);
        Tensor<double> y(h.shape());
        test::poison(y.view());
        GatedDeltaNet::Saved<double> saved;
        op.forward<double>(layer.shape, p, h, y, saved);
        const Tensor<double> ref = reference::gated_delta_net_layer_loops(layer.shape, op, p, h);
        CHECK(test::relative_difference(y, ref) < 1e-12);
      }
}

TEST_CASE("GatedDeltaNet layer: backward matches central differences for h and every parameter (float64)") {
  Rng rng = test::rng_for("gdn layer backward");
  for (bool bias : {false, true})
    for (Form form : {Form::chunked, Form::recurrent}) {
      INFO("bias ", bias, " ", form_name(form));
      const Layer layer = make_layer(rng, bias);
      const GatedDeltaNet op{.form = form, .chunk = 3, .state_per_query_head = !bias};
      auto p = op.init_from_teacher<double>(layer.shape, layer.teacher, rng);
      spread_gates(p, rng);
      Tensor<double> h = test::random_tensor<double>(Shape{2, 7, layer.shape.d_model}, rng);
      const Tensor<double> wy = test::random_tensor<double>(h.shape(), rng);
      const auto loss = [&] {
        Tensor<double> y(h.shape());
        GatedDeltaNet::Saved<double> s;
        op.forward<double>(layer.shape, p, h, y, s);
        return test::weighted_sum(y, wy);
      };
      Tensor<double> y(h.shape());
      GatedDeltaNet::Saved<double> saved;
      op.forward<double>(layer.shape, p, h, y, saved);
      Tensor<double> dh(h.shape(), 0.0);
      auto grads = p.zeros_like();
      op.backward<double>(layer.shape, p, h, saved, wy, dh, grads);
      CHECK(test::finite_difference_error(h.view(), dh.view(), loss, rng) <= 1e-6);
      std::vector<std::pair<std::string, Tensor<double>*>> grad_list;
      grads.for_each([&](const char* name, Tensor<double>& g) { grad_list.emplace_back(name, &g); });
      std::size_t i = 0;
      p.for_each([&](const char* name, Tensor<double>& param) {
        REQUIRE(grad_list[i].first == name);
        INFO("parameter ", std::string(name));
        CHECK(test::finite_difference_error(param.view(), grad_list[i].second->view(), loss, rng) <= 1e-6);
        ++i;
      });
      // backward adds: a second call doubles every gradient.
      Tensor<double> dh2 = dh;
      auto grads2 = grads;
      op.backward<double>(layer.shape, p, h, saved, wy, dh2, grads2);
      for (index_t j = 0; j < dh.numel(); ++j) REQUIRE(std::abs(dh2.data()[j] - 2 * dh.data()[j]) < 1e-12);
      CHECK(std::abs(grads2.b_gate(0) - 2 * grads.b_gate(0)) < 1e-12);
    }
}

TEST_CASE("GatedDeltaNet layer: chunked and recurrent forms agree in float32 at init") {
  Rng rng = test::rng_for("gdn layer f32");
  const Layer layer = make_layer(rng, true, 6, 2, 16, 48);
  const GatedDeltaNet chunked{.form = Form::chunked, .chunk = 32};
  const GatedDeltaNet recurrent{.form = Form::recurrent, .chunk = 32};
  const auto p64 = chunked.init_from_teacher<double>(layer.shape, layer.teacher, rng);
  const auto p32 = p64.cast<float>();
  const Tensor<double> h = test::random_tensor<double>(Shape{2, 100, layer.shape.d_model}, rng);
  const Tensor<float> h32 = cast<float, double>(h.view());
  const Tensor<double> wy = test::random_tensor<double>(h.shape(), rng);
  const Tensor<float> wy32 = cast<float, double>(wy.view());
  Tensor<double> y(h.shape()), dh(h.shape(), 0.0);
  GatedDeltaNet::Saved<double> saved;
  chunked.forward<double>(layer.shape, p64, h, y, saved);
  auto grads = p64.zeros_like();
  chunked.backward<double>(layer.shape, p64, h, saved, wy, dh, grads);
  for (const GatedDeltaNet* op : {&chunked, &recurrent}) {
    INFO(form_name(op->form));
    Tensor<float> y32(h.shape()), dh32(h.shape(), 0.0f);
    GatedDeltaNet::Saved<float> s32;
    op->forward<float>(layer.shape, p32, h32, y32, s32);
    CHECK(test::relative_difference(y32, y) < 1e-5);
    auto g32 = p32.zeros_like();
    op->backward<float>(layer.shape, p32, h32, s32, wy32, dh32, g32);
    CHECK(test::relative_difference(dh32, dh) < 1e-5);
    CHECK(test::relative_difference(g32.w_gate, grads.w_gate) < 1e-5);
    CHECK(test::relative_difference(g32.w_beta, grads.w_beta) < 1e-5);
    CHECK(test::relative_difference(g32.proj.wk, grads.proj.wk) < 1e-5);
  }
}

TEST_CASE("GatedDeltaNet layer: prefill pieces then decode steps from a State equal one forward") {
  Rng rng = test::rng_for("gdn layer decode");
  for (Form form : {Form::chunked, Form::recurrent})
    for (bool per_query : {true, false}) {
      INFO(form_name(form), " state per query head ", per_query);
      const Layer layer = make_layer(rng, true);
      const GatedDeltaNet op{.form = form, .chunk = 4, .state_per_query_head = per_query};
      auto p = op.init_from_teacher<double>(layer.shape, layer.teacher, rng);
      spread_gates(p, rng);
      const index_t B = 2, L = 12, C = layer.shape.d_model;
      const Tensor<double> h = test::random_tensor<double>(Shape{B, L, C}, rng);
      Tensor<double> y(h.shape());
      GatedDeltaNet::Saved<double> saved;
      op.forward<double>(layer.shape, p, h, y, saved);

      auto state = op.initial_state<double>(layer.shape, B);
      // Prefill of 3, then 5 tokens (the second piece continues from the state the first leaves,
      // across a chunk boundary), then single-token steps.
      double worst = 0;
      std::vector<std::pair<index_t, index_t>> pieces{{0, 3}, {3, 8}};
      for (index_t t = 8; t < L; ++t) pieces.emplace_back(t, t + 1);
      for (auto [t0, t1] : pieces) {
        Tensor<double> part(Shape{B, t1 - t0, C}), y_part(Shape{B, t1 - t0, C});
        for (index_t b = 0; b < B; ++b)
          for (index_t t = t0; t < t1; ++t)
            for (index_t c = 0; c < C; ++c) part(b, t - t0, c) = h(b, t, c);
        test::poison(y_part.view());
        op.step<double>(layer.shape, p, part, state, y_part);
        for (index_t b = 0; b < B; ++b)
          for (index_t t = t0; t < t1; ++t)
            for (index_t c = 0; c < C; ++c) worst = std::max(worst, std::abs(y_part(b, t - t0, c) - y(b, t, c)));
      }
      CHECK(worst < 1e-12 * test::max_abs<double>(y.view()));
      CHECK(state.position == L);
    }
}

TEST_CASE("GatedDeltaNet init: the teacher's projections, decays close to 1, beta one half") {
  Rng rng = test::rng_for("gdn init");
  const Layer layer = make_layer(rng, true, 6, 2, 4, 12);
  const GatedDeltaNet op;
  const auto p = op.init_from_teacher<double>(layer.shape, layer.teacher, rng);
  REQUIRE(p.state_heads() == 6);
  CHECK(test::relative_difference(p.proj.wq, layer.teacher.wq) == 0);
  CHECK(test::relative_difference(p.proj.wo, layer.teacher.wo) == 0);
  const index_t D = layer.shape.d_head;
  for (index_t j = 0; j < 6; ++j)
    for (index_t d = 0; d < D; ++d) {
      CHECK(p.proj.bk(j * D + d) == layer.teacher.bk((j / 3) * D + d));
      for (index_t c = 0; c < layer.shape.d_model; ++c)
        CHECK(p.proj.wv(j * D + d, c) == layer.teacher.wv((j / 3) * D + d, c));
    }
  // Decays: a_s = σ(b_s)^(1/γ), half-lives geometric from 16 to 1024.
  for (int s = 0; s < 6; ++s) {
    const double a = std::exp(eigen::gdn::log_sigmoid(p.b_gate(s)) / op.gate_normaliser);
    const double half_life = -std::log(2.0) / std::log(a);
    CHECK(half_life == doctest::Approx(16 * std::pow(64.0, s / 5.0)).epsilon(1e-9));
    CHECK(a > 0.95);
    CHECK(a < 1.0);
    CHECK(p.b_beta(s) == 0.0);
  }
  CHECK(GatedDeltaNet::gate_bias_for_half_life(16, 16) == doctest::Approx(0.0).scale(1));
  // The data-dependent parts are small: std 0.1/sqrt(d_model).
  const double rms = std::sqrt(eigen::vector(p.w_gate.view()).squaredNorm() / double(p.w_gate.numel()));
  CHECK(rms < 0.3 / std::sqrt(12.0));
  // With shared states: the teacher's k/v heads as they are.
  const GatedDeltaNet shared{.state_per_query_head = false};
  const auto ps = shared.init_from_teacher<double>(layer.shape, layer.teacher, rng);
  CHECK(ps.state_heads() == 2);
  CHECK(test::relative_difference(ps.proj.wk, layer.teacher.wk) == 0);
}

TEST_CASE("GatedDeltaNet cost: a state constant in the context; FLOPs linear in it") {
  const AttentionShape s{.d_model = 576, .n_heads = 9, .n_kv_heads = 3, .d_head = 64};
  const GatedDeltaNet op;
  const Cost c1 = op.cost({.shape = s, .context = 1024}), c8 = op.cost({.shape = s, .context = 8192});
  CHECK(c1.kv_bytes == 9.0 * 64 * 64 * 4);  // fp32 state by default (CostQuery)
  CHECK(c8.kv_bytes == c1.kv_bytes);
  CHECK(c8.flops == doctest::Approx(8 * c1.flops));
  CHECK(c1.softmax_layers == 0);
  const GatedDeltaNet shared{.state_per_query_head = false};
  CHECK(shared.cost({.shape = s, .context = 1024, .state_bytes_per_element = 4}).kv_bytes == 3.0 * 64 * 64 * 4);
  const GatedDeltaNet recurrent{.form = Form::recurrent};
  CHECK(recurrent.cost({.shape = s, .context = 8192}).flops ==
        doctest::Approx(8 * recurrent.cost({.shape = s, .context = 1024}).flops));
}

TEST_CASE("GatedDeltaNet: bad inputs throw dash::Error naming what is wrong") {
  Rng rng = test::rng_for("gdn errors");
  const Layer layer = make_layer(rng, false);
  const GatedDeltaNet op{.chunk = 4};
  auto p = op.init_from_teacher<double>(layer.shape, layer.teacher, rng);
  GatedDeltaNet::Saved<double> saved;
  Tensor<double> h(Shape{1, 5, 12}, 0.5), y(Shape{1, 5, 12}), bad(Shape{1, 5, 11});
  CHECK_THROWS_WITH_AS(op.forward<double>(layer.shape, p, bad, y, saved), doctest::Contains("h: shape"), Error);
  CHECK_THROWS_WITH_AS(op.forward<double>(layer.shape, p, h, bad, saved), doctest::Contains("y: shape"), Error);
  const GatedDeltaNet zero_chunk{.chunk = 0};
  CHECK_THROWS_WITH_AS(zero_chunk.forward<double>(layer.shape, p, h, y, saved), doctest::Contains("chunk"), Error);
  auto broken = p;
  broken.b_beta = Tensor<double>(Shape{3});
  CHECK_THROWS_WITH_AS(op.forward<double>(layer.shape, broken, h, y, saved), doctest::Contains("b_beta"), Error);
  GatedDeltaNet::State<double> state{Tensor<double>(Shape{1, 3, 4, 4}), 0};
  CHECK_THROWS_WITH_AS(op.step<double>(layer.shape, p, h, state, y), doctest::Contains("state"), Error);
  // Checkpoints taken with one chunk cannot drive a backward with another.
  op.forward<double>(layer.shape, p, h, y, saved);
  saved.chunk = 2;
  Tensor<double> dh(h.shape(), 0.0);
  auto grads = p.zeros_like();
  CHECK_THROWS_WITH_AS(op.backward<double>(layer.shape, p, h, saved, y, dh, grads), doctest::Contains("states"), Error);
  // Core: state heads must divide query heads.
  CoreInputs<double> in = make_core(rng, 1, 4, 3, 2, 4, 4);
  CHECK_THROWS_WITH_AS(run_core(in, Form::chunked, 2, 1.0), doctest::Contains("state heads"), Error);
}

#include <doctest/doctest.h>

#include <cmath>
#include <string>
#include <string_view>

#include "dash/ops/gated_linear.hpp"
#include "reference/gated_linear_loops.hpp"
#include "support/attention_case.hpp"
#include "support/compare.hpp"
#include "support/random.hpp"

using namespace dash;
using dash::test::attention::repeat_heads;
namespace gla = dash::eigen::gla;

namespace {

// Inputs of the mixer: q, k, v, log decays g (as the layer makes them: log σ(z)/γ, with some heads
// decaying fast) and an initial state.
template <class T>
struct Mixer {
  Tensor<T> q, k, v, g, s0;
  index_t B, T_, H, Hkv, Dk, Dv;

  Mixer(Rng& rng, index_t B, index_t T_, index_t H, index_t Hkv, index_t Dk, index_t Dv, double gamma = 16)
      : q(test::random_tensor<T>(Shape{B, T_, H, Dk}, rng)),
        k(test::random_tensor<T>(Shape{B, T_, Hkv, Dk}, rng)),
        v(test::random_tensor<T>(Shape{B, T_, Hkv, Dv}, rng)),
        g(Shape{B, T_, H}),
        s0(test::random_tensor<T>(Shape{B, H, Dk, Dv}, rng)),
        B(B), T_(T_), H(H), Hkv(Hkv), Dk(Dk), Dv(Dv) {
    for (index_t i = 0; i < g.numel(); ++i) {
      const double z = 3.0 * rng.normal();
      g.data()[i] = static_cast<T>(std::log(1 / (1 + std::exp(-z))) / gamma);
    }
  }
  Shape o_shape() const { return Shape{B, T_, H, Dv}; }
  Shape state_shape() const { return Shape{B, H, Dk, Dv}; }
};

template <class T>
Tensor<double> to_double(const Tensor<T>& t) {
  return cast<double, T>(t.view());
}

enum class Form { chunked, recurrent };

template <class T>
void run_forward(Form form, index_t chunk, const Mixer<T>& m, bool with_state, double scale, Tensor<T>& o,
                 Tensor<T>& s1) {
  o = Tensor<T>(m.o_shape()), s1 = Tensor<T>(m.state_shape());
  test::poison(o.view()), test::poison(s1.view());
  const TensorView<const T> s0 = with_state ? m.s0.view() : TensorView<const T>{};
  if (form == Form::chunked) gla::forward_chunked<T>(m.q, m.k, m.v, m.g, scale, chunk, s0, o, s1);
  else gla::forward_recurrent<T>(m.q, m.k, m.v, m.g, scale, s0, o, s1);
}

struct MixerGrads {
  Tensor<double> dq, dk, dv, dg, ds0;
};

template <class T>
MixerGrads run_backward(Form form, index_t chunk, const Mixer<T>& m, double scale, const Tensor<T>& d_o,
                        const Tensor<T>& d_s1) {
  Tensor<T> dq(m.q.shape(), T(0)), dk(m.k.shape(), T(0)), dv(m.v.shape(), T(0)), dg(m.g.shape(), T(0)),
      ds0(m.s0.shape(), T(0));
  if (form == Form::chunked)
    gla::backward_chunked<T>(m.q, m.k, m.v, m.g, scale, chunk, m.s0, d_o, d_s1, dq, dk, dv, dg, ds0);
  else
    gla::backward_recurrent<T>(m.q, m.k, m.v, m.g, scale, m.s0, d_o, d_s1, dq, dk, dv, dg, ds0);
  return {to_double(dq), to_double(dk), to_double(dv), to_double(dg), to_double(ds0)};
}

double diff(const MixerGrads& a, const MixerGrads& b) {
  return std::max({test::relative_difference(a.dq, b.dq), test::relative_difference(a.dk, b.dk),
                   test::relative_difference(a.dv, b.dv), test::relative_difference(a.dg, b.dg),
                   test::relative_difference(a.ds0, b.ds0)});
}

}  // namespace

TEST_CASE("gla: chunked and recurrent forms equal the closed-form loops in float64") {
  Rng rng = test::rng_for("gla forms vs loops");
  // Dk ≠ Dv catches a transposed state; T = 13 leaves a ragged last chunk for every chunk size.
  const Mixer<double> m(rng, 2, 13, 4, 2, 5, 3);
  const double scale = 0.37;
  for (bool with_state : {false, true}) {
    Tensor<double> ref_o, ref_s;
    reference::gla_loops<double>(m.q, m.k, m.v, m.g, scale,
                                 with_state ? m.s0.view() : TensorView<const double>{}, ref_o, &ref_s);
    Tensor<double> o, s1;
    run_forward(Form::recurrent, 0, m, with_state, scale, o, s1);
    CHECK(test::relative_difference(o, ref_o) <= 1e-13);
    CHECK(test::relative_difference(s1, ref_s) <= 1e-13);
    for (index_t chunk : {1, 2, 3, 5, 13, 64}) {
      INFO("chunk ", chunk, ", initial state ", with_state);
      run_forward(Form::chunked, chunk, m, with_state, scale, o, s1);
      CHECK(test::relative_difference(o, ref_o) <= 1e-13);
      CHECK(test::relative_difference(s1, ref_s) <= 1e-13);
    }
  }
}

TEST_CASE("gla: float32 forward and backward agree with float64 to float rounding on a long sequence") {
  Rng rng = test::rng_for("gla float32");
  const Mixer<double> md(rng, 1, 300, 2, 1, 16, 16);
  Mixer<float> mf = Mixer<float>(rng, 1, 1, 1, 1, 1, 1);
  mf.q = cast<float, double>(md.q), mf.k = cast<float, double>(md.k), mf.v = cast<float, double>(md.v);
  mf.g = cast<float, double>(md.g), mf.s0 = cast<float, double>(md.s0);
  mf.B = 1, mf.T_ = 300, mf.H = 2, mf.Hkv = 1, mf.Dk = 16, mf.Dv = 16;
  const double scale = 0.25;
  Tensor<double> ref_o, ref_s;
  run_forward(Form::recurrent, 0, md, true, scale, ref_o, ref_s);
  const Tensor<double> d_o = test::random_tensor<double>(md.o_shape(), rng);
  const Tensor<double> d_s1 = test::random_tensor<double>(md.state_shape(), rng);
  const MixerGrads ref = run_backward(Form::recurrent, 0, md, scale, d_o, d_s1);
  const Tensor<float> d_of = cast<float, double>(d_o), d_s1f = cast<float, double>(d_s1);
  for (Form form : {Form::chunked, Form::recurrent}) {
    INFO("form ", form == Form::chunked ? "chunked" : "recurrent");
    Tensor<float> o, s1;
    run_forward(form, 64, mf, true, scale, o, s1);
    CHECK(test::relative_difference(o, ref_o) <= 2e-5);
    CHECK(test::relative_difference(s1, ref_s) <= 2e-5);
    CHECK(diff(run_backward(form, 64, mf, scale, d_of, d_s1f), ref) <= 1e-4);
  }
}

// Central differences use a step of 1e-5: with losses of order 10–100, the roundoff of a 1e-6 step
// (≈ 1e-16·|loss|/step) comes within a factor of a few of the 1e-6 tolerance; at 1e-5 the
// truncation error is still far below it.
TEST_CASE("gla: backward of both forms matches central differences in float64") {
  Rng rng = test::rng_for("gla backward fd");
  // Odd lengths, below and above the chunk sizes and not multiples of them.
  for (index_t length : {1, 7, 63, 65, 130}) {
  Mixer<double> m(rng, 2, length, 4, 2, 3, 2);
  const double scale = 0.5;
  const Tensor<double> w_o = test::random_tensor<double>(m.o_shape(), rng);
  const Tensor<double> w_s = test::random_tensor<double>(m.state_shape(), rng);
  const index_t entries = length > 64 ? 40 : 200;
  for (Form form : {Form::chunked, Form::recurrent})
    for (index_t chunk : {3, 16}) {
      if (form == Form::recurrent && chunk != 3) continue;
      INFO("T ", length, ", form ", form == Form::chunked ? "chunked" : "recurrent", ", chunk ", chunk);
      // loss = <w_o, o> + <w_s, S_T>
      const auto loss = [&] {
        Tensor<double> o, s1;
        run_forward(form, chunk, m, true, scale, o, s1);
        return test::weighted_sum(o, w_o) + test::weighted_sum(s1, w_s);
      };
      const MixerGrads an = run_backward(form, chunk, m, scale, w_o, w_s);
      CHECK(test::finite_difference_error(m.q.view(), an.dq.view(), loss, rng, entries) <= 1e-6);
      CHECK(test::finite_difference_error(m.k.view(), an.dk.view(), loss, rng, entries) <= 1e-6);
      CHECK(test::finite_difference_error(m.v.view(), an.dv.view(), loss, rng, entries) <= 1e-6);
      CHECK(test::finite_difference_error(m.g.view(), an.dg.view(), loss, rng, entries) <= 1e-6);
      CHECK(test::finite_difference_error(m.s0.view(), an.ds0.view(), loss, rng, entries) <= 1e-6);
    }
  }
}

TEST_CASE("gla: chunked and recurrent backward agree for every chunk size, and both add into their outputs") {
  Rng rng = test::rng_for("gla backward forms");
  const Mixer<double> m(rng, 2, 11, 6, 3, 4, 5);
  const Tensor<double> d_o = test::random_tensor<double>(m.o_shape(), rng);
  const Tensor<double> d_s1 = test::random_tensor<double>(m.state_shape(), rng);
  const MixerGrads ref = run_backward(Form::recurrent, 0, m, 0.3, d_o, d_s1);
  for (index_t chunk : {1, 4, 11, 100}) {
    INFO("chunk ", chunk);
    CHECK(diff(run_backward(Form::chunked, chunk, m, 0.3, d_o, d_s1), ref) <= 1e-13);
  }
  // Without a final-state gradient, and accumulation into non-zero outputs.
  for (Form form : {Form::chunked, Form::recurrent}) {
    const MixerGrads once = run_backward(form, 4, m, 0.3, d_o, Tensor<double>{});
    Tensor<double> dq = once.dq, dk = once.dk, dv = once.dv, dg = once.dg, ds0 = once.ds0;
    if (form == Form::chunked)
      gla::backward_chunked<double>(m.q, m.k, m.v, m.g, 0.3, 4, m.s0, d_o, {}, dq, dk, dv, dg, ds0);
    else
      gla::backward_recurrent<double>(m.q, m.k, m.v, m.g, 0.3, m.s0, d_o, {}, dq, dk, dv, dg, ds0);
    const auto twice = [](const Tensor<double>& x) {
      Tensor<double> y = x;
      for (double& e : y.flat()) e *= 2;
      return y;
    };
    CHECK(diff({dq, dk, dv, dg, ds0}, {twice(once.dq), twice(once.dk), twice(once.dv), twice(once.dg),
                                       twice(once.ds0)}) <= 1e-15);
  }
}

TEST_CASE("gla: strong decays and long chunks stay finite (pairwise exponents only)") {
  Rng rng = test::rng_for("gla strong decay");
  // log decays down to −60 per token: over a chunk of 256, e^{−b_j} alone would be e^{15000}.
  Mixer<float> m(rng, 1, 256, 2, 2, 8, 8);
  for (index_t i = 0; i < m.g.numel(); ++i) m.g.data()[i] = static_cast<float>(-60 * rng.uniform());
  Mixer<double> md = Mixer<double>(rng, 1, 1, 1, 1, 1, 1);
  md.q = to_double(m.q), md.k = to_double(m.k), md.v = to_double(m.v), md.g = to_double(m.g);
  md.s0 = to_double(m.s0), md.B = 1, md.T_ = 256, md.H = 2, md.Hkv = 2, md.Dk = 8, md.Dv = 8;
  Tensor<double> ref_o, ref_s;
  run_forward(Form::recurrent, 0, md, true, 1.0, ref_o, ref_s);
  Tensor<float> o, s1;
  run_forward(Form::chunked, 256, m, true, 1.0, o, s1);
  CHECK(test::relative_difference(o, ref_o) <= 1e-5);
  CHECK(test::relative_difference(s1, ref_s) <= 1e-5);
  const Tensor<float> d_o = test::random_tensor<float>(m.o_shape(), rng);
  const Tensor<float> d_s1 = test::random_tensor<float>(m.state_shape(), rng);
  const MixerGrads ref = run_backward(Form::recurrent, 0, md, 1.0, to_double(d_o), to_double(d_s1));
  CHECK(diff(run_backward(Form::chunked, 256, m, 1.0, d_o, d_s1), ref) <= 1e-4);
}

TEST_CASE("gla: GQA equals MHA with repeated k/v heads, forward and backward") {
  Rng rng = test::rng_for("gla gqa");
  const Mixer<double> gqa(rng, 2, 9, 6, 2, 4, 4);
  Mixer<double> mha = gqa;
  mha.k = repeat_heads(gqa.k, 3), mha.v = repeat_heads(gqa.v, 3), mha.Hkv = 6;
  const Tensor<double> d_o = test::random_tensor<double>(gqa.o_shape(), rng);
  for (Form form : {Form::chunked, Form::recurrent}) {
    Tensor<double> o1, s1, o2, s2;
    run_forward(form, 4, gqa, true, 0.5, o1, s1);
    run_forward(form, 4, mha, true, 0.5, o2, s2);
    CHECK(test::relative_difference(o1, o2) <= 1e-15);
    CHECK(test::relative_difference(s1, s2) <= 1e-15);
    const MixerGrads a = run_backward(form, 4, gqa, 0.5, d_o, Tensor<double>{});
    const MixerGrads b = run_backward(form, 4, mha, 0.5, d_o, Tensor<double>{});
    CHECK(test::relative_difference(a.dq, b.dq) <= 1e-15);
    CHECK(test::relative_difference(a.dg, b.dg) <= 1e-15);
    // A shared k/v head's gradient is the sum over the query heads that read it.
    Tensor<double> dk_sum(gqa.k.shape(), 0.0), dv_sum(gqa.v.shape(), 0.0);
    for (index_t bt = 0; bt < 2 * 9; ++bt)
      for (index_t j = 0; j < 6; ++j)
        for (index_t d = 0; d < 4; ++d) {
          dk_sum.data()[(bt * 2 + j / 3) * 4 + d] += b.dk.data()[(bt * 6 + j) * 4 + d];
          dv_sum.data()[(bt * 2 + j / 3) * 4 + d] += b.dv.data()[(bt * 6 + j) * 4 + d];
        }
    CHECK(test::relative_difference(a.dk, dk_sum) <= 1e-14);
    CHECK(test::relative_difference(a.dv, dv_sum) <= 1e-14);
  }
}

TEST_CASE("gla: decode steps after a chunked prefill reproduce the forward pass") {
  Rng rng = test::rng_for("gla decode");
  const Mixer<float> m(rng, 2, 20, 4, 2, 8, 8);
  Tensor<float> ref_o, ref_s;
  run_forward(Form::chunked, 8, m, true, 0.35, ref_o, ref_s);
  // Prefill the first 13 tokens (chunked, from s0), then 7 single-token steps.
  const auto slice = [](const Tensor<float>& x, index_t t0, index_t n) {
    Shape s = x.rank() == 4 ? Shape{x.dim(0), n, x.dim(2), x.dim(3)} : Shape{x.dim(0), n, x.dim(2)};
    TensorView<const float> v(x.data() + t0 * x.view().stride[1], s, x.view().stride, Device::cpu);
    return clone(v);
  };
  Tensor<float> state = m.s0, o(m.o_shape());
  test::poison(o.view());
  const auto run = [&](index_t t0, index_t n, bool chunked) {
    const Tensor<float> q = slice(m.q, t0, n), k = slice(m.k, t0, n), v = slice(m.v, t0, n), g = slice(m.g, t0, n);
    Tensor<float> out(Shape{m.B, n, m.H, m.Dv});
    if (chunked) gla::forward_chunked<float>(q, k, v, g, 0.35, 8, state, out, state);
    else gla::decode_step<float>(q, k, v, g, 0.35, state, out);
    for (index_t b = 0; b < m.B; ++b)
      for (index_t t = 0; t < n; ++t)
        for (index_t h = 0; h < m.H; ++h)
          for (index_t e = 0; e < m.Dv; ++e) o(b, t0 + t, h, e) = out(b, t, h, e);
  };
  run(0, 13, true);
  for (index_t t = 13; t < 20; ++t) run(t, 1, false);
  CHECK(test::relative_difference(o, ref_o) <= 1e-5);
  CHECK(test::relative_difference(state, ref_s) <= 1e-5);
}

namespace {

AttentionShape small_shape(bool bias, RopeConfig::Style rope = RopeConfig::Style::none) {
  return AttentionShape{.d_model = 10, .n_heads = 4, .n_kv_heads = 2, .d_head = 4, .qkv_bias = bias,
                        .rope = RopeConfig{.style = rope, .theta = 10000.0}};
}

reference::GlaLayerWeights views(const GatedLinear::Params<double>& p) {
  return {p.proj.wq, p.proj.wk, p.proj.wv, p.proj.wo, p.proj.bq, p.proj.bk, p.proj.bv, p.w_gate, p.b_gate};
}

}  // namespace

TEST_CASE("GatedLinear: the layer equals the loops reference, and initialisation starts at long memory") {
  Rng rng = test::rng_for("gla layer forward");
  for (bool bias : {false, true})
    for (int kv_heads : {0, 4}) {
      INFO("bias ", bias, ", kv_heads ", kv_heads);
      const AttentionShape s = small_shape(bias);
      const AttentionWeights<double> teacher = AttentionWeights<double>::random(s, rng);
      GatedLinear op;
      op.kv_heads = kv_heads;
      op.chunk = 4;
      const auto p = op.init_from_teacher<double>(s, teacher, rng);
      const Tensor<double> h = test::random_tensor<double>(Shape{2, 9, s.d_model}, rng);
      Tensor<double> y(Shape{2, 9, s.d_model});
      test::poison(y.view());
      GatedLinear::Saved<double> saved;
      op.forward<double>(s, p, h, y, saved);
      Tensor<double> g;
      const Tensor<double> ref = reference::gla_layer_loops(op.op_shape(s), views(p), h, 16, 0.5, &g);
      CHECK(test::relative_difference(y, ref) <= 1e-13);
      CHECK(test::relative_difference(saved.g, g) <= 1e-13);
      // The recurrent form and the teacher's k/v heads (kv_heads = 0) give the same layer.
      GatedLinear other = op;
      other.form = GatedLinear::Form::recurrent;
      other.kv_heads = 0;
      const auto p0 = other.init_from_teacher<double>(s, teacher, rng);
      auto p1 = p0;
      p1.w_gate = p.w_gate;  // same gate draw
      Tensor<double> y1(y.shape());
      other.forward<double>(s, p1, h, y1, saved);
      CHECK(test::relative_difference(y1, y) <= 1e-13);
    }
  // Decays at initialisation, for inputs of unit RMS: head means spread over [0.97, 0.99], and
  // each head's spread over tokens is that of z = b + w·h, std |w| ≈ init_gate_std, through
  // ∂a/∂z = a·σ(−b)/γ.
  const AttentionShape s{.d_model = 64, .n_heads = 8, .n_kv_heads = 2, .d_head = 8};
  const GatedLinear op;
  const auto p = op.init_from_teacher<double>(s, AttentionWeights<double>::random(s, rng), rng);
  const index_t n = 4 * 64;
  const Tensor<double> h = test::random_tensor<double>(Shape{4, 64, s.d_model}, rng);
  Tensor<double> y(Shape{4, 64, s.d_model});
  GatedLinear::Saved<double> saved;
  op.forward<double>(s, p, h, y, saved);
  for (index_t j = 0; j < s.n_heads; ++j) {
    double lo = 1, hi = 0, mean = 0, sq = 0, w_norm = 0;
    for (index_t i = 0; i < n; ++i) {
      const double a = std::exp(saved.g.data()[i * s.n_heads + j]);
      lo = std::min(lo, a), hi = std::max(hi, a), mean += a / n, sq += a * a / n;
    }
    for (index_t c = 0; c < s.d_model; ++c) w_norm += p.w_gate(j, c) * p.w_gate(j, c);
    const double target = 1 - 1 / ((1 / 0.03) * std::pow(3.0, double(j) / 7));
    const double predicted_std = target / (1 + std::exp(p.b_gate(j))) / 16 * std::sqrt(w_norm);
    const double std_a = std::sqrt(std::max(sq - mean * mean, 0.0));
    INFO("head ", j, ": a in [", lo, ", ", hi, "], mean ", mean, " (target ", target, "), std ", std_a,
         " (predicted ", predicted_std, ")");
    CHECK(std::abs(mean - target) < 1e-3);
    CHECK(std::abs(std_a / predicted_std - 1) < 0.25);
    CHECK(lo > 0.95);
    CHECK(hi < 0.995);
  }
  CHECK(std::abs(std::pow(1 / (1 + std::exp(-p.b_gate(0))), 1.0 / 16) - 0.97) < 1e-12);
  CHECK(std::abs(std::pow(1 / (1 + std::exp(-p.b_gate(7))), 1.0 / 16) - 0.99) < 1e-12);
}

// The gate's gradients are small (∂g/∂z carries 1/γ) next to a loss of order 100, so their central
// differences are noisy: with γ = 4 and a step of 3e-5 the worst error over 1000 draws was 5e-7,
// against 1e-6 at a step of 1e-4 (truncation) and 1.5e-6 at 1e-5 (roundoff).
TEST_CASE("GatedLinear: layer gradients match central differences in float64") {
  Rng rng = test::rng_for("gla layer fd");
  for (auto form : {GatedLinear::Form::chunked, GatedLinear::Form::recurrent})
    for (bool bias : {false, true})
      for (auto rope : {RopeConfig::Style::none, RopeConfig::Style::half}) {
        INFO("form ", int(form), ", bias ", bias, ", rope ", int(rope));
        const AttentionShape s = small_shape(bias, rope);
        GatedLinear op;
        op.form = form, op.chunk = 3, op.rope = rope != RopeConfig::Style::none, op.kv_heads = 2;
        op.init_gate_std = 3.0;   // a gate that depends on h visibly
        op.gate_normaliser = 4;  // larger gate gradients (see above); a lost 1/γ still shows
        auto p = op.init_from_teacher<double>(s, AttentionWeights<double>::random(s, rng), rng);
        Tensor<double> h = test::random_tensor<double>(Shape{2, 7, s.d_model}, rng);
        const Tensor<double> w_y = test::random_tensor<double>(h.shape(), rng);
        GatedLinear::Saved<double> saved;
        const auto loss = [&] {
          Tensor<double> y(h.shape());
          GatedLinear::Saved<double> scratch;
          op.forward<double>(s, p, h, y, scratch);
          return test::weighted_sum(y, w_y);
        };
        Tensor<double> y(h.shape());
        op.forward<double>(s, p, h, y, saved);
        Tensor<double> dh(h.shape(), 0.0);
        auto grads = op.zero_params<double>(s);
        op.backward<double>(s, p, h, saved, w_y, dh, grads);
        CHECK(test::finite_difference_error(h.view(), dh.view(), loss, rng) <= 1e-6);
        p.for_each([&](const char* name, Tensor<double>& param) {
          Tensor<double>* g = nullptr;
          grads.for_each([&](const char* gname, Tensor<double>& gp) {
            if (std::string_view(gname) == name) g = &gp;
          });
          INFO("parameter ", std::string(name), ", max |grad| ", test::max_abs<double>(g ? g->view() : TensorView<double>{}));
          REQUIRE(g != nullptr);
          CHECK(test::finite_difference_error(param.view(), g->view(), loss, rng) <= 1e-6);
        });
        // Empty grads: only dh, and dh is added into.
        GatedLinear::Params<double> none;
        Tensor<double> dh2 = dh;
        op.backward<double>(s, p, h, saved, w_y, dh2, none);
        for (double& e : dh.flat()) e *= 2;
        CHECK(test::relative_difference(dh2, dh) <= 1e-14);
      }
}

TEST_CASE("GatedLinear: step (prefill, then one token at a time) reproduces forward, with RoPE") {
  Rng rng = test::rng_for("gla layer step");
  const AttentionShape s = small_shape(true, RopeConfig::Style::interleaved);
  GatedLinear op;
  op.rope = true, op.chunk = 4;
  const auto p = op.init_from_teacher<float>(s, AttentionWeights<float>::random(s, rng), rng);
  const index_t B = 2, T = 11, prefill = 6;
  const Tensor<float> h = test::random_tensor<float>(Shape{B, T, s.d_model}, rng);
  Tensor<float> y(h.shape());
  GatedLinear::Saved<float> saved;
  op.forward<float>(s, p, h, y, saved);
  auto state = op.initial_state<float>(s, B);
  Tensor<float> y_steps(h.shape());
  test::poison(y_steps.view());
  const auto run = [&](index_t t0, index_t n) {
    Tensor<float> part(Shape{B, n, s.d_model}), out(Shape{B, n, s.d_model});
    for (index_t b = 0; b < B; ++b)
      for (index_t t = 0; t < n; ++t)
        for (index_t c = 0; c < s.d_model; ++c) part(b, t, c) = h(b, t0 + t, c);
    op.step<float>(s, p, part, state, out);
    for (index_t b = 0; b < B; ++b)
      for (index_t t = 0; t < n; ++t)
        for (index_t c = 0; c < s.d_model; ++c) y_steps(b, t0 + t, c) = out(b, t, c);
  };
  run(0, prefill);
  for (index_t t = prefill; t < T; ++t) run(t, 1);
  CHECK(state.position == T);
  CHECK(test::relative_difference(y_steps, y) <= 1e-5);
}

TEST_CASE("GatedLinear: cost is a constant-size state and no softmax layer") {
  const AttentionShape s{.d_model = 576, .n_heads = 9, .n_kv_heads = 3, .d_head = 64};
  const GatedLinear op;
  const Cost short_ctx = op.cost({.shape = s, .context = 128});
  const Cost long_ctx = op.cost({.shape = s, .context = 8192});
  CHECK(short_ctx.kv_bytes == 9.0 * 64 * 64 * 4);  // fp32 state by default (CostQuery)
  CHECK(long_ctx.kv_bytes == short_ctx.kv_bytes);
  CHECK(long_ctx.softmax_layers == 0);
  CHECK(long_ctx.flops == doctest::Approx(short_ctx.flops * 64));  // linear in T
  CHECK(op.cost({.shape = s, .context = 8192, .state_bytes_per_element = 2}).kv_bytes == 9.0 * 64 * 64 * 2);
}

TEST_CASE("GatedLinear: bad input throws dash::Error naming what is wrong") {
  Rng rng = test::rng_for("gla errors");
  const AttentionShape s = small_shape(false);
  GatedLinear op;
  const auto p = op.init_from_teacher<double>(s, AttentionWeights<double>::random(s, rng), rng);
  GatedLinear::Saved<double> saved;
  Tensor<double> h(Shape{1, 3, 7}, 0.0), y(Shape{1, 3, s.d_model});
  CHECK_THROWS_WITH_AS(op.forward<double>(s, p, h, y, saved), doctest::Contains("expected [B, T, 10]"), Error);
  op.kv_heads = 3;
  CHECK_THROWS_WITH_AS(op.init_from_teacher<double>(s, AttentionWeights<double>::random(s, rng), rng),
                       doctest::Contains("kv_heads = 3"), Error);
  op.kv_heads = 4;  // params were made for 2 k/v heads
  Tensor<double> h_ok(Shape{1, 3, s.d_model}, 0.0);
  CHECK_THROWS_WITH_AS(op.forward<double>(s, p, h_ok, y, saved), doctest::Contains("AttentionWeights.wk"), Error);
  op.kv_heads = 0;
  auto grads = op.zero_params<double>(s);
  grads.w_gate = Tensor<double>(Shape{2, 2}, 0.0);
  op.forward<double>(s, p, h_ok, y, saved);
  Tensor<double> dh(h_ok.shape(), 0.0);
  CHECK_THROWS_WITH_AS(op.backward<double>(s, p, h_ok, saved, y, dh, grads), doctest::Contains("grads.w_gate"),
                       Error);
  Rng r2 = test::rng_for("gla errors core");
  const Mixer<double> m(r2, 1, 4, 3, 2, 2, 2);
  Tensor<double> o(m.o_shape());
  CHECK_THROWS_WITH_AS(gla::forward_recurrent<double>(m.q, m.k, m.v, m.g, 1.0, {}, o),
                       doctest::Contains("not a multiple"), Error);
  const Mixer<double> m2(r2, 1, 4, 2, 1, 2, 2);
  Tensor<double> o2(m2.o_shape());
  CHECK_THROWS_WITH_AS(gla::forward_chunked<double>(m2.q, m2.k, m2.v, m2.g, 1.0, 0, {}, o2),
                       doctest::Contains("chunk = 0"), Error);
  CHECK_THROWS_WITH_AS(gla::forward_chunked<double>(m2.q, m2.k, m2.v, m2.q, 1.0, 4, {}, o2),
                       doctest::Contains("gla g"), Error);
}

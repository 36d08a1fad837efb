// GatedLinear's CUDA kernels against the Eigen reference (dash::eigen::gla, in double on the
// bf16-rounded inputs), and the identities between the kernels themselves: chunked == recurrent
// decode, a sequence split with its state carried == the whole, GQA == repeated k/v heads, q, k,
// v and dq, dk, dv as rows of fused buffers == dense tensors.
//
// Tolerances. o, dq, dk, dv are bf16: relative L2 ≤ test::bf16_tolerance. The fp32 states
// (final state, initial-state gradient) are sums of tensor-core products whose decay-weighted
// operand is rounded to bf16 (relative 2⁻⁹ per term), so they too are held to bf16_tolerance;
// the decode kernel's state is fp32 arithmetic on the bf16 inputs and meets fp32_tolerance.
// dg_t = Σ_{t'≥t} (q·dq − k·dk)_{t'} + ⟨dS_T, S_T⟩ is a reverse cumulative sum of terms that are
// each only bf16-accurate and largely cancel, so its error grows with the root-sum-square of
// the summed terms, not with dg itself: it is checked as ‖dg − dg_ref‖ / ‖σ‖ ≤ bf16_tolerance,
// σ_t² = Σ_{t'≥t} ((q·dq)² + (k·dk)²)_{t'} + Σ (dS_T ⊙ S_T)² (from the reference), and its
// plain relative L2 is printed.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "dash/core/cuda.hpp"
#include "dash/core/dtype.hpp"
#include "dash/ops/gated_linear/cuda.cuh"
#include "dash/ops/gated_linear/eigen.hpp"
#include "support/errors.hpp"
#include "support/gpu.hpp"
#include "support/random.hpp"

using namespace dash;
namespace kernels = dash::cuda::gla;
namespace reference = dash::eigen::gla;
using dash::cuda::bfloat16;
using dash::cuda::DeviceTensor;

namespace {

constexpr index_t reference_chunk = 64;

struct Layout {
  index_t B, T, H, Hkv, D;
  double gamma;  // g = log σ(z) / γ: γ = 1 decays strongly, γ = 16 weakly (the layer's default)
};

void describe(const Layout& L) {
  std::printf("  B=%lld T=%lld H=%lld Hkv=%lld D=%lld gamma=%g\n", (long long)L.B, (long long)L.T, (long long)L.H,
              (long long)L.Hkv, (long long)L.D, L.gamma);
}

Tensor<double> rounded_bf16(Tensor<double> t) {
  for (double& x : t.flat()) x = static_cast<double>(static_cast<float>(bf16(static_cast<float>(x))));
  return t;
}
Tensor<double> rounded_f32(Tensor<double> t) {
  for (double& x : t.flat()) x = static_cast<double>(static_cast<float>(x));
  return t;
}

DeviceTensor<float> device_f32(const Tensor<double>& t) {
  const Tensor<float> f = cast<float, double>(t.view());
  return DeviceTensor<float>::from_host(f.view());
}

// [B, T, Hkv, D] → [B, T, H, D], query head h reading k/v head h / group.
Tensor<double> repeat_heads(const Tensor<double>& x, index_t H) {
  const index_t B = x.dim(0), T = x.dim(1), Hkv = x.dim(2), D = x.dim(3), group = H / Hkv;
  Tensor<double> out(Shape{B, T, H, D});
  for (index_t b = 0; b < B; ++b)
    for (index_t t = 0; t < T; ++t)
      for (index_t h = 0; h < H; ++h)
        for (index_t d = 0; d < D; ++d) out(b, t, h, d) = x(b, t, h / group, d);
  return out;
}

// Tokens [t0, t0 + n) of a [B, T, ...] tensor.
Tensor<double> tokens(const Tensor<double>& x, index_t t0, index_t n) {
  const Shape& s = x.shape();
  const index_t B = s[0], T = s[1], inner = x.numel() / (B * T);
  Tensor<double> out(s.rank() == 3 ? Shape{B, n, s[2]} : Shape{B, n, s[2], s[3]});
  for (index_t b = 0; b < B; ++b)
    std::copy_n(x.data() + (b * T + t0) * inner, n * inner, out.data() + b * n * inner);
  return out;
}

struct Case {
  Layout L;
  double scale;
  Tensor<double> q, k, v, g, s0, d_o, ds1;  // host copies, rounded as the device holds them
  DeviceTensor<bfloat16> q_d, k_d, v_d, d_o_d;
  DeviceTensor<float> g_d, s0_d, ds1_d;

  Case(const Layout& layout, double scale_, Tensor<double> q_, Tensor<double> k_, Tensor<double> v_,
       Tensor<double> g_, Tensor<double> s0_, Tensor<double> d_o_, Tensor<double> ds1_)
      : L(layout), scale(scale_), q(std::move(q_)), k(std::move(k_)), v(std::move(v_)), g(std::move(g_)),
        s0(std::move(s0_)), d_o(std::move(d_o_)), ds1(std::move(ds1_)) {
    upload();
  }

  Case(const Layout& layout, Rng& rng) : L(layout), scale(1 / std::sqrt(double(layout.D))) {
    q = rounded_bf16(test::random_tensor<double>(Shape{L.B, L.T, L.H, L.D}, rng));
    k = rounded_bf16(test::random_tensor<double>(Shape{L.B, L.T, L.Hkv, L.D}, rng));
    v = rounded_bf16(test::random_tensor<double>(Shape{L.B, L.T, L.Hkv, L.D}, rng));
    d_o = rounded_bf16(test::random_tensor<double>(Shape{L.B, L.T, L.H, L.D}, rng));
    g = Tensor<double>(Shape{L.B, L.T, L.H});
    for (double& x : g.flat()) {
      const double z = 3 * rng.normal();
      x = -std::log1p(std::exp(-z)) / L.gamma;
    }
    g = rounded_f32(std::move(g));
    s0 = rounded_f32(test::random_tensor<double>(Shape{L.B, L.H, L.D, L.D}, rng));
    ds1 = rounded_f32(test::random_tensor<double>(Shape{L.B, L.H, L.D, L.D}, rng));
    upload();
  }

  void upload() {
    q_d = dash::cuda::to_device_bf16<double>(q.view()), k_d = dash::cuda::to_device_bf16<double>(k.view());
    v_d = dash::cuda::to_device_bf16<double>(v.view()), d_o_d = dash::cuda::to_device_bf16<double>(d_o.view());
    g_d = device_f32(g), s0_d = device_f32(s0), ds1_d = device_f32(ds1);
  }

  // Tokens [t0, t0 + n), with the same initial state and final-state gradient.
  Case slice(index_t t0, index_t n) const {
    Layout l = L;
    l.T = n;
    return Case(l, scale, tokens(q, t0, n), tokens(k, t0, n), tokens(v, t0, n), tokens(g, t0, n), s0,
                tokens(d_o, t0, n), ds1);
  }

  // The same inputs with k and v repeated to one head per query head.
  Case repeated() const {
    Layout l = L;
    l.Hkv = L.H;
    return Case(l, scale, q, repeat_heads(k, L.H), repeat_heads(v, L.H), g, s0, d_o, ds1);
  }

  Shape q_shape() const { return Shape{L.B, L.T, L.H, L.D}; }
  Shape kv_shape() const { return Shape{L.B, L.T, L.Hkv, L.D}; }
  Shape state_shape() const { return Shape{L.B, L.H, L.D, L.D}; }

  template <class P>
  void fill_sizes(P& p) const {
    p.batch = int(L.B), p.length = int(L.T), p.n_heads = int(L.H), p.n_kv_heads = int(L.Hkv), p.d_head = int(L.D);
    p.scale = float(scale);
  }
};

struct Outputs {
  Tensor<double> o, s1;
};

// Runs the forward with a poisoned workspace of the size it asks for.
void run_forward(const kernels::ForwardParams& p) {
  const std::size_t bytes = kernels::forward_workspace_bytes(p);
  DeviceTensor<float> workspace(Shape{index_t(bytes / sizeof(float) + 1)});
  test::poison(workspace);
  kernels::forward(p, workspace.data(), bytes, nullptr);
  dash::cuda::check(cudaDeviceSynchronize(), "gla forward");
}

Outputs gpu_forward(const Case& c, const float* initial_state) {
  DeviceTensor<bfloat16> o(c.q_shape());
  DeviceTensor<float> s1(c.state_shape());
  test::poison(o), test::poison(s1);
  kernels::ForwardParams p;
  c.fill_sizes(p);
  p.q = c.q_d.data(), p.k = c.k_d.data(), p.v = c.v_d.data(), p.g = c.g_d.data();
  p.initial_state = initial_state;
  p.o = o.data(), p.final_state = s1.data();
  run_forward(p);
  return {dash::cuda::to_host_double(o), dash::cuda::to_host_double(s1)};
}

Outputs reference_forward(const Case& c, bool with_s0) {
  Outputs r{Tensor<double>(c.q_shape()), Tensor<double>(c.state_shape())};
  reference::forward_chunked<double>(c.q, c.k, c.v, c.g, c.scale, reference_chunk,
                                     with_s0 ? c.s0.view() : TensorView<const double>{}, r.o, r.s1);
  return r;
}

struct Gradients {
  Tensor<double> dq, dk, dv, dg, ds0;
};

// Runs the backward with a poisoned workspace of the size it asks for.
void run_backward(const kernels::BackwardParams& p) {
  const std::size_t bytes = kernels::backward_workspace_bytes(p);
  DeviceTensor<float> workspace(Shape{index_t(bytes / sizeof(float) + 1)});
  test::poison(workspace);
  kernels::backward(p, workspace.data(), bytes, nullptr);
  dash::cuda::check(cudaDeviceSynchronize(), "gla backward");
}

Gradients gpu_backward(const Case& c, bool with_s0, bool with_ds1) {
  DeviceTensor<bfloat16> dq(c.q_shape()), dk(c.kv_shape()), dv(c.kv_shape());
  DeviceTensor<float> dg(c.g.shape()), ds0(c.state_shape());
  kernels::BackwardParams p;
  c.fill_sizes(p);
  p.q = c.q_d.data(), p.k = c.k_d.data(), p.v = c.v_d.data(), p.g = c.g_d.data(), p.d_o = c.d_o_d.data();
  p.initial_state = with_s0 ? c.s0_d.data() : nullptr;
  p.d_final_state = with_ds1 ? c.ds1_d.data() : nullptr;
  p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data(), p.dg = dg.data();
  p.d_initial_state = with_s0 ? ds0.data() : nullptr;
  test::poison(dq), test::poison(dk), test::poison(dv), test::poison(dg), test::poison(ds0);
  run_backward(p);
  Gradients r{dash::cuda::to_host_double(dq), dash::cuda::to_host_double(dk), dash::cuda::to_host_double(dv), dash::cuda::to_host_double(dg),
              {}};
  if (with_s0) r.ds0 = dash::cuda::to_host_double(ds0);
  return r;
}

Gradients reference_backward(const Case& c, const Tensor<double>& k, const Tensor<double>& v, bool with_s0,
                             bool with_ds1) {
  Gradients r{Tensor<double>(c.q.shape(), 0.0), Tensor<double>(k.shape(), 0.0), Tensor<double>(v.shape(), 0.0),
              Tensor<double>(c.g.shape(), 0.0), Tensor<double>(c.state_shape(), 0.0)};
  const TensorView<const double> none{};
  reference::backward_chunked<double>(c.q, k, v, c.g, c.scale, reference_chunk, with_s0 ? c.s0.view() : none, c.d_o,
                                      with_ds1 ? c.ds1.view() : none, r.dq, r.dk, r.dv, r.dg,
                                      with_s0 ? r.ds0.view() : TensorView<double>{});
  return r;
}

// ‖got − want‖ / ‖σ‖ for dg, σ as in the header comment.
double gate_gradient_error(const Case& c, const Tensor<double>& got, const Gradients& per_head, bool with_s0,
                           bool with_ds1) {
  const index_t B = c.L.B, T = c.L.T, H = c.L.H, D = c.L.D;
  const Tensor<double> k = repeat_heads(c.k, H);
  const Outputs fwd = reference_forward(c, with_s0);
  double diff = 0, norm = 0;
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h) {
      double sigma_sq = 0;
      if (with_ds1)
        for (index_t i = 0; i < D; ++i)
          for (index_t j = 0; j < D; ++j) sigma_sq += std::pow(c.ds1(b, h, i, j) * fwd.s1(b, h, i, j), 2);
      for (index_t t = T - 1; t >= 0; --t) {
        double q_dq = 0, k_dk = 0;
        for (index_t d = 0; d < D; ++d)
          q_dq += c.q(b, t, h, d) * per_head.dq(b, t, h, d), k_dk += k(b, t, h, d) * per_head.dk(b, t, h, d);
        sigma_sq += q_dq * q_dq + k_dk * k_dk;
        const double e = got(b, t, h) - per_head.dg(b, t, h);
        if (!std::isfinite(e)) return INFINITY;
        diff += e * e, norm += sigma_sq;
      }
    }
  return std::sqrt(diff / norm);
}

// The layouts every comparison runs on: T around the chunk of 64, GQA groups 1 and 3, d_head
// 8, 40, 64, 128 and ones that are not multiples of 8, strong and weak decays, sequences long
// enough for many chunks; plus three drawn per run.
std::vector<Layout> layouts(Rng& rng) {
  std::vector<Layout> all = {
      {1, 1, 2, 2, 8, 16},   {2, 7, 3, 1, 40, 1},    {1, 63, 2, 2, 64, 16},   {2, 65, 6, 2, 128, 1},
      {1, 130, 4, 4, 128, 16}, {1, 64, 3, 3, 13, 1}, {2, 200, 2, 2, 32, 16},  {1, 130, 3, 1, 100, 16},
      {1, 65, 3, 1, 8, 1},   {1, 130, 2, 2, 64, 1},
      // long sequences: many chunk states
      {1, 1000, 2, 2, 64, 16}, {1, 777, 3, 1, 40, 1}, {2, 520, 2, 2, 128, 16},
      // enough heads for the forward's wide state tiles (sweep.cuh: wide_state_heads)
      {4, 150, 12, 4, 128, 16},
  };
  static_assert(4 * 12 >= kernels::detail::wide_state_heads);
  const index_t lengths[] = {1, 7, 63, 65, 130};
  const index_t widths[] = {8, 40, 64, 128};
  for (int i = 0; i < 3; ++i) {
    const index_t group = rng.below(2) ? 3 : 1, kv = index_t(1 + rng.below(2));
    const index_t D = i == 2 ? index_t(1 + rng.below(128)) : widths[rng.below(4)];
    all.push_back({index_t(1 + rng.below(2)), lengths[rng.below(5)], kv * group, kv, D, rng.below(2) ? 1.0 : 16.0});
  }
  return all;
}

struct Worst {
  const char* name;
  double value = 0;
  void update(double x) { value = std::max(value, x); }
  ~Worst() { std::printf("  worst %-28s %.3e\n", name, value); }
};

}  // namespace

TEST_CASE("gla forward matches the chunked reference") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("gla forward");
  Worst o_err{"forward o rel-L2"}, s_err{"forward final state rel-L2"};
  for (const Layout& L : layouts(rng)) {
    for (const bool with_s0 : {false, true}) {
      describe(L);
      CAPTURE(with_s0);
      const Case c(L, rng);
      const Outputs got = gpu_forward(c, with_s0 ? c.s0_d.data() : nullptr), want = reference_forward(c, with_s0);
      const double eo = test::relative_l2(got.o, want.o), es = test::relative_l2(got.s1, want.s1);
      o_err.update(eo), s_err.update(es);
      CHECK(eo <= test::bf16_tolerance);
      CHECK(es <= test::bf16_tolerance);
    }
  }
}

TEST_CASE("gla backward matches the chunked reference") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("gla backward");
  Worst dq_err{"backward dq rel-L2"}, dk_err{"backward dk rel-L2"}, dv_err{"backward dv rel-L2"};
  Worst dg_err{"backward dg error / sigma"}, dg_plain{"backward dg rel-L2 (plain)"},
      ds0_err{"backward d initial state rel-L2"};
  int index = 0;
  for (const Layout& L : layouts(rng)) {
    const bool with_s0 = index % 2 == 1, with_ds1 = index % 3 != 0;
    ++index;
    describe(L);
    CAPTURE(with_s0);
    CAPTURE(with_ds1);
    const Case c(L, rng);
    const Gradients got = gpu_backward(c, with_s0, with_ds1);
    const Gradients want = reference_backward(c, c.k, c.v, with_s0, with_ds1);
    // dk per query head (before the group sum), for σ
    const Gradients repeated = L.H == L.Hkv ? Gradients{}
                                            : reference_backward(c, repeat_heads(c.k, L.H), repeat_heads(c.v, L.H),
                                                                 with_s0, with_ds1);
    const Gradients& per_head = L.H == L.Hkv ? want : repeated;
    const double eq = test::relative_l2(got.dq, want.dq), ek = test::relative_l2(got.dk, want.dk);
    const double ev = test::relative_l2(got.dv, want.dv);
    const double eg = gate_gradient_error(c, got.dg, per_head, with_s0, with_ds1), eg_plain = test::relative_l2(got.dg, want.dg);
    dq_err.update(eq), dk_err.update(ek), dv_err.update(ev), dg_err.update(eg), dg_plain.update(eg_plain);
    CHECK(eq <= test::bf16_tolerance);
    CHECK(ek <= test::bf16_tolerance);
    CHECK(ev <= test::bf16_tolerance);
    CHECK(eg <= test::bf16_tolerance);
    if (with_s0) {
      const double es = test::relative_l2(got.ds0, want.ds0);
      ds0_err.update(es);
      CHECK(es <= test::bf16_tolerance);
    }
  }
}

TEST_CASE("gla chunked forward equals recurrent decode over the same tokens") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("gla chunked == decode");
  Worst o_err{"decode vs chunked o"}, s_err{"decode vs chunked state"};
  Worst ro_err{"decode vs reference o"}, rs_err{"decode vs reference state"};
  for (const Layout& L : {Layout{2, 130, 6, 2, 64, 16}, Layout{1, 65, 2, 2, 128, 1}, Layout{1, 7, 3, 1, 8, 16},
                          Layout{2, 33, 2, 2, 21, 1}}) {
    describe(L);
    const Case c(L, rng);
    const Outputs chunked = gpu_forward(c, c.s0_d.data());

    DeviceTensor<float> state = device_f32(c.s0);
    DeviceTensor<bfloat16> o(c.q_shape());
    test::poison(o);
    kernels::DecodeParams p;
    c.fill_sizes(p);
    p.q = c.q_d.data(), p.k = c.k_d.data(), p.v = c.v_d.data(), p.g = c.g_d.data(), p.o = o.data();
    p.state = state.data();
    kernels::decode(p, nullptr);
    dash::cuda::check(cudaDeviceSynchronize(), "gla decode");
    const Tensor<double> decoded_o = dash::cuda::to_host_double(o), decoded_s = dash::cuda::to_host_double(state);

    Outputs want{Tensor<double>(c.q_shape()), Tensor<double>(c.state_shape())};
    reference::forward_recurrent<double>(c.q, c.k, c.v, c.g, c.scale, c.s0, want.o, want.s1);

    const double eo = test::relative_l2(decoded_o, chunked.o), es = test::relative_l2(decoded_s, chunked.s1);
    const double ro = test::relative_l2(decoded_o, want.o), rs = test::relative_l2(decoded_s, want.s1);
    o_err.update(eo), s_err.update(es), ro_err.update(ro), rs_err.update(rs);
    CHECK(eo <= test::bf16_tolerance);
    CHECK(es <= test::bf16_tolerance);
    CHECK(ro <= test::bf16_tolerance);
    CHECK(rs <= test::fp32_tolerance);
  }
}


TEST_CASE("gla decode one token per call equals one call over all tokens") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("gla decode steps");
  const Case c(Layout{2, 9, 6, 3, 64, 16}, rng);
  const auto run = [](const Case& part, DeviceTensor<float>& state) {
    DeviceTensor<bfloat16> o(part.q_shape());
    test::poison(o);
    kernels::DecodeParams p;
    part.fill_sizes(p);
    p.q = part.q_d.data(), p.k = part.k_d.data(), p.v = part.v_d.data(), p.g = part.g_d.data();
    p.o = o.data(), p.state = state.data();
    kernels::decode(p, nullptr);
    dash::cuda::check(cudaDeviceSynchronize(), "gla decode");
    return dash::cuda::to_host_double(o);
  };
  DeviceTensor<float> whole_state = device_f32(c.s0), step_state = device_f32(c.s0);
  const Tensor<double> whole_o = run(c, whole_state);
  double max_diff = 0;
  for (index_t t = 0; t < c.L.T; ++t) {
    const Tensor<double> o = run(c.slice(t, 1), step_state);
    const Tensor<double> want = tokens(whole_o, t, 1);
    for (index_t i = 0; i < o.numel(); ++i) max_diff = std::max(max_diff, std::abs(o.data()[i] - want.data()[i]));
  }
  const Tensor<double> a = dash::cuda::to_host_double(whole_state), b = dash::cuda::to_host_double(step_state);
  for (index_t i = 0; i < a.numel(); ++i) max_diff = std::max(max_diff, std::abs(a.data()[i] - b.data()[i]));
  CHECK(max_diff == 0);  // the same fp32 operations in the same order
}

TEST_CASE("gla a split sequence carrying its state equals the whole sequence") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("gla split");
  for (const Layout& L : {Layout{2, 130, 6, 2, 64, 16}, Layout{1, 200, 2, 2, 128, 1}, Layout{1, 70, 3, 3, 40, 16},
                          Layout{1, 1100, 2, 2, 64, 16}}) {
    describe(L);
    const Case c(L, rng);
    const index_t split = 57;
    const Case first = c.slice(0, split), rest = c.slice(split, L.T - split);
    const Outputs whole = gpu_forward(c, c.s0_d.data());
    const Outputs a = gpu_forward(first, first.s0_d.data());
    // The second part runs in place: its final state overwrites its initial state.
    DeviceTensor<float> carried = device_f32(a.s1);
    DeviceTensor<bfloat16> o(rest.q_shape());
    test::poison(o);
    kernels::ForwardParams p;
    rest.fill_sizes(p);
    p.q = rest.q_d.data(), p.k = rest.k_d.data(), p.v = rest.v_d.data(), p.g = rest.g_d.data();
    p.initial_state = carried.data(), p.final_state = carried.data(), p.o = o.data();
    run_forward(p);
    const Tensor<double> o_rest = dash::cuda::to_host_double(o), s_end = dash::cuda::to_host_double(carried);
    const double e_first = test::relative_l2(a.o, tokens(whole.o, 0, split));
    const double e_rest = test::relative_l2(o_rest, tokens(whole.o, split, L.T - split));
    const double e_state = test::relative_l2(s_end, whole.s1);
    std::printf("  split: o %.3e / %.3e, final state %.3e\n", e_first, e_rest, e_state);
    CHECK(e_first <= test::bf16_tolerance);
    CHECK(e_rest <= test::bf16_tolerance);
    CHECK(e_state <= test::bf16_tolerance);
  }
}

TEST_CASE("gla GQA equals repeated k/v heads") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("gla gqa");
  const Case gqa(Layout{2, 100, 6, 2, 64, 16}, rng);
  const Case mha = gqa.repeated();
  const auto max_diff = [](const Tensor<double>& a, const Tensor<double>& b) {
    double m = 0;
    for (index_t i = 0; i < a.numel(); ++i) m = std::max(m, std::abs(a.data()[i] - b.data()[i]));
    return m;
  };
  const Outputs f_gqa = gpu_forward(gqa, gqa.s0_d.data()), f_mha = gpu_forward(mha, mha.s0_d.data());
  CHECK(max_diff(f_gqa.o, f_mha.o) == 0);  // the same products on the same values
  CHECK(max_diff(f_gqa.s1, f_mha.s1) == 0);
  const Gradients b_gqa = gpu_backward(gqa, true, true), b_mha = gpu_backward(mha, true, true);
  CHECK(max_diff(b_gqa.dq, b_mha.dq) == 0);
  CHECK(max_diff(b_gqa.dg, b_mha.dg) == 0);
  CHECK(max_diff(b_gqa.ds0, b_mha.ds0) == 0);
  // dk, dv: fp32 group sums rounded once, against bf16 per-head gradients summed here.
  const index_t group = gqa.L.H / gqa.L.Hkv;
  for (const auto& [got, per_head] : {std::pair{&b_gqa.dk, &b_mha.dk}, std::pair{&b_gqa.dv, &b_mha.dv}}) {
    Tensor<double> summed(got->shape(), 0.0);
    for (index_t b = 0; b < gqa.L.B; ++b)
      for (index_t t = 0; t < gqa.L.T; ++t)
        for (index_t h = 0; h < gqa.L.H; ++h)
          for (index_t d = 0; d < gqa.L.D; ++d) summed(b, t, h / group, d) += (*per_head)(b, t, h, d);
    CHECK(test::relative_l2(*got, summed) <= test::bf16_tolerance);
  }
}

namespace {

// q, k, v (or dq, dk, dv) side by side in the rows of one [B, T, width] bf16 buffer, as one
// projection writes them: width = (H + 2·Hkv)·D + pad.
struct Fused {
  index_t width = 0, k_col = 0, v_col = 0;  // q at column 0
  Tensor<double> host;
  DeviceTensor<bfloat16> data;

  Fused(const Case& c, index_t pad)
      : width((c.L.H + 2 * c.L.Hkv) * c.L.D + pad), k_col(c.L.H * c.L.D), v_col(k_col + c.L.Hkv * c.L.D) {}

  // Element (b, t, column) of a [B, T, heads, D] tensor placed at `col0`.
  template <class F>
  void each(const Case& c, index_t col0, index_t heads, F&& f) const {
    for (index_t b = 0; b < c.L.B; ++b)
      for (index_t t = 0; t < c.L.T; ++t)
        for (index_t i = 0; i < heads * c.L.D; ++i) f(b, t, i, (b * c.L.T + t) * width + col0 + i);
  }
};

// The inputs of c in one buffer whose pad columns hold NaN, so that reading them would show.
Fused fused_inputs(const Case& c, index_t pad) {
  Fused f(c, pad);
  f.host = Tensor<double>(Shape{c.L.B, c.L.T, f.width}, std::numeric_limits<double>::quiet_NaN());
  const index_t D = c.L.D;
  const auto place = [&](const Tensor<double>& x, index_t col0, index_t heads) {
    f.each(c, col0, heads, [&](index_t b, index_t t, index_t i, index_t at) { f.host.data()[at] = x(b, t, i / D, i % D); });
  };
  place(c.q, 0, c.L.H), place(c.k, f.k_col, c.L.Hkv), place(c.v, f.v_col, c.L.Hkv);
  f.data = dash::cuda::to_device_bf16<double>(f.host.view());
  return f;
}

// Whether the [B, T, heads, D] tensor `want` sits bit for bit at col0 of the fused rows `got`.
bool same_at(const Case& c, const Fused& layout, const Tensor<double>& got, index_t col0, index_t heads,
             const Tensor<double>& want) {
  bool same = true;
  layout.each(c, col0, heads, [&](index_t b, index_t t, index_t i, index_t at) {
    same = same && got.data()[at] == want(b, t, i / c.L.D, i % c.L.D);
  });
  return same;
}

}  // namespace

TEST_CASE("gla q, k, v and dq, dk, dv as rows of fused buffers equal dense tensors") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("gla strides");
  // pad 8 keeps 16-byte rows (vector loads); pad 3 takes the scalar path.
  for (const auto& [L, pad] : {std::pair{Layout{2, 130, 6, 2, 64, 16}, 8}, std::pair{Layout{1, 200, 4, 1, 128, 1}, 16},
                               std::pair{Layout{2, 70, 3, 1, 40, 16}, 8}, std::pair{Layout{1, 9, 2, 2, 8, 1}, 8},
                               std::pair{Layout{1, 100, 3, 3, 64, 16}, 3}, std::pair{Layout{1, 1000, 2, 2, 64, 16}, 24}}) {
    describe(L);
    CAPTURE(pad);
    const Case c(L, rng);
    const Fused in = fused_inputs(c, pad);
    const bfloat16* base = in.data.data();

    const Outputs dense = gpu_forward(c, c.s0_d.data());
    DeviceTensor<bfloat16> o(c.q_shape());
    DeviceTensor<float> s1(c.state_shape());
    test::poison(o), test::poison(s1);
    kernels::ForwardParams f;
    c.fill_sizes(f);
    f.q = base, f.k = base + in.k_col, f.v = base + in.v_col, f.g = c.g_d.data();
    f.q_stride = f.k_stride = f.v_stride = in.width;
    f.initial_state = c.s0_d.data(), f.o = o.data(), f.final_state = s1.data();
    run_forward(f);
    CHECK(test::relative_l2(dash::cuda::to_host_double(o), dense.o) == 0);
    CHECK(test::relative_l2(dash::cuda::to_host_double(s1), dense.s1) == 0);

    const Gradients want = gpu_backward(c, true, true);
    Fused out(c, pad);
    out.data = DeviceTensor<bfloat16>(Shape{L.B, L.T, out.width});
    DeviceTensor<float> dg(c.g.shape()), ds0(c.state_shape());
    test::poison(out.data), test::poison(dg), test::poison(ds0);
    kernels::BackwardParams b;
    c.fill_sizes(b);
    b.q = base, b.k = base + in.k_col, b.v = base + in.v_col, b.g = c.g_d.data(), b.d_o = c.d_o_d.data();
    b.q_stride = b.k_stride = b.v_stride = in.width;
    b.initial_state = c.s0_d.data(), b.d_final_state = c.ds1_d.data();
    b.dq = out.data.data(), b.dk = out.data.data() + out.k_col, b.dv = out.data.data() + out.v_col;
    b.dq_stride = b.dk_stride = b.dv_stride = out.width;
    b.dg = dg.data(), b.d_initial_state = ds0.data();
    run_backward(b);
    const Tensor<double> grads = dash::cuda::to_host_double(out.data);
    CHECK(same_at(c, out, grads, 0, L.H, want.dq));
    CHECK(same_at(c, out, grads, out.k_col, L.Hkv, want.dk));
    CHECK(same_at(c, out, grads, out.v_col, L.Hkv, want.dv));
    CHECK(test::relative_l2(dash::cuda::to_host_double(dg), want.dg) == 0);
    CHECK(test::relative_l2(dash::cuda::to_host_double(ds0), want.ds0) == 0);
    bool pad_untouched = true;  // still the poison's NaN
    for (index_t row = 0; row < L.B * L.T; ++row)
      for (index_t col = out.v_col + L.Hkv * L.D; col < out.width; ++col)
        pad_untouched = pad_untouched && std::isnan(grads.data()[row * out.width + col]);
    CHECK(pad_untouched);
  }
}

TEST_CASE("gla small shapes: forward, backward, decode (sanitizer subset)") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("gla small");
  // Width 128 with GQA and a partial last chunk as well.
  for (const Layout& L : {Layout{1, 65, 3, 1, 40, 1}, Layout{1, 9, 2, 2, 13, 16}, Layout{1, 130, 2, 1, 128, 1}}) {
    describe(L);
    const Case c(L, rng);
    const Outputs got = gpu_forward(c, c.s0_d.data()), want = reference_forward(c, true);
    CHECK(test::relative_l2(got.o, want.o) <= test::bf16_tolerance);
    CHECK(test::relative_l2(got.s1, want.s1) <= test::bf16_tolerance);
    const Gradients g = gpu_backward(c, true, true), r = reference_backward(c, c.k, c.v, true, true);
    CHECK(test::relative_l2(g.dq, r.dq) <= test::bf16_tolerance);
    CHECK(test::relative_l2(g.dk, r.dk) <= test::bf16_tolerance);
    CHECK(test::relative_l2(g.dv, r.dv) <= test::bf16_tolerance);
    CHECK(test::relative_l2(g.ds0, r.ds0) <= test::bf16_tolerance);
    DeviceTensor<float> state = device_f32(c.s0);
    DeviceTensor<bfloat16> o(c.q_shape());
    test::poison(o);
    kernels::DecodeParams p;
    c.fill_sizes(p);
    p.q = c.q_d.data(), p.k = c.k_d.data(), p.v = c.v_d.data(), p.g = c.g_d.data(), p.o = o.data();
    p.state = state.data();
    kernels::decode(p, nullptr);
    dash::cuda::check(cudaDeviceSynchronize(), "gla decode");
    CHECK(test::relative_l2(dash::cuda::to_host_double(o), got.o) <= test::bf16_tolerance);
  }
}

namespace {

// Arguments that pass every check, with pointers that are never dereferenced: the checks run
// before any CUDA call, so these cases need no device.
alignas(16) float fake_storage[16];
template <class T>
T* fake() {
  return reinterpret_cast<T*>(fake_storage);
}

template <class P>
void fill_valid(P& p) {
  p.q = fake<const bfloat16>(), p.k = fake<const bfloat16>(), p.v = fake<const bfloat16>();
  p.g = fake<const float>();
  p.batch = 2, p.length = 100, p.n_heads = 6, p.n_kv_heads = 2, p.d_head = 64, p.scale = 0.125f;
}

// The message each size error is refused with, for any launcher.
template <class P, class Launch>
void check_size_errors(Launch launch) {
  const auto refused = [&](auto change, const char* part) {
    P p;
    fill_valid(p);
    change(p);
    const std::string message = test::error_of([&] { launch(p); });
    CAPTURE(message);
    CHECK(test::contains(message, part));
  };
  refused([](P& p) { p.batch = 0; }, "batch");
  refused([](P& p) { p.length = 0; }, "length");
  refused([](P& p) { p.n_heads = 0; }, "n_heads");
  refused([](P& p) { p.n_kv_heads = 4; }, "n_kv_heads");
  refused([](P& p) { p.n_kv_heads = 0; }, "n_kv_heads");
  refused([](P& p) { p.d_head = 0; }, "d_head");
  refused([](P& p) { p.d_head = 129; }, "d_head");
  refused([](P& p) { p.scale = NAN; }, "scale");
  refused([](P& p) { p.q = nullptr; }, "q is null");
  refused([](P& p) { p.k = nullptr; }, "k is null");
  refused([](P& p) { p.v = nullptr; }, "v is null");
  refused([](P& p) { p.g = nullptr; }, "g (log decays) is null");
}

}  // namespace

TEST_CASE("gla forward refuses bad arguments without a device") {
  const auto launch = [](const kernels::ForwardParams& p) {
    kernels::forward(p, fake<void>(), std::size_t(1) << 40, nullptr);
  };
  check_size_errors<kernels::ForwardParams>([&](kernels::ForwardParams p) {
    p.o = fake<bfloat16>();
    launch(p);
  });
  kernels::ForwardParams p;
  fill_valid(p);
  CHECK(test::contains(test::error_of([&] { launch(p); }), "o is null"));
  // The state entering every chunk is kept in scratch.
  p.o = fake<bfloat16>(), p.batch = 1, p.length = 4000;
  const std::size_t bytes = kernels::forward_workspace_bytes(p);
  CHECK(bytes > 0);
  CHECK(test::contains(test::error_of([&] { kernels::forward(p, fake<void>(), bytes - 1, nullptr); }), "workspace of"));
  CHECK(test::contains(test::error_of([&] { kernels::forward(p, nullptr, bytes, nullptr); }), "workspace is null"));
  CHECK(test::contains(test::error_of([&] {
          kernels::forward(p, reinterpret_cast<char*>(fake<void>()) + 4, bytes, nullptr);
        }),
        "16-byte aligned"));
  p.d_head = 0;
  CHECK(test::contains(test::error_of([&] { (void)kernels::forward_workspace_bytes(p); }), "d_head"));
}

TEST_CASE("gla forward and backward refuse token strides below a dense row without a device") {
  // fill_valid: H = 6, Hkv = 2, D = 64, so a dense row is 384 elements of q and 128 of k and v.
  using P = kernels::BackwardParams;
  const auto backward_error = [](void (*change)(P&)) {
    P p;
    fill_valid(p);
    p.d_o = fake<const bfloat16>();
    p.dq = fake<bfloat16>(), p.dk = fake<bfloat16>(), p.dv = fake<bfloat16>(), p.dg = fake<float>();
    change(p);
    return test::error_of([&] { kernels::backward(p, fake<void>(), std::size_t(1) << 40, nullptr); });
  };
  const auto forward_error = [](void (*change)(P&)) {
    P inputs;
    fill_valid(inputs);
    change(inputs);
    kernels::ForwardParams p;
    static_cast<kernels::Inputs&>(p) = inputs;
    p.o = fake<bfloat16>();
    return test::error_of([&] { kernels::forward(p, fake<void>(), std::size_t(1) << 40, nullptr); });
  };
  const std::pair<void (*)(P&), const char*> inputs[] = {
      {[](P& p) { p.q_stride = 383; }, "q_stride"},
      {[](P& p) { p.q_stride = -384; }, "q_stride"},
      {[](P& p) { p.k_stride = 127; }, "k_stride"},
      {[](P& p) { p.v_stride = 1; }, "v_stride"},
  };
  for (const auto& [change, name] : inputs) {
    CAPTURE(name);
    CHECK(test::contains(forward_error(change), name));
    CHECK(test::contains(backward_error(change), name));
  }
  const std::pair<void (*)(P&), const char*> gradients[] = {
      {[](P& p) { p.dq_stride = 100; }, "dq_stride"},
      {[](P& p) { p.dk_stride = 64; }, "dk_stride"},
      {[](P& p) { p.dv_stride = -1; }, "dv_stride"},
  };
  for (const auto& [change, name] : gradients) {
    CAPTURE(name);
    CHECK(test::contains(backward_error(change), name));
  }
}

TEST_CASE("gla backward refuses bad arguments without a device") {
  const auto with_outputs = [](kernels::BackwardParams p) {
    p.d_o = fake<const bfloat16>();
    p.dq = fake<bfloat16>(), p.dk = fake<bfloat16>(), p.dv = fake<bfloat16>(), p.dg = fake<float>();
    return p;
  };
  const auto launch = [](const kernels::BackwardParams& p, std::size_t bytes) {
    kernels::backward(p, fake<void>(), bytes, nullptr);
  };
  check_size_errors<kernels::BackwardParams>([&](const kernels::BackwardParams& p) {
    launch(with_outputs(p), std::size_t(1) << 40);
  });
  kernels::BackwardParams valid;
  fill_valid(valid);
  valid = with_outputs(valid);
  const std::size_t bytes = kernels::backward_workspace_bytes(valid);
  CHECK(bytes > 0);
  const auto refused = [&](auto change, const char* part) {
    kernels::BackwardParams p = valid;
    std::size_t given = bytes;
    void* workspace = fake<void>();
    change(p, given, workspace);
    const std::string message = test::error_of([&] { kernels::backward(p, workspace, given, nullptr); });
    CAPTURE(message);
    CHECK(test::contains(message, part));
  };
  using P = kernels::BackwardParams;
  refused([](P& p, std::size_t&, void*&) { p.d_o = nullptr; }, "d_o is null");
  refused([](P& p, std::size_t&, void*&) { p.dq = nullptr; }, "dq is null");
  refused([](P& p, std::size_t&, void*&) { p.dk = nullptr; }, "dk is null");
  refused([](P& p, std::size_t&, void*&) { p.dv = nullptr; }, "dv is null");
  refused([](P& p, std::size_t&, void*&) { p.dg = nullptr; }, "dg is null");
  refused([](P&, std::size_t& n, void*&) { n -= 1; }, "workspace of");
  refused([](P&, std::size_t&, void*& w) { w = nullptr; }, "workspace is null");
  refused([](P&, std::size_t&, void*& w) { w = reinterpret_cast<char*>(fake<void>()) + 4; }, "16-byte aligned");
  refused(
      [](P& p, std::size_t&, void*&) {
        p.d_final_state = fake<const float>();
        p.d_initial_state = fake<float>();
      },
      "must not alias");
  // With a final-state gradient the workspace also holds the forward's final state.
  kernels::BackwardParams with_ds1 = valid;
  with_ds1.d_final_state = fake<const float>();
  CHECK(kernels::backward_workspace_bytes(with_ds1) > bytes);
  kernels::BackwardParams bad = valid;
  bad.d_head = 200;
  CHECK(test::contains(test::error_of([&] { (void)kernels::backward_workspace_bytes(bad); }), "d_head"));
}

TEST_CASE("gla decode refuses bad arguments without a device") {
  const auto launch = [](kernels::DecodeParams p) {
    p.o = fake<bfloat16>(), p.state = fake<float>();
    kernels::decode(p, nullptr);
  };
  check_size_errors<kernels::DecodeParams>(launch);
  kernels::DecodeParams p;
  fill_valid(p);
  p.o = fake<bfloat16>();
  CHECK(test::contains(test::error_of([&] { kernels::decode(p, nullptr); }), "state is null"));
  p.state = fake<float>(), p.o = nullptr;
  CHECK(test::contains(test::error_of([&] { kernels::decode(p, nullptr); }), "o is null"));
}

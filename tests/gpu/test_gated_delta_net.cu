// GatedDeltaNet CUDA kernels (dash::cuda::gdn) against the Eigen reference in double on the
// same bf16-rounded inputs, and identities on the GPU: chunked == recurrent decode, a split
// sequence carried by its state == the whole, GQA == repeated state heads, q, k, v (and dq, dk,
// dv) as column blocks of fused row-major buffers == the dense layout, bit for bit, and the
// backward from a forward's kept workspace == the recomputing backward, bit for bit.
//
// Tolerances (relative L2): o, dq, dk, dv are bf16 outputs (test::bf16_tolerance). The final
// state, d_initial_state, dg and dβ are stored in fp32 but come out of tensor-core products whose
// operands (K̂, Q̂, W, the checkpoints S0 and dS, dR) are rounded to bf16, so they carry bf16-level
// error too; dg and dβ are moreover sums of a few terms of opposite sign (the state, output and
// key-key paths), which can lose a factor of a few in relative accuracy. They are held to
// state_tolerance (1e-2) and gate_tolerance (3e-2). The decode kernel is fp32 throughout and its
// state meets test::fp32_tolerance.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "dash/core/cuda.hpp"
#include "dash/core/dtype.hpp"
#include "dash/ops/gated_delta_net/cuda.cuh"
#include "dash/ops/gated_delta_net/eigen.hpp"
#include "support/compare.hpp"
#include "support/errors.hpp"
#include "support/gpu.hpp"
#include "support/random.hpp"

using namespace dash;
namespace gdn = dash::cuda::gdn;
using cuda::bfloat16;
using cuda::DeviceTensor;

namespace {

constexpr double state_tolerance = 1e-2;
constexpr double gate_tolerance = 3e-2;
constexpr float eps = 1e-6f;

enum class Decay { weak, strong, mixed };
enum class Keep { low, mid, high };  // β near 0, spread, near 1

struct Case {
  index_t B, T, H, Hs, D;
  Decay decay;
  Keep beta;
  bool with_initial_state, with_d_final;
  float scale = 1.f;
};

std::string describe(const Case& c) {
  static const char* decay[] = {"weak", "strong", "mixed"};
  static const char* beta[] = {"low", "mid", "high"};
  return "B=" + std::to_string(c.B) + " T=" + std::to_string(c.T) + " H=" + std::to_string(c.H) +
         " Hs=" + std::to_string(c.Hs) + " D=" + std::to_string(c.D) + " decay=" + decay[int(c.decay)] +
         " beta=" + beta[int(c.beta)] + (c.with_initial_state ? " +S0" : "") + (c.with_d_final ? " +dS_T" : "");
}

double to_bf16(double x) { return double(float(bf16(float(x)))); }
double to_f32(double x) { return double(float(x)); }

// Inputs in double, already rounded to what the device receives (bf16 or fp32).
struct Inputs {
  Tensor<double> q, k, v, g, beta, s0, d_o, d_final;
};

Tensor<double> rounded(Shape shape, Rng& rng, double stddev, double (*round)(double)) {
  Tensor<double> t = test::random_tensor<double>(shape, rng, stddev);
  for (auto& x : t.flat()) x = round(x);
  return t;
}

Inputs make_inputs(const Case& c, Rng& rng) {
  Inputs in;
  in.q = rounded(Shape{c.B, c.T, c.H, c.D}, rng, 1.0, to_bf16);
  in.k = rounded(Shape{c.B, c.T, c.Hs, c.D}, rng, 1.0, to_bf16);
  in.v = rounded(Shape{c.B, c.T, c.Hs, c.D}, rng, 1.0, to_bf16);
  in.d_o = rounded(Shape{c.B, c.T, c.H, c.D}, rng, 1.0, to_bf16);
  in.g = Tensor<double>(Shape{c.B, c.T, c.Hs});
  in.beta = Tensor<double>(Shape{c.B, c.T, c.Hs});
  for (index_t i = 0; i < in.g.numel(); ++i) {
    const bool strong = c.decay == Decay::strong || (c.decay == Decay::mixed && rng.uniform() < 0.5);
    const double a = strong ? rng.uniform(2.0, 8.0) : rng.uniform(1e-3, 0.05);
    in.g.data()[i] = to_f32(-a);
    const double b = c.beta == Keep::low ? rng.uniform(1e-3, 0.05)
                     : c.beta == Keep::high ? rng.uniform(0.95, 0.999)
                                            : rng.uniform(0.05, 0.95);
    in.beta.data()[i] = to_f32(b);
  }
  if (c.with_initial_state) in.s0 = rounded(Shape{c.B, c.Hs, c.D, c.D}, rng, 0.5, to_f32);
  if (c.with_d_final) in.d_final = rounded(Shape{c.B, c.Hs, c.D, c.D}, rng, 0.5, to_f32);
  return in;
}

template <class T>
TensorView<const T> optional(const Tensor<T>& t) {
  return t.empty() ? TensorView<const T>{} : t.view();
}

struct Results {
  Tensor<double> o, final_state, dq, dk, dv, dg, dbeta, d_initial;
};

// The reference: the op's normalisation, then the chunked form (chunk 64) in double.
Results reference(const Case& c, const Inputs& in, bool with_backward) {
  const index_t n_chunks = eigen::gdn::chunk_count(c.T, gdn::chunk);
  Tensor<double> qh(in.q.shape()), kh(in.k.shape()), q_inv(Shape{c.B, c.T, c.H}), k_inv(Shape{c.B, c.T, c.Hs});
  eigen::gdn::l2_normalize<double>(in.q.view(), qh.view(), q_inv.view(), double(eps));
  eigen::gdn::l2_normalize<double>(in.k.view(), kh.view(), k_inv.view(), double(eps));
  Results r;
  r.o = Tensor<double>(Shape{c.B, c.T, c.H, c.D});
  Tensor<double> states(Shape{c.B, c.Hs, n_chunks + 1, c.D, c.D});
  eigen::gdn::forward_chunked<double>(qh.view(), kh.view(), in.v.view(), in.g.view(), in.beta.view(), optional(in.s0),
                                      r.o.view(), states.view(), gdn::chunk, c.scale);
  r.final_state = Tensor<double>(Shape{c.B, c.Hs, c.D, c.D});
  for (index_t b = 0; b < c.B; ++b)
    for (index_t s = 0; s < c.Hs; ++s)
      eigen::gdn::state_at(r.final_state.view(), b, s) = eigen::gdn::state_at(states.view(), b, s, n_chunks);
  if (!with_backward) return r;
  Tensor<double> dqh(in.q.shape(), 0.0), dkh(in.k.shape(), 0.0);
  r.dv = Tensor<double>(in.v.shape(), 0.0);
  r.dg = Tensor<double>(in.g.shape(), 0.0);
  r.dbeta = Tensor<double>(in.beta.shape(), 0.0);
  r.d_initial = Tensor<double>(Shape{c.B, c.Hs, c.D, c.D}, 0.0);
  eigen::gdn::backward_chunked<double>(qh.view(), kh.view(), in.v.view(), in.g.view(), in.beta.view(), states.view(),
                                       in.d_o.view(), optional(in.d_final), dqh.view(), dkh.view(), r.dv.view(),
                                       r.dg.view(), r.dbeta.view(), r.d_initial.view(), gdn::chunk, c.scale);
  r.dq = Tensor<double>(in.q.shape(), 0.0);
  r.dk = Tensor<double>(in.k.shape(), 0.0);
  eigen::gdn::l2_normalize_backward<double>(qh.view(), q_inv.view(), dqh.view(), r.dq.view());
  eigen::gdn::l2_normalize_backward<double>(kh.view(), k_inv.view(), dkh.view(), r.dk.view());
  return r;
}

DeviceTensor<float> to_device_f32(const Tensor<double>& x) {
  Tensor<float> f(x.shape());
  for (index_t i = 0; i < x.numel(); ++i) f.data()[i] = float(x.data()[i]);
  return DeviceTensor<float>::from_host(f.view());
}

template <class T>
TensorView<const T> optional(const DeviceTensor<T>& t) {
  return t.numel() > 0 && t.data() ? t.view() : TensorView<const T>{};
}
template <class T>
TensorView<T> optional(DeviceTensor<T>& t) {
  return t.numel() > 0 && t.data() ? t.view() : TensorView<T>{};
}

// Device copies of the inputs.
struct DeviceInputs {
  DeviceTensor<bfloat16> q, k, v, d_o;
  DeviceTensor<float> g, beta, s0, d_final;
  explicit DeviceInputs(const Inputs& in)
      : q(cuda::to_device_bf16(in.q.view())),
        k(cuda::to_device_bf16(in.k.view())),
        v(cuda::to_device_bf16(in.v.view())),
        d_o(cuda::to_device_bf16(in.d_o.view())),
        g(to_device_f32(in.g)),
        beta(to_device_f32(in.beta)) {
    if (!in.s0.empty()) s0 = to_device_f32(in.s0);
    if (!in.d_final.empty()) d_final = to_device_f32(in.d_final);
  }
};

// A workspace filled with NaN, so that a buffer read before it is written shows.
struct PoisonedWorkspace {
  cuda::Workspace space;
  void* data = nullptr;
  std::size_t bytes = 0;
  explicit PoisonedWorkspace(std::size_t n) : bytes(n) {
    space.reserve(n);
    data = space.carve<unsigned char>(n, "gdn test workspace");
    cuda::check(cudaMemset(data, 0xFF, n), "poison workspace");
  }
};

Results run_device(const Case& c, const Inputs& in, bool with_backward) {
  DeviceInputs d(in);
  Results r;
  {
    DeviceTensor<bfloat16> o(Shape{c.B, c.T, c.H, c.D});
    DeviceTensor<float> final_state(Shape{c.B, c.Hs, c.D, c.D});
    test::poison(o);
    test::poison(final_state);
    gdn::Forward args{d.q.view(), d.k.view(), d.v.view(), d.g.view(), d.beta.view(), o.view(), optional(d.s0),
                      final_state.view(), c.scale, eps};
    PoisonedWorkspace ws(gdn::workspace_bytes(args));
    gdn::forward(args, ws.data, ws.bytes, nullptr);
    cuda::check(cudaDeviceSynchronize(), "gdn forward");
    r.o = cuda::to_host_double(o);
    r.final_state = cuda::to_host_double(final_state);
  }
  if (!with_backward) return r;
  DeviceTensor<bfloat16> dq(in.q.shape()), dk(in.k.shape()), dv(in.v.shape());
  DeviceTensor<float> dg(in.g.shape()), dbeta(in.beta.shape()), d_initial(Shape{c.B, c.Hs, c.D, c.D});
  test::poison(dq), test::poison(dk), test::poison(dv), test::poison(dg), test::poison(dbeta);
  test::poison(d_initial);
  gdn::Backward args{d.q.view(), d.k.view(), d.v.view(), d.g.view(), d.beta.view(), optional(d.s0), d.d_o.view(),
                     optional(d.d_final), dq.view(), dk.view(), dv.view(), dg.view(), dbeta.view(),
                     d_initial.view(), c.scale, eps};
  PoisonedWorkspace ws(gdn::workspace_bytes(args));
  gdn::backward(args, ws.data, ws.bytes, nullptr);
  cuda::check(cudaDeviceSynchronize(), "gdn backward");
  r.dq = cuda::to_host_double(dq), r.dk = cuda::to_host_double(dk), r.dv = cuda::to_host_double(dv);
  r.dg = cuda::to_host_double(dg), r.dbeta = cuda::to_host_double(dbeta);
  r.d_initial = cuda::to_host_double(d_initial);
  return r;
}

// Runs the decode kernel over all T tokens from `state` (advanced in place on the host copy).
Tensor<double> run_decode(const Case& c, const Inputs& in, Tensor<double>& state) {
  DeviceInputs d(in);
  DeviceTensor<float> S = to_device_f32(state);
  DeviceTensor<bfloat16> o(Shape{c.B, c.T, c.H, c.D});
  test::poison(o);
  gdn::decode(gdn::Decode{d.q.view(), d.k.view(), d.v.view(), d.g.view(), d.beta.view(), S.view(), o.view(), c.scale,
                          eps},
              nullptr);
  cuda::check(cudaDeviceSynchronize(), "gdn decode");
  state = cuda::to_host_double(S);
  return cuda::to_host_double(o);
}

void compare_forward(const Case& c, const Results& got, const Results& want) {
  const double o = test::relative_l2(got.o, want.o), s = test::relative_l2(got.final_state, want.final_state);
  MESSAGE(describe(c), ": o ", o, ", final state ", s);
  CHECK(o <= test::bf16_tolerance);
  CHECK(s <= state_tolerance);
}

void compare_backward(const Case& c, const Results& got, const Results& want) {
  const double dq = test::relative_l2(got.dq, want.dq), dk = test::relative_l2(got.dk, want.dk);
  const double dv = test::relative_l2(got.dv, want.dv), dg = test::relative_l2(got.dg, want.dg);
  const double db = test::relative_l2(got.dbeta, want.dbeta);
  const double ds0 = test::relative_l2(got.d_initial, want.d_initial);
  MESSAGE(describe(c), ": dq ", dq, ", dk ", dk, ", dv ", dv, ", dg ", dg, ", dbeta ", db, ", d_initial ", ds0);
  CHECK(dq <= test::bf16_tolerance);
  CHECK(dk <= test::bf16_tolerance);
  CHECK(dv <= test::bf16_tolerance);
  CHECK(dg <= gate_tolerance);
  CHECK(db <= gate_tolerance);
  CHECK(ds0 <= state_tolerance);
}

// x[:, t0:t1] of a [B, T, ...] tensor.
Tensor<double> tokens(const Tensor<double>& x, index_t t0, index_t t1) {
  std::vector<index_t> dims;
  for (int a = 0; a < x.rank(); ++a) dims.push_back(a == 1 ? t1 - t0 : x.dim(a));
  Shape shape;
  switch (x.rank()) {
    case 3: shape = Shape{dims[0], dims[1], dims[2]}; break;
    default: shape = Shape{dims[0], dims[1], dims[2], dims[3]}; break;
  }
  Tensor<double> out(shape);
  const index_t inner = x.numel() / (x.dim(0) * x.dim(1));
  for (index_t b = 0; b < x.dim(0); ++b)
    std::copy_n(x.data() + (b * x.dim(1) + t0) * inner, (t1 - t0) * inner, out.data() + b * (t1 - t0) * inner);
  return out;
}

// [B, T, Hs, ...] → [B, T, Hs·group, ...], head h a copy of head h / group.
Tensor<double> repeat_heads(const Tensor<double>& x, index_t group) {
  const index_t B = x.dim(0), T = x.dim(1), Hs = x.dim(2), inner = x.rank() == 4 ? x.dim(3) : 1;
  Tensor<double> out(x.rank() == 4 ? Shape{B, T, Hs * group, inner} : Shape{B, T, Hs * group});
  for (index_t bt = 0; bt < B * T; ++bt)
    for (index_t h = 0; h < Hs * group; ++h)
      std::copy_n(x.data() + (bt * Hs + h / group) * inner, inner, out.data() + (bt * Hs * group + h) * inner);
  return out;
}

// Σ over each group of heads: [B, T, Hs·group, ...] → [B, T, Hs, ...].
Tensor<double> sum_groups(const Tensor<double>& x, index_t group) {
  const index_t B = x.dim(0), T = x.dim(1), H = x.dim(2), inner = x.rank() == 4 ? x.dim(3) : 1;
  Tensor<double> out(x.rank() == 4 ? Shape{B, T, H / group, inner} : Shape{B, T, H / group}, 0.0);
  for (index_t bt = 0; bt < B * T; ++bt)
    for (index_t h = 0; h < H; ++h)
      for (index_t e = 0; e < inner; ++e)
        out.data()[(bt * (H / group) + h / group) * inner + e] += x.data()[(bt * H + h) * inner + e];
  return out;
}

}  // namespace

TEST_CASE("gdn forward and backward match the reference (odd T, GQA, head dims, decays, beta)") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("gdn reference");
  const Case cases[] = {
      {2, 1, 2, 2, 64, Decay::weak, Keep::mid, false, false},
      {1, 7, 4, 2, 8, Decay::strong, Keep::high, true, true},
      {2, 63, 2, 1, 40, Decay::weak, Keep::low, false, true},
      {1, 64, 2, 1, 7, Decay::mixed, Keep::mid, true, true},
      {1, 65, 3, 3, 128, Decay::mixed, Keep::high, true, false},
      {1, 100, 2, 2, 100, Decay::weak, Keep::low, false, true},
      {1, 130, 4, 2, 64, Decay::strong, Keep::mid, true, true},
      {1, 130, 2, 2, 128, Decay::weak, Keep::high, false, false, 0.125f},
      {2, 200, 2, 1, 64, Decay::mixed, Keep::mid, true, false},
  };
  for (const Case& c : cases) {
    const Inputs in = make_inputs(c, rng);
    const Results want = reference(c, in, true);
    const Results got = run_device(c, in, true);
    compare_forward(c, got, want);
    compare_backward(c, got, want);
  }
}

TEST_CASE("gdn random shapes match the reference") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("gdn random shapes");
  const index_t lengths[] = {1, 7, 63, 65, 130};
  const index_t dims[] = {8, 40, 64, 128};
  for (int trial = 0; trial < 4; ++trial) {
    const index_t Hs = 1 + index_t(rng.below(2)), group = 1 + index_t(rng.below(2));
    const Case c{1 + index_t(rng.below(2)), lengths[rng.below(5)], Hs * group, Hs, dims[rng.below(4)],
                 Decay(rng.below(3)), Keep(rng.below(3)), rng.below(2) == 1, rng.below(2) == 1};
    const Inputs in = make_inputs(c, rng);
    const Results want = reference(c, in, true);
    const Results got = run_device(c, in, true);
    compare_forward(c, got, want);
    compare_backward(c, got, want);
  }
}

TEST_CASE("gdn decode matches the recurrent reference") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("gdn decode");
  const Case cases[] = {
      {2, 1, 4, 2, 64, Decay::weak, Keep::mid, true, false},
      {1, 7, 2, 2, 8, Decay::strong, Keep::high, true, false},
      {1, 7, 3, 1, 40, Decay::mixed, Keep::low, true, false},
      {2, 3, 2, 2, 128, Decay::weak, Keep::high, true, false},
  };
  for (const Case& c : cases) {
    const Inputs in = make_inputs(c, rng);
    Tensor<double> qh(in.q.shape()), kh(in.k.shape()), q_inv(Shape{c.B, c.T, c.H}), k_inv(Shape{c.B, c.T, c.Hs});
    eigen::gdn::l2_normalize<double>(in.q.view(), qh.view(), q_inv.view(), double(eps));
    eigen::gdn::l2_normalize<double>(in.k.view(), kh.view(), k_inv.view(), double(eps));
    Tensor<double> o_want(Shape{c.B, c.T, c.H, c.D}), states(Shape{c.B, c.Hs, 2, c.D, c.D});
    eigen::gdn::forward_recurrent<double>(qh.view(), kh.view(), in.v.view(), in.g.view(), in.beta.view(),
                                          in.s0.view(), o_want.view(), states.view(), c.T, c.scale);
    Tensor<double> s_want(Shape{c.B, c.Hs, c.D, c.D});
    for (index_t b = 0; b < c.B; ++b)
      for (index_t s = 0; s < c.Hs; ++s)
        eigen::gdn::state_at(s_want.view(), b, s) = eigen::gdn::state_at(states.view(), b, s, 1);
    Tensor<double> state = clone(in.s0.view());
    const Tensor<double> o = run_decode(c, in, state);
    const double eo = test::relative_l2(o, o_want), es = test::relative_l2(state, s_want);
    MESSAGE(describe(c), ": decode o ", eo, ", state ", es);
    CHECK(eo <= test::bf16_tolerance);
    CHECK(es <= test::fp32_tolerance);
  }
}

TEST_CASE("gdn chunked forward equals the recurrent decode over the same tokens") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("gdn chunked vs decode");
  for (const Case& c : {Case{1, 130, 4, 2, 64, Decay::mixed, Keep::mid, true, false},
                        Case{2, 65, 2, 2, 128, Decay::weak, Keep::high, true, false}}) {
    const Inputs in = make_inputs(c, rng);
    const Results chunked = run_device(c, in, false);
    Tensor<double> state = clone(in.s0.view());
    const Tensor<double> o = run_decode(c, in, state);
    const double eo = test::relative_l2(chunked.o, o), es = test::relative_l2(chunked.final_state, state);
    MESSAGE(describe(c), ": chunked vs decode o ", eo, ", state ", es);
    CHECK(eo <= test::bf16_tolerance);
    CHECK(es <= state_tolerance);
  }
}

TEST_CASE("gdn split sequence with initial state equals the whole sequence") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("gdn split");
  const Case whole{2, 150, 4, 2, 64, Decay::mixed, Keep::mid, true, false};
  const Inputs in = make_inputs(whole, rng);
  const Results all = run_device(whole, in, false);
  const index_t cut = 70;
  Case first = whole, second = whole;
  first.T = cut, second.T = whole.T - cut;
  Inputs a, b;
  for (auto [part, t0, t1] : {std::tuple{&a, index_t(0), cut}, std::tuple{&b, cut, whole.T}}) {
    part->q = tokens(in.q, t0, t1), part->k = tokens(in.k, t0, t1), part->v = tokens(in.v, t0, t1);
    part->g = tokens(in.g, t0, t1), part->beta = tokens(in.beta, t0, t1), part->d_o = tokens(in.d_o, t0, t1);
  }
  a.s0 = clone(in.s0.view());
  const Results ra = run_device(first, a, false);
  b.s0 = clone(ra.final_state.view());
  const Results rb = run_device(second, b, false);
  const double e1 = test::relative_l2(ra.o, tokens(all.o, 0, cut));
  const double e2 = test::relative_l2(rb.o, tokens(all.o, cut, whole.T));
  const double es = test::relative_l2(rb.final_state, all.final_state);
  MESSAGE("split at ", cut, ": o ", e1, " / ", e2, ", final state ", es);
  CHECK(e1 <= test::bf16_tolerance);
  CHECK(e2 <= test::bf16_tolerance);
  CHECK(es <= state_tolerance);
}

TEST_CASE("gdn GQA equals repeated state heads") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("gdn gqa");
  const Case gqa{1, 97, 4, 2, 40, Decay::mixed, Keep::mid, true, false};
  const Inputs in = make_inputs(gqa, rng);
  const index_t group = gqa.H / gqa.Hs;
  Case mha = gqa;
  mha.Hs = gqa.H;
  Inputs rep = in;
  rep.k = repeat_heads(in.k, group), rep.v = repeat_heads(in.v, group);
  rep.g = repeat_heads(in.g, group), rep.beta = repeat_heads(in.beta, group);
  rep.s0 = Tensor<double>(Shape{mha.B, mha.Hs, mha.D, mha.D});
  for (index_t h = 0; h < mha.Hs; ++h)
    eigen::gdn::state_at(rep.s0.view(), 0, h) = eigen::gdn::state_at(in.s0.view(), 0, h / group);
  const Results a = run_device(gqa, in, true);
  const Results b = run_device(mha, rep, true);
  const double o = test::relative_l2(a.o, b.o), dq = test::relative_l2(a.dq, b.dq);
  const double dk = test::relative_l2(a.dk, sum_groups(b.dk, group)), dv = test::relative_l2(a.dv, sum_groups(b.dv, group));
  const double dg = test::relative_l2(a.dg, sum_groups(b.dg, group));
  const double db = test::relative_l2(a.dbeta, sum_groups(b.dbeta, group));
  MESSAGE("GQA vs repeated: o ", o, ", dq ", dq, ", dk ", dk, ", dv ", dv, ", dg ", dg, ", dbeta ", db);
  CHECK(o <= 1e-6);
  CHECK(dq <= 1e-6);
  CHECK(dk <= test::bf16_tolerance);
  CHECK(dv <= test::bf16_tolerance);
  CHECK(dg <= gate_tolerance);
  CHECK(db <= gate_tolerance);
}

TEST_CASE("gdn sanitizer subset: small forward, backward and decode") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("gdn sanitizer");
  for (const Case& c : {Case{1, 70, 2, 1, 40, Decay::mixed, Keep::mid, true, true},
                        Case{1, 9, 2, 2, 7, Decay::weak, Keep::high, false, false}}) {
    const Inputs in = make_inputs(c, rng);
    const Results want = reference(c, in, true);
    const Results got = run_device(c, in, true);
    compare_forward(c, got, want);
    compare_backward(c, got, want);
    Tensor<double> state = c.with_initial_state ? clone(in.s0.view()) : Tensor<double>(Shape{c.B, c.Hs, c.D, c.D}, 0.0);
    const Tensor<double> o = run_decode(c, in, state);
    CHECK(test::relative_l2(o, want.o) <= test::bf16_tolerance);
  }
}

// ---------------------------------------------------------------------------------------------
// Row strides: q, k, v as column blocks of one fused projection output and dq, dk, dv written
// into one fused gradient buffer give the dense layout's results bit for bit (the kernels only
// address rows differently), and leave the padding columns untouched.

namespace {

// A row-major [B·T, ld] bf16 buffer holding [B, T, heads, D] tensors side by side as column
// blocks, the layout of a fused projection's output; the other columns are padding. `shift`
// elements precede the first row (an odd shift leaves every row unaligned).
struct FusedRows {
  index_t B, T, ld, shift;
  DeviceTensor<bfloat16> buffer;

  FusedRows(index_t B_, index_t T_, index_t ld_, index_t shift_)
      : B(B_), T(T_), ld(ld_), shift(shift_), buffer(Shape{shift_ + B_ * T_ * ld_}) {}

  // Uploads the blocks (each at its first column), random values everywhere else.
  void upload(const std::vector<std::pair<index_t, const Tensor<double>*>>& blocks, Rng& rng) {
    Tensor<double> host = rounded(buffer.shape(), rng, 1.0, to_bf16);
    for (const auto& [col, x] : blocks) {
      const index_t width = x->dim(2) * x->dim(3);
      for (index_t bt = 0; bt < B * T; ++bt)
        std::copy_n(x->data() + bt * width, width, host.data() + shift + bt * ld + col);
    }
    buffer = cuda::to_device_bf16(std::as_const(host).view());
  }

  template <class V>
  TensorView<V> block(index_t col, index_t heads, index_t D) {
    return TensorView<V>(buffer.data() + shift + col, Shape{B, T, heads, D}, {T * ld, ld, D, 1}, Device::cuda);
  }

  // The blocks back on the host; every element outside them must still hold the poison (all bits set).
  std::vector<Tensor<double>> download(const std::vector<std::tuple<index_t, index_t, index_t>>& blocks) const {
    const Tensor<bfloat16> host = buffer.to_host();
    std::vector<bool> inside(std::size_t(buffer.numel()), false);
    std::vector<Tensor<double>> out;
    for (const auto& [col, heads, D] : blocks) {
      Tensor<double> x(Shape{B, T, heads, D});
      for (index_t bt = 0; bt < B * T; ++bt)
        for (index_t e = 0; e < heads * D; ++e) {
          const index_t at = shift + bt * ld + col + e;
          x.data()[bt * heads * D + e] = double(float(host.data()[at]));
          inside[std::size_t(at)] = true;
        }
      out.push_back(std::move(x));
    }
    index_t touched = 0;
    for (index_t i = 0; i < buffer.numel(); ++i) {
      std::uint16_t bits;
      std::memcpy(&bits, host.data() + i, sizeof bits);
      touched += !inside[std::size_t(i)] && bits != 0xFFFF;
    }
    CHECK_MESSAGE(touched == 0, touched, " padding elements were written");
    return out;
  }
};

bool same_bits(const Tensor<double>& got, const Tensor<double>& want) {
  return got.shape() == want.shape() &&
         std::memcmp(got.data(), want.data(), sizeof(double) * std::size_t(got.numel())) == 0;
}

}  // namespace

TEST_CASE("gdn fused rows: q, k, v and dq, dk, dv in fused buffers equal the dense layout") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("gdn fused rows");
  struct Layout {
    Case c;
    index_t pad, shift;  // padding columns per row, elements before the first row
  };
  const Layout layouts[] = {
      {{2, 130, 4, 2, 64, Decay::mixed, Keep::mid, true, true}, 8, 0},    // 16-byte rows
      {{2, 63, 2, 1, 40, Decay::mixed, Keep::low, true, true}, 16, 0},    // 16-byte rows, D = 40
      {{2, 65, 6, 2, 37, Decay::weak, Keep::high, true, false}, 3, 0},    // odd D
      {{1, 70, 4, 2, 64, Decay::strong, Keep::mid, false, true}, 8, 1},   // unaligned base
      {{1, 33, 2, 1, 128, Decay::weak, Keep::mid, false, false}, 1, 0},   // odd row width
  };
  for (const auto& [c, pad, shift] : layouts) {
    const Inputs in = make_inputs(c, rng);
    const Results dense = run_device(c, in, true);
    Tensor<double> dense_state =
        c.with_initial_state ? clone(in.s0.view()) : Tensor<double>(Shape{c.B, c.Hs, c.D, c.D}, 0.0);
    const Tensor<double> dense_decode = run_decode(c, in, dense_state);

    const index_t q_cols = c.H * c.D, kv_cols = c.Hs * c.D, ld = q_cols + 2 * kv_cols + pad;
    const index_t k_col = q_cols, v_col = q_cols + kv_cols;
    DeviceInputs d(in);
    FusedRows qkv(c.B, c.T, ld, shift), grads(c.B, c.T, ld, shift);
    FusedRows d_o(c.B, c.T, q_cols + pad, shift), o(c.B, c.T, q_cols + pad, shift);
    qkv.upload({{0, &in.q}, {k_col, &in.k}, {v_col, &in.v}}, rng);
    d_o.upload({{0, &in.d_o}}, rng);
    const auto q = qkv.block<const bfloat16>(0, c.H, c.D), k = qkv.block<const bfloat16>(k_col, c.Hs, c.D);
    const auto v = qkv.block<const bfloat16>(v_col, c.Hs, c.D);

    Results got;
    DeviceTensor<float> final_state(Shape{c.B, c.Hs, c.D, c.D});
    test::poison(o.buffer), test::poison(final_state);
    gdn::Forward fwd{q, k, v, d.g.view(), d.beta.view(), o.block<bfloat16>(0, c.H, c.D), optional(d.s0),
                     final_state.view(), c.scale, eps};
    PoisonedWorkspace fwd_ws(gdn::workspace_bytes(fwd));
    gdn::forward(fwd, fwd_ws.data, fwd_ws.bytes, nullptr);
    cuda::check(cudaDeviceSynchronize(), "gdn forward (fused rows)");
    got.o = std::move(o.download({{0, c.H, c.D}})[0]);
    got.final_state = cuda::to_host_double(final_state);

    DeviceTensor<float> dg(in.g.shape()), dbeta(in.beta.shape()), d_initial(Shape{c.B, c.Hs, c.D, c.D});
    test::poison(grads.buffer), test::poison(dg), test::poison(dbeta), test::poison(d_initial);
    gdn::Backward bwd{q, k, v, d.g.view(), d.beta.view(), optional(d.s0), d_o.block<const bfloat16>(0, c.H, c.D),
                      optional(d.d_final), grads.block<bfloat16>(0, c.H, c.D),
                      grads.block<bfloat16>(k_col, c.Hs, c.D), grads.block<bfloat16>(v_col, c.Hs, c.D), dg.view(),
                      dbeta.view(), d_initial.view(), c.scale, eps};
    PoisonedWorkspace bwd_ws(gdn::workspace_bytes(bwd));
    gdn::backward(bwd, bwd_ws.data, bwd_ws.bytes, nullptr);
    cuda::check(cudaDeviceSynchronize(), "gdn backward (fused rows)");
    auto gradients = grads.download({{0, c.H, c.D}, {k_col, c.Hs, c.D}, {v_col, c.Hs, c.D}});
    got.dq = std::move(gradients[0]), got.dk = std::move(gradients[1]), got.dv = std::move(gradients[2]);
    got.dg = cuda::to_host_double(dg), got.dbeta = cuda::to_host_double(dbeta);
    got.d_initial = cuda::to_host_double(d_initial);

    Tensor<double> state0 =
        c.with_initial_state ? clone(in.s0.view()) : Tensor<double>(Shape{c.B, c.Hs, c.D, c.D}, 0.0);
    DeviceTensor<float> state = to_device_f32(state0);
    test::poison(o.buffer);
    gdn::decode(gdn::Decode{q, k, v, d.g.view(), d.beta.view(), state.view(), o.block<bfloat16>(0, c.H, c.D), c.scale,
                            eps},
                nullptr);
    cuda::check(cudaDeviceSynchronize(), "gdn decode (fused rows)");
    const Tensor<double> decoded = std::move(o.download({{0, c.H, c.D}})[0]);

    INFO(describe(c), " ld ", ld, " shift ", shift);
    CHECK(same_bits(got.o, dense.o));
    CHECK(same_bits(got.final_state, dense.final_state));
    CHECK(same_bits(got.dq, dense.dq));
    CHECK(same_bits(got.dk, dense.dk));
    CHECK(same_bits(got.dv, dense.dv));
    CHECK(same_bits(got.dg, dense.dg));
    CHECK(same_bits(got.dbeta, dense.dbeta));
    CHECK(same_bits(got.d_initial, dense.d_initial));
    CHECK(same_bits(decoded, dense_decode));
    CHECK(same_bits(cuda::to_host_double(state), dense_state));
    MESSAGE(describe(c), " ld ", ld, " shift ", shift, ": fused rows checked against the dense layout");
  }
}

// ---------------------------------------------------------------------------------------------
// Kept workspace: a forward with keep_for_backward gives the plain forward's o and final state,
// and the backward that reads its workspace gives the recomputing backward's gradients, bit for
// bit (the same kernels on the same inputs); the kept workspace is only read, so a second
// backward from it gives the same again.

namespace {

void check_kept_workspace(const Case& c, const Inputs& in) {
  const Results plain = run_device(c, in, true);
  DeviceInputs d(in);
  const gdn::Dims dims{c.B, c.T, c.H, c.Hs, c.D};
  DeviceTensor<bfloat16> o(Shape{c.B, c.T, c.H, c.D});
  DeviceTensor<float> final_state(Shape{c.B, c.Hs, c.D, c.D});
  test::poison(o), test::poison(final_state);
  gdn::Forward fwd{d.q.view(), d.k.view(), d.v.view(), d.g.view(), d.beta.view(), o.view(), optional(d.s0),
                   final_state.view(), c.scale, eps, true};
  REQUIRE(gdn::workspace_bytes(fwd) == gdn::kept_workspace_bytes(dims));
  PoisonedWorkspace kept(gdn::workspace_bytes(fwd));
  gdn::forward(fwd, kept.data, kept.bytes, nullptr);
  cuda::check(cudaDeviceSynchronize(), "gdn forward (keep_for_backward)");
  INFO(describe(c));
  CHECK(same_bits(cuda::to_host_double(o), plain.o));
  CHECK(same_bits(cuda::to_host_double(final_state), plain.final_state));

  for (int call = 0; call < 2; ++call) {
    DeviceTensor<bfloat16> dq(in.q.shape()), dk(in.k.shape()), dv(in.v.shape());
    DeviceTensor<float> dg(in.g.shape()), dbeta(in.beta.shape()), d_initial(Shape{c.B, c.Hs, c.D, c.D});
    test::poison(dq), test::poison(dk), test::poison(dv), test::poison(dg), test::poison(dbeta);
    test::poison(d_initial);
    gdn::Backward bwd{d.q.view(), d.k.view(), d.v.view(), d.g.view(), d.beta.view(), optional(d.s0), d.d_o.view(),
                      optional(d.d_final), dq.view(), dk.view(), dv.view(), dg.view(), dbeta.view(),
                      d_initial.view(), c.scale, eps};
    PoisonedWorkspace scratch(gdn::backward_scratch_bytes(dims));
    gdn::backward(bwd, kept.data, kept.bytes, scratch.data, scratch.bytes, nullptr);
    cuda::check(cudaDeviceSynchronize(), "gdn backward (kept workspace)");
    INFO("backward call ", call);
    CHECK(same_bits(cuda::to_host_double(dq), plain.dq));
    CHECK(same_bits(cuda::to_host_double(dk), plain.dk));
    CHECK(same_bits(cuda::to_host_double(dv), plain.dv));
    CHECK(same_bits(cuda::to_host_double(dg), plain.dg));
    CHECK(same_bits(cuda::to_host_double(dbeta), plain.dbeta));
    CHECK(same_bits(cuda::to_host_double(d_initial), plain.d_initial));
  }
}

}  // namespace

TEST_CASE("gdn backward from a kept forward workspace equals the recomputing backward") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("gdn kept workspace");
  const Case cases[] = {
      {2, 1, 2, 2, 64, Decay::weak, Keep::mid, false, false},
      {1, 65, 4, 2, 8, Decay::strong, Keep::high, true, true},
      {2, 130, 2, 1, 40, Decay::mixed, Keep::low, false, true},
      {1, 200, 3, 3, 128, Decay::mixed, Keep::mid, true, false, 0.125f},
      {2, 129, 6, 3, 64, Decay::weak, Keep::high, true, true},
      {3, 1000, 4, 4, 64, Decay::weak, Keep::mid, true, true},  // 16 chunks: the overlapped passes wait
  };
  for (const Case& c : cases) check_kept_workspace(c, make_inputs(c, rng));
}

TEST_CASE("gdn sanitizer subset: kept forward workspace") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("gdn sanitizer kept");
  const Case c{1, 70, 2, 1, 40, Decay::mixed, Keep::mid, true, true};
  check_kept_workspace(c, make_inputs(c, rng));
}

// ---------------------------------------------------------------------------------------------
// Bad input: every launcher check throws dash::Error before any CUDA call (no device needed).

namespace {

template <class T>
T* fake_device_pointer() {
  return reinterpret_cast<T*>(std::uintptr_t{1} << 20);
}
template <class T>
TensorView<T> device_view(Shape shape) {
  return TensorView<T>(fake_device_pointer<std::remove_const_t<T>>(), shape, Device::cuda);
}

constexpr index_t B = 1, T = 8, H = 2, Hs = 1, D = 16;

gdn::Forward good_forward() {
  gdn::Forward a;
  a.q = device_view<const bfloat16>(Shape{B, T, H, D});
  a.k = device_view<const bfloat16>(Shape{B, T, Hs, D});
  a.v = device_view<const bfloat16>(Shape{B, T, Hs, D});
  a.g = device_view<const float>(Shape{B, T, Hs});
  a.beta = device_view<const float>(Shape{B, T, Hs});
  a.o = device_view<bfloat16>(Shape{B, T, H, D});
  return a;
}

gdn::Backward good_backward() {
  gdn::Backward a;
  a.q = device_view<const bfloat16>(Shape{B, T, H, D});
  a.k = device_view<const bfloat16>(Shape{B, T, Hs, D});
  a.v = device_view<const bfloat16>(Shape{B, T, Hs, D});
  a.g = device_view<const float>(Shape{B, T, Hs});
  a.beta = device_view<const float>(Shape{B, T, Hs});
  a.d_o = device_view<const bfloat16>(Shape{B, T, H, D});
  a.dq = device_view<bfloat16>(Shape{B, T, H, D});
  a.dk = device_view<bfloat16>(Shape{B, T, Hs, D});
  a.dv = device_view<bfloat16>(Shape{B, T, Hs, D});
  a.dg = device_view<float>(Shape{B, T, Hs});
  a.dbeta = device_view<float>(Shape{B, T, Hs});
  return a;
}

gdn::Decode good_decode() {
  gdn::Decode a;
  a.q = device_view<const bfloat16>(Shape{B, T, H, D});
  a.k = device_view<const bfloat16>(Shape{B, T, Hs, D});
  a.v = device_view<const bfloat16>(Shape{B, T, Hs, D});
  a.g = device_view<const float>(Shape{B, T, Hs});
  a.beta = device_view<const float>(Shape{B, T, Hs});
  a.state = device_view<float>(Shape{B, Hs, D, D});
  a.o = device_view<bfloat16>(Shape{B, T, H, D});
  return a;
}

void* const fake_workspace = fake_device_pointer<void>();
constexpr std::size_t big = std::size_t{1} << 40;

std::string forward_error(const gdn::Forward& a, void* ws = fake_workspace, std::size_t bytes = big) {
  return test::error_of([&] { gdn::forward(a, ws, bytes, nullptr); });
}
std::string backward_error(const gdn::Backward& a, void* ws = fake_workspace, std::size_t bytes = big) {
  return test::error_of([&] { gdn::backward(a, ws, bytes, nullptr); });
}
std::string kept_backward_error(const gdn::Backward& a, const void* kept, std::size_t kept_bytes, void* scratch,
                                std::size_t scratch_bytes) {
  return test::error_of([&] { gdn::backward(a, kept, kept_bytes, scratch, scratch_bytes, nullptr); });
}

}  // namespace

TEST_CASE("gdn forward refuses bad input without a device") {
  gdn::Forward a = good_forward();
  SUBCASE("q on the host") {
    a.q.device = Device::cpu;
    CHECK(test::contains(forward_error(a), "q: on cpu"));
  }
  SUBCASE("q of rank 3") {
    a.q = device_view<const bfloat16>(Shape{B, T, H * D});
    CHECK(test::contains(forward_error(a), "q has shape"));
  }
  SUBCASE("head dimension above 128") {
    a.q = device_view<const bfloat16>(Shape{B, T, H, 129});
    CHECK(test::contains(forward_error(a), "head dimension D = 129"));
  }
  SUBCASE("empty sequence") {
    a.q = device_view<const bfloat16>(Shape{B, 0, H, D});
    CHECK(test::contains(forward_error(a), "expected all >= 1"));
  }
  SUBCASE("state heads that do not divide the query heads") {
    a.q = device_view<const bfloat16>(Shape{B, T, 3, D});
    a.k = device_view<const bfloat16>(Shape{B, T, 2, D});
    CHECK(test::contains(forward_error(a), "state heads must divide"));
  }
  SUBCASE("k of another length") {
    a.k = device_view<const bfloat16>(Shape{B, T + 1, Hs, D});
    CHECK(test::contains(forward_error(a), ": k: shape"));
  }
  SUBCASE("v of another head dimension") {
    a.v = device_view<const bfloat16>(Shape{B, T, Hs, D + 1});
    CHECK(test::contains(forward_error(a), ": v: shape"));
  }
  SUBCASE("g per query head") {
    a.g = device_view<const float>(Shape{B, T, H});
    CHECK(test::contains(forward_error(a), ": g: shape"));
  }
  SUBCASE("beta of the wrong rank") {
    a.beta = device_view<const float>(Shape{B, T});
    CHECK(test::contains(forward_error(a), ": beta: shape"));
  }
  SUBCASE("o per state head") {
    a.o = device_view<bfloat16>(Shape{B, T, Hs, D});
    CHECK(test::contains(forward_error(a), ": o: shape"));
  }
  SUBCASE("null q") {
    a.q.data = nullptr;
    CHECK(test::contains(forward_error(a), "q: null data"));
  }
  SUBCASE("q with rows closer than H·D") {
    a.q.stride = {T * (H * D - 1), H * D - 1, D, 1};
    CHECK(test::contains(forward_error(a), ": q: strides {"));
  }
  SUBCASE("q with batches closer than T rows") {
    a.q.stride[1] *= 2;
    CHECK(test::contains(forward_error(a), ": q: strides {"));
  }
  SUBCASE("k with heads not D apart") {
    a.k.stride[2] = 2 * D;
    CHECK(test::contains(forward_error(a), ": k: strides {"));
  }
  SUBCASE("v with elements apart") {
    a.v.stride[3] = 2;
    CHECK(test::contains(forward_error(a), ": v: strides {"));
  }
  SUBCASE("o with a negative batch stride") {
    a.o.stride[0] = -T * H * D;
    CHECK(test::contains(forward_error(a), ": o: strides {"));
  }
  SUBCASE("strided g") {
    a.g.stride[1] *= 2;
    CHECK(test::contains(forward_error(a), "g: must be contiguous"));
  }
  SUBCASE("initial state of the wrong shape") {
    a.initial_state = device_view<const float>(Shape{B, Hs, D, D + 1});
    CHECK(test::contains(forward_error(a), "initial_state: shape"));
  }
  SUBCASE("final state on the host") {
    a.final_state = device_view<float>(Shape{B, Hs, D, D});
    a.final_state.device = Device::cpu;
    CHECK(test::contains(forward_error(a), "final_state: on cpu"));
  }
  SUBCASE("non-finite scale") {
    a.scale = std::nanf("");
    CHECK(test::contains(forward_error(a), "scale"));
  }
  SUBCASE("eps of zero") {
    a.eps = 0.f;
    CHECK(test::contains(forward_error(a), "eps"));
  }
  SUBCASE("workspace too small") {
    CHECK(test::contains(forward_error(a, fake_workspace, 16), "workspace of 16 bytes"));
  }
  SUBCASE("null workspace") {
    CHECK(test::contains(forward_error(a, nullptr), "workspace is null"));
  }
  SUBCASE("misaligned workspace") {
    CHECK(test::contains(forward_error(a, static_cast<char*>(fake_workspace) + 4), "16-byte aligned"));
  }
}

TEST_CASE("gdn backward refuses bad input without a device") {
  gdn::Backward a = good_backward();
  SUBCASE("d_o per state head") {
    a.d_o = device_view<const bfloat16>(Shape{B, T, Hs, D});
    CHECK(test::contains(backward_error(a), "d_o: shape"));
  }
  SUBCASE("dq of another shape") {
    a.dq = device_view<bfloat16>(Shape{B, T, H, D + 1});
    CHECK(test::contains(backward_error(a), "dq: shape"));
  }
  SUBCASE("dk per query head") {
    a.dk = device_view<bfloat16>(Shape{B, T, H, D});
    CHECK(test::contains(backward_error(a), "dk: shape"));
  }
  SUBCASE("dv on the host") {
    a.dv.device = Device::cpu;
    CHECK(test::contains(backward_error(a), "dv: on cpu"));
  }
  SUBCASE("dg missing") {
    a.dg.data = nullptr;
    CHECK(test::contains(backward_error(a), "dg: null data"));
  }
  SUBCASE("dbeta of the wrong shape") {
    a.dbeta = device_view<float>(Shape{B, T + 1, Hs});
    CHECK(test::contains(backward_error(a), "dbeta: shape"));
  }
  SUBCASE("d_final_state of the wrong shape") {
    a.d_final_state = device_view<const float>(Shape{B, H, D, D});
    CHECK(test::contains(backward_error(a), "d_final_state: shape"));
  }
  SUBCASE("d_initial_state of the wrong shape") {
    a.d_initial_state = device_view<float>(Shape{B, Hs, D});
    CHECK(test::contains(backward_error(a), "d_initial_state: shape"));
  }
  SUBCASE("initial_state of the wrong shape") {
    a.initial_state = device_view<const float>(Shape{B, Hs + 1, D, D});
    CHECK(test::contains(backward_error(a), "initial_state: shape"));
  }
  SUBCASE("a forward-sized workspace") {
    const gdn::Dims d{B, T, H, Hs, D};
    const std::size_t bytes = gdn::forward_workspace_bytes(d);
    REQUIRE(bytes < gdn::backward_workspace_bytes(d));
    CHECK(test::contains(backward_error(a, fake_workspace, bytes), "workspace of"));
  }
  SUBCASE("dq with rows closer than H·D") {
    a.dq.stride = {T * H * D, H * D - 1, D, 1};
    CHECK(test::contains(backward_error(a), ": dq: strides {"));
  }
  SUBCASE("dk with batches closer than T rows") {
    a.dk.stride[0] = T * Hs * D - 1;
    CHECK(test::contains(backward_error(a), ": dk: strides {"));
  }
  SUBCASE("dv with heads not D apart") {
    a.dv.stride[2] = D + 1;
    CHECK(test::contains(backward_error(a), ": dv: strides {"));
  }
  SUBCASE("d_o with elements apart") {
    a.d_o.stride[3] = 2;
    CHECK(test::contains(backward_error(a), ": d_o: strides {"));
  }
  SUBCASE("strided dbeta") {
    a.dbeta.stride[0] *= 2;
    CHECK(test::contains(backward_error(a), "dbeta: must be contiguous"));
  }
  SUBCASE("bad q as in forward") {
    a.q = device_view<const bfloat16>(Shape{B, T, H, 200});
    CHECK(test::contains(backward_error(a), "head dimension D = 200"));
  }
}

TEST_CASE("gdn forward keeping its workspace refuses a forward-sized workspace without a device") {
  gdn::Forward a = good_forward();
  a.keep_for_backward = true;
  const gdn::Dims d{B, T, H, Hs, D};
  const std::size_t bytes = gdn::forward_workspace_bytes(d);
  REQUIRE(bytes < gdn::kept_workspace_bytes(d));
  CHECK(gdn::workspace_bytes(a) == gdn::kept_workspace_bytes(d));
  const std::string error = forward_error(a, fake_workspace, bytes);
  CHECK(test::contains(error, "keep_for_backward"));
  CHECK(test::contains(error, "workspace of"));
}

TEST_CASE("gdn backward from a kept workspace refuses bad input without a device") {
  gdn::Backward a = good_backward();
  const gdn::Dims d{B, T, H, Hs, D};
  const std::size_t kept = gdn::kept_workspace_bytes(d), scratch = gdn::backward_scratch_bytes(d);
  char* const base = static_cast<char*>(fake_workspace);
  SUBCASE("sizes add up to the recomputing backward's") {
    CHECK(kept + scratch == gdn::backward_workspace_bytes(d));
    CHECK(gdn::forward_workspace_bytes(d) < kept);
  }
  SUBCASE("kept workspace too small") {
    const std::string error = kept_backward_error(a, base, kept - 1, base, scratch);
    CHECK(test::contains(error, "kept: workspace of"));
  }
  SUBCASE("kept workspace null") {
    CHECK(test::contains(kept_backward_error(a, nullptr, kept, base, scratch), "kept: workspace is null"));
  }
  SUBCASE("kept workspace misaligned") {
    CHECK(test::contains(kept_backward_error(a, base + 8, kept, base, scratch), "kept: workspace must be 16-byte"));
  }
  SUBCASE("scratch too small") {
    CHECK(test::contains(kept_backward_error(a, base, kept, base, scratch - 1), "scratch: workspace of"));
  }
  SUBCASE("scratch null") {
    CHECK(test::contains(kept_backward_error(a, base, kept, nullptr, scratch), "scratch: workspace is null"));
  }
  SUBCASE("scratch misaligned") {
    CHECK(test::contains(kept_backward_error(a, base, kept, base + 4, scratch), "scratch: workspace must be 16-byte"));
  }
  SUBCASE("bad gradient as in the recomputing backward") {
    a.dk = device_view<bfloat16>(Shape{B, T, H, D});
    CHECK(test::contains(kept_backward_error(a, base, kept, base, scratch), "dk: shape"));
  }
}

TEST_CASE("gdn decode refuses bad input without a device") {
  gdn::Decode a = good_decode();
  const auto error = [&] { return test::error_of([&] { gdn::decode(a, nullptr); }); };
  SUBCASE("state per query head") {
    a.state = device_view<float>(Shape{B, H, D, D});
    CHECK(test::contains(error(), "state: shape"));
  }
  SUBCASE("state on the host") {
    a.state.device = Device::cpu;
    CHECK(test::contains(error(), "state: on cpu"));
  }
  SUBCASE("o of another length") {
    a.o = device_view<bfloat16>(Shape{B, T - 1, H, D});
    CHECK(test::contains(error(), "o: shape"));
  }
  SUBCASE("beta per query head") {
    a.beta = device_view<const float>(Shape{B, T, H});
    CHECK(test::contains(error(), "beta: shape"));
  }
  SUBCASE("k with rows closer than Hs·D") {
    a.k.stride[1] = Hs * D - 1;
    CHECK(test::contains(error(), ": k: strides {"));
  }
}

TEST_CASE("gdn launchers accept fused row strides without a device") {
  // q, k, v in one [B·T, ld] buffer, dq, dk, dv in another: strides {T·ld, ld, D, 1}.
  const index_t ld = H * D + 2 * Hs * D + 8;
  const auto fused = [&](index_t col, index_t heads) {
    return TensorView<bfloat16>(fake_device_pointer<bfloat16>() + col, Shape{B, T, heads, D}, {T * ld, ld, D, 1},
                                Device::cuda);
  };
  gdn::Forward f = good_forward();
  f.q = fused(0, H), f.k = fused(H * D, Hs), f.v = fused(H * D + Hs * D, Hs);
  CHECK(gdn::workspace_bytes(f) == gdn::forward_workspace_bytes(gdn::Dims{B, T, H, Hs, D}));
  gdn::Backward b = good_backward();
  b.q = f.q, b.k = f.k, b.v = f.v;
  b.dq = fused(0, H), b.dk = fused(H * D, Hs), b.dv = fused(H * D + Hs * D, Hs);
  CHECK(gdn::workspace_bytes(b) == gdn::backward_workspace_bytes(gdn::Dims{B, T, H, Hs, D}));
  CHECK(test::contains(backward_error(b, fake_workspace, 16), "workspace of 16 bytes"));
}

TEST_CASE("gdn workspace sizes refuse bad dimensions without a device") {
  CHECK(test::contains(test::error_of([] { (void)gdn::forward_workspace_bytes(gdn::Dims{1, 8, 3, 2, 16}); }),
                       "state heads must divide"));
  CHECK(test::contains(test::error_of([] { (void)gdn::backward_workspace_bytes(gdn::Dims{1, 8, 2, 2, 0}); }),
                       "head dimension D = 0"));
  CHECK(test::contains(test::error_of([] { (void)gdn::kept_workspace_bytes(gdn::Dims{0, 8, 2, 2, 16}); }),
                       "expected all >= 1"));
  CHECK(test::contains(test::error_of([] { (void)gdn::backward_scratch_bytes(gdn::Dims{1, 8, 2, 2, 129}); }),
                       "head dimension D = 129"));
  CHECK(test::contains(
      test::error_of([] { (void)gdn::forward_workspace_bytes(gdn::Dims{65535, index_t(1) << 30, 65535, 65535, 8}); }),
      "expected at most 2^31 - 1"));
}

// Backward of Softmax / SlidingWindow attention on CUDA (both main kernels) against the
// float64 Eigen reference on the same bf16-rounded inputs. The reference's backward reads the
// o and lse the kernel reads (the float64 forward's, rounded to bf16 and to fp32), so both
// compute the same function. Identities: a window of at least T is causal attention; GQA
// equals MHA on repeated k and v heads, with the kv-head gradients summed over each group;
// every schedule of the wgmma kernel's CTAs (query heads split, blocks of sections) computes
// the same gradients. The mixture backward (two terms on the same q, k, v) against the sum of
// the reference's single-op gradients, and identities: the sum of two single-op calls; a zero
// weight leaves the other term alone; with W ≥ T two terms are one of weight π_s + π_w.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "dash/core/cuda.hpp"
#include "dash/ops/softmax.hpp"
#include "dash/ops/softmax/cuda/backward.cuh"
#include "support/attention_case.hpp"
#include "support/errors.hpp"
#include "support/gpu.hpp"
#include "support/random.hpp"

using namespace dash;
namespace attn = dash::cuda::attention;
using attn::BackwardKernel;
using attn::BackwardSchedule;

namespace {

constexpr std::int64_t no_window = std::numeric_limits<std::int64_t>::max();

struct Case {
  index_t batch, length, kv_heads, group, d_head;
  std::int64_t window = no_window, sinks = 0;

  index_t heads() const { return kv_heads * group; }
  std::string name() const {
    return "B=" + std::to_string(batch) + " T=" + std::to_string(length) + " H=" + std::to_string(heads()) +
           " Hkv=" + std::to_string(kv_heads) + " D=" + std::to_string(d_head) +
           " W=" + (window == no_window ? std::string("inf") : std::to_string(window)) +
           " sinks=" + std::to_string(sinks);
  }
};

double to_bf16(double x) { return double(float(bf16(float(x)))); }

void round_to_bf16(Tensor<double>& t) {
  for (double& x : t.flat()) x = to_bf16(x);
}

// Inputs rounded as the device stores them, the forward's o and lse rounded likewise, and the
// reference gradients.
struct Problem {
  Case c;
  Tensor<double> q, k, v, d_o, o, lse, dq, dk, dv;
};

Problem make_problem(const Case& c, Rng& rng) {
  const Shape q_shape{c.batch, c.length, c.heads(), c.d_head}, kv_shape{c.batch, c.length, c.kv_heads, c.d_head};
  Problem pr{c, test::random_tensor<double>(q_shape, rng), test::random_tensor<double>(kv_shape, rng),
             test::random_tensor<double>(kv_shape, rng), test::random_tensor<double>(q_shape, rng)};
  round_to_bf16(pr.q);
  round_to_bf16(pr.k);
  round_to_bf16(pr.v);
  round_to_bf16(pr.d_o);
  const dash::detail::AttentionMask mask{.window = c.window, .sinks = c.sinks};
  pr.o = Tensor<double>(q_shape);
  pr.lse = Tensor<double>(Shape{c.batch, c.heads(), c.length});
  eigen::masked_attention_forward<double>(pr.q, pr.k, pr.v, pr.o, pr.lse, mask);
  round_to_bf16(pr.o);
  for (double& x : pr.lse.flat()) x = double(float(x));
  pr.dq = Tensor<double>(q_shape, 0.0);
  pr.dk = Tensor<double>(kv_shape, 0.0);
  pr.dv = Tensor<double>(kv_shape, 0.0);
  eigen::masked_attention_backward<double>(pr.q, pr.k, pr.v, pr.o, pr.lse.view(), pr.d_o, pr.dq, pr.dk, pr.dv, mask);
  return pr;
}

// Several [B, T, h_i, D] tensors side by side along the head axis of one device buffer
// [B, T, Σ h_i, D] (one tensor alone: a contiguous layout; q, k, v together: a fused QKV
// projection's output).
struct Packed {
  cuda::DeviceTensor<cuda::bfloat16> data;
  std::vector<index_t> first_head;
  index_t heads = 0, length = 0, d_head = 0;

  cuda::bfloat16* member(std::size_t i) { return data.data() + first_head[i] * d_head; }
  attn::Strides strides() const { return {length * heads * d_head, heads * d_head}; }
};

Packed pack(const std::vector<const Tensor<double>*>& members) {
  Packed p;
  const Tensor<double>& first = *members.front();
  p.length = first.dim(1);
  p.d_head = first.dim(3);
  for (const Tensor<double>* m : members) {
    p.first_head.push_back(p.heads);
    p.heads += m->dim(2);
  }
  Tensor<double> host(Shape{first.dim(0), p.length, p.heads, p.d_head});
  for (std::size_t i = 0; i < members.size(); ++i) {
    const Tensor<double>& m = *members[i];
    for (index_t b = 0; b < m.dim(0); ++b)
      for (index_t t = 0; t < m.dim(1); ++t)
        for (index_t h = 0; h < m.dim(2); ++h)
          for (index_t d = 0; d < m.dim(3); ++d) host(b, t, p.first_head[i] + h, d) = m(b, t, h, d);
  }
  p.data = cuda::to_device_bf16(TensorView<const double>(host.view()));
  return p;
}

Tensor<double> unpack(const Packed& p, std::size_t i, index_t heads) {
  const Tensor<double> host = cuda::to_host_double(p.data);
  Tensor<double> m(Shape{host.dim(0), p.length, heads, p.d_head});
  for (index_t b = 0; b < m.dim(0); ++b)
    for (index_t t = 0; t < m.dim(1); ++t)
      for (index_t h = 0; h < heads; ++h)
        for (index_t d = 0; d < p.d_head; ++d) m(b, t, h, d) = host(b, t, p.first_head[i] + h, d);
  return m;
}

struct Options {
  BackwardKernel kernel = BackwardKernel::automatic;
  bool fused = false;       // q, k, v (and dq, dk, dv; o, d_o) as slices of one buffer
  bool accumulate = false;  // outputs start from random values that the gradients add to
  BackwardSchedule schedule;
};

struct Gradients {
  Tensor<double> dq, dk, dv;
};

Tensor<double> difference(const Tensor<double>& a, const Tensor<double>& b) {
  Tensor<double> d(a.shape());
  for (index_t i = 0; i < a.numel(); ++i) d.data()[i] = a.data()[i] - b.data()[i];
  return d;
}

double rms(const Tensor<double>& t) {
  double s = 0;
  for (double x : t.flat()) s += x * x;
  return std::sqrt(s / double(std::max<index_t>(1, t.numel())));
}

// The gradients the kernel computes (what it adds, when accumulating).
Gradients run_device(const Problem& pr, const Options& opt, Rng& rng) {
  const Case& c = pr.c;
  std::vector<Packed> inputs, stats, outputs;
  if (opt.fused) {
    inputs.push_back(pack({&pr.q, &pr.k, &pr.v}));
    stats.push_back(pack({&pr.o, &pr.d_o}));
  } else {
    for (const Tensor<double>* t : {&pr.q, &pr.k, &pr.v}) inputs.push_back(pack({t}));
    for (const Tensor<double>* t : {&pr.o, &pr.d_o}) stats.push_back(pack({t}));
  }
  // Starting values of the outputs: NaN, or random values of the gradients' own size.
  const Shape q_shape = pr.q.shape(), kv_shape = pr.k.shape();
  Tensor<double> start_q(q_shape, 0.0), start_k(kv_shape, 0.0), start_v(kv_shape, 0.0);
  if (opt.accumulate) {
    start_q = test::random_tensor<double>(q_shape, rng, std::max(rms(pr.dq), 1e-3));
    start_k = test::random_tensor<double>(kv_shape, rng, std::max(rms(pr.dk), 1e-3));
    start_v = test::random_tensor<double>(kv_shape, rng, std::max(rms(pr.dv), 1e-3));
    round_to_bf16(start_q);
    round_to_bf16(start_k);
    round_to_bf16(start_v);
  }
  if (opt.fused)
    outputs.push_back(pack({&start_q, &start_k, &start_v}));
  else
    for (const Tensor<double>* t : {&start_q, &start_k, &start_v}) outputs.push_back(pack({t}));
  if (!opt.accumulate)
    for (Packed& o : outputs) test::poison(o.data);

  const auto slot = [&](std::vector<Packed>& v, std::size_t i) -> std::pair<Packed*, std::size_t> {
    return opt.fused ? std::pair{&v[0], i} : std::pair{&v[i], std::size_t(0)};
  };
  const auto [q, qi] = slot(inputs, 0);
  const auto [k, ki] = slot(inputs, 1);
  const auto [v, vi] = slot(inputs, 2);
  const auto [o, oi] = slot(stats, 0);
  const auto [g, gi] = slot(stats, 1);
  const auto [dq, dqi] = slot(outputs, 0);
  const auto [dk, dki] = slot(outputs, 1);
  const auto [dv, dvi] = slot(outputs, 2);

  Tensor<float> lse32(pr.lse.shape());
  for (index_t i = 0; i < lse32.numel(); ++i) lse32.data()[i] = float(pr.lse.data()[i]);
  const auto lse = cuda::DeviceTensor<float>::from_host(lse32.view());

  attn::BackwardParams p;
  p.q = q->member(qi);
  p.k = k->member(ki);
  p.v = v->member(vi);
  p.o = o->member(oi);
  p.d_o = g->member(gi);
  p.lse = const_cast<float*>(lse.data());
  p.dq = dq->member(dqi);
  p.dk = dk->member(dki);
  p.dv = dv->member(dvi);
  p.q_strides = q->strides();
  p.k_strides = k->strides();
  p.v_strides = v->strides();
  p.o_strides = o->strides();
  p.d_o_strides = g->strides();
  p.dq_strides = dq->strides();
  p.dk_strides = dk->strides();
  p.dv_strides = dv->strides();
  p.batch = int(c.batch);
  p.length = int(c.length);
  p.n_heads = int(c.heads());
  p.n_kv_heads = int(c.kv_heads);
  p.d_head = int(c.d_head);
  p.scale = float(1.0 / std::sqrt(double(c.d_head)));
  p.mask = {.window = c.window, .sinks = c.sinks};
  p.accumulate = opt.accumulate;

  const std::size_t bytes = attn::backward_workspace_bytes(p);
  cuda::DeviceTensor<unsigned char> workspace(Shape{index_t(bytes)});
  test::poison(workspace);  // the kernels must initialise what they read back
  attn::backward(p, workspace.data(), bytes, nullptr, opt.kernel, opt.schedule);
  cuda::check(cudaDeviceSynchronize(), "attention backward");

  Gradients got{unpack(*dq, dqi, c.heads()), unpack(*dk, dki, c.kv_heads), unpack(*dv, dvi, c.kv_heads)};
  if (opt.accumulate) {
    got.dq = difference(got.dq, start_q);
    got.dk = difference(got.dk, start_k);
    got.dv = difference(got.dv, start_v);
  }
  return got;
}

// ‖got − want‖ / ‖want‖, where ‖want‖ is floored at 1e-2 of dv's size per element: with
// W = 1 and no sinks every p is 1 and o = v, so dq and dk vanish and only the rounding of
// dO·v − D remains.
double gradient_error(const Tensor<double>& got, const Tensor<double>& want, const Tensor<double>& dv) {
  double diff = 0, norm = 0;
  for (index_t i = 0; i < got.numel(); ++i) {
    const double a = got.data()[i], b = want.data()[i];
    if (!std::isfinite(a)) return std::numeric_limits<double>::infinity();
    diff += (a - b) * (a - b);
    norm += b * b;
  }
  const double floor = 1e-2 * rms(dv) * std::sqrt(double(want.numel()));
  return std::sqrt(diff) / std::max(std::sqrt(norm), floor);
}

struct Worst {
  double dq = 0, dk = 0, dv = 0;
};

void check_against_reference(const Problem& pr, const Options& opt, Rng& rng, Worst& worst) {
  const Gradients got = run_device(pr, opt, rng);
  const double eq = gradient_error(got.dq, pr.dq, pr.dv), ek = gradient_error(got.dk, pr.dk, pr.dv),
               ev = gradient_error(got.dv, pr.dv, pr.dv);
  INFO(pr.c.name(), (opt.fused ? " fused" : ""), (opt.accumulate ? " accumulate" : ""), " head_splits ",
       opt.schedule.head_splits, " sections_per_block ", opt.schedule.sections_per_block);
  CHECK(eq <= test::bf16_tolerance);
  CHECK(ek <= test::bf16_tolerance);
  CHECK(ev <= test::bf16_tolerance);
  worst.dq = std::max(worst.dq, eq);
  worst.dk = std::max(worst.dk, ek);
  worst.dv = std::max(worst.dv, ev);
}

const char* kernel_name(BackwardKernel k) {
  return k == BackwardKernel::wgmma ? "wgmma" : k == BackwardKernel::mma_sync ? "mma_sync" : "automatic";
}

void report(const char* what, BackwardKernel k, const Worst& w) {
  std::printf("%s [%s]: worst relative L2 dq %.2e, dk %.2e, dv %.2e\n", what, kernel_name(k), w.dq, w.dk, w.dv);
}

bool device_is_hopper() {
  int device = 0, major = 0;
  cuda::check(cudaGetDevice(&device), "cudaGetDevice");
  cuda::check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "compute capability");
  return major == 9;
}

// The kernels this device runs: mma.sync everywhere, wgmma on sm_90.
std::vector<BackwardKernel> kernels() {
  std::vector<BackwardKernel> k{BackwardKernel::mma_sync};
  if (device_is_hopper()) k.push_back(BackwardKernel::wgmma);
  return k;
}

// Fixed shapes around both kernels' tiles (64 and 128 keys, 32 and 64 queries), plus one
// drawn per run: odd T, T below and above the tiles, GQA groups 1, 3 and 8, d_head 8, 40,
// 64, 128 and an odd one, windows of 1, below a tile, above a tile and = T, sinks within
// and beyond a tile.
std::vector<Case> reference_cases(Rng& rng) {
  std::vector<Case> cases{
      {1, 1, 1, 1, 8},
      {2, 7, 1, 3, 40},
      {1, 63, 2, 1, 64},
      {1, 64, 1, 1, 128},
      {1, 65, 1, 8, 128},
      {2, 130, 1, 3, 64, 1, 0},
      {1, 200, 2, 1, 128, 17, 0},
      {1, 257, 1, 3, 8, 64, 4},
      {1, 130, 1, 1, 40, 130, 0},
      {1, 300, 1, 8, 64, 100, 70},
      {1, 129, 2, 3, 128, 1, 1},
      {2, 513, 1, 1, 128},
      {1, 333, 1, 1, 3, 50, 0},
  };
  const index_t groups[] = {1, 3, 8};
  const index_t length = index_t(1 + rng.below(600));
  const std::int64_t window = rng.below(2) ? no_window : std::int64_t(1 + rng.below(std::uint64_t(length) + 10));
  cases.push_back({index_t(1 + rng.below(2)), length, index_t(1 + rng.below(2)), groups[rng.below(3)],
                   index_t(1 + rng.below(128)), window, std::int64_t(rng.below(3))});
  return cases;
}

}  // namespace

TEST_CASE("attention backward matches the float64 reference") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("attention backward reference");
  std::vector<Problem> problems;
  for (const Case& c : reference_cases(rng)) problems.push_back(make_problem(c, rng));
  for (BackwardKernel kernel : kernels()) {
    Worst worst;
    for (const Problem& pr : problems) check_against_reference(pr, {.kernel = kernel}, rng, worst);
    report("reference", kernel, worst);
  }
}

TEST_CASE("attention backward adds into dq, dk and dv when accumulating") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("attention backward accumulate");
  const std::vector<Case> cases{{1, 65, 1, 3, 64}, {2, 130, 2, 1, 128, 40, 2}, {1, 77, 1, 8, 8, 9, 0}};
  for (BackwardKernel kernel : kernels()) {
    Worst worst;
    for (const Case& c : cases)
      check_against_reference(make_problem(c, rng), {.kernel = kernel, .accumulate = true}, rng, worst);
    report("accumulate", kernel, worst);
  }
}

TEST_CASE("attention backward reads and writes strided slices of fused buffers") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("attention backward fused");
  const std::vector<Case> cases{{2, 97, 1, 3, 64}, {1, 150, 2, 1, 128, 70, 3}, {1, 40, 1, 8, 40}, {1, 33, 1, 3, 5}};
  for (BackwardKernel kernel : kernels()) {
    Worst worst;
    for (const Case& c : cases) {
      const Problem pr = make_problem(c, rng);
      check_against_reference(pr, {.kernel = kernel, .fused = true}, rng, worst);
      check_against_reference(pr, {.kernel = kernel, .fused = true, .accumulate = true}, rng, worst);
    }
    report("fused", kernel, worst);
  }
}

TEST_CASE("attention backward: a window of at least T is causal attention") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("attention backward window");
  for (BackwardKernel kernel : kernels())
    for (const Case& causal : {Case{1, 190, 1, 3, 64}, Case{2, 129, 2, 1, 128}}) {
      const Problem pr = make_problem(causal, rng);
      // Whole groups per CTA: dk and dv are then written once per key tile (split groups add
      // into them with atomics, in any order, as dq sums tiles).
      const Options whole_groups{.kernel = kernel, .schedule = {.head_splits = 1}};
      const Gradients want = run_device(pr, whole_groups, rng);
      for (const std::int64_t window : {std::int64_t(causal.length), std::int64_t(causal.length) + 17}) {
        Problem windowed = pr;
        windowed.c.window = window;
        const Gradients got = run_device(windowed, whole_groups, rng);
        INFO(kernel_name(kernel), " ", windowed.c.name());
        CHECK(test::relative_difference(got.dk, want.dk) == 0);
        CHECK(test::relative_difference(got.dv, want.dv) == 0);
        CHECK(test::relative_l2(got.dq, want.dq) <= 1e-3);
      }
    }
}

TEST_CASE("attention backward: GQA equals MHA on repeated k and v heads") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("attention backward gqa");
  for (BackwardKernel kernel : kernels())
    for (const Case& gqa : {Case{1, 150, 2, 3, 64, 50, 2}, Case{1, 70, 1, 8, 128}}) {
      const Problem grouped = make_problem(gqa, rng);
      Problem repeated = grouped;
      repeated.c.kv_heads = gqa.heads();
      repeated.c.group = 1;
      repeated.k = test::attention::repeat_heads(grouped.k, gqa.group);
      repeated.v = test::attention::repeat_heads(grouped.v, gqa.group);
      const Gradients g = run_device(grouped, {.kernel = kernel}, rng);
      const Gradients r = run_device(repeated, {.kernel = kernel}, rng);
      INFO(kernel_name(kernel), " ", gqa.name());
      CHECK(test::relative_l2(g.dq, r.dq) <= 1e-3);
      CHECK(test::relative_l2(g.dk, test::attention::sum_groups(r.dk, gqa.group)) <= test::bf16_tolerance);
      CHECK(test::relative_l2(g.dv, test::attention::sum_groups(r.dv, gqa.group)) <= test::bf16_tolerance);
    }
}

// More key tiles than a GPU has SMs (several waves of CTAs), with windows and no sinks, both
// writing and accumulating dq, dk and dv.
TEST_CASE("attention backward with more key tiles than the GPU has SMs") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("attention backward many key tiles");
  for (BackwardKernel kernel : kernels()) {
    Worst worst;
    for (const Case& c : {Case{2, 1030, 8, 1, 128, 100, 0}, Case{3, 777, 8, 2, 64, 150, 0}}) {
      const Problem pr = make_problem(c, rng);
      check_against_reference(pr, {.kernel = kernel}, rng, worst);
      check_against_reference(pr, {.kernel = kernel, .accumulate = true}, rng, worst);
    }
    report("many key tiles", kernel, worst);
  }
}

// The wgmma kernel with a group's query heads split over 2, 4 and 8 CTAs (dk, dv through the
// fp32 accumulators), in blocks of 1, 3 and all sections, against the reference; writing,
// accumulating and on fused buffers.
TEST_CASE("attention backward with a group's query heads split over CTAs") {
  if (!test::gpu_available() || !device_is_hopper()) return;
  Rng rng = test::rng_for("attention backward split heads");
  const std::vector<Case> cases{{1, 333, 1, 8, 128},          {2, 130, 2, 8, 64, 50, 0}, {1, 65, 1, 8, 8, 20, 3},
                                {1, 257, 1, 8, 40, 100, 0},   {2, 7, 1, 8, 64},          {1, 700, 2, 8, 128, 256, 0}};
  const BackwardSchedule schedules[] = {{2, 1}, {4, 3}, {8, 0}};
  Worst worst;
  for (const Case& c : cases) {
    const Problem pr = make_problem(c, rng);
    for (const BackwardSchedule& schedule : schedules)
      check_against_reference(pr, {.kernel = BackwardKernel::wgmma, .schedule = schedule}, rng, worst);
    check_against_reference(pr, {.kernel = BackwardKernel::wgmma, .accumulate = true, .schedule = {4, 0}}, rng, worst);
    check_against_reference(pr, {.kernel = BackwardKernel::wgmma, .fused = true, .schedule = {2, 2}}, rng, worst);
  }
  report("split heads", BackwardKernel::wgmma, worst);
}

// Small enough for compute-sanitizer (memcheck, racecheck): every path once (on the wgmma
// kernel: split and whole groups, writing and accumulating).
TEST_CASE("attention backward on small shapes") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("attention backward small");
  for (BackwardKernel kernel : kernels()) {
    Worst worst;
    const Problem a = make_problem({1, 70, 1, 3, 64, 20, 2}, rng), b = make_problem({1, 9, 1, 1, 5}, rng),
                  c = make_problem({2, 65, 1, 8, 128, 40, 0}, rng);
    check_against_reference(a, {.kernel = kernel}, rng, worst);
    check_against_reference(a, {.kernel = kernel, .schedule = {.head_splits = 1}}, rng, worst);
    check_against_reference(c, {.kernel = kernel, .accumulate = true, .schedule = {4, 2}}, rng, worst);
    check_against_reference(a, {.kernel = kernel, .fused = true, .accumulate = true}, rng, worst);
    check_against_reference(b, {.kernel = kernel}, rng, worst);
    report("small", kernel, worst);
  }
}

// The backward of a mixture y = Σ_t π_t·o_t of one or two terms (causal Softmax and
// SlidingWindow, in either order) on the same q, k, v, against the float64 reference: each
// term's backward for d_o = π_t·d, summed, and dL/dπ_t = Σ d·o_t in double.
namespace {

struct Term {
  std::int64_t window = no_window, sinks = 0;
};

struct MixtureCase {
  index_t batch, length, kv_heads, group, d_head;
  std::vector<Term> terms;

  Case shape(const Term& t) const { return {batch, length, kv_heads, group, d_head, t.window, t.sinks}; }
  std::string name() const {
    std::string s = shape({}).name().substr(0, shape({}).name().find(" W="));
    for (const Term& t : terms)
      s += " [W=" + (t.window == no_window ? std::string("inf") : std::to_string(t.window)) +
           " sinks=" + std::to_string(t.sinks) + "]";
    return s;
  }
};

struct MixtureProblem {
  MixtureCase c;
  std::vector<double> pi;  // fp32 values, as the device holds them
  Tensor<double> q, k, v, d, dq, dk, dv;
  std::vector<Tensor<double>> o, lse;
  std::vector<double> d_pi;
};

MixtureProblem make_mixture_problem(const MixtureCase& c, const std::vector<double>& pi, Rng& rng) {
  const Case base = c.shape({});
  const Shape q_shape{c.batch, c.length, base.heads(), c.d_head}, kv_shape{c.batch, c.length, c.kv_heads, c.d_head};
  MixtureProblem pr{c, {}, test::random_tensor<double>(q_shape, rng), test::random_tensor<double>(kv_shape, rng),
                    test::random_tensor<double>(kv_shape, rng), test::random_tensor<double>(q_shape, rng)};
  for (double x : pi) pr.pi.push_back(double(float(x)));
  round_to_bf16(pr.q);
  round_to_bf16(pr.k);
  round_to_bf16(pr.v);
  round_to_bf16(pr.d);
  pr.dq = Tensor<double>(q_shape, 0.0);
  pr.dk = Tensor<double>(kv_shape, 0.0);
  pr.dv = Tensor<double>(kv_shape, 0.0);
  for (std::size_t t = 0; t < c.terms.size(); ++t) {
    const dash::detail::AttentionMask mask{.window = c.terms[t].window, .sinks = c.terms[t].sinks};
    Tensor<double> o(q_shape), lse(Shape{c.batch, base.heads(), c.length});
    eigen::masked_attention_forward<double>(pr.q, pr.k, pr.v, o, lse, mask);
    round_to_bf16(o);
    for (double& x : lse.flat()) x = double(float(x));
    Tensor<double> d_o(q_shape);
    double d_pi = 0;
    for (index_t i = 0; i < d_o.numel(); ++i) {
      d_o.data()[i] = pr.pi[t] * pr.d.data()[i];
      d_pi += pr.d.data()[i] * o.data()[i];
    }
    // Adds into dq, dk, dv.
    eigen::masked_attention_backward<double>(pr.q, pr.k, pr.v, o, lse.view(), d_o, pr.dq, pr.dk, pr.dv, mask);
    pr.o.push_back(std::move(o));
    pr.lse.push_back(std::move(lse));
    pr.d_pi.push_back(d_pi);
  }
  return pr;
}

struct MixtureOptions {
  BackwardKernel kernel = BackwardKernel::automatic;
  bool accumulate = false;
  BackwardSchedule schedule;
};

// Where the terms' weights and gradients sit in the device vectors π and dL/dπ (of
// weight_slots entries): not in term order, so that the indices are exercised; the other
// entries of dL/dπ hold `untouched` and must keep it.
constexpr int weight_slots = 4;
constexpr int pi_slot[2] = {2, 0};
constexpr float untouched = 7.f;

struct MixtureResult {
  Gradients g;
  std::vector<float> d_pi;  // all weight_slots entries
};

MixtureResult run_mixture(const MixtureProblem& pr, const MixtureOptions& opt, Rng& rng) {
  const MixtureCase& c = pr.c;
  const index_t heads = c.kv_heads * c.group;
  Packed q = pack({&pr.q}), k = pack({&pr.k}), v = pack({&pr.v}), d = pack({&pr.d});
  std::vector<Packed> o;
  std::vector<cuda::DeviceTensor<float>> lse;
  for (std::size_t t = 0; t < c.terms.size(); ++t) {
    o.push_back(pack({&pr.o[t]}));
    Tensor<float> lse32(pr.lse[t].shape());
    for (index_t i = 0; i < lse32.numel(); ++i) lse32.data()[i] = float(pr.lse[t].data()[i]);
    lse.push_back(cuda::DeviceTensor<float>::from_host(lse32.view()));
  }
  Tensor<float> pi_host(Shape{weight_slots}, 0.f), d_pi_host(Shape{weight_slots}, untouched);
  for (std::size_t t = 0; t < c.terms.size(); ++t) pi_host.data()[pi_slot[t]] = float(pr.pi[t]);
  const auto pi = cuda::DeviceTensor<float>::from_host(pi_host.view());
  auto d_pi = cuda::DeviceTensor<float>::from_host(d_pi_host.view());

  const Shape q_shape = pr.q.shape(), kv_shape = pr.k.shape();
  Tensor<double> start_q(q_shape, 0.0), start_k(kv_shape, 0.0), start_v(kv_shape, 0.0);
  if (opt.accumulate) {
    start_q = test::random_tensor<double>(q_shape, rng, std::max(rms(pr.dq), 1e-3));
    start_k = test::random_tensor<double>(kv_shape, rng, std::max(rms(pr.dk), 1e-3));
    start_v = test::random_tensor<double>(kv_shape, rng, std::max(rms(pr.dv), 1e-3));
    round_to_bf16(start_q);
    round_to_bf16(start_k);
    round_to_bf16(start_v);
  }
  Packed dq = pack({&start_q}), dk = pack({&start_k}), dv = pack({&start_v});
  if (!opt.accumulate)
    for (Packed* out : {&dq, &dk, &dv}) test::poison(out->data);

  attn::MixtureBackwardParams p;
  p.q = q.member(0), p.k = k.member(0), p.v = v.member(0);
  p.q_strides = q.strides(), p.k_strides = k.strides(), p.v_strides = v.strides();
  p.batch = int(c.batch), p.length = int(c.length), p.n_heads = int(heads), p.n_kv_heads = int(c.kv_heads);
  p.d_head = int(c.d_head);
  p.scale = float(1.0 / std::sqrt(double(c.d_head)));
  p.n_terms = int(c.terms.size());
  for (int t = 0; t < p.n_terms; ++t)
    p.terms[t] = {o[std::size_t(t)].member(0), o[std::size_t(t)].strides(), lse[std::size_t(t)].data(),
                  {.window = c.terms[std::size_t(t)].window, .sinks = c.terms[std::size_t(t)].sinks}, pi_slot[t]};
  p.pi = pi.data();
  p.d = d.member(0), p.d_strides = d.strides();
  p.d_pi = d_pi.data();
  p.dq = dq.member(0), p.dk = dk.member(0), p.dv = dv.member(0);
  p.dq_strides = dq.strides(), p.dk_strides = dk.strides(), p.dv_strides = dv.strides();
  p.accumulate = opt.accumulate;

  const std::size_t bytes = attn::mixture_backward_workspace_bytes(p);
  cuda::DeviceTensor<unsigned char> workspace(Shape{index_t(bytes)});
  test::poison(workspace);
  attn::mixture_backward(p, workspace.data(), bytes, nullptr, opt.kernel, opt.schedule);
  cuda::check(cudaDeviceSynchronize(), "mixture backward");

  MixtureResult r{{unpack(dq, 0, heads), unpack(dk, 0, c.kv_heads), unpack(dv, 0, c.kv_heads)}, {}};
  const Tensor<float> d_pi_back = d_pi.to_host();
  r.d_pi.assign(d_pi_back.data(), d_pi_back.data() + weight_slots);
  if (opt.accumulate) {
    r.g.dq = difference(r.g.dq, start_q);
    r.g.dk = difference(r.g.dk, start_k);
    r.g.dv = difference(r.g.dv, start_v);
  }
  return r;
}

// dL/dπ_t against the double sum. The kernel reads the same bf16 d and o_t as the reference;
// each product of two bf16 values is exact in fp32, a row's ≤ 128 products are added in fp32
// (relative error ≤ 128·2^-24 ≈ 8e-6 of the row's Σ|d·o|) and the rows in double, so the
// error is a few 1e-6 of Σ|d·o|; 1e-3 of |dL/dπ| leaves room for the cancellation of random
// signs between rows (|Σ| ~ Σ|·| / sqrt(rows) for a few thousand rows) and no more.
double weight_gradient_error(float got, double want) { return std::abs(double(got) - want) / std::abs(want); }

struct MixtureWorst {
  Worst g;
  double d_pi = 0;
};

void check_mixture(const MixtureProblem& pr, const MixtureOptions& opt, Rng& rng, MixtureWorst& worst) {
  const MixtureResult r = run_mixture(pr, opt, rng);
  const double eq = gradient_error(r.g.dq, pr.dq, pr.dv), ek = gradient_error(r.g.dk, pr.dk, pr.dv),
               ev = gradient_error(r.g.dv, pr.dv, pr.dv);
  INFO(pr.c.name(), " ", kernel_name(opt.kernel), (opt.accumulate ? " accumulate" : ""), " head_splits ",
       opt.schedule.head_splits, " sections_per_block ", opt.schedule.sections_per_block);
  CHECK(eq <= test::bf16_tolerance);
  CHECK(ek <= test::bf16_tolerance);
  CHECK(ev <= test::bf16_tolerance);
  worst.g.dq = std::max(worst.g.dq, eq);
  worst.g.dk = std::max(worst.g.dk, ek);
  worst.g.dv = std::max(worst.g.dv, ev);
  for (std::size_t t = 0; t < pr.c.terms.size(); ++t) {
    const double e = weight_gradient_error(r.d_pi[std::size_t(pi_slot[t])], pr.d_pi[t]);
    CHECK(e <= 1e-3);
    worst.d_pi = std::max(worst.d_pi, e);
  }
  for (int s = 0; s < weight_slots; ++s)
    if (s != pi_slot[0] && (pr.c.terms.size() < 2 || s != pi_slot[1])) CHECK(r.d_pi[std::size_t(s)] == untouched);
}

void report_mixture(const char* what, BackwardKernel k, const MixtureWorst& w) {
  std::printf("mixture %s [%s]: worst relative L2 dq %.2e, dk %.2e, dv %.2e; dL/dpi relative %.2e\n", what,
              kernel_name(k), w.g.dq, w.g.dk, w.g.dv, w.d_pi);
}

const Term causal{};

// Odd T (1, 7, 65, 130, 300 and one drawn), d_head 8, 40, 64, 128 and an odd one, GQA, windows
// of 1, below and above the tiles and ≥ T, sinks; the causal term first or second.
std::vector<MixtureCase> mixture_cases(Rng& rng) {
  std::vector<MixtureCase> cases{
      {1, 1, 1, 1, 8, {causal, {1, 0}}},
      {2, 7, 1, 3, 40, {{3, 0}, causal}},
      {1, 65, 2, 1, 64, {causal, {17, 2}}},
      {1, 65, 1, 8, 128, {causal, {40, 0}}},
      {2, 130, 1, 3, 64, {{100, 0}, causal}},
      {1, 130, 2, 1, 128, {causal, {64, 0}}},
      {1, 300, 1, 8, 64, {causal, {100, 70}}},
      {1, 300, 2, 3, 128, {{200, 4}, causal}},
      {1, 257, 1, 3, 8, {causal, {1, 1}}},
      {1, 200, 1, 1, 40, {{130, 0}, {17, 3}}},
      {1, 129, 2, 1, 128, {causal, {500, 0}}},
      {1, 97, 1, 3, 5, {causal, {30, 0}}},
  };
  const index_t groups[] = {1, 3, 8};
  const index_t length = index_t(1 + rng.below(600));
  cases.push_back({index_t(1 + rng.below(2)), length, index_t(1 + rng.below(2)), groups[rng.below(3)],
                   index_t(1 + rng.below(128)),
                   {causal, {std::int64_t(1 + rng.below(std::uint64_t(length) + 10)), std::int64_t(rng.below(3))}}});
  return cases;
}

std::vector<double> random_weights(Rng& rng) {
  const double a = 0.1 + 0.8 * rng.uniform();
  return {a, 1.0 - a};
}

}  // namespace

TEST_CASE("mixture backward matches the float64 reference") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("mixture backward reference");
  std::vector<MixtureProblem> problems;
  for (const MixtureCase& c : mixture_cases(rng)) problems.push_back(make_mixture_problem(c, random_weights(rng), rng));
  for (BackwardKernel kernel : kernels()) {
    MixtureWorst worst;
    for (const MixtureProblem& pr : problems) check_mixture(pr, {.kernel = kernel}, rng, worst);
    check_mixture(problems[4], {.kernel = kernel, .accumulate = true}, rng, worst);
    check_mixture(problems[7], {.kernel = kernel, .accumulate = true}, rng, worst);
    report_mixture("reference", kernel, worst);
  }
}

// The wgmma kernel's schedules with two terms: heads split over 2, 4, 8 CTAs, blocks of 1, 3
// and all sections, and more key tiles than SMs.
TEST_CASE("mixture backward with split heads and many key tiles") {
  if (!test::gpu_available() || !device_is_hopper()) return;
  Rng rng = test::rng_for("mixture backward schedules");
  MixtureWorst worst;
  for (const MixtureCase& c : {MixtureCase{1, 333, 1, 8, 128, {causal, {100, 0}}},
                               MixtureCase{2, 130, 2, 8, 64, {{50, 2}, causal}}}) {
    const MixtureProblem pr = make_mixture_problem(c, random_weights(rng), rng);
    for (const BackwardSchedule& s : {BackwardSchedule{2, 1}, BackwardSchedule{4, 3}, BackwardSchedule{8, 0}})
      check_mixture(pr, {.kernel = BackwardKernel::wgmma, .schedule = s}, rng, worst);
    check_mixture(pr, {.kernel = BackwardKernel::wgmma, .accumulate = true, .schedule = {4, 0}}, rng, worst);
  }
  const MixtureProblem many = make_mixture_problem({1, 1030, 4, 2, 128, {causal, {300, 0}}}, random_weights(rng), rng);
  check_mixture(many, {.kernel = BackwardKernel::wgmma}, rng, worst);
  report_mixture("schedules", BackwardKernel::wgmma, worst);
}

namespace {

// The single-op backward of `pr`'s term t for d_o = scale·d (rounded to bf16, as a caller
// would hold it), added into `into` when given.
Gradients single_backward(const MixtureProblem& pr, std::size_t t, double scale, const MixtureOptions& opt, Rng& rng) {
  Problem single{pr.c.shape(pr.c.terms[t]), pr.q, pr.k, pr.v, pr.d, pr.o[t], pr.lse[t]};
  for (double& x : single.d_o.flat()) x = to_bf16(scale * x);
  single.dq = Tensor<double>(pr.q.shape(), 0.0);
  single.dk = Tensor<double>(pr.k.shape(), 0.0);
  single.dv = Tensor<double>(pr.v.shape(), 0.0);
  return run_device(single, {.kernel = opt.kernel, .schedule = opt.schedule}, rng);
}

// a + scale_b·b.
Tensor<double> sum(const Tensor<double>& a, const Tensor<double>& b, double scale_b = 1) {
  Tensor<double> s(a.shape());
  for (index_t i = 0; i < a.numel(); ++i) s.data()[i] = a.data()[i] + scale_b * b.data()[i];
  return s;
}

Gradients scaled(const Gradients& g, double factor) {
  const auto times = [&](const Tensor<double>& t) { return sum(Tensor<double>(t.shape(), 0.0), t, factor); };
  return {times(g.dq), times(g.dk), times(g.dv)};
}

void check_close(const Gradients& got, const Gradients& want, double tolerance) {
  const double eq = test::relative_l2(got.dq, want.dq), ek = test::relative_l2(got.dk, want.dk),
               ev = test::relative_l2(got.dv, want.dv);
  std::printf("    relative L2 dq %.2e, dk %.2e, dv %.2e\n", eq, ek, ev);
  CHECK(eq <= tolerance);
  CHECK(ek <= tolerance);
  CHECK(ev <= tolerance);
}

}  // namespace

// Identities between the fused pass and single-op backward calls, on both kernels.
TEST_CASE("mixture backward identities") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("mixture backward identities");
  const std::vector<MixtureCase> cases{{1, 300, 2, 3, 128, {causal, {100, 2}}}, {2, 130, 1, 8, 64, {{40, 0}, causal}},
                                       {1, 77, 1, 1, 40, {causal, {9, 0}}}};
  for (BackwardKernel kernel : kernels())
    for (const MixtureCase& c : cases) {
      const MixtureOptions opt{.kernel = kernel};
      const std::size_t s = c.terms[0].window == no_window ? 0 : 1;  // the causal term
      // The mixture equals the sum of the two single-op calls it replaces (d_o = π_t·d).
      const MixtureProblem pr = make_mixture_problem(c, random_weights(rng), rng);
      const MixtureResult fused = run_mixture(pr, opt, rng);
      const Gradients a = single_backward(pr, 0, pr.pi[0], opt, rng), b = single_backward(pr, 1, pr.pi[1], opt, rng);
      INFO(kernel_name(kernel), " ", c.name());
      std::printf("  %s %s: mixture vs two single calls\n", kernel_name(kernel), c.name().c_str());
      check_close(fused.g, {sum(a.dq, b.dq), sum(a.dk, b.dk), sum(a.dv, b.dv)}, test::bf16_tolerance);

      // π_w = 0: the softmax term's backward for d_o = d, times π_s.
      std::vector<double> pi(2, 0.0);
      pi[s] = 0.7;
      const MixtureProblem only_causal = make_mixture_problem(c, pi, rng);
      const MixtureResult got = run_mixture(only_causal, opt, rng);
      const Gradients one = single_backward(only_causal, s, 1.0, opt, rng);
      const double w = only_causal.pi[s];
      std::printf("  %s %s: pi_w = 0 vs pi_s times the softmax backward\n", kernel_name(kernel), c.name().c_str());
      check_close(got.g, scaled(one, w), test::bf16_tolerance);
      CHECK(weight_gradient_error(got.d_pi[std::size_t(pi_slot[1 - s])], only_causal.d_pi[1 - s]) <= 1e-3);

      // W ≥ T: both terms causal, so the mixture is one term of weight π_s + π_w.
      MixtureCase both_causal = c;
      both_causal.terms[1 - s].window = c.length + 3 * (1 - s);
      both_causal.terms[1 - s].sinks = 0;
      const MixtureProblem two = make_mixture_problem(both_causal, random_weights(rng), rng);
      MixtureProblem merged = two;
      merged.c.terms = {both_causal.terms[s]};
      merged.pi = {float(two.pi[0] + two.pi[1])};
      merged.o = {two.o[s]};
      merged.lse = {two.lse[s]};
      const MixtureResult got_two = run_mixture(two, opt, rng), got_one = run_mixture(merged, opt, rng);
      std::printf("  %s %s: W >= T, two terms vs one of weight pi_s + pi_w\n", kernel_name(kernel),
                  both_causal.name().c_str());
      check_close(got_two.g, got_one.g, test::bf16_tolerance);
      // Both terms read the same o, so their dL/dπ agree exactly.
      CHECK(got_two.d_pi[std::size_t(pi_slot[0])] == got_two.d_pi[std::size_t(pi_slot[1])]);
    }
}

// Small enough for compute-sanitizer (memcheck, racecheck): both kernels, whole and split
// groups, writing and accumulating.
TEST_CASE("mixture backward on small shapes") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("mixture backward small");
  const MixtureProblem a = make_mixture_problem({1, 70, 1, 3, 64, {causal, {20, 2}}}, random_weights(rng), rng),
                       b = make_mixture_problem({2, 65, 1, 8, 128, {{40, 0}, causal}}, random_weights(rng), rng),
                       c = make_mixture_problem({1, 9, 1, 1, 5, {causal, {3, 0}}}, random_weights(rng), rng);
  for (BackwardKernel kernel : kernels()) {
    MixtureWorst worst;
    check_mixture(a, {.kernel = kernel}, rng, worst);
    check_mixture(b, {.kernel = kernel, .accumulate = true, .schedule = {4, 2}}, rng, worst);
    check_mixture(c, {.kernel = kernel}, rng, worst);
    report_mixture("small", kernel, worst);
  }
}

// Bad input: each refused with a dash::Error before any CUDA call, so these need no device.
namespace {

cuda::bfloat16 dummy_elements[16];
float dummy_lse[16];

attn::BackwardParams valid_params() {
  attn::BackwardParams p;
  p.q = p.k = p.v = p.d_o = dummy_elements;
  p.o = p.dq = p.dk = p.dv = dummy_elements;
  p.lse = dummy_lse;
  p.batch = 2;
  p.length = 8;
  p.n_heads = 4;
  p.n_kv_heads = 2;
  p.d_head = 16;
  p.scale = 0.25f;
  p.q_strides = p.o_strides = p.d_o_strides = p.dq_strides = {8 * 4 * 16, 4 * 16};
  p.k_strides = p.v_strides = p.dk_strides = p.dv_strides = {8 * 2 * 16, 2 * 16};
  return p;
}

std::string backward_error(const attn::BackwardParams& p, std::size_t workspace_bytes = std::size_t(1) << 30) {
  alignas(256) static unsigned char workspace[256];
  return test::error_of([&] { attn::backward(p, workspace, workspace_bytes, nullptr); });
}

}  // namespace

TEST_CASE("attention backward refuses null inputs") {
  auto p = valid_params();
  p.k = nullptr;
  CHECK(test::contains(backward_error(p), "q, k and v must not be null"));
}

TEST_CASE("attention backward refuses a null lse") {
  auto p = valid_params();
  p.lse = nullptr;
  CHECK(test::contains(backward_error(p), "o and lse"));
}

TEST_CASE("attention backward refuses a null d_o") {
  auto p = valid_params();
  p.d_o = nullptr;
  CHECK(test::contains(backward_error(p), "d_o must not be null"));
}

TEST_CASE("attention backward refuses null outputs") {
  auto p = valid_params();
  p.dv = nullptr;
  CHECK(test::contains(backward_error(p), "dq, dk and dv must not be null"));
}

TEST_CASE("attention backward refuses query heads that are not a multiple of the kv heads") {
  auto p = valid_params();
  p.n_heads = 3;
  CHECK(test::contains(backward_error(p), "n_heads = 3"));
}

TEST_CASE("attention backward refuses a window below 1") {
  auto p = valid_params();
  p.mask.window = 0;
  CHECK(test::contains(backward_error(p), "mask.window = 0"));
}

TEST_CASE("attention backward refuses negative sinks") {
  auto p = valid_params();
  p.mask.sinks = -1;
  CHECK(test::contains(backward_error(p), "mask.sinks = -1"));
}

TEST_CASE("attention backward refuses d_head outside 1..128") {
  auto p = valid_params();
  p.d_head = 129;
  CHECK(test::contains(backward_error(p), "d_head = 129"));
  p.d_head = 0;
  CHECK(test::contains(backward_error(p), "d_head = 0"));
}

TEST_CASE("attention backward refuses an empty sequence") {
  auto p = valid_params();
  p.length = 0;
  CHECK(test::contains(backward_error(p), "length = 0"));
}

TEST_CASE("attention backward refuses a scale that is not positive") {
  auto p = valid_params();
  p.scale = 0;
  CHECK(test::contains(backward_error(p), "scale = 0"));
}

TEST_CASE("attention backward refuses overlapping token rows") {
  auto p = valid_params();
  p.dk_strides.token = 16;
  CHECK(test::contains(backward_error(p), "dk_strides.token = 16"));
}

TEST_CASE("attention backward refuses overlapping sequences") {
  auto p = valid_params();
  p.q_strides.batch = 0;
  CHECK(test::contains(backward_error(p), "q_strides.batch = 0"));
}

TEST_CASE("attention backward refuses head splits that do not divide the group") {
  const auto p = valid_params();
  alignas(256) static unsigned char workspace[256];
  CHECK(test::contains(test::error_of([&] {
                         attn::backward(p, workspace, std::size_t(1) << 30, nullptr, BackwardKernel::automatic, {3, 0});
                       }),
                       "head_splits = 3"));
}

TEST_CASE("attention backward refuses negative sections per block") {
  const auto p = valid_params();
  alignas(256) static unsigned char workspace[256];
  CHECK(test::contains(test::error_of([&] {
                         attn::backward(p, workspace, std::size_t(1) << 30, nullptr, BackwardKernel::automatic, {0, -1});
                       }),
                       "sections_per_block = -1"));
}

TEST_CASE("attention backward refuses a null workspace") {
  const auto p = valid_params();
  CHECK(test::contains(test::error_of([&] { attn::backward(p, nullptr, 1 << 20, nullptr); }), "workspace is null"));
}

TEST_CASE("attention backward refuses a workspace that is too small") {
  const auto p = valid_params();
  const std::size_t needed = attn::backward_workspace_bytes(p);
  CHECK(test::contains(backward_error(p, needed - 1), "backward_workspace_bytes"));
}

TEST_CASE("attention backward refuses a misaligned workspace") {
  const auto p = valid_params();
  alignas(256) static unsigned char workspace[512];
  CHECK(test::contains(test::error_of([&] { attn::backward(p, workspace + 4, 1 << 20, nullptr); }),
                       "not 256-byte aligned"));
}

TEST_CASE("attention backward workspace size refuses bad sizes") {
  auto p = valid_params();
  p.n_kv_heads = 0;
  CHECK(test::contains(test::error_of([&] { (void)attn::backward_workspace_bytes(p); }), "n_kv_heads = 0"));
}

namespace {

float dummy_pi[4];

attn::MixtureBackwardParams valid_mixture_params() {
  const attn::BackwardParams s = valid_params();
  attn::MixtureBackwardParams p;
  p.q = s.q, p.k = s.k, p.v = s.v;
  p.q_strides = s.q_strides, p.k_strides = s.k_strides, p.v_strides = s.v_strides;
  p.batch = s.batch, p.length = s.length, p.n_heads = s.n_heads, p.n_kv_heads = s.n_kv_heads, p.d_head = s.d_head;
  p.scale = s.scale;
  p.terms[0] = {dummy_elements, s.o_strides, dummy_lse, {}, 0};
  p.terms[1] = {dummy_elements, s.o_strides, dummy_lse, {.window = 4, .sinks = 1}, 1};
  p.n_terms = 2;
  p.pi = dummy_pi;
  p.d = dummy_elements, p.d_strides = s.d_o_strides;
  p.d_pi = dummy_pi + 2;
  p.dq = s.dq, p.dk = s.dk, p.dv = s.dv;
  p.dq_strides = s.dq_strides, p.dk_strides = s.dk_strides, p.dv_strides = s.dv_strides;
  return p;
}

std::string mixture_error(const attn::MixtureBackwardParams& p, std::size_t workspace_bytes = std::size_t(1) << 30) {
  alignas(256) static unsigned char workspace[256];
  return test::error_of([&] { attn::mixture_backward(p, workspace, workspace_bytes, nullptr); });
}

}  // namespace

TEST_CASE("mixture backward refuses a number of terms outside 1..2") {
  auto p = valid_mixture_params();
  p.n_terms = 0;
  CHECK(test::contains(mixture_error(p), "n_terms = 0"));
  p.n_terms = 3;
  CHECK(test::contains(mixture_error(p), "n_terms = 3"));
  CHECK(test::contains(test::error_of([&] { (void)attn::mixture_backward_workspace_bytes(p); }), "n_terms = 3"));
}

TEST_CASE("mixture backward refuses null weights or a null weight gradient") {
  auto p = valid_mixture_params();
  p.d_pi = nullptr;
  CHECK(test::contains(mixture_error(p), "pi and d_pi must not be null"));
  p = valid_mixture_params();
  p.pi = nullptr;
  CHECK(test::contains(mixture_error(p), "pi and d_pi must not be null"));
}

TEST_CASE("mixture backward refuses a term without its forward outputs") {
  auto p = valid_mixture_params();
  p.terms[1].o = nullptr;
  CHECK(test::contains(mixture_error(p), "terms[1]: o and lse"));
  p = valid_mixture_params();
  p.terms[0].lse = nullptr;
  CHECK(test::contains(mixture_error(p), "terms[0]: o and lse"));
}

TEST_CASE("mixture backward refuses a null upstream gradient or null inputs and outputs") {
  auto p = valid_mixture_params();
  p.d = nullptr;
  CHECK(test::contains(mixture_error(p), "d must not be null"));
  p = valid_mixture_params();
  p.v = nullptr;
  CHECK(test::contains(mixture_error(p), "q, k and v must not be null"));
  p = valid_mixture_params();
  p.dk = nullptr;
  CHECK(test::contains(mixture_error(p), "dq, dk and dv must not be null"));
}

TEST_CASE("mixture backward refuses two terms on one weight and a negative weight index") {
  auto p = valid_mixture_params();
  p.terms[1].pi_index = 0;
  CHECK(test::contains(mixture_error(p), "expected different weights"));
  p.terms[1].pi_index = -1;
  CHECK(test::contains(mixture_error(p), "terms[1].pi_index = -1"));
}

TEST_CASE("mixture backward refuses a bad term mask or layout") {
  auto p = valid_mixture_params();
  p.terms[1].mask.window = 0;
  CHECK(test::contains(mixture_error(p), "terms[1].window = 0"));
  p = valid_mixture_params();
  p.terms[0].mask.sinks = -2;
  CHECK(test::contains(mixture_error(p), "terms[0].sinks = -2"));
  p = valid_mixture_params();
  p.terms[1].o_strides.token = 8;
  CHECK(test::contains(mixture_error(p), "terms[1].o_strides.token = 8"));
  p = valid_mixture_params();
  p.d_strides.batch = 1;
  CHECK(test::contains(mixture_error(p), "d_strides.batch = 1"));
}

TEST_CASE("mixture backward refuses bad sizes") {
  auto p = valid_mixture_params();
  p.d_head = 200;
  CHECK(test::contains(mixture_error(p), "MixtureBackwardParams.d_head = 200"));
  p = valid_mixture_params();
  p.scale = -1;
  CHECK(test::contains(mixture_error(p), "MixtureBackwardParams.scale = -1"));
}

TEST_CASE("mixture backward refuses a bad workspace") {
  const auto p = valid_mixture_params();
  const std::size_t needed = attn::mixture_backward_workspace_bytes(p);
  CHECK(test::contains(mixture_error(p, needed - 1), "mixture_backward_workspace_bytes"));
  alignas(256) static unsigned char workspace[512];
  CHECK(test::contains(test::error_of([&] { attn::mixture_backward(p, workspace + 8, 1 << 20, nullptr); }),
                       "not 256-byte aligned"));
  CHECK(test::contains(test::error_of([&] { attn::mixture_backward(p, nullptr, 1 << 20, nullptr); }),
                       "workspace is null"));
}

TEST_CASE("mixture backward refuses head splits that do not divide the group") {
  const auto p = valid_mixture_params();
  alignas(256) static unsigned char workspace[256];
  CHECK(test::contains(test::error_of([&] {
                         attn::mixture_backward(p, workspace, std::size_t(1) << 30, nullptr,
                                                BackwardKernel::automatic, {3, 0});
                       }),
                       "head_splits = 3"));
}

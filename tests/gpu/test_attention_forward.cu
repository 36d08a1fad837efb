// The attention forward kernels (Softmax and SlidingWindow) against the float64 Eigen
// reference on the same bf16-rounded inputs, plus identities on the GPU outputs:
// window ≥ T == causal, GQA == repeated k/v heads and, on Hopper, turn-taking of the consumer
// warpgroups on == off (bit for bit), and the portable kernel against the reference where the
// Hopper kernel would run. Tolerances: o (bf16) relative L2
// ≤ 1e-2; lse (fp32 statistics from exact bf16 products) relative L2 ≤ 1e-4.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "dash/core/cuda.hpp"
#include "dash/core/dtype.hpp"
#include "dash/ops/softmax/cuda/forward.cuh"
#include "dash/ops/softmax/eigen.hpp"
#include "support/errors.hpp"
#include "support/gpu.hpp"
#include "support/random.hpp"

using namespace dash;
namespace attention = dash::cuda::attention;
using attention::detail::ForwardKernel;

namespace {

constexpr double lse_tolerance = 1e-4;
constexpr std::int64_t no_window = std::numeric_limits<std::int64_t>::max();

struct Case {
  index_t batch, length, heads, kv_heads, d_head;
  std::int64_t window = no_window;
  std::int64_t sinks = 0;

  friend std::ostream& operator<<(std::ostream& os, const Case& c) {
    os << "B=" << c.batch << " T=" << c.length << " H=" << c.heads << " Hkv=" << c.kv_heads << " D=" << c.d_head;
    if (c.window != no_window) os << " W=" << c.window;
    return os << " S=" << c.sinks;
  }
};

std::string describe(const Case& c) {
  std::ostringstream s;
  s << c;
  return s.str();
}

const char* name(ForwardKernel k) { return k == ForwardKernel::best ? "best" : "portable"; }

Shape q_shape(const Case& c) { return {c.batch, c.length, c.heads, c.d_head}; }
Shape kv_shape(const Case& c) { return {c.batch, c.length, c.kv_heads, c.d_head}; }
Shape lse_shape(const Case& c) { return {c.batch, c.heads, c.length}; }

// Host copies hold exactly the bf16 values the device sees.
Tensor<double> rounded_normal(Shape shape, Rng& rng, double stddev = 1.0) {
  Tensor<double> t = test::random_tensor<double>(shape, rng, stddev);
  for (index_t i = 0; i < t.numel(); ++i) t.data()[i] = double(bf16(float(t.data()[i])));
  return t;
}

struct Inputs {
  Tensor<double> q, k, v;
};

Inputs random_inputs(const Case& c, Rng& rng, double q_stddev = 1.0) {
  return {rounded_normal(q_shape(c), rng, q_stddev), rounded_normal(kv_shape(c), rng), rounded_normal(kv_shape(c), rng)};
}

struct Outputs {
  Tensor<double> o, lse;
};

Outputs reference(const Inputs& x, const Case& c) {
  Outputs want{Tensor<double>(q_shape(c)), Tensor<double>(lse_shape(c))};
  const dash::detail::AttentionMask mask{.window = c.window, .sinks = c.sinks};
  eigen::masked_attention_forward<double>(x.q.view(), x.k.view(), x.v.view(), want.o.view(), want.lse.view(), mask);
  return want;
}

attention::ForwardParams contiguous_params(const Case& c) {
  attention::ForwardParams p;
  p.batch = int(c.batch);
  p.length = int(c.length);
  p.n_heads = int(c.heads);
  p.n_kv_heads = int(c.kv_heads);
  p.d_head = int(c.d_head);
  p.q_strides = p.o_strides = {c.length * c.heads * c.d_head, c.heads * c.d_head};
  p.k_strides = p.v_strides = {c.length * c.kv_heads * c.d_head, c.kv_heads * c.d_head};
  p.scale = float(1.0 / std::sqrt(double(c.d_head)));
  p.mask = {c.window, c.sinks};
  return p;
}

// Runs the forward on contiguous device copies of x, outputs poisoned beforehand.
Outputs run(const Inputs& x, const Case& c, ForwardKernel kernel) {
  const auto q = cuda::to_device_bf16<double>(x.q.view());
  const auto k = cuda::to_device_bf16<double>(x.k.view());
  const auto v = cuda::to_device_bf16<double>(x.v.view());
  cuda::DeviceTensor<cuda::bfloat16> o(q_shape(c));
  cuda::DeviceTensor<float> lse(lse_shape(c));
  test::poison(o);
  test::poison(lse);
  attention::ForwardParams p = contiguous_params(c);
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.o = o.data();
  p.lse = lse.data();
  attention::detail::run_forward(p, kernel, nullptr);
  cuda::check(cudaDeviceSynchronize(), "attention forward");
  return {cuda::to_host_double(o), cuda::to_host_double(lse)};
}

// Largest errors seen by a test case, reported at its end.
struct Worst {
  double o = 0, lse = 0;
  std::string o_case, lse_case;

  void record(const Outputs& got, const Outputs& want, const Case& c, ForwardKernel kernel) {
    const double o_error = test::relative_l2(got.o, want.o), lse_error = test::relative_l2(got.lse, want.lse);
    CAPTURE(c);
    CAPTURE(name(kernel));
    CHECK(o_error <= test::bf16_tolerance);
    CHECK(lse_error <= lse_tolerance);
    if (o_error >= o) o = o_error, o_case = describe(c) + " " + name(kernel);
    if (lse_error >= lse) lse = lse_error, lse_case = describe(c) + " " + name(kernel);
  }
  void report() const {
    MESSAGE("worst o rel-L2 " << o << " (" << o_case << "), worst lse rel-L2 " << lse << " (" << lse_case << ")");
  }
};

void check_against_reference(const Case& c, Rng& rng, Worst& worst, double q_stddev = 1.0) {
  const Inputs x = random_inputs(c, rng, q_stddev);
  const Outputs want = reference(x, c);
  worst.record(run(x, c, ForwardKernel::best), want, c, ForwardKernel::best);
}

bool bitwise_equal(const Tensor<double>& a, const Tensor<double>& b) {
  if (a.shape() != b.shape()) return false;
  for (index_t i = 0; i < a.numel(); ++i)
    if (!(a.data()[i] == b.data()[i])) return false;  // NaN never equals
  return true;
}

}  // namespace

TEST_CASE("attention forward matches the float64 reference: causal, lengths around the tiles, GQA, head widths") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("attention forward causal");
  std::vector<index_t> lengths{1, 7, 63, 64, 65, 127, 128, 129, 130, 255, 257};
  lengths.push_back(index_t(2 + rng.below(400)));
  const index_t groups[] = {1, 3, 8};
  Worst worst;
  int n = 0;
  for (const index_t d_head : {8, 40, 64, 128})
    for (const index_t length : lengths) {
      const index_t group = groups[n++ % 3], kv_heads = group == 8 ? 1 : index_t(1 + rng.below(2));
      const Case c{index_t(1 + rng.below(2)), length, kv_heads * group, kv_heads, d_head};
      check_against_reference(c, rng, worst);
    }
  worst.report();
}

TEST_CASE("attention forward matches the float64 reference: windows and sinks") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("attention forward window");
  struct Window {
    index_t length;
    std::int64_t window, sinks;
  };
  // W = 1 (each query sees itself and the sinks), W below and above both tile widths, sinks
  // inside one tile and across tiles, and a long sequence where most tiles are skipped.
  const Window windows[] = {{300, 1, 0},   {300, 1, 4},     {517, 50, 0},  {517, 50, 3},   {700, 130, 130},
                            {129, 64, 0},  {64, 7, 2},      {65, 200, 70}, {2000, 300, 4}, {1000, 127, 129},
                            {333, 333, 0}, {257, 256, 300}};
  const index_t groups[] = {1, 3, 8};
  Worst worst;
  int n = 0;
  for (const index_t d_head : {8, 64, 128})
    for (const Window& w : windows) {
      const index_t group = groups[n++ % 3];
      const Case c{1, w.length, group * (w.length > 1000 ? 1 : 2), w.length > 1000 ? 1 : 2, d_head, w.window, w.sinks};
      check_against_reference(c, rng, worst);
    }
  worst.report();
}

TEST_CASE("attention forward matches the float64 reference with peaked scores (large running-maximum updates)") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("attention forward peaked");
  Worst worst;
  for (const index_t d_head : {16, 64, 128}) {
    check_against_reference({2, 390, 4, 2, d_head}, rng, worst, 4.0);
    check_against_reference({1, 390, 4, 4, d_head, 100, 2}, rng, worst, 4.0);
  }
  worst.report();
}

TEST_CASE("attention forward matches the float64 reference with more query blocks than the GPU has SMs") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("attention forward many blocks");
  Worst worst;
  for (const index_t d_head : {64, 128}) {
    check_against_reference({2, 1000, 12, 3, d_head}, rng, worst);
    check_against_reference({3, 900, 12, 4, d_head, 100, 2}, rng, worst);
  }
  worst.report();
}

TEST_CASE("the portable kernel matches the float64 reference at every head width, also where the Hopper one runs") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("attention forward portable");
  Worst worst;
  const Case cases[] = {{2, 130, 6, 2, 64},       {1, 257, 8, 1, 128},        {1, 65, 3, 3, 128, 20, 1},
                        {2, 300, 4, 4, 64, 1, 0}, {1, 200, 8, 1, 128, 70, 65}, {1, 77, 2, 1, 100},
                        {1, 99, 4, 2, 5},         {2, 140, 2, 2, 33, 64, 1},   {1, 31, 2, 2, 1}};
  for (const Case& c : cases) {
    const Inputs x = random_inputs(c, rng);
    worst.record(run(x, c, ForwardKernel::portable), reference(x, c), c, ForwardKernel::portable);
  }
  worst.report();
}

TEST_CASE("attention forward: a window of at least T is causal softmax, bit for bit") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("attention forward window identity");
  for (const index_t d_head : {40, 64, 128}) {
    const Case causal{2, 333, 4, 2, d_head};
    const Inputs x = random_inputs(causal, rng);
    const Outputs want = run(x, causal, ForwardKernel::best);
    for (const std::int64_t window : {std::int64_t(333), std::int64_t(334), std::int64_t(1) << 40}) {
      Case windowed = causal;
      windowed.window = window;
      windowed.sinks = 5;
      const Outputs got = run(x, windowed, ForwardKernel::best);
      CAPTURE(windowed);
      CHECK(bitwise_equal(got.o, want.o));
      CHECK(bitwise_equal(got.lse, want.lse));
    }
  }
}

TEST_CASE("attention forward: GQA equals multi-head attention with repeated k and v heads, bit for bit") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("attention forward gqa identity");
  for (const index_t d_head : {8, 64, 128})
    for (const std::int64_t window : {no_window, std::int64_t(90)}) {
      const Case grouped{2, 200, 8, 2, d_head, window, 3};
      Case repeated = grouped;
      repeated.kv_heads = grouped.heads;
      const Inputs x = random_inputs(grouped, rng);
      Inputs xr{x.q, Tensor<double>(kv_shape(repeated)), Tensor<double>(kv_shape(repeated))};
      const index_t group = grouped.heads / grouped.kv_heads;
      for (index_t b = 0; b < grouped.batch; ++b)
        for (index_t t = 0; t < grouped.length; ++t)
          for (index_t h = 0; h < grouped.heads; ++h)
            for (index_t d = 0; d < d_head; ++d) {
              xr.k(b, t, h, d) = x.k(b, t, h / group, d);
              xr.v(b, t, h, d) = x.v(b, t, h / group, d);
            }
      const Outputs got = run(x, grouped, ForwardKernel::best), want = run(xr, repeated, ForwardKernel::best);
      CAPTURE(grouped);
      CHECK(bitwise_equal(got.o, want.o));
      CHECK(bitwise_equal(got.lse, want.lse));
    }
}

TEST_CASE("attention forward reads q, k, v as slices of one fused projection and writes only o's rows") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("attention forward fused");
  Worst worst;
  for (const index_t d_head : {7, 40, 64, 128})
    for (const std::int64_t window : {no_window, std::int64_t(45)}) {
      const Case c{2, 190, 6, 2, d_head, window, 2};
      const index_t width = (c.heads + 2 * c.kv_heads) * d_head;     // one token of [q | k | v]
      const index_t o_width = c.heads * d_head + 8;                  // o rows padded by 8 elements
      const Tensor<double> fused = rounded_normal(Shape{c.batch, c.length, width}, rng);
      Inputs x{Tensor<double>(q_shape(c)), Tensor<double>(kv_shape(c)), Tensor<double>(kv_shape(c))};
      for (index_t b = 0; b < c.batch; ++b)
        for (index_t t = 0; t < c.length; ++t)
          for (index_t d = 0; d < d_head; ++d) {
            for (index_t h = 0; h < c.heads; ++h) x.q(b, t, h, d) = fused(b, t, h * d_head + d);
            for (index_t h = 0; h < c.kv_heads; ++h) {
              x.k(b, t, h, d) = fused(b, t, (c.heads + h) * d_head + d);
              x.v(b, t, h, d) = fused(b, t, (c.heads + c.kv_heads + h) * d_head + d);
            }
          }
      const auto device_fused = cuda::to_device_bf16<double>(fused.view());
      cuda::DeviceTensor<cuda::bfloat16> o(Shape{c.batch, c.length, o_width});
      cuda::DeviceTensor<float> lse(lse_shape(c));
      test::poison(o);
      test::poison(lse);
      attention::ForwardParams p = contiguous_params(c);
      p.q = device_fused.data();
      p.k = device_fused.data() + c.heads * d_head;
      p.v = device_fused.data() + (c.heads + c.kv_heads) * d_head;
      p.q_strides = p.k_strides = p.v_strides = {c.length * width, width};
      p.o = o.data();
      p.o_strides = {c.length * o_width, o_width};
      p.lse = lse.data();
      attention::forward(p, nullptr);
      cuda::check(cudaDeviceSynchronize(), "attention forward (fused)");

      const Tensor<double> o_rows = cuda::to_host_double(o);
      Outputs got{Tensor<double>(q_shape(c)), cuda::to_host_double(lse)};
      bool padding_untouched = true;
      for (index_t b = 0; b < c.batch; ++b)
        for (index_t t = 0; t < c.length; ++t) {
          for (index_t h = 0; h < c.heads; ++h)
            for (index_t d = 0; d < d_head; ++d) got.o(b, t, h, d) = o_rows(b, t, h * d_head + d);
          for (index_t e = c.heads * d_head; e < o_width; ++e) padding_untouched &= std::isnan(o_rows(b, t, e));
        }
      CAPTURE(c);
      CHECK(padding_untouched);
      worst.record(got, reference(x, c), c, ForwardKernel::best);
    }
  worst.report();
}

TEST_CASE("small shapes for the sanitizers: both kernels, masks, lengths off the tile") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("attention forward sanitizer");
  Worst worst;
  const Case cases[] = {{1, 130, 2, 1, 64, 50, 2}, {1, 65, 2, 2, 128}, {2, 7, 3, 1, 8, 3, 1}, {1, 200, 2, 1, 128, 1, 130}};
  for (const Case& c : cases)
    for (const ForwardKernel kernel : {ForwardKernel::best, ForwardKernel::portable}) {
      const Inputs x = random_inputs(c, rng);
      worst.record(run(x, c, kernel), reference(x, c), c, kernel);
    }
  worst.report();
}

TEST_CASE("attention forward on Hopper: the consumers' turn-taking changes the issue order, not one bit") {
  if (!test::gpu_available()) return;
  if (attention::detail::current_device().major != 9) return;
  Rng rng = test::rng_for("attention forward turns");
  for (const index_t d_head : {64, 128}) {
    const Case cases[] = {{1, 1, 2, 1, d_head}, {2, 300, 4, 2, d_head}, {1, 700, 2, 1, d_head, 100, 3},
                          {2, 2400, 16, 2, d_head, 128, 1}};
    for (const Case& c : cases) {
      const Inputs x = random_inputs(c, rng);
      const Outputs want = run(x, c, ForwardKernel::best);
      const auto q = cuda::to_device_bf16<double>(x.q.view());
      const auto k = cuda::to_device_bf16<double>(x.k.view());
      const auto v = cuda::to_device_bf16<double>(x.v.view());
      cuda::DeviceTensor<cuda::bfloat16> o(q_shape(c));
      cuda::DeviceTensor<float> lse(lse_shape(c));
      test::poison(o);
      test::poison(lse);
      attention::ForwardParams p = contiguous_params(c);
      p.q = q.data();
      p.k = k.data();
      p.v = v.data();
      p.o = o.data();
      p.lse = lse.data();
      namespace detail = attention::detail;
      detail::validate_forward(p);
      const auto mask = detail::visible_keys(p);
      const int ctas = detail::hopper_ctas(mask, p.length, detail::current_device().sms);
      if (d_head == 64)
        detail::launch_forward_hopper<64, !detail::alternate_consumers<64>>(p, mask, ctas, nullptr);
      else
        detail::launch_forward_hopper<128, !detail::alternate_consumers<128>>(p, mask, ctas, nullptr);
      cuda::check(cudaDeviceSynchronize(), "attention forward (turns flipped)");
      CAPTURE(c);
      CHECK(bitwise_equal(cuda::to_host_double(o), want.o));
      CHECK(bitwise_equal(cuda::to_host_double(lse), want.lse));
    }
  }
}

// The pair forward (causal and window W in one launch) against two forward() calls and the
// float64 reference, for windows on and off the tile width, lengths around it and both paths
// (Hopper at d_head 64 and 128, the two forwards at an odd d_head).
namespace {

struct PairOutputs {
  Outputs causal, window;
};

PairOutputs run_pair(const Inputs& x, const Case& c, std::int64_t window) {
  const auto q = cuda::to_device_bf16<double>(x.q.view());
  const auto k = cuda::to_device_bf16<double>(x.k.view());
  const auto v = cuda::to_device_bf16<double>(x.v.view());
  cuda::DeviceTensor<cuda::bfloat16> o(q_shape(c)), window_o(q_shape(c));
  cuda::DeviceTensor<float> lse(lse_shape(c)), window_lse(lse_shape(c));
  test::poison(o);
  test::poison(lse);
  test::poison(window_o);
  test::poison(window_lse);
  attention::ForwardParams f = contiguous_params(c);
  f.q = q.data(), f.k = k.data(), f.v = v.data(), f.o = o.data(), f.lse = lse.data();
  const attention::PairForwardParams p =
      attention::pair_params(f, window_o.data(), f.o_strides, window_lse.data(), window);
  attention::pair_forward(p, nullptr);
  cuda::check(cudaDeviceSynchronize(), "attention pair forward");
  return {{cuda::to_host_double(o), cuda::to_host_double(lse)},
          {cuda::to_host_double(window_o), cuda::to_host_double(window_lse)}};
}

// Largest |got − want| / max(|want|, 1) over all elements (an lse near 0 is compared
// absolutely); infinity if anything is not finite.
double max_relative(const Tensor<double>& got, const Tensor<double>& want) {
  double worst = 0;
  for (index_t i = 0; i < got.numel(); ++i) {
    const double a = got.data()[i], b = want.data()[i];
    if (!std::isfinite(a) || !std::isfinite(b)) return std::numeric_limits<double>::infinity();
    worst = std::max(worst, std::abs(a - b) / std::max(std::abs(b), 1.0));
  }
  return worst;
}

struct PairWorst {
  double o_vs_forward = 0, lse_vs_forward = 0;
  Worst reference;

  void record(const Outputs& got, const Outputs& forward, const Outputs& want, const Case& c) {
    const double o_error = test::relative_l2(got.o, forward.o), lse_error = max_relative(got.lse, forward.lse);
    CAPTURE(c);
    CHECK(o_error <= test::bf16_tolerance);
    CHECK(lse_error <= test::fp32_tolerance);
    o_vs_forward = std::max(o_vs_forward, o_error);
    lse_vs_forward = std::max(lse_vs_forward, lse_error);
    reference.record(got, want, c, ForwardKernel::best);
  }
  void report() const {
    MESSAGE("pair vs forward(): worst o rel-L2 " << o_vs_forward << ", worst lse max-rel " << lse_vs_forward);
    reference.report();
  }
};

void check_pair(const Case& c, std::int64_t window, Rng& rng, PairWorst& worst) {
  const Inputs x = random_inputs(c, rng);
  Case windowed = c;
  windowed.window = window;
  const PairOutputs got = run_pair(x, c, window);
  worst.record(got.causal, run(x, c, ForwardKernel::best), reference(x, c), c);
  worst.record(got.window, run(x, windowed, ForwardKernel::best), reference(x, windowed), windowed);
  if (window >= c.length) {  // the window covers every causal key: both outputs are one
    CAPTURE(windowed);
    CHECK(bitwise_equal(got.window.o, got.causal.o));
    CHECK(bitwise_equal(got.window.lse, got.causal.lse));
  }
}

}  // namespace

TEST_CASE("attention pair forward equals two forwards and the float64 reference: windows across the tiles") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("attention pair forward");
  const index_t lengths[] = {1, 7, 63, 65, 130, 300, 1000, index_t(2049 + 2 * rng.below(200))};
  PairWorst worst;
  int n = 0;
  for (const index_t d_head : {64, 128, 40})
    for (const index_t length : lengths) {
      const std::int64_t windows[] = {1, 17, 64, 128, 129, 500, 512, std::int64_t(length + rng.below(3))};
      const index_t group = n % 2 ? 3 : 1, kv_heads = length > 1000 ? 1 : 2;
      for (const std::int64_t window : windows) {
        if (length > 1000 && n++ % 2) continue;  // half of the long cases, to keep the run short
        const Case c{length > 1000 ? 1 : index_t(1 + rng.below(2)), length, kv_heads * group, kv_heads, d_head};
        check_pair(c, window, rng, worst);
        ++n;
      }
    }
  worst.report();
}

TEST_CASE("small shapes for the sanitizers: the pair forward") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("attention pair forward sanitizer");
  PairWorst worst;
  check_pair({1, 300, 2, 1, 64}, 129, rng, worst);
  check_pair({1, 260, 4, 2, 128}, 128, rng, worst);
  check_pair({2, 70, 2, 1, 128}, 17, rng, worst);
  check_pair({1, 40, 2, 2, 24}, 9, rng, worst);
  worst.report();
}

// Bad input: refused on the host, before any CUDA call, so these run without a device.
namespace {

struct Dummy {
  alignas(16) cuda::bfloat16 q[4], k[4], v[4], o[4];
  float lse[4];
};

attention::ForwardParams valid_params(Dummy& d) {
  attention::ForwardParams p = contiguous_params({2, 10, 4, 2, 16});
  p.q = d.q;
  p.k = d.k;
  p.v = d.v;
  p.o = d.o;
  p.lse = d.lse;
  return p;
}

std::string refusal(const attention::ForwardParams& p) {
  return test::error_of([&] { attention::forward(p, nullptr); });
}

}  // namespace

TEST_CASE("attention forward refuses a null pointer") {
  Dummy d;
  const std::pair<const char*, void (*)(attention::ForwardParams&)> nulls[] = {
      {"q is null", [](attention::ForwardParams& p) { p.q = nullptr; }},
      {"k is null", [](attention::ForwardParams& p) { p.k = nullptr; }},
      {"v is null", [](attention::ForwardParams& p) { p.v = nullptr; }},
      {"o is null", [](attention::ForwardParams& p) { p.o = nullptr; }},
      {"lse is null", [](attention::ForwardParams& p) { p.lse = nullptr; }}};
  for (const auto& [message, clear] : nulls) {
    attention::ForwardParams p = valid_params(d);
    clear(p);
    CHECK(test::contains(refusal(p), message));
  }
}

TEST_CASE("attention forward refuses n_heads that is not a multiple of n_kv_heads") {
  Dummy d;
  attention::ForwardParams p = valid_params(d);
  p.n_heads = 6;
  p.n_kv_heads = 4;
  p.q_strides = p.o_strides = {10 * 6 * 16, 6 * 16};
  p.k_strides = p.v_strides = {10 * 4 * 16, 4 * 16};
  CHECK(test::contains(refusal(p), "n_heads = 6 is not a multiple of n_kv_heads = 4"));
  p.n_kv_heads = 0;
  CHECK(test::contains(refusal(p), "n_kv_heads = 0"));
}

TEST_CASE("attention forward refuses d_head 0 and d_head above 128") {
  Dummy d;
  for (const int d_head : {0, 129, -3}) {
    attention::ForwardParams p = valid_params(d);
    p.d_head = d_head;
    CHECK(test::contains(refusal(p), "d_head = " + std::to_string(d_head) + ", expected 1 ... 128"));
  }
}

TEST_CASE("attention forward refuses an empty sequence and an empty batch") {
  Dummy d;
  attention::ForwardParams p = valid_params(d);
  p.length = 0;
  CHECK(test::contains(refusal(p), "length T = 0"));
  p = valid_params(d);
  p.batch = 0;
  CHECK(test::contains(refusal(p), "batch = 0"));
}

TEST_CASE("attention forward refuses a window below 1 and negative sinks") {
  Dummy d;
  attention::ForwardParams p = valid_params(d);
  p.mask.window = 0;
  CHECK(test::contains(refusal(p), "mask.window = 0, expected >= 1"));
  p = valid_params(d);
  p.mask.sinks = -1;
  CHECK(test::contains(refusal(p), "mask.sinks = -1, expected >= 0"));
}

TEST_CASE("attention forward refuses strides smaller than a token's row") {
  Dummy d;
  attention::ForwardParams p = valid_params(d);
  p.q_strides.token = 63;
  CHECK(test::contains(refusal(p), "q_strides.token = 63, expected >= 64"));
  p = valid_params(d);
  p.k_strides.token = 16;
  CHECK(test::contains(refusal(p), "k_strides.token = 16, expected >= 32"));
  p = valid_params(d);
  p.v_strides.batch = 8;
  CHECK(test::contains(refusal(p), "v_strides.batch = 8, expected >= 32"));
  p = valid_params(d);
  p.o_strides.token = -64;
  CHECK(test::contains(refusal(p), "o_strides.token = -64"));
}

TEST_CASE("attention forward refuses a scale that is not finite and positive") {
  Dummy d;
  attention::ForwardParams p = valid_params(d);
  p.scale = std::numeric_limits<float>::quiet_NaN();
  CHECK(test::contains(refusal(p), "scale = nan"));
  p.scale = 0;
  CHECK(test::contains(refusal(p), "scale = 0"));
}

namespace {

attention::PairForwardParams valid_pair_params(Dummy& d, Dummy& w) {
  const attention::ForwardParams f = valid_params(d);
  return attention::pair_params(f, w.o, f.o_strides, w.lse, 4);
}

std::string pair_refusal(const attention::PairForwardParams& p) {
  return test::error_of([&] { attention::pair_forward(p, nullptr); });
}

}  // namespace

TEST_CASE("attention pair forward refuses a null pointer") {
  Dummy d, w;
  const std::pair<const char*, void (*)(attention::PairForwardParams&)> nulls[] = {
      {"pair_forward: q is null", [](attention::PairForwardParams& p) { p.q = nullptr; }},
      {"pair_forward: k is null", [](attention::PairForwardParams& p) { p.k = nullptr; }},
      {"pair_forward: v is null", [](attention::PairForwardParams& p) { p.v = nullptr; }},
      {"pair_forward: o is null", [](attention::PairForwardParams& p) { p.o = nullptr; }},
      {"pair_forward: lse is null", [](attention::PairForwardParams& p) { p.lse = nullptr; }},
      {"pair_forward: window_o is null", [](attention::PairForwardParams& p) { p.window_o = nullptr; }},
      {"pair_forward: window_lse is null", [](attention::PairForwardParams& p) { p.window_lse = nullptr; }}};
  for (const auto& [message, clear] : nulls) {
    attention::PairForwardParams p = valid_pair_params(d, w);
    clear(p);
    CHECK(test::contains(pair_refusal(p), message));
  }
}

TEST_CASE("attention pair forward refuses a window below 1") {
  Dummy d, w;
  attention::PairForwardParams p = valid_pair_params(d, w);
  p.window = 0;
  CHECK(test::contains(pair_refusal(p), "pair_forward: window = 0, expected >= 1"));
}

TEST_CASE("attention pair forward refuses bad sizes, scale and strides") {
  Dummy d, w;
  attention::PairForwardParams p = valid_pair_params(d, w);
  p.n_heads = 6;
  p.n_kv_heads = 4;
  CHECK(test::contains(pair_refusal(p), "n_heads = 6 is not a multiple of n_kv_heads = 4"));
  p = valid_pair_params(d, w);
  p.d_head = 129;
  CHECK(test::contains(pair_refusal(p), "d_head = 129, expected 1 ... 128"));
  p = valid_pair_params(d, w);
  p.length = 0;
  CHECK(test::contains(pair_refusal(p), "length T = 0"));
  p = valid_pair_params(d, w);
  p.batch = 0;
  CHECK(test::contains(pair_refusal(p), "batch = 0"));
  p = valid_pair_params(d, w);
  p.scale = 0;
  CHECK(test::contains(pair_refusal(p), "scale = 0"));
  p = valid_pair_params(d, w);
  p.o_strides.token = 63;
  CHECK(test::contains(pair_refusal(p), "pair_forward: o_strides.token = 63, expected >= 64"));
  p = valid_pair_params(d, w);
  p.window_o_strides.token = 63;
  CHECK(test::contains(pair_refusal(p), "pair_forward: window_o_strides.token = 63, expected >= 64"));
  p = valid_pair_params(d, w);
  p.window_o_strides.batch = 8;
  CHECK(test::contains(pair_refusal(p), "pair_forward: window_o_strides.batch = 8, expected >= 64"));
}

// The fused chunked LM-head loss against dash::model::kl_loss and nll_loss in float64 on the
// same bf16-rounded hidden states and head, from V = 512 (stories260K) through V = 49152
// (SmolLM2, many chunks) to V = 151936 (Qwen2.5, a cluster of 7 blocks per row); and the
// per-row kernel alone on given fp32 logits.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "dash/core/cuda.hpp"
#include "dash/core/dtype.hpp"
#include "dash/model/cuda/gemm.cuh"
#include "dash/model/cuda/lm_loss.cuh"
#include "dash/model/loss.hpp"
#include "support/errors.hpp"
#include "support/gpu.hpp"
#include "support/random.hpp"

using namespace dash;
namespace cm = dash::cuda::model;
using dash::cuda::bfloat16;

namespace {

// Random values rounded to bf16, on the host (as double) and on the device.
struct Bf16Operand {
  Tensor<double> host;
  dash::cuda::DeviceTensor<bfloat16> device;
};

Bf16Operand bf16_operand(Tensor<double> t) {
  for (double& v : t.flat()) v = double(bf16(float(v)));
  auto device = dash::cuda::to_device_bf16<double>(t.view());
  return {std::move(t), std::move(device)};
}

struct Case {
  index_t tokens;
  int d;
  int vocab;
  index_t chunk;  // 0: the default
};

// The loss with its scalars and gradient, poisoned before the launch.
struct Result {
  double sum = 0, mean = 0;
  int count = 0;
  Tensor<double> token_loss, d_hidden;
};

Result run_loss(dash::cuda::Gemm& gemm, cm::LmLossParams p, index_t chunk, DType grad_type, const Tensor<double>* grad_init,
                dash::cuda::DeviceTensor<unsigned long long>* invalid = nullptr) {
  dash::cuda::DeviceTensor<float> scalars(Shape{2}), token_loss(Shape{p.tokens});
  dash::cuda::DeviceTensor<int> count(Shape{1});
  dash::cuda::DeviceTensor<float> grad_f32(Shape{p.tokens, p.d_model});
  dash::cuda::DeviceTensor<bfloat16> grad_bf16(Shape{p.tokens, p.d_model});
  test::poison(scalars), test::poison(token_loss), test::poison(count), test::poison(grad_f32),
      test::poison(grad_bf16);
  if (grad_init) {
    Tensor<float> f(grad_init->shape());
    for (index_t i = 0; i < f.numel(); ++i) f.data()[i] = float(grad_init->data()[i]);
    grad_f32 = dash::cuda::DeviceTensor<float>::from_host(f.view());
    grad_bf16 = dash::cuda::to_device_bf16<double>(grad_init->view());
  }
  p.loss_sum = scalars.data(), p.loss_mean = scalars.data() + 1, p.count = count.data();
  p.token_loss = token_loss.data();
  p.d_hidden = grad_type == DType::f32 ? static_cast<void*>(grad_f32.data()) : static_cast<void*>(grad_bf16.data());
  p.d_hidden_type = grad_type;
  p.accumulate = grad_init != nullptr;
  if (invalid) p.invalid_target = invalid->data();
  const std::size_t bytes = cm::lm_loss_workspace_bytes(gemm, p, chunk);
  if (chunk) CHECK(cm::lm_loss_chunk_tokens(gemm, p, bytes) == std::min(chunk, p.tokens));
  dash::cuda::DeviceTensor<std::uint8_t> workspace(Shape{index_t(bytes)});
  test::poison(workspace);  // the logits' padding columns hold NaN: the kernels must not read them
  cm::lm_loss(gemm, p, workspace.data(), bytes, nullptr);
  dash::cuda::check(cudaDeviceSynchronize(), "lm_loss");
  Result r;
  const Tensor<float> s = scalars.to_host();
  r.sum = s.data()[0], r.mean = s.data()[1];
  r.count = count.to_host().data()[0];
  r.token_loss = dash::cuda::to_host_double(token_loss);
  r.d_hidden = grad_type == DType::f32 ? dash::cuda::to_host_double(grad_f32) : dash::cuda::to_host_double(grad_bf16);
  return r;
}

// Tolerance of the loss value: the logits come from an fp32-accumulated bf16 GEMM, every later
// step is fp32 (statistics) or double (the sum over tokens).
constexpr double loss_tolerance = 1e-5;

const Case cases[] = {
    {1, 8, 512, 0},   {7, 64, 512, 0},  {130, 64, 512, 0},  {130, 64, 512, 7},   {5, 40, 1000, 2},
    {9, 13, 777, 0},  {7, 576, 49152, 2}, {3, 64, 151936, 0},
};

// Hidden states of unit scale and a head that gives logits of standard deviation about 3;
// the student is a perturbed teacher, so that KL is of a realistic size (≈ 0.1 – 1 nats).
void make_inputs(const Case& c, Rng& rng, Bf16Operand& teacher, Bf16Operand& student, Bf16Operand& head) {
  Tensor<double> t = test::random_tensor<double>(Shape{c.tokens, c.d}, rng);
  Tensor<double> s = clone(t.view());
  for (double& v : s.flat()) v = 0.9 * v + 0.4 * rng.normal();
  teacher = bf16_operand(std::move(t));
  student = bf16_operand(std::move(s));
  head = bf16_operand(test::random_tensor<double>(Shape{c.vocab, c.d}, rng, 3.0 / std::sqrt(double(c.d))));
}

}  // namespace

TEST_CASE("fused KL loss and its gradient match kl_loss") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("lm loss kl");
  dash::cuda::Gemm gemm;
  double worst_loss = 0, worst_grad[2] = {0, 0};
  for (const Case& c : cases)
    for (DType grad_type : {DType::bf16, DType::f32})
      for (bool accumulate : {false, true}) {
        Bf16Operand teacher, student, head;
        make_inputs(c, rng, teacher, student, head);
        const Tensor<double> init = test::random_tensor<double>(Shape{c.tokens, c.d}, rng, 1e-3);
        Tensor<double> init_rounded = clone(init.view());
        for (double& v : init_rounded.flat()) v = grad_type == DType::bf16 ? double(bf16(float(v))) : double(float(v));
        Tensor<double> want_grad = accumulate ? clone(init_rounded.view()) : Tensor<double>(Shape{c.tokens, c.d}, 0.0);
        const auto want = dash::model::kl_loss<double>(head.host.view(), teacher.host.view(), student.host.view(),
                                                       want_grad.view());
        cm::LmLossParams p;
        p.kind = cm::LmLoss::kl;
        p.teacher_hidden = teacher.device.data(), p.hidden = student.device.data(), p.head = head.device.data();
        p.tokens = c.tokens, p.d_model = c.d, p.vocab = c.vocab;
        const Result got = run_loss(gemm, p, c.chunk, grad_type, accumulate ? &init_rounded : nullptr);
        const double loss_error = std::abs(got.mean - want.mean()) / std::abs(want.mean());
        const double grad_error = test::relative_l2(got.d_hidden, want_grad);
        INFO("kl tokens ", c.tokens, " d ", c.d, " vocab ", c.vocab, " chunk ", c.chunk, " grad ",
             name_of(grad_type), " accumulate ", accumulate, ": mean ", got.mean, " want ", want.mean());
        CHECK(loss_error <= loss_tolerance);
        CHECK(std::abs(got.sum - want.sum) <= loss_tolerance * std::abs(want.sum));
        CHECK(got.count == c.tokens);
        CHECK(grad_error <= test::bf16_tolerance);
        worst_loss = std::max(worst_loss, loss_error);
        worst_grad[grad_type == DType::f32] = std::max(worst_grad[grad_type == DType::f32], grad_error);
      }
  MESSAGE("kl worst relative error: loss ", worst_loss, ", d_hidden bf16 ", worst_grad[0], ", f32 ", worst_grad[1]);
}

TEST_CASE("fused NLL loss with ignored targets matches nll_loss; invalid targets are reported") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("lm loss nll");
  dash::cuda::Gemm gemm;
  dash::cuda::DeviceTensor<unsigned long long> invalid(Shape{1});
  double worst_loss = 0, worst_grad = 0;
  for (const Case& c : cases)
    for (DType grad_type : {DType::bf16, DType::f32}) {
      Bf16Operand teacher, hidden, head;
      make_inputs(c, rng, teacher, hidden, head);
      std::vector<int> targets(static_cast<std::size_t>(c.tokens));
      for (int& y : targets) y = int(rng.below(std::uint64_t(c.vocab)));
      if (c.tokens > 3) targets[1] = -1;
      Tensor<double> want_grad(Shape{c.tokens, c.d}, 0.0);
      const auto want = dash::model::nll_loss<double>(head.host.view(), hidden.host.view(), targets, want_grad.view());
      // An id ≥ vocab is not counted either (the CPU reference refuses it), and it is reported.
      if (c.tokens > 3) targets[2] = c.vocab + 7;
      Tensor<double> want_without(Shape{c.tokens, c.d}, 0.0);
      std::vector<int> counted = targets;
      if (c.tokens > 3) counted[2] = -1;
      const auto want2 =
          dash::model::nll_loss<double>(head.host.view(), hidden.host.view(), counted, want_without.view());
      Tensor<int> targets_host(Shape{c.tokens});
      std::copy(targets.begin(), targets.end(), targets_host.data());
      const auto targets_device = dash::cuda::DeviceTensor<int>::from_host(targets_host.view());
      cm::LmLossParams p;
      p.kind = cm::LmLoss::nll;
      p.hidden = hidden.device.data(), p.targets = targets_device.data(), p.head = head.device.data();
      p.tokens = c.tokens, p.d_model = c.d, p.vocab = c.vocab;
      const Result got = run_loss(gemm, p, c.chunk, grad_type, nullptr, &invalid);
      const double loss_error = std::abs(got.mean - want2.mean()) / std::abs(want2.mean());
      const double grad_error = test::relative_l2(got.d_hidden, want_without);
      INFO("nll tokens ", c.tokens, " d ", c.d, " vocab ", c.vocab, " chunk ", c.chunk, " grad ", name_of(grad_type),
           ": mean ", got.mean, " want ", want2.mean());
      CHECK(loss_error <= loss_tolerance);
      CHECK(got.count == want2.count);
      CHECK(grad_error <= test::bf16_tolerance);
      if (c.tokens > 3) {
        CHECK(got.token_loss(1) == 0.0);
        CHECK(got.token_loss(2) == 0.0);
        const auto report = cm::invalid_token(invalid.to_host().data()[0]);
        REQUIRE(report.has_value());
        CHECK(report->position == 2);
        CHECK(report->id == c.vocab + 7);
      } else {
        CHECK(got.count == want.count);
        CHECK(!cm::invalid_token(invalid.to_host().data()[0]).has_value());
      }
      worst_loss = std::max(worst_loss, loss_error);
      worst_grad = std::max(worst_grad, grad_error);
    }
  MESSAGE("nll worst relative error: loss ", worst_loss, ", d_hidden ", worst_grad);
}

TEST_CASE("the loss does not depend on the chunk size") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("lm loss chunks");
  dash::cuda::Gemm gemm;
  const Case c{65, 64, 4999, 0};
  Bf16Operand teacher, student, head;
  make_inputs(c, rng, teacher, student, head);
  cm::LmLossParams p;
  p.teacher_hidden = teacher.device.data(), p.hidden = student.device.data(), p.head = head.device.data();
  p.tokens = c.tokens, p.d_model = c.d, p.vocab = c.vocab;
  const Result whole = run_loss(gemm, p, 0, DType::f32, nullptr);
  for (index_t chunk : {1, 7, 64}) {
    const Result part = run_loss(gemm, p, chunk, DType::f32, nullptr);
    INFO("chunk ", chunk);
    CHECK(std::abs(part.sum - whole.sum) <= 1e-6 * std::abs(whole.sum));
    // The GEMMs may pick other algorithms for other row counts: logits agree to fp32 rounding,
    // and dz, stored in bf16, may then round the other way.
    CHECK(test::relative_l2(part.d_hidden, whole.d_hidden) <= 1e-3);
  }
}

TEST_CASE("logit_loss on given fp32 logits matches the float64 formulas") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("logit loss");
  double worst_loss = 0, worst_grad = 0;
  for (cm::LmLoss kind : {cm::LmLoss::kl, cm::LmLoss::nll})
    for (const auto& [rows, vocab] : {std::array<int, 2>{1, 512}, {7, 1001}, {130, 512}, {3, 49152}, {2, 151936}}) {
      const index_t ld = (vocab + 3) / 4 * 4 + 4;
      Tensor<double> zt(Shape{rows, ld}), zs(Shape{rows, ld});
      for (index_t i = 0; i < zt.numel(); ++i) {
        zt.data()[i] = double(float(3 * rng.normal()));
        zs.data()[i] = double(float(0.8 * zt.data()[i] + 1.5 * rng.normal()));
      }
      std::vector<int> targets(static_cast<std::size_t>(rows));
      for (int& y : targets) y = int(rng.below(std::uint64_t(vocab)));
      if (rows > 1) targets[0] = -1;
      // float64 reference over the first `vocab` columns.
      Tensor<double> want_loss(Shape{rows}), want_grad(Shape{rows, vocab});
      const double scale = 0.25;
      for (index_t r = 0; r < rows; ++r) {
        const auto lse = [&](const Tensor<double>& z) {
          double m = -INFINITY, s = 0;
          for (int v = 0; v < vocab; ++v) m = std::max(m, z(r, v));
          for (int v = 0; v < vocab; ++v) s += std::exp(z(r, v) - m);
          return m + std::log(s);
        };
        const double lt = lse(zt), ls = lse(zs);
        double loss = 0;
        const int y = targets[std::size_t(r)];
        for (int v = 0; v < vocab; ++v) {
          const double p = std::exp(zt(r, v) - lt), q = std::exp(zs(r, v) - ls);
          if (kind == cm::LmLoss::kl) {
            loss += p * ((zt(r, v) - lt) - (zs(r, v) - ls));
            want_grad(r, v) = scale * (q - p);
          } else {
            want_grad(r, v) = y < 0 ? 0.0 : scale * (q - (v == y));
          }
        }
        want_loss(r) = kind == cm::LmLoss::kl ? loss : (y < 0 ? 0.0 : ls - zs(r, y));
      }
      Tensor<float> zt_f(zt.shape()), zs_f(zs.shape());
      for (index_t i = 0; i < zt.numel(); ++i) zt_f.data()[i] = float(zt.data()[i]), zs_f.data()[i] = float(zs.data()[i]);
      // Columns beyond vocab are NaN: they must not be read.
      for (index_t r = 0; r < rows; ++r)
        for (index_t v = vocab; v < ld; ++v) zt_f(r, v) = zs_f(r, v) = NAN;
      const auto zt_d = dash::cuda::DeviceTensor<float>::from_host(zt_f.view());
      const auto zs_d = dash::cuda::DeviceTensor<float>::from_host(zs_f.view());
      Tensor<int> targets_host(Shape{rows});
      std::copy(targets.begin(), targets.end(), targets_host.data());
      const auto targets_d = dash::cuda::DeviceTensor<int>::from_host(targets_host.view());
      dash::cuda::DeviceTensor<float> loss_d(Shape{rows});
      dash::cuda::DeviceTensor<bfloat16> grad_d(Shape{rows, ld});
      test::poison(loss_d), test::poison(grad_d);
      cm::LogitLossParams p;
      p.kind = kind;
      p.teacher = kind == cm::LmLoss::kl ? zt_d.data() : nullptr;
      p.student = zs_d.data();
      p.targets = kind == cm::LmLoss::nll ? targets_d.data() : nullptr;
      p.rows = rows, p.vocab = vocab, p.ld = ld;
      p.token_loss = loss_d.data(), p.d_logits = grad_d.data(), p.ld_grad = ld, p.grad_scale = float(scale);
      cm::logit_loss(p, nullptr);
      const Tensor<double> grad_all = dash::cuda::to_host_double(grad_d);
      Tensor<double> grad(Shape{rows, vocab});
      for (index_t r = 0; r < rows; ++r)
        for (index_t v = 0; v < vocab; ++v) grad(r, v) = grad_all(r, v);
      const double loss_error = test::relative_l2(dash::cuda::to_host_double(loss_d), want_loss);
      const double grad_error = test::relative_l2(grad, want_grad);
      INFO((kind == cm::LmLoss::kl ? "kl" : "nll"), " rows ", rows, " vocab ", vocab);
      CHECK(loss_error <= test::fp32_tolerance);
      CHECK(grad_error <= test::bf16_tolerance);
      worst_loss = std::max(worst_loss, loss_error);
      worst_grad = std::max(worst_grad, grad_error);
    }
  MESSAGE("logit_loss worst relative L2: token loss (fp32) ", worst_loss, ", d_logits (bf16) ", worst_grad);
}

TEST_CASE("lm_loss refuses bad arguments") {
  alignas(256) static char fake[1024];
  const auto* b = reinterpret_cast<const bfloat16*>(fake);
  const int targets[4] = {};
  dash::cuda::Gemm gemm(0);
  cm::LmLossParams kl;
  kl.teacher_hidden = b, kl.hidden = b, kl.head = b, kl.tokens = 4, kl.d_model = 8, kl.vocab = 512;
  kl.loss_sum = reinterpret_cast<float*>(fake);
  cm::LmLossParams nll = kl;
  nll.kind = cm::LmLoss::nll, nll.teacher_hidden = nullptr, nll.targets = targets;
  const auto error = [&](const cm::LmLossParams& p, std::size_t bytes = std::size_t(1) << 30) {
    return test::error_of([&] { cm::lm_loss(gemm, p, fake, bytes, nullptr); });
  };
  SUBCASE("tokens") {
    auto p = kl;
    p.tokens = 0;
    CHECK(test::contains(error(p), "tokens = 0"));
  }
  SUBCASE("d_model") {
    auto p = kl;
    p.d_model = 0;
    CHECK(test::contains(error(p), "d_model = 0"));
  }
  SUBCASE("vocab") {
    auto p = kl;
    p.vocab = 0;
    CHECK(test::contains(error(p), "vocab = 0"));
  }
  SUBCASE("vocab too large for a cluster") {
    auto p = kl;
    p.vocab = 1 << 20;
    CHECK(test::contains(error(p), "exceeds"));
  }
  SUBCASE("hidden") {
    auto p = kl;
    p.hidden = nullptr;
    CHECK(test::contains(error(p), "hidden is null"));
  }
  SUBCASE("head") {
    auto p = kl;
    p.head = nullptr;
    CHECK(test::contains(error(p), "head is null"));
  }
  SUBCASE("kl without teacher") {
    auto p = kl;
    p.teacher_hidden = nullptr;
    CHECK(test::contains(error(p), "teacher_hidden is null"));
  }
  SUBCASE("nll with teacher") {
    auto p = nll;
    p.teacher_hidden = b;
    CHECK(test::contains(error(p), "NLL does not read it"));
  }
  SUBCASE("nll without targets") {
    auto p = nll;
    p.targets = nullptr;
    CHECK(test::contains(error(p), "targets is null"));
  }
  SUBCASE("kl with targets") {
    auto p = kl;
    p.targets = targets;
    CHECK(test::contains(error(p), "KL does not read them"));
  }
  SUBCASE("kl with an invalid-target word") {
    auto p = kl;
    p.invalid_target = reinterpret_cast<unsigned long long*>(fake);
    CHECK(test::contains(error(p), "KL reads no targets"));
  }
  SUBCASE("loss_sum") {
    auto p = kl;
    p.loss_sum = nullptr;
    CHECK(test::contains(error(p), "loss_sum is null"));
  }
  SUBCASE("gradient type") {
    auto p = kl;
    p.d_hidden_type = DType::f64;
    CHECK(test::contains(error(p), "bf16 or f32"));
  }
  SUBCASE("accumulate without a gradient") {
    auto p = kl;
    p.accumulate = true;
    CHECK(test::contains(error(p), "accumulate is set"));
  }
  SUBCASE("workspace null") {
    CHECK(test::contains(test::error_of([&] { cm::lm_loss(gemm, kl, nullptr, 1 << 20, nullptr); }),
                         "workspace is null"));
  }
  SUBCASE("workspace misaligned") {
    CHECK(test::contains(test::error_of([&] { cm::lm_loss(gemm, kl, fake + 8, 1 << 20, nullptr); }),
                         "256-byte aligned"));
  }
  SUBCASE("workspace too small") {
    CHECK(test::contains(error(kl, 4096), "one token per chunk"));
  }
  SUBCASE("negative chunk") {
    CHECK(test::contains(test::error_of([&] { (void)cm::lm_loss_workspace_bytes(gemm, kl, -1); }),
                         "chunk_tokens = -1"));
  }
}

TEST_CASE("logit_loss refuses bad arguments") {
  alignas(256) static float fake[1024];
  const int targets[4] = {};
  cm::LogitLossParams good;
  good.teacher = fake, good.student = fake, good.rows = 4, good.vocab = 10, good.ld = 12, good.token_loss = fake;
  const auto error = [&](const cm::LogitLossParams& p) {
    return test::error_of([&] { cm::logit_loss(p, nullptr); });
  };
  SUBCASE("rows") {
    auto p = good;
    p.rows = 0;
    CHECK(test::contains(error(p), "rows = 0"));
  }
  SUBCASE("vocab") {
    auto p = good;
    p.vocab = 0;
    CHECK(test::contains(error(p), "vocab = 0"));
  }
  SUBCASE("ld") {
    auto p = good;
    p.ld = 10;
    CHECK(test::contains(error(p), "ld = 10"));
  }
  SUBCASE("student") {
    auto p = good;
    p.student = nullptr;
    CHECK(test::contains(error(p), "student is null"));
  }
  SUBCASE("student alignment") {
    auto p = good;
    p.student = fake + 1;
    CHECK(test::contains(error(p), "student is not 16-byte aligned"));
  }
  SUBCASE("teacher") {
    auto p = good;
    p.teacher = nullptr;
    CHECK(test::contains(error(p), "teacher is null"));
  }
  SUBCASE("teacher alignment") {
    auto p = good;
    p.teacher = fake + 2;
    CHECK(test::contains(error(p), "teacher is not 16-byte aligned"));
  }
  SUBCASE("targets") {
    auto p = good;
    p.kind = cm::LmLoss::nll;
    CHECK(test::contains(error(p), "targets is null"));
    p.targets = targets;
    p.token_loss = nullptr;
    CHECK(test::contains(error(p), "token_loss is null"));
  }
  SUBCASE("ld_grad") {
    auto p = good;
    p.d_logits = reinterpret_cast<bfloat16*>(fake);
    p.ld_grad = 6;
    CHECK(test::contains(error(p), "ld_grad = 6"));
  }
  SUBCASE("d_logits alignment") {
    auto p = good;
    p.d_logits = reinterpret_cast<bfloat16*>(fake) + 1;
    p.ld_grad = 12;
    CHECK(test::contains(error(p), "d_logits is not 8-byte aligned"));
  }
}

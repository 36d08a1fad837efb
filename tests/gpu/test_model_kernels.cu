// The decoder's elementwise and per-row kernels against the CPU reference in float64 on the
// same bf16-rounded inputs: RMSNorm (with the fused residual add) forward and backward, RoPE in
// both conventions on q and k inside a fused QKV buffer, SwiGLU (alone and as the whole MLP with
// the GEMMs), and the embedding gather with its out-of-range report.
#include <doctest/doctest.h>

#include <array>
#include <cstdint>
#include <vector>

#include "dash/core/cuda.hpp"
#include "dash/core/dtype.hpp"
#include "dash/model/cuda/embedding.cuh"
#include "dash/model/cuda/gemm.cuh"
#include "dash/model/cuda/rms_norm.cuh"
#include "dash/model/cuda/rope.cuh"
#include "dash/model/cuda/swiglu.cuh"
#include "dash/model/rms_norm.hpp"
#include "dash/model/swiglu.hpp"
#include "dash/ops/rope.hpp"
#include "support/errors.hpp"
#include "support/gpu.hpp"
#include "support/random.hpp"

using namespace dash;
namespace cm = dash::cuda::model;
using cuda::bfloat16;

namespace {

template <class T>
double rounded_to(double v) {
  if constexpr (std::is_same_v<T, bfloat16>)
    return double(bf16(float(v)));
  else
    return double(float(v));
}

// Host values representable in T, and their device copy.
template <class T>
struct Operand {
  Tensor<double> host;
  cuda::DeviceTensor<T> device;
};

template <class T>
cuda::DeviceTensor<T> upload(const Tensor<double>& host) {
  if constexpr (std::is_same_v<T, bfloat16>) {
    return cuda::to_device_bf16<double>(host.view());
  } else {
    Tensor<float> f(host.shape());
    for (index_t i = 0; i < host.numel(); ++i) f.data()[i] = float(host.data()[i]);
    return cuda::DeviceTensor<float>::from_host(f.view());
  }
}

template <class T>
Operand<T> random_operand(Shape shape, Rng& rng, double stddev = 1.0) {
  Tensor<double> t = test::random_tensor<double>(shape, rng, stddev);
  for (double& v : t.flat()) v = rounded_to<T>(v);
  auto device = upload<T>(t);
  return {std::move(t), std::move(device)};
}

template <class T>
double tolerance() {
  return std::is_same_v<T, bfloat16> ? test::bf16_tolerance : test::fp32_tolerance;
}

template <class T>
const char* type_name() {
  return std::is_same_v<T, bfloat16> ? "bf16" : "f32";
}

constexpr index_t row_counts[] = {1, 7, 130};
constexpr int widths[] = {8, 64, 576, 13};

template <class Residual>
void check_rms_norm_forward(Rng& rng, double& worst_y, double& worst_sum) {
  for (index_t rows : row_counts)
    for (int d : widths)
      for (bool fused_add : {false, true}) {
        const double eps = 1e-5;
        auto x = random_operand<Residual>(Shape{rows, d}, rng, 2.0);
        auto g = random_operand<bfloat16>(Shape{d}, rng, 0.3);
        for (double& v : g.host.flat()) v = rounded_to<bfloat16>(1.0 + v);
        g.device = upload<bfloat16>(g.host);
        auto add = random_operand<bfloat16>(Shape{rows, d}, rng);
        Tensor<double> normed_input = clone(x.host.view());
        if (fused_add)
          for (index_t i = 0; i < normed_input.numel(); ++i)
            normed_input.data()[i] = rounded_to<Residual>(x.host.data()[i] + add.host.data()[i]);
        Tensor<double> want(Shape{rows, d});
        dash::model::rms_norm_forward<double>(normed_input.view(), g.host.view(), eps, want.view());

        cuda::DeviceTensor<bfloat16> y(Shape{rows, d});
        cuda::DeviceTensor<Residual> sum(Shape{rows, d});
        test::poison(y), test::poison(sum);
        cm::RmsNormForwardParams<Residual> p;
        p.x = x.device.data(), p.weight = g.device.data(), p.y = y.data();
        p.rows = rows, p.d = d, p.eps = float(eps);
        if (fused_add) p.add = add.device.data(), p.sum = sum.data();
        cm::rms_norm_forward(p, nullptr);
        const double error = test::relative_l2(cuda::to_host_double(y), want);
        INFO("rms_norm_forward ", type_name<Residual>(), " rows ", rows, " d ", d, " add ", fused_add);
        CHECK(error <= test::bf16_tolerance);
        worst_y = std::max(worst_y, error);
        if (fused_add) {
          const double sum_error = test::relative_l2(cuda::to_host_double(sum), normed_input);
          CHECK(sum_error <= tolerance<Residual>());
          worst_sum = std::max(worst_sum, sum_error);
        }
      }
}

// With `rounded`, the launch also writes bf16(dx), which must equal dx as stored, rounded.
template <class Residual, class Grad, class Upstream = bfloat16>
void check_rms_norm_backward(Rng& rng, double& worst, bool rounded = false) {
  for (index_t rows : row_counts)
    for (int d : widths)
      for (bool accumulate : {false, true}) {
        const double eps = 1e-5;
        const auto x = random_operand<Residual>(Shape{rows, d}, rng, 2.0);
        auto g = random_operand<bfloat16>(Shape{d}, rng, 0.3);
        for (double& v : g.host.flat()) v = rounded_to<bfloat16>(1.0 + v);
        g.device = upload<bfloat16>(g.host);
        const auto dy = random_operand<Upstream>(Shape{rows, d}, rng);
        auto dx = random_operand<Grad>(Shape{rows, d}, rng);
        Tensor<double> want = accumulate ? clone(dx.host.view()) : Tensor<double>(Shape{rows, d}, 0.0);
        dash::model::rms_norm_backward<double>(x.host.view(), g.host.view(), eps, dy.host.view(), want.view(), {});
        if (!accumulate) test::poison(dx.device);
        cuda::DeviceTensor<bfloat16> dx_rounded(Shape{rows, d});
        test::poison(dx_rounded);
        cm::RmsNormBackwardParams<Residual, Grad, Upstream> p;
        p.x = x.device.data(), p.weight = g.device.data(), p.dy = dy.device.data(), p.dx = dx.device.data();
        p.rows = rows, p.d = d, p.eps = float(eps), p.accumulate = accumulate;
        if (rounded) p.dx_rounded = dx_rounded.data();
        cm::rms_norm_backward(p, nullptr);
        const Tensor<double> got = cuda::to_host_double(dx.device);
        const double error = test::relative_l2(got, want);
        INFO("rms_norm_backward x ", type_name<Residual>(), " dx ", type_name<Grad>(), " dy ", type_name<Upstream>(),
             " rows ", rows, " d ", d, " accumulate ", accumulate, " rounded ", rounded);
        CHECK(error <= tolerance<Grad>());
        worst = std::max(worst, error);
        if (rounded) {
          const Tensor<double> copy = cuda::to_host_double(dx_rounded);
          bool equal = true;
          for (index_t i = 0; i < got.numel(); ++i) equal &= copy.data()[i] == rounded_to<bfloat16>(got.data()[i]);
          CHECK(equal);
        }
      }
}

}  // namespace

TEST_CASE("rms_norm forward, with and without the fused residual add, matches the reference") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("rms_norm forward");
  double worst_y = 0, worst_sum_bf16 = 0, worst_sum_f32 = 0;
  check_rms_norm_forward<bfloat16>(rng, worst_y, worst_sum_bf16);
  check_rms_norm_forward<float>(rng, worst_y, worst_sum_f32);
  MESSAGE("rms_norm forward worst relative L2: y ", worst_y, ", x+add bf16 ", worst_sum_bf16, ", x+add f32 ",
          worst_sum_f32);
}

TEST_CASE("rms_norm backward matches the reference for bf16 and fp32 streams and gradients") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("rms_norm backward");
  double bf16_grad = 0, f32_grad = 0;
  check_rms_norm_backward<bfloat16, bfloat16>(rng, bf16_grad);
  check_rms_norm_backward<float, bfloat16>(rng, bf16_grad);
  check_rms_norm_backward<bfloat16, float>(rng, f32_grad);
  check_rms_norm_backward<float, float>(rng, f32_grad);
  check_rms_norm_backward<float, float, float>(rng, f32_grad, /*rounded=*/true);  // the search model's use
  MESSAGE("rms_norm backward worst relative L2: bf16 dx ", bf16_grad, ", fp32 dx ", f32_grad);
}

TEST_CASE("rope on q and k of a fused QKV buffer matches RopeTable; backward undoes forward") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("rope");
  double worst_forward = 0, worst_identity = 0;
  for (auto style : {RopeConfig::Style::interleaved, RopeConfig::Style::half})
    for (int d_head : {2, 8, 40, 64, 128})
      for (index_t length : {index_t(1), index_t(7), index_t(130)})
        for (index_t offset : {index_t(0), index_t(5)})
          for (int pad : {0, 1}) {  // a padded token row leaves the 16-byte vectors for scalar moves
            const int batch = 2, n_q = 4, n_kv = 2, width = (n_q + 2 * n_kv) * d_head + pad;
            const RopeConfig rope{style, 10000.0};
            auto qkv = random_operand<bfloat16>(Shape{batch, length, width}, rng);
            // Reference: q and k as [B, T, H, D] copies, rotated by the CPU table.
            Tensor<double> q(Shape{batch, length, n_q, d_head}), k(Shape{batch, length, n_kv, d_head});
            for (index_t b = 0; b < batch; ++b)
              for (index_t t = 0; t < length; ++t)
                for (int c = 0; c < width; ++c) {
                  const double v = qkv.host(b, t, c);
                  if (c < n_q * d_head)
                    q(b, t, c / d_head, c % d_head) = v;
                  else if (c < (n_q + n_kv) * d_head)
                    k(b, t, (c - n_q * d_head) / d_head, c % d_head) = v;
                }
            const dash::RopeTable reference(rope, d_head, offset, length);
            reference.apply<double>(q.view());
            reference.apply<double>(k.view());
            Tensor<double> want = clone(qkv.host.view());
            for (index_t b = 0; b < batch; ++b)
              for (index_t t = 0; t < length; ++t)
                for (int c = 0; c < (n_q + n_kv) * d_head; ++c)
                  want(b, t, c) = c < n_q * d_head ? q(b, t, c / d_head, c % d_head)
                                                   : k(b, t, (c - n_q * d_head) / d_head, c % d_head);

            const cm::RopeTable table(rope, d_head, offset + length + 3);
            cm::RopeParams p;
            p.q = qkv.device.data(), p.n_q_heads = n_q;
            p.k = qkv.device.data() + n_q * d_head, p.n_k_heads = n_kv;
            p.batch = batch, p.length = length;
            p.batch_stride = length * width, p.token_stride = width;
            p.position_offset = offset;
            p.table = table.view();
            cm::rope(p, nullptr);
            const Tensor<double> got = cuda::to_host_double(qkv.device);
            const double error = test::relative_l2(got, want);
            INFO("rope ", style == RopeConfig::Style::half ? "half" : "interleaved", " d_head ", d_head, " T ", length,
                 " offset ", offset, " pad ", pad);
            CHECK(error <= test::bf16_tolerance);
            bool v_untouched = true;
            for (index_t b = 0; b < batch; ++b)
              for (index_t t = 0; t < length; ++t)
                for (int c = (n_q + n_kv) * d_head; c < width; ++c) v_untouched &= got(b, t, c) == qkv.host(b, t, c);
            CHECK(v_untouched);
            p.inverse = true;
            cm::rope(p, nullptr);
            const double identity = test::relative_l2(cuda::to_host_double(qkv.device), qkv.host);
            CHECK(identity <= test::bf16_tolerance);
            worst_forward = std::max(worst_forward, error);
            worst_identity = std::max(worst_identity, identity);
          }
  MESSAGE("rope worst relative L2: forward ", worst_forward, ", backward∘forward vs identity ", worst_identity);
}

TEST_CASE("swiglu elementwise forward and backward match the formula in float64") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("swiglu elementwise");
  double worst = 0;
  for (index_t rows : row_counts)
    for (int d_ff : {8, 40, 1536, 13}) {
      auto gu = random_operand<bfloat16>(Shape{rows, 2 * d_ff}, rng, 2.0);
      const auto dm = random_operand<bfloat16>(Shape{rows, d_ff}, rng);
      Tensor<double> m(Shape{rows, d_ff}), dgu(Shape{rows, 2 * d_ff});
      for (index_t r = 0; r < rows; ++r)
        for (int j = 0; j < d_ff; ++j) {
          const double a = gu.host(r, j), b = gu.host(r, d_ff + j), s = 1 / (1 + std::exp(-a));
          m(r, j) = a * s * b;
          dgu(r, j) = dm.host(r, j) * b * s * (1 + a * (1 - s));
          dgu(r, d_ff + j) = dm.host(r, j) * a * s;
        }
      cuda::DeviceTensor<bfloat16> out(Shape{rows, d_ff});
      test::poison(out);
      cm::swiglu_forward({.gate = gu.device.data(), .up = gu.device.data() + d_ff, .gate_up_stride = 2 * d_ff,
                          .out = out.data(), .out_stride = d_ff, .rows = rows, .d_ff = d_ff},
                         nullptr);
      const double forward = test::relative_l2(cuda::to_host_double(out), m);
      // Backward in place over the gate|up buffer.
      cm::swiglu_backward({.gate = gu.device.data(), .up = gu.device.data() + d_ff, .gate_up_stride = 2 * d_ff,
                           .d_out = dm.device.data(), .d_out_stride = d_ff, .d_gate = gu.device.data(),
                           .d_up = gu.device.data() + d_ff, .d_gate_up_stride = 2 * d_ff, .rows = rows, .d_ff = d_ff},
                          nullptr);
      const double backward = test::relative_l2(cuda::to_host_double(gu.device), dgu);
      INFO("swiglu rows ", rows, " d_ff ", d_ff);
      CHECK(forward <= test::bf16_tolerance);
      CHECK(backward <= test::bf16_tolerance);
      worst = std::max({worst, forward, backward});
    }
  MESSAGE("swiglu elementwise worst relative L2 ", worst);
}

TEST_CASE("the MLP as GEMM + swiglu + GEMM matches swiglu_forward and swiglu_backward") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("swiglu mlp");
  cuda::Gemm gemm;
  cuda::DeviceTensor<std::uint8_t> workspace(Shape{index_t(gemm.workspace_bytes())});
  double worst_forward = 0, worst_backward = 0;
  for (const auto& [rows, d, d_ff] : {std::array<int, 3>{1, 8, 24}, {7, 64, 160}, {130, 576, 1536}}) {
    const auto x = random_operand<bfloat16>(Shape{rows, d}, rng);
    const double in = 1 / std::sqrt(double(d)), ff = 1 / std::sqrt(double(d_ff));
    const auto w_gu = random_operand<bfloat16>(Shape{2 * d_ff, d}, rng, in);  // [W_gate; W_up]
    const auto w_down = random_operand<bfloat16>(Shape{d, d_ff}, rng, ff);
    const auto dout = random_operand<bfloat16>(Shape{rows, d}, rng);
    Tensor<double> w_gate(Shape{d_ff, d}), w_up(Shape{d_ff, d});
    std::copy_n(w_gu.host.data(), d_ff * d, w_gate.data());
    std::copy_n(w_gu.host.data() + d_ff * d, d_ff * d, w_up.data());
    const dash::model::SwigluWeights<double> w{w_gate.view(), w_up.view(), w_down.host.view()};
    Tensor<double> want_out(Shape{rows, d}), want_dx(Shape{rows, d}, 0.0);
    dash::model::swiglu_forward<double>(w, x.host.view(), want_out.view());
    dash::model::swiglu_backward<double>(w, x.host.view(), dout.host.view(), want_dx.view());

    cuda::DeviceTensor<bfloat16> gu(Shape{rows, 2 * d_ff}), m(Shape{rows, d_ff}), dm(Shape{rows, d_ff});
    cuda::DeviceTensor<float> out(Shape{rows, d}), dx(Shape{rows, d});
    test::poison(gu), test::poison(m), test::poison(dm), test::poison(out), test::poison(dx);
    const auto product = [&](cuda::GemmShape s, const bfloat16* a, const bfloat16* b, void* c) {
      cuda::GemmOperands o;
      o.a = a, o.b = b, o.c = c, o.workspace = workspace.data(), o.workspace_bytes = gemm.workspace_bytes();
      gemm(s, o, nullptr);
    };
    product({.m = rows, .n = 2 * d_ff, .k = d, .transpose_b = true}, x.device.data(), w_gu.device.data(), gu.data());
    cm::swiglu_forward({.gate = gu.data(), .up = gu.data() + d_ff, .gate_up_stride = 2 * d_ff, .out = m.data(),
                        .out_stride = d_ff, .rows = rows, .d_ff = d_ff},
                       nullptr);
    product({.m = rows, .n = d, .k = d_ff, .transpose_b = true, .c_type = DType::f32}, m.data(), w_down.device.data(),
            out.data());
    product({.m = rows, .n = d_ff, .k = d}, dout.device.data(), w_down.device.data(), dm.data());
    cm::swiglu_backward({.gate = gu.data(), .up = gu.data() + d_ff, .gate_up_stride = 2 * d_ff, .d_out = dm.data(),
                         .d_out_stride = d_ff, .d_gate = gu.data(), .d_up = gu.data() + d_ff,
                         .d_gate_up_stride = 2 * d_ff, .rows = rows, .d_ff = d_ff},
                        nullptr);
    product({.m = rows, .n = d, .k = 2 * d_ff, .c_type = DType::f32}, gu.data(), w_gu.device.data(), dx.data());
    const double forward = test::relative_l2(cuda::to_host_double(out), want_out);
    const double backward = test::relative_l2(cuda::to_host_double(dx), want_dx);
    INFO("mlp rows ", rows, " d ", d, " d_ff ", d_ff);
    CHECK(forward <= test::bf16_tolerance);
    CHECK(backward <= test::bf16_tolerance);
    worst_forward = std::max(worst_forward, forward);
    worst_backward = std::max(worst_backward, backward);
  }
  MESSAGE("MLP worst relative L2 (bf16 intermediates): forward ", worst_forward, ", backward ", worst_backward);
}

TEST_CASE("embedding gathers rows exactly and reports the first out-of-range id") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("embedding");
  cuda::DeviceTensor<unsigned long long> invalid(Shape{1});
  for (index_t tokens : row_counts)
    for (int d : widths)
      for (bool f32 : {false, true}) {
        const int vocab = 1000;
        const auto table = random_operand<bfloat16>(Shape{vocab, d}, rng);
        std::vector<int> ids(static_cast<std::size_t>(tokens));
        for (int& id : ids) id = int(rng.below(vocab));
        if (tokens > 5) ids[5] = -1, ids[2] = vocab + 3;
        const Tensor<int> ids_host = [&] {
          Tensor<int> t(Shape{tokens});
          std::copy(ids.begin(), ids.end(), t.data());
          return t;
        }();
        const auto ids_device = cuda::DeviceTensor<int>::from_host(ids_host.view());
        Tensor<double> want(Shape{tokens, d}, 0.0);
        for (index_t t = 0; t < tokens; ++t)
          if (ids[std::size_t(t)] >= 0 && ids[std::size_t(t)] < vocab)
            for (int c = 0; c < d; ++c) want(t, c) = table.host(ids[std::size_t(t)], c);
        Tensor<double> got;
        if (f32) {
          cuda::DeviceTensor<float> out(Shape{tokens, d});
          test::poison(out);
          cm::embedding<float>({ids_device.data(), table.device.data(), out.data(), tokens, vocab, d, invalid.data()},
                               nullptr);
          got = cuda::to_host_double(out);
        } else {
          cuda::DeviceTensor<bfloat16> out(Shape{tokens, d});
          test::poison(out);
          cm::embedding<bfloat16>(
              {ids_device.data(), table.device.data(), out.data(), tokens, vocab, d, invalid.data()}, nullptr);
          got = cuda::to_host_double(out);
        }
        INFO("embedding tokens ", tokens, " d ", d, " f32 ", f32);
        CHECK(test::relative_l2(got, want) == 0.0);
        const auto report = cm::invalid_token(invalid.to_host().data()[0]);
        if (tokens > 5) {
          REQUIRE(report.has_value());
          CHECK(report->position == 2);
          CHECK(report->id == vocab + 3);
        } else {
          CHECK(!report.has_value());
        }
      }
}

TEST_CASE("rms_norm launchers refuse bad arguments") {
  alignas(16) static float fake[64];
  const auto* b = reinterpret_cast<bfloat16*>(fake);
  cm::RmsNormForwardParams<float> f{.x = fake, .weight = b, .y = const_cast<bfloat16*>(b), .rows = 4, .d = 8};
  cm::RmsNormBackwardParams<float, float> g{.x = fake, .weight = b, .dy = b, .dx = fake, .rows = 4, .d = 8};
  const auto forward = [&](auto p) { return test::error_of([&] { cm::rms_norm_forward(p, nullptr); }); };
  const auto backward = [&](auto p) { return test::error_of([&] { cm::rms_norm_backward(p, nullptr); }); };
  SUBCASE("rows") {
    auto p = f;
    p.rows = 0;
    CHECK(test::contains(forward(p), "rows = 0"));
  }
  SUBCASE("d") {
    auto p = g;
    p.d = 0;
    CHECK(test::contains(backward(p), "d = 0"));
  }
  SUBCASE("eps") {
    auto p = f;
    p.eps = 0;
    CHECK(test::contains(forward(p), "eps = 0"));
  }
  SUBCASE("x") {
    auto p = f;
    p.x = nullptr;
    CHECK(test::contains(forward(p), "x is null"));
  }
  SUBCASE("weight") {
    auto p = g;
    p.weight = nullptr;
    CHECK(test::contains(backward(p), "weight is null"));
  }
  SUBCASE("y") {
    auto p = f;
    p.y = nullptr;
    CHECK(test::contains(forward(p), "y is null"));
  }
  SUBCASE("add without sum") {
    auto p = f;
    p.add = b;
    CHECK(test::contains(forward(p), "sum (where x + add goes) is null"));
  }
  SUBCASE("sum without add") {
    auto p = f;
    p.sum = fake;
    CHECK(test::contains(forward(p), "sum is given without add"));
  }
  SUBCASE("dy") {
    auto p = g;
    p.dy = nullptr;
    CHECK(test::contains(backward(p), "dy is null"));
  }
  SUBCASE("dx") {
    auto p = g;
    p.dx = nullptr;
    CHECK(test::contains(backward(p), "dx is null"));
  }
}

TEST_CASE("rope launcher and table refuse bad arguments") {
  alignas(16) static float fake[64];
  auto* b = reinterpret_cast<bfloat16*>(fake);
  const cm::RopeTableView table{fake, fake, 16, 8, RopeConfig::Style::half};
  const cm::RopeParams good{.q = b, .k = b, .n_q_heads = 2, .n_k_heads = 1, .batch = 1, .length = 4,
                            .batch_stride = 64, .token_stride = 16, .table = table};
  const auto error = [&](cm::RopeParams p) { return test::error_of([&] { cm::rope(p, nullptr); }); };
  SUBCASE("no heads") {
    auto p = good;
    p.n_q_heads = p.n_k_heads = 0;
    CHECK(test::contains(error(p), "not both 0"));
  }
  SUBCASE("null q") {
    auto p = good;
    p.q = nullptr;
    CHECK(test::contains(error(p), "q is null"));
  }
  SUBCASE("null k") {
    auto p = good;
    p.k = nullptr;
    CHECK(test::contains(error(p), "k is null"));
  }
  SUBCASE("length") {
    auto p = good;
    p.length = 0;
    CHECK(test::contains(error(p), "length = 0"));
  }
  SUBCASE("odd head") {
    auto p = good;
    p.table.d_head = 7;
    CHECK(test::contains(error(p), "d_head = 7"));
  }
  SUBCASE("token stride") {
    auto p = good;
    p.token_stride = 8;
    CHECK(test::contains(error(p), "token_stride = 8"));
  }
  SUBCASE("batch stride") {
    auto p = good;
    p.batch = 2, p.batch_stride = 32;
    CHECK(test::contains(error(p), "batch_stride = 32"));
  }
  SUBCASE("negative offset") {
    auto p = good;
    p.position_offset = -1;
    CHECK(test::contains(error(p), "position_offset = -1"));
  }
  SUBCASE("positions beyond the table") {
    auto p = good;
    p.position_offset = 13;
    CHECK(test::contains(error(p), "exceed the table's 16"));
  }
  SUBCASE("table without data") {
    auto p = good;
    p.table.cos = nullptr;
    CHECK(test::contains(error(p), "no device data"));
  }
  SUBCASE("table: odd d_head") {
    CHECK(test::contains(test::error_of([] { cm::RopeTable({}, 9, 4); }), "d_head = 9"));
  }
  SUBCASE("table: no positions") {
    CHECK(test::contains(test::error_of([] { cm::RopeTable({}, 8, 0); }), "positions = 0"));
  }
}

TEST_CASE("swiglu launchers refuse bad arguments") {
  alignas(16) static float fake[64];
  auto* b = reinterpret_cast<bfloat16*>(fake);
  const cm::SwigluForwardParams f{.gate = b, .up = b, .gate_up_stride = 16, .out = b, .out_stride = 8, .rows = 2,
                                  .d_ff = 8};
  const cm::SwigluBackwardParams g{.gate = b, .up = b, .gate_up_stride = 16, .d_out = b, .d_out_stride = 8,
                                   .d_gate = b, .d_up = b, .d_gate_up_stride = 16, .rows = 2, .d_ff = 8};
  const auto forward = [&](cm::SwigluForwardParams p) {
    return test::error_of([&] { cm::swiglu_forward(p, nullptr); });
  };
  const auto backward = [&](cm::SwigluBackwardParams p) {
    return test::error_of([&] { cm::swiglu_backward(p, nullptr); });
  };
  SUBCASE("rows") {
    auto p = f;
    p.rows = 0;
    CHECK(test::contains(forward(p), "rows = 0"));
  }
  SUBCASE("d_ff") {
    auto p = g;
    p.d_ff = 0;
    CHECK(test::contains(backward(p), "d_ff = 0"));
  }
  SUBCASE("gate_up_stride") {
    auto p = f;
    p.gate_up_stride = 4;
    CHECK(test::contains(forward(p), "gate_up_stride = 4"));
  }
  SUBCASE("gate") {
    auto p = f;
    p.gate = nullptr;
    CHECK(test::contains(forward(p), "gate or up is null"));
  }
  SUBCASE("out") {
    auto p = f;
    p.out = nullptr;
    CHECK(test::contains(forward(p), "out is null"));
  }
  SUBCASE("out_stride") {
    auto p = f;
    p.out_stride = 4;
    CHECK(test::contains(forward(p), "out_stride = 4"));
  }
  SUBCASE("d_out") {
    auto p = g;
    p.d_out = nullptr;
    CHECK(test::contains(backward(p), "d_out is null"));
  }
  SUBCASE("d_gate") {
    auto p = g;
    p.d_up = nullptr;
    CHECK(test::contains(backward(p), "d_gate or d_up is null"));
  }
  SUBCASE("d_out_stride") {
    auto p = g;
    p.d_out_stride = 2;
    CHECK(test::contains(backward(p), "d_out_stride = 2"));
  }
  SUBCASE("d_gate_up_stride") {
    auto p = g;
    p.d_gate_up_stride = 2;
    CHECK(test::contains(backward(p), "d_gate_up_stride = 2"));
  }
}

TEST_CASE("embedding launcher refuses bad arguments") {
  alignas(16) static float fake[64];
  auto* b = reinterpret_cast<bfloat16*>(fake);
  const int ids[4] = {};
  const cm::EmbeddingParams<bfloat16> good{ids, b, b, 4, 16, 8, nullptr};
  const auto error = [&](cm::EmbeddingParams<bfloat16> p) {
    return test::error_of([&] { cm::embedding(p, nullptr); });
  };
  SUBCASE("tokens") {
    auto p = good;
    p.tokens = 0;
    CHECK(test::contains(error(p), "tokens = 0"));
  }
  SUBCASE("vocab") {
    auto p = good;
    p.vocab = 0;
    CHECK(test::contains(error(p), "vocab = 0"));
  }
  SUBCASE("d_model") {
    auto p = good;
    p.d_model = 0;
    CHECK(test::contains(error(p), "d_model = 0"));
  }
  SUBCASE("ids") {
    auto p = good;
    p.ids = nullptr;
    CHECK(test::contains(error(p), "ids is null"));
  }
  SUBCASE("table") {
    auto p = good;
    p.table = nullptr;
    CHECK(test::contains(error(p), "table is null"));
  }
  SUBCASE("out") {
    auto p = good;
    p.out = nullptr;
    CHECK(test::contains(error(p), "out is null"));
  }
}

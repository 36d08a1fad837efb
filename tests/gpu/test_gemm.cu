// cuda::Gemm against a float64 product of the same bf16-rounded operands, in every transpose
// mode, with and without bias and accumulation, bf16 and fp32 outputs, packed and strided rows.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "dash/core/cuda.hpp"
#include "dash/core/dtype.hpp"
#include "dash/model/cuda/gemm.cuh"
#include "dash/ops/detail/linear.hpp"
#include "support/errors.hpp"
#include "support/gpu.hpp"
#include "support/random.hpp"

using namespace dash;

namespace {

// A host matrix of bf16-representable values (what to_device_bf16 stores) and its device copy.
struct Bf16Matrix {
  Tensor<double> host;
  cuda::DeviceTensor<cuda::bfloat16> device;
};

Tensor<double> rounded(Tensor<double> t, DType type) {
  for (double& v : t.flat()) v = type == DType::bf16 ? double(bf16(float(v))) : double(float(v));
  return t;
}

Bf16Matrix random_bf16(index_t rows, index_t cols, Rng& rng) {
  Tensor<double> t = rounded(test::random_tensor<double>(Shape{rows, cols}, rng), DType::bf16);
  auto device = cuda::to_device_bf16<double>(t.view());
  return {std::move(t), std::move(device)};
}

// Device buffer of `type` holding `host` (already representable in it), as raw bytes.
cuda::DeviceTensor<std::uint8_t> to_device(const Tensor<double>& host, DType type) {
  cuda::DeviceTensor<std::uint8_t> d(Shape{host.numel() * index_t(size_of(type))});
  if (type == DType::bf16) {
    std::vector<bf16> v;
    for (double x : host.flat()) v.push_back(bf16(float(x)));
    cuda::check(cudaMemcpy(d.data(), v.data(), v.size() * sizeof(bf16), cudaMemcpyHostToDevice), "upload");
  } else {
    std::vector<float> v;
    for (double x : host.flat()) v.push_back(float(x));
    cuda::check(cudaMemcpy(d.data(), v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice), "upload");
  }
  return d;
}

Tensor<double> to_host(const cuda::DeviceTensor<std::uint8_t>& d, DType type, Shape shape) {
  Tensor<double> out(shape);
  if (type == DType::bf16) {
    std::vector<bf16> v(std::size_t(shape.numel()));
    cuda::check(cudaMemcpy(v.data(), d.data(), v.size() * sizeof(bf16), cudaMemcpyDeviceToHost), "download");
    for (std::size_t i = 0; i < v.size(); ++i) out.data()[i] = double(v[i]);
  } else {
    std::vector<float> v(std::size_t(shape.numel()));
    cuda::check(cudaMemcpy(v.data(), d.data(), v.size() * sizeof(float), cudaMemcpyDeviceToHost), "download");
    for (std::size_t i = 0; i < v.size(); ++i) out.data()[i] = double(v[i]);
  }
  return out;
}

double tolerance(DType type) { return type == DType::bf16 ? test::bf16_tolerance : test::fp32_tolerance; }

struct Workspace {
  cuda::DeviceTensor<std::uint8_t> bytes;
  explicit Workspace(std::size_t n) : bytes(Shape{index_t(n)}) {}
  void* data() { return bytes.data(); }
  std::size_t size() const { return std::size_t(bytes.numel()); }
};

}  // namespace

TEST_CASE("gemm: every transpose mode, bias and accumulation match a float64 product, with either algorithm choice") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("gemm modes");
  double worst[2] = {0, 0};
  // fastest times its candidates on the first call's operands: C must still be written once.
  for (const cuda::GemmChoice choice : {cuda::GemmChoice::heuristic, cuda::GemmChoice::fastest}) {
    cuda::Gemm gemm(cuda::Gemm::default_workspace_bytes, choice);
    Workspace workspace(gemm.workspace_bytes());
    const index_t shapes[][3] = {{1, 1, 1}, {7, 130, 64}, {130, 7, 576}, {64, 576, 8}, {33, 49, 17}};
    for (const auto& mnk : shapes)
      for (int mode = 0; mode < 4; ++mode)
        for (DType c_type : {DType::bf16, DType::f32})
          for (int extras = 0; extras < 4; ++extras) {
            cuda::GemmShape s;
            s.m = mnk[0], s.n = mnk[1], s.k = mnk[2];
            s.transpose_a = mode & 1, s.transpose_b = mode & 2;
            s.c_type = c_type;
            s.bias = extras & 1, s.accumulate = extras & 2;
            const Bf16Matrix a = s.transpose_a ? random_bf16(s.k, s.m, rng) : random_bf16(s.m, s.k, rng);
            const Bf16Matrix b = s.transpose_b ? random_bf16(s.n, s.k, rng) : random_bf16(s.k, s.n, rng);
            const Tensor<double> c0 = rounded(test::random_tensor<double>(Shape{s.m, s.n}, rng), c_type);
            const Tensor<double> bias = rounded(test::random_tensor<double>(Shape{s.n}, rng), c_type);
            const float alpha = 0.75f;
            Tensor<double> want(Shape{s.m, s.n});
            for (index_t i = 0; i < s.m; ++i)
              for (index_t j = 0; j < s.n; ++j) {
                double acc = 0;
                for (index_t l = 0; l < s.k; ++l)
                  acc += (s.transpose_a ? a.host(l, i) : a.host(i, l)) * (s.transpose_b ? b.host(j, l) : b.host(l, j));
                want(i, j) = alpha * acc + (s.bias ? bias(j) : 0.0) + (s.accumulate ? c0(i, j) : 0.0);
              }
            const auto bias_device = to_device(bias, c_type);
            // Accumulation in place (c holds c0), and into another buffer (c = addend + …, c poisoned).
            for (const bool apart : {false, true}) {
              if (apart && !s.accumulate) continue;
              auto c = to_device(c0, c_type);
              const auto addend = to_device(c0, c_type);
              if (!s.accumulate || apart) c.fill_bytes(0xFF);
              cuda::GemmOperands o;
              o.a = a.device.data(), o.b = b.device.data(), o.c = c.data();
              o.addend = apart ? addend.data() : nullptr;
              o.bias = s.bias ? bias_device.data() : nullptr;
              o.alpha = alpha;
              o.workspace = workspace.data(), o.workspace_bytes = workspace.size();
              gemm(s, o, nullptr);
              const double error = test::relative_l2(to_host(c, c_type, want.shape()), want);
              INFO(cuda::detail::describe(s), choice == cuda::GemmChoice::fastest ? " (fastest)" : " (heuristic)",
                   apart ? " addend apart" : "", " relative error ", error);
              CHECK(error <= tolerance(c_type));
              CHECK(test::relative_l2(to_host(addend, c_type, c0.shape()), c0) == 0);
              worst[c_type == DType::f32] = std::max(worst[c_type == DType::f32], error);
            }
          }
  }
  MESSAGE("gemm worst relative L2 (both choices): bf16 C ", worst[0], ", fp32 C ", worst[1]);
}

TEST_CASE("gemm: the decoder's products equal linear_forward and linear_backward") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("gemm decoder products");
  cuda::Gemm gemm;
  Workspace workspace(gemm.workspace_bytes());
  for (const auto& [rows, in, out] : {std::array<index_t, 3>{7, 64, 192}, {130, 576, 1536}, {1, 8, 24}}) {
    const Bf16Matrix x = random_bf16(rows, in, rng), w = random_bf16(out, in, rng), dy = random_bf16(rows, out, rng);
    Tensor<double> y(Shape{rows, out}), dx(Shape{rows, in}, 0.0), dw(Shape{out, in}, 0.0);
    dash::detail::linear_forward<double>(x.host.view(), w.host.view(), {}, y.view());
    dash::detail::linear_backward<double>(x.host.view(), w.host.view(), dy.host.view(), dx.view(), dw.view(), {});

    cuda::DeviceTensor<float> y_d(Shape{rows, out}), dx_d(Shape{rows, in}), dw_d(Shape{out, in});
    const auto run = [&](cuda::GemmShape s, const cuda::bfloat16* a, const cuda::bfloat16* b, float* c) {
      s.c_type = DType::f32;
      cuda::GemmOperands o;
      o.a = a, o.b = b, o.c = c, o.workspace = workspace.data(), o.workspace_bytes = workspace.size();
      gemm(s, o, nullptr);
    };
    test::poison(y_d), test::poison(dx_d), test::poison(dw_d);
    run({.m = rows, .n = out, .k = in, .transpose_b = true}, x.device.data(), w.device.data(), y_d.data());
    run({.m = rows, .n = in, .k = out}, dy.device.data(), w.device.data(), dx_d.data());
    run({.m = out, .n = in, .k = rows, .transpose_a = true}, dy.device.data(), x.device.data(), dw_d.data());
    CHECK(test::relative_l2(cuda::to_host_double(y_d), y) <= test::fp32_tolerance);
    CHECK(test::relative_l2(cuda::to_host_double(dx_d), dx) <= test::fp32_tolerance);
    CHECK(test::relative_l2(cuda::to_host_double(dw_d), dw) <= test::fp32_tolerance);
  }
}

TEST_CASE("gemm: strided operands read and write only their rows; plans are built once") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("gemm strides");
  cuda::Gemm gemm;
  Workspace workspace(gemm.workspace_bytes());
  const index_t m = 65, n = 40, k = 24, lda = 40, ldb = 32, ldc = 56;
  // A [m, k] inside rows of lda; B stored [n, k] inside rows of ldb; C [m, n] inside rows of ldc.
  const Bf16Matrix a = random_bf16(m, lda, rng), b = random_bf16(n, ldb, rng);
  Tensor<double> want(Shape{m, ldc});
  for (index_t i = 0; i < m; ++i)
    for (index_t j = 0; j < ldc; ++j) {
      double acc = 0;
      if (j < n)
        for (index_t l = 0; l < k; ++l) acc += a.host(i, l) * b.host(j, l);
      want(i, j) = acc;
    }
  cuda::DeviceTensor<float> c(Shape{m, ldc});
  c.fill_bytes(0);  // the padding must stay 0
  const cuda::GemmShape s{.m = m, .n = n, .k = k, .transpose_b = true, .lda = lda, .ldb = ldb, .ldc = ldc,
                          .c_type = DType::f32};
  cuda::GemmOperands o;
  o.a = a.device.data(), o.b = b.device.data(), o.c = c.data();
  o.workspace = workspace.data(), o.workspace_bytes = workspace.size();
  gemm(s, o, nullptr);
  gemm(s, o, nullptr);
  CHECK(gemm.plan_count() == 1);
  CHECK(test::relative_l2(cuda::to_host_double(c), want) <= test::fp32_tolerance);
  const cuda::GemmPlan& plan = gemm.plan(s, o);
  CHECK(plan.workspace_bytes() <= gemm.workspace_bytes());
  plan.run(o, nullptr);
  CHECK(test::relative_l2(cuda::to_host_double(c), want) <= test::fp32_tolerance);
  // A 2-byte-aligned A (one element in) needs its own plan.
  o.a = a.device.data() + 1;
  (void)gemm.plan(s, o);
  CHECK(gemm.plan_count() == 2);
  CHECK(test::contains(test::error_of([&] { plan.run(o, nullptr); }), "less aligned"));
}

TEST_CASE("gemm: bad shapes and operands are refused with the shape named") {
  cuda::Gemm gemm(1 << 20);
  alignas(256) static char fake[512];
  const auto* a = reinterpret_cast<const cuda::bfloat16*>(fake);
  cuda::GemmShape good{.m = 4, .n = 8, .k = 16, .transpose_b = true};
  cuda::GemmOperands ok{.a = a, .b = a, .c = fake, .workspace = fake, .workspace_bytes = 1 << 20};
  const auto error = [&](cuda::GemmShape s, cuda::GemmOperands o) {
    return test::error_of([&] { gemm(s, o, nullptr); });
  };
  SUBCASE("empty extent") {
    auto s = good;
    s.k = 0;
    const std::string e = error(s, ok);
    CHECK(test::contains(e, "gemm C[4×8]"));
    CHECK(test::contains(e, "at least 1"));
  }
  SUBCASE("output type") {
    auto s = good;
    s.c_type = DType::f64;
    CHECK(test::contains(error(s, ok), "bf16 or f32"));
  }
  SUBCASE("negative stride") {
    auto s = good;
    s.ldc = -1;
    CHECK(test::contains(error(s, ok), "must not be negative"));
  }
  SUBCASE("lda below the row") {
    auto s = good;
    s.lda = 15;
    CHECK(test::contains(error(s, ok), "lda = 15"));
  }
  SUBCASE("ldb below the row") {
    auto s = good;
    s.ldb = 8;
    CHECK(test::contains(error(s, ok), "ldb = 8"));
  }
  SUBCASE("ldc below the row") {
    auto s = good;
    s.ldc = 7;
    CHECK(test::contains(error(s, ok), "ldc = 7"));
  }
  SUBCASE("null A") {
    auto o = ok;
    o.a = nullptr;
    CHECK(test::contains(error(good, o), "A is null"));
  }
  SUBCASE("null B") {
    auto o = ok;
    o.b = nullptr;
    CHECK(test::contains(error(good, o), "B is null"));
  }
  SUBCASE("null C") {
    auto o = ok;
    o.c = nullptr;
    CHECK(test::contains(error(good, o), "C is null"));
  }
  SUBCASE("bias missing") {
    auto s = good;
    s.bias = true;
    CHECK(test::contains(error(s, ok), "bias is null"));
  }
  SUBCASE("addend without accumulation") {
    auto o = ok;
    o.addend = fake;
    CHECK(test::contains(error(good, o), "does not accumulate"));
  }
  SUBCASE("bias not planned") {
    auto o = ok;
    o.bias = fake;
    CHECK(test::contains(error(good, o), "has no bias"));
  }
  SUBCASE("workspace too small") {
    auto o = ok;
    o.workspace_bytes = 1000;
    CHECK(test::contains(error(good, o), "workspace_bytes = 1000"));
  }
  SUBCASE("workspace null") {
    auto o = ok;
    o.workspace = nullptr;
    CHECK(test::contains(error(good, o), "workspace is null"));
  }
  SUBCASE("workspace misaligned") {
    auto o = ok;
    o.workspace = fake + 16;
    CHECK(test::contains(error(good, o), "256-byte aligned"));
  }
}

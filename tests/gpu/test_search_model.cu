// The search step on the GPU (DeviceSearchModel) against the CPU DecoderSearchModel in float64
// on the same bf16-rounded weights (the teacher's, the MLP's and every operator's own): the
// KL(teacher ‖ student), dL/dπ of every layer and operator, the student's final hidden states
// and dL/dx_0, for stories260K and for random configs (d_head 64, GQA, q/k/v bias, T below and
// above the 64-token chunks of the linear-attention kernels), with the operators Softmax,
// SlidingWindow (with sinks), GatedLinear and GatedDeltaNet.
//
// Identities: a one-hot π on Softmax in every layer is the teacher (KL = 0 up to rounding, and
// dL/dπ = 0 for every operator not run); kl_and_gradient (the SearchModel contract) equals the
// asynchronous step() it wraps, also where it replays the step as a CUDA graph.
//
// Tolerances (relative; L2 for vectors) are tied to bf16 and to how well-conditioned each output
// is. Weights are the same bf16 values on both sides; the difference is the bf16 rounding of
// activations between kernels (relative 2⁻⁸ at most, 2⁻⁸/√3 rms), about six tensors a layer
// forward and ten backward. How much such roundings move an output depends on the output: the
// KL's gradient at the head is q − p, a difference of the two forwards' softmaxes, so where the
// student is close to the teacher its relative error is the forwards' error divided by how far
// apart they are; dL/dπ_i = <a_i, d_i> sums products of both signs over every token. So each
// output is also computed in float64 with every weight multiplied by (1 + u·2⁻⁸), u uniform in
// [−1, 1] — one bf16-sized rounding of every weight, a perturbation of the size the GPU's
// roundings make, drawn independently for the teacher's forward and the student's since the GPU
// rounds their activations independently (a perturbation they shared would cancel in q − p) —
// and the GPU must agree with the unperturbed float64 result to within
// max(1e-2, 3 × that perturbation's effect): the 1e-2 of a bf16 path where the output is well
// conditioned, and three times its own sensitivity to bf16 rounding where it is not.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "dash/core/cuda.hpp"
#include "dash/core/dtype.hpp"
#include "dash/io/llama2c.hpp"
#include "dash/model/cuda/search_model.cuh"
#include "dash/model/loss.hpp"
#include "dash/ops/gated_delta_net.hpp"
#include "dash/ops/gated_linear.hpp"
#include "dash/ops/sliding_window.hpp"
#include "dash/ops/softmax.hpp"
#include "dash/search/decoder_model.hpp"
#include "support/errors.hpp"
#include "support/gpu.hpp"
#include "support/random.hpp"
#include "support/random_model.hpp"
#include "support/search_model.hpp"

using namespace dash;
namespace cm = dash::cuda::model;
using dash::cuda::bfloat16;

namespace {

using CpuDecoder = test::CpuSearchDecoder;
using DeviceModel = cm::DeviceSearchModel<Softmax, SlidingWindow<>, GatedLinear, GatedDeltaNet>;
using CpuModel = search::DecoderSearchModel<double, Softmax, SlidingWindow<>, GatedLinear, GatedDeltaNet>;
using Mixer = BasicMixedAttention<double, Softmax, SlidingWindow<>, GatedLinear, GatedDeltaNet>;
static_assert(search::SearchModel<DeviceModel>);

// π per layer from logits drawn so that every weight is at least 0.1; all operators run.
search::Mixture random_mixture(int layers, int ops, Rng& rng) {
  search::Mixture m(layers, ops);
  for (int l = 0; l < layers; ++l) {
    std::vector<double> w(static_cast<std::size_t>(ops));
    double sum = 0;
    for (double& x : w) sum += x = 1.0 + 2.0 * rng.uniform();
    for (int i = 0; i < ops; ++i) {
      m.weights[std::size_t(l * ops + i)] = w[std::size_t(i)] / sum;
      m.run[std::size_t(l * ops + i)] = 1;
    }
  }
  return m;
}

search::Mixture one_hot_mixture(const std::vector<int>& ops_per_layer, int ops) {
  search::Mixture m(int(ops_per_layer.size()), ops);
  for (std::size_t l = 0; l < ops_per_layer.size(); ++l) {
    m.weights[l * std::size_t(ops) + std::size_t(ops_per_layer[l])] = 1;
    m.run[l * std::size_t(ops) + std::size_t(ops_per_layer[l])] = 1;
  }
  return m;
}

struct CpuStep {
  double kl = 0;
  std::vector<double> grad;
  Tensor<double> hidden, d_input, teacher_hidden;  // [B·T, d]
};

// The teacher's forward runs on `teacher_decoder`, the student's forward and backward on `decoder`
// (the same object but for the sensitivity runs, which perturb the two independently, as the
// GPU rounds the teacher's and the student's activations independently).
CpuStep cpu_step(const CpuDecoder& teacher_decoder, const CpuDecoder& decoder, const model::TokenBatch& batch,
                 const search::Mixture& mixture) {
  CpuDecoder::Activations teacher, student;
  teacher_decoder.forward(batch, teacher, CpuModel(teacher_decoder).teacher());
  decoder.forward(batch, student, CpuModel::to_architecture(mixture));
  Tensor<double> d_hidden(student.hidden.shape(), 0.0);
  const model::LossValue kl = model::kl_loss<double>(decoder.weights().head().view(), teacher.hidden.view(),
                                                     student.hidden.view(), d_hidden.view());
  std::vector<Tensor<double>> d_inputs;
  const auto grads = decoder.backward(student, d_hidden.view(), false, &d_inputs);
  CpuStep r;
  r.kl = kl.mean();
  for (const auto& g : grads)
    for (double x : g.weights) r.grad.push_back(x);
  const index_t rows = batch.batch * batch.length, d = decoder.config().d_model;
  r.hidden = Tensor<double>(Shape{rows, d});
  std::copy_n(student.hidden.data(), rows * d, r.hidden.data());
  r.d_input = Tensor<double>(Shape{rows, d});
  std::copy_n(d_inputs[0].data(), rows * d, r.d_input.data());
  r.teacher_hidden = Tensor<double>(Shape{rows, d});
  std::copy_n(teacher.hidden.data(), rows * d, r.teacher_hidden.data());
  return r;
}

struct GpuStep {
  double kl = 0;
  std::vector<double> grad;
  Tensor<double> hidden, d_input, teacher_hidden;
};

template <class E>
Tensor<double> download(const E* data, Shape shape) {
  Tensor<double> out(shape);
  std::vector<E> raw(std::size_t(shape.numel()));
  dash::cuda::check(cudaMemcpy(raw.data(), data, raw.size() * sizeof(E), cudaMemcpyDeviceToHost), "download");
  for (std::size_t i = 0; i < raw.size(); ++i) {
    if constexpr (std::is_same_v<E, bfloat16>)
      out.data()[i] = double(__bfloat162float(raw[i]));
    else
      out.data()[i] = double(raw[i]);
  }
  return out;
}

// The model's outputs filled with NaN, so that anything a step fails to write shows.
void poison_outputs(DeviceModel& m, index_t rows) {
  const std::size_t elements = std::size_t(rows) * std::size_t(m.config().d_model);
  dash::cuda::check(cudaMemset(const_cast<float*>(m.loss()), 0xFF, 2 * sizeof(float)), "poison loss");
  dash::cuda::check(cudaMemset(const_cast<float*>(m.pi_gradient()), 0xFF,
                               std::size_t(m.n_layers() * m.n_ops()) * sizeof(float)),
                    "poison dL/dpi");
  dash::cuda::check(cudaMemset(const_cast<float*>(m.input_gradient()), 0xFF, elements * sizeof(float)), "poison dx");
  dash::cuda::check(cudaMemset(const_cast<bfloat16*>(m.student_hidden()), 0xFF, elements * sizeof(bfloat16)),
                    "poison hidden");
  dash::cuda::check(cudaDeviceSynchronize(), "poison");
}

// One step through step() on a stream of the test's own, from device ids and π.
GpuStep gpu_step(DeviceModel& m, const model::TokenBatch& batch, const search::Mixture& mixture) {
  const index_t rows = batch.batch * batch.length, d = m.config().d_model;
  poison_outputs(m, rows);
  Tensor<int> ids(Shape{rows});
  std::copy(batch.ids.begin(), batch.ids.end(), ids.data());
  Tensor<float> pi(Shape{index_t(mixture.weights.size())});
  for (std::size_t i = 0; i < mixture.weights.size(); ++i) pi.data()[i] = float(mixture.weights[i]);
  const auto ids_device = dash::cuda::DeviceTensor<int>::from_host(ids.view());
  const auto pi_device = dash::cuda::DeviceTensor<float>::from_host(pi.view());
  cudaStream_t stream = nullptr;
  dash::cuda::check(cudaStreamCreate(&stream), "stream");
  m.step(ids_device.data(), batch.batch, batch.length, pi_device.data(), mixture.run, stream);
  m.check_tokens(stream);
  dash::cuda::check(cudaStreamSynchronize(stream), "synchronise");
  dash::cuda::check(cudaStreamDestroy(stream), "stream");
  GpuStep r;
  r.kl = download(m.loss(), Shape{2}).data()[1];
  const Tensor<double> grad = download(m.pi_gradient(), Shape{index_t(mixture.weights.size())});
  r.grad.assign(grad.data(), grad.data() + grad.numel());
  r.hidden = download(m.student_hidden(), Shape{rows, d});
  r.d_input = download(m.input_gradient(), Shape{rows, d});
  r.teacher_hidden = download(m.teacher_hidden(), Shape{rows, d});
  return r;
}

double relative_l2(const std::vector<double>& got, const std::vector<double>& want) {
  REQUIRE(got.size() == want.size());
  Tensor<double> a(Shape{index_t(got.size())}), b(Shape{index_t(want.size())});
  std::copy(got.begin(), got.end(), a.data());
  std::copy(want.begin(), want.end(), b.data());
  return test::relative_l2(a, b);
}

struct Errors {
  double kl = 0, grad = 0, hidden = 0, d_input = 0;
};

template <class Step>
Errors compare(const Step& got, const CpuStep& want) {
  Errors e;
  e.kl = std::isfinite(got.kl) ? std::abs(got.kl - want.kl) / std::abs(want.kl) : INFINITY;
  e.grad = relative_l2(got.grad, want.grad);
  e.hidden = test::relative_l2(got.hidden, want.hidden);
  e.d_input = test::relative_l2(got.d_input, want.d_input);
  return e;
}

constexpr double teacher_hidden_tolerance = 2e-2;  // test_decoder.cu's

// The GPU's errors against the float64 step, each within max(1e-2, 3 × the output's sensitivity
// to one bf16 rounding of every weight).
Errors check_step(const std::string& what, const GpuStep& got, const test::SearchReference& ref,
                  const model::TokenBatch& batch, const search::Mixture& mixture) {
  const CpuStep want = cpu_step(ref.exact, ref.exact, batch, mixture);
  const Errors e = compare(got, want),
               sensitivity = compare(cpu_step(ref.perturbed_teacher, ref.perturbed_student, batch, mixture), want);
  const auto bound = [](double s) { return std::max(test::bf16_tolerance, 3 * s); };
  MESSAGE(what, ": relative errors (bound) KL ", e.kl, " (", bound(sensitivity.kl), "), dL/dpi ", e.grad, " (",
          bound(sensitivity.grad), "), hidden ", e.hidden, " (", bound(sensitivity.hidden), "), dL/dx0 ", e.d_input,
          " (", bound(sensitivity.d_input), "); KL ", want.kl);
  CHECK(e.kl <= bound(sensitivity.kl));
  CHECK(e.grad <= bound(sensitivity.grad));
  CHECK(e.hidden <= bound(sensitivity.hidden));
  CHECK(e.d_input <= bound(sensitivity.d_input));
  return e;
}

// Two layers of d_head 64 under GQA with every operator (a random window): for the tests that
// compare steps with each other.
test::SearchReference two_layer_reference(Rng& rng) {
  model::Config c = test::random_config(rng);
  c.n_layers = 2, c.d_head = 64, c.n_heads = 4, c.n_kv_heads = 2, c.d_model = 128, c.d_ff = 192, c.vocab_size = 300;
  const model::Weights<double> w = model::Weights<double>::random(c, rng);
  return test::make_search_reference(c, w, rng, SlidingWindow<>(1 + index_t(rng.below(70))), GatedLinear{},
                                     GatedDeltaNet{});
}

}  // namespace

TEST_CASE("search step on stories260K: KL, dL/dpi, hidden states and dL/dx0 match the CPU in float64") {
  if (!test::gpu_available()) return;
  const std::optional<io::Checkpoint> stories = test::stories260k();
  if (!stories) return;
  Rng rng = test::rng_for("search step stories260K");
  const io::Checkpoint& ckpt = *stories;
  const index_t B = 2, T = 65;
  SlidingWindow<> swa(16 + index_t(rng.below(16)), index_t(rng.below(3)));
  const test::SearchReference ref =
      test::make_search_reference(ckpt.config, ckpt.weights, rng, swa, GatedLinear{}, GatedDeltaNet{});
  const CpuDecoder& decoder = ref.exact;
  const std::vector<int> ids = test::random_ids(rng, B * T, ckpt.config.vocab_size);
  const model::TokenBatch batch{ids, B, T};
  const search::Mixture mixture = random_mixture(decoder.n_layers(), 4, rng);

  DeviceModel device(decoder, B * T, T);
  const GpuStep got = gpu_step(device, batch, mixture);
  const CpuStep want = cpu_step(decoder, decoder, batch, mixture);
  const double teacher = test::relative_l2(got.teacher_hidden, want.teacher_hidden);
  MESSAGE("stories260K (", ckpt.config.n_layers, " layers, d_head ", ckpt.config.d_head, ", window ", swa.window(),
          " sinks ", swa.sinks(), ", B ", B, " T ", T, "): the teacher's hidden ", teacher);
  CHECK(teacher <= teacher_hidden_tolerance);
  check_step("stories260K, mixed", got, ref, batch, mixture);

  // Every layer one operator: each candidate's own path through the whole model.
  for (int op = 1; op < 4; ++op) {
    const search::Mixture discrete = one_hot_mixture(std::vector<int>(std::size_t(decoder.n_layers()), op), 4);
    const std::string what = "stories260K, every layer " + std::string(Mixer::op_names()[std::size_t(op)]);
    check_step(what, gpu_step(device, batch, discrete), ref, batch, discrete);
  }
}

TEST_CASE("search step on random configs: d_head 64, GQA, bias, T below and above the chunk, options") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("search step random configs");
  struct Variant {
    index_t batch, length;
    bool gla_rope;
    int gla_kv_heads;  // 0: the teacher's
    bool gdn_state_per_query_head;
  };
  const Variant variants[] = {{2, 33, false, 0, true}, {1, 130, true, 4, false}, {3, 65, true, 0, true}};
  for (const Variant& v : variants) {
    model::Config c = test::random_config(rng);
    c.n_layers = 2, c.d_head = 64, c.n_heads = 4, c.n_kv_heads = 2, c.d_model = 128;
    c.d_ff = 160 + 8 * int(rng.below(8));
    c.vocab_size = 200 + int(rng.below(200));
    c.qkv_bias = true;
    c.rope = {rng.below(2) ? RopeConfig::Style::half : RopeConfig::Style::interleaved, 10000.0};
    const model::Weights<double> w = model::Weights<double>::random(c, rng);
    GatedLinear gla;
    gla.rope = v.gla_rope, gla.kv_heads = v.gla_kv_heads, gla.gate_normaliser = 8;
    GatedDeltaNet gdn;
    gdn.state_per_query_head = v.gdn_state_per_query_head, gdn.scale = 0.5;
    SlidingWindow<> swa(1 + index_t(rng.below(std::uint64_t(v.length))), index_t(rng.below(4)));
    const test::SearchReference ref = test::make_search_reference(c, w, rng, swa, gla, gdn);
    const std::vector<int> ids = test::random_ids(rng, v.batch * v.length, c.vocab_size);
    const model::TokenBatch batch{ids, v.batch, v.length};
    const search::Mixture mixture = random_mixture(c.n_layers, 4, rng);
    DeviceModel device(ref.exact, v.batch * v.length + 5, v.length + 2);
    INFO("B ", v.batch, " T ", v.length, " window ", swa.window(), " sinks ", swa.sinks(), " gla rope ", v.gla_rope,
         " gla kv_heads ", v.gla_kv_heads, " gdn state per query head ", v.gdn_state_per_query_head);
    const std::string what = "random config B " + std::to_string(v.batch) + " T " + std::to_string(v.length);
    check_step(what, gpu_step(device, batch, mixture), ref, batch, mixture);
  }
}

TEST_CASE("search step: a one-hot softmax architecture is the teacher; a discrete hybrid matches the CPU") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("search step one-hot");
  model::Config c = test::random_config(rng);
  c.n_layers = 4, c.d_head = 16, c.n_heads = 4, c.n_kv_heads = 2, c.d_model = 64, c.d_ff = 96, c.vocab_size = 300;
  const model::Weights<double> w = model::Weights<double>::random(c, rng);
  const test::SearchReference ref =
      test::make_search_reference(c, w, rng, SlidingWindow<>(9, 2), GatedLinear{}, GatedDeltaNet{});
  const index_t B = 2, T = 71;
  const std::vector<int> ids = test::random_ids(rng, B * T, c.vocab_size);
  const model::TokenBatch batch{ids, B, T};
  DeviceModel device(ref.exact, B * T, T);

  const GpuStep teacher = gpu_step(device, batch, one_hot_mixture({0, 0, 0, 0}, 4));
  MESSAGE("one-hot softmax: KL ", teacher.kl);
  CHECK(std::abs(teacher.kl) <= 1e-5);
  for (std::size_t e = 0; e < teacher.grad.size(); ++e) {
    CHECK(std::isfinite(teacher.grad[e]));
    if (e % 4 != 0) CHECK(teacher.grad[e] == 0);
  }

  const search::Mixture hybrid = one_hot_mixture({2, 1, 3, 0}, 4);
  const GpuStep got = gpu_step(device, batch, hybrid);
  check_step("discrete hybrid gla|swa|gdn|softmax", got, ref, batch, hybrid);
  for (std::size_t k = 0; k < got.grad.size(); ++k)
    if (!hybrid.run[k]) CHECK(got.grad[k] == 0);
}

TEST_CASE("search step: kl_and_gradient (the SearchModel contract) equals step() and the CPU model") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("search step contract");
  model::Config c = test::random_config(rng);
  c.n_layers = 2, c.d_head = 8, c.n_heads = 4, c.n_kv_heads = 2, c.d_model = 32, c.d_ff = 48, c.vocab_size = 100;
  const model::Weights<double> w = model::Weights<double>::random(c, rng);
  const test::SearchReference ref =
      test::make_search_reference(c, w, rng, SlidingWindow<>(5), GatedLinear{}, GatedDeltaNet{});
  const index_t B = 3, T = 21;
  const std::vector<int> ids = test::random_ids(rng, B * T, c.vocab_size);
  const model::TokenBatch batch{ids, B, T};
  search::Mixture mixture = random_mixture(c.n_layers, 4, rng);
  mixture.weights[1] = 0, mixture.run[1] = 0;  // layer 0 leaves its window out

  DeviceModel device(ref.exact, B * T, T);
  const double kl = device.kl_and_gradient(batch, mixture);
  const std::vector<double> grad = mixture.grad;
  const GpuStep step = gpu_step(device, batch, mixture);
  MESSAGE("kl_and_gradient ", kl, " step ", step.kl, "; dL/dpi vs step ", relative_l2(grad, step.grad));
  // The same step twice: equal up to the order of fp32 atomic reductions (attention's dq).
  CHECK(std::abs(kl - step.kl) <= test::fp32_tolerance * std::abs(step.kl));
  CHECK(relative_l2(grad, step.grad) <= test::fp32_tolerance);
  CHECK(grad[1] == 0);
  check_step("through kl_and_gradient", step, ref, batch, mixture);
}

TEST_CASE("search step: kl_and_gradient replayed as a CUDA graph equals the eager step") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("search step replay");
  const test::SearchReference ref = two_layer_reference(rng);
  const model::Config& c = ref.exact.config();
  const index_t B = 2, T = 65 + index_t(rng.below(70));
  DeviceModel device(ref.exact, B * T, T, cm::Activations::kept);
  const auto same = [](double kl, const std::vector<double>& grad, const GpuStep& want) {
    // Equal up to the order of fp32 atomic reductions (attention's dq).
    CHECK(std::abs(kl - want.kl) <= test::fp32_tolerance * std::abs(want.kl));
    CHECK(relative_l2(grad, want.grad) <= test::fp32_tolerance);
  };
  // Eager, captured, then replayed three times with new ids and weights: each against step().
  search::Mixture mixture = random_mixture(c.n_layers, 4, rng);
  for (int call = 0; call < 5; ++call) {
    const std::vector<int> ids = test::random_ids(rng, B * T, c.vocab_size);
    const model::TokenBatch batch{ids, B, T};
    if (call >= 2)
      for (std::size_t e = 0; e < mixture.weights.size(); ++e) mixture.weights[e] = rng.uniform(0.05, 1.0);
    const double kl = device.kl_and_gradient(batch, mixture);
    const std::vector<double> grad = mixture.grad;
    const GpuStep want = gpu_step(device, batch, mixture);
    MESSAGE("call ", call, ": KL ", kl, " vs step ", want.kl, ", dL/dpi ", relative_l2(grad, want.grad));
    same(kl, grad, want);
  }
  // Other run flags: another graph, whose first call is eager again.
  mixture.weights[2] = 0, mixture.run[2] = 0;
  const std::vector<int> ids = test::random_ids(rng, B * T, c.vocab_size);
  const model::TokenBatch batch{ids, B, T};
  for (int call = 0; call < 3; ++call) {
    const double kl = device.kl_and_gradient(batch, mixture);
    const std::vector<double> grad = mixture.grad;
    CHECK(grad[2] == 0);
    same(kl, grad, gpu_step(device, batch, mixture));
  }
}

TEST_CASE("search model built for some operators holds less and equals the model of all of them") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("search step used operators");
  const test::SearchReference ref = two_layer_reference(rng);
  const model::Config& c = ref.exact.config();
  const index_t B = 2, T = 65 + index_t(rng.below(70));
  const std::vector<int> ids = test::random_ids(rng, B * T, c.vocab_size);
  const model::TokenBatch batch{ids, B, T};
  search::Mixture mixture = random_mixture(c.n_layers, 4, rng);
  for (int l = 0; l < c.n_layers; ++l) mixture.weights[std::size_t(4 * l + 3)] = 0, mixture.run[std::size_t(4 * l + 3)] = 0;

  DeviceModel all(ref.exact, B * T, T, cm::Activations::kept);
  DeviceModel some(ref.exact, B * T, T, cm::Activations::kept, dash::cuda::GemmChoice::heuristic,
                   {true, true, true, false});  // no GatedDeltaNet
  MESSAGE("workspace: every operator ", all.workspace_bytes(), " bytes, without GatedDeltaNet ", some.workspace_bytes());
  CHECK(some.workspace_bytes() < all.workspace_bytes());
  const GpuStep a = gpu_step(all, batch, mixture), b = gpu_step(some, batch, mixture);
  CHECK(std::abs(a.kl - b.kl) <= test::fp32_tolerance * std::abs(a.kl));
  CHECK(relative_l2(b.grad, a.grad) <= test::fp32_tolerance);
  CHECK(test::relative_l2(b.d_input, a.d_input) <= test::fp32_tolerance);
  mixture.weights[3] = 0.5, mixture.run[3] = 1;
  CHECK(test::contains(test::error_of([&] { (void)some.kl_and_gradient(batch, mixture); }), "built without it"));
}

TEST_CASE("search step with every layer's activations kept equals the step that recomputes them") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("search step kept activations");
  model::Config c = test::random_config(rng);
  c.n_layers = 3, c.d_head = 64, c.n_heads = 4, c.n_kv_heads = 2, c.d_model = 128, c.d_ff = 192, c.vocab_size = 300;
  c.qkv_bias = true;
  const model::Weights<double> w = model::Weights<double>::random(c, rng);
  GatedLinear gla;
  gla.rope = true;
  const test::SearchReference ref = test::make_search_reference(
      c, w, rng, SlidingWindow<>(1 + index_t(rng.below(40)), index_t(rng.below(3))), gla, GatedDeltaNet{});
  const index_t B = 2, T = 65 + index_t(rng.below(70));
  const std::vector<int> ids = test::random_ids(rng, B * T, c.vocab_size);
  const model::TokenBatch batch{ids, B, T};
  search::Mixture mixture = random_mixture(c.n_layers, 4, rng);
  mixture.weights[4 + 2] = 0, mixture.run[4 + 2] = 0;  // layer 1 leaves GatedLinear out

  DeviceModel recomputed(ref.exact, B * T, T, cm::Activations::recomputed);
  DeviceModel kept(ref.exact, B * T, T, cm::Activations::kept);
  CHECK(kept.workspace_bytes() > recomputed.workspace_bytes());
  const GpuStep a = gpu_step(recomputed, batch, mixture), b = gpu_step(kept, batch, mixture);
  // The same kernels on the same inputs: equal up to the order of fp32 atomic reductions.
  MESSAGE("kept vs recomputed: KL ", b.kl, " vs ", a.kl, ", dL/dpi ", relative_l2(b.grad, a.grad), ", dL/dx0 ",
          test::relative_l2(b.d_input, a.d_input));
  CHECK(std::abs(a.kl - b.kl) <= test::fp32_tolerance * std::abs(a.kl));
  CHECK(relative_l2(b.grad, a.grad) <= test::fp32_tolerance);
  CHECK(test::relative_l2(b.d_input, a.d_input) <= test::fp32_tolerance);
  CHECK(b.grad[4 + 2] == 0);
  check_step("kept activations", b, ref, batch, mixture);
}

TEST_CASE("search model refuses bad steps and mixtures before any launch") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("search step bad input");
  model::Config c = test::random_config(rng);
  c.d_head = 8, c.n_heads = 2, c.n_kv_heads = 1, c.d_model = 16;
  const CpuDecoder decoder =
      test::make_cpu_decoder(c, model::Weights<double>::random(c, rng), rng, SlidingWindow<>(3), GatedLinear{},
                       GatedDeltaNet{});
  DeviceModel device(decoder, 20, 10);
  const int L = c.n_layers;
  const dash::cuda::DeviceTensor<int> ids(Shape{20});
  const dash::cuda::DeviceTensor<float> pi(Shape{index_t(4 * L)});
  const std::vector<std::uint8_t> run(std::size_t(4 * L), 1), short_run(3, 1);
  using test::contains;
  using test::error_of;
  CHECK(contains(error_of([&] { device.step(ids.data(), 1, 11, pi.data(), run, nullptr); }),
                 "length T = 11, expected 1 ... max_length = 10"));
  CHECK(contains(error_of([&] { device.step(ids.data(), 3, 10, pi.data(), run, nullptr); }),
                 "exceeds max_tokens = 20"));
  CHECK(contains(error_of([&] { device.step(ids.data(), 0, 5, pi.data(), run, nullptr); }), "batch = 0"));
  CHECK(contains(error_of([&] { device.step(nullptr, 1, 5, pi.data(), run, nullptr); }), "ids is null"));
  CHECK(contains(error_of([&] { device.step(ids.data(), 1, 5, nullptr, run, nullptr); }), "pi is null"));
  CHECK(contains(error_of([&] { device.step(ids.data(), 1, 5, pi.data(), short_run, nullptr); }),
                 "run has 3 flags"));
  // 20 one-token sequences pad to 20 chunks in the linear-attention kernels: more scratch than
  // the model planned for max_tokens = 20 in sequences of at least max_length = 10 tokens.
  CHECK(contains(error_of([&] { device.step(ids.data(), 20, 1, pi.data(), run, nullptr); }),
                 "bytes of operator scratch"));

  std::vector<int> tokens(10, 1);
  const model::TokenBatch batch{tokens, 2, 5};
  search::Mixture wrong(L + 1, 4);
  CHECK(contains(error_of([&] { (void)device.kl_and_gradient(batch, wrong); }), "a mixture of"));
  search::Mixture m = random_mixture(L, 4, rng);
  m.run[2] = 0;
  CHECK(contains(error_of([&] { (void)device.kl_and_gradient(batch, m); }), "but the operator is not run"));
  m = random_mixture(L, 4, rng);
  m.weights[0] = NAN;
  CHECK(contains(error_of([&] { (void)device.kl_and_gradient(batch, m); }), "expected a finite value"));
  m = random_mixture(L, 4, rng);
  tokens[3] = c.vocab_size;
  CHECK(contains(error_of([&] { (void)device.kl_and_gradient(batch, m); }), "outside the vocabulary"));
}

TEST_CASE("search model refuses configs and operator options it cannot run, before touching the device") {
  Rng rng = test::rng_for("search model bad configs");
  model::Config c = test::random_config(rng);
  c.n_heads = 1, c.n_kv_heads = 1, c.d_head = 160, c.d_model = 16;
  const CpuDecoder wide =
      test::make_cpu_decoder(c, model::Weights<double>::random(c, rng), rng, SlidingWindow<>(3), GatedLinear{},
                       GatedDeltaNet{});
  using test::contains;
  using test::error_of;
  CHECK(contains(error_of([&] { DeviceModel m(wide, 10, 10); }), "d_head = 160, expected at most 128"));

  c.d_head = 8;
  GatedLinear gla;
  gla.scale = NAN;
  const CpuDecoder bad_scale =
      test::make_cpu_decoder(c, model::Weights<double>::random(c, rng), rng, SlidingWindow<>(3), gla, GatedDeltaNet{});
  CHECK(contains(error_of([&] { DeviceModel m(bad_scale, 10, 10); }), "GatedLinear scale = nan"));
  const CpuDecoder good =
      test::make_cpu_decoder(c, model::Weights<double>::random(c, rng), rng, SlidingWindow<>(3), GatedLinear{},
                       GatedDeltaNet{});
  CHECK(contains(error_of([&] { DeviceModel m(good, 5, 10); }), "max_tokens = 5, expected at least max_length = 10"));
  CHECK(contains(error_of([&] { DeviceModel m(good, 10, 0); }), "max_length = 0"));
}

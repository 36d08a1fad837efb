// Candidate preparation on the GPU (prepare.cuh) against the CPU's (search/prepare.hpp) in
// float64 on the same bf16-rounded weights.
//
//   gradients   for one layer and each own candidate (GatedLinear, GatedDeltaNet): the alignment
//               error and the gradient of every parameter (fused projection blocks, biases, gate
//               biases, Wo) equal the CPU mixer's backward of the same error, within
//               max(1e-2, 3 × the output's sensitivity to one bf16 rounding of every weight)
//               (test_search_model.cu explains the bound), on stories260K and a random config
//               with GQA, q/k/v bias and RoPE in GatedLinear.
//   training    the trainer's errors equal the CPU's before training; each step's mean error
//               follows the CPU's training from the same start (the same Adam, schedule and
//               batch), and falls; the weights written back into the CPU decoder give the CPU
//               the same errors the GPU reports (the write-back is the layout's inverse).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "dash/core/cuda.hpp"
#include "dash/io/llama2c.hpp"
#include "dash/model/cuda/prepare.cuh"
#include "dash/search/decoder_model.hpp"
#include "dash/search/prepare.hpp"
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
using CpuModel = search::DecoderSearchModel<double, Softmax, SlidingWindow<>, GatedLinear, GatedDeltaNet>;
using Mixer = BasicMixedAttention<double, Softmax, SlidingWindow<>, GatedLinear, GatedDeltaNet>;
using DeviceModel = cm::DeviceSearchModel<Softmax, SlidingWindow<>, GatedLinear, GatedDeltaNet>;
using DevicePreparation = cm::DeviceCandidatePreparation<Softmax, SlidingWindow<>, GatedLinear, GatedDeltaNet>;
using CpuPreparation = search::CandidatePreparation<double, Softmax, SlidingWindow<>, GatedLinear, GatedDeltaNet>;

template <class E>
std::vector<double> download(const E* data, index_t n) {
  std::vector<E> raw(static_cast<std::size_t>(n));
  dash::cuda::check(cudaMemcpy(raw.data(), data, raw.size() * sizeof(E), cudaMemcpyDeviceToHost), "download");
  std::vector<double> out(raw.size());
  for (std::size_t i = 0; i < raw.size(); ++i) {
    if constexpr (std::is_same_v<E, bfloat16>)
      out[i] = double(__bfloat162float(raw[i]));
    else
      out[i] = double(raw[i]);
  }
  return out;
}

double relative_l2(const std::vector<double>& got, const std::vector<double>& want) {
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < want.size(); ++i)
    diff += (got[i] - want[i]) * (got[i] - want[i]), norm += want[i] * want[i];
  return std::sqrt(diff / norm);
}

// Candidate I's error and parameter gradients, by name, in the order of its Params::for_each.
struct Gradients {
  double error = 0;
  std::vector<std::string> names;
  std::vector<std::vector<double>> values;
};

// The CPU: the error of candidate I of layer l and its gradient through the mixer's backward.
template <std::size_t I>
Gradients cpu_gradients(const CpuDecoder& decoder, const model::TokenBatch& batch, int l) {
  CpuDecoder::Activations act;
  decoder.forward(batch, act, CpuModel(decoder).teacher());
  Tensor<double> h, target;
  decoder.mixer_io(l, act, h, target);
  const Mixer& mixer = decoder.mixers()[std::size_t(l)];
  Mixer::Weights w{};
  w[I] = 1;
  Mixer::Cache cache;
  Tensor<double> y(h.shape());
  mixer.forward(h.view(), y.view(), cache, w, Mixer::nonzero(w));
  double num = 0, den = 0;
  for (index_t k = 0; k < y.numel(); ++k)
    num += (y.data()[k] - target.data()[k]) * (y.data()[k] - target.data()[k]),
        den += target.data()[k] * target.data()[k];
  Tensor<double> dy(y.shape()), dh(h.shape(), 0.0);
  for (index_t k = 0; k < y.numel(); ++k) dy.data()[k] = 2 * (y.data()[k] - target.data()[k]) / den;
  Mixer::Gradients grads = mixer.zero_gradients();
  mixer.backward(h.view(), cache, dy.view(), dh.view(), grads);
  Gradients g;
  g.error = num / den;
  std::get<I>(grads.params).for_each([&](const char* name, Tensor<double>& t) {
    g.names.push_back(name);
    g.values.emplace_back(t.data(), t.data() + t.numel());
  });
  return g;
}

// The GPU: the same through teacher_layers, own_output, alignment_error, own_weight_gradients
// and column_sums, mapped back to the CPU's parameters by for_each_own_block.
template <std::size_t I>
Gradients gpu_gradients(DeviceModel& device, const CpuDecoder& decoder, const model::TokenBatch& batch, int l) {
  const index_t rows = batch.batch * batch.length, d = decoder.config().d_model;
  const cm::DeviceMixedAttention<Softmax, SlidingWindow<>, GatedLinear, GatedDeltaNet>::OwnWeights w =
      device.mixer(l).own_weights(int(I));
  Tensor<int> ids(Shape{rows});
  std::copy(batch.ids.begin(), batch.ids.end(), ids.data());
  const auto ids_device = dash::cuda::DeviceTensor<int>::from_host(ids.view());
  dash::cuda::DeviceTensor<float> y(Shape{rows * d}), scalars(Shape{2}), d_w_in(Shape{w.in_width * d}),
      d_wo(Shape{d * w.q_dim}), bias(Shape{w.in_width}), scratch(Shape{index_t(cm::column_sums_scratch(w.in_width))});
  dash::cuda::DeviceTensor<bfloat16> dy(Shape{rows * d});
  dash::cuda::DeviceTensor<double> partials(Shape{index_t(cm::alignment_partials_count())});
  for (auto* t : {&d_w_in, &d_wo, &bias})
    dash::cuda::check(cudaMemset(t->data(), 0xFF, sizeof(float) * std::size_t(t->numel())), "poison");
  dash::cuda::check(cudaDeviceSynchronize(), "poison");
  device.teacher_layers(ids_device.data(), batch.batch, batch.length, device.stream(),
                        [&](int layer, const cm::MixerContext& c, const bfloat16* h, const float* a) {
                          if (layer != l) return;
                          const index_t n = rows * d;
                          cm::squared_norm({.target = a, .n = n, .partials = partials.data(), .result = scalars.data()},
                                           c.stream);
                          device.mixer(l).own_output(c, int(I), h, y.data());
                          cm::alignment_error({.y = y.data(),
                                               .target = a,
                                               .n = n,
                                               .den = scalars.data(),
                                               .dy = dy.data(),
                                               .partials = partials.data(),
                                               .result = scalars.data() + 1},
                                              c.stream);
                          device.mixer(l).own_weight_gradients(c, int(I), h, dy.data(), d_w_in.data(), d_wo.data());
                          cm::column_sums(c.buffers.own_d_in, rows, w.in_width, w.in_width, scratch.data(),
                                          bias.data(), c.stream);
                        });
  dash::cuda::check(cudaStreamSynchronize(device.stream()), "synchronise");
  const std::vector<double> groups[cm::own_groups] = {
      download(d_w_in.data(), w.in_width * d), download(bias.data(), w.in_width),
      download(bias.data() + w.q_dim + 2 * w.kv_width, w.gate_biases), download(d_wo.data(), d * w.q_dim)};
  Gradients g;
  g.error = download(scalars.data() + 1, 1)[0];
  auto params = std::get<I>(decoder.mixers()[std::size_t(l)].params());  // a copy: for_each is not const
  std::vector<const Tensor<double>*> order;
  params.for_each([&](const char* name, Tensor<double>& t) { g.names.push_back(name), order.push_back(&t); });
  g.values.resize(g.names.size());
  cm::for_each_own_block(params, w, [&](Tensor<double>& t, cm::OwnGroup group, index_t offset) {
    const auto k = std::size_t(std::find(order.begin(), order.end(), &t) - order.begin());
    const std::vector<double>& from = groups[int(group)];
    g.values[k].assign(from.begin() + offset, from.begin() + offset + t.numel());
  });
  return g;
}

template <std::size_t I>
void check_gradients(const std::string& what, DeviceModel& device, const test::SearchReference& ref,
                     const model::TokenBatch& batch, int l) {
  const Gradients got = gpu_gradients<I>(device, ref.exact, batch, l);
  const Gradients want = cpu_gradients<I>(ref.exact, batch, l);
  const Gradients moved = cpu_gradients<I>(ref.perturbed_teacher, batch, l);
  const auto bound = [](double s) { return std::max(test::bf16_tolerance, 3 * s); };
  const double error = std::abs(got.error - want.error) / want.error;
  const double error_sensitivity = std::abs(moved.error - want.error) / want.error;
  MESSAGE(what, " layer ", l, ": alignment error ", want.error, ", relative error ", error, " (bound ",
          bound(error_sensitivity), ")");
  CHECK(error <= bound(error_sensitivity));
  REQUIRE(got.names == want.names);
  for (std::size_t k = 0; k < want.names.size(); ++k) {
    REQUIRE(got.values[k].size() == want.values[k].size());
    const double e = relative_l2(got.values[k], want.values[k]);
    const double s = relative_l2(moved.values[k], want.values[k]);
    MESSAGE("  d", want.names[k], ": ", e, " (bound ", bound(s), ")");
    CHECK(e <= bound(s));
  }
}

}  // namespace

TEST_CASE("prepare gradients on stories260K: every candidate parameter matches the CPU in float64") {
  if (!test::gpu_available()) return;
  const std::optional<io::Checkpoint> stories = test::stories260k();
  if (!stories) return;
  Rng rng = test::rng_for("prepare gradients stories260K");
  const io::Checkpoint& ckpt = *stories;
  const index_t B = 2, T = 65 + index_t(rng.below(64));
  const test::SearchReference ref =
      test::make_search_reference(ckpt.config, ckpt.weights, rng, SlidingWindow<>(16), GatedLinear{}, GatedDeltaNet{});
  const std::vector<int> ids = test::random_ids(rng, B * T, ckpt.config.vocab_size);
  const model::TokenBatch batch{ids, B, T};
  DeviceModel device(ref.exact, B * T, T);
  const int l = int(rng.below(std::uint64_t(ckpt.config.n_layers)));
  check_gradients<2>("stories260K gla", device, ref, batch, l);
  check_gradients<3>("stories260K gdn", device, ref, batch, l);
}

TEST_CASE("prepare gradients on a random config: GQA, q/k/v bias, GatedLinear with RoPE and own kv heads") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("prepare gradients random");
  model::Config c = test::random_config(rng);
  c.d_head = 64, c.n_heads = 4, c.n_kv_heads = 2, c.d_model = 192, c.qkv_bias = true;
  const model::Weights<double> weights = model::Weights<double>::random(c, rng);
  const index_t B = 2, T = 33 + index_t(rng.below(100));
  const test::SearchReference ref = test::make_search_reference(
      c, weights, rng, SlidingWindow<>(16), GatedLinear{.kv_heads = 4, .rope = true}, GatedDeltaNet{});
  const std::vector<int> ids = test::random_ids(rng, B * T, c.vocab_size);
  const model::TokenBatch batch{ids, B, T};
  DeviceModel device(ref.exact, B * T, T);
  const int l = int(rng.below(std::uint64_t(c.n_layers)));
  check_gradients<2>("random gla", device, ref, batch, l);
  check_gradients<3>("random gdn", device, ref, batch, l);
}

TEST_CASE("prepare on stories260K: errors match the CPU, fall with training, and survive the write-back") {
  if (!test::gpu_available()) return;
  const std::optional<io::Checkpoint> stories = test::stories260k();
  if (!stories) return;
  Rng rng = test::rng_for("prepare training stories260K");
  const io::Checkpoint& ckpt = *stories;
  const index_t B = 4, T = 128;
  test::SearchReference ref =
      test::make_search_reference(ckpt.config, ckpt.weights, rng, SlidingWindow<>(16), GatedLinear{}, GatedDeltaNet{});
  const std::vector<int> ids = test::random_ids(rng, B * T, ckpt.config.vocab_size);
  const model::TokenBatch batch{ids, B, T};
  const std::vector<bool> prepare{false, false, true, true};
  const search::PrepareOptions options{.steps = 12, .lr = 1e-4, .warmup = 2};  // the tool's default lr

  DevicePreparation gpu(ref.exact, prepare, options, B * T, T);
  CHECK(gpu.candidates() == std::size_t(2 * ckpt.config.n_layers));
  const auto flat = [](const search::AlignmentErrors& e) {
    std::vector<double> out;
    for (const auto& layer : e)
      for (double x : layer)
        if (!std::isnan(x)) out.push_back(x);
    return out;
  };
  const std::vector<double> before = flat(gpu.errors(batch));
  const std::vector<double> cpu_before = flat(CpuPreparation(ref.exact, prepare, options).errors(batch));
  const std::vector<double> moved = flat(CpuPreparation(ref.perturbed_teacher, prepare, options).errors(batch));
  const double e_before = relative_l2(before, cpu_before);
  const double bound = std::max(test::bf16_tolerance, 3 * relative_l2(moved, cpu_before));
  MESSAGE("errors before training: relative L2 to the CPU ", e_before, " (bound ", bound, ")");
  CHECK(e_before <= bound);

  test::CpuSearchDecoder cpu_decoder = ref.exact;
  CpuPreparation cpu(cpu_decoder, prepare, options);
  std::vector<double> gpu_means, cpu_means;
  for (std::int64_t s = 0; s < options.steps; ++s)
    gpu_means.push_back(gpu.step(batch, s)), cpu_means.push_back(cpu.step(batch, s));
  const double e_training = relative_l2(gpu_means, cpu_means);
  MESSAGE("mean error by step, GPU (CPU): first ", gpu_means.front(), " (", cpu_means.front(), "), last ",
          gpu_means.back(), " (", cpu_means.back(), "); relative L2 over the steps ", e_training);
  CHECK(e_training <= bound);
  CHECK(gpu_means.back() < gpu_means.front());
  const std::vector<double> after = flat(gpu.errors(batch));
  for (std::size_t k = 0; k < after.size(); ++k) CHECK(after[k] < before[k]);

  gpu.write_back(ref.exact);
  const std::vector<double> cpu_after = flat(CpuPreparation(ref.exact, prepare, options).errors(batch));
  const double e_after = relative_l2(after, cpu_after);
  MESSAGE("errors after training: GPU vs CPU on the written-back weights ", e_after);
  CHECK(e_after <= bound);
}

TEST_CASE("prepare rejects bad arguments before any device work") {
  Rng rng = test::rng_for("prepare bad arguments");
  model::Config c = test::random_config(rng);
  const model::Weights<double> weights = model::Weights<double>::random(c, rng);
  CpuDecoder decoder =
      test::make_cpu_decoder(c, weights, rng, SlidingWindow<>(8), GatedLinear{}, GatedDeltaNet{});
  CHECK_THROWS_WITH_AS(cm::adam(cm::AdamParams{}, nullptr), doctest::Contains("adam: master must not be null"), Error);
  CHECK_THROWS_WITH_AS(cm::column_sums(nullptr, 1, 1, 1, nullptr, nullptr, nullptr),
                       doctest::Contains("column_sums"), Error);
  CHECK_THROWS_WITH_AS(cm::alignment_error({}, nullptr), doctest::Contains("alignment_error"), Error);
  CHECK_THROWS_WITH_AS(DevicePreparation(decoder, {true, true}, {}, 64, 64),
                       doctest::Contains("prepare: 2 flags for 4 operators"), Error);
  CHECK_THROWS_WITH_AS(DevicePreparation(decoder, {false, false, true, true}, {.steps = 0}, 64, 64),
                       doctest::Contains("prepare: steps = 0"), Error);
}

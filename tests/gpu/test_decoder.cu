// The decoder's forward on the GPU (DeviceDecoder) against the CPU Decoder with
// MixedAttention<Softmax> in float64 on the same bf16-rounded weights: final hidden states and
// logits of random small models (GQA, q/k/v bias, both RoPE styles, tied and separate heads,
// d_head 8, 16 and 64, odd T), a model with its own sliding window against SlidingWindow, and
// stories260K's NLL on the first story.
//
// Tolerance: the weights are the same bf16 values on both sides, so the difference is the bf16
// rounding of the activations between the kernels. Each rounding leaves a relative error of at
// most 2⁻⁹ per element, about 2⁻⁹/√3 ≈ 1.1e-3 in relative L2 for values spread over a binade.
// A layer rounds seven tensors (the norm's output, q|k|v, q and k again after RoPE, the attention
// output, the second norm's output, gate|up, the SwiGLU output: the residual stream is fp32),
// and the errors are independent, so three layers and the final norm give about
// √(3·7 + 1)·1.1e-3 ≈ 5e-3 in the hidden states, and about the same in the logits (the head
// product accumulates in fp32 from the bf16 hidden states and exact bf16 weights). 2e-2 leaves
// a margin of four for the growth of errors through the norms and the attention's softmax.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "dash/core/cuda.hpp"
#include "dash/core/dtype.hpp"
#include "dash/io/llama2c.hpp"
#include "dash/model/cuda/decoder.cuh"
#include "dash/model/loss.hpp"
#include "dash/ops/sliding_window.hpp"
#include "dash/ops/softmax.hpp"
#include "support/errors.hpp"
#include "support/gpu.hpp"
#include "support/random.hpp"
#include "support/random_model.hpp"
#include "support/search_model.hpp"

using namespace dash;
namespace cm = dash::cuda::model;
using dash::cuda::bfloat16;

namespace {

constexpr double decoder_tolerance = 2e-2;

dash::cuda::DeviceTensor<int> device_ids(const std::vector<int>& ids) {
  Tensor<int> host(Shape{index_t(ids.size())});
  std::copy(ids.begin(), ids.end(), host.data());
  return dash::cuda::DeviceTensor<int>::from_host(host.view());
}

// The decoder's outputs filled with NaN, so that a row the forward fails to write shows.
void poison_outputs(const cm::DeviceDecoder& decoder) {
  const std::size_t hidden = std::size_t(decoder.max_tokens()) * std::size_t(decoder.config().d_model);
  dash::cuda::check(cudaMemset(const_cast<bfloat16*>(decoder.hidden()), 0xFF, hidden * sizeof(bfloat16)), "poison hidden");
  dash::cuda::check(cudaMemset(const_cast<float*>(decoder.nll_sum()), 0xFF, 2 * sizeof(float)), "poison loss");
  dash::cuda::check(cudaDeviceSynchronize(), "poison");
}

// Final hidden states [B·T, d] and logits [B·T, V] of the CPU decoder with operator `op`.
struct Reference {
  Tensor<double> hidden, logits;
};

template <class Op>
Reference cpu_reference(const model::Config& c, const model::Weights<double>& w, const std::vector<int>& ids,
                        index_t B, index_t T, Rng& rng, Op op) {
  const auto decoder = test::make_decoder<double>(c, w, rng, op);
  typename std::decay_t<decltype(decoder)>::Activations act;
  decoder.forward({ids, B, T}, act);
  Reference r{Tensor<double>(Shape{B * T, c.d_model}), Tensor<double>(Shape{B * T, c.vocab_size})};
  std::copy(act.hidden.data(), act.hidden.data() + act.hidden.numel(), r.hidden.data());
  model::logits<double>(w.head().view(), r.hidden.view(), r.logits.view());
  return r;
}

struct Variant {
  int d_head, n_heads, n_kv_heads, d_model;
  bool qkv_bias;
  RopeConfig::Style rope;
  bool tied;
  index_t batch, length;
  int window;  // the config's sliding window, 0 for none
};

}  // namespace

TEST_CASE("decoder forward: hidden states and logits match the CPU decoder on bf16-rounded weights") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("decoder forward");
  using Style = RopeConfig::Style;
  const Variant variants[] = {
      {8, 4, 2, 32, true, Style::interleaved, true, 2, 7, 0},     // GQA 2:1, bias
      {16, 4, 1, 48, false, Style::half, false, 1, 130, 0},       // GQA 4:1, separate head
      {64, 2, 1, 96, true, Style::half, true, 2, 130, 0},         // the Hopper attention kernel
      {16, 2, 2, 40, false, Style::interleaved, false, 3, 65, 0},  // no GQA
      {8, 4, 2, 32, false, Style::none, true, 1, 1, 0},            // one token, no RoPE
      {8, 2, 1, 24, true, Style::half, true, 2, 130, 5},           // the config's own window
  };
  double worst_hidden = 0, worst_logits = 0;
  for (const Variant& v : variants) {
    model::Config c = test::random_config(rng);
    c.d_head = v.d_head, c.n_heads = v.n_heads, c.n_kv_heads = v.n_kv_heads, c.d_model = v.d_model;
    c.d_ff = 2 * v.d_model + 1 + int(rng.below(16));
    c.vocab_size = 50 + int(rng.below(200));
    c.qkv_bias = v.qkv_bias, c.tied_embeddings = v.tied;
    c.rope = {v.rope, 10000.0};
    c.sliding_window = v.window;
    const model::Weights<double> w = test::bf16_rounded(model::Weights<double>::random(c, rng));
    const std::vector<int> ids = test::random_ids(rng, v.batch * v.length, c.vocab_size);
    const Reference want = v.window ? cpu_reference(c, w, ids, v.batch, v.length, rng, SlidingWindow<>(v.window))
                                    : cpu_reference(c, w, ids, v.batch, v.length, rng, Softmax{});

    cm::DeviceDecoder decoder(c, w, v.batch * v.length + 3, v.length + 1);
    const auto ids_device = device_ids(ids);
    poison_outputs(decoder);
    decoder.forward(ids_device.data(), v.batch, v.length, nullptr);
    decoder.check_tokens(nullptr);
    const double hidden = test::relative_l2(decoder.hidden_to_host(nullptr), want.hidden);
    const double logits = test::relative_l2(decoder.logits_to_host(0, v.batch * v.length, nullptr), want.logits);
    INFO("d_head ", v.d_head, " heads ", v.n_heads, "/", v.n_kv_heads, " d ", c.d_model, " d_ff ", c.d_ff,
         " layers ", c.n_layers, " bias ", v.qkv_bias, " rope ", int(v.rope), " tied ", v.tied, " B ", v.batch, " T ",
         v.length, " window ", v.window);
    CHECK(hidden <= decoder_tolerance);
    CHECK(logits <= decoder_tolerance);
    worst_hidden = std::max(worst_hidden, hidden);
    worst_logits = std::max(worst_logits, logits);
  }
  MESSAGE("decoder worst relative L2: hidden ", worst_hidden, ", logits ", worst_logits);
}

TEST_CASE("decoder on stories260K: NLL of the first 300 predicted tokens of the first story is 1.3106 ± 0.01") {
  if (!test::gpu_available()) return;
  const auto dir = test::fixtures();
  const auto checkpoint = dir / "stories260K" / "stories260K.bin";
  const auto ids_file = dir / "tokenizer" / "stories260K_first_story_ids.json";
  if (!std::filesystem::exists(checkpoint) || !std::filesystem::exists(ids_file)) {
    MESSAGE("stories260K fixtures not found under ", dir.string(), " (set DASH_FIXTURES): skipping");
    return;
  }
  io::Checkpoint ckpt = io::read_llama2c(checkpoint);
  // The ids the CPU test's tokenizer produces, BOS first (tokenizer test fixture).
  std::vector<int> ids;
  {
    std::ifstream in(ids_file);
    std::stringstream text;
    text << in.rdbuf();
    const std::string json = text.str();
    std::size_t at = json.find('[', json.find("\"ids\""));
    REQUIRE(at != std::string::npos);
    const char* p = json.c_str() + at + 1;
    for (char* end = nullptr;; p = end) {
      const long id = std::strtol(p, &end, 10);
      if (end == p) break;
      ids.push_back(int(id));
      while (*end == ',' || *end == ' ' || *end == '\n') ++end;
    }
  }
  REQUIRE(ids.size() >= 301);
  ids.resize(301);
  std::vector<int> targets(ids.begin() + 1, ids.end());
  targets.push_back(-1);
  const index_t T = index_t(ids.size());

  cm::DeviceDecoder decoder(ckpt.config, ckpt.weights, T, T);
  const auto ids_device = device_ids(ids), targets_device = device_ids(targets);
  poison_outputs(decoder);
  decoder.nll(ids_device.data(), targets_device.data(), 1, T, nullptr);
  decoder.check_tokens(nullptr);
  const cm::NllValue gpu = decoder.nll_to_host(nullptr);

  // The CPU decoder in float64 on the same bf16 weights: what the GPU computes, without the
  // activations' rounding.
  const model::Weights<double> w = test::bf16_rounded(ckpt.weights);
  Rng rng(0);
  const Reference want = cpu_reference(ckpt.config, w, ids, 1, T, rng, Softmax{});
  const model::LossValue cpu = model::nll_loss<double>(w.head().view(), want.hidden.view(), targets);
  const double hidden = test::relative_l2(decoder.hidden_to_host(nullptr), want.hidden);
  MESSAGE("stories260K NLL over ", gpu.count, " tokens: GPU ", gpu.mean, ", CPU float64 on bf16 weights ", cpu.mean(),
          " (float32 weights: 1.3106); hidden relative L2 ", hidden);
  CHECK(gpu.count == 300);
  CHECK(std::abs(gpu.sum / 300 - gpu.mean) <= 1e-5 * gpu.mean);
  CHECK(std::abs(gpu.mean - 1.3106) <= 0.01);
  CHECK(std::abs(gpu.mean - cpu.mean()) <= 0.01);
  CHECK(hidden <= decoder_tolerance);
}

TEST_CASE("decoder refuses bad batches before any launch and reports out-of-range ids and targets") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("decoder bad batches");
  model::Config c = test::random_config(rng);
  c.d_head = 8, c.d_model = 32, c.n_heads = 4, c.n_kv_heads = 2;
  const model::Weights<float> w = model::Weights<float>::random(c, rng);
  cm::DeviceDecoder decoder(c, w, 20, 10);
  std::vector<int> ids(20, 1), targets(20, 2);
  ids[7] = c.vocab_size + 4, targets[3] = c.vocab_size;
  const auto ids_device = device_ids(ids), targets_device = device_ids(targets);
  const int* good = ids_device.data();
  using test::contains;
  using test::error_of;
  CHECK(contains(error_of([&] { decoder.forward(good, 1, 11, nullptr); }), "length T = 11, expected 1 ... max_length = 10"));
  CHECK(contains(error_of([&] { decoder.forward(good, 3, 10, nullptr); }), "exceeds max_tokens = 20"));
  CHECK(contains(error_of([&] { decoder.forward(good, 0, 5, nullptr); }), "batch = 0"));
  CHECK(contains(error_of([&] { decoder.forward(nullptr, 1, 5, nullptr); }), "ids is null"));
  CHECK(contains(error_of([&] { decoder.nll(good, nullptr, 1, 5, nullptr); }), "targets is null"));
  CHECK(contains(error_of([&] { (void)decoder.logits_to_host(0, 1, nullptr); }), "not within the last forward's 0"));

  decoder.forward(good, 2, 10, nullptr);
  CHECK(contains(error_of([&] { decoder.check_tokens(nullptr); }), "id " + std::to_string(c.vocab_size + 4) +
                                                                    " at position 7"));
  ids[7] = 0;
  const auto clean_ids = device_ids(ids);
  decoder.nll(clean_ids.data(), targets_device.data(), 2, 10, nullptr);
  CHECK(contains(error_of([&] { decoder.check_tokens(nullptr); }), "target " + std::to_string(c.vocab_size) +
                                                                    " at position 3"));
  CHECK(decoder.nll_to_host(nullptr).count == 19);
}

TEST_CASE("decoder construction refuses bad sizes and weights without touching a device") {
  Rng rng = test::rng_for("decoder bad construction");
  model::Config c = test::random_config(rng);
  const model::Weights<float> w = model::Weights<float>::random(c, rng);
  using test::contains;
  using test::error_of;
  CHECK(contains(error_of([&] { const cm::DeviceDecoder d(c, w, 8, 0); }), "max_length = 0"));
  CHECK(contains(error_of([&] { const cm::DeviceDecoder d(c, w, 4, 8); }), "max_tokens = 4, expected at least max_length = 8"));
  model::Config other = c;
  other.n_layers = c.n_layers + 1;
  CHECK(contains(error_of([&] { const cm::DeviceDecoder d(other, w, 8, 8); }), "layers, config says"));
  model::Config wide = c;
  wide.d_head = 130, wide.n_heads = wide.n_kv_heads = 1;
  const model::Weights<float> wide_weights = model::Weights<float>::random(wide, rng);
  CHECK(contains(error_of([&] { const cm::DeviceDecoder d(wide, wide_weights, 8, 8); }), "d_head = 130, expected at most 128"));
}

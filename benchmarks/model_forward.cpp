// CPU reference, forward of whole models to the final hidden states plus the LM head's logits,
// float32, one sequence. SmolLM2-135M-Instruct from models/ (installed by cmake/setup.sh; the
// benchmark reports an error when it is absent) and stories260K from the test fixtures.
// Reports tokens/s.
#include <benchmark/benchmark.h>

#include <filesystem>
#include <optional>

#include "dash/io/gguf.hpp"
#include "dash/io/llama2c.hpp"
#include "dash/mixed_attention.hpp"
#include "dash/model/decoder.hpp"
#include "dash/model/loss.hpp"
#include "dash/ops/softmax.hpp"

namespace {

using namespace dash;
using Model = model::Decoder<float, MixedAttention<Softmax>>;

std::optional<Model> load(const std::filesystem::path& path, bool gguf) {
  if (!std::filesystem::exists(path)) return std::nullopt;
  io::Checkpoint c = gguf ? io::read_gguf(path) : io::read_llama2c(path);
  Rng rng(0);
  return Model(c.config, std::move(c.weights), [&](int, const AttentionShape& s, AttentionWeights<float> w) {
    return MixedAttention<Softmax>(s, std::move(w), rng);
  });
}

void forward(benchmark::State& state, const std::optional<Model>& model, const char* what) {
  if (!model) {
    state.SkipWithError(what);
    return;
  }
  const index_t T = state.range(0), V = model->config().vocab_size;
  std::vector<int> ids(static_cast<std::size_t>(T));
  for (index_t t = 0; t < T; ++t) ids[std::size_t(t)] = int((t * 7919) % V);
  Tensor<float> logits(Shape{T, V});
  for (auto _ : state) {
    Model::Activations act;
    model->forward({ids, 1, T}, act);
    model::logits<float>(model->weights().head().view(), act.hidden.view(), logits.view());
    benchmark::DoNotOptimize(logits.data());
  }
  state.counters["tokens/s"] = benchmark::Counter(double(T), benchmark::Counter::kIsIterationInvariantRate);
}

void smollm2(benchmark::State& state) {
  static const std::optional<Model> model = load(DASH_SOURCE_DIR "/models/SmolLM2-135M-Instruct.Q4_1.gguf", true);
  forward(state, model, "models/SmolLM2-135M-Instruct.Q4_1.gguf not installed (bash cmake/setup.sh)");
}
void stories260k(benchmark::State& state) {
  static const std::optional<Model> model = load(DASH_SOURCE_DIR "/tests/fixtures/stories260K/stories260K.bin", false);
  forward(state, model, "tests/fixtures/stories260K/stories260K.bin missing");
}

}  // namespace

BENCHMARK(smollm2)->Name("forward/SmolLM2-135M")->Arg(256)->Unit(benchmark::kMillisecond);
BENCHMARK(stories260k)->Name("forward/stories260K")->Arg(256)->Unit(benchmark::kMillisecond);
BENCHMARK_MAIN();

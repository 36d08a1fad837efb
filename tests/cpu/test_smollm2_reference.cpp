// SmolLM2-135M-Instruct read from its GGUF against Hugging Face transformers reading the same
// GGUF (float32, CPU, eager attention), on four windows of 256 tokens of State of the Union
// addresses. The fixture (scripts/smollm2_logits_reference.py) keeps, per position, the
// log-sum-exp over the vocabulary, the argmax and the logits at 128 entries (the reference's
// top 32 and 96 at random).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "dash/io/gguf.hpp"
#include "dash/io/safetensors.hpp"
#include "dash/mixed_attention.hpp"
#include "dash/model/decoder.hpp"
#include "dash/model/loss.hpp"
#include "dash/ops/softmax.hpp"
#include "support/models.hpp"

using namespace dash;

TEST_CASE("SmolLM2 logits from the GGUF match transformers on the same GGUF") {
  const auto gguf = test::smollm2_gguf();
  if (!gguf) {
    MESSAGE("SmolLM2 GGUF not installed (bash cmake/setup.sh installs it): comparison not run");
    return;
  }
  const io::safetensors::File ref = io::safetensors::File::open(test::fixtures() / "smollm2" / "logits_reference.safetensors");
  const Tensor<float> ids = ref.read("ids"), lse = ref.read("logsumexp"), argmax = ref.read("argmax");
  const Tensor<float> index = ref.read("index"), values = ref.read("values");
  const index_t windows = ids.dim(0), length = ids.dim(1), sampled = index.dim(2);

  io::Checkpoint ckpt = io::read_gguf(*gguf);
  Rng rng(0);
  const model::Decoder<float, MixedAttention<Softmax>> decoder(
      ckpt.config, std::move(ckpt.weights),
      [&](int, const AttentionShape& s, AttentionWeights<float> w) { return MixedAttention<Softmax>(s, std::move(w), rng); });
  const index_t V = decoder.config().vocab_size;

  double abs_sum = 0, abs_max = 0, lse_max = 0;
  index_t compared = 0, same_argmax = 0;
  for (index_t b = 0; b < windows; ++b) {
    std::vector<int> tokens(static_cast<std::size_t>(length));
    for (index_t t = 0; t < length; ++t) tokens[std::size_t(t)] = int(ids(b, t));
    decltype(decoder)::Activations act;
    decoder.forward({tokens, 1, length}, act);
    Tensor<float> z(Shape{length, V});
    model::logits<float>(decoder.weights().head().view(), act.hidden.view(), z.view());
    for (index_t t = 0; t < length; ++t) {
      const float* row = &z(t, 0);
      const float* top = std::max_element(row, row + V);
      same_argmax += index_t(top - row) == index_t(argmax(b, t));
      double s = 0;
      for (index_t v = 0; v < V; ++v) s += std::exp(double(row[v]) - double(*top));
      lse_max = std::max(lse_max, std::abs(double(*top) + std::log(s) - double(lse(b, t))));
      for (index_t i = 0; i < sampled; ++i) {
        const double diff = std::abs(double(row[index_t(index(b, t, i))]) - double(values(b, t, i)));
        abs_sum += diff, abs_max = std::max(abs_max, diff), ++compared;
      }
    }
  }
  const double agreement = double(same_argmax) / double(windows * length);
  MESSAGE("SmolLM2 vs transformers: mean |Δlogit| ", abs_sum / double(compared), ", max ", abs_max, " over ", compared,
          " logits; max |Δ log-sum-exp| ", lse_max, "; argmax agreement ", same_argmax, "/", windows * length);
  CHECK(abs_sum / double(compared) <= 1e-3);
  CHECK(abs_max <= 1e-2);
  CHECK(lse_max <= 1e-2);
  CHECK(agreement >= 0.999);
}

// stories260K end to end: llama2.c checkpoint + tokenizer.bin through dash::io, the decoder
// and the NLL, against an independent implementation's figure.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>

#include "dash/io/load.hpp"
#include "dash/io/text.hpp"
#include "dash/mixed_attention.hpp"
#include "dash/model/decoder.hpp"
#include "dash/model/loss.hpp"
#include "dash/ops/softmax.hpp"
#include "support/models.hpp"

using namespace dash;

namespace {

using Model = model::Decoder<float, MixedAttention<Softmax>>;

struct Stories {
  io::LoadedModel loaded;
  Model model;
};

Stories load() {
  const auto dir = test::fixtures() / "stories260K";
  io::LoadedModel loaded = io::load_model(dir / "stories260K.bin", dir / "tok512.bin");
  io::Checkpoint ckpt = std::move(loaded.checkpoint);
  Rng rng(0);
  Model model(ckpt.config, std::move(ckpt.weights), [&](int, const AttentionShape& s, AttentionWeights<float> w) {
    return MixedAttention<Softmax>(s, std::move(w), rng);
  });
  return {std::move(loaded), std::move(model)};
}

// The first story of the TinyStories sample: the text before the first <|endoftext|>, trimmed.
std::string first_story() { return io::read_documents(test::fixtures() / "text" / "tinystories_sample.txt").at(0); }

}  // namespace

TEST_CASE("stories260K: mean NLL of the first 300 predicted tokens of the first story is 1.311 ± 0.005") {
  const Stories s = load();
  REQUIRE(s.loaded.add_bos);
  std::vector<int> ids = s.loaded.tokenizer->encode(first_story(), /*add_bos=*/true);
  REQUIRE(ids.size() >= 301);
  ids.resize(301);
  Model::Activations act;
  s.model.forward({ids, 1, index_t(ids.size())}, act);
  std::vector<int> targets(ids.begin() + 1, ids.end());
  targets.push_back(-1);
  const model::LossValue nll = model::nll_loss<float>(s.model.weights().head().view(), act.hidden.view(), targets);
  MESSAGE("stories260K NLL over ", nll.count, " tokens: ", nll.mean());
  CHECK(nll.count == 300);
  CHECK(std::abs(nll.mean() - 1.311) <= 0.005);
}

TEST_CASE("stories260K: greedy generation from BOS opens a story") {
  const Stories s = load();
  std::vector<int> ids{s.loaded.tokenizer->bos()};
  for (int i = 0; i < 12; ++i) {
    Model::Activations act;
    s.model.forward({ids, 1, index_t(ids.size())}, act);
    Tensor<float> z(Shape{index_t(ids.size()), s.model.config().vocab_size});
    model::logits<float>(s.model.weights().head().view(), act.hidden.view(), z.view());
    const float* last = &z(index_t(ids.size()) - 1, 0);
    ids.push_back(int(std::max_element(last, last + z.dim(1)) - last));
  }
  const std::string text = s.loaded.tokenizer->decode(ids);
  MESSAGE("stories260K from BOS: ", text);
  CHECK(text.rfind("Once upon a time", 0) == 0);
}

// Uses the installed headers through find_package(dash): a tiny mixed layer (dash::dash) and a
// tiny byte-level BPE tokenizer (dash::io, which brings PCRE2 and nlohmann-json along).
#include <dash/io/tokenizer.hpp>
#include <dash/search.hpp>

#include <cstdio>

int main() {
  dash::Rng rng(1);
  const dash::AttentionShape shape{.d_model = 16, .n_heads = 2, .n_kv_heads = 1, .d_head = 8};
  dash::MixedAttention<dash::Softmax> layer(shape, dash::AttentionWeights<float>::random(shape, rng), rng);
  dash::Tensor<float> h(dash::Shape{1, 5, 16}), y(h.shape());
  dash::fill_normal(h.view(), rng);
  decltype(layer)::Cache cache;
  layer.forward(h.view(), y.view(), cache);
  dash::require_finite(y.view(), "y");

  dash::io::ByteLevelBpeSpec spec;
  spec.tokens = {"h", "i", "hi"};
  spec.merges = {"h i"};
  const auto tokenizer = dash::io::Tokenizer::byte_level_bpe(spec, "consumer");
  const auto ids = tokenizer.encode("hi", false);
  dash::require(ids.size() == 1 && ids[0] == 2, "consumer: \"hi\" should be one token");
  std::printf("dash %s consumer: ok\n", "0.1.0");
  return 0;
}

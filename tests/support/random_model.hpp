// Small random Llama-family decoders for tests: shapes drawn from the test's generator.
#pragma once

#include <vector>

#include "dash/core/rng.hpp"
#include "dash/mixed_attention.hpp"
#include "dash/model/config.hpp"
#include "dash/model/decoder.hpp"

namespace dash::test {

model::Config random_config(Rng& rng) {
  model::Config c;
  c.n_layers = 1 + int(rng.below(3));
  c.n_kv_heads = 1 + int(rng.below(2));
  c.n_heads = c.n_kv_heads * (1 + int(rng.below(2)));
  c.d_head = 4;
  c.d_model = 8 + 4 * int(rng.below(2));
  c.d_ff = 12 + int(rng.below(5));
  c.vocab_size = 11 + int(rng.below(20));
  c.context_length = 256;
  c.rms_eps = 1e-5;
  c.rope = {rng.below(2) ? RopeConfig::Style::half : RopeConfig::Style::interleaved, 100.0};
  c.qkv_bias = rng.below(2) == 1;
  c.tied_embeddings = rng.below(2) == 1;
  return c;
}

std::vector<int> random_ids(Rng& rng, index_t n, int vocab) {
  std::vector<int> ids(static_cast<std::size_t>(n));
  for (int& t : ids) t = int(rng.below(std::uint64_t(vocab)));
  return ids;
}

template <class T, class... Ops>
using MixedDecoder = model::Decoder<T, BasicMixedAttention<T, Ops...>>;

template <class T, class... Ops>
MixedDecoder<T, Ops...> make_decoder(const model::Config& c, model::Weights<T> w, Rng& rng, Ops... ops) {
  return MixedDecoder<T, Ops...>(c, std::move(w), [&](int, const AttentionShape& s, AttentionWeights<T> a) {
    return BasicMixedAttention<T, Ops...>(s, std::move(a), rng, ops...);
  });
}

}  // namespace dash::test

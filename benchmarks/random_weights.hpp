// Random weights for speed measurements (speed does not depend on the values): every matrix
// uniform with the variance of a standard initialisation, norms at 1, from a fixed seed.
#pragma once

#include <cmath>
#include <cstdint>
#include <utility>

#include "dash/core/tensor.hpp"
#include "dash/model/config.hpp"
#include "dash/model/weights.hpp"

namespace dash::bench {

// Uniform values of standard deviation `std` from a 64-bit LCG: fast enough for billions.
struct FastRandom {
  std::uint64_t state;
  Tensor<float> make(Shape s, double std) {
    Tensor<float> t(s);
    const float half_width = float(std * std::sqrt(3.0));
    for (index_t i = 0; i < t.numel(); ++i) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      t.data()[i] = (float(state >> 40) * 0x1.0p-24f * 2.0f - 1.0f) * half_width;
    }
    return t;
  }
};

inline model::Weights<float> random_weights(const model::Config& c) {
  FastRandom r{0x9e3779b97f4a7c15ull};
  const double in = 1 / std::sqrt(double(c.d_model)), ff = 1 / std::sqrt(double(c.d_ff));
  const AttentionShape s = c.attention();
  model::Weights<float> w;
  w.embedding = r.make(Shape{c.vocab_size, c.d_model}, 1.0);
  for (int l = 0; l < c.n_layers; ++l) {
    model::LayerWeights<float> layer;
    layer.attn_norm = Tensor<float>(Shape{c.d_model}, 1.0f);
    layer.mlp_norm = Tensor<float>(Shape{c.d_model}, 1.0f);
    layer.attention.wq = r.make(Shape{s.q_dim(), s.d_model}, in);
    layer.attention.wk = r.make(Shape{s.kv_dim(), s.d_model}, in);
    layer.attention.wv = r.make(Shape{s.kv_dim(), s.d_model}, in);
    layer.attention.wo = r.make(Shape{s.d_model, s.q_dim()}, 1 / std::sqrt(double(s.q_dim())));
    if (c.qkv_bias) {
      layer.attention.bq = r.make(Shape{s.q_dim()}, 0.02);
      layer.attention.bk = r.make(Shape{s.kv_dim()}, 0.02);
      layer.attention.bv = r.make(Shape{s.kv_dim()}, 0.02);
    }
    layer.w_gate = r.make(Shape{c.d_ff, c.d_model}, in);
    layer.w_up = r.make(Shape{c.d_ff, c.d_model}, in);
    layer.w_down = r.make(Shape{c.d_model, c.d_ff}, ff);
    w.layers.push_back(std::move(layer));
  }
  w.final_norm = Tensor<float>(Shape{c.d_model}, 1.0f);
  if (!c.tied_embeddings) w.lm_head = r.make(Shape{c.vocab_size, c.d_model}, in);
  return w;
}

}  // namespace dash::bench

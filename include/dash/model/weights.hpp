// The weights of a Llama-family decoder, stored [out, in] as checkpoints store them.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "dash/core/rng.hpp"
#include "dash/core/tensor.hpp"
#include "dash/model/config.hpp"
#include "dash/ops/attention.hpp"

namespace dash::model {

template <class T>
struct LayerWeights {
  Tensor<T> attn_norm;            // [d_model]
  AttentionWeights<T> attention;  // teacher projections; see ops/attention.hpp
  Tensor<T> mlp_norm;             // [d_model]
  Tensor<T> w_gate;               // [d_ff, d_model]
  Tensor<T> w_up;                 // [d_ff, d_model]
  Tensor<T> w_down;               // [d_model, d_ff]

  // Every tensor with its checkpoint-neutral name ("attn_norm", "wq", ..., "w_down").
  template <class F>
  void for_each(F&& f) {
    f("attn_norm", attn_norm);
    attention.for_each(f);
    f("mlp_norm", mlp_norm), f("w_gate", w_gate), f("w_up", w_up), f("w_down", w_down);
  }
};

template <class T>
struct Weights {
  Tensor<T> embedding;  // [vocab_size, d_model]
  std::vector<LayerWeights<T>> layers;
  Tensor<T> final_norm;  // [d_model]
  Tensor<T> lm_head;     // [vocab_size, d_model]; empty when config.tied_embeddings

  // The LM head actually used: the embedding when tied.
  const Tensor<T>& head() const { return lm_head.empty() ? embedding : lm_head; }

  // Every tensor with a name like "layers.3.wq", "embedding", "final_norm", "lm_head".
  template <class F>
  void for_each(F&& f) {
    f(std::string("embedding"), embedding);
    for (std::size_t l = 0; l < layers.size(); ++l)
      layers[l].for_each([&](const char* name, Tensor<T>& t) { f("layers." + std::to_string(l) + "." + name, t); });
    f(std::string("final_norm"), final_norm);
    if (!lm_head.empty()) f(std::string("lm_head"), lm_head);
  }

  std::size_t parameter_count() const {
    std::size_t n = 0;
    const_cast<Weights*>(this)->for_each([&](const std::string&, Tensor<T>& t) { n += std::size_t(t.numel()); });
    return n;
  }

  // Weights with the scale of a trained model (std 1/sqrt(fan_in), norms near 1), for tests
  // and for speed work, where the values do not matter.
  static Weights random(const Config& c, Rng& rng) {
    c.validate();
    const auto normal = [&](Shape s, double std) {
      Tensor<T> t(s);
      fill_normal(t.view(), rng, 0.0, std);
      return t;
    };
    const auto norm_gain = [&] {
      Tensor<T> g(Shape{c.d_model});
      fill_uniform(g.view(), rng, 0.8, 1.2);
      return g;
    };
    const double in = 1 / std::sqrt(double(c.d_model)), ff = 1 / std::sqrt(double(c.d_ff));
    Weights w;
    w.embedding = normal(Shape{c.vocab_size, c.d_model}, 1.0);
    for (int l = 0; l < c.n_layers; ++l) {
      LayerWeights<T> layer;
      layer.attn_norm = norm_gain();
      layer.attention = AttentionWeights<T>::random(c.attention(), rng);
      layer.mlp_norm = norm_gain();
      layer.w_gate = normal(Shape{c.d_ff, c.d_model}, in);
      layer.w_up = normal(Shape{c.d_ff, c.d_model}, in);
      layer.w_down = normal(Shape{c.d_model, c.d_ff}, ff);
      w.layers.push_back(std::move(layer));
    }
    w.final_norm = norm_gain();
    if (!c.tied_embeddings) w.lm_head = normal(Shape{c.vocab_size, c.d_model}, in);
    return w;
  }

  // Every tensor has the shape the config implies; the message names the tensor.
  void validate(const Config& c) const {
    c.validate();
    require(int(layers.size()) == c.n_layers, "model weights: ", layers.size(), " layers, config says ", c.n_layers);
    require_shape(embedding.view(), Shape{c.vocab_size, c.d_model}, "embedding");
    require_shape(final_norm.view(), Shape{c.d_model}, "final_norm");
    if (c.tied_embeddings)
      require(lm_head.empty(), "model weights: lm_head given but the config says the head is tied to the embedding");
    else
      require_shape(lm_head.view(), Shape{c.vocab_size, c.d_model}, "lm_head");
    const AttentionShape s = c.attention();
    for (int l = 0; l < c.n_layers; ++l) {
      const auto name = [&](const char* t) { return "layers." + std::to_string(l) + "." + t; };
      const LayerWeights<T>& w = layers[std::size_t(l)];
      require_shape(w.attn_norm.view(), Shape{c.d_model}, name("attn_norm"));
      try {
        w.attention.validate(s);
      } catch (const Error& e) {
        fail("layer ", l, ": ", e.what());
      }
      require_shape(w.mlp_norm.view(), Shape{c.d_model}, name("mlp_norm"));
      require_shape(w.w_gate.view(), Shape{c.d_ff, c.d_model}, name("w_gate"));
      require_shape(w.w_up.view(), Shape{c.d_ff, c.d_model}, name("w_up"));
      require_shape(w.w_down.view(), Shape{c.d_model, c.d_ff}, name("w_down"));
    }
  }
};

}  // namespace dash::model

// What every token mixer shares: the shape of the teacher's attention layer, its RoPE
// convention, and its projection weights.
#pragma once

#include <cstdint>
#include <string>

#include "dash/core/error.hpp"
#include "dash/core/rng.hpp"
#include "dash/core/tensor.hpp"

namespace dash {

struct RopeConfig {
  // interleaved: rotate pairs (x[2i], x[2i+1]) as llama2.c and GGUF do;
  // half: rotate pairs (x[i], x[i + D/2]) as Hugging Face does.
  enum class Style : std::uint8_t { none, interleaved, half };
  Style style = Style::half;
  double theta = 10000.0;
};

struct AttentionShape {
  int d_model = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int d_head = 0;
  bool qkv_bias = false;
  RopeConfig rope{};

  int group() const { return n_heads / n_kv_heads; }
  int q_dim() const { return n_heads * d_head; }
  int kv_dim() const { return n_kv_heads * d_head; }

  void validate() const {
    require(d_model > 0, "AttentionShape: d_model = ", d_model, ", expected > 0");
    require(n_heads > 0, "AttentionShape: n_heads = ", n_heads, ", expected > 0");
    require(n_kv_heads > 0, "AttentionShape: n_kv_heads = ", n_kv_heads, ", expected > 0");
    require(n_heads % n_kv_heads == 0, "AttentionShape: n_heads = ", n_heads,
            " is not a multiple of n_kv_heads = ", n_kv_heads);
    require(d_head > 0, "AttentionShape: d_head = ", d_head, ", expected > 0");
    require(rope.style == RopeConfig::Style::none || d_head % 2 == 0, "AttentionShape: d_head = ", d_head,
            " must be even for RoPE");
    require(rope.style == RopeConfig::Style::none || rope.theta > 0, "AttentionShape: rope.theta = ",
            rope.theta, ", expected > 0");
  }
};

// The teacher's projections, stored [out, in] as checkpoints store them.
template <class T>
struct AttentionWeights {
  Tensor<T> wq;  // [n_heads·d_head, d_model]
  Tensor<T> wk;  // [n_kv_heads·d_head, d_model]
  Tensor<T> wv;  // [n_kv_heads·d_head, d_model]
  Tensor<T> wo;  // [d_model, n_heads·d_head]
  Tensor<T> bq;  // [n_heads·d_head] when shape.qkv_bias, else empty
  Tensor<T> bk;  // [n_kv_heads·d_head] when shape.qkv_bias, else empty
  Tensor<T> bv;  // [n_kv_heads·d_head] when shape.qkv_bias, else empty

  template <class F>
  void for_each(F&& f) {
    f("wq", wq), f("wk", wk), f("wv", wv), f("wo", wo);
    if (!bq.empty()) f("bq", bq), f("bk", bk), f("bv", bv);
  }

  void validate(const AttentionShape& s) const {
    s.validate();
    require_shape(wq.view(), Shape{s.q_dim(), s.d_model}, "AttentionWeights.wq");
    require_shape(wk.view(), Shape{s.kv_dim(), s.d_model}, "AttentionWeights.wk");
    require_shape(wv.view(), Shape{s.kv_dim(), s.d_model}, "AttentionWeights.wv");
    require_shape(wo.view(), Shape{s.d_model, s.q_dim()}, "AttentionWeights.wo");
    if (s.qkv_bias) {
      require_shape(bq.view(), Shape{s.q_dim()}, "AttentionWeights.bq");
      require_shape(bk.view(), Shape{s.kv_dim()}, "AttentionWeights.bk");
      require_shape(bv.view(), Shape{s.kv_dim()}, "AttentionWeights.bv");
    } else {
      require(bq.empty() && bk.empty() && bv.empty(),
              "AttentionWeights: biases given but shape.qkv_bias is false");
    }
  }

  // Weights with the scale of a trained layer (std 1/sqrt(fan_in)), for tests and benchmarks.
  static AttentionWeights zeros(const AttentionShape& s) {
    s.validate();
    AttentionWeights w;
    w.wq = Tensor<T>(Shape{s.q_dim(), s.d_model}, T(0));
    w.wk = Tensor<T>(Shape{s.kv_dim(), s.d_model}, T(0));
    w.wv = Tensor<T>(Shape{s.kv_dim(), s.d_model}, T(0));
    w.wo = Tensor<T>(Shape{s.d_model, s.q_dim()}, T(0));
    if (s.qkv_bias) {
      w.bq = Tensor<T>(Shape{s.q_dim()}, T(0));
      w.bk = Tensor<T>(Shape{s.kv_dim()}, T(0));
      w.bv = Tensor<T>(Shape{s.kv_dim()}, T(0));
    }
    return w;
  }
  static AttentionWeights random(const AttentionShape& s, Rng& rng) {
    AttentionWeights w = zeros(s);
    fill_normal(w.wq.view(), rng, 0.0, 1.0 / std::sqrt(double(s.d_model)));
    fill_normal(w.wk.view(), rng, 0.0, 1.0 / std::sqrt(double(s.d_model)));
    fill_normal(w.wv.view(), rng, 0.0, 1.0 / std::sqrt(double(s.d_model)));
    fill_normal(w.wo.view(), rng, 0.0, 1.0 / std::sqrt(double(s.q_dim())));
    if (s.qkv_bias) {
      fill_normal(w.bq.view(), rng, 0.0, 0.1);
      fill_normal(w.bk.view(), rng, 0.0, 0.1);
      fill_normal(w.bv.view(), rng, 0.0, 0.1);
    }
    return w;
  }
};

}  // namespace dash

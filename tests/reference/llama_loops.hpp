// A Llama-family decoder as plain loops in double, written from the math and nothing else:
// token embedding, per layer RMSNorm → causal GQA attention with RoPE (own rotation code) →
// residual → RMSNorm → SwiGLU → residual, final RMSNorm, LM head. Returns logits [B·T, V].
#pragma once

#include <cmath>
#include <vector>

#include "dash/model/config.hpp"
#include "dash/model/weights.hpp"
#include "reference/softmax_loops.hpp"

namespace dash::reference {

template <class T>
std::vector<double> llama_logits_loops(const model::Config& c, const model::Weights<T>& w,
                                       const std::vector<int>& ids, index_t batch, index_t length) {
  const index_t d = c.d_model, H = c.n_heads, Hkv = c.n_kv_heads, D = c.d_head, F = c.d_ff, V = c.vocab_size;
  const index_t n = batch * length;
  using Rows = std::vector<std::vector<double>>;
  Rows x(static_cast<std::size_t>(n), std::vector<double>(static_cast<std::size_t>(d)));
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < d; ++j) x[i][j] = double(w.embedding(index_t(ids[std::size_t(i)]), j));
  const auto norm = [&](const std::vector<double>& v, const Tensor<T>& g) {
    double ms = 0;
    for (double e : v) ms += e * e;
    const double r = 1 / std::sqrt(ms / double(d) + c.rms_eps);
    std::vector<double> out(v.size());
    for (index_t j = 0; j < d; ++j) out[j] = v[j] * r * double(g(j));
    return out;
  };
  const auto matvec = [](const Tensor<T>& m, const std::vector<double>& v) {
    std::vector<double> out(std::size_t(m.dim(0)), 0.0);
    for (index_t o = 0; o < m.dim(0); ++o)
      for (index_t i = 0; i < m.dim(1); ++i) out[o] += double(m(o, i)) * v[i];
    return out;
  };
  // Rotation of pair p at position t, written independently of dash::RopeTable.
  const auto rotate = [&](double* head, index_t t) {
    if (c.rope.style == RopeConfig::Style::none) return;
    for (index_t p = 0; p < D / 2; ++p) {
      const double angle = double(t) / std::pow(c.rope.theta, double(2 * p) / double(D));
      const bool inter = c.rope.style == RopeConfig::Style::interleaved;
      double& a = head[inter ? 2 * p : p];
      double& b = head[inter ? 2 * p + 1 : p + D / 2];
      const double na = a * std::cos(angle) - b * std::sin(angle), nb = a * std::sin(angle) + b * std::cos(angle);
      a = na, b = nb;
    }
  };
  for (const auto& layer : w.layers) {
    Tensor<double> q(Shape{batch, length, H, D}), k(Shape{batch, length, Hkv, D}), v(Shape{batch, length, Hkv, D});
    for (index_t i = 0; i < n; ++i) {
      const auto h = norm(x[i], layer.attn_norm);
      auto qi = matvec(layer.attention.wq, h), ki = matvec(layer.attention.wk, h), vi = matvec(layer.attention.wv, h);
      if (c.qkv_bias) {
        for (index_t j = 0; j < H * D; ++j) qi[j] += double(layer.attention.bq(j));
        for (index_t j = 0; j < Hkv * D; ++j) ki[j] += double(layer.attention.bk(j)), vi[j] += double(layer.attention.bv(j));
      }
      const index_t b = i / length, t = i % length;
      for (index_t hh = 0; hh < H; ++hh) rotate(&qi[hh * D], t);
      for (index_t hh = 0; hh < Hkv; ++hh) rotate(&ki[hh * D], t);
      std::copy(qi.begin(), qi.end(), &q(b, t, 0, 0));
      std::copy(ki.begin(), ki.end(), &k(b, t, 0, 0));
      std::copy(vi.begin(), vi.end(), &v(b, t, 0, 0));
    }
    const Tensor<double> attn = softmax_attention_loops(q, k, v);
    for (index_t i = 0; i < n; ++i) {
      const std::vector<double> a(&attn(i / length, i % length, 0, 0), &attn(i / length, i % length, 0, 0) + H * D);
      const auto o = matvec(layer.attention.wo, a);
      for (index_t j = 0; j < d; ++j) x[i][j] += o[j];
      const auto h = norm(x[i], layer.mlp_norm);
      const auto g = matvec(layer.w_gate, h), u = matvec(layer.w_up, h);
      std::vector<double> m(static_cast<std::size_t>(F));
      for (index_t j = 0; j < F; ++j) m[j] = g[j] / (1 + std::exp(-g[j])) * u[j];
      const auto down = matvec(layer.w_down, m);
      for (index_t j = 0; j < d; ++j) x[i][j] += down[j];
    }
  }
  std::vector<double> logits(static_cast<std::size_t>(n * V));
  const Tensor<T>& head = w.head();
  for (index_t i = 0; i < n; ++i) {
    const auto h = norm(x[i], w.final_norm);
    const auto z = matvec(head, h);
    std::copy(z.begin(), z.end(), logits.begin() + i * V);
  }
  return logits;
}

}  // namespace dash::reference

// Causal softmax attention as plain loops in double, the slow and obvious way: for every query,
// the scores of the keys it may see, their softmax, the weighted sum of values. Supports GQA,
// a sliding window and attention sinks. Forward only; the operators are tested against it.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "dash/core/tensor.hpp"

namespace dash::reference {

// q [B, T, H, D], k and v [B, T, Hkv, D]; query i sees key j iff j ≤ i and (i − j < window or
// j < sinks). The default window is unbounded: full causal attention.
template <class T>
Tensor<double> softmax_attention_loops(const Tensor<T>& q, const Tensor<T>& k, const Tensor<T>& v,
                                       index_t window = std::numeric_limits<index_t>::max(), index_t sinks = 0) {
  const index_t n_batch = q.dim(0), length = q.dim(1), n_heads = q.dim(2), d_head = q.dim(3);
  const index_t heads_per_kv = n_heads / k.dim(2);
  const double scale = 1.0 / std::sqrt(double(d_head));
  Tensor<double> out(q.shape(), 0.0);
  std::vector<double> weight(static_cast<std::size_t>(length));
  for (index_t b = 0; b < n_batch; ++b)
    for (index_t h = 0; h < n_heads; ++h) {
      const index_t g = h / heads_per_kv;
      for (index_t i = 0; i < length; ++i) {
        double largest = -std::numeric_limits<double>::infinity();
        for (index_t j = 0; j <= i; ++j) {
          const bool visible = i - j < window || j < sinks;
          if (!visible) continue;
          double score = 0;
          for (index_t d = 0; d < d_head; ++d) score += double(q(b, i, h, d)) * double(k(b, j, g, d));
          weight[j] = score * scale;
          largest = std::max(largest, weight[j]);
        }
        double total = 0;
        for (index_t j = 0; j <= i; ++j) {
          const bool visible = i - j < window || j < sinks;
          weight[j] = visible ? std::exp(weight[j] - largest) : 0.0;
          total += weight[j];
        }
        for (index_t j = 0; j <= i; ++j)
          for (index_t d = 0; d < d_head; ++d) out(b, i, h, d) += weight[j] / total * double(v(b, j, g, d));
      }
    }
  return out;
}

}  // namespace dash::reference

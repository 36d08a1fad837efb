// Softmax: causal softmax attention on the teacher's own Q, K, V (RoPE already applied).
//
// q [B, T, H, D], k and v [B, T, Hkv, D]; query head h reads kv head g = h / (H / Hkv) (GQA,
// without repeating k and v). For each batch and query head, query i and key j ≤ i:
//   s_ij = q_i·k_j / √D,   lse_i = log Σ_{j≤i} exp(s_ij),   p_ij = exp(s_ij − lse_i),
//   o_i  = Σ_{j≤i} p_ij v_j.
// Backward, given dO and D_i = dO_i·o_i (the only per-row statistic it needs besides lse):
//   dv_j += Σ_i p_ij dO_i,   ds_ij = p_ij (dO_i·v_j − D_i),
//   dq_i += Σ_j ds_ij k_j / √D,   dk_j += Σ_i ds_ij q_i / √D,
// with dk and dv of a kv head summed over its query group.
// Cost at context T: a KV cache of 2·Hkv·D·T elements; 4·H·D FLOPs per attended pair
// (2·D for q·k, 2·D for p·v), T(T + 1)/2 pairs.
//
// Dispatch: views on the host run the Eigen reference in softmax/eigen.hpp.
#pragma once

#include <algorithm>
#include <string_view>
#include <type_traits>

#include "dash/core/error.hpp"
#include "dash/core/tensor.hpp"
#include "dash/ops/operator.hpp"
#include "dash/ops/softmax/eigen.hpp"

namespace dash {

namespace detail {

// A [B, T, heads, D] tensor that the CPU kernels can read as strided row-major matrices.
template <class T>
void check_head_layout(TensorView<T> x, std::string_view what) {
  require_rank(x, 4, what);
  require_host(x, what);
  require(x.stride[3] == 1, what, ": stride ", x.stride[3], " along d_head, expected 1 (shape ", x.shape, ")");
}

template <class T>
void check_attention_inputs(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v) {
  check_head_layout(q, "q");
  check_head_layout(k, "k");
  check_head_layout(v, "v");
  const index_t n_batch = q.dim(0), length = q.dim(1), n_heads = q.dim(2), d_head = q.dim(3);
  const index_t n_kv_heads = k.dim(2);
  require(length > 0, "q: sequence length T = 0 (shape ", q.shape, "), expected at least one token");
  require(n_heads > 0, "q: n_heads = 0 (shape ", q.shape, "), expected at least one head");
  require(d_head > 0, "q: d_head = 0 (shape ", q.shape, "), expected at least 1");
  require(k.dim(0) == n_batch && k.dim(1) == length && k.dim(3) == d_head && n_kv_heads > 0, "k: shape ",
          k.shape, ", expected [", n_batch, ", ", length, ", n_kv_heads >= 1, ", d_head, "] to match q ", q.shape);
  require_shape(v, k.shape, "v");
  require(n_heads % n_kv_heads == 0, "q, k: n_heads = ", n_heads, " is not a multiple of n_kv_heads = ",
          n_kv_heads);
}

template <class T>
Shape lse_shape(TensorView<const T> q) {
  return Shape{q.dim(0), q.dim(2), q.dim(1)};
}

// Forward of Softmax and SlidingWindow: checks the inputs, then runs the kernel for `mask`.
template <class T>
void masked_softmax_forward(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v,
                            TensorView<T> out, Tensor<T>& lse, const AttentionMask& mask) {
  check_attention_inputs(q, k, v);
  check_head_layout(out, "out");
  require_shape(out, q.shape, "out");
  require_finite(q, "q");
  require_finite(k, "k");
  require_finite(v, "v");
  if (lse.shape() != lse_shape(q)) lse = Tensor<T>(lse_shape(q));
  eigen::masked_attention_forward(q, k, v, out, lse.view(), mask);
}

template <class T>
void masked_softmax_backward(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v,
                             TensorView<const T> out, const Tensor<T>& lse, TensorView<const T> d_out,
                             TensorView<T> dq, TensorView<T> dk, TensorView<T> dv, const AttentionMask& mask) {
  check_attention_inputs(q, k, v);
  check_head_layout(out, "out");
  require_shape(out, q.shape, "out");
  check_head_layout(d_out, "d_out");
  require_shape(d_out, q.shape, "d_out");
  check_head_layout(dq, "dq");
  require_shape(dq, q.shape, "dq");
  check_head_layout(dk, "dk");
  require_shape(dk, k.shape, "dk");
  check_head_layout(dv, "dv");
  require_shape(dv, k.shape, "dv");
  require(lse.shape() == lse_shape(q), "saved.lse: shape ", lse.shape(), ", expected [B, H, T] = ", lse_shape(q),
          "; pass the Saved that forward filled for these inputs");
  eigen::masked_attention_backward(q, k, v, out, lse.view(), d_out, dq, dk, dv, mask);
}

// KV bytes for the tokens the mask can still attend, FLOPs over the pairs it attends.
inline Cost masked_softmax_cost(const CostQuery& query, const AttentionMask& mask, double softmax_layers) {
  require(query.context >= 0, "CostQuery.context = ", query.context, ", expected >= 0");
  const AttentionShape& s = query.shape;
  const double cached_tokens =
      std::min(double(mask.window) + double(mask.sinks), double(query.context));
  return Cost{.kv_bytes = 2.0 * s.n_kv_heads * s.d_head * cached_tokens * query.kv_bytes_per_element,
              .flops = 4.0 * s.n_heads * s.d_head * mask.attended_pairs(query.context),
              .softmax_layers = softmax_layers};
}

}  // namespace detail

struct Softmax {
  static constexpr std::string_view name = "softmax";
  static constexpr bool shares_teacher_projections = true;

  template <class T>
  struct Saved {
    Tensor<T> lse;  // [B, H, T]: log Σ_j exp(s_ij) per query
  };

  // T is deduced from `saved` alone, so tensors and views of T or const T all convert.
  template <class T>
  void forward(std::type_identity_t<TensorView<const T>> q, std::type_identity_t<TensorView<const T>> k,
               std::type_identity_t<TensorView<const T>> v, std::type_identity_t<TensorView<T>> out,
               Saved<T>& saved) const {
    detail::masked_softmax_forward(q, k, v, out, saved.lse, detail::AttentionMask{});
  }

  // Adds into dq, dk and dv.
  template <class T>
  void backward(std::type_identity_t<TensorView<const T>> q, std::type_identity_t<TensorView<const T>> k,
                std::type_identity_t<TensorView<const T>> v, std::type_identity_t<TensorView<const T>> out,
                const Saved<T>& saved, std::type_identity_t<TensorView<const T>> d_out,
                std::type_identity_t<TensorView<T>> dq, std::type_identity_t<TensorView<T>> dk,
                std::type_identity_t<TensorView<T>> dv) const {
    detail::masked_softmax_backward(q, k, v, out, saved.lse, d_out, dq, dk, dv, detail::AttentionMask{});
  }

  Cost cost(const CostQuery& query) const {
    return detail::masked_softmax_cost(query, detail::AttentionMask{}, /*softmax_layers=*/1);
  }
};

}  // namespace dash

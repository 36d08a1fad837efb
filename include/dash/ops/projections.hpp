// The projections around a token mixer, with their backward:
//   q = h·Wqᵀ + bq,  k = h·Wkᵀ + bk,  v = h·Wvᵀ + bv   (h [B,T,d_model] → [B,T,heads,d_head])
//   y = a·Woᵀ                                         (a [B,T,n_heads,d_head] → [B,T,d_model])
// Used with the teacher's weights by MixedAttention and with an operator's own copy by the
// operators that train their projections (GatedLinear, GatedDeltaNet, user-defined ones).
#pragma once

#include "dash/core/tensor.hpp"
#include "dash/ops/attention.hpp"
#include "dash/ops/detail/linear.hpp"

namespace dash {

template <class T>
void project_qkv(const AttentionShape& s, const AttentionWeights<T>& w, TensorView<const T> h, TensorView<T> q,
                 TensorView<T> k, TensorView<T> v) {
  const index_t B = h.dim(0), T_ = h.dim(1);
  require_shape(h, Shape{B, T_, s.d_model}, "h");
  require_shape(q, Shape{B, T_, s.n_heads, s.d_head}, "q");
  require_shape(k, Shape{B, T_, s.n_kv_heads, s.d_head}, "k");
  require_shape(v, Shape{B, T_, s.n_kv_heads, s.d_head}, "v");
  detail::linear_forward<T>(h, w.wq.view(), w.bq.view(), q);
  detail::linear_forward<T>(h, w.wk.view(), w.bk.view(), k);
  detail::linear_forward<T>(h, w.wv.view(), w.bv.view(), v);
}

// dh += Σ over q, k, v of d(·)·W; grads (when given) += weight and bias gradients.
template <class T>
void project_qkv_backward(const AttentionWeights<T>& w, TensorView<const T> h, TensorView<const T> dq,
                          TensorView<const T> dk, TensorView<const T> dv, TensorView<T> dh,
                          AttentionWeights<T>* grads = nullptr) {
  const auto grad = [&](Tensor<T> AttentionWeights<T>::*member) {
    return grads ? (grads->*member).view() : TensorView<T>{};
  };
  using W = AttentionWeights<T>;
  detail::linear_backward<T>(h, w.wq.view(), dq, dh, grad(&W::wq), grad(&W::bq));
  detail::linear_backward<T>(h, w.wk.view(), dk, dh, grad(&W::wk), grad(&W::bk));
  detail::linear_backward<T>(h, w.wv.view(), dv, dh, grad(&W::wv), grad(&W::bv));
}

template <class T>
void project_out(const AttentionShape& s, const AttentionWeights<T>& w, TensorView<const T> a, TensorView<T> y) {
  const index_t B = a.dim(0), T_ = a.dim(1);
  require_shape(a, Shape{B, T_, s.n_heads, s.d_head}, "attention output");
  require_shape(y, Shape{B, T_, s.d_model}, "y");
  detail::linear_forward<T>(a, w.wo.view(), TensorView<const T>{}, y);
}

// da += dy·Wo; grads->wo += dyᵀ·a when grads is given.
template <class T>
void project_out_backward(const AttentionWeights<T>& w, TensorView<const T> a, TensorView<const T> dy,
                          TensorView<T> da, AttentionWeights<T>* grads = nullptr) {
  detail::linear_backward<T>(a, w.wo.view(), dy, da, grads ? grads->wo.view() : TensorView<T>{},
                             TensorView<T>{});
}

// The teacher's weights with each k/v head repeated n_kv_heads / teacher.n_kv_heads times
// (kv head j of the result is teacher head j / repeat): for operators that want a state per
// query head. n_kv_heads must be a multiple of the teacher's and divide n_heads.
template <class T>
AttentionWeights<T> repeat_kv_heads(const AttentionShape& teacher, const AttentionWeights<T>& w, int n_kv_heads) {
  require(n_kv_heads > 0 && n_kv_heads % teacher.n_kv_heads == 0 && teacher.n_heads % n_kv_heads == 0,
          "repeat_kv_heads: n_kv_heads = ", n_kv_heads, " must be a multiple of the teacher's ", teacher.n_kv_heads,
          " and divide n_heads = ", teacher.n_heads);
  AttentionShape out_shape = teacher;
  out_shape.n_kv_heads = n_kv_heads;
  AttentionWeights<T> out = AttentionWeights<T>::zeros(out_shape);
  out.wq = w.wq, out.wo = w.wo, out.bq = w.bq;
  const index_t repeat = n_kv_heads / teacher.n_kv_heads, D = teacher.d_head, C = teacher.d_model;
  for (index_t j = 0; j < n_kv_heads; ++j)
    for (index_t d = 0; d < D; ++d) {
      const index_t src = (j / repeat) * D + d, dst = j * D + d;
      for (index_t c = 0; c < C; ++c) out.wk(dst, c) = w.wk(src, c), out.wv(dst, c) = w.wv(src, c);
      if (teacher.qkv_bias) out.bk(dst) = w.bk(src), out.bv(dst) = w.bv(src);
    }
  return out;
}

}  // namespace dash

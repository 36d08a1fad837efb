// The SwiGLU MLP:  out = (silu(x·Wgᵀ) ⊙ x·Wuᵀ)·Wdᵀ,  silu(a) = a·σ(a).
// Backward, with a = x·Wgᵀ, b = x·Wuᵀ, dm = dout·Wd:
//   da = dm ⊙ b ⊙ σ(a)(1 + a(1 − σ(a))),  db = dm ⊙ silu(a),  dx = da·Wg + db·Wu.
#pragma once

#include <cmath>

#include "dash/core/eigen.hpp"
#include "dash/core/tensor.hpp"
#include "dash/ops/detail/linear.hpp"

namespace dash::model {

template <class T>
struct SwigluWeights {
  TensorView<const T> w_gate;  // [d_ff, d_model]
  TensorView<const T> w_up;    // [d_ff, d_model]
  TensorView<const T> w_down;  // [d_model, d_ff]
};

template <class T>
void swiglu_forward(const SwigluWeights<T>& w, TensorView<const T> x, TensorView<T> out) {
  const index_t rows = x.numel() / w.w_gate.dim(1), d_ff = w.w_gate.dim(0);
  Tensor<T> a(Shape{rows, d_ff}), b(Shape{rows, d_ff});
  dash::detail::linear_forward<T>(x, w.w_gate, {}, a.view());
  dash::detail::linear_forward<T>(x, w.w_up, {}, b.view());
  auto A = eigen::vector(a.view());
  A = A.unaryExpr([](T v) { return v / (T(1) + std::exp(-v)); }).cwiseProduct(eigen::vector(b.view()));
  dash::detail::linear_forward<T>(a.view(), w.w_down, {}, out);
}

// Adds dL/dx into dx (weights are frozen: no weight gradients).
template <class T>
void swiglu_backward(const SwigluWeights<T>& w, TensorView<const T> x, TensorView<const T> dout, TensorView<T> dx) {
  const index_t rows = x.numel() / w.w_gate.dim(1), d_ff = w.w_gate.dim(0);
  Tensor<T> a(Shape{rows, d_ff}), b(Shape{rows, d_ff}), dm(Shape{rows, d_ff}, T(0));
  dash::detail::linear_forward<T>(x, w.w_gate, {}, a.view());
  dash::detail::linear_forward<T>(x, w.w_up, {}, b.view());
  dash::detail::linear_backward<T>(a.view(), w.w_down, dout, dm.view(), {}, {});  // a: only its shape is read
  T* A = a.data();
  T* B = b.data();
  const T* dM = dm.data();
  for (index_t i = 0; i < a.numel(); ++i) {
    const T s = T(1) / (T(1) + std::exp(-A[i]));
    const T silu = A[i] * s;
    const T da = dM[i] * B[i] * s * (T(1) + A[i] * (T(1) - s));
    B[i] = dM[i] * silu;  // db
    A[i] = da;
  }
  dash::detail::linear_backward<T>(x, w.w_gate, a.view(), dx, {}, {});
  dash::detail::linear_backward<T>(x, w.w_up, b.view(), dx, {}, {});
}

}  // namespace dash::model

// y = x·Wᵀ + b for W [out, in], and its backward. x and y are contiguous and of any rank:
// x is read as a [rows, in] matrix and y as [rows, out] (so [B,T,H,D] serves as [B·T, H·D]).
#pragma once

#include <Eigen/Core>

#include "dash/core/eigen.hpp"
#include "dash/core/tensor.hpp"

namespace dash::detail {

template <class T>
auto rows_of(TensorView<T> x, index_t cols) {
  require(x.contiguous(), "linear: operand ", x.shape, " must be contiguous");
  require(cols > 0 && x.numel() % cols == 0, "linear: operand ", x.shape, " is not a whole number of rows of ",
          cols);
  return eigen::MatrixMap<T>(x.data, x.numel() / cols, cols);
}

// y = x·Wᵀ (+ b when b is not empty). w is [out, in].
template <class T>
void linear_forward(TensorView<const T> x, TensorView<const T> w, TensorView<const T> b, TensorView<T> y) {
  auto Y = rows_of(y, w.dim(0));
  Y.noalias() = rows_of(x, w.dim(1)) * eigen::matrix(w).transpose();
  if (!b.empty()) Y.rowwise() += eigen::vector(b).transpose();
}

// dx += dy·W, dw += dyᵀ·x, db += Σ_rows dy; each skipped when its view is empty.
template <class T>
void linear_backward(TensorView<const T> x, TensorView<const T> w, TensorView<const T> dy, TensorView<T> dx,
                     TensorView<T> dw, TensorView<T> db) {
  const auto dY = rows_of(dy, w.dim(0));
  if (!dx.empty()) rows_of(dx, w.dim(1)).noalias() += dY * eigen::matrix(w);
  if (!dw.empty()) eigen::matrix(dw).noalias() += dY.transpose() * rows_of(x, w.dim(1));
  if (!db.empty()) eigen::vector(db) += dY.colwise().sum().transpose();
}

}  // namespace dash::detail

// Eigen maps over dash views: the CPU reference works on one (batch, head) slice at a time
// as a row-major [T, D] matrix whose rows are H·D elements apart.
#pragma once

#include <Eigen/Core>

#include "dash/core/tensor.hpp"

namespace dash::eigen {

template <class T>
using Matrix = Eigen::Matrix<std::remove_const_t<T>, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using Vector = Eigen::Matrix<std::remove_const_t<T>, Eigen::Dynamic, 1>;

template <class T>
using StridedMap = Eigen::Map<std::conditional_t<std::is_const_v<T>, const Matrix<T>, Matrix<T>>,
                              Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using MatrixMap = Eigen::Map<std::conditional_t<std::is_const_v<T>, const Matrix<T>, Matrix<T>>>;
template <class T>
using VectorMap = Eigen::Map<std::conditional_t<std::is_const_v<T>, const Vector<T>, Vector<T>>>;

// [T, D] slice (b, :, h, :) of a [B, T, H, D] view.
template <class T>
StridedMap<T> head(TensorView<T> x, index_t b, index_t h) {
  return StridedMap<T>(x.data + b * x.stride[0] + h * x.stride[2], x.dim(1), x.dim(3),
                       Eigen::OuterStride<>(x.stride[1]));
}

// [T, C] slice (b, :, :) of a [B, T, C] view.
template <class T>
StridedMap<T> sequence(TensorView<T> x, index_t b) {
  return StridedMap<T>(x.data + b * x.stride[0], x.dim(1), x.dim(2), Eigen::OuterStride<>(x.stride[1]));
}

// A contiguous rank-2 view as a matrix.
template <class T>
MatrixMap<T> matrix(TensorView<T> x) {
  return MatrixMap<T>(x.data, x.dim(0), x.dim(1));
}

// A contiguous view of any rank as a column vector.
template <class T>
VectorMap<T> vector(TensorView<T> x) {
  return VectorMap<T>(x.data, x.numel());
}

}  // namespace dash::eigen

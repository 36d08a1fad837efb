// Token-level losses at the LM head, computed a block of tokens at a time so that at most
// block × vocab logits exist at once (the head is the largest activation of a small model).
//   NLL:  ℓ_t = lse(z_t) − z_t[y_t],                       dz_t = softmax(z_t) − onehot(y_t)
//   KL:   ℓ_t = Σ_v p_t(v) (log p_t(v) − log q_t(v)),       dz_t = q_t − p_t
// with z = h·Headᵀ, p the teacher's softmax, q the student's, log-softmax by log-sum-exp.
// Both report the mean over counted tokens, and the gradient of that mean is added into dh.
#pragma once

#include <algorithm>
#include <cmath>
#include <span>

#include "dash/core/eigen.hpp"
#include "dash/core/error.hpp"
#include "dash/core/tensor.hpp"
#include "dash/ops/detail/linear.hpp"

namespace dash::model {

struct LossValue {
  double sum = 0;     // Σ over counted tokens
  index_t count = 0;  // tokens counted
  double mean() const { return count ? sum / double(count) : 0.0; }
};

namespace detail {

// Tokens per block: about 4 Mi logits at a time.
inline index_t loss_block(index_t vocab) { return std::max<index_t>(1, (index_t(1) << 22) / vocab); }

// Row-wise log-softmax of z in place.
template <class M>
void log_softmax_rows(M&& z) {
  for (index_t r = 0; r < z.rows(); ++r) {
    const auto m = z.row(r).maxCoeff();
    const double s = (z.row(r).array() - m).template cast<double>().exp().sum();
    z.row(r).array() -= m + static_cast<typename std::decay_t<M>::Scalar>(std::log(s));
  }
}

}  // namespace detail

// Mean NLL of `targets` (one per position of hidden [.., d]; a negative target is not counted).
// When d_hidden is not empty, adds d(mean NLL)/dh into it.
template <class T>
LossValue nll_loss(TensorView<const T> head, TensorView<const T> hidden, std::span<const int> targets,
                   TensorView<T> d_hidden = {}) {
  const index_t V = head.dim(0), d = head.dim(1), n = hidden.numel() / d;
  require(index_t(targets.size()) == n, "nll_loss: ", targets.size(), " targets for ", n, " positions");
  LossValue loss;
  for (int t : targets) {
    require(t < V, "nll_loss: target ", t, " is outside the vocabulary [0, ", V, ")");
    loss.count += t >= 0;
  }
  const index_t block = detail::loss_block(V);
  const auto H = dash::detail::rows_of(hidden, d);
  const auto W = eigen::matrix(head);
  eigen::Matrix<T> z;
  for (index_t b0 = 0; b0 < n; b0 += block) {
    const index_t rows = std::min(block, n - b0);
    z.noalias() = H.middleRows(b0, rows) * W.transpose();
    detail::log_softmax_rows(z);
    for (index_t r = 0; r < rows; ++r)
      if (const int t = targets[std::size_t(b0 + r)]; t >= 0) loss.sum -= double(z(r, t));
    if (d_hidden.empty() || loss.count == 0) continue;
    const T scale = T(1.0 / double(loss.count));
    z = z.array().exp();
    for (index_t r = 0; r < rows; ++r) {
      if (const int t = targets[std::size_t(b0 + r)]; t >= 0)
        z(r, t) -= T(1);
      else
        z.row(r).setZero();
    }
    dash::detail::rows_of(d_hidden, d).middleRows(b0, rows).noalias() += scale * (z * W);
  }
  return loss;
}

// Mean over positions of KL(teacher ‖ student), both hidden states read through the same head.
// When d_student is not empty, adds d(mean KL)/dh_student into it.
template <class T>
LossValue kl_loss(TensorView<const T> head, TensorView<const T> teacher_hidden, TensorView<const T> student_hidden,
                  TensorView<T> d_student = {}) {
  require(teacher_hidden.shape == student_hidden.shape, "kl_loss: teacher hidden ", teacher_hidden.shape,
          " vs student hidden ", student_hidden.shape);
  const index_t V = head.dim(0), d = head.dim(1), n = student_hidden.numel() / d;
  const index_t block = detail::loss_block(V);
  const auto Ht = dash::detail::rows_of(teacher_hidden, d);
  const auto Hs = dash::detail::rows_of(student_hidden, d);
  const auto W = eigen::matrix(head);
  LossValue loss;
  loss.count = n;
  eigen::Matrix<T> zt, zs;
  for (index_t b0 = 0; b0 < n; b0 += block) {
    const index_t rows = std::min(block, n - b0);
    zt.noalias() = Ht.middleRows(b0, rows) * W.transpose();
    zs.noalias() = Hs.middleRows(b0, rows) * W.transpose();
    detail::log_softmax_rows(zt);
    detail::log_softmax_rows(zs);
    for (index_t r = 0; r < rows; ++r) {
      double kl = 0;
      for (index_t v = 0; v < V; ++v) kl += std::exp(double(zt(r, v))) * (double(zt(r, v)) - double(zs(r, v)));
      loss.sum += kl;
    }
    if (d_student.empty()) continue;
    zs = (zs.array().exp() - zt.array().exp()) * T(1.0 / double(n));
    dash::detail::rows_of(d_student, d).middleRows(b0, rows).noalias() += zs * W;
  }
  return loss;
}

// Logits of every position, [.., V]: for generation and tests (a whole vocabulary row per token).
template <class T>
void logits(TensorView<const T> head, TensorView<const T> hidden, TensorView<T> out) {
  dash::detail::linear_forward<T>(hidden, head, {}, out);
}

}  // namespace dash::model

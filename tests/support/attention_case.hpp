// Shared by the Softmax and SlidingWindow tests: layouts, random inputs, forward and backward
// runners that poison outputs and read backward's increments, finite differences of an
// operator, and k/v head repetition for the GQA == MHA identity.
#pragma once

#include <algorithm>
#include <array>
#include <ostream>
#include <vector>

#include "dash/core/rng.hpp"
#include "dash/core/tensor.hpp"
#include "support/compare.hpp"
#include "support/random.hpp"

namespace dash::test::attention {

// Lengths around the kernel's tile of 64 queries and keys, plus one drawn per run.
constexpr std::array<index_t, 7> fixed_lengths{1, 7, 63, 64, 65, 128, 130};
constexpr std::array<index_t, 3> head_groups{1, 2, 4};  // MHA, GQA with groups of 2 and of 4
constexpr std::array<index_t, 3> head_dims{4, 8, 16};

inline std::vector<index_t> lengths(Rng& rng) {
  std::vector<index_t> all(fixed_lengths.begin(), fixed_lengths.end());
  all.push_back(index_t(2 + rng.below(199)));
  return all;
}

struct Layout {
  index_t batch, length, heads, kv_heads, d_head;

  friend std::ostream& operator<<(std::ostream& os, const Layout& s) {
    return os << "B=" << s.batch << " T=" << s.length << " H=" << s.heads << " Hkv=" << s.kv_heads
              << " D=" << s.d_head;
  }
};

inline Layout random_layout(index_t length, index_t group, index_t d_head, Rng& rng) {
  const auto kv_heads = index_t(1 + rng.below(2));
  return {index_t(1 + rng.below(2)), length, kv_heads * group, kv_heads, d_head};
}

// One sequence and at most 4 query heads: finite differences run four forwards per checked
// entry, and batch and head indexing are covered by the reference and identity tests.
inline Layout gradient_check_layout(index_t length, index_t group, index_t d_head, Rng& rng) {
  const index_t kv_heads = group == 4 ? 1 : index_t(1 + rng.below(2));
  return {1, length, kv_heads * group, kv_heads, d_head};
}

template <class T>
struct Inputs {
  Tensor<T> q, k, v;
};

template <class T>
Inputs<T> random_inputs(const Layout& s, Rng& rng) {
  const Shape q_shape{s.batch, s.length, s.heads, s.d_head}, kv_shape{s.batch, s.length, s.kv_heads, s.d_head};
  return {test::random_tensor<T>(q_shape, rng), test::random_tensor<T>(kv_shape, rng),
          test::random_tensor<T>(kv_shape, rng)};
}

template <class Op, class T>
Tensor<T> run_forward(const Op& op, const Inputs<T>& x) {
  Tensor<T> out(x.q.shape());
  test::poison(out.view());
  typename Op::template Saved<T> saved;
  op.forward(x.q, x.k, x.v, out, saved);
  return out;
}

template <class T>
struct Gradients {
  Tensor<T> dq, dk, dv;
};

// The gradients of Σ w ⊙ out, read as what backward adds to starting values drawn with
// standard deviation `start_stddev` (0: backward starts from zero).
template <class Op, class T>
Gradients<T> run_backward(const Op& op, const Inputs<T>& x, const Tensor<T>& w, Rng& rng,
                          double start_stddev = 1.0) {
  Tensor<T> out(x.q.shape());
  test::poison(out.view());
  typename Op::template Saved<T> saved;
  op.forward(x.q, x.k, x.v, out, saved);
  const Gradients<T> start{test::random_tensor<T>(x.q.shape(), rng, start_stddev),
                           test::random_tensor<T>(x.k.shape(), rng, start_stddev),
                           test::random_tensor<T>(x.v.shape(), rng, start_stddev)};
  Gradients<T> g = start;
  op.backward(x.q, x.k, x.v, out, saved, w, g.dq, g.dk, g.dv);
  for (index_t i = 0; i < g.dq.numel(); ++i) g.dq.data()[i] -= start.dq.data()[i];
  for (index_t i = 0; i < g.dk.numel(); ++i) g.dk.data()[i] -= start.dk.data()[i];
  for (index_t i = 0; i < g.dv.numel(); ++i) g.dv.data()[i] -= start.dv.data()[i];
  return g;
}

// Largest finite-difference error over q, k and v of the loss Σ w ⊙ out, w random.
template <class Op>
double finite_difference_error(const Op& op, const Layout& s, Rng& rng) {
  Inputs<double> x = random_inputs<double>(s, rng);
  const Tensor<double> w = test::random_tensor<double>(x.q.shape(), rng);
  const Gradients<double> g = run_backward(op, x, w, rng);
  Tensor<double> out(x.q.shape());
  typename Op::template Saved<double> saved;
  const auto loss = [&] {
    op.forward(x.q, x.k, x.v, out, saved);
    return test::weighted_sum(out, w);
  };
  const index_t entries = 24;
  return std::max({test::finite_difference_error(x.q.view(), g.dq, loss, rng, entries),
                   test::finite_difference_error(x.k.view(), g.dk, loss, rng, entries),
                   test::finite_difference_error(x.v.view(), g.dv, loss, rng, entries)});
}

// k or v [B, T, Hkv, D] with every head repeated `group` times: [B, T, Hkv·group, D].
inline Tensor<double> repeat_heads(const Tensor<double>& x, index_t group) {
  Tensor<double> r(Shape{x.dim(0), x.dim(1), x.dim(2) * group, x.dim(3)});
  for (index_t b = 0; b < r.dim(0); ++b)
    for (index_t t = 0; t < r.dim(1); ++t)
      for (index_t h = 0; h < r.dim(2); ++h)
        for (index_t d = 0; d < r.dim(3); ++d) r(b, t, h, d) = x(b, t, h / group, d);
  return r;
}

// The way back for gradients: a kv head's gradient is the sum over the heads made from it.
inline Tensor<double> sum_groups(const Tensor<double>& x, index_t group) {
  Tensor<double> s(Shape{x.dim(0), x.dim(1), x.dim(2) / group, x.dim(3)}, 0.0);
  for (index_t b = 0; b < x.dim(0); ++b)
    for (index_t t = 0; t < x.dim(1); ++t)
      for (index_t h = 0; h < x.dim(2); ++h)
        for (index_t d = 0; d < x.dim(3); ++d) s(b, t, h / group, d) += x(b, t, h, d);
  return s;
}

}  // namespace dash::test::attention

// CPU reference of masked causal softmax attention, shared by Softmax and SlidingWindow.
//
// One (batch, head) slice at a time, in tiles of `attention_tile` queries × `attention_tile`
// keys. Forward keeps a running row maximum m and row sum l per query (online softmax), so no
// T×T score matrix exists: for each key tile
//   S = scale·Q Kᵀ,  m' = max(m, rowmax S),  P = exp(S − m'),
//   l ← e^(m−m')·l + rowsum P,  acc ← e^(m−m')·acc + P V
// and finally O = acc / l, lse = m + log l. Backward recomputes P = exp(S − lse) tile by tile.
// Tiles that hold no attended pair are skipped; tiles where every pair is attended run
// without a mask; only the tiles on the diagonal or the window's edge are masked.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "dash/core/eigen.hpp"
#include "dash/core/tensor.hpp"

namespace dash::detail {

// Which keys a query sees: key j is visible to query i iff j ≤ i and either i − j < window
// (the last `window` tokens up to and including i) or j < sinks (the first `sinks` tokens,
// attention sinks). A window of at least T is full causal attention.
struct AttentionMask {
  index_t window = std::numeric_limits<index_t>::max();
  index_t sinks = 0;

  enum class Coverage { none, partial, full };

  // How the tile of queries [q0, q1) × keys [k0, k1) (both non-empty) is covered.
  constexpr Coverage coverage(index_t q0, index_t q1, index_t k0, index_t k1) const {
    if (k0 > q1 - 1) return Coverage::none;  // every key lies in every query's future
    const index_t nearest = std::max<index_t>(0, q0 - (k1 - 1));
    if (nearest >= window && k0 >= sinks) return Coverage::none;
    const index_t farthest = (q1 - 1) - k0;
    const bool all_causal = k1 - 1 <= q0;
    if (all_causal && (farthest < window || k1 <= sinks)) return Coverage::full;
    return Coverage::partial;
  }

  // Number of attended (query, key) pairs in a sequence of `length` tokens. With
  // f(n, c) = Σ_{k=1..n} min(k, c): query i sees min(i + 1, window) keys of its window, and
  // the sinks left of the window, min(sinks, i − window + 1) when positive.
  constexpr double attended_pairs(index_t length) const {
    const auto capped_triangle = [](double n, double c) {
      return n <= c ? n * (n + 1) / 2 : c * (c + 1) / 2 + (n - c) * c;
    };
    const double n = double(length), w = double(window), s = double(sinks);
    return capped_triangle(n, w) + capped_triangle(std::max(0.0, n - w), s);
  }
};

}  // namespace dash::detail

namespace dash::eigen {

// Queries and keys per tile: large enough for Eigen's blocked GEMM to run near peak, small
// enough that a tile of scores stays in L1/L2.
inline constexpr index_t attention_tile = 64;

namespace detail {

// The columns of a tile (keys from k0, `cols` of them) that query i sees: the sinks
// [0, sinks_end) and the window [window_begin, window_end), with sinks_end ≤ window_end.
struct VisibleColumns {
  index_t sinks_end, window_begin, window_end;

  VisibleColumns(const dash::detail::AttentionMask& mask, index_t query, index_t k0, index_t cols) {
    const auto column = [&](index_t key) { return std::clamp<index_t>(key - k0, 0, cols); };
    sinks_end = column(std::min(mask.sinks, query + 1));
    window_end = column(query + 1);
    // query − window + 1, without overflow when the window is unbounded.
    window_begin = query < mask.window ? 0 : column(query - mask.window + 1);
  }

  // Calls f(begin, end, visible) on each run of columns [begin, end), left to right; a run may
  // be empty.
  template <class F>
  void for_each_run(index_t cols, F&& f) const {
    if (window_begin < window_end) {
      f(index_t(0), std::min(sinks_end, window_begin), true);
      if (sinks_end < window_begin) f(sinks_end, window_begin, false);
      f(window_begin, window_end, true);
      f(window_end, cols, false);
    } else {
      f(index_t(0), sinks_end, true);
      f(sinks_end, cols, false);
    }
  }
};

// Sets the entries of a tile (queries from q0, keys from k0) that the mask hides to −∞.
template <class Tile>
void hide_masked(Tile& s, const dash::detail::AttentionMask& mask, index_t q0, index_t k0) {
  constexpr auto minus_inf = -std::numeric_limits<typename Tile::Scalar>::infinity();
  for (index_t r = 0; r < s.rows(); ++r)
    VisibleColumns(mask, q0 + r, k0, s.cols()).for_each_run(s.cols(), [&](index_t begin, index_t end, bool visible) {
      if (!visible && begin < end) s.row(r).segment(begin, end - begin).setConstant(minus_inf);
    });
}

// s ← exp(s − shift) row by row on the entries the mask shows, exactly 0 on those it hides.
// Hidden entries never reach exp: exp of a very negative argument goes through subnormals,
// which cost a microcode assist per element on x86.
template <class Tile, class Shift>
void exp_visible(Tile& s, const Shift& shift, const dash::detail::AttentionMask& mask, index_t q0, index_t k0) {
  for (index_t r = 0; r < s.rows(); ++r)
    VisibleColumns(mask, q0 + r, k0, s.cols()).for_each_run(s.cols(), [&](index_t begin, index_t end, bool visible) {
      if (begin >= end) return;
      auto run = s.row(r).segment(begin, end - begin);
      if (visible)
        run.array() = (run.array() - shift(r)).exp();
      else
        run.setZero();
    });
}

}  // namespace detail

// out[b, :, h, :] = softmax(scale·q kᵀ + mask) v for every batch b and query head h, with key
// and value head h / (H / Hkv); lse[b, h, i] = log Σ_j exp(scale·q_i·k_j) over attended j.
// Shapes are checked by the caller: q, out [B, T, H, D]; k, v [B, T, Hkv, D]; lse [B, H, T].
template <class T>
void masked_attention_forward(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v,
                              TensorView<T> out, TensorView<T> lse, const dash::detail::AttentionMask& mask) {
  using Mask = dash::detail::AttentionMask;
  const index_t n_batch = q.dim(0), length = q.dim(1), n_heads = q.dim(2), d_head = q.dim(3);
  const index_t group = n_heads / k.dim(2);
  const T scale = T(1) / std::sqrt(T(d_head));
  constexpr T minus_inf = -std::numeric_limits<T>::infinity();

  Matrix<T> scores(attention_tile, attention_tile), acc(attention_tile, d_head);
  Vector<T> row_max(attention_tile), row_sum(attention_tile), rescale(attention_tile);

  for (index_t b = 0; b < n_batch; ++b)
    for (index_t h = 0; h < n_heads; ++h) {
      const auto Q = head(q, b, h), K = head(k, b, h / group), V = head(v, b, h / group);
      auto O = head(out, b, h);
      T* lse_row = &lse(b, h, 0);
      for (index_t q0 = 0; q0 < length; q0 += attention_tile) {
        const index_t rows = std::min(attention_tile, length - q0);
        const auto Qt = Q.middleRows(q0, rows);
        auto m = row_max.head(rows), l = row_sum.head(rows), a = rescale.head(rows);
        auto A = acc.topRows(rows);
        m.setConstant(minus_inf);
        l.setZero();
        A.setZero();
        for (index_t k0 = 0; k0 < q0 + rows; k0 += attention_tile) {
          const index_t cols = std::min(attention_tile, length - k0);
          const auto coverage = mask.coverage(q0, q0 + rows, k0, k0 + cols);
          if (coverage == Mask::Coverage::none) continue;
          auto S = scores.topLeftCorner(rows, cols);
          S.noalias() = scale * (Qt * K.middleRows(k0, cols).transpose());
          const bool masked = coverage == Mask::Coverage::partial;
          if (masked) detail::hide_masked(S, mask, q0, k0);
          // A row that has seen no visible key yet has m = −∞ and an empty accumulator: its
          // rescale is 0 rather than exp(−∞ − (−∞)), and exp_visible leaves its tile row at 0.
          for (index_t r = 0; r < rows; ++r) {
            const T seen = m(r);
            m(r) = std::max(seen, S.row(r).maxCoeff());
            a(r) = seen == minus_inf ? T(0) : std::exp(seen - m(r));
          }
          if (masked) {
            detail::exp_visible(S, m, mask, q0, k0);
          } else {
            S.array().colwise() -= m.array();
            S.array() = S.array().exp();
          }
          l.array() = a.array() * l.array() + S.array().rowwise().sum();
          A.array().colwise() *= a.array();
          A.noalias() += S * V.middleRows(k0, cols);
        }
        // Query i always sees key i (window ≥ 1), so l > 0.
        O.middleRows(q0, rows).array() = A.array().colwise() / l.array();
        for (index_t r = 0; r < rows; ++r) lse_row[(q0 + r) * lse.stride[2]] = m(r) + std::log(l(r));
      }
    }
}

// Adds the gradients of the forward above to dq, dk and dv, given the upstream gradient d_out
// and the forward's out and lse. Per tile, with P = exp(scale·Q Kᵀ − lse) (0 where masked) and
// D_i = Σ_d dO_id·O_id:
//   dV += Pᵀ dO,  dS = scale·P ∘ (dO Vᵀ − D),  dQ += dS K,  dK += dSᵀ Q.
// Key and value gradients of a kv head collect the contributions of its whole query group.
template <class T>
void masked_attention_backward(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v,
                               TensorView<const T> out, TensorView<const T> lse, TensorView<const T> d_out,
                               TensorView<T> dq, TensorView<T> dk, TensorView<T> dv,
                               const dash::detail::AttentionMask& mask) {
  using Mask = dash::detail::AttentionMask;
  const index_t n_batch = q.dim(0), length = q.dim(1), n_heads = q.dim(2), d_head = q.dim(3);
  const index_t group = n_heads / k.dim(2);
  const T scale = T(1) / std::sqrt(T(d_head));

  Matrix<T> probs(attention_tile, attention_tile), d_scores(attention_tile, attention_tile);
  Matrix<T> dq_acc(attention_tile, d_head);
  Vector<T> row_lse(attention_tile), row_delta(attention_tile);

  for (index_t b = 0; b < n_batch; ++b)
    for (index_t h = 0; h < n_heads; ++h) {
      const auto Q = head(q, b, h), K = head(k, b, h / group), V = head(v, b, h / group);
      const auto O = head(out, b, h), dO = head(d_out, b, h);
      auto dQ = head(dq, b, h), dK = head(dk, b, h / group), dV = head(dv, b, h / group);
      const T* lse_row = &lse(b, h, 0);
      for (index_t q0 = 0; q0 < length; q0 += attention_tile) {
        const index_t rows = std::min(attention_tile, length - q0);
        const auto Qt = Q.middleRows(q0, rows), dOt = dO.middleRows(q0, rows);
        auto lse_t = row_lse.head(rows), D = row_delta.head(rows);
        for (index_t r = 0; r < rows; ++r) lse_t(r) = lse_row[(q0 + r) * lse.stride[2]];
        D = (dOt.array() * O.middleRows(q0, rows).array()).rowwise().sum();
        auto G = dq_acc.topRows(rows);
        G.setZero();
        for (index_t k0 = 0; k0 < q0 + rows; k0 += attention_tile) {
          const index_t cols = std::min(attention_tile, length - k0);
          const auto coverage = mask.coverage(q0, q0 + rows, k0, k0 + cols);
          if (coverage == Mask::Coverage::none) continue;
          const auto Kt = K.middleRows(k0, cols), Vt = V.middleRows(k0, cols);
          auto P = probs.topLeftCorner(rows, cols);
          P.noalias() = scale * (Qt * Kt.transpose());
          const bool masked = coverage == Mask::Coverage::partial;
          if (masked) {
            detail::exp_visible(P, lse_t, mask, q0, k0);
          } else {
            P.array().colwise() -= lse_t.array();
            P.array() = P.array().exp();
          }
          dV.middleRows(k0, cols).noalias() += P.transpose() * dOt;
          auto dS = d_scores.topLeftCorner(rows, cols);
          dS.noalias() = dOt * Vt.transpose();
          dS.array() = scale * P.array() * (dS.array().colwise() - D.array());
          G.noalias() += dS * Kt;
          dK.middleRows(k0, cols).noalias() += dS.transpose() * Qt;
        }
        dQ.middleRows(q0, rows) += G;
      }
    }
}

}  // namespace dash::eigen

// SlidingWindow: causal softmax attention restricted to a window of W tokens, optionally
// plus the first n_s tokens of the sequence (attention sinks).
//
// Same q, k, v layout and GQA rule as Softmax. Query i attends key j iff
//   j ≤ i  and  (i − j < W  or  j < n_s),
// and with A_i that set of keys:
//   s_ij = q_i·k_j / √D,   lse_i = log Σ_{j∈A_i} exp(s_ij),   o_i = Σ_{j∈A_i} exp(s_ij − lse_i) v_j.
// Backward is Softmax's with the sums restricted to the same sets. A window of W ≥ T is
// exactly Softmax. The kernel is Softmax's: key tiles wholly outside [i − W + 1, i] and the
// sinks are skipped, so the work per query is O(W + n_s) rather than O(T).
// Cost at context T: a KV cache of 2·Hkv·D·min(W + n_s, T) elements; 4·H·D FLOPs per
// attended pair.
//
// W is a template argument (SlidingWindow<512>) or, with SlidingWindow<> (dynamic_window),
// chosen at run time: SlidingWindow<>(512).
#pragma once

#include <string_view>
#include <type_traits>

#include "dash/core/error.hpp"
#include "dash/core/tensor.hpp"
#include "dash/ops/operator.hpp"
#include "dash/ops/softmax.hpp"

namespace dash {

// The template argument of SlidingWindow whose window is given to the constructor.
inline constexpr index_t dynamic_window = 0;

template <index_t W = dynamic_window>
struct SlidingWindow {
  static_assert(W >= 1 || W == dynamic_window, "SlidingWindow<W>: the window W must be >= 1");

  static constexpr std::string_view name = "swa";
  static constexpr bool shares_teacher_projections = true;

  template <class T>
  struct Saved {
    Tensor<T> lse;  // [B, H, T]: log Σ_{j∈A_i} exp(s_ij) per query
  };

  SlidingWindow()
    requires(W != dynamic_window)
  = default;
  explicit SlidingWindow(index_t sinks)
    requires(W != dynamic_window)
      : sinks_(checked_sinks(sinks)) {}
  explicit SlidingWindow(index_t window, index_t sinks = 0)
    requires(W == dynamic_window)
      : window_(checked_window(window)), sinks_(checked_sinks(sinks)) {}

  // Keys per query counted back from the query itself.
  index_t window() const {
    if constexpr (W == dynamic_window)
      return window_;
    else
      return W;
  }
  // Leading tokens every query attends besides its window.
  index_t sinks() const { return sinks_; }

  // T is deduced from `saved` alone, so tensors and views of T or const T all convert.
  template <class T>
  void forward(std::type_identity_t<TensorView<const T>> q, std::type_identity_t<TensorView<const T>> k,
               std::type_identity_t<TensorView<const T>> v, std::type_identity_t<TensorView<T>> out,
               Saved<T>& saved) const {
    detail::masked_softmax_forward(q, k, v, out, saved.lse, mask());
  }

  // Adds into dq, dk and dv.
  template <class T>
  void backward(std::type_identity_t<TensorView<const T>> q, std::type_identity_t<TensorView<const T>> k,
                std::type_identity_t<TensorView<const T>> v, std::type_identity_t<TensorView<const T>> out,
                const Saved<T>& saved, std::type_identity_t<TensorView<const T>> d_out,
                std::type_identity_t<TensorView<T>> dq, std::type_identity_t<TensorView<T>> dk,
                std::type_identity_t<TensorView<T>> dv) const {
    detail::masked_softmax_backward(q, k, v, out, saved.lse, d_out, dq, dk, dv, mask());
  }

  Cost cost(const CostQuery& query) const {
    return detail::masked_softmax_cost(query, mask(), /*softmax_layers=*/0);
  }

 private:
  struct StaticWindow {};

  static index_t checked_window(index_t window) {
    require(window >= 1, "SlidingWindow: window = ", window, ", expected >= 1");
    return window;
  }
  static index_t checked_sinks(index_t sinks) {
    require(sinks >= 0, "SlidingWindow: sinks = ", sinks, ", expected >= 0");
    return sinks;
  }

  detail::AttentionMask mask() const { return {.window = window(), .sinks = sinks_}; }

  [[no_unique_address]] std::conditional_t<W == dynamic_window, index_t, StaticWindow> window_{};
  index_t sinks_ = 0;
};

}  // namespace dash

// The operator contract. An operator is a policy type: its configuration (window, chunk size,
// form), its cost model and its math. There are two families, told apart by
// `Op::shares_teacher_projections`:
//
//  * true  (Softmax, SlidingWindow): the op mixes the teacher's own Q, K, V (after RoPE)
//    into an attention output of shape [B, T, n_heads, d_head]; MixedAttention computes
//    Q/K/V once for all such ops and applies the output projection once to their weighted sum.
//      template <class T> struct Saved;                     what forward keeps for backward
//      forward(q, k, v, out, saved)                         q [B,T,H,D], k and v [B,T,Hkv,D]
//      backward(q, k, v, out, saved, d_out, dq, dk, dv)     adds into dq, dk, dv
//
//  * false (GatedLinear, GatedDeltaNet): the op owns its projections, initialised from the
//    teacher's, and maps the layer input h [B,T,d_model] to the layer output y [B,T,d_model].
//      template <class T> struct Params;                    trainable tensors, with for_each(f)
//      init_from_teacher(shape, teacher, rng) -> Params<T>
//      template <class T> struct Saved;
//      forward(shape, params, h, y, saved)
//      backward(shape, params, h, saved, dy, dh, grads)     adds into dh and grads
//
// Both: `static constexpr std::string_view name` and `Cost cost(const CostQuery&) const`.
// A type that misses a requirement is rejected by MixedAttention with a static_assert that
// names it (check_operator below), not with a page of template errors.
#pragma once

#include <concepts>
#include <string_view>

#include "dash/core/rng.hpp"
#include "dash/core/tensor.hpp"
#include "dash/ops/attention.hpp"

namespace dash {

// What one layer's mixer costs on one sequence of `context` tokens.
struct CostQuery {
  AttentionShape shape;
  index_t context = 0;
  double kv_bytes_per_element = 2;     // KV cache entries, bf16 by default
  double state_bytes_per_element = 4;  // recurrent state entries, fp32 (DESIGN.md §4)
};

struct Cost {
  double kv_bytes = 0;        // KV cache or recurrent state held after `context` tokens
  double flops = 0;           // token-mixing FLOPs for the whole sequence (projections excluded)
  double softmax_layers = 0;  // 1 for full softmax attention, else 0
};

namespace concepts {

template <class Op>
concept has_name = requires {
  { Op::name } -> std::convertible_to<std::string_view>;
};

template <class Op>
concept has_cost = requires(const Op& op, const CostQuery& q) {
  { op.cost(q) } -> std::same_as<Cost>;
};

template <class Op>
concept has_projection_family = requires {
  { Op::shares_teacher_projections } -> std::convertible_to<bool>;
};

template <class Op, class T>
concept has_saved = requires { typename Op::template Saved<T>; };

template <class Op, class T>
concept has_core_forward = requires(const Op& op, TensorView<const T> x, TensorView<T> y,
                                    typename Op::template Saved<T>& saved) {
  op.forward(x, x, x, y, saved);
};

template <class Op, class T>
concept has_core_backward = requires(const Op& op, TensorView<const T> x, TensorView<T> y,
                                     const typename Op::template Saved<T>& saved) {
  op.backward(x, x, x, x, saved, x, y, y, y);
};

template <class Op, class T>
concept has_params = requires { typename Op::template Params<T>; };

template <class Op, class T>
concept has_init_from_teacher = requires(const Op& op, const AttentionShape& s, const AttentionWeights<T>& w,
                                         Rng& rng) {
  { op.template init_from_teacher<T>(s, w, rng) } -> std::same_as<typename Op::template Params<T>>;
};

template <class Op, class T>
concept has_layer_forward = requires(const Op& op, const AttentionShape& s, const typename Op::template Params<T>& p,
                                     TensorView<const T> x, TensorView<T> y, typename Op::template Saved<T>& saved) {
  op.forward(s, p, x, y, saved);
};

template <class Op, class T>
concept has_layer_backward =
    requires(const Op& op, const AttentionShape& s, const typename Op::template Params<T>& p, TensorView<const T> x,
             TensorView<T> y, const typename Op::template Saved<T>& saved, typename Op::template Params<T>& grads) {
      op.backward(s, p, x, saved, x, y, grads);
    };

}  // namespace concepts

template <class Op, class T = double>
concept TeacherProjectionOperator =
    concepts::has_name<Op> && concepts::has_cost<Op> && concepts::has_projection_family<Op> &&
    concepts::has_saved<Op, T> && concepts::has_core_forward<Op, T> && concepts::has_core_backward<Op, T>;

template <class Op, class T = double>
concept OwnProjectionOperator =
    concepts::has_name<Op> && concepts::has_cost<Op> && concepts::has_projection_family<Op> &&
    concepts::has_saved<Op, T> && concepts::has_params<Op, T> && concepts::has_init_from_teacher<Op, T> &&
    concepts::has_layer_forward<Op, T> && concepts::has_layer_backward<Op, T>;

template <class Op, class T = double>
concept Operator = TeacherProjectionOperator<Op, T> || OwnProjectionOperator<Op, T>;

template <class Op>
inline constexpr bool shares_teacher_projections_v = [] {
  if constexpr (concepts::has_projection_family<Op>) return bool(Op::shares_teacher_projections);
  return false;
}();

namespace detail {
template <class Op>
inline constexpr bool always_false = false;
}

// Names the first requirement Op misses. Returns true so that it can sit in a static_assert.
template <class Op, class T = double>
consteval bool check_operator() {
  static_assert(concepts::has_name<Op>,
                "dash operator: missing `static constexpr std::string_view name`");
  static_assert(concepts::has_cost<Op>, "dash operator: missing `Cost cost(const CostQuery&) const`");
  static_assert(concepts::has_projection_family<Op>,
                "dash operator: missing `static constexpr bool shares_teacher_projections`");
  if constexpr (concepts::has_projection_family<Op>) {
    static_assert(concepts::has_saved<Op, T>, "dash operator: missing `template <class T> struct Saved`");
    if constexpr (concepts::has_saved<Op, T>) {
      if constexpr (Op::shares_teacher_projections) {
        static_assert(concepts::has_core_forward<Op, T>,
                      "dash operator: missing `forward(q, k, v, out, saved)` on the teacher's Q/K/V");
        static_assert(concepts::has_core_backward<Op, T>,
                      "dash operator: missing `backward(q, k, v, out, saved, d_out, dq, dk, dv)`");
      } else {
        static_assert(concepts::has_params<Op, T>, "dash operator: missing `template <class T> struct Params`");
        if constexpr (concepts::has_params<Op, T>) {
          static_assert(concepts::has_init_from_teacher<Op, T>,
                        "dash operator: missing `init_from_teacher(shape, teacher, rng) -> Params<T>`");
          static_assert(concepts::has_layer_forward<Op, T>,
                        "dash operator: missing `forward(shape, params, h, y, saved)`");
          static_assert(concepts::has_layer_backward<Op, T>,
                        "dash operator: missing `backward(shape, params, h, saved, dy, dh, grads)`");
        }
      }
    }
  }
  return true;
}

}  // namespace dash

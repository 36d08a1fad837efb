// MixedAttention: the relaxed choice between token mixers in one layer (DESIGN.md §2).
//
//   π = softmax(α / τ)                     one logit α_i per operator, temperature τ
//   y = Σ_i π_i · o_i(h)
//
// Operators that mix the teacher's Q/K/V (Softmax, SlidingWindow) share one projection of h
// and one output projection: since Wo is linear, Σ_i π_i·Wo(a_i) = Wo(Σ_i π_i·a_i). Operators
// with their own weights (GatedLinear, GatedDeltaNet) map h to their output directly.
//
// Backward, for an upstream gradient dy:
//   dL/dπ_i = <a_i, dy·Wo>     (shared family)     dL/dπ_i = <o_i(h), dy>     (own weights)
//   dL/dα_j = (1/τ) · π_j · (dL/dπ_j − Σ_i π_i · dL/dπ_i)
// and each operator receives π_i times its upstream gradient, so that dh and every operator's
// parameter gradients are those of the weighted sum.
#pragma once

#include <array>
#include <cmath>
#include <optional>
#include <string_view>
#include <tuple>
#include <utility>

#include "dash/core/eigen.hpp"
#include "dash/core/error.hpp"
#include "dash/core/rng.hpp"
#include "dash/core/tensor.hpp"
#include "dash/ops/attention.hpp"
#include "dash/ops/operator.hpp"
#include "dash/ops/projections.hpp"
#include "dash/ops/rope.hpp"

namespace dash {

// The parameters of a teacher-projection operator: none.
struct NoParams {
  template <class F>
  void for_each(F&&) {}
};

namespace detail {
template <class Op, class T, bool Own = shares_teacher_projections_v<Op>>
struct op_params {
  using type = NoParams;
};
template <class Op, class T>
struct op_params<Op, T, false> {
  using type = typename Op::template Params<T>;
};
}  // namespace detail

template <class Op, class T>
using op_params_t = typename detail::op_params<Op, T>::type;

template <class T, class... Ops>
class BasicMixedAttention {
  static_assert(sizeof...(Ops) >= 1, "MixedAttention needs at least one operator");
  static_assert((check_operator<Ops, T>() && ...));

 public:
  static constexpr std::size_t n_ops = sizeof...(Ops);
  static constexpr bool has_shared_ops = (shares_teacher_projections_v<Ops> || ...);
  using Weights = std::array<T, n_ops>;
  using OpMask = std::array<bool, n_ops>;  // which operators a forward runs
  using Params = std::tuple<op_params_t<Ops, T>...>;

  // What forward keeps for backward.
  struct Cache {
    Tensor<T> q, k, v;                                   // teacher's Q/K/V after RoPE (shared family)
    Tensor<T> mixed;                                     // Σ π_i·a_i over the shared family
    std::tuple<typename Ops::template Saved<T>...> saved;
    std::array<Tensor<T>, n_ops> outputs;                // a_i (shared) or o_i(h) (own weights)
    Weights weights{};                                   // π used in this forward
    bool weights_from_logits = false;
    std::array<bool, n_ops> computed{};
  };

  struct Gradients {
    Weights weights{};  // dL/dπ
    Weights logits{};   // dL/dα (when the forward used softmax(α/τ))
    Params params;      // the operators' own parameters
    std::optional<AttentionWeights<T>> teacher;  // the teacher's projections, when asked for
  };

  BasicMixedAttention(const AttentionShape& shape, AttentionWeights<T> teacher, Rng& rng, Ops... ops)
      : shape_(shape), teacher_(std::move(teacher)), ops_(std::move(ops)...) {
    teacher_.validate(shape_);
    params_ = init_params(rng, std::index_sequence_for<Ops...>{});
    logits_.fill(T(0));
  }
  BasicMixedAttention(const AttentionShape& shape, AttentionWeights<T> teacher, Rng& rng)
    requires(std::is_default_constructible_v<Ops> && ...)
      : BasicMixedAttention(shape, std::move(teacher), rng, Ops{}...) {}

  const AttentionShape& shape() const { return shape_; }
  const AttentionWeights<T>& teacher() const { return teacher_; }
  const std::tuple<Ops...>& ops() const { return ops_; }
  Params& params() { return params_; }
  const Params& params() const { return params_; }
  static constexpr std::array<std::string_view, n_ops> op_names() { return {Ops::name...}; }

  const Weights& logits() const { return logits_; }
  void set_logits(const Weights& logits) {
    for (std::size_t i = 0; i < n_ops; ++i)
      require(std::isfinite(double(logits[i])), "MixedAttention::set_logits: logit ", i, " (", op_names()[i],
              ") is ", double(logits[i]), ", expected a finite value");
    logits_ = logits;
  }
  double temperature() const { return temperature_; }
  void set_temperature(double tau) {
    require(std::isfinite(tau) && tau > 0, "MixedAttention::set_temperature: temperature = ", tau,
            ", expected a finite value > 0");
    temperature_ = tau;
  }

  // π = softmax(α / τ), computed stably.
  Weights weights() const {
    Weights pi{};
    double top = -INFINITY, sum = 0;
    for (T a : logits_) top = std::max(top, double(a) / temperature_);
    for (std::size_t i = 0; i < n_ops; ++i) sum += std::exp(double(logits_[i]) / temperature_ - top);
    for (std::size_t i = 0; i < n_ops; ++i) pi[i] = T(std::exp(double(logits_[i]) / temperature_ - top) / sum);
    return pi;
  }

  std::array<Cost, n_ops> costs(const CostQuery& query) const {
    return std::apply([&](const auto&... op) { return std::array<Cost, n_ops>{op.cost(query)...}; }, ops_);
  }

  // y = Σ π_i·o_i(h) with π = softmax(α/τ).
  void forward(TensorView<const T> h, TensorView<T> y, Cache& cache) const {
    run_forward(h, y, cache, weights(), /*from_logits=*/true, all_ops());
  }

  // y = Σ π_i·o_i(h) with weights given by the caller (a Gumbel or straight-through sample, a
  // one-hot architecture). Only the operators in `run` are computed; one left out must have
  // weight 0, and its dL/dπ is then reported as 0 (dL/dα is unaffected: it carries a factor π_i).
  // A straight-through forward runs every candidate with one-hot weights, so that dL/dπ exists
  // for all of them.
  void forward(TensorView<const T> h, TensorView<T> y, Cache& cache, const Weights& weights,
               const OpMask& run = all_ops()) const {
    for (std::size_t i = 0; i < n_ops; ++i) {
      require(std::isfinite(double(weights[i])), "MixedAttention::forward: weight ", i, " (", op_names()[i],
              ") is ", double(weights[i]), ", expected a finite value");
      require(run[i] || weights[i] == T(0), "MixedAttention::forward: operator ", i, " (", op_names()[i],
              ") has weight ", double(weights[i]), " but is not run; expected weight 0 for an operator left out");
    }
    run_forward(h, y, cache, weights, /*from_logits=*/false, run);
  }

  static constexpr OpMask all_ops() {
    OpMask m{};
    m.fill(true);
    return m;
  }
  // The operators of non-zero weight: what a discrete architecture needs to run.
  static OpMask nonzero(const Weights& weights) {
    OpMask m{};
    for (std::size_t i = 0; i < n_ops; ++i) m[i] = weights[i] != T(0);
    return m;
  }

  // Gradients with every tensor zero and shaped like the parameters; `with_teacher` adds the
  // teacher's projections.
  Gradients zero_gradients(bool with_teacher = false) const {
    Gradients g;
    g.params = params_;
    std::apply([](auto&... p) { (p.for_each([](const char*, Tensor<T>& t) { t.fill(T(0)); }), ...); }, g.params);
    if (with_teacher) {
      g.teacher = teacher_;
      g.teacher->for_each([](const char*, Tensor<T>& t) { t.fill(T(0)); });
    }
    return g;
  }

  // Adds into dh and grads (params, teacher); sets grads.weights and grads.logits.
  void backward(TensorView<const T> h, const Cache& cache, TensorView<const T> dy, TensorView<T> dh,
                Gradients& grads) const {
    require_shape(dy, h.shape, "MixedAttention::backward: dy");
    require_shape(dh, h.shape, "MixedAttention::backward: dh");
    const Shape heads{h.dim(0), h.dim(1), shape_.n_heads, shape_.d_head};
    Tensor<T> d_mixed;
    if (any_shared_computed(cache)) {
      d_mixed = Tensor<T>(heads, T(0));
      project_out_backward<T>(teacher_, cache.mixed.view(), dy, d_mixed.view(), teacher_grads(grads));
    }
    for_each_op([&]<std::size_t I>(std::integral_constant<std::size_t, I>) {
      using Op = std::tuple_element_t<I, std::tuple<Ops...>>;
      grads.weights[I] = T(0);
      if (!cache.computed[I]) return;
      const Tensor<T>& out = cache.outputs[I];
      grads.weights[I] = dot(out.view(), shares_teacher_projections_v<Op> ? d_mixed.view() : dy);
    });
    if (cache.weights_from_logits) {
      T mean = T(0);
      for (std::size_t i = 0; i < n_ops; ++i) mean += cache.weights[i] * grads.weights[i];
      for (std::size_t i = 0; i < n_ops; ++i)
        grads.logits[i] = cache.weights[i] * (grads.weights[i] - mean) / T(temperature_);
    } else {
      grads.logits.fill(T(0));
    }

    Tensor<T> dq, dk, dv;
    if (any_shared_computed(cache)) {
      dq = Tensor<T>(cache.q.shape(), T(0));
      dk = Tensor<T>(cache.k.shape(), T(0));
      dv = Tensor<T>(cache.v.shape(), T(0));
    }
    for_each_op([&]<std::size_t I>(std::integral_constant<std::size_t, I>) {
      using Op = std::tuple_element_t<I, std::tuple<Ops...>>;
      if (!cache.computed[I]) return;
      const Op& op = std::get<I>(ops_);
      const auto& saved = std::get<I>(cache.saved);
      if constexpr (shares_teacher_projections_v<Op>) {
        const Tensor<T> d_out = scaled(d_mixed.view(), cache.weights[I]);
        op.backward(cache.q.view(), cache.k.view(), cache.v.view(), cache.outputs[I].view(), saved, d_out.view(),
                    dq.view(), dk.view(), dv.view());
      } else {
        const Tensor<T> d_out = scaled(dy, cache.weights[I]);
        op.backward(shape_, std::get<I>(params_), h, saved, d_out.view(), dh, std::get<I>(grads.params));
      }
    });
    if (any_shared_computed(cache)) {
      const RopeTable rope(shape_.rope, shape_.d_head, 0, h.dim(1));
      rope.apply(dq.view(), /*inverse=*/true);
      rope.apply(dk.view(), /*inverse=*/true);
      project_qkv_backward<T>(teacher_, h, dq.view(), dk.view(), dv.view(), dh, teacher_grads(grads));
    }
  }

 private:
  template <std::size_t... I>
  Params init_params(Rng& rng, std::index_sequence<I...>) {
    return Params{init_one<I>(rng)...};
  }
  template <std::size_t I>
  auto init_one(Rng& rng) {
    using Op = std::tuple_element_t<I, std::tuple<Ops...>>;
    if constexpr (shares_teacher_projections_v<Op>)
      return NoParams{};
    else
      return std::get<I>(ops_).template init_from_teacher<T>(shape_, teacher_, rng);
  }

  template <class F>
  static void for_each_op(F&& f) {
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (f(std::integral_constant<std::size_t, I>{}), ...);
    }(std::index_sequence_for<Ops...>{});
  }

  static bool any_shared_computed(const Cache& cache) {
    bool any = false;
    for_each_op([&]<std::size_t I>(std::integral_constant<std::size_t, I>) {
      using Op = std::tuple_element_t<I, std::tuple<Ops...>>;
      any = any || (shares_teacher_projections_v<Op> && cache.computed[I]);
    });
    return any;
  }

  AttentionWeights<T>* teacher_grads(Gradients& grads) const { return grads.teacher ? &*grads.teacher : nullptr; }

  static T dot(TensorView<const T> a, TensorView<const T> b) {
    T s = T(0);
    for (index_t i = 0; i < a.numel(); ++i) s += a.data[i] * b.data[i];
    return s;
  }
  static Tensor<T> scaled(TensorView<const T> x, T factor) {
    Tensor<T> out(x.shape);
    for (index_t i = 0; i < x.numel(); ++i) out.data()[i] = factor * x.data[i];
    return out;
  }

  void run_forward(TensorView<const T> h, TensorView<T> y, Cache& cache, const Weights& pi, bool from_logits,
                   const OpMask& run) const {
    require_host(h, "MixedAttention::forward: h");
    require_rank(h, 3, "MixedAttention::forward: h");
    require(h.dim(1) >= 1, "MixedAttention::forward: h has an empty sequence (T = 0), expected T >= 1");
    require_shape(h, Shape{h.dim(0), h.dim(1), shape_.d_model}, "MixedAttention::forward: h");
    require_shape(y, h.shape, "MixedAttention::forward: y");
    require_finite(h, "MixedAttention::forward: h");
    const index_t B = h.dim(0), T_ = h.dim(1);
    const Shape heads{B, T_, shape_.n_heads, shape_.d_head};

    cache.weights = pi;
    cache.weights_from_logits = from_logits;
    cache.computed = run;

    std::fill_n(y.data, y.numel(), T(0));
    if (any_shared_computed(cache)) {
      const Shape kv{B, T_, shape_.n_kv_heads, shape_.d_head};
      cache.q = Tensor<T>(heads), cache.k = Tensor<T>(kv), cache.v = Tensor<T>(kv);
      project_qkv<T>(shape_, teacher_, h, cache.q.view(), cache.k.view(), cache.v.view());
      const RopeTable rope(shape_.rope, shape_.d_head, 0, T_);
      rope.apply(cache.q.view());
      rope.apply(cache.k.view());
      cache.mixed = Tensor<T>(heads, T(0));
    }
    for_each_op([&]<std::size_t I>(std::integral_constant<std::size_t, I>) {
      using Op = std::tuple_element_t<I, std::tuple<Ops...>>;
      if (!cache.computed[I]) return;
      const Op& op = std::get<I>(ops_);
      auto& saved = std::get<I>(cache.saved);
      Tensor<T>& out = cache.outputs[I];
      if constexpr (shares_teacher_projections_v<Op>) {
        out = Tensor<T>(heads);
        op.forward(cache.q.view(), cache.k.view(), cache.v.view(), out.view(), saved);
        eigen::vector(cache.mixed.view()) += pi[I] * eigen::vector(out.view());
      } else {
        out = Tensor<T>(h.shape);
        op.forward(shape_, std::get<I>(params_), h, out.view(), saved);
        eigen::vector(y) += pi[I] * eigen::vector(out.view());
      }
    });
    if (any_shared_computed(cache)) {
      Tensor<T> shared_y(h.shape);
      project_out<T>(shape_, teacher_, cache.mixed.view(), shared_y.view());
      eigen::vector(y) += eigen::vector(shared_y.view());
    }
  }

  AttentionShape shape_;
  AttentionWeights<T> teacher_;
  std::tuple<Ops...> ops_;
  Params params_;
  Weights logits_{};
  double temperature_ = 1.0;
};

// The default precision of the CPU reference: float32.
template <class... Ops>
using MixedAttention = BasicMixedAttention<float, Ops...>;

}  // namespace dash

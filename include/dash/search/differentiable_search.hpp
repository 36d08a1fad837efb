// DifferentiableSearch: stage 2 of DASH (DESIGN.md §2). Every weight is frozen; only the
// architecture logits α ∈ R^{L×m} train.
//
//   π_l = softmax(α_l / τ)                                  τ annealed geometrically τ0 → τ1
//   objective = KL(p_teacher ‖ p_student(π)) + λ · (E_π[cost] / C_ref − b)
//   E_π[cost] = Σ_l Σ_i π_li · c_li                        C_ref: the all-softmax model's cost
//   α ← Adam(∂objective/∂α),   λ ← max(0, λ + η · κ · (E_π[cost] / C_ref − b))
//
// λ is the Lagrange multiplier of the budget (dual ascent); κ, a running mean of the KL, puts the
// multiplier in the KL's units so that η does not depend on how far the student is from the teacher.
// The student mixes with a relaxation of π:
//   softmax            y = π
//   gumbel             y = softmax((α + G) / τ), G ~ Gumbel(0, 1) per layer and candidate
//   straight_through   forward with onehot(argmax y), backward through y (every candidate runs)
// and ∂/∂α of the KL goes through y: ∂y_i/∂α_j = y_i (δ_ij − y_j) / τ. The budget term is the
// deterministic expectation under π. The read-out (architecture) is exact: the one operator per
// layer maximising Σ_l log π_l,op(l) with total cost within the budget (knapsack.hpp). Since
// log π_l,i = α_li/τ − lse_l, that choice does not depend on τ.
//
// A step is a pure function of (state, batch, seed, step): the Gumbel noise is drawn from a
// generator seeded by (seed, step), so a run resumed from a checkpoint repeats an uninterrupted
// one exactly.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <utility>
#include <vector>

#include "dash/core/error.hpp"
#include "dash/core/rng.hpp"
#include "dash/search/adam.hpp"
#include "dash/search/budget.hpp"
#include "dash/search/knapsack.hpp"
#include "dash/search/mixture.hpp"

namespace dash::search {

enum class Relaxation { softmax, gumbel, straight_through };

inline Relaxation parse_relaxation(std::string_view name) {
  if (name == "softmax") return Relaxation::softmax;
  if (name == "gumbel") return Relaxation::gumbel;
  if (name == "straight-through") return Relaxation::straight_through;
  fail("relaxation '", name, "': expected softmax, gumbel or straight-through");
}

struct SearchOptions {
  std::int64_t steps = 100;
  double lr = 0.1;                  // Adam's step on the logits
  double temperature_start = 1.0;   // τ at the first step
  double temperature_end = 0.1;     // τ at the last step
  Relaxation relaxation = Relaxation::softmax;
  double dual_lr = 1.0;             // η
  std::uint64_t seed = 0;

  void validate() const {
    require(steps >= 1, "search: steps = ", steps, ", expected >= 1");
    require(lr > 0 && std::isfinite(lr), "search: lr = ", lr, ", expected > 0");
    require(temperature_start > 0 && temperature_end > 0 && std::isfinite(temperature_start) &&
                std::isfinite(temperature_end),
            "search: temperature ", temperature_start, " → ", temperature_end, ", expected finite values > 0");
    require(dual_lr >= 0 && std::isfinite(dual_lr), "search: dual_lr = ", dual_lr, ", expected >= 0");
  }
};

// Everything a resumed search needs.
struct SearchState {
  std::int64_t step = 0;
  std::vector<double> logits;  // α, [L·m]
  std::vector<double> adam_m, adam_v;
  std::int64_t adam_t = 0;
  double lambda = 0;
  double kl_scale = 0;
};

// What one step did.
struct StepReport {
  std::int64_t step = 0;
  double temperature = 0;
  double kl = 0;
  double expected_cost = 0;  // E_π[cost] / C_ref, before the update
  double lambda = 0;         // after the update
};

template <SearchModel Model>
class DifferentiableSearch {
 public:
  // The candidates are those of finite cost in `costs`.
  DifferentiableSearch(Model& model, CostTable costs, SearchOptions options)
      : model_(model), costs_(std::move(costs)), options_(options), L_(model.n_layers()), m_(model.n_ops()) {
    options_.validate();
    require(costs_.n_layers() == L_ && costs_.n_ops() == m_, "search: a cost table of ", costs_.n_layers(), " × ",
            costs_.n_ops(), " for a model of ", L_, " layers × ", m_, " candidates");
    state_.logits.assign(std::size_t(L_ * m_), 0.0);
    adam_ = Adam(state_.logits.size());
  }

  const SearchOptions& options() const { return options_; }
  const CostTable& costs() const { return costs_; }
  const SearchState& state() const { return state_; }
  bool done() const { return state_.step >= options_.steps; }

  void restore(SearchState s) {
    require(s.logits.size() == state_.logits.size() && s.adam_m.size() == s.logits.size() &&
                s.adam_v.size() == s.logits.size(),
            "search: a checkpoint of ", s.logits.size(), " logits for a search of ", state_.logits.size());
    require(s.step >= 0 && s.step <= options_.steps, "search: checkpoint at step ", s.step, " of a run of ",
            options_.steps, " steps");
    state_ = std::move(s);
    adam_.m() = state_.adam_m, adam_.v() = state_.adam_v, adam_.t() = state_.adam_t;
  }

  double temperature() const { return annealed(options_.temperature_start, options_.temperature_end, state_.step, options_.steps); }

  // π = softmax(α/τ) at the current temperature, [L·m]; 0 for a non-candidate.
  std::vector<double> probabilities() const { return softmax_rows(state_.logits, temperature()); }

  // The exact read-out under the budget.
  std::vector<int> architecture() const {
    std::vector<std::vector<double>> score(static_cast<std::size_t>(L_), std::vector<double>(std::size_t(m_)));
    const std::vector<double> pi = probabilities();
    for (int l = 0; l < L_; ++l)
      for (int i = 0; i < m_; ++i) score[std::size_t(l)][std::size_t(i)] = std::log(pi[index(l, i)]);
    auto ops = best_under_budget(score, costs_);
    if (!ops) {  // π underflowed to 0 where the budget needs it: fall back to the logits themselves
      for (int l = 0; l < L_; ++l)
        for (int i = 0; i < m_; ++i)
          score[std::size_t(l)][std::size_t(i)] = allowed(l, i) ? state_.logits[index(l, i)] : -INFINITY;
      ops = best_under_budget(score, costs_);
    }
    require(bool(ops), "search: no architecture fits the budget");
    return *ops;
  }

  StepReport step(const typename Model::Batch& batch) {
    require(!done(), "search: all ", options_.steps, " steps are done");
    const double tau = temperature();
    const std::vector<double> pi = probabilities();
    std::vector<double> y = pi;
    if (options_.relaxation != Relaxation::softmax) {
      Rng noise(options_.seed ^ (0x9e3779b97f4a7c15ull * std::uint64_t(state_.step + 1)));
      std::vector<double> perturbed = state_.logits;
      for (double& a : perturbed) a += noise.gumbel();
      y = softmax_rows(perturbed, tau);
    }
    Mixture mix(L_, m_);
    for (int l = 0; l < L_; ++l) {
      int top = -1;
      for (int i = 0; i < m_; ++i)
        if (allowed(l, i) && (top < 0 || y[index(l, i)] > y[index(l, top)])) top = i;
      for (int i = 0; i < m_; ++i) {
        const std::size_t k = index(l, i);
        if (options_.relaxation == Relaxation::straight_through) {
          mix.weights[k] = i == top ? 1.0 : 0.0;
          mix.run[k] = allowed(l, i);
        } else {
          mix.weights[k] = y[k];
          mix.run[k] = y[k] > 0;
        }
      }
    }
    const double kl = model_.kl_and_gradient(batch, mix);
    require(std::isfinite(kl), "search: the KL at step ", state_.step, " is ", kl,
            ", expected a finite value (is the model finite on this batch?)");

    const double b = costs_.limit / costs_.reference;
    double expected = 0;
    for (int l = 0; l < L_; ++l)
      for (int i = 0; i < m_; ++i)
        if (allowed(l, i)) expected += pi[index(l, i)] * costs_.cost[std::size_t(l)][std::size_t(i)];
    expected /= costs_.reference;

    std::vector<double> grad(state_.logits.size(), 0.0), penalty(state_.logits.size(), 0.0);
    for (int l = 0; l < L_; ++l)
      for (int i = 0; i < m_; ++i)
        if (allowed(l, i)) penalty[index(l, i)] = state_.lambda * costs_.cost[std::size_t(l)][std::size_t(i)] / costs_.reference;
    add_softmax_backward(y, mix.grad, tau, grad);
    add_softmax_backward(pi, penalty, tau, grad);
    adam_.step(std::span<double>(state_.logits), std::span<const double>(grad), options_.lr);

    state_.kl_scale = state_.step == 0 ? kl : 0.9 * state_.kl_scale + 0.1 * kl;
    state_.lambda = std::max(0.0, state_.lambda + options_.dual_lr * state_.kl_scale * (expected - b));
    state_.adam_m = adam_.m(), state_.adam_v = adam_.v(), state_.adam_t = adam_.t();
    StepReport r{state_.step, tau, kl, expected, state_.lambda};
    ++state_.step;
    return r;
  }

 private:
  std::size_t index(int l, int i) const { return std::size_t(l * m_ + i); }
  bool allowed(int l, int i) const { return std::isfinite(costs_.cost[std::size_t(l)][std::size_t(i)]); }

  std::vector<double> softmax_rows(const std::vector<double>& a, double tau) const {
    std::vector<double> p(a.size(), 0.0);
    for (int l = 0; l < L_; ++l) {
      double top = -INFINITY, sum = 0;
      for (int i = 0; i < m_; ++i)
        if (allowed(l, i)) top = std::max(top, a[index(l, i)] / tau);
      for (int i = 0; i < m_; ++i)
        if (allowed(l, i)) sum += (p[index(l, i)] = std::exp(a[index(l, i)] / tau - top));
      for (int i = 0; i < m_; ++i) p[index(l, i)] /= sum;
    }
    return p;
  }

  // grad_α += Jᵀ·g for y = softmax(·/τ) per layer.
  void add_softmax_backward(const std::vector<double>& y, const std::vector<double>& g, double tau,
                            std::vector<double>& grad) const {
    for (int l = 0; l < L_; ++l) {
      double mean = 0;
      for (int i = 0; i < m_; ++i)
        if (allowed(l, i)) mean += y[index(l, i)] * g[index(l, i)];
      for (int i = 0; i < m_; ++i)
        if (allowed(l, i)) grad[index(l, i)] += y[index(l, i)] * (g[index(l, i)] - mean) / tau;
    }
  }

  Model& model_;
  CostTable costs_;
  SearchOptions options_;
  int L_, m_;
  SearchState state_;
  Adam adam_;
};

}  // namespace dash::search

// DifferentiableSearch: stage 2 of DASH (DESIGN.md §2). Every weight is frozen; only the
// architecture logits α ∈ R^{L×m} train, by Adam on KL(p_teacher ‖ p_student(π)).
//
// The budget holds in expectation at every step. With c_li the cost of candidate i at layer l,
// over the all-softmax model's total, and b the budget in the same unit:
//   π_l = softmax((α_l − λ·c_l) / τ),   λ = min { λ ≥ 0 : Σ_l Σ_i π_li·c_li ≤ b }
// λ is the price of cost (the Lagrange multiplier of the budget), solved exactly per step by
// bisection (E_π[c] decreases in λ), not learnt, so the relaxed student always sits on the
// budget and α only has to learn the value of each candidate. The gradient differentiates
// through λ too: with g = ∂KL/∂π,
//   ∂KL/∂α_lj = π_lj/τ · [(g_lj − ḡ_l) − β·(c_lj − c̄_l)],   β = Σ_l Cov_l(g, c) / Σ_l Var_l(c)
// (means and (co)variances under π_l): the component of g along the cost is regressed out,
// since moving along it only moves λ. Without it, a gradient that favours softmax in every
// layer would raise every α alike and be undone by λ, teaching nothing about which layers
// matter; with it, layers are ranked against each other. τ anneals geometrically τ0 → τ1.
//
// The student mixes with a relaxation of π:
//   softmax            y = π
//   gumbel             y = softmax((α − λ·c + G) / τ), G ~ Gumbel(0, 1) per layer and candidate
//   straight_through   forward with onehot(argmax y), backward through y (every candidate runs)
// and the formula above holds with y in place of π for g's terms (λ stays π's).
//
// The read-out (architecture) is exact: the one operator per layer maximising Σ_l log
// softmax(α_l)_op(l) — the learnt values, without the price — with total cost within the
// budget (knapsack.hpp); it does not depend on τ.
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
  std::uint64_t seed = 0;

  void validate() const {
    require(steps >= 1, "search: steps = ", steps, ", expected >= 1");
    require(lr > 0 && std::isfinite(lr), "search: lr = ", lr, ", expected > 0");
    require(temperature_start > 0 && temperature_end > 0 && std::isfinite(temperature_start) &&
                std::isfinite(temperature_end),
            "search: temperature ", temperature_start, " → ", temperature_end, ", expected finite values > 0");
  }
};

// Everything a resumed search needs.
struct SearchState {
  std::int64_t step = 0;
  std::vector<double> logits;  // α, [L·m]
  std::vector<double> adam_m, adam_v;
  std::int64_t adam_t = 0;
};

// What one step did.
struct StepReport {
  std::int64_t step = 0;
  double temperature = 0;
  double kl = 0;
  double expected_cost = 0;  // E_π[c], a fraction of the all-softmax cost, before the update
  double price = 0;          // λ
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
    require(costs_.reference > 0, "search: the all-softmax cost is ", costs_.reference, ", expected > 0");
    unit_cost_.assign(std::size_t(L_ * m_), 0.0);
    for (int l = 0; l < L_; ++l)
      for (int i = 0; i < m_; ++i)
        if (allowed(l, i)) unit_cost_[index(l, i)] = costs_.cost[std::size_t(l)][std::size_t(i)] / costs_.reference;
    state_.logits.assign(std::size_t(L_ * m_), 0.0);
    state_.adam_m = state_.adam_v = state_.logits;
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

  double temperature() const {
    return annealed(options_.temperature_start, options_.temperature_end, state_.step, options_.steps);
  }

  // λ at the current logits and temperature.
  double price() const { return solve_price(temperature()); }

  // π = softmax((α − λc)/τ), the mixture at the current step, [L·m]; 0 for a non-candidate.
  std::vector<double> probabilities() const {
    const double tau = temperature();
    return priced_softmax(state_.logits, solve_price(tau), tau);
  }

  // The exact read-out under the budget.
  std::vector<int> architecture() const {
    const std::vector<double> value = priced_softmax(state_.logits, 0, 1);
    std::vector<std::vector<double>> score(static_cast<std::size_t>(L_), std::vector<double>(std::size_t(m_)));
    for (int l = 0; l < L_; ++l)
      for (int i = 0; i < m_; ++i)
        score[std::size_t(l)][std::size_t(i)] = allowed(l, i) ? std::log(value[index(l, i)]) : -INFINITY;
    const auto ops = best_under_budget(score, costs_);
    require(bool(ops), "search: no architecture fits the budget");
    return *ops;
  }

  StepReport step(const typename Model::Batch& batch) {
    require(!done(), "search: all ", options_.steps, " steps are done");
    const double tau = temperature(), lambda = solve_price(tau);
    const std::vector<double> pi = priced_softmax(state_.logits, lambda, tau);
    std::vector<double> y = pi;
    if (options_.relaxation != Relaxation::softmax) {
      Rng noise(options_.seed ^ (0x9e3779b97f4a7c15ull * std::uint64_t(state_.step + 1)));
      std::vector<double> perturbed = state_.logits;
      for (double& a : perturbed) a += noise.gumbel();
      y = priced_softmax(perturbed, lambda, tau);
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
    const std::vector<double> grad = logit_gradient(y, mix.grad, pi, lambda, tau);
    adam_.step(std::span<double>(state_.logits), std::span<const double>(grad), options_.lr);
    state_.adam_m = adam_.m(), state_.adam_v = adam_.v(), state_.adam_t = adam_.t();
    const StepReport r{state_.step, tau, kl, expected_cost(pi), lambda};
    ++state_.step;
    return r;
  }

 private:
  std::size_t index(int l, int i) const { return std::size_t(l * m_ + i); }
  bool allowed(int l, int i) const { return std::isfinite(costs_.cost[std::size_t(l)][std::size_t(i)]); }
  double budget() const { return costs_.limit / costs_.reference; }

  std::vector<double> priced_softmax(const std::vector<double>& a, double lambda, double tau) const {
    std::vector<double> p(a.size(), 0.0);
    for (int l = 0; l < L_; ++l) {
      double top = -INFINITY, sum = 0;
      for (int i = 0; i < m_; ++i)
        if (allowed(l, i)) top = std::max(top, (a[index(l, i)] - lambda * unit_cost_[index(l, i)]) / tau);
      for (int i = 0; i < m_; ++i)
        if (allowed(l, i)) sum += (p[index(l, i)] = std::exp((a[index(l, i)] - lambda * unit_cost_[index(l, i)]) / tau - top));
      for (int i = 0; i < m_; ++i) p[index(l, i)] /= sum;
    }
    return p;
  }

  double expected_cost(const std::vector<double>& p) const {
    double e = 0;
    for (std::size_t k = 0; k < p.size(); ++k) e += p[k] * unit_cost_[k];
    return e;
  }

  // The least λ ≥ 0 whose mixture fits the budget, by bisection to relative precision 1e-12. A
  // budget only the cheapest choice meets is approached as λ grows; λ stops at 2^60.
  double solve_price(double tau) const {
    const auto fits = [&](double lambda) { return expected_cost(priced_softmax(state_.logits, lambda, tau)) <= budget(); };
    if (fits(0)) return 0;
    double hi = 1;
    while (!fits(hi) && hi < 0x1p60) hi *= 2;
    double lo = hi / 2 < 1 ? 0 : hi / 2;
    for (int it = 0; it < 200 && hi - lo > 1e-12 * hi; ++it) {
      const double mid = 0.5 * (lo + hi);
      (fits(mid) ? hi : lo) = mid;
    }
    return hi;
  }

  std::vector<double> logit_gradient(const std::vector<double>& y, const std::vector<double>& g,
                                     const std::vector<double>& pi, double lambda, double tau) const {
    // Per layer: ḡ and c̄ under y, Cov_y(g, c); c̄ and Var(c) under π (λ's own sensitivity).
    double covariance = 0, variance = 0;
    std::vector<double> g_mean(std::size_t(L_), 0.0), c_mean_y(std::size_t(L_), 0.0), c_mean_pi(std::size_t(L_), 0.0);
    for (int l = 0; l < L_; ++l) {
      for (int i = 0; i < m_; ++i) {
        const std::size_t k = index(l, i);
        g_mean[std::size_t(l)] += y[k] * g[k];
        c_mean_y[std::size_t(l)] += y[k] * unit_cost_[k];
        c_mean_pi[std::size_t(l)] += pi[k] * unit_cost_[k];
      }
      for (int i = 0; i < m_; ++i) {
        const std::size_t k = index(l, i);
        covariance += y[k] * (g[k] - g_mean[std::size_t(l)]) * (unit_cost_[k] - c_mean_y[std::size_t(l)]);
        variance += pi[k] * (unit_cost_[k] - c_mean_pi[std::size_t(l)]) * (unit_cost_[k] - c_mean_pi[std::size_t(l)]);
      }
    }
    // β applies only while the budget binds (λ > 0); a vanishing variance means π is already
    // discrete in cost and λ cannot move it.
    const double beta = lambda > 0 && variance > 0 ? covariance / variance : 0;
    std::vector<double> grad(state_.logits.size(), 0.0);
    for (int l = 0; l < L_; ++l)
      for (int i = 0; i < m_; ++i) {
        const std::size_t k = index(l, i);
        if (!allowed(l, i)) continue;
        grad[k] = (y[k] * (g[k] - g_mean[std::size_t(l)]) - beta * pi[k] * (unit_cost_[k] - c_mean_pi[std::size_t(l)])) / tau;
      }
    return grad;
  }

  Model& model_;
  CostTable costs_;
  SearchOptions options_;
  int L_, m_;
  std::vector<double> unit_cost_;  // c / C_ref, 0 for a non-candidate
  SearchState state_;
  Adam adam_;
};

}  // namespace dash::search

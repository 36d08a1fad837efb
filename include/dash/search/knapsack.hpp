// The exact read-out: one operator per layer, maximising Σ_l score[l][op_l] subject to
// Σ_l cost[l][op_l] ≤ limit (a multiple-choice knapsack, DESIGN.md §2).
//
// Dynamic programming over the Pareto frontier of partial sums: after layer l, keep every
// (cost, score) reachable by layers 0 … l that no other partial sum beats on both (cheaper or
// equal and better). The frontier is exact for real-valued costs and stays small when layers
// share their costs (at most one point per distinct total), as they do in a uniform model.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "dash/core/error.hpp"
#include "dash/search/budget.hpp"

namespace dash::search {

// `score[l][i]` may be -∞ (never chosen); costs of +∞ are never chosen. Returns nothing when no
// choice fits.
inline std::optional<std::vector<int>> best_under_budget(const std::vector<std::vector<double>>& score,
                                                         const CostTable& costs) {
  const std::size_t L = costs.cost.size();
  require(score.size() == L, "best_under_budget: ", score.size(), " score rows for ", L, " layers");
  struct Point {
    double cost, score;
    std::int32_t parent, op;  // index in the previous layer's frontier; the op chosen at this layer
  };
  std::vector<std::vector<Point>> frontier(L + 1);
  frontier[0].push_back({0, 0, -1, -1});
  for (std::size_t l = 0; l < L; ++l) {
    require(score[l].size() == costs.cost[l].size(), "best_under_budget: layer ", l, " has ", score[l].size(),
            " scores for ", costs.cost[l].size(), " operators");
    std::vector<Point> next;
    for (std::size_t p = 0; p < frontier[l].size(); ++p)
      for (std::size_t i = 0; i < score[l].size(); ++i) {
        const double c = frontier[l][p].cost + costs.cost[l][i], s = frontier[l][p].score + score[l][i];
        if (std::isfinite(c) && s > -INFINITY && costs.fits(c)) next.push_back({c, s, std::int32_t(p), std::int32_t(i)});
      }
    // Cheapest first, best first among equal costs; keep a point only if it beats every cheaper one.
    std::sort(next.begin(), next.end(),
              [](const Point& a, const Point& b) { return a.cost != b.cost ? a.cost < b.cost : a.score > b.score; });
    for (const Point& q : next)
      if (frontier[l + 1].empty() || q.score > frontier[l + 1].back().score) frontier[l + 1].push_back(q);
    if (frontier[l + 1].empty()) return std::nullopt;
  }
  // The best score is the last point of the frontier (scores increase along it).
  std::vector<int> ops(L);
  std::int32_t p = std::int32_t(frontier[L].size()) - 1;
  for (std::size_t l = L; l > 0; --l) {
    const Point& q = frontier[l][std::size_t(p)];
    ops[l - 1] = q.op;
    p = q.parent;
  }
  return ops;
}

// Every architecture whose cost fits, in lexicographic order of the per-layer choices; throws
// when there are more than `max_count`.
inline std::vector<std::vector<int>> all_under_budget(const CostTable& costs, std::size_t max_count) {
  const int L = costs.n_layers(), m = costs.n_ops();
  // cheapest_rest[l]: the least the layers l … L−1 can cost, to prune early.
  std::vector<double> cheapest_rest(static_cast<std::size_t>(L) + 1, 0);
  for (int l = L - 1; l >= 0; --l)
    cheapest_rest[std::size_t(l)] =
        cheapest_rest[std::size_t(l) + 1] + *std::min_element(costs.cost[std::size_t(l)].begin(), costs.cost[std::size_t(l)].end());
  std::vector<std::vector<int>> out;
  std::vector<int> ops(static_cast<std::size_t>(L));
  const auto visit = [&](auto&& self, int l, double spent) -> void {
    if (l == L) {
      require(out.size() < max_count, "enumerate: more than ", max_count,
              " architectures fit the budget; too many to score one by one");
      out.push_back(ops);
      return;
    }
    for (int i = 0; i < m; ++i) {
      const double c = spent + costs.cost[std::size_t(l)][std::size_t(i)];
      if (!std::isfinite(c) || !costs.fits(c + cheapest_rest[std::size_t(l) + 1])) continue;
      ops[std::size_t(l)] = i;
      self(self, l + 1, c);
    }
  };
  visit(visit, 0, 0.0);
  return out;
}

}  // namespace dash::search

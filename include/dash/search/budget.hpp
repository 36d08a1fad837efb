// Budgets: a bound on the total cost of an architecture (DESIGN.md §2, "Budget").
//
//   kv=0.25            KV cache / recurrent state bytes ≤ 0.25 × the all-softmax model's, at the
//                      target context length
//   flops=0.3          token-mixing FLOPs ≤ 0.3 × the all-softmax model's
//   softmax-layers=8   at most 8 layers of full softmax attention
//
// A CostTable holds, per layer and candidate operator, the cost in the budget's unit, and the
// limit in that unit; the all-softmax model's cost is its reference (a fraction of 1 means
// "as dear as the teacher").
#pragma once

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "dash/core/error.hpp"
#include "dash/ops/operator.hpp"

namespace dash::search {

enum class CostKind { kv_bytes, flops, softmax_layers };

inline double cost_in(const Cost& c, CostKind kind) {
  switch (kind) {
    case CostKind::kv_bytes: return c.kv_bytes;
    case CostKind::flops: return c.flops;
    case CostKind::softmax_layers: return c.softmax_layers;
  }
  return 0;
}

struct Budget {
  CostKind kind = CostKind::kv_bytes;
  double value = 0.25;  // a fraction of the all-softmax cost (kv, flops) or a layer count

  static Budget parse(std::string_view text) {
    const auto eq = text.find('=');
    const std::string_view key = text.substr(0, eq), number = eq == text.npos ? "" : text.substr(eq + 1);
    Budget b;
    if (key == "kv")
      b.kind = CostKind::kv_bytes;
    else if (key == "flops")
      b.kind = CostKind::flops;
    else if (key == "softmax-layers")
      b.kind = CostKind::softmax_layers;
    else
      fail("budget '", text, "': unknown kind '", key, "', expected kv=F, flops=F or softmax-layers=N");
    const auto [end, ec] = std::from_chars(number.data(), number.data() + number.size(), b.value);
    require(ec == std::errc() && end == number.data() + number.size() && !number.empty(), "budget '", text,
            "': '", number, "' is not a number");
    if (b.kind == CostKind::softmax_layers)
      require(b.value >= 0 && b.value == std::floor(b.value), "budget '", text,
              "': expected a whole number of softmax layers >= 0");
    else
      require(b.value > 0 && std::isfinite(b.value), "budget '", text,
              "': expected a fraction of the all-softmax cost > 0");
    return b;
  }

  std::string to_string() const {
    char number[32];
    const auto end = std::to_chars(number, number + sizeof number, value).ptr;
    const char* key = kind == CostKind::kv_bytes ? "kv" : kind == CostKind::flops ? "flops" : "softmax-layers";
    return std::string(key) + "=" + std::string(number, end);
  }
};

// Costs per layer and candidate, in the budget's unit. A candidate outside the search space has
// cost +∞ (it is never chosen).
struct CostTable {
  CostKind kind = CostKind::kv_bytes;
  std::vector<std::vector<double>> cost;  // [layer][op]
  double reference = 0;                   // the all-softmax model's total
  double limit = 0;                       // the budget, in the same unit

  int n_layers() const { return int(cost.size()); }
  int n_ops() const { return cost.empty() ? 0 : int(cost[0].size()); }

  double total(const std::vector<int>& ops) const {
    double sum = 0;
    for (std::size_t l = 0; l < ops.size(); ++l) sum += cost[l][std::size_t(ops[l])];
    return sum;
  }
  bool fits(double total_cost) const { return total_cost <= limit * (1 + 1e-12); }

  // The cheapest and the dearest architectures' totals (allowed candidates only).
  double cheapest() const { return extreme(/*dearest=*/false); }
  double dearest() const { return extreme(/*dearest=*/true); }

 private:
  double extreme(bool dearest) const {
    double sum = 0;
    for (const auto& row : cost) {
      double best = dearest ? -INFINITY : INFINITY;
      for (double c : row)
        if (std::isfinite(c)) best = dearest ? std::max(best, c) : std::min(best, c);
      sum += best;
    }
    return sum;
  }
};

// costs[l][i]: operator i's cost at layer l; allowed[i]: whether it is a candidate; softmax_cost:
// the cost of full softmax attention at one layer (the teacher's). Throws when no architecture
// fits the budget, naming the cheapest one's cost.
inline CostTable make_cost_table(const Budget& budget, const std::vector<std::vector<Cost>>& costs,
                                 const std::vector<bool>& allowed, const Cost& softmax_cost,
                                 const std::vector<std::string>& op_names) {
  require(!costs.empty(), "budget: the model has no layers");
  CostTable t;
  t.kind = budget.kind;
  for (const auto& layer : costs) {
    require(layer.size() == allowed.size(), "budget: ", layer.size(), " costs for ", allowed.size(), " operators");
    std::vector<double> row;
    for (std::size_t i = 0; i < layer.size(); ++i)
      row.push_back(allowed[i] ? cost_in(layer[i], budget.kind) : INFINITY);
    t.cost.push_back(std::move(row));
    t.reference += cost_in(softmax_cost, budget.kind);
  }
  t.limit = budget.kind == CostKind::softmax_layers ? budget.value : budget.value * t.reference;
  if (!t.fits(t.cheapest())) {
    std::string cheapest;
    for (const auto& row : t.cost) {
      const auto it = std::min_element(row.begin(), row.end());
      cheapest += (cheapest.empty() ? "" : ",") + op_names[std::size_t(it - row.begin())];
    }
    fail("budget ", budget.to_string(), " (", t.limit, ") is below the cheapest architecture's cost ", t.cheapest(),
         " (", budget.kind == CostKind::softmax_layers ? "" : std::to_string(t.cheapest() / t.reference) + " of all-softmax; ",
         "layers ", cheapest, ")");
  }
  return t;
}

}  // namespace dash::search

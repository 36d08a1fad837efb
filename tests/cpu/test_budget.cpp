// Budgets, the exact read-out and the selector baselines, against brute force over every
// architecture.
#include <doctest/doctest.h>

#include <cmath>
#include <set>

#include "dash/search/baselines.hpp"
#include "dash/search/budget.hpp"
#include "dash/search/knapsack.hpp"
#include "support/errors.hpp"
#include "support/random.hpp"

using namespace dash;
using namespace dash::search;

namespace {

// Every architecture of L layers × m ops, by counting in base m.
std::vector<std::vector<int>> every_architecture(int L, int m) {
  std::vector<std::vector<int>> out;
  std::vector<int> ops(static_cast<std::size_t>(L), 0);
  while (true) {
    out.push_back(ops);
    int l = 0;
    while (l < L && ++ops[std::size_t(l)] == m) ops[std::size_t(l++)] = 0;
    if (l == L) return out;
  }
}

double total_score(const std::vector<std::vector<double>>& score, const std::vector<int>& ops) {
  double s = 0;
  for (std::size_t l = 0; l < ops.size(); ++l) s += score[l][std::size_t(ops[l])];
  return s;
}

CostTable random_table(Rng& rng, int L, int m, bool integer_costs) {
  CostTable t;
  t.kind = CostKind::kv_bytes;
  for (int l = 0; l < L; ++l) {
    std::vector<double> row;
    for (int i = 0; i < m; ++i) row.push_back(integer_costs ? double(rng.below(5)) : rng.uniform(0, 10));
    t.cost.push_back(row);
  }
  t.reference = 10.0 * L;
  t.limit = rng.uniform(0, 6.0 * L);
  return t;
}

}  // namespace

TEST_CASE("The knapsack read-out is the best architecture under the budget (brute force)") {
  Rng rng = test::rng_for("knapsack");
  for (int trial = 0; trial < 300; ++trial) {
    const int L = 1 + int(rng.below(6)), m = 1 + int(rng.below(4));
    CostTable t = random_table(rng, L, m, trial % 2 == 0);  // integer costs make many ties
    if (trial % 7 == 0) t.cost[0][0] = INFINITY;             // a non-candidate
    std::vector<std::vector<double>> score(static_cast<std::size_t>(L), std::vector<double>(std::size_t(m)));
    for (auto& row : score)
      for (double& s : row) s = trial % 3 == 0 ? std::log(rng.uniform()) : rng.normal();
    if (trial % 5 == 0) score[std::size_t(L - 1)][0] = -INFINITY;
    double best = -INFINITY;
    for (const auto& ops : every_architecture(L, m))
      if (std::isfinite(t.total(ops)) && t.fits(t.total(ops))) best = std::max(best, total_score(score, ops));
    const auto chosen = best_under_budget(score, t);
    CAPTURE(trial);
    if (best == -INFINITY) {
      CHECK_FALSE(chosen.has_value());
      continue;
    }
    REQUIRE(chosen.has_value());
    CHECK(t.fits(t.total(*chosen)));
    CHECK(total_score(score, *chosen) == doctest::Approx(best).epsilon(1e-12));
  }
}

TEST_CASE("Enumeration lists exactly the architectures that fit") {
  Rng rng = test::rng_for("enumerate");
  for (int trial = 0; trial < 100; ++trial) {
    const int L = 1 + int(rng.below(5)), m = 1 + int(rng.below(4));
    const CostTable t = random_table(rng, L, m, trial % 2 == 0);
    std::set<std::vector<int>> expected;
    for (const auto& ops : every_architecture(L, m))
      if (t.fits(t.total(ops))) expected.insert(ops);
    const auto listed = all_under_budget(t, 100000);
    CHECK(std::set<std::vector<int>>(listed.begin(), listed.end()) == expected);
    CHECK(listed.size() == expected.size());
    if (expected.size() > 1) CHECK_THROWS_AS(all_under_budget(t, expected.size() - 1), Error);
  }
}

TEST_CASE("Budgets parse, and name what is wrong") {
  CHECK(Budget::parse("kv=0.25").kind == CostKind::kv_bytes);
  CHECK(Budget::parse("kv=0.25").value == 0.25);
  CHECK(Budget::parse("flops=0.3").kind == CostKind::flops);
  CHECK(Budget::parse("softmax-layers=8").value == 8);
  CHECK(Budget::parse("softmax-layers=8").to_string() == "softmax-layers=8");
  CHECK(Budget::parse(Budget::parse("kv=0.125").to_string()).value == 0.125);
  CHECK(test::contains(test::error_of([] { Budget::parse("ram=3"); }), "unknown kind 'ram'"));
  CHECK(test::contains(test::error_of([] { Budget::parse("kv=abc"); }), "not a number"));
  CHECK(test::contains(test::error_of([] { Budget::parse("kv="); }), "not a number"));
  CHECK(test::contains(test::error_of([] { Budget::parse("kv=-1"); }), "fraction"));
  CHECK(test::contains(test::error_of([] { Budget::parse("softmax-layers=1.5"); }), "whole number"));
}

TEST_CASE("A budget below the cheapest architecture is refused with that architecture's cost") {
  const Cost softmax{.kv_bytes = 100, .flops = 100, .softmax_layers = 1};
  const Cost linear{.kv_bytes = 10, .flops = 30, .softmax_layers = 0};
  const std::vector<std::vector<Cost>> costs(4, {softmax, linear});
  const std::vector<std::string> names{"softmax", "gla"};
  const CostTable fits = make_cost_table(Budget::parse("kv=0.1"), costs, {true, true}, softmax, names);
  CHECK(fits.limit == doctest::Approx(40));
  CHECK(fits.cheapest() == 40);
  CHECK(fits.dearest() == 400);
  const std::string e = test::error_of([&] { make_cost_table(Budget::parse("kv=0.05"), costs, {true, true}, softmax, names); });
  CHECK(test::contains(e, "below the cheapest architecture"));
  CHECK(test::contains(e, "gla,gla,gla,gla"));
  // Without the linear candidate the cheapest is all-softmax.
  CHECK_THROWS_AS(make_cost_table(Budget::parse("kv=0.5"), costs, {true, false}, softmax, names), Error);
  // Softmax need not be a candidate; the reference stays the all-softmax model.
  const CostTable linear_only = make_cost_table(Budget::parse("softmax-layers=0"), costs, {false, true}, softmax, names);
  CHECK(linear_only.reference == 4);
  CHECK(std::isinf(linear_only.cost[0][0]));
}

TEST_CASE("Selector baselines place as many softmax layers as fit, where they say") {
  Rng rng = test::rng_for("baselines");
  const int L = 3 + int(rng.below(20));
  const int K = int(rng.below(std::uint64_t(L)));
  CostTable t;
  t.kind = CostKind::softmax_layers;
  t.cost.assign(std::size_t(L), {1.0, 0.0, 0.0});
  t.reference = L, t.limit = K;
  const SoftmaxPlacement place(t, /*softmax=*/0, /*filler=*/2);
  CAPTURE(L);
  CAPTURE(K);
  REQUIRE(place.softmax_layers() == K);
  const auto softmax_at = [](const std::vector<int>& ops) {
    std::vector<int> at;
    for (std::size_t l = 0; l < ops.size(); ++l)
      if (ops[l] == 0) at.push_back(int(l));
      else CHECK(ops[l] == 2);
    return at;
  };
  for (const auto& ops : {place.even(), place.first(), place.last(), place.random(1), place.random(2)}) {
    CHECK(ops.size() == std::size_t(L));
    CHECK(softmax_at(ops).size() == std::size_t(K));
  }
  std::vector<int> first, last;
  for (int j = 0; j < K; ++j) first.push_back(j), last.push_back(L - K + j);
  CHECK(softmax_at(place.first()) == first);
  CHECK(softmax_at(place.last()) == last);
  const auto even = softmax_at(place.even());  // gaps differ by at most one
  for (std::size_t j = 2; j < even.size(); ++j) CHECK(std::abs((even[j] - even[j - 1]) - (even[1] - even[0])) <= 1);
  // KL-guided keeps the layers whose restoration lowers the KL most.
  std::vector<double> kl_with(static_cast<std::size_t>(L));
  for (double& k : kl_with) k = rng.uniform();
  const auto guided = softmax_at(place.kl_guided([&](const std::vector<int>& ops) {
    const auto at = softmax_at(ops);
    REQUIRE(at.size() == 1);
    return kl_with[std::size_t(at[0])];
  }));
  for (int l = 0; l < L; ++l) {
    const bool kept = std::find(guided.begin(), guided.end(), l) != guided.end();
    for (int other : guided)
      if (!kept) CHECK(kl_with[std::size_t(other)] <= kl_with[std::size_t(l)]);
  }
  // Random placements differ between seeds (unless K is 0 or L).
  if (K > 0 && K < L) {
    bool differ = false;
    for (std::uint64_t s = 2; s < 20 && !differ; ++s) differ = place.random(1) != place.random(s);
    CHECK(differ);
  }
}

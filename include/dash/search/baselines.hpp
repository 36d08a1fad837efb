// Selector baselines at the same budget (DESIGN.md §2, stage 3): K layers keep softmax, every
// other layer takes one cheaper "filler" operator, K as large as the budget allows. They
// differ only in which layers keep softmax:
//   even        evenly spaced:  layer ⌊(j + ½)·L/K⌋ for j = 0 … K−1
//   first-K     layers 0 … K−1
//   last-K      layers L−K … L−1
//   random      K distinct layers drawn with a seed
//   kl-guided   start all-filler, restore each layer to softmax alone, keep the K whose
//               restoration lowers the KL most (arXiv 2512.20569's ranking)
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include "dash/core/error.hpp"
#include "dash/core/rng.hpp"
#include "dash/search/budget.hpp"

namespace dash::search {

struct Selection {
  std::string name;
  std::vector<int> ops;  // one operator per layer
};

class SoftmaxPlacement {
 public:
  SoftmaxPlacement(const CostTable& costs, int softmax, int filler) : costs_(costs), softmax_(softmax), filler_(filler) {
    const int L = costs.n_layers();
    require(softmax != filler, "baselines: the filler must not be softmax");
    k_ = -1;
    for (int k = 0; k <= L; ++k)
      if (costs.fits(costs.total(with_softmax_at(first_k(k))))) k_ = k;
    require(k_ >= 0, "baselines: not even the all-filler architecture fits the budget");
  }

  int softmax_layers() const { return k_; }
  int n_layers() const { return costs_.n_layers(); }

  std::vector<int> even() const {
    std::vector<int> layers;
    for (int j = 0; j < k_; ++j) layers.push_back(int((double(j) + 0.5) * n_layers() / k_));
    return with_softmax_at(layers);
  }
  std::vector<int> first() const { return with_softmax_at(first_k(k_)); }
  std::vector<int> last() const {
    std::vector<int> layers(static_cast<std::size_t>(k_));
    std::iota(layers.begin(), layers.end(), n_layers() - k_);
    return with_softmax_at(layers);
  }
  std::vector<int> random(std::uint64_t seed) const {
    std::vector<int> all(static_cast<std::size_t>(n_layers()));
    std::iota(all.begin(), all.end(), 0);
    Rng rng(seed);
    for (std::size_t i = 0; i < std::size_t(k_); ++i)  // a partial Fisher–Yates shuffle
      std::swap(all[i], all[i + rng.below(all.size() - i)]);
    all.resize(std::size_t(k_));
    return with_softmax_at(all);
  }
  // `kl(ops)`: the KL of an architecture on calibration text.
  std::vector<int> kl_guided(const std::function<double(const std::vector<int>&)>& kl) const {
    std::vector<std::pair<double, int>> drop;
    for (int l = 0; l < n_layers(); ++l) drop.push_back({kl(with_softmax_at({l})), l});
    std::stable_sort(drop.begin(), drop.end());  // lowest KL after restoring = largest drop
    std::vector<int> layers;
    for (int j = 0; j < k_; ++j) layers.push_back(drop[std::size_t(j)].second);
    return with_softmax_at(layers);
  }

  std::vector<int> with_softmax_at(const std::vector<int>& layers) const {
    std::vector<int> ops(static_cast<std::size_t>(n_layers()), filler_);
    for (int l : layers) ops[std::size_t(l)] = softmax_;
    return ops;
  }

 private:
  static std::vector<int> first_k(int k) {
    std::vector<int> layers(static_cast<std::size_t>(k));
    std::iota(layers.begin(), layers.end(), 0);
    return layers;
  }

  const CostTable& costs_;
  int softmax_, filler_, k_;
};

}  // namespace dash::search

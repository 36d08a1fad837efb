// DifferentiableSearch and candidate preparation: the gradient the search follows (finite
// differences in float64), the search against brute force on a model whose objective is known,
// and on stories260K: preparation lowers the alignment error, candidates round-trip and refuse
// another teacher, a run is a function of its seed, and a resumed run equals an uninterrupted one.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>

#include "dash/io/candidates.hpp"
#include "dash/io/checkpoint.hpp"
#include "dash/io/load.hpp"
#include "dash/io/text.hpp"
#include "dash/search.hpp"
#include "support/compare.hpp"
#include "support/errors.hpp"
#include "support/models.hpp"
#include "support/random.hpp"
#include "support/random_model.hpp"

using namespace dash;
using namespace dash::search;

namespace {

// A model whose KL is Σ_l Σ_i π_li·damage_li: the best architecture under a budget is known by
// brute force, and a search must find it.
struct SeparableModel {
  using Batch = int;
  std::vector<std::vector<double>> damage;
  int n_layers() const { return int(damage.size()); }
  int n_ops() const { return int(damage[0].size()); }
  double kl_and_gradient(const Batch&, Mixture& mix) const {
    double kl = 0;
    for (int l = 0; l < n_layers(); ++l)
      for (int i = 0; i < n_ops(); ++i) {
        kl += mix.weight(l, i) * damage[std::size_t(l)][std::size_t(i)];
        mix.grad[std::size_t(l * n_ops() + i)] = mix.runs(l, i) ? damage[std::size_t(l)][std::size_t(i)] : 0.0;
      }
    return kl;
  }
};
static_assert(SearchModel<SeparableModel>);

using StoriesMixer = MixedAttention<Softmax, SlidingWindow<>, GatedLinear>;
using StoriesDecoder = model::Decoder<float, StoriesMixer>;
constexpr int softmax_op = 0, swa_op = 1, gla_op = 2;

struct Stories {
  io::Checkpoint checkpoint;
  std::vector<int> tokens;  // the first stories of the TinyStories sample, BOS + text each
};

const Stories& stories() {
  static const Stories s = [] {
    const auto dir = test::fixtures() / "stories260K";
    io::LoadedModel loaded = io::load_model(dir / "stories260K.bin", dir / "tok512.bin");
    Stories out{std::move(loaded.checkpoint), {}};
    for (const auto& doc : io::read_documents(test::fixtures() / "text" / "tinystories_sample.txt")) {
      const auto ids = loaded.tokenizer->encode(doc, true);
      out.tokens.insert(out.tokens.end(), ids.begin(), ids.end());
      if (out.tokens.size() > 4096) break;
    }
    return out;
  }();
  return s;
}

StoriesDecoder stories_decoder() {
  io::Checkpoint c = stories().checkpoint;
  Rng rng(1);
  return StoriesDecoder(c.config, std::move(c.weights), [&](int, const AttentionShape& s, AttentionWeights<float> w) {
    return StoriesMixer(s, std::move(w), rng, Softmax{}, SlidingWindow<>(32), GatedLinear{});
  });
}

// batch × length tokens starting at a position drawn from (seed, step).
std::vector<int> window_at(std::uint64_t seed, std::int64_t step, index_t batch, index_t length) {
  Rng rng(seed * 1000003 + std::uint64_t(step));
  std::vector<int> ids;
  for (index_t b = 0; b < batch; ++b) {
    const auto start = rng.below(stories().tokens.size() - std::size_t(length));
    ids.insert(ids.end(), stories().tokens.begin() + long(start), stories().tokens.begin() + long(start + std::size_t(length)));
  }
  return ids;
}

CostTable softmax_layer_budget(const StoriesDecoder& d, double layers) {
  std::vector<std::vector<Cost>> costs;
  for (const auto& mixer : d.mixers()) {
    const auto c = mixer.costs({.shape = mixer.shape(), .context = 512});
    costs.emplace_back(c.begin(), c.end());
  }
  return make_cost_table(Budget{CostKind::softmax_layers, layers}, costs, {true, true, true}, costs[0][softmax_op],
                         {"softmax", "swa", "gla"});
}

// A search of `steps` steps on stories260K; `interrupt_at` saves a checkpoint there and finishes
// in a fresh search object restored from it.
SearchState run_search(const StoriesDecoder& d, SearchOptions options, std::int64_t interrupt_at = -1) {
  const std::filesystem::path ckpt = std::filesystem::temp_directory_path() / ("dash_test_" + std::to_string(::getpid()) + ".ckpt");
  DecoderSearchModel<float, Softmax, SlidingWindow<>, GatedLinear> model(d);
  auto search = std::make_unique<DifferentiableSearch<decltype(model)>>(model, softmax_layer_budget(d, 2), options);
  while (!search->done()) {
    if (search->state().step == interrupt_at) {
      save_checkpoint(ckpt, search->state(), "test run");
      search = std::make_unique<DifferentiableSearch<decltype(model)>>(model, softmax_layer_budget(d, 2), options);
      search->restore(load_checkpoint(ckpt, "test run"));
      std::filesystem::remove(ckpt);
    }
    const auto ids = window_at(options.seed, search->state().step, 2, 48);
    search->step({ids, 2, 48});
  }
  return search->state();
}

}  // namespace

TEST_CASE("dKL/dπ of the decoder search model equals finite differences (float64)") {
  Rng rng = test::rng_for("search gradient");
  for (int trial = 0; trial < 3; ++trial) {
    const model::Config c = test::random_config(rng);
    auto d = test::make_decoder<double>(c, model::Weights<double>::random(c, rng), rng, Softmax{}, SlidingWindow<>(3),
                                        GatedLinear{.chunk = 4});
    const DecoderSearchModel<double, Softmax, SlidingWindow<>, GatedLinear> model(d);
    const index_t B = 2, T = 5 + index_t(rng.below(6));
    const auto ids = test::random_ids(rng, B * T, c.vocab_size);
    Mixture mix(c.n_layers, 3);
    for (std::size_t k = 0; k < mix.weights.size(); ++k) mix.weights[k] = rng.uniform(0.1, 1), mix.run[k] = 1;
    model.kl_and_gradient({ids, B, T}, mix);
    Tensor<double> pi(Shape{index_t(mix.weights.size())}), grad(pi.shape());
    std::copy(mix.weights.begin(), mix.weights.end(), pi.data());
    std::copy(mix.grad.begin(), mix.grad.end(), grad.data());
    const double error = test::finite_difference_error(pi.view(), grad.view(), [&] {
      Mixture m = mix;
      std::copy(pi.data(), pi.data() + pi.numel(), m.weights.begin());
      return model.kl_and_gradient({ids, B, T}, m);
    }, rng);
    CHECK(error <= 1e-6);
  }
}

TEST_CASE("The search finds the best architecture under the budget when the objective is known") {
  Rng rng = test::rng_for("separable search");
  for (int trial = 0; trial < 20; ++trial) {
    const int L = 2 + int(rng.below(7));
    // Op 0 ("softmax") is exact and costs a layer; ops 1 and 2 are free and damage the layer,
    // the better of them by a benefit that differs between layers by at least 0.05.
    std::vector<double> benefit;
    for (int l = 0; l < L; ++l) benefit.push_back(0.05 * (l + 1));
    for (int l = L - 1; l > 0; --l) std::swap(benefit[std::size_t(l)], benefit[rng.below(std::uint64_t(l) + 1)]);
    SeparableModel model;
    CostTable costs;
    costs.kind = CostKind::softmax_layers;
    for (int l = 0; l < L; ++l) {
      const double other = benefit[std::size_t(l)] + rng.uniform(0.05, 0.5);
      model.damage.push_back(rng.below(2) ? std::vector<double>{0.0, benefit[std::size_t(l)], other}
                                          : std::vector<double>{0.0, other, benefit[std::size_t(l)]});
      costs.cost.push_back({1.0, 0.0, 0.0});
    }
    costs.reference = L, costs.limit = double(rng.below(std::uint64_t(L)));
    double best = INFINITY;
    for (const auto& ops : all_under_budget(costs, 100000)) {
      double damage = 0;
      for (int l = 0; l < L; ++l) damage += model.damage[std::size_t(l)][std::size_t(ops[std::size_t(l)])];
      best = std::min(best, damage);
    }
    SearchOptions options{.steps = 300, .lr = 0.05, .seed = rng.next_u64()};
    DifferentiableSearch<SeparableModel> search(model, costs, options);
    while (!search.done()) {
      const StepReport r = search.step(0);
      CHECK(r.expected_cost <= costs.limit / costs.reference * (1 + 1e-9));  // on budget at every step
    }
    const auto ops = search.architecture();
    double damage = 0;
    for (int l = 0; l < L; ++l) damage += model.damage[std::size_t(l)][std::size_t(ops[std::size_t(l)])];
    CAPTURE(trial);
    CHECK(costs.fits(costs.total(ops)));
    CHECK(damage == doctest::Approx(best).epsilon(1e-12));
  }
}

TEST_CASE("Preparation lowers every layer's alignment error; candidates round-trip and refuse another teacher") {
  StoriesDecoder d = stories_decoder();
  const std::vector<bool> prepare{false, false, true};
  CandidatePreparation<float, Softmax, SlidingWindow<>, GatedLinear> prep(d, prepare, {.steps = 30, .lr = 3e-3});
  const auto validation = window_at(99, 0, 2, 64);
  const AlignmentErrors before = prep.errors({validation, 2, 64});
  for (std::int64_t s = 0; s < prep.steps(); ++s) {
    const auto ids = window_at(7, s, 2, 64);
    prep.step({ids, 2, 64}, s);
  }
  const AlignmentErrors after = prep.errors({validation, 2, 64});
  for (int l = 0; l < d.n_layers(); ++l) {
    CAPTURE(l);
    CHECK(std::isnan(before[std::size_t(l)][softmax_op]));
    CHECK(after[std::size_t(l)][gla_op] < 0.9 * before[std::size_t(l)][gla_op]);
  }

  const auto path = std::filesystem::temp_directory_path() / ("dash_candidates_" + std::to_string(::getpid()) + ".safetensors");
  const std::string fp = io::fingerprint(stories().checkpoint.config, stories().checkpoint.weights);
  io::save_candidates(path, d, {"", "", "gla"}, fp, {{"dash.tokens", "3840"}});
  StoriesDecoder fresh = stories_decoder();
  const io::CandidatesInfo info = io::load_candidates(path, fresh, {"", "", "gla"}, fp);
  CHECK(info.ops == std::vector<std::string>{"gla"});
  CHECK(info.metadata.at("dash.tokens") == "3840");
  CHECK(fresh.mixers()[0].weights() == d.mixers()[0].weights());
  const AlignmentErrors reloaded =
      CandidatePreparation<float, Softmax, SlidingWindow<>, GatedLinear>(fresh, prepare, {}).errors({validation, 2, 64});
  for (int l = 0; l < d.n_layers(); ++l) CHECK(reloaded[std::size_t(l)][gla_op] == after[std::size_t(l)][gla_op]);
  CHECK(test::contains(test::error_of([&] { io::load_candidates(path, fresh, {"", "", "gla"}, "0123456789abcdef"); }),
                       "prepared for another teacher"));
  CHECK(test::contains(test::error_of([&] { io::load_candidates(path, fresh, {"", "gla-other", "gla"}, fp); }),
                       "no prepared \"gla-other\""));
  std::filesystem::remove(path);
}

TEST_CASE("stories260K: a search is a function of its seed, and a resumed search equals an uninterrupted one") {
  const StoriesDecoder d = stories_decoder();
  const SearchOptions options{.steps = 8, .lr = 0.1, .relaxation = Relaxation::gumbel, .seed = test::rng_for("resume").next_u64()};
  const SearchState straight = run_search(d, options);
  const SearchState again = run_search(d, options);
  const SearchState resumed = run_search(d, options, /*interrupt_at=*/3);
  CHECK(again.logits == straight.logits);
  CHECK(resumed.logits == straight.logits);
  CHECK(resumed.adam_v == straight.adam_v);
  SearchOptions other = options;
  other.seed += 1;
  CHECK(run_search(d, other).logits != straight.logits);
}

TEST_CASE("Checkpoints refuse another run, a damaged file, and a state of another shape") {
  const auto path = std::filesystem::temp_directory_path() / ("dash_ckpt_" + std::to_string(::getpid()));
  SearchState s;
  s.step = 3, s.logits = {1, 2, 3}, s.adam_m = {0, 0, 0}, s.adam_v = {1, 1, 1}, s.adam_t = 3;
  save_checkpoint(path, s, "run A");
  CHECK(load_checkpoint(path, "run A").logits == s.logits);
  CHECK(test::contains(test::error_of([&] { load_checkpoint(path, "run B"); }), "from another run"));
  const auto size = std::filesystem::file_size(path);
  for (auto cut : {size - 1, size / 2, std::uintmax_t(5)}) {
    std::filesystem::resize_file(path, cut);
    CHECK(test::contains(test::error_of([&] { load_checkpoint(path, "run A"); }), path.string()));
    save_checkpoint(path, s, "run A");
  }
  SeparableModel model{{{0.0, 1.0}}};
  CostTable costs{CostKind::softmax_layers, {{1.0, 0.0}}, 1, 1};
  DifferentiableSearch<SeparableModel> search(model, costs, {});
  CHECK(test::contains(test::error_of([&] { search.restore(s); }), "a checkpoint of 3 logits"));
  std::filesystem::remove(path);
}

TEST_CASE("A model of one layer searches, and its read-out meets the budget") {
  Rng rng = test::rng_for("one layer");
  model::Config c = test::random_config(rng);
  c.n_layers = 1;
  auto d = test::make_decoder<float>(c, model::Weights<float>::random(c, rng), rng, Softmax{}, SlidingWindow<>(2),
                                     GatedLinear{});
  DecoderSearchModel<float, Softmax, SlidingWindow<>, GatedLinear> model(d);
  std::vector<std::vector<Cost>> costs;
  const auto layer = d.mixers()[0].costs({.shape = d.mixers()[0].shape(), .context = 64});
  costs.emplace_back(layer.begin(), layer.end());
  for (const double budget : {0.0, 1.0}) {
    const CostTable table = make_cost_table(Budget{CostKind::softmax_layers, budget}, costs, {true, true, true},
                                            costs[0][0], {"softmax", "swa", "gla"});
    DifferentiableSearch<decltype(model)> search(model, table, {.steps = 5});
    const auto ids = test::random_ids(rng, 12, c.vocab_size);
    while (!search.done()) search.step({ids, 1, 12});
    const auto ops = search.architecture();
    REQUIRE(ops.size() == 1);
    CHECK(table.fits(table.total(ops)));
    if (budget == 0.0) CHECK(ops[0] != 0);
  }
}

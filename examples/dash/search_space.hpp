// The tool's search space: the operators named by --ops, one searchable decoder type for every
// choice of them, and the cost table of a budget.
//
// The decoder always carries all four operators (MixedAttention<Softmax, SlidingWindow<>,
// GatedLinear, GatedDeltaNet>): --ops only decides which are candidates. An operator that is not
// a candidate is never run (its weight is 0 and it is left out of every forward), so one
// compiled type serves every --ops without instantiating the search for each subset. Softmax
// is always present because the teacher is the all-softmax model.
#pragma once

#include <array>
#include <charconv>
#include <sstream>
#include <string>
#include <vector>

#include "dash/io/checkpoint.hpp"
#include "dash/mixed_attention.hpp"
#include "dash/model/decoder.hpp"
#include "dash/ops/gated_delta_net.hpp"
#include "dash/ops/gated_linear.hpp"
#include "dash/ops/sliding_window.hpp"
#include "dash/ops/softmax.hpp"
#include "dash/search/budget.hpp"
#include "dash/search/decoder_model.hpp"

namespace dash::tool {

using SearchModel = search::DecoderSearchModel<float, Softmax, SlidingWindow<>, GatedLinear, GatedDeltaNet>;
using SearchDecoder = SearchModel::Decoder;
using SearchMixer = SearchModel::Mixer;
inline constexpr int n_ops = int(SearchMixer::n_ops);
inline constexpr int softmax_op = 0, swa_op = 1, gla_op = 2, gdn_op = 3;

struct OpSet {
  std::array<bool, n_ops> candidate{};
  index_t window = 512;  // swa's window

  // "softmax,swa:512,gla,gdn": each operator at most once; swa takes an optional window.
  static OpSet parse(const std::string& text) {
    OpSet s;
    std::stringstream in(text);
    int count = 0;
    for (std::string item; std::getline(in, item, ',');) {
      require(!item.empty(), "--ops '", text, "': an empty operator name, expected e.g. softmax,swa:512,gla,gdn");
      const std::string name = item.substr(0, item.find(':'));
      int op = -1;
      for (int i = 0; i < n_ops; ++i)
        if (name == SearchMixer::op_names()[std::size_t(i)]) op = i;
      require(op >= 0, "--ops: unknown operator '", name, "', expected softmax, swa[:W], gla or gdn");
      require(!s.candidate[std::size_t(op)], "--ops: '", name, "' given twice");
      if (item.size() > name.size()) {
        require(op == swa_op, "--ops: '", item, "': only swa takes a parameter (its window)");
        const std::string w = item.substr(name.size() + 1);
        const auto [end, ec] = std::from_chars(w.data(), w.data() + w.size(), s.window);
        require(ec == std::errc() && end == w.data() + w.size() && s.window >= 1, "--ops: '", item,
                "': the window must be a whole number >= 1");
      }
      s.candidate[std::size_t(op)] = true, ++count;
    }
    require(count >= 1, "--ops: empty, expected at least one operator, e.g. softmax,swa:512,gla");
    return s;
  }

  std::string name(int op) const {
    const std::string base(SearchMixer::op_names()[std::size_t(op)]);
    return op == swa_op ? base + ":" + std::to_string(window) : base;
  }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (int i = 0; i < n_ops; ++i) out.push_back(name(i));
    return out;
  }
  std::string to_string() const {
    std::string out;
    for (int i = 0; i < n_ops; ++i)
      if (candidate[std::size_t(i)]) out += (out.empty() ? "" : ",") + name(i);
    return out;
  }
  // What candidates.safetensors must hold: the description of every candidate with weights of
  // its own, "" for the others.
  std::vector<std::string> prepared() const {
    std::vector<std::string> out(n_ops);
    for (int i : {gla_op, gdn_op})
      if (candidate[std::size_t(i)]) out[std::size_t(i)] = name(i);
    return out;
  }
  // Hugging Face's layer_types vocabulary.
  static const char* layer_type(int op) {
    return op == softmax_op ? "full_attention" : op == swa_op ? "sliding_attention" : "linear_attention";
  }
};

// The searchable decoder of a checkpoint; candidates start from the teacher's weights.
inline SearchDecoder make_search_decoder(io::Checkpoint checkpoint, const OpSet& ops, std::uint64_t seed) {
  Rng rng(seed);
  return SearchDecoder(checkpoint.config, std::move(checkpoint.weights),
                       [&](int, const AttentionShape& s, AttentionWeights<float> w) {
                         return SearchMixer(s, std::move(w), rng, Softmax{}, SlidingWindow<>(ops.window), GatedLinear{},
                                            GatedDeltaNet{});
                       });
}

inline search::CostTable cost_table(const SearchDecoder& d, const OpSet& ops, const search::Budget& budget,
                                    index_t context) {
  std::vector<std::vector<Cost>> costs;
  for (const auto& mixer : d.mixers()) {
    const auto c = mixer.costs({.shape = mixer.shape(), .context = context});
    costs.emplace_back(c.begin(), c.end());
  }
  return search::make_cost_table(budget, costs, std::vector<bool>(ops.candidate.begin(), ops.candidate.end()),
                                 costs[0][softmax_op], ops.names());
}

}  // namespace dash::tool

// Prepared candidates on disk (stage 1's result): one safetensors file holding, for every layer
// and prepared operator, the operator's parameters as "layers.<l>.<op>.<tensor>", and metadata:
//   dash.format      "candidates/1"
//   dash.teacher     the teacher's fingerprint (io::fingerprint): candidates are refused by any
//                    other teacher
//   dash.ops         the prepared operators, comma-separated, each with its configuration
//                    as the caller describes it (e.g. "gla")
//   anything else the caller adds (tokens used, alignment errors, …)
#pragma once

#include <algorithm>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "dash/core/error.hpp"
#include "dash/io/safetensors.hpp"
#include "dash/mixed_attention.hpp"
#include "dash/model/decoder.hpp"

namespace dash::io {

inline constexpr const char* candidates_format = "candidates/1";

struct CandidatesInfo {
  std::string teacher;                          // fingerprint
  std::vector<std::string> ops;                 // prepared operator descriptions
  std::map<std::string, std::string> metadata;  // everything in the header
};

namespace detail {
inline std::string joined(const std::vector<std::string>& parts) {
  std::string out;
  for (const auto& p : parts) out += (out.empty() ? "" : ",") + p;
  return out;
}
inline std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream in(text);
  for (std::string part; std::getline(in, part, ',');) out.push_back(part);
  return out;
}

// Calls f(op index, description, layer params) for every layer and prepared operator.
template <class... Ops, class F>
void for_each_prepared(model::Decoder<float, BasicMixedAttention<float, Ops...>>& decoder,
                       const std::vector<std::string>& descriptions, F&& f) {
  for (int l = 0; l < decoder.n_layers(); ++l)
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (
          [&] {
            using Op = std::tuple_element_t<I, std::tuple<Ops...>>;
            if constexpr (!shares_teacher_projections_v<Op>)
              if (!descriptions[I].empty()) f(l, descriptions[I], std::get<I>(decoder.mixers()[std::size_t(l)].params()));
          }(),
          ...);
    }(std::index_sequence_for<Ops...>{});
}
}  // namespace detail

// descriptions[i]: operator i's description, or empty for an operator not saved.
template <class... Ops>
void save_candidates(const std::filesystem::path& path, model::Decoder<float, BasicMixedAttention<float, Ops...>>& decoder,
                     const std::vector<std::string>& descriptions, const std::string& teacher_fingerprint,
                     std::map<std::string, std::string> metadata = {}) {
  std::vector<std::pair<std::string, const Tensor<float>*>> tensors;
  std::vector<std::string> saved;
  for (const auto& d : descriptions)
    if (!d.empty()) saved.push_back(d);
  detail::for_each_prepared<Ops...>(decoder, descriptions, [&](int l, const std::string& op, auto& params) {
    params.for_each([&](const char* name, Tensor<float>& t) {
      tensors.push_back({"layers." + std::to_string(l) + "." + op + "." + name, &t});
    });
  });
  metadata["dash.format"] = candidates_format;
  metadata["dash.teacher"] = teacher_fingerprint;
  metadata["dash.ops"] = detail::joined(saved);
  safetensors::write(path, tensors, metadata);
}

// Reads the header only: what a candidates file holds.
inline CandidatesInfo candidates_info(const safetensors::File& file) {
  const auto& meta = file.metadata();
  const auto field = [&](const char* key) {
    const auto it = meta.find(key);
    require(it != meta.end(), file.name(), ": metadata \"", key, "\" missing, expected a dash candidates file");
    return it->second;
  };
  require(field("dash.format") == candidates_format, file.name(), ": metadata \"dash.format\" is \"",
          field("dash.format"), "\", expected \"", candidates_format, "\"");
  return {field("dash.teacher"), detail::split_list(field("dash.ops")), meta};
}

// Loads operator i's parameters for every layer where descriptions[i] is not empty. Refuses a
// file made for another teacher, or one without a requested operator (with that configuration).
template <class... Ops>
CandidatesInfo load_candidates(const std::filesystem::path& path,
                               model::Decoder<float, BasicMixedAttention<float, Ops...>>& decoder,
                               const std::vector<std::string>& descriptions, const std::string& teacher_fingerprint) {
  const safetensors::File file = safetensors::File::open(path);
  CandidatesInfo info = candidates_info(file);
  require(info.teacher == teacher_fingerprint, path.string(), ": prepared for another teacher (fingerprint ",
          info.teacher, "), this model's is ", teacher_fingerprint, "; run `dash prepare` for this model");
  for (const auto& d : descriptions)
    require(d.empty() || std::find(info.ops.begin(), info.ops.end(), d) != info.ops.end(), path.string(),
            ": has no prepared \"", d, "\" candidates (it has: ", detail::joined(info.ops),
            "); run `dash prepare` with this operator");
  detail::for_each_prepared<Ops...>(decoder, descriptions, [&](int l, const std::string& op, auto& params) {
    params.for_each([&](const char* name, Tensor<float>& t) {
      const std::string key = "layers." + std::to_string(l) + "." + op + "." + name;
      Tensor<float> stored = file.read(key);
      require(stored.shape() == t.shape(), path.string(), ": tensor \"", key, "\" has shape ", stored.shape(),
              ", expected ", t.shape());
      t = std::move(stored);
    });
  });
  return info;
}

}  // namespace dash::io

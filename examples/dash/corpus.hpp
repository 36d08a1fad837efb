// The text a search reads, as token streams: calibration (candidate preparation, the search,
// KL-guided selection) and held-out (evaluation only).
//
// From --data (a file or a folder of .txt files, documents split at <|endoftext|>): each
// document encoded (BOS first where the model expects one) and concatenated. With two or more
// documents the last tenth of them (at least one) are held out, so that no document feeds both
// sides; a single document gives its last tenth of tokens to the held-out side. --eval-data
// replaces the held-out side. Without --data, calibration text is sampled from the teacher.
#pragma once

#include <algorithm>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "dash/core/error.hpp"
#include "dash/core/rng.hpp"
#include "dash/io/text.hpp"
#include "dash/io/tokenizer.hpp"
#include "dash/model/loss.hpp"
#include "search_space.hpp"

namespace dash::tool {

struct Corpus {
  std::vector<int> calibration, held_out;
  std::string source;  // what the text is, for arch.json and checkpoint signatures
};

inline std::vector<int> encode_all(const io::Tokenizer& tok, bool add_bos, const std::vector<std::string>& docs) {
  std::vector<int> ids;
  for (const auto& d : docs) {
    const auto e = tok.encode(d, add_bos);
    ids.insert(ids.end(), e.begin(), e.end());
  }
  return ids;
}

// `count` sequences of `length` tokens sampled (temperature 1) from the all-softmax teacher,
// each starting at BOS.
inline std::vector<int> sample_from_teacher(const SearchModel& model, int bos, index_t count, index_t length,
                                            std::uint64_t seed) {
  Rng rng(seed);
  const auto& d = model.decoder();
  const auto teacher = model.teacher();
  const index_t V = d.weights().head().dim(0), dm = d.config().d_model;
  std::vector<std::vector<int>> seqs(std::size_t(count), std::vector<int>{bos});
  for (index_t t = 1; t < length; ++t) {
    std::vector<int> ids;
    for (const auto& s : seqs) ids.insert(ids.end(), s.begin(), s.end());
    SearchDecoder::Activations act;
    d.forward({ids, count, t}, act, teacher);
    Tensor<float> z(Shape{1, V});
    for (index_t b = 0; b < count; ++b) {
      const TensorView<const float> last(act.hidden.data() + (b * t + t - 1) * dm, Shape{1, dm});
      model::logits<float>(d.weights().head().view(), last, z.view());
      const float top = *std::max_element(z.data(), z.data() + V);
      double sum = 0;
      for (index_t v = 0; v < V; ++v) sum += std::exp(double(z.data()[v] - top));
      double u = rng.uniform() * sum;
      index_t pick = V - 1;
      for (index_t v = 0; v < V; ++v)
        if ((u -= std::exp(double(z.data()[v] - top))) <= 0) {
          pick = v;
          break;
        }
      seqs[std::size_t(b)].push_back(int(pick));
    }
  }
  std::vector<int> out;
  for (const auto& s : seqs) out.insert(out.end(), s.begin(), s.end());
  return out;
}

inline Corpus make_corpus(const SearchModel& model, const io::Tokenizer& tok, bool add_bos,
                          const std::optional<std::filesystem::path>& data,
                          const std::optional<std::filesystem::path>& eval_data, index_t sample_tokens,
                          index_t seq_len, std::uint64_t seed) {
  Corpus c;
  if (data) {
    const auto docs = io::read_documents(*data);
    require(!docs.empty(), *data, ": no text");
    if (docs.size() >= 2) {
      const std::size_t held = std::max<std::size_t>(1, docs.size() / 10);
      c.calibration = encode_all(tok, add_bos, {docs.begin(), docs.end() - long(held)});
      c.held_out = encode_all(tok, add_bos, {docs.end() - long(held), docs.end()});
      c.source = data->string() + " (" + std::to_string(docs.size() - held) + " documents; " + std::to_string(held) +
                 " held out)";
    } else {
      c.calibration = encode_all(tok, add_bos, docs);
      const std::size_t cut = c.calibration.size() - c.calibration.size() / 10;
      c.held_out.assign(c.calibration.begin() + long(cut), c.calibration.end());
      c.calibration.resize(cut);
      c.source = data->string() + " (one document; its last tenth held out)";
    }
  } else {
    const index_t sequences = std::max<index_t>(1, (sample_tokens + seq_len - 1) / seq_len);
    c.calibration = sample_from_teacher(model, tok.bos(), sequences, seq_len, seed);
    c.held_out = sample_from_teacher(model, tok.bos(), std::max<index_t>(1, sequences / 4), seq_len, seed + 1);
    c.source = "sampled from the teacher (" + std::to_string(c.calibration.size()) + " tokens, seed " +
               std::to_string(seed) + ")";
  }
  if (eval_data) {
    c.held_out = encode_all(tok, add_bos, io::read_documents(*eval_data));
    c.source += "; held out: " + eval_data->string();
  }
  require(index_t(c.calibration.size()) > seq_len, data ? data->string() : std::string("sampled text"), ": ",
          c.calibration.size(), " tokens of calibration text, expected more than one sequence (--seq-len ", seq_len,
          ")");
  require(index_t(c.held_out.size()) > seq_len, eval_data ? eval_data->string() : data ? data->string() : "sampled text",
          ": ", c.held_out.size(), " held-out tokens, expected more than one sequence (--seq-len ", seq_len,
          "); give more text or --eval-data");
  return c;
}

// `batch` windows of `length` tokens at starts drawn from (seed, step): the batch of a step is a
// function of the step alone, so a resumed run reads what an uninterrupted one would.
inline std::vector<int> random_windows(const std::vector<int>& stream, std::uint64_t seed, std::int64_t step,
                                       index_t batch, index_t length) {
  Rng rng(seed ^ (0xd1b54a32d192ed03ull * std::uint64_t(step + 1)));
  std::vector<int> ids;
  for (index_t b = 0; b < batch; ++b) {
    const auto start = long(rng.below(stream.size() - std::size_t(length) + 1));
    ids.insert(ids.end(), stream.begin() + start, stream.begin() + start + length);
  }
  return ids;
}

// Sequences whose second half repeats their first (each of `batch` rows with probability
// `fraction`, drawn from (seed, step)): predicting the repeat takes retrieval across half the
// sequence, which prose alone rarely asks of a model, so a calibration batch with some of them
// tells layers that retrieve from far back from layers that only see nearby tokens.
inline void repeat_halves(std::vector<int>& ids, index_t batch, index_t length, double fraction, std::uint64_t seed,
                          std::int64_t step) {
  if (fraction <= 0) return;
  Rng rng(seed ^ (0x9e3779b97f4a7c15ull * std::uint64_t(step + 2)));
  const index_t half = length / 2;
  for (index_t b = 0; b < batch; ++b) {
    if (rng.uniform() >= fraction) continue;
    const auto row = ids.begin() + long(b * length);
    std::copy(row, row + long(half), row + long(length - half));
  }
}

// Consecutive windows of length + 1 tokens (inputs and next-token targets), at most `tokens`
// predicted tokens in all, grouped `batch` to a row.
inline std::vector<std::vector<int>> consecutive_windows(const std::vector<int>& stream, index_t length, index_t batch,
                                                         index_t tokens) {
  std::vector<std::vector<int>> out;
  std::vector<int> row;
  index_t taken = 0, in_row = 0;
  for (std::size_t start = 0; start + std::size_t(length) + 1 <= stream.size() && taken < tokens;
       start += std::size_t(length)) {
    row.insert(row.end(), stream.begin() + long(start), stream.begin() + long(start) + length + 1);
    taken += length;
    if (++in_row == batch) out.push_back(std::move(row)), row.clear(), in_row = 0;
  }
  return out;
}

}  // namespace dash::tool

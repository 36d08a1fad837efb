// Byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen2): text → literal tokens cut out → pieces by the
// pre-tokenizer → each piece's bytes as symbols of GPT-2's byte alphabet → merges applied
// lowest rank first (leftmost first among equal ranks), as Hugging Face tokenizers and llama.cpp
// apply them → ids. Any byte string, UTF-8 or not, encodes, and decoding gives back the bytes
// encoded, except bytes whose symbol the vocabulary lacks (SmolLM2 lacks 21, e.g. 0x04 and
// 0xC0, which never occur in UTF-8): those are dropped, as Hugging Face and llama.cpp drop them,
// or become the unknown token where a tokenizer.json names one.
#pragma once

#include <algorithm>
#include <array>
#include <climits>
#include <optional>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "dash/core/error.hpp"
#include "dash/io/tokenizer/byte_alphabet.hpp"
#include "dash/io/tokenizer/literal_tokens.hpp"
#include "dash/io/tokenizer/pair_merge.hpp"
#include "dash/io/tokenizer/pretokenizer.hpp"

namespace dash::io {

// A byte-level BPE tokenizer as GGUF metadata describes it (tokenizer.ggml.*).
struct ByteLevelBpeSpec {
  std::vector<std::string> tokens;        // id → token in GPT-2's byte alphabet, e.g. "Ġthe"
  std::vector<std::string> merges;        // "a b" pairs, highest priority first
  std::vector<std::int32_t> token_types;  // optional; 3 (control) and 4 (user-defined) are literal tokens
  std::string pre = "gpt2";               // tokenizer.ggml.pre: gpt2, smollm, llama3 / llama-bpe, qwen2
  int bos = -1, eos = -1, unk = -1;       // -1: none
  bool add_bos = false;                   // tokenizer.ggml.add_bos_token
};

namespace detail {

// Where each part of a tokenizer came from, for messages.
struct ByteLevelBpeFields {
  std::string tokens, merges, bos, eos, unk;
};

// A byte-level BPE tokenizer whichever file it came from.
struct ByteLevelBpeParts {
  std::string source;                 // the file, for messages
  ByteLevelBpeFields fields;
  std::vector<std::string> tokens;    // id → byte-alphabet text, or the raw text of a literal token
  std::vector<bool> literal;          // cut out of raw text before pre-tokenisation, decoded as written
  std::vector<std::pair<std::string, std::string>> merges;  // highest priority first
  Pretokenizer pretokenizer;
  std::string pretokenizer_name;
  bool ignore_merges = false;
  int bos = -1, eos = -1, unk = -1;
  bool add_bos = false;
  // For a byte without a symbol: this id (-1: drop the byte), and whether a run of such bytes is
  // one token (Hugging Face BPE's unk_token and fuse_unk).
  int byte_unk = -1;
  bool fuse_unk = false;
};

class ByteLevelBpe {
 public:
  explicit ByteLevelBpe(ByteLevelBpeParts parts)
      : source_(std::move(parts.source)),
        pretokenizer_(std::move(parts.pretokenizer)),
        ignore_merges_(parts.ignore_merges),
        bos_(parts.bos),
        eos_(parts.eos),
        byte_unk_(parts.byte_unk),
        fuse_unk_(parts.fuse_unk),
        add_bos_(parts.add_bos),
        merge_count_(parts.merges.size()) {
    const ByteLevelBpeFields& f = parts.fields;
    const std::size_t n = parts.tokens.size();
    require(n > 0 && n <= INT_MAX, source_, ": ", f.tokens, ": ", n, " tokens, expected 1 to 2^31 - 1");
    const auto check_id = [&](int id, const std::string& field) {
      require(id >= -1 && id < int(n), source_, ": ", field, ": ", id, " is not a token id, expected 0..", n - 1);
    };
    check_id(bos_, f.bos);
    check_id(eos_, f.eos);
    check_id(parts.unk, f.unk);
    check_id(byte_unk_, f.unk);

    parts.literal.resize(n, false);
    const ByteAlphabet& alphabet = ByteAlphabet::instance();
    id_of_.reserve(n);
    bytes_of_.reserve(n);
    for (std::size_t id = 0; id < n; ++id) {
      std::string& token = parts.tokens[id];
      const bool literal = parts.literal[id];
      bytes_of_.push_back(literal ? token : alphabet.to_bytes(token));
      if (literal) literals_.add(token, int(id));
      id_of_[std::move(token)] = int(id);  // a later duplicate wins, as in llama.cpp and transformers
    }
    for (int byte = 0; byte < 256; ++byte) {
      const auto it = id_of_.find(alphabet.symbol(static_cast<unsigned char>(byte)));
      byte_token_[byte] = it == id_of_.end() ? -1 : it->second;
    }
    merges_.reserve(parts.merges.size());
    for (std::size_t rank = 0; rank < parts.merges.size(); ++rank) {
      const auto& [left, right] = parts.merges[rank];
      const auto id = [&](const std::string& token) {
        const auto it = id_of_.find(token);
        require(it != id_of_.end(), source_, ": ", f.merges, "[", rank, "]: \"", token,
                "\" is not a token, expected a merge of two tokens into a third");
        return it->second;
      };
      const int a = id(left), b = id(right), merged = id(left + right);
      merges_.try_emplace(pair_key(a, b), Merge{int(rank), merged});  // a repeated pair keeps its first rank
    }
    description_ = "byte-level BPE, " + std::to_string(n) + " tokens, " + std::to_string(merge_count_) +
                   " merges, pre-tokenizer " + parts.pretokenizer_name;
  }

  std::vector<int> encode(std::string_view text, bool add_bos) const {
    std::vector<int> ids;
    if (add_bos) {
      require(bos_ >= 0, source_, ": encode: BOS requested, but the tokenizer has no BOS token");
      ids.push_back(bos_);
    }
    Scratch scratch;
    literals_.split(
        text,
        [&](std::string_view stretch) {
          for (const std::string& piece : pretokenizer_.split(stretch)) {
            const std::vector<int>& word = tokens_of(piece, scratch);
            ids.insert(ids.end(), word.begin(), word.end());
          }
        },
        [&](int id) { ids.push_back(id); });
    return ids;
  }

  std::string decode(std::span<const int> ids) const {
    std::string out;
    for (int id : ids) out += bytes_of(id);
    return out;
  }

  // The bytes of one token; a multi-byte character may be split across tokens, so a stream's
  // pieces are valid UTF-8 only once concatenated.
  const std::string& bytes_of(int id) const {
    require(id >= 0 && id < vocab_size(), source_, ": decode: token id ", id, " is out of range, expected 0..",
            vocab_size() - 1);
    return bytes_of_[id];
  }

  int bos() const { return bos_; }
  int eos() const { return eos_; }
  bool add_bos() const { return add_bos_; }
  int vocab_size() const { return int(bytes_of_.size()); }
  const std::string& description() const { return description_; }

 private:
  struct Merge {
    int rank;
    int id;
  };
  // Per-call state: the words seen so far in this text, and buffers for merging.
  struct Scratch {
    std::unordered_map<std::string, std::vector<int>> words;
    PairMergeBuffers buffers;
  };

  static std::uint64_t pair_key(int a, int b) { return std::uint64_t(std::uint32_t(a)) << 32 | std::uint32_t(b); }

  const std::vector<int>& tokens_of(const std::string& piece, Scratch& scratch) const {
    auto [it, inserted] = scratch.words.try_emplace(piece);
    if (inserted) it->second = merge(piece, scratch);
    return it->second;
  }

  std::vector<int> merge(std::string_view piece, Scratch& scratch) const {
    if (ignore_merges_) {
      std::string symbols;
      for (char c : piece) symbols += ByteAlphabet::instance().symbol(static_cast<unsigned char>(c));
      if (const auto it = id_of_.find(symbols); it != id_of_.end()) return {it->second};
    }
    std::vector<int> ids;
    bool unknown_run = false;
    for (char c : piece) {
      const int id = byte_token_[static_cast<unsigned char>(c)];
      if (id < 0 && (byte_unk_ < 0 || (fuse_unk_ && unknown_run))) continue;
      unknown_run = id < 0;
      ids.push_back(id < 0 ? byte_unk_ : id);
    }
    merge_pairs(
        ids,
        [&](int left, int right) -> std::optional<PairMerge> {
          const auto it = merges_.find(pair_key(left, right));
          if (it == merges_.end()) return std::nullopt;
          return PairMerge{double(it->second.rank), it->second.id};
        },
        scratch.buffers);
    return ids;
  }

  std::string source_;
  std::vector<std::string> bytes_of_;           // id → the bytes it decodes to
  std::unordered_map<std::string, int> id_of_;  // token text → id
  std::array<int, 256> byte_token_{};           // byte → the id of its symbol, or -1
  std::unordered_map<std::uint64_t, Merge> merges_;
  LiteralTokens literals_;
  Pretokenizer pretokenizer_;
  bool ignore_merges_;
  int bos_, eos_, byte_unk_;
  bool fuse_unk_, add_bos_;
  std::size_t merge_count_;
  std::string description_;
};

// A GGUF-style spec to the parts of a tokenizer; messages name the GGUF keys.
inline ByteLevelBpeParts parts_of(ByteLevelBpeSpec spec, std::string source) {
  ByteLevelBpeParts parts;
  parts.fields = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                  "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id"};
  const std::size_t n = spec.tokens.size();
  require(spec.token_types.empty() || spec.token_types.size() == n, source, ": tokenizer.ggml.token_type: ",
          spec.token_types.size(), " entries, expected one per token (", n, ")");
  parts.literal.resize(n, false);
  for (std::size_t i = 0; i < spec.token_types.size(); ++i) {
    parts.literal[i] = spec.token_types[i] == 3 || spec.token_types[i] == 4;
  }
  parts.merges.reserve(spec.merges.size());
  for (std::size_t i = 0; i < spec.merges.size(); ++i) {
    const std::string& m = spec.merges[i];
    // The first space after the first character separates the two tokens, as llama.cpp reads it.
    const std::size_t space = m.find(' ', 1);
    require(space != std::string::npos && space + 1 < m.size(), source, ": tokenizer.ggml.merges[", i, "]: \"", m,
            "\", expected two tokens separated by a space");
    parts.merges.emplace_back(m.substr(0, space), m.substr(space + 1));
  }
  NamedPretokenizer named = gguf_pretokenizer(spec.pre, source + ": tokenizer.ggml.pre");
  parts.pretokenizer = std::move(named.pretokenizer);
  parts.ignore_merges = named.ignore_merges;
  parts.pretokenizer_name = spec.pre;
  parts.tokens = std::move(spec.tokens);
  parts.bos = spec.bos;
  parts.eos = spec.eos;
  parts.unk = spec.unk;
  parts.add_bos = spec.add_bos;
  parts.source = std::move(source);
  return parts;
}

}  // namespace detail
}  // namespace dash::io

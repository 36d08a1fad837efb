// llama2.c's tokenizer (a sentencepiece BPE model exported by its tokenizer.py) and its encoder,
// as run.c runs them.
//
// tokenizer.bin, little-endian: int32 max_token_length, then per token: float32 score,
// int32 length, `length` bytes of text. Ids 0, 1, 2 are <unk>, <s> (BOS), </s> (EOS); ids 3..258
// are the byte-fallback tokens <0x00>..<0xFF>.
//
// Encoding: BOS if asked; a dummy-prefix " " token when the text is not empty; each UTF-8
// character (a lead byte and up to three continuation bytes) as its token, or when it has none
// as byte-fallback tokens (byte + 3); then, repeatedly, the adjacent pair whose concatenated
// text is a token with the highest score (the leftmost of equal scores, and only scores above
// -1e10) is merged, until no pair is a token. The merging here keeps candidates in a heap, so a
// long text costs O(n log n) rather than run.c's O(n²), with the same result.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "dash/core/error.hpp"
#include "dash/io/detail/bytes.hpp"
#include "dash/io/tokenizer/pair_merge.hpp"

namespace dash::io::detail {

class Llama2cBpe {
 public:
  static constexpr int unk_id = 0, bos_id = 1, eos_id = 2, first_byte_id = 3;

  // `vocab_size` is the model's; the file must hold exactly that many tokens.
  Llama2cBpe(std::span<const std::byte> bytes, int vocab_size, std::string source) : source_(std::move(source)) {
    require(vocab_size >= first_byte_id + 256, source_, ": vocab_size: ", vocab_size,
            ", expected at least 259 (<unk>, <s>, </s> and 256 byte-fallback tokens)");
    Cursor cursor(bytes, source_);
    const std::int32_t max_length = cursor.read<std::int32_t>("max_token_length");
    require(max_length > 0, source_, ": max_token_length: ", max_length, ", expected a positive length");
    // Each token takes at least 8 bytes: refuse a count the file cannot hold before allocating.
    require(std::size_t(vocab_size) <= cursor.remaining() / 8, source_, ": the file's ", cursor.remaining(),
            " bytes after max_token_length cannot hold vocab_size = ", vocab_size,
            " tokens (at least 8 bytes each), expected the tokenizer of this model");
    tokens_.reserve(vocab_size);
    scores_.reserve(vocab_size);
    for (int id = 0; id < vocab_size; ++id) {
      const std::string field = "token " + std::to_string(id);
      require(cursor.remaining() > 0, source_, ": ", field, ": the file ends after ", id,
              " tokens, expected vocab_size = ", vocab_size, " (the model's)");
      scores_.push_back(cursor.read<float>(field + " score"));
      const std::int32_t length = cursor.read<std::int32_t>(field + " length");
      require(length >= 0 && length <= max_length, source_, ": ", field, " length: ", length, ", expected 0..",
              max_length, " (max_token_length)");
      const auto text = cursor.take(std::size_t(length), field + " text");
      tokens_.emplace_back(reinterpret_cast<const char*>(text.data()), text.size());
    }
    require(cursor.remaining() == 0, source_, ": ", cursor.remaining(), " bytes after token ", vocab_size - 1,
            ", expected the file to end after vocab_size = ", vocab_size, " tokens (the model's)");
    ids_.reserve(tokens_.size());
    for (int id = 0; id < vocab_size; ++id) ids_.try_emplace(tokens_[id], id);  // the first of duplicates
    const auto space = ids_.find(" ");
    require(space != ids_.end(), source_, ": no token \" \", expected one for the dummy prefix");
    space_id_ = space->second;
  }

  std::vector<int> encode(std::string_view text, bool add_bos) const {
    std::vector<int> symbols;
    symbols.reserve(text.size() + 2);
    if (add_bos) symbols.push_back(bos_id);  // BOS takes part in the merges, as in run.c
    if (!text.empty()) symbols.push_back(space_id_);
    for (std::size_t i = 0; i < text.size();) {
      std::size_t length = 1;
      while (length < 4 && i + length < text.size() && is_continuation(text[i + length])) ++length;
      const auto it = ids_.find(std::string(text.substr(i, length)));
      if (it != ids_.end()) {
        symbols.push_back(it->second);
      } else {
        for (std::size_t k = 0; k < length; ++k) symbols.push_back(first_byte_id + static_cast<unsigned char>(text[i + k]));
      }
      i += length;
    }
    merge(symbols);
    return symbols;
  }

  // The text of `id` following `previous`: BOS and EOS are markers and print nothing; after BOS
  // the dummy-prefix space is dropped; <0xHH> is the byte it names.
  std::string decode_piece(int previous, int id) const {
    require(id >= 0 && id < vocab_size(), source_, ": decode: token id ", id, " is out of range, expected 0..",
            vocab_size() - 1);
    if (id == bos_id || id == eos_id) return {};
    std::string_view piece = tokens_[id];
    if (previous == bos_id && piece.starts_with(' ')) piece.remove_prefix(1);
    if (const int byte = byte_token(piece); byte >= 0) return std::string(1, static_cast<char>(byte));
    return std::string(piece);
  }

  // Decodes as if the ids followed BOS, so the dummy-prefix space that encode adds is dropped.
  std::string decode(std::span<const int> ids) const {
    std::string out;
    int previous = bos_id;
    for (int id : ids) {
      out += decode_piece(previous, id);
      previous = id;
    }
    return out;
  }

  int vocab_size() const { return int(tokens_.size()); }
  const std::string& source() const { return source_; }

 private:
  static bool is_continuation(char c) { return (static_cast<unsigned char>(c) & 0xC0) == 0x80; }

  static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  }

  // The byte a "<0xHH>" token stands for, or -1.
  static int byte_token(std::string_view piece) {
    if (piece.size() != 6 || !piece.starts_with("<0x") || piece[5] != '>') return -1;
    const int hi = hex_digit(piece[3]), lo = hex_digit(piece[4]);
    return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
  }

  // Merges by best score, leftmost among equals: run.c's scan order.
  void merge(std::vector<int>& ids) const {
    PairMergeBuffers buffers;
    std::string pair;
    merge_pairs(
        ids,
        [&](int left, int right) -> std::optional<PairMerge> {
          pair.assign(tokens_[std::size_t(left)]).append(tokens_[std::size_t(right)]);
          const auto it = ids_.find(pair);
          if (it == ids_.end()) return std::nullopt;
          const float score = scores_[std::size_t(it->second)];
          if (!(score > -1e10f)) return std::nullopt;  // run.c's starting best score; NaN never wins either
          return PairMerge{-double(score), it->second};
        },
        buffers);
  }

  std::string source_;
  std::vector<std::string> tokens_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int> ids_;
  int space_id_ = -1;
};

}  // namespace dash::io::detail

// Pre-tokenisation: text is cut into pieces ("words") before BPE, and merges never cross a cut.
// A Pretokenizer is a sequence of steps, each applied to every piece the previous steps made,
// as Hugging Face's pre_tokenizer Sequence does:
//   split         keep each regular-expression match and each stretch between matches as a piece
//   prefix space  prepend ' ' to a piece that does not start with one (ByteLevel add_prefix_space)
// GGUF files name their pre-tokenizer (tokenizer.ggml.pre); gguf_pretokenizer gives the
// definitions of the Hugging Face tokenizers those names stand for.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dash/core/error.hpp"
#include "dash/io/tokenizer/regex.hpp"

namespace dash::io::detail {

// GPT-2's pattern, also what Hugging Face's ByteLevel pre-tokenizer applies when use_regex is set.
inline constexpr std::string_view gpt2_pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
// Llama 3's: contractions in any case, a letter run with one leading non-letter, numbers in
// groups of up to three digits, punctuation runs with their trailing newlines.
inline constexpr std::string_view llama3_pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
// Qwen2's: Llama 3's with single digits.
inline constexpr std::string_view qwen2_pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
// Hugging Face's Digits pre-tokenizer: each digit alone, or runs of digits (Unicode N).
inline constexpr std::string_view single_digit_pattern = R"(\p{N})";
inline constexpr std::string_view digit_run_pattern = R"(\p{N}+)";

class Pretokenizer {
 public:
  void add_split(Regex regex, std::string label) {
    steps_.emplace_back(std::move(regex));
    labels_.push_back(std::move(label));
  }
  void add_prefix_space() {
    steps_.emplace_back(std::nullopt);
    labels_.push_back("prefix space");
  }

  bool empty() const { return steps_.empty(); }

  std::vector<std::string> split(std::string_view text) const {
    std::vector<std::string> pieces, next;
    if (text.empty()) return pieces;
    pieces.emplace_back(text);
    const MatchData scratch;
    for (const std::optional<Regex>& regex : steps_) {
      next.clear();
      for (std::string& piece : pieces) {
        if (regex) {
          regex->split(piece, scratch, [&](std::string_view part) { next.emplace_back(part); });
        } else {
          if (piece.front() != ' ') piece.insert(piece.begin(), ' ');
          next.push_back(std::move(piece));
        }
      }
      pieces.swap(next);
    }
    return pieces;
  }

  // The steps, e.g. "split \p{N} + split gpt2".
  std::string description() const {
    std::string out;
    for (const std::string& label : labels_) out += (out.empty() ? "" : " + ") + label;
    return out.empty() ? "none" : out;
  }

 private:
  std::vector<std::optional<Regex>> steps_;  // a split, or (empty) the prefix-space step
  std::vector<std::string> labels_;
};

struct NamedPretokenizer {
  Pretokenizer pretokenizer;
  // Whether a piece that is itself a token is taken whole, without merges (Hugging Face BPE's
  // ignore_merges, which Llama 3's tokenizer sets; llama.cpp does the same for "llama3").
  bool ignore_merges = false;
};

// The pre-tokenizer a GGUF tokenizer.ggml.pre value names, as llama.cpp defines it; each is the
// pre_tokenizer of the Hugging Face tokenizer.json the name was derived from.
//   gpt2            ByteLevel(use_regex)                    GPT-2
//   smollm          Digits(individual) then ByteLevel(regex) SmolLM, SmolLM2
//   llama3, llama-bpe  Split(llama3 pattern)                 Llama 3
//   qwen2           Split(qwen2 pattern)                    Qwen2, Qwen2.5
inline NamedPretokenizer gguf_pretokenizer(std::string_view name, const std::string& where) {
  NamedPretokenizer out;
  Pretokenizer& p = out.pretokenizer;
  const auto split = [&](std::string_view pattern, const char* label) { p.add_split(Regex(pattern, false, where), label); };
  if (name == "gpt2") {
    split(gpt2_pattern, "gpt2");
  } else if (name == "smollm") {
    split(single_digit_pattern, "digits");
    split(gpt2_pattern, "gpt2");
  } else if (name == "llama3" || name == "llama-bpe") {
    split(llama3_pattern, "llama3");
    out.ignore_merges = true;
  } else if (name == "qwen2") {
    split(qwen2_pattern, "qwen2");
  } else {
    fail(where, ": \"", name, "\" is not a supported pre-tokenizer, expected gpt2, smollm, llama3, llama-bpe or qwen2");
  }
  return out;
}

}  // namespace dash::io::detail

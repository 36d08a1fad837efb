// Tokens that stand for themselves in text ("<|im_start|>", "<|endoftext|>"): control and
// user-defined tokens of a GGUF vocabulary, the added_tokens of a tokenizer.json. They are cut
// out of the raw text before pre-tokenisation, so no merge ever crosses them, and the text
// between them is tokenised on its own. At each position the longest one wins, and the leftmost
// position first: Hugging Face's leftmost-longest matching.
#pragma once

#include <algorithm>
#include <array>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace dash::io::detail {

class LiteralTokens {
 public:
  // The first of two tokens with the same text keeps it; an empty text never matches.
  void add(std::string text, int id) {
    if (text.empty()) return;
    auto& bucket = by_first_byte_[static_cast<unsigned char>(text.front())];
    const auto at = std::find_if(bucket.begin(), bucket.end(),
                                 [&](const Literal& other) { return other.text.size() < text.size(); });
    if (std::any_of(bucket.begin(), at, [&](const Literal& other) { return other.text == text; })) return;
    bucket.insert(at, Literal{std::move(text), id});
  }

  // on_text(stretch) for each non-empty stretch of ordinary text and on_token(id) for each
  // literal token, in text order.
  template <class OnText, class OnToken>
  void split(std::string_view text, OnText&& on_text, OnToken&& on_token) const {
    std::size_t start = 0;
    for (std::size_t i = 0; i < text.size();) {
      const Literal* found = nullptr;
      for (const Literal& literal : by_first_byte_[static_cast<unsigned char>(text[i])]) {
        if (text.substr(i).starts_with(literal.text)) {
          found = &literal;
          break;
        }
      }
      if (!found) {
        ++i;
        continue;
      }
      if (i > start) on_text(text.substr(start, i - start));
      on_token(found->id);
      i += found->text.size();
      start = i;
    }
    if (start < text.size()) on_text(text.substr(start));
  }

 private:
  struct Literal {
    std::string text;
    int id;
  };
  std::array<std::vector<Literal>, 256> by_first_byte_;  // each longest first
};

}  // namespace dash::io::detail

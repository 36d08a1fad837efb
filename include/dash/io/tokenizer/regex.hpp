// The regular expressions of tokenizer definitions, run by PCRE2 with Unicode properties
// (PCRE2_UTF | PCRE2_UCP), JIT-compiled where PCRE2 supports it. Patterns are written for
// Oniguruma, which Hugging Face tokenizers uses; the one difference that matters for them is
// translated (see pcre2_pattern).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <string>
#include <string_view>
#include <utility>

#include <pcre2.h>

#include "dash/core/error.hpp"
#include "dash/io/tokenizer/utf8.hpp"

namespace dash::io::detail {

inline std::string pcre2_message(int code) {
  PCRE2_UCHAR buffer[256];
  const int n = pcre2_get_error_message(code, buffer, sizeof buffer);
  return n < 0 ? "PCRE2 error " + std::to_string(code) : std::string(reinterpret_cast<const char*>(buffer), n);
}

// Oniguruma's \s is Unicode's White_Space property; PCRE2's \s under PCRE2_UCP also matches
// U+180E MONGOLIAN VOWEL SEPARATOR. \s and \S are therefore spelled as the property, which is
// valid inside and outside character classes. \Q...\E quotes are copied untouched.
inline std::string pcre2_pattern(std::string_view pattern) {
  std::string out;
  out.reserve(pattern.size() + 32);
  for (std::size_t i = 0; i < pattern.size(); ++i) {
    if (pattern[i] != '\\' || i + 1 == pattern.size()) {
      out += pattern[i];
      continue;
    }
    const char escaped = pattern[++i];
    if (escaped == 's') {
      out += "\\p{White_Space}";
    } else if (escaped == 'S') {
      out += "\\P{White_Space}";
    } else if (escaped == 'Q') {
      const std::size_t end = pattern.find("\\E", i + 1);
      const std::size_t stop = end == std::string_view::npos ? pattern.size() : end + 2;
      out += '\\';
      out.append(pattern.substr(i, stop - i));
      i = stop - 1;
    } else {
      out += '\\';
      out += escaped;
    }
  }
  return out;
}

// Per-thread scratch for matching: compiled patterns are shared, match data is not.
class MatchData {
 public:
  MatchData() : data_(pcre2_match_data_create(1, nullptr), &pcre2_match_data_free) {
    if (!data_) throw std::bad_alloc();
  }
  pcre2_match_data* get() const { return data_.get(); }

 private:
  std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> data_;
};

class Regex {
 public:
  // `literal`: the pattern is a plain string (Hugging Face's Split with a String pattern).
  // `where` names the pattern's origin in messages.
  Regex(std::string_view pattern, bool literal, std::string where) : where_(std::move(where)) {
    const std::string text = literal ? std::string(pattern) : pcre2_pattern(pattern);
    // Ill-formed UTF-8 in the text never matches and is left between matches, so it reaches
    // the byte-level model as bytes. PCRE2_LITERAL admits no PCRE2_UCP, and needs none.
    const std::uint32_t options =
        PCRE2_UTF | PCRE2_MATCH_INVALID_UTF | (literal ? PCRE2_LITERAL : std::uint32_t{PCRE2_UCP});
    int error = 0;
    PCRE2_SIZE offset = 0;
    pcre2_code* code =
        pcre2_compile(reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), options, &error, &offset, nullptr);
    require(code != nullptr, where_, ": regular expression \"", pattern, "\" does not compile: ",
            pcre2_message(error), ", expected a pattern PCRE2 accepts");
    code_.reset(code, &pcre2_code_free);
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // where JIT is unavailable the interpreter runs
  }

  // Cuts text into its matches and the stretches between them, in order and none empty: Hugging
  // Face's Split with behaviour Isolated. Lookaround sees only `text`.
  template <class Emit>
  void split(std::string_view text, const MatchData& scratch, Emit&& emit) const {
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    std::size_t search = 0, emitted = 0;
    while (search <= text.size()) {
      int rc = pcre2_match(code_.get(), subject, text.size(), search, 0, scratch.get(), nullptr);
      // The JIT's fixed stack can run out on long pieces; the interpreter's grows on the heap.
      if (rc == PCRE2_ERROR_JIT_STACKLIMIT)
        rc = pcre2_match(code_.get(), subject, text.size(), search, PCRE2_NO_JIT, scratch.get(), nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      require(rc >= 0, where_, ": regular expression failed on a text of ", text.size(), " bytes: ", pcre2_message(rc));
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(scratch.get());
      const std::size_t begin = ovector[0], end = ovector[1];
      // \K can report a match that starts after its end or before earlier text.
      require(begin >= emitted && end >= begin && end <= text.size(), where_,
              ": regular expression reported the match [", begin, ", ", end, ") after text up to ", emitted,
              ", expected matches in order (\\K is not supported)");
      if (begin == end) {  // an empty match cuts nothing; search on from the next character
        if (begin == text.size()) break;
        const std::size_t length = decode_utf8(text, begin).length;
        search = begin + (length == 0 ? 1 : length);
        continue;
      }
      if (begin > emitted) emit(text.substr(emitted, begin - emitted));
      emit(text.substr(begin, end - begin));
      emitted = search = end;
    }
    if (emitted < text.size()) emit(text.substr(emitted));
  }

 private:
  std::shared_ptr<pcre2_code> code_;  // immutable once compiled, so shared between copies and threads
  std::string where_;
};

}  // namespace dash::io::detail

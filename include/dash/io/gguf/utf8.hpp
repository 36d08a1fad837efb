// UTF-8 well-formedness (RFC 3629): GGUF keys, tensor names and string values must be valid
// UTF-8; a file that is not is corrupt, and its strings would reach tokenizers and messages.
#pragma once

#include <cstddef>
#include <string_view>

namespace dash::io::gguf::detail {

// The byte offset of the first ill-formed sequence, or s.size() when s is well-formed. Overlong
// forms, surrogates (U+D800..U+DFFF) and code points above U+10FFFF are ill-formed.
inline std::size_t first_invalid_utf8(std::string_view s) {
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(s[i]); };
  const auto continuation = [&](std::size_t i) { return i < s.size() && (byte(i) & 0xC0) == 0x80; };
  std::size_t i = 0;
  while (i < s.size()) {
    const unsigned char b = byte(i);
    if (b < 0x80) {
      ++i;
      continue;
    }
    std::size_t length;
    unsigned char lo = 0x80, hi = 0xBF;  // the range of the second byte
    if (b >= 0xC2 && b <= 0xDF) {
      length = 2;
    } else if (b >= 0xE0 && b <= 0xEF) {
      length = 3;
      if (b == 0xE0) lo = 0xA0;  // overlong
      if (b == 0xED) hi = 0x9F;  // surrogates
    } else if (b >= 0xF0 && b <= 0xF4) {
      length = 4;
      if (b == 0xF0) lo = 0x90;  // overlong
      if (b == 0xF4) hi = 0x8F;  // above U+10FFFF
    } else {
      return i;
    }
    if (i + 1 >= s.size() || byte(i + 1) < lo || byte(i + 1) > hi) return i;
    for (std::size_t k = 2; k < length; ++k)
      if (!continuation(i + k)) return i;
    i += length;
  }
  return s.size();
}

}  // namespace dash::io::gguf::detail

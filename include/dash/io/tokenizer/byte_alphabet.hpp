// GPT-2's byte-level alphabet: a reversible map from the 256 byte values to printable code points,
// so that BPE vocabularies over arbitrary bytes can be stored as text. Bytes that are printable
// Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68 take
// U+0100 onwards in byte order (so ' ' is 'Ġ' U+0120 and '\n' is 'Ċ' U+010A).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

#include "dash/io/tokenizer/utf8.hpp"

namespace dash::io::detail {

class ByteAlphabet {
 public:
  static constexpr char32_t max_code_point = 0x100 + 67;

  // The symbol for a byte, as UTF-8.
  const std::string& symbol(unsigned char byte) const { return symbol_[byte]; }

  // The byte a code point stands for, or -1 when it is not in the alphabet.
  int byte_of(char32_t cp) const { return cp <= max_code_point ? byte_of_[cp] : -1; }

  // A string over the alphabet back to bytes. Code points outside the alphabet (which a
  // well-formed vocabulary does not contain) and ill-formed bytes are kept as they are, so that
  // decoding never fails.
  std::string to_bytes(std::string_view symbols) const {
    std::string out;
    out.reserve(symbols.size());
    for (std::size_t i = 0; i < symbols.size();) {
      const CodePoint cp = decode_utf8(symbols, i);
      const std::size_t length = cp.length == 0 ? 1 : cp.length;
      const int byte = cp.length == 0 ? -1 : byte_of(cp.value);
      if (byte >= 0) {
        out += static_cast<char>(byte);
      } else {
        out.append(symbols.substr(i, length));
      }
      i += length;
    }
    return out;
  }

  static const ByteAlphabet& instance() {
    static const ByteAlphabet alphabet;
    return alphabet;
  }

 private:
  ByteAlphabet() {
    byte_of_.fill(-1);
    const auto printable = [](int b) { return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE; };
    char32_t next = 0x100;
    for (int b = 0; b < 256; ++b) {
      const char32_t cp = printable(b) ? char32_t(b) : next++;
      append_utf8(symbol_[b], cp);
      byte_of_[cp] = static_cast<std::int16_t>(b);
    }
  }

  std::array<std::string, 256> symbol_;
  std::array<std::int16_t, max_code_point + 1> byte_of_;
};

}  // namespace dash::io::detail

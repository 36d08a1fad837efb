// GGUF metadata values and their bounded reading. A value is held as a flat list of elements of
// one type (a scalar is a list of one), so that scalars and arrays share the typed accessors.
// Arrays of arrays are valid GGUF; nothing a Llama-family model needs uses them, so their
// contents are checked (bounds, types, UTF-8, bounded depth) and skipped, and only their length
// is kept.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "dash/core/error.hpp"
#include "dash/io/detail/bytes.hpp"
#include "dash/io/gguf/types.hpp"
#include "dash/io/gguf/utf8.hpp"

namespace dash::io::gguf::detail {

// Deeper nesting than this is refused: real files nest at most once, and the bound keeps the
// recursion of a corrupt file's skip from exhausting the stack.
inline constexpr int max_array_depth = 8;

struct Value {
  ValueType type = ValueType::uint8;          // ValueType::array for arrays
  ValueType element_type = ValueType::uint8;  // the elements' type; equals `type` for a scalar
  std::uint64_t count = 1;                    // elements: 1 for a scalar
  std::vector<std::uint64_t> integers;        // integer and boolean elements; signed ones sign-extended
  std::vector<double> reals;                  // float32 and float64 elements
  std::vector<std::string> strings;           // string elements

  bool is_array() const { return type == ValueType::array; }

  // "uint32", or "array of 3 string" for an array: what error messages say a value is.
  std::string describe() const {
    if (!is_array()) return name_of(type);
    return "array of " + std::to_string(count) + " " + name_of(element_type);
  }
};

// A GGUF string: uint64 length then that many bytes of UTF-8, not NUL-terminated.
inline std::string read_string(io::detail::Cursor& c, std::string_view field) {
  const auto length = c.read<std::uint64_t>(field);
  require(length <= c.remaining(), c.file(), ": ", field, ": string of ", length, " bytes at offset ", c.offset(),
          " runs past the end of the file (", c.remaining(), " bytes left)");
  const auto bytes = c.take(static_cast<std::size_t>(length), field);
  std::string s(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  const std::size_t bad = first_invalid_utf8(s);
  require(bad == s.size(), c.file(), ": ", field, ": invalid UTF-8 at byte ", bad, " of the string, expected UTF-8");
  return s;
}

inline ValueType read_value_type(io::detail::Cursor& c, std::string_view field) {
  const auto type = static_cast<ValueType>(c.read<std::uint32_t>(field));
  require(is_known(type), c.file(), ": ", field, ": value type ", std::uint32_t(type),
          " is not a GGUF value type, expected 0 to 12");
  return type;
}

// The fewest bytes one element of `type` can take: what a count is checked against before any
// allocation, so that a corrupt count fails at once instead of allocating.
inline std::uint64_t min_element_size(ValueType type) {
  if (type == ValueType::string) return 8;   // its length
  if (type == ValueType::array) return 12;   // its element type and count
  return fixed_size(type);
}

inline void read_elements(io::detail::Cursor& c, ValueType type, std::uint64_t count, std::string_view field,
                          int depth, Value* out);

// An array's element type, count and elements; its contents go to `out` unless it is nested.
inline void read_array(io::detail::Cursor& c, std::string_view field, int depth, Value* out) {
  require(depth <= max_array_depth, c.file(), ": ", field, ": arrays nested ", depth,
          " deep, expected at most ", max_array_depth);
  const ValueType type = read_value_type(c, field);
  const auto count = c.read<std::uint64_t>(field);
  const std::uint64_t min_size = min_element_size(type);
  require(count <= c.remaining() / min_size, c.file(), ": ", field, ": array of ", count, " ", name_of(type),
          " needs at least ", min_size, " bytes each, only ", c.remaining(), " bytes left");
  if (out) {
    out->type = ValueType::array;
    out->element_type = type;
    out->count = count;
  }
  read_elements(c, type, count, field, depth, type == ValueType::array ? nullptr : out);
}

// `count` elements of `type`, appended to `out` (or checked and dropped when out is null).
inline void read_elements(io::detail::Cursor& c, ValueType type, std::uint64_t count, std::string_view field,
                          int depth, Value* out) {
  if (out) {
    if (is_integer(type) || type == ValueType::boolean) out->integers.reserve(std::size_t(count));
    if (is_real(type)) out->reals.reserve(std::size_t(count));
    if (type == ValueType::string) out->strings.reserve(std::size_t(count));
  }
  for (std::uint64_t i = 0; i < count; ++i) {
    std::uint64_t integer = 0;
    double real = 0;
    switch (type) {
      case ValueType::uint8: integer = c.read<std::uint8_t>(field); break;
      case ValueType::int8: integer = std::uint64_t(std::int64_t{c.read<std::int8_t>(field)}); break;
      case ValueType::uint16: integer = c.read<std::uint16_t>(field); break;
      case ValueType::int16: integer = std::uint64_t(std::int64_t{c.read<std::int16_t>(field)}); break;
      case ValueType::uint32: integer = c.read<std::uint32_t>(field); break;
      case ValueType::int32: integer = std::uint64_t(std::int64_t{c.read<std::int32_t>(field)}); break;
      case ValueType::uint64: integer = c.read<std::uint64_t>(field); break;
      case ValueType::int64: integer = std::uint64_t(c.read<std::int64_t>(field)); break;
      case ValueType::boolean:
        integer = c.read<std::uint8_t>(field);
        require(integer <= 1, c.file(), ": ", field, ": boolean byte ", integer, " at offset ", c.offset() - 1,
                ", expected 0 or 1");
        break;
      case ValueType::float32: real = c.read<float>(field); break;
      case ValueType::float64: real = c.read<double>(field); break;
      case ValueType::string: {
        std::string s = read_string(c, field);
        if (out) out->strings.push_back(std::move(s));
        continue;
      }
      case ValueType::array:
        read_array(c, field, depth + 1, nullptr);
        continue;
    }
    if (out && is_real(type)) out->reals.push_back(real);
    if (out && !is_real(type)) out->integers.push_back(integer);
  }
}

// One metadata value of `type`, for the key `field`.
inline Value read_value(io::detail::Cursor& c, ValueType type, std::string_view field) {
  Value v;
  if (type == ValueType::array) {
    read_array(c, field, 1, &v);
  } else {
    v.type = v.element_type = type;
    read_elements(c, type, 1, field, 0, &v);
  }
  return v;
}

}  // namespace dash::io::gguf::detail

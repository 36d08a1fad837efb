// A small GGUF writer for tests: valid files from metadata and tensors, malformed ones through
// raw values, count overrides and explicit offsets; and encoders for the storage types that
// return, with the bytes, the values the bytes stand for, computed from the format's formulas
// (not by decoding the bytes), so that a reader's decoding can be checked against them.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "dash/core/error.hpp"
#include "dash/io/gguf/types.hpp"

namespace dash::test::gguf {

using io::gguf::TensorType;
using io::gguf::ValueType;

// ---- encoders ------------------------------------------------------------------------------

// A float rounded to IEEE binary16 (nearest, ties to even): its bits, and the value it
// represents, computed from the exponent and the rounded significand.
struct Half {
  std::uint16_t bits;
  float value;
};

inline Half to_half(float x) {
  const std::uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  const double a = std::fabs(double(x));
  if (a == 0) return {sign, sign ? -0.0f : 0.0f};
  int e2;
  std::frexp(a, &e2);
  int exponent = std::max(e2 - 1, -14);                     // a in [2^exponent, 2^(exponent+1)), or subnormal
  double m = std::nearbyint(std::ldexp(a, 10 - exponent));  // the significand with 10 fraction bits
  if (m == 2048) m = 1024, ++exponent;
  if (exponent > 15) return {std::uint16_t(sign | 0x7c00), sign ? -INFINITY : INFINITY};
  const auto mantissa = std::uint16_t(m);
  const std::uint16_t bits = mantissa < 1024 ? mantissa  // subnormal (exponent field 0)
                                             : std::uint16_t(((exponent + 15) << 10) | (mantissa - 1024));
  const float value = float(std::ldexp(m, exponent - 10));
  return {std::uint16_t(sign | bits), sign ? -value : value};
}

// bfloat16: the top half of a float, rounded to nearest, ties to even.
inline Half to_bf16(float x) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(x);
  const auto bits = std::uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return {bits, std::bit_cast<float>(std::uint32_t{bits} << 16)};
}

// Bytes of a storage type, and the values they stand for.
struct Encoded {
  std::vector<std::byte> bytes;
  std::vector<float> values;
};

template <class T>
void append(std::vector<std::byte>& out, const T& v) {
  const auto* p = reinterpret_cast<const std::byte*>(&v);
  out.insert(out.end(), p, p + sizeof(T));
}

// Encodes x (its length a multiple of the type's block) as F32, F16, BF16, Q8_0, Q4_0 or Q4_1,
// choosing scales as ggml's reference quantisers do.
inline Encoded encode(TensorType type, std::span<const float> x) {
  Encoded e;
  const auto nibbles = [&](const int* q) {
    for (int j = 0; j < 16; ++j) e.bytes.push_back(std::byte(q[j] | (q[j + 16] << 4)));
  };
  const auto clamp_round = [](double v, int lo, int hi) { return std::clamp(int(std::nearbyint(v)), lo, hi); };
  if (type == TensorType::F32 || type == TensorType::F16 || type == TensorType::BF16) {
    for (float v : x) {
      if (type == TensorType::F32) {
        append(e.bytes, v);
        e.values.push_back(v);
      } else {
        const Half h = type == TensorType::F16 ? to_half(v) : to_bf16(v);
        append(e.bytes, h.bits);
        e.values.push_back(h.value);
      }
    }
    return e;
  }
  require(x.size() % 32 == 0, "gguf test writer: ", x.size(), " values are not whole blocks of 32");
  for (std::size_t b = 0; b < x.size(); b += 32) {
    const std::span<const float> block = x.subspan(b, 32);
    int q[32];
    if (type == TensorType::Q8_0) {
      float amax = 0;
      for (float v : block) amax = std::max(amax, std::fabs(v));
      const Half d = to_half(amax / 127);
      append(e.bytes, d.bits);
      for (int j = 0; j < 32; ++j) {
        q[j] = d.value == 0 ? 0 : clamp_round(block[j] / d.value, -128, 127);
        append(e.bytes, std::int8_t(q[j]));
        e.values.push_back(d.value * float(q[j]));
      }
    } else if (type == TensorType::Q4_0) {
      float extreme = 0;  // the value of largest magnitude, with its sign: it maps to q = 0
      for (float v : block)
        if (std::fabs(v) > std::fabs(extreme)) extreme = v;
      const Half d = to_half(extreme / -8);
      append(e.bytes, d.bits);
      for (int j = 0; j < 32; ++j) q[j] = d.value == 0 ? 8 : clamp_round(block[j] / d.value + 8, 0, 15);
      nibbles(q);
      for (int j = 0; j < 32; ++j) e.values.push_back(d.value * float(q[j] - 8));
    } else if (type == TensorType::Q4_1) {
      const auto [lo, hi] = std::minmax_element(block.begin(), block.end());
      const Half d = to_half((*hi - *lo) / 15);
      const Half m = to_half(*lo);
      append(e.bytes, d.bits);
      append(e.bytes, m.bits);
      for (int j = 0; j < 32; ++j) q[j] = d.value == 0 ? 0 : clamp_round((block[j] - m.value) / d.value, 0, 15);
      nibbles(q);
      for (int j = 0; j < 32; ++j) e.values.push_back(d.value * float(q[j]) + m.value);
    } else {
      fail("gguf test writer: cannot encode ", io::gguf::name_of(type));
    }
  }
  return e;
}

// ---- metadata values -----------------------------------------------------------------------

template <class T>
struct is_vector : std::false_type {};
template <class T>
struct is_vector<std::vector<T>> : std::true_type {};

// The GGUF type of a C++ value: fixed-width integers, float, double, bool, std::string, and
// std::vector of any of these (vectors of vectors are arrays of arrays).
template <class T>
constexpr ValueType value_type_of() {
  if constexpr (std::is_same_v<T, bool>) return ValueType::boolean;
  else if constexpr (std::is_same_v<T, std::uint8_t>) return ValueType::uint8;
  else if constexpr (std::is_same_v<T, std::int8_t>) return ValueType::int8;
  else if constexpr (std::is_same_v<T, std::uint16_t>) return ValueType::uint16;
  else if constexpr (std::is_same_v<T, std::int16_t>) return ValueType::int16;
  else if constexpr (std::is_same_v<T, std::uint32_t>) return ValueType::uint32;
  else if constexpr (std::is_same_v<T, std::int32_t>) return ValueType::int32;
  else if constexpr (std::is_same_v<T, std::uint64_t>) return ValueType::uint64;
  else if constexpr (std::is_same_v<T, std::int64_t>) return ValueType::int64;
  else if constexpr (std::is_same_v<T, float>) return ValueType::float32;
  else if constexpr (std::is_same_v<T, double>) return ValueType::float64;
  else if constexpr (std::is_same_v<T, std::string>) return ValueType::string;
  else {
    static_assert(is_vector<T>::value, "no GGUF value type for this C++ type");
    return ValueType::array;
  }
}

inline void append_string(std::vector<std::byte>& out, std::string_view s) {
  append(out, std::uint64_t(s.size()));
  for (char ch : s) out.push_back(std::byte(ch));
}

// The value's bytes, without its type tag.
template <class T>
void append_value(std::vector<std::byte>& out, const T& v) {
  if constexpr (std::is_same_v<T, bool>) {
    out.push_back(std::byte(v ? 1 : 0));
  } else if constexpr (std::is_same_v<T, std::string>) {
    append_string(out, v);
  } else if constexpr (is_vector<T>::value) {
    using Element = typename T::value_type;
    append(out, value_type_of<Element>());
    append(out, std::uint64_t(v.size()));
    for (const auto& element : v) append_value(out, Element(element));
  } else {
    append(out, v);
  }
}

// ---- files ---------------------------------------------------------------------------------

// Where each part of a written file starts: for truncating it at every section boundary.
struct Layout {
  std::vector<std::size_t> kv_starts;
  std::size_t infos_start = 0;
  std::vector<std::size_t> info_starts;
  std::size_t infos_end = 0;
  std::size_t data_start = 0;
  std::vector<std::size_t> tensor_starts;
  std::size_t end = 0;

  // Every offset where a field or section begins, header fields included, and the end.
  std::vector<std::size_t> boundaries() const {
    std::vector<std::size_t> b = {0, 4, 8, 16, 24};
    b.insert(b.end(), kv_starts.begin(), kv_starts.end());
    b.push_back(infos_start);
    b.insert(b.end(), info_starts.begin(), info_starts.end());
    b.push_back(infos_end);
    b.push_back(data_start);
    b.insert(b.end(), tensor_starts.begin(), tensor_starts.end());
    b.push_back(end);
    std::sort(b.begin(), b.end());
    b.erase(std::unique(b.begin(), b.end()), b.end());
    return b;
  }
};

class Writer {
 public:
  struct TensorEntry {
    std::string name;
    std::vector<std::uint64_t> dims;    // GGUF order, written as given (any count, any values)
    std::uint32_t type = 0;
    std::vector<std::byte> data;
    std::optional<std::uint64_t> offset;  // as written in the info; by default where the data lies
  };

  std::uint32_t version = 3;
  std::uint64_t alignment = 32;              // the padding the writer uses (set general.alignment too)
  std::optional<std::uint64_t> tensor_count;  // written instead of the true counts
  std::optional<std::uint64_t> kv_count;
  char magic[4] = {'G', 'G', 'U', 'F'};

  template <class T>
  Writer& add(std::string key, const T& value) {
    std::vector<std::byte> payload;
    append_value(payload, value);
    return add_raw(std::move(key), std::uint32_t(value_type_of<T>()), std::move(payload));
  }
  Writer& add(std::string key, const char* value) { return add(std::move(key), std::string(value)); }

  // A key with any type tag and any value bytes.
  Writer& add_raw(std::string key, std::uint32_t type, std::vector<std::byte> payload) {
    metadata_.push_back({std::move(key), type, std::move(payload)});
    return *this;
  }

  // Sets the alignment the writer pads to and records it as general.alignment (uint32).
  Writer& align(std::uint32_t a) {
    alignment = a;
    return add("general.alignment", a);
  }

  Writer& tensor(std::string name, std::vector<std::uint64_t> dims, TensorType type, std::vector<std::byte> data) {
    tensors_.push_back({std::move(name), std::move(dims), std::uint32_t(type), std::move(data), std::nullopt});
    return *this;
  }
  // A tensor of `type` from floats; returns the values its bytes stand for.
  std::vector<float> tensor(std::string name, std::vector<std::uint64_t> dims, TensorType type,
                            std::span<const float> values) {
    Encoded e = encode(type, values);
    tensor(std::move(name), std::move(dims), type, std::move(e.bytes));
    return e.values;
  }

  std::vector<TensorEntry>& tensors() { return tensors_; }

  std::vector<std::byte> bytes(Layout* layout = nullptr) const {
    Layout l;
    std::vector<std::byte> out;
    for (char ch : magic) out.push_back(std::byte(ch));
    append(out, version);
    append(out, tensor_count.value_or(tensors_.size()));
    append(out, kv_count.value_or(metadata_.size()));
    for (const auto& [key, type, payload] : metadata_) {
      l.kv_starts.push_back(out.size());
      append_string(out, key);
      append(out, type);
      out.insert(out.end(), payload.begin(), payload.end());
    }
    l.infos_start = out.size();
    std::vector<std::uint64_t> placed;  // where each tensor's data goes, relative to the data section
    std::uint64_t next = 0;
    for (const TensorEntry& t : tensors_) {
      placed.push_back(next);
      next = round_up(next + t.data.size());
    }
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      const TensorEntry& t = tensors_[i];
      l.info_starts.push_back(out.size());
      append_string(out, t.name);
      append(out, std::uint32_t(t.dims.size()));
      for (std::uint64_t d : t.dims) append(out, d);
      append(out, t.type);
      append(out, t.offset.value_or(placed[i]));
    }
    l.infos_end = out.size();
    out.resize(round_up(out.size()), std::byte{0});
    l.data_start = out.size();
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      out.resize(l.data_start + placed[i], std::byte{0});
      l.tensor_starts.push_back(out.size());
      out.insert(out.end(), tensors_[i].data.begin(), tensors_[i].data.end());
    }
    l.end = out.size();
    if (layout) *layout = l;
    return out;
  }

 private:
  struct Entry {
    std::string key;
    std::uint32_t type;
    std::vector<std::byte> payload;
  };

  std::uint64_t round_up(std::uint64_t n) const { return alignment ? (n + alignment - 1) / alignment * alignment : n; }

  std::vector<Entry> metadata_;
  std::vector<TensorEntry> tensors_;
};

}  // namespace dash::test::gguf

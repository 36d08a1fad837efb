// A GGUF file (versions 2 and 3) held in memory: its metadata, its tensor directory, and its
// tensors decoded to float32. Layout (little-endian):
//   "GGUF", uint32 version, uint64 tensor_count, uint64 metadata_kv_count,
//   metadata_kv_count × (string key, uint32 value type, value),
//   tensor_count × (string name, uint32 n_dims, uint64 dims[n_dims], uint32 ggml type, uint64 offset),
//   zero padding to general.alignment (default 32), then the data section.
// A string is a uint64 byte count and UTF-8 bytes; an array is a uint32 element type, a uint64
// count and the elements. Tensor offsets are relative to the data section and aligned; dims run
// innermost first (dims[0] is the row length). Version 1 used 32-bit counts and is refused.
// Parsing checks the whole structure, so that a File that exists is consistent: every count is
// checked against the bytes left before anything is allocated, and every tensor lies inside the
// data section, aligned, with no two overlapping.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <numeric>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dash/core/error.hpp"
#include "dash/core/tensor.hpp"
#include "dash/io/detail/bytes.hpp"
#include "dash/io/gguf/dequantize.hpp"
#include "dash/io/gguf/metadata.hpp"
#include "dash/io/gguf/types.hpp"

namespace dash::io::gguf {

inline constexpr std::uint64_t default_alignment = 32;
inline constexpr std::uint32_t max_dims = 4;

struct TensorInfo {
  std::string name;
  std::vector<std::uint64_t> dims;  // GGUF order: dims[0] innermost (the row length)
  TensorType type = TensorType::F32;
  std::uint64_t offset = 0;         // relative to the data section
  std::uint64_t bytes = 0;

  std::uint64_t numel() const {
    return std::accumulate(dims.begin(), dims.end(), std::uint64_t{1}, std::multiplies<>());
  }
  // The row-major shape of the decoded tensor: GGUF dims reversed, so [in, out] → [out, in].
  Shape shape() const {
    const auto d = [&](std::size_t i) { return static_cast<index_t>(dims[dims.size() - 1 - i]); };
    switch (dims.size()) {
      case 1: return Shape{d(0)};
      case 2: return Shape{d(0), d(1)};
      case 3: return Shape{d(0), d(1), d(2)};
      default: return Shape{d(0), d(1), d(2), d(3)};
    }
  }
};

class File {
 public:
  // Reads the whole file into memory and parses it; messages name the path.
  static File open(const std::filesystem::path& path) { return parse(io::detail::read_file(path), path.string()); }

  // Parses a file held in memory; `name` is what messages call it.
  static File parse(std::vector<std::byte> bytes, std::string name) {
    File f;
    f.name_ = std::move(name);
    f.bytes_ = std::move(bytes);
    io::detail::Cursor c(f.bytes_, f.name_);
    f.read_header(c);
    f.read_metadata(c);
    f.read_alignment();
    f.read_tensor_infos(c);
    f.locate_data(c);
    return f;
  }

  const std::string& name() const { return name_; }
  std::uint32_t version() const { return version_; }
  std::uint64_t alignment() const { return alignment_; }

  // Metadata keys in file order.
  const std::vector<std::string>& keys() const { return keys_; }
  bool has(std::string_view key) const { return values_.find(key) != values_.end(); }
  ValueType type_of(std::string_view key) const { return value(key).type; }

  // Typed metadata. Each fails, naming the file, the key and the value's actual type, when the
  // key is absent or holds another type.
  std::string string(std::string_view key) const { return scalar(key, ValueType::string, "a string").strings[0]; }

  // Any integer type; a uint64 above the int64 range is an error.
  std::int64_t integer(std::string_view key) const {
    const detail::Value& v = value(key);
    require(!v.is_array() && is_integer(v.type), name_, ": ", key, ": is ", v.describe(), ", expected an integer");
    return to_int64(key, v.type, v.integers[0]);
  }

  // float32, float64 or any integer type.
  double real(std::string_view key) const {
    const detail::Value& v = value(key);
    require(!v.is_array() && (is_real(v.type) || is_integer(v.type)), name_, ": ", key, ": is ", v.describe(),
            ", expected a real number");
    return is_real(v.type) ? v.reals[0] : double(to_int64(key, v.type, v.integers[0]));
  }

  bool boolean(std::string_view key) const { return scalar(key, ValueType::boolean, "a bool").integers[0] != 0; }

  std::vector<std::string> strings(std::string_view key) const {
    return array(key, ValueType::string, "an array of string").strings;
  }

  // An array of any integer type.
  std::vector<std::int64_t> integers(std::string_view key) const {
    const detail::Value& v = value(key);
    require(v.is_array() && is_integer(v.element_type), name_, ": ", key, ": is ", v.describe(),
            ", expected an array of integers");
    std::vector<std::int64_t> out;
    out.reserve(v.integers.size());
    for (std::uint64_t x : v.integers) out.push_back(to_int64(key, v.element_type, x));
    return out;
  }

  // An array of float32, float64 or any integer type.
  std::vector<double> reals(std::string_view key) const {
    const detail::Value& v = value(key);
    require(v.is_array() && (is_real(v.element_type) || is_integer(v.element_type)), name_, ": ", key, ": is ",
            v.describe(), ", expected an array of real numbers");
    if (is_real(v.element_type)) return v.reals;
    std::vector<double> out;
    out.reserve(v.integers.size());
    for (std::uint64_t x : v.integers) out.push_back(double(to_int64(key, v.element_type, x)));
    return out;
  }

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find_tensor(std::string_view name) const {
    const auto it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
  }

  // The tensor decoded to float32, shape reversed to row-major (GGUF dims [in, out] → [out, in]).
  Tensor<float> read_tensor(std::string_view name) const {
    const TensorInfo* t = find_tensor(name);
    require(t != nullptr, name_, ": ", name, ": no such tensor");
    require(is_supported(t->type), name_, ": ", t->name, ": storage type ", name_of(t->type),
            " is not supported, expected F32, F16, BF16, Q8_0, Q4_0 or Q4_1");
    Tensor<float> out(t->shape());
    detail::dequantize(t->type, std::span(bytes_).subspan(std::size_t(data_offset_ + t->offset), std::size_t(t->bytes)),
                       out.flat());
    return out;
  }

 private:
  File() = default;

  const detail::Value& value(std::string_view key) const {
    const auto it = values_.find(key);
    require(it != values_.end(), name_, ": ", key, ": missing, expected a metadata entry");
    return it->second;
  }

  const detail::Value& scalar(std::string_view key, ValueType type, const char* expected) const {
    const detail::Value& v = value(key);
    require(v.type == type, name_, ": ", key, ": is ", v.describe(), ", expected ", expected);
    return v;
  }

  const detail::Value& array(std::string_view key, ValueType element, const char* expected) const {
    const detail::Value& v = value(key);
    require(v.is_array() && v.element_type == element, name_, ": ", key, ": is ", v.describe(), ", expected ",
            expected);
    return v;
  }

  std::int64_t to_int64(std::string_view key, ValueType type, std::uint64_t bits) const {
    if (is_signed(type)) return static_cast<std::int64_t>(bits);
    require(bits <= std::uint64_t(std::numeric_limits<std::int64_t>::max()), name_, ": ", key, ": ", bits,
            " does not fit in int64, expected at most ", std::numeric_limits<std::int64_t>::max());
    return static_cast<std::int64_t>(bits);
  }

  void read_header(io::detail::Cursor& c) {
    const auto magic = c.take(4, "magic");
    const char expected[] = {'G', 'G', 'U', 'F'};
    if (!std::equal(magic.begin(), magic.end(), expected, [](std::byte b, char e) { return char(b) == e; })) {
      static constexpr char hex[] = "0123456789abcdef";
      std::string seen;
      for (std::byte b : magic) {
        const auto v = std::to_integer<unsigned>(b);
        seen += std::string(seen.empty() ? "" : " ") + hex[v >> 4] + hex[v & 15];
      }
      fail(name_, ": magic: bytes ", seen, ", expected 47 47 55 46 (\"GGUF\")");
    }
    version_ = c.read<std::uint32_t>("version");
    require(version_ != 1, name_, ": version: 1 (32-bit counts) is not supported, expected 2 or 3");
    require(version_ == 2 || version_ == 3, name_, ": version: ", version_, ", expected 2 or 3");
    tensor_count_ = c.read<std::uint64_t>("tensor_count");
    kv_count_ = c.read<std::uint64_t>("metadata_kv_count");
    // The least an entry takes: a key's length, a value type and a one-byte value.
    constexpr std::uint64_t min_kv = 8 + 4 + 1;
    require(kv_count_ <= c.remaining() / min_kv, name_, ": metadata_kv_count: ", kv_count_,
            " entries need at least ", min_kv, " bytes each, only ", c.remaining(), " bytes left");
    // The least a tensor info takes: a name's length, n_dims, one dim, a type and an offset.
    constexpr std::uint64_t min_info = 8 + 4 + 8 + 4 + 8;
    require(tensor_count_ <= c.remaining() / min_info, name_, ": tensor_count: ", tensor_count_,
            " tensors need at least ", min_info, " bytes each, only ", c.remaining(), " bytes left");
  }

  void read_metadata(io::detail::Cursor& c) {
    keys_.reserve(std::size_t(kv_count_));
    for (std::uint64_t i = 0; i < kv_count_; ++i) {
      const std::string where = "key of metadata entry " + std::to_string(i);
      std::string key = detail::read_string(c, where);
      require(!key.empty(), name_, ": ", where, ": empty, expected a key like general.name");
      require(!has(key), name_, ": ", key, ": duplicate key (metadata entry ", i, "), expected each key once");
      const ValueType type = detail::read_value_type(c, key);
      values_.emplace(key, detail::read_value(c, type, key));
      keys_.push_back(std::move(key));
    }
  }

  void read_alignment() {
    if (!has("general.alignment")) return;
    const std::int64_t a = integer("general.alignment");
    require(a > 0 && (a & (a - 1)) == 0, name_, ": general.alignment: ", a, ", expected a power of two");
    alignment_ = std::uint64_t(a);
  }

  void read_tensor_infos(io::detail::Cursor& c) {
    tensors_.reserve(std::size_t(tensor_count_));
    for (std::uint64_t i = 0; i < tensor_count_; ++i) {
      TensorInfo t;
      const std::string where = "name of tensor " + std::to_string(i);
      t.name = detail::read_string(c, where);
      require(!t.name.empty(), name_, ": ", where, ": empty, expected a tensor name");
      require(find_tensor(t.name) == nullptr, name_, ": ", t.name, ": duplicate tensor name (tensor ", i,
              "), expected each name once");
      const std::string field = t.name;
      const auto n_dims = c.read<std::uint32_t>(field + ": n_dims");
      require(n_dims >= 1 && n_dims <= max_dims, name_, ": ", field, ": n_dims ", n_dims, ", expected 1 to ",
              max_dims);
      std::uint64_t numel = 1;
      for (std::uint32_t d = 0; d < n_dims; ++d) {
        const auto dim = c.read<std::uint64_t>(field + ": dims");
        require(dim > 0, name_, ": ", field, ": dims[", d, "] is 0, expected > 0");
        require(dim <= std::uint64_t(std::numeric_limits<std::int64_t>::max()) / numel, name_, ": ", field,
                ": dims[0..", d, "] hold more than 2^63 elements, expected a tensor that fits in memory");
        numel *= dim;
        t.dims.push_back(dim);
      }
      const auto type_id = c.read<std::uint32_t>(field + ": type");
      t.type = static_cast<TensorType>(type_id);
      const auto layout = layout_of(t.type);
      require(layout.has_value(), name_, ": ", field, ": tensor type ", type_id, " is not a ggml type");
      require(t.dims[0] % layout->values == 0, name_, ": ", field, ": row length ", t.dims[0],
              " is not a multiple of ", layout->name, "'s block of ", layout->values, " values");
      const std::uint64_t blocks = numel / layout->values;
      require(blocks <= std::numeric_limits<std::uint64_t>::max() / layout->bytes, name_, ": ", field, ": ",
              numel, " ", layout->name, " values need more than 2^64 bytes");
      t.bytes = blocks * layout->bytes;
      t.offset = c.read<std::uint64_t>(field + ": offset");
      require(t.offset % alignment_ == 0, name_, ": ", field, ": offset ", t.offset,
              " is not a multiple of the alignment ", alignment_);
      tensor_index_.emplace(t.name, tensors_.size());
      tensors_.push_back(std::move(t));
    }
  }

  // The data section starts at the first aligned offset after the tensor infos; every tensor
  // must lie inside it, and no two may share bytes.
  void locate_data(const io::detail::Cursor& c) {
    const std::uint64_t end_of_infos = c.offset();
    data_offset_ = end_of_infos + (alignment_ - end_of_infos % alignment_) % alignment_;
    if (tensors_.empty()) return;
    require(data_offset_ <= bytes_.size(), name_, ": data section: starts at offset ", data_offset_,
            " (infos end at ", end_of_infos, ", aligned to ", alignment_, "), past the end of the file (",
            bytes_.size(), " bytes)");
    const std::uint64_t data_size = bytes_.size() - data_offset_;
    for (const TensorInfo& t : tensors_)
      require(t.offset <= data_size && t.bytes <= data_size - t.offset, name_, ": ", t.name, ": data [", t.offset,
              ", ", t.offset, " + ", t.bytes, ") lies outside the data section of ", data_size,
              " bytes (file truncated?)");
    std::vector<const TensorInfo*> by_offset;
    for (const TensorInfo& t : tensors_) by_offset.push_back(&t);
    std::sort(by_offset.begin(), by_offset.end(),
              [](const TensorInfo* a, const TensorInfo* b) { return a->offset < b->offset; });
    for (std::size_t i = 1; i < by_offset.size(); ++i) {
      const TensorInfo& a = *by_offset[i - 1];
      const TensorInfo& b = *by_offset[i];
      require(a.offset + a.bytes <= b.offset, name_, ": ", b.name, ": data [", b.offset, ", ", b.offset + b.bytes,
              ") overlaps ", a.name, "'s [", a.offset, ", ", a.offset + a.bytes, "), expected disjoint tensors");
    }
  }

  std::string name_;
  std::vector<std::byte> bytes_;
  std::uint32_t version_ = 0;
  std::uint64_t tensor_count_ = 0;
  std::uint64_t kv_count_ = 0;
  std::uint64_t alignment_ = default_alignment;
  std::vector<std::string> keys_;
  std::map<std::string, detail::Value, std::less<>> values_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::size_t, std::less<>> tensor_index_;
  std::uint64_t data_offset_ = 0;
};

}  // namespace dash::io::gguf

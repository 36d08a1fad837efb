// Bounded reading of a checkpoint held in memory: every read names the field it is for, so a
// truncated or corrupt file yields a dash::Error naming the file, the field and the offset
// instead of a read past the end.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "dash/core/error.hpp"

namespace dash::io::detail {

// The whole file in memory (checkpoints here are at most a few GiB; the GPU copy is separate).
inline std::vector<std::byte> read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  require(bool(in), path.string(), ": cannot open for reading");
  const std::streamsize size = in.tellg();
  require(size >= 0, path.string(), ": cannot determine the size");
  std::vector<std::byte> bytes(static_cast<std::size_t>(size));
  in.seekg(0);
  require(bool(in.read(reinterpret_cast<char*>(bytes.data()), size)), path.string(), ": read failed");
  return bytes;
}

// A little-endian reader over [data, data + size) that refuses to step outside it.
class Cursor {
 public:
  Cursor(std::span<const std::byte> bytes, std::string file) : bytes_(bytes), file_(std::move(file)) {}

  const std::string& file() const { return file_; }
  std::size_t offset() const { return offset_; }
  std::size_t size() const { return bytes_.size(); }
  std::size_t remaining() const { return bytes_.size() - offset_; }

  // n bytes for `field`, or an error saying how many were left.
  std::span<const std::byte> take(std::size_t n, std::string_view field) {
    require(n <= remaining(), file_, ": ", field, " needs ", n, " bytes at offset ", offset_, ", only ", remaining(),
            " left (file truncated?)");
    const auto out = bytes_.subspan(offset_, n);
    offset_ += n;
    return out;
  }

  template <class T>
    requires std::is_trivially_copyable_v<T>
  T read(std::string_view field) {
    T value;
    std::memcpy(&value, take(sizeof(T), field).data(), sizeof(T));
    return value;  // the formats read here are little-endian, as is every host dash runs on
  }

  void seek(std::size_t offset, std::string_view field) {
    require(offset <= bytes_.size(), file_, ": ", field, " at offset ", offset, " is past the end (", bytes_.size(),
            " bytes)");
    offset_ = offset;
  }

 private:
  std::span<const std::byte> bytes_;
  std::string file_;
  std::size_t offset_ = 0;
};

static_assert(std::endian::native == std::endian::little, "dash's checkpoint readers assume a little-endian host");

}  // namespace dash::io::detail

// Bounded reading of a checkpoint held in memory: every read names the field it is for, so a
// truncated or corrupt file yields a dash::Error naming the file, the field and the offset
// instead of a read past the end.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "dash/core/error.hpp"

namespace dash::io::detail {

// The whole file in memory (configs, tokenizers and small checkpoints).
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

// Read-only bytes of a file or of a buffer, shared by their copies. A file is mapped from the
// page cache rather than read (a checkpoint of many GiB is neither copied nor zeroed first, and
// its pages come in as the threads converting it touch them). Like every reader of mapped
// checkpoints, this assumes the file is not truncated while it is open.
class SharedBytes {
 public:
  SharedBytes() = default;
  explicit SharedBytes(std::vector<std::byte> bytes) {
    auto owned = std::make_shared<const std::vector<std::byte>>(std::move(bytes));
    bytes_ = std::span<const std::byte>(*owned);
    owner_ = std::move(owned);
  }

  static SharedBytes map_file(const std::filesystem::path& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    require(fd >= 0, path.string(), ": cannot open for reading (", std::strerror(errno), ")");
    struct ::stat st {};
    const int stat_status = ::fstat(fd, &st);
    const int stat_errno = errno;
    if (stat_status != 0 || st.st_size == 0) {
      ::close(fd);
      require(stat_status == 0, path.string(), ": cannot determine the size (", std::strerror(stat_errno), ")");
      return SharedBytes(std::vector<std::byte>());
    }
    const auto size = std::size_t(st.st_size);
    void* base = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    const int map_errno = errno;
    ::close(fd);  // the mapping keeps the file open
    require(base != MAP_FAILED, path.string(), ": cannot map ", size, " bytes for reading (",
            std::strerror(map_errno), ")");
    SharedBytes out;
    out.bytes_ = std::span<const std::byte>(static_cast<const std::byte*>(base), size);
    out.owner_ = std::shared_ptr<const void>(base, [size](const void* p) { ::munmap(const_cast<void*>(p), size); });
    return out;
  }

  std::span<const std::byte> span() const { return bytes_; }
  const std::byte* data() const { return bytes_.data(); }
  std::size_t size() const { return bytes_.size(); }

 private:
  std::shared_ptr<const void> owner_;
  std::span<const std::byte> bytes_;
};

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

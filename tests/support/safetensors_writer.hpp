// A safetensors writer for tests, separate from the library's: tensors of any dtype given as
// raw bytes, and headers taken verbatim, so that tests can build valid files, corrupt them one
// field at a time, and check the reader against bytes it did not produce.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "dash/core/error.hpp"
#include "dash/core/tensor.hpp"

namespace dash::test {

struct RawTensor {
  std::string name;
  std::string dtype;
  std::vector<std::int64_t> shape;
  std::vector<std::byte> data;
};

inline std::vector<std::int64_t> extents(const Shape& s) {
  std::vector<std::int64_t> out;
  for (int a = 0; a < s.rank(); ++a) out.push_back(s[a]);
  return out;
}

inline RawTensor raw_f32(std::string name, const Tensor<float>& t) {
  RawTensor raw{std::move(name), "F32", extents(t.shape()), std::vector<std::byte>(std::size_t(t.numel()) * 4)};
  if (t.numel()) std::memcpy(raw.data.data(), t.data(), raw.data.size());
  return raw;
}

// 16-bit patterns (F16, BF16) as little-endian bytes.
inline std::vector<std::byte> raw_u16(const std::vector<std::uint16_t>& bits) {
  std::vector<std::byte> out;
  for (std::uint16_t b : bits) out.push_back(std::byte(b & 0xff)), out.push_back(std::byte(b >> 8));
  return out;
}

// The header JSON for `tensors` laid out back to back in the order given.
inline std::string safetensors_header(const std::vector<RawTensor>& tensors,
                                      const std::map<std::string, std::string>& metadata = {}) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::uint64_t offset = 0;
  for (const RawTensor& t : tensors) {
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.data.size()}}};
    offset += t.data.size();
  }
  return header.dump();
}

// 8-byte little-endian header length, the header as given, then the data.
inline std::vector<std::byte> safetensors_bytes(std::string_view header, std::span<const std::byte> data) {
  std::vector<std::byte> out(8);
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[std::size_t(i)] = std::byte((n >> (8 * i)) & 0xff);
  for (char c : header) out.push_back(std::byte(c));
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

inline std::vector<std::byte> concatenated_data(const std::vector<RawTensor>& tensors) {
  std::vector<std::byte> data;
  for (const RawTensor& t : tensors) data.insert(data.end(), t.data.begin(), t.data.end());
  return data;
}

inline std::vector<std::byte> safetensors_bytes(const std::vector<RawTensor>& tensors,
                                                const std::map<std::string, std::string>& metadata = {}) {
  return safetensors_bytes(safetensors_header(tensors, metadata), concatenated_data(tensors));
}

inline void write_bytes(const std::filesystem::path& path, std::span<const std::byte> bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  require(bool(out), path.string(), ": test could not write");
}

inline void write_text(const std::filesystem::path& path, std::string_view text) {
  write_bytes(path, std::span(reinterpret_cast<const std::byte*>(text.data()), text.size()));
}

inline std::string read_text(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  require(bool(in), path.string(), ": test could not read");
  return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace dash::test

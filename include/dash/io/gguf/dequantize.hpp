// Decoding of ggml's storage types to float32. The block layouts, as ggml defines them (values of
// a row are cut into consecutive blocks of 32; fp16 is IEEE binary16, little-endian):
//   Q8_0: fp16 d, int8 q[32]                 x[j] = d·q[j]
//   Q4_0: fp16 d, uint8 qs[16]               x[j] = d·((qs[j] & 15) − 8), x[j+16] = d·((qs[j] >> 4) − 8)
//   Q4_1: fp16 d, fp16 m, uint8 qs[16]       x[j] = d·(qs[j] & 15) + m,   x[j+16] = d·(qs[j] >> 4) + m
// F32, F16 and BF16 hold one value per element.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

#include "dash/core/error.hpp"
#include "dash/io/detail/half.hpp"
#include "dash/io/gguf/types.hpp"

namespace dash::io::gguf::detail {

template <class T>
T load(const std::byte* p) {
  T value;
  std::memcpy(&value, p, sizeof(T));
  return value;
}

inline void dequantize_q8_0(const std::byte* block, float* out) {
  const float d = io::detail::half_to_float(load<std::uint16_t>(block));
  for (int j = 0; j < 32; ++j) out[j] = d * float(load<std::int8_t>(block + 2 + j));
}

inline void dequantize_q4_0(const std::byte* block, float* out) {
  const float d = io::detail::half_to_float(load<std::uint16_t>(block));
  for (int j = 0; j < 16; ++j) {
    const auto q = std::to_integer<int>(block[2 + j]);
    out[j] = d * float((q & 15) - 8);
    out[j + 16] = d * float((q >> 4) - 8);
  }
}

inline void dequantize_q4_1(const std::byte* block, float* out) {
  const float d = io::detail::half_to_float(load<std::uint16_t>(block));
  const float m = io::detail::half_to_float(load<std::uint16_t>(block + 2));
  for (int j = 0; j < 16; ++j) {
    const auto q = std::to_integer<int>(block[4 + j]);
    out[j] = d * float(q & 15) + m;
    out[j + 16] = d * float(q >> 4) + m;
  }
}

// Decodes src, which holds exactly dst.size() values of `type` (a supported type), into dst.
inline void dequantize(TensorType type, std::span<const std::byte> src, std::span<float> dst) {
  const auto layout = layout_of(type);
  require(is_supported(type) && layout, "dequantize: storage type ", name_of(type), " is not supported");
  require(dst.size() % layout->values == 0 && src.size() == dst.size() / layout->values * layout->bytes,
          "dequantize: ", src.size(), " bytes of ", layout->name, " do not hold ", dst.size(), " values");
  const std::byte* in = src.data();
  float* out = dst.data();
  const auto blocks = [&](void (*decode)(const std::byte*, float*)) {
    for (std::size_t b = 0; b < dst.size() / layout->values; ++b)
      decode(in + b * layout->bytes, out + b * layout->values);
  };
  switch (type) {
    case TensorType::F32: std::memcpy(out, in, src.size()); break;
    case TensorType::F16:
      for (std::size_t i = 0; i < dst.size(); ++i) out[i] = io::detail::half_to_float(load<std::uint16_t>(in + 2 * i));
      break;
    case TensorType::BF16:
      for (std::size_t i = 0; i < dst.size(); ++i) out[i] = io::detail::bf16_to_float(load<std::uint16_t>(in + 2 * i));
      break;
    case TensorType::Q8_0: blocks(dequantize_q8_0); break;
    case TensorType::Q4_0: blocks(dequantize_q4_0); break;
    case TensorType::Q4_1: blocks(dequantize_q4_1); break;
    default: break;
  }
}

}  // namespace dash::io::gguf::detail

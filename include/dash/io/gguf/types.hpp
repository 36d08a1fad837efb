// The two enumerations of a GGUF file: the types of metadata values, and the ggml storage types
// of tensors with their block layout (how many values a block holds, how many bytes it takes).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace dash::io::gguf {

enum class ValueType : std::uint32_t {
  uint8 = 0,
  int8 = 1,
  uint16 = 2,
  int16 = 3,
  uint32 = 4,
  int32 = 5,
  float32 = 6,
  boolean = 7,
  string = 8,
  array = 9,
  uint64 = 10,
  int64 = 11,
  float64 = 12,
};

inline bool is_known(ValueType t) { return std::uint32_t(t) <= std::uint32_t(ValueType::float64); }

inline bool is_integer(ValueType t) {
  switch (t) {
    case ValueType::uint8: case ValueType::int8: case ValueType::uint16: case ValueType::int16:
    case ValueType::uint32: case ValueType::int32: case ValueType::uint64: case ValueType::int64:
      return true;
    default:
      return false;
  }
}

inline bool is_signed(ValueType t) {
  return t == ValueType::int8 || t == ValueType::int16 || t == ValueType::int32 || t == ValueType::int64;
}

inline bool is_real(ValueType t) { return t == ValueType::float32 || t == ValueType::float64; }

// Bytes of one value of a fixed-size type; 0 for string and array, whose size is in the data.
inline std::uint64_t fixed_size(ValueType t) {
  switch (t) {
    case ValueType::uint8: case ValueType::int8: case ValueType::boolean: return 1;
    case ValueType::uint16: case ValueType::int16: return 2;
    case ValueType::uint32: case ValueType::int32: case ValueType::float32: return 4;
    case ValueType::uint64: case ValueType::int64: case ValueType::float64: return 8;
    default: return 0;
  }
}

inline std::string name_of(ValueType t) {
  switch (t) {
    case ValueType::uint8: return "uint8";
    case ValueType::int8: return "int8";
    case ValueType::uint16: return "uint16";
    case ValueType::int16: return "int16";
    case ValueType::uint32: return "uint32";
    case ValueType::int32: return "int32";
    case ValueType::float32: return "float32";
    case ValueType::boolean: return "bool";
    case ValueType::string: return "string";
    case ValueType::array: return "array";
    case ValueType::uint64: return "uint64";
    case ValueType::int64: return "int64";
    case ValueType::float64: return "float64";
  }
  return "value type " + std::to_string(std::uint32_t(t));
}

// ggml's type ids as GGUF stores them. Ids 4, 5, 31-33 and 36-38 belonged to layouts that ggml
// has since removed and are refused like any unknown id.
enum class TensorType : std::uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  IQ2_XXS = 16,
  IQ2_XS = 17,
  IQ3_XXS = 18,
  IQ1_S = 19,
  IQ4_NL = 20,
  IQ3_S = 21,
  IQ2_S = 22,
  IQ4_XS = 23,
  I8 = 24,
  I16 = 25,
  I32 = 26,
  I64 = 27,
  F64 = 28,
  IQ1_M = 29,
  BF16 = 30,
  TQ1_0 = 34,
  TQ2_0 = 35,
  MXFP4 = 39,
  NVFP4 = 40,
  Q1_0 = 41,
};

// A storage type's name and block: `values` consecutive values of a row take `bytes` bytes.
struct TypeLayout {
  const char* name;
  std::uint64_t values;
  std::uint64_t bytes;
};

// The layout of every type ggml writes to files, or nothing for an id it does not define.
inline std::optional<TypeLayout> layout_of(TensorType t) {
  switch (t) {
    case TensorType::F32: return TypeLayout{"F32", 1, 4};
    case TensorType::F16: return TypeLayout{"F16", 1, 2};
    case TensorType::Q4_0: return TypeLayout{"Q4_0", 32, 18};
    case TensorType::Q4_1: return TypeLayout{"Q4_1", 32, 20};
    case TensorType::Q5_0: return TypeLayout{"Q5_0", 32, 22};
    case TensorType::Q5_1: return TypeLayout{"Q5_1", 32, 24};
    case TensorType::Q8_0: return TypeLayout{"Q8_0", 32, 34};
    case TensorType::Q8_1: return TypeLayout{"Q8_1", 32, 36};
    case TensorType::Q2_K: return TypeLayout{"Q2_K", 256, 84};
    case TensorType::Q3_K: return TypeLayout{"Q3_K", 256, 110};
    case TensorType::Q4_K: return TypeLayout{"Q4_K", 256, 144};
    case TensorType::Q5_K: return TypeLayout{"Q5_K", 256, 176};
    case TensorType::Q6_K: return TypeLayout{"Q6_K", 256, 210};
    case TensorType::Q8_K: return TypeLayout{"Q8_K", 256, 292};
    case TensorType::IQ2_XXS: return TypeLayout{"IQ2_XXS", 256, 66};
    case TensorType::IQ2_XS: return TypeLayout{"IQ2_XS", 256, 74};
    case TensorType::IQ3_XXS: return TypeLayout{"IQ3_XXS", 256, 98};
    case TensorType::IQ1_S: return TypeLayout{"IQ1_S", 256, 50};
    case TensorType::IQ4_NL: return TypeLayout{"IQ4_NL", 32, 18};
    case TensorType::IQ3_S: return TypeLayout{"IQ3_S", 256, 110};
    case TensorType::IQ2_S: return TypeLayout{"IQ2_S", 256, 82};
    case TensorType::IQ4_XS: return TypeLayout{"IQ4_XS", 256, 136};
    case TensorType::I8: return TypeLayout{"I8", 1, 1};
    case TensorType::I16: return TypeLayout{"I16", 1, 2};
    case TensorType::I32: return TypeLayout{"I32", 1, 4};
    case TensorType::I64: return TypeLayout{"I64", 1, 8};
    case TensorType::F64: return TypeLayout{"F64", 1, 8};
    case TensorType::IQ1_M: return TypeLayout{"IQ1_M", 256, 56};
    case TensorType::BF16: return TypeLayout{"BF16", 1, 2};
    case TensorType::TQ1_0: return TypeLayout{"TQ1_0", 256, 54};
    case TensorType::TQ2_0: return TypeLayout{"TQ2_0", 256, 66};
    case TensorType::MXFP4: return TypeLayout{"MXFP4", 32, 17};
    case TensorType::NVFP4: return TypeLayout{"NVFP4", 64, 36};
    case TensorType::Q1_0: return TypeLayout{"Q1_0", 128, 18};
  }
  return std::nullopt;
}

inline std::string name_of(TensorType t) {
  const auto layout = layout_of(t);
  return layout ? std::string(layout->name) : "type " + std::to_string(std::uint32_t(t));
}

// The types read_tensor turns into float32; the others are known (their size can be checked)
// but not decoded.
inline bool is_supported(TensorType t) {
  switch (t) {
    case TensorType::F32: case TensorType::F16: case TensorType::BF16:
    case TensorType::Q4_0: case TensorType::Q4_1: case TensorType::Q8_0:
      return true;
    default:
      return false;
  }
}

}  // namespace dash::io::gguf

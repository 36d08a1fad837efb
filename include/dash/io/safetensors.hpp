// Safetensors, Hugging Face's tensor file: an 8-byte little-endian header length N, N bytes of
// JSON giving each tensor's dtype, shape and byte range [begin, end) within the data that
// follows, and an optional "__metadata__" object of strings. Everything the header claims is
// checked against the bytes present before any data is touched (the rules of the reference
// implementation: tensors tile the data buffer exactly, each range holding numel · dtype size
// bytes). F32, F16 and BF16 tensors are read as float32.
//
// read_safetensors() assembles a Llama-family checkpoint from a Hugging Face model folder:
// config.json plus model.safetensors, or plus model.safetensors.index.json and its shards.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "dash/core/error.hpp"
#include "dash/core/parallel.hpp"
#include "dash/core/tensor.hpp"
#include "dash/io/checkpoint.hpp"
#include "dash/io/detail/bytes.hpp"
#include "dash/io/detail/half.hpp"
#include "dash/io/hf_config.hpp"

namespace dash::io {
namespace detail {

// out = a · b; false when that overflows.
inline bool multiply(std::uint64_t a, std::uint64_t b, std::uint64_t& out) { return !__builtin_mul_overflow(a, b, &out); }

// A shape of rank 0 to 6 from its extents (callers check the rank and the extents).
inline Shape shape_of(const std::vector<std::int64_t>& d) {
  switch (d.size()) {
    case 0: return Shape{};
    case 1: return Shape{d[0]};
    case 2: return Shape{d[0], d[1]};
    case 3: return Shape{d[0], d[1], d[2]};
    case 4: return Shape{d[0], d[1], d[2], d[3]};
    case 5: return Shape{d[0], d[1], d[2], d[3], d[4]};
    default: return Shape{d[0], d[1], d[2], d[3], d[4], d[5]};
  }
}

}  // namespace detail

namespace safetensors {

// Every dtype the format defines: all are recognised (so that a file mixing, say, I64 buffers
// with float weights still parses), only the float types are read.
enum class DType : std::uint8_t {
  F32, F16, BF16, F64, C64, I64, I32, I16, I8, U64, U32, U16, U8, BOOL,
  F8_E4M3, F8_E5M2, F8_E8M0, F6_E2M3, F6_E3M2, F4,
};

struct DTypeInfo {
  std::string_view name;
  DType type;
  int bits;  // per element; the 4- and 6-bit types pack elements across bytes
};

inline constexpr std::array<DTypeInfo, 20> dtypes{{
    {"F32", DType::F32, 32},        {"F16", DType::F16, 16},         {"BF16", DType::BF16, 16},
    {"F64", DType::F64, 64},        {"C64", DType::C64, 64},         {"I64", DType::I64, 64},
    {"I32", DType::I32, 32},        {"I16", DType::I16, 16},         {"I8", DType::I8, 8},
    {"U64", DType::U64, 64},        {"U32", DType::U32, 32},         {"U16", DType::U16, 16},
    {"U8", DType::U8, 8},           {"BOOL", DType::BOOL, 8},        {"F8_E4M3", DType::F8_E4M3, 8},
    {"F8_E5M2", DType::F8_E5M2, 8}, {"F8_E8M0", DType::F8_E8M0, 8},  {"F6_E2M3", DType::F6_E2M3, 6},
    {"F6_E3M2", DType::F6_E3M2, 6}, {"F4", DType::F4, 4},
}};

inline const DTypeInfo* dtype_named(std::string_view name) {
  for (const DTypeInfo& d : dtypes)
    if (d.name == name) return &d;
  return nullptr;
}

struct TensorInfo {
  std::string name;
  std::string dtype;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;  // byte range relative to the start of the data buffer
};

// The reference implementation's bound: a header above it is corrupt, not large.
inline constexpr std::uint64_t max_header_bytes = 100'000'000;
// Values per thread below which converting a tensor to float32 stays on one thread.
inline constexpr index_t conversion_grain = index_t(1) << 20;

// A safetensors file held in memory, its header parsed and checked.
class File {
 public:
  static File open(const std::filesystem::path& path) {
    return parse(detail::SharedBytes::map_file(path), path.string());
  }
  static File parse(std::vector<std::byte> bytes, std::string name) {
    return parse(detail::SharedBytes(std::move(bytes)), std::move(name));
  }
  static File parse(detail::SharedBytes bytes, std::string name) {
    File f;
    f.name_ = std::move(name);
    f.bytes_ = std::move(bytes);
    f.parse_header();
    return f;
  }

  const std::string& name() const { return name_; }
  // In the order of their data in the file.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(std::string_view tensor) const {
    const auto it = index_.find(tensor);
    return it == index_.end() ? nullptr : &tensors_[it->second];
  }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  Tensor<float> read(std::string_view tensor) const {
    const TensorInfo* info = find(tensor);
    require(info != nullptr, name_, ": tensor \"", tensor, "\": not in the file");
    const DType type = dtype_named(info->dtype)->type;
    require(type == DType::F32 || type == DType::F16 || type == DType::BF16, name_, ": tensor \"", tensor,
            "\": dtype ", info->dtype, " cannot be read as float, expected F32, F16 or BF16");
    require(info->shape.size() <= std::size_t(Shape::max_rank), name_, ": tensor \"", tensor, "\": rank ",
            info->shape.size(), ", expected at most ", Shape::max_rank);
    Tensor<float> out(detail::shape_of(info->shape), uninitialized);
    const std::byte* src = bytes_.data() + data_start_ + info->begin;
    float* dst = out.data();
    const auto convert_16_bit = [&](auto decode) {
      parallel_for(out.numel(), conversion_grain, [&](index_t begin, index_t end) {
        for (index_t i = begin; i < end; ++i) {
          std::uint16_t bits;
          std::memcpy(&bits, src + 2 * std::size_t(i), 2);
          dst[i] = decode(bits);
        }
      });
    };
    if (type == DType::F32)
      parallel_for(out.numel(), conversion_grain, [&](index_t begin, index_t end) {
        std::memcpy(dst + begin, src + sizeof(float) * std::size_t(begin), sizeof(float) * std::size_t(end - begin));
      });
    else if (type == DType::BF16)
      convert_16_bit([](std::uint16_t bits) { return detail::bf16_to_float(bits); });
    else
      convert_16_bit([](std::uint16_t bits) { return detail::half_to_float(bits); });
    return out;
  }

 private:
  File() = default;

  void parse_header() {
    detail::Cursor cursor(bytes_.span(), name_);
    const auto header_size = cursor.read<std::uint64_t>("header length");
    require(header_size <= max_header_bytes, name_, ": header length: ", header_size, " bytes, expected at most ",
            max_header_bytes);
    const auto text = cursor.take(std::size_t(header_size), "header");
    data_start_ = cursor.offset();
    const std::uint64_t data_size = cursor.remaining();
    const nlohmann::json header = detail::parse_json(
        std::string_view(reinterpret_cast<const char*>(text.data()), text.size()), name_, "header");
    if (!header.is_object())
      fail(name_, ": header: ", detail::json_excerpt(header), ", expected a JSON object");

    for (const auto& [key, value] : header.items()) {
      if (key == "__metadata__")
        read_metadata(value);
      else
        tensors_.push_back(read_tensor_info(key, value, data_size));
    }
    // The data buffer is exactly the tensors' ranges laid end to end (empty tensors, which
    // share an offset, in name order).
    std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
      return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
    });
    std::uint64_t covered = 0;
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      const TensorInfo& t = tensors_[i];
      if (t.begin < covered)
        fail(name_, ": tensor \"", t.name, "\": data_offsets [", t.begin, ", ", t.end, ") overlap tensor \"",
             tensors_[i - 1].name, "\" which ends at ", covered, ", expected disjoint ranges");
      if (t.begin > covered)
        fail(name_, ": tensor \"", t.name, "\": data_offsets begin at ", t.begin, ", expected ", covered,
             " (tensors must follow one another without gaps)");
      covered = t.end;
      index_.emplace(t.name, i);
    }
    require(covered == data_size, name_, ": data: ", data_size, " bytes after the header, the tensors cover ",
            covered, ", expected equal (trailing bytes)");
  }

  void read_metadata(const nlohmann::json& value) {
    if (!value.is_object())
      fail(name_, ": __metadata__: ", detail::json_excerpt(value), ", expected an object of strings");
    for (const auto& [key, v] : value.items()) {
      if (!v.is_string())
        fail(name_, ": __metadata__: \"", key, "\": ", detail::json_excerpt(v), ", expected a string");
      metadata_.emplace(key, v.get<std::string>());
    }
  }

  TensorInfo read_tensor_info(const std::string& tensor, const nlohmann::json& entry, std::uint64_t data_size) const {
    const auto wrong = [&](std::string_view field, const nlohmann::json* v, std::string_view expected) {
      fail(name_, ": tensor \"", tensor, "\": ", field, ": ", v ? detail::json_excerpt(*v) : "missing",
           ", expected ", expected);
    };
    if (!entry.is_object()) wrong("entry", &entry, "an object with dtype, shape and data_offsets");
    TensorInfo info;
    info.name = tensor;

    const nlohmann::json* dtype = detail::member(entry, "dtype");
    if (!dtype || !dtype->is_string()) wrong("dtype", dtype, "a dtype name such as \"F32\"");
    info.dtype = dtype->get<std::string>();
    const DTypeInfo* type = dtype_named(info.dtype);
    if (!type) wrong("dtype", dtype, "one of F32, F16, BF16, F64, C64, I64..I8, U64..U8, BOOL, F8_*, F6_*, F4");

    const nlohmann::json* shape = detail::member(entry, "shape");
    if (!shape || !shape->is_array()) wrong("shape", shape, "an array of extents");
    // The size in bits of the non-zero extents must fit even when another extent is 0, for
    // Shape's element count and strides are running products of the extents.
    std::uint64_t bits = std::uint64_t(type->bits);
    bool empty = false;
    for (const nlohmann::json& extent : *shape) {
      if (!extent.is_number_unsigned()) wrong("shape", &extent, "non-negative integer extents");
      const auto e = extent.get<std::uint64_t>();
      if (e == 0) empty = true;
      else if (!detail::multiply(bits, e, bits) || bits / std::uint64_t(type->bits) > std::uint64_t(INT64_MAX))
        wrong("shape", shape, "a shape whose size in bytes fits in 64 bits");
      info.shape.push_back(std::int64_t(e));
    }
    if (empty) bits = 0;
    if (bits % 8 != 0) wrong("shape", shape, "a whole number of bytes for this dtype");

    const nlohmann::json* offsets = detail::member(entry, "data_offsets");
    if (!offsets || !offsets->is_array() || offsets->size() != 2 || !(*offsets)[0].is_number_unsigned() ||
        !(*offsets)[1].is_number_unsigned())
      wrong("data_offsets", offsets, "[begin, end], two non-negative integers");
    info.begin = (*offsets)[0].get<std::uint64_t>();
    info.end = (*offsets)[1].get<std::uint64_t>();
    if (info.begin > info.end || info.end > data_size)
      fail(name_, ": tensor \"", tensor, "\": data_offsets: [", info.begin, ", ", info.end,
           "], expected begin <= end <= ", data_size, " (the data buffer's size)");
    if (info.end - info.begin != bits / 8)
      fail(name_, ": tensor \"", tensor, "\": data_offsets: [", info.begin, ", ", info.end, "] hold ",
           info.end - info.begin, " bytes, expected ", bits / 8, " for ", info.dtype, " of shape ",
           detail::json_excerpt(*shape));
    return info;
  }

  std::string name_;
  detail::SharedBytes bytes_;
  std::size_t data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::size_t, std::less<>> index_;
  std::map<std::string, std::string> metadata_;
};

// Writes float tensors, stored F32, and string metadata. The file appears complete or not at
// all: it is written beside its destination and renamed over it.
inline void write(const std::filesystem::path& path, const std::vector<std::pair<std::string, const Tensor<float>*>>& tensors,
                  const std::map<std::string, std::string>& metadata = {}) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    require(tensor != nullptr, path.string(), ": tensor \"", name, "\": null, expected a tensor");
    require(!name.empty() && name != "__metadata__", path.string(), ": tensor name \"", name,
            "\", expected a non-empty name other than __metadata__");
    require(!header.contains(name), path.string(), ": tensor \"", name, "\": given twice, expected unique names");
    std::vector<std::int64_t> shape;
    for (int a = 0; a < tensor->rank(); ++a) shape.push_back(tensor->dim(a));
    const std::uint64_t size = std::uint64_t(tensor->numel()) * sizeof(float);
    header[name] = {{"dtype", "F32"}, {"shape", shape}, {"data_offsets", {offset, offset + size}}};
    offset += size;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {
    fail(path.string(), ": header: ", e.what(), ", expected UTF-8 tensor names and metadata");
  }
  text.append((8 - text.size() % 8) % 8, ' ');  // 8-byte aligned data, as the reference writer pads

  std::filesystem::path partial = path;
  partial += ".partial";
  {
    std::ofstream out(partial, std::ios::binary | std::ios::trunc);
    require(bool(out), partial.string(), ": cannot open for writing");
    const std::uint64_t header_size = text.size();
    out.write(reinterpret_cast<const char*>(&header_size), sizeof header_size);
    out.write(text.data(), std::streamsize(text.size()));
    for (const auto& [name, tensor] : tensors)
      out.write(reinterpret_cast<const char*>(tensor->data()), std::streamsize(tensor->numel() * sizeof(float)));
    out.close();
    if (!out) {
      std::error_code ignored;
      std::filesystem::remove(partial, ignored);
      fail(partial.string(), ": write failed (disk full?)");
    }
  }
  std::error_code error;
  std::filesystem::rename(partial, path, error);
  if (error) {
    std::error_code ignored;
    std::filesystem::remove(partial, ignored);
    fail(path.string(), ": cannot rename ", partial.string(), " onto it (", error.message(), ")");
  }
}

}  // namespace safetensors

namespace detail {

// Calls f(hf_name, destination, shape) for every tensor a Hugging Face Llama/Mistral/Qwen2
// checkpoint with config `c` holds, each [out, in] as stored.
template <class F>
void for_each_hf_tensor(const model::Config& c, model::Weights<float>& w, F&& f) {
  const AttentionShape s = c.attention();
  w.layers.resize(std::size_t(c.n_layers));
  f(std::string("model.embed_tokens.weight"), w.embedding, Shape{c.vocab_size, c.d_model});
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    model::LayerWeights<float>& layer = w.layers[std::size_t(l)];
    AttentionWeights<float>& a = layer.attention;
    f(p + "input_layernorm.weight", layer.attn_norm, Shape{c.d_model});
    f(p + "self_attn.q_proj.weight", a.wq, Shape{s.q_dim(), c.d_model});
    f(p + "self_attn.k_proj.weight", a.wk, Shape{s.kv_dim(), c.d_model});
    f(p + "self_attn.v_proj.weight", a.wv, Shape{s.kv_dim(), c.d_model});
    if (c.qkv_bias) {
      f(p + "self_attn.q_proj.bias", a.bq, Shape{s.q_dim()});
      f(p + "self_attn.k_proj.bias", a.bk, Shape{s.kv_dim()});
      f(p + "self_attn.v_proj.bias", a.bv, Shape{s.kv_dim()});
    }
    f(p + "self_attn.o_proj.weight", a.wo, Shape{c.d_model, s.q_dim()});
    f(p + "post_attention_layernorm.weight", layer.mlp_norm, Shape{c.d_model});
    f(p + "mlp.gate_proj.weight", layer.w_gate, Shape{c.d_ff, c.d_model});
    f(p + "mlp.up_proj.weight", layer.w_up, Shape{c.d_ff, c.d_model});
    f(p + "mlp.down_proj.weight", layer.w_down, Shape{c.d_model, c.d_ff});
  }
  f(std::string("model.norm.weight"), w.final_norm, Shape{c.d_model});
  if (!c.tied_embeddings) f(std::string("lm_head.weight"), w.lm_head, Shape{c.vocab_size, c.d_model});
}

// What a checkpoint may hold beyond that: the rotary caches older exports saved, and the copy of
// the embedding that some tied checkpoints store as lm_head.
inline bool hf_ignorable(std::string_view name, const model::Config& c) {
  return name.ends_with(".rotary_emb.inv_freq") || (c.tied_embeddings && name == "lm_head.weight");
}

// A checkpoint being filled in: each tensor the config implies, by HF name, with where it goes.
class HfCheckpointBuilder {
 public:
  HfCheckpointBuilder(const HfCheckpointBuilder&) = delete;  // slots_ point into checkpoint_
  HfCheckpointBuilder& operator=(const HfCheckpointBuilder&) = delete;
  HfCheckpointBuilder(const model::Config& config, std::string where) : where_(std::move(where)) {
    checkpoint_.config = config;
    checkpoint_.format = "safetensors";
    for_each_hf_tensor(config, checkpoint_.weights, [&](std::string name, Tensor<float>& dst, Shape shape) {
      slots_.emplace(std::move(name), Slot{&dst, shape});
    });
  }

  // Refuses a tensor `file` names that the config does not account for, for it would be
  // silently dropped (a bias the config says is absent, say).
  void require_expected(std::string_view name, std::string_view file) const {
    require(slots_.find(name) != slots_.end() || hf_ignorable(name, checkpoint_.config), file, ": tensor \"", name,
            "\": not part of a ", checkpoint_.config.architecture, " model with this config.json, expected none");
  }

  void take(const safetensors::File& file, const std::string& name) {
    const auto slot = slots_.find(name);
    const safetensors::TensorInfo* info = file.find(name);
    require(info != nullptr, file.name(), ": tensor \"", name, "\": missing, expected shape ", slot->second.shape,
            " (config.json implies it)");
    Tensor<float> t = file.read(name);
    require(t.shape() == slot->second.shape, file.name(), ": tensor \"", name, "\": shape ", t.shape(), ", expected ",
            slot->second.shape, " (from config.json)");
    *slot->second.destination = std::move(t);
    slot->second.filled = true;
    ++checkpoint_.storage_types[info->dtype];
  }

  template <class F>
  void for_each_name(F&& f) const {
    for (const auto& [name, slot] : slots_) f(name);
  }

  Checkpoint finish() && {
    for (const auto& [name, slot] : slots_)
      require(slot.filled, where_, ": tensor \"", name, "\": missing, expected shape ", slot.shape);
    checkpoint_.weights.validate(checkpoint_.config);
    return std::move(checkpoint_);
  }

 private:
  struct Slot {
    Tensor<float>* destination;
    Shape shape;
    bool filled = false;
  };
  Checkpoint checkpoint_;
  std::string where_;
  std::map<std::string, Slot, std::less<>> slots_;
};

// Sharded checkpoints: {"weight_map": {tensor: shard file}} beside the shards. Each shard is
// read once and released before the next, so memory holds one shard's bytes at a time.
inline void read_hf_shards(const std::filesystem::path& index_path, HfCheckpointBuilder& builder) {
  const std::string index_name = index_path.string();
  const std::vector<std::byte> bytes = read_file(index_path);
  const nlohmann::json index =
      parse_json(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()), index_name, "text");
  const nlohmann::json* map = index.is_object() ? member(index, "weight_map") : nullptr;
  if (!map || !map->is_object())
    fail(index_name, ": weight_map: ", map ? json_excerpt(*map) : "missing", ", expected an object {tensor: shard}");
  for (const auto& [name, shard] : map->items()) {
    builder.require_expected(name, index_name);
    const std::string file = shard.is_string() ? shard.get<std::string>() : std::string();
    require(!file.empty() && std::filesystem::path(file).filename() == file && file != "." && file != "..",
            index_name, ": weight_map: \"", name, "\": ", json_excerpt(shard),
            ", expected the name of a shard file in the same folder");
  }
  std::map<std::string, std::vector<std::string>> names_by_shard;
  builder.for_each_name([&](const std::string& name) {
    const nlohmann::json* shard = member(*map, name);
    require(shard != nullptr, index_name, ": weight_map: tensor \"", name, "\": missing, expected its shard");
    names_by_shard[shard->get<std::string>()].push_back(name);
  });
  for (const auto& [shard, names] : names_by_shard) {
    const std::filesystem::path shard_path = index_path.parent_path() / shard;
    require(std::filesystem::is_regular_file(shard_path), index_name, ": tensor \"", names.front(), "\": its shard ",
            shard_path.string(), " does not exist");
    const safetensors::File file = safetensors::File::open(shard_path);
    for (const std::string& name : names) {
      require(file.find(name) != nullptr, shard_path.string(), ": tensor \"", name, "\": missing, but ", index_name,
              " places it in this shard");
      builder.take(file, name);
    }
  }
}

}  // namespace detail

// A checkpoint from a config and one safetensors file already in memory.
inline Checkpoint read_safetensors(const model::Config& config, const safetensors::File& file) {
  detail::HfCheckpointBuilder builder(config, file.name());
  for (const safetensors::TensorInfo& t : file.tensors()) builder.require_expected(t.name, file.name());
  builder.for_each_name([&](const std::string& name) { builder.take(file, name); });
  Checkpoint c = std::move(builder).finish();
  c.path = c.name = file.name();
  return c;
}

// `path`: a Hugging Face model folder (config.json with model.safetensors, or with
// model.safetensors.index.json and its shards), or a .safetensors / .safetensors.index.json
// file in such a folder.
inline Checkpoint read_safetensors(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  require(fs::exists(path), path.string(), ": does not exist, expected a model folder or a safetensors file");
  const bool folder = fs::is_directory(path);
  const fs::path dir = folder ? path : path.parent_path();
  const fs::path config_path = dir / "config.json";
  require(fs::is_regular_file(config_path), path.string(), ": config.json: not found in ", dir.string(),
          ", expected the model's Hugging Face config beside its weights");
  const model::Config config = read_hf_config(config_path);

  fs::path weights = path;
  if (folder) {
    weights = dir / "model.safetensors";
    if (!fs::exists(weights)) weights = dir / "model.safetensors.index.json";
    require(fs::exists(weights), path.string(), ": weights: neither model.safetensors nor ",
            "model.safetensors.index.json is in the folder, expected one");
  }
  Checkpoint c;
  if (weights.string().ends_with(".index.json")) {
    detail::HfCheckpointBuilder builder(config, weights.string());
    detail::read_hf_shards(weights, builder);
    c = std::move(builder).finish();
  } else {
    c = read_safetensors(config, safetensors::File::open(weights));
  }
  c.path = path.string();
  fs::path folder_path = fs::weakly_canonical(dir.empty() ? fs::path(".") : dir);
  if (folder_path.filename().empty()) folder_path = folder_path.parent_path();  // "models/x/"
  c.name = folder_path.filename().string();
  return c;
}

}  // namespace dash::io

// llama2.c's legacy checkpoint, as its run.c reads it: seven little-endian int32
//   dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
// then float32 arrays, back to back, matrices [out, in]:
//   token_embedding [vocab, dim]; rms_att [L, dim]; wq [L, dim, dim]; wk, wv [L, kv_dim, dim];
//   wo [L, dim, dim]; rms_ffn [L, dim]; w1 [L, hidden, dim]; w2 [L, dim, hidden];
//   w3 [L, hidden, dim]; rms_final [dim]; freq_cis_real, freq_cis_imag [seq_len, head_size/2];
//   wcls [vocab, dim], present only when vocab_size is stored negated (an untied classifier).
// w1 is the SwiGLU gate, w3 the up and w2 the down projection. The model rotates adjacent pairs
// (x[2i], x[2i+1]) with base 10000 and normalises with eps 1e-5; the stored RoPE tables are
// those rotations precomputed, so they are checked for size and skipped.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "dash/core/error.hpp"
#include "dash/core/tensor.hpp"
#include "dash/io/checkpoint.hpp"
#include "dash/io/detail/bytes.hpp"

namespace dash::io {
namespace detail {

struct Llama2cArray {
  const char* field;
  std::uint64_t floats;
};

// The arrays the header implies, in file order. Sizes are in 64 bits: with the header's
// bounds checked, the largest is below 2^42 floats.
inline std::vector<Llama2cArray> llama2c_arrays(std::uint64_t dim, std::uint64_t hidden, std::uint64_t layers,
                                                std::uint64_t kv_dim, std::uint64_t vocab, std::uint64_t seq_len,
                                                std::uint64_t head_size, bool separate_classifier) {
  std::vector<Llama2cArray> arrays{
      {"token_embedding", vocab * dim},
      {"rms_att", layers * dim},
      {"wq", layers * dim * dim},
      {"wk", layers * kv_dim * dim},
      {"wv", layers * kv_dim * dim},
      {"wo", layers * dim * dim},
      {"rms_ffn", layers * dim},
      {"w1", layers * hidden * dim},
      {"w2", layers * dim * hidden},
      {"w3", layers * hidden * dim},
      {"rms_final", dim},
      {"freq_cis_real", seq_len * head_size / 2},
      {"freq_cis_imag", seq_len * head_size / 2},
  };
  if (separate_classifier) arrays.push_back({"wcls", vocab * dim});
  return arrays;
}

}  // namespace detail

inline Checkpoint read_llama2c(std::span<const std::byte> bytes, std::string name) {
  detail::Cursor cursor(bytes, name);
  const std::int64_t dim = cursor.read<std::int32_t>("dim");
  const std::int64_t hidden = cursor.read<std::int32_t>("hidden_dim");
  const std::int64_t layers = cursor.read<std::int32_t>("n_layers");
  const std::int64_t heads = cursor.read<std::int32_t>("n_heads");
  const std::int64_t kv_heads = cursor.read<std::int32_t>("n_kv_heads");
  const std::int64_t signed_vocab = cursor.read<std::int32_t>("vocab_size");
  const std::int64_t seq_len = cursor.read<std::int32_t>("seq_len");

  // Bounds far above any llama2.c model (Llama 2 70B has dim 8192, hidden 28672, 80 layers), so
  // that a corrupt header is refused before its sizes are multiplied.
  const auto bounded = [&](const char* field, std::int64_t value, std::int64_t hi) {
    require(value >= 1 && value <= hi, name, ": ", field, ": ", value, ", expected an integer in [1, ", hi, "]");
  };
  bounded("dim", dim, 1 << 16);
  bounded("hidden_dim", hidden, 1 << 18);
  bounded("n_layers", layers, 1 << 10);
  bounded("n_heads", heads, dim);
  bounded("n_kv_heads", kv_heads, heads);
  require(signed_vocab != 0 && signed_vocab >= -(1 << 24) && signed_vocab <= (1 << 24), name, ": vocab_size: ",
          signed_vocab, ", expected a non-zero integer in [", -(1 << 24), ", ", 1 << 24,
          "] (negative when a separate classifier follows)");
  bounded("seq_len", seq_len, 1 << 24);
  require(dim % heads == 0, name, ": n_heads: ", heads, " does not divide dim = ", dim, ", expected a divisor");
  const std::int64_t head_size = dim / heads;
  require(head_size % 2 == 0, name, ": n_heads: head size dim / n_heads = ", head_size,
          ", expected an even size (RoPE rotates pairs)");
  require(heads % kv_heads == 0, name, ": n_kv_heads: ", kv_heads, " does not divide n_heads = ", heads,
          ", expected a divisor");
  const bool separate_classifier = signed_vocab < 0;
  const std::int64_t vocab = separate_classifier ? -signed_vocab : signed_vocab;

  const std::vector<detail::Llama2cArray> arrays =
      detail::llama2c_arrays(std::uint64_t(dim), std::uint64_t(hidden), std::uint64_t(layers),
                             std::uint64_t(kv_heads * head_size), std::uint64_t(vocab), std::uint64_t(seq_len),
                             std::uint64_t(head_size), separate_classifier);
  std::uint64_t expected = cursor.offset();
  for (const auto& a : arrays) expected += a.floats * sizeof(float);
  if (bytes.size() != expected) {
    std::uint64_t offset = cursor.offset();
    for (const auto& a : arrays) {
      require(offset + a.floats * sizeof(float) <= bytes.size(), name, ": ", a.field, ": needs ",
              a.floats * sizeof(float), " bytes at offset ", offset, ", only ", bytes.size() - offset,
              " left (the file is ", bytes.size(), " bytes, the header implies ", expected, ")");
      offset += a.floats * sizeof(float);
    }
    fail(name, ": file size: ", bytes.size(), " bytes, the header implies ", expected,
         ", expected exactly that (trailing bytes, or a header this reader misreads)");
  }

  Checkpoint c;
  model::Config& config = c.config;
  config.architecture = "llama2c";
  config.n_layers = int(layers);
  config.d_model = int(dim);
  config.n_heads = int(heads);
  config.n_kv_heads = int(kv_heads);
  config.d_head = int(head_size);
  config.d_ff = int(hidden);
  config.vocab_size = int(vocab);
  config.context_length = int(seq_len);
  config.rms_eps = 1e-5;
  config.rope = RopeConfig{RopeConfig::Style::interleaved, 10000.0};
  config.qkv_bias = false;
  config.tied_embeddings = !separate_classifier;
  config.sliding_window = 0;

  model::Weights<float>& w = c.weights;
  w.layers.resize(std::size_t(layers));
  int tensors = 0;
  const auto copy = [&](std::span<const std::byte> from, Shape shape) {
    Tensor<float> t(shape);
    std::memcpy(t.data(), from.data(), std::size_t(shape.numel()) * sizeof(float));
    ++tensors;
    return t;
  };
  const auto whole = [&](const char* field, Shape shape) {
    return copy(cursor.take(std::size_t(shape.numel()) * sizeof(float), field), shape);
  };
  // One array holding the same tensor of every layer, layer after layer.
  using Member = std::function<Tensor<float>&(model::LayerWeights<float>&)>;
  const auto per_layer = [&](const char* field, Shape shape, const Member& member) {
    const std::size_t size = std::size_t(shape.numel()) * sizeof(float);
    const auto all = cursor.take(size * std::size_t(layers), field);
    for (std::size_t l = 0; l < w.layers.size(); ++l) member(w.layers[l]) = copy(all.subspan(l * size, size), shape);
  };
  const index_t d = dim, h = hidden, kv = kv_heads * head_size;
  w.embedding = whole("token_embedding", Shape{vocab, d});
  per_layer("rms_att", Shape{d}, [](auto& l) -> Tensor<float>& { return l.attn_norm; });
  per_layer("wq", Shape{d, d}, [](auto& l) -> Tensor<float>& { return l.attention.wq; });
  per_layer("wk", Shape{kv, d}, [](auto& l) -> Tensor<float>& { return l.attention.wk; });
  per_layer("wv", Shape{kv, d}, [](auto& l) -> Tensor<float>& { return l.attention.wv; });
  per_layer("wo", Shape{d, d}, [](auto& l) -> Tensor<float>& { return l.attention.wo; });
  per_layer("rms_ffn", Shape{d}, [](auto& l) -> Tensor<float>& { return l.mlp_norm; });
  per_layer("w1", Shape{h, d}, [](auto& l) -> Tensor<float>& { return l.w_gate; });
  per_layer("w2", Shape{d, h}, [](auto& l) -> Tensor<float>& { return l.w_down; });
  per_layer("w3", Shape{h, d}, [](auto& l) -> Tensor<float>& { return l.w_up; });
  w.final_norm = whole("rms_final", Shape{d});
  cursor.take(std::size_t(seq_len * head_size / 2) * sizeof(float), "freq_cis_real");
  cursor.take(std::size_t(seq_len * head_size / 2) * sizeof(float), "freq_cis_imag");
  if (separate_classifier) w.lm_head = whole("wcls", Shape{vocab, d});
  w.validate(config);

  c.format = "llama2c";
  c.path = name;
  c.name = std::move(name);
  c.storage_types["F32"] = tensors;
  return c;
}

inline Checkpoint read_llama2c(const std::filesystem::path& path) {
  const std::vector<std::byte> bytes = detail::read_file(path);
  Checkpoint c = read_llama2c(bytes, path.string());
  c.name = path.filename().string();
  return c;
}

}  // namespace dash::io

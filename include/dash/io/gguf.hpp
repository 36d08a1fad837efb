// GGUF checkpoints of Llama-family models (llama, mistral, qwen2) read into a Checkpoint: the
// hyperparameters from `<arch>.*` metadata, every weight decoded to float32.
//
// Tensor names and shapes (GGUF dims run innermost first, so dims [in, out] are the row-major
// matrix [out, in] with the data as stored):
//   token_embd.weight [vocab, d]              output_norm.weight [d]   output.weight [vocab, d]
//   blk.N.attn_norm.weight [d]                blk.N.ffn_norm.weight [d]
//   blk.N.attn_q.weight [H·dh, d]             blk.N.attn_q.bias [H·dh]   (qwen2)
//   blk.N.attn_k.weight, attn_v.weight [Hkv·dh, d] with .bias [Hkv·dh] (qwen2)
//   blk.N.attn_output.weight [d, H·dh]
//   blk.N.ffn_gate.weight, ffn_up.weight [d_ff, d]   blk.N.ffn_down.weight [d, d_ff]
// A file without output.weight ties the head to the embedding. Any other tensor is an error, so
// that nothing the model would need is silently dropped.
//
// Config.architecture is general.architecture as the file states it ("llama" for SmolLM2 too):
// it is what fixes the tensors' conventions; the model's own name is in Checkpoint.name.
#pragma once

#include <climits>
#include <cstdint>
#include <filesystem>
#include <set>
#include <string>
#include <utility>

#include "dash/core/error.hpp"
#include "dash/core/tensor.hpp"
#include "dash/io/checkpoint.hpp"
#include "dash/io/gguf/file.hpp"
#include "dash/model/config.hpp"
#include "dash/model/weights.hpp"

namespace dash::io {

namespace gguf::detail {

// The RoPE pairing a GGUF file's Wq/Wk expect, by architecture, as llama.cpp runs them
// (llama_model_rope_type). For llama, llama.cpp's converter permutes the rows of each head of
// the Hugging Face Wq/Wk so that the pairs (i, i + dh/2) that Hugging Face rotates together become
// the adjacent rows (2i, 2i+1), and ggml's "normal" RoPE then rotates adjacent pairs: interleaved,
// as in Meta's and llama2.c's layout. qwen2 weights are written unpermuted and run with NEOX RoPE,
// which rotates (i, i + dh/2): rotate-half. llama.cpp writes Mistral checkpoints as "llama"; the
// name "mistral" is accepted with the same conventions.
inline RopeConfig::Style rope_style_of(const File& file, const std::string& arch) {
  if (arch == "llama" || arch == "mistral") return RopeConfig::Style::interleaved;
  if (arch == "qwen2") return RopeConfig::Style::half;
  fail(file.name(), ": general.architecture: \"", arch, "\" is not supported, expected llama, mistral or qwen2");
}

// A hyperparameter that must be a positive int.
inline int positive(const File& file, const std::string& key) {
  const std::int64_t v = file.integer(key);
  require(v > 0 && v <= INT_MAX, file.name(), ": ", key, ": ", v, ", expected a positive integer below 2^31");
  return int(v);
}

inline model::Config read_config(const File& file) {
  model::Config c;
  c.architecture = file.string("general.architecture");
  c.rope.style = rope_style_of(file, c.architecture);
  const auto key = [&](const char* suffix) { return c.architecture + "." + suffix; };
  c.n_layers = positive(file, key("block_count"));
  c.d_model = positive(file, key("embedding_length"));
  c.d_ff = positive(file, key("feed_forward_length"));
  c.n_heads = positive(file, key("attention.head_count"));
  c.n_kv_heads = file.has(key("attention.head_count_kv")) ? positive(file, key("attention.head_count_kv")) : c.n_heads;
  c.context_length = positive(file, key("context_length"));
  c.rms_eps = file.real(key("attention.layer_norm_rms_epsilon"));
  c.rope.theta = file.has(key("rope.freq_base")) ? file.real(key("rope.freq_base")) : 10000.0;
  if (file.has(key("attention.sliding_window"))) c.sliding_window = positive(file, key("attention.sliding_window"));

  if (file.has(key("attention.key_length"))) {
    c.d_head = positive(file, key("attention.key_length"));
  } else {
    require(c.d_model % c.n_heads == 0, file.name(), ": ", key("embedding_length"), ": ", c.d_model,
            " is not a multiple of ", key("attention.head_count"), " = ", c.n_heads, ", and ",
            key("attention.key_length"), " is absent, expected a head width");
    c.d_head = c.d_model / c.n_heads;
  }
  if (file.has(key("attention.value_length"))) {
    const int dv = positive(file, key("attention.value_length"));
    require(dv == c.d_head, file.name(), ": ", key("attention.value_length"), ": ", dv, ", expected the key length ",
            c.d_head);
  }
  if (file.has(key("rope.dimension_count"))) {
    const int rotary = positive(file, key("rope.dimension_count"));
    require(rotary == c.d_head, file.name(), ": ", key("rope.dimension_count"), ": ", rotary,
            " (partial rotary embedding), expected the head width ", c.d_head);
  }
  // Context-extension schemes change the rotation angles; none is modelled, so refuse them.
  const std::string scaling = file.has(key("rope.scaling.type")) ? file.string(key("rope.scaling.type")) : "none";
  const double factor = file.has(key("rope.scaling.factor")) ? file.real(key("rope.scaling.factor")) : 1.0;
  require(scaling == "none" || factor == 1.0, file.name(), ": ", key("rope.scaling.type"), ": \"", scaling,
          "\" with factor ", factor, " is not supported, expected none");
  const double linear = file.has(key("rope.scale_linear")) ? file.real(key("rope.scale_linear")) : 1.0;
  require(linear == 1.0, file.name(), ": ", key("rope.scale_linear"), ": ", linear, " is not supported, expected 1");

  if (file.has(key("vocab_size"))) {
    c.vocab_size = positive(file, key("vocab_size"));
  } else {
    const TensorInfo* embedding = file.find_tensor("token_embd.weight");
    require(embedding != nullptr, file.name(), ": token_embd.weight: missing, expected the token embedding");
    require(embedding->dims.size() == 2 && embedding->dims[1] <= INT_MAX, file.name(),
            ": token_embd.weight: shape ", embedding->shape(), ", expected [vocab, ", c.d_model, "]");
    c.vocab_size = int(embedding->dims[1]);
  }
  c.tied_embeddings = file.find_tensor("output.weight") == nullptr;
  c.qkv_bias = c.architecture == "qwen2" || file.find_tensor("blk.0.attn_q.bias") != nullptr;
  try {
    c.validate();
  } catch (const Error& e) {
    fail(file.name(), ": ", e.what());
  }
  return c;
}

}  // namespace gguf::detail

inline Checkpoint read_gguf(const gguf::File& file) {
  Checkpoint out;
  out.format = "gguf";
  out.path = file.name();
  out.name = file.has("general.name") ? file.string("general.name")
                                      : std::filesystem::path(file.name()).stem().string();
  const model::Config c = gguf::detail::read_config(file);
  out.config = c;

  std::set<std::string, std::less<>> used;
  const auto take = [&](const std::string& name, const Shape& expected) {
    const gguf::TensorInfo* t = file.find_tensor(name);
    require(t != nullptr, file.name(), ": ", name, ": missing, expected a tensor of shape ", expected);
    require(t->shape() == expected, file.name(), ": ", name, ": shape ", t->shape(), ", expected ", expected);
    used.insert(name);
    return file.read_tensor(name);
  };
  const int d = c.d_model, q = c.n_heads * c.d_head, kv = c.n_kv_heads * c.d_head;
  model::Weights<float>& w = out.weights;
  w.embedding = take("token_embd.weight", Shape{c.vocab_size, d});
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    model::LayerWeights<float> layer;
    layer.attn_norm = take(p + "attn_norm.weight", Shape{d});
    layer.attention.wq = take(p + "attn_q.weight", Shape{q, d});
    layer.attention.wk = take(p + "attn_k.weight", Shape{kv, d});
    layer.attention.wv = take(p + "attn_v.weight", Shape{kv, d});
    if (c.qkv_bias) {
      layer.attention.bq = take(p + "attn_q.bias", Shape{q});
      layer.attention.bk = take(p + "attn_k.bias", Shape{kv});
      layer.attention.bv = take(p + "attn_v.bias", Shape{kv});
    }
    layer.attention.wo = take(p + "attn_output.weight", Shape{d, q});
    layer.mlp_norm = take(p + "ffn_norm.weight", Shape{d});
    layer.w_gate = take(p + "ffn_gate.weight", Shape{c.d_ff, d});
    layer.w_up = take(p + "ffn_up.weight", Shape{c.d_ff, d});
    layer.w_down = take(p + "ffn_down.weight", Shape{d, c.d_ff});
    w.layers.push_back(std::move(layer));
  }
  w.final_norm = take("output_norm.weight", Shape{d});
  if (!c.tied_embeddings) w.lm_head = take("output.weight", Shape{c.vocab_size, d});

  for (const gguf::TensorInfo& t : file.tensors()) {
    require(t.name != "rope_freqs.weight", file.name(), ": rope_freqs.weight: per-dimension RoPE frequency factors"
            " (Llama 3 context scaling) are not supported, expected plain RoPE");
    require(used.count(t.name) == 1, file.name(), ": ", t.name, ": unexpected tensor for a ", c.n_layers,
            "-layer ", c.architecture, " model, expected only the tensors listed in dash/io/gguf.hpp");
    ++out.storage_types[gguf::name_of(t.type)];
  }
  try {
    w.validate(c);
  } catch (const Error& e) {
    fail(file.name(), ": ", e.what());
  }
  return out;
}

inline Checkpoint read_gguf(const std::filesystem::path& path) { return read_gguf(gguf::File::open(path)); }

}  // namespace dash::io

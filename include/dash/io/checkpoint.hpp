// What every loader returns: the config and float32 weights of a Llama-family model, in the
// layout model/ expects whatever the file's own conventions were, plus where they came from.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "dash/model/config.hpp"
#include "dash/model/weights.hpp"

namespace dash::io {

struct Checkpoint {
  model::Config config;
  model::Weights<float> weights;
  std::string format;  // "gguf", "safetensors", "llama2c"
  std::string path;
  std::string name;    // the model's own name where the file gives one, else the file name
  // Storage type of the tensors in the file → how many tensors had it ("Q4_1" → 210).
  std::map<std::string, int> storage_types;
};

// A 64-bit FNV-1a digest of the config and every weight's bits, as 16 hex digits: the teacher's
// identity, stored with prepared candidates so that they are never used with another teacher.
inline std::string fingerprint(const model::Config& c, const model::Weights<float>& w) {
  std::uint64_t h = 1469598103934665603ull;
  const auto mix = [&](const void* p, std::size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  };
  const int fields[] = {c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_head, c.d_ff, c.vocab_size};
  mix(fields, sizeof fields);
  const int style = int(c.rope.style);
  mix(&style, sizeof style);
  mix(&c.rope.theta, sizeof c.rope.theta);
  const_cast<model::Weights<float>&>(w).for_each([&](const std::string& name, Tensor<float>& t) {
    mix(name.data(), name.size());
    mix(t.data(), std::size_t(t.numel()) * sizeof(float));
  });
  static constexpr char hex[] = "0123456789abcdef";
  std::string out(16, '0');
  for (int i = 15; i >= 0; --i, h >>= 4) out[std::size_t(i)] = hex[h & 15];
  return out;
}

}  // namespace dash::io

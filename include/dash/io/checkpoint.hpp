// What every loader returns: the config and float32 weights of a Llama-family model, in the
// layout model/ expects whatever the file's own conventions were, plus where they came from.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "dash/core/parallel.hpp"
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

namespace detail {

// A 64-bit digest of n bytes, eight at a time (a multiply-rotate round per word, in the manner
// of xxHash's; the tail byte by byte), seeded so that equal blocks at different places differ.
inline std::uint64_t digest_bytes(const unsigned char* p, std::size_t n, std::uint64_t seed) {
  constexpr std::uint64_t k1 = 0x9e3779b185ebca87ull, k2 = 0xc2b2ae3d27d4eb4full;
  std::uint64_t h = seed ^ (n * k1);
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    std::uint64_t word;
    std::memcpy(&word, p + i, 8);
    h = std::rotl(h ^ (word * k2), 31) * k1;
  }
  for (; i < n; ++i) h = std::rotl(h ^ (p[i] * k2), 11) * k1;
  h ^= h >> 33;
  h *= k2;
  return h ^ (h >> 29);
}

}  // namespace detail

// The teacher's identity, stored with prepared candidates so that they are never used with
// another teacher: 16 hex digits of a 64-bit FNV-1a chain over the config, and for each weight
// its name and the digests (detail::digest_bytes) of its float32 bits in blocks of 4 MiB. The
// blocks are digested on all cores; the chain takes them in order, so the result does not
// depend on the machine.
inline std::string fingerprint(const model::Config& c, const model::Weights<float>& w) {
  constexpr std::size_t block_bytes = std::size_t(4) << 20;
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
  std::vector<std::uint64_t> digests;
  const_cast<model::Weights<float>&>(w).for_each([&](const std::string& name, Tensor<float>& t) {
    mix(name.data(), name.size());
    const auto* bytes = reinterpret_cast<const unsigned char*>(t.data());
    const std::size_t size = std::size_t(t.numel()) * sizeof(float);
    const auto blocks = index_t((size + block_bytes - 1) / block_bytes);
    digests.assign(std::size_t(blocks), 0);
    parallel_for(blocks, 1, [&](index_t begin, index_t end) {
      for (index_t b = begin; b < end; ++b) {
        const std::size_t at = std::size_t(b) * block_bytes;
        digests[std::size_t(b)] = detail::digest_bytes(bytes + at, std::min(block_bytes, size - at), std::uint64_t(b));
      }
    });
    mix(digests.data(), digests.size() * sizeof(std::uint64_t));
  });
  static constexpr char hex[] = "0123456789abcdef";
  std::string out(16, '0');
  for (int i = 15; i >= 0; --i, h >>= 4) out[std::size_t(i)] = hex[h & 15];
  return out;
}

}  // namespace dash::io

#include <doctest/doctest.h>

#include <bit>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "dash/io/llama2c.hpp"
#include "support/errors.hpp"
#include "support/models.hpp"
#include "support/random.hpp"

using namespace dash;
namespace fs = std::filesystem;

using test::contains;
using test::error_of;

namespace {

// `count` float32 values at byte `offset` of the file, read with nothing but an ifstream.
std::vector<float> raw_floats(const fs::path& path, std::streamoff offset, std::size_t count) {
  std::ifstream in(path, std::ios::binary);
  in.seekg(offset);
  std::vector<float> out(count);
  in.read(reinterpret_cast<char*>(out.data()), std::streamsize(count * sizeof(float)));
  REQUIRE(bool(in));
  return out;
}

bool same_bits(const float* a, const float* b, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i)
    if (std::bit_cast<std::uint32_t>(a[i]) != std::bit_cast<std::uint32_t>(b[i])) return false;
  return true;
}

// A random llama2.c model held as the file's own arrays, in file order, for writing and for
// checking what the reader made of them.
struct Llama2c {
  std::int32_t dim, hidden, layers, heads, kv_heads, vocab, seq_len;
  bool separate_classifier;
  std::vector<std::pair<std::string, std::vector<float>>> arrays;  // file order

  const std::vector<float>& array(const std::string& name) const {
    for (const auto& [n, a] : arrays)
      if (n == name) return a;
    FAIL("no array " << name);
    return arrays.front().second;
  }

  std::vector<std::byte> bytes() const {
    const std::int32_t header[7] = {dim, hidden, layers, heads, kv_heads, separate_classifier ? -vocab : vocab, seq_len};
    std::vector<std::byte> out(sizeof header);
    std::memcpy(out.data(), header, sizeof header);
    for (const auto& [name, a] : arrays) {
      const std::size_t at = out.size();
      out.resize(at + a.size() * sizeof(float));
      std::memcpy(out.data() + at, a.data(), a.size() * sizeof(float));
    }
    return out;
  }

  // Byte offsets where each array begins, and the file's end.
  std::vector<std::pair<std::string, std::size_t>> boundaries() const {
    std::vector<std::pair<std::string, std::size_t>> out;
    std::size_t at = 28;
    for (const auto& [name, a] : arrays) {
      out.emplace_back(name, at);
      at += a.size() * sizeof(float);
    }
    out.emplace_back("end", at);
    return out;
  }
};

// A model of the given shape with random values.
Llama2c make_llama2c(Rng& rng, std::int32_t heads, std::int32_t kv_heads, std::int32_t head, bool separate_classifier) {
  Llama2c m{};
  m.heads = heads;
  m.kv_heads = kv_heads;
  m.dim = heads * head;
  m.hidden = 1 + std::int32_t(rng.below(20));
  m.layers = 1 + std::int32_t(rng.below(3));
  m.vocab = 1 + std::int32_t(rng.below(30));
  m.seq_len = 1 + std::int32_t(rng.below(10));
  m.separate_classifier = separate_classifier;
  const std::size_t d = std::size_t(m.dim), h = std::size_t(m.hidden), L = std::size_t(m.layers),
                    kv = std::size_t(m.kv_heads * head), v = std::size_t(m.vocab);
  const auto add = [&](const char* name, std::size_t n) {
    std::vector<float> a(n);
    for (float& x : a) x = float(rng.normal());
    m.arrays.emplace_back(name, std::move(a));
  };
  add("token_embedding", v * d);
  add("rms_att", L * d);
  add("wq", L * d * d);
  add("wk", L * kv * d);
  add("wv", L * kv * d);
  add("wo", L * d * d);
  add("rms_ffn", L * d);
  add("w1", L * h * d);
  add("w2", L * d * h);
  add("w3", L * h * d);
  add("rms_final", d);
  add("freq_cis_real", std::size_t(m.seq_len) * std::size_t(head) / 2);
  add("freq_cis_imag", std::size_t(m.seq_len) * std::size_t(head) / 2);
  if (separate_classifier) add("wcls", v * d);
  return m;
}

Llama2c random_llama2c(Rng& rng, bool separate_classifier) {
  const std::int32_t kv_heads = 1 + std::int32_t(rng.below(2));
  const std::int32_t heads = kv_heads * (1 + std::int32_t(rng.below(3)));
  return make_llama2c(rng, heads, kv_heads, 2 * (1 + std::int32_t(rng.below(3))), separate_classifier);
}

// Tensor t is the slice of array `name` for layer l.
bool is_slice(const Tensor<float>& t, const Llama2c& m, const std::string& name, std::size_t l = 0) {
  const std::vector<float>& a = m.array(name);
  const std::size_t n = std::size_t(t.numel());
  return (l + 1) * n <= a.size() && same_bits(t.data(), a.data() + l * n, n);
}

}  // namespace

TEST_CASE("llama2c: stories260K loads with its published shape, and its arrays where the file has them") {
  const fs::path path = test::fixtures() / "stories260K" / "stories260K.bin";
  const io::Checkpoint ck = io::read_llama2c(path);
  const model::Config& c = ck.config;
  CHECK(ck.format == "llama2c");
  CHECK(ck.name == "stories260K.bin");
  CHECK(ck.path == path.string());
  CHECK(c.architecture == "llama2c");
  CHECK(c.d_model == 64);
  CHECK(c.n_layers == 5);
  CHECK(c.n_heads == 8);
  CHECK(c.n_kv_heads == 4);
  CHECK(c.d_head == 8);
  CHECK(c.d_ff == 172);
  CHECK(c.vocab_size == 512);
  CHECK(c.context_length == 512);
  CHECK(c.tied_embeddings);
  CHECK(c.rope.style == RopeConfig::Style::interleaved);
  CHECK(c.rope.theta == 10000.0);
  CHECK(c.rms_eps == 1e-5);
  CHECK(!c.qkv_bias);
  CHECK(ck.weights.lm_head.empty());
  CHECK(ck.storage_types.at("F32") == 2 + 9 * 5);

  // The embedding starts right after the 28-byte header.
  const std::vector<float> first = raw_floats(path, 28, 64 * 3);
  CHECK(same_bits(ck.weights.embedding.data(), first.data(), first.size()));
  // rms_final sits just before the two RoPE tables at the end of the file (512 · 8/2 floats
  // each): located from the end, not by summing the arrays as the reader does.
  const auto size = std::streamoff(fs::file_size(path));
  const std::vector<float> final_norm = raw_floats(path, size - 2 * 512 * 4 * 4 - 64 * 4, 64);
  CHECK(same_bits(ck.weights.final_norm.data(), final_norm.data(), 64));
  // RMSNorm weights of a trained model are positive and near 1; projections are not.
  double norm_mean = 0;
  for (float x : final_norm) norm_mean += x / 64.0;
  CHECK(norm_mean > 0.2);
}

TEST_CASE("llama2c: random tiny models, tied and untied, read back exactly") {
  Rng rng = test::rng_for("llama2c round trip");
  for (int trial = 0; trial < 20; ++trial) {
    const bool separate = trial % 2 == 1;
    const Llama2c m = random_llama2c(rng, separate);
    const std::vector<std::byte> bytes = m.bytes();
    const io::Checkpoint ck = io::read_llama2c(bytes, "tiny.bin");
    const model::Config& c = ck.config;
    CHECK(c.d_model == m.dim);
    CHECK(c.d_ff == m.hidden);
    CHECK(c.n_layers == m.layers);
    CHECK(c.n_heads == m.heads);
    CHECK(c.n_kv_heads == m.kv_heads);
    CHECK(c.d_head == m.dim / m.heads);
    CHECK(c.vocab_size == m.vocab);
    CHECK(c.context_length == m.seq_len);
    CHECK(c.tied_embeddings == !separate);
    CHECK(ck.name == "tiny.bin");
    const auto& w = ck.weights;
    CHECK(is_slice(w.embedding, m, "token_embedding"));
    for (std::size_t l = 0; l < std::size_t(m.layers); ++l) {
      CAPTURE(l);
      const auto& L = w.layers[l];
      CHECK(is_slice(L.attn_norm, m, "rms_att", l));
      CHECK(is_slice(L.attention.wq, m, "wq", l));
      CHECK(is_slice(L.attention.wk, m, "wk", l));
      CHECK(is_slice(L.attention.wv, m, "wv", l));
      CHECK(is_slice(L.attention.wo, m, "wo", l));
      CHECK(is_slice(L.mlp_norm, m, "rms_ffn", l));
      CHECK(is_slice(L.w_gate, m, "w1", l));
      CHECK(is_slice(L.w_down, m, "w2", l));
      CHECK(is_slice(L.w_up, m, "w3", l));
      CHECK(L.w_down.shape() == Shape{m.dim, m.hidden});
    }
    CHECK(is_slice(w.final_norm, m, "rms_final"));
    if (separate)
      CHECK(is_slice(w.lm_head, m, "wcls"));
    else
      CHECK(w.lm_head.empty());
  }
}

TEST_CASE("llama2c: a file cut at or inside any array is refused, naming that array and both sizes") {
  Rng rng = test::rng_for("llama2c truncation");
  for (bool separate : {false, true}) {
    const Llama2c m = random_llama2c(rng, separate);
    const std::vector<std::byte> bytes = m.bytes();
    const auto b = m.boundaries();
    const std::string implied = std::to_string(bytes.size());
    for (std::size_t i = 0; i + 1 < b.size(); ++i) {
      // At the array's start (the previous array complete) and one float into it.
      for (std::size_t cut : {b[i].second, b[i].second + 4}) {
        if (cut >= b[i + 1].second) continue;  // an array of one float: the second cut is the next boundary
        CAPTURE(cut);
        const std::string message = error_of([&] {
          (void)io::read_llama2c(std::span(bytes.data(), cut), "cut.bin");
        });
        CHECK(contains(message, "cut.bin: " + b[i].first + ": needs"));
        CHECK((contains(message, "the file is " + std::to_string(cut)) && contains(message, "implies " + implied)));
      }
    }
    for (std::size_t cut = 0; cut < 28; cut += 3) {
      const std::string message = error_of([&] { (void)io::read_llama2c(std::span(bytes.data(), cut), "cut.bin"); });
      CHECK(contains(message, "needs 4 bytes"));
    }
    std::vector<std::byte> longer = bytes;
    longer.resize(bytes.size() + 4);
    const std::string message = error_of([&] { (void)io::read_llama2c(longer, "long.bin"); });
    CHECK((contains(message, "long.bin: file size: " + std::to_string(longer.size())) &&
           contains(message, "implies " + implied)));
  }
}

TEST_CASE("llama2c: header fields out of range are refused, naming the field") {
  Rng rng = test::rng_for("llama2c header");
  const Llama2c m = make_llama2c(rng, 4, 2, 2, false);  // dim 8
  const std::vector<std::byte> valid = m.bytes();
  REQUIRE_NOTHROW((void)io::read_llama2c(valid, "valid.bin"));
  const auto with = [&](int field, std::int32_t value) {
    std::vector<std::byte> bytes = valid;
    std::memcpy(bytes.data() + 4 * field, &value, 4);
    return error_of([&] { (void)io::read_llama2c(bytes, "bad.bin"); });
  };
  const char* fields[] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"};
  for (int f = 0; f < 7; ++f) {
    CAPTURE(fields[f]);
    for (std::int32_t value : {0, -1, INT32_MIN, INT32_MAX}) {
      if (f == 5 && value == -1) continue;  // a negative vocab_size is legal (then the file is too short)
      CAPTURE(value);
      CHECK(contains(with(f, value), std::string("bad.bin: ") + fields[f] + ": "));
    }
  }
  CHECK(contains(with(0, 9), "bad.bin: n_heads: 4 does not divide dim = 9"));
  CHECK(contains(with(0, 12), "bad.bin: n_heads: head size dim / n_heads = 3, expected an even size"));
  CHECK(contains(with(3, 9), "bad.bin: n_heads: 9, expected an integer in [1, 8]"));
  CHECK(contains(with(4, 3), "bad.bin: n_kv_heads: 3 does not divide n_heads = 4"));
  CHECK(contains(with(4, 5), "bad.bin: n_kv_heads: 5, expected an integer in [1, 4]"));
  CHECK(contains(with(5, -m.vocab), "bad.bin: wcls: needs"));  // says a classifier follows; none does
}

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "dash/io/gguf.hpp"
#include "support/errors.hpp"
#include "support/models.hpp"
#include "support/compare.hpp"
#include "support/gguf_writer.hpp"
#include "support/random.hpp"

using namespace dash;
namespace gguf = dash::io::gguf;
namespace tw = dash::test::gguf;
using gguf::TensorType;
using gguf::ValueType;

using test::contains;
using test::error_of;

namespace {

std::vector<float> random_values(std::size_t n, Rng& rng, double stddev = 1.0) {
  std::vector<float> v(n);
  for (float& x : v) x = float(stddev * rng.normal());
  return v;
}

// Parsing `bytes` must fail with a dash::Error naming the file and every one of `parts`.
void check_refused(const std::vector<std::byte>& bytes, const std::string& file,
                   std::initializer_list<std::string_view> parts) {
  const std::string message = error_of([&] { gguf::File::parse(bytes, file); });
  INFO(file, ": ", message);
  REQUIRE_FALSE(message.empty());
  CHECK(contains(message, file));
  for (std::string_view p : parts) CHECK(contains(message, p));
}

// A small valid file: a little metadata and two tensors, one plain and one quantised.
tw::Writer small_writer(Rng& rng) {
  tw::Writer w;
  w.add("general.architecture", "llama").add("general.name", "small").add("test.count", std::uint32_t(7));
  w.add("test.list", std::vector<std::int32_t>{1, -2, 3});
  w.tensor("first.weight", {32, 2}, TensorType::F32, random_values(64, rng));
  w.tensor("second.weight", {32, 3}, TensorType::Q8_0, random_values(96, rng));
  return w;
}

Tensor<float> as_tensor(const Shape& shape, const std::vector<float>& values) {
  Tensor<float> t(shape);
  std::copy(values.begin(), values.end(), t.data());
  return t;
}

// ---- a random Llama-family model written to GGUF -------------------------------------------

struct ModelOptions {
  bool separate_head = false;
  bool write_head_count_kv = true;
  bool write_freq_base = true;
  bool write_vocab_size = true;
  bool write_key_length = false;
  std::set<std::string> omit;  // metadata keys or tensors left out
};

struct WrittenModel {
  tw::Writer writer;
  model::Weights<float> expected;      // what the file's bytes stand for
  std::map<std::string, int> storage;  // storage type name → tensor count
};

constexpr TensorType supported_types[] = {TensorType::F32,  TensorType::F16,  TensorType::BF16,
                                          TensorType::Q8_0, TensorType::Q4_0, TensorType::Q4_1};

// Writes c's model with random weights, each tensor in a random supported type.
WrittenModel write_model(const model::Config& c, Rng& rng, const ModelOptions& o = {}) {
  WrittenModel m;
  tw::Writer& w = m.writer;
  const std::string a = c.architecture;
  const auto key = [&](const char* suffix) { return a + "." + suffix; };
  const auto put = [&](const std::string& k, auto value) {
    if (!o.omit.count(k)) w.add(k, value);
  };
  put("general.architecture", a);
  put("general.name", std::string("tiny ") + a);
  put(key("block_count"), std::uint32_t(c.n_layers));
  put(key("context_length"), std::uint32_t(c.context_length));
  put(key("embedding_length"), std::uint32_t(c.d_model));
  put(key("feed_forward_length"), std::uint32_t(c.d_ff));
  put(key("attention.head_count"), std::uint32_t(c.n_heads));
  if (o.write_head_count_kv) put(key("attention.head_count_kv"), std::uint32_t(c.n_kv_heads));
  put(key("attention.layer_norm_rms_epsilon"), float(c.rms_eps));
  if (o.write_freq_base) put(key("rope.freq_base"), float(c.rope.theta));
  if (o.write_vocab_size) put(key("vocab_size"), std::uint32_t(c.vocab_size));
  if (o.write_key_length) put(key("attention.key_length"), std::uint32_t(c.d_head));

  // GGUF dims are the row-major shape reversed.
  const auto tensor = [&](const std::string& name, Shape shape, Tensor<float>& into) {
    if (o.omit.count(name)) return;
    const TensorType type = supported_types[rng.below(std::size(supported_types))];
    std::vector<std::uint64_t> dims;
    for (int i = shape.rank() - 1; i >= 0; --i) dims.push_back(std::uint64_t(shape[i]));
    const auto values = w.tensor(name, dims, type, random_values(std::size_t(shape.numel()), rng, 0.1));
    into = as_tensor(shape, values);
    ++m.storage[gguf::name_of(type)];
  };
  const int d = c.d_model, q = c.n_heads * c.d_head, kv = c.n_kv_heads * c.d_head;
  model::Weights<float>& e = m.expected;
  tensor("token_embd.weight", Shape{c.vocab_size, d}, e.embedding);
  e.layers.resize(std::size_t(c.n_layers));
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    auto& L = e.layers[std::size_t(l)];
    tensor(p + "attn_norm.weight", Shape{d}, L.attn_norm);
    tensor(p + "attn_q.weight", Shape{q, d}, L.attention.wq);
    tensor(p + "attn_k.weight", Shape{kv, d}, L.attention.wk);
    tensor(p + "attn_v.weight", Shape{kv, d}, L.attention.wv);
    if (c.qkv_bias) {
      tensor(p + "attn_q.bias", Shape{q}, L.attention.bq);
      tensor(p + "attn_k.bias", Shape{kv}, L.attention.bk);
      tensor(p + "attn_v.bias", Shape{kv}, L.attention.bv);
    }
    tensor(p + "attn_output.weight", Shape{d, q}, L.attention.wo);
    tensor(p + "ffn_norm.weight", Shape{d}, L.mlp_norm);
    tensor(p + "ffn_gate.weight", Shape{c.d_ff, d}, L.w_gate);
    tensor(p + "ffn_up.weight", Shape{c.d_ff, d}, L.w_up);
    tensor(p + "ffn_down.weight", Shape{d, c.d_ff}, L.w_down);
  }
  tensor("output_norm.weight", Shape{d}, e.final_norm);
  if (o.separate_head) tensor("output.weight", Shape{c.vocab_size, d}, e.lm_head);
  return m;
}

model::Config tiny_config(const std::string& arch) {
  model::Config c;
  c.architecture = arch;
  c.n_layers = 2;
  c.d_model = 64;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.d_head = 16;
  c.d_ff = 96;
  c.vocab_size = 40;
  c.context_length = 256;
  c.rms_eps = 1e-5;
  c.rope = {RopeConfig::Style::interleaved, 10000.0};
  c.qkv_bias = false;
  c.tied_embeddings = true;
  return c;
}

// The checkpoint's tensor for a GGUF tensor name (the mapping, stated independently of the reader).
Tensor<float>* weight_named(model::Weights<float>& w, const std::string& name) {
  if (name == "token_embd.weight") return &w.embedding;
  if (name == "output_norm.weight") return &w.final_norm;
  if (name == "output.weight") return &w.lm_head;
  const auto dot = name.find('.', 4);
  auto& L = w.layers.at(std::stoul(name.substr(4, dot - 4)));
  const std::map<std::string, Tensor<float>*> layer = {
      {"attn_norm.weight", &L.attn_norm},      {"attn_q.weight", &L.attention.wq}, {"attn_k.weight", &L.attention.wk},
      {"attn_v.weight", &L.attention.wv},      {"attn_q.bias", &L.attention.bq},   {"attn_k.bias", &L.attention.bk},
      {"attn_v.bias", &L.attention.bv},        {"attn_output.weight", &L.attention.wo},
      {"ffn_norm.weight", &L.mlp_norm},        {"ffn_gate.weight", &L.w_gate},     {"ffn_up.weight", &L.w_up},
      {"ffn_down.weight", &L.w_down}};
  return layer.at(name.substr(dot + 1));
}

void check_same_weights(model::Weights<float>& read, model::Weights<float>& expected) {
  std::map<std::string, const Tensor<float>*> got;
  read.for_each([&](const std::string& name, Tensor<float>& t) { got[name] = &t; });
  std::size_t count = 0;
  expected.for_each([&](const std::string& name, Tensor<float>& t) {
    INFO(name);
    ++count;
    REQUIRE(got.count(name) == 1);
    REQUIRE(got[name]->shape() == t.shape());
    CHECK(test::relative_difference(*got[name], t) <= 1e-6);
  });
  CHECK(got.size() == count);
}

void check_config(const model::Config& got, const model::Config& c) {
  CHECK(got.architecture == c.architecture);
  CHECK(got.n_layers == c.n_layers);
  CHECK(got.d_model == c.d_model);
  CHECK(got.n_heads == c.n_heads);
  CHECK(got.n_kv_heads == c.n_kv_heads);
  CHECK(got.d_head == c.d_head);
  CHECK(got.d_ff == c.d_ff);
  CHECK(got.vocab_size == c.vocab_size);
  CHECK(got.context_length == c.context_length);
  CHECK(got.rms_eps == double(float(c.rms_eps)));  // stored as float32
  CHECK(got.rope.theta == double(float(c.rope.theta)));
  CHECK(got.rope.style == c.rope.style);
  CHECK(got.qkv_bias == c.qkv_bias);
  CHECK(got.tied_embeddings == c.tied_embeddings);
}

std::string model_error(const tw::Writer& w, const std::string& file) {
  return error_of([&] { io::read_gguf(gguf::File::parse(w.bytes(), file)); });
}

nlohmann::json read_json(const std::filesystem::path& p) {
  std::ifstream in(p);
  REQUIRE_MESSAGE(bool(in), "cannot open ", p.string());
  return nlohmann::json::parse(in);
}

// Each tensor's sum and sampled values agree with the gguf package's dequantisation.
void check_reference_tensors(model::Weights<float>& w, const nlohmann::json& reference) {
  for (const auto& r : reference["tensors"]) {
    const std::string name = r["name"];
    INFO(name, " (", std::string(r["type"]), ")");
    const Tensor<float>* t = weight_named(w, name);
    REQUIRE(t->rank() == int(r["shape"].size()));
    for (int i = 0; i < t->rank(); ++i) CHECK(t->dim(i) == r["shape"][std::size_t(i)].get<index_t>());
    double sum = 0;
    for (float x : t->flat()) sum += x;
    CHECK(sum == doctest::Approx(r["sum"].get<double>()).epsilon(1e-9));
    for (const auto& s : r["samples"])
      CHECK(t->data()[s[0].get<std::size_t>()] == doctest::Approx(s[1].get<double>()).epsilon(1e-6));
  }
}

}  // namespace

// ---- metadata --------------------------------------------------------------------------------

TEST_CASE("gguf: every metadata value type round-trips") {
  Rng rng = test::rng_for("gguf metadata");
  const auto u64 = [&] { return rng.next_u64(); };
  const auto u8 = std::uint8_t(u64());
  const auto i8 = std::int8_t(u64());
  const auto u16 = std::uint16_t(u64());
  const auto i16 = std::int16_t(u64());
  const auto u32 = std::uint32_t(u64());
  const auto i32 = std::int32_t(u64());
  const auto i64 = std::int64_t(u64());
  const std::uint64_t small_u64 = u64() >> 1, big_u64 = u64() | (1ull << 63);
  const float f32 = float(rng.normal());
  const double f64 = rng.normal();
  const bool flag = rng.below(2) == 1;
  const std::string text = "h\xc3\xa9llo \xe2\x9c\x93 " + std::to_string(u64());  // é and ✓
  const std::vector<std::uint16_t> u16s = {std::uint16_t(u64()), 0, 65535};
  const std::vector<std::int64_t> i64s = {i64, -1, std::numeric_limits<std::int64_t>::min()};
  const std::vector<float> f32s = {f32, -0.5f, 1e30f};
  const std::vector<double> f64s = {f64, 1e-300};
  const std::vector<std::string> words = {"", text, "merges a b"};
  const std::vector<std::vector<std::int32_t>> nested = {{1, 2}, {}, {i32}};
  const std::vector<std::vector<std::string>> nested_strings = {{"x"}, {"y", "z"}};

  tw::Writer w;
  w.add("t.u8", u8).add("t.i8", i8).add("t.u16", u16).add("t.i16", i16).add("t.u32", u32).add("t.i32", i32);
  w.add("t.u64", small_u64).add("t.u64_big", big_u64).add("t.i64", i64).add("t.f32", f32).add("t.f64", f64);
  w.add("t.bool", flag).add("t.string", text);
  w.add("t.u16s", u16s).add("t.i64s", i64s).add("t.f32s", f32s).add("t.f64s", f64s).add("t.words", words);
  w.add("t.bools", std::vector<bool>{true, false}).add("t.empty", std::vector<std::uint8_t>{});
  w.add("t.nested", nested).add("t.nested_strings", nested_strings).add("t.after", std::string("still read"));
  const gguf::File f = gguf::File::parse(w.bytes(), "values.gguf");

  CHECK(f.version() == 3);
  CHECK(f.alignment() == 32);
  CHECK(f.tensors().empty());
  CHECK(f.keys() == std::vector<std::string>{"t.u8", "t.i8", "t.u16", "t.i16", "t.u32", "t.i32", "t.u64", "t.u64_big",
                                             "t.i64", "t.f32", "t.f64", "t.bool", "t.string", "t.u16s", "t.i64s",
                                             "t.f32s", "t.f64s", "t.words", "t.bools", "t.empty", "t.nested",
                                             "t.nested_strings", "t.after"});
  CHECK(f.type_of("t.u8") == ValueType::uint8);
  CHECK(f.type_of("t.i8") == ValueType::int8);
  CHECK(f.type_of("t.u16") == ValueType::uint16);
  CHECK(f.type_of("t.i16") == ValueType::int16);
  CHECK(f.type_of("t.u32") == ValueType::uint32);
  CHECK(f.type_of("t.i32") == ValueType::int32);
  CHECK(f.type_of("t.u64") == ValueType::uint64);
  CHECK(f.type_of("t.i64") == ValueType::int64);
  CHECK(f.type_of("t.f32") == ValueType::float32);
  CHECK(f.type_of("t.f64") == ValueType::float64);
  CHECK(f.type_of("t.bool") == ValueType::boolean);
  CHECK(f.type_of("t.string") == ValueType::string);
  CHECK(f.type_of("t.nested") == ValueType::array);

  CHECK(f.integer("t.u8") == u8);
  CHECK(f.integer("t.i8") == i8);
  CHECK(f.integer("t.u16") == u16);
  CHECK(f.integer("t.i16") == i16);
  CHECK(f.integer("t.u32") == u32);
  CHECK(f.integer("t.i32") == i32);
  CHECK(f.integer("t.u64") == std::int64_t(small_u64));
  CHECK(f.integer("t.i64") == i64);
  CHECK(f.real("t.f32") == double(f32));
  CHECK(f.real("t.f64") == f64);
  CHECK(f.real("t.i32") == double(i32));
  CHECK(f.boolean("t.bool") == flag);
  CHECK(f.string("t.string") == text);
  CHECK(f.integers("t.u16s") == std::vector<std::int64_t>{u16s[0], 0, 65535});
  CHECK(f.integers("t.i64s") == i64s);
  CHECK(f.reals("t.f32s") == std::vector<double>{f32, -0.5, double(1e30f)});
  CHECK(f.reals("t.f64s") == f64s);
  CHECK(f.reals("t.u16s") == std::vector<double>{double(u16s[0]), 0, 65535});
  CHECK(f.strings("t.words") == words);
  CHECK(f.integers("t.empty").empty());
  CHECK(f.string("t.after") == "still read");  // the nested arrays before it were read through
  CHECK(f.has("t.nested"));
  CHECK_FALSE(f.has("t.absent"));

  // Wrong types and absent keys: the message names the file, the key and the actual type.
  const auto refused = [&](const std::function<void()>& g, std::initializer_list<std::string_view> parts) {
    const std::string m = error_of(g);
    INFO(m);
    REQUIRE_FALSE(m.empty());
    CHECK(contains(m, "values.gguf"));
    for (std::string_view p : parts) CHECK(contains(m, p));
  };
  refused([&] { f.string("t.u32"); }, {"t.u32", "uint32", "string"});
  refused([&] { f.integer("t.string"); }, {"t.string", "string", "integer"});
  refused([&] { f.integer("t.f32"); }, {"t.f32", "float32"});
  refused([&] { f.integer("t.bool"); }, {"t.bool", "bool"});
  refused([&] { f.integer("t.u64_big"); }, {"t.u64_big", std::to_string(big_u64), "int64"});
  refused([&] { f.boolean("t.u8"); }, {"t.u8", "uint8", "bool"});
  refused([&] { f.real("t.string"); }, {"t.string", "string"});
  refused([&] { f.strings("t.i64s"); }, {"t.i64s", "array of 3 int64", "array of string"});
  refused([&] { f.integers("t.words"); }, {"t.words", "array of 3 string"});
  refused([&] { f.integers("t.nested"); }, {"t.nested", "array of 3 array"});
  refused([&] { f.reals("t.f32"); }, {"t.f32", "float32"});
  refused([&] { f.integer("t.i64s"); }, {"t.i64s", "array"});
  refused([&] { f.string("t.absent"); }, {"t.absent", "missing"});
  refused([&] { f.type_of("t.absent"); }, {"t.absent", "missing"});
}

TEST_CASE("gguf: UTF-8 validation refuses exactly the ill-formed sequences") {
  using gguf::detail::first_invalid_utf8;
  for (std::string_view ok : {"", "ascii", "\xc3\xa9", "\xe2\x9c\x93", "\xf0\x9f\x98\x80", "\xef\xbf\xbf",
                              "\xf4\x8f\xbf\xbf", "\xed\x9f\xbf"})
    CHECK(first_invalid_utf8(ok) == ok.size());
  // Lone continuation, overlong (2, 3 and 4 bytes), surrogate, above U+10FFFF, truncated, bad lead.
  for (std::string_view bad : {"\x80", "\xc0\xaf", "\xc1\x81", "\xe0\x80\xaf", "\xf0\x80\x80\xaf", "\xed\xa0\x80",
                               "\xf4\x90\x80\x80", "\xe2\x9c", "\xf0\x9f\x98", "\xff", "\xf5\x80\x80\x80",
                               "\xc3\x28"})
    CHECK(first_invalid_utf8(bad) == 0);
  CHECK(first_invalid_utf8("ab\xc3\xa9\xff") == 4);
}

// ---- tensors ---------------------------------------------------------------------------------

TEST_CASE("gguf: every supported storage type decodes to the values its formula gives") {
  Rng rng = test::rng_for("gguf dequantise");
  // How far the test's own encoder may move a value (normwise), as a check on the encoder.
  const std::map<TensorType, double> encoder_error = {{TensorType::F32, 0},         {TensorType::F16, 0x1p-11},
                                                      {TensorType::BF16, 0x1p-8},   {TensorType::Q8_0, 1.0 / 127},
                                                      {TensorType::Q4_0, 0.13},     {TensorType::Q4_1, 0.07}};
  for (TensorType type : supported_types) {
    INFO(gguf::name_of(type));
    tw::Writer w;
    const std::vector<float> x2 = random_values(5 * 64, rng, 3.0), x1 = random_values(96, rng),
                             x3 = random_values(2 * 3 * 32, rng);
    const auto v2 = w.tensor("matrix", {64, 5}, type, x2);
    const auto v1 = w.tensor("vector", {96}, type, x1);
    const auto v3 = w.tensor("cube", {32, 3, 2}, type, x3);
    CHECK(test::relative_difference(as_tensor(Shape{5, 64}, v2), as_tensor(Shape{5, 64}, x2)) <=
          encoder_error.at(type));
    const gguf::File f = gguf::File::parse(w.bytes(), "types.gguf");

    const gguf::TensorInfo* info = f.find_tensor("matrix");
    REQUIRE(info != nullptr);
    CHECK(info->type == type);
    CHECK(info->dims == std::vector<std::uint64_t>{64, 5});
    CHECK(info->bytes == 5 * 64 / gguf::layout_of(type)->values * gguf::layout_of(type)->bytes);
    for (const gguf::TensorInfo& t : f.tensors()) CHECK(t.offset % f.alignment() == 0);

    const Tensor<float> m = f.read_tensor("matrix");
    REQUIRE(m.shape() == Shape{5, 64});  // GGUF [in, out] → row-major [out, in]
    CHECK(test::relative_difference(m, as_tensor(Shape{5, 64}, v2)) <= 1e-6);
    const Tensor<float> v = f.read_tensor("vector");
    REQUIRE(v.shape() == Shape{96});
    CHECK(test::relative_difference(v, as_tensor(Shape{96}, v1)) <= 1e-6);
    const Tensor<float> c = f.read_tensor("cube");
    REQUIRE(c.shape() == Shape{2, 3, 32});
    CHECK(test::relative_difference(c, as_tensor(Shape{2, 3, 32}, v3)) <= 1e-6);
  }
}

TEST_CASE("gguf: half and bfloat16 encodings used by the tests are exact where they should be") {
  CHECK(tw::to_half(1.0f).bits == 0x3c00);
  CHECK(tw::to_half(-2.0f).bits == 0xc000);
  CHECK(tw::to_half(65504.0f).bits == 0x7bff);
  CHECK(tw::to_half(0x1p-24f).bits == 0x0001);          // smallest subnormal
  CHECK(tw::to_half(1.0f + 0x1p-11f).bits == 0x3c00);   // a tie goes to the even significand
  CHECK(tw::to_half(1.0f + 0x3p-11f).bits == 0x3c02);
  Rng rng = test::rng_for("gguf half");
  for (int i = 0; i < 1000; ++i) {
    // Magnitudes from deep in the subnormals to near the largest finite half.
    const float x = float(rng.uniform(-1, 1) * std::ldexp(1.0, int(rng.below(42)) - 26));
    const tw::Half h = tw::to_half(x);
    CHECK(io::detail::half_to_float(h.bits) == h.value);
    CHECK(std::abs(h.value - x) <= std::max(std::abs(x) * 0x1p-11f, 0x1p-25f));
    const tw::Half b = tw::to_bf16(x);
    CHECK(io::detail::bf16_to_float(b.bits) == b.value);
  }
}

TEST_CASE("gguf: known but unsupported storage types are listed and refused by name on reading") {
  Rng rng = test::rng_for("gguf unsupported");
  tw::Writer w;
  w.tensor("blk.0.ffn_down.weight", {256, 2}, TensorType::Q6_K, std::vector<std::byte>(2 * 210));
  w.tensor("plain.weight", {32}, TensorType::F32, random_values(32, rng));
  const gguf::File f = gguf::File::parse(w.bytes(), "k_quant.gguf");
  CHECK(f.find_tensor("blk.0.ffn_down.weight")->type == TensorType::Q6_K);
  CHECK(f.find_tensor("blk.0.ffn_down.weight")->bytes == 420);
  const std::string m = error_of([&] { f.read_tensor("blk.0.ffn_down.weight"); });
  CHECK(contains(m, "k_quant.gguf"));
  CHECK(contains(m, "blk.0.ffn_down.weight"));
  CHECK(contains(m, "Q6_K"));
  CHECK(gguf::name_of(TensorType::Q4_K) == "Q4_K");
  CHECK(gguf::name_of(TensorType::IQ4_XS) == "IQ4_XS");
  CHECK(gguf::name_of(TensorType::BF16) == "BF16");
  CHECK(contains(error_of([&] { f.read_tensor("absent.weight"); }), "absent.weight"));
}

TEST_CASE("gguf: a non-default alignment places and finds every tensor") {
  Rng rng = test::rng_for("gguf alignment");
  for (std::uint32_t alignment : {1u, 8u, 64u, 256u}) {
    INFO("alignment ", alignment);
    tw::Writer w;
    w.align(alignment);
    const auto a = w.tensor("a", {32, 3}, TensorType::Q4_1, random_values(96, rng));
    const auto b = w.tensor("b", {7}, TensorType::F16, random_values(7, rng));
    const auto c = w.tensor("c", {5}, TensorType::F32, random_values(5, rng));
    const gguf::File f = gguf::File::parse(w.bytes(), "aligned.gguf");
    CHECK(f.alignment() == alignment);
    for (const gguf::TensorInfo& t : f.tensors()) CHECK(t.offset % alignment == 0);
    CHECK(test::relative_difference(f.read_tensor("a"), as_tensor(Shape{3, 32}, a)) <= 1e-6);
    CHECK(test::relative_difference(f.read_tensor("b"), as_tensor(Shape{7}, b)) <= 1e-6);
    CHECK(test::relative_difference(f.read_tensor("c"), as_tensor(Shape{5}, c)) <= 1e-6);
  }
}

// ---- models ----------------------------------------------------------------------------------

TEST_CASE("gguf: a tiny llama model reads back into the config and weights written") {
  Rng rng = test::rng_for("gguf tiny llama");
  const model::Config c = tiny_config("llama");
  WrittenModel m = write_model(c, rng);
  io::Checkpoint ck = io::read_gguf(gguf::File::parse(m.writer.bytes(), "tiny-llama.gguf"));
  check_config(ck.config, c);
  CHECK(ck.config.rope.style == RopeConfig::Style::interleaved);  // llama.cpp's permuted Wq/Wk
  CHECK(ck.config.tied_embeddings);
  CHECK(ck.weights.lm_head.empty());
  CHECK(&ck.weights.head() == &ck.weights.embedding);
  check_same_weights(ck.weights, m.expected);
  CHECK(ck.format == "gguf");
  CHECK(ck.name == "tiny llama");
  CHECK(ck.path == "tiny-llama.gguf");
  CHECK(ck.storage_types == m.storage);
}

TEST_CASE("gguf: a tiny qwen2 model with q/k/v biases and a separate head reads back") {
  Rng rng = test::rng_for("gguf tiny qwen2");
  model::Config c = tiny_config("qwen2");
  c.d_head = 32;  // wider than d_model / n_heads: needs attention.key_length
  c.rope = {RopeConfig::Style::half, 1000000.0};
  c.rms_eps = 1e-6;
  c.qkv_bias = true;
  c.tied_embeddings = false;
  ModelOptions o;
  o.separate_head = true;
  o.write_key_length = true;
  WrittenModel m = write_model(c, rng, o);
  io::Checkpoint ck = io::read_gguf(gguf::File::parse(m.writer.bytes(), "tiny-qwen2.gguf"));
  check_config(ck.config, c);
  CHECK(ck.config.rope.style == RopeConfig::Style::half);  // NEOX rotation, unpermuted weights
  CHECK_FALSE(ck.weights.lm_head.empty());
  CHECK_FALSE(ck.weights.layers[1].attention.bk.empty());
  check_same_weights(ck.weights, m.expected);
  CHECK(ck.storage_types == m.storage);
}

TEST_CASE("gguf: absent optional hyperparameters take their defaults") {
  Rng rng = test::rng_for("gguf defaults");
  model::Config c = tiny_config("mistral");
  c.n_kv_heads = c.n_heads;  // head_count_kv absent: no grouping
  ModelOptions o;
  o.write_head_count_kv = o.write_freq_base = o.write_vocab_size = false;  // theta 10000, vocab from the embedding
  WrittenModel m = write_model(c, rng, o);
  io::Checkpoint ck = io::read_gguf(gguf::File::parse(m.writer.bytes(), "defaults.gguf"));
  check_config(ck.config, c);
  check_same_weights(ck.weights, m.expected);
}

TEST_CASE("gguf: model files that do not describe a supported model are refused by name") {
  Rng rng = test::rng_for("gguf model errors");
  const model::Config c = tiny_config("llama");
  const auto refused = [&](const tw::Writer& w, const std::string& file,
                           std::initializer_list<std::string_view> parts) {
    const std::string message = model_error(w, file);
    INFO(file, ": ", message);
    REQUIRE_FALSE(message.empty());
    CHECK(contains(message, file));
    for (std::string_view p : parts) CHECK(contains(message, p));
  };
  {
    model::Config other = c;
    other.architecture = "gpt2";
    refused(write_model(other, rng).writer, "arch.gguf", {"general.architecture", "gpt2"});
  }
  {
    ModelOptions o;
    o.omit = {"llama.block_count"};
    tw::Writer w = write_model(c, rng, o).writer;
    w.add("llama.block_count", "two");
    refused(w, "block_count_string.gguf", {"llama.block_count", "string", "integer"});
  }
  {
    ModelOptions o;
    o.omit = {"llama.embedding_length"};
    refused(write_model(c, rng, o).writer, "no_embedding_length.gguf", {"llama.embedding_length", "missing"});
  }
  {
    ModelOptions o;
    o.omit = {"general.architecture"};
    refused(write_model(c, rng, o).writer, "no_arch.gguf", {"general.architecture", "missing"});
  }
  {
    ModelOptions o;
    o.omit = {"blk.1.attn_k.weight"};
    refused(write_model(c, rng, o).writer, "missing_tensor.gguf", {"blk.1.attn_k.weight", "missing"});
  }
  {
    ModelOptions o;
    o.omit = {"blk.0.ffn_up.weight"};
    tw::Writer w = write_model(c, rng, o).writer;
    w.tensor("blk.0.ffn_up.weight", {64, 95}, TensorType::F32, random_values(64 * 95, rng));
    refused(w, "wrong_shape.gguf", {"blk.0.ffn_up.weight", "shape [95, 64]", "[96, 64]"});
  }
  {
    tw::Writer w = write_model(c, rng).writer;
    w.tensor("blk.0.attn_output.bias", {64}, TensorType::F32, random_values(64, rng));
    refused(w, "extra_tensor.gguf", {"blk.0.attn_output.bias", "unexpected"});
  }
  {
    tw::Writer w = write_model(c, rng).writer;
    w.tensor("blk.2.attn_norm.weight", {64}, TensorType::F32, random_values(64, rng));
    refused(w, "extra_layer.gguf", {"blk.2.attn_norm.weight", "unexpected"});
  }
  {
    tw::Writer w = write_model(c, rng).writer;
    w.tensor("rope_freqs.weight", {8}, TensorType::F32, random_values(8, rng));
    refused(w, "rope_freqs.gguf", {"rope_freqs.weight"});
  }
  {
    tw::Writer w = write_model(c, rng).writer;
    w.add("llama.rope.scaling.type", "yarn").add("llama.rope.scaling.factor", 4.0f);
    refused(w, "yarn.gguf", {"llama.rope.scaling.type", "yarn"});
  }
  {
    tw::Writer w = write_model(c, rng).writer;
    w.add("llama.rope.dimension_count", std::uint32_t(8));
    refused(w, "partial_rotary.gguf", {"llama.rope.dimension_count", "8"});
  }
  {
    model::Config odd = c;
    odd.n_kv_heads = 3;
    refused(write_model(odd, rng).writer, "kv_heads.gguf", {"n_kv_heads"});
  }
  {
    ModelOptions o;
    o.omit = {"llama.attention.head_count"};
    tw::Writer w = write_model(c, rng, o).writer;
    w.add("llama.attention.head_count", std::int32_t(-4));
    refused(w, "negative_heads.gguf", {"llama.attention.head_count", "-4"});
  }
  {
    ModelOptions o;
    o.omit = {"llama.vocab_size"};
    tw::Writer w = write_model(c, rng, o).writer;
    w.add("llama.vocab_size", std::uint32_t(41));
    refused(w, "vocab.gguf", {"token_embd.weight", "[40, 64]", "[41, 64]"});
  }
}

// ---- malformed files -------------------------------------------------------------------------

TEST_CASE("gguf: a file truncated anywhere is refused, naming the file") {
  Rng rng = test::rng_for("gguf truncation");
  tw::Layout layout;
  const std::vector<std::byte> full = small_writer(rng).bytes(&layout);
  CHECK_NOTHROW(gguf::File::parse(full, "full.gguf"));
  const auto cut = [&](std::size_t n) {
    return std::vector<std::byte>(full.begin(), full.begin() + std::ptrdiff_t(n));
  };
  for (std::size_t b : layout.boundaries())
    for (std::size_t n : {b - 1, b, b + 1})
      if (n < full.size()) check_refused(cut(n), "cut_at_" + std::to_string(n) + ".gguf", {});
  for (int i = 0; i < 200; ++i) {
    const std::size_t n = rng.below(full.size());
    check_refused(cut(n), "random_cut_" + std::to_string(n) + ".gguf", {});
  }
  // The smallest file with a tensor, cut at every byte.
  tw::Writer tiny;
  tiny.add("k", std::uint8_t(1));
  tiny.tensor("t", {1}, TensorType::F32, std::vector<float>{2.5f});
  const std::vector<std::byte> t = tiny.bytes();
  CHECK(gguf::File::parse(t, "tiny.gguf").read_tensor("t").data()[0] == 2.5f);
  for (std::size_t n = 0; n < t.size(); ++n)
    check_refused(std::vector<std::byte>(t.begin(), t.begin() + std::ptrdiff_t(n)),
                  "tiny_" + std::to_string(n) + ".gguf", {});
  // A cut in the header names the field it fell in.
  check_refused(cut(2), "header.gguf", {"magic"});
  check_refused(cut(6), "header.gguf", {"version"});
  check_refused(cut(12), "header.gguf", {"tensor_count"});
  check_refused(cut(layout.tensor_starts[1] + 5), "data.gguf", {"second.weight", "outside the data section"});
}

TEST_CASE("gguf: malformed headers and metadata are refused, naming the file and the field") {
  Rng rng = test::rng_for("gguf malformed metadata");
  const auto with = [&](const std::function<void(tw::Writer&)>& change) {
    tw::Writer w = small_writer(rng);
    change(w);
    return w.bytes();
  };
  check_refused(with([](tw::Writer& w) { w.magic[3] = 'G'; }), "magic.gguf", {"magic", "47 47 55 47", "GGUF"});
  check_refused(with([](tw::Writer& w) { w.version = 1; }), "v1.gguf", {"version", "1", "expected 2 or 3"});
  check_refused(with([](tw::Writer& w) { w.version = 4; }), "v4.gguf", {"version", "4"});
  CHECK_NOTHROW(gguf::File::parse(with([](tw::Writer& w) { w.version = 2; }), "v2.gguf"));

  // Counts larger than the file could hold fail before anything is allocated.
  check_refused(with([](tw::Writer& w) { w.kv_count = 1ull << 62; }), "kv_count.gguf", {"metadata_kv_count"});
  check_refused(with([](tw::Writer& w) { w.tensor_count = ~0ull; }), "tensor_count.gguf", {"tensor_count"});
  check_refused(with([](tw::Writer& w) { w.kv_count = 9; }), "kv_count_9.gguf", {});
  const auto array_header = [](ValueType element, std::uint64_t count) {
    std::vector<std::byte> p;
    tw::append(p, element);
    tw::append(p, count);
    return p;
  };
  for (ValueType element : {ValueType::uint64, ValueType::string, ValueType::array, ValueType::uint8})
    check_refused(with([&](tw::Writer& w) { w.add_raw("test.big", 9, array_header(element, 1ull << 61)); }),
                  "array_count_" + gguf::name_of(element) + ".gguf", {"test.big", "array of"});
  {
    std::vector<std::byte> p;
    tw::append(p, std::uint64_t{1000});
    for (char ch : std::string("abc")) p.push_back(std::byte(ch));
    check_refused(with([&](tw::Writer& w) { w.add_raw("test.s", 8, p); }), "string_length.gguf", {"test.s", "1000"});
  }
  {
    tw::Layout layout;
    std::vector<std::byte> b = small_writer(rng).bytes(&layout);
    const std::uint64_t huge = 1ull << 40;
    std::memcpy(b.data() + layout.kv_starts[1], &huge, 8);
    check_refused(b, "key_length.gguf", {"key of metadata entry 1", std::to_string(huge)});
  }

  check_refused(with([](tw::Writer& w) { w.add("bad\xff.key", std::uint8_t(1)); }), "utf8_key.gguf",
                {"key of metadata entry 4", "UTF-8"});
  check_refused(with([](tw::Writer& w) { w.add("test.text", std::string("a\xc0\xafz")); }), "utf8_value.gguf",
                {"test.text", "UTF-8"});
  check_refused(with([](tw::Writer& w) { w.add("test.words", std::vector<std::string>{"ok", "\xed\xa0\x80"}); }),
                "utf8_array.gguf", {"test.words", "UTF-8"});
  check_refused(with([](tw::Writer& w) { w.add("", std::uint8_t(1)); }), "empty_key.gguf", {"key of metadata entry 4"});
  check_refused(with([](tw::Writer& w) { w.add("test.count", std::uint32_t(8)); }), "duplicate_key.gguf",
                {"test.count", "duplicate"});
  check_refused(with([](tw::Writer& w) { w.add_raw("test.flag", 7, {std::byte{2}}); }), "bool.gguf",
                {"test.flag", "boolean", "0 or 1"});
  check_refused(with([](tw::Writer& w) { w.add_raw("test.odd", 13, {}); }), "value_type.gguf", {"test.odd", "13"});
  check_refused(with([&](tw::Writer& w) { w.add_raw("test.odd_array", 9, array_header(ValueType(99), 1)); }),
                "element_type.gguf", {"test.odd_array", "99"});

  // Arrays of arrays: nested up to the bound, no deeper.
  const auto nested = [&](int depth) {
    std::vector<std::byte> p;
    for (int i = 1; i < depth; ++i) {
      tw::append(p, ValueType::array);
      tw::append(p, std::uint64_t{1});
    }
    tw::append(p, ValueType::int32);
    tw::append(p, std::uint64_t{1});
    tw::append(p, std::int32_t{5});
    return p;
  };
  const auto deep = [&](int depth) { return with([&](tw::Writer& w) { w.add_raw("test.deep", 9, nested(depth)); }); };
  CHECK(gguf::File::parse(deep(gguf::detail::max_array_depth), "deep.gguf").type_of("test.deep") == ValueType::array);
  CHECK(gguf::File::parse(deep(1), "flat.gguf").integers("test.deep") == std::vector<std::int64_t>{5});
  check_refused(deep(gguf::detail::max_array_depth + 1), "too_deep.gguf", {"test.deep", "nested"});

  check_refused(with([](tw::Writer& w) { w.add("general.alignment", std::uint32_t(48)); }), "alignment_48.gguf",
                {"general.alignment", "48", "power of two"});
  check_refused(with([](tw::Writer& w) { w.add("general.alignment", std::uint32_t(0)); }), "alignment_0.gguf",
                {"general.alignment"});
  check_refused(with([](tw::Writer& w) { w.add("general.alignment", "32"); }), "alignment_string.gguf",
                {"general.alignment", "string"});
}

TEST_CASE("gguf: malformed tensor infos and data are refused, naming the file and the tensor") {
  Rng rng = test::rng_for("gguf malformed tensors");
  const auto with = [&](const std::function<void(tw::Writer&)>& change) {
    tw::Writer w = small_writer(rng);
    change(w);
    return w.bytes();
  };
  const auto f32 = [&](std::size_t n) { return tw::encode(TensorType::F32, random_values(n, rng)).bytes; };
  check_refused(with([&](tw::Writer& w) { w.tensor("t\xfe", {1}, TensorType::F32, f32(1)); }), "utf8_name.gguf",
                {"name of tensor 2", "UTF-8"});
  check_refused(with([&](tw::Writer& w) { w.tensor("first.weight", {1}, TensorType::F32, f32(1)); }),
                "duplicate_tensor.gguf", {"first.weight", "duplicate"});
  check_refused(with([&](tw::Writer& w) { w.tensor("scalar.weight", {}, TensorType::F32, f32(1)); }),
                "n_dims_0.gguf", {"scalar.weight", "n_dims 0"});
  check_refused(with([&](tw::Writer& w) { w.tensor("five.weight", {1, 1, 1, 1, 1}, TensorType::F32, f32(1)); }),
                "n_dims_5.gguf", {"five.weight", "n_dims 5"});
  check_refused(with([&](tw::Writer& w) { w.tensor("empty.weight", {32, 0}, TensorType::F32, f32(0)); }),
                "zero_dim.gguf", {"empty.weight", "dims[1] is 0"});
  check_refused(with([&](tw::Writer& w) { w.tensor("huge.weight", {1ull << 32, 1ull << 32}, TensorType::F32, f32(0)); }),
                "dims_overflow.gguf", {"huge.weight", "2^63"});
  check_refused(with([&](tw::Writer& w) { w.tensor("huge.weight", {1ull << 62}, TensorType::F64, f32(0)); }),
                "bytes_overflow.gguf", {"huge.weight", "2^64 bytes"});
  check_refused(with([&](tw::Writer& w) { w.tensor("big.weight", {1ull << 40}, TensorType::F32, f32(0)); }),
                "big_tensor.gguf", {"big.weight", "outside the data section"});
  check_refused(with([&](tw::Writer& w) { w.tensor("odd.weight", {4}, TensorType(99), f32(4)); }),
                "unknown_type.gguf", {"odd.weight", "99", "not a ggml type"});
  check_refused(with([&](tw::Writer& w) { w.tensor("removed.weight", {32}, TensorType(4), f32(8)); }),
                "removed_type.gguf", {"removed.weight", "type 4"});
  check_refused(with([&](tw::Writer& w) { w.tensor("short_row.weight", {48, 2}, TensorType::Q8_0, f32(0)); }),
                "row_length.gguf", {"short_row.weight", "48", "Q8_0"});
  check_refused(with([](tw::Writer& w) { w.tensors()[1].offset = 8; }), "misaligned.gguf",
                {"second.weight", "offset 8", "alignment 32"});
  check_refused(with([](tw::Writer& w) { w.tensors()[1].offset = 1ull << 20; }), "out_of_bounds.gguf",
                {"second.weight", "outside the data section"});
  check_refused(with([](tw::Writer& w) { w.tensors()[1].offset = ~0ull << 5; }), "offset_overflow.gguf",
                {"second.weight", "outside the data section"});
  check_refused(with([](tw::Writer& w) { w.tensors()[1].offset = 128; }), "overlap.gguf",
                {"second.weight", "overlaps", "first.weight"});
  check_refused(with([](tw::Writer& w) { w.tensors()[0].offset = 64, w.tensors()[1].offset = 0; }),
                "overlap_reversed.gguf",
                {"first.weight", "overlaps", "second.weight"});
}

TEST_CASE("gguf: File::open reads a file and names a missing one") {
  const auto path = std::filesystem::temp_directory_path() / "dash_test_gguf_open.gguf";
  Rng rng = test::rng_for("gguf open");
  const std::vector<std::byte> bytes = small_writer(rng).bytes();
  {
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  }
  const gguf::File f = gguf::File::open(path);
  CHECK(f.name() == path.string());
  CHECK(f.integers("test.list") == std::vector<std::int64_t>{1, -2, 3});
  std::filesystem::remove(path);
  CHECK(contains(error_of([&] { gguf::File::open(path); }), path.string()));
}

// ---- files written by the gguf Python package (scripts/gguf_reference.py) --------------------

TEST_CASE("gguf: tiny models written by the gguf Python package match its dequantisation") {
  for (const std::string arch : {"llama", "qwen2"}) {
    INFO(arch);
    const auto path = test::fixtures() / "gguf" / ("tiny_" + arch + ".gguf");
    const nlohmann::json reference = read_json(test::fixtures() / "gguf" / ("tiny_" + arch + ".json"));
    io::Checkpoint ck = io::read_gguf(path);
    const auto& rc = reference["config"];
    CHECK(ck.config.architecture == rc["architecture"].get<std::string>());
    CHECK(ck.config.n_layers == rc["n_layers"].get<int>());
    CHECK(ck.config.d_model == rc["d_model"].get<int>());
    CHECK(ck.config.n_heads == rc["n_heads"].get<int>());
    CHECK(ck.config.n_kv_heads == rc["n_kv_heads"].get<int>());
    CHECK(ck.config.d_head == rc["d_head"].get<int>());
    CHECK(ck.config.d_ff == rc["d_ff"].get<int>());
    CHECK(ck.config.vocab_size == rc["vocab_size"].get<int>());
    CHECK(ck.config.context_length == rc["context_length"].get<int>());
    CHECK(ck.config.rms_eps == double(float(rc["rms_eps"].get<double>())));
    CHECK(ck.config.rope.theta == rc["rope_theta"].get<double>());
    CHECK(ck.config.rope.style ==
          (rc["rope_style"] == "half" ? RopeConfig::Style::half : RopeConfig::Style::interleaved));
    CHECK(ck.config.qkv_bias == rc["qkv_bias"].get<bool>());
    CHECK(ck.config.tied_embeddings == rc["tied_embeddings"].get<bool>());
    CHECK(ck.name == "tiny-" + arch);
    check_reference_tensors(ck.weights, reference);
  }
}

TEST_CASE("gguf: the malformed seed fixtures are refused") {
  for (const char* name : {"bad_magic.gguf", "truncated.gguf", "huge_kv_count.gguf"}) {
    const std::string path = (test::fixtures() / "gguf" / name).string();
    const std::string message = error_of([&] { gguf::File::open(path); });
    INFO(message);
    CHECK(contains(message, path));
  }
}

TEST_CASE("gguf: SmolLM2-135M-Instruct Q4_1 reads as its published configuration") {
  const auto found = test::smollm2_gguf();
  if (!found) {
    MESSAGE("SmolLM2 GGUF not installed (bash cmake/setup.sh installs it): skipping its checks");
    return;
  }
  const std::filesystem::path path = *found;
  const gguf::File file = gguf::File::open(path);
  io::Checkpoint ck = io::read_gguf(file);
  const model::Config& c = ck.config;
  CHECK(c.architecture == "llama");
  CHECK(c.n_layers == 30);
  CHECK(c.d_model == 576);
  CHECK(c.n_heads == 9);
  CHECK(c.n_kv_heads == 3);
  CHECK(c.d_head == 64);
  CHECK(c.d_ff == 1536);
  CHECK(c.vocab_size == 49152);
  CHECK(c.context_length == 8192);
  CHECK(c.tied_embeddings);
  CHECK(c.rope.theta == 100000.0);
  CHECK(c.rope.style == RopeConfig::Style::interleaved);
  CHECK(c.rms_eps == doctest::Approx(1e-5).epsilon(1e-6));
  CHECK_FALSE(c.qkv_bias);
  CHECK(ck.weights.lm_head.empty());
  CHECK(ck.storage_types.at("Q4_1") + ck.storage_types.at("Q8_0") + ck.storage_types.at("F32") ==
        int(file.tensors().size()));
  CHECK(file.strings("tokenizer.ggml.tokens").size() == std::size_t(c.vocab_size));
  CHECK(file.string("tokenizer.ggml.pre") == "smollm");
  check_reference_tensors(ck.weights, read_json(test::fixtures() / "gguf" / "smollm2_reference.json"));
}

#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "dash/io/hf_config.hpp"
#include "dash/io/safetensors.hpp"
#include "support/errors.hpp"
#include "support/models.hpp"
#include "support/random.hpp"
#include "support/safetensors_writer.hpp"

using namespace dash;
namespace fs = std::filesystem;
namespace st = dash::io::safetensors;

using test::contains;
using test::error_of;

namespace {

// A fresh folder under the system's temporary directory, removed afterwards.
struct TempDir {
  fs::path path;
  explicit TempDir(Rng& rng) {
    path = fs::temp_directory_path() / ("dash_safetensors_" + std::to_string(rng.next_u64()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

bool same_bits(float a, float b) { return std::bit_cast<std::uint32_t>(a) == std::bit_cast<std::uint32_t>(b); }

bool same_bits(const Tensor<float>& a, const Tensor<float>& b) {
  if (a.shape() != b.shape()) return false;
  for (index_t i = 0; i < a.numel(); ++i)
    if (!same_bits(a.data()[i], b.data()[i])) return false;
  return true;
}

std::vector<std::int64_t> random_extents(Rng& rng) {
  std::vector<std::int64_t> shape(rng.below(4));
  for (auto& e : shape) e = std::int64_t(rng.below(5));
  return shape;
}

std::size_t numel(const std::vector<std::int64_t>& shape) {
  std::size_t n = 1;
  for (auto e : shape) n *= std::size_t(e);
  return n;
}

// Random values a 16-bit format represents exactly, each with its bit pattern, built from
// sign, exponent and mantissa fields by arithmetic (not by the reader's bit shifts):
// IEEE binary16 (5-bit exponent, bias 15) or bfloat16 (8-bit exponent, bias 127).
struct Sixteen {
  std::vector<std::uint16_t> bits;
  std::vector<float> values;
};
Sixteen random_sixteen(Rng& rng, std::size_t n, int exponent_bits, int mantissa_bits) {
  Sixteen out;
  const int bias = (1 << (exponent_bits - 1)) - 1, max_exponent = (1 << exponent_bits) - 1;
  for (std::size_t i = 0; i < n; ++i) {
    const int sign = int(rng.below(2));
    const int exponent = int(rng.below(std::uint64_t(max_exponent + 1)));  // max_exponent: infinity
    const int mantissa = exponent == max_exponent ? 0 : int(rng.below(1ull << mantissa_bits));
    const double fraction = double(mantissa) / double(1 << mantissa_bits);
    double magnitude = exponent == 0 ? std::ldexp(fraction, 1 - bias)
                                     : std::ldexp(1.0 + fraction, exponent - bias);
    if (exponent == max_exponent) magnitude = INFINITY;
    out.values.push_back(float(sign ? -magnitude : magnitude));
    out.bits.push_back(std::uint16_t((sign << 15) | (exponent << mantissa_bits) | mantissa));
  }
  return out;
}

// A small valid file: three float tensors of each dtype and metadata.
struct SmallFile {
  std::vector<test::RawTensor> tensors;
  std::map<std::string, std::string> metadata{{"format", "pt"}, {"note", "\u00fcnicode \"quoted\""}};
  std::map<std::string, std::vector<float>> values;
};
SmallFile small_file(Rng& rng) {
  SmallFile f;
  std::vector<float> f32(2 + rng.below(6));
  for (float& x : f32) x = float(rng.normal());
  test::RawTensor a{"a.weight", "F32", {std::int64_t(f32.size())}, std::vector<std::byte>(f32.size() * 4)};
  std::memcpy(a.data.data(), f32.data(), a.data.size());
  f.values["a.weight"] = f32;
  const Sixteen half = random_sixteen(rng, 6, 5, 10), brain = random_sixteen(rng, 6, 8, 7);
  f.tensors = {a, {"b.half", "F16", {2, 3}, test::raw_u16(half.bits)}, {"c.brain", "BF16", {3, 2}, test::raw_u16(brain.bits)}};
  f.values["b.half"] = half.values;
  f.values["c.brain"] = brain.values;
  return f;
}

}  // namespace

TEST_CASE("safetensors: F32, F16 and BF16 tensors read back as the values written, with metadata") {
  Rng rng = test::rng_for("safetensors round trip");
  TempDir dir(rng);
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<test::RawTensor> tensors;
    std::map<std::string, std::vector<float>> expected;
    std::map<std::string, std::vector<std::int64_t>> shapes;
    for (int i = 0; i < 6; ++i) {
      const auto shape = random_extents(rng);
      const std::size_t n = numel(shape);
      const std::string name = "t" + std::to_string(i) + (i % 3 == 0 ? ".f32" : i % 3 == 1 ? ".f16" : ".bf16");
      test::RawTensor raw{name, "", shape, {}};
      std::vector<float> values(n);
      if (i % 3 == 0) {
        for (float& x : values) x = float(rng.normal() * 100);
        raw.dtype = "F32";
        raw.data.resize(n * 4);
        if (n) std::memcpy(raw.data.data(), values.data(), n * 4);
      } else {
        const Sixteen s = i % 3 == 1 ? random_sixteen(rng, n, 5, 10) : random_sixteen(rng, n, 8, 7);
        raw.dtype = i % 3 == 1 ? "F16" : "BF16";
        raw.data = test::raw_u16(s.bits);
        values = s.values;
      }
      expected[name] = values;
      shapes[name] = shape;
      tensors.push_back(raw);
    }
    // An integer tensor parses but is not read as float.
    tensors.push_back({"ids", "I64", {2}, std::vector<std::byte>(16)});
    // Written in a shuffled order, so that the header's order is not the data's.
    for (std::size_t i = tensors.size() - 1; i > 0; --i) std::swap(tensors[i], tensors[rng.below(i + 1)]);
    const std::map<std::string, std::string> metadata{{"format", "pt"}, {"trial", std::to_string(trial)}};
    const fs::path path = dir.path / "round_trip.safetensors";
    test::write_bytes(path, test::safetensors_bytes(tensors, metadata));

    const st::File file = st::File::open(path);
    CHECK(file.name() == path.string());
    CHECK(file.metadata() == metadata);
    REQUIRE(file.tensors().size() == tensors.size());
    for (std::size_t i = 1; i < tensors.size(); ++i)
      CHECK(file.tensors()[i - 1].end <= file.tensors()[i].begin);  // in the order of their data
    for (const auto& [name, values] : expected) {
      const st::TensorInfo* info = file.find(name);
      REQUIRE(info != nullptr);
      CHECK(info->shape == shapes[name]);
      const Tensor<float> t = file.read(name);
      REQUIRE(t.rank() == int(shapes[name].size()));
      REQUIRE(std::size_t(t.numel()) == values.size());
      for (std::size_t k = 0; k < values.size(); ++k) CHECK(same_bits(t.data()[k], values[k]));
    }
    CHECK(file.find("absent") == nullptr);
    const std::string absent = error_of([&] { (void)file.read("absent"); });
    CHECK((contains(absent, path.string()) && contains(absent, "absent")));
    const std::string integer = error_of([&] { (void)file.read("ids"); });
    CHECK((contains(integer, "ids") && contains(integer, "I64")));
  }
}

TEST_CASE("safetensors: tensors large enough to be converted on several threads read back bit for bit") {
  Rng rng = test::rng_for("safetensors large tensors");
  TempDir dir(rng);
  const std::size_t n = (std::size_t(2) << 20) + 1 + rng.below(1000);  // over two conversion grains
  std::vector<float> f32(n);
  for (float& x : f32) x = float(rng.normal());
  test::RawTensor a{"a.f32", "F32", {std::int64_t(n)}, std::vector<std::byte>(n * 4)};
  std::memcpy(a.data.data(), f32.data(), n * 4);
  const Sixteen half = random_sixteen(rng, n, 5, 10), brain = random_sixteen(rng, n, 8, 7);
  const fs::path path = dir.path / "large.safetensors";
  test::write_bytes(path, test::safetensors_bytes({a, {"b.f16", "F16", {std::int64_t(n)}, test::raw_u16(half.bits)},
                                                   {"c.bf16", "BF16", {std::int64_t(n)}, test::raw_u16(brain.bits)}},
                                                  {}));
  const st::File file = st::File::open(path);
  for (const auto& [name, values] :
       std::vector<std::pair<std::string, const std::vector<float>*>>{{"a.f32", &f32}, {"b.f16", &half.values},
                                                                      {"c.bf16", &brain.values}}) {
    CAPTURE(name);
    const Tensor<float> t = file.read(name);
    REQUIRE(std::size_t(t.numel()) == n);
    std::size_t differing = 0;
    for (std::size_t k = 0; k < n; ++k) differing += !same_bits(t.data()[k], (*values)[k]);
    CHECK(differing == 0);
  }
}

TEST_CASE("safetensors: a file written by the reference implementation reads as its generator says") {
  // tests/fixtures/safetensors/reference.safetensors, from scripts/safetensors_fuzz_seeds.py:
  // written by Hugging Face's own safetensors package; element i of each tensor is i - 3.
  const st::File file = st::File::open(test::fixtures() / "safetensors" / "reference.safetensors");
  CHECK(file.metadata().at("generator") == "safetensors (Python)");
  for (const char* name : {"f32", "f16", "bf16"}) {
    const Tensor<float> t = file.read(name);
    CHECK(t.shape() == Shape{2, 3});
    for (index_t i = 0; i < t.numel(); ++i) CHECK(t.data()[i] == float(i - 3));
  }
}

TEST_CASE("safetensors: write() round-trips tensors and metadata, atomically") {
  Rng rng = test::rng_for("safetensors write");
  TempDir dir(rng);
  const fs::path path = dir.path / "candidate.safetensors";
  for (int trial = 0; trial < 3; ++trial) {  // the second and third overwrite the first
    std::vector<Tensor<float>> tensors;
    for (int i = 0; i < 4; ++i) {
      const auto e = random_extents(rng);
      std::vector<index_t> d(e.begin(), e.end());
      const Shape shape = d.empty() ? Shape{} : d.size() == 1 ? Shape{d[0]} : d.size() == 2 ? Shape{d[0], d[1]}
                                                                                            : Shape{d[0], d[1], d[2]};
      tensors.push_back(test::random_tensor<float>(shape, rng));
    }
    std::vector<std::pair<std::string, const Tensor<float>*>> named;
    for (std::size_t i = 0; i < tensors.size(); ++i) named.emplace_back("layer." + std::to_string(i), &tensors[i]);
    const std::map<std::string, std::string> metadata{{"teacher", std::to_string(rng.next_u64())}};
    st::write(path, named, metadata);

    CHECK(!fs::exists(dir.path / "candidate.safetensors.partial"));
    const std::vector<std::byte> bytes = io::detail::read_file(path);
    std::uint64_t header = 0;
    std::memcpy(&header, bytes.data(), 8);
    CHECK((8 + header) % 8 == 0);  // float data aligned
    const st::File file = st::File::parse(bytes, "candidate");
    CHECK(file.metadata() == metadata);
    for (const auto& [name, tensor] : named) {
      CHECK(file.find(name)->dtype == "F32");
      CHECK(same_bits(file.read(name), *tensor));
    }
  }
  const Tensor<float> t(Shape{2}, 1.0f);
  const std::string twice = error_of([&] { st::write(path, {{"x", &t}, {"x", &t}}); });
  CHECK((contains(twice, "\"x\"") && contains(twice, "twice")));
  CHECK(st::File::open(path).metadata().count("teacher") == 1);  // the failed write left the file as it was
  const std::string unwritable = error_of([&] { st::write(dir.path / "no_such_dir" / "x.safetensors", {{"x", &t}}); });
  CHECK(contains(unwritable, "no_such_dir"));
}

TEST_CASE("safetensors: a file cut anywhere is refused, naming the section it ends in") {
  Rng rng = test::rng_for("safetensors truncation");
  const SmallFile f = small_file(rng);
  const std::vector<std::byte> bytes = test::safetensors_bytes(f.tensors, f.metadata);
  const std::size_t header_end = 8 + test::safetensors_header(f.tensors, f.metadata).size();
  REQUIRE_NOTHROW((void)st::File::parse(bytes, "whole"));
  for (std::size_t cut = 0; cut < bytes.size(); ++cut) {
    CAPTURE(cut);
    const std::string message = error_of([&] {
      (void)st::File::parse(std::vector<std::byte>(bytes.begin(), bytes.begin() + std::ptrdiff_t(cut)), "cut.safetensors");
    });
    CHECK(contains(message, "cut.safetensors: "));
    if (cut < 8) {
      CHECK(contains(message, "header length"));
    } else if (cut < header_end) {
      CHECK(contains(message, "header"));
    } else {
      // Some tensor's range now runs past the end of the data; the message names one that does.
      bool names_one = false;
      std::size_t end = header_end;
      for (const auto& t : f.tensors) {
        end += t.data.size();
        if (end > cut && contains(message, "\"" + t.name + "\"")) names_one = true;
      }
      CHECK(names_one);
      CHECK(contains(message, "data_offsets"));
    }
  }
  // One byte too many is refused too.
  std::vector<std::byte> longer = bytes;
  longer.push_back(std::byte{0});
  const std::string trailing = error_of([&] { (void)st::File::parse(longer, "long.safetensors"); });
  CHECK((contains(trailing, "long.safetensors: data") && contains(trailing, "trailing")));
}

TEST_CASE("safetensors: every malformed header is refused, naming the file and the field") {
  Rng rng = test::rng_for("safetensors malformed");
  const SmallFile f = small_file(rng);
  const std::vector<std::byte> data = test::concatenated_data(f.tensors);
  const std::uint64_t a_size = f.tensors[0].data.size(), total = data.size();
  // The valid header with one tensor's entry replaced.
  const auto with_a = [&](const nlohmann::json& entry) {
    nlohmann::ordered_json h = nlohmann::ordered_json::parse(test::safetensors_header(f.tensors));
    h["a.weight"] = entry;
    return h.dump();
  };
  const auto a_entry = [&](nlohmann::json dtype, nlohmann::json shape, nlohmann::json offsets) {
    nlohmann::json e = nlohmann::json::object();
    if (!dtype.is_null()) e["dtype"] = dtype;
    if (!shape.is_null()) e["shape"] = shape;
    if (!offsets.is_null()) e["data_offsets"] = offsets;
    return e;
  };
  const nlohmann::json n_a = {a_size / 4}, offsets_a = {0, a_size};
  struct Case {
    const char* what;
    std::vector<std::byte> bytes;
    std::vector<std::string> mentions;
  };
  const auto file_of = [&](const std::string& header) { return test::safetensors_bytes(header, data); };
  std::vector<Case> cases{
      {"invalid JSON", file_of("{\"a.weight\": {"), {"header", "invalid JSON"}},
      {"not an object", file_of("[1, 2, 3]"), {"header", "expected a JSON object"}},
      {"a string", file_of("\"text\""), {"header"}},
      {"invalid UTF-8", file_of("{\"a\xff\": 1}"), {"header", "invalid JSON"}},
      {"nested deeply", file_of(std::string(100, '[') + std::string(100, ']')), {"header", "nested deeper"}},
      {"entry not an object", file_of(with_a(nlohmann::json::array({1, 2}))), {"\"a.weight\"", "entry"}},
      {"dtype missing", file_of(with_a(a_entry(nullptr, n_a, offsets_a))), {"\"a.weight\"", "dtype: missing"}},
      {"dtype unknown", file_of(with_a(a_entry("F17", n_a, offsets_a))), {"\"a.weight\"", "dtype", "F17"}},
      {"dtype a number", file_of(with_a(a_entry(32, n_a, offsets_a))), {"\"a.weight\"", "dtype"}},
      {"shape missing", file_of(with_a(a_entry("F32", nullptr, offsets_a))), {"\"a.weight\"", "shape: missing"}},
      {"shape negative", file_of(with_a(a_entry("F32", {-1}, offsets_a))), {"\"a.weight\"", "shape", "-1"}},
      {"shape fractional", file_of(with_a(a_entry("F32", {1.5}, offsets_a))), {"\"a.weight\"", "shape"}},
      {"shape overflowing", file_of(with_a(a_entry("F32", {1ull << 40, 1ull << 40, 0}, offsets_a))),
       {"\"a.weight\"", "shape", "64 bits"}},
      {"shape too large for int64", file_of(with_a(a_entry("U8", {~0ull}, offsets_a))), {"\"a.weight\"", "shape"}},
      {"shape a string", file_of(with_a(a_entry("F32", "[2]", offsets_a))), {"\"a.weight\"", "shape"}},
      {"offsets missing", file_of(with_a(a_entry("F32", n_a, nullptr))), {"\"a.weight\"", "data_offsets: missing"}},
      {"offsets of three", file_of(with_a(a_entry("F32", n_a, {0, a_size, a_size}))), {"\"a.weight\"", "data_offsets"}},
      {"offsets negative", file_of(with_a(a_entry("F32", n_a, {-4, a_size}))), {"\"a.weight\"", "data_offsets"}},
      {"offsets reversed", file_of(with_a(a_entry("F32", n_a, {a_size, 0}))), {"\"a.weight\"", "begin <= end"}},
      {"offsets past the data", file_of(with_a(a_entry("F32", n_a, {total, total + a_size}))),
       {"\"a.weight\"", "data_offsets", std::to_string(total)}},
      {"size mismatch", file_of(with_a(a_entry("F32", {a_size / 4 + 1}, offsets_a))),
       {"\"a.weight\"", "data_offsets", "expected " + std::to_string(a_size + 4)}},
      {"F16 size for F32 data", file_of(with_a(a_entry("F16", n_a, offsets_a))), {"\"a.weight\"", "F16"}},
      {"sub-byte size", file_of(with_a(a_entry("F4", {3}, {0, 2}))), {"\"a.weight\"", "whole number of bytes"}},
      {"overlap", file_of(with_a(a_entry("F32", {a_size / 4 + 1}, {0, a_size + 4}))),
       {"\"b.half\"", "overlap tensor \"a.weight\""}},
      {"gap", file_of(with_a(a_entry("U8", {a_size - 4}, {4, a_size}))), {"\"a.weight\"", "without gaps"}},
      {"duplicate names", file_of("{\"x\": 1, \"x\": 2}"), {"header", "\"x\"", "twice"}},
      {"metadata not an object", file_of(R"({"__metadata__": [1]})"), {"__metadata__"}},
      {"metadata value a number", file_of(R"({"__metadata__": {"epoch": 3}})"), {"__metadata__", "\"epoch\""}},
  };
  std::vector<std::byte> huge_length(16, std::byte{0xff});
  cases.push_back({"header length absurd", huge_length, {"header length", "at most"}});
  std::vector<std::byte> past_end = file_of("{}");
  past_end[0] = std::byte{200};
  cases.push_back({"header length past the end", past_end, {"header needs 200 bytes"}});

  for (const Case& c : cases) {
    CAPTURE(c.what);
    const std::string message = error_of([&] { (void)st::File::parse(c.bytes, "bad.safetensors"); });
    CHECK(message.starts_with("bad.safetensors: "));
    for (const std::string& m : c.mentions) {
      CAPTURE(m);
      CAPTURE(message);
      CHECK(contains(message, m));
    }
  }

  // Valid files with unusual but legal contents.
  CHECK(st::File::parse(test::safetensors_bytes("{}", {}), "empty").tensors().empty());
  CHECK_NOTHROW((void)st::File::parse(test::safetensors_bytes("{}  \n", {}), "padded"));
  const std::vector<test::RawTensor> rank7{{"r7", "F32", {1, 1, 1, 1, 1, 1, 1}, std::vector<std::byte>(4)}};
  const st::File deep = st::File::parse(test::safetensors_bytes(rank7), "rank7");
  const std::string rank = error_of([&] { (void)deep.read("r7"); });
  CHECK((contains(rank, "r7") && contains(rank, "rank 7")));
}

// ---------------------------------------------------------------------------------------------
// Hugging Face model folders.

namespace {

struct HfModel {
  model::Config config;
  nlohmann::json config_json;
  std::map<std::string, Tensor<float>> tensors;  // HF name → values
  std::map<std::string, std::string> dtypes;     // HF name → stored dtype
};

// A tiny random model in Hugging Face's layout. Some tensors are stored as BF16 (with values
// that BF16 represents exactly), so that the folder mixes storage types as real ones do.
HfModel random_hf_model(Rng& rng, const std::string& type, bool tied) {
  HfModel m;
  model::Config& c = m.config;
  c.architecture = type;
  c.n_layers = 1 + int(rng.below(3));
  c.n_kv_heads = 1 + int(rng.below(2));
  c.n_heads = c.n_kv_heads * (1 + int(rng.below(3)));
  c.d_head = 2 * (1 + int(rng.below(3)));
  c.d_model = 4 + int(rng.below(9));  // need not be n_heads · d_head: head_dim is explicit
  c.d_ff = 3 + int(rng.below(9));
  c.vocab_size = 5 + int(rng.below(20));
  c.context_length = 64 << rng.below(4);
  c.rms_eps = rng.below(2) ? 1e-5 : 1e-6;
  c.rope = RopeConfig{RopeConfig::Style::half, rng.below(2) ? 10000.0 : 1e6};
  c.qkv_bias = type == "qwen2";
  c.tied_embeddings = tied;
  c.sliding_window = type == "mistral" ? 4096 : 0;
  m.config_json = {{"model_type", type},
                   {"architectures", {type == "qwen2" ? "Qwen2ForCausalLM" : "LlamaForCausalLM"}},
                   {"hidden_size", c.d_model},
                   {"num_hidden_layers", c.n_layers},
                   {"num_attention_heads", c.n_heads},
                   {"num_key_value_heads", c.n_kv_heads},
                   {"head_dim", c.d_head},
                   {"intermediate_size", c.d_ff},
                   {"vocab_size", c.vocab_size},
                   {"max_position_embeddings", c.context_length},
                   {"rms_norm_eps", c.rms_eps},
                   {"rope_theta", c.rope.theta},
                   {"rope_scaling", nullptr},
                   {"hidden_act", "silu"},
                   {"tie_word_embeddings", tied},
                   {"torch_dtype", "bfloat16"}};
  if (type == "qwen2") m.config_json["use_sliding_window"] = false, m.config_json["sliding_window"] = 32768;
  const auto add = [&](const std::string& name, Shape shape) {
    Tensor<float> t = test::random_tensor<float>(shape, rng);
    const bool brain = rng.below(3) == 0;
    if (brain)  // keep the top 16 bits: exactly representable in BF16
      for (float& x : t.flat()) x = std::bit_cast<float>(std::bit_cast<std::uint32_t>(x) & 0xffff0000u);
    m.dtypes[name] = brain ? "BF16" : "F32";
    m.tensors.emplace(name, std::move(t));
  };
  const int q = c.n_heads * c.d_head, kv = c.n_kv_heads * c.d_head;
  add("model.embed_tokens.weight", Shape{c.vocab_size, c.d_model});
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", Shape{c.d_model});
    add(p + "self_attn.q_proj.weight", Shape{q, c.d_model});
    add(p + "self_attn.k_proj.weight", Shape{kv, c.d_model});
    add(p + "self_attn.v_proj.weight", Shape{kv, c.d_model});
    add(p + "self_attn.o_proj.weight", Shape{c.d_model, q});
    if (c.qkv_bias) {
      add(p + "self_attn.q_proj.bias", Shape{q});
      add(p + "self_attn.k_proj.bias", Shape{kv});
      add(p + "self_attn.v_proj.bias", Shape{kv});
    }
    add(p + "post_attention_layernorm.weight", Shape{c.d_model});
    add(p + "mlp.gate_proj.weight", Shape{c.d_ff, c.d_model});
    add(p + "mlp.up_proj.weight", Shape{c.d_ff, c.d_model});
    add(p + "mlp.down_proj.weight", Shape{c.d_model, c.d_ff});
  }
  add("model.norm.weight", Shape{c.d_model});
  if (!tied) add("lm_head.weight", Shape{c.vocab_size, c.d_model});
  return m;
}

// The tensor's bytes as `dtype` says: F32 as is (I32 too, to test refusal), BF16 the top halves.
test::RawTensor stored(const std::string& name, const Tensor<float>& t, const std::string& dtype) {
  if (dtype != "BF16") {
    test::RawTensor raw = test::raw_f32(name, t);
    raw.dtype = dtype;
    return raw;
  }
  std::vector<std::uint16_t> bits;
  for (float x : t.flat()) bits.push_back(std::uint16_t(std::bit_cast<std::uint32_t>(x) >> 16));
  return {name, "BF16", test::extents(t.shape()), test::raw_u16(bits)};
}

// Writes the model as config.json and model.safetensors, or as `shards` shards with an index.
void write_hf_folder(const HfModel& m, const fs::path& dir, int shards = 1) {
  fs::create_directories(dir);
  test::write_text(dir / "config.json", m.config_json.dump(2));
  std::vector<std::vector<test::RawTensor>> parts(static_cast<std::size_t>(shards));
  nlohmann::json weight_map = nlohmann::json::object();
  std::size_t i = 0;
  for (const auto& [name, t] : m.tensors) {
    const std::size_t part = i++ % std::size_t(shards);
    parts[part].push_back(stored(name, t, m.dtypes.at(name)));
    weight_map[name] = "model-0000" + std::to_string(part + 1) + "-of-0000" + std::to_string(shards) + ".safetensors";
  }
  if (shards == 1) {
    test::write_bytes(dir / "model.safetensors", test::safetensors_bytes(parts[0], {{"format", "pt"}}));
    return;
  }
  for (std::size_t p = 0; p < parts.size(); ++p)
    test::write_bytes(dir / weight_map[parts[p].front().name].get<std::string>(), test::safetensors_bytes(parts[p]));
  test::write_text(dir / "model.safetensors.index.json",
                   nlohmann::json{{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}}.dump(2));
}

// The checkpoint holds exactly the model's tensors, each where dash's layout puts it.
void check_equal(const io::Checkpoint& ck, const HfModel& m) {
  const model::Config& c = m.config;
  CHECK(ck.format == "safetensors");
  CHECK(ck.config.architecture == c.architecture);
  CHECK(ck.config.n_layers == c.n_layers);
  CHECK(ck.config.d_model == c.d_model);
  CHECK(ck.config.n_heads == c.n_heads);
  CHECK(ck.config.n_kv_heads == c.n_kv_heads);
  CHECK(ck.config.d_head == c.d_head);
  CHECK(ck.config.d_ff == c.d_ff);
  CHECK(ck.config.vocab_size == c.vocab_size);
  CHECK(ck.config.context_length == c.context_length);
  CHECK(ck.config.rms_eps == c.rms_eps);
  CHECK(ck.config.rope.style == RopeConfig::Style::half);
  CHECK(ck.config.rope.theta == c.rope.theta);
  CHECK(ck.config.qkv_bias == c.qkv_bias);
  CHECK(ck.config.tied_embeddings == c.tied_embeddings);
  CHECK(ck.config.sliding_window == c.sliding_window);
  const auto& w = ck.weights;
  const auto is = [&](const Tensor<float>& t, const std::string& name) {
    CAPTURE(name);
    CHECK(same_bits(t, m.tensors.at(name)));
  };
  is(w.embedding, "model.embed_tokens.weight");
  REQUIRE(int(w.layers.size()) == c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const auto& L = w.layers[std::size_t(l)];
    is(L.attn_norm, p + "input_layernorm.weight");
    is(L.attention.wq, p + "self_attn.q_proj.weight");
    is(L.attention.wk, p + "self_attn.k_proj.weight");
    is(L.attention.wv, p + "self_attn.v_proj.weight");
    is(L.attention.wo, p + "self_attn.o_proj.weight");
    if (c.qkv_bias) {
      is(L.attention.bq, p + "self_attn.q_proj.bias");
      is(L.attention.bk, p + "self_attn.k_proj.bias");
      is(L.attention.bv, p + "self_attn.v_proj.bias");
    } else {
      CHECK((L.attention.bq.empty() && L.attention.bk.empty() && L.attention.bv.empty()));
    }
    is(L.mlp_norm, p + "post_attention_layernorm.weight");
    is(L.w_gate, p + "mlp.gate_proj.weight");
    is(L.w_up, p + "mlp.up_proj.weight");
    is(L.w_down, p + "mlp.down_proj.weight");
  }
  is(w.final_norm, "model.norm.weight");
  if (c.tied_embeddings)
    CHECK(w.lm_head.empty());
  else
    is(w.lm_head, "lm_head.weight");
  std::map<std::string, int> storage;
  for (const auto& [name, dtype] : m.dtypes) ++storage[dtype];
  CHECK(ck.storage_types == storage);
}

}  // namespace

TEST_CASE("safetensors: random Llama, Mistral and Qwen2 folders, tied and untied, read back as written") {
  Rng rng = test::rng_for("hf folders");
  TempDir tmp(rng);
  int folder = 0;
  for (const char* type : {"llama", "mistral", "qwen2"}) {
    for (bool tied : {true, false}) {
      for (int shards : {1, 3}) {
        CAPTURE(type);
        CAPTURE(tied);
        CAPTURE(shards);
        const HfModel m = random_hf_model(rng, type, tied);
        const fs::path dir = tmp.path / ("model" + std::to_string(folder++));
        write_hf_folder(m, dir, shards);
        const io::Checkpoint ck = io::read_safetensors(dir);
        check_equal(ck, m);
        CHECK(ck.name == dir.filename().string());
        CHECK(ck.path == dir.string());
        // The same through the weights file's own path.
        const fs::path file = shards == 1 ? dir / "model.safetensors" : dir / "model.safetensors.index.json";
        check_equal(io::read_safetensors(file), m);
      }
    }
  }
}

TEST_CASE("safetensors: a tied checkpoint may also store lm_head, and old exports rotary caches") {
  Rng rng = test::rng_for("hf ignorable");
  TempDir tmp(rng);
  HfModel m = random_hf_model(rng, "llama", true);
  const Tensor<float> head = clone(m.tensors.at("model.embed_tokens.weight").view());
  m.tensors.emplace("lm_head.weight", head);
  m.tensors.emplace("model.layers.0.self_attn.rotary_emb.inv_freq", Tensor<float>(Shape{m.config.d_head / 2}, 1.0f));
  m.dtypes["lm_head.weight"] = m.dtypes["model.layers.0.self_attn.rotary_emb.inv_freq"] = "F32";
  write_hf_folder(m, tmp.path);
  const io::Checkpoint ck = io::read_safetensors(tmp.path);
  CHECK(ck.weights.lm_head.empty());
  CHECK(same_bits(ck.weights.embedding, head));
}

TEST_CASE("safetensors: a folder that does not match its config is refused, naming the tensor") {
  Rng rng = test::rng_for("hf mismatches");
  TempDir tmp(rng);
  int folder = 0;
  // Returns the message of reading the model after `change` altered it.
  const auto after = [&](const char* type, bool tied, const std::function<void(HfModel&)>& change, int shards = 1) {
    HfModel m = random_hf_model(rng, type, tied);
    change(m);
    const fs::path dir = tmp.path / ("bad" + std::to_string(folder++));
    write_hf_folder(m, dir, shards);
    return error_of([&] { (void)io::read_safetensors(dir); });
  };
  std::string message = after("llama", true, [](HfModel& m) { m.tensors.erase("model.layers.0.mlp.up_proj.weight"); });
  CHECK((contains(message, "model.safetensors") && contains(message, "\"model.layers.0.mlp.up_proj.weight\": missing")));
  message = after("llama", false, [](HfModel& m) { m.tensors.erase("lm_head.weight"); });
  CHECK(contains(message, "\"lm_head.weight\": missing"));
  message = after("qwen2", true, [](HfModel& m) { m.tensors.erase("model.layers.0.self_attn.k_proj.bias"); });
  CHECK(contains(message, "\"model.layers.0.self_attn.k_proj.bias\": missing"));
  message = after("llama", true, [](HfModel& m) {
    m.tensors.emplace("model.layers.0.self_attn.q_proj.bias", Tensor<float>(Shape{m.config.n_heads * m.config.d_head}));
    m.dtypes["model.layers.0.self_attn.q_proj.bias"] = "F32";
  });
  CHECK((contains(message, "\"model.layers.0.self_attn.q_proj.bias\"") && contains(message, "not part of")));
  message = after("mistral", true, [](HfModel& m) {
    Tensor<float>& t = m.tensors.at("model.norm.weight");
    t = Tensor<float>(Shape{t.numel() + 1});
  });
  CHECK((contains(message, "\"model.norm.weight\": shape") && contains(message, "expected [")));
  message = after("llama", true, [](HfModel& m) { m.dtypes.at("model.norm.weight") = "I32"; });
  CHECK((contains(message, "\"model.norm.weight\": dtype I32") && contains(message, "expected F32, F16 or BF16")));

  // Sharded: a shard missing, a tensor absent from the shard the index names, a tensor absent
  // from the index.
  HfModel m = random_hf_model(rng, "llama", true);
  fs::path dir = tmp.path / "sharded";
  write_hf_folder(m, dir, 2);
  fs::remove(dir / "model-00002-of-00002.safetensors");
  message = error_of([&] { (void)io::read_safetensors(dir); });
  CHECK((contains(message, "model-00002-of-00002.safetensors") && contains(message, "does not exist") &&
         contains(message, "model.safetensors.index.json: tensor \"")));

  dir = tmp.path / "misplaced";
  write_hf_folder(m, dir, 2);
  nlohmann::json index = nlohmann::json::parse(test::read_text(dir / "model.safetensors.index.json"));
  std::string moved = "model.norm.weight";
  const std::string home = index["weight_map"][moved];
  index["weight_map"][moved] = home == "model-00001-of-00002.safetensors" ? "model-00002-of-00002.safetensors"
                                                                           : "model-00001-of-00002.safetensors";
  test::write_text(dir / "model.safetensors.index.json", index.dump());
  message = error_of([&] { (void)io::read_safetensors(dir); });
  CHECK((contains(message, index["weight_map"][moved].get<std::string>() + ": tensor \"model.norm.weight\": missing") &&
         contains(message, "model.safetensors.index.json places it")));

  index["weight_map"].erase(moved);
  test::write_text(dir / "model.safetensors.index.json", index.dump());
  message = error_of([&] { (void)io::read_safetensors(dir); });
  CHECK(contains(message, "weight_map: tensor \"model.norm.weight\": missing"));

  index["weight_map"][moved] = "../elsewhere.safetensors";
  test::write_text(dir / "model.safetensors.index.json", index.dump());
  message = error_of([&] { (void)io::read_safetensors(dir); });
  CHECK((contains(message, "\"model.norm.weight\"") && contains(message, "same folder")));

  // No config.json, no weights.
  fs::create_directories(tmp.path / "empty");
  CHECK(contains(error_of([&] { (void)io::read_safetensors(tmp.path / "empty"); }), "config.json: not found"));
  write_hf_folder(m, tmp.path / "weightless");
  fs::remove(tmp.path / "weightless" / "model.safetensors");
  CHECK(contains(error_of([&] { (void)io::read_safetensors(tmp.path / "weightless"); }), "neither model.safetensors"));
}

// ---------------------------------------------------------------------------------------------
// config.json

namespace {

nlohmann::json smollm2_config() {
  // SmolLM2-135M-Instruct's config.json, the fields that matter here.
  return nlohmann::json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
    "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "is_llama_config": true,
    "max_position_embeddings": 8192, "mlp_bias": false, "model_type": "llama", "num_attention_heads": 9,
    "num_hidden_layers": 30, "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_interleaved": false, "rope_scaling": null, "rope_theta": 100000,
    "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.42.3",
    "use_cache": true, "vocab_size": 49152})");
}

model::Config config_of(const nlohmann::json& j) { return io::read_hf_config(j.dump(), "config.json"); }

}  // namespace

TEST_CASE("config.json: SmolLM2's config and the defaults of transformers") {
  const model::Config c = config_of(smollm2_config());
  CHECK(c.architecture == "llama");
  CHECK(c.n_layers == 30);
  CHECK(c.d_model == 576);
  CHECK(c.n_heads == 9);
  CHECK(c.n_kv_heads == 3);
  CHECK(c.d_head == 64);
  CHECK(c.d_ff == 1536);
  CHECK(c.vocab_size == 49152);
  CHECK(c.context_length == 8192);
  CHECK(c.rms_eps == 1e-5);
  CHECK(c.rope.style == RopeConfig::Style::half);
  CHECK(c.rope.theta == 100000.0);
  CHECK(c.tied_embeddings);
  CHECK(!c.qkv_bias);
  CHECK(c.sliding_window == 0);

  nlohmann::json j = smollm2_config();
  for (const char* key : {"num_key_value_heads", "rope_theta", "tie_word_embeddings", "attention_bias", "mlp_bias",
                          "hidden_act", "rope_scaling"})
    j.erase(key);
  const model::Config d = config_of(j);
  CHECK(d.n_kv_heads == 9);          // llama: as many KV heads as query heads
  CHECK(d.rope.theta == 10000.0);
  CHECK(!d.tied_embeddings);         // transformers' LlamaConfig: tie_word_embeddings=False
  j["head_dim"] = nullptr;           // null is "the default" too
  CHECK(config_of(j).d_head == 64);
  j["head_dim"] = 32;
  CHECK(config_of(j).d_head == 32);

  // transformers ≥ 5 keeps θ in rope_parameters.
  j = smollm2_config();
  j.erase("rope_theta");
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 500000.0}};
  CHECK(config_of(j).rope.theta == 500000.0);

  // Mistral: a window of 4096 unless null; Qwen2: biases, and a window only with use_sliding_window.
  j = smollm2_config();
  j["model_type"] = "mistral";
  CHECK(config_of(j).sliding_window == 4096);
  j["sliding_window"] = nullptr;
  CHECK(config_of(j).sliding_window == 0);
  j["sliding_window"] = 1024;
  CHECK(config_of(j).sliding_window == 1024);
  j["model_type"] = "qwen2";
  CHECK(config_of(j).qkv_bias);
  CHECK(config_of(j).sliding_window == 0);
  j["use_sliding_window"] = true;
  j["max_window_layers"] = 0;
  CHECK(config_of(j).sliding_window == 1024);
  j["max_window_layers"] = 30;
  CHECK(config_of(j).sliding_window == 0);
}

TEST_CASE("config.json: what dash cannot load exactly is refused, naming the key") {
  struct Case {
    const char* key;
    nlohmann::json value;  // null: remove the key
    std::vector<std::string> mentions;
  };
  const std::vector<Case> cases{
      {"model_type", "gpt2", {"model_type", "gpt2", "llama, mistral or qwen2"}},
      {"model_type", nullptr, {"model_type: missing"}},
      {"hidden_size", nullptr, {"hidden_size: missing"}},
      {"hidden_size", "576", {"hidden_size", "\"576\"", "integer"}},
      {"hidden_size", 576.5, {"hidden_size", "integer"}},
      {"hidden_size", -576, {"hidden_size", "-576"}},
      {"num_hidden_layers", 0, {"num_hidden_layers", "[1, "}},
      {"num_attention_heads", 1ull << 63, {"num_attention_heads"}},
      {"num_key_value_heads", 2, {"num_key_value_heads", "divide"}},
      {"intermediate_size", nullptr, {"intermediate_size: missing"}},
      {"vocab_size", true, {"vocab_size"}},
      {"max_position_embeddings", nullptr, {"max_position_embeddings: missing"}},
      {"rms_norm_eps", nullptr, {"rms_norm_eps: missing"}},
      {"rms_norm_eps", "1e-5", {"rms_norm_eps", "number"}},
      {"rms_norm_eps", 0, {"rms_norm_eps", "(0, 1)"}},
      {"rope_theta", -1, {"rope_theta"}},
      {"rope_scaling", {{"type", "linear"}, {"factor", 2.0}}, {"rope_scaling", "linear", "not implemented"}},
      {"rope_scaling", {{"rope_type", "llama3"}, {"factor", 32.0}}, {"rope_scaling", "llama3"}},
      {"rope_scaling", "yes", {"rope_scaling", "object"}},
      {"partial_rotary_factor", 0.5, {"partial_rotary_factor"}},
      {"tie_word_embeddings", "true", {"tie_word_embeddings", "true or false"}},
      {"attention_bias", true, {"attention_bias", "o_proj"}},
      {"mlp_bias", true, {"mlp_bias"}},
      {"hidden_act", "gelu", {"hidden_act", "gelu"}},
      {"head_dim", 63, {"head_dim", "even"}},
  };
  for (const Case& c : cases) {
    CAPTURE(c.key);
    nlohmann::json j = smollm2_config();
    if (c.value.is_null())
      j.erase(c.key);
    else
      j[c.key] = c.value;
    const std::string message = error_of([&] { (void)config_of(j); });
    CHECK(message.starts_with("config.json: "));
    for (const std::string& m : c.mentions) {
      CAPTURE(message);
      CHECK(contains(message, m));
    }
  }
  // Mistral and Qwen2 have no derived KV head default; Qwen2 windows on some layers only.
  nlohmann::json j = smollm2_config();
  j["model_type"] = "mistral";
  j.erase("num_key_value_heads");
  CHECK(contains(error_of([&] { (void)config_of(j); }), "num_key_value_heads: missing"));
  j = smollm2_config();
  j["model_type"] = "qwen2";
  j["use_sliding_window"] = true;
  j["max_window_layers"] = 10;
  CHECK(contains(error_of([&] { (void)config_of(j); }), "20 of 30 layers slide"));
  // Not JSON, not an object, a repeated key.
  CHECK(contains(error_of([] { (void)io::read_hf_config("{\"a\":", "c.json"); }), "c.json: text: invalid JSON"));
  CHECK(contains(error_of([] { (void)io::read_hf_config("[]", "c.json"); }), "c.json: text: [], expected a JSON object"));
  CHECK(contains(error_of([] { (void)io::read_hf_config(R"({"model_type": "llama", "model_type": "qwen2"})", "c.json"); }),
                 "\"model_type\" appears twice"));
}

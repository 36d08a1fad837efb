#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "dash/io/load.hpp"
#include "dash/io/tokenizer.hpp"
#include "support/errors.hpp"
#include "support/models.hpp"
#include "support/random.hpp"

using namespace dash;
using io::Tokenizer;
using Json = nlohmann::json;
namespace fs = std::filesystem;

using test::contains;
using test::error_of;

namespace {

fs::path tokenizer_fixtures() { return test::fixtures() / "tokenizer"; }

Json read_json(const fs::path& path) {
  std::ifstream in(path);
  REQUIRE_MESSAGE(bool(in), "cannot open ", path.string());
  return Json::parse(in);
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE_MESSAGE(bool(in), "cannot open ", path.string());
  return std::string(std::istreambuf_iterator<char>(in), {});
}

const char* const styles[] = {"gpt2", "smollm", "llama3", "qwen2"};

// Random text drawn from many scripts and kinds of whitespace and digits, with literal tokens
// now and then: valid UTF-8 unless `bytes` is set, in which case any bytes at all.
std::string random_text(Rng& rng, std::size_t length, bool bytes = false) {
  std::string out;
  if (bytes) {
    for (std::size_t i = 0; i < length; ++i) out += static_cast<char>(rng.below(256));
    return out;
  }
  static const std::pair<char32_t, char32_t> ranges[] = {
      {0x20, 0x7E},       {0x09, 0x0D},       {0x30, 0x39},       {0xA0, 0xFF},       {0x100, 0x24F},
      {0x370, 0x3FF},     {0x400, 0x4FF},     {0x300, 0x36F},     {0x600, 0x6FF},     {0x900, 0x97F},
      {0x4E00, 0x9FFF},   {0xAC00, 0xD7A3},   {0x1F300, 0x1FAFF}, {0x2000, 0x206F},   {0xFF10, 0xFF19},
      {0x85, 0x85},       {0x180E, 0x180E},   {0x3000, 0x3000},   {0x1, 0x10FFFF},
  };
  static const char* const literals[] = {"<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|", "'s", "'LL"};
  while (out.size() < length) {
    if (rng.below(40) == 0) {
      out += literals[rng.below(std::size(literals))];
      continue;
    }
    const auto& [lo, hi] = ranges[rng.below(std::size(ranges))];
    char32_t cp = char32_t(lo + rng.below(hi - lo + 1));
    if (cp >= 0xD800 && cp <= 0xDFFF) cp = 'x';
    const std::size_t repeat = rng.below(8) == 0 ? 1 + rng.below(6) : 1;  // runs of spaces, digits, ...
    for (std::size_t r = 0; r < repeat; ++r) io::detail::append_utf8(out, cp);
  }
  return out;
}

// The bytes a tokenizer drops, having no symbol for them.
std::array<bool, 256> dropped_bytes(const Tokenizer& tok) {
  std::array<bool, 256> dropped;
  for (int b = 0; b < 256; ++b) dropped[b] = tok.encode(std::string(1, char(b)), false).empty();
  return dropped;
}

std::string without(const std::string& text, const std::array<bool, 256>& dropped) {
  std::string out;
  for (char c : text)
    if (!dropped[static_cast<unsigned char>(c)]) out += c;
  return out;
}

void check_round_trips(const Tokenizer& tok, Rng& rng, int count, bool bytes) {
  const std::array<bool, 256> dropped = dropped_bytes(tok);
  for (int i = 0; i < count; ++i) {
    const std::string text = random_text(rng, 1 + rng.below(300), bytes);
    const std::vector<int> ids = tok.encode(text, false);
    CHECK(tok.decode(ids) == without(text, dropped));
    std::string streamed;
    for (std::size_t k = 0; k < ids.size(); ++k) streamed += tok.decode_piece(k ? ids[k - 1] : -1, ids[k]);
    CHECK(streamed == tok.decode(ids));
  }
}

Tokenizer tiny(const std::string& style) {
  return Tokenizer::from_tokenizer_json(tokenizer_fixtures() / ("tiny_" + style + ".tokenizer.json"));
}

// The GGUF form of a tokenizer.json: tokens by id, merges as "a b", added tokens as control.
io::ByteLevelBpeSpec spec_of(const Json& definition, const std::string& pre) {
  io::ByteLevelBpeSpec spec;
  spec.tokens.resize(definition["model"]["vocab"].size());
  for (const auto& [text, id] : definition["model"]["vocab"].items()) spec.tokens.at(id.get<int>()) = text;
  spec.token_types.assign(spec.tokens.size(), 1);
  for (const Json& added : definition["added_tokens"]) spec.token_types.at(added["id"].get<int>()) = 3;
  for (const Json& merge : definition["model"]["merges"])
    spec.merges.push_back(merge.is_string() ? merge.get<std::string>()
                                            : merge[0].get<std::string>() + " " + merge[1].get<std::string>());
  spec.pre = pre;
  return spec;
}

// A tokenizer.json of the SmolLM2 GGUF's vocabulary with the given pre_tokenizer.
std::string smollm2_json(const io::gguf::File& file, const Json& pre_tokenizer) {
  const auto tokens = file.strings("tokenizer.ggml.tokens");
  const auto types = file.integers("tokenizer.ggml.token_type");
  Json vocab = Json::object(), added = Json::array();
  for (std::size_t id = 0; id < tokens.size(); ++id) {
    vocab[tokens[id]] = id;
    if (types[id] == 3) added.push_back({{"id", id}, {"content", tokens[id]}, {"special", true}});
  }
  return Json{{"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", file.strings("tokenizer.ggml.merges")}}},
              {"added_tokens", added},
              {"pre_tokenizer", pre_tokenizer},
              {"decoder", {{"type", "ByteLevel"}}}}
      .dump();
}

}  // namespace

TEST_CASE("tokenizer: SmolLM2 from the GGUF gives the reference ids") {
  const auto path = test::smollm2_gguf();
  if (!path) {
    MESSAGE("SmolLM2 GGUF not found under models/: its tokenizer checks are skipped");
    return;
  }
  const io::gguf::File file = io::gguf::File::open(*path);
  const Tokenizer tok = io::tokenizer_from_gguf(file);
  CHECK(tok.vocab_size() == 49152);
  CHECK(tok.bos() == 1);
  CHECK(tok.eos() == 2);
  CHECK(!tok.add_bos());
  CHECK(tok.description() == "byte-level BPE, 49152 tokens, 48900 merges, pre-tokenizer smollm");

  const Json reference = read_json(tokenizer_fixtures() / "smollm2_ids.json");
  REQUIRE(reference["cases"].size() >= 50);
  int differing = 0;
  for (const Json& c : reference["cases"]) {
    const std::string text = c["text"];
    INFO("text: ", text);
    // llama.cpp's smollm pre-tokenizer, where it differs from what transformers builds.
    const bool differs = c.contains("ids_smollm_pre");
    differing += differs;
    const auto expected = (differs ? c["ids_smollm_pre"] : c["ids"]).get<std::vector<int>>();
    const std::vector<int> ids = tok.encode(text, false);
    CHECK(ids == expected);
    CHECK(tok.decode(ids) == text);
    std::vector<int> with_bos{tok.bos()};
    with_bos.insert(with_bos.end(), expected.begin(), expected.end());
    CHECK(tok.encode(text, true) == with_bos);
  }
  CHECK(differing < 5);

  // The same vocabulary under transformers' own pre-tokenizer reproduces transformers exactly,
  // and under SmolLM2's (Digits, then ByteLevel) reproduces the smollm ids.
  const Tokenizer as_transformers =
      Tokenizer::from_tokenizer_json(smollm2_json(file, reference["transformers_pre_tokenizer"]), "smollm2-transformers.json");
  const Tokenizer as_smollm =
      Tokenizer::from_tokenizer_json(smollm2_json(file, reference["smollm_pre_tokenizer"]), "smollm2-smollm.json");
  CHECK(as_smollm.description() == "byte-level BPE, 49152 tokens, 48900 merges, pre-tokenizer digits + gpt2");
  for (const Json& c : reference["cases"]) {
    const std::string text = c["text"];
    INFO("text: ", text);
    CHECK(as_transformers.encode(text, false) == c["ids"].get<std::vector<int>>());
    CHECK(as_smollm.encode(text, false) == tok.encode(text, false));
  }
}

TEST_CASE("tokenizer: SmolLM2 decodes what it encodes, for any UTF-8 and any bytes") {
  const auto path = test::smollm2_gguf();
  if (!path) {
    MESSAGE("SmolLM2 GGUF not found under models/: its round-trip checks are skipped");
    return;
  }
  const Tokenizer tok = io::tokenizer_from_gguf(io::gguf::File::open(*path));
  Rng rng = test::rng_for("tokenizer smollm2 round trip");
  check_round_trips(tok, rng, 200, false);
  check_round_trips(tok, rng, 100, true);
  // The vocabulary has a symbol for every byte that occurs in UTF-8 text but six control
  // characters; the others it lacks (0xC0, 0xC1, 0xF5..0xFF) never occur in UTF-8.
  const std::array<bool, 256> dropped = dropped_bytes(tok);
  CHECK(std::count(dropped.begin(), dropped.end(), true) == 21);
}

TEST_CASE("tokenizer: SmolLM2 encodes a megabyte of text in well under a second") {
  const auto path = test::smollm2_gguf();
  if (!path) {
    MESSAGE("SmolLM2 GGUF not found under models/: the speed check is skipped");
    return;
  }
  const Tokenizer tok = io::tokenizer_from_gguf(io::gguf::File::open(*path));
  // Prose with fresh numbers and names, so that the per-call word cache is not all hits.
  Rng rng = test::rng_for("tokenizer smollm2 speed");
  const Json reference = read_json(tokenizer_fixtures() / "smollm2_ids.json");
  std::string text;
  while (text.size() < (1 << 20)) {
    text += reference["cases"][rng.below(reference["cases"].size())]["text"].get<std::string>();
    text += " " + std::to_string(rng.next_u64()) + " " + random_text(rng, 20) + "\n";
  }
  const auto start = std::chrono::steady_clock::now();
  const std::vector<int> ids = tok.encode(text, false);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  MESSAGE("SmolLM2: ", text.size(), " bytes into ", ids.size(), " tokens in ", seconds, " s");
  CHECK(tok.decode(ids) == without(text, dropped_bytes(tok)));
}

TEST_CASE("tokenizer: tiny tokenizer.json files give the ids of the tokenizers library") {
  const Json reference = read_json(tokenizer_fixtures() / "tiny_ids.json");
  for (const char* style : styles) {
    CAPTURE(style);
    const Json& r = reference["tokenizers"][style];
    const Tokenizer tok = Tokenizer::from_tokenizer_json(tokenizer_fixtures() / r["file"].get<std::string>());
    CHECK(tok.vocab_size() == 410);
    CHECK(tok.bos() == (r["bos"].is_null() ? -1 : r["bos"].get<int>()));
    CHECK(tok.add_bos() == !r["bos"].is_null());
    REQUIRE(r["cases"].size() >= 40);
    for (const Json& c : r["cases"]) {
      const std::string text = c["text"];
      INFO("text: ", text);
      const std::vector<int> ids = tok.encode(text, false);
      CHECK(ids == c["ids"].get<std::vector<int>>());
      CHECK(tok.decode(ids) == text);
    }
    // The same vocabularies as GGUF metadata, with the pre-tokenizer named as GGUF names it.
    const Tokenizer from_spec = Tokenizer::byte_level_bpe(
        spec_of(read_json(tokenizer_fixtures() / r["file"].get<std::string>()), style), "tiny.gguf");
    CHECK(contains(from_spec.description(), std::string("pre-tokenizer ") + style));
    for (const Json& c : r["cases"]) {
      INFO("text: ", c["text"].get<std::string>());
      CHECK(from_spec.encode(c["text"].get<std::string>(), false) == c["ids"].get<std::vector<int>>());
    }
  }
}

TEST_CASE("tokenizer: GGUF pre-tokenizer names cut text as the Hugging Face pre-tokenizers they stand for") {
  const Json reference = read_json(tokenizer_fixtures() / "tiny_ids.json");
  for (const char* style : styles) {
    CAPTURE(style);
    const io::detail::Pretokenizer pre = io::detail::gguf_pretokenizer(style, "test").pretokenizer;
    for (const Json& c : reference["pieces"][style]) {
      INFO("text: ", c["text"].get<std::string>());
      CHECK(pre.split(c["text"].get<std::string>()) == c["pieces"].get<std::vector<std::string>>());
    }
  }
  CHECK(io::detail::gguf_pretokenizer("llama-bpe", "test").ignore_merges);
}

TEST_CASE("tokenizer: byte-level BPE decodes what it encodes, for any UTF-8 and any bytes") {
  Rng rng = test::rng_for("tokenizer tiny round trip");
  for (const char* style : styles) {
    CAPTURE(style);
    const Tokenizer tok = tiny(style);
    check_round_trips(tok, rng, 100, false);
    check_round_trips(tok, rng, 100, true);
    for (int b = 0; b < 256; ++b) CHECK(tok.decode(tok.encode(std::string(1, char(b)), false)) == std::string(1, char(b)));
  }
}

TEST_CASE("tokenizer: literal tokens match leftmost-longest and split the text around them") {
  io::ByteLevelBpeSpec spec;
  for (int b = 0; b < 256; ++b) spec.tokens.push_back(io::detail::ByteAlphabet::instance().symbol(b));
  spec.tokens.insert(spec.tokens.end(), {"<s>", "<s>x", "ab", "<s>ab"});
  spec.token_types.assign(spec.tokens.size(), 1);
  spec.token_types[256] = 3;  // control
  spec.token_types[257] = 4;  // user-defined
  spec.merges = {"a b", "<s> ab"};
  spec.bos = 256;
  spec.add_bos = true;
  const Tokenizer tok = Tokenizer::byte_level_bpe(spec, "literal.gguf");
  const auto id = [](char c) { return int(static_cast<unsigned char>(c)); };  // ids 0..255: the bytes
  CHECK(tok.add_bos());
  CHECK(tok.encode("<s>x<s>", false) == std::vector<int>{257, 256});
  CHECK(tok.encode("ab<s>ab", true) == std::vector<int>{256, 258, 256, 258});  // no merge across <s>
  CHECK(tok.encode("<s", false) == std::vector<int>{id('<'), id('s')});
  CHECK(tok.decode(std::vector<int>{256, 257, 258}) == "<s><s>xab");
}

TEST_CASE("tokenizer: stories260K's first story gives the ids of an independent llama2.c encoder") {
  const Json reference = read_json(tokenizer_fixtures() / "stories260K_first_story_ids.json");
  const Tokenizer tok = Tokenizer::llama2c(test::fixtures() / "stories260K" / "tok512.bin", 512);
  CHECK(tok.vocab_size() == 512);
  CHECK(tok.bos() == 1);
  CHECK(tok.eos() == 2);
  CHECK(tok.add_bos());
  const std::string text = reference["text"];
  const std::vector<int> ids = tok.encode(text, true);
  CHECK(ids == reference["ids"].get<std::vector<int>>());
  CHECK(tok.decode(ids) == text);
  CHECK(tok.decode_piece(1, ids[1]) == tok.decode(std::vector<int>{ids[1]}));
  CHECK(tok.decode_piece(ids[1], ids[1]).front() == ' ');  // the space is kept except after BOS
}

namespace {

// tokenizer.bin read with nothing but the format's description.
struct Llama2cVocabulary {
  std::vector<std::string> tokens;
  std::vector<float> scores;
};

Llama2cVocabulary read_llama2c_vocabulary(const std::string& bytes, int vocab_size) {
  Llama2cVocabulary v;
  std::size_t offset = 4;
  for (int i = 0; i < vocab_size; ++i) {
    float score;
    std::int32_t length;
    std::memcpy(&score, bytes.data() + offset, 4);
    std::memcpy(&length, bytes.data() + offset + 4, 4);
    v.scores.push_back(score);
    v.tokens.push_back(bytes.substr(offset + 8, std::size_t(length)));
    offset += 8 + std::size_t(length);
  }
  return v;
}

// run.c's encoder as it is written: rescan every pair after every merge.
std::vector<int> run_c_encode(const Llama2cVocabulary& v, const std::string& text, bool bos) {
  std::map<std::string, int> ids_of;
  for (std::size_t i = 0; i < v.tokens.size(); ++i) ids_of.emplace(v.tokens[i], int(i));
  const auto lookup = [&](const std::string& s) {
    const auto it = ids_of.find(s);
    return it == ids_of.end() ? -1 : it->second;
  };
  std::vector<int> ids;
  if (bos) ids.push_back(1);
  if (!text.empty()) ids.push_back(lookup(" "));
  for (std::size_t i = 0; i < text.size();) {
    std::size_t n = 1;
    while (n < 4 && i + n < text.size() && (static_cast<unsigned char>(text[i + n]) & 0xC0) == 0x80) ++n;
    const int id = lookup(text.substr(i, n));
    if (id >= 0) {
      ids.push_back(id);
    } else {
      for (std::size_t k = 0; k < n; ++k) ids.push_back(static_cast<unsigned char>(text[i + k]) + 3);
    }
    i += n;
  }
  for (;;) {
    float best = -1e10f;
    int best_id = -1, best_i = -1;
    for (std::size_t i = 0; i + 1 < ids.size(); ++i) {
      const int id = lookup(v.tokens[ids[i]] + v.tokens[ids[i + 1]]);
      if (id >= 0 && v.scores[id] > best) {
        best = v.scores[id];
        best_id = id;
        best_i = int(i);
      }
    }
    if (best_i < 0) return ids;
    ids[best_i] = best_id;
    ids.erase(ids.begin() + best_i + 1);
  }
}

// A valid tokenizer.bin: <unk>, <s>, </s>, the 256 byte tokens, then `extra`.
std::string llama2c_file(const std::vector<std::pair<float, std::string>>& extra, std::int32_t max_length = 8) {
  std::vector<std::pair<float, std::string>> tokens{{0.f, "<unk>"}, {0.f, "<s>"}, {0.f, "</s>"}};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    tokens.push_back({0.f, name});
  }
  tokens.insert(tokens.end(), extra.begin(), extra.end());
  std::string out(reinterpret_cast<const char*>(&max_length), 4);
  for (const auto& [score, text] : tokens) {
    const auto length = std::int32_t(text.size());
    out.append(reinterpret_cast<const char*>(&score), 4);
    out.append(reinterpret_cast<const char*>(&length), 4);
    out += text;
  }
  return out;
}

Tokenizer llama2c_of(const std::string& bytes, int vocab_size, const std::string& name) {
  return Tokenizer::llama2c(std::as_bytes(std::span(bytes.data(), bytes.size())), vocab_size, name);
}

}  // namespace

TEST_CASE("tokenizer: llama2.c encoding equals run.c's quadratic algorithm on random text") {
  const std::string bytes = read_text(test::fixtures() / "stories260K" / "tok512.bin");
  const Llama2cVocabulary v = read_llama2c_vocabulary(bytes, 512);
  const Tokenizer tok = llama2c_of(bytes, 512, "tok512.bin");
  Rng rng = test::rng_for("tokenizer llama2c run.c");
  static const char* const words[] = {"the", " dog", "Once", " upon", " a", " time", ",", ".", "!", "\n",
                                      " Lily", "ball", " happy", "é", "😀", "中", "  ", "\t", "'s",
                                      "ooo", "!!!", "lll", "    "};
  for (int i = 0; i < 60; ++i) {
    std::string text;
    const std::size_t n = rng.below(40);
    for (std::size_t k = 0; k < n; ++k) text += words[rng.below(std::size(words))];
    if (i % 4 == 3) text += random_text(rng, 12, i % 8 == 7);
    INFO("text: ", text);
    const bool bos = i % 2 == 0;
    CHECK(tok.encode(text, bos) == run_c_encode(v, text, bos));
  }
}

TEST_CASE("tokenizer: llama2.c decodes what it encodes, for any UTF-8 and any bytes") {
  const Tokenizer tok = Tokenizer::llama2c(test::fixtures() / "stories260K" / "tok512.bin", 512);
  Rng rng = test::rng_for("tokenizer llama2c round trip");
  for (int i = 0; i < 200; ++i) {
    const std::string text = random_text(rng, rng.below(200), i % 2 == 1);
    INFO("text: ", text);
    // Characters missing from the 512-token vocabulary fall back to bytes (ids 3..258).
    CHECK(tok.decode(tok.encode(text, true)) == text);
    CHECK(tok.decode(tok.encode(text, false)) == text);
  }
  CHECK(tok.encode("", true) == std::vector<int>{1});
  CHECK(tok.encode("", false).empty());
  const std::vector<int> cjk = tok.encode("中", false);  // not in the vocabulary: three bytes
  CHECK(cjk.size() == 4);
  CHECK(cjk[1] == 0xE4 + 3);
}

TEST_CASE("tokenizer: decode refuses ids outside the vocabulary, naming them") {
  const Tokenizer byte_level = tiny("gpt2");
  const Tokenizer llama2c = Tokenizer::llama2c(test::fixtures() / "stories260K" / "tok512.bin", 512);
  for (const Tokenizer* tok : {&byte_level, &llama2c}) {
    for (int id : {-1, tok->vocab_size(), 1 << 30}) {
      CAPTURE(id);
      const std::string message = error_of([&] { tok->decode(std::vector<int>{0, id}); });
      CHECK(contains(message, "token id " + std::to_string(id)));
      CHECK(contains(error_of([&] { tok->decode_piece(0, id); }), std::to_string(id)));
    }
    for (int id = 0; id < tok->vocab_size(); ++id) tok->decode_piece(id > 0 ? id - 1 : -1, id);  // never throws
  }
}

TEST_CASE("tokenizer: malformed tokenizer.bin files are refused, naming the file and the field") {
  const std::string name = "bad_tokenizer.bin";
  const std::string valid = llama2c_file({{-1.f, " "}, {-2.f, "a"}, {-3.f, " a"}});
  CHECK(llama2c_of(valid, 262, name).encode("a", true) == std::vector<int>{1, 261});

  const auto refused = [&](const std::string& bytes, int vocab_size, std::string_view field) {
    const std::string message = error_of([&] { llama2c_of(bytes, vocab_size, name); });
    INFO(message);
    CHECK(contains(message, name));
    CHECK(contains(message, field));
  };
  // Cut at every byte: a record boundary says how many tokens were read, inside a record the
  // field being read.
  for (std::size_t size = 0; size < valid.size(); ++size) {
    CAPTURE(size);
    const std::string message = error_of([&] { llama2c_of(valid.substr(0, size), 262, name); });
    CHECK(contains(message, name));
    CHECK((contains(message, "max_token_length") || contains(message, "token ") ||
           contains(message, "vocab_size")));
  }
  refused(valid.substr(0, valid.size() - 1), 262, "token 261 text");
  refused(valid, 263, "vocab_size = 263");
  refused(valid, 261, "bytes after token 260");
  refused(valid, 100, "vocab_size: 100");
  refused(llama2c_file({{0.f, " "}}, 0), 260, "max_token_length: 0");
  refused(llama2c_file({{0.f, " "}, {0.f, "abcdefghi"}}), 261, "token 260 length: 9");
  refused(llama2c_file({{0.f, "x"}}), 260, "no token \" \"");
  std::string negative = valid;
  const std::int32_t minus = -7;
  std::memcpy(negative.data() + 4 + 4, &minus, 4);  // token 0's length
  refused(negative, 262, "token 0 length: -7");
  std::string huge = valid;
  const std::int32_t big = 1 << 30;
  std::memcpy(huge.data() + 4 + 4, &big, 4);
  refused(huge, 262, "token 0 length");
  refused(valid, 1 << 30, "cannot hold vocab_size");
  CHECK(contains(error_of([] { Tokenizer::llama2c(fs::path("/nonexistent/tok.bin"), 512); }), "/nonexistent/tok.bin"));
}

TEST_CASE("tokenizer: llama2.c merges the leftmost of equally good pairs first") {
  const Tokenizer tok = llama2c_of(llama2c_file({{-1.f, " "}, {-2.f, "a"}, {-3.f, "aa"}}), 262, "t.bin");
  CHECK(tok.encode("aaa", false) == std::vector<int>{259, 261, 260});
  CHECK(tok.encode("aaaaa", false) == std::vector<int>{259, 261, 261, 260});
}

TEST_CASE("tokenizer: llama2.c encoding of invalid UTF-8 falls back to bytes") {
  const Tokenizer tok = llama2c_of(llama2c_file({{-1.f, " "}, {-2.f, "é"}}), 261, "t.bin");
  // A lone continuation byte, a truncated sequence, an overlong form and a 0xFF: all bytes.
  const std::string text = "\x80\xC3\xFF\xC0\xAF\xC3\xA9";
  const std::vector<int> ids = tok.encode(text, false);
  CHECK(ids == std::vector<int>{259, 0x80 + 3, 0xC3 + 3, 0xFF + 3, 0xC0 + 3, 0xAF + 3, 260});
  CHECK(tok.decode(ids) == text);
}

TEST_CASE("tokenizer: malformed tokenizer.json files are refused, naming the key") {
  const Json valid = read_json(tokenizer_fixtures() / "tiny_llama3.tokenizer.json");
  const std::string name = "bad_tokenizer.json";
  CHECK_NOTHROW(Tokenizer::from_tokenizer_json(valid.dump(), name));
  const auto refused = [&](const std::function<void(Json&)>& corrupt, std::string_view key) {
    Json j = valid;
    corrupt(j);
    const std::string message = error_of([&] { Tokenizer::from_tokenizer_json(j.dump(), name); });
    INFO(message);
    CHECK(contains(message, name));
    CHECK(contains(message, key));
  };
  refused([](Json& j) { j.erase("model"); }, "model: missing");
  refused([](Json& j) { j["model"]["type"] = "WordPiece"; }, "model.type");
  refused([](Json& j) { j["model"]["vocab"] = Json::array(); }, "model.vocab");
  refused([](Json& j) { j["model"]["vocab"]["Ġzz"] = -3; }, "model.vocab[\"Ġzz\"]");
  refused([](Json& j) { j["model"]["vocab"]["Ġzz"] = 1u << 31; }, "model.vocab[\"Ġzz\"]");
  refused([](Json& j) { j["model"]["vocab"]["Ġzz"] = "7"; }, "model.vocab[\"Ġzz\"]");
  refused([](Json& j) { j["model"]["vocab"]["Ġzz"] = 7; }, "id 7");
  refused([](Json& j) { j["model"]["vocab"].erase("a"); }, "no token has id");
  refused([](Json& j) { j["model"]["merges"][3] = "Ġ"; }, "model.merges[3]");
  refused([](Json& j) { j["model"]["merges"][4] = "a b c"; }, "model.merges[4]");
  refused([](Json& j) { j["model"]["merges"][5] = Json::array({"a"}); }, "model.merges[5]");
  refused([](Json& j) { j["model"]["merges"][6] = Json::array({"a", 3}); }, "model.merges[6][1]");
  refused([](Json& j) { j["model"]["merges"][7] = "Ġzz q"; }, "model.merges[7]");
  refused([](Json& j) { j["model"]["merges"] = "a b"; }, "model.merges");
  refused([](Json& j) { j["model"]["dropout"] = 0.1; }, "model.dropout");
  refused([](Json& j) { j["model"]["byte_fallback"] = true; }, "model.byte_fallback");
  refused([](Json& j) { j["model"]["continuing_subword_prefix"] = "##"; }, "model.continuing_subword_prefix");
  refused([](Json& j) { j["model"]["unk_token"] = "<nope>"; }, "model.unk_token");
  refused([](Json& j) { j["model"]["ignore_merges"] = 1; }, "model.ignore_merges");
  refused([](Json& j) { j["added_tokens"][0]["lstrip"] = true; }, "added_tokens[0].lstrip");
  refused([](Json& j) { j["added_tokens"][1]["content"] = "<other>"; }, "added_tokens[1]");
  refused([](Json& j) { j["added_tokens"][2].erase("id"); }, "added_tokens[2].id");
  refused([](Json& j) { j["added_tokens"][2]["id"] = 100000; }, "added_tokens[2].id");
  refused([](Json& j) { j["added_tokens"] = Json::object(); }, "added_tokens");
  refused([](Json& j) { j["normalizer"] = {{"type", "Lowercase"}}; }, "normalizer.type");
  refused([](Json& j) { j.erase("pre_tokenizer"); }, "pre_tokenizer: missing");
  refused([](Json& j) { j["pre_tokenizer"] = {{"type", "Metaspace"}}; }, "pre_tokenizer.type");
  refused([](Json& j) { j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed"; },
          "pre_tokenizer.pretokenizers[0].behavior");
  refused([](Json& j) { j["pre_tokenizer"]["pretokenizers"][0]["invert"] = true; },
          "pre_tokenizer.pretokenizers[0].invert");
  refused([](Json& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"Regex", "(unclosed"}}; },
          "pre_tokenizer.pretokenizers[0].pattern.Regex");
  refused([](Json& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"Glob", "*"}}; },
          "pre_tokenizer.pretokenizers[0].pattern");
  refused([](Json& j) { j["pre_tokenizer"]["pretokenizers"].erase(1); }, "no ByteLevel step");
  refused([](Json& j) { j["pre_tokenizer"]["pretokenizers"][1]["use_regex"] = "yes"; },
          "pre_tokenizer.pretokenizers[1].use_regex");
  refused([](Json& j) { j["decoder"] = {{"type", "WordPiece"}}; }, "decoder.type");
  refused([](Json& j) { j["post_processor"]["single"][0]["SpecialToken"]["id"] = "<bos>"; },
          "post_processor.single[0].SpecialToken.id");
  CHECK(contains(error_of([&] { Tokenizer::from_tokenizer_json("{\"model\": [1, 2", name); }), "not valid JSON"));
  CHECK(contains(error_of([&] { Tokenizer::from_tokenizer_json("[]", name); }), "expected an object"));
  CHECK(contains(error_of([&] { Tokenizer::from_tokenizer_json(valid.dump(), name, "{\"bos_token\": \"<x>\"}", "cfg.json"); }),
                 "cfg.json: bos_token"));
  CHECK(contains(error_of([&] { Tokenizer::from_tokenizer_json(fs::path("/nonexistent/tokenizer.json")); }),
                 "/nonexistent/tokenizer.json"));
}

TEST_CASE("tokenizer: tokenizer_config.json names BOS and EOS; merges may be \"a b\" or [a, b]") {
  const std::string json = read_text(tokenizer_fixtures() / "tiny_qwen2.tokenizer.json");
  const Tokenizer plain = Tokenizer::from_tokenizer_json(json, "t.json");
  CHECK(plain.bos() == -1);
  CHECK(plain.eos() == -1);
  CHECK(contains(plain.description(), "normalizer NFC not applied"));
  CHECK(contains(error_of([&] { plain.encode("x", true); }), "no BOS"));
  const Tokenizer configured = Tokenizer::from_tokenizer_json(
      json, "t.json", R"({"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>", "add_bos_token": true})");
  CHECK(configured.bos() == 2);
  CHECK(configured.eos() == 3);
  CHECK(configured.add_bos());
  CHECK(configured.encode("Hi", true).front() == 2);
  // Both spellings of merges give the same tokenizer.
  Json j = Json::parse(json);
  for (Json& merge : j["model"]["merges"]) merge = merge[0].get<std::string>() + " " + merge[1].get<std::string>();
  const Tokenizer strings = Tokenizer::from_tokenizer_json(j.dump(), "t.json");
  const std::string text = "The Congress of the United States, 1,234 dollars.";
  const std::vector<int> ids = plain.encode(text, false);
  CHECK(strings.encode(text, false) == ids);
  CHECK(std::any_of(ids.begin(), ids.end(), [](int id) { return id >= 260; }));  // merges applied
}

TEST_CASE("tokenizer: malformed GGUF tokenizer metadata is refused, naming the key") {
  io::ByteLevelBpeSpec valid = spec_of(read_json(tokenizer_fixtures() / "tiny_smollm.tokenizer.json"), "smollm");
  const std::string name = "bad.gguf";
  CHECK_NOTHROW(Tokenizer::byte_level_bpe(valid, name));
  const auto refused = [&](const std::function<void(io::ByteLevelBpeSpec&)>& corrupt, std::string_view key) {
    io::ByteLevelBpeSpec spec = valid;
    corrupt(spec);
    const std::string message = error_of([&] { Tokenizer::byte_level_bpe(spec, name); });
    INFO(message);
    CHECK(contains(message, name));
    CHECK(contains(message, key));
  };
  refused([](auto& s) { s.pre = "deepseek-coder"; }, "tokenizer.ggml.pre: \"deepseek-coder\"");
  refused([](auto& s) { s.merges[2] = "Ġt"; }, "tokenizer.ggml.merges[2]");
  refused([](auto& s) { s.merges[3] = "Ġ "; }, "tokenizer.ggml.merges[3]");
  refused([](auto& s) { s.merges[4] = "Ġzz q"; }, "tokenizer.ggml.merges[4]");
  refused([](auto& s) { s.token_types.pop_back(); }, "tokenizer.ggml.token_type");
  refused([](auto& s) { s.bos = int(s.tokens.size()); }, "tokenizer.ggml.bos_token_id");
  refused([](auto& s) { s.eos = -2; }, "tokenizer.ggml.eos_token_id");
  refused([](auto& s) { s.unk = 1 << 20; }, "tokenizer.ggml.unknown_token_id");
  refused([](auto& s) { s.tokens.clear(), s.token_types.clear(); }, "tokenizer.ggml.tokens");
}

TEST_CASE("tokenizer: one tokenizer encodes on several threads at once") {
  const Tokenizer tok = tiny("llama3");
  Rng rng = test::rng_for("tokenizer threads");
  std::vector<std::string> texts;
  for (int i = 0; i < 64; ++i) texts.push_back(random_text(rng, 400));
  std::vector<std::vector<int>> expected;
  for (const std::string& t : texts) expected.push_back(tok.encode(t, false));
  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> threads;
  for (int w = 0; w < 4; ++w) {
    threads.emplace_back([&, w] {
      for (int round = 0; round < 4; ++round)
        for (std::size_t i = 0; i < texts.size(); ++i) mismatches[w] += tok.encode(texts[i], false) != expected[i];
    });
  }
  for (std::thread& t : threads) t.join();
  for (int m : mismatches) CHECK(m == 0);
}

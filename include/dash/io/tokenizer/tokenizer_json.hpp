// Hugging Face tokenizer.json files of byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2) read
// into the parts of a ByteLevelBpe. Read:
//   model            type "BPE"; vocab {text: id}; merges as "a b" strings or [a, b] pairs;
//                    unk_token and fuse_unk (for bytes without a symbol); ignore_merges. Dropout,
//                    byte fallback and subword affixes are refused.
//   added_tokens     [{id, content, special, ...}]: all are literal tokens, as Hugging Face splits
//                    every added token out of the text; lstrip, rstrip and single_word are refused.
//   normalizer       none, or NFC (Qwen2), which is recorded but not applied: text in NFC, as
//                    nearly all text is, tokenises the same (llama.cpp does not apply it either).
//   pre_tokenizer    Sequence of Split(Regex or String, behavior Isolated), Digits(individual_digits)
//                    and ByteLevel(add_prefix_space, use_regex); there must be a ByteLevel.
//   decoder          none or ByteLevel.
//   post_processor   a TemplateProcessing (alone or in a Sequence) whose single sequence starts with
//                    a special token names BOS and asks for it.
// A tokenizer_config.json, when given, names bos_token and eos_token and may set add_bos_token.
// Anything else is an error naming the key.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "dash/core/error.hpp"
#include "dash/io/tokenizer/byte_level_bpe.hpp"
#include "dash/io/tokenizer/pretokenizer.hpp"

namespace dash::io::detail {

// Typed access to one JSON document; failures name the file and the key path.
class JsonFile {
 public:
  using Json = nlohmann::json;

  JsonFile(std::string_view text, std::string source) : source_(std::move(source)) {
    try {
      root_ = Json::parse(text.begin(), text.end());
    } catch (const Json::exception& e) {
      fail(source_, ": not valid JSON (", e.what(), "), expected a JSON document");
    }
    require(root_.is_object(), source_, ": the top level is ", root_.type_name(), ", expected an object");
  }

  const std::string& source() const { return source_; }
  const Json& root() const { return root_; }

  // The member `key` of an object, or nullptr when it is absent or null.
  static const Json* find(const Json& object, std::string_view key) {
    const auto it = object.find(key);
    return it == object.end() || it->is_null() ? nullptr : &*it;
  }

  const Json& member(const Json& object, std::string_view key, const std::string& path) const {
    const Json* value = find(object, key);
    require(value != nullptr, source_, ": ", path, ": missing, expected a value");
    return *value;
  }

  const Json& object(const Json& value, const std::string& path) const {
    require(value.is_object(), source_, ": ", path, ": is ", value.type_name(), ", expected an object");
    return value;
  }
  const Json& array(const Json& value, const std::string& path) const {
    require(value.is_array(), source_, ": ", path, ": is ", value.type_name(), ", expected an array");
    return value;
  }
  std::string string(const Json& value, const std::string& path) const {
    require(value.is_string(), source_, ": ", path, ": is ", value.type_name(), ", expected a string");
    return value.get<std::string>();
  }
  bool boolean(const Json& value, const std::string& path) const {
    require(value.is_boolean(), source_, ": ", path, ": is ", value.type_name(), ", expected true or false");
    return value.get<bool>();
  }
  // An integer in [0, limit).
  int index(const Json& value, std::int64_t limit, const std::string& path) const {
    const bool integral = value.is_number_integer();
    const bool in_range = value.is_number_unsigned() ? value.get<std::uint64_t>() < std::uint64_t(limit)
                                                     : integral && value.get<std::int64_t>() >= 0 &&
                                                           value.get<std::int64_t>() < limit;
    require(integral && in_range, source_, ": ", path, ": ", value.dump(), ", expected an integer in 0..", limit - 1);
    return int(value.get<std::int64_t>());
  }

  // An optional boolean member; `otherwise` when absent or null.
  bool flag(const Json& object, std::string_view key, bool otherwise, const std::string& path) const {
    const Json* value = find(object, key);
    return value ? boolean(*value, path.empty() ? std::string(key) : path + "." + std::string(key)) : otherwise;
  }

 private:
  std::string source_;
  Json root_;
};

class TokenizerJsonReader {
 public:
  using Json = nlohmann::json;

  explicit TokenizerJsonReader(const JsonFile& file) : f_(file) {}

  void read() {
    parts_.source = f_.source();
    parts_.fields = {"model.vocab", "model.merges", "bos_token", "eos_token", "model.unk_token"};
    const Json& model = f_.object(f_.member(f_.root(), "model", "model"), "model");
    read_model_options(model);
    read_tokens(model);
    read_merges(model);
    read_normalizer();
    read_pre_tokenizer();
    read_decoder();
    read_post_processor();
  }

  // bos_token, eos_token and add_bos_token of a tokenizer_config.json.
  void read_config(const JsonFile& config) {
    const auto token = [&](const char* key, int& id) {
      const Json* value = JsonFile::find(config.root(), key);
      if (!value) return;
      const Json* content = value->is_object() ? JsonFile::find(*value, "content") : value;
      require(content != nullptr, config.source(), ": ", key, ".content: missing, expected the token's text");
      const std::string text = config.string(*content, key);
      const auto it = ids_.find(text);
      require(it != ids_.end(), config.source(), ": ", key, ": \"", text, "\" is not a token of ", f_.source(),
              ", expected one of its tokens");
      id = it->second;
    };
    token("bos_token", parts_.bos);
    token("eos_token", parts_.eos);
    parts_.add_bos = config.flag(config.root(), "add_bos_token", parts_.add_bos, "");
  }

  ByteLevelBpeParts take() { return std::move(parts_); }

 private:
  void read_model_options(const Json& model) {
    if (const Json* type = JsonFile::find(model, "type")) {
      const std::string t = f_.string(*type, "model.type");
      require(t == "BPE", f_.source(), ": model.type: \"", t, "\" is not supported, expected \"BPE\"");
    }
    if (const Json* dropout = JsonFile::find(model, "dropout")) {
      require(dropout->is_number() && dropout->get<double>() == 0.0, f_.source(), ": model.dropout: ",
              dropout->dump(), " is not supported, expected null");
    }
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      if (const Json* affix = JsonFile::find(model, key)) {
        const std::string path = std::string("model.") + key;
        require(f_.string(*affix, path).empty(), f_.source(), ": ", path, ": ", affix->dump(),
                " is not supported, expected null or \"\"");
      }
    }
    require(!f_.flag(model, "byte_fallback", false, "model"), f_.source(),
            ": model.byte_fallback: true is not supported, expected false (byte-level BPE needs no fallback)");
    parts_.ignore_merges = f_.flag(model, "ignore_merges", false, "model");
  }

  // Ids from model.vocab and added_tokens must cover 0..n-1, each with one text.
  void read_tokens(const Json& model) {
    const Json& vocab = f_.object(f_.member(model, "vocab", "model.vocab"), "model.vocab");
    const Json* added = JsonFile::find(f_.root(), "added_tokens");
    if (added) f_.array(*added, "added_tokens");
    const std::int64_t limit = std::int64_t(vocab.size() + (added ? added->size() : 0));
    require(limit > 0 && limit <= INT_MAX, f_.source(), ": model.vocab: ", limit, " tokens, expected 1 to 2^31 - 1");
    std::vector<std::string> tokens(static_cast<std::size_t>(limit));
    std::vector<char> assigned(tokens.size(), 0);
    std::vector<char> literal(tokens.size(), 0);
    int n = 0;
    for (const auto& [text, value] : vocab.items()) {
      const int id = f_.index(value, limit, "model.vocab[\"" + text + "\"]");
      require(!assigned[id], f_.source(), ": model.vocab[\"", text, "\"]: id ", id, " is also \"", tokens[id],
              "\", expected one text per id");
      tokens[id] = text;
      assigned[id] = 1;
      n = std::max(n, id + 1);
    }
    for (std::size_t i = 0; added && i < added->size(); ++i) {
      const std::string path = "added_tokens[" + std::to_string(i) + "]";
      const Json& token = f_.object((*added)[i], path);
      const int id = f_.index(f_.member(token, "id", path + ".id"), limit, path + ".id");
      const std::string text = f_.string(f_.member(token, "content", path + ".content"), path + ".content");
      for (const char* option : {"single_word", "lstrip", "rstrip"}) {
        require(!f_.flag(token, option, false, path), f_.source(), ": ", path, ".", option,
                ": true is not supported, expected false");
      }
      require(!assigned[id] || tokens[id] == text, f_.source(), ": ", path, ": id ", id, " is \"", text,
              "\" here but \"", tokens[id], "\" in model.vocab, expected the same text");
      tokens[id] = text;
      assigned[id] = 1;
      literal[id] = 1;
      n = std::max(n, id + 1);
    }
    for (int id = 0; id < n; ++id) {
      require(assigned[id], f_.source(), ": model.vocab: no token has id ", id, ", expected ids 0..", n - 1,
              " without gaps");
    }
    tokens.resize(n);
    parts_.literal.assign(literal.begin(), literal.begin() + n);
    for (int id = 0; id < n; ++id) ids_[tokens[id]] = id;
    parts_.tokens = std::move(tokens);
    if (const Json* unk = JsonFile::find(model, "unk_token")) {
      parts_.unk = parts_.byte_unk = id_of(f_.string(*unk, "model.unk_token"), "model.unk_token");
      parts_.fuse_unk = f_.flag(model, "fuse_unk", false, "model");
    }
  }

  void read_merges(const Json& model) {
    const Json* merges = JsonFile::find(model, "merges");
    if (!merges) return;
    f_.array(*merges, "model.merges");
    parts_.merges.reserve(merges->size());
    for (std::size_t i = 0; i < merges->size(); ++i) {
      const std::string path = "model.merges[" + std::to_string(i) + "]";
      const Json& merge = (*merges)[i];
      if (merge.is_string()) {
        const std::string m = merge.get<std::string>();
        const std::size_t space = m.find(' ');
        require(space != std::string::npos && space > 0 && space + 1 < m.size() &&
                    m.find(' ', space + 1) == std::string::npos,
                f_.source(), ": ", path, ": \"", m, "\", expected two tokens separated by one space");
        parts_.merges.emplace_back(m.substr(0, space), m.substr(space + 1));
      } else {
        require(merge.is_array() && merge.size() == 2, f_.source(), ": ", path, ": ", merge.dump(),
                ", expected \"a b\" or [\"a\", \"b\"]");
        parts_.merges.emplace_back(f_.string(merge[0], path + "[0]"), f_.string(merge[1], path + "[1]"));
      }
    }
  }

  void read_normalizer() {
    const Json* normalizer = JsonFile::find(f_.root(), "normalizer");
    if (!normalizer) return;
    const std::string type = f_.string(f_.member(f_.object(*normalizer, "normalizer"), "type", "normalizer.type"),
                                       "normalizer.type");
    require(type == "NFC", f_.source(), ": normalizer.type: \"", type,
            "\" is not supported, expected no normalizer or NFC");
    normalizer_note_ = ", normalizer NFC not applied";
  }

  void read_pre_tokenizer() {
    const Json& pre = f_.member(f_.root(), "pre_tokenizer", "pre_tokenizer");
    bool byte_level = false;
    std::vector<std::string> labels;
    add_pre_tokenizer(pre, "pre_tokenizer", byte_level, labels);
    require(byte_level, f_.source(), ": pre_tokenizer: no ByteLevel step, expected a byte-level BPE tokenizer");
    for (const std::string& label : labels) parts_.pretokenizer_name += (parts_.pretokenizer_name.empty() ? "" : " + ") + label;
    parts_.pretokenizer_name += normalizer_note_;
  }

  void add_pre_tokenizer(const Json& pre, const std::string& path, bool& byte_level, std::vector<std::string>& labels) {
    f_.object(pre, path);
    const std::string type = f_.string(f_.member(pre, "type", path + ".type"), path + ".type");
    Pretokenizer& p = parts_.pretokenizer;
    const auto split = [&](std::string_view pattern, bool literal, const std::string& where, std::string label) {
      p.add_split(Regex(pattern, literal, f_.source() + ": " + where), label);
      labels.push_back(std::move(label));
    };
    if (type == "Sequence") {
      const Json& steps = f_.array(f_.member(pre, "pretokenizers", path + ".pretokenizers"), path + ".pretokenizers");
      for (std::size_t i = 0; i < steps.size(); ++i)
        add_pre_tokenizer(steps[i], path + ".pretokenizers[" + std::to_string(i) + "]", byte_level, labels);
    } else if (type == "Split") {
      const std::string behavior = f_.string(f_.member(pre, "behavior", path + ".behavior"), path + ".behavior");
      require(behavior == "Isolated", f_.source(), ": ", path, ".behavior: \"", behavior,
              "\" is not supported, expected \"Isolated\"");
      require(!f_.flag(pre, "invert", false, path), f_.source(), ": ", path,
              ".invert: true is not supported, expected false");
      const Json& pattern = f_.object(f_.member(pre, "pattern", path + ".pattern"), path + ".pattern");
      if (const Json* regex = JsonFile::find(pattern, "Regex")) {
        const std::string text = f_.string(*regex, path + ".pattern.Regex");
        split(text, false, path + ".pattern.Regex", label_of(text));
      } else if (const Json* string = JsonFile::find(pattern, "String")) {
        const std::string text = f_.string(*string, path + ".pattern.String");
        split(text, true, path + ".pattern.String", "split \"" + text + "\"");
      } else {
        fail(f_.source(), ": ", path, ".pattern: ", pattern.dump(), ", expected {\"Regex\": ...} or {\"String\": ...}");
      }
    } else if (type == "Digits") {
      const bool individual = f_.flag(pre, "individual_digits", false, path);
      split(individual ? single_digit_pattern : digit_run_pattern, false, path, individual ? "digits" : "digit runs");
    } else if (type == "ByteLevel") {
      byte_level = true;
      if (f_.flag(pre, "add_prefix_space", true, path)) {
        p.add_prefix_space();
        labels.push_back("prefix space");
      }
      if (f_.flag(pre, "use_regex", true, path)) split(gpt2_pattern, false, path, "gpt2");
    } else {
      fail(f_.source(), ": ", path, ".type: \"", type,
           "\" is not supported, expected Sequence, Split, Digits or ByteLevel");
    }
  }

  static std::string label_of(std::string_view pattern) {
    if (pattern == gpt2_pattern) return "gpt2";
    if (pattern == llama3_pattern) return "llama3";
    if (pattern == qwen2_pattern) return "qwen2";
    return "split /" + std::string(pattern) + "/";
  }

  void read_decoder() {
    const Json* decoder = JsonFile::find(f_.root(), "decoder");
    if (!decoder) return;
    const std::string type =
        f_.string(f_.member(f_.object(*decoder, "decoder"), "type", "decoder.type"), "decoder.type");
    require(type == "ByteLevel", f_.source(), ": decoder.type: \"", type, "\" is not supported, expected ByteLevel");
  }

  void read_post_processor() {
    const Json* post = JsonFile::find(f_.root(), "post_processor");
    if (!post) return;
    std::string path = "post_processor";
    f_.object(*post, path);
    if (const Json* type = JsonFile::find(*post, "type"); type && *type == "Sequence") {
      const Json& processors = f_.array(f_.member(*post, "processors", path + ".processors"), path + ".processors");
      for (std::size_t i = 0; i < processors.size(); ++i) {
        const std::string step = path + ".processors[" + std::to_string(i) + "]";
        read_template(f_.object(processors[i], step), step);
      }
    } else {
      read_template(*post, path);
    }
  }

  // A TemplateProcessing whose single sequence starts {"SpecialToken": {"id": "<bos>"}}.
  void read_template(const Json& processor, const std::string& path) {
    const Json* type = JsonFile::find(processor, "type");
    if (!type || *type != "TemplateProcessing") return;
    const Json& single = f_.array(f_.member(processor, "single", path + ".single"), path + ".single");
    if (single.empty() || !single[0].is_object()) return;
    const Json* special = JsonFile::find(single[0], "SpecialToken");
    if (!special) return;
    const std::string where = path + ".single[0].SpecialToken.id";
    parts_.bos = id_of(f_.string(f_.member(f_.object(*special, where), "id", where), where), where);
    parts_.add_bos = true;
  }

  int id_of(const std::string& text, const std::string& path) const {
    const auto it = ids_.find(text);
    require(it != ids_.end(), f_.source(), ": ", path, ": \"", text, "\" is not a token, expected one of the vocabulary");
    return it->second;
  }

  const JsonFile& f_;
  ByteLevelBpeParts parts_;
  std::unordered_map<std::string, int> ids_;
  std::string normalizer_note_;
};

}  // namespace dash::io::detail

// Tokenizers of the models dash loads: text ↔ token ids.
//
//   byte-level BPE   GGUF metadata (tokenizer.ggml.*, see ByteLevelBpeSpec) or a Hugging Face
//                    tokenizer.json: SmolLM2, Llama 3, Qwen2. Literal tokens written in the text
//                    ("<|im_start|>") encode to their ids, as Hugging Face and llama.cpp do. Any
//                    byte string encodes, and decode(encode(text)) == text but for bytes the
//                    vocabulary has no symbol for (see tokenizer/byte_level_bpe.hpp).
//   llama2.c         tokenizer.bin with sentencepiece scores (stories260K's tok512.bin), encoded as
//                    llama2.c's run.c does; characters outside the vocabulary fall back to bytes,
//                    so decode(encode(text, add_bos)) == text for any bytes.
//
// A Tokenizer is immutable and cheap to copy; encode and decode may run on many threads at once.
// Bad files and ids throw dash::Error naming the file and the field.
#pragma once

#include <cstddef>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "dash/core/error.hpp"
#include "dash/io/detail/bytes.hpp"
#include "dash/io/tokenizer/byte_level_bpe.hpp"
#include "dash/io/tokenizer/llama2c_bpe.hpp"
#include "dash/io/tokenizer/tokenizer_json.hpp"

namespace dash::io {

class Tokenizer {
 public:
  // From GGUF metadata; `source_name` is what messages call it.
  static Tokenizer byte_level_bpe(ByteLevelBpeSpec spec, std::string source_name) {
    return Tokenizer(detail::ByteLevelBpe(detail::parts_of(std::move(spec), std::move(source_name))));
  }

  // A tokenizer.json, with the tokenizer_config.json beside it when there is one (it names BOS
  // and EOS, which tokenizer.json alone does not).
  static Tokenizer from_tokenizer_json(const std::filesystem::path& path) {
    const auto config_path = path.parent_path() / "tokenizer_config.json";
    const bool has_config = std::filesystem::exists(config_path);
    return from_tokenizer_json(text_of(path), path.string(), has_config ? text_of(config_path) : std::string(),
                               config_path.string());
  }

  // From text in memory; an empty `config_json` means no tokenizer_config.json.
  static Tokenizer from_tokenizer_json(std::string_view json, std::string source_name,
                                       std::string_view config_json = {},
                                       std::string config_name = "tokenizer_config.json") {
    const detail::JsonFile file(json, std::move(source_name));
    detail::TokenizerJsonReader reader(file);
    reader.read();
    if (!config_json.empty()) reader.read_config(detail::JsonFile(config_json, std::move(config_name)));
    return Tokenizer(detail::ByteLevelBpe(reader.take()));
  }

  // llama2.c's tokenizer.bin; `vocab_size` is the model's, and the file must hold that many tokens.
  static Tokenizer llama2c(const std::filesystem::path& tokenizer_bin, int vocab_size) {
    return llama2c(detail::read_file(tokenizer_bin), vocab_size, tokenizer_bin.string());
  }
  static Tokenizer llama2c(std::span<const std::byte> bytes, int vocab_size, std::string source_name) {
    return Tokenizer(detail::Llama2cBpe(bytes, vocab_size, std::move(source_name)));
  }

  std::vector<int> encode(std::string_view text, bool add_bos) const {
    return std::visit([&](const auto& m) { return m.encode(text, add_bos); }, *model_);
  }

  std::string decode(std::span<const int> ids) const {
    return std::visit([&](const auto& m) { return m.decode(ids); }, *model_);
  }

  // The bytes `id` adds to a stream of generated text after `previous` (-1 at the start). A
  // character of several bytes may arrive over several pieces.
  std::string decode_piece(int previous, int id) const {
    if (const auto* bpe = std::get_if<detail::ByteLevelBpe>(model_.get())) return bpe->bytes_of(id);
    return std::get<detail::Llama2cBpe>(*model_).decode_piece(previous, id);
  }

  int bos() const {
    if (const auto* bpe = std::get_if<detail::ByteLevelBpe>(model_.get())) return bpe->bos();
    return detail::Llama2cBpe::bos_id;
  }
  int eos() const {
    if (const auto* bpe = std::get_if<detail::ByteLevelBpe>(model_.get())) return bpe->eos();
    return detail::Llama2cBpe::eos_id;
  }
  // Whether the source asks for BOS before text (tokenizer.ggml.add_bos_token, a BOS-first
  // post-processor, add_bos_token in tokenizer_config.json); llama2.c models were trained with it.
  bool add_bos() const {
    if (const auto* bpe = std::get_if<detail::ByteLevelBpe>(model_.get())) return bpe->add_bos();
    return true;
  }
  int vocab_size() const {
    return std::visit([](const auto& m) { return m.vocab_size(); }, *model_);
  }

  // e.g. "byte-level BPE, 49152 tokens, 48900 merges, pre-tokenizer smollm"
  std::string description() const {
    if (const auto* bpe = std::get_if<detail::ByteLevelBpe>(model_.get())) return bpe->description();
    return "llama2.c BPE, " + std::to_string(vocab_size()) + " tokens, merges by score";
  }

 private:
  using Model = std::variant<detail::ByteLevelBpe, detail::Llama2cBpe>;

  template <class M>
  explicit Tokenizer(M model) : model_(std::make_shared<const Model>(std::move(model))) {}

  static std::string text_of(const std::filesystem::path& path) {
    const std::vector<std::byte> bytes = detail::read_file(path);
    return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  }

  std::shared_ptr<const Model> model_;
};

}  // namespace dash::io

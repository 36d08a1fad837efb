// One entry point for every checkpoint a user may point dash at: the format is recognised from
// the path (a folder or *.safetensors: Hugging Face; a file starting with "GGUF": GGUF;
// anything else: llama2.c), and the tokenizer comes with the model where the format carries one
// (GGUF metadata, tokenizer.json beside the safetensors) or from an explicit path (llama2.c's
// tokenizer.bin, or to override).
#pragma once

#include <array>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>

#include "dash/core/error.hpp"
#include "dash/io/checkpoint.hpp"
#include "dash/io/gguf.hpp"
#include "dash/io/llama2c.hpp"
#include "dash/io/safetensors.hpp"
#include "dash/io/tokenizer.hpp"

namespace dash::io {

enum class Format { gguf, safetensors, llama2c };

inline Format detect_format(const std::filesystem::path& path) {
  require(std::filesystem::exists(path), path.string(), ": no such file or folder");
  const std::string file = path.filename().string();
  const auto ends_with = [&](std::string_view suffix) { return file.ends_with(suffix); };
  if (std::filesystem::is_directory(path) || ends_with(".safetensors") || ends_with(".safetensors.index.json"))
    return Format::safetensors;
  std::array<char, 4> magic{};
  std::ifstream in(path, std::ios::binary);
  require(bool(in), path.string(), ": cannot open for reading");
  in.read(magic.data(), magic.size());
  if (in.gcount() == 4 && std::memcmp(magic.data(), "GGUF", 4) == 0) return Format::gguf;
  return Format::llama2c;
}

// The byte-level BPE tokenizer stored in a GGUF's tokenizer.ggml.* metadata.
inline Tokenizer tokenizer_from_gguf(const gguf::File& file) {
  const std::string model = file.string("tokenizer.ggml.model");
  require(model == "gpt2", file.name(), ": tokenizer.ggml.model: \"", model,
          "\" is not supported, expected \"gpt2\" (byte-level BPE)");
  ByteLevelBpeSpec spec;
  spec.tokens = file.strings("tokenizer.ggml.tokens");
  spec.merges = file.strings("tokenizer.ggml.merges");
  if (file.has("tokenizer.ggml.token_type")) {
    for (std::int64_t t : file.integers("tokenizer.ggml.token_type")) spec.token_types.push_back(std::int32_t(t));
  }
  spec.pre = file.has("tokenizer.ggml.pre") ? file.string("tokenizer.ggml.pre") : "gpt2";
  const auto id = [&](const char* key) {
    if (!file.has(key)) return -1;
    const std::int64_t v = file.integer(key);
    require(v >= 0 && v < std::int64_t(spec.tokens.size()), file.name(), ": ", key, ": ", v,
            " is not a token id, expected 0..", spec.tokens.size() - 1);
    return int(v);
  };
  spec.bos = id("tokenizer.ggml.bos_token_id");
  spec.eos = id("tokenizer.ggml.eos_token_id");
  spec.unk = id("tokenizer.ggml.unknown_token_id");
  spec.add_bos = file.has("tokenizer.ggml.add_bos_token") && file.boolean("tokenizer.ggml.add_bos_token");
  return Tokenizer::byte_level_bpe(std::move(spec), file.name());
}

struct LoadedModel {
  Checkpoint checkpoint;
  std::optional<Tokenizer> tokenizer;
  bool add_bos = false;  // whether text is encoded with a leading BOS, as the tokenizer says the model was trained
};

// `tokenizer_path` is required for llama2.c models and overrides the bundled one otherwise.
inline LoadedModel load_model(const std::filesystem::path& path,
                              const std::optional<std::filesystem::path>& tokenizer_path = std::nullopt) {
  LoadedModel out;
  switch (detect_format(path)) {
    case Format::gguf: {
      const gguf::File file = gguf::File::open(path);
      out.checkpoint = read_gguf(file);
      if (!tokenizer_path) out.tokenizer = tokenizer_from_gguf(file);
      break;
    }
    case Format::safetensors: {
      out.checkpoint = read_safetensors(path);
      const auto folder = std::filesystem::is_directory(path) ? path : path.parent_path();
      if (!tokenizer_path && std::filesystem::exists(folder / "tokenizer.json"))
        out.tokenizer = Tokenizer::from_tokenizer_json(folder / "tokenizer.json");
      break;
    }
    case Format::llama2c:
      out.checkpoint = read_llama2c(path);
      require(bool(tokenizer_path), path.string(),
              ": a llama2.c checkpoint carries no tokenizer, give its tokenizer.bin (--tokenizer)");
      break;
  }
  if (tokenizer_path) {
    const auto& p = *tokenizer_path;
    out.tokenizer = p.extension() == ".json" ? Tokenizer::from_tokenizer_json(p)
                                             : Tokenizer::llama2c(p, out.checkpoint.config.vocab_size);
  }
  if (out.tokenizer) out.add_bos = out.tokenizer->add_bos();
  if (out.tokenizer)
    require(out.tokenizer->vocab_size() <= out.checkpoint.config.vocab_size, path.string(), ": the tokenizer has ",
            out.tokenizer->vocab_size(), " tokens, more than the model's vocabulary of ",
            out.checkpoint.config.vocab_size);
  return out;
}

}  // namespace dash::io

// Fuzzes the tokenizers: the input as llama2.c's tokenizer.bin (with the vocabulary size its
// records imply, and one more), as a Hugging Face tokenizer.json, and as text for fixed small
// tokenizers of both kinds, whose round trips must hold. Only dash::Error may escape the readers.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "dash/io/tokenizer.hpp"

using dash::io::Tokenizer;

namespace {

void check(bool condition) {
  if (!condition) __builtin_trap();
}

const std::string sample = "Once upon a time, <|im_start|>Crème brûlée costs $12.50 😀\n\t 1999  x";

// How many whole token records follow max_token_length, read leniently.
int count_records(std::span<const std::byte> bytes) {
  std::size_t offset = 4;
  int count = 0;
  while (offset + 8 <= bytes.size() && count < (1 << 20)) {
    std::int32_t length;
    std::memcpy(&length, bytes.data() + offset + 4, 4);
    if (length < 0 || std::size_t(length) > bytes.size() - offset - 8) break;
    offset += 8 + std::size_t(length);
    ++count;
  }
  return count;
}

// Encoding any text gives ids in the vocabulary, and every id decodes.
void exercise(const Tokenizer& tok, std::string_view text) {
  for (bool bos : {false, true}) {
    if (bos && tok.bos() < 0) continue;
    const std::vector<int> ids = tok.encode(text, bos);
    for (int id : ids) check(id >= 0 && id < tok.vocab_size());
    tok.decode(ids);
  }
  for (int id = 0; id < tok.vocab_size() && id < 1024; ++id) tok.decode_piece(id - 1, id);
}

const std::vector<Tokenizer>& byte_level_tokenizers() {
  static const std::vector<Tokenizer> tokenizers = [] {
    dash::io::ByteLevelBpeSpec spec;
    for (int b = 0; b < 256; ++b) spec.tokens.push_back(dash::io::detail::ByteAlphabet::instance().symbol(b));
    spec.merges = {"Ġ t", "h e", "Ġt he", "i n", "Ġ Ġ", "ĠĠ ĠĠ", "1 9", "Ã ¨"};
    for (const std::string& m : spec.merges) spec.tokens.push_back(m.substr(0, m.find(' ')) + m.substr(m.find(' ') + 1));
    spec.tokens.insert(spec.tokens.end(), {"<|im_start|>", "<|im_end|>"});
    spec.token_types.assign(spec.tokens.size(), 1);
    spec.token_types[spec.tokens.size() - 2] = 3;
    spec.token_types[spec.tokens.size() - 1] = 4;
    std::vector<Tokenizer> out;
    for (const char* pre : {"gpt2", "smollm", "llama3", "qwen2"}) {
      spec.pre = pre;
      out.push_back(Tokenizer::byte_level_bpe(spec, "fixed"));
    }
    return out;
  }();
  return tokenizers;
}

const Tokenizer& llama2c_tokenizer() {
  static const Tokenizer tokenizer = [] {
    std::vector<std::pair<float, std::string>> tokens{{0.f, "<unk>"}, {0.f, "<s>"}, {0.f, "</s>"}};
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof name, "<0x%02X>", b);
      tokens.push_back({0.f, name});
    }
    for (const char* t : {" ", "e", "t", "h", "he", "the", " the", "é", " a", "  "})
      tokens.push_back({-float(tokens.size()), t});
    std::string file(4, '\0');
    const std::int32_t max_length = 8;
    std::memcpy(file.data(), &max_length, 4);
    for (const auto& [score, text] : tokens) {
      const auto length = std::int32_t(text.size());
      file.append(reinterpret_cast<const char*>(&score), 4);
      file.append(reinterpret_cast<const char*>(&length), 4);
      file += text;
    }
    return Tokenizer::llama2c(std::as_bytes(std::span(file.data(), file.size())), int(tokens.size()), "fixed.bin");
  }();
  return tokenizer;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  const std::string_view text(reinterpret_cast<const char*>(data), size);

  const int records = count_records(bytes);
  for (int vocab_size : {records, records + 1}) {
    try {
      exercise(Tokenizer::llama2c(bytes, vocab_size, "fuzz.bin"), sample);
    } catch (const dash::Error&) {
    }
  }
  try {
    const Tokenizer tok = Tokenizer::from_tokenizer_json(text, "fuzz.json");
    exercise(tok, sample);
    exercise(tok, text.substr(0, 512));
  } catch (const dash::Error&) {
  }

  // Every byte has a symbol in the fixed byte-level vocabulary, so text comes back whole. The
  // first few KiB are text enough, and keep large inputs fast.
  const std::string_view head = text.substr(0, 4096);
  for (const Tokenizer& tok : byte_level_tokenizers()) {
    const std::vector<int> ids = tok.encode(head, false);
    check(tok.decode(ids) == head);
  }
  const Tokenizer& llama2c = llama2c_tokenizer();
  check(llama2c.decode(llama2c.encode(head, true)) == head);
  return 0;
}

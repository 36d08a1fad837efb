// Fuzzes the safetensors reader and the config.json reader, chosen by the input's first byte:
//   '{'   the input is a config.json: read_hf_config;
//   '#'   "#<config.json>\0<safetensors file>": both, then the checkpoint they make together;
//   else  the input is a safetensors file: parse it and read every tensor.
// Only dash::Error may escape the readers; anything else (another exception, a crash, a
// sanitizer report) is a bug.
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "dash/io/hf_config.hpp"
#include "dash/io/safetensors.hpp"

namespace {

void read_every_tensor(const dash::io::safetensors::File& file) {
  for (const auto& t : file.tensors()) {
    try {
      (void)file.read(t.name);
    } catch (const dash::Error&) {
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using dash::io::safetensors::File;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const auto* bytes = reinterpret_cast<const std::byte*>(data);
  try {
    if (size > 0 && data[0] == '{') {
      (void)dash::io::read_hf_config(text, "fuzz/config.json");
    } else if (size > 0 && data[0] == '#') {
      const std::size_t split = text.find('\0');
      if (split == std::string_view::npos) return 0;
      const dash::model::Config config = dash::io::read_hf_config(text.substr(1, split - 1), "fuzz/config.json");
      const File file = File::parse(std::vector<std::byte>(bytes + split + 1, bytes + size), "fuzz/model.safetensors");
      (void)dash::io::read_safetensors(config, file);
    } else {
      read_every_tensor(File::parse(std::vector<std::byte>(bytes, bytes + size), "fuzz.safetensors"));
    }
  } catch (const dash::Error&) {
  }
  return 0;
}

// libFuzzer target for the GGUF reader: parse, map to a model, and decode every tensor. Bad
// input may only end in dash::Error; any other exception, crash or sanitizer report is a bug.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "dash/io/gguf.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto* first = reinterpret_cast<const std::byte*>(data);
  try {
    const auto file = dash::io::gguf::File::parse(std::vector<std::byte>(first, first + size), "fuzz.gguf");
    for (const auto& t : file.tensors()) {
      try {
        file.read_tensor(t.name);
      } catch (const dash::Error&) {
      }
    }
    dash::io::read_gguf(file);
  } catch (const dash::Error&) {
  }
  return 0;
}

// Fuzzes the llama2.c checkpoint reader on the input as a whole file. Only dash::Error may
// escape; anything else (another exception, a crash, a sanitizer report) is a bug.
#include <cstddef>
#include <cstdint>
#include <span>

#include "dash/io/llama2c.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    (void)dash::io::read_llama2c(std::span(reinterpret_cast<const std::byte*>(data), size), "fuzz.bin");
  } catch (const dash::Error&) {
  }
  return 0;
}

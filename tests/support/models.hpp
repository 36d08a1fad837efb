// Where tests find real checkpoints: stories260K is a fixture in the repository; SmolLM2 is
// installed into models/ by the setup script, and tests that need it say so when it is absent.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <optional>

namespace dash::test {

inline std::filesystem::path fixtures() {
  const char* env = std::getenv("DASH_FIXTURES");
  return env ? std::filesystem::path(env) : std::filesystem::path(DASH_TEST_SOURCE_DIR) / "fixtures";
}

inline std::optional<std::filesystem::path> smollm2_gguf() {
  const char* env = std::getenv("DASH_SOURCE_DIR");
  const std::filesystem::path root = env ? std::filesystem::path(env) : std::filesystem::path(DASH_TEST_SOURCE_DIR) / "..";
  const auto path = root / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf";
  if (std::filesystem::exists(path)) return path;
  return std::nullopt;
}

}  // namespace dash::test

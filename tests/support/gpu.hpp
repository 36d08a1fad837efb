// GPU tests skip with a visible message where there is no device, and only there: on a machine
// with a GPU (DASH_REQUIRE_GPU=1, as the GPU runs set it) a missing device is a failure.
#pragma once

#include <doctest/doctest.h>

#include <cstdio>
#include <cstdlib>

#include "dash/core/cuda.hpp"
#include "support/skip.hpp"

namespace dash::test {

inline bool gpu_available() {
  const bool present = cuda::device_count() > 0;
  if (!present) {
    const char* required = std::getenv("DASH_REQUIRE_GPU");
    REQUIRE_MESSAGE(!(required && required[0] == '1'), "DASH_REQUIRE_GPU=1 but no CUDA device is visible");
    skipped() = true;
    std::printf("SKIPPED: %s: no CUDA device visible\n", doctest::getContextOptions()->currentTest->m_name);
  }
  return present;
}

}  // namespace dash::test

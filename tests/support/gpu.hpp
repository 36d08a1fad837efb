// GPU tests skip with a visible message where there is no device, and only there: on a machine
// with a GPU (DASH_REQUIRE_GPU=1, as the GPU runs set it) a missing device is a failure.
#pragma once

#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>

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

// Fills a kernel's output with NaN (all bits set, for bf16 and fp32 alike) before it runs, so
// that an element the kernel fails to write cannot pass a comparison.
template <class T>
void poison(cuda::DeviceTensor<T>& out) {
  out.fill_bytes(0xFF);
  cuda::check(cudaDeviceSynchronize(), "poison");
}

// ‖got − want‖₂ / ‖want‖₂ over all elements; infinity if anything is not finite.
inline double relative_l2(TensorView<const double> got, TensorView<const double> want) {
  REQUIRE_MESSAGE(got.shape == want.shape, "relative_l2: shapes differ");
  double diff = 0, norm = 0;
  for (index_t i = 0; i < got.numel(); ++i) {
    const double a = got.data[i], b = want.data[i];
    if (!std::isfinite(a) || !std::isfinite(b)) return std::numeric_limits<double>::infinity();
    diff += (a - b) * (a - b);
    norm += b * b;
  }
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}
inline double relative_l2(const Tensor<double>& got, const Tensor<double>& want) {
  return relative_l2(got.view(), want.view());
}

// Tolerances of a GPU result against the float64 reference, by the precision it is stored in.
inline constexpr double bf16_tolerance = 1e-2;
inline constexpr double fp32_tolerance = 1e-5;

}  // namespace dash::test

// Where a tensor's memory lives. Kernels take views tagged with it; the dispatch in each
// operator header picks the Eigen or the CUDA path from the tag.
#pragma once

#include <cstdint>
#include <string_view>

// Marks the small accessors of shapes and views that kernels call on the device too.
#if defined(__CUDACC__)
#define DASH_HOST_DEVICE __host__ __device__
#else
#define DASH_HOST_DEVICE
#endif

namespace dash {

enum class Device : std::uint8_t { cpu, cuda };

constexpr std::string_view name_of(Device d) { return d == Device::cpu ? "cpu" : "cuda"; }

}  // namespace dash

// Where a tensor's memory lives. Kernels take views tagged with it; the dispatch in each
// operator header picks the Eigen or the CUDA path from the tag.
#pragma once

#include <cstdint>
#include <string_view>

namespace dash {

enum class Device : std::uint8_t { cpu, cuda };

constexpr std::string_view name_of(Device d) { return d == Device::cpu ? "cpu" : "cuda"; }

}  // namespace dash

// Out-of-range token ids met on the device, reported without a host synchronisation. A kernel
// that reads ids records the first offending one in a 64-bit device word, by atomicMin of
// (position << 32 | id), so the smallest position wins whatever the order of the threads; all
// bits set means none. The launcher resets the word on its stream; the caller copies it back
// whenever it next synchronises and decodes it with invalid_token().
#pragma once

#include <cstdint>
#include <optional>

#include "dash/core/cuda.hpp"

namespace dash::cuda::model {

inline constexpr unsigned long long no_invalid_token = ~0ull;

struct InvalidToken {
  index_t position = 0;  // index into the ids (or targets) array
  int id = 0;
};

inline std::optional<InvalidToken> invalid_token(unsigned long long word) {
  if (word == no_invalid_token) return std::nullopt;
  return InvalidToken{index_t(word >> 32), int(std::uint32_t(word & 0xffffffffu))};
}

__device__ __forceinline__ void report_invalid_token(unsigned long long* word, index_t position, int id) {
  atomicMin(word, (static_cast<unsigned long long>(position) << 32) | static_cast<std::uint32_t>(id));
}

inline void reset_invalid_token(unsigned long long* word, cudaStream_t stream) {
  check(cudaMemsetAsync(word, 0xFF, sizeof(unsigned long long), stream), "reset invalid-token word");
}

}  // namespace dash::cuda::model

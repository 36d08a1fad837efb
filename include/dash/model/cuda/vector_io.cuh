// Loads and stores of kWidth consecutive bf16 or fp32 elements as fp32 registers: one 16-byte
// access per 8 bf16 (two per 8 fp32) when kWidth is 8, one scalar access when it is 1. The
// launchers pick kWidth = 8 only where every row start is 16-byte aligned (see aligned_rows).
#pragma once

#include <cstdint>

#include "dash/core/cuda.hpp"

namespace dash::cuda::model {

template <class T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, bfloat16>)
    return __bfloat162float(v);
  else
    return v;
}

template <class T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, bfloat16>)
    return __float2bfloat16_rn(v);
  else
    return v;
}

// v rounded to T and widened back: the value a T store followed by a load would give.
template <class T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

template <int kWidth, class T>
__device__ __forceinline__ void load_vector(const T* p, float (&out)[kWidth]) {
  static_assert(kWidth == 1 || kWidth == 8, "vector width is 1 or 8 elements");
  if constexpr (kWidth == 1) {
    out[0] = to_float(*p);
  } else if constexpr (std::is_same_v<T, bfloat16>) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const auto* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(pairs[i]);
      out[2 * i] = f.x, out[2 * i + 1] = f.y;
    }
  } else {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
  }
}

template <int kWidth, class T>
__device__ __forceinline__ void store_vector(T* p, const float (&in)[kWidth]) {
  static_assert(kWidth == 1 || kWidth == 8, "vector width is 1 or 8 elements");
  if constexpr (kWidth == 1) {
    *p = from_float<T>(in[0]);
  } else if constexpr (std::is_same_v<T, bfloat16>) {
    uint4 raw;
    auto* pairs = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) pairs[i] = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
    reinterpret_cast<float4*>(p)[0] = make_float4(in[0], in[1], in[2], in[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(in[4], in[5], in[6], in[7]);
  }
}

// True when p + r·row_stride is 16-byte aligned for every row r and the row width is a whole
// number of 8-element vectors: the condition for kWidth = 8.
template <class T>
inline bool aligned_rows(const T* p, std::int64_t row_stride, std::int64_t width) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0 && (row_stride * std::int64_t(sizeof(T))) % 16 == 0 &&
         width % 8 == 0;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

}  // namespace dash::cuda::model

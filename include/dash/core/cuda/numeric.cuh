// Register-level numerics shared by the kernels: pairs of bf16 in one 32-bit register (the
// operand format of the tensor cores: the lower column in the low half) and 2^x on the special
// function unit.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace dash::cuda::ptx {

// Two floats rounded to nearest-even bf16, `low` in the low half.
__device__ __forceinline__ std::uint32_t pack_bf16x2(float low, float high) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
  return *reinterpret_cast<const std::uint32_t*>(&pair);
}

// The two bf16 of `packed` times the two bf16 of `factors` (one bf16 rounding).
__device__ __forceinline__ std::uint32_t mul_bf16x2(std::uint32_t packed, std::uint32_t factors) {
  const __nv_bfloat162 v = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&packed),
                                   *reinterpret_cast<const __nv_bfloat162*>(&factors));
  return *reinterpret_cast<const std::uint32_t*>(&v);
}

// 2^x by the hardware's approximation (MUFU.EX2, about 2 ulp, denormals flushed): −∞ and very
// negative x give +0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace dash::cuda::ptx

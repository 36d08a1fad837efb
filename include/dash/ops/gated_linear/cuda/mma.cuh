// Warp-level tensor-core primitives of the GatedLinear kernels (sm_80+): the bf16 mma.sync
// m16n8k16 with fp32 accumulators, ldmatrix, cp.async, and the swizzled layout of the shared
// memory tiles they read.
//
// Fragments of m16n8k16 (g = lane / 4, t = lane % 4): A (16×16, row-major) a0 = (g, 2t..2t+1),
// a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..); B (16×8) b0 = (k 2t..2t+1, n g),
// b1 = (k 2t+8.., n g); C/D (16×8) c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1).
//
// Tiles are row-major bf16 with rows of RowBytes (a multiple of 32), stored in 16-byte units
// whose index is XOR-ed with a function of the row, so that the 8 rows one ldmatrix phase reads
// (same logical unit, 8 consecutive rows) fall in 8 distinct groups of 4 banks.
#pragma once

#include <cstdint>

#include "dash/core/cuda.hpp"

namespace dash::cuda::gla::detail {

template <int RowBytes>
__device__ __forceinline__ std::uint32_t tile_offset(int row, int unit) {
  static_assert(RowBytes % 32 == 0, "tile rows hold at least two 16-byte units");
  constexpr int units = RowBytes / 16;
  constexpr int rows_per_phase = units >= 8 ? 1 : 8 / units;  // rows sharing one 128-byte line
  constexpr int phases = units >= 8 ? 8 : units;
  return std::uint32_t(row * RowBytes + ((unit ^ ((row / rows_per_phase) % phases)) << 4));
}

// Byte offset of element (row, col) of a bf16 tile.
template <int RowBytes>
__device__ __forceinline__ std::uint32_t element_offset(int row, int col) {
  return tile_offset<RowBytes>(row, col >> 3) + std::uint32_t((col & 7) << 1);
}

__device__ __forceinline__ std::uint32_t shared_address(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], std::uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}
__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t (&r)[4], std::uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}
__device__ __forceinline__ void ldmatrix_x2(std::uint32_t (&r)[2], std::uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(address));
}
__device__ __forceinline__ void ldmatrix_x2_trans(std::uint32_t (&r)[2], std::uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(address));
}

// d += a·b
__device__ __forceinline__ void mma_bf16(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                         std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ std::uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&v);
}

// The two bf16 of `packed` times the two bf16 of `factors` (one bf16 rounding).
__device__ __forceinline__ std::uint32_t mul_bf16x2(std::uint32_t packed, std::uint32_t factors) {
  const __nv_bfloat162 v = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&packed),
                                   *reinterpret_cast<const __nv_bfloat162*>(&factors));
  return *reinterpret_cast<const std::uint32_t*>(&v);
}

// 2^x (MUFU.EX2; relative error about 2⁻²²; 0 for very negative x).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ void cp_async_16(std::uint32_t shared, const void* global) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared), "l"(global));
}
__device__ __forceinline__ void cp_async_4(std::uint32_t shared, const void* global) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(shared), "l"(global));
}
__device__ __forceinline__ void st_shared_zero_16(std::uint32_t shared) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(shared), "r"(0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
}

}  // namespace dash::cuda::gla::detail

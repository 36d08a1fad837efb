// Shared memory of the kernels: its 32-bit addresses, stores to it, the asynchronous copies
// from global memory into it (cp.async, sm_80 and later), and the layouts of the bf16 tiles
// kept there.
//
// cp.async moves 4 or 16 bytes per thread without a register round trip. The `_or_zero` forms
// take a source size of 0 when !valid: the destination is zero-filled and the source (which
// must still be a valid address) is not read. A thread's copies complete in the groups it
// commits; cp_async_wait<N>() returns once at most N of its groups are still in flight, and a
// barrier then makes the data visible to the other threads.
//
// Tile layouts give the byte offset of the 16-byte chunk holding columns [8·c8, 8·c8 + 8) of
// row r; consecutive rows are row_bytes apart. The swizzled layouts XOR the chunk index with a
// function of the row so that the 8 rows one ldmatrix phase (or a column walk) touches fall in
// 8 distinct groups of 4 banks; the padded one gets the same from a 16-byte row pitch padding.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dash::cuda {

namespace ptx {

// The shared-state-space address of a generic pointer into shared memory.
__device__ __forceinline__ std::uint32_t shared_address(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void st_shared_u16(std::uint32_t dst, unsigned short value) {
  asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(dst), "h"(value) : "memory");
}
__device__ __forceinline__ void st_shared_u32(std::uint32_t dst, std::uint32_t value) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(dst), "r"(value) : "memory");
}
__device__ __forceinline__ void st_shared_v2_f32(std::uint32_t dst, float x, float y) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(dst), "f"(x), "f"(y) : "memory");
}
__device__ __forceinline__ void st_shared_zero_16(std::uint32_t dst) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(dst), "r"(0));
}

// 16 bytes, bypassing L1 (.cg).
__device__ __forceinline__ void cp_async_16(std::uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_16_or_zero(std::uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
// 4 bytes, through L1 (.ca: .cg takes only 16).
__device__ __forceinline__ void cp_async_4_or_zero(std::uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
}

}  // namespace ptx

// The canonical 128-byte-swizzled layout of Hopper's tensor-core descriptors and of TMA's
// 128-byte swizzle: columns in blocks ("atoms") of 64 bf16, each block Rows × 128 bytes, and
// within a row chunk c8 stored at c8 ⊕ (r mod 8) (bank-conflict free for both row and column
// access). The pattern repeats every 8 rows, so tiles start on 1024-byte boundaries.
template <int Rows>
struct Swizzled128 {
  static constexpr int row_bytes = 128;
  static __device__ __forceinline__ std::uint32_t chunk(int r, int c8) {
    return (c8 / 8) * (Rows * 128) + r * 128 + (((c8 ^ r) & 7) * 16);
  }
};

// Plain row-major rows of Cols + 8 bf16: the 16 bytes of padding put the eight 16-byte rows an
// ldmatrix reads in distinct banks.
template <int Cols>
struct Padded {
  static constexpr int row_bytes = (Cols + 8) * 2;
  static __device__ __forceinline__ std::uint32_t chunk(int r, int c8) { return r * row_bytes + c8 * 16; }
};

// Whole rows of RowBytes (a multiple of 32) in one row-major tile, chunk `unit` of row `row`
// stored at unit ⊕ f(row): rows of 128 bytes or more XOR with row mod 8; narrower rows share a
// 128-byte line with their neighbours and XOR with (row / rows per line) mod (chunks per row).
// For RowBytes = 128 this is Swizzled128 within one atom; wider rows stay contiguous instead
// of splitting into atoms.
template <int RowBytes>
__device__ __forceinline__ std::uint32_t swizzled_row_offset(int row, int unit) {
  static_assert(RowBytes % 32 == 0, "tile rows hold at least two 16-byte units");
  constexpr int units = RowBytes / 16;
  constexpr int rows_per_phase = units >= 8 ? 1 : 8 / units;  // rows sharing one 128-byte line
  constexpr int phases = units >= 8 ? 8 : units;
  return std::uint32_t(row * RowBytes + ((unit ^ ((row / rows_per_phase) % phases)) << 4));
}

// Byte offset of element (row, col) of a bf16 tile in the layout of swizzled_row_offset.
template <int RowBytes>
__device__ __forceinline__ std::uint32_t swizzled_element_offset(int row, int col) {
  return swizzled_row_offset<RowBytes>(row, col >> 3) + std::uint32_t((col & 7) << 1);
}

}  // namespace dash::cuda

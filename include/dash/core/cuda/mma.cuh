// Warp-level tensor cores (sm_80 and later): the bf16 mma.sync m16n8k16 with fp32 accumulators
// and ldmatrix, which loads its operands from shared memory.
//
// Fragments of m16n8k16 (g = lane / 4, t = lane % 4), each register two bf16 or two floats of
// adjacent columns: A (16×16, row-major) a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..),
// a3 = (g+8, 2t+8..); B (16×8, k × n) b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g); C/D (16×8)
// c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1). So the accumulators of two adjacent n8 tiles,
// packed to bf16 pairs, are the A fragment of the next product over those 16 columns.
//
// ldmatrix .x4 loads four 8×8 b16 matrices whose rows lanes 8i … 8i + 7 address (.x2: two,
// lanes 0 … 15); thread `lane` receives from matrix i the pair (row lane / 4, columns 2·(lane % 4)
// + {0, 1}), or with .trans the same of the transposed matrix, in register i.
#pragma once

#include <cstdint>

namespace dash::cuda::ptx {

// d += a·b for one 16×8 tile, depth 16: bf16 operands, fp32 accumulation.
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                                  std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
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

}  // namespace dash::cuda::ptx

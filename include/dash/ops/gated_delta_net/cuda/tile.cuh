// Warp-level building blocks of the GatedDeltaNet kernels: bf16 tiles in shared memory, the
// m16n8k16 tensor-core product on them, register fragments with their (row, col) coordinates,
// and the moves between global and shared memory.
//
// Every chunk-level product C (M×N) += A (M×K) · B (K×N) reads A and B from shared tiles whose
// rows are padded by 16 bytes (pitch = cols + 8), so that the eight 16-byte rows of an ldmatrix
// land in distinct bank groups. An operand is row-major (element (r, c) at r·ld + c) or
// col-major (at c·ld + r); ldmatrix's .trans variant covers the layouts where the depth index
// is not contiguous. A block of W warps splits C into warps_m × warps_n rectangles of
// mi 16-row by ni 8-column fragments; fragment element r of thread `lane` sits at
//   row = 16·i + lane/4 + 8·(r/2),   col = 8·j + 2·(lane%4) + r%2.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "dash/core/cuda.hpp"
#include "dash/core/cuda/mma.cuh"
#include "dash/core/cuda/shared.cuh"

namespace dash::cuda::gdn::detail {

// Tokens per chunk of the chunked form, and the checkpoint interval.
inline constexpr int chunk = 64;

// Row pitch, in elements, of a shared bf16 tile with `cols` columns.
constexpr int pitch(int cols) { return cols + 8; }

// Row pitch of a shared fp32 chunk × chunk matrix (odd, so that columns spread over the banks).
inline constexpr int square_pitch = chunk + 1;

enum class Layout { row_major, col_major };

// A fragment of A (16×16) at (m0, k0).
template <Layout L>
__device__ __forceinline__ void load_a(std::uint32_t (&a)[4], const bfloat16* base, int ld, int m0, int k0) {
  const int lane = threadIdx.x % 32;
  if constexpr (L == Layout::row_major) {
    ptx::ldmatrix_x4(a, ptx::shared_address(base + (m0 + lane % 16) * ld + k0 + (lane / 16) * 8));
  } else {
    // The four 8×8 pieces (m 0-7 | 8-15) × (k 0-7 | 8-15), stored k-major, loaded transposed.
    const int piece = lane / 8;
    ptx::ldmatrix_x4_trans(a,
                           ptx::shared_address(base + (k0 + (piece / 2) * 8 + lane % 8) * ld + m0 + (piece % 2) * 8));
  }
}

// Two neighbouring fragments of B (16×8 each) at (k0, n0) and (k0, n0 + 8).
template <Layout L>
__device__ __forceinline__ void load_b_pair(std::uint32_t (&b0)[2], std::uint32_t (&b1)[2], const bfloat16* base,
                                            int ld, int k0, int n0) {
  const int lane = threadIdx.x % 32, piece = lane / 8;
  std::uint32_t r[4];
  if constexpr (L == Layout::col_major)
    ptx::ldmatrix_x4(r, ptx::shared_address(base + (n0 + (piece / 2) * 8 + lane % 8) * ld + k0 + (piece % 2) * 8));
  else
    ptx::ldmatrix_x4_trans(r,
                           ptx::shared_address(base + (k0 + (piece % 2) * 8 + lane % 8) * ld + n0 + (piece / 2) * 8));
  b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
}

// One fragment of B (16×8) at (k0, n0).
template <Layout L>
__device__ __forceinline__ void load_b(std::uint32_t (&b)[2], const bfloat16* base, int ld, int k0, int n0) {
  const int lane = threadIdx.x % 32, piece = (lane / 8) % 2;
  if constexpr (L == Layout::col_major)
    ptx::ldmatrix_x2(b, ptx::shared_address(base + (n0 + lane % 8) * ld + k0 + piece * 8));
  else
    ptx::ldmatrix_x2_trans(b, ptx::shared_address(base + (k0 + piece * 8 + lane % 8) * ld + n0));
}

// How W warps split an M×N product.
template <int M, int N, int Warps>
struct Tiling {
  static constexpr int warps_m = M / 16 < Warps ? M / 16 : Warps;
  static constexpr int warps_n = Warps / warps_m;
  static constexpr int mi = M / (16 * warps_m);
  static constexpr int ni = N / (8 * warps_n);
  static_assert(warps_m * warps_n == Warps && mi * 16 * warps_m == M && ni * 8 * warps_n == N,
                "the product does not split evenly over the warps");
};

// This thread's share of an M×N fp32 product held in registers.
template <int M, int N, int Warps>
struct Fragments {
  using tiling = Tiling<M, N, Warps>;
  static constexpr int mi = tiling::mi, ni = tiling::ni, warps_n = tiling::warps_n;

  float x[mi][ni][4];
  int row0, col0;  // this warp's corner

  __device__ Fragments() {
    const int warp = threadIdx.x / 32;
    row0 = (warp % tiling::warps_m) * mi * 16;
    col0 = (warp / tiling::warps_m) * ni * 8;
    fill(0.f);
  }

  __device__ void fill(float value) {
#pragma unroll
    for (int i = 0; i < mi; ++i)
#pragma unroll
      for (int j = 0; j < ni; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) x[i][j][r] = value;
  }

  // f(row, col, float& value) for every element this thread holds.
  template <class F>
  __device__ void for_each(F&& f) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < mi; ++i)
#pragma unroll
      for (int j = 0; j < ni; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r)
          f(row0 + i * 16 + lane / 4 + (r / 2) * 8, col0 + j * 8 + (lane % 4) * 2 + r % 2, x[i][j][r]);
  }

  // f(row, col, float& mine, float theirs) over this and another product of the same shape.
  template <class F>
  __device__ void for_each_with(const Fragments& other, F&& f) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < mi; ++i)
#pragma unroll
      for (int j = 0; j < ni; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r)
          f(row0 + i * 16 + lane / 4 + (r / 2) * 8, col0 + j * 8 + (lane % 4) * 2 + r % 2, x[i][j][r],
            other.x[i][j][r]);
  }

  // Writes round(f(row, col, value)) into a shared bf16 tile, two columns at a time.
  template <class F>
  __device__ void store(bfloat16* tile, int ld, F&& f) const {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < mi; ++i)
#pragma unroll
      for (int j = 0; j < ni; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = row0 + i * 16 + lane / 4 + h * 8, col = col0 + j * 8 + (lane % 4) * 2;
          *reinterpret_cast<__nv_bfloat162*>(tile + row * ld + col) =
              __floats2bfloat162_rn(f(row, col, x[i][j][2 * h]), f(row, col + 1, x[i][j][2 * h + 1]));
        }
  }
  __device__ void store(bfloat16* tile, int ld) const {
    store(tile, ld, [](int, int, float v) { return v; });
  }

  // Row sums of f(row, col, value) over this warp's columns, written (not added) to
  // partial[warp_n · M + row]: the warps_n partial sums of a row are combined by the caller in
  // a fixed order, so the result does not depend on scheduling.
  template <class F>
  __device__ void row_partials(float* partial, F&& f) const {
    const int lane = threadIdx.x % 32, warp_n = (threadIdx.x / 32) / tiling::warps_m;
#pragma unroll
    for (int i = 0; i < mi; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row0 + i * 16 + lane / 4 + h * 8;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < ni; ++j) {
          const int col = col0 + j * 8 + (lane % 4) * 2;
          sum += f(row, col, x[i][j][2 * h]) + f(row, col + 1, x[i][j][2 * h + 1]);
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        if (lane % 4 == 0) partial[warp_n * M + row] = sum;
      }
  }
};

// acc += A · B over depth K, both operands in shared memory.
template <int K, Layout LA, Layout LB, int M, int N, int Warps>
__device__ __forceinline__ void mma_tile(Fragments<M, N, Warps>& acc, const bfloat16* a, int lda, const bfloat16* b,
                                         int ldb) {
  using F = Fragments<M, N, Warps>;
  static_assert(K % 16 == 0, "the depth of a product is a multiple of 16");
#pragma unroll
  for (int k0 = 0; k0 < K; k0 += 16) {
    std::uint32_t af[F::mi][4], bf[F::ni][2];
#pragma unroll
    for (int i = 0; i < F::mi; ++i) load_a<LA>(af[i], a, lda, acc.row0 + i * 16, k0);
#pragma unroll
    for (int j = 0; j + 1 < F::ni; j += 2) load_b_pair<LB>(bf[j], bf[j + 1], b, ldb, k0, acc.col0 + j * 8);
    if constexpr (F::ni % 2 == 1) load_b<LB>(bf[F::ni - 1], b, ldb, k0, acc.col0 + (F::ni - 1) * 8);
#pragma unroll
    for (int i = 0; i < F::mi; ++i)
#pragma unroll
      for (int j = 0; j < F::ni; ++j) ptx::mma_m16n8k16_bf16(acc.x[i][j], af[i], bf[j][0], bf[j][1]);
  }
}

// Rows × Cols bf16 tile from global memory (rows `ld` elements apart, every element present:
// workspace tiles are padded) into a shared tile, asynchronously; the caller commits and waits.
template <int Rows, int Cols, int Threads>
__device__ __forceinline__ void load_tile_async(bfloat16* tile, const bfloat16* src, std::int64_t ld) {
  constexpr int per_row = Cols / 8;
  for (int e = threadIdx.x; e < Rows * per_row; e += Threads) {
    const int r = e / per_row, c = (e % per_row) * 8;
    ptx::cp_async_16(ptx::shared_address(tile + r * pitch(Cols) + c), src + r * ld + c);
  }
}

// Rows × Cols tile of a raw [.., D] input: element (r, c) is src[r·ld + col0 + c] when r < rows
// and col0 + c < D, else zero. With `vector` (D % 8 == 0 and 16-byte aligned rows) it moves 16
// bytes per asynchronous copy (the caller commits and waits); otherwise element by element.
template <int Rows, int Cols, int Threads>
__device__ __forceinline__ void load_rows(bfloat16* tile, const bfloat16* src, std::int64_t ld, int col0, int rows,
                                          int D, bool vector) {
  if (vector) {
    constexpr int per_row = Cols / 8;
    for (int e = threadIdx.x; e < Rows * per_row; e += Threads) {
      const int r = e / per_row, c = (e % per_row) * 8;
      const bool inside = r < rows && col0 + c < D;
      ptx::cp_async_16_or_zero(ptx::shared_address(tile + r * pitch(Cols) + c), inside ? src + r * ld + col0 + c : src,
                               inside);
    }
  } else {
    for (int e = threadIdx.x; e < Rows * Cols; e += Threads) {
      const int r = e / Cols, c = e % Cols;
      tile[r * pitch(Cols) + c] = r < rows && col0 + c < D ? src[r * ld + col0 + c] : __float2bfloat16(0.f);
    }
  }
}

// A shared Rows × Cols tile to global memory (rows `ld` elements apart, all present), 16 bytes
// per store.
template <int Rows, int Cols, int Threads>
__device__ __forceinline__ void store_tile(bfloat16* dst, std::int64_t ld, const bfloat16* tile) {
  constexpr int per_row = Cols / 8;
  for (int e = threadIdx.x; e < Rows * per_row; e += Threads) {
    const int r = e / per_row, c = (e % per_row) * 8;
    *reinterpret_cast<int4*>(dst + r * ld + c) = *reinterpret_cast<const int4*>(tile + r * pitch(Cols) + c);
  }
}

// The rows < `rows` and columns < D of a shared tile to a raw [.., D] output (row r at dst + r·ld).
template <int Rows, int Cols, int Threads>
__device__ __forceinline__ void store_rows(bfloat16* dst, std::int64_t ld, int rows, int D, const bfloat16* tile,
                                           bool vector) {
  if (vector) {
    constexpr int per_row = Cols / 8;
    for (int e = threadIdx.x; e < Rows * per_row; e += Threads) {
      const int r = e / per_row, c = (e % per_row) * 8;
      if (r < rows && c < D)
        *reinterpret_cast<int4*>(dst + r * ld + c) = *reinterpret_cast<const int4*>(tile + r * pitch(Cols) + c);
    }
  } else {
    for (int e = threadIdx.x; e < Rows * Cols; e += Threads) {
      const int r = e / Cols, c = e % Cols;
      if (r < rows && c < D) dst[r * ld + c] = tile[r * pitch(Cols) + c];
    }
  }
}

// In place, each row x of a shared Rows × Cols tile becomes x̂ = x / sqrt(‖x‖² + eps), computed in
// fp32 from the stored values and rounded once. When `scaled` is given it also receives
// factor(row) · x̂ (rounded once from fp32). inv_norm (if given) keeps 1 / sqrt(‖x‖² + eps).
template <int Rows, int Cols, int Warps, class Factor>
__device__ __forceinline__ void normalize_rows(bfloat16* tile, float eps, float* inv_norm, bfloat16* scaled,
                                               Factor&& factor) {
  static_assert(Cols % 32 == 0, "rows are split evenly over the lanes");
  constexpr int per_lane = Cols / 32;
  const int lane = threadIdx.x % 32;
  for (int r = threadIdx.x / 32; r < Rows; r += Warps) {
    bfloat16* row = tile + r * pitch(Cols) + lane * per_lane;
    float x[per_lane], ss = 0.f;
#pragma unroll
    for (int e = 0; e < per_lane; ++e) x[e] = __bfloat162float(row[e]), ss += x[e] * x[e];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, offset);
    const float inv = 1.f / sqrtf(ss + eps);
    if (inv_norm && lane == 0) inv_norm[r] = inv;
#pragma unroll
    for (int e = 0; e < per_lane; ++e) row[e] = __float2bfloat16(x[e] * inv);
    if (scaled) {
      const float f = factor(r) * inv;
      bfloat16* out = scaled + r * pitch(Cols) + lane * per_lane;
#pragma unroll
      for (int e = 0; e < per_lane; ++e) out[e] = __float2bfloat16(x[e] * f);
    }
  }
}
template <int Rows, int Cols, int Warps>
__device__ __forceinline__ void normalize_rows(bfloat16* tile, float eps, float* inv_norm) {
  normalize_rows<Rows, Cols, Warps>(tile, eps, inv_norm, nullptr, [](int) { return 1.f; });
}

}  // namespace dash::cuda::gdn::detail

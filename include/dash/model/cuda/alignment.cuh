// The element-wise and reduction kernels of candidate preparation on the GPU (prepare.cuh;
// the CPU's search/prepare.hpp). For a candidate's output y and the teacher's attention output A
// (fp32 [n] each, n = rows·d):
//
//   squared_norm      den = Σ A²
//   alignment         error = Σ (y − A)² / den  and  dy = ∂error/∂y = 2 (y − A) / den (bf16)
//   output_scale      s = <y, A> / <y, y>, the least-squares factor of the first step (1 when
//                     <y, y> is 0 or the ratio is not finite, as on the CPU)
//   add_into          x += A (the teacher's residual stream after the target is taken)
//   column_sums       Σ_r x[r, c] of a bf16 matrix (the bias gradients), fp32
//   adam              m ← β1·m + (1−β1)·g,  v ← β2·v + (1−β2)·g²,  x ← x − lr·m̂ / (√v̂ + ε)
//                     on fp32 masters, then the bf16 (or fp32) copy the forward reads, which may
//                     be a strided block of a wider matrix; optionally x ← s·x first (the scale)
//
// Sums are deterministic: each block adds a fixed slice in fp32 and writes a double partial;
// one block adds the partials in order.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cub/block/block_reduce.cuh>

#include "dash/core/cuda.hpp"
#include "dash/core/error.hpp"

namespace dash::cuda::model {

inline constexpr int alignment_blocks = 264;  // two per SM of an H100/H200
inline constexpr int column_row_splits = 16;

// Scratch doubles of one reduction (3 sums × blocks).
inline constexpr std::size_t alignment_partials_count() { return 3 * std::size_t(alignment_blocks); }

struct AlignmentParams {
  const float* y = nullptr;       // [n] or null (squared_norm)
  const float* target = nullptr;  // [n]
  index_t n = 0;
  const float* den = nullptr;     // Σ A², device (alignment)
  bfloat16* dy = nullptr;         // [n] (alignment)
  double* partials = nullptr;     // alignment_partials_count()
  float* result = nullptr;        // one value
};

struct AdamParams {
  float* master = nullptr;  // [n] fp32
  float* m = nullptr;       // [n]
  float* v = nullptr;       // [n]
  const float* grad = nullptr;   // [n], or null: only the scale and the copy
  index_t n = 0;
  float lr = 0, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f;
  float correction1 = 1, correction2 = 1;  // 1 − β^t
  const float* scale = nullptr;  // device factor applied to the master first, or null
  bfloat16* copy = nullptr;      // element i at copy[(i / cols)·copy_stride + i % cols], or
  float* copy_f32 = nullptr;     // contiguous fp32 (exactly one of the two)
  index_t cols = 1, copy_stride = 1;
};

namespace detail {

enum class AlignmentKind { squared_norm, error, scale };

template <int Threads, AlignmentKind Kind>
__global__ void __launch_bounds__(Threads) alignment_partials_kernel(AlignmentParams p) {
  using Reduce = cub::BlockReduce<double, Threads>;
  __shared__ typename Reduce::TempStorage storage;
  float s0 = 0, s1 = 0;
  const float inv_den = Kind == AlignmentKind::error ? 1.0f / *p.den : 0.0f;
  for (index_t i = index_t(blockIdx.x) * Threads + threadIdx.x; i < p.n; i += index_t(gridDim.x) * Threads) {
    const float a = p.target[i];
    if constexpr (Kind == AlignmentKind::squared_norm) {
      s0 += a * a;
    } else if constexpr (Kind == AlignmentKind::error) {
      const float diff = p.y[i] - a;
      s0 += diff * diff;
      p.dy[i] = __float2bfloat16_rn(2.0f * diff * inv_den);
    } else {
      const float y = p.y[i];
      s0 += y * a, s1 += y * y;
    }
  }
  const double t0 = Reduce(storage).Sum(double(s0));
  __syncthreads();
  const double t1 = Reduce(storage).Sum(double(s1));
  if (threadIdx.x == 0) p.partials[blockIdx.x] = t0, p.partials[gridDim.x + blockIdx.x] = t1;
}

template <int Threads, AlignmentKind Kind>
__global__ void __launch_bounds__(Threads) alignment_total_kernel(AlignmentParams p, int blocks) {
  using Reduce = cub::BlockReduce<double, Threads>;
  __shared__ typename Reduce::TempStorage storage;
  double s0 = 0, s1 = 0;
  for (int b = int(threadIdx.x); b < blocks; b += Threads) s0 += p.partials[b], s1 += p.partials[blocks + b];
  const double t0 = Reduce(storage).Sum(s0);
  __syncthreads();
  const double t1 = Reduce(storage).Sum(s1);
  if (threadIdx.x != 0) return;
  if constexpr (Kind == AlignmentKind::squared_norm) {
    *p.result = float(t0);
  } else if constexpr (Kind == AlignmentKind::error) {
    *p.result = float(t0 / double(*p.den));
  } else {
    const double s = t0 / t1;
    *p.result = t1 > 0 && isfinite(s) ? float(s) : 1.0f;
  }
}

template <int Threads>
__global__ void __launch_bounds__(Threads) add_into_kernel(float* x, const float* a, index_t n) {
  for (index_t i = index_t(blockIdx.x) * Threads + threadIdx.x; i < n; i += index_t(gridDim.x) * Threads) x[i] += a[i];
}

// Block (x: 32 columns, y: one of column_row_splits row slices) of 32 × 8 threads.
template <int Rows>
__global__ void __launch_bounds__(32 * Rows)
    column_partials_kernel(const bfloat16* x, index_t rows, index_t cols, index_t ld, float* partials) {
  __shared__ float sums[Rows][32];
  const index_t c = index_t(blockIdx.x) * 32 + threadIdx.x;
  const index_t per_split = (rows + gridDim.y - 1) / gridDim.y;
  const index_t first = index_t(blockIdx.y) * per_split, last = std::min(rows, first + per_split);
  float s = 0;
  if (c < cols)
    for (index_t r = first + threadIdx.y; r < last; r += Rows) s += __bfloat162float(x[r * ld + c]);
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y != 0 || c >= cols) return;
  float total = 0;
  for (int i = 0; i < Rows; ++i) total += sums[i][threadIdx.x];
  partials[index_t(blockIdx.y) * cols + c] = total;
}

template <int Threads>
__global__ void __launch_bounds__(Threads) column_totals_kernel(const float* partials, index_t cols, int splits,
                                                                float* out) {
  const index_t c = index_t(blockIdx.x) * Threads + threadIdx.x;
  if (c >= cols) return;
  float total = 0;
  for (int s = 0; s < splits; ++s) total += partials[index_t(s) * cols + c];
  out[c] = total;
}

template <int Threads>
__global__ void __launch_bounds__(Threads) adam_kernel(AdamParams p) {
  const float scale = p.scale ? *p.scale : 1.0f;
  for (index_t i = index_t(blockIdx.x) * Threads + threadIdx.x; i < p.n; i += index_t(gridDim.x) * Threads) {
    float x = p.master[i] * scale;
    if (p.grad) {
      const float g = p.grad[i];
      const float m = p.beta1 * p.m[i] + (1 - p.beta1) * g;
      const float v = p.beta2 * p.v[i] + (1 - p.beta2) * g * g;
      p.m[i] = m, p.v[i] = v;
      x -= p.lr * (m / p.correction1) / (sqrtf(v / p.correction2) + p.eps);
    }
    p.master[i] = x;
    if (p.copy)
      p.copy[(i / p.cols) * p.copy_stride + i % p.cols] = __float2bfloat16_rn(x);
    else
      p.copy_f32[i] = x;
  }
}

inline unsigned elementwise_grid(index_t n) {
  return unsigned(std::max<index_t>(1, std::min<index_t>((n + 255) / 256, 4 * 132)));
}

template <AlignmentKind Kind>
void alignment_reduce(const AlignmentParams& p, const char* what, cudaStream_t stream) {
  require(p.n >= 1, what, ": n = ", p.n, ", expected at least 1");
  require(p.target && p.partials && p.result, what, ": target, partials and result must not be null");
  alignment_partials_kernel<256, Kind><<<alignment_blocks, 256, 0, stream>>>(p);
  check(cudaGetLastError(), what);
  alignment_total_kernel<256, Kind><<<1, 256, 0, stream>>>(p, alignment_blocks);
  check(cudaGetLastError(), what);
}

}  // namespace detail

// result = Σ target².
inline void squared_norm(const AlignmentParams& p, cudaStream_t stream) {
  detail::alignment_reduce<detail::AlignmentKind::squared_norm>(p, "squared_norm", stream);
}

// result = Σ (y − target)² / den, dy = 2 (y − target) / den.
inline void alignment_error(const AlignmentParams& p, cudaStream_t stream) {
  require(p.y && p.den && p.dy, "alignment_error: y, den and dy must not be null");
  detail::alignment_reduce<detail::AlignmentKind::error>(p, "alignment_error", stream);
}

// result = <y, target> / <y, y> (1 where that is not a finite number).
inline void output_scale(const AlignmentParams& p, cudaStream_t stream) {
  require(p.y, "output_scale: y must not be null");
  detail::alignment_reduce<detail::AlignmentKind::scale>(p, "output_scale", stream);
}

inline void add_into(float* x, const float* a, index_t n, cudaStream_t stream) {
  require(x && a && n >= 1, "add_into: x and a must not be null and n = ", n, " at least 1");
  detail::add_into_kernel<256><<<detail::elementwise_grid(n), 256, 0, stream>>>(x, a, n);
  check(cudaGetLastError(), "add_into launch");
}

// Scratch floats of column_sums for `cols` columns.
inline std::size_t column_sums_scratch(index_t cols) { return std::size_t(column_row_splits) * std::size_t(cols); }

// out[c] = Σ_r x[r·ld + c] for c < cols (fp32, fixed order).
inline void column_sums(const bfloat16* x, index_t rows, index_t cols, index_t ld, float* scratch, float* out,
                        cudaStream_t stream) {
  require(x && scratch && out, "column_sums: x, scratch and out must not be null");
  require(rows >= 1 && cols >= 1 && ld >= cols, "column_sums: rows = ", rows, ", cols = ", cols, ", ld = ", ld,
          ", expected rows, cols ≥ 1 and ld ≥ cols");
  const dim3 grid(unsigned((cols + 31) / 32), unsigned(column_row_splits));
  detail::column_partials_kernel<8><<<grid, dim3(32, 8), 0, stream>>>(x, rows, cols, ld, scratch);
  check(cudaGetLastError(), "column_sums launch");
  detail::column_totals_kernel<256><<<unsigned((cols + 255) / 256), 256, 0, stream>>>(scratch, cols,
                                                                                      column_row_splits, out);
  check(cudaGetLastError(), "column_sums launch");
}

inline void adam(const AdamParams& p, cudaStream_t stream) {
  require(p.master && p.n >= 1, "adam: master must not be null and n = ", p.n, " at least 1");
  require(!p.grad || (p.m && p.v), "adam: m and v must not be null when a gradient is given");
  require((p.copy != nullptr) != (p.copy_f32 != nullptr), "adam: exactly one of copy and copy_f32 must be set");
  require(p.cols >= 1 && p.copy_stride >= p.cols && p.n % p.cols == 0, "adam: cols = ", p.cols,
          ", copy_stride = ", p.copy_stride, " for n = ", p.n, ", expected cols dividing n and copy_stride ≥ cols");
  require(p.correction1 > 0 && p.correction2 > 0, "adam: bias corrections must be positive");
  detail::adam_kernel<256><<<detail::elementwise_grid(p.n), 256, 0, stream>>>(p);
  check(cudaGetLastError(), "adam launch");
}

}  // namespace dash::cuda::model

// RMSNorm over rows of d (dash/model/rms_norm.hpp), statistics in fp32:
//   y = g ⊙ x · r,   r = 1 / sqrt(mean(x²) + ε)
// with the residual add in front of it fused when `add` is given (the decoder's r = x + Mixer(·)
// and x' = r + MLP(·) each feed a norm): s = x + add is rounded to the residual stream's type,
// stored, and normalised, so that a backward that reads s back sees the same values.
// Backward to the input (g is frozen, no dg), with x̂ = x·r:
//   dx (+)= r · (g⊙dy − x̂ · mean(x̂ ⊙ g⊙dy)) = r·g⊙dy − x · r³ · Σ(x⊙g⊙dy) / d
// One warp per row; the residual stream x (and dx) is bf16 or fp32, and so is dy. The backward
// can also write dx rounded to bf16, the operand of the GEMM that reads it next, which saves
// that GEMM a rounding pass of its own.
#pragma once

#include <type_traits>

#include "dash/core/cuda.hpp"
#include "dash/core/error.hpp"
#include "dash/model/cuda/vector_io.cuh"

namespace dash::cuda::model {

template <class Residual>
struct RmsNormForwardParams {
  const Residual* x = nullptr;       // [rows, d]
  const bfloat16* add = nullptr;     // optional [rows, d], added to x before the norm
  Residual* sum = nullptr;           // [rows, d]: x + add, when add is given (may be x itself)
  const bfloat16* weight = nullptr;  // g, [d]
  bfloat16* y = nullptr;             // [rows, d]
  index_t rows = 0;
  int d = 0;
  float eps = 1e-5f;
};

template <class Residual, class Grad, class Upstream = bfloat16>
struct RmsNormBackwardParams {
  const Residual* x = nullptr;       // [rows, d], the norm's input as the forward stored it
  const bfloat16* weight = nullptr;  // g, [d]
  const Upstream* dy = nullptr;      // [rows, d]
  Grad* dx = nullptr;                // [rows, d]
  bfloat16* dx_rounded = nullptr;    // optional [rows, d]: dx as stored, rounded to bf16
  index_t rows = 0;
  int d = 0;
  float eps = 1e-5f;
  bool accumulate = false;  // dx += ... (the residual stream's gradient) instead of dx = ...
};

namespace detail {

inline constexpr int norm_rows_per_block = 8;  // one warp each

template <class T>
constexpr bool is_residual_type = std::is_same_v<T, bfloat16> || std::is_same_v<T, float>;

template <int kWidth, class Residual>
__global__ void __launch_bounds__(32 * norm_rows_per_block) rms_norm_forward_kernel(RmsNormForwardParams<Residual> p) {
  const index_t row = index_t(blockIdx.x) * norm_rows_per_block + threadIdx.x / 32;
  if (row >= p.rows) return;
  const int lane = threadIdx.x % 32;
  const index_t base = row * p.d;
  float squares = 0;
  for (int c = lane * kWidth; c < p.d; c += 32 * kWidth) {
    float x[kWidth];
    load_vector(p.x + base + c, x);
    if (p.add) {
      float a[kWidth];
      load_vector(p.add + base + c, a);
#pragma unroll
      for (int j = 0; j < kWidth; ++j) x[j] = round_to<Residual>(x[j] + a[j]);
      store_vector(p.sum + base + c, x);
    }
#pragma unroll
    for (int j = 0; j < kWidth; ++j) squares += x[j] * x[j];
  }
  const float r = 1.0f / sqrtf(warp_sum(squares) / float(p.d) + p.eps);
  // The same lane wrote p.sum above: it reads its own stores back.
  const Residual* source = p.add ? p.sum : p.x;
  for (int c = lane * kWidth; c < p.d; c += 32 * kWidth) {
    float x[kWidth], g[kWidth];
    load_vector(source + base + c, x);
    load_vector(p.weight + c, g);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) x[j] = x[j] * g[j] * r;
    store_vector(p.y + base + c, x);
  }
}

template <int kWidth, class Residual, class Grad, class Upstream>
__global__ void __launch_bounds__(32 * norm_rows_per_block)
    rms_norm_backward_kernel(RmsNormBackwardParams<Residual, Grad, Upstream> p) {
  const index_t row = index_t(blockIdx.x) * norm_rows_per_block + threadIdx.x / 32;
  if (row >= p.rows) return;
  const int lane = threadIdx.x % 32;
  const index_t base = row * p.d;
  float squares = 0, projection = 0;  // Σ x², Σ x⊙g⊙dy
  for (int c = lane * kWidth; c < p.d; c += 32 * kWidth) {
    float x[kWidth], g[kWidth], dy[kWidth];
    load_vector(p.x + base + c, x);
    load_vector(p.weight + c, g);
    load_vector(p.dy + base + c, dy);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) squares += x[j] * x[j], projection += x[j] * g[j] * dy[j];
  }
  squares = warp_sum(squares);
  projection = warp_sum(projection);
  const float r = 1.0f / sqrtf(squares / float(p.d) + p.eps);
  const float along_x = r * r * r * projection / float(p.d);
  for (int c = lane * kWidth; c < p.d; c += 32 * kWidth) {
    float x[kWidth], g[kWidth], dy[kWidth], dx[kWidth];
    load_vector(p.x + base + c, x);
    load_vector(p.weight + c, g);
    load_vector(p.dy + base + c, dy);
    if (p.accumulate) {
      load_vector(p.dx + base + c, dx);
    } else {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) dx[j] = 0;
    }
#pragma unroll
    for (int j = 0; j < kWidth; ++j) dx[j] += r * g[j] * dy[j] - x[j] * along_x;
    store_vector(p.dx + base + c, dx);
    if (p.dx_rounded) store_vector(p.dx_rounded + base + c, dx);
  }
}

inline void validate_norm_size(index_t rows, int d, float eps, const char* what) {
  require(rows >= 1, what, ": rows = ", rows, ", expected at least 1");
  require(d >= 1, what, ": d = ", d, ", expected at least 1");
  require(eps > 0 && eps < 1, what, ": eps = ", eps, ", expected in (0, 1)");
}

inline dim3 norm_grid(index_t rows) { return dim3(unsigned((rows + norm_rows_per_block - 1) / norm_rows_per_block)); }

}  // namespace detail

template <class Residual>
  requires detail::is_residual_type<Residual>
void rms_norm_forward(const RmsNormForwardParams<Residual>& p, cudaStream_t stream) {
  detail::validate_norm_size(p.rows, p.d, p.eps, "rms_norm_forward");
  require(p.x != nullptr, "rms_norm_forward: x is null");
  require(p.weight != nullptr, "rms_norm_forward: weight is null");
  require(p.y != nullptr, "rms_norm_forward: y is null");
  require(!p.add || p.sum, "rms_norm_forward: add is given but sum (where x + add goes) is null");
  require(p.add || !p.sum, "rms_norm_forward: sum is given without add");
  const bool wide = aligned_rows(p.x, p.d, p.d) && aligned_rows(p.y, p.d, p.d) && aligned_rows(p.weight, 0, p.d) &&
                    (!p.add || (aligned_rows(p.add, p.d, p.d) && aligned_rows(p.sum, p.d, p.d)));
  const dim3 grid = detail::norm_grid(p.rows), block(32 * detail::norm_rows_per_block);
  if (wide)
    detail::rms_norm_forward_kernel<8><<<grid, block, 0, stream>>>(p);
  else
    detail::rms_norm_forward_kernel<1><<<grid, block, 0, stream>>>(p);
  check(cudaGetLastError(), "rms_norm_forward launch");
}

template <class Residual, class Grad, class Upstream>
  requires(detail::is_residual_type<Residual> && detail::is_residual_type<Grad> && detail::is_residual_type<Upstream>)
void rms_norm_backward(const RmsNormBackwardParams<Residual, Grad, Upstream>& p, cudaStream_t stream) {
  detail::validate_norm_size(p.rows, p.d, p.eps, "rms_norm_backward");
  require(p.x != nullptr, "rms_norm_backward: x is null");
  require(p.weight != nullptr, "rms_norm_backward: weight is null");
  require(p.dy != nullptr, "rms_norm_backward: dy is null");
  require(p.dx != nullptr, "rms_norm_backward: dx is null");
  const bool wide = aligned_rows(p.x, p.d, p.d) && aligned_rows(p.dy, p.d, p.d) && aligned_rows(p.dx, p.d, p.d) &&
                    aligned_rows(p.weight, 0, p.d) && (!p.dx_rounded || aligned_rows(p.dx_rounded, p.d, p.d));
  const dim3 grid = detail::norm_grid(p.rows), block(32 * detail::norm_rows_per_block);
  if (wide)
    detail::rms_norm_backward_kernel<8><<<grid, block, 0, stream>>>(p);
  else
    detail::rms_norm_backward_kernel<1><<<grid, block, 0, stream>>>(p);
  check(cudaGetLastError(), "rms_norm_backward launch");
}

}  // namespace dash::cuda::model

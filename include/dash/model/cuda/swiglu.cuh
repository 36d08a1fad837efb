// The elementwise middle of the SwiGLU MLP (dash/model/swiglu.hpp), on the output of the fused
// gate|up projection (a = x·W_gateᵀ, b = x·W_upᵀ, usually one GEMM into [rows, 2·d_ff]):
//   m = silu(a) ⊙ b,   silu(a) = a·σ(a)
// Backward, given dm = dout·W_down:
//   da = dm ⊙ b ⊙ σ(a)(1 + a(1 − σ(a))),   db = dm ⊙ silu(a)
// so that dx = [da | db]·[W_gate; W_up] is again one GEMM. Math in fp32, storage bf16.
#pragma once

#include <algorithm>

#include "dash/core/cuda.hpp"
#include "dash/core/error.hpp"
#include "dash/model/cuda/vector_io.cuh"

namespace dash::cuda::model {

// Row r of a is a + r·stride, of b is b + r·stride: for the fused [rows, 2·d_ff] buffer,
// a = buffer, b = buffer + d_ff, stride = 2·d_ff.
struct SwigluForwardParams {
  const bfloat16* gate = nullptr;  // a, [rows, d_ff] with row stride gate_up_stride
  const bfloat16* up = nullptr;    // b
  index_t gate_up_stride = 0;
  bfloat16* out = nullptr;  // m, [rows, d_ff] with row stride out_stride
  index_t out_stride = 0;
  index_t rows = 0;
  int d_ff = 0;
};

// d_gate and d_up may be gate and up themselves (each element is read before it is written).
struct SwigluBackwardParams {
  const bfloat16* gate = nullptr;
  const bfloat16* up = nullptr;
  index_t gate_up_stride = 0;
  const bfloat16* d_out = nullptr;  // dm, [rows, d_ff]
  index_t d_out_stride = 0;
  bfloat16* d_gate = nullptr;  // da
  bfloat16* d_up = nullptr;    // db
  index_t d_gate_up_stride = 0;
  index_t rows = 0;
  int d_ff = 0;
};

namespace detail {

__device__ __forceinline__ float sigmoid(float a) { return 1.0f / (1.0f + expf(-a)); }

template <int kWidth>
__global__ void swiglu_forward_kernel(SwigluForwardParams p) {
  const index_t per_row = p.d_ff / kWidth, total = p.rows * per_row;
  for (index_t idx = index_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += index_t(gridDim.x) * blockDim.x) {
    const index_t row = idx / per_row, col = (idx % per_row) * kWidth;
    float a[kWidth], b[kWidth];
    load_vector(p.gate + row * p.gate_up_stride + col, a);
    load_vector(p.up + row * p.gate_up_stride + col, b);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) a[j] = a[j] * sigmoid(a[j]) * b[j];
    store_vector(p.out + row * p.out_stride + col, a);
  }
}

template <int kWidth>
__global__ void swiglu_backward_kernel(SwigluBackwardParams p) {
  const index_t per_row = p.d_ff / kWidth, total = p.rows * per_row;
  for (index_t idx = index_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += index_t(gridDim.x) * blockDim.x) {
    const index_t row = idx / per_row, col = (idx % per_row) * kWidth;
    float a[kWidth], b[kWidth], dm[kWidth];
    load_vector(p.gate + row * p.gate_up_stride + col, a);
    load_vector(p.up + row * p.gate_up_stride + col, b);
    load_vector(p.d_out + row * p.d_out_stride + col, dm);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      const float s = sigmoid(a[j]);
      const float da = dm[j] * b[j] * s * (1.0f + a[j] * (1.0f - s));
      b[j] = dm[j] * a[j] * s;
      a[j] = da;
    }
    store_vector(p.d_gate + row * p.d_gate_up_stride + col, a);
    store_vector(p.d_up + row * p.d_gate_up_stride + col, b);
  }
}

inline void validate_swiglu_size(index_t rows, int d_ff, index_t gate_up_stride, const char* what) {
  require(rows >= 1, what, ": rows = ", rows, ", expected at least 1");
  require(d_ff >= 1, what, ": d_ff = ", d_ff, ", expected at least 1");
  require(gate_up_stride >= d_ff, what, ": gate_up_stride = ", gate_up_stride, " is below d_ff = ", d_ff);
}

inline unsigned elementwise_grid(index_t items, int block) {
  return unsigned(std::min<index_t>((items + block - 1) / block, index_t(1) << 20));
}

}  // namespace detail

inline void swiglu_forward(const SwigluForwardParams& p, cudaStream_t stream) {
  detail::validate_swiglu_size(p.rows, p.d_ff, p.gate_up_stride, "swiglu_forward");
  require(p.gate && p.up, "swiglu_forward: gate or up is null");
  require(p.out != nullptr, "swiglu_forward: out is null");
  require(p.out_stride >= p.d_ff, "swiglu_forward: out_stride = ", p.out_stride, " is below d_ff = ", p.d_ff);
  const bool wide = aligned_rows(p.gate, p.gate_up_stride, p.d_ff) && aligned_rows(p.up, p.gate_up_stride, p.d_ff) &&
                    aligned_rows(p.out, p.out_stride, p.d_ff);
  const int block = 256;
  if (wide)
    detail::swiglu_forward_kernel<8><<<detail::elementwise_grid(p.rows * p.d_ff / 8, block), block, 0, stream>>>(p);
  else
    detail::swiglu_forward_kernel<1><<<detail::elementwise_grid(p.rows * p.d_ff, block), block, 0, stream>>>(p);
  check(cudaGetLastError(), "swiglu_forward launch");
}

inline void swiglu_backward(const SwigluBackwardParams& p, cudaStream_t stream) {
  detail::validate_swiglu_size(p.rows, p.d_ff, p.gate_up_stride, "swiglu_backward");
  require(p.gate && p.up, "swiglu_backward: gate or up is null");
  require(p.d_out != nullptr, "swiglu_backward: d_out is null");
  require(p.d_gate && p.d_up, "swiglu_backward: d_gate or d_up is null");
  require(p.d_out_stride >= p.d_ff, "swiglu_backward: d_out_stride = ", p.d_out_stride, " is below d_ff = ", p.d_ff);
  require(p.d_gate_up_stride >= p.d_ff, "swiglu_backward: d_gate_up_stride = ", p.d_gate_up_stride,
          " is below d_ff = ", p.d_ff);
  const bool wide = aligned_rows(p.gate, p.gate_up_stride, p.d_ff) && aligned_rows(p.up, p.gate_up_stride, p.d_ff) &&
                    aligned_rows(p.d_out, p.d_out_stride, p.d_ff) &&
                    aligned_rows(p.d_gate, p.d_gate_up_stride, p.d_ff) &&
                    aligned_rows(p.d_up, p.d_gate_up_stride, p.d_ff);
  const int block = 256;
  if (wide)
    detail::swiglu_backward_kernel<8><<<detail::elementwise_grid(p.rows * p.d_ff / 8, block), block, 0, stream>>>(p);
  else
    detail::swiglu_backward_kernel<1><<<detail::elementwise_grid(p.rows * p.d_ff, block), block, 0, stream>>>(p);
  check(cudaGetLastError(), "swiglu_backward launch");
}

}  // namespace dash::cuda::model

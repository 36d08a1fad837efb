// Gate activations of GatedLinear and GatedDeltaNet on the device (gated_linear.hpp,
// gated_delta_net.hpp). The pre-activations are columns of the operator's fused projection
// (one GEMM, bf16, no bias there): row r holds z[r, 0 … n) for the decay gate and, for
// GatedDeltaNet, z[r, n … 2n) for β; the biases are added here in fp32:
//   g = log σ(z_g + b_g) / γ,   β = σ(z_β + b_β)                       (fp32, [rows, n] each)
// Backward, with σ(−(z_g + b_g)) = 1 − e^{γ·g} = −expm1(γ·g):
//   dz_g = dg · (−expm1(γ·g)) / γ,   dz_β = dβ · β (1 − β)
// written in bf16 into the gate columns of the fused gradient (the A operand of the dh GEMM):
// `columns` per row, those past the gates (the fused weight's zero rows) set to 0.
#pragma once

#include <algorithm>
#include <cmath>

#include "dash/core/cuda.hpp"
#include "dash/core/error.hpp"

namespace dash::cuda::model {

struct GateForwardParams {
  const bfloat16* z = nullptr;  // [rows, z_stride]
  index_t z_stride = 0;
  const float* bias = nullptr;  // [n] (decay) then [n] (β) when with_beta
  float* g = nullptr;           // [rows, n]
  float* beta = nullptr;        // [rows, n] when with_beta
  index_t rows = 0;
  int n = 0;
  bool with_beta = false;
  float normaliser = 16;        // γ
};

struct GateBackwardParams {
  const float* g = nullptr;      // [rows, n], the forward's
  const float* beta = nullptr;   // [rows, n] when with_beta
  const float* dg = nullptr;     // [rows, n]
  const float* dbeta = nullptr;  // [rows, n] when with_beta
  bfloat16* dz = nullptr;        // [rows, dz_stride], `columns` of each row written
  index_t dz_stride = 0;
  index_t columns = 0;           // the gates padded: ≥ n (2n with β)
  index_t rows = 0;
  int n = 0;
  bool with_beta = false;
  float normaliser = 16;
};

namespace detail {

// log σ(x) without overflow or cancellation for large |x|.
__device__ __forceinline__ float log_sigmoid(float x) {
  return x >= 0 ? -log1pf(expf(-x)) : x - log1pf(expf(x));
}

template <int Threads>
__global__ void __launch_bounds__(Threads) gate_forward_kernel(GateForwardParams p) {
  const index_t total = p.rows * p.n;
  for (index_t idx = index_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += index_t(gridDim.x) * blockDim.x) {
    const index_t row = idx / p.n;
    const int c = int(idx % p.n);
    const bfloat16* z = p.z + row * p.z_stride;
    p.g[idx] = log_sigmoid(__bfloat162float(z[c]) + p.bias[c]) / p.normaliser;
    if (p.with_beta) p.beta[idx] = 1.0f / (1.0f + expf(-(__bfloat162float(z[p.n + c]) + p.bias[p.n + c])));
  }
}

template <int Threads>
__global__ void __launch_bounds__(Threads) gate_backward_kernel(GateBackwardParams p) {
  const index_t total = p.rows * p.columns;
  const int gates = p.with_beta ? 2 * p.n : p.n;
  for (index_t idx = index_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += index_t(gridDim.x) * blockDim.x) {
    const index_t row = idx / p.columns;
    const int c = int(idx % p.columns);
    float dz = 0;
    if (c < p.n) {
      const index_t at = row * p.n + c;
      dz = p.dg[at] * -expm1f(p.normaliser * p.g[at]) / p.normaliser;
    } else if (c < gates) {
      const index_t at = row * p.n + (c - p.n);
      const float b = p.beta[at];
      dz = p.dbeta[at] * b * (1.0f - b);
    }
    p.dz[row * p.dz_stride + c] = __float2bfloat16_rn(dz);
  }
}

inline unsigned gate_grid(index_t items) {
  return unsigned(std::max<index_t>(1, std::min<index_t>((items + 255) / 256, index_t(1) << 16)));
}

}  // namespace detail

inline void gate_forward(const GateForwardParams& p, cudaStream_t stream) {
  require(p.rows >= 1 && p.n >= 1, "gate_forward: rows = ", p.rows, ", n = ", p.n, ", expected at least 1 each");
  require(p.z_stride >= (p.with_beta ? 2 : 1) * index_t(p.n), "gate_forward: z_stride = ", p.z_stride,
          " is below the ", (p.with_beta ? 2 : 1) * p.n, " gate columns");
  require(p.z && p.bias && p.g, "gate_forward: z, bias and g must not be null");
  require(!p.with_beta || p.beta, "gate_forward: beta is null but with_beta is set");
  require(std::isfinite(p.normaliser) && p.normaliser > 0, "gate_forward: normaliser = ", p.normaliser,
          ", expected a finite value > 0");
  detail::gate_forward_kernel<256><<<detail::gate_grid(p.rows * p.n), 256, 0, stream>>>(p);
  check(cudaGetLastError(), "gate_forward launch");
}

inline void gate_backward(const GateBackwardParams& p, cudaStream_t stream) {
  require(p.rows >= 1 && p.n >= 1, "gate_backward: rows = ", p.rows, ", n = ", p.n, ", expected at least 1 each");
  require(p.columns >= (p.with_beta ? 2 : 1) * index_t(p.n), "gate_backward: columns = ", p.columns,
          " is below the ", (p.with_beta ? 2 : 1) * p.n, " gates");
  require(p.dz_stride >= p.columns, "gate_backward: dz_stride = ", p.dz_stride, " is below columns = ", p.columns);
  require(p.g && p.dg && p.dz, "gate_backward: g, dg and dz must not be null");
  require(!p.with_beta || (p.beta && p.dbeta), "gate_backward: beta or dbeta is null but with_beta is set");
  require(std::isfinite(p.normaliser) && p.normaliser > 0, "gate_backward: normaliser = ", p.normaliser,
          ", expected a finite value > 0");
  detail::gate_backward_kernel<256><<<detail::gate_grid(p.rows * p.columns), 256, 0, stream>>>(p);
  check(cudaGetLastError(), "gate_backward launch");
}

}  // namespace dash::cuda::model

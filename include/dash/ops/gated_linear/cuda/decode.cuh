// The recurrent form for decoding, token by token in fp32 on the CUDA cores:
//   S_t = e^{g_t} S_{t−1} + k_t v_tᵀ,   o_t = scale · S_tᵀ q_t
// A thread block owns 32 columns of one head's state; lane = column, warp w holds rows
// w, w + 8, … in registers, so the state is read and written once per call whatever T is.
#pragma once

#include <cstdint>

#include "dash/core/cuda.hpp"
#include "dash/ops/gated_linear/cuda/params.cuh"

namespace dash::cuda::gla::detail {

inline constexpr int decode_warps = 8;

// Width: d_head rounded up to a multiple of decode_warps (16, 32, 64 or 128).
template <int Width>
__global__ void __launch_bounds__(32 * decode_warps) decode_kernel(DecodeParams p) {
  constexpr int rows_per_warp = Width / decode_warps;
  __shared__ float q_s[Width], k_s[Width], v_s[32], partial[decode_warps][32], decay;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int col = blockIdx.x * 32 + lane, h = blockIdx.y, b = blockIdx.z;
  const int D = p.d_head, H = p.n_heads, T = p.length;
  const int kv_head = h / (H / p.n_kv_heads);
  float* const state = p.state + (std::int64_t(b) * H + h) * D * D;

  float S[rows_per_warp];
#pragma unroll
  for (int i = 0; i < rows_per_warp; ++i) {
    const int row = warp + decode_warps * i;
    S[i] = row < D && col < D ? state[std::int64_t(row) * D + col] : 0.f;
  }
  for (int t = 0; t < T; ++t) {
    const std::int64_t token = std::int64_t(b) * T + t;
    const bfloat16* q = p.q + (token * H + h) * D;
    const bfloat16* k = p.k + (token * p.n_kv_heads + kv_head) * D;
    const bfloat16* v = p.v + (token * p.n_kv_heads + kv_head) * D;
    for (int i = threadIdx.x; i < Width; i += blockDim.x) {
      q_s[i] = i < D ? __bfloat162float(q[i]) : 0.f;
      k_s[i] = i < D ? __bfloat162float(k[i]) : 0.f;
    }
    if (threadIdx.x < 32) v_s[lane] = col < D ? __bfloat162float(v[col]) : 0.f;
    if (threadIdx.x == 0) decay = expf(p.g[token * H + h]);
    __syncthreads();
    const float a = decay, vc = v_s[lane];
    float o = 0.f;
#pragma unroll
    for (int i = 0; i < rows_per_warp; ++i) {
      const int row = warp + decode_warps * i;
      S[i] = fmaf(a, S[i], k_s[row] * vc);
      o = fmaf(q_s[row], S[i], o);
    }
    partial[warp][lane] = o;
    __syncthreads();
    if (warp == 0 && col < D) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < decode_warps; ++w) sum += partial[w][lane];
      p.o[(token * H + h) * D + col] = __float2bfloat16(p.scale * sum);
    }
  }
#pragma unroll
  for (int i = 0; i < rows_per_warp; ++i) {
    const int row = warp + decode_warps * i;
    if (row < D && col < D) state[std::int64_t(row) * D + col] = S[i];
  }
}

}  // namespace dash::cuda::gla::detail

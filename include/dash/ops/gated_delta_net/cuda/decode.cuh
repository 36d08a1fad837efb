// Recurrent form for decoding: T ≥ 1 tokens advance the fp32 state in place, one at a time,
//   S ← a S,   w = β (v − Sᵀ k̂),   S ← S + k̂ wᵀ,   o_h = scale Sᵀ q̂_h   (a = exp(g)),
// all in fp32. Every column j of S evolves on its own (it needs only k̂, q̂, v_j, a, β), so a
// block owns one state head and four neighbouring lanes own one column, rows interleaved
// (row = 4 r + part) so that the lanes of a quad read neighbouring words of k̂ and q̂.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "dash/ops/gated_delta_net/cuda/params.cuh"

namespace dash::cuda::gdn::detail {

template <int Dp>
struct DecodeShape {
  static constexpr int threads = 4 * Dp;  // 4 lanes per column
  static constexpr int rows_per_lane = Dp / 4;
};

// x̂ = x / sqrt(‖x‖² + eps) of one raw row of D ≤ Dp elements into out[0, Dp) (zero past D), by one warp.
template <int Dp>
__device__ __forceinline__ void normalized_row(const bfloat16* x, int D, float eps, float* out) {
  constexpr int per_lane = Dp / 32;
  const int lane = threadIdx.x % 32;
  float v[per_lane], ss = 0.f;
#pragma unroll
  for (int e = 0; e < per_lane; ++e) {
    const int i = lane + 32 * e;
    v[e] = i < D ? __bfloat162float(x[i]) : 0.f;
    ss += v[e] * v[e];
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, offset);
  const float inv = 1.f / sqrtf(ss + eps);
#pragma unroll
  for (int e = 0; e < per_lane; ++e) out[lane + 32 * e] = v[e] * inv;
}

// grid (Hs, B), DecodeShape<Dp>::threads threads.
template <int Dp>
__global__ void __launch_bounds__(DecodeShape<Dp>::threads) decode_tokens(const Params p) {
  constexpr int R = DecodeShape<Dp>::rows_per_lane;
  __shared__ float k_hat[Dp], q_hat[Dp], v_row[Dp], gates[2];
  const int s = blockIdx.x, b = blockIdx.y, tid = threadIdx.x, warp = tid / 32;
  const int col = tid / 4, part = tid % 4;
  const bool live = col < p.D;
  float* state = p.state + (std::int64_t(b) * p.Hs + s) * p.D * p.D;

  float S[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = 4 * r + part;
    S[r] = live && row < p.D ? state[row * p.D + col] : 0.f;
  }
  for (int t = 0; t < p.T; ++t) {
    __syncthreads();
    if (warp == 0) normalized_row<Dp>(p.k + raw_offset(p.k_rows, b, t, s, p.D), p.D, p.eps, k_hat);
    if (warp == 1) {
      const bfloat16* v = p.v + raw_offset(p.v_rows, b, t, s, p.D);
      for (int i = tid - 32; i < Dp; i += 32) v_row[i] = i < p.D ? __bfloat162float(v[i]) : 0.f;
    }
    if (tid == 64) {
      const std::int64_t at = (std::int64_t(b) * p.T + t) * p.Hs + s;
      gates[0] = expf(p.g[at]), gates[1] = p.beta[at];
    }
    __syncthreads();
    const float a = gates[0], beta = gates[1];
    float kv = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      S[r] *= a;
      kv += S[r] * k_hat[4 * r + part];
    }
    kv += __shfl_xor_sync(0xffffffffu, kv, 1);
    kv += __shfl_xor_sync(0xffffffffu, kv, 2);
    const float w = beta * (v_row[col] - kv);
#pragma unroll
    for (int r = 0; r < R; ++r) S[r] += k_hat[4 * r + part] * w;
    for (int h = s * p.group; h < (s + 1) * p.group; ++h) {
      __syncthreads();
      if (warp == 0) normalized_row<Dp>(p.q + raw_offset(p.q_rows, b, t, h, p.D), p.D, p.eps, q_hat);
      __syncthreads();
      float o = 0.f;
#pragma unroll
      for (int r = 0; r < R; ++r) o += S[r] * q_hat[4 * r + part];
      o += __shfl_xor_sync(0xffffffffu, o, 1);
      o += __shfl_xor_sync(0xffffffffu, o, 2);
      if (live && part == 0) p.o[raw_offset(p.o_rows, b, t, h, p.D) + col] = __float2bfloat16(p.scale * o);
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = 4 * r + part;
    if (live && row < p.D) state[row * p.D + col] = S[r];
  }
}

}  // namespace dash::cuda::gdn::detail

// The two small passes that finish GatedLinear's backward after the sweeps:
//
// Log-decay gradient (eigen.hpp, recurrent backward): g_t scales every term of the state that
// precedes t, and every such term of an output or a later state is linear in a q (carrying
// e^{+b}) or a k (carrying e^{−b}), so
//   dg_t = Σ_{t'≥t} (q_t'·dq_t' − k_t'·dk_t') + ⟨dS_T, S_T⟩
// with dk the query head's own share (before the GQA group sum) and dS_T the final state's
// gradient. The dq and dk sweeps leave the dot products as fp32 partials over column blocks;
// one thread block per head sums them and takes the reverse inclusive scan (CUB BlockScan).
//
// GQA: dk and dv of a k/v head are the sums of the per-query-head gradients of its group.
#pragma once

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <cstdint>

#include "dash/core/cuda.hpp"

namespace dash::cuda::gla::detail {

struct GateGradient {
  const float* q_dot = nullptr;  // [B, H, partials, T]: Σ q·dq over column blocks
  const float* k_dot = nullptr;  // [B, H, partials, T]: Σ k·dk over column blocks
  int partials = 0;
  const float* final_state = nullptr;    // [B, H, D, D], or null when d_final_state is
  const float* d_final_state = nullptr;  // [B, H, D, D] or null
  float* dg = nullptr;                   // [B, T, H]
  int batch = 0, length = 0, n_heads = 0, d_head = 0;
};

inline constexpr int gate_threads = 256, gate_items = 4;

template <int Threads>
__global__ void __launch_bounds__(Threads) gate_gradient_kernel(GateGradient p) {
  using Scan = cub::BlockScan<float, Threads>;
  using Reduce = cub::BlockReduce<float, Threads>;
  __shared__ union {
    typename Scan::TempStorage scan;
    typename Reduce::TempStorage reduce;
  } temp;
  __shared__ float boundary;
  const int h = blockIdx.x, b = blockIdx.y, T = p.length;
  const std::int64_t head = std::int64_t(b) * p.n_heads + h;

  if (threadIdx.x == 0) boundary = 0.f;
  if (p.d_final_state) {
    const std::int64_t n = std::int64_t(p.d_head) * p.d_head;
    const float* S = p.final_state + head * n;
    const float* dS = p.d_final_state + head * n;
    float sum = 0.f;
    for (std::int64_t i = threadIdx.x; i < n; i += Threads) sum += dS[i] * S[i];
    sum = Reduce(temp.reduce).Sum(sum);
    if (threadIdx.x == 0) boundary = sum;
  }
  __syncthreads();

  // Tokens in reverse order: item i of tile `base` is t = T − 1 − (base + threadIdx.x·items + i).
  struct Running {
    float total;
    __device__ float operator()(float tile_sum) {
      const float before = total;
      total += tile_sum;
      return before;
    }
  } running{boundary};
  const float* q_dot = p.q_dot + head * p.partials * T;
  const float* k_dot = p.k_dot + head * p.partials * T;
  for (int base = 0; base < T; base += Threads * gate_items) {
    float terms[gate_items];
#pragma unroll
    for (int i = 0; i < gate_items; ++i) {
      const int t = T - 1 - (base + int(threadIdx.x) * gate_items + i);
      float term = 0.f;
      if (t >= 0)
        for (int j = 0; j < p.partials; ++j) term += q_dot[std::int64_t(j) * T + t] - k_dot[std::int64_t(j) * T + t];
      terms[i] = term;
    }
    __syncthreads();  // the scan's temporary storage is reused per tile
    Scan(temp.scan).InclusiveSum(terms, terms, running);
#pragma unroll
    for (int i = 0; i < gate_items; ++i) {
      const int t = T - 1 - (base + int(threadIdx.x) * gate_items + i);
      if (t >= 0) p.dg[(std::int64_t(b) * T + t) * p.n_heads + h] = terms[i];
    }
  }
}

// out[b, t, j, :] = Σ_{h in group j} in[b, t, h, :], in fp32 [B, T, H, D], out bf16 [B, T, Hkv, D]
// with out_stride elements from one token to the next.
template <int Threads>
__global__ void __launch_bounds__(Threads) sum_groups_kernel(const float* in, bfloat16* out, std::int64_t tokens,
                                                              int n_kv_heads, int group, int d_head,
                                                              std::int64_t out_stride) {
  const std::int64_t n = tokens * n_kv_heads * d_head;
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t row = i / d_head, d = i % d_head;  // row = token·Hkv + kv head
    float sum = 0.f;
    for (int j = 0; j < group; ++j) sum += in[(row * group + j) * d_head + d];
    out[row / n_kv_heads * out_stride + row % n_kv_heads * d_head + d] = __float2bfloat16(sum);
  }
}

}  // namespace dash::cuda::gla::detail

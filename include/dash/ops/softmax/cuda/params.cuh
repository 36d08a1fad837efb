// What one launch of the Softmax / SlidingWindow kernels reads and writes: device pointers and
// sizes only (a non-owning view, FlashAttention's Params), filled and checked on the host by the
// launchers in forward.cuh and backward.cuh.
//
// Layout: q [B, T, H, D], k and v [B, T, Hkv, D], o and d_o [B, T, H, D], each addressed as
// base + b·batch_stride + t·token_stride + head·D + d (elements), so q, k and v may be slices of
// one fused QKV projection output. lse [B, H, T] is contiguous fp32 (natural log).
// Mask: key j is visible to query i iff j ≤ i and (i − j < window or j < sinks).
#pragma once

#include <cstdint>

#include "dash/core/cuda.hpp"

namespace dash::cuda::attention {

struct Strides {
  std::int64_t batch = 0;  // elements between batches
  std::int64_t token = 0;  // elements between consecutive tokens
};

struct Mask {
  std::int64_t window = INT64_MAX;  // W ≥ T: plain causal softmax
  std::int64_t sinks = 0;
};

struct ForwardParams {
  const bfloat16* q = nullptr;
  const bfloat16* k = nullptr;
  const bfloat16* v = nullptr;
  bfloat16* o = nullptr;
  float* lse = nullptr;
  Strides q_strides, k_strides, v_strides, o_strides;
  int batch = 0, length = 0, n_heads = 0, n_kv_heads = 0, d_head = 0;
  float scale = 0;  // usually 1/sqrt(d_head)
  Mask mask;
};

// dq, dk, dv have the layouts of q, k, v (with their own strides). `accumulate` adds the
// gradients into what dq, dk, dv hold (MixedAttention sums over ops); otherwise they are
// overwritten.
struct BackwardParams : ForwardParams {
  const bfloat16* d_o = nullptr;
  bfloat16* dq = nullptr;
  bfloat16* dk = nullptr;
  bfloat16* dv = nullptr;
  Strides d_o_strides, dq_strides, dk_strides, dv_strides;
  bool accumulate = false;
};

}  // namespace dash::cuda::attention

// What one launch of the Softmax / SlidingWindow kernels reads and writes: device pointers and
// sizes only (a non-owning view, FlashAttention's Params), filled and checked on the host by the
// launchers in forward.cuh and backward.cuh.
//
// Layout: q [B, T, H, D], k and v [B, T, Hkv, D], o, d_o and d [B, T, H, D], each addressed as
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

// Two forwards over the same q, k, v in one launch (pair_forward in forward.cuh): the causal
// Softmax attention into o and lse, and the SlidingWindow attention of window W (no sinks)
// into window_o (the layout of o, with its own strides) and window_lse [B, H, T].
struct PairForwardParams {
  const bfloat16* q = nullptr;
  const bfloat16* k = nullptr;
  const bfloat16* v = nullptr;
  bfloat16* o = nullptr;
  float* lse = nullptr;
  bfloat16* window_o = nullptr;
  float* window_lse = nullptr;
  Strides q_strides, k_strides, v_strides, o_strides, window_o_strides;
  int batch = 0, length = 0, n_heads = 0, n_kv_heads = 0, d_head = 0;
  float scale = 0;  // usually 1/sqrt(d_head)
  std::int64_t window = 0;  // W ≥ 1; W ≥ T makes both outputs causal
};

// The pair of `causal`'s forward (its q, k, v, o, lse and sizes; its mask is not read) and a
// window-W forward into window_o and window_lse.
inline PairForwardParams pair_params(const ForwardParams& causal, bfloat16* window_o, Strides window_o_strides,
                                     float* window_lse, std::int64_t window) {
  PairForwardParams p;
  p.q = causal.q, p.k = causal.k, p.v = causal.v, p.o = causal.o, p.lse = causal.lse;
  p.window_o = window_o, p.window_lse = window_lse;
  p.q_strides = causal.q_strides, p.k_strides = causal.k_strides, p.v_strides = causal.v_strides;
  p.o_strides = causal.o_strides, p.window_o_strides = window_o_strides;
  p.batch = causal.batch, p.length = causal.length, p.n_heads = causal.n_heads, p.n_kv_heads = causal.n_kv_heads;
  p.d_head = causal.d_head, p.scale = causal.scale;
  p.window = window;
  return p;
}

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

// The backward of a mixture of attention operators on the same q, k, v (MixedAttention's
// Softmax and SlidingWindow): y = Σ_t π_t·o_t, each term t with its own mask, output o_t and
// lse_t from its forward, and π a device vector of fp32 weights.
inline constexpr int max_mixture_backward_terms = 2;

struct MixtureBackwardTerm {
  const bfloat16* o = nullptr;  // the term's forward output [B, T, H, D]
  Strides o_strides;
  const float* lse = nullptr;   // its lse [B, H, T]
  Mask mask;
  int pi_index = 0;             // its weight is pi[pi_index]; dL/dπ goes to d_pi[pi_index]
};

// d is the gradient of y (not scaled by any π). dq, dk, dv receive Σ_t of each term's gradients
// for d_o = π_t·d (added to what they hold with `accumulate`, as in BackwardParams), and
// d_pi[terms[t].pi_index] = dL/dπ_t = Σ_{b,i,h} d·o_t is overwritten (other entries untouched).
struct MixtureBackwardParams {
  const bfloat16* q = nullptr;
  const bfloat16* k = nullptr;
  const bfloat16* v = nullptr;
  Strides q_strides, k_strides, v_strides;
  int batch = 0, length = 0, n_heads = 0, n_kv_heads = 0, d_head = 0;
  float scale = 0;
  MixtureBackwardTerm terms[max_mixture_backward_terms];
  int n_terms = 0;
  const float* pi = nullptr;
  const bfloat16* d = nullptr;
  Strides d_strides;
  float* d_pi = nullptr;
  bfloat16* dq = nullptr;
  bfloat16* dk = nullptr;
  bfloat16* dv = nullptr;
  Strides dq_strides, dk_strides, dv_strides;
  bool accumulate = false;
};

}  // namespace dash::cuda::attention

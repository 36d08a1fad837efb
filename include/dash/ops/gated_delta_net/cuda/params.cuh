// What every GatedDeltaNet kernel receives: sizes, the caller's tensors and the workspace
// buffers, as plain device pointers (one struct for all kernels; each reads what it needs).
//
// A raw [B, T, heads, D] bf16 tensor (q, k, v, o and their gradients) has its elements adjacent
// and its heads D apart, but its rows (tokens) and batches anywhere apart, so that q, k and v may
// be column blocks of one projection's output [B·T, ld] (and dq, dk, dv of one gradient buffer):
//   element (b, t, head, i)  at  b·batch + t·token + head·D + i.
//
// Workspace buffers, per state head (b, s) and padded length Tp = n_chunks · chunk, with the
// head dimension padded to Dp ∈ {32, 64, 128} (zero columns):
//   g_cum     fp32 [B, Hs, Tp]          cumulative log2 decay from each chunk's start
//   k_inv     fp32 [B, Hs, Tp]          1 / sqrt(‖k‖² + ε)
//   k_hat     bf16 [B, Hs, Tp, Dp]      normalised keys
//   w, u      bf16 [B, Hs, Tp, Dp]      W = u − w S0 per chunk (see forward.cuh)
//   v_new     bf16 [B, Hs, Tp, Dp]      W of every chunk
//   states    bf16 [B, Hs, n_chunks, Dp, Dp]   the state at every chunk's start
//   published u32  [B, Hs, n_chunks]   how many column blocks of chunk_states have written the
//                                      chunk's checkpoint and W (chunk_outputs waits for all)
//   t_inv     bf16 [B, Hs, n_chunks, 2, 64, 64]   T = (I + A)⁻¹ per chunk as hi = bf16(T) and
//                                               lo = bf16(T − hi) (only for the backward)
// (the kept workspace: what a forward leaves for its backward), and the backward's scratch:
//   dw_local  bf16 [B, Hs, Tp, Dp]      scale Σ_h (M ∘ Q̂_h K̂ᵀ)ᵀ dO_h
//   y_local   bf16 [B, Hs, n_chunks, Dp, Dp]   scale Σ_h Q̂_hᵀ diag(γ) dO_h
//   dw        bf16 [B, Hs, Tp, Dp]      dL/dW per chunk
//   d_states  bf16 [B, Hs, n_chunks, Dp, Dp]   dL/d(state at every chunk's end)
//   d_published u32 [B, Hs, n_chunks]  how many column blocks of chunk_state_gradients have
//                                      written the chunk's dS and dW (chunk_gradients waits)
#pragma once

#include <cstdint>

#include "dash/core/cuda.hpp"

namespace dash::cuda::gdn::detail {

// Element strides of a raw [B, T, heads, D] tensor between batches and between tokens.
struct RowStrides {
  std::int64_t batch = 0, token = 0;
};

struct Params {
  int B = 0, T = 0, H = 0, Hs = 0, D = 0;
  int n_chunks = 0, group = 0;  // group = H / Hs query heads per state head
  std::int64_t padded_T = 0;    // n_chunks · chunk
  float scale = 1.f, eps = 1e-6f;
  bool vector = false;  // raw rows move 16 bytes at a time (D, strides multiples of 8, aligned pointers)

  // The caller's tensors (raw q, k; initial_state etc. may be null).
  const bfloat16 *q = nullptr, *k = nullptr, *v = nullptr, *d_o = nullptr;
  const float *g = nullptr, *beta = nullptr, *initial_state = nullptr, *d_final_state = nullptr;
  bfloat16 *o = nullptr, *dq = nullptr, *dk = nullptr, *dv = nullptr;
  float *final_state = nullptr, *dg = nullptr, *dbeta = nullptr, *d_initial_state = nullptr;
  float* state = nullptr;  // decode: [B, Hs, D, D], advanced in place
  RowStrides q_rows, k_rows, v_rows, o_rows, d_o_rows, dq_rows, dk_rows, dv_rows;

  // Workspace.
  float *g_cum = nullptr, *k_inv = nullptr;
  unsigned *published = nullptr, *d_published = nullptr;
  bfloat16 *t_inv = nullptr, *k_hat = nullptr, *w = nullptr, *u = nullptr, *v_new = nullptr, *states = nullptr;
  bfloat16 *dw_local = nullptr, *y_local = nullptr, *dw = nullptr, *d_states = nullptr;
};

// Offset of token t of head `head` in batch b of a raw tensor with the given strides.
__device__ __forceinline__ std::int64_t raw_offset(RowStrides rows, int b, int t, int head, int D) {
  return std::int64_t(b) * rows.batch + std::int64_t(t) * rows.token + std::int64_t(head) * D;
}

}  // namespace dash::cuda::gdn::detail

// What the GatedLinear launchers read and write: device pointers and sizes only (non-owning),
// filled by the caller and checked on the host by the launchers in gated_linear/cuda.cuh.
//
// Layouts: q, o, d_o, dq [B, T, H, D]; k, v, dk, dv [B, T, Hkv, D] bf16; g, dg [B, T, H] fp32
// (log decays, ≤ 0); states [B, H, D, D] fp32, the state of head h indexed [d_k][d_v],
// S_t = a_t·S_{t−1} + k_t v_tᵀ. Query head h reads k/v head h / (H / Hkv).
// q, k, v, dq, dk, dv may be rows of wider buffers (e.g. q, k, v side by side in the output of
// one projection): their *_stride is the number of elements from one token to the next (0:
// dense, heads·D; else ≥ heads·D), a sequence starts T·stride after the previous one, and the
// heads of a token are contiguous. Columns between heads·D and the stride are neither read nor
// written. o, d_o, g, dg and the states are always dense.
#pragma once

#include "dash/core/cuda.hpp"
#include "dash/core/shape.hpp"

namespace dash::cuda::gla {

inline constexpr int max_d_head = 128;

// The sizes, the mixer's inputs and the optional initial state, shared by forward and backward.
struct Inputs {
  const bfloat16* q = nullptr;
  const bfloat16* k = nullptr;
  const bfloat16* v = nullptr;
  const float* g = nullptr;
  const float* initial_state = nullptr;  // null: zero
  int batch = 0, length = 0, n_heads = 0, n_kv_heads = 0, d_head = 0;
  float scale = 0;  // usually 1/sqrt(d_head)
  index_t q_stride = 0, k_stride = 0, v_stride = 0;  // elements between tokens; 0: dense
};

struct ForwardParams : Inputs {
  bfloat16* o = nullptr;
  float* final_state = nullptr;  // null: not written; may alias initial_state
};

// Gradients are overwritten, not accumulated. dk and dv are summed over each k/v head's group.
struct BackwardParams : Inputs {
  const bfloat16* d_o = nullptr;
  const float* d_final_state = nullptr;  // gradient reaching the final state; null: zero
  bfloat16* dq = nullptr;
  bfloat16* dk = nullptr;
  bfloat16* dv = nullptr;
  float* dg = nullptr;
  float* d_initial_state = nullptr;  // null: not written
  index_t dq_stride = 0, dk_stride = 0, dv_stride = 0;  // elements between tokens; 0: dense
};

// Decoding: advances `state` in place over the T given tokens (T = 1 for one step) and writes
// their outputs.
struct DecodeParams {
  const bfloat16* q = nullptr;
  const bfloat16* k = nullptr;
  const bfloat16* v = nullptr;
  const float* g = nullptr;
  bfloat16* o = nullptr;
  float* state = nullptr;
  int batch = 0, length = 0, n_heads = 0, n_kv_heads = 0, d_head = 0;
  float scale = 0;
};

}  // namespace dash::cuda::gla

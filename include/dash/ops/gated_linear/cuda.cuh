// CUDA kernels of GatedLinear's mixer (gated_linear.hpp; the math and its chunked form in
// gated_linear/eigen.hpp), on its own q, k, v and log decays g:
//
//   S_t = e^{g_t}·S_{t−1} + k_t v_tᵀ,   o_t = scale · S_tᵀ q_t     (per query head, fp32 state)
//
// forward   the chunked form (chunks of 64 tokens) in two passes (gated_linear/cuda/sweep.cuh):
//           a light sequential pass per head that only carries the state from chunk to chunk
//           and stores the state entering every chunk (bf16) in the workspace, then a parallel
//           pass over all (chunk, head, value block) for the outputs; optional initial and
//           final state.
// backward  three more sweeps (dq forward in time, dk and dv in reverse): one state pass for the
//           two chains they need (S, forward, and dS, reverse; dq and dk read them transposed)
//           and the output passes of dq alone and of dv and dk together (shared inputs); then
//           the GQA group sums of dk and dv and the log-decay gradient
//           dg_t = Σ_{t'≥t} (q·dq − k·dk) + ⟨dS_T, S_T⟩ (one reverse scan per head).
//           Optional final-state gradient in, initial-state gradient out.
// decode    the recurrent form in fp32, state [B, H, D, D] advanced in place (gated_linear/cuda/
//           decode.cuh).
//
// Scratch comes from the caller: forward_workspace_bytes() (the chunk states, B·H·⌈T/64⌉·W²
// bf16 with W the padded width) and backward_workspace_bytes() (two chains' chunk states and
// the backward's partial sums).
//
// Layouts and parameters: gated_linear/cuda/params.cuh. Every d_head from 1 to 128 works: the
// kernels are instantiated for widths 16, 32, 64 and 128 and zero-fill up to the width; inputs
// whose d_head or token strides are not multiples of 8 (or that are not 16-byte aligned) take a
// scalar load path. q, k, v, dq, dk, dv may be rows of wider buffers (their *_stride fields).
// Launchers check every argument before any CUDA call, never allocate and never synchronise.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "dash/core/cuda.hpp"
#include "dash/core/error.hpp"
#include "dash/ops/gated_linear/cuda/decode.cuh"
#include "dash/ops/gated_linear/cuda/gradients.cuh"
#include "dash/ops/gated_linear/cuda/params.cuh"
#include "dash/ops/gated_linear/cuda/sweep.cuh"

namespace dash::cuda::gla {

namespace detail {

// Calls f with the padded width (16, 32, 64 or 128) of d_head as an integral constant: the one
// place where the head dimension becomes a template parameter.
template <class F>
decltype(auto) with_width(int d_head, F&& f) {
  if (d_head <= 16) return f(std::integral_constant<int, 16>{});
  if (d_head <= 32) return f(std::integral_constant<int, 32>{});
  if (d_head <= 64) return f(std::integral_constant<int, 64>{});
  return f(std::integral_constant<int, 128>{});
}

inline void check_sizes(const char* fn, int batch, int length, int n_heads, int n_kv_heads, int d_head, float scale) {
  require(batch >= 1, fn, ": batch = ", batch, ", expected ≥ 1");
  require(length >= 1, fn, ": length = ", length, ", expected ≥ 1");
  require(n_heads >= 1 && n_heads <= 65535, fn, ": n_heads = ", n_heads, ", expected 1 … 65535");
  require(n_kv_heads >= 1 && n_heads % n_kv_heads == 0, fn, ": n_kv_heads = ", n_kv_heads,
          ", expected ≥ 1 and a divisor of n_heads = ", n_heads);
  require(d_head >= 1 && d_head <= max_d_head, fn, ": d_head = ", d_head, ", expected 1 … ", max_d_head);
  require(std::isfinite(scale), fn, ": scale = ", scale, ", expected a finite number");
  // Grid z of both passes is batch × sweeps.
  require(std::int64_t(batch) * max_sweeps <= 65535, fn, ": batch = ", batch, ", expected ≤ ", 65535 / max_sweeps);
}

// Elements from one token to the next of a [B, T, heads, D] tensor: `given`, or heads·D for 0.
inline std::int64_t token_stride(const char* fn, const char* name, index_t given, int heads, int d_head) {
  const std::int64_t dense = std::int64_t(heads) * d_head;
  require(given == 0 || given >= dense, fn, ": ", name, " = ", given, ", expected 0 (dense) or ≥ heads × d_head = ",
          dense);
  return given == 0 ? dense : given;
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// 16-byte loads and stores of a strided bf16 tensor need an aligned base and a stride of whole
// 16-byte units; otherwise the kernels take the scalar path.
inline bool vector_ready(const void* p, std::int64_t stride) { return aligned16(p) && stride % 8 == 0; }

struct InputStrides {
  std::int64_t q = 0, k = 0, v = 0;
};

inline InputStrides check_inputs(const char* fn, const Inputs& p) {
  check_sizes(fn, p.batch, p.length, p.n_heads, p.n_kv_heads, p.d_head, p.scale);
  require(p.q != nullptr, fn, ": q is null");
  require(p.k != nullptr, fn, ": k is null");
  require(p.v != nullptr, fn, ": v is null");
  require(p.g != nullptr, fn, ": g (log decays) is null");
  return {token_stride(fn, "q_stride", p.q_stride, p.n_heads, p.d_head),
          token_stride(fn, "k_stride", p.k_stride, p.n_kv_heads, p.d_head),
          token_stride(fn, "v_stride", p.v_stride, p.n_kv_heads, p.d_head)};
}

inline std::size_t aligned_bytes(std::size_t bytes) { return (bytes + 255) / 256 * 256; }

// Carves arrays front to back from a workspace (256-byte aligned, as counted by aligned_bytes);
// a count of 0 gives null.
class Carver {
 public:
  explicit Carver(void* workspace) : cursor_(static_cast<char*>(workspace)) {}
  template <class T>
  T* take(std::size_t count) {
    T* out = count ? reinterpret_cast<T*>(cursor_) : nullptr;
    cursor_ += aligned_bytes(count * sizeof(T));
    return out;
  }

 private:
  char* cursor_;
};

inline int padded_width(int d_head) {
  return with_width(d_head, [](auto width) { return int(decltype(width)::value); });
}

// Elements of one sweep's chunk states.
inline std::size_t chunk_state_elements(const Inputs& p) {
  return chunk_state_bytes(p.batch, p.n_heads, p.length, padded_width(p.d_head)) / sizeof(bfloat16);
}

inline SweepBatch sweep_batch(const Inputs& p, const InputStrides& strides) {
  SweepBatch batch;
  batch.g = p.g;
  batch.batch = p.batch, batch.length = p.length, batch.n_heads = p.n_heads, batch.d_head = p.d_head;
  batch.scale = p.scale;
  batch.vector_io = p.d_head % 8 == 0 && vector_ready(p.q, strides.q) && vector_ready(p.k, strides.k) &&
                    vector_ready(p.v, strides.v);
  return batch;
}

inline void launch(const SweepBatch& chains, const SweepBatch& batch, const SweepBatch& paired, cudaStream_t stream) {
  with_width(batch.d_head, [&](auto width) { launch_sweeps<decltype(width)::value>(chains, batch, paired, stream); });
}

inline constexpr int backward_chains = 2;

// The backward's scratch: each chain's chunk states, then the partial sums.
struct BackwardScratch {
  std::size_t state_elements = 0;      // bf16, per chain
  int partials = 0;                    // dot partials per token
  std::size_t dot_floats = 0;          // each of q·dq and k·dk partials: [B, H, partials, T]
  std::size_t final_state_floats = 0;  // the forward's final state, when d_final_state is given
  std::size_t head_grad_floats = 0;    // each of dk and dv per query head, when n_kv_heads < n_heads

  std::size_t bytes() const {
    return backward_chains * aligned_bytes(state_elements * sizeof(bfloat16)) + 2 * aligned_bytes(dot_floats * 4) +
           aligned_bytes(final_state_floats * 4) + 2 * aligned_bytes(head_grad_floats * 4);
  }
};

inline BackwardScratch backward_scratch(const BackwardParams& p) {
  BackwardScratch s;
  s.state_elements = chunk_state_elements(p);
  s.partials = with_width(p.d_head, [](auto width) { return DefaultShape<decltype(width)::value>::partials; });
  const std::size_t heads = std::size_t(p.batch) * std::size_t(p.n_heads);
  s.dot_floats = heads * std::size_t(s.partials) * std::size_t(p.length);
  if (p.d_final_state) s.final_state_floats = heads * std::size_t(p.d_head) * std::size_t(p.d_head);
  if (p.n_kv_heads != p.n_heads) s.head_grad_floats = heads * std::size_t(p.length) * std::size_t(p.d_head);
  return s;
}

inline void check_workspace(const char* fn, void* workspace, std::size_t given, std::size_t needed) {
  require(given >= needed, fn, ": workspace of ", given, " bytes, expected at least ", needed);
  require(needed == 0 || workspace != nullptr, fn, ": workspace is null");
  require(aligned16(workspace), fn, ": workspace must be 16-byte aligned");
}

}  // namespace detail

// Bytes of scratch forward() needs for these sizes: the state entering every chunk.
inline std::size_t forward_workspace_bytes(const ForwardParams& p) {
  detail::check_sizes("gla::forward_workspace_bytes", p.batch, p.length, p.n_heads, p.n_kv_heads, p.d_head, p.scale);
  return detail::aligned_bytes(detail::chunk_state_elements(p) * sizeof(bfloat16));
}

inline void forward(const ForwardParams& p, void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  constexpr const char* fn = "gla::forward";
  const detail::InputStrides strides = detail::check_inputs(fn, p);
  require(p.o != nullptr, fn, ": o is null");
  detail::check_workspace(fn, workspace, workspace_bytes, forward_workspace_bytes(p));

  detail::SweepBatch batch = detail::sweep_batch(p, strides);
  batch.vector_io = batch.vector_io && detail::aligned16(p.o);
  const int group = p.n_heads / p.n_kv_heads;
  detail::Sweep& s = batch.sweep[0];
  s.x = {p.q, p.n_heads, 1, strides.q};
  s.y = {p.k, p.n_kv_heads, group, strides.k};
  s.z = {p.v, p.n_kv_heads, group, strides.v};
  s.out = p.o, s.out_stride = std::int64_t(p.n_heads) * p.d_head;
  s.state_in = p.initial_state;
  s.state_out = p.final_state;
  s.chunk_states = static_cast<bfloat16*>(workspace);
  batch.n_sweeps = 1;
  detail::SweepBatch none = batch;
  none.n_sweeps = 0;
  detail::launch(batch, batch, none, stream);
}

// Bytes of scratch backward() needs for these sizes (and whether d_final_state is given).
inline std::size_t backward_workspace_bytes(const BackwardParams& p) {
  detail::check_sizes("gla::backward_workspace_bytes", p.batch, p.length, p.n_heads, p.n_kv_heads, p.d_head,
                      p.scale);
  return detail::backward_scratch(p).bytes();
}

inline void backward(const BackwardParams& p, void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  constexpr const char* fn = "gla::backward";
  const detail::InputStrides strides = detail::check_inputs(fn, p);
  require(p.d_o != nullptr, fn, ": d_o is null");
  require(p.dq != nullptr, fn, ": dq is null");
  require(p.dk != nullptr, fn, ": dk is null");
  require(p.dv != nullptr, fn, ": dv is null");
  require(p.dg != nullptr, fn, ": dg is null");
  const std::int64_t dq_stride = detail::token_stride(fn, "dq_stride", p.dq_stride, p.n_heads, p.d_head);
  const std::int64_t dk_stride = detail::token_stride(fn, "dk_stride", p.dk_stride, p.n_kv_heads, p.d_head);
  const std::int64_t dv_stride = detail::token_stride(fn, "dv_stride", p.dv_stride, p.n_kv_heads, p.d_head);
  require(p.d_initial_state == nullptr || (p.d_initial_state != p.d_final_state && p.d_initial_state != p.initial_state),
          fn, ": d_initial_state must not alias d_final_state or initial_state");
  const detail::BackwardScratch scratch = detail::backward_scratch(p);
  detail::check_workspace(fn, workspace, workspace_bytes, scratch.bytes());

  const int H = p.n_heads, Hkv = p.n_kv_heads, group = H / Hkv;
  const std::int64_t dense = std::int64_t(H) * p.d_head;
  const detail::Operand q{p.q, H, 1, strides.q}, k{p.k, Hkv, group, strides.k}, v{p.v, Hkv, group, strides.v},
      d_o{p.d_o, H, 1, dense};
  detail::SweepBatch batch = detail::sweep_batch(p, strides);
  batch.vector_io = batch.vector_io && detail::aligned16(p.d_o) && detail::vector_ready(p.dq, dq_stride) &&
                    detail::vector_ready(p.dk, dk_stride) && detail::vector_ready(p.dv, dv_stride);
  detail::Carver carver(workspace);
  bfloat16* const s_states = carver.take<bfloat16>(scratch.state_elements);
  bfloat16* const ds_states = carver.take<bfloat16>(scratch.state_elements);
  float* const q_dot = carver.take<float>(scratch.dot_floats);
  float* const k_dot = carver.take<float>(scratch.dot_floats);
  float* const final_state = carver.take<float>(scratch.final_state_floats);
  float* const dk_heads = carver.take<float>(scratch.head_grad_floats);
  float* const dv_heads = carver.take<float>(scratch.head_grad_floats);

  // The chains: S (the forward's state, whose final value dg needs) and dS.
  detail::SweepBatch chains = batch;
  chains.n_sweeps = detail::backward_chains;
  detail::Sweep& s = chains.sweep[0];
  s.y = k, s.z = v;
  s.state_in = p.initial_state, s.state_out = final_state;
  s.chunk_states = s_states;
  detail::Sweep& ds = chains.sweep[1];
  ds.y = q, ds.z = d_o, ds.reverse = true;
  ds.state_in = p.d_final_state, ds.state_out = p.d_initial_state;
  ds.chunk_states = ds_states;

  // dq alone; dv and dk in one block per chunk (chunk_pair_kernel: dv first, dk reuses its q and
  // d_o tiles and its dS tile).
  batch.n_sweeps = 1;
  detail::Sweep& dq = batch.sweep[0];
  dq.x = d_o, dq.y = v, dq.z = k;
  dq.out = p.dq, dq.out_stride = dq_stride;
  dq.dot = q, dq.dot_partials = q_dot;
  dq.chunk_states = s_states, dq.chunk_states_transposed = true;  // R = Sᵀ
  detail::SweepBatch paired = batch;
  paired.n_sweeps = 2;
  detail::Sweep& dv = paired.sweep[0];
  dv = detail::Sweep{};
  dv.x = k, dv.y = q, dv.z = d_o, dv.reverse = true;
  if (group == 1) dv.out = p.dv, dv.out_stride = dv_stride;
  else dv.out_f32 = dv_heads, dv.out_stride = dense;
  dv.chunk_states = ds_states;  // R = dS
  detail::Sweep& dk = paired.sweep[1];
  dk = detail::Sweep{};
  dk.x = v, dk.y = d_o, dk.z = q, dk.reverse = true;
  if (group == 1) dk.out = p.dk, dk.out_stride = dk_stride;
  else dk.out_f32 = dk_heads, dk.out_stride = dense;
  dk.dot = k, dk.dot_partials = k_dot;
  dk.chunk_states = ds_states, dk.chunk_states_transposed = true;  // R = dSᵀ
  detail::launch(chains, batch, paired, stream);

  if (group > 1) {
    const std::int64_t tokens = std::int64_t(p.batch) * p.length;
    const std::int64_t n = tokens * Hkv * p.d_head;
    const int blocks = int(std::min<std::int64_t>((n + 255) / 256, 4096));
    detail::sum_groups_kernel<256><<<blocks, 256, 0, stream>>>(dk_heads, p.dk, tokens, Hkv, group, p.d_head, dk_stride);
    check(cudaGetLastError(), "gla backward: dk group sum launch");
    detail::sum_groups_kernel<256><<<blocks, 256, 0, stream>>>(dv_heads, p.dv, tokens, Hkv, group, p.d_head, dv_stride);
    check(cudaGetLastError(), "gla backward: dv group sum launch");
  }

  detail::GateGradient gate;
  gate.q_dot = q_dot, gate.k_dot = k_dot, gate.partials = scratch.partials;
  gate.final_state = final_state, gate.d_final_state = p.d_final_state;
  gate.dg = p.dg;
  gate.batch = p.batch, gate.length = p.length, gate.n_heads = H, gate.d_head = p.d_head;
  detail::gate_gradient_kernel<detail::gate_threads>
      <<<dim3(unsigned(H), unsigned(p.batch)), detail::gate_threads, 0, stream>>>(gate);
  check(cudaGetLastError(), "gla backward: dg scan launch");
}

inline void decode(const DecodeParams& p, cudaStream_t stream) {
  constexpr const char* fn = "gla::decode";
  detail::check_sizes(fn, p.batch, p.length, p.n_heads, p.n_kv_heads, p.d_head, p.scale);
  require(p.q != nullptr, fn, ": q is null");
  require(p.k != nullptr, fn, ": k is null");
  require(p.v != nullptr, fn, ": v is null");
  require(p.g != nullptr, fn, ": g (log decays) is null");
  require(p.o != nullptr, fn, ": o is null");
  require(p.state != nullptr, fn, ": state is null (expected [B, H, D, D] fp32, advanced in place)");
  const dim3 grid(unsigned((p.d_head + 31) / 32), unsigned(p.n_heads), unsigned(p.batch));
  detail::with_width(p.d_head, [&](auto width) {
    detail::decode_kernel<decltype(width)::value><<<grid, 32 * detail::decode_warps, 0, stream>>>(p);
  });
  check(cudaGetLastError(), "gla decode launch");
}

}  // namespace dash::cuda::gla

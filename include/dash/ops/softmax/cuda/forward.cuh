// Forward of Softmax and SlidingWindow attention on the GPU: bf16 q, k, v in, bf16 o and fp32
// lse out, fp32 accumulation and softmax statistics (flash-style online softmax).
//
// For every batch b, query head h (kv head g = h / (H / Hkv), never repeated in memory) and
// query i, over the keys A_i = { j ≤ i : i − j < W or j < S } (window W, S sinks):
//   s_ij = λ·q_i·k_j,   lse_i = ln Σ_{j∈A_i} exp(s_ij),   o_i = Σ_{j∈A_i} exp(s_ij − lse_i) v_j,
// with λ = params.scale (usually 1/√D). Key tiles that hold no pair of A are skipped, so a
// window costs O(T·(W + S)) rather than O(T²) (forward_tiles.cuh).
//
// forward() checks every field of ForwardParams on the host (dash::Error, before any CUDA
// call), then runs, on `stream`, without allocating or synchronising:
//   the Hopper kernel (TMA + wgmma, detail/forward_hopper.cuh) for d_head 64 and 128 on sm_90
//   when q, k, v and o are 16-byte aligned with strides in multiples of 8 elements;
//   the portable kernel (mma.sync, detail/forward_portable.cuh) otherwise, d_head 1 … 128.
//
// pair_forward() writes, over the same q, k, v, both the causal output (o, lse: W = ∞, no
// sinks) and the window-W output (window_o, window_lse: no sinks). Where the Hopper kernel runs
// (and window_o meets its alignment too) one causal walk writes both: each query block's walk
// from the diagonal leftwards has covered its window once it reaches the window's far edge,
// where the window's output is taken (detail/forward_hopper.cuh), which costs one more P V per
// block over the causal forward alone, rather than the window forward's whole band. Otherwise
// it runs the two forwards one after the other.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "dash/core/cuda.hpp"
#include "dash/core/error.hpp"
#include "dash/ops/softmax/cuda/detail/forward_hopper.cuh"
#include "dash/ops/softmax/cuda/detail/forward_portable.cuh"
#include "dash/ops/softmax/cuda/detail/forward_tiles.cuh"
#include "dash/ops/softmax/cuda/params.cuh"

namespace dash::cuda::attention {

// Largest d_head the kernels take.
inline constexpr int max_d_head = 128;

namespace detail {

// `who` names the launcher in the messages.
inline void check_layout(const Strides& s, const char* name, int heads, const ForwardParams& p,
                         const char* who = "attention::forward") {
  const std::int64_t row = std::int64_t(heads) * p.d_head;
  require(s.token >= row, who, ": ", name, "_strides.token = ", s.token, ", expected >= ", row, " (", name,
          "'s heads x d_head, one token's row)");
  require(p.batch == 1 || s.batch >= row, who, ": ", name, "_strides.batch = ", s.batch, ", expected >= ", row,
          " (", name, "'s heads x d_head, one token's row)");
}

inline void validate_forward(const ForwardParams& p, const char* who = "attention::forward") {
  require(p.q != nullptr, who, ": q is null");
  require(p.k != nullptr, who, ": k is null");
  require(p.v != nullptr, who, ": v is null");
  require(p.o != nullptr, who, ": o is null");
  require(p.lse != nullptr, who, ": lse is null");
  require(p.batch >= 1 && p.batch <= 65535, who, ": batch = ", p.batch, ", expected 1 ... 65535");
  require(p.length >= 1, who, ": length T = ", p.length, ", expected >= 1");
  require(p.n_heads >= 1 && p.n_heads <= 65535, who, ": n_heads = ", p.n_heads, ", expected 1 ... 65535");
  require(p.n_kv_heads >= 1, who, ": n_kv_heads = ", p.n_kv_heads, ", expected >= 1");
  require(p.n_heads % p.n_kv_heads == 0, who, ": n_heads = ", p.n_heads, " is not a multiple of n_kv_heads = ",
          p.n_kv_heads);
  require(p.d_head >= 1 && p.d_head <= max_d_head, who, ": d_head = ", p.d_head, ", expected 1 ... ", max_d_head);
  require(std::isfinite(p.scale) && p.scale > 0, who, ": scale = ", p.scale,
          ", expected a finite value > 0 (usually 1/sqrt(d_head))");
  require(p.mask.window >= 1, who, ": mask.window = ", p.mask.window, ", expected >= 1");
  require(p.mask.sinks >= 0, who, ": mask.sinks = ", p.mask.sinks, ", expected >= 0");
  check_layout(p.q_strides, "q", p.n_heads, p, who);
  check_layout(p.k_strides, "k", p.n_kv_heads, p, who);
  check_layout(p.v_strides, "v", p.n_kv_heads, p, who);
  check_layout(p.o_strides, "o", p.n_heads, p, who);
}

// The pair's two forwards as forward() takes them: the causal one into o, the window's into
// window_o.
inline ForwardParams causal_forward(const PairForwardParams& p) {
  ForwardParams f;
  f.q = p.q;
  f.k = p.k;
  f.v = p.v;
  f.o = p.o;
  f.lse = p.lse;
  f.q_strides = p.q_strides;
  f.k_strides = p.k_strides;
  f.v_strides = p.v_strides;
  f.o_strides = p.o_strides;
  f.batch = p.batch;
  f.length = p.length;
  f.n_heads = p.n_heads;
  f.n_kv_heads = p.n_kv_heads;
  f.d_head = p.d_head;
  f.scale = p.scale;
  return f;
}
inline ForwardParams window_forward(const PairForwardParams& p) {
  ForwardParams f = causal_forward(p);
  f.o = p.window_o;
  f.lse = p.window_lse;
  f.o_strides = p.window_o_strides;
  f.mask.window = p.window;
  return f;
}

inline void validate_pair_forward(const PairForwardParams& p) {
  constexpr const char* who = "attention::pair_forward";
  const ForwardParams causal = causal_forward(p);
  validate_forward(causal, who);
  require(p.window_o != nullptr, who, ": window_o is null");
  require(p.window_lse != nullptr, who, ": window_lse is null");
  require(p.window >= 1, who, ": window = ", p.window, ", expected >= 1");
  check_layout(p.window_o_strides, "window_o", p.n_heads, causal, who);
}

inline VisibleKeys visible_keys(const ForwardParams& p) {
  return {int(std::min<std::int64_t>(p.mask.window, p.length)), int(std::min<std::int64_t>(p.mask.sinks, p.length))};
}

enum class ForwardKernel { best, portable };

// Whether q, k, v and o start on 16 bytes and every row of them too (strides in multiples of 8
// elements): TMA needs it, and the portable kernel then moves rows in 16-byte chunks.
inline bool rows_16_byte_aligned(const ForwardParams& p) {
  const auto aligned = [](const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; };
  const auto strides = [&](const Strides& s) { return s.token % 8 == 0 && (p.batch == 1 || s.batch % 8 == 0); };
  return aligned(p.q) && aligned(p.k) && aligned(p.v) && aligned(p.o) && strides(p.q_strides) &&
         strides(p.k_strides) && strides(p.v_strides) && strides(p.o_strides);
}
inline bool rows_16_byte_aligned(const PairForwardParams& p) {
  return rows_16_byte_aligned(causal_forward(p)) && rows_16_byte_aligned(window_forward(p));
}

// The current device's compute capability (major) and SM count.
struct DeviceShape {
  int major, sms;
};
inline DeviceShape current_device() {
  int device = 0;
  DeviceShape d{};
  check(cudaGetDevice(&device), "attention::forward: cudaGetDevice");
  check(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, device),
        "attention::forward: cudaDeviceGetAttribute (compute capability)");
  check(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device),
        "attention::forward: cudaDeviceGetAttribute (SM count)");
  return d;
}

// CTAs of the Hopper kernel: one per SM, each walking its share of the query blocks, where a
// block sees at most 4096 keys (a window, or T ≤ 4096); one per block otherwise. Walking keeps
// the pipeline full from one block to the next (the next block's q loads, and its first scores
// are computed while the current block's last product runs) instead of starting over. But
// walking CTAs drift apart by up to a block's length, and with long causal blocks the k and v
// of the heads in flight outgrow L2: measured on an H200 (causal), walking ran 4-7% faster at
// T = 2048 and 4096, 1.4-1.5x slower at T = 16384, where one CTA per block, scheduled by the
// hardware longest first, keeps the running blocks on few heads.
inline int hopper_ctas(const VisibleKeys& mask, int length, int sms) {
  // A block's band spans at most min(T, W + 127) keys (forward_tiles.cuh), then its sinks.
  const std::int64_t keys = std::min<std::int64_t>(length, std::int64_t(mask.window) + 127) + mask.sinks;
  return keys <= 4096 ? sms : std::numeric_limits<int>::max();
}

// The one dispatch point: validated params → kernel and head width.
inline void run_forward(const ForwardParams& params, ForwardKernel kernel, cudaStream_t stream) {
  validate_forward(params);
  const VisibleKeys mask = visible_keys(params);
  const bool aligned = rows_16_byte_aligned(params);
  if (kernel == ForwardKernel::best && (params.d_head == 64 || params.d_head == 128) && aligned) {
    const DeviceShape device = current_device();
    if (device.major == 9) {
      const int ctas = hopper_ctas(mask, params.length, device.sms);
      if (params.d_head == 64)
        launch_forward_hopper<64, alternate_consumers<64>>(params, mask, ctas, stream);
      else
        launch_forward_hopper<128, alternate_consumers<128>>(params, mask, ctas, stream);
      return;
    }
  }
  const bool vectorized = params.d_head % 8 == 0 && aligned;
  if (params.d_head <= 16)
    launch_forward_portable<16>(params, mask, vectorized, stream);
  else if (params.d_head <= 32)
    launch_forward_portable<32>(params, mask, vectorized, stream);
  else if (params.d_head <= 64)
    launch_forward_portable<64>(params, mask, vectorized, stream);
  else
    launch_forward_portable<128>(params, mask, vectorized, stream);
}

// The pair's dispatch point: one causal walk writing both outputs on the Hopper kernel, else
// the two forwards.
inline void run_pair_forward(const PairForwardParams& params, ForwardKernel kernel, cudaStream_t stream) {
  validate_pair_forward(params);
  const ForwardParams causal = causal_forward(params);
  if (kernel == ForwardKernel::best && (params.d_head == 64 || params.d_head == 128) && rows_16_byte_aligned(params)) {
    const DeviceShape device = current_device();
    if (device.major == 9) {
      const VisibleKeys mask = visible_keys(causal);
      const WindowOutput window{params.window_o, params.window_o_strides, params.window_lse,
                                int(std::min<std::int64_t>(params.window, params.length))};
      const int ctas = hopper_ctas(mask, params.length, device.sms);
      if (params.d_head == 64)
        launch_forward_hopper<64, alternate_consumers<64>, true>(causal, mask, ctas, stream, window);
      else
        launch_forward_hopper<128, alternate_consumers<128>, true>(causal, mask, ctas, stream, window);
      return;
    }
  }
  run_forward(causal, kernel, stream);
  run_forward(window_forward(params), kernel, stream);
}

}  // namespace detail

// Writes params.o and params.lse; see the top of this file.
inline void forward(const ForwardParams& params, cudaStream_t stream) {
  detail::run_forward(params, detail::ForwardKernel::best, stream);
}

// Writes o and lse (causal) and window_o and window_lse (window W); see the top of this file.
inline void pair_forward(const PairForwardParams& params, cudaStream_t stream) {
  detail::run_pair_forward(params, detail::ForwardKernel::best, stream);
}

}  // namespace dash::cuda::attention

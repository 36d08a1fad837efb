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

inline void check_layout(const Strides& s, const char* name, int heads, const ForwardParams& p) {
  const std::int64_t row = std::int64_t(heads) * p.d_head;
  require(s.token >= row, "attention::forward: ", name, "_strides.token = ", s.token, ", expected >= ", row,
          " (", name, "'s heads x d_head, one token's row)");
  require(p.batch == 1 || s.batch >= row, "attention::forward: ", name, "_strides.batch = ", s.batch,
          ", expected >= ", row, " (", name, "'s heads x d_head, one token's row)");
}

inline void validate_forward(const ForwardParams& p) {
  require(p.q != nullptr, "attention::forward: q is null");
  require(p.k != nullptr, "attention::forward: k is null");
  require(p.v != nullptr, "attention::forward: v is null");
  require(p.o != nullptr, "attention::forward: o is null");
  require(p.lse != nullptr, "attention::forward: lse is null");
  require(p.batch >= 1 && p.batch <= 65535, "attention::forward: batch = ", p.batch, ", expected 1 ... 65535");
  require(p.length >= 1, "attention::forward: length T = ", p.length, ", expected >= 1");
  require(p.n_heads >= 1 && p.n_heads <= 65535, "attention::forward: n_heads = ", p.n_heads,
          ", expected 1 ... 65535");
  require(p.n_kv_heads >= 1, "attention::forward: n_kv_heads = ", p.n_kv_heads, ", expected >= 1");
  require(p.n_heads % p.n_kv_heads == 0, "attention::forward: n_heads = ", p.n_heads,
          " is not a multiple of n_kv_heads = ", p.n_kv_heads);
  require(p.d_head >= 1 && p.d_head <= max_d_head, "attention::forward: d_head = ", p.d_head, ", expected 1 ... ",
          max_d_head);
  require(std::isfinite(p.scale) && p.scale > 0, "attention::forward: scale = ", p.scale,
          ", expected a finite value > 0 (usually 1/sqrt(d_head))");
  require(p.mask.window >= 1, "attention::forward: mask.window = ", p.mask.window, ", expected >= 1");
  require(p.mask.sinks >= 0, "attention::forward: mask.sinks = ", p.mask.sinks, ", expected >= 0");
  check_layout(p.q_strides, "q", p.n_heads, p);
  check_layout(p.k_strides, "k", p.n_kv_heads, p);
  check_layout(p.v_strides, "v", p.n_kv_heads, p);
  check_layout(p.o_strides, "o", p.n_heads, p);
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

}  // namespace detail

// Writes params.o and params.lse; see the top of this file.
inline void forward(const ForwardParams& params, cudaStream_t stream) {
  detail::run_forward(params, detail::ForwardKernel::best, stream);
}

}  // namespace dash::cuda::attention

// Pieces shared by both backward kernels of Softmax / SlidingWindow attention (backward.cuh).
//
// Every launch is the backward of a mixture of one or two terms on the same q, k, v, with
// d the gradient of y = Σ_t π_t·o_t (the single-op backward is one term with π = 1, d = d_o):
//   P_t = exp(s − lse_t) under mask t,  D_t,i = d_i·o_t,i,  dP = d·vᵀ (shared by the terms),
//   P̄ = Σ_t π_t P_t,  dS = Σ_t π_t P_t ∘ (dP − D_t),  dV = P̄ᵀ d,  dQ = dS K,  dK = dSᵀ Q,
//   dL/dπ_t = Σ D_t.
// With one term π is not applied per element: the gradients are linear in d, so π scales
// dq, dk and dv where they are written.
//
// The backward runs in three passes over a workspace of fp32:
//   1. preprocess: D_t,i per query row and term (delta), the accumulator rows zeroed, and when
//      dL/dπ is wanted per-block partial sums of D_t (a fixed grid), added in order by one
//      block per term afterwards, so that dL/dπ does not depend on scheduling;
//   2. the main kernel: one CTA per (key tile, batch, kv head, head split) recomputes
//      P_t tile by tile for its share of the kv head's query heads, keeps dK and
//      dV of its keys in registers, and adds each tile's dQ = dS·K into the fp32 accumulator
//      (atomics in the mma.sync kernel, tensor bulk reductions in the wgmma kernel). When a
//      group's heads are split over several CTAs (wgmma kernel only), each adds its partial
//      dK, dV into fp32 accumulators as well. Its query tiles are the union of the terms'
//      reach (the wgmma kernel evaluates on a tile only the terms that reach it);
//   3. finish: dq = scale·accumulator (plus what dq held, when accumulating), to bf16, and
//      likewise dk = scale·Σ, dv = Σ from their accumulators when heads were split.
// Tiles are loaded into shared memory with cp.async (16-byte chunks) where every input row
// is 16-byte aligned, element by element otherwise; rows past T and columns past d_head are
// zero-filled, so padded queries and keys contribute nothing (a padded query has q = dO = 0
// and lse = D = 0: its p is finite and its dS is 0; a padded key has k = v = 0 and is hidden
// from every real query by causality).
//
// Work per CTA: key tile j of a causal mask meets the query tiles from its diagonal to T, so
// the work falls with j (with a window it is flat, then falls; sink tiles see every query).
// The wgmma kernel's grid is one dimension ordered heavy first, in blocks of
// `sections_per_block` sections (a section = (batch, kv head, head split)): inside a block the
// key tile is the slow index. The hardware hands out CTAs in index order, so heavy tiles start
// early and light ones fill the tail (longest processing time first), while the CTAs running
// at once stay within a few sections, whose q, dO and dq rows they share in L2.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dash/core/cuda.hpp"
#include "dash/core/cuda/numeric.cuh"
#include "dash/core/cuda/shared.cuh"
#include "dash/ops/softmax/cuda/params.cuh"

namespace dash::cuda::attention::backward_kernels {

// The mask of params.cuh on one (query, key) pair and on tiles, as in AttentionMask.
struct TileMask {
  int window, sinks;

  // Bitwise rather than short-circuit operators: evaluated per element of a tile, the latter
  // compile to a divergent branch per element.
  __device__ bool visible(int query, int key) const {
    return (key <= query) & ((query - key < window) | (key < sinks));
  }
  // Whether every pair of the tile [q0, q1) × [k0, k1) is visible (no per-element mask needed).
  __device__ bool full(int q0, int q1, int k0, int k1) const {
    return k1 - 1 <= q0 && ((q1 - 1) - k0 < window || k1 <= sinks);
  }
  // Whether any pair of the tile is visible: a key at or below some query, and either a sink
  // key or a pair closer than the window (the closest pair is max(0, q0 − (k1 − 1)) apart).
  __device__ bool reaches(int q0, int q1, int k0, int k1) const {
    return q1 - 1 >= k0 && (k0 < sinks || max(0, q0 - (k1 - 1)) < window);
  }
  // One past the last query that sees any key of [k0, k1): every query after a sink key sees
  // it; otherwise the window's reach from the last key.
  __device__ int query_end(int k0, int k1, int length) const {
    return k0 < sinks ? length : min(length, k1 - 1 + window);
  }
};

// Everything a backward kernel reads: the caller's params plus the workspace carved for them.
struct BackwardArgs {
  MixtureBackwardParams p;  // the single-op backward: one term, p.pi null (π = 1)
  int terms = 1;
  TileMask masks[max_mixture_backward_terms];  // the terms' masks, window and sinks clamped to T
  float* delta[max_mixture_backward_terms] = {};  // [B, H, T] per term: D_t,i = d_i·o_t,i
  double* delta_partials = nullptr;  // [terms, preprocess blocks]: Σ D_t per block, when p.d_pi
  const float* output_weight = nullptr;  // one term with a weight: π of it, scaling dq, dk, dv
  float* dq_acc = nullptr;  // [B, H, T, dq_row]: Σ_j dS_ij k_j, unscaled
  float* dk_acc = nullptr;  // [B, Hkv, T, dq_row]: Σ_i dS_ij q_i over the group, unscaled
  float* dv_acc = nullptr;  // [B, Hkv, T, dq_row]: Σ_i p_ij dO_i over the group (both only
                            // when head_splits > 1)
  int dq_row = 0;           // d_head rounded up to 8 (aligned two-float atomics, 32-byte rows)
  int key_tiles = 0;        // wgmma kernel: tiles of 128 keys
  int head_splits = 1;      // wgmma kernel: CTAs that share one kv head's query heads
  int sections_per_block = 1;  // wgmma kernel: width of the blocks of the CTA order (below)
  bool vector_qkv = false;       // q, k, v, d rows can be read in 16-byte chunks
  bool vector_kv_grads = false;  // dk, dv rows can be written in 16-byte chunks

  // One past the last query that sees any key of [k0, k1) under some term.
  template <int Terms>
  __device__ int query_end(int k0, int k1) const {
    int end = masks[0].query_end(k0, k1, p.length);
    if constexpr (Terms > 1) end = max(end, masks[1].query_end(k0, k1, p.length));
    return end;
  }
  // The factor of dq, dk and dv where they are written: π of a single weighted term, else 1.
  __device__ float gradient_weight() const { return output_weight ? *output_weight : 1.f; }
};

// P̄ and dS (in place of s and dp) at one (query, key) pair from `Terms` terms, each with its
// weight, −lse·log2(e), D and mask; hidden pairs of a term (when Masked) contribute nothing.
template <int Terms>
__device__ __forceinline__ void mixture_element(float& s, float& dp, float scale_log2, const float (&weight)[Terms],
                                                const float (&neg_lse_log2)[Terms], const float (&delta)[Terms],
                                                const TileMask (&masks)[Terms], bool masked, int query, int key) {
  float p_sum = 0, ds = 0;
#pragma unroll
  for (int t = 0; t < Terms; ++t) {
    float prob = weight[t] * ptx::fast_exp2(fmaf(s, scale_log2, neg_lse_log2[t]));
    if (masked && !masks[t].visible(query, key)) prob = 0.f;
    p_sum += prob;
    ds += prob * (dp - delta[t]);
  }
  s = p_sum;
  dp = ds;
}

// Rows [row0, row0 + Rows) × columns [0, Cols) of one head of a [B, T, heads, D] tensor
// (`head` points at token 0 of that head), zero past `length` rows and `d_head` columns.
// Asynchronous on the 16-byte path (completes at ptx::cp_async_wait<0>), synchronous otherwise.
// On the 16-byte path each thread keeps one column chunk and walks rows Threads / (Cols / 8)
// apart, so its addresses advance by constant steps.
template <int Rows, int Cols, class Layout, int Threads>
__device__ __forceinline__ void load_tile(std::uint32_t smem, const bfloat16* head, std::int64_t token_stride,
                                          int row0, int length, int d_head, bool vector) {
  if (vector) {
    constexpr int per_row = Cols / 8, row_step = Threads / per_row;
    static_assert(Threads % per_row == 0 && Rows % row_step == 0 && row_step % 8 == 0);
    const int c8 = threadIdx.x % per_row, r = threadIdx.x / per_row;
    const bool column_valid = c8 * 8 < d_head;
    const bfloat16* src = head + (row0 + r) * token_stride + c8 * 8;
    const std::uint32_t dst = smem + Layout::chunk(r, c8);
#pragma unroll
    for (int i = 0; i < Rows / row_step; ++i) {
      const bool valid = column_valid && row0 + r + i * row_step < length;
      ptx::cp_async_16_or_zero(dst + i * row_step * Layout::row_bytes, valid ? src + i * row_step * token_stride : head,
                               valid);
    }
  } else {
    for (int e = threadIdx.x; e < Rows * Cols; e += Threads) {
      const int r = e / Cols, c = e % Cols, row = row0 + r;
      const bfloat16 x = row < length && c < d_head ? head[row * token_stride + c] : __float2bfloat16(0.f);
      ptx::st_shared_u16(smem + Layout::chunk(r, c / 8) + (c % 8) * 2, __bfloat16_as_ushort(x));
    }
  }
}

// lse and D of every term for query rows [row0, row0 + Rows) of head `head` into `smem`:
// [Terms][lse, D][Rows] floats, zero past T; thread 2·Rows·t + Rows·(0 or 1) + r copies one.
template <int Rows, int Terms>
__device__ __forceinline__ void load_row_stats(std::uint32_t smem, const BackwardArgs& args, int batch, int head,
                                               int row0) {
  const MixtureBackwardParams& p = args.p;
  if (threadIdx.x < 2 * Rows * Terms) {
    // Pointers selected, not indexed by a runtime term: that would copy the parameters to
    // local memory.
    const bool second = Terms > 1 && threadIdx.x >= 2 * Rows;
    const int r = threadIdx.x % Rows;
    const bool is_lse = threadIdx.x % (2 * Rows) < Rows;
    const std::int64_t stats = (std::int64_t(batch) * p.n_heads + head) * p.length;
    const float* lse = second ? p.terms[Terms - 1].lse : p.terms[0].lse;
    const float* delta = second ? args.delta[Terms - 1] : args.delta[0];
    const float* src = (is_lse ? lse : delta) + stats;
    const bool valid = row0 + r < p.length;
    ptx::cp_async_4_or_zero(smem + 4 * threadIdx.x, valid ? src + row0 + r : src, valid);
  }
}

// The (query head, query tile) of each step of a CTA's loop, advanced without divisions:
// steps run over the tiles [first_tile, end_tile) of each head of the group in turn.
struct StepCursor {
  int head, tile, first_tile, end_tile;

  __device__ void advance() {
    if (++tile == end_tile) {
      tile = first_tile;
      ++head;
    }
  }
};

// What one CTA of the wgmma kernel does: key tile `key_tile` of (batch, kv_head), over query
// heads [first_head, first_head + heads).
struct KeyTileWork {
  int key_tile, batch, kv_head, first_head, heads;
};

// CTA `block` of the grid ordered as described at the top: blocks of sections_per_block
// sections (the last one possibly narrower), key tile major inside a block; a section is
// (batch, kv head, split) with the split fastest, so the CTAs of one kv head sit together.
__device__ __forceinline__ KeyTileWork key_tile_work(const BackwardArgs& args, int block) {
  const MixtureBackwardParams& p = args.p;
  const int sections = p.batch * p.n_kv_heads * args.head_splits;
  const int per_block = args.sections_per_block * args.key_tiles;
  const int first_section = block / per_block * args.sections_per_block;
  const int width = min(args.sections_per_block, sections - first_section);
  const int in_block = block % per_block;
  const int section = first_section + in_block % width;
  const int split = section % args.head_splits, kv_head = section / args.head_splits % p.n_kv_heads;
  const int heads = p.n_heads / p.n_kv_heads / args.head_splits;
  return {in_block / width, section / (args.head_splits * p.n_kv_heads), kv_head,
          kv_head * (p.n_heads / p.n_kv_heads) + split * heads, heads};
}

// Element offset of (batch, token 0, head) in a [B, T, heads, D] tensor.
__device__ __forceinline__ std::int64_t head_offset(const Strides& s, int batch, int head, int d_head) {
  return batch * s.batch + std::int64_t(head) * d_head;
}

inline constexpr int preprocess_threads = 256;

// Σ of one double per thread of a block of preprocess_threads in a fixed order (a shuffle
// tree per warp, then the warps' sums in turn), returned to thread 0. Every thread calls it.
__device__ __forceinline__ double block_sum(double x, double (&warp_sums)[preprocess_threads / 32]) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_down_sync(0xffffffffu, x, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = x;
  __syncthreads();
  double total = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < preprocess_threads / 32; ++w) total += warp_sums[w];
  __syncthreads();  // warp_sums may be reused
  return total;
}

// Pass 1, `lanes_per_row` lanes (a power of two ≤ 32) per (batch, token, query head) row:
// D_t = d·o_t in fp32 for every term, and the row of the dq accumulator zeroed; rows of query
// heads below Hkv also zero that kv head's rows of the dk and dv accumulators, when there are
// any. With delta_partials, each block writes Σ D_t over its rows (in double, block_sum).
// VectorRows: o and d rows are read in 16-byte chunks, one per lane, so that a warp of short
// rows reads several at once.
template <bool VectorRows, int Terms>
__global__ void __launch_bounds__(preprocess_threads) backward_preprocess_kernel(BackwardArgs args, int lanes_per_row) {
  const MixtureBackwardParams& p = args.p;
  const std::int64_t rows = std::int64_t(p.batch) * p.length * p.n_heads;
  const int lane = threadIdx.x % 32, in_row = lane % lanes_per_row;
  const std::int64_t row =
      (std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32 * (32 / lanes_per_row) + lane / lanes_per_row;
  const bool valid = row < rows;  // lanes past the end still take part in the shuffles
  const std::int64_t r = valid ? row : 0;
  const int h = int(r % p.n_heads), i = int((r / p.n_heads) % p.length), b = int(r / (std::int64_t(p.n_heads) * p.length));
  const bfloat16* d = p.d + head_offset(p.d_strides, b, h, p.d_head) + i * p.d_strides.token;
  const bfloat16* o[Terms];
#pragma unroll
  for (int t = 0; t < Terms; ++t)
    o[t] = p.terms[t].o + head_offset(p.terms[t].o_strides, b, h, p.d_head) + i * p.terms[t].o_strides.token;
  float dot[Terms] = {};
  if constexpr (VectorRows) {
    for (int c8 = in_row; valid && c8 * 8 < p.d_head; c8 += lanes_per_row) {
      const uint4 g = *reinterpret_cast<const uint4*>(d + c8 * 8);
      const auto* g2 = reinterpret_cast<const __nv_bfloat162*>(&g);
#pragma unroll
      for (int t = 0; t < Terms; ++t) {
        const uint4 a = *reinterpret_cast<const uint4*>(o[t] + c8 * 8);
        const auto* a2 = reinterpret_cast<const __nv_bfloat162*>(&a);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const float2 x = __bfloat1622float2(a2[k]), y = __bfloat1622float2(g2[k]);
          dot[t] += x.x * y.x + x.y * y.y;
        }
      }
    }
  } else {
    for (int c = in_row; valid && c < p.d_head; c += lanes_per_row) {
      const float y = __bfloat162float(d[c]);
#pragma unroll
      for (int t = 0; t < Terms; ++t) dot[t] += __bfloat162float(o[t][c]) * y;
    }
  }
#pragma unroll
  for (int t = 0; t < Terms; ++t)
    for (int offset = lanes_per_row / 2; offset > 0; offset /= 2)
      dot[t] += __shfl_xor_sync(0xffffffffu, dot[t], offset);
  if (args.delta_partials) {  // the same for every thread of the grid
    __shared__ double warp_sums[preprocess_threads / 32];
#pragma unroll
    for (int t = 0; t < Terms; ++t) {
      const double sum = block_sum(valid && in_row == 0 ? double(dot[t]) : 0.0, warp_sums);
      if (threadIdx.x == 0) args.delta_partials[std::int64_t(t) * gridDim.x + blockIdx.x] = sum;
    }
  }
  if (!valid) return;
  const std::int64_t stat = (std::int64_t(b) * p.n_heads + h) * p.length + i;
  if (in_row == 0)
#pragma unroll
    for (int t = 0; t < Terms; ++t) args.delta[t][stat] = dot[t];
  float4* acc = reinterpret_cast<float4*>(args.dq_acc + stat * args.dq_row);
  for (int c4 = in_row; c4 < args.dq_row / 4; c4 += lanes_per_row) acc[c4] = make_float4(0.f, 0.f, 0.f, 0.f);
  if (args.head_splits > 1 && h < p.n_kv_heads) {
    const std::int64_t kv_row = ((std::int64_t(b) * p.n_kv_heads + h) * p.length + i) * args.dq_row;
    float4* dk = reinterpret_cast<float4*>(args.dk_acc + kv_row);
    float4* dv = reinterpret_cast<float4*>(args.dv_acc + kv_row);
    for (int c4 = in_row; c4 < args.dq_row / 4; c4 += lanes_per_row)
      dk[c4] = dv[c4] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

// dL/dπ_t = Σ D_t: block t adds term t's `blocks` partials, each thread a fixed stride of
// them, then block_sum; d_pi[pi_index] is overwritten. (A template, like every kernel in these
// headers, so that several translation units may include them.)
template <int Threads>
__global__ void __launch_bounds__(Threads) mixture_weight_gradient_kernel(BackwardArgs args, int blocks) {
  static_assert(Threads == preprocess_threads, "block_sum reduces preprocess_threads lanes");
  __shared__ double warp_sums[Threads / 32];
  const double* partials = args.delta_partials + std::int64_t(blockIdx.x) * blocks;
  double sum = 0;
  for (int i = threadIdx.x; i < blocks; i += Threads) sum += partials[i];
  sum = block_sum(sum, warp_sums);
  if (threadIdx.x == 0) args.p.d_pi[args.p.terms[blockIdx.x].pi_index] = float(sum);
}

// One fp32 accumulator [B, heads, T, acc_row] and the [B, T, heads, D] bf16 tensor that
// pass 3 writes from it: out = scale·acc (+ out when accumulating).
struct RoundingJob {
  const float* acc = nullptr;
  bfloat16* out = nullptr;
  Strides strides;
  int heads = 0;
  float scale = 1.f;
  const float* weight = nullptr;  // device factor of scale (π of a single weighted term), or none
};

// Pass 3 over up to three jobs (dq; dk and dv when heads were split), blockIdx.z picking one.
struct FinishArgs {
  RoundingJob jobs[3];
  int batch = 0, length = 0, d_head = 0, acc_row = 0;
};

// Pass 3: out = scale·acc (+ out when Accumulate), rounded to bf16. Grid: z over jobs, y over
// (batch, head) slices, x over one slice's T·D elements in groups of 8 (Vector: one 16-byte
// store) or 1.
template <bool Accumulate, bool Vector>
__global__ void backward_finish_kernel(FinishArgs args) {
  // Selected by value rather than indexed, which would copy the parameters to local memory.
  const RoundingJob job = blockIdx.z == 0 ? args.jobs[0] : blockIdx.z == 1 ? args.jobs[1] : args.jobs[2];
  const float scale = job.weight ? job.scale * *job.weight : job.scale;
  constexpr int group = Vector ? 8 : 1;
  const int groups_per_row = args.d_head / group;
  const std::int64_t groups = std::int64_t(args.length) * groups_per_row;
  for (int slice = blockIdx.y; slice < args.batch * job.heads; slice += gridDim.y) {
    const int b = slice / job.heads, h = slice % job.heads;
    const float* acc = job.acc + std::int64_t(slice) * args.length * args.acc_row;
    bfloat16* out_head = job.out + head_offset(job.strides, b, h, args.d_head);
    for (std::int64_t e = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < groups;
         e += std::int64_t(gridDim.x) * blockDim.x) {
      const int i = int(e / groups_per_row), d = int(e % groups_per_row) * group;
      const float* a = acc + std::int64_t(i) * args.acc_row + d;
      bfloat16* out = out_head + i * job.strides.token + d;
      if constexpr (Vector) {
        const float4 lo = *reinterpret_cast<const float4*>(a), hi = *reinterpret_cast<const float4*>(a + 4);
        float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
        uint4 old = make_uint4(0, 0, 0, 0);
        if constexpr (Accumulate) old = *reinterpret_cast<const uint4*>(out);
        const auto* old2 = reinterpret_cast<const __nv_bfloat162*>(&old);
        uint4 packed;
        auto* packed2 = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          float2 x{scale * v[2 * k], scale * v[2 * k + 1]};
          if constexpr (Accumulate) {
            const float2 y = __bfloat1622float2(old2[k]);
            x.x += y.x;
            x.y += y.y;
          }
          packed2[k] = __float22bfloat162_rn(x);
        }
        *reinterpret_cast<uint4*>(out) = packed;
      } else {
        float value = scale * *a;
        if constexpr (Accumulate) value += __bfloat162float(*out);
        *out = __float2bfloat16(value);
      }
    }
  }
}

// dK and dV of one key row and column pair, from the accumulators to bf16 (both times
// `weight`, dK scaled), added to what the outputs hold when accumulating; rows past T and
// columns past d_head are dropped.
__device__ __forceinline__ void store_key_gradients(const MixtureBackwardParams& p, float weight,
                                                    std::int64_t dk_head, std::int64_t dv_head, int key, int col,
                                                    float dk0, float dk1, float dv0, float dv1) {
  if (key >= p.length) return;
  bfloat16* dk = p.dk + dk_head + key * p.dk_strides.token;
  bfloat16* dv = p.dv + dv_head + key * p.dv_strides.token;
  const float dk_scale = p.scale * weight;
  const float dk_values[2] = {dk_scale * dk0, dk_scale * dk1}, dv_values[2] = {weight * dv0, weight * dv1};
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (col + j >= p.d_head) break;
    float a = dk_values[j], v = dv_values[j];
    if (p.accumulate) {
      a += __bfloat162float(dk[col + j]);
      v += __bfloat162float(dv[col + j]);
    }
    dk[col + j] = __float2bfloat16(a);
    dv[col + j] = __float2bfloat16(v);
  }
}

// Adds the pair (x, y) at columns [col, col + 2) of a dq accumulator row.
__device__ __forceinline__ void add_dq_pair(float* row, int col, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(row + col), make_float2(x, y));
#else
  atomicAdd(row + col, x);
  atomicAdd(row + col + 1, y);
#endif
}

}  // namespace dash::cuda::attention::backward_kernels

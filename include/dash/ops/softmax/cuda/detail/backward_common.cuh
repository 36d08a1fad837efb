// Pieces shared by both backward kernels of Softmax / SlidingWindow attention (backward.cuh).
//
// The backward runs in three passes over a workspace of fp32:
//   1. preprocess: D_i = dO_i·o_i per query row (delta), and the accumulator rows zeroed;
//   2. the main kernel: one CTA per (key tile, batch, kv head, head split) recomputes
//      P = exp(s − lse) tile by tile for its share of the kv head's query heads, keeps dK and
//      dV of its keys in registers, and adds each tile's dQ = dS·K into the fp32 accumulator
//      (atomics in the mma.sync kernel, tensor bulk reductions in the wgmma kernel). When a
//      group's heads are split over several CTAs (wgmma kernel only), each adds its partial
//      dK, dV into fp32 accumulators as well;
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
#include "dash/core/cuda/shared.cuh"
#include "dash/ops/softmax/cuda/params.cuh"

namespace dash::cuda::attention::backward_kernels {

// Everything a backward kernel reads: the caller's params plus the workspace carved for them.
struct BackwardArgs {
  BackwardParams p;
  float* delta = nullptr;   // [B, H, T]: D_i = dO_i·o_i
  float* dq_acc = nullptr;  // [B, H, T, dq_row]: Σ_j dS_ij k_j, unscaled
  float* dk_acc = nullptr;  // [B, Hkv, T, dq_row]: Σ_i dS_ij q_i over the group, unscaled
  float* dv_acc = nullptr;  // [B, Hkv, T, dq_row]: Σ_i p_ij dO_i over the group (both only
                            // when head_splits > 1)
  int dq_row = 0;           // d_head rounded up to 8 (aligned two-float atomics, 32-byte rows)
  int key_tiles = 0;        // wgmma kernel: tiles of 128 keys
  int head_splits = 1;      // wgmma kernel: CTAs that share one kv head's query heads
  int sections_per_block = 1;  // wgmma kernel: width of the blocks of the CTA order (below)
  int window = 0;           // the mask's window and sinks clamped to T (i − j < T always holds)
  int sinks = 0;
  bool vector_qkv = false;       // q, k, v, d_o rows can be read in 16-byte chunks
  bool vector_kv_grads = false;  // dk, dv rows can be written in 16-byte chunks
};

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
  // One past the last query that sees any key of [k0, k1): every query after a sink key sees
  // it; otherwise the window's reach from the last key.
  __device__ int query_end(int k0, int k1, int length) const {
    return k0 < sinks ? length : min(length, k1 - 1 + window);
  }
};

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

// lse and D of query rows [row0, row0 + Rows) (`lse`, `delta` point at row 0 of one head),
// zero past `length`; threads [0, Rows) copy lse, threads [Rows, 2·Rows) copy D.
template <int Rows>
__device__ __forceinline__ void load_row_stats(std::uint32_t lse_smem, std::uint32_t delta_smem, const float* lse,
                                               const float* delta, int row0, int length) {
  if (threadIdx.x < 2 * Rows) {
    const bool is_lse = threadIdx.x < Rows;
    const int r = is_lse ? threadIdx.x : threadIdx.x - Rows;
    const bool valid = row0 + r < length;
    const float* src = is_lse ? lse : delta;
    ptx::cp_async_4_or_zero((is_lse ? lse_smem : delta_smem) + 4 * r, valid ? src + row0 + r : src, valid);
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
  const BackwardParams& p = args.p;
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

// Pass 1, `lanes_per_row` lanes (a power of two ≤ 32) per (batch, token, query head) row:
// delta = dO·o in fp32, and the row of the dq accumulator zeroed; rows of query heads below
// Hkv also zero that kv head's rows of the dk and dv accumulators, when there are any.
// VectorRows: o and d_o rows are read in 16-byte chunks, one per lane, so that a warp of
// short rows reads several at once.
template <bool VectorRows>
__global__ void backward_preprocess_kernel(BackwardArgs args, int lanes_per_row) {
  const BackwardParams& p = args.p;
  const std::int64_t rows = std::int64_t(p.batch) * p.length * p.n_heads;
  const int lane = threadIdx.x % 32, in_row = lane % lanes_per_row;
  const std::int64_t row =
      (std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32 * (32 / lanes_per_row) + lane / lanes_per_row;
  const bool valid = row < rows;  // lanes past the end still take part in the shuffles
  const std::int64_t r = valid ? row : 0;
  const int h = int(r % p.n_heads), i = int((r / p.n_heads) % p.length), b = int(r / (std::int64_t(p.n_heads) * p.length));
  const bfloat16* o = p.o + head_offset(p.o_strides, b, h, p.d_head) + i * p.o_strides.token;
  const bfloat16* d_o = p.d_o + head_offset(p.d_o_strides, b, h, p.d_head) + i * p.d_o_strides.token;
  float dot = 0;
  if constexpr (VectorRows) {
    for (int c8 = in_row; valid && c8 * 8 < p.d_head; c8 += lanes_per_row) {
      const uint4 a = *reinterpret_cast<const uint4*>(o + c8 * 8), g = *reinterpret_cast<const uint4*>(d_o + c8 * 8);
      const auto* a2 = reinterpret_cast<const __nv_bfloat162*>(&a);
      const auto* g2 = reinterpret_cast<const __nv_bfloat162*>(&g);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float2 x = __bfloat1622float2(a2[k]), y = __bfloat1622float2(g2[k]);
        dot += x.x * y.x + x.y * y.y;
      }
    }
  } else {
    for (int d = in_row; valid && d < p.d_head; d += lanes_per_row)
      dot += __bfloat162float(o[d]) * __bfloat162float(d_o[d]);
  }
  for (int offset = lanes_per_row / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
  if (!valid) return;
  const std::int64_t stat = (std::int64_t(b) * p.n_heads + h) * p.length + i;
  if (in_row == 0) args.delta[stat] = dot;
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

// One fp32 accumulator [B, heads, T, acc_row] and the [B, T, heads, D] bf16 tensor that
// pass 3 writes from it: out = scale·acc (+ out when accumulating).
struct RoundingJob {
  const float* acc = nullptr;
  bfloat16* out = nullptr;
  Strides strides;
  int heads = 0;
  float scale = 1.f;
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
          float2 x{job.scale * v[2 * k], job.scale * v[2 * k + 1]};
          if constexpr (Accumulate) {
            const float2 y = __bfloat1622float2(old2[k]);
            x.x += y.x;
            x.y += y.y;
          }
          packed2[k] = __float22bfloat162_rn(x);
        }
        *reinterpret_cast<uint4*>(out) = packed;
      } else {
        float value = job.scale * *a;
        if constexpr (Accumulate) value += __bfloat162float(*out);
        *out = __float2bfloat16(value);
      }
    }
  }
}

// dK and dV of one key row and column pair, from the accumulators to bf16 (dK scaled), added
// to what the outputs hold when accumulating; rows past T and columns past d_head are dropped.
__device__ __forceinline__ void store_key_gradients(const BackwardParams& p, std::int64_t dk_head,
                                                    std::int64_t dv_head, int key, int col, float dk0, float dk1,
                                                    float dv0, float dv1) {
  if (key >= p.length) return;
  bfloat16* dk = p.dk + dk_head + key * p.dk_strides.token;
  bfloat16* dv = p.dv + dv_head + key * p.dv_strides.token;
  const float dk_values[2] = {p.scale * dk0, p.scale * dk1}, dv_values[2] = {dv0, dv1};
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

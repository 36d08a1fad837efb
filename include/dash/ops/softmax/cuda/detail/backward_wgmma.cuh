// The Hopper backward kernel of Softmax / SlidingWindow attention: warpgroup tensor cores
// (wgmma, sm_90a), operands read by the tensor cores straight from 128-byte-swizzled shared
// memory.
//
// One CTA of two warpgroups per (tile of 128 keys, batch, kv head, head split), in the order of
// key_tile_work (backward_common.cuh); warpgroup w owns keys [64w, 64w + 64). For every query
// head of its share of the kv head's group and every tile of 64 queries some term's mask lets
// see these keys (s = scale·q·k, keys as rows; dO is the upstream gradient d of the terms of
// backward_common.cuh):
//   Sᵀ = K Qᵀ,  dPᵀ = V dOᵀ                  (m64n64, both operands K-major in shared memory)
//   Pᵀ = exp(Sᵀ − lse)                       (registers, fp32, while dPᵀ still runs)
//   dV += Pᵀ dO                              (m64nD, A = Pᵀ from registers, B = dO transposed)
//   dSᵀ = Pᵀ ∘ (dPᵀ − D),  dK += dSᵀ Q        (while dV runs; same form as dV)
//   dQ  = dS K                               (m64n(D/2) per warpgroup over all 128 keys: dSᵀ
//                                             and K transposed from shared memory)
// With two terms, P̄ᵀ = Σ_t π_t Pᵀ_t and dSᵀ = Σ_t π_t Pᵀ_t ∘ (dPᵀ − D_t) take the place of Pᵀ and
// dSᵀ: both are formed once dPᵀ is in (no second P tile stays live beside them), with one
// exponential per element for each term whose mask reaches the warpgroup's tile; every GEMM
// runs once per tile, as for one term.
// dK, dV stay in registers until the end, then go out through shared memory in 16-byte
// chunks: as bf16 when the CTA holds the whole group, else added to the fp32 dk, dv
// accumulators (16-byte atomics) for pass 3 to round. Each step's dQ tile goes through shared
// memory (128-byte-swizzled boxes of 64 rows × 32 floats) to the fp32 accumulator by tensor
// bulk reductions (cp.reduce.async.bulk.tensor through a tensor map, added in L2; rows past T
// are clipped), issued by one thread after the next step's first barrier. Q, dO, lse and D
// are double buffered with cp.async, as are the dQ tiles.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "dash/core/cuda/numeric.cuh"
#include "dash/core/cuda/shared.cuh"
#include "dash/core/cuda/tma.cuh"
#include "dash/core/cuda/wgmma.cuh"
#include "dash/ops/softmax/cuda/detail/backward_common.cuh"

namespace dash::cuda::attention::backward_kernels {

template <int DPad, int Terms>
struct WgmmaBackwardTiles {
  static constexpr int keys = 128, queries = 64, threads = 256;
  static constexpr int key_tile_bytes = keys * DPad * 2, query_tile_bytes = queries * DPad * 2;
  // dQ of one query tile in fp32: DPad / 32 boxes of 64 rows × 32 floats (128 bytes), each
  // 128-byte swizzled as the tensor map expects.
  static constexpr int dq_box_cols = 32, dq_box_bytes = queries * dq_box_cols * 4, dq_tile_bytes = queries * DPad * 4;
  // Tiles read by the tensor cores start on 1024-byte boundaries: the swizzle repeats every
  // 8 rows of 128 bytes.
  static constexpr int k_offset = 0;
  static constexpr int v_offset = k_offset + key_tile_bytes;
  static constexpr int q_offset = v_offset + key_tile_bytes;            // two stages
  static constexpr int do_offset = q_offset + 2 * query_tile_bytes;     // two stages
  static constexpr int ds_offset = do_offset + 2 * query_tile_bytes;    // dSᵀ [keys][queries]
  static constexpr int dq_offset = ds_offset + keys * queries * 2;      // two stages
  // Two stages of [Terms][lse, D][queries] fp32 (load_row_stats).
  static constexpr int stats_offset = dq_offset + 2 * dq_tile_bytes;
  static constexpr int stats_stage_bytes = Terms * 2 * queries * 4;
  static constexpr int smem_bytes = stats_offset + 2 * stats_stage_bytes + 1024;  // + alignment of the base
};

// Pᵀ (in place of Sᵀ) and dSᵀ (in place of dPᵀ) for one warpgroup's accumulators: element
// 4c + 2·half + j is key `key0` + 8·half, query q0 + 8c + 2t + j. Masked: hidden pairs get 0.
template <bool Masked>
__device__ __forceinline__ void probabilities(float (&s)[32], const float* lse, float scale_log2, const TileMask& mask,
                                              int q0, int key0, int t) {
  constexpr float log2e = 1.4426950408889634f;
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const float2 l = reinterpret_cast<const float2*>(lse)[4 * c + t];
    const float neg_lse[2] = {-l.x * log2e, -l.y * log2e};
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        float& x = s[4 * c + 2 * half + j];
        const float prob = ptx::fast_exp2(fmaf(x, scale_log2, neg_lse[j]));
        if constexpr (Masked)
          x = mask.visible(q0 + 8 * c + 2 * t + j, key0 + 8 * half) ? prob : 0.f;
        else
          x = prob;
      }
  }
}

// P̄ᵀ and dSᵀ in place of Sᵀ and dPᵀ from `Terms` terms (mixture_element) for one warpgroup's
// accumulators; `stats` holds each term's lse and D rows 2·64 floats apart per term.
template <int Terms>
__device__ __forceinline__ void mixture_probabilities(float (&s)[32], float (&dp)[32], const float* stats,
                                                      float scale_log2, const float (&weight)[Terms],
                                                      const TileMask (&masks)[Terms], bool masked, int q0, int key0,
                                                      int t) {
  constexpr float log2e = 1.4426950408889634f;
  constexpr int rows = 64;
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    float2 lse[Terms], delta[Terms];
#pragma unroll
    for (int u = 0; u < Terms; ++u) {
      lse[u] = reinterpret_cast<const float2*>(stats + 2 * rows * u)[4 * c + t];
      delta[u] = reinterpret_cast<const float2*>(stats + 2 * rows * u + rows)[4 * c + t];
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float neg_lse[Terms], row_delta[Terms];
#pragma unroll
      for (int u = 0; u < Terms; ++u) {
        neg_lse[u] = -(j ? lse[u].y : lse[u].x) * log2e;
        row_delta[u] = j ? delta[u].y : delta[u].x;
      }
#pragma unroll
      for (int half = 0; half < 2; ++half)
        mixture_element<Terms>(s[4 * c + 2 * half + j], dp[4 * c + 2 * half + j], scale_log2, weight, neg_lse,
                               row_delta, masks, masked, q0 + 8 * c + 2 * t + j, key0 + 8 * half);
    }
  }
}

template <int DPad, int Terms>
__global__ void __launch_bounds__(256, 1)
    backward_wgmma_kernel(BackwardArgs args, const __grid_constant__ CUtensorMap dq_map) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // launched only on sm_90, whose code is built for sm_90a
#else
  using Tiles = WgmmaBackwardTiles<DPad, Terms>;
  constexpr int Bk = Tiles::keys, Bq = Tiles::queries, Threads = Tiles::threads;
  constexpr int dq_cols = DPad / 2;  // dQ columns per warpgroup
  extern __shared__ unsigned char smem_raw[];
  const std::uint32_t raw = ptx::shared_address(smem_raw), base = (raw + 1023) & ~1023u;
  unsigned char* smem = smem_raw + (base - raw);
  const std::uint32_t sK = base + Tiles::k_offset, sV = base + Tiles::v_offset, sdS = base + Tiles::ds_offset;
  const float* stats_smem = reinterpret_cast<const float*>(smem + Tiles::stats_offset);

  const MixtureBackwardParams& p = args.p;
  const KeyTileWork work = key_tile_work(args, blockIdx.x);
  const int k0 = work.key_tile * Bk, kv_head = work.kv_head, b = work.batch;
  TileMask masks[Terms];
  float weight[Terms];  // one term: π applied where the gradients are written
#pragma unroll
  for (int u = 0; u < Terms; ++u) {
    masks[u] = args.masks[u];
    weight[u] = Terms == 1 ? 1.f : p.pi[p.terms[u].pi_index];
  }
  const int first_tile = k0 / Bq;
  const int end_tile = (args.query_end<Terms>(k0, k0 + Bk) + Bq - 1) / Bq;
  const int steps = work.heads * (end_tile - first_tile);
  const int wg = threadIdx.x / 128, warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32, t = lane % 4;

  load_tile<Bk, DPad, Swizzled128<Bk>, Threads>(sK, p.k + head_offset(p.k_strides, b, kv_head, p.d_head),
                                                 p.k_strides.token, k0, p.length, p.d_head, args.vector_qkv);
  load_tile<Bk, DPad, Swizzled128<Bk>, Threads>(sV, p.v + head_offset(p.v_strides, b, kv_head, p.d_head),
                                                 p.v_strides.token, k0, p.length, p.d_head, args.vector_qkv);
  const auto load_step = [&](const StepCursor& at, int stage) {
    const int q0 = at.tile * Bq;
    load_tile<Bq, DPad, Swizzled128<Bq>, Threads>(
        base + Tiles::q_offset + stage * Tiles::query_tile_bytes, p.q + head_offset(p.q_strides, b, at.head, p.d_head),
        p.q_strides.token, q0, p.length, p.d_head, args.vector_qkv);
    load_tile<Bq, DPad, Swizzled128<Bq>, Threads>(base + Tiles::do_offset + stage * Tiles::query_tile_bytes,
                                                   p.d + head_offset(p.d_strides, b, at.head, p.d_head),
                                                   p.d_strides.token, q0, p.length, p.d_head, args.vector_qkv);
    load_row_stats<Bq, Terms>(base + Tiles::stats_offset + stage * Tiles::stats_stage_bytes, args, b, at.head, q0);
  };
  // Thread 0 sends the dQ tile of a step, box by box over the columns below dq_row.
  const auto send_dq = [&](const StepCursor& at, int stage) {
    for (int box = 0; box * Tiles::dq_box_cols < args.dq_row; ++box)
      ptx::tma_reduce_add_3d(&dq_map,
                             base + Tiles::dq_offset + stage * Tiles::dq_tile_bytes + box * Tiles::dq_box_bytes,
                             box * Tiles::dq_box_cols, at.tile * Bq, b * p.n_heads + at.head);
    ptx::bulk_commit();
  };
  StepCursor at{work.first_head, first_tile, first_tile, end_tile}, next = at, previous = at;
  if (steps > 0) load_step(at, 0);
  ptx::cp_async_commit();

  // This warpgroup's 64 key rows inside each 64-column block of K and V.
  const std::uint32_t sKw = sK + wg * 64 * 128, sVw = sV + wg * 64 * 128;
  // The K columns of this warpgroup's share of dQ, as the MN-major B operand.
  const std::uint32_t sKcols = sK + (wg * dq_cols / 64) * (Bk * 128) + (wg * dq_cols % 64) * 2;
  const int key0 = k0 + wg * 64 + warp * 16 + lane / 4;  // this thread's accumulator rows: key0, key0 + 8
  float dv[DPad / 2] = {}, dk[DPad / 2] = {};
  const float scale_log2 = p.scale * 1.4426950408889634f;

  for (int step = 0; step < steps; ++step, previous = at, at = next) {
    const int stage = step & 1, q0 = at.tile * Bq;
    const std::uint32_t sQ = base + Tiles::q_offset + stage * Tiles::query_tile_bytes;
    const std::uint32_t sdO = base + Tiles::do_offset + stage * Tiles::query_tile_bytes;
    ptx::cp_async_wait<0>();
    ptx::fence_proxy_async_shared();
    // This step's tiles are in; both warpgroups are done with the other stage, with dSᵀ, and
    // have written the previous step's dQ tile.
    __syncthreads();

    // Sᵀ = K Qᵀ, then dPᵀ = V dOᵀ, over d_head in k16 steps: 32 bytes along a 128-byte row,
    // then the next 64-column block. Two groups, so that Pᵀ is computed while dPᵀ runs.
    float s[32], dp[32];
    ptx::fence_registers(s);
    ptx::fence_registers(dp);
    ptx::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < DPad / 16; ++kk)
      ptx::wgmma_ss<0, 0>(s, ptx::wgmma_descriptor(sKw + (kk / 4) * (Bk * 128) + (kk % 4) * 32, 16),
                          ptx::wgmma_descriptor(sQ + (kk / 4) * (Bq * 128) + (kk % 4) * 32, 16), kk > 0);
    ptx::wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < DPad / 16; ++kk)
      ptx::wgmma_ss<0, 0>(dp, ptx::wgmma_descriptor(sVw + (kk / 4) * (Bk * 128) + (kk % 4) * 32, 16),
                          ptx::wgmma_descriptor(sdO + (kk / 4) * (Bq * 128) + (kk % 4) * 32, 16), kk > 0);
    ptx::wgmma_commit();

    // While the tensor cores run: the previous step's dQ tile out, the next step's tiles in
    // (into the other stage, which both warpgroups are done with).
    if (step > 0 && threadIdx.x == 0) send_dq(previous, stage ^ 1);
    next.advance();
    if (step + 1 < steps) load_step(next, stage ^ 1);
    ptx::cp_async_commit();

    const float* stats = stats_smem + stage * (Tiles::stats_stage_bytes / 4);
    const int wk0 = k0 + wg * 64;  // this warpgroup's keys [wk0, wk0 + 64)
    if constexpr (Terms == 1) {
      const bool masked = !masks[0].full(q0, q0 + Bq, wk0, wk0 + 64);
      ptx::wgmma_wait<1>();
      ptx::fence_registers(s);
      if (masked)
        probabilities<true>(s, stats, scale_log2, masks[0], q0, key0, t);
      else
        probabilities<false>(s, stats, scale_log2, masks[0], q0, key0, t);
    } else {
      ptx::wgmma_wait<0>();
      ptx::fence_registers(s);
      ptx::fence_registers(dp);
      const bool reach0 = masks[0].reaches(q0, q0 + Bq, wk0, wk0 + 64);
      const bool reach1 = masks[1].reaches(q0, q0 + Bq, wk0, wk0 + 64);
      if (reach0 && reach1) {
        if (masks[0].full(q0, q0 + Bq, wk0, wk0 + 64) && masks[1].full(q0, q0 + Bq, wk0, wk0 + 64))
          mixture_probabilities<2>(s, dp, stats, scale_log2, weight, masks, false, q0, key0, t);
        else
          mixture_probabilities<2>(s, dp, stats, scale_log2, weight, masks, true, q0, key0, t);
      } else {  // one term (or none: every pair hidden, as on a diagonal tile's upper keys)
        // Selected, not indexed: a runtime index would put the arrays in local memory.
        const bool second = reach1 && !reach0;
        const float one_weight[1] = {second ? weight[1] : weight[0]};
        const TileMask one_mask[1] = {second ? masks[1] : masks[0]};
        const float* one_stats = second ? stats + 2 * Bq : stats;
        if (one_mask[0].full(q0, q0 + Bq, wk0, wk0 + 64))
          mixture_probabilities<1>(s, dp, one_stats, scale_log2, one_weight, one_mask, false, q0, key0, t);
        else
          mixture_probabilities<1>(s, dp, one_stats, scale_log2, one_weight, one_mask, true, q0, key0, t);
      }
    }
    // The accumulator's two adjacent n8 columns are the A operand of one k16 step.
    std::uint32_t p_frag[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int r = 0; r < 4; ++r) p_frag[kk][r] = ptx::pack_bf16x2(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);

    // dV += Pᵀ dO (B = dO [queries][DPad] read N-major; k16 = 16 query rows = 2048 bytes).
    ptx::fence_registers(p_frag);
    ptx::fence_registers(dv);
    ptx::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      ptx::wgmma_rs<1>(dv, p_frag[kk], ptx::wgmma_descriptor(sdO + kk * 2048, Bq * 128), 1);
    ptx::wgmma_commit();

    // dSᵀ = Pᵀ ∘ (dPᵀ − D), while dV runs (two terms: formed above, in dp).
    std::uint32_t ds_frag[4][4];
    if constexpr (Terms == 1) {
      ptx::wgmma_wait<1>();
      ptx::fence_registers(dp);
      const float* delta = stats + Bq;
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        const float2 d = reinterpret_cast<const float2*>(delta)[4 * c + t];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int e = 4 * c + 2 * half;
          ds_frag[c / 2][(c % 2) * 2 + half] = ptx::pack_bf16x2(s[e] * (dp[e] - d.x), s[e + 1] * (dp[e + 1] - d.y));
        }
      }
    } else {
#pragma unroll
      for (int c = 0; c < 8; ++c)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int e = 4 * c + 2 * half;
          ds_frag[c / 2][(c % 2) * 2 + half] = ptx::pack_bf16x2(dp[e], dp[e + 1]);
        }
    }

    // dK += dSᵀ Q.
    ptx::fence_registers(ds_frag);
    ptx::fence_registers(dk);
    ptx::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      ptx::wgmma_rs<1>(dk, ds_frag[kk], ptx::wgmma_descriptor(sQ + kk * 2048, Bq * 128), 1);
    ptx::wgmma_commit();

    // dSᵀ to shared memory, rows = keys, swizzled like every other tile.
#pragma unroll
    for (int c = 0; c < 8; ++c)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = wg * 64 + warp * 16 + lane / 4 + 8 * half;
        ptx::st_shared_u32(sdS + row * 128 + ((c ^ (row & 7)) * 16) + t * 4, ds_frag[c / 2][(c % 2) * 2 + half]);
      }
    ptx::fence_proxy_async_shared();
    // The dQ tile this step writes was sent two steps ago: its reads must be over.
    if (threadIdx.x == 0) ptx::bulk_wait_read<1>();
    __syncthreads();  // dSᵀ of both warpgroups is in

    // dQ = dS K for this warpgroup's columns: A = dSᵀ read M-major, B = K read N-major; k16 =
    // 16 key rows = 2048 bytes.
    float dq[dq_cols / 2];
    ptx::fence_registers(dq);
    ptx::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < Bk / 16; ++kk)
      ptx::wgmma_ss<1, 1>(dq, ptx::wgmma_descriptor(sdS + kk * 2048, Bq * 128),
                          ptx::wgmma_descriptor(sKcols + kk * 2048, Bk * 128), kk > 0);
    ptx::wgmma_commit();
    ptx::wgmma_wait<0>();
    ptx::fence_registers(dv);
    ptx::fence_registers(dk);
    ptx::fence_registers(dq);
    ptx::fence_registers(p_frag);
    ptx::fence_registers(ds_frag);

    // This warpgroup's columns of the dQ tile, for thread 0 to send after the next barrier:
    // column col of row r is in box col / 32 at 16-byte chunk (col % 32) / 4 XOR r mod 8.
    const std::uint32_t dq_tile = base + Tiles::dq_offset + stage * Tiles::dq_tile_bytes;
#pragma unroll
    for (int c = 0; c < dq_cols / 8; ++c)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = warp * 16 + lane / 4 + 8 * half, col = wg * dq_cols + 8 * c + 2 * t;
        const int in_box = col % Tiles::dq_box_cols;
        const std::uint32_t address = dq_tile + (col / Tiles::dq_box_cols) * Tiles::dq_box_bytes + row * 128 +
                                      (((in_box / 4) ^ (row & 7)) * 16) + (in_box % 4) * 4;
        ptx::st_shared_v2_f32(address, dq[4 * c + 2 * half], dq[4 * c + 2 * half + 1]);
      }
    ptx::fence_proxy_async_shared();
  }
  __syncthreads();  // the last step's dQ tile is in
  if (threadIdx.x == 0) {
    if (steps > 0) send_dq(previous, (steps - 1) & 1);
    ptx::bulk_wait_read<0>();  // shared memory stays until the reductions have read it
  }

  // dK and dV through shared memory (K to dO are no longer read), fp32 [keys][DPad] each with
  // 16-byte chunk c of row r at c ⊕ (r mod 8): the fragment writes and the row reads are then
  // free of bank conflicts. Out in chunks of 8 columns, each warp two whole rows (D = 128), in
  // place of 2-byte stores that fill a quarter of each sector they touch.
  constexpr int staged_row_bytes = DPad * 4;
  static_assert(2 * Bk * staged_row_bytes <= Tiles::ds_offset);
  const auto staged = [](int tile, int row, int col) {  // byte offset from base; col even
    return tile * Bk * staged_row_bytes + row * staged_row_bytes + (((col / 4) ^ (row % 8)) * 16) + (col % 4) * 4;
  };
#pragma unroll
  for (int c = 0; c < DPad / 8; ++c)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = wg * 64 + warp * 16 + lane / 4 + 8 * half, col = 8 * c + 2 * t;
      ptx::st_shared_v2_f32(base + staged(0, row, col), dk[4 * c + 2 * half], dk[4 * c + 2 * half + 1]);
      ptx::st_shared_v2_f32(base + staged(1, row, col), dv[4 * c + 2 * half], dv[4 * c + 2 * half + 1]);
    }
  __syncthreads();
  if (args.head_splits > 1) {  // a share of the group: fp32 sums, weighted and rounded in pass 3
    const std::int64_t rows = (std::int64_t(b) * p.n_kv_heads + kv_head) * p.length;
    for (int e = threadIdx.x; e < Bk * (DPad / 4); e += Threads) {
      const int row = e / (DPad / 4), col = 4 * (e % (DPad / 4)), key = k0 + row;
      if (key >= p.length || col >= args.dq_row) continue;
      const std::int64_t at_acc = (rows + key) * args.dq_row + col;
      atomicAdd(reinterpret_cast<float4*>(args.dk_acc + at_acc),
                *reinterpret_cast<const float4*>(smem + staged(0, row, col)));
      atomicAdd(reinterpret_cast<float4*>(args.dv_acc + at_acc),
                *reinterpret_cast<const float4*>(smem + staged(1, row, col)));
    }
    return;
  }
  const std::int64_t dk_head = head_offset(p.dk_strides, b, kv_head, p.d_head);
  const std::int64_t dv_head = head_offset(p.dv_strides, b, kv_head, p.d_head);
  const float gradient_weight = args.gradient_weight();
  for (int e = threadIdx.x; e < Bk * (DPad / 8); e += Threads) {
    const int row = e / (DPad / 8), col = 8 * (e % (DPad / 8)), key = k0 + row;
    if (key >= p.length || col >= p.d_head) continue;
    float grad[2][8];  // dK (scaled), dV
#pragma unroll
    for (int g = 0; g < 2; ++g)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float4 x = *reinterpret_cast<const float4*>(smem + staged(g, row, col + 4 * h));
        const float factor = g == 0 ? p.scale * gradient_weight : gradient_weight;
        grad[g][4 * h] = factor * x.x, grad[g][4 * h + 1] = factor * x.y;
        grad[g][4 * h + 2] = factor * x.z, grad[g][4 * h + 3] = factor * x.w;
      }
    bfloat16* const out[2] = {p.dk + dk_head + key * p.dk_strides.token + col,
                              p.dv + dv_head + key * p.dv_strides.token + col};
#pragma unroll
    for (int g = 0; g < 2; ++g) {
      if (args.vector_kv_grads) {
        uint4 packed;
        auto* packed2 = reinterpret_cast<__nv_bfloat162*>(&packed);
        uint4 old = make_uint4(0, 0, 0, 0);
        if (p.accumulate) old = *reinterpret_cast<const uint4*>(out[g]);
        const auto* old2 = reinterpret_cast<const __nv_bfloat162*>(&old);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          float2 x{grad[g][2 * k], grad[g][2 * k + 1]};
          if (p.accumulate) {
            const float2 y = __bfloat1622float2(old2[k]);
            x.x += y.x;
            x.y += y.y;
          }
          packed2[k] = __float22bfloat162_rn(x);
        }
        *reinterpret_cast<uint4*>(out[g]) = packed;
      } else {
        for (int j = 0; j < 8 && col + j < p.d_head; ++j) {
          float x = grad[g][j];
          if (p.accumulate) x += __bfloat162float(out[g][j]);
          out[g][j] = __float2bfloat16(x);
        }
      }
    }
  }
#endif
}

}  // namespace dash::cuda::attention::backward_kernels

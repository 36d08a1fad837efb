// The portable backward kernel of Softmax / SlidingWindow attention: warp-level tensor cores
// (mma.sync m16n8k16, bf16 in, fp32 accumulate), any GPU from sm_80 on.
//
// One CTA of 4 warps per (batch, kv head, tile of 64 keys); warp w owns keys [16w, 16w + 16).
// For every query head of the kv head's group and every tile of 32 queries some term's mask
// lets see these keys, with s = scale·q·k and P, dP transposed (keys as rows, as the warp
// owns them; the terms of backward_common.cuh, d the upstream gradient):
//   Sᵀ = K Qᵀ,  dPᵀ = V dᵀ,  P̄ᵀ = Σ_t π_t exp(Sᵀ − lse_t),  dSᵀ = Σ_t π_t Pᵀ_t ∘ (dPᵀ − D_t),
//   dV += P̄ᵀ d,  dK += dSᵀ Q   (registers, A operands straight from the accumulators),
//   dQ  = dS K                  (dSᵀ through shared memory; added to the fp32 accumulator).
// dK is scaled once at the end, dQ in the finishing pass. Q, dO, lse and D tiles are double
// buffered: the next one loads while this one computes.
#pragma once

#include <cstdint>

#include "dash/core/cuda/mma.cuh"
#include "dash/core/cuda/numeric.cuh"
#include "dash/core/cuda/shared.cuh"
#include "dash/ops/softmax/cuda/detail/backward_common.cuh"

namespace dash::cuda::attention::backward_kernels {

template <int DPad, int Terms>
struct MmaBackwardTiles {
  static constexpr int keys = 64, queries = 32, threads = 128;
  using Rows = Padded<DPad>;        // K, V, Q, dO: [rows][DPad]
  using DsRows = Padded<queries>;   // dSᵀ: [keys][queries]
  static constexpr int key_tile_bytes = keys * Rows::row_bytes;
  static constexpr int query_tile_bytes = queries * Rows::row_bytes;
  static constexpr int k_offset = 0;
  static constexpr int v_offset = k_offset + key_tile_bytes;
  static constexpr int q_offset = v_offset + key_tile_bytes;            // two stages
  static constexpr int do_offset = q_offset + 2 * query_tile_bytes;     // two stages
  static constexpr int ds_offset = do_offset + 2 * query_tile_bytes;
  // Two stages of [Terms][lse, D][queries] fp32 (load_row_stats).
  static constexpr int stats_offset = ds_offset + keys * DsRows::row_bytes;
  static constexpr int stats_stage_bytes = Terms * 2 * queries * 4;
  static constexpr int smem_bytes = stats_offset + 2 * stats_stage_bytes;
};

template <int DPad, int Terms>
__global__ void __launch_bounds__(128) backward_mma_kernel(BackwardArgs args) {
  using Tiles = MmaBackwardTiles<DPad, Terms>;
  constexpr int Bk = Tiles::keys, Bq = Tiles::queries, Threads = Tiles::threads;
  constexpr int row_bytes = Tiles::Rows::row_bytes, ds_row_bytes = Tiles::DsRows::row_bytes;
  constexpr float log2e = 1.4426950408889634f;
  extern __shared__ __align__(16) unsigned char smem[];
  const std::uint32_t base = ptx::shared_address(smem);
  const std::uint32_t sK = base + Tiles::k_offset, sV = base + Tiles::v_offset, sdS = base + Tiles::ds_offset;
  const float* stats_smem = reinterpret_cast<const float*>(smem + Tiles::stats_offset);

  const MixtureBackwardParams& p = args.p;
  const int k0 = blockIdx.x * Bk, kv_head = blockIdx.y, b = blockIdx.z;
  const int group = p.n_heads / p.n_kv_heads;
  TileMask masks[Terms];
  float weight[Terms];  // one term: π applied where the gradients are written
#pragma unroll
  for (int t = 0; t < Terms; ++t) {
    masks[t] = args.masks[t];
    weight[t] = Terms == 1 ? 1.f : p.pi[p.terms[t].pi_index];
  }
  const int first_tile = k0 / Bq;
  const int tiles_per_head = (args.query_end<Terms>(k0, k0 + Bk) + Bq - 1) / Bq - first_tile;
  const int steps = group * tiles_per_head;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;

  load_tile<Bk, DPad, typename Tiles::Rows, Threads>(sK, p.k + head_offset(p.k_strides, b, kv_head, p.d_head),
                                                      p.k_strides.token, k0, p.length, p.d_head, args.vector_qkv);
  load_tile<Bk, DPad, typename Tiles::Rows, Threads>(sV, p.v + head_offset(p.v_strides, b, kv_head, p.d_head),
                                                      p.v_strides.token, k0, p.length, p.d_head, args.vector_qkv);
  const auto load_step = [&](const StepCursor& at, int stage) {
    const int q0 = at.tile * Bq;
    load_tile<Bq, DPad, typename Tiles::Rows, Threads>(
        base + Tiles::q_offset + stage * Tiles::query_tile_bytes, p.q + head_offset(p.q_strides, b, at.head, p.d_head),
        p.q_strides.token, q0, p.length, p.d_head, args.vector_qkv);
    load_tile<Bq, DPad, typename Tiles::Rows, Threads>(base + Tiles::do_offset + stage * Tiles::query_tile_bytes,
                                                       p.d + head_offset(p.d_strides, b, at.head, p.d_head),
                                                       p.d_strides.token, q0, p.length, p.d_head, args.vector_qkv);
    load_row_stats<Bq, Terms>(base + Tiles::stats_offset + stage * Tiles::stats_stage_bytes, args, b, at.head, q0);
  };
  StepCursor at{kv_head * group, first_tile, first_tile, first_tile + tiles_per_head}, next = at;
  if (steps > 0) load_step(at, 0);
  ptx::cp_async_commit();

  float dv[DPad / 8][4] = {}, dk[DPad / 8][4] = {};
  const float scale_log2 = p.scale * log2e;

  for (int step = 0; step < steps; ++step, at = next) {
    const int stage = step & 1;
    const int h = at.head, q0 = at.tile * Bq;
    const std::uint32_t sQ = base + Tiles::q_offset + stage * Tiles::query_tile_bytes;
    const std::uint32_t sdO = base + Tiles::do_offset + stage * Tiles::query_tile_bytes;
    const float* stats = stats_smem + stage * (Tiles::stats_stage_bytes / 4);
    ptx::cp_async_wait<0>();
    __syncthreads();  // this step's tiles are in; every warp is done with the other stage and dSᵀ
    next.advance();
    if (step + 1 < steps) load_step(next, stage ^ 1);
    ptx::cp_async_commit();

    // Sᵀ and dPᵀ: this warp's 16 keys × Bq queries.
    float s[Bq / 8][4] = {}, dp[Bq / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < DPad / 16; ++kk) {
      const std::uint32_t a_row = (warp * 16 + lane % 16) * row_bytes + (kk * 16 + (lane / 16) * 8) * 2;
      std::uint32_t ak[4], av[4];
      ptx::ldmatrix_x4(ak, sK + a_row);
      ptx::ldmatrix_x4(av, sV + a_row);
#pragma unroll
      for (int np = 0; np < Bq / 16; ++np) {
        const std::uint32_t b_row = (np * 16 + lane % 8 + (lane / 16) * 8) * row_bytes + (kk * 16 + (lane / 8) % 2 * 8) * 2;
        std::uint32_t bq[4], bo[4];
        ptx::ldmatrix_x4(bq, sQ + b_row);
        ptx::ldmatrix_x4(bo, sdO + b_row);
        ptx::mma_m16n8k16_bf16(s[2 * np], ak, bq[0], bq[1]);
        ptx::mma_m16n8k16_bf16(s[2 * np + 1], ak, bq[2], bq[3]);
        ptx::mma_m16n8k16_bf16(dp[2 * np], av, bo[0], bo[1]);
        ptx::mma_m16n8k16_bf16(dp[2 * np + 1], av, bo[2], bo[3]);
      }
    }

    // P̄ᵀ and dSᵀ in place; element (nt, 2·half + j) is key g + 8·half, query 8·nt + 2t + j.
    const int key0 = k0 + warp * 16 + g;
    bool masked = false;
#pragma unroll
    for (int u = 0; u < Terms; ++u) masked |= !masks[u].full(q0, q0 + Bq, k0 + warp * 16, k0 + warp * 16 + 16);
#pragma unroll
    for (int nt = 0; nt < Bq / 8; ++nt)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int col = nt * 8 + 2 * t + j;
        float neg_lse[Terms], row_delta[Terms];
#pragma unroll
        for (int u = 0; u < Terms; ++u) {
          neg_lse[u] = -stats[2 * Bq * u + col] * log2e;
          row_delta[u] = stats[2 * Bq * u + Bq + col];
        }
#pragma unroll
        for (int half = 0; half < 2; ++half)
          mixture_element<Terms>(s[nt][2 * half + j], dp[nt][2 * half + j], scale_log2, weight, neg_lse, row_delta,
                                 masks, masked, q0 + col, key0 + 8 * half);
      }
    // The accumulator of two adjacent n-tiles is the A operand of one k16 step.
    std::uint32_t p_frag[Bq / 16][4], ds_frag[Bq / 16][4];
#pragma unroll
    for (int kq = 0; kq < Bq / 16; ++kq) {
      p_frag[kq][0] = ptx::pack_bf16x2(s[2 * kq][0], s[2 * kq][1]);
      p_frag[kq][1] = ptx::pack_bf16x2(s[2 * kq][2], s[2 * kq][3]);
      p_frag[kq][2] = ptx::pack_bf16x2(s[2 * kq + 1][0], s[2 * kq + 1][1]);
      p_frag[kq][3] = ptx::pack_bf16x2(s[2 * kq + 1][2], s[2 * kq + 1][3]);
      ds_frag[kq][0] = ptx::pack_bf16x2(dp[2 * kq][0], dp[2 * kq][1]);
      ds_frag[kq][1] = ptx::pack_bf16x2(dp[2 * kq][2], dp[2 * kq][3]);
      ds_frag[kq][2] = ptx::pack_bf16x2(dp[2 * kq + 1][0], dp[2 * kq + 1][1]);
      ds_frag[kq][3] = ptx::pack_bf16x2(dp[2 * kq + 1][2], dp[2 * kq + 1][3]);
      // dSᵀ rows key0, key0 + 8 at queries 16·kq + 2t (+ 8).
      const std::uint32_t row = (warp * 16 + g) * ds_row_bytes + (16 * kq + 2 * t) * 2;
      ptx::st_shared_u32(sdS + row, ds_frag[kq][0]);
      ptx::st_shared_u32(sdS + row + 8 * ds_row_bytes, ds_frag[kq][1]);
      ptx::st_shared_u32(sdS + row + 16, ds_frag[kq][2]);
      ptx::st_shared_u32(sdS + row + 8 * ds_row_bytes + 16, ds_frag[kq][3]);
    }

    // dV += Pᵀ dO and dK += dSᵀ Q: B operands [queries][DPad] read transposed.
#pragma unroll
    for (int kq = 0; kq < Bq / 16; ++kq)
#pragma unroll
      for (int np = 0; np < DPad / 16; ++np) {
        const std::uint32_t b_row = (kq * 16 + lane % 8 + (lane / 8) % 2 * 8) * row_bytes + (np * 16 + (lane / 16) * 8) * 2;
        std::uint32_t bo[4], bq[4];
        ptx::ldmatrix_x4_trans(bo, sdO + b_row);
        ptx::ldmatrix_x4_trans(bq, sQ + b_row);
        ptx::mma_m16n8k16_bf16(dv[2 * np], p_frag[kq], bo[0], bo[1]);
        ptx::mma_m16n8k16_bf16(dv[2 * np + 1], p_frag[kq], bo[2], bo[3]);
        ptx::mma_m16n8k16_bf16(dk[2 * np], ds_frag[kq], bq[0], bq[1]);
        ptx::mma_m16n8k16_bf16(dk[2 * np + 1], ds_frag[kq], bq[2], bq[3]);
      }
    __syncthreads();  // all of dSᵀ is in shared memory

    // dQ = dS K: warp w takes queries [16·(w/2), +16) × columns [(w % 2)·DPad/2, +DPad/2).
    const int m0 = (warp / 2) * 16, n0 = (warp % 2) * (DPad / 2);
    float dq[DPad / 16][4] = {};
#pragma unroll
    for (int kk = 0; kk < Bk / 16; ++kk) {
      std::uint32_t a[4];
      ptx::ldmatrix_x4_trans(
          a, sdS + (kk * 16 + (lane / 16) * 8 + lane % 8) * ds_row_bytes + (m0 + (lane / 8) % 2 * 8) * 2);
#pragma unroll
      for (int np = 0; np < DPad / 32; ++np) {
        std::uint32_t bk[4];
        ptx::ldmatrix_x4_trans(
            bk, sK + (kk * 16 + lane % 8 + (lane / 8) % 2 * 8) * row_bytes + (n0 + np * 16 + (lane / 16) * 8) * 2);
        ptx::mma_m16n8k16_bf16(dq[2 * np], a, bk[0], bk[1]);
        ptx::mma_m16n8k16_bf16(dq[2 * np + 1], a, bk[2], bk[3]);
      }
    }
    float* dq_rows = args.dq_acc + (std::int64_t(b) * p.n_heads + h) * p.length * args.dq_row;
#pragma unroll
    for (int nt = 0; nt < DPad / 16; ++nt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = q0 + m0 + g + 8 * half, col = n0 + nt * 8 + 2 * t;
        if (row < p.length && col < args.dq_row)
          add_dq_pair(dq_rows + std::int64_t(row) * args.dq_row, col, dq[nt][2 * half], dq[nt][2 * half + 1]);
      }
  }

  const std::int64_t dk_head = head_offset(p.dk_strides, b, kv_head, p.d_head);
  const std::int64_t dv_head = head_offset(p.dv_strides, b, kv_head, p.d_head);
  const float gradient_weight = args.gradient_weight();
#pragma unroll
  for (int nt = 0; nt < DPad / 8; ++nt)
#pragma unroll
    for (int half = 0; half < 2; ++half)
      store_key_gradients(p, gradient_weight, dk_head, dv_head, k0 + warp * 16 + g + 8 * half, nt * 8 + 2 * t,
                          dk[nt][2 * half], dk[nt][2 * half + 1], dv[nt][2 * half], dv[nt][2 * half + 1]);
}

}  // namespace dash::cuda::attention::backward_kernels

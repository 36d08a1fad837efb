// Backward kernels of the chunked gated delta rule (math: gated_delta_net/eigen.hpp, notation of
// forward.cuh). The backward reads the forward's workspace as a forward with keep_for_backward
// left it, or recomputes it (prepare_chunks with T kept, chunk_states), then, with dS the
// gradient of a chunk's end state:
//
//   chunk_local_gradients (every chunk at once, per state head, summing its query heads h):
//     dW_local = scale Σ_h (M ∘ Q̂_h K̂ᵀ)ᵀ dO_h,      Y = scale Σ_h Q̂_hᵀ diag(γ) dO_h
//   chunk_state_gradients (sequential, chunks in reverse, per block of state columns):
//     dW = dW_local + diag(d) K̂ dS,     dS ← γ_n dS + Y − wᵀ dW
//   (wᵀ dW = K̂ᵀ diag(γ) dU with dU = diag(β) Tᵀ dW, the term through U = V − diag(γ) K̂ S0)
//   chunk_gradients (every chunk at once, per state head):
//     dR = Tᵀ dW,  dV = dU = diag(β) dR,  dA = −strictly_lower(dR Wᵀ)
//     dK̂ = diag(d) W dSᵀ − diag(γβ) dR S0ᵀ + (dKk + dKkᵀ) K̂ + Σ_h (dP_h ∘ M)ᵀ Q̂_h,
//          dKk = diag(β) (dA ∘ M),   dP_h = lower(scale dO_h Wᵀ)
//     dQ̂_h = scale diag(γ) dO_h S0ᵀ + (dP_h ∘ M) K̂
//     dβ_i = dR_i·V_i − γ_i K̂_i·(dR S0ᵀ)_i + Σ_j dA_ij M_ij (K̂K̂ᵀ)_ij
//     dγ_i = scale Σ_h Q̂_h,i·(dO_h S0ᵀ)_i − β_i K̂_i·(dR S0ᵀ)_i   (+ <S0, dS> for the last token)
//     dd_j = K̂_j·(W dSᵀ)_j
//     dg_l = Σ_{i≥l>j} E_ij + Σ_{i≥l} dγ_i γ_i + Σ_{j<l} dd_j d_j,
//          E = M ∘ (Σ_h dP_h ∘ Q̂_h K̂ᵀ + diag(β) (dA ∘ K̂K̂ᵀ))
//   (rows of K̂S0 and Q̂S0 are never formed: (X S0)_i·Y_i = X_i·(Y S0ᵀ)_i), and through the
//   normalisation x̂ = x r, r = 1 / sqrt(‖x‖² + ε):  dx = r (dx̂ − x̂ (x̂·dx̂)).
// chunk_gradients is launched to overlap chunk_state_gradients: it runs chunks last to first
// (the chunk is the slowest index of its grid) and waits for each chunk's dS and dW to be
// published (params.cuh), as chunk_outputs does in the forward.
// The first term of dg is summed as in the reference: row prefix sums of E, then for each l the
// column l of them over rows i ≥ l, rather than as differences of large cumulative sums; the
// other two are a suffix and a prefix scan over the chunk.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "dash/ops/gated_delta_net/cuda/forward.cuh"
#include "dash/ops/gated_delta_net/cuda/params.cuh"
#include "dash/ops/gated_delta_net/cuda/tile.cuh"

namespace dash::cuda::gdn::detail {

// ---------------------------------------------------------------------------------------------
// Block size of the per-chunk backward passes: at Dp = 128 their register and shared memory
// needs allow one block per SM, which then takes 16 warps.
template <int Dp>
struct ParallelShape {
  static constexpr int warps = Dp == 128 ? 16 : 8;
  static constexpr int threads = 32 * warps;
};

// chunk_local_gradients fits three blocks per SM at Dp ≤ 64 (46 KB of shared memory each) once
// its registers are held to 85 per thread.
template <int Dp>
inline constexpr int local_gradient_blocks_per_sm = Dp <= 64 ? 3 : 1;

// ---------------------------------------------------------------------------------------------
// chunk_local_gradients: grid (n_chunks, Hs, B), ParallelShape<Dp>::threads threads. Also
// zeroes the chunk's d_published counter.
template <int Dp>
struct LocalGradShared {
  alignas(16) bfloat16 k[chunk * pitch(Dp)];
  alignas(16) bfloat16 qq[2 * chunk * pitch(Dp)];  // Q̂ | scale diag(γ) Q̂; then Y, staged
  alignas(16) bfloat16 d_o[chunk * pitch(Dp)];
  alignas(16) bfloat16 p[chunk * pitch(chunk)];
  alignas(16) float g2[chunk];
  static_assert(2 * chunk * pitch(Dp) >= Dp * pitch(Dp), "Y is staged in qq");
};

template <int Dp>
__global__ void __launch_bounds__(ParallelShape<Dp>::threads, local_gradient_blocks_per_sm<Dp>)
    chunk_local_gradients(const Params p) {
  constexpr int threads = ParallelShape<Dp>::threads, warps = ParallelShape<Dp>::warps;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  auto& sm = *reinterpret_cast<LocalGradShared<Dp>*>(shared_bytes);
  const int c = blockIdx.x, s = blockIdx.y, b = blockIdx.z;
  const int t0 = c * chunk, n = min(chunk, p.T - t0);
  const std::int64_t head = std::int64_t(b) * p.Hs + s, row0 = head * p.padded_T + t0;
  bfloat16* q = sm.qq;
  bfloat16* q_scaled = sm.qq + chunk * pitch(Dp);

  load_tile_async<chunk, Dp, threads>(sm.k, p.k_hat + row0 * Dp, Dp);
  if (threadIdx.x < chunk / 4)
    ptx::cp_async_16(ptx::shared_address(&sm.g2[threadIdx.x * 4]), p.g_cum + row0 + threadIdx.x * 4);
  ptx::cp_async_commit();
  // chunk_state_gradients (next on the stream) counts from here.
  if (threadIdx.x == 0) p.d_published[head * p.n_chunks + c] = 0;

  Fragments<chunk, Dp, warps> dw;
  Fragments<Dp, Dp, warps> y;
  for (int h = s * p.group; h < (s + 1) * p.group; ++h) {
    __syncthreads();
    load_rows<chunk, Dp, threads>(q, p.q + raw_offset(p.q_rows, b, t0, h, p.D), p.q_rows.token, 0, n, p.D,
                                  p.vector);
    load_rows<chunk, Dp, threads>(sm.d_o, p.d_o + raw_offset(p.d_o_rows, b, t0, h, p.D), p.d_o_rows.token, 0, n,
                                  p.D, p.vector);
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
    __syncthreads();
    normalize_rows<chunk, Dp, warps>(q, p.eps, nullptr, q_scaled,
                                     [&](int i) { return p.scale * exp2f(sm.g2[i]); });
    __syncthreads();
    {
      Fragments<chunk, chunk, warps> qk;
      mma_tile<Dp, Layout::row_major, Layout::col_major>(qk, q, pitch(Dp), sm.k, pitch(Dp));
      qk.store(sm.p, pitch(chunk),
               [&](int i, int j, float x) { return j <= i ? p.scale * exp2f(sm.g2[i] - sm.g2[j]) * x : 0.f; });
    }
    __syncthreads();
    mma_tile<chunk, Layout::col_major, Layout::row_major>(dw, sm.p, pitch(chunk), sm.d_o, pitch(Dp));
    mma_tile<chunk, Layout::col_major, Layout::row_major>(y, q_scaled, pitch(Dp), sm.d_o, pitch(Dp));
  }
  __syncthreads();
  dw.store(sm.k, pitch(Dp));
  y.store(sm.qq, pitch(Dp));
  __syncthreads();
  store_tile<chunk, Dp, threads>(p.dw_local + row0 * Dp, Dp, sm.k);
  store_tile<Dp, Dp, threads>(p.y_local + (head * p.n_chunks + c) * Dp * Dp, Dp, sm.qq);
}

// ---------------------------------------------------------------------------------------------
// chunk_state_gradients: grid (Dp / bv, Hs, B). dS (Dp × bv, fp32) lives in registers; per
// chunk, last to first: checkpoint dS (bf16), dW, dS ← γ_n dS + Y − wᵀ dW, publish the chunk
// (the first one after d_initial_state). Tiles are fetched `stages − 1` chunks ahead.
template <int Dp>
struct StateGradShared {
  static constexpr int bv = SequentialShape<Dp>::bv, stages = SequentialShape<Dp>::stages;
  alignas(16) bfloat16 k[stages][chunk * pitch(Dp)];
  alignas(16) bfloat16 w[stages][chunk * pitch(Dp)];
  alignas(16) bfloat16 dw_local[stages][chunk * pitch(bv)];
  alignas(16) bfloat16 y[stages][Dp * pitch(bv)];
  alignas(16) float g2[stages][chunk];
  alignas(16) bfloat16 ds[Dp * pitch(bv)];
  alignas(16) bfloat16 dw_negated[chunk * pitch(bv)];
  alignas(16) bfloat16 dw_out[chunk * pitch(bv)];
};

template <int Dp>
__global__ void __launch_bounds__(SequentialShape<Dp>::threads) chunk_state_gradients(const Params p) {
  using Seq = SequentialShape<Dp>;
  constexpr int bv = Seq::bv, warps = Seq::warps, threads = Seq::threads, stages = Seq::stages;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  auto& sm = *reinterpret_cast<StateGradShared<Dp>*>(shared_bytes);
  const int v0 = blockIdx.x * bv, s = blockIdx.y, b = blockIdx.z;
  const std::int64_t head = std::int64_t(b) * p.Hs + s;
  allow_dependent_launch();

  // Step `step` handles chunk n_chunks − 1 − step; one commit group per step.
  const auto fetch = [&](int step) {
    const int c = p.n_chunks - 1 - step;
    if (c >= 0) {
      const int buf = step % stages;
      const std::int64_t row0 = head * p.padded_T + std::int64_t(c) * chunk;
      load_tile_async<chunk, Dp, threads>(sm.k[buf], p.k_hat + row0 * Dp, Dp);
      load_tile_async<chunk, Dp, threads>(sm.w[buf], p.w + row0 * Dp, Dp);
      load_tile_async<chunk, bv, threads>(sm.dw_local[buf], p.dw_local + row0 * Dp + v0, Dp);
      load_tile_async<Dp, bv, threads>(sm.y[buf], p.y_local + (head * p.n_chunks + c) * Dp * Dp + v0, Dp);
      if (threadIdx.x < chunk / 4)
        ptx::cp_async_16(ptx::shared_address(&sm.g2[buf][threadIdx.x * 4]), p.g_cum + row0 + threadIdx.x * 4);
    }
    ptx::cp_async_commit();
  };

  Fragments<Dp, bv, warps> dS;
  if (p.d_final_state) {
    const float* d_final = p.d_final_state + head * p.D * p.D;
    dS.for_each([&](int i, int j, float& x) { x = i < p.D && v0 + j < p.D ? d_final[i * p.D + v0 + j] : 0.f; });
  }
  for (int step = 0; step < stages - 1; ++step) fetch(step);
  for (int step = 0; step < p.n_chunks; ++step) {
    const int c = p.n_chunks - 1 - step, buf = step % stages;
    fetch(step + stages - 1);
    dS.store(sm.ds, pitch(bv));
    ptx::cp_async_wait<stages - 1>();
    __syncthreads();
    const std::int64_t row0 = head * p.padded_T + std::int64_t(c) * chunk;
    store_tile<Dp, bv, threads>(p.d_states + (head * p.n_chunks + c) * Dp * Dp + v0, Dp, sm.ds);
    const float* g2 = sm.g2[buf];
    const float g_end = g2[chunk - 1];
    {
      Fragments<chunk, bv, warps> dW;
      mma_tile<Dp, Layout::row_major, Layout::row_major>(dW, sm.k[buf], pitch(Dp), sm.ds, pitch(bv));
      const bfloat16* local = sm.dw_local[buf];
      dW.for_each([&](int i, int j, float& x) {
        x = exp2f(g_end - g2[i]) * x + __bfloat162float(local[i * pitch(bv) + j]);
      });
      dW.store(sm.dw_out, pitch(bv));
      dW.store(sm.dw_negated, pitch(bv), [](int, int, float x) { return -x; });
    }
    __syncthreads();
    store_tile<chunk, bv, threads>(p.dw + row0 * Dp + v0, Dp, sm.dw_out);
    const float decay = exp2f(g_end);
    const bfloat16* y = sm.y[buf];
    dS.for_each([&](int i, int j, float& x) { x = decay * x + __bfloat162float(y[i * pitch(bv) + j]); });
    mma_tile<chunk, Layout::col_major, Layout::row_major>(dS, sm.w[buf], pitch(Dp), sm.dw_negated, pitch(bv));
    __syncthreads();
    if (threadIdx.x == 0 && c > 0) publish(p.d_published + head * p.n_chunks + c);
  }
  if (p.d_initial_state) {
    float* out = p.d_initial_state + head * p.D * p.D;
    dS.for_each([&](int i, int j, float& x) {
      if (i < p.D && v0 + j < p.D) out[i * p.D + v0 + j] = x;
    });
  }
  __syncthreads();
  if (threadIdx.x == 0) publish(p.d_published + head * p.n_chunks);
}

// ---------------------------------------------------------------------------------------------
// chunk_gradients: grid (n_chunks · B · Hs), chunks last to first and slowest,
// ParallelShape<Dp>::threads threads, launched to overlap chunk_state_gradients. Four shared
// regions are reused across the phases (see the comments at each use). Row sums over products
// come as `parts` partial sums per row (one per warp column), added in a fixed order.
template <int Dp>
struct GradShared {
  static constexpr int tile = chunk * pitch(Dp), square = Dp * pitch(Dp);
  static constexpr int max3(int a, int b, int c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }
  // Region 3 holds bf16 chunk × Dp tiles; region 0 also bf16 chunk × chunk ones, region 1 the
  // fp32 dKk, region 2 T (hi | lo) and the fp32 M ∘ K̂K̂ᵀ. Sized apart, they keep the block
  // under half an SM's shared memory at Dp ≤ 64, so that two blocks (16 warps) share an SM.
  static constexpr int tile_bytes = tile * 2, bf16_square_bytes = chunk * pitch(chunk) * 2;
  static constexpr int f32_square_bytes = chunk * square_pitch * 4;
  static constexpr int region_bytes[4] = {max3(tile_bytes, bf16_square_bytes, 0),
                                          max3(tile_bytes, f32_square_bytes, 0),
                                          max3(tile_bytes, f32_square_bytes, 2 * bf16_square_bytes), tile_bytes};

  alignas(16) bfloat16 k[tile];      // K̂
  alignas(16) bfloat16 w[tile];      // W
  alignas(16) bfloat16 s0[square];   // S0
  alignas(16) bfloat16 ds[square];   // dS
  alignas(16) float e[chunk * square_pitch];  // E, then its row prefix sums
  alignas(16) unsigned char region0[region_bytes[0]];
  alignas(16) unsigned char region1[region_bytes[1]];
  alignas(16) unsigned char region2[region_bytes[2]];
  alignas(16) unsigned char region3[region_bytes[3]];
  float g2[chunk], beta[chunk], gamma[chunk], decay_to_end[chunk], k_inv[chunk], q_inv[chunk];
  float dgam[chunk], dgam_total[chunk];
  float dg_cover[chunk], dg_after[chunk], dg_before[chunk];  // the three sums of dg
  static constexpr int parts = Fragments<chunk, Dp, ParallelShape<Dp>::warps>::warps_n;
  static_assert(parts == Fragments<chunk, chunk, ParallelShape<Dp>::warps>::warps_n, "row partials line up");
  float z[parts * chunk], y[parts * chunk], dd[parts * chunk], dbeta[parts * chunk], dot[parts * chunk];
  float warp_sums[ParallelShape<Dp>::warps];

  // Σ of the partial sums of row i.
  __device__ static float total(const float* partial, int i) {
    float sum = 0.f;
#pragma unroll
    for (int part = 0; part < parts; ++part) sum += partial[part * chunk + i];
    return sum;
  }

  template <class T>
  __device__ T* at(int r) {
    unsigned char* regions[4] = {region0, region1, region2, region3};
    return reinterpret_cast<T*>(regions[r]);
  }
};

template <int Dp>
__global__ void __launch_bounds__(ParallelShape<Dp>::threads) chunk_gradients(const Params p) {
  constexpr int threads = ParallelShape<Dp>::threads, warps = ParallelShape<Dp>::warps;
  using Rows = Fragments<chunk, Dp, warps>;
  using Square = Fragments<chunk, chunk, warps>;
  using Shared = GradShared<Dp>;
  static_assert(threads >= 4 * chunk, "four lanes per column of E");
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  auto& sm = *reinterpret_cast<Shared*>(shared_bytes);
  const int s = int(blockIdx.x % unsigned(p.Hs)), b = int(blockIdx.x / unsigned(p.Hs) % unsigned(p.B));
  const int c = p.n_chunks - 1 - int(blockIdx.x / unsigned(p.Hs * p.B)), tid = threadIdx.x;
  const int t0 = c * chunk, n = min(chunk, p.T - t0);
  const std::int64_t head = std::int64_t(b) * p.Hs + s, row0 = head * p.padded_T + t0;
  const std::int64_t checkpoint = (head * p.n_chunks + c) * Dp * Dp;

  // Phase 0: loads. Regions: 0 = V, 1 = dW, 2 = T (hi | lo), 3 = dR (written in phase 1).
  // T enters dR = Tᵀ dW as a bf16 pair (hi + lo, as prepare_chunks wrote it), at 16 bits: dR
  // feeds every gradient of the chunk, and T's entries grow large when keys are nearly parallel
  // with β near 1.
  bfloat16* v = sm.template at<bfloat16>(0);
  bfloat16* dW = sm.template at<bfloat16>(1);
  bfloat16* t_hi = sm.template at<bfloat16>(2);
  bfloat16* t_lo = t_hi + chunk * pitch(chunk);
  bfloat16* dR = sm.template at<bfloat16>(3);
  load_tile_async<chunk, Dp, threads>(sm.k, p.k_hat + row0 * Dp, Dp);
  load_tile_async<chunk, Dp, threads>(sm.w, p.v_new + row0 * Dp, Dp);
  load_tile_async<Dp, Dp, threads>(sm.s0, p.states + checkpoint, Dp);
  load_rows<chunk, Dp, threads>(v, p.v + raw_offset(p.v_rows, b, t0, s, p.D), p.v_rows.token, 0, n, p.D, p.vector);
  {
    const bfloat16* t = p.t_inv + (head * p.n_chunks + c) * 2 * chunk * chunk;
    load_tile_async<chunk, chunk, threads>(t_hi, t, chunk);
    load_tile_async<chunk, chunk, threads>(t_lo, t + chunk * chunk, chunk);
  }
  ptx::cp_async_commit();
  if (tid < chunk) {
    sm.g2[tid] = p.g_cum[row0 + tid];
    sm.k_inv[tid] = p.k_inv[row0 + tid];
    sm.beta[tid] = tid < n ? p.beta[(std::int64_t(b) * p.T + t0 + tid) * p.Hs + s] : 0.f;
    sm.dgam[tid] = 0.f;
  }
  // dW and dS come from chunk_state_gradients, still running: wait for the chunk's.
  if (tid == 0) wait_published(p.d_published + head * p.n_chunks + c, unsigned(Dp / SequentialShape<Dp>::bv));
  __syncthreads();
  load_tile_async<chunk, Dp, threads>(dW, p.dw + row0 * Dp, Dp);
  load_tile_async<Dp, Dp, threads>(sm.ds, p.d_states + checkpoint, Dp);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  __syncthreads();
  if (tid < chunk) {
    sm.gamma[tid] = exp2f(sm.g2[tid]);
    sm.decay_to_end[tid] = exp2f(sm.g2[chunk - 1] - sm.g2[tid]);
  }

  // Phase 1: dR = Tᵀ dW; dV = diag(β) dR; z_i = dR_i·V_i.
  {
    Rows r;
    mma_tile<chunk, Layout::col_major, Layout::row_major>(r, t_hi, pitch(chunk), dW, pitch(Dp));
    mma_tile<chunk, Layout::col_major, Layout::row_major>(r, t_lo, pitch(chunk), dW, pitch(Dp));
    r.row_partials(sm.z, [&](int i, int j, float x) { return x * __bfloat162float(v[i * pitch(Dp) + j]); });
    r.store(dR, pitch(Dp));
    __syncthreads();
    r.store(v, pitch(Dp), [&](int i, int, float x) { return sm.beta[i] * x; });
    __syncthreads();
    store_rows<chunk, Dp, threads>(p.dv + raw_offset(p.dv_rows, b, t0, s, p.D), p.dv_rows.token, n, p.D, v,
                                   p.vector);
  }
  // M ∘ K̂K̂ᵀ (fp32) into region 2, T no longer needed.
  float* mkk = sm.template at<float>(2);
  {
    Square kk;
    mma_tile<Dp, Layout::row_major, Layout::col_major>(kk, sm.k, pitch(Dp), sm.k, pitch(Dp));
    kk.for_each([&](int i, int j, float& x) {
      mkk[i * square_pitch + j] = j < i ? exp2f(sm.g2[i] - sm.g2[j]) * x : 0.f;
    });
  }
  __syncthreads();
  // Phase 2: dA = −strictly_lower(dR Wᵀ): E, dKk (fp32, region 1: dW is no longer needed) and
  // the dA part of dβ.
  float* dkk = sm.template at<float>(1);
  {
    Square da;
    mma_tile<Dp, Layout::row_major, Layout::col_major>(da, dR, pitch(Dp), sm.w, pitch(Dp));
    da.for_each([&](int i, int j, float& x) {
      const bool below = j < i;
      x = below ? -x : 0.f;
      sm.e[i * square_pitch + j] = sm.beta[i] * x * mkk[i * square_pitch + j];
      dkk[i * square_pitch + j] = below ? sm.beta[i] * x * exp2f(sm.g2[i] - sm.g2[j]) : 0.f;
    });
    da.row_partials(sm.dbeta, [&](int i, int j, float x) { return x * mkk[i * square_pitch + j]; });
  }
  // Phase 3: the state terms of dK̂: diag(d) W dSᵀ − diag(γβ) dR S0ᵀ, with the row dots y, dd.
  Rows dk;
  {
    Rows x;
    mma_tile<Dp, Layout::row_major, Layout::col_major>(x, dR, pitch(Dp), sm.s0, pitch(Dp));
    x.row_partials(sm.y, [&](int i, int j, float f) { return f * __bfloat162float(sm.k[i * pitch(Dp) + j]); });
    dk.for_each_with(x, [&](int i, int, float& mine, float f) { mine = -sm.gamma[i] * sm.beta[i] * f; });
    x.fill(0.f);
    mma_tile<Dp, Layout::row_major, Layout::col_major>(x, sm.w, pitch(Dp), sm.ds, pitch(Dp));
    x.row_partials(sm.dd, [&](int i, int j, float f) { return f * __bfloat162float(sm.k[i * pitch(Dp) + j]); });
    dk.for_each_with(x, [&](int i, int, float& mine, float f) { mine += sm.decay_to_end[i] * f; });
  }
  __syncthreads();
  // Phase 4: dK̂ += (dKk + dKkᵀ) K̂, the symmetric sum in region 0 (bf16).
  bfloat16* sym = sm.template at<bfloat16>(0);
  for (int e = tid; e < chunk * chunk; e += threads) {
    const int i = e / chunk, j = e % chunk;
    sym[i * pitch(chunk) + j] = __float2bfloat16(dkk[i * square_pitch + j] + dkk[j * square_pitch + i]);
  }
  __syncthreads();
  mma_tile<chunk, Layout::row_major, Layout::row_major>(dk, sym, pitch(chunk), sm.k, pitch(Dp));
  __syncthreads();

  // Phase 5, per query head. Regions: 3 = Q̂, 2 = dO, 0 = dP ∘ M (bf16), 1 = dQ staged.
  bfloat16* q = sm.template at<bfloat16>(3);
  bfloat16* d_o = sm.template at<bfloat16>(2);
  bfloat16* dpm = sm.template at<bfloat16>(0);
  bfloat16* stage = sm.template at<bfloat16>(1);
  for (int h = s * p.group; h < (s + 1) * p.group; ++h) {
    load_rows<chunk, Dp, threads>(q, p.q + raw_offset(p.q_rows, b, t0, h, p.D), p.q_rows.token, 0, n, p.D,
                                  p.vector);
    load_rows<chunk, Dp, threads>(d_o, p.d_o + raw_offset(p.d_o_rows, b, t0, h, p.D), p.d_o_rows.token, 0, n, p.D,
                                  p.vector);
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
    __syncthreads();
    normalize_rows<chunk, Dp, warps>(q, p.eps, sm.q_inv);
    __syncthreads();
    {
      Square qk, dp;
      mma_tile<Dp, Layout::row_major, Layout::col_major>(qk, q, pitch(Dp), sm.k, pitch(Dp));
      mma_tile<Dp, Layout::row_major, Layout::col_major>(dp, d_o, pitch(Dp), sm.w, pitch(Dp));
      dp.for_each_with(qk, [&](int i, int j, float& x, float qkv) {
        const float m = j <= i ? p.scale * exp2f(sm.g2[i] - sm.g2[j]) : 0.f;
        sm.e[i * square_pitch + j] += m * x * qkv;
        x *= m;
      });
      dp.store(dpm, pitch(chunk));
    }
    Rows dq;
    mma_tile<Dp, Layout::row_major, Layout::col_major>(dq, d_o, pitch(Dp), sm.s0, pitch(Dp));
    dq.row_partials(sm.dot, [&](int i, int j, float x) { return x * __bfloat162float(q[i * pitch(Dp) + j]); });
    __syncthreads();
    if (tid < chunk) sm.dgam[tid] += p.scale * Shared::total(sm.dot, tid);
    dq.for_each([&](int i, int, float& x) { x *= p.scale * sm.gamma[i]; });
    mma_tile<chunk, Layout::row_major, Layout::row_major>(dq, dpm, pitch(chunk), sm.k, pitch(Dp));
    mma_tile<chunk, Layout::col_major, Layout::row_major>(dk, dpm, pitch(chunk), q, pitch(Dp));
    __syncthreads();
    dq.row_partials(sm.dot, [&](int i, int j, float x) { return x * __bfloat162float(q[i * pitch(Dp) + j]); });
    __syncthreads();
    dq.store(stage, pitch(Dp), [&](int i, int j, float x) {
      return sm.q_inv[i] * (x - __bfloat162float(q[i * pitch(Dp) + j]) * Shared::total(sm.dot, i));
    });
    __syncthreads();
    store_rows<chunk, Dp, threads>(p.dq + raw_offset(p.dq_rows, b, t0, h, p.D), p.dq_rows.token, n, p.D, stage,
                                   p.vector);
  }

  // Phase 6: dk through the normalisation; <S0, dS>; dg and dβ.
  dk.row_partials(sm.dot, [&](int i, int j, float x) { return x * __bfloat162float(sm.k[i * pitch(Dp) + j]); });
  {
    float sum = 0.f;
    for (int e = tid; e < Dp * Dp; e += threads) {
      const int at = (e / Dp) * pitch(Dp) + e % Dp;
      sum += __bfloat162float(sm.s0[at]) * __bfloat162float(sm.ds[at]);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (tid % 32 == 0) sm.warp_sums[tid / 32] = sum;
  }
  {
    // Row prefix sums of E, exclusive: E_ij ← Σ_{j' < j} E_ij'. Warp per row, two entries per lane.
    const int lane = tid % 32;
    for (int i = tid / 32; i < chunk; i += warps) {
      float* row = sm.e + i * square_pitch;
      const float e0 = row[2 * lane], e1 = row[2 * lane + 1];
      float run = e0 + e1;
#pragma unroll
      for (int offset = 1; offset < 32; offset *= 2) {
        const float other = __shfl_up_sync(0xffffffffu, run, offset);
        if (lane >= offset) run += other;
      }
      const float before = run - (e0 + e1);
      row[2 * lane] = before;
      row[2 * lane + 1] = before + e0;
    }
  }
  __syncthreads();
  bfloat16* dk_stage = sm.template at<bfloat16>(3);
  dk.store(dk_stage, pitch(Dp), [&](int i, int j, float x) {
    return sm.k_inv[i] * (x - __bfloat162float(sm.k[i * pitch(Dp) + j]) * Shared::total(sm.dot, i));
  });
  {
    // Σ_{i≥l} of column l of the prefix sums: four lanes per column, a quarter of the rows each,
    // combined by two shuffles (in a fixed order).
    constexpr int quarter_rows = chunk / 4;
    const int l = (tid / 4) % chunk, quarter = tid % 4;
    float cover = 0.f;
    if (tid < 4 * chunk)
      for (int i = max(l, quarter * quarter_rows); i < (quarter + 1) * quarter_rows; ++i)
        cover += sm.e[i * square_pitch + l];
    cover += __shfl_xor_sync(0xffffffffu, cover, 1);
    cover += __shfl_xor_sync(0xffffffffu, cover, 2);
    if (tid < 4 * chunk && quarter == 0) sm.dg_cover[l] = cover;
  }
  if (tid < chunk) {
    const int i = tid;
    float state_dot = 0.f;
    for (int w = 0; w < warps; ++w) state_dot += sm.warp_sums[w];
    const float y = Shared::total(sm.y, i);
    sm.dgam_total[i] = sm.dgam[i] - sm.beta[i] * y + (i == n - 1 ? state_dot : 0.f);
  }
  __syncthreads();
  store_rows<chunk, Dp, threads>(p.dk + raw_offset(p.dk_rows, b, t0, s, p.D), p.dk_rows.token, n, p.D, dk_stage,
                                 p.vector);
  if (tid < 64) {
    // Warp 0: the suffix sums Σ_{i≥l} dγ_i γ_i (scanning from the chunk's end); warp 1: the
    // exclusive prefix sums Σ_{j<l} dd_j d_j. Two entries per lane.
    const int lane = tid % 32;
    const bool suffix = tid < 32;
    const int i0 = suffix ? chunk - 1 - 2 * lane : 2 * lane, i1 = suffix ? i0 - 1 : i0 + 1;
    const float x0 = suffix ? sm.dgam_total[i0] * sm.gamma[i0] : Shared::total(sm.dd, i0) * sm.decay_to_end[i0];
    const float x1 = suffix ? sm.dgam_total[i1] * sm.gamma[i1] : Shared::total(sm.dd, i1) * sm.decay_to_end[i1];
    float run = x0 + x1;
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
      const float other = __shfl_up_sync(0xffffffffu, run, offset);
      if (lane >= offset) run += other;
    }
    float before = __shfl_up_sync(0xffffffffu, run, 1);
    if (lane == 0) before = 0.f;
    if (suffix) {
      sm.dg_after[i0] = before + x0, sm.dg_after[i1] = run;
    } else {
      sm.dg_before[i0] = before, sm.dg_before[i1] = before + x0;
    }
  }
  __syncthreads();
  if (tid < n) {
    const int l = tid;
    const std::int64_t at = (std::int64_t(b) * p.T + t0 + l) * p.Hs + s;
    p.dg[at] = sm.dg_cover[l] + sm.dg_after[l] + sm.dg_before[l];
    const float y = Shared::total(sm.y, l), z = Shared::total(sm.z, l);
    p.dbeta[at] = Shared::total(sm.dbeta, l) + z - sm.gamma[l] * y;
  }
}

}  // namespace dash::cuda::gdn::detail

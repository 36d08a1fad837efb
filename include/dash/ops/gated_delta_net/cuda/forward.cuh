// Forward kernels of the chunked gated delta rule (math: gated_delta_net/eigen.hpp). Per chunk
// of n ≤ 64 tokens from state S0 (rows past the sequence end are zero, with g = β = 0, which
// leaves every quantity of the real rows unchanged), with G the cumulative log decay from the
// chunk start, γ_i = exp(G_i), d_j = exp(G_n − G_j), M_ij = exp(G_i − G_j) (j ≤ i):
//
//   A = strictly_lower(diag(β) (M ∘ K̂K̂ᵀ)),   T = (I + A)⁻¹
//   W = T diag(β) (V − diag(γ) K̂ S0) = u − w S0,   u = T diag(β) V,   w = T diag(βγ) K̂
//   S_n = γ_n S0 + K̂ᵀ diag(d) W,    O = scale (diag(γ) Q̂ S0 + (M ∘ Q̂K̂ᵀ) W)
//
// Three passes: prepare_chunks (every chunk at once: normalisation, A, T, u and w), chunk_states
// (the one sequential pass, per state head and block of state columns: W and the checkpoints,
// with the state in fp32 registers) and chunk_outputs (every chunk and query head at once).
// chunk_outputs is launched to overlap chunk_states: chunk_states publishes each chunk (a
// counter per state head and chunk, raised once the checkpoint and W are written and fenced)
// and an output block waits for its chunk's counter before it reads them, so that the outputs
// of the first chunks are computed while the sequential pass walks the later ones.
// Decays are handled in log2 units (G₂ = G / ln 2) so that each factor is one exp2.
// T is formed by a blocked solve in fp32: each 16×16 diagonal block by forward substitution,
// then the blocks below, T_ij = −T_ii Σ_{j≤m<i} A_im T_mj, by distance from the diagonal. T diag(β)
// and T diag(βγ) enter the products for u and w rounded to bf16, like every other operand.
// prepare_chunks keeps its shared memory under a third of an SM's (A and the solve's scratch
// give way to those two bf16 matrices), so that three chunks are in flight per SM, four at
// Dp ≤ 64.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "dash/ops/gated_delta_net/cuda/params.cuh"
#include "dash/ops/gated_delta_net/cuda/tile.cuh"

namespace dash::cuda::gdn::detail {

inline constexpr float log2_e = 1.4426950408889634f;

// Lets the kernel launched after this one on the stream start (programmatic dependent launch).
__device__ __forceinline__ void allow_dependent_launch() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

// Called by one thread after a barrier behind the block's writes: makes them visible to the
// whole device, then counts the block in.
__device__ __forceinline__ void publish(unsigned* counter) {
  __threadfence();
  atomicAdd(counter, 1u);
}

// Called by one thread, followed by a barrier: returns once `counter` has reached `count`.
__device__ __forceinline__ void wait_published(const unsigned* counter, unsigned count) {
  for (;;) {
    unsigned seen;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(seen) : "l"(counter) : "memory");
    if (seen >= count) return;
    __nanosleep(100);
  }
}

// Widths of the sequential passes: a block owns `bv` columns of the Dp × Dp state and keeps
// `stages` chunks of tiles in shared memory (the current one and those being fetched). Their
// time is the chain of per-chunk steps of one block, so every block must be resident at once:
// at Dp = 64 a block owns the whole state (no tile is fetched twice) and two stages keep both
// passes under half an SM's shared memory, so that 2 × SMs state heads (B · Hs = 144 at the
// SmolLM2 shape) run at once.
template <int Dp>
struct SequentialShape {
  static constexpr int bv = Dp == 32 ? 32 : 64;
  static constexpr int warps = Dp == 32 ? 4 : 8;
  static constexpr int threads = 32 * warps;
  static constexpr int stages = Dp == 64 ? 2 : 3;
};

// ---------------------------------------------------------------------------------------------
// T = (I + A)⁻¹ for a strictly lower 64×64 A (fp32, pitch square_pitch), by a block of Threads ≥ 128
// threads. scratch: 3 × 16 × 17 floats.
template <int Threads>
__device__ __forceinline__ void invert_unit_lower(const float* a, float* t, float* scratch) {
  constexpr int ld = square_pitch, block = 16, sp = block + 1, blocks = chunk / block;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  for (int e = tid; e < chunk * chunk; e += Threads) {
    const int i = e / chunk, j = e % chunk;
    if (i / block != j / block) t[i * ld + j] = 0.f;
  }
  if (warp < blocks && lane < block) {
    // Diagonal block `warp`, column `lane`, by forward substitution in registers:
    // T_rj = δ_rj − Σ_{m<r} A_rm T_mj (the terms with m < j vanish on their own).
    const float* a_block = a + warp * block * (ld + 1);
    float column[block];
#pragma unroll
    for (int r = 0; r < block; ++r) {
      float x = r == lane ? 1.f : 0.f;
#pragma unroll
      for (int m = 0; m < r; ++m) x -= a_block[r * ld + m] * column[m];
      column[r] = x;
    }
    float* t_block = t + warp * block * (ld + 1);
#pragma unroll
    for (int r = 0; r < block; ++r) t_block[r * ld + lane] = column[r];
  }
  __syncthreads();
  // The blocks below the diagonal, each 16 × 16 by 64 threads holding 2 × 2 entries (rows r, r + 8,
  // columns c, c + 8): a shared operand read serves two products.
  for (int distance = 1; distance < blocks; ++distance) {
    const int count = blocks - distance;  // the blocks (i, j = i − distance), i = distance…3
    for (int e = tid; e < count * 64; e += Threads) {
      const int n = e / 64, r = (e % 64) / 8, c = e % 8;
      const int i = distance + n, j = i - distance;
      float sum[2][2] = {};
      for (int m_block = j; m_block < i; ++m_block) {
        const float* a_row = a + (i * block + r) * ld + m_block * block;
        const float* t_col = t + m_block * block * ld + j * block + c;
#pragma unroll
        for (int m = 0; m < block; ++m) {
          const float a0 = a_row[m], a1 = a_row[8 * ld + m], t0 = t_col[m * ld], t1 = t_col[m * ld + 8];
          sum[0][0] += a0 * t0, sum[0][1] += a0 * t1, sum[1][0] += a1 * t0, sum[1][1] += a1 * t1;
        }
      }
      float* out = scratch + n * block * sp + r * sp + c;
      out[0] = sum[0][0], out[8] = sum[0][1], out[8 * sp] = sum[1][0], out[8 * sp + 8] = sum[1][1];
    }
    __syncthreads();
    for (int e = tid; e < count * 64; e += Threads) {
      const int n = e / 64, r = (e % 64) / 8, c = e % 8;
      const int i = distance + n, j = i - distance;
      const float* t_row = t + (i * block + r) * ld + i * block;  // T_ii is zero above its diagonal
      const float* x = scratch + n * block * sp + c;
      float sum[2][2] = {};
#pragma unroll
      for (int m = 0; m < block; ++m) {
        const float t0 = t_row[m], t1 = t_row[8 * ld + m], x0 = x[m * sp], x1 = x[m * sp + 8];
        sum[0][0] += t0 * x0, sum[0][1] += t0 * x1, sum[1][0] += t1 * x0, sum[1][1] += t1 * x1;
      }
      float* out = t + (i * block + r) * ld + j * block + c;
      out[0] = -sum[0][0], out[8] = -sum[0][1], out[8 * ld] = -sum[1][0], out[8 * ld + 8] = -sum[1][1];
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// prepare_chunks: grid (n_chunks, Hs, B), 256 threads. Normalises the chunk's keys, writes
// k_hat, k_inv, g_cum, w, u, and (when p.t_inv) T as a bf16 pair hi | lo; zeroes the chunk's
// published counter.
template <int Dp>
struct PrepareShared {
  static constexpr int solve_bytes = (chunk * square_pitch + 3 * 16 * 17) * 4;
  static constexpr int scaled_bytes = 2 * chunk * pitch(chunk) * 2;
  alignas(16) bfloat16 k[chunk * pitch(Dp)];
  alignas(16) bfloat16 v[chunk * pitch(Dp)];
  alignas(16) float t[chunk * square_pitch];
  // A and the solve's scratch (3 × 16 × 17); then T diag(β) and T diag(βγ) in bf16.
  alignas(16) unsigned char work[solve_bytes > scaled_bytes ? solve_bytes : scaled_bytes];
  float g2[chunk], beta[chunk], gamma[chunk], k_inv[chunk];

  __device__ float* a() { return reinterpret_cast<float*>(work); }
  __device__ float* scratch() { return a() + chunk * square_pitch; }
  __device__ bfloat16* tu() { return reinterpret_cast<bfloat16*>(work); }
  __device__ bfloat16* tw() { return tu() + chunk * pitch(chunk); }
};

template <int Dp>
__global__ void __launch_bounds__(256, Dp <= 64 ? 4 : 3) prepare_chunks(const Params p) {
  constexpr int threads = 256, warps = 8;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  auto& sm = *reinterpret_cast<PrepareShared<Dp>*>(shared_bytes);
  const int c = blockIdx.x, s = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const int t0 = c * chunk, n = min(chunk, p.T - t0);
  const std::int64_t head = std::int64_t(b) * p.Hs + s, row0 = head * p.padded_T + t0;

  load_rows<chunk, Dp, threads>(sm.k, p.k + raw_offset(p.k_rows, b, t0, s, p.D), p.k_rows.token, 0, n, p.D,
                                p.vector);
  load_rows<chunk, Dp, threads>(sm.v, p.v + raw_offset(p.v_rows, b, t0, s, p.D), p.v_rows.token, 0, n, p.D,
                                p.vector);
  ptx::cp_async_commit();
  if (tid < chunk) {
    const std::int64_t at = (std::int64_t(b) * p.T + t0 + tid) * p.Hs + s;
    sm.g2[tid] = tid < n ? p.g[at] : 0.f;
    sm.beta[tid] = tid < n ? p.beta[at] : 0.f;
  }
  ptx::cp_async_wait<0>();
  __syncthreads();
  normalize_rows<chunk, Dp, warps>(sm.k, p.eps, sm.k_inv);
  if (tid < 32) {
    // Inclusive scan of g over the chunk, two tokens per lane, then to log2 units.
    const float x0 = sm.g2[2 * tid], x1 = sm.g2[2 * tid + 1];
    float run = x0 + x1;
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
      const float other = __shfl_up_sync(0xffffffffu, run, offset);
      if (tid >= offset) run += other;
    }
    const float before = run - (x0 + x1);
    sm.g2[2 * tid] = (before + x0) * log2_e;
    sm.g2[2 * tid + 1] = run * log2_e;
  }
  __syncthreads();
  if (tid < chunk) {
    sm.gamma[tid] = exp2f(sm.g2[tid]);
    p.g_cum[row0 + tid] = sm.g2[tid];
    p.k_inv[row0 + tid] = sm.k_inv[tid];
  }
  if (tid == 0) p.published[head * p.n_chunks + c] = 0;  // chunk_states (next on the stream) counts from here
  store_tile<chunk, Dp, threads>(p.k_hat + row0 * Dp, Dp, sm.k);
  {
    Fragments<chunk, chunk, warps> kk;
    mma_tile<Dp, Layout::row_major, Layout::col_major>(kk, sm.k, pitch(Dp), sm.k, pitch(Dp));
    float* a = sm.a();
    kk.for_each([&](int i, int j, float& x) {
      a[i * square_pitch + j] = j < i ? sm.beta[i] * exp2f(sm.g2[i] - sm.g2[j]) * x : 0.f;
    });
  }
  __syncthreads();
  invert_unit_lower<threads>(sm.a(), sm.t, sm.scratch());
  if (p.t_inv) {
    // hi = bf16(T), lo = bf16(T − hi): the backward's products with T then keep 16 bits of it.
    __nv_bfloat162* hi = reinterpret_cast<__nv_bfloat162*>(p.t_inv + (head * p.n_chunks + c) * 2 * chunk * chunk);
    __nv_bfloat162* lo = hi + chunk * chunk / 2;
    for (int e = tid; e < chunk * chunk / 2; e += threads) {
      const float* x = sm.t + (2 * e / chunk) * square_pitch + 2 * e % chunk;
      const __nv_bfloat162 h = __floats2bfloat162_rn(x[0], x[1]);
      hi[e] = h;
      lo[e] = __floats2bfloat162_rn(x[0] - __low2float(h), x[1] - __high2float(h));
    }
  }
  // T diag(β) and T diag(βγ) in bf16, over A and the scratch (the solve ended with a barrier).
  bfloat16* tu = sm.tu();
  bfloat16* tw = sm.tw();
  for (int e = tid; e < chunk * chunk; e += threads) {
    const int i = e / chunk, j = e % chunk, at = i * pitch(chunk) + j;
    const float x = sm.t[i * square_pitch + j] * sm.beta[j];
    tu[at] = __float2bfloat16(x), tw[at] = __float2bfloat16(x * sm.gamma[j]);
  }
  __syncthreads();
  {
    Fragments<chunk, Dp, warps> u;
    mma_tile<chunk, Layout::row_major, Layout::row_major>(u, tu, pitch(chunk), sm.v, pitch(Dp));
    __syncthreads();
    u.store(sm.v, pitch(Dp));
  }
  {
    Fragments<chunk, Dp, warps> w;
    mma_tile<chunk, Layout::row_major, Layout::row_major>(w, tw, pitch(chunk), sm.k, pitch(Dp));
    __syncthreads();
    w.store(sm.k, pitch(Dp));
  }
  __syncthreads();
  store_tile<chunk, Dp, threads>(p.u + row0 * Dp, Dp, sm.v);
  store_tile<chunk, Dp, threads>(p.w + row0 * Dp, Dp, sm.k);
}

// ---------------------------------------------------------------------------------------------
// chunk_states: grid (Dp / bv, Hs, B). The state block S (Dp × bv, fp32) lives in registers;
// per chunk: checkpoint S (bf16), W = u − w S, S ← γ_n S + K̂ᵀ diag(d) W, publish the chunk (the
// last one after the final state). The tiles of the next `stages − 1` chunks are in flight
// while the current one is processed.
template <int Dp>
struct StatesShared {
  static constexpr int bv = SequentialShape<Dp>::bv, stages = SequentialShape<Dp>::stages;
  alignas(16) bfloat16 k[stages][chunk * pitch(Dp)];
  alignas(16) bfloat16 w[stages][chunk * pitch(Dp)];
  alignas(16) bfloat16 u[stages][chunk * pitch(bv)];
  alignas(16) float g2[stages][chunk];
  alignas(16) bfloat16 s[Dp * pitch(bv)];             // S as the product's operand
  alignas(16) bfloat16 w_decayed[chunk * pitch(bv)];  // diag(d) W
  alignas(16) bfloat16 w_out[chunk * pitch(bv)];      // W, staged for the store
};

template <int Dp>
__global__ void __launch_bounds__(SequentialShape<Dp>::threads) chunk_states(const Params p) {
  using Seq = SequentialShape<Dp>;
  constexpr int bv = Seq::bv, warps = Seq::warps, threads = Seq::threads, stages = Seq::stages;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  auto& sm = *reinterpret_cast<StatesShared<Dp>*>(shared_bytes);
  const int v0 = blockIdx.x * bv, s = blockIdx.y, b = blockIdx.z;
  const std::int64_t head = std::int64_t(b) * p.Hs + s;
  allow_dependent_launch();

  // Issues chunk c's tiles (when it exists) as one commit group, so that groups and chunks
  // stay in step.
  const auto fetch = [&](int c) {
    if (c < p.n_chunks) {
      const int buf = c % stages;
      const std::int64_t row0 = head * p.padded_T + std::int64_t(c) * chunk;
      load_tile_async<chunk, Dp, threads>(sm.k[buf], p.k_hat + row0 * Dp, Dp);
      load_tile_async<chunk, Dp, threads>(sm.w[buf], p.w + row0 * Dp, Dp);
      load_tile_async<chunk, bv, threads>(sm.u[buf], p.u + row0 * Dp + v0, Dp);
      if (threadIdx.x < chunk / 4)
        ptx::cp_async_16(ptx::shared_address(&sm.g2[buf][threadIdx.x * 4]), p.g_cum + row0 + threadIdx.x * 4);
    }
    ptx::cp_async_commit();
  };

  Fragments<Dp, bv, warps> S;
  if (p.initial_state) {
    const float* s0 = p.initial_state + head * p.D * p.D;
    S.for_each([&](int i, int j, float& x) { x = i < p.D && v0 + j < p.D ? s0[i * p.D + v0 + j] : 0.f; });
  }
  for (int c = 0; c < stages - 1; ++c) fetch(c);
  for (int c = 0; c < p.n_chunks; ++c) {
    const int buf = c % stages;
    fetch(c + stages - 1);
    S.store(sm.s, pitch(bv));
    ptx::cp_async_wait<stages - 1>();
    __syncthreads();
    const std::int64_t row0 = head * p.padded_T + std::int64_t(c) * chunk;
    store_tile<Dp, bv, threads>(p.states + (head * p.n_chunks + c) * Dp * Dp + v0, Dp, sm.s);
    const float* g2 = sm.g2[buf];
    const float g_end = g2[chunk - 1];
    {
      Fragments<chunk, bv, warps> W;
      mma_tile<Dp, Layout::row_major, Layout::row_major>(W, sm.w[buf], pitch(Dp), sm.s, pitch(bv));
      const bfloat16* u = sm.u[buf];
      W.for_each([&](int i, int j, float& x) { x = __bfloat162float(u[i * pitch(bv) + j]) - x; });
      W.store(sm.w_out, pitch(bv));
      W.store(sm.w_decayed, pitch(bv), [&](int i, int, float x) { return exp2f(g_end - g2[i]) * x; });
    }
    __syncthreads();
    store_tile<chunk, bv, threads>(p.v_new + row0 * Dp + v0, Dp, sm.w_out);
    const float decay = exp2f(g_end);
    S.for_each([&](int, int, float& x) { x *= decay; });
    mma_tile<chunk, Layout::col_major, Layout::row_major>(S, sm.k[buf], pitch(Dp), sm.w_decayed, pitch(bv));
    __syncthreads();
    if (threadIdx.x == 0 && c + 1 < p.n_chunks) publish(p.published + head * p.n_chunks + c);
  }
  if (p.final_state) {
    float* out = p.final_state + head * p.D * p.D;
    S.for_each([&](int i, int j, float& x) {
      if (i < p.D && v0 + j < p.D) out[i * p.D + v0 + j] = x;
    });
  }
  __syncthreads();
  if (threadIdx.x == 0) publish(p.published + head * p.n_chunks + p.n_chunks - 1);
}

// ---------------------------------------------------------------------------------------------
// chunk_outputs: grid (n_chunks · B · H), chunk slowest, 256 threads, launched to overlap
// chunk_states. O = scale (diag(γ) Q̂ S0 + (M ∘ Q̂K̂ᵀ) W); Q̂, K̂ and γ are loaded while the
// chunk's S0 and W may still be on their way.
template <int Dp>
struct OutputShared {
  alignas(16) bfloat16 q[chunk * pitch(Dp)];
  alignas(16) bfloat16 k[chunk * pitch(Dp)];
  alignas(16) bfloat16 w[chunk * pitch(Dp)];
  alignas(16) bfloat16 s[Dp * pitch(Dp)];
  alignas(16) bfloat16 p[chunk * pitch(chunk)];
  alignas(16) float g2[chunk];
};

template <int Dp>
__global__ void __launch_bounds__(256) chunk_outputs(const Params p) {
  constexpr int threads = 256, warps = 8;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  auto& sm = *reinterpret_cast<OutputShared<Dp>*>(shared_bytes);
  const int h = int(blockIdx.x % unsigned(p.H)), b = int(blockIdx.x / unsigned(p.H) % unsigned(p.B));
  const int c = int(blockIdx.x / unsigned(p.H * p.B));
  const int t0 = c * chunk, n = min(chunk, p.T - t0);
  const std::int64_t head = std::int64_t(b) * p.Hs + h / p.group, row0 = head * p.padded_T + t0;

  load_rows<chunk, Dp, threads>(sm.q, p.q + raw_offset(p.q_rows, b, t0, h, p.D), p.q_rows.token, 0, n, p.D,
                                p.vector);
  load_tile_async<chunk, Dp, threads>(sm.k, p.k_hat + row0 * Dp, Dp);
  if (threadIdx.x < chunk / 4)
    ptx::cp_async_16(ptx::shared_address(&sm.g2[threadIdx.x * 4]), p.g_cum + row0 + threadIdx.x * 4);
  ptx::cp_async_commit();
  if (threadIdx.x == 0) wait_published(p.published + head * p.n_chunks + c, unsigned(Dp / SequentialShape<Dp>::bv));
  __syncthreads();
  load_tile_async<chunk, Dp, threads>(sm.w, p.v_new + row0 * Dp, Dp);
  load_tile_async<Dp, Dp, threads>(sm.s, p.states + (head * p.n_chunks + c) * Dp * Dp, Dp);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  __syncthreads();
  normalize_rows<chunk, Dp, warps>(sm.q, p.eps, nullptr);
  __syncthreads();
  const float* g2 = sm.g2;
  {
    Fragments<chunk, chunk, warps> qk;
    mma_tile<Dp, Layout::row_major, Layout::col_major>(qk, sm.q, pitch(Dp), sm.k, pitch(Dp));
    qk.store(sm.p, pitch(chunk),
             [&](int i, int j, float x) { return j <= i ? p.scale * exp2f(g2[i] - g2[j]) * x : 0.f; });
  }
  Fragments<chunk, Dp, warps> out;
  mma_tile<Dp, Layout::row_major, Layout::row_major>(out, sm.q, pitch(Dp), sm.s, pitch(Dp));
  out.for_each([&](int i, int, float& x) { x *= p.scale * exp2f(g2[i]); });
  __syncthreads();
  mma_tile<chunk, Layout::row_major, Layout::row_major>(out, sm.p, pitch(chunk), sm.w, pitch(Dp));
  __syncthreads();
  out.store(sm.q, pitch(Dp));
  __syncthreads();
  store_rows<chunk, Dp, threads>(p.o + raw_offset(p.o_rows, b, t0, h, p.D), p.o_rows.token, n, p.D, sm.q,
                                 p.vector);
}

}  // namespace dash::cuda::gdn::detail

// The chunked sweep: GatedLinear's forward and each of its three gradients, in two passes.
//
// A sweep runs a gated linear recurrence over chunks of C tokens with three input roles x, y, z
// (rows of [B, T, heads, D] tensors), a state R [D, D] (fp32) and the per-head log decays g.
// With b_i = Σ_{l≤i} g_l the cumulative log decay from the chunk start and b_C its last value:
//   forward:  out_i = scale·(Σ_{j≤i} e^{b_i−b_j} (x_i·y_j) z_j + e^{b_i} R_0ᵀ x_i)
//             R_end = e^{b_C} R_0 + Σ_j e^{b_C−b_j} y_j z_jᵀ                 (chunks in order)
//   reverse:  out_j = scale·Σ_{i≥j} e^{b_i−b_j} (x_j·y_i) z_i + e^{b_C−b_j} R_endᵀ x_j
//             R_0   = e^{b_C} R_end + scale·Σ_i e^{b_i} y_i z_iᵀ             (last chunk first)
// With (x, y, z) = (q, k, v), the forward sweep is the layer's output (R = S). The chunked
// backward of eigen.hpp is three more sweeps:
//   dq: forward, (x, y, z) = (d_o, v, k),  R = Sᵀ    (dq_i = scale·S_i d_o_i)
//   dk: reverse, (x, y, z) = (v, d_o, q),  R = dSᵀ   (dk_j = dS_j v_j)
//   dv: reverse, (x, y, z) = (k, q, d_o),  R = dS    (dv_j = dS_jᵀ k_j)
// Their states are transposes of two chains only, the forward's S and dv's dS, so the backward
// runs the state pass for those two and the output pass for all three, dq and dk reading the
// chunk states transposed; dv and dk share a block (chunk_pair_kernel): their y and z are each
// other's z and y and their R the same dS, so of their five tiles only dk's x is extra.
//
// Every exponent is a difference of prefix sums taken in the order that makes it ≤ 0 (b is
// non-increasing because g ≤ 0), so nothing overflows however strong the decay.
//
// State pass (sequential in chunks, light): a thread block owns a [BK, BV] tile of R in fp32
// registers (mma accumulators) and walks the chunks in the sweep's direction; per chunk it
// stores R as entering the chunk (bf16, what the output pass multiplies with) to the chunk
// states in the workspace (through the warp's shared slab, as whole 16-byte units), then
// R = e^{b_C} R + Yᵀ diag(w) Z, the weights applied to the Yᵀ fragments in registers. y, z and
// the log decays stream in by cp.async `stages` − 1 chunks ahead, and every warp derives the
// chunk's weights itself from the landed log decays one step ahead (while the tensor cores run
// the current step), so the chain's steps issue no global load of their own, keep the weights'
// scan off the critical path and meet at one barrier each.
//
// Output pass (parallel over chunks, heavy): a thread block owns one chunk and BV value columns
// of one head: (1) with one pass over X's fragments, the scores A = (X Yᵀ ⊙ decay)·scale [C, C]
// (into shared memory; tiles on the masked side of the diagonal skipped) and the state term
// f ⊙ (X R) with the chunk's state from the state pass; (2) out = A Z + f ⊙ (X R). z loads in
// a second cp.async group that (1) does not wait for; bf16 outputs leave through shared memory
// as whole 16-byte units.
// Tensor-core operands are bf16 (scores, R's copy, the weighted y); accumulation and R are fp32.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dash/core/cuda.hpp"
#include "dash/core/cuda/mma.cuh"
#include "dash/core/cuda/numeric.cuh"
#include "dash/core/cuda/shared.cuh"

namespace dash::cuda::gla::detail {

// A [B, T, heads, D] bf16 tensor in one role of a sweep, `stride` elements from one token to the
// next (≥ heads·D): sweep head h reads head h / divisor.
struct Operand {
  const bfloat16* data = nullptr;
  int heads = 0;
  int divisor = 1;
  std::int64_t stride = 0;
};

struct Sweep {
  Operand x, y, z;
  bool reverse = false;
  bfloat16* out = nullptr;        // [B, T, H, D], or
  float* out_f32 = nullptr;       // [B, T, H, D] (exactly one of the two is set)
  std::int64_t out_stride = 0;    // elements from one token of out to the next (≥ H·D)
  Operand dot;                    // when set: Σ_d out_{t,d}·dot_{t,d} over each warp's columns ...
  float* dot_partials = nullptr;  // ... into [B, H, partials, T]
  const float* state_in = nullptr;  // state pass: [B, H, D, D] or null (zero)
  float* state_out = nullptr;       // state pass: [B, H, D, D] or null
  bfloat16* chunk_states = nullptr;  // [B, H, chunks, W, W]: R entering each chunk in the sweep's
                                     // direction, W the padded width (zero beyond D); written by
                                     // the state pass, read by the output pass
  bool chunk_states_transposed = false;  // output pass: chunk_states hold Rᵀ (another sweep's R)
};

inline constexpr int max_sweeps = 3;
inline constexpr int chunk_tokens = 64;  // C, every width

struct SweepBatch {
  Sweep sweep[max_sweeps];
  int n_sweeps = 0;
  const float* g = nullptr;  // [B, T, H]
  int batch = 0, length = 0, n_heads = 0, d_head = 0;
  float scale = 0;
  bool vector_io = false;  // d_head and every stride % 8 == 0, every bf16 pointer 16-byte aligned
};

__host__ __device__ inline std::int64_t chunk_count(int length) { return (length + chunk_tokens - 1) / chunk_tokens; }

// Bytes of one sweep's chunk states for padded width W.
inline std::size_t chunk_state_bytes(int batch, int n_heads, int length, int width) {
  return std::size_t(batch) * std::size_t(n_heads) * std::size_t(chunk_count(length)) * std::size_t(width) *
         std::size_t(width) * sizeof(bfloat16);
}

// Tile shapes of the state pass for padded width W: a block owns R's rows [k0, k0 + BK) and
// columns [v0, v0 + BV), one warp per 16 rows; `stages` chunks of y, z and g in flight;
// registers capped for min_blocks resident blocks per SM.
template <int W_, int BK_, int BV_, int Stages_, int MinBlocks_>
struct StateShape {
  static constexpr int W = W_, BK = BK_, BV = BV_, C = chunk_tokens, stages = Stages_;
  static constexpr int min_blocks = MinBlocks_;
  static constexpr int warps = BK / 16, threads = 32 * warps, tn = BV / 8;
  static constexpr int tiles = (W / BK) * (W / BV);  // blocks per head and sweep
  static constexpr int y_row = BK * 2, z_row = BV * 2, out_row = BV * 2;
  static constexpr int y_bytes = C * BK * 2, z_bytes = C * BV * 2, g_bytes = C * 4;
  static constexpr int stage_bytes = y_bytes + z_bytes + g_bytes;
  // After the stages: each warp's [16, BV] bf16 slab of R on its way to the chunk states.
  static constexpr int out_offset = stages * stage_bytes, out_slab_bytes = 16 * BV * 2;
  static constexpr int smem_bytes = out_offset + warps * out_slab_bytes;
  static_assert(W % BK == 0 && W % BV == 0 && BK % 16 == 0 && tn % 2 == 0 && stages >= 3);
};

// Tile shapes of the output pass: DK the padded head width, BV the value columns per block,
// C the chunk, Warps per block.
template <int DK_, int BV_, int Warps_>
struct ChunkShape {
  static constexpr int DK = DK_, BV = BV_, C = chunk_tokens, warps = Warps_, threads = 32 * warps;
  // Scores and output: warps tile the chunk's rows by 16 and split the columns.
  static constexpr int row_blocks = C / 16;
  static constexpr int col_splits = warps / row_blocks;
  static constexpr int score_cols = C / col_splits;  // keys per warp in (1)
  static constexpr int out_cols = BV / col_splits;   // value columns per warp in (2)
  static constexpr int v_blocks = DK / BV;
  static constexpr int partials = v_blocks * col_splits;  // dot partials per token

  static_assert(DK % 16 == 0 && BV % 16 == 0 && DK % BV == 0 && C % 32 == 0);
  static_assert(row_blocks <= warps && warps % row_blocks == 0);
  static_assert(score_cols % 8 == 0 && (score_cols / 8 == 1 || score_cols / 8 % 2 == 0));
  static_assert(out_cols % 8 == 0 && (out_cols / 8 == 1 || out_cols / 8 % 2 == 0));

  // Shared memory, in bytes: x [C, DK], y [C, DK], z [C, BV], R's bf16 tile [DK, BV], the
  // scores [C, C] and the decay factors (b·log2(e) [C], f [C], w as bf16 pairs [C/2], e^{b_C}, b_C).
  static constexpr int x_bytes = C * DK * 2, y_bytes = C * DK * 2, z_bytes = C * BV * 2;
  static constexpr int r_offset = x_bytes + y_bytes + z_bytes;
  static constexpr int a_offset = r_offset + DK * BV * 2;
  static constexpr int decay_offset = a_offset + C * C * 2;
  static constexpr int decay_floats = 2 * C + C / 2 + 2;
  static constexpr int smem_bytes = decay_offset + decay_floats * 4;
  static constexpr int min_blocks = 227 * 1024 / (smem_bytes + 1024) < 4 ? 227 * 1024 / (smem_bytes + 1024) : 4;
  // chunk_pair_kernel: the second sweep's x tile after the decay factors.
  static constexpr int pair_x_offset = (smem_bytes + 127) / 128 * 128;
  static constexpr int pair_smem_bytes = pair_x_offset + x_bytes;
  static constexpr int pair_min_blocks =
      227 * 1024 / (pair_smem_bytes + 1024) < 4 ? 227 * 1024 / (pair_smem_bytes + 1024) : 4;
};

// The shapes per padded width (16, 32, 64, 128). For width 128, measured on H200 (H16 T8192
// D128): in the output pass value blocks of 128 beat 64 and 16 warps beat 8 and 4 (x and y in
// two slices of the head width, each its own cp.async group, was slower, and so were persistent
// blocks walking the work items with two buffers, one block per SM). State pass, ms (B4
// forward / B4 backward's two chains / B1 forward): 32×64 tiles of R with 4 stages 0.18 / 0.36–
// 0.40 / 0.11, with 3 stages 0.18–0.24 / 0.36–0.48 / 0.11–0.18; 64×64, 4 stages 0.16–0.18 /
// 0.37–0.38 / 0.11–0.13; 64×32 0.21 / 0.41 / 0.09; 32×32 0.29 / – / 0.10. Chunks of 128 tokens
// (fewer chunk states, more intra-chunk work) were slower.
template <int Width>
struct DefaultShape;
template <>
struct DefaultShape<16> : ChunkShape<16, 16, 8> {};
template <>
struct DefaultShape<32> : ChunkShape<32, 32, 8> {};
template <>
struct DefaultShape<64> : ChunkShape<64, 64, 8> {};
template <>
struct DefaultShape<128> : ChunkShape<128, 128, 16> {};

template <int Width>
struct DefaultStateShape : StateShape<Width, (Width < 64 ? Width : 64), (Width < 64 ? Width : 64), 4, 3> {};
template <>
struct DefaultStateShape<128> : StateShape<128, 32, 64, 4, 4> {};
// Width 128 with a single chain on enough heads (the forward at B·H ≥ wide_state_heads): 64×64
// tiles, half the blocks, each re-reading y and z from L2 half as often (H200, forward state
// pass at B4 H16 T8192: 0.170 ms against 0.179; B1 H16 keeps 32×64, 0.189 against 0.200 ms for
// the whole forward); the backward's two chains measured the same with either shape.
struct WideStateShape : StateShape<128, 64, 64, 4, 3> {};
inline constexpr int wide_state_heads = 48;

// Row t of one head of an operand, at base + t·stride.
template <class T>
struct Rows {
  T* base = nullptr;
  std::int64_t stride = 0;
  __device__ T* operator[](int t) const { return base + std::int64_t(t) * stride; }
};

__device__ __forceinline__ Rows<const bfloat16> rows_of(const SweepBatch& p, const Operand& x, int b, int h) {
  return {x.data + std::int64_t(b) * p.length * x.stride + std::int64_t(h / x.divisor) * p.d_head, x.stride};
}

// Rows [t0, t0 + C) and columns [col0, col0 + Width) of x into a swizzled tile; zero outside
// the tensor (tokens ≥ T, columns ≥ D).
template <int Width, int C, int Threads>
__device__ __forceinline__ void load_tile(const SweepBatch& p, const Rows<const bfloat16>& x, int t0, int col0,
                                          char* tile) {
  constexpr int row_bytes = Width * 2;
  if (p.vector_io) {
    constexpr unsigned units = Width / 8, total = C * units, per_thread = (total + Threads - 1) / Threads;
#pragma unroll
    for (unsigned k = 0; k < per_thread; ++k) {
      const unsigned i = threadIdx.x + k * Threads;
      if (total % Threads != 0 && i >= total) break;
      const int row = int(i / units), unit = int(i % units), t = t0 + row, col = col0 + unit * 8;
      const std::uint32_t dst = ptx::shared_address(tile + swizzled_row_offset<row_bytes>(row, unit));
      if (t < p.length && col < p.d_head) ptx::cp_async_16(dst, x[t] + col);
      else ptx::st_shared_zero_16(dst);
    }
  } else {
    for (unsigned i = threadIdx.x; i < unsigned(C * Width); i += Threads) {
      const int row = int(i / Width), c = int(i % Width), t = t0 + row, col = col0 + c;
      const bfloat16 value = t < p.length && col < p.d_head ? x[t][col] : __float2bfloat16(0.f);
      *reinterpret_cast<bfloat16*>(tile + swizzled_element_offset<row_bytes>(row, c)) = value;
    }
  }
}

// The log decays of tokens [t0 + lane·C/32, …) of a chunk, for chunk_decays (one warp; zero
// past the sequence: padding tokens do not decay, and their x, y, z are zero).
template <int C>
__device__ __forceinline__ void load_log_decays(const Rows<const float>& g, int t0, int T, float (&out)[C / 32]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int e = 0; e < C / 32; ++e) {
    const int t = t0 + lane * (C / 32) + e;
    out[e] = t < T ? *g[t] : 0.f;
  }
}

// Per-chunk decay factors into one decay buffer, from the chunk's log decays (one warp, lane l
// holding tokens l·C/32, …):
//   b_i = Σ_{l≤i} g_l;  forward: f_i = scale·e^{b_i} (rows of X R), w_j = e^{b_C−b_j} (state update);
//   reverse: f_j = e^{b_C−b_j}, w_i = scale·e^{b_i};  total = (e^{b_C}, b_C).
// b is kept times log2(e) for the scores' exponents.
template <int C>
__device__ void chunk_decays(const float (&g)[C / 32], bool reverse, float scale, float* buffer) {
  constexpr int per_lane = C / 32;
  constexpr float log2e = 1.4426950408889634f;
  float* const b2 = buffer;
  float* const f = buffer + C;
  std::uint32_t* const w_pairs = reinterpret_cast<std::uint32_t*>(buffer + 2 * C);
  float* const total = buffer + 2 * C + C / 2;
  const int lane = threadIdx.x % 32;
  float local[per_lane], run = 0.f;
#pragma unroll
  for (int e = 0; e < per_lane; ++e) local[e] = run += g[e];
  float inclusive = run;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const float up = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  const float before = inclusive - run;
  const float last = __shfl_sync(0xffffffffu, inclusive, 31);
  float w[per_lane];
#pragma unroll
  for (int e = 0; e < per_lane; ++e) {
    const int i = lane * per_lane + e;
    // b_{C−1} is b_C itself (padding adds zeros); the others differ from the exact prefix sums
    // by rounding only, so e^{b_C − b_i} ≤ 1 up to rounding.
    const float bi = e + 1 == per_lane && lane == 31 ? last : before + local[e];
    b2[i] = bi * log2e;
    const float head = expf(bi), tail = expf(last - bi);
    f[i] = reverse ? tail : scale * head;
    w[e] = reverse ? scale * head : tail;
  }
  if constexpr (per_lane % 2 == 0) {
#pragma unroll
    for (int e = 0; e < per_lane; e += 2) w_pairs[(lane * per_lane + e) / 2] = ptx::pack_bf16x2(w[e], w[e + 1]);
  } else {
    const float next = __shfl_down_sync(0xffffffffu, w[0], 1);
    if (lane % 2 == 0) w_pairs[lane / 2] = ptx::pack_bf16x2(w[0], next);
  }
  if (lane == 0) total[0] = expf(last), total[1] = last;
}

// The state pass's factors of one chunk (one warp; lane l holds the log decays of tokens 2l and
// 2l + 1): returns this lane's pair of weights as bf16x2, forward w_j = e^{b_C−b_j}, reverse
// w_i = scale·e^{b_i}, and sets `total` = e^{b_C} (every lane).
__device__ __forceinline__ std::uint32_t chunk_weights(float g0, float g1, bool reverse, float scale, float& total) {
  static_assert(chunk_tokens == 64, "two tokens per lane");
  constexpr float log2e = 1.4426950408889634f;
  const int lane = threadIdx.x % 32;
  const float run = g0 + g1;
  float inclusive = run;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const float up = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  const float last = __shfl_sync(0xffffffffu, inclusive, 31);
  // b_{C−1} is b_C itself (padding adds zeros); b_i ≥ b_C up to rounding, so e^{b_C − b_i} ≤ 1.
  const float b0 = inclusive - run + g0, b1 = lane == 31 ? last : inclusive;
  total = ptx::fast_exp2(last * log2e);
  const float w0 = reverse ? scale * ptx::fast_exp2(b0 * log2e) : ptx::fast_exp2((last - b0) * log2e);
  const float w1 = reverse ? scale * ptx::fast_exp2(b1 * log2e) : ptx::fast_exp2((last - b1) * log2e);
  return ptx::pack_bf16x2(w0, w1);
}

// One thread's share of loading a [C, Width] bf16 tile (rows are tokens) into its swizzled
// layout on the vector path: column unit `unit` of rows first_row + k·row_step. The swizzle
// repeats every 8 rows, so the shared offsets of the rows differ by whole row blocks.
template <int Width, int Threads>
struct TileShare {
  static constexpr int C = chunk_tokens, units = Width / 8, row_step = Threads / units, per_thread = C / row_step;
  static constexpr int row_bytes = Width * 2;
  static_assert(Threads % units == 0 && C % row_step == 0 && row_step % 8 == 0);
  int first_row = 0, col = 0;
  std::uint32_t offset = 0;  // in the tile, of row first_row
  bool in_head = false;      // col < D

  __device__ TileShare(int col0, int d_head) {
    const int unit = int(threadIdx.x) % units;
    first_row = int(threadIdx.x) / units, col = col0 + 8 * unit;
    offset = swizzled_row_offset<row_bytes>(first_row, unit);
    in_head = col < d_head;
  }
  // Tokens [t0, t0 + C) of x (token t0 at `first`, `stride` elements apart), zero for tokens
  // ≥ t0 + valid, into `tile`.
  __device__ __forceinline__ void load(const bfloat16* first, std::int64_t stride, int valid, std::uint32_t tile) const {
#pragma unroll
    for (int k = 0; k < per_thread; ++k) {
      const int row = first_row + k * row_step;
      const std::uint32_t dst = tile + offset + std::uint32_t(k * row_step * row_bytes);
      if (in_head && row < valid) ptx::cp_async_16(dst, first + std::int64_t(row) * stride + col);
      else ptx::st_shared_zero_16(dst);
    }
  }
};

template <class Shape>
__global__ void __launch_bounds__(Shape::threads, Shape::min_blocks) state_pass_kernel(const __grid_constant__ SweepBatch p) {
  constexpr int W = Shape::W, BK = Shape::BK, BV = Shape::BV, C = Shape::C, stages = Shape::stages;
  constexpr int threads = Shape::threads;
  extern __shared__ __align__(128) char smem[];

  const int k0 = blockIdx.x / (W / BV) * BK, v0 = blockIdx.x % (W / BV) * BV;
  const int h = blockIdx.y, b = blockIdx.z / p.n_sweeps;
  const Sweep& s = p.sweep[blockIdx.z % p.n_sweeps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, tq = lane % 4;
  const int T = p.length, D = p.d_head, H = p.n_heads;
  const bool reverse = s.reverse;
  const int n_chunks = int(chunk_count(T));
  const std::int64_t head = std::int64_t(b) * H + h;
  const Rows<const bfloat16> y_rows = rows_of(p, s.y, b, h), z_rows = rows_of(p, s.z, b, h);
  const float* const g_head = p.g + std::int64_t(b) * T * H + h;
  const std::uint32_t stages_base = ptx::shared_address(smem);
  char* const out_slab = smem + Shape::out_offset + warp * Shape::out_slab_bytes;

  // This warp's rows of R: k0 + 16·warp + gq (+ 8); columns v0 + 8j + 2tq (+ 1).
  const int row0 = k0 + 16 * warp + gq;
  float R[Shape::tn][4];
  const float* const initial = s.state_in ? s.state_in + head * D * D : nullptr;
#pragma unroll
  for (int j = 0; j < Shape::tn; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = row0 + (e >> 1) * 8, col = v0 + 8 * j + 2 * tq + (e & 1);
      R[j][e] = initial && row < D && col < D ? initial[row * D + col] : 0.f;
    }

  const TileShare<BK, threads> y_share(k0, D);
  const TileShare<BV, threads> z_share(v0, D);
  const auto chunk_at = [&](int step) { return reverse ? n_chunks - 1 - step : step; };
  const auto load_chunk = [&](int step) {
    const int stage = step % stages;
    char* const stage_ptr = smem + stage * Shape::stage_bytes;
    const int t0 = chunk_at(step) * C;
    if (p.vector_io) {
      const std::uint32_t y_tile = stages_base + std::uint32_t(stage * Shape::stage_bytes);
      y_share.load(y_rows[t0], y_rows.stride, T - t0, y_tile);
      z_share.load(z_rows[t0], z_rows.stride, T - t0, y_tile + Shape::y_bytes);
    } else {
      load_tile<BK, C, threads>(p, y_rows, t0, k0, stage_ptr);
      load_tile<BV, C, threads>(p, z_rows, t0, v0, stage_ptr + Shape::y_bytes);
    }
    // Log decays, zero past the sequence (padding tokens do not decay).
    for (int i = threadIdx.x; i < C; i += threads) {
      const int t = t0 + i;
      ptx::cp_async_4_or_zero(ptx::shared_address(stage_ptr + Shape::y_bytes + Shape::z_bytes + 4 * i),
                              g_head + std::int64_t(t < T ? t : 0) * H, t < T);
    }
  };
  // The weights of the chunk of `step` from the log decays of its landed stage.
  const auto weights_of = [&](int step, float& total) {
    const float2 g = *reinterpret_cast<const float2*>(smem + step % stages * Shape::stage_bytes + Shape::y_bytes +
                                                      Shape::z_bytes + 8 * lane);
    return chunk_weights(g.x, g.y, reverse, p.scale, total);
  };
#pragma unroll
  for (int step = 0; step + 1 < stages; ++step) {
    if (step < n_chunks) load_chunk(step);
    ptx::cp_async_commit();
  }
  ptx::cp_async_wait<stages - 2>();
  __syncthreads();
  float total;
  std::uint32_t w_pair = weights_of(0, total);

  bfloat16* const states = s.chunk_states + head * n_chunks * W * W;
  for (int step = 0; step < n_chunks; ++step) {
    // Chunks up to step + 1 have landed for every thread, and every warp is done with the stage
    // of step − 1.
    ptx::cp_async_wait<stages - 3>();
    __syncthreads();
    const std::uint32_t y_base = stages_base + std::uint32_t(step % stages * Shape::stage_bytes);
    const std::uint32_t z_base = y_base + Shape::y_bytes;

    // R entering this chunk, as the output pass reads it: through the warp's slab, so that rows
    // leave as whole 16-byte units.
#pragma unroll
    for (int j = 0; j < Shape::tn; ++j) {
      const int col = 8 * j + 2 * tq;
      *reinterpret_cast<std::uint32_t*>(out_slab + swizzled_element_offset<Shape::out_row>(gq, col)) =
          ptx::pack_bf16x2(R[j][0], R[j][1]);
      *reinterpret_cast<std::uint32_t*>(out_slab + swizzled_element_offset<Shape::out_row>(gq + 8, col)) =
          ptx::pack_bf16x2(R[j][2], R[j][3]);
    }
    __syncwarp();
    {
      bfloat16* const entering = states + std::int64_t(chunk_at(step)) * W * W + (k0 + 16 * warp) * W + v0;
      constexpr int units = BV / 8;
#pragma unroll
      for (int i = lane; i < 16 * units; i += 32)
        *reinterpret_cast<uint4*>(entering + i / units * W + i % units * 8) =
            *reinterpret_cast<const uint4*>(out_slab + swizzled_row_offset<Shape::out_row>(i / units, i % units));
    }

    // R = e^{b_C} R + Yᵀ diag(w) Z; lane m holds the weights of tokens 2m and 2m + 1.
#pragma unroll
    for (int j = 0; j < Shape::tn; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) R[j][e] *= total;
#pragma unroll
    for (int kk = 0; kk < C / 16; ++kk) {
      const std::uint32_t w01 = __shfl_sync(0xffffffffu, w_pair, 8 * kk + tq);
      const std::uint32_t w89 = __shfl_sync(0xffffffffu, w_pair, 8 * kk + tq + 4);
      std::uint32_t a[4];
      ptx::ldmatrix_x4_trans(a, y_base + swizzled_row_offset<Shape::y_row>(16 * kk + (lane & 7) + ((lane >> 4) << 3),
                                                                           2 * warp + ((lane >> 3) & 1)));
      a[0] = ptx::mul_bf16x2(a[0], w01);
      a[1] = ptx::mul_bf16x2(a[1], w01);
      a[2] = ptx::mul_bf16x2(a[2], w89);
      a[3] = ptx::mul_bf16x2(a[3], w89);
#pragma unroll
      for (int j = 0; j < Shape::tn; j += 2) {
        std::uint32_t bf[4];
        ptx::ldmatrix_x4_trans(bf, z_base + swizzled_row_offset<Shape::z_row>(
                                                16 * kk + (lane & 7) + (((lane >> 3) & 1) << 3), j + (lane >> 4)));
        ptx::mma_m16n8k16_bf16(R[j], a, bf[0], bf[1]);
        ptx::mma_m16n8k16_bf16(R[j + 1], a, bf[2], bf[3]);
      }
    }

    // While the tensor cores run: refill the stage of step − 1 stages − 1 chunks ahead, and the
    // next chunk's weights, off the chain's critical path.
    if (step + stages - 1 < n_chunks) load_chunk(step + stages - 1);
    ptx::cp_async_commit();
    if (step + 1 < n_chunks) w_pair = weights_of(step + 1, total);
  }

  if (s.state_out) {
    float* const final_state = s.state_out + head * D * D;
#pragma unroll
    for (int j = 0; j < Shape::tn; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = row0 + (e >> 1) * 8, col = v0 + 8 * j + 2 * tq + (e & 1);
        if (row < D && col < D) final_state[row * D + col] = R[j][e];
      }
  }
}

// Where an output-pass block works: batch b, head h, chunk (first token t0), value block.
struct ChunkSpot {
  int b = 0, h = 0, chunk = 0, t0 = 0, v_block = 0;
  std::int64_t head = 0;  // b·H + h
};

// R entering the chunk, columns [v_block·BV, +BV) of its [DK, DK] state `state`, into r_tile: a
// [DK, BV] tile, or from the transpose the [BV, DK] tile of rows [v_block·BV, +BV).
template <class Shape>
__device__ __forceinline__ void load_state_tile(const bfloat16* state, char* r_tile, bool transposed, int v_block) {
  constexpr int DK = Shape::DK, BV = Shape::BV, threads = Shape::threads;
  constexpr int x_row = DK * 2, z_row = BV * 2;
  constexpr int total = DK * BV / 8, per_thread = (total + threads - 1) / threads;
#pragma unroll
  for (int k = 0; k < per_thread; ++k) {
    const int i = threadIdx.x + k * threads;
    if (total % threads != 0 && i >= total) break;
    if (transposed) {
      const int row = i / (DK / 8), unit = i % (DK / 8);
      ptx::cp_async_16(ptx::shared_address(r_tile + swizzled_row_offset<x_row>(row, unit)),
                       state + (v_block * BV + row) * DK + unit * 8);
    } else {
      const int row = i / (BV / 8), unit = i % (BV / 8);
      ptx::cp_async_16(ptx::shared_address(r_tile + swizzled_row_offset<z_row>(row, unit)),
                       state + row * DK + v_block * BV + unit * 8);
    }
  }
}

// One sweep's outputs of one chunk from the tiles x, y, z and R in shared memory (bases as
// shared addresses; x_tile the generic pointer of x, where bf16 outputs are staged), the decay
// buffer written and the scores' tile free. wait_xyr() before (1) and wait_z() before (2) wait
// for the caller's cp.async groups; a barrier follows each.
template <class Shape, class WaitXYR, class WaitZ>
__device__ __forceinline__ void chunk_outputs(const SweepBatch& p, const Sweep& s, const ChunkSpot& at,
                                              std::uint32_t x_base, std::uint32_t y_base, std::uint32_t z_base,
                                              std::uint32_t r_base, char* x_tile, char* a_tile, const float* decay,
                                              WaitXYR&& wait_xyr, WaitZ&& wait_z) {
  constexpr int DK = Shape::DK, BV = Shape::BV, C = Shape::C;
  constexpr int x_row = DK * 2, z_row = BV * 2, a_row = C * 2;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, tq = lane % 4;
  const int T = p.length, D = p.d_head;
  const int b = at.b, h = at.h, t0 = at.t0, v_block = at.v_block;
  const std::int64_t head = at.head;
  const bool reverse = s.reverse, transposed = s.chunk_states_transposed;
  const std::uint32_t a_base = ptx::shared_address(a_tile);
  const float* const decay_b2 = decay;
  const float* const decay_f = decay + C;

  const int row_block = warp / Shape::col_splits, split = warp % Shape::col_splits;
  const int row0 = 16 * row_block;
  // (1) One pass over the fragments of X rows [row0, row0 + 16): the scores against keys
  // [key0, key0 + score_cols) and the state term X R of columns [col0, col0 + out_cols).
  constexpr int score_tiles = Shape::score_cols / 8, out_tiles = Shape::out_cols / 8;
  const int key0 = split * Shape::score_cols, col0 = split * Shape::out_cols;
  const bool masked = reverse ? key0 + Shape::score_cols <= row0 : key0 > row0 + 15;
  float scores[score_tiles][4] = {}, out[out_tiles][4] = {};
  // A pair of score tiles (16 keys from key0 + 8n) that the mask hides entirely.
  const auto hidden = [&](int n) { return reverse ? key0 + 8 * n + 16 <= row0 : key0 + 8 * n > row0; };
  const auto b_fragments = [&](std::uint32_t base, int kk, int n, auto&& use) {
    if constexpr (out_tiles >= 2) {
      std::uint32_t bf[4];
      ptx::ldmatrix_x4_trans(bf, base + swizzled_row_offset<z_row>(16 * kk + (lane & 7) + (((lane >> 3) & 1) << 3),
                                                                   (col0 >> 3) + n + (lane >> 4)));
      use(n, bf[0], bf[1]);
      use(n + 1, bf[2], bf[3]);
    } else {
      std::uint32_t bf[2];
      ptx::ldmatrix_x2_trans(bf, base + swizzled_row_offset<z_row>(16 * kk + (lane & 7) + (((lane >> 3) & 1) << 3),
                                                                   (col0 >> 3) + n));
      use(n, bf[0], bf[1]);
    }
  };
  wait_xyr();
  __syncthreads();
#pragma unroll
  for (int kk = 0; kk < DK / 16; ++kk) {
    std::uint32_t a[4];
    ptx::ldmatrix_x4(a, x_base + swizzled_row_offset<x_row>(row0 + (lane & 15), 2 * kk + (lane >> 4)));
    if (!masked) {
#pragma unroll
      for (int n = 0; n < score_tiles; n += 2) {
        if constexpr (score_tiles >= 2) {
          if (hidden(n)) continue;
          std::uint32_t bf[4];
          ptx::ldmatrix_x4(bf, y_base + swizzled_row_offset<x_row>(key0 + 8 * n + (lane & 7) + ((lane >> 4) << 3),
                                                                   2 * kk + ((lane >> 3) & 1)));
          ptx::mma_m16n8k16_bf16(scores[n], a, bf[0], bf[1]);
          ptx::mma_m16n8k16_bf16(scores[n + 1], a, bf[2], bf[3]);
        } else {
          std::uint32_t bf[2];
          ptx::ldmatrix_x2(bf, y_base + swizzled_row_offset<x_row>(key0 + 8 * n + (lane & 7),
                                                                   2 * kk + ((lane >> 3) & 1)));
          ptx::mma_m16n8k16_bf16(scores[n], a, bf[0], bf[1]);
        }
      }
    }
#pragma unroll
    for (int n = 0; n < out_tiles; n += 2) {
      const auto use = [&](int nt, std::uint32_t b0, std::uint32_t b1) { ptx::mma_m16n8k16_bf16(out[nt], a, b0, b1); };
      if (!transposed) {
        b_fragments(r_base, kk, n, use);
      } else if constexpr (out_tiles >= 2) {  // rows of the [BV, DK] tile are R's columns
        std::uint32_t bf[4];
        ptx::ldmatrix_x4(bf, r_base + swizzled_row_offset<x_row>(col0 + 8 * n + (lane & 7) + ((lane >> 4) << 3),
                                                                 2 * kk + ((lane >> 3) & 1)));
        use(n, bf[0], bf[1]);
        use(n + 1, bf[2], bf[3]);
      } else {
        std::uint32_t bf[2];
        ptx::ldmatrix_x2(bf, r_base + swizzled_row_offset<x_row>(col0 + 8 * n + (lane & 7), 2 * kk + ((lane >> 3) & 1)));
        use(n, bf[0], bf[1]);
      }
    }
  }
  if (!masked) {
    const float row_b2[2] = {decay_b2[row0 + gq], decay_b2[row0 + gq + 8]};
#pragma unroll
    for (int n = 0; n < score_tiles; ++n) {
      const int j = key0 + 8 * n + 2 * tq;
      const float key_b2[2] = {decay_b2[j], decay_b2[j + 1]};
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int i = row0 + gq + 8 * half;
        float value[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const bool visible = reverse ? j + e >= i : j + e <= i;
          const float exponent = reverse ? key_b2[e] - row_b2[half] : row_b2[half] - key_b2[e];
          value[e] = visible ? scores[n][2 * half + e] * p.scale * ptx::fast_exp2(exponent) : 0.f;
        }
        *reinterpret_cast<std::uint32_t*>(a_tile + swizzled_element_offset<a_row>(i, j)) =
            ptx::pack_bf16x2(value[0], value[1]);
      }
    }
  }
  const float f0 = decay_f[row0 + gq], f1 = decay_f[row0 + gq + 8];
#pragma unroll
  for (int n = 0; n < out_tiles; ++n) out[n][0] *= f0, out[n][1] *= f0, out[n][2] *= f1, out[n][3] *= f1;
  wait_z();
  __syncthreads();

  // (2) out += A Z over the visible key blocks, then the output rows [row0, row0 + 16).
  const int kk_begin = reverse ? row_block : 0, kk_end = reverse ? C / 16 : row_block + 1;
  for (int kk = kk_begin; kk < kk_end; ++kk) {
    std::uint32_t a[4];
    ptx::ldmatrix_x4(a, a_base + swizzled_row_offset<a_row>(row0 + (lane & 15), 2 * kk + (lane >> 4)));
#pragma unroll
    for (int n = 0; n < out_tiles; n += 2)
      b_fragments(z_base, kk, n,
                  [&](int nt, std::uint32_t b0, std::uint32_t b1) { ptx::mma_m16n8k16_bf16(out[nt], a, b0, b1); });
  }

  const bool with_dot = s.dot.data != nullptr;
  const Rows<const bfloat16> dot_rows = with_dot ? rows_of(p, s.dot, b, h) : Rows<const bfloat16>{};
  const std::int64_t out_head = std::int64_t(b) * T * s.out_stride + std::int64_t(h) * D;
  const int col_base = v_block * BV + col0 + 2 * tq;
  // bf16 outputs on the vector path leave through shared memory as whole 16-byte units: this
  // warp's [16, out_cols] slab at its own rows and columns of the x tile, free since the barrier
  // after (1).
  const bool staged = p.vector_io && s.out;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int t = t0 + row0 + gq + 8 * half;
    const bool token = t < T;
    const std::int64_t out_row = out_head + std::int64_t(t) * s.out_stride;
    float dot = 0.f;
#pragma unroll
    for (int n = 0; n < out_tiles; ++n) {
      const int col = col_base + 8 * n;
      const float v0 = out[n][2 * half], v1 = out[n][2 * half + 1];
      if (!token || col >= D) continue;
      if (p.vector_io) {
        if (staged)
          *reinterpret_cast<std::uint32_t*>(x_tile + swizzled_element_offset<x_row>(row0 + gq + 8 * half,
                                                                                  col0 + 8 * n + 2 * tq)) =
              ptx::pack_bf16x2(v0, v1);
        else *reinterpret_cast<float2*>(s.out_f32 + out_row + col) = make_float2(v0, v1);
        if (with_dot) {
          const float2 xv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(dot_rows[t] + col));
          dot += v0 * xv.x + v1 * xv.y;
        }
      } else {
        const bool pair = col + 1 < D;
        if (s.out) {
          s.out[out_row + col] = __float2bfloat16(v0);
          if (pair) s.out[out_row + col + 1] = __float2bfloat16(v1);
        } else {
          s.out_f32[out_row + col] = v0;
          if (pair) s.out_f32[out_row + col + 1] = v1;
        }
        if (with_dot) {  // the vector path's order of operations
          const float x0 = __bfloat162float(dot_rows[t][col]);
          const float x1 = pair ? __bfloat162float(dot_rows[t][col + 1]) : 0.f;
          dot += v0 * x0 + v1 * x1;
        }
      }
    }
    if (with_dot) {
      dot += __shfl_xor_sync(0xffffffffu, dot, 1);
      dot += __shfl_xor_sync(0xffffffffu, dot, 2);
      if (token && tq == 0)
        s.dot_partials[(head * Shape::partials + v_block * Shape::col_splits + split) * T + t] = dot;
    }
  }
  if (staged) {
    __syncwarp();
    constexpr int units = Shape::out_cols / 8;  // per slab row
#pragma unroll
    for (int i = lane; i < 16 * units; i += 32) {
      const int row = row0 + i / units, unit = col0 / 8 + i % units;
      const int t = t0 + row, col = v_block * BV + 8 * unit;
      if (t < T && col < D)
        *reinterpret_cast<uint4*>(s.out + out_head + std::int64_t(t) * s.out_stride + col) =
            *reinterpret_cast<const uint4*>(x_tile + swizzled_row_offset<x_row>(row, unit));
    }
  }
}

// The output pass of one sweep per block: grid (value blocks × chunks, heads, batch × sweeps).
template <class Shape>
__global__ void __launch_bounds__(Shape::threads, Shape::min_blocks) chunk_pass_kernel(const __grid_constant__ SweepBatch p) {
  constexpr int DK = Shape::DK, BV = Shape::BV, C = Shape::C, threads = Shape::threads;
  extern __shared__ __align__(128) char smem[];
  ChunkSpot at;
  at.v_block = blockIdx.x % Shape::v_blocks, at.chunk = blockIdx.x / Shape::v_blocks;
  at.h = blockIdx.y, at.b = blockIdx.z / p.n_sweeps;
  at.t0 = at.chunk * C, at.head = std::int64_t(at.b) * p.n_heads + at.h;
  const Sweep& s = p.sweep[blockIdx.z % p.n_sweeps];
  char* const r_tile = smem + Shape::r_offset;
  float* const decay = reinterpret_cast<float*>(smem + Shape::decay_offset);
  const std::uint32_t x_base = ptx::shared_address(smem), y_base = x_base + Shape::x_bytes;
  const std::uint32_t z_base = y_base + Shape::y_bytes;

  load_tile<DK, C, threads>(p, rows_of(p, s.x, at.b, at.h), at.t0, 0, smem);
  load_tile<DK, C, threads>(p, rows_of(p, s.y, at.b, at.h), at.t0, 0, smem + Shape::x_bytes);
  load_state_tile<Shape>(s.chunk_states + (at.head * chunk_count(p.length) + at.chunk) * DK * DK, r_tile,
                         s.chunk_states_transposed, at.v_block);
  ptx::cp_async_commit();
  load_tile<BV, C, threads>(p, rows_of(p, s.z, at.b, at.h), at.t0, at.v_block * BV, smem + Shape::x_bytes + Shape::y_bytes);
  ptx::cp_async_commit();
  if (threadIdx.x < 32) {
    float g[C / 32];
    load_log_decays<C>(Rows<const float>{p.g + std::int64_t(at.b) * p.length * p.n_heads + at.h, p.n_heads}, at.t0,
                       p.length, g);
    chunk_decays<C>(g, s.reverse, p.scale, decay);
  }
  chunk_outputs<Shape>(p, s, at, x_base, y_base, z_base, ptx::shared_address(r_tile), smem, smem + Shape::a_offset,
                       decay, [] { ptx::cp_async_wait<1>(); }, [] { ptx::cp_async_wait<0>(); });
}

// The output passes of two sweeps per block that share their inputs and their chunk states: the
// backward's dv (x, y, z) = (k, q, d_o), R = dS, then dk (v, d_o, q), R = dSᵀ. With one value
// block (BV = DK) R's tile holds the same rows either way, and first's z tile is second's y
// tile and the other way round; only second's x (v) comes on top. Grid (chunks, heads, batch);
// p.sweep[0] is first, p.sweep[1] second.
template <class Shape>
__global__ void __launch_bounds__(Shape::threads, Shape::pair_min_blocks) chunk_pair_kernel(const __grid_constant__ SweepBatch p) {
  constexpr int DK = Shape::DK, C = Shape::C, threads = Shape::threads;
  static_assert(Shape::v_blocks == 1, "paired sweeps swap y and z tiles: one value block");
  extern __shared__ __align__(128) char smem[];
  ChunkSpot at;
  at.chunk = blockIdx.x, at.h = blockIdx.y, at.b = blockIdx.z;
  at.t0 = at.chunk * C, at.head = std::int64_t(at.b) * p.n_heads + at.h;
  const Sweep& first = p.sweep[0];
  const Sweep& second = p.sweep[1];
  char* const r_tile = smem + Shape::r_offset;
  char* const second_x = smem + Shape::pair_x_offset;
  float* const decay = reinterpret_cast<float*>(smem + Shape::decay_offset);
  const std::uint32_t x_base = ptx::shared_address(smem), y_base = x_base + Shape::x_bytes;
  const std::uint32_t z_base = y_base + Shape::y_bytes, r_base = ptx::shared_address(r_tile);

  load_tile<DK, C, threads>(p, rows_of(p, first.x, at.b, at.h), at.t0, 0, smem);
  load_tile<DK, C, threads>(p, rows_of(p, first.y, at.b, at.h), at.t0, 0, smem + Shape::x_bytes);
  load_state_tile<Shape>(first.chunk_states + (at.head * chunk_count(p.length) + at.chunk) * DK * DK, r_tile,
                         first.chunk_states_transposed, 0);
  ptx::cp_async_commit();
  load_tile<DK, C, threads>(p, rows_of(p, first.z, at.b, at.h), at.t0, 0, smem + Shape::x_bytes + Shape::y_bytes);
  ptx::cp_async_commit();
  load_tile<DK, C, threads>(p, rows_of(p, second.x, at.b, at.h), at.t0, 0, second_x);
  ptx::cp_async_commit();
  if (threadIdx.x < 32) {  // both sweeps run in the same direction over the same log decays
    float g[C / 32];
    load_log_decays<C>(Rows<const float>{p.g + std::int64_t(at.b) * p.length * p.n_heads + at.h, p.n_heads}, at.t0,
                       p.length, g);
    chunk_decays<C>(g, first.reverse, p.scale, decay);
  }
  char* const a_tile = smem + Shape::a_offset;
  chunk_outputs<Shape>(p, first, at, x_base, y_base, z_base, r_base, smem, a_tile, decay,
                       [] { ptx::cp_async_wait<2>(); }, [] { ptx::cp_async_wait<1>(); });
  chunk_outputs<Shape>(p, second, at, ptx::shared_address(second_x), z_base, y_base, r_base, second_x, a_tile, decay,
                       [] { ptx::cp_async_wait<0>(); }, [] {});
}

// Runs the state pass over the sweeps of `chains`, grid (tiles of R, heads, batch × sweeps), then
// the output pass over the sweeps of `batch`, grid (value blocks × chunks, heads, batch × sweeps),
// and over the two sweeps of `paired` (none when paired.n_sweeps is 0), grid (chunks, heads,
// batch), which read the chunk states the chains wrote.
template <class States>
void launch_state_pass(const SweepBatch& chains, cudaStream_t stream) {
  const auto state_kernel = state_pass_kernel<States>;
  check(cudaFuncSetAttribute(state_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, States::smem_bytes),
        "gla state pass: cudaFuncSetAttribute");
  state_kernel<<<dim3(States::tiles, unsigned(chains.n_heads), unsigned(chains.batch * chains.n_sweeps)),
                 States::threads, States::smem_bytes, stream>>>(chains);
  check(cudaGetLastError(), "gla state pass launch");
}

template <int Width>
void launch_sweeps(const SweepBatch& chains, const SweepBatch& batch, const SweepBatch& paired, cudaStream_t stream) {
  using Chunks = DefaultShape<Width>;
  if constexpr (Width == 128) {
    if (chains.n_sweeps == 1 && chains.batch * chains.n_heads >= wide_state_heads)
      launch_state_pass<WideStateShape>(chains, stream);
    else
      launch_state_pass<DefaultStateShape<Width>>(chains, stream);
  } else {
    launch_state_pass<DefaultStateShape<Width>>(chains, stream);
  }
  const unsigned heads = unsigned(chains.n_heads);
  const unsigned chunks = unsigned(chunk_count(chains.length));
  if (batch.n_sweeps > 0) {
    const auto chunk_kernel = chunk_pass_kernel<Chunks>;
    check(cudaFuncSetAttribute(chunk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Chunks::smem_bytes),
          "gla output pass: cudaFuncSetAttribute");
    chunk_kernel<<<dim3(Chunks::v_blocks * chunks, heads, unsigned(batch.batch * batch.n_sweeps)), Chunks::threads,
                   Chunks::smem_bytes, stream>>>(batch);
    check(cudaGetLastError(), "gla output pass launch");
  }
  if (paired.n_sweeps > 0) {
    const auto pair_kernel = chunk_pair_kernel<Chunks>;
    check(cudaFuncSetAttribute(pair_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Chunks::pair_smem_bytes),
          "gla paired output pass: cudaFuncSetAttribute");
    pair_kernel<<<dim3(chunks, heads, unsigned(paired.batch)), Chunks::threads, Chunks::pair_smem_bytes, stream>>>(
        paired);
    check(cudaGetLastError(), "gla paired output pass launch");
  }
}

}  // namespace dash::cuda::gla::detail

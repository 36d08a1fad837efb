// The chunked sweep: one kernel for GatedLinear's forward and for each of its three gradients.
//
// A sweep runs a gated linear recurrence over chunks of C tokens with three input roles x, y, z
// (rows of [B, T, heads, D] tensors), a state R [D, D] (fp32) and the per-head log decays g.
// With b_i = Σ_{l≤i} g_l the cumulative log decay from the chunk start and b_C its last value:
//   forward:  out_i = scale·(Σ_{j≤i} e^{b_i−b_j} (x_i·y_j) z_j + e^{b_i} R_0ᵀ x_i)
//             R_end = e^{b_C} R_0 + Σ_j e^{b_C−b_j} y_j z_jᵀ                 (chunks in order)
//   reverse:  out_j = scale·Σ_{i≥j} e^{b_i−b_j} (x_j·y_i) z_i + e^{b_C−b_j} R_endᵀ x_j
//             R_0   = e^{b_C} R_end + scale·Σ_i e^{b_i} y_i z_iᵀ             (last chunk first)
// With (x, y, z) = (q, k, v), the forward sweep is the layer's output (R = S). The chunked
// backward of eigen.hpp is three more sweeps of the same kernel:
//   dq: forward, (x, y, z) = (d_o, v, k),  R = Sᵀ    (dq_i = scale·S_i d_o_i)
//   dk: reverse, (x, y, z) = (v, d_o, q),  R = dSᵀ   (dk_j = dS_j v_j)
//   dv: reverse, (x, y, z) = (k, q, d_o),  R = dS    (dv_j = dS_jᵀ k_j)
// so one launch runs the three backward sweeps side by side.
//
// Every exponent is a difference of prefix sums taken in the order that makes it ≤ 0 (b is
// non-increasing because g ≤ 0), so nothing overflows however strong the decay.
//
// A thread block owns one (batch, head, sweep, segment) and BV of the D value columns of out
// and R; it keeps its [DK, BV] slice of R in fp32 registers (mma accumulators) across its
// chunks, so chunk states never leave the chip. Per chunk: (1) with one pass over X's
// fragments, the scores A = (X Yᵀ ⊙ decay)·scale [C, C] (into shared memory; tiles on the
// masked side of the diagonal skipped) and the state term f ⊙ (X R), R read as a bf16 copy in
// shared memory; (2) out = A Z + f ⊙ (X R); (3) R = e^{b_C} R + Yᵀ diag(w) Z, the weights
// applied to the Yᵀ fragments in registers. The next chunk's x, y, z load by cp.async, and its
// decay factors are computed from log decays prefetched into registers, meanwhile.
// Tensor-core operands are bf16 (scores, R's copy, the weighted y); accumulation and R are fp32.
//
// Segments. When (batch × heads × value blocks × sweeps) blocks cannot fill the GPU, the
// chunks are split into P contiguous segments run by separate blocks. A first pass of the same
// kernel (states_only) computes each segment's own contribution L_p to the state from zero and
// its summed log decay G_p; combine_segments_kernel then forms each segment's initial state in
// fp32, in the sweep's direction: R_in[next] = e^{G_p} R_in[p] + L_p; the main pass starts
// each segment from it.
#pragma once

#include <algorithm>
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
  const float* state_in = nullptr;  // [B, H, D, D] or null (zero)
  float* state_out = nullptr;       // [B, H, D, D] or null
  bool state_transposed = false;    // R is the transpose of the [D, D] matrices of state_in/out
  float* segment_states = nullptr;  // [B, H, segments, D, D] in R's layout, when segments > 1
  float* segment_decays = nullptr;  // [B, H, segments]: G_p
};

inline constexpr int max_sweeps = 3;

struct SweepBatch {
  Sweep sweep[max_sweeps];
  int n_sweeps = 0;
  const float* g = nullptr;  // [B, T, H]
  int batch = 0, length = 0, n_heads = 0, d_head = 0;
  float scale = 0;
  bool vector_io = false;    // d_head and every stride % 8 == 0, every bf16 pointer 16-byte aligned
  int segments = 1;          // P
  int segment_chunks = 0;    // chunks per segment (the last may have fewer)
  bool states_only = false;  // the first pass of a segmented sweep
};

// Tile shapes of one instantiation: DK the padded head width, BV the value columns per block,
// C the chunk, Warps per block.
template <int DK_, int BV_, int C_, int Warps_>
struct SweepShape {
  static constexpr int DK = DK_, BV = BV_, C = C_, warps = Warps_, threads = 32 * warps;
  // Scores and output: warps tile the chunk's rows by 16 and split the columns.
  static constexpr int row_blocks = C / 16;
  static constexpr int col_splits = warps / row_blocks;
  static constexpr int score_cols = C / col_splits;  // keys per warp in (1)
  static constexpr int out_cols = BV / col_splits;   // value columns per warp in (2)
  // State: warps tile R [DK, BV] in (state_warps_m × state_warps_n), each tm × tn mma tiles.
  static constexpr int state_warps_m = DK / 16 < warps / 2 ? DK / 16 : warps / 2;
  static constexpr int state_warps_n = warps / state_warps_m;
  static constexpr int tm = DK / 16 / state_warps_m;
  static constexpr int tn = BV / 8 < state_warps_n ? 1 : BV / 8 / state_warps_n;
  static constexpr int v_blocks = DK / BV;
  static constexpr int partials = v_blocks * col_splits;  // dot partials per token

  static_assert(DK % 16 == 0 && BV % 16 == 0 && DK % BV == 0 && C % 32 == 0);
  static_assert(row_blocks <= warps && warps % row_blocks == 0);
  static_assert(score_cols % 8 == 0 && (score_cols / 8 == 1 || score_cols / 8 % 2 == 0));
  static_assert(out_cols % 8 == 0 && (out_cols / 8 == 1 || out_cols / 8 % 2 == 0));
  static_assert((DK / 16) % state_warps_m == 0 && (tn == 1 || tn % 2 == 0));

  // Shared memory, in bytes: two stages of (x [C, DK], y [C, DK], z [C, BV]), then R's bf16
  // copy [DK, BV], the scores [C, C] and two buffers of decay factors (b·log2(e) [C], f [C],
  // w as bf16 pairs [C/2], e^{b_C}, b_C).
  static constexpr int x_bytes = C * DK * 2, y_bytes = C * DK * 2, z_bytes = C * BV * 2;
  static constexpr int stage_bytes = x_bytes + y_bytes + z_bytes;
  static constexpr int r_offset = 2 * stage_bytes;
  static constexpr int a_offset = r_offset + DK * BV * 2;
  static constexpr int decay_offset = a_offset + C * C * 2;
  static constexpr int decay_floats = 2 * C + C / 2 + 2;
  static constexpr int smem_bytes = decay_offset + 2 * decay_floats * 4;
  static constexpr int min_blocks = threads <= 256 && smem_bytes <= 113 * 1024 ? 2 : 1;
};

// The default shape per padded width (16, 32, 64, 128). 128 and 64 were chosen by measurement
// on H200 (B4 H16 T8192 D128 and B16 H9 T2048 D64, against other value blocks, 4 and 16 warps
// and chunks of 32 and 128); 16 and 32 take the same form.
template <int Width>
struct DefaultShape;
template <>
struct DefaultShape<16> : SweepShape<16, 16, 64, 8> {};
template <>
struct DefaultShape<32> : SweepShape<32, 32, 64, 8> {};
template <>
struct DefaultShape<64> : SweepShape<64, 64, 64, 8> {};
template <>
struct DefaultShape<128> : SweepShape<128, 64, 64, 8> {};

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

template <class Shape>
__global__ void __launch_bounds__(Shape::threads, Shape::min_blocks) sweep_kernel(const __grid_constant__ SweepBatch p) {
  constexpr int DK = Shape::DK, BV = Shape::BV, C = Shape::C, threads = Shape::threads;
  constexpr int x_row = DK * 2, z_row = BV * 2, a_row = C * 2;
  extern __shared__ __align__(128) char smem[];

  const int v_block = blockIdx.x, h = blockIdx.y;
  const int segment = blockIdx.z % p.segments, sweep_index = blockIdx.z / p.segments % p.n_sweeps;
  const int b = blockIdx.z / p.segments / p.n_sweeps;
  const Sweep& s = p.sweep[sweep_index];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, tq = lane % 4;
  const int T = p.length, D = p.d_head, H = p.n_heads;
  const bool reverse = s.reverse, states_only = p.states_only;
  const bool last_segment = segment == (reverse ? 0 : p.segments - 1);  // in the sweep's direction
  if (states_only && last_segment) return;  // its contribution feeds no later segment
  const int n_chunks = (T + C - 1) / C;
  const int chunk_begin = segment * p.segment_chunks;
  const int chunk_end = min(chunk_begin + p.segment_chunks, n_chunks);
  const int steps = chunk_end - chunk_begin;
  const std::int64_t head = std::int64_t(b) * H + h;

  char* const r_tile = smem + Shape::r_offset;
  char* const a_tile = smem + Shape::a_offset;
  float* const decay_buffers = reinterpret_cast<float*>(smem + Shape::decay_offset);
  const std::uint32_t r_base = ptx::shared_address(r_tile), a_base = ptx::shared_address(a_tile);

  const Rows<const bfloat16> x_rows = rows_of(p, s.x, b, h), y_rows = rows_of(p, s.y, b, h),
                             z_rows = rows_of(p, s.z, b, h);
  const Rows<const float> g_rows{p.g + std::int64_t(b) * T * H + h, H};

  // This warp's tiles of R [DK, BV]: rows (wm·tm + i)·16, columns (wn·tn + j)·8.
  const int wm = warp % Shape::state_warps_m, wn = warp / Shape::state_warps_m;
  const bool state_warp = wn * Shape::tn < BV / 8;
  // The initial state: the segment's from the combine pass, else the sweep's own (or zero).
  const bool from_segment = p.segments > 1 && !states_only;
  const float* const initial = from_segment ? s.segment_states + (head * p.segments + segment) * D * D
                               : states_only ? nullptr
                                             : s.state_in ? s.state_in + head * D * D
                                                          : nullptr;
  const bool initial_transposed = !from_segment && s.state_transposed;
  float R[Shape::tm][Shape::tn][4];
#pragma unroll
  for (int i = 0; i < Shape::tm; ++i)
#pragma unroll
    for (int j = 0; j < Shape::tn; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = (wm * Shape::tm + i) * 16 + gq + (e >> 1) * 8;
        const int col = v_block * BV + (wn * Shape::tn + j) * 8 + 2 * tq + (e & 1);
        const bool inside = state_warp && initial && row < D && col < D;
        R[i][j][e] = inside ? initial[initial_transposed ? col * D + row : row * D + col] : 0.f;
      }
  const auto store_r_tile = [&] {
    if (!state_warp) return;
#pragma unroll
    for (int i = 0; i < Shape::tm; ++i)
#pragma unroll
      for (int j = 0; j < Shape::tn; ++j) {
        const int row = (wm * Shape::tm + i) * 16 + gq, col = (wn * Shape::tn + j) * 8 + 2 * tq;
        *reinterpret_cast<std::uint32_t*>(r_tile + swizzled_element_offset<z_row>(row, col)) =
            ptx::pack_bf16x2(R[i][j][0], R[i][j][1]);
        *reinterpret_cast<std::uint32_t*>(r_tile + swizzled_element_offset<z_row>(row + 8, col)) =
            ptx::pack_bf16x2(R[i][j][2], R[i][j][3]);
      }
  };

  const auto chunk_at = [&](int step) { return reverse ? chunk_end - 1 - step : chunk_begin + step; };
  const auto load_chunk = [&](int chunk, char* stage) {
    const int t0 = chunk * C;
    if (!states_only) load_tile<DK, C, threads>(p, x_rows, t0, 0, stage);
    load_tile<DK, C, threads>(p, y_rows, t0, 0, stage + Shape::x_bytes);
    load_tile<BV, C, threads>(p, z_rows, t0, v_block * BV, stage + Shape::x_bytes + Shape::y_bytes);
  };
  load_chunk(chunk_at(0), smem);
  ptx::cp_async_commit();
  if (!states_only) store_r_tile();
  // Warp 0 computes each chunk's decay factors one chunk ahead, into the buffer of that chunk's
  // parity, from log decays it prefetched into registers one chunk before that.
  float g_next[C / 32];
  if (warp == 0) {
    load_log_decays<C>(g_rows, chunk_at(0) * C, T, g_next);
    chunk_decays<C>(g_next, reverse, p.scale, decay_buffers);
    if (steps > 1) load_log_decays<C>(g_rows, chunk_at(1) * C, T, g_next);
  }
  float segment_log_decay = 0.f;

  const int row_block = warp / Shape::col_splits, split = warp % Shape::col_splits;
  const int row0 = 16 * row_block;
  for (int step = 0; step < steps; ++step) {
    const int t0 = chunk_at(step) * C;
    char* const stage = smem + (step & 1) * Shape::stage_bytes;
    if (step + 1 < steps) {
      load_chunk(chunk_at(step + 1), smem + ((step + 1) & 1) * Shape::stage_bytes);
      ptx::cp_async_commit();
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();
    const std::uint32_t x_base = ptx::shared_address(stage);
    const std::uint32_t y_base = x_base + Shape::x_bytes;
    const std::uint32_t z_base = y_base + Shape::y_bytes;
    const float* const decay = decay_buffers + (step & 1) * Shape::decay_floats;
    const float* const decay_b2 = decay;
    const float* const decay_f = decay + C;
    const std::uint32_t* const decay_w = reinterpret_cast<const std::uint32_t*>(decay + 2 * C);
    const float* const decay_total = decay + 2 * C + C / 2;
    if (warp == 0 && step + 1 < steps) {
      // The buffer of the next chunk's parity was last read before the previous barrier.
      chunk_decays<C>(g_next, reverse, p.scale, decay_buffers + ((step + 1) & 1) * Shape::decay_floats);
      if (step + 2 < steps) load_log_decays<C>(g_rows, chunk_at(step + 2) * C, T, g_next);
    }

    if (!states_only) {
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
        for (int n = 0; n < out_tiles; n += 2)
          b_fragments(r_base, kk, n,
                      [&](int nt, std::uint32_t b0, std::uint32_t b1) { ptx::mma_m16n8k16_bf16(out[nt], a, b0, b1); });
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
            if (s.out) *reinterpret_cast<__nv_bfloat162*>(s.out + out_row + col) = __floats2bfloat162_rn(v0, v1);
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
    } else if (threadIdx.x == 0) {
      segment_log_decay += decay_total[1];
    }

    // (3) R = e^{b_C} R + Yᵀ diag(w) Z on this warp's tiles.
    if (state_warp) {
      const float total = decay_total[0];
#pragma unroll
      for (int i = 0; i < Shape::tm; ++i)
#pragma unroll
        for (int j = 0; j < Shape::tn; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) R[i][j][e] *= total;
#pragma unroll
      for (int kk = 0; kk < C / 16; ++kk) {
        const std::uint32_t w01 = decay_w[8 * kk + tq], w89 = decay_w[8 * kk + tq + 4];
        std::uint32_t a[Shape::tm][4];
#pragma unroll
        for (int i = 0; i < Shape::tm; ++i) {
          const int m0 = (wm * Shape::tm + i) * 16;
          ptx::ldmatrix_x4_trans(a[i], y_base + swizzled_row_offset<x_row>(16 * kk + (lane & 7) + ((lane >> 4) << 3),
                                                                           (m0 >> 3) + ((lane >> 3) & 1)));
          a[i][0] = ptx::mul_bf16x2(a[i][0], w01);
          a[i][1] = ptx::mul_bf16x2(a[i][1], w01);
          a[i][2] = ptx::mul_bf16x2(a[i][2], w89);
          a[i][3] = ptx::mul_bf16x2(a[i][3], w89);
        }
#pragma unroll
        for (int j = 0; j < Shape::tn; j += 2) {
          const int n0 = (wn * Shape::tn + j) * 8;
          if constexpr (Shape::tn >= 2) {
            std::uint32_t bf[4];
            ptx::ldmatrix_x4_trans(
                bf, z_base + swizzled_row_offset<z_row>(16 * kk + (lane & 7) + (((lane >> 3) & 1) << 3),
                                                        (n0 >> 3) + (lane >> 4)));
#pragma unroll
            for (int i = 0; i < Shape::tm; ++i) {
              ptx::mma_m16n8k16_bf16(R[i][j], a[i], bf[0], bf[1]);
              ptx::mma_m16n8k16_bf16(R[i][j + 1], a[i], bf[2], bf[3]);
            }
          } else {
            std::uint32_t bf[2];
            ptx::ldmatrix_x2_trans(
                bf, z_base + swizzled_row_offset<z_row>(16 * kk + (lane & 7) + (((lane >> 3) & 1) << 3), n0 >> 3));
#pragma unroll
            for (int i = 0; i < Shape::tm; ++i) ptx::mma_m16n8k16_bf16(R[i][j], a[i], bf[0], bf[1]);
          }
        }
      }
    }
    __syncthreads();  // R's copy, the scores, this chunk's decays and its stage are free again
    if (step + 1 < steps && !states_only) store_r_tile();
  }

  // The state after the last chunk: a segment's contribution (first pass), else the sweep's
  // final state from the block that ends the sequence.
  float* const final_state = states_only ? s.segment_states + (head * p.segments + segment) * D * D
                             : last_segment && s.state_out ? s.state_out + head * D * D
                                                           : nullptr;
  const bool final_transposed = !states_only && s.state_transposed;
  if (states_only && v_block == 0 && threadIdx.x == 0) s.segment_decays[head * p.segments + segment] = segment_log_decay;
  if (final_state && state_warp) {
#pragma unroll
    for (int i = 0; i < Shape::tm; ++i)
#pragma unroll
      for (int j = 0; j < Shape::tn; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = (wm * Shape::tm + i) * 16 + gq + (e >> 1) * 8;
          const int col = v_block * BV + (wn * Shape::tn + j) * 8 + 2 * tq + (e & 1);
          if (row < D && col < D) final_state[final_transposed ? col * D + row : row * D + col] = R[i][j][e];
        }
  }
}

// Each segment's initial state in R's layout, from the first pass's contributions L_p (in
// segment_states) and log decays G_p, in the sweep's direction:
//   R_in[first] = the sweep's initial state (or 0),  R_in[next] = e^{G_p} R_in[p] + L_p
// One thread per element of R; grid (⌈D²/256⌉, heads, batch × sweeps).
template <int Threads>
__global__ void __launch_bounds__(Threads) combine_segments_kernel(const __grid_constant__ SweepBatch p) {
  const Sweep& s = p.sweep[blockIdx.z % p.n_sweeps];
  const int b = blockIdx.z / p.n_sweeps, h = blockIdx.y, D = p.d_head, P = p.segments;
  const int element = blockIdx.x * blockDim.x + threadIdx.x;
  if (element >= D * D) return;
  const int row = element / D, col = element % D;
  const std::int64_t head = std::int64_t(b) * p.n_heads + h;
  float carry = s.state_in ? s.state_in[head * D * D + (s.state_transposed ? col * D + row : element)] : 0.f;
  float* const states = s.segment_states + head * P * D * D + element;
  const float* const log_decays = s.segment_decays + head * P;
  for (int k = 0; k < P; ++k) {
    const int segment = s.reverse ? P - 1 - k : k;
    float* const slot = states + std::int64_t(segment) * D * D;
    if (k + 1 < P) {
      const float contribution = *slot;
      *slot = carry;
      carry = expf(log_decays[segment]) * carry + contribution;
    } else {
      *slot = carry;
    }
  }
}

// Blocks that keep the GPU busy: two resident per SM on H100/H200 (132 SMs). Sweeps are split
// into segments until they reach it; the choice depends on the sizes only, so results do not
// depend on the device.
inline constexpr int target_blocks = 264;
inline constexpr int min_segment_chunks = 4;  // below this a segment's first pass costs more than it gains

struct Segmentation {
  int segments = 1, segment_chunks = 0;
};

inline Segmentation segmentation(int blocks, int length, int chunk) {
  const int n_chunks = (length + chunk - 1) / chunk;
  int segments = blocks >= target_blocks ? 1 : target_blocks / blocks;
  segments = std::max(1, std::min(segments, n_chunks / min_segment_chunks));
  const int segment_chunks = (n_chunks + segments - 1) / segments;
  return {(n_chunks + segment_chunks - 1) / segment_chunks, segment_chunks};
}

// Runs the sweeps of `batch` (segmented as batch.segments says, with each sweep's segment
// buffers set): grid (value blocks, heads, batch × sweeps × segments).
template <class Shape>
void launch_sweeps(SweepBatch batch, cudaStream_t stream) {
  const auto kernel = sweep_kernel<Shape>;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Shape::smem_bytes),
        "gla sweep: cudaFuncSetAttribute");
  const dim3 grid(Shape::v_blocks, unsigned(batch.n_heads), unsigned(batch.batch * batch.n_sweeps * batch.segments));
  if (batch.segments > 1) {
    batch.states_only = true;
    kernel<<<grid, Shape::threads, Shape::smem_bytes, stream>>>(batch);
    check(cudaGetLastError(), "gla sweep launch (segment states)");
    const int elements = batch.d_head * batch.d_head;
    combine_segments_kernel<256><<<dim3(unsigned((elements + 255) / 256), unsigned(batch.n_heads),
                                   unsigned(batch.batch * batch.n_sweeps)),
                              256, 0, stream>>>(batch);
    check(cudaGetLastError(), "gla segment combine launch");
    batch.states_only = false;
  }
  kernel<<<grid, Shape::threads, Shape::smem_bytes, stream>>>(batch);
  check(cudaGetLastError(), "gla sweep launch");
}

}  // namespace dash::cuda::gla::detail

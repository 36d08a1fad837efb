// The online softmax of one thread's rows of a score tile, shared by the forward kernels.
//
// Tensor-core accumulators (mma.sync m16n8 and wgmma m64nN alike) give each thread two rows,
// r = 0 (row lane/4 of its warp's 16) and r = 1 (8 rows further), and in every fragment f of
// 8 columns the two columns 8f + 2·(lane % 4) + c, c ∈ {0, 1}: value s[4f + 2r + c].
// A row's 32 … 128 columns are spread over the 4 threads of a quad (lanes 4g … 4g + 3).
//
// With the raw scores s (before the scale λ), the running maximum m and the running sum l:
//   m' = max(m, max_j s_j),   α = 2^((m − m')·λ·log2 e),   p_j = 2^((s_j − m')·λ·log2 e),
//   l' = α·l + Σ_j p_j,       acc' = α·acc + Σ_j p_j v_j,
// and at the end o = acc / l, lse = λ·m + ln l. A row that has seen no visible key keeps
// m = −∞ and l = 0: its exponent base is taken as 0 so that no −∞ − (−∞) appears, which
// gives α = 0 and p = 0. A tile whose pairs of a row are all hidden leaves that row as it
// was: m' = m, α = 1, p = 0.
#pragma once

#include <cstdint>
#include <limits>

#include "dash/core/cuda/numeric.cuh"
#include "dash/ops/softmax/cuda/detail/forward_tiles.cuh"

namespace dash::cuda::attention::detail {

constexpr float log2_e = 1.4426950408889634f;
constexpr float minus_infinity = -std::numeric_limits<float>::infinity();

// Sets to −∞ the scores the mask hides. `row` is the thread's first row (query position),
// `key` the key of its column 0 in fragment 0, i.e. tile start + 2·(lane % 4). Key key + j of
// query i is visible iff j ≤ i − key and (j ≥ i − key − W + 1 or j < S − key): per row three
// bounds, then per element two or three compares against the constant j and a select, with
// no branch (a masked tile costs about as much as the softmax itself, not several times it).
template <int kFragments>
__device__ __forceinline__ void hide_masked(float (&s)[4 * kFragments], const VisibleKeys& mask, int row, int key) {
  const int sink_end = mask.sinks - key;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int last = row + 8 * r - key, first = last - mask.window + 1;
#pragma unroll
    for (int f = 0; f < kFragments; ++f)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int j = 8 * f + c;
        const bool visible = (j <= last) & ((j >= first) | (j < sink_end));
        float& x = s[4 * f + 2 * r + c];
        x = visible ? x : minus_infinity;
      }
  }
}

struct OnlineSoftmax {
  float row_max[2] = {minus_infinity, minus_infinity};  // m, raw scores
  float row_sum[2] = {0.f, 0.f};  // this thread's share of l

  // Turns the scores of a new tile into p in place and returns α per row in `rescale`. The
  // row maximum and sum run in kChains independent partial results per row, so that the
  // dependent chains of max and add are kFragments / kChains long rather than kFragments.
  template <int kFragments>
  __device__ __forceinline__ void update(float (&s)[4 * kFragments], float scale_log2, float (&rescale)[2]) {
    constexpr int kChains = kFragments >= 4 ? 4 : kFragments;
    float partial[2][kChains];
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int i = 0; i < kChains; ++i) partial[r][i] = minus_infinity;
#pragma unroll
    for (int f = 0; f < kFragments; ++f)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        partial[r][f % kChains] = fmaxf(partial[r][f % kChains], fmaxf(s[4 * f + 2 * r], s[4 * f + 2 * r + 1]));
    float base[2];
    raise_max(partial, scale_log2, base, rescale);
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int i = 0; i < kChains; ++i) partial[r][i] = 0.f;
#pragma unroll
    for (int f = 0; f < kFragments; ++f)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float& x0 = s[4 * f + 2 * r];
        float& x1 = s[4 * f + 2 * r + 1];
        x0 = ptx::fast_exp2(fmaf(x0, scale_log2, -base[r]));
        x1 = ptx::fast_exp2(fmaf(x1, scale_log2, -base[r]));
        partial[r][f % kChains] += x0 + x1;
      }
    add_sums(partial, rescale);
  }

  // The same update over the columns [first[r], last[r]] of each row r only (columns counted
  // as in hide_masked, from the thread's column 0 of fragment 0), the others hidden, with p
  // written packed as the A operand of P V (p[2f + r] holds columns 8f, 8f + 1 of the thread)
  // and s left as it is, so that the tile's other columns can still be used afterwards.
  template <int kFragments>
  __device__ __forceinline__ void update_range(const float (&s)[4 * kFragments], const int (&first)[2],
                                               const int (&last)[2], float scale_log2, float (&rescale)[2],
                                               std::uint32_t (&p)[2 * kFragments]) {
    constexpr int kChains = kFragments >= 4 ? 4 : kFragments;
    const auto visible = [&](int r, int f, int c) {
      const int j = 8 * f + c;
      return (j >= first[r]) & (j <= last[r]);
    };
    float partial[2][kChains];
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int i = 0; i < kChains; ++i) partial[r][i] = minus_infinity;
#pragma unroll
    for (int f = 0; f < kFragments; ++f)
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int c = 0; c < 2; ++c)
          partial[r][f % kChains] =
              fmaxf(partial[r][f % kChains], visible(r, f, c) ? s[4 * f + 2 * r + c] : minus_infinity);
    float base[2];
    raise_max(partial, scale_log2, base, rescale);
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int i = 0; i < kChains; ++i) partial[r][i] = 0.f;
#pragma unroll
    for (int f = 0; f < kFragments; ++f)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float x0 = visible(r, f, 0) ? ptx::fast_exp2(fmaf(s[4 * f + 2 * r], scale_log2, -base[r])) : 0.f;
        const float x1 = visible(r, f, 1) ? ptx::fast_exp2(fmaf(s[4 * f + 2 * r + 1], scale_log2, -base[r])) : 0.f;
        partial[r][f % kChains] += x0 + x1;
        p[2 * f + r] = ptx::pack_bf16x2(x0, x1);
      }
    add_sums(partial, rescale);
  }

  // m' from this thread's partial maxima of a tile (reduced over the quad): the exponent base
  // λ·log2 e·m' per row into `base`, α into `rescale`.
  template <int kChains>
  __device__ __forceinline__ void raise_max(const float (&partial)[2][kChains], float scale_log2, float (&base)[2],
                                            float (&rescale)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = partial[r][0];
#pragma unroll
      for (int i = 1; i < kChains; ++i) tile_max = fmaxf(tile_max, partial[r][i]);
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      const float new_max = fmaxf(row_max[r], tile_max);
      base[r] = new_max == minus_infinity ? 0.f : new_max * scale_log2;
      rescale[r] = ptx::fast_exp2(row_max[r] * scale_log2 - base[r]);
      row_max[r] = new_max;
    }
  }

  // l' = α·l + this thread's partial sums of the tile's p.
  template <int kChains>
  __device__ __forceinline__ void add_sums(const float (&partial)[2][kChains], const float (&rescale)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = partial[r][0];
#pragma unroll
      for (int i = 1; i < kChains; ++i) sum += partial[r][i];
      row_sum[r] = row_sum[r] * rescale[r] + sum;
    }
  }

  // After the last tile: l summed over the quad, and lse = λ·m + ln l per row.
  __device__ __forceinline__ void finish(float scale, float (&inverse_sum)[2], float (&lse)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      inverse_sum[r] = 1.f / l;
      lse[r] = row_max[r] * scale + logf(l);
    }
  }
};

// Scales the accumulator rows (same layout as the scores) by α.
template <int kFragments>
__device__ __forceinline__ void rescale_rows(float (&acc)[4 * kFragments], const float (&alpha)[2]) {
#pragma unroll
  for (int f = 0; f < kFragments; ++f)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      acc[4 * f + 2 * r] *= alpha[r];
      acc[4 * f + 2 * r + 1] *= alpha[r];
    }
}

}  // namespace dash::cuda::attention::detail

// The portable attention forward: mma.sync m16n8k16 (sm_80 and later), any d_head ≤ 128 and
// any strides. The Hopper path in forward_hopper.cuh serves d_head 64 and 128 on sm_90; this
// one serves everything else (d_head 8 of the small models, odd widths, unaligned views).
//
// One CTA of 4 warps takes 64 queries of one (batch, head); each warp owns 16 of them. Per key
// tile of 64 (forward_tiles.cuh chooses which):
//   S = Q Kᵀ (raw scores, fp32),  online softmax (forward_softmax.cuh),  O = α·O + P V,
// with P rounded to bf16 as the A operand of the second product, and finally O /= l and
// lse = λ·m + ln l. d_head is padded with zeros to kHeadDim ∈ {16, 32, 64, 128}; keys and
// queries past T are zeros (never visible: a query i < T sees only keys j ≤ i).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dash/core/cuda.hpp"
#include "dash/core/cuda/mma.cuh"
#include "dash/core/cuda/numeric.cuh"
#include "dash/ops/softmax/cuda/detail/forward_softmax.cuh"
#include "dash/ops/softmax/cuda/detail/forward_tiles.cuh"
#include "dash/ops/softmax/cuda/params.cuh"

namespace dash::cuda::attention::detail {

template <int kHeadDim>
struct PortableTile {
  static_assert(kHeadDim == 16 || kHeadDim == 32 || kHeadDim == 64 || kHeadDim == 128);
  static constexpr int kBlockM = 64;  // queries per CTA, 16 per warp
  static constexpr int kBlockN = 64;  // keys per tile
  static constexpr int kThreads = 128;
  // Row pitches padded by 16 bytes: the 8 rows a quad-strided fragment load touches fall in
  // distinct banks.
  static constexpr int kPitch = kHeadDim + 8;        // q and k tiles, [row][d]
  static constexpr int kValuePitch = kBlockN + 8;    // v tile transposed, [d][key]
  static constexpr int kSharedBytes = 2 * (2 * kBlockM * kPitch + kHeadDim * kValuePitch);
};

__device__ __forceinline__ std::uint32_t load_pair(const bfloat16* p) {
  return *reinterpret_cast<const std::uint32_t*>(p);
}

// rows × kHeadDim elements from `src` (row r at src + r·row_stride) into `dst` (pitch `pitch`),
// zero past `valid_rows` and past d_head. With `transpose`, element (r, d) goes to dst[d·pitch + r].
// `vectorized`: d_head, the row stride and the pointer are multiples of 8 elements (16 bytes).
template <int kHeadDim, int kRows, bool kTranspose>
__device__ __forceinline__ void load_tile(bfloat16* dst, int pitch, const bfloat16* src, std::int64_t row_stride,
                                          int valid_rows, int d_head, bool vectorized) {
  constexpr int kThreads = PortableTile<kHeadDim>::kThreads;
  const bfloat16 zero = __float2bfloat16(0.f);
  if (vectorized) {
    constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per padded row
    for (int i = threadIdx.x; i < kRows * kChunks; i += kThreads) {
      const int r = i / kChunks, d0 = (i % kChunks) * 8;
      uint4 chunk = make_uint4(0, 0, 0, 0);
      if (r < valid_rows && d0 < d_head) chunk = *reinterpret_cast<const uint4*>(src + r * row_stride + d0);
      if constexpr (kTranspose) {
        const bfloat16* e = reinterpret_cast<const bfloat16*>(&chunk);
#pragma unroll
        for (int j = 0; j < 8; ++j) dst[(d0 + j) * pitch + r] = e[j];
      } else {
        *reinterpret_cast<uint4*>(dst + r * pitch + d0) = chunk;
      }
    }
  } else {
    for (int i = threadIdx.x; i < kRows * kHeadDim; i += kThreads) {
      const int r = i / kHeadDim, d = i % kHeadDim;
      const bfloat16 x = r < valid_rows && d < d_head ? src[r * row_stride + d] : zero;
      dst[kTranspose ? d * pitch + r : r * pitch + d] = x;
    }
  }
}

template <int kHeadDim>
__global__ void __launch_bounds__(PortableTile<kHeadDim>::kThreads)
    forward_portable_kernel(const ForwardParams params, const VisibleKeys mask, const bool vectorized) {
  using Tile = PortableTile<kHeadDim>;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kPitch = Tile::kPitch;
  constexpr int kValuePitch = Tile::kValuePitch;
  constexpr int kKeyFragments = kBlockN / 8, kDimFragments = kHeadDim / 8;

  extern __shared__ __align__(16) unsigned char shared_bytes[];
  bfloat16* q_tile = reinterpret_cast<bfloat16*>(shared_bytes);
  bfloat16* k_tile = q_tile + kBlockM * kPitch;
  bfloat16* v_tile = k_tile + kBlockN * kPitch;  // transposed: [d][key]

  const int m_block = gridDim.x - 1 - blockIdx.x;  // longest rows first
  const int head = blockIdx.y, batch = blockIdx.z;
  const int kv_head = head / (params.n_heads / params.n_kv_heads);
  const int length = params.length, d_head = params.d_head;
  const int q0 = m_block * kBlockM, q1 = min(q0 + kBlockM, length);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int row = q0 + warp * 16 + g;  // this thread's first row; the second is row + 8

  const bfloat16* q = params.q + batch * params.q_strides.batch + q0 * params.q_strides.token + head * d_head;
  const bfloat16* k = params.k + batch * params.k_strides.batch + kv_head * d_head;
  const bfloat16* v = params.v + batch * params.v_strides.batch + kv_head * d_head;

  load_tile<kHeadDim, kBlockM, false>(q_tile, kPitch, q, params.q_strides.token, q1 - q0, d_head, vectorized);
  __syncthreads();
  std::uint32_t q_frag[kHeadDim / 16][4];
  const bfloat16* q_row = q_tile + (warp * 16 + g) * kPitch + 2 * t;
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    q_frag[kk][0] = load_pair(q_row + kk * 16);
    q_frag[kk][1] = load_pair(q_row + 8 * kPitch + kk * 16);
    q_frag[kk][2] = load_pair(q_row + kk * 16 + 8);
    q_frag[kk][3] = load_pair(q_row + 8 * kPitch + kk * 16 + 8);
  }

  const float scale_log2 = params.scale * log2_e;
  const KeyTiles<kBlockN> tiles(mask, q0, q1);
  OnlineSoftmax softmax;
  float o[4 * kDimFragments] = {};
  for (int it = 0; it < tiles.count(); ++it) {
    const int k0 = tiles[it] * kBlockN;
    const int keys = min(kBlockN, length - k0);
    __syncthreads();  // the previous tile is consumed
    load_tile<kHeadDim, kBlockN, false>(k_tile, kPitch, k + k0 * params.k_strides.token, params.k_strides.token, keys,
                                        d_head, vectorized);
    load_tile<kHeadDim, kBlockN, true>(v_tile, kValuePitch, v + k0 * params.v_strides.token,
                                       params.v_strides.token, keys, d_head, vectorized);
    __syncthreads();

    float s[4 * kKeyFragments] = {};
#pragma unroll
    for (int f = 0; f < kKeyFragments; ++f) {
      const bfloat16* k_row = k_tile + (8 * f + g) * kPitch + 2 * t;
      float(&frag)[4] = *reinterpret_cast<float(*)[4]>(&s[4 * f]);
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk)
        ptx::mma_m16n8k16_bf16(frag, q_frag[kk], load_pair(k_row + kk * 16), load_pair(k_row + kk * 16 + 8));
    }
    if (!mask.all_visible(q0 + warp * 16, q0 + warp * 16 + 16, k0, k0 + kBlockN))
      hide_masked<kKeyFragments>(s, mask, row, k0 + 2 * t);
    float alpha[2];
    softmax.update<kKeyFragments>(s, scale_log2, alpha);
    rescale_rows<kDimFragments>(o, alpha);

#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const std::uint32_t p[4] = {
          ptx::pack_bf16x2(s[8 * kk + 0], s[8 * kk + 1]), ptx::pack_bf16x2(s[8 * kk + 2], s[8 * kk + 3]),
          ptx::pack_bf16x2(s[8 * kk + 4], s[8 * kk + 5]), ptx::pack_bf16x2(s[8 * kk + 6], s[8 * kk + 7])};
#pragma unroll
      for (int f = 0; f < kDimFragments; ++f) {
        const bfloat16* v_row = v_tile + (8 * f + g) * kValuePitch + kk * 16 + 2 * t;
        float(&frag)[4] = *reinterpret_cast<float(*)[4]>(&o[4 * f]);
        ptx::mma_m16n8k16_bf16(frag, p, load_pair(v_row), load_pair(v_row + 8));
      }
    }
  }

  float inverse_sum[2], lse[2];
  softmax.finish(params.scale, inverse_sum, lse);
  const int head_row = batch * params.n_heads + head;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row + 8 * r;
    if (i >= length) continue;
    if (t == 0) params.lse[std::int64_t(head_row) * length + i] = lse[r];
    bfloat16* out = params.o + batch * params.o_strides.batch + i * params.o_strides.token + head * d_head;
#pragma unroll
    for (int f = 0; f < kDimFragments; ++f) {
      const int d = 8 * f + 2 * t;
      const float x0 = o[4 * f + 2 * r] * inverse_sum[r], x1 = o[4 * f + 2 * r + 1] * inverse_sum[r];
      if (vectorized) {
        if (d < d_head) *reinterpret_cast<__nv_bfloat162*>(out + d) = __floats2bfloat162_rn(x0, x1);
      } else {
        if (d < d_head) out[d] = __float2bfloat16(x0);
        if (d + 1 < d_head) out[d + 1] = __float2bfloat16(x1);
      }
    }
  }
}

// Launches the portable kernel for validated params; `mask` is clamped to the length.
template <int kHeadDim>
void launch_forward_portable(const ForwardParams& params, const VisibleKeys& mask, bool vectorized,
                             cudaStream_t stream) {
  using Tile = PortableTile<kHeadDim>;
  const auto kernel = forward_portable_kernel<kHeadDim>;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::kSharedBytes),
        "attention::forward: cudaFuncSetAttribute (portable kernel shared memory)");
  const dim3 grid((params.length + Tile::kBlockM - 1) / Tile::kBlockM, params.n_heads, params.batch);
  kernel<<<grid, Tile::kThreads, Tile::kSharedBytes, stream>>>(params, mask, vectorized);
  check(cudaGetLastError(), "attention::forward: portable kernel launch");
}

}  // namespace dash::cuda::attention::detail

// Rotary position embedding on the device (dash/ops/rope.hpp). For pair i < D/2 of a head at
// position p, with θ_i = theta^(−2i/D):
//   (x_a, x_b) ← (x_a cos pθ_i − x_b sin pθ_i,  x_a sin pθ_i + x_b cos pθ_i)
// (a, b) = (2i, 2i+1) in the interleaved convention (llama2.c, GGUF), (i, i + D/2) in the half
// convention (Hugging Face). The backward is the inverse rotation (sin → −sin) of the gradient.
// Applied in place to q and k, which may be slices of one fused QKV projection output: head h
// of token t of sequence b sits at base + b·batch_stride + t·token_stride + h·D.
// cos and sin of pθ_i are computed once in double on the host (angles reach 10⁴ rad and more)
// and kept in fp32 tables; the rotation runs in fp32.
#pragma once

#include <algorithm>
#include <cmath>

#include "dash/core/cuda.hpp"
#include "dash/core/error.hpp"
#include "dash/model/cuda/vector_io.cuh"
#include "dash/ops/attention.hpp"

namespace dash::cuda::model {

// The device tables of one RopeTable: what a launch reads.
struct RopeTableView {
  const float* cos = nullptr;  // [positions, d_head / 2]
  const float* sin = nullptr;
  index_t positions = 0;
  int d_head = 0;
  RopeConfig::Style style = RopeConfig::Style::none;
};

// cos and sin of p·θ_i for p in [0, positions): built once per model, on the host in double.
class RopeTable {
 public:
  RopeTable(const RopeConfig& rope, int d_head, index_t positions) : style_(rope.style), d_head_(d_head) {
    require(d_head >= 2 && d_head % 2 == 0, "RopeTable: d_head = ", d_head, ", expected an even number >= 2");
    require(positions >= 1, "RopeTable: positions = ", positions, ", expected at least 1");
    require(rope.style == RopeConfig::Style::none || rope.theta > 0, "RopeTable: theta = ", rope.theta,
            ", expected > 0");
    if (style_ == RopeConfig::Style::none) return;
    const index_t pairs = d_head / 2;
    Tensor<float> cos(Shape{positions, pairs}), sin(Shape{positions, pairs});
    for (index_t p = 0; p < positions; ++p)
      for (index_t i = 0; i < pairs; ++i) {
        const double angle = double(p) * std::pow(rope.theta, -2.0 * double(i) / double(d_head));
        cos(p, i) = float(std::cos(angle));
        sin(p, i) = float(std::sin(angle));
      }
    cos_ = DeviceTensor<float>::from_host(cos.view());
    sin_ = DeviceTensor<float>::from_host(sin.view());
  }

  RopeTableView view() const {
    return {cos_.data(), sin_.data(), style_ == RopeConfig::Style::none ? 0 : cos_.shape()[0], d_head_, style_};
  }

 private:
  RopeConfig::Style style_;
  int d_head_;
  DeviceTensor<float> cos_, sin_;
};

struct RopeParams {
  bfloat16* q = nullptr;  // may be null when n_q_heads = 0
  bfloat16* k = nullptr;  // may be null when n_k_heads = 0
  int n_q_heads = 0;
  int n_k_heads = 0;
  int batch = 0;
  index_t length = 0;
  index_t batch_stride = 0;  // elements, shared by q and k
  index_t token_stride = 0;
  index_t position_offset = 0;  // token t is at position position_offset + t
  bool inverse = false;         // the backward: rotate by −pθ
  RopeTableView table;
};

namespace detail {

// One thread rotates kWidth consecutive pairs of one head of one token: with kWidth = 8 its
// elements move as 16-byte vectors (two per side), which needs every head start 16-byte aligned
// and d_head / 2 a multiple of 8 (rope_vector_width); kWidth = 1 takes any layout.
template <RopeConfig::Style kStyle, int kWidth>
__global__ void __launch_bounds__(256) rope_kernel(RopeParams p) {
  const int pairs = p.table.d_head / 2, heads = p.n_q_heads + p.n_k_heads, groups = pairs / kWidth;
  const index_t idx = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const index_t total = index_t(p.batch) * p.length * heads * groups;
  if (idx >= total) return;
  const int slot = int(idx % (heads * groups)), h = slot / groups, i = (slot % groups) * kWidth;
  const index_t row = idx / (heads * groups), t = row % p.length, b = row / p.length;
  bfloat16* head = (h < p.n_q_heads ? p.q + index_t(h) * p.table.d_head
                                    : p.k + index_t(h - p.n_q_heads) * p.table.d_head) +
                   b * p.batch_stride + t * p.token_stride;
  const index_t at = (p.position_offset + t) * pairs + i;
  float c[kWidth], s[kWidth], xa[kWidth], xb[kWidth];
  load_vector(p.table.cos + at, c);
  load_vector(p.table.sin + at, s);
  if constexpr (kStyle == RopeConfig::Style::half) {
    load_vector(head + i, xa);
    load_vector(head + i + pairs, xb);
  } else {
    // Interleaved: pair j is elements (2j, 2j + 1); kWidth pairs span two vectors.
    float x[2 * kWidth];
    if constexpr (kWidth == 1) {
      x[0] = __bfloat162float(head[2 * i]), x[1] = __bfloat162float(head[2 * i + 1]);
    } else {
      load_vector(head + 2 * i, reinterpret_cast<float(&)[kWidth]>(x[0]));
      load_vector(head + 2 * i + kWidth, reinterpret_cast<float(&)[kWidth]>(x[kWidth]));
    }
#pragma unroll
    for (int j = 0; j < kWidth; ++j) xa[j] = x[2 * j], xb[j] = x[2 * j + 1];
  }
  const float sign = p.inverse ? -1.0f : 1.0f;
  float ya[kWidth], yb[kWidth];
#pragma unroll
  for (int j = 0; j < kWidth; ++j) {
    ya[j] = xa[j] * c[j] - sign * xb[j] * s[j];
    yb[j] = sign * xa[j] * s[j] + xb[j] * c[j];
  }
  if constexpr (kStyle == RopeConfig::Style::half) {
    store_vector(head + i, ya);
    store_vector(head + i + pairs, yb);
  } else {
    float y[2 * kWidth];
#pragma unroll
    for (int j = 0; j < kWidth; ++j) y[2 * j] = ya[j], y[2 * j + 1] = yb[j];
    if constexpr (kWidth == 1) {
      head[2 * i] = __float2bfloat16_rn(y[0]), head[2 * i + 1] = __float2bfloat16_rn(y[1]);
    } else {
      store_vector(head + 2 * i, reinterpret_cast<const float(&)[kWidth]>(y[0]));
      store_vector(head + 2 * i + kWidth, reinterpret_cast<const float(&)[kWidth]>(y[kWidth]));
    }
  }
}

// 8 when every head of q and k starts 16-byte aligned and a head's half is whole vectors.
inline int rope_vector_width(const RopeParams& p) {
  const bool q_ok = p.n_q_heads == 0 || aligned_rows(p.q, p.token_stride, p.table.d_head);
  const bool k_ok = p.n_k_heads == 0 || aligned_rows(p.k, p.token_stride, p.table.d_head);
  const bool batch_ok = (p.batch_stride * index_t(sizeof(bfloat16))) % 16 == 0;
  return q_ok && k_ok && batch_ok && (p.table.d_head / 2) % 8 == 0 ? 8 : 1;
}

template <RopeConfig::Style kStyle>
void launch_rope(const RopeParams& p, cudaStream_t stream) {
  const int width = rope_vector_width(p), block = 256;
  const index_t threads = index_t(p.batch) * p.length * (p.n_q_heads + p.n_k_heads) * (p.table.d_head / 2 / width);
  const auto grid = unsigned((threads + block - 1) / block);
  if (width == 8)
    rope_kernel<kStyle, 8><<<grid, block, 0, stream>>>(p);
  else
    rope_kernel<kStyle, 1><<<grid, block, 0, stream>>>(p);
}

}  // namespace detail

// Rotates q and k in place on `stream`.
inline void rope(const RopeParams& p, cudaStream_t stream) {
  const RopeTableView& t = p.table;
  require(p.n_q_heads >= 0 && p.n_k_heads >= 0 && p.n_q_heads + p.n_k_heads >= 1, "rope: n_q_heads = ", p.n_q_heads,
          ", n_k_heads = ", p.n_k_heads, ", expected non-negative and not both 0");
  require(p.n_q_heads == 0 || p.q, "rope: q is null but n_q_heads = ", p.n_q_heads);
  require(p.n_k_heads == 0 || p.k, "rope: k is null but n_k_heads = ", p.n_k_heads);
  require(p.batch >= 1 && p.length >= 1, "rope: batch = ", p.batch, ", length = ", p.length,
          ", expected at least 1 each");
  require(t.d_head >= 2 && t.d_head % 2 == 0, "rope: table d_head = ", t.d_head, ", expected an even number >= 2");
  const index_t widest = index_t(std::max(p.n_q_heads, p.n_k_heads)) * t.d_head;
  require(p.token_stride >= widest, "rope: token_stride = ", p.token_stride, " is below the ", widest,
          " elements of a token's heads");
  require(p.batch == 1 || p.batch_stride >= p.length * p.token_stride, "rope: batch_stride = ", p.batch_stride,
          " is below length · token_stride = ", p.length * p.token_stride);
  require(p.position_offset >= 0, "rope: position_offset = ", p.position_offset, ", expected >= 0");
  if (t.style == RopeConfig::Style::none) return;
  require(t.cos && t.sin, "rope: the table has no device data");
  require(p.position_offset + p.length <= t.positions, "rope: positions [", p.position_offset, ", ",
          p.position_offset + p.length, ") exceed the table's ", t.positions);
  // One thread per pair at worst, 256 to a block, at most 2³¹ − 1 blocks.
  require(index_t(p.batch) * p.length * (p.n_q_heads + p.n_k_heads) * (t.d_head / 2) < (index_t(1) << 39),
          "rope: ", p.batch, " × ", p.length, " tokens of ", p.n_q_heads + p.n_k_heads, " heads exceed one launch");
  if (t.style == RopeConfig::Style::interleaved)
    detail::launch_rope<RopeConfig::Style::interleaved>(p, stream);
  else
    detail::launch_rope<RopeConfig::Style::half>(p, stream);
  check(cudaGetLastError(), "rope launch");
}

}  // namespace dash::cuda::model

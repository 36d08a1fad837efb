// The mixing weights π of MixedAttention (mixed_attention.hpp) on the device.
//
// scale_weights   π-scaled copies of output projections, W'_j = π[p_j] · W_j (bf16), so that
//                 the forward's weighted sum y = Σ_i π_i·a_i·W_iᵀ is the accumulating GEMM's own
//                 product over the concatenation [a_1 | a_2 | …]. One launch refreshes every
//                 copy of every layer from the device π, jobs from a device table.
// mixture_gradient  for each term i (an operator that ran): with its output a_i and the gradient
//                 reaching it d_i (both [rows, cols], strided rows),
//                   dL/dπ_i = <a_i, d_i> = Σ_{r,c} a_i[r,c]·d_i[r,c]
//                 and the operator's upstream gradient π_i·d_i into a contiguous bf16 buffer.
//                 Sums run in fp32 per thread and in double across threads and blocks: a fixed
//                 grid, per-block partials, then one block per term adds them in order, so the
//                 result does not depend on scheduling.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cub/block/block_reduce.cuh>

#include "dash/core/cuda.hpp"
#include "dash/core/error.hpp"
#include "dash/model/cuda/vector_io.cuh"

namespace dash::cuda::model {

// dst[r, c] = π[pi_index] · src[r, c] for r < rows, c < cols.
struct ScaleJob {
  const bfloat16* src = nullptr;
  index_t src_stride = 0;
  bfloat16* dst = nullptr;
  index_t dst_stride = 0;
  index_t rows = 0, cols = 0;
  int pi_index = 0;
};

inline constexpr int max_mixture_terms = 8;

struct MixtureTerm {
  const bfloat16* a = nullptr;  // [rows, cols], row stride a_stride
  index_t a_stride = 0;
  const bfloat16* d = nullptr;  // [rows, cols], row stride d_stride
  index_t d_stride = 0;
  bfloat16* scaled = nullptr;   // [rows, cols] contiguous: π·d
  int pi_index = 0;             // π[pi_index]; dL/dπ goes to grad[pi_index]
};

struct MixtureGradientParams {
  MixtureTerm terms[max_mixture_terms];
  int n_terms = 0;
  index_t rows = 0;
  int cols = 0;
  const float* pi = nullptr;
  float* grad = nullptr;
  double* partials = nullptr;  // mixture_partials_count() doubles of scratch
};

namespace detail {

inline constexpr int mixture_threads = 256;
inline constexpr int mixture_blocks = 264;  // per term: two waves of 132 SMs; fixed, for determinism

template <int Threads>
__global__ void __launch_bounds__(Threads) scale_weights_kernel(const ScaleJob* jobs, const float* pi) {
  const ScaleJob job = jobs[blockIdx.y];
  const float factor = pi[job.pi_index];
  const index_t total = job.rows * job.cols;
  for (index_t idx = index_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += index_t(gridDim.x) * blockDim.x) {
    const index_t r = idx / job.cols, c = idx % job.cols;
    job.dst[r * job.dst_stride + c] = __float2bfloat16_rn(factor * __bfloat162float(job.src[r * job.src_stride + c]));
  }
}

template <int kWidth>
__global__ void __launch_bounds__(mixture_threads) mixture_partials_kernel(MixtureGradientParams p) {
  const MixtureTerm& term = p.terms[blockIdx.y];
  const float factor = p.pi[term.pi_index];
  const index_t per_row = p.cols / kWidth, total = p.rows * per_row;
  float sum = 0;
  for (index_t idx = index_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += index_t(gridDim.x) * blockDim.x) {
    const index_t r = idx / per_row, c = (idx % per_row) * kWidth;
    float a[kWidth], d[kWidth];
    load_vector(term.a + r * term.a_stride + c, a);
    load_vector(term.d + r * term.d_stride + c, d);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) sum += a[j] * d[j], d[j] *= factor;
    store_vector(term.scaled + r * p.cols + c, d);
  }
  using Reduce = cub::BlockReduce<double, mixture_threads>;
  __shared__ typename Reduce::TempStorage storage;
  const double block_sum = Reduce(storage).Sum(double(sum));
  if (threadIdx.x == 0) p.partials[blockIdx.y * gridDim.x + blockIdx.x] = block_sum;
}

template <int Threads>
__global__ void __launch_bounds__(Threads) mixture_totals_kernel(MixtureGradientParams p, int blocks) {
  double sum = 0;
  for (int b = int(threadIdx.x); b < blocks; b += blockDim.x) sum += p.partials[blockIdx.x * blocks + b];
  using Reduce = cub::BlockReduce<double, Threads>;
  __shared__ typename Reduce::TempStorage storage;
  const double total = Reduce(storage).Sum(sum);
  if (threadIdx.x == 0) p.grad[p.terms[blockIdx.x].pi_index] = float(total);
}

inline unsigned elementwise_blocks(index_t items) {
  return unsigned(std::max<index_t>(1, std::min<index_t>((items + 255) / 256, index_t(1) << 16)));
}

}  // namespace detail

// Doubles of scratch mixture_gradient needs.
inline std::size_t mixture_partials_count() { return std::size_t(max_mixture_terms) * detail::mixture_blocks; }

// `jobs` is a device array of n_jobs jobs; max_elements bounds rows·cols over them.
inline void scale_weights(const ScaleJob* jobs, int n_jobs, index_t max_elements, const float* pi,
                          cudaStream_t stream) {
  require(n_jobs >= 0 && n_jobs <= 65535, "scale_weights: n_jobs = ", n_jobs, ", expected 0 … 65535");
  if (n_jobs == 0) return;
  require(jobs != nullptr, "scale_weights: jobs is null");
  require(pi != nullptr, "scale_weights: pi is null");
  require(max_elements >= 1, "scale_weights: max_elements = ", max_elements, ", expected at least 1");
  const dim3 grid(std::min(detail::elementwise_blocks(max_elements), 1024u), unsigned(n_jobs));
  detail::scale_weights_kernel<256><<<grid, 256, 0, stream>>>(jobs, pi);
  check(cudaGetLastError(), "scale_weights launch");
}

inline void mixture_gradient(const MixtureGradientParams& p, cudaStream_t stream) {
  require(p.n_terms >= 0 && p.n_terms <= max_mixture_terms, "mixture_gradient: n_terms = ", p.n_terms,
          ", expected 0 … ", max_mixture_terms);
  if (p.n_terms == 0) return;
  require(p.rows >= 1 && p.cols >= 1, "mixture_gradient: rows = ", p.rows, ", cols = ", p.cols,
          ", expected at least 1 each");
  require(p.pi && p.grad && p.partials, "mixture_gradient: pi, grad and partials must not be null");
  bool wide = p.cols % 8 == 0;
  for (int i = 0; i < p.n_terms; ++i) {
    const MixtureTerm& t = p.terms[i];
    require(t.a && t.d && t.scaled, "mixture_gradient: term ", i, " has a null a, d or scaled");
    require(t.a_stride >= p.cols && t.d_stride >= p.cols, "mixture_gradient: term ", i, " row strides ", t.a_stride,
            ", ", t.d_stride, " are below cols = ", p.cols);
    wide = wide && aligned_rows(t.a, t.a_stride, p.cols) && aligned_rows(t.d, t.d_stride, p.cols) &&
           aligned_rows(t.scaled, p.cols, p.cols);
  }
  const dim3 grid(detail::mixture_blocks, unsigned(p.n_terms));
  if (wide)
    detail::mixture_partials_kernel<8><<<grid, detail::mixture_threads, 0, stream>>>(p);
  else
    detail::mixture_partials_kernel<1><<<grid, detail::mixture_threads, 0, stream>>>(p);
  check(cudaGetLastError(), "mixture_gradient partials launch");
  detail::mixture_totals_kernel<detail::mixture_threads>
      <<<unsigned(p.n_terms), detail::mixture_threads, 0, stream>>>(p,
                                                                                           detail::mixture_blocks);
  check(cudaGetLastError(), "mixture_gradient totals launch");
}

}  // namespace dash::cuda::model

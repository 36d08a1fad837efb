// The index of each row's largest value, as std::max_element gives it on the CPU:
//
//   out[r] = min { j : z[r, j] = max_k z[r, k] }        (ties: the lowest index)
//
// over the entries that are not NaN (a NaN never wins; a row of NaN alone gives −1). One block
// per row: each thread scans a strided part of the row keeping its first maximum, and a block
// reduction under the order "larger value, then lower index" picks the row's.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>
#include <cub/block/block_reduce.cuh>

#include "dash/core/cuda.hpp"
#include "dash/core/error.hpp"

namespace dash::cuda::model {

struct ArgmaxParams {
  const float* values = nullptr;  // [rows, ld]
  index_t rows = 0;
  int cols = 0;
  index_t ld = 0;
  int* out = nullptr;  // [rows]
};

namespace detail {

inline constexpr int argmax_threads = 256;

struct ArgmaxCandidate {
  float value;
  int index;  // −1: none yet
};

// a if it ranks before b: a value, and a larger one or an equal one at a lower index.
struct FirstMaximum {
  __device__ ArgmaxCandidate operator()(const ArgmaxCandidate& a, const ArgmaxCandidate& b) const {
    if (a.index < 0) return b;
    if (b.index < 0) return a;
    return a.value > b.value || (a.value == b.value && a.index < b.index) ? a : b;
  }
};

template <int Threads>
__global__ void __launch_bounds__(Threads) argmax_rows_kernel(ArgmaxParams p) {
  using Reduce = cub::BlockReduce<ArgmaxCandidate, Threads>;
  __shared__ typename Reduce::TempStorage storage;
  const float* row = p.values + std::size_t(blockIdx.x) * std::size_t(p.ld);
  ArgmaxCandidate best{-INFINITY, -1};
  for (int j = int(threadIdx.x); j < p.cols; j += Threads) {
    const float v = row[j];
    if (!isnan(v) && (best.index < 0 || v > best.value)) best = {v, j};
  }
  const ArgmaxCandidate top = Reduce(storage).Reduce(best, FirstMaximum{});
  if (threadIdx.x == 0) p.out[blockIdx.x] = top.index;
}

}  // namespace detail

inline void argmax_rows(const ArgmaxParams& p, cudaStream_t stream) {
  require(p.rows >= 1 && p.rows <= index_t(INT_MAX), "argmax_rows: rows = ", p.rows, ", expected 1 ... ", INT_MAX);
  require(p.cols >= 1, "argmax_rows: cols = ", p.cols, ", expected at least 1");
  require(p.ld >= p.cols, "argmax_rows: ld = ", p.ld, ", expected at least cols = ", p.cols);
  require(p.values != nullptr, "argmax_rows: values is null");
  require(p.out != nullptr, "argmax_rows: out is null");
  detail::argmax_rows_kernel<detail::argmax_threads><<<unsigned(p.rows), detail::argmax_threads, 0, stream>>>(p);
  check(cudaGetLastError(), "argmax_rows: launch");
}

}  // namespace dash::cuda::model

// The decoder's first step, x₀[t] = E[ids[t]]: rows of the bf16 embedding table gathered into
// the residual stream (bf16 or fp32). Ids come from the device, so they cannot be checked on the
// host without a synchronisation: an id outside [0, vocab) yields a zero row and is reported
// through the optional invalid-token word (invalid_token.cuh), which the caller reads when it
// next synchronises. (TokenBatch::validate checks ids on the host where the batch is built.)
#pragma once

#include <algorithm>
#include <type_traits>

#include "dash/core/cuda.hpp"
#include "dash/core/error.hpp"
#include "dash/model/cuda/invalid_token.cuh"
#include "dash/model/cuda/vector_io.cuh"

namespace dash::cuda::model {

template <class Out>
struct EmbeddingParams {
  const int* ids = nullptr;         // [tokens]
  const bfloat16* table = nullptr;  // [vocab, d_model]
  Out* out = nullptr;               // [tokens, d_model]
  index_t tokens = 0;
  int vocab = 0;
  int d_model = 0;
  unsigned long long* invalid = nullptr;  // optional: the first out-of-range id, see invalid_token.cuh
};

namespace detail {

template <int kWidth, class Out>
__global__ void embedding_kernel(EmbeddingParams<Out> p) {
  const index_t per_row = p.d_model / kWidth, total = p.tokens * per_row;
  for (index_t idx = index_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += index_t(gridDim.x) * blockDim.x) {
    const index_t token = idx / per_row, col = (idx % per_row) * kWidth;
    const int id = p.ids[token];
    float row[kWidth];
    if (id >= 0 && id < p.vocab) {
      load_vector(p.table + index_t(id) * p.d_model + col, row);
    } else {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) row[j] = 0;
      if (col == 0 && p.invalid) report_invalid_token(p.invalid, token, id);
    }
    store_vector(p.out + token * p.d_model + col, row);
  }
}

}  // namespace detail

template <class Out>
  requires(std::is_same_v<Out, bfloat16> || std::is_same_v<Out, float>)
void embedding(const EmbeddingParams<Out>& p, cudaStream_t stream) {
  require(p.tokens >= 1 && p.tokens < (index_t(1) << 31), "embedding: tokens = ", p.tokens,
          ", expected in [1, 2³¹)");
  require(p.vocab >= 1, "embedding: vocab = ", p.vocab, ", expected at least 1");
  require(p.d_model >= 1, "embedding: d_model = ", p.d_model, ", expected at least 1");
  require(p.ids != nullptr, "embedding: ids is null");
  require(p.table != nullptr, "embedding: table is null");
  require(p.out != nullptr, "embedding: out is null");
  if (p.invalid) reset_invalid_token(p.invalid, stream);
  const bool wide = aligned_rows(p.table, p.d_model, p.d_model) && aligned_rows(p.out, p.d_model, p.d_model);
  const int block = 256, width = wide ? 8 : 1;
  const unsigned grid = unsigned(std::min<index_t>((p.tokens * (p.d_model / width) + block - 1) / block, 1 << 20));
  if (wide)
    detail::embedding_kernel<8><<<grid, block, 0, stream>>>(p);
  else
    detail::embedding_kernel<1><<<grid, block, 0, stream>>>(p);
  check(cudaGetLastError(), "embedding launch");
}

}  // namespace dash::cuda::model

// Token losses at the LM head (dash/model/loss.hpp), fused and chunked so that at most
// chunk × vocab logits exist at once. With z = h·Eᵀ, lse(z) = log Σ_v exp z_v, p the teacher's
// softmax and q the student's:
//   KL:   ℓ_t = Σ_v p_t(v) (log p_t(v) − log q_t(v)),   dℓ_t/dz_t = q_t − p_t      (every token counts)
//   NLL:  ℓ_t = lse(z_t) − z_t[y_t],                    dℓ_t/dz_t = q_t − onehot(y_t)
//         (a negative target is not counted; one ≥ vocab is not counted and is reported)
// The loss is the mean over counted tokens, so d(mean)/dh_t = (dℓ_t/dz_t / count)·E.
//
// Per chunk of tokens: the logits GEMMs write fp32 logits already in base 2 (alpha = log₂e, so
// every exponential is one exp2); one thread-block cluster per token row copies the row (bulk
// asynchronous copies) into the shared memory of its blocks, each block a slice of the
// vocabulary; each block reduces its slice to softmax statistics (max, Σ 2^(u−max), and for KL
// Σ 2^(u_t−max)(u_t − u_s)) in one pass, the blocks exchange statistics through distributed
// shared memory, and each writes its slice of dz = (q − p)/count in bf16 from shared memory:
// the logits are read from global memory once. A last GEMM gives dh = dz·E. In base-2 units u = z·log₂e, with b = m + log₂ S:
//   KL = ln2 · (A_t / S_t − b_t + b_s),   NLL = ln2 · (b_s − u_s[y]),   q = 2^(u_s − b_s).
// Per-token losses are summed in double by one final block into device scalars: no host
// synchronisation anywhere, and the sum does not depend on the chunking or on thread order.
// Needs thread-block clusters (sm_90 or newer).
#pragma once

#include <cooperative_groups.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cub/block/block_reduce.cuh>

#include "dash/core/cuda.hpp"
#include "dash/core/cuda/shared.cuh"
#include "dash/core/cuda/tma.cuh"
#include "dash/core/dtype.hpp"
#include "dash/core/error.hpp"
#include "dash/model/cuda/gemm.cuh"
#include "dash/model/cuda/invalid_token.cuh"

namespace dash::cuda::model {

enum class LmLoss { kl, nll };

// The loss and its gradient from given fp32 logits rows: what the fused loss runs per chunk.
// Rows start 16-byte aligned: logits pointers 16-byte aligned and ld a multiple of 4; d_logits
// 8-byte aligned and ld_grad a multiple of 4 (the row kernel moves 4 entries at a time and
// may write entries vocab … ld_grad − 1 of a row).
struct LogitLossParams {
  LmLoss kind = LmLoss::kl;
  const float* teacher = nullptr;  // kl: [rows, ld] natural-log logits
  const float* student = nullptr;  // [rows, ld]
  const int* targets = nullptr;    // nll: [rows]
  index_t rows = 0;
  int vocab = 0;
  index_t ld = 0;
  float* token_loss = nullptr;    // [rows]: ℓ_t, 0 where not counted
  bfloat16* d_logits = nullptr;   // optional [rows, ld_grad]: dℓ_t/dz_t · grad_scale
  index_t ld_grad = 0;
  float grad_scale = 1;
};

struct LmLossParams {
  LmLoss kind = LmLoss::kl;
  const bfloat16* teacher_hidden = nullptr;  // kl: [tokens, d_model], the teacher's final-normed states
  const bfloat16* hidden = nullptr;          // [tokens, d_model]: the student's (kl) or the model's (nll)
  const int* targets = nullptr;              // nll: [tokens]
  const bfloat16* head = nullptr;            // E, [vocab, d_model]
  index_t tokens = 0;
  int d_model = 0;
  int vocab = 0;
  float* loss_sum = nullptr;   // device scalar: Σ_t ℓ_t over counted tokens
  float* loss_mean = nullptr;  // optional device scalar: loss_sum / count, 0 when nothing counts
  int* count = nullptr;        // optional device scalar: tokens counted
  float* token_loss = nullptr; // optional [tokens]: ℓ_t, 0 where not counted
  void* d_hidden = nullptr;    // optional [tokens, d_model]: d(mean loss)/d(hidden)
  DType d_hidden_type = DType::bf16;  // bf16 or f32
  bool accumulate = false;            // d_hidden += ... instead of d_hidden = ...
  unsigned long long* invalid_target = nullptr;  // nll, optional: first target ≥ vocab (invalid_token.cuh)
};

namespace detail {

inline constexpr int loss_threads = 512;
inline constexpr float log2_e = 1.4426950408889634f;
inline constexpr float ln_2 = 0.6931471805599453f;

// Softmax statistics of part of a row in base-2 units: teacher max, S_t = Σ 2^(u_t − m_t),
// A = Σ 2^(u_t − m_t)(u_t − u_s), student max, S_s = Σ 2^(u_s − m_s). Empty: max = −∞, sums 0.
struct SoftmaxStats {
  float m_t, s_t, a, m_s, s_s;
};

__device__ __forceinline__ float rescale(float m_old, float m_new) {
  return m_old == -INFINITY ? 0.0f : exp2f(m_old - m_new);
}

struct CombineStats {
  __device__ SoftmaxStats operator()(const SoftmaxStats& x, const SoftmaxStats& y) const {
    SoftmaxStats r;
    r.m_t = fmaxf(x.m_t, y.m_t);
    const float ft_x = rescale(x.m_t, r.m_t), ft_y = rescale(y.m_t, r.m_t);
    r.s_t = x.s_t * ft_x + y.s_t * ft_y;
    r.a = x.a * ft_x + y.a * ft_y;
    r.m_s = fmaxf(x.m_s, y.m_s);
    r.s_s = x.s_s * rescale(x.m_s, r.m_s) + y.s_s * rescale(y.m_s, r.m_s);
    return r;
  }
};

// Adds up to 4 base-2 logits (the first `valid`) into (m, s) and, with weights u_t − u_s, into a.
template <bool kWeighted>
__device__ __forceinline__ void accumulate(float& m, float& s, float* a, const float (&u)[4], const float (&w)[4],
                                           int valid) {
  float top = -INFINITY;
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (j < valid) top = fmaxf(top, u[j]);
  if (top > m) {
    const float f = rescale(m, top);
    s *= f;
    if constexpr (kWeighted) *a *= f;
    m = top;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (j < valid) {
      const float e = exp2f(u[j] - m);
      s += e;
      if constexpr (kWeighted) *a += e * w[j];
    }
}

struct RowLossParams {
  const float* teacher = nullptr;  // kl
  const float* student = nullptr;
  const int* targets = nullptr;    // nll
  index_t ld = 0;
  int vocab = 0;
  int slice = 0;          // vocabulary entries per block of a row's cluster, a multiple of 4
  float to_base2 = 1;     // log₂e for natural-log logits, 1 for logits already in base 2
  float* token_loss = nullptr;
  bfloat16* d_logits = nullptr;
  index_t ld_grad = 0;
  float grad_scale = 1;
  const int* grad_divisor = nullptr;  // when given, the gradient is divided by *grad_divisor instead
};

inline constexpr int load_pieces = 4;

// One cluster per row; block `rank` of it owns vocabulary entries [rank·slice, (rank+1)·slice).
template <LmLoss kKind, bool kGradient>
__global__ void __launch_bounds__(loss_threads) logit_rows_kernel(RowLossParams p) {
  namespace cg = cooperative_groups;
  constexpr bool kl = kKind == LmLoss::kl;
  const cg::cluster_group cluster = cg::this_cluster();
  const int rank = int(cluster.block_rank()), blocks = int(cluster.num_blocks());
  const index_t row = blockIdx.x / blocks;
  const int lo = rank * p.slice, hi = min(lo + p.slice, p.vocab);

  extern __shared__ float4 shared_logits[];
  float* const student_slice = reinterpret_cast<float*>(shared_logits);  // logits as given, [slice]
  float* const teacher_slice = student_slice + p.slice;                  // kl: [slice]
  int target = -1;
  if constexpr (!kl) {
    target = p.targets[row];
    if (target >= p.vocab) target = -1;
  }

  // The slice, rounded up to whole 16-byte vectors (rows are padded that far), in pieces.
  const int span = min(lo + p.slice, (p.vocab + 3) / 4 * 4) - lo;
  const int piece = (span / 4 + load_pieces - 1) / load_pieces * 4;
  const int pieces = (span + piece - 1) / piece;
  // One-dimensional bulk copies (TMA), each piece completing its mbarrier: the block puts its
  // whole slice in flight at once instead of a few loads per thread, and starts on the first
  // piece while the others are still arriving.
  __shared__ alignas(8) std::uint64_t arrived[load_pieces];
  const auto barrier = [&](int k) { return ptx::shared_address(&arrived[k]); };
  if (threadIdx.x == 0) {
    for (int k = 0; k < pieces; ++k) ptx::mbarrier_init(barrier(k), 1);
    ptx::mbarrier_init_fence();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int k = 0; k < pieces; ++k) {
      const int begin = k * piece, bytes = min(piece, span - begin) * int(sizeof(float));
      ptx::mbarrier_arrive_expect_tx(barrier(k), std::uint32_t(kl ? 2 * bytes : bytes));
      ptx::bulk_copy_to_shared(ptx::shared_address(student_slice + begin), p.student + row * p.ld + lo + begin,
                               std::uint32_t(bytes), barrier(k));
      if constexpr (kl)
        ptx::bulk_copy_to_shared(ptx::shared_address(teacher_slice + begin), p.teacher + row * p.ld + lo + begin,
                                 std::uint32_t(bytes), barrier(k));
    }
  }

  SoftmaxStats stats{-INFINITY, 0, 0, -INFINITY, 0};
  for (int k = 0; k < pieces; ++k) {
    ptx::mbarrier_wait(barrier(k), 0);  // the piece has landed
    const int end = min((k + 1) * piece, hi - lo);
    for (int j = k * piece + 4 * int(threadIdx.x); j < end; j += 4 * loss_threads) {
      const int valid = min(4, end - j);
      const float4 s4 = *reinterpret_cast<const float4*>(student_slice + j);
      const float us[4] = {s4.x * p.to_base2, s4.y * p.to_base2, s4.z * p.to_base2, s4.w * p.to_base2};
      accumulate<false>(stats.m_s, stats.s_s, nullptr, us, us, valid);
      if constexpr (kl) {
        const float4 t4 = *reinterpret_cast<const float4*>(teacher_slice + j);
        const float ut[4] = {t4.x * p.to_base2, t4.y * p.to_base2, t4.z * p.to_base2, t4.w * p.to_base2};
        const float w[4] = {ut[0] - us[0], ut[1] - us[1], ut[2] - us[2], ut[3] - us[3]};
        accumulate<true>(stats.m_t, stats.s_t, &stats.a, ut, w, valid);
      }
    }
  }

  using BlockReduce = cub::BlockReduce<SoftmaxStats, loss_threads>;
  __shared__ typename BlockReduce::TempStorage reduce_storage;
  __shared__ SoftmaxStats block_stats;
  __shared__ float lse_t, lse_s;  // base 2
  const SoftmaxStats reduced = BlockReduce(reduce_storage).Reduce(stats, CombineStats{});
  if (threadIdx.x == 0) block_stats = reduced;
  cluster.sync();  // every block's statistics are in its shared memory

  if (threadIdx.x == 0) {
    SoftmaxStats row_stats = *cluster.map_shared_rank(&block_stats, 0);
    for (int r = 1; r < blocks; ++r) row_stats = CombineStats{}(row_stats, *cluster.map_shared_rank(&block_stats, r));
    lse_s = row_stats.m_s + log2f(row_stats.s_s);
    lse_t = kl ? row_stats.m_t + log2f(row_stats.s_t) : 0.0f;
    if (rank == 0) {
      float loss = 0;
      if constexpr (kl) {
        loss = ln_2 * (row_stats.a / row_stats.s_t - lse_t + lse_s);
      } else if (target >= 0) {
        const int owner = target / p.slice;
        loss = ln_2 * (lse_s - p.to_base2 * cluster.map_shared_rank(student_slice, owner)[target - owner * p.slice]);
      }
      p.token_loss[row] = loss;
    }
  }
  cluster.sync();  // no block leaves while another reads its shared memory; lse_* are visible

  if constexpr (kGradient) {
    float scale = p.grad_scale;
    if (p.grad_divisor) scale = *p.grad_divisor > 0 ? 1.0f / float(*p.grad_divisor) : 0.0f;
    if (!kl && target < 0) scale = 0;  // a token that does not count has no gradient
    bfloat16* const grad = p.d_logits + row * p.ld_grad;
    const float k = p.to_base2;
    for (int i = lo + 4 * int(threadIdx.x); i < hi; i += 4 * loss_threads) {
      const float4 s4 = *reinterpret_cast<const float4*>(student_slice + (i - lo));
      float dz[4] = {exp2f(fmaf(s4.x, k, -lse_s)), exp2f(fmaf(s4.y, k, -lse_s)), exp2f(fmaf(s4.z, k, -lse_s)),
                     exp2f(fmaf(s4.w, k, -lse_s))};
      if constexpr (kl) {
        const float4 t4 = *reinterpret_cast<const float4*>(teacher_slice + (i - lo));
        dz[0] -= exp2f(fmaf(t4.x, k, -lse_t)), dz[1] -= exp2f(fmaf(t4.y, k, -lse_t));
        dz[2] -= exp2f(fmaf(t4.z, k, -lse_t)), dz[3] -= exp2f(fmaf(t4.w, k, -lse_t));
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) dz[j] -= i + j == target ? 1.0f : 0.0f;
      }
      __nv_bfloat162 pair[2] = {__floats2bfloat162_rn(dz[0] * scale, dz[1] * scale),
                                __floats2bfloat162_rn(dz[2] * scale, dz[3] * scale)};
      *reinterpret_cast<uint2*>(grad + i) = *reinterpret_cast<const uint2*>(pair);
    }
  }
}

// How a row is split over a cluster: the fewest blocks whose slices fit in 64 KiB of shared
// memory each (three blocks per SM) if at most 8 do, else in 200 KiB (one per SM), at most 16.
struct RowSplit {
  int blocks = 0;
  int slice = 0;
  std::size_t shared_bytes = 0;
};

inline constexpr int max_cluster_blocks = 16;

inline RowSplit row_split(LmLoss kind, int vocab) {
  const std::size_t entry = kind == LmLoss::kl ? 2 * sizeof(float) : sizeof(float);
  const std::size_t row = std::size_t(vocab) * entry;
  std::size_t blocks = (row + (64u << 10) - 1) / (64u << 10);
  if (blocks > 8) blocks = (row + (200u << 10) - 1) / (200u << 10);
  const auto limit_vocab = std::size_t(max_cluster_blocks) * (200u << 10) / entry;
  require(blocks <= std::size_t(max_cluster_blocks), "lm loss: vocab = ", vocab, " exceeds the ", limit_vocab,
          " entries one cluster of ", max_cluster_blocks, " blocks holds in shared memory");
  RowSplit split;
  split.slice = int((std::size_t(vocab) + blocks - 1) / blocks + 3) / 4 * 4;
  split.blocks = (vocab + split.slice - 1) / split.slice;
  split.shared_bytes = std::size_t(split.slice) * entry;
  return split;
}

template <LmLoss kKind, bool kGradient>
void launch_logit_rows(const RowLossParams& p, index_t rows, const RowSplit& split, cudaStream_t stream) {
  const auto kernel = logit_rows_kernel<kKind, kGradient>;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(split.shared_bytes)),
        "lm loss: shared memory size");
  if (split.blocks > 8)
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1),
          "lm loss: cluster size above 8");
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(unsigned(rows * split.blocks));
  config.blockDim = dim3(loss_threads);
  config.dynamicSmemBytes = split.shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = unsigned(split.blocks);
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  config.attrs = &cluster;
  config.numAttrs = 1;
  check(cudaLaunchKernelEx(&config, kernel, p), "lm loss: logit rows launch");
}

// The one place the loss kind and the gradient switch become template parameters.
inline void dispatch_logit_rows(LmLoss kind, const RowLossParams& p, index_t rows, cudaStream_t stream) {
  const RowSplit split = row_split(kind, p.vocab);
  require(rows * split.blocks < (index_t(1) << 31), "lm loss: ", rows, " rows of ", split.blocks,
          " blocks each exceed the grid");
  RowLossParams q = p;
  q.slice = split.slice;
  const bool gradient = p.d_logits != nullptr;
  if (kind == LmLoss::kl)
    gradient ? launch_logit_rows<LmLoss::kl, true>(q, rows, split, stream)
             : launch_logit_rows<LmLoss::kl, false>(q, rows, split, stream);
  else
    gradient ? launch_logit_rows<LmLoss::nll, true>(q, rows, split, stream)
             : launch_logit_rows<LmLoss::nll, false>(q, rows, split, stream);
}

inline constexpr int reduce_threads = 1024;

// Counts the targets in [0, vocab) and reports the first one ≥ vocab.
template <int Threads>
__global__ void __launch_bounds__(Threads)
    count_targets_kernel(const int* targets, index_t tokens, int vocab, int* count, unsigned long long* invalid) {
  int counted = 0;
  for (index_t t = threadIdx.x; t < tokens; t += Threads) {
    const int y = targets[t];
    counted += y >= 0 && y < vocab;
    if (y >= vocab && invalid) report_invalid_token(invalid, t, y);
  }
  using BlockReduce = cub::BlockReduce<int, Threads>;
  __shared__ typename BlockReduce::TempStorage storage;
  const int total = BlockReduce(storage).Sum(counted);
  if (threadIdx.x == 0) *count = total;
}

// Σ token_loss in double into the caller's scalars; the count from the device or the host.
template <int Threads>
__global__ void __launch_bounds__(Threads)
    loss_totals_kernel(const float* token_loss, index_t tokens, const int* device_count, int host_count,
                       float* loss_sum, float* loss_mean, int* count_out) {
  double sum = 0;
  for (index_t t = threadIdx.x; t < tokens; t += Threads) sum += double(token_loss[t]);
  using BlockReduce = cub::BlockReduce<double, Threads>;
  __shared__ typename BlockReduce::TempStorage storage;
  sum = BlockReduce(storage).Sum(sum);
  if (threadIdx.x == 0) {
    const int count = device_count ? *device_count : host_count;
    *loss_sum = float(sum);
    if (loss_mean) *loss_mean = count > 0 ? float(sum / double(count)) : 0.0f;
    if (count_out) *count_out = count;
  }
}

inline index_t round_up(index_t value, index_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// Where each part of the fused loss lives in the caller's workspace, for a chunk of `chunk` tokens.
struct LossLayout {
  index_t chunk = 0;
  index_t ld = 0, ld_grad = 0;  // row strides of the fp32 logits and of the bf16 dz
  std::size_t gemm = 0, token_loss = 0, count = 0, teacher = 0, student = 0, grad = 0, total = 0;
};

inline constexpr std::size_t workspace_alignment = 256;

inline std::size_t aligned(std::size_t bytes) {
  return (bytes + workspace_alignment - 1) / workspace_alignment * workspace_alignment;
}

inline std::size_t chunk_independent_bytes(const Gemm& gemm, const LmLossParams& p) {
  return aligned(gemm.workspace_bytes()) + (p.token_loss ? 0 : aligned(std::size_t(p.tokens) * sizeof(float))) +
         workspace_alignment;
}

// What the chunk buffers (at most three) may lose to alignment.
inline constexpr std::size_t chunk_slack = 3 * workspace_alignment;

inline std::size_t bytes_per_chunk_token(const LmLossParams& p) {
  const std::size_t ld = std::size_t(round_up(p.vocab, 64));
  return (p.kind == LmLoss::kl ? 2 : 1) * ld * sizeof(float) + (p.d_hidden ? ld * sizeof(bfloat16) : 0);
}

inline LossLayout loss_layout(const Gemm& gemm, const LmLossParams& p, index_t chunk) {
  LossLayout l;
  l.chunk = chunk;
  l.ld = l.ld_grad = round_up(p.vocab, 64);
  std::size_t at = 0;
  const auto take = [&](std::size_t bytes) {
    const std::size_t start = at;
    at += aligned(bytes);
    return start;
  };
  l.gemm = take(gemm.workspace_bytes());
  l.token_loss = p.token_loss ? 0 : take(std::size_t(p.tokens) * sizeof(float));
  l.count = take(sizeof(int));
  l.teacher = p.kind == LmLoss::kl ? take(std::size_t(chunk) * std::size_t(l.ld) * sizeof(float)) : 0;
  l.student = take(std::size_t(chunk) * std::size_t(l.ld) * sizeof(float));
  l.grad = p.d_hidden ? take(std::size_t(chunk) * std::size_t(l.ld_grad) * sizeof(bfloat16)) : 0;
  l.total = at;
  return l;
}

// Chunks of a multiple of 128 tokens keep every chunk's hidden rows as aligned as the first's.
inline index_t tidy_chunk(index_t chunk, index_t tokens) {
  chunk = std::min(chunk, tokens);
  return chunk >= 128 && chunk < tokens ? chunk / 128 * 128 : chunk;
}

inline void validate(const LmLossParams& p) {
  const bool kl = p.kind == LmLoss::kl;
  require(p.kind == LmLoss::kl || p.kind == LmLoss::nll, "lm loss: unknown kind");
  require(p.tokens >= 1 && p.tokens < (index_t(1) << 31), "lm loss: tokens = ", p.tokens, ", expected in [1, 2³¹)");
  require(p.d_model >= 1, "lm loss: d_model = ", p.d_model, ", expected at least 1");
  require(p.vocab >= 1, "lm loss: vocab = ", p.vocab, ", expected at least 1");
  require(p.hidden != nullptr, "lm loss: hidden is null");
  require(p.head != nullptr, "lm loss: head is null");
  require(!kl || p.teacher_hidden, "lm loss (kl): teacher_hidden is null");
  require(kl || !p.teacher_hidden, "lm loss (nll): teacher_hidden is given but NLL does not read it");
  require(kl || p.targets, "lm loss (nll): targets is null");
  require(!kl || !p.targets, "lm loss (kl): targets are given but KL does not read them");
  require(!kl || !p.invalid_target, "lm loss (kl): invalid_target is given but KL reads no targets");
  require(p.loss_sum != nullptr, "lm loss: loss_sum is null");
  require(p.d_hidden_type == DType::bf16 || p.d_hidden_type == DType::f32, "lm loss: d_hidden_type = ",
          name_of(p.d_hidden_type), ", expected bf16 or f32");
  require(p.d_hidden || !p.accumulate, "lm loss: accumulate is set but d_hidden is null");
  (void)row_split(p.kind, p.vocab);
}

}  // namespace detail

// Workspace for chunks of `chunk_tokens` tokens (0: about 128 Mi logits per chunk, 1.3 GB for
// KL with its gradient: large chunks keep the GEMMs efficient).
inline std::size_t lm_loss_workspace_bytes(const Gemm& gemm, const LmLossParams& p, index_t chunk_tokens = 0) {
  detail::validate(p);
  require(chunk_tokens >= 0, "lm_loss_workspace_bytes: chunk_tokens = ", chunk_tokens, ", expected >= 0");
  const index_t chunk =
      chunk_tokens ? std::min(chunk_tokens, p.tokens)
                   : detail::tidy_chunk(std::max<index_t>(1, (index_t(1) << 27) / detail::round_up(p.vocab, 64)),
                                        p.tokens);
  return detail::chunk_independent_bytes(gemm, p) + std::size_t(chunk) * detail::bytes_per_chunk_token(p) +
         detail::chunk_slack;
}

// The chunk a workspace of `workspace_bytes` allows.
inline index_t lm_loss_chunk_tokens(const Gemm& gemm, const LmLossParams& p, std::size_t workspace_bytes) {
  detail::validate(p);
  const std::size_t fixed = detail::chunk_independent_bytes(gemm, p) + detail::chunk_slack;
  const std::size_t per_token = detail::bytes_per_chunk_token(p);
  require(workspace_bytes >= fixed + per_token, "lm loss: workspace_bytes = ", workspace_bytes,
          ", expected at least ", fixed + per_token, " (one token per chunk)");
  return detail::tidy_chunk(index_t((workspace_bytes - fixed) / per_token), p.tokens);
}

// Enqueues the whole loss on `stream`: logits, loss, gradient, totals.
inline void lm_loss(Gemm& gemm, const LmLossParams& p, void* workspace, std::size_t workspace_bytes,
                    cudaStream_t stream) {
  detail::validate(p);
  require(workspace != nullptr, "lm loss: workspace is null");
  require(reinterpret_cast<std::uintptr_t>(workspace) % detail::workspace_alignment == 0,
          "lm loss: workspace is not 256-byte aligned");
  const bool kl = p.kind == LmLoss::kl;
  const detail::LossLayout layout = detail::loss_layout(gemm, p, lm_loss_chunk_tokens(gemm, p, workspace_bytes));
  char* const base = static_cast<char*>(workspace);
  float* const token_loss = p.token_loss ? p.token_loss : reinterpret_cast<float*>(base + layout.token_loss);
  int* const count = reinterpret_cast<int*>(base + layout.count);
  float* const teacher_logits = kl ? reinterpret_cast<float*>(base + layout.teacher) : nullptr;
  float* const student_logits = reinterpret_cast<float*>(base + layout.student);
  bfloat16* const grad = p.d_hidden ? reinterpret_cast<bfloat16*>(base + layout.grad) : nullptr;
  const std::size_t grad_element = p.d_hidden_type == DType::f32 ? sizeof(float) : sizeof(bfloat16);

  if (!kl) {
    if (p.invalid_target) reset_invalid_token(p.invalid_target, stream);
    detail::count_targets_kernel<detail::reduce_threads>
        <<<1, detail::reduce_threads, 0, stream>>>(p.targets, p.tokens, p.vocab, count, p.invalid_target);
    check(cudaGetLastError(), "lm loss: count targets launch");
  }
  for (index_t first = 0; first < p.tokens; first += layout.chunk) {
    const index_t rows = std::min(layout.chunk, p.tokens - first);
    GemmShape logits_shape;
    logits_shape.m = rows, logits_shape.n = p.vocab, logits_shape.k = p.d_model;
    logits_shape.transpose_b = true;
    logits_shape.ldc = layout.ld;
    logits_shape.c_type = DType::f32;
    GemmOperands logits{};
    logits.b = p.head;
    logits.alpha = detail::log2_e;
    logits.workspace = base + layout.gemm, logits.workspace_bytes = gemm.workspace_bytes();
    if (kl) {
      logits.a = p.teacher_hidden + first * p.d_model, logits.c = teacher_logits;
      gemm(logits_shape, logits, stream);
    }
    logits.a = p.hidden + first * p.d_model, logits.c = student_logits;
    gemm(logits_shape, logits, stream);

    detail::RowLossParams rows_params;
    rows_params.teacher = teacher_logits;
    rows_params.student = student_logits;
    rows_params.targets = kl ? nullptr : p.targets + first;
    rows_params.ld = layout.ld;
    rows_params.vocab = p.vocab;
    rows_params.to_base2 = 1;
    rows_params.token_loss = token_loss + first;
    rows_params.d_logits = grad;
    rows_params.ld_grad = layout.ld_grad;
    rows_params.grad_scale = 1.0f / float(p.tokens);
    rows_params.grad_divisor = kl ? nullptr : count;
    detail::dispatch_logit_rows(p.kind, rows_params, rows, stream);

    if (p.d_hidden) {
      GemmShape back_shape;
      back_shape.m = rows, back_shape.n = p.d_model, back_shape.k = p.vocab;
      back_shape.lda = layout.ld_grad;
      back_shape.c_type = p.d_hidden_type;
      back_shape.accumulate = p.accumulate;
      GemmOperands back{};
      back.a = grad, back.b = p.head;
      back.c = static_cast<char*>(p.d_hidden) + std::size_t(first) * std::size_t(p.d_model) * grad_element;
      back.workspace = base + layout.gemm, back.workspace_bytes = gemm.workspace_bytes();
      gemm(back_shape, back, stream);
    }
  }
  detail::loss_totals_kernel<detail::reduce_threads><<<1, detail::reduce_threads, 0, stream>>>(
      token_loss, p.tokens, kl ? nullptr : count, int(p.tokens), p.loss_sum, p.loss_mean, p.count);
  check(cudaGetLastError(), "lm loss: totals launch");
}

// Per-token losses (and optionally dℓ_t/dz_t · grad_scale) from natural-log fp32 logits.
inline void logit_loss(const LogitLossParams& p, cudaStream_t stream) {
  const bool kl = p.kind == LmLoss::kl;
  require(p.kind == LmLoss::kl || p.kind == LmLoss::nll, "logit_loss: unknown kind");
  require(p.rows >= 1 && p.rows < (index_t(1) << 31), "logit_loss: rows = ", p.rows, ", expected in [1, 2³¹)");
  require(p.vocab >= 1, "logit_loss: vocab = ", p.vocab, ", expected at least 1");
  require(p.ld >= detail::round_up(p.vocab, 4) && p.ld % 4 == 0, "logit_loss: ld = ", p.ld,
          ", expected a multiple of 4 and at least ", detail::round_up(p.vocab, 4));
  require(p.student != nullptr, "logit_loss: student is null");
  require(reinterpret_cast<std::uintptr_t>(p.student) % 16 == 0, "logit_loss: student is not 16-byte aligned");
  require(!kl || p.teacher, "logit_loss (kl): teacher is null");
  require(!kl || reinterpret_cast<std::uintptr_t>(p.teacher) % 16 == 0, "logit_loss: teacher is not 16-byte aligned");
  require(kl || p.targets, "logit_loss (nll): targets is null");
  require(p.token_loss != nullptr, "logit_loss: token_loss is null");
  require(!p.d_logits || (p.ld_grad >= detail::round_up(p.vocab, 4) && p.ld_grad % 4 == 0),
          "logit_loss: ld_grad = ", p.ld_grad, ", expected a multiple of 4 and at least ",
          detail::round_up(p.vocab, 4));
  require(!p.d_logits || reinterpret_cast<std::uintptr_t>(p.d_logits) % 8 == 0,
          "logit_loss: d_logits is not 8-byte aligned");
  detail::RowLossParams q;
  q.teacher = p.teacher;
  q.student = p.student;
  q.targets = p.targets;
  q.ld = p.ld;
  q.vocab = p.vocab;
  q.to_base2 = detail::log2_e;
  q.token_loss = p.token_loss;
  q.d_logits = p.d_logits;
  q.ld_grad = p.ld_grad;
  q.grad_scale = p.grad_scale;
  detail::dispatch_logit_rows(p.kind, q, p.rows, stream);
}

}  // namespace dash::cuda::model

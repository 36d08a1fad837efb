// Backward of Softmax / SlidingWindow attention on CUDA: dq, dk, dv from q, k, v, the
// forward's o and lse, and the upstream gradient d_o (layouts and mask in params.cuh); and the
// backward of a mixture of two such operators on the same q, k, v in one pass (below).
//
// With s_ij = scale·q_i·k_j over the visible pairs (j ≤ i and (i − j < W or j < sinks)),
// p_ij = exp(s_ij − lse_i) and D_i = d_o_i·o_i:
//   dv_j = Σ_i p_ij d_o_i,   ds_ij = p_ij (d_o_i·v_j − D_i),
//   dq_i = scale·Σ_j ds_ij k_j,   dk_j = scale·Σ_i ds_ij q_i,
// where query head h reads kv head h / (H / Hkv), and dk, dv of a kv head sum over its query
// group. P is recomputed tile by tile (never a T×T matrix); tiles that hold no visible pair
// are never visited: a key tile loops over the query tiles from its own diagonal to the
// window's reach (to the end when it holds sink keys), and only tiles on the diagonal or the
// window's edge are masked per element.
//
// Three passes (backward_common.cuh): D and zeroed fp32 accumulators; the main kernel, one
// CTA per (batch, kv head, key tile, head split) looping over its share of the group's query
// heads with dk, dv in registers and dq added to the accumulator; dq (and dk, dv when heads
// were split) scaled and rounded to bf16. The main kernel is the wgmma one on sm_90
// (backward_wgmma.cuh; its dq reductions go through a tensor map of the accumulator, encoded
// per call with the driver's cuTensorMapEncodeTiled) and the mma.sync one elsewhere
// (backward_mma.cuh, whole groups per CTA).
//
// Load balance (wgmma kernel): a causal key tile's work falls linearly along T, and under GQA
// a CTA carries a whole group, so few, very unequal CTAs would leave SMs idle at the end.
// The CTAs are ordered heavy first (backward_common.cuh), and when B·Hkv·(T/128) CTAs are too
// few to even out over the SMs, the group's query heads are split over several CTAs whose
// dk, dv meet in fp32 accumulators.
//
//   std::size_t bytes = backward_workspace_bytes(params);      // fp32 D and accumulators
//   backward(params, workspace, bytes, stream);
//
// Mixture (MixtureBackwardParams): y = Σ_t π_t·o_t over one or two terms (MixedAttention's
// Softmax and SlidingWindow on the same q, k, v), d = dL/dy. Its gradients are the sum of each
// term's backward for d_o = π_t·d, and dL/dπ_t = Σ_{b,i,h} d_i·o_t,i:
//   P_t = exp(s − lse_t) under mask t,  D_t = d·o_t,  dP = d vᵀ,
//   dS = Σ_t π_t P_t ∘ (dP − D_t),  dv = Σ_i (Σ_t π_t P_t) d,  dq = scale·dS k,  dk = scale·dSᵀ q.
// One pass does it: a key tile's query range is the union of the terms' reach, S, dP and the
// dV, dK, dQ products are computed once per tile, and each term whose mask reaches a tile
// adds one exponential per element there. The single-op backward is the one-term case with
// π = 1 (same kernels). dL/dπ_t comes from the D pass (fixed-grid partial sums in double,
// added in order: deterministic).
//
//   std::size_t bytes = mixture_backward_workspace_bytes(params);
//   mixture_backward(params, workspace, bytes, stream);       // dq, dk, dv; d_pi[pi_index]
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "dash/core/cuda.hpp"
#include "dash/core/cuda/tma.cuh"
#include "dash/core/error.hpp"
#include "dash/ops/softmax/cuda/detail/backward_common.cuh"
#include "dash/ops/softmax/cuda/detail/backward_mma.cuh"
#include "dash/ops/softmax/cuda/detail/backward_wgmma.cuh"
#include "dash/ops/softmax/cuda/params.cuh"

namespace dash::cuda::attention {

// Which main kernel runs: `automatic` picks wgmma on compute capability 9.x and mma_sync
// elsewhere; the others force one (wgmma needs sm_90 and code built for sm_90a).
enum class BackwardKernel { automatic, mma_sync, wgmma };

// How the wgmma kernel's CTAs share the work; 0 = chosen from the sizes and the SM count.
// head_splits: CTAs per (batch, kv head, key tile), each taking n_heads / n_kv_heads /
// head_splits query heads (a divisor of the group). sections_per_block: (batch, kv head,
// split) sections per block of the heavy-first order (backward_common.cuh). The mma.sync
// kernel ignores both.
struct BackwardSchedule {
  int head_splits = 0;
  int sections_per_block = 0;
};

inline constexpr int max_backward_d_head = 128;

namespace backward_kernels {

// The size checks shared by both parameter structs; `what` names the struct in messages.
template <class Params>
void check_backward_sizes(const Params& p, const char* what) {
  require(p.batch >= 1 && p.batch <= 65535, what, ".batch = ", p.batch, ", expected 1..65535");
  require(p.length >= 1 && p.length <= (1 << 28), what, ".length = ", p.length, ", expected 1..2^28");
  require(p.n_kv_heads >= 1 && p.n_kv_heads <= 65535, what, ".n_kv_heads = ", p.n_kv_heads, ", expected 1..65535");
  require(p.n_heads >= 1 && p.n_heads % p.n_kv_heads == 0, what, ".n_heads = ", p.n_heads,
          ", expected a positive multiple of n_kv_heads = ", p.n_kv_heads);
  require(p.d_head >= 1 && p.d_head <= max_backward_d_head, what, ".d_head = ", p.d_head, ", expected 1..",
          max_backward_d_head);
}

template <class Params>
void check_layout(const Strides& s, int heads, const Params& p, const char* what, const char* name) {
  const std::int64_t row = std::int64_t(heads) * p.d_head;
  require(s.token >= row, what, ".", name, ".token = ", s.token, ", expected >= heads·d_head = ", row,
          " (rows of one token must not overlap)");
  require(s.batch >= s.token * p.length, what, ".", name, ".batch = ", s.batch,
          ", expected >= length·token = ", s.token * p.length, " (sequences must not overlap)");
}

// What both structs share past the pointers: scale, and the layouts of q, k, v, dq, dk, dv.
template <class Params>
void check_common(const Params& p, const char* what) {
  check_backward_sizes(p, what);
  require(std::isfinite(p.scale) && p.scale > 0, what, ".scale = ", p.scale,
          ", expected a finite value > 0 (usually 1/sqrt(d_head))");
  check_layout(p.q_strides, p.n_heads, p, what, "q_strides");
  check_layout(p.k_strides, p.n_kv_heads, p, what, "k_strides");
  check_layout(p.v_strides, p.n_kv_heads, p, what, "v_strides");
  check_layout(p.dq_strides, p.n_heads, p, what, "dq_strides");
  check_layout(p.dk_strides, p.n_kv_heads, p, what, "dk_strides");
  check_layout(p.dv_strides, p.n_kv_heads, p, what, "dv_strides");
}

inline void check_mask(const Mask& m, const char* what) {
  require(m.window >= 1, what, ".window = ", m.window, ", expected >= 1");
  require(m.sinks >= 0, what, ".sinks = ", m.sinks, ", expected >= 0");
}

inline void check_backward_params(const BackwardParams& p) {
  require(p.q && p.k && p.v, "BackwardParams: q, k and v must not be null");
  require(p.o && p.lse, "BackwardParams: o and lse (the forward's outputs) must not be null");
  require(p.d_o, "BackwardParams: d_o must not be null");
  require(p.dq && p.dk && p.dv, "BackwardParams: dq, dk and dv must not be null");
  check_common(p, "BackwardParams");
  check_mask(p.mask, "BackwardParams.mask");
  check_layout(p.o_strides, p.n_heads, p, "BackwardParams", "o_strides");
  check_layout(p.d_o_strides, p.n_heads, p, "BackwardParams", "d_o_strides");
}

inline void check_mixture_params(const MixtureBackwardParams& p) {
  require(p.q && p.k && p.v, "MixtureBackwardParams: q, k and v must not be null");
  require(p.d, "MixtureBackwardParams: d must not be null");
  require(p.pi && p.d_pi, "MixtureBackwardParams: pi and d_pi must not be null");
  require(p.dq && p.dk && p.dv, "MixtureBackwardParams: dq, dk and dv must not be null");
  require(p.n_terms >= 1 && p.n_terms <= max_mixture_backward_terms, "MixtureBackwardParams.n_terms = ", p.n_terms,
          ", expected 1..", max_mixture_backward_terms);
  check_common(p, "MixtureBackwardParams");
  check_layout(p.d_strides, p.n_heads, p, "MixtureBackwardParams", "d_strides");
  static const char* const term_names[] = {"MixtureBackwardParams.terms[0]", "MixtureBackwardParams.terms[1]"};
  for (int t = 0; t < p.n_terms; ++t) {
    const MixtureBackwardTerm& term = p.terms[t];
    const char* what = term_names[t];
    require(term.o && term.lse, what, ": o and lse (the term's forward outputs) must not be null");
    require(term.pi_index >= 0, what, ".pi_index = ", term.pi_index, ", expected >= 0");
    check_mask(term.mask, what);
    check_layout(term.o_strides, p.n_heads, p, what, "o_strides");
  }
  if (p.n_terms == 2)
    require(p.terms[0].pi_index != p.terms[1].pi_index, "MixtureBackwardParams: terms[0] and terms[1] have pi_index ",
            p.terms[0].pi_index, ", expected different weights");
}

// The single-op backward as the one-term mixture the kernels run: π = 1 (pi null), no dL/dπ.
inline MixtureBackwardParams one_term(const BackwardParams& p) {
  MixtureBackwardParams m;
  m.q = p.q, m.k = p.k, m.v = p.v;
  m.q_strides = p.q_strides, m.k_strides = p.k_strides, m.v_strides = p.v_strides;
  m.batch = p.batch, m.length = p.length, m.n_heads = p.n_heads, m.n_kv_heads = p.n_kv_heads, m.d_head = p.d_head;
  m.scale = p.scale;
  m.terms[0] = {p.o, p.o_strides, p.lse, p.mask, 0};
  m.n_terms = 1;
  m.d = p.d_o, m.d_strides = p.d_o_strides;
  m.dq = p.dq, m.dk = p.dk, m.dv = p.dv;
  m.dq_strides = p.dq_strides, m.dk_strides = p.dk_strides, m.dv_strides = p.dv_strides;
  m.accumulate = p.accumulate;
  return m;
}

// Workspace, every part 256-byte aligned: D [B, H, T] per term, the dq accumulator
// [B, H, T, dq_row], then under GQA the dk and dv accumulators [B, Hkv, T, dq_row] each, then
// with d_pi the per-block partial sums of D [terms, preprocess blocks] in double.
inline int dq_row_of(const MixtureBackwardParams& p) { return (p.d_head + 7) / 8 * 8; }
inline std::size_t aligned_bytes(std::size_t bytes) { return (bytes + 255) / 256 * 256; }
inline std::size_t delta_bytes(const MixtureBackwardParams& p) {
  return aligned_bytes(sizeof(float) * std::size_t(p.batch) * std::size_t(p.n_heads) * std::size_t(p.length));
}
inline std::size_t accumulator_bytes(const MixtureBackwardParams& p, int heads) {
  return aligned_bytes(sizeof(float) * std::size_t(p.batch) * std::size_t(heads) * std::size_t(p.length) *
                       std::size_t(dq_row_of(p)));
}

// Pass 1's shape: a row's 16-byte chunks on as many lanes (rounded up to a power of two), or a
// warp per row element by element; rows_per_block rows per block of preprocess_threads.
struct PreprocessShape {
  bool vector_rows;
  int lanes_per_row;
  std::int64_t blocks;
};
inline PreprocessShape preprocess_shape(const MixtureBackwardParams& p, bool vector_rows) {
  int lanes_per_row = 32;
  if (vector_rows)
    for (lanes_per_row = 1; lanes_per_row * 8 < p.d_head;) lanes_per_row *= 2;
  const std::int64_t rows = std::int64_t(p.batch) * p.length * p.n_heads;
  const std::int64_t rows_per_block = (preprocess_threads / 32) * (32 / lanes_per_row);
  return {vector_rows, lanes_per_row, (rows + rows_per_block - 1) / rows_per_block};
}
// Room for the partials of either shape (the element-wise one has the most blocks).
inline std::size_t partials_bytes(const MixtureBackwardParams& p) {
  if (!p.d_pi) return 0;
  return aligned_bytes(sizeof(double) * std::size_t(p.n_terms) * std::size_t(preprocess_shape(p, false).blocks));
}

inline std::size_t workspace_bytes_of(const MixtureBackwardParams& p) {
  const std::size_t kv_accumulators = p.n_heads > p.n_kv_heads ? 2 * accumulator_bytes(p, p.n_kv_heads) : 0;
  return std::size_t(p.n_terms) * delta_bytes(p) + accumulator_bytes(p, p.n_heads) + kv_accumulators +
         partials_bytes(p);
}

inline int key_tiles_of(const MixtureBackwardParams& p) { return (p.length + 127) / 128; }

inline void check_schedule(const BackwardSchedule& s, const MixtureBackwardParams& p) {
  const int group = p.n_heads / p.n_kv_heads;
  require(s.head_splits >= 0 && (s.head_splits == 0 || group % s.head_splits == 0), "BackwardSchedule.head_splits = ",
          s.head_splits, ", expected 0 (automatic) or a divisor of n_heads / n_kv_heads = ", group);
  require(s.sections_per_block >= 0, "BackwardSchedule.sections_per_block = ", s.sections_per_block,
          ", expected 0 (automatic) or >= 1");
  const std::int64_t ctas =
      std::int64_t(p.batch) * p.n_kv_heads * key_tiles_of(p) * std::max(1, s.head_splits);
  require(ctas <= INT32_MAX, "attention backward: batch·n_kv_heads·ceil(length / 128)·head_splits = ", ctas,
          ", expected <= 2^31 - 1 (one CTA each)");
}

inline void check_workspace(const void* workspace, std::size_t workspace_bytes, std::size_t needed,
                            const char* size_function) {
  require(workspace != nullptr, "attention backward: workspace is null, expected ", needed, " bytes");
  require(workspace_bytes >= needed, "attention backward: workspace of ", workspace_bytes, " bytes, expected >= ",
          needed, " (", size_function, ")");
  require(reinterpret_cast<std::uintptr_t>(workspace) % 256 == 0, "attention backward: workspace ", workspace,
          " is not 256-byte aligned");
}

// The automatic schedule. Splits: the fewest that give at least three CTAs per SM, so that
// heavy-first ordering can even them out; a whole group per CTA when that suffices, as
// splitting costs K, V reloads, dk, dv atomics and their rounding pass. Blocks of about two
// waves of CTAs: enough to even out, while the CTAs running at once share the q, dO and dq
// rows of a few sections. (On an H200 at B4 H16 T4096 D128, causal and W = 2048, with Hkv 2
// and 16, this choice came within 3% of the best of a sweep over splits 1..8 and blocks of
// 1 section to all.)
inline BackwardSchedule choose_schedule(BackwardSchedule s, const MixtureBackwardParams& p, int sms) {
  const int group = p.n_heads / p.n_kv_heads;
  const std::int64_t whole_groups = std::int64_t(p.batch) * p.n_kv_heads * key_tiles_of(p);
  if (s.head_splits == 0) {
    s.head_splits = 1;
    while (s.head_splits < group && whole_groups * s.head_splits < 3 * std::int64_t(sms)) {
      int next = s.head_splits + 1;
      while (group % next != 0) ++next;
      s.head_splits = next;
    }
  }
  const int sections = p.batch * p.n_kv_heads * s.head_splits;
  if (s.sections_per_block == 0) s.sections_per_block = std::max(1, 2 * sms / key_tiles_of(p));
  s.sections_per_block = std::min(s.sections_per_block, sections);
  return s;
}

// Whether rows of a tensor can be read in 16-byte chunks.
inline bool rows_in_chunks(const void* data, const Strides& s, int d_head) {
  return d_head % 8 == 0 && reinterpret_cast<std::uintptr_t>(data) % 16 == 0 && s.token % 8 == 0 && s.batch % 8 == 0;
}

template <class... KernelArgs>
void launch_main(void (*kernel)(KernelArgs...), int smem_bytes, dim3 grid, int threads, cudaStream_t stream,
                 const KernelArgs&... args) {
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes),
        "attention backward: cudaFuncSetAttribute (shared memory)");
  kernel<<<grid, threads, smem_bytes, stream>>>(args...);
}

// The dq accumulator [B·H, T, dq_row] as a tensor map for the wgmma kernel's tensor bulk
// reductions: boxes of 64 rows × 32 floats, 128-byte swizzled in shared memory.
inline CUtensorMap dq_accumulator_map(const BackwardArgs& args) {
  const MixtureBackwardParams& p = args.p;
  const cuuint64_t row_bytes = cuuint64_t(args.dq_row) * sizeof(float);
  const cuuint64_t dims[3] = {cuuint64_t(args.dq_row), cuuint64_t(p.length), cuuint64_t(p.batch) * p.n_heads};
  const cuuint64_t strides[2] = {row_bytes, row_bytes * cuuint64_t(p.length)};
  const cuuint32_t box[3] = {32, 64, 1}, element_strides[3] = {1, 1, 1};
  CUtensorMap map;
  const CUresult result =
      tensor_map_encoder()(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 3, args.dq_acc, dims, strides, box, element_strides,
                           CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                           CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  require(result == CUDA_SUCCESS, "attention backward: cuTensorMapEncodeTiled failed with CUresult ", int(result));
  return map;
}

template <int Terms>
void launch_main_kernel(const BackwardArgs& args, bool use_wgmma, cudaStream_t stream) {
  const MixtureBackwardParams& p = args.p;
  const int d = p.d_head;
  if (use_wgmma) {
    const dim3 grid(unsigned(std::int64_t(args.key_tiles) * p.batch * p.n_kv_heads * args.head_splits));
    const CUtensorMap dq_map = dq_accumulator_map(args);
    if (d <= 64)
      launch_main(backward_wgmma_kernel<64, Terms>, WgmmaBackwardTiles<64, Terms>::smem_bytes, grid, 256, stream,
                  args, dq_map);
    else
      launch_main(backward_wgmma_kernel<128, Terms>, WgmmaBackwardTiles<128, Terms>::smem_bytes, grid, 256, stream,
                  args, dq_map);
  } else {
    const dim3 grid((p.length + 63) / 64, p.n_kv_heads, p.batch);
    if (d <= 32)
      launch_main(backward_mma_kernel<32, Terms>, MmaBackwardTiles<32, Terms>::smem_bytes, grid, 128, stream, args);
    else if (d <= 64)
      launch_main(backward_mma_kernel<64, Terms>, MmaBackwardTiles<64, Terms>::smem_bytes, grid, 128, stream, args);
    else
      launch_main(backward_mma_kernel<128, Terms>, MmaBackwardTiles<128, Terms>::smem_bytes, grid, 128, stream,
                  args);
  }
}

// The one dispatch point: number of terms, then (in launch_main_kernel) kernel kind and padded
// head dimension.
inline void dispatch_main_kernel(const BackwardArgs& args, bool use_wgmma, cudaStream_t stream) {
  if (args.terms == 1)
    launch_main_kernel<1>(args, use_wgmma, stream);
  else
    launch_main_kernel<2>(args, use_wgmma, stream);
}

template <bool VectorRows>
void launch_preprocess(const BackwardArgs& args, const PreprocessShape& shape, cudaStream_t stream) {
  const unsigned blocks = unsigned(shape.blocks);
  if (args.terms == 1)
    backward_preprocess_kernel<VectorRows, 1><<<blocks, preprocess_threads, 0, stream>>>(args, shape.lanes_per_row);
  else
    backward_preprocess_kernel<VectorRows, 2><<<blocks, preprocess_threads, 0, stream>>>(args, shape.lanes_per_row);
}

// The three passes on checked params and workspace (both launchers).
inline void run_backward(const MixtureBackwardParams& p, void* workspace, cudaStream_t stream, BackwardKernel kernel,
                         BackwardSchedule schedule) {
  BackwardArgs args;
  args.p = p;
  args.terms = p.n_terms;
  char* next = static_cast<char*>(workspace);
  for (int t = 0; t < p.n_terms; ++t) {
    args.delta[t] = reinterpret_cast<float*>(next);
    args.masks[t] = {int(std::min<std::int64_t>(p.terms[t].mask.window, p.length)),
                     int(std::min<std::int64_t>(p.terms[t].mask.sinks, p.length))};
    next += delta_bytes(p);
  }
  args.dq_acc = reinterpret_cast<float*>(next);
  next += accumulator_bytes(p, p.n_heads);
  const bool grouped = p.n_heads > p.n_kv_heads;
  float* const kv_accumulators = reinterpret_cast<float*>(next);
  if (grouped) next += 2 * accumulator_bytes(p, p.n_kv_heads);
  if (p.d_pi) args.delta_partials = reinterpret_cast<double*>(next);
  if (p.n_terms == 1 && p.pi) args.output_weight = p.pi + p.terms[0].pi_index;
  args.dq_row = dq_row_of(p);
  args.key_tiles = key_tiles_of(p);
  args.vector_qkv = rows_in_chunks(p.q, p.q_strides, p.d_head) && rows_in_chunks(p.k, p.k_strides, p.d_head) &&
                    rows_in_chunks(p.v, p.v_strides, p.d_head) && rows_in_chunks(p.d, p.d_strides, p.d_head);
  args.vector_kv_grads = rows_in_chunks(p.dk, p.dk_strides, p.d_head) && rows_in_chunks(p.dv, p.dv_strides, p.d_head);

  int device = 0, major = 0;
  check(cudaGetDevice(&device), "attention backward: cudaGetDevice");
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
        "attention backward: compute capability");
  const bool use_wgmma = kernel == BackwardKernel::wgmma || (kernel == BackwardKernel::automatic && major == 9);
  require(!use_wgmma || major == 9, "attention backward: the wgmma kernel needs compute capability 9.x, device ",
          device, " has ", major, ".x");
  if (use_wgmma) {
    int sms = 0;
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "attention backward: SM count");
    schedule = choose_schedule(schedule, p, sms);
    args.head_splits = schedule.head_splits;
    args.sections_per_block = schedule.sections_per_block;
    if (args.head_splits > 1) {
      args.dk_acc = kv_accumulators;
      args.dv_acc = args.dk_acc + accumulator_bytes(p, p.n_kv_heads) / sizeof(float);
    }
  }

  // Pass 1.
  bool vector_rows = rows_in_chunks(p.d, p.d_strides, p.d_head);
  for (int t = 0; t < p.n_terms; ++t)
    vector_rows = vector_rows && rows_in_chunks(p.terms[t].o, p.terms[t].o_strides, p.d_head);
  const PreprocessShape shape = preprocess_shape(p, vector_rows);
  if (vector_rows)
    launch_preprocess<true>(args, shape, stream);
  else
    launch_preprocess<false>(args, shape, stream);
  check(cudaGetLastError(), "attention backward: preprocess launch");
  if (p.d_pi) {
    mixture_weight_gradient_kernel<preprocess_threads>
        <<<unsigned(p.n_terms), preprocess_threads, 0, stream>>>(args, int(shape.blocks));
    check(cudaGetLastError(), "attention backward: mixture weight gradient launch");
  }
  dispatch_main_kernel(args, use_wgmma, stream);
  check(cudaGetLastError(), "attention backward: main kernel launch");
  // Pass 3: dq, and dk, dv when their sums were split over CTAs.
  FinishArgs finish;
  finish.batch = p.batch;
  finish.length = p.length;
  finish.d_head = p.d_head;
  finish.acc_row = args.dq_row;
  finish.jobs[0] = {args.dq_acc, p.dq, p.dq_strides, p.n_heads, p.scale, args.output_weight};
  finish.jobs[1] = {args.dk_acc, p.dk, p.dk_strides, p.n_kv_heads, p.scale, args.output_weight};
  finish.jobs[2] = {args.dv_acc, p.dv, p.dv_strides, p.n_kv_heads, 1.f, args.output_weight};
  const unsigned jobs = args.head_splits > 1 ? 3 : 1;
  const bool vector_out = rows_in_chunks(p.dq, p.dq_strides, p.d_head) &&
                          (jobs == 1 || (rows_in_chunks(p.dk, p.dk_strides, p.d_head) &&
                                         rows_in_chunks(p.dv, p.dv_strides, p.d_head)));
  const std::int64_t per_slice = std::int64_t(p.length) * p.d_head / (vector_out ? 8 : 1);
  const dim3 finish_grid(unsigned(std::min<std::int64_t>((per_slice + 255) / 256, 1024)),
                         unsigned(std::min(p.batch * p.n_heads, 65535)), jobs);
  if (p.accumulate) {
    if (vector_out)
      backward_finish_kernel<true, true><<<finish_grid, 256, 0, stream>>>(finish);
    else
      backward_finish_kernel<true, false><<<finish_grid, 256, 0, stream>>>(finish);
  } else {
    if (vector_out)
      backward_finish_kernel<false, true><<<finish_grid, 256, 0, stream>>>(finish);
    else
      backward_finish_kernel<false, false><<<finish_grid, 256, 0, stream>>>(finish);
  }
  check(cudaGetLastError(), "attention backward: finishing launch");
}

}  // namespace backward_kernels

// Bytes of scratch that backward() needs for these params (checks the sizes it depends on).
inline std::size_t backward_workspace_bytes(const BackwardParams& p) {
  using namespace backward_kernels;
  check_backward_sizes(p, "BackwardParams");
  return workspace_bytes_of(one_term(p));
}

// Writes (or, with p.accumulate, adds) dq, dk and dv on `stream`. `workspace` holds at least
// backward_workspace_bytes(p) bytes of device memory, 256-byte aligned, used only for the
// duration of the call (in stream order).
inline void backward(const BackwardParams& p, void* workspace, std::size_t workspace_bytes, cudaStream_t stream,
                     BackwardKernel kernel = BackwardKernel::automatic, BackwardSchedule schedule = {}) {
  using namespace backward_kernels;
  check_backward_params(p);
  const MixtureBackwardParams m = one_term(p);
  check_schedule(schedule, m);
  check_workspace(workspace, workspace_bytes, workspace_bytes_of(m), "backward_workspace_bytes");
  run_backward(m, workspace, stream, kernel, schedule);
}

// Bytes of scratch that mixture_backward() needs for these params (checks the sizes and the
// number of terms it depends on).
inline std::size_t mixture_backward_workspace_bytes(const MixtureBackwardParams& p) {
  using namespace backward_kernels;
  check_backward_sizes(p, "MixtureBackwardParams");
  require(p.n_terms >= 1 && p.n_terms <= max_mixture_backward_terms, "MixtureBackwardParams.n_terms = ", p.n_terms,
          ", expected 1..", max_mixture_backward_terms);
  return workspace_bytes_of(p);
}

// The mixture's backward on `stream`: writes (or, with p.accumulate, adds) dq, dk and dv, and
// overwrites d_pi[terms[t].pi_index] with dL/dπ_t for each term (other entries of d_pi are not
// touched). `workspace` as for backward(), of mixture_backward_workspace_bytes(p) bytes. The
// kernel choice and schedule are those of backward().
inline void mixture_backward(const MixtureBackwardParams& p, void* workspace, std::size_t workspace_bytes,
                             cudaStream_t stream, BackwardKernel kernel = BackwardKernel::automatic,
                             BackwardSchedule schedule = {}) {
  using namespace backward_kernels;
  check_mixture_params(p);
  check_schedule(schedule, p);
  check_workspace(workspace, workspace_bytes, workspace_bytes_of(p), "mixture_backward_workspace_bytes");
  run_backward(p, workspace, stream, kernel, schedule);
}

}  // namespace dash::cuda::attention

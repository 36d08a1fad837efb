// Backward of Softmax / SlidingWindow attention on CUDA: dq, dk, dv from q, k, v, the
// forward's o and lse, and the upstream gradient d_o (layouts and mask in params.cuh).
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
// Three passes (backward_common.cuh): D and a zeroed fp32 dq accumulator; the main kernel, one
// CTA per (batch, kv head, key tile) looping over its group's query heads with dk, dv in
// registers and dq added to the accumulator; dq scaled and rounded to bf16. The main kernel
// is the wgmma one on sm_90 (backward_wgmma.cuh; its dq reductions go through a tensor map of
// the accumulator, encoded per call with the driver's cuTensorMapEncodeTiled) and the
// mma.sync one elsewhere (backward_mma.cuh).
//
//   std::size_t bytes = backward_workspace_bytes(params);      // fp32 D and dq accumulator
//   backward(params, workspace, bytes, stream);
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

inline constexpr int max_backward_d_head = 128;

namespace backward_kernels {

inline void check_backward_sizes(const BackwardParams& p) {
  require(p.batch >= 1 && p.batch <= 65535, "BackwardParams.batch = ", p.batch, ", expected 1..65535");
  require(p.length >= 1 && p.length <= (1 << 28), "BackwardParams.length = ", p.length, ", expected 1..2^28");
  require(p.n_kv_heads >= 1 && p.n_kv_heads <= 65535, "BackwardParams.n_kv_heads = ", p.n_kv_heads,
          ", expected 1..65535");
  require(p.n_heads >= 1 && p.n_heads % p.n_kv_heads == 0, "BackwardParams.n_heads = ", p.n_heads,
          ", expected a positive multiple of n_kv_heads = ", p.n_kv_heads);
  require(p.d_head >= 1 && p.d_head <= max_backward_d_head, "BackwardParams.d_head = ", p.d_head, ", expected 1..",
          max_backward_d_head);
}

inline void check_layout(const Strides& s, int heads, const BackwardParams& p, const char* what) {
  const std::int64_t row = std::int64_t(heads) * p.d_head;
  require(s.token >= row, "BackwardParams.", what, ".token = ", s.token,
          ", expected >= heads·d_head = ", row, " (rows of one token must not overlap)");
  require(s.batch >= s.token * p.length, "BackwardParams.", what, ".batch = ", s.batch,
          ", expected >= length·token = ", s.token * p.length, " (sequences must not overlap)");
}

inline void check_backward_params(const BackwardParams& p) {
  require(p.q && p.k && p.v, "BackwardParams: q, k and v must not be null");
  require(p.o && p.lse, "BackwardParams: o and lse (the forward's outputs) must not be null");
  require(p.d_o, "BackwardParams: d_o must not be null");
  require(p.dq && p.dk && p.dv, "BackwardParams: dq, dk and dv must not be null");
  check_backward_sizes(p);
  require(std::isfinite(p.scale) && p.scale > 0, "BackwardParams.scale = ", p.scale,
          ", expected a finite value > 0 (usually 1/sqrt(d_head))");
  require(p.mask.window >= 1, "BackwardParams.mask.window = ", p.mask.window, ", expected >= 1");
  require(p.mask.sinks >= 0, "BackwardParams.mask.sinks = ", p.mask.sinks, ", expected >= 0");
  check_layout(p.q_strides, p.n_heads, p, "q_strides");
  check_layout(p.k_strides, p.n_kv_heads, p, "k_strides");
  check_layout(p.v_strides, p.n_kv_heads, p, "v_strides");
  check_layout(p.o_strides, p.n_heads, p, "o_strides");
  check_layout(p.d_o_strides, p.n_heads, p, "d_o_strides");
  check_layout(p.dq_strides, p.n_heads, p, "dq_strides");
  check_layout(p.dk_strides, p.n_kv_heads, p, "dk_strides");
  check_layout(p.dv_strides, p.n_kv_heads, p, "dv_strides");
}

// Workspace: D [B, H, T] then the dq accumulator [B, H, T, dq_row], each 256-byte aligned.
inline int dq_row_of(const BackwardParams& p) { return (p.d_head + 7) / 8 * 8; }
inline std::size_t aligned_bytes(std::size_t bytes) { return (bytes + 255) / 256 * 256; }
inline std::size_t delta_bytes(const BackwardParams& p) {
  return aligned_bytes(sizeof(float) * std::size_t(p.batch) * std::size_t(p.n_heads) * std::size_t(p.length));
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
  const BackwardParams& p = args.p;
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

// The one dispatch point: kernel kind and padded head dimension.
inline void launch_main_kernel(const BackwardArgs& args, bool use_wgmma, cudaStream_t stream) {
  const BackwardParams& p = args.p;
  const int d = p.d_head;
  if (use_wgmma) {
    const dim3 grid((p.length + 127) / 128, p.n_kv_heads, p.batch);
    const CUtensorMap dq_map = dq_accumulator_map(args);
    if (d <= 64)
      launch_main(backward_wgmma_kernel<64>, WgmmaBackwardTiles<64>::smem_bytes, grid, 256, stream, args, dq_map);
    else
      launch_main(backward_wgmma_kernel<128>, WgmmaBackwardTiles<128>::smem_bytes, grid, 256, stream, args, dq_map);
  } else {
    const dim3 grid((p.length + 63) / 64, p.n_kv_heads, p.batch);
    if (d <= 32)
      launch_main(backward_mma_kernel<32>, MmaBackwardTiles<32>::smem_bytes, grid, 128, stream, args);
    else if (d <= 64)
      launch_main(backward_mma_kernel<64>, MmaBackwardTiles<64>::smem_bytes, grid, 128, stream, args);
    else
      launch_main(backward_mma_kernel<128>, MmaBackwardTiles<128>::smem_bytes, grid, 128, stream, args);
  }
}

}  // namespace backward_kernels

// Bytes of scratch that backward() needs for these params (checks the sizes it depends on).
inline std::size_t backward_workspace_bytes(const BackwardParams& p) {
  backward_kernels::check_backward_sizes(p);
  const std::size_t rows = std::size_t(p.batch) * std::size_t(p.n_heads) * std::size_t(p.length);
  return backward_kernels::delta_bytes(p) +
         backward_kernels::aligned_bytes(sizeof(float) * rows * std::size_t(backward_kernels::dq_row_of(p)));
}

// Writes (or, with p.accumulate, adds) dq, dk and dv on `stream`. `workspace` holds at least
// backward_workspace_bytes(p) bytes of device memory, 256-byte aligned, used only for the
// duration of the call (in stream order).
inline void backward(const BackwardParams& p, void* workspace, std::size_t workspace_bytes, cudaStream_t stream,
                     BackwardKernel kernel = BackwardKernel::automatic) {
  using namespace backward_kernels;
  check_backward_params(p);
  const std::size_t needed = backward_workspace_bytes(p);
  require(workspace != nullptr, "attention backward: workspace is null, expected ", needed, " bytes");
  require(workspace_bytes >= needed, "attention backward: workspace of ", workspace_bytes, " bytes, expected >= ",
          needed, " (backward_workspace_bytes)");
  require(reinterpret_cast<std::uintptr_t>(workspace) % 256 == 0, "attention backward: workspace ", workspace,
          " is not 256-byte aligned");

  BackwardArgs args;
  args.p = p;
  args.delta = static_cast<float*>(workspace);
  args.dq_acc = reinterpret_cast<float*>(static_cast<char*>(workspace) + delta_bytes(p));
  args.dq_row = dq_row_of(p);
  args.window = int(std::min<std::int64_t>(p.mask.window, p.length));
  args.sinks = int(std::min<std::int64_t>(p.mask.sinks, p.length));
  args.vector_qkv = rows_in_chunks(p.q, p.q_strides, p.d_head) && rows_in_chunks(p.k, p.k_strides, p.d_head) &&
                    rows_in_chunks(p.v, p.v_strides, p.d_head) && rows_in_chunks(p.d_o, p.d_o_strides, p.d_head);
  args.vector_kv_grads = rows_in_chunks(p.dk, p.dk_strides, p.d_head) && rows_in_chunks(p.dv, p.dv_strides, p.d_head);

  int device = 0, major = 0;
  check(cudaGetDevice(&device), "attention backward: cudaGetDevice");
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
        "attention backward: compute capability");
  const bool use_wgmma = kernel == BackwardKernel::wgmma || (kernel == BackwardKernel::automatic && major == 9);
  require(!use_wgmma || major == 9, "attention backward: the wgmma kernel needs compute capability 9.x, device ",
          device, " has ", major, ".x");

  // Pass 1: a row's 16-byte chunks on as many lanes (rounded up to a power of two), or a warp
  // per row element by element.
  const std::int64_t rows = std::int64_t(p.batch) * p.length * p.n_heads;
  const bool vector_rows = rows_in_chunks(p.o, p.o_strides, p.d_head) && rows_in_chunks(p.d_o, p.d_o_strides, p.d_head);
  int lanes_per_row = 32;
  if (vector_rows)
    for (lanes_per_row = 1; lanes_per_row * 8 < p.d_head;) lanes_per_row *= 2;
  const std::int64_t rows_per_block = 8 * (32 / lanes_per_row);
  const unsigned preprocess_blocks = unsigned((rows + rows_per_block - 1) / rows_per_block);
  if (vector_rows)
    backward_preprocess_kernel<true><<<preprocess_blocks, 256, 0, stream>>>(args, lanes_per_row);
  else
    backward_preprocess_kernel<false><<<preprocess_blocks, 256, 0, stream>>>(args, lanes_per_row);
  check(cudaGetLastError(), "attention backward: preprocess launch");
  launch_main_kernel(args, use_wgmma, stream);
  check(cudaGetLastError(), "attention backward: main kernel launch");
  const bool vector_dq = rows_in_chunks(p.dq, p.dq_strides, p.d_head);
  const std::int64_t per_slice = std::int64_t(p.length) * p.d_head / (vector_dq ? 8 : 1);
  const dim3 finish_grid(unsigned(std::min<std::int64_t>((per_slice + 255) / 256, 1024)),
                         unsigned(std::min(p.batch * p.n_heads, 65535)));
  if (p.accumulate) {
    if (vector_dq)
      backward_finish_dq_kernel<true, true><<<finish_grid, 256, 0, stream>>>(args);
    else
      backward_finish_dq_kernel<true, false><<<finish_grid, 256, 0, stream>>>(args);
  } else {
    if (vector_dq)
      backward_finish_dq_kernel<false, true><<<finish_grid, 256, 0, stream>>>(args);
    else
      backward_finish_dq_kernel<false, false><<<finish_grid, 256, 0, stream>>>(args);
  }
  check(cudaGetLastError(), "attention backward: dq finishing launch");
}

}  // namespace dash::cuda::attention

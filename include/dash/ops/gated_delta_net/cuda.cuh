// CUDA kernels of GatedDeltaNet's mixing core (the gated delta rule, gated_delta_net.hpp and
// gated_delta_net/eigen.hpp): the projections and gate linears are GEMMs elsewhere; these take
// raw q [B,T,H,D], k and v [B,T,Hs,D] (bf16), the log decay g and β [B,T,Hs] (fp32), and
//   q̂ = q / sqrt(‖q‖² + ε),  k̂ = k / sqrt(‖k‖² + ε)   (per head, fused into the kernels)
//   S_t = a_t (I − β_t k̂_t k̂_tᵀ) S_{t−1} + β_t k̂_t v_tᵀ,   o_t = scale · S_tᵀ q̂_t,   a_t = exp(g_t)
// with query head h reading state head h / (H / Hs).
//
//   forward   chunked (WY / UT) form, chunks of 64 tokens, tensor-core products (bf16 operands,
//             fp32 accumulation), the state carried in fp32 (forward.cuh); optional initial
//             and final state fp32 [B, Hs, D, D]. Its output pass overlaps the sequential pass
//             (a programmatic dependent launch that waits chunk by chunk).
//   backward  dq, dk, dv (bf16; dk, dv per state head with the group's contributions summed),
//             dg, dβ (fp32); optional d_final_state in and d_initial_state out (backward.cuh).
//             It needs the forward's workspace (k̂, w, u, W, the chunk-start states, T = (I + A)⁻¹
//             per chunk, …): either it recomputes it (backward with one workspace), or it reads
//             it from a forward run with keep_for_backward (backward with the kept workspace
//             and a separate scratch), which saves two of its five passes. The results are the
//             same bit for bit: both run the same kernels on the same inputs.
//   decode    the recurrent form, T ≥ 1 tokens advancing a fp32 state in place (decode.cuh).
//
// Any D in 1…128 (padded to 32, 64 or 128 inside with zeros). Launchers check every argument
// before any CUDA call and throw dash::Error; forward and backward take workspaces (16-byte
// aligned) of the sizes below, never allocate, never synchronise:
//   forward                     forward_workspace_bytes, or kept_workspace_bytes with keep_for_backward
//   backward (recomputing)      backward_workspace_bytes = kept_workspace_bytes + backward_scratch_bytes
//   backward (kept workspace)   the forward's kept workspace (read only) + backward_scratch_bytes
// A kept workspace belongs to one forward call: the backward that reads it must be given the
// same k, v, g, β, initial_state and eps (q, o and scale do not enter it); it may serve any
// number of backward calls.
//
// Layouts: the bf16 tensors [B, T, heads, D] (q, k, v, o, d_o, dq, dk, dv) may have rows apart:
// strides {batch, token, D, 1} with token ≥ heads·D and batch ≥ T·token, so that q, k and v can
// be column blocks of one fused projection output [B·T, ld] (strides {T·ld, ld, D, 1}) and dq,
// dk, dv of one fused gradient buffer. Rows move 16 bytes at a time when D and every such stride
// are multiples of 8 and every such pointer is 16-byte aligned, one element at a time otherwise.
// g, β, dg, dβ and the states are contiguous.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>

#include "dash/core/cuda.hpp"
#include "dash/core/error.hpp"
#include "dash/core/tensor.hpp"
#include "dash/ops/gated_delta_net/cuda/backward.cuh"
#include "dash/ops/gated_delta_net/cuda/decode.cuh"
#include "dash/ops/gated_delta_net/cuda/forward.cuh"
#include "dash/ops/gated_delta_net/cuda/params.cuh"

namespace dash::cuda::gdn {

inline constexpr int chunk = detail::chunk;
inline constexpr int max_head_dim = 128;

struct Forward {
  TensorView<const bfloat16> q;           // [B, T, H, D]   (rows may be apart, see above)
  TensorView<const bfloat16> k, v;        // [B, T, Hs, D]  (rows may be apart)
  TensorView<const float> g, beta;        // [B, T, Hs]
  TensorView<bfloat16> o;                 // [B, T, H, D]   (rows may be apart)
  TensorView<const float> initial_state;  // [B, Hs, D, D] or empty (zero)
  TensorView<float> final_state;          // [B, Hs, D, D] or empty
  float scale = 1.f, eps = 1e-6f;
  bool keep_for_backward = false;  // leave the backward's inputs in the workspace (kept_workspace_bytes)
};

struct Backward {
  TensorView<const bfloat16> q, k, v;     // as Forward
  TensorView<const float> g, beta;
  TensorView<const float> initial_state;  // or empty
  TensorView<const bfloat16> d_o;         // [B, T, H, D]   (rows may be apart)
  TensorView<const float> d_final_state;  // [B, Hs, D, D] or empty (zero)
  TensorView<bfloat16> dq;                // [B, T, H, D]   (w.r.t. raw q; rows may be apart)
  TensorView<bfloat16> dk, dv;            // [B, T, Hs, D]  (w.r.t. raw k; rows may be apart)
  TensorView<float> dg, dbeta;            // [B, T, Hs]
  TensorView<float> d_initial_state;      // [B, Hs, D, D] or empty
  float scale = 1.f, eps = 1e-6f;
};

struct Decode {
  TensorView<const bfloat16> q;     // [B, T, H, D]   (rows may be apart)
  TensorView<const bfloat16> k, v;  // [B, T, Hs, D]  (rows may be apart)
  TensorView<const float> g, beta;  // [B, T, Hs]
  TensorView<float> state;          // [B, Hs, D, D], advanced in place
  TensorView<bfloat16> o;           // [B, T, H, D]   (rows may be apart)
  float scale = 1.f, eps = 1e-6f;
};

// The sizes of a call: batch, tokens, query heads, state heads, head dimension.
struct Dims {
  index_t B = 0, T = 0, H = 0, Hs = 0, D = 0;
};

namespace detail {

inline int padded_head_dim(index_t D) { return D <= 32 ? 32 : D <= 64 ? 64 : 128; }

inline void check_dims(const Dims& d, const char* where) {
  require(d.B >= 1 && d.T >= 1 && d.H >= 1 && d.Hs >= 1, where, ": B = ", d.B, ", T = ", d.T, ", H = ", d.H,
          ", Hs = ", d.Hs, ", expected all >= 1");
  require(d.H % d.Hs == 0, where, ": ", d.Hs, " state heads must divide the ", d.H, " query heads");
  require(d.D >= 1 && d.D <= max_head_dim, where, ": head dimension D = ", d.D, ", expected 1 <= D <= ",
          max_head_dim);
  require(d.B <= 65535 && d.H <= 65535, where, ": B = ", d.B, " and H = ", d.H, " must be at most 65535");
  require(d.T <= (index_t(1) << 30), where, ": T = ", d.T, ", expected at most 2^30");
  const index_t output_blocks = d.B * d.H * ((d.T + chunk - 1) / chunk);
  require(output_blocks <= index_t(0x7fffffff), where, ": B · H · ceil(T / ", chunk, ") = ", output_blocks,
          ", expected at most 2^31 - 1");
}

// Byte offsets of the workspace buffers (params.cuh), each 256-byte aligned. The kept part
// (g_cum … published, which a forward needs, then t_inv, which only the backward reads) comes
// first; the backward's scratch (dw_local … d_states) is addressed from its own base, which a
// recomputing backward places right after the kept part of its one buffer.
struct WorkspaceLayout {
  std::size_t g_cum = 0, k_inv = 0, k_hat = 0, w = 0, u = 0, v_new = 0, states = 0, published = 0, t_inv = 0;
  std::size_t dw_local = 0, dw = 0, y_local = 0, d_states = 0, d_published = 0;  // from the scratch base
  std::size_t forward_bytes = 0, kept_bytes = 0, scratch_bytes = 0;

  explicit WorkspaceLayout(const Dims& d) {
    const std::size_t Dp = std::size_t(padded_head_dim(d.D)), heads = std::size_t(d.B * d.Hs);
    const std::size_t n_chunks = std::size_t((d.T + chunk - 1) / chunk), Tp = n_chunks * chunk;
    std::size_t at = 0;
    const auto take = [&](std::size_t bytes) {
      const std::size_t here = at;
      at += (bytes + 255) / 256 * 256;
      return here;
    };
    const std::size_t rows = heads * Tp, tile = rows * Dp * sizeof(bfloat16);
    const std::size_t square = heads * n_chunks * Dp * Dp * sizeof(bfloat16);
    g_cum = take(rows * sizeof(float));
    k_inv = take(rows * sizeof(float));
    k_hat = take(tile), w = take(tile), u = take(tile), v_new = take(tile);
    states = take(square);
    published = take(heads * n_chunks * sizeof(unsigned));
    forward_bytes = at;
    t_inv = take(heads * n_chunks * 2 * chunk * chunk * sizeof(bfloat16));
    kept_bytes = at;
    at = 0;
    dw_local = take(tile), dw = take(tile);
    y_local = take(square), d_states = take(square);
    d_published = take(heads * n_chunks * sizeof(unsigned));
    scratch_bytes = at;
  }
  std::size_t backward_bytes() const { return kept_bytes + scratch_bytes; }
};

template <class T>
void check_device_data(TensorView<T> x, const Shape& expected, const std::string& what) {
  require(x.device == Device::cuda, what, ": on ", name_of(x.device), ", expected cuda");
  require(x.data != nullptr, what, ": null data");
  require_shape(x, expected, what);
}
template <class T>
void check_device_tensor(TensorView<T> x, const Shape& expected, const std::string& what) {
  check_device_data(x, expected, what);
  require(x.contiguous(), what, ": must be contiguous");
}
// A raw [B, T, heads, D] tensor: strides {batch, token, D, 1}, token >= heads·D, batch >= T·token
// (compared as batch / T >= token, which cannot overflow).
template <class T>
void check_raw_tensor(TensorView<T> x, const Dims& d, index_t heads, const std::string& what) {
  check_device_data(x, Shape{d.B, d.T, heads, d.D}, what);
  const auto& st = x.stride;
  require(st[3] == 1 && st[2] == d.D && st[1] >= heads * d.D && st[0] / d.T >= st[1], what, ": strides {", st[0],
          ", ", st[1], ", ", st[2], ", ", st[3], "}, expected {batch, token, D, 1} with token >= heads * D = ",
          heads * d.D, ", batch >= T * token and D = ", d.D);
}
template <class T>
RowStrides row_strides(TensorView<T> x) {
  return {x.stride[0], x.stride[1]};
}
// Whether a raw tensor's rows can move 16 bytes at a time.
template <class T>
bool rows_vectorizable(TensorView<T> x) {
  return x.stride[0] % 8 == 0 && x.stride[1] % 8 == 0 && x.stride[2] % 8 == 0 &&
         reinterpret_cast<std::uintptr_t>(x.data) % 16 == 0;
}
template <class T>
void check_optional_state(TensorView<T> x, const Dims& d, const std::string& what) {
  if (x.data == nullptr) return;  // not given
  check_device_tensor(x, Shape{d.B, d.Hs, d.D, d.D}, what);
}

// Sizes from q and k; checks the inputs shared by all calls.
inline Dims check_inputs(TensorView<const bfloat16> q, TensorView<const bfloat16> k, TensorView<const bfloat16> v,
                         TensorView<const float> g, TensorView<const float> beta, float scale, float eps,
                         const std::string& where) {
  require(q.rank() == 4, where, ": q has shape ", q.shape, ", expected [B, T, H, D]");
  require(k.rank() == 4, where, ": k has shape ", k.shape, ", expected [B, T, Hs, D]");
  const Dims d{q.dim(0), q.dim(1), q.dim(2), k.dim(2), q.dim(3)};
  check_dims(d, where.c_str());
  check_raw_tensor(q, d, d.H, where + ": q");
  check_raw_tensor(k, d, d.Hs, where + ": k");
  check_raw_tensor(v, d, d.Hs, where + ": v");
  check_device_tensor(g, Shape{d.B, d.T, d.Hs}, where + ": g");
  check_device_tensor(beta, Shape{d.B, d.T, d.Hs}, where + ": beta");
  require(std::isfinite(scale), where, ": scale = ", scale, ", expected a finite value");
  require(std::isfinite(eps) && eps > 0, where, ": eps = ", eps, ", expected a finite value > 0");
  return d;
}

inline void check_workspace(void* workspace, std::size_t bytes, std::size_t needed, const char* where) {
  require(bytes >= needed, where, ": workspace of ", bytes, " bytes, expected at least ", needed,
          " (workspace_bytes)");
  require(workspace != nullptr, where, ": workspace is null");
  require(reinterpret_cast<std::uintptr_t>(workspace) % 16 == 0, where, ": workspace must be 16-byte aligned");
}

inline Params make_params(const Dims& d, float scale, float eps) {
  Params p;
  p.B = int(d.B), p.T = int(d.T), p.H = int(d.H), p.Hs = int(d.Hs), p.D = int(d.D);
  p.n_chunks = int((d.T + chunk - 1) / chunk);
  p.group = int(d.H / d.Hs);
  p.padded_T = std::int64_t(p.n_chunks) * chunk;
  p.scale = scale, p.eps = eps;
  return p;
}

// Points the workspace buffers of p into `kept` (the forward's part; t_inv only `with_t`) and,
// when given, `scratch` (the backward's part).
inline void carve(Params& p, const WorkspaceLayout& layout, void* kept, bool with_t, void* scratch) {
  char* base = static_cast<char*>(kept);
  p.g_cum = reinterpret_cast<float*>(base + layout.g_cum);
  p.k_inv = reinterpret_cast<float*>(base + layout.k_inv);
  p.k_hat = reinterpret_cast<bfloat16*>(base + layout.k_hat);
  p.w = reinterpret_cast<bfloat16*>(base + layout.w);
  p.u = reinterpret_cast<bfloat16*>(base + layout.u);
  p.v_new = reinterpret_cast<bfloat16*>(base + layout.v_new);
  p.states = reinterpret_cast<bfloat16*>(base + layout.states);
  p.published = reinterpret_cast<unsigned*>(base + layout.published);
  if (with_t) p.t_inv = reinterpret_cast<bfloat16*>(base + layout.t_inv);
  if (scratch) {
    char* own = static_cast<char*>(scratch);
    p.dw_local = reinterpret_cast<bfloat16*>(own + layout.dw_local);
    p.y_local = reinterpret_cast<bfloat16*>(own + layout.y_local);
    p.dw = reinterpret_cast<bfloat16*>(own + layout.dw);
    p.d_states = reinterpret_cast<bfloat16*>(own + layout.d_states);
    p.d_published = reinterpret_cast<unsigned*>(own + layout.d_published);
  }
}

template <class Kernel>
void launch(Kernel kernel, dim3 grid, int threads, std::size_t shared_bytes, cudaStream_t stream, const Params& p,
            const char* what) {
  if (shared_bytes > 48 * 1024)
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_bytes)), what);
  kernel<<<grid, threads, shared_bytes, stream>>>(p);
  check(cudaGetLastError(), what);
}

// A launch that may start while the previous kernel on the stream still runs (programmatic
// dependent launch): the kernel waits for what it needs itself (chunk_outputs on `published`,
// chunk_gradients on `d_published`).
template <class Kernel>
void launch_overlapping(Kernel kernel, dim3 grid, int threads, std::size_t shared_bytes, cudaStream_t stream,
                        const Params& p, const char* what) {
  if (shared_bytes > 48 * 1024)
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_bytes)), what);
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3(unsigned(threads));
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute overlap{};
  overlap.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  overlap.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &overlap;
  config.numAttrs = 1;
  check(cudaLaunchKernelEx(&config, kernel, p), what);
}

// The forward passes; prepare_chunks also writes T when p.t_inv is set; chunk_outputs only with
// `outputs`, overlapping chunk_states: its blocks, chunk by chunk (the chunk is the slowest
// index of its grid), start on a chunk as soon as chunk_states has published it.
template <int Dp>
void run_forward(const Params& p, bool outputs, cudaStream_t stream) {
  const dim3 chunks(unsigned(p.n_chunks), unsigned(p.Hs), unsigned(p.B));
  launch(prepare_chunks<Dp>, chunks, 256, sizeof(PrepareShared<Dp>), stream, p, "gdn prepare_chunks launch");
  using Seq = SequentialShape<Dp>;
  launch(chunk_states<Dp>, dim3(unsigned(Dp / Seq::bv), unsigned(p.Hs), unsigned(p.B)), Seq::threads,
         sizeof(StatesShared<Dp>), stream, p, "gdn chunk_states launch");
  if (outputs)
    launch_overlapping(chunk_outputs<Dp>, dim3(unsigned(p.n_chunks * p.B * p.H)), 256, sizeof(OutputShared<Dp>),
                       stream, p, "gdn chunk_outputs launch");
}

// The backward passes, after the forward's workspace is recomputed (`recompute`) or as kept;
// chunk_gradients overlaps chunk_state_gradients as chunk_outputs overlaps chunk_states.
template <int Dp>
void run_backward(const Params& p, bool recompute, cudaStream_t stream) {
  if (recompute) run_forward<Dp>(p, false, stream);
  const dim3 chunks(unsigned(p.n_chunks), unsigned(p.Hs), unsigned(p.B));
  using Par = ParallelShape<Dp>;
  launch(chunk_local_gradients<Dp>, chunks, Par::threads, sizeof(LocalGradShared<Dp>), stream, p,
         "gdn chunk_local_gradients launch");
  using Seq = SequentialShape<Dp>;
  launch(chunk_state_gradients<Dp>, dim3(unsigned(Dp / Seq::bv), unsigned(p.Hs), unsigned(p.B)), Seq::threads,
         sizeof(StateGradShared<Dp>), stream, p, "gdn chunk_state_gradients launch");
  launch_overlapping(chunk_gradients<Dp>, dim3(unsigned(p.n_chunks * p.B * p.Hs)), Par::threads,
                     sizeof(GradShared<Dp>), stream, p, "gdn chunk_gradients launch");
}

// The one dispatch point from the runtime head dimension to the compiled widths.
template <class F>
void with_padded_head_dim(index_t D, F&& f) {
  switch (padded_head_dim(D)) {
    case 32: return f.template operator()<32>();
    case 64: return f.template operator()<64>();
    default: return f.template operator()<128>();
  }
}

// The checks and parameters of a backward call, without the workspace.
inline Params backward_params(const Backward& a, const std::string& where, Dims& d) {
  d = check_inputs(a.q, a.k, a.v, a.g, a.beta, a.scale, a.eps, where);
  check_optional_state(a.initial_state, d, where + ": initial_state");
  check_raw_tensor(a.d_o, d, d.H, where + ": d_o");
  check_optional_state(a.d_final_state, d, where + ": d_final_state");
  check_raw_tensor(a.dq, d, d.H, where + ": dq");
  check_raw_tensor(a.dk, d, d.Hs, where + ": dk");
  check_raw_tensor(a.dv, d, d.Hs, where + ": dv");
  check_device_tensor(a.dg, Shape{d.B, d.T, d.Hs}, where + ": dg");
  check_device_tensor(a.dbeta, Shape{d.B, d.T, d.Hs}, where + ": dbeta");
  check_optional_state(a.d_initial_state, d, where + ": d_initial_state");

  Params p = make_params(d, a.scale, a.eps);
  p.q = a.q.data, p.k = a.k.data, p.v = a.v.data, p.g = a.g.data, p.beta = a.beta.data;
  p.initial_state = a.initial_state.data, p.d_o = a.d_o.data, p.d_final_state = a.d_final_state.data;
  p.dq = a.dq.data, p.dk = a.dk.data, p.dv = a.dv.data, p.dg = a.dg.data, p.dbeta = a.dbeta.data;
  p.d_initial_state = a.d_initial_state.data;
  p.q_rows = row_strides(a.q), p.k_rows = row_strides(a.k), p.v_rows = row_strides(a.v);
  p.d_o_rows = row_strides(a.d_o), p.dq_rows = row_strides(a.dq);
  p.dk_rows = row_strides(a.dk), p.dv_rows = row_strides(a.dv);
  p.vector = rows_vectorizable(a.q) && rows_vectorizable(a.k) && rows_vectorizable(a.v) &&
             rows_vectorizable(a.d_o) && rows_vectorizable(a.dq) && rows_vectorizable(a.dk) &&
             rows_vectorizable(a.dv);
  return p;
}

}  // namespace detail

// Workspace of a forward call without keep_for_backward.
inline std::size_t forward_workspace_bytes(const Dims& d) {
  detail::check_dims(d, "gdn::forward_workspace_bytes");
  return detail::WorkspaceLayout(d).forward_bytes;
}
// Workspace of a forward call with keep_for_backward: everything the backward reads of it.
inline std::size_t kept_workspace_bytes(const Dims& d) {
  detail::check_dims(d, "gdn::kept_workspace_bytes");
  return detail::WorkspaceLayout(d).kept_bytes;
}
// Scratch of a backward call that reads a kept workspace.
inline std::size_t backward_scratch_bytes(const Dims& d) {
  detail::check_dims(d, "gdn::backward_scratch_bytes");
  return detail::WorkspaceLayout(d).scratch_bytes;
}
// Workspace of a backward call that recomputes the forward's part.
inline std::size_t backward_workspace_bytes(const Dims& d) {
  detail::check_dims(d, "gdn::backward_workspace_bytes");
  return detail::WorkspaceLayout(d).backward_bytes();
}
inline std::size_t workspace_bytes(const Forward& a) {
  const Dims d = detail::check_inputs(a.q, a.k, a.v, a.g, a.beta, a.scale, a.eps, "gdn::workspace_bytes(Forward)");
  return a.keep_for_backward ? kept_workspace_bytes(d) : forward_workspace_bytes(d);
}
inline std::size_t workspace_bytes(const Backward& a) {
  return backward_workspace_bytes(
      detail::check_inputs(a.q, a.k, a.v, a.g, a.beta, a.scale, a.eps, "gdn::workspace_bytes(Backward)"));
}

inline void forward(const Forward& a, void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  const std::string where = "gdn::forward";
  const Dims d = detail::check_inputs(a.q, a.k, a.v, a.g, a.beta, a.scale, a.eps, where);
  detail::check_raw_tensor(a.o, d, d.H, where + ": o");
  detail::check_optional_state(a.initial_state, d, where + ": initial_state");
  detail::check_optional_state(a.final_state, d, where + ": final_state");
  const detail::WorkspaceLayout layout(d);
  detail::check_workspace(workspace, workspace_bytes, a.keep_for_backward ? layout.kept_bytes : layout.forward_bytes,
                          a.keep_for_backward ? "gdn::forward (keep_for_backward)" : where.c_str());

  detail::Params p = detail::make_params(d, a.scale, a.eps);
  p.q = a.q.data, p.k = a.k.data, p.v = a.v.data, p.g = a.g.data, p.beta = a.beta.data, p.o = a.o.data;
  p.initial_state = a.initial_state.data, p.final_state = a.final_state.data;
  p.q_rows = detail::row_strides(a.q), p.k_rows = detail::row_strides(a.k), p.v_rows = detail::row_strides(a.v);
  p.o_rows = detail::row_strides(a.o);
  p.vector = detail::rows_vectorizable(a.q) && detail::rows_vectorizable(a.k) && detail::rows_vectorizable(a.v) &&
             detail::rows_vectorizable(a.o);
  detail::carve(p, layout, workspace, a.keep_for_backward, nullptr);
  detail::with_padded_head_dim(d.D, [&]<int Dp>() { detail::run_forward<Dp>(p, true, stream); });
}

// The backward, recomputing the forward's workspace in its own (backward_workspace_bytes).
inline void backward(const Backward& a, void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  const std::string where = "gdn::backward";
  Dims d;
  detail::Params p = detail::backward_params(a, where, d);
  const detail::WorkspaceLayout layout(d);
  detail::check_workspace(workspace, workspace_bytes, layout.backward_bytes(), where.c_str());
  detail::carve(p, layout, workspace, true, static_cast<char*>(workspace) + layout.kept_bytes);
  detail::with_padded_head_dim(d.D, [&]<int Dp>() { detail::run_backward<Dp>(p, true, stream); });
}

// The backward from the workspace of a forward run with keep_for_backward on the same k, v, g,
// β, initial_state and eps (read only here), with its own scratch (backward_scratch_bytes).
inline void backward(const Backward& a, const void* kept, std::size_t kept_bytes, void* scratch,
                     std::size_t scratch_bytes, cudaStream_t stream) {
  const std::string where = "gdn::backward (kept workspace)";
  Dims d;
  detail::Params p = detail::backward_params(a, where, d);
  const detail::WorkspaceLayout layout(d);
  detail::check_workspace(const_cast<void*>(kept), kept_bytes, layout.kept_bytes, (where + ": kept").c_str());
  detail::check_workspace(scratch, scratch_bytes, layout.scratch_bytes, (where + ": scratch").c_str());
  // The kept buffers are only read by the backward passes; Params holds them writable for the forward's.
  detail::carve(p, layout, const_cast<void*>(kept), true, scratch);
  detail::with_padded_head_dim(d.D, [&]<int Dp>() { detail::run_backward<Dp>(p, false, stream); });
}

inline void decode(const Decode& a, cudaStream_t stream) {
  const std::string where = "gdn::decode";
  const Dims d = detail::check_inputs(a.q, a.k, a.v, a.g, a.beta, a.scale, a.eps, where);
  detail::check_device_tensor(a.state, Shape{d.B, d.Hs, d.D, d.D}, where + ": state");
  detail::check_raw_tensor(a.o, d, d.H, where + ": o");
  require(d.Hs <= 65535, where, ": Hs = ", d.Hs, " must be at most 65535");

  detail::Params p = detail::make_params(d, a.scale, a.eps);
  p.q = a.q.data, p.k = a.k.data, p.v = a.v.data, p.g = a.g.data, p.beta = a.beta.data, p.o = a.o.data;
  p.state = a.state.data;
  p.q_rows = detail::row_strides(a.q), p.k_rows = detail::row_strides(a.k), p.v_rows = detail::row_strides(a.v);
  p.o_rows = detail::row_strides(a.o);
  detail::with_padded_head_dim(d.D, [&]<int Dp>() {
    detail::launch(detail::decode_tokens<Dp>, dim3(unsigned(d.Hs), unsigned(d.B)), detail::DecodeShape<Dp>::threads,
                   0, stream, p, "gdn decode_tokens launch");
  });
}

}  // namespace dash::cuda::gdn

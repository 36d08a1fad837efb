// C entry points of the GatedDeltaNet kernels (dash::cuda::gdn) for the peer benchmarks.
// Contiguous layouts: q, o, d_o, dq [B,T,H,D] bf16; k, v, dk, dv [B,T,Hs,D] bf16; g, beta, dg,
// dbeta [B,T,Hs] fp32; final_state [B,Hs,D,D] fp32 (nullable). dash_gdn_workspace covers both
// dash_gdn_forward and dash_gdn_backward, which recomputes the forward's workspace in it;
// dash_gdn_forward_kept leaves that workspace (dash_gdn_kept_workspace bytes) for
// dash_gdn_backward_kept, which reads it and takes its own scratch (dash_gdn_backward_scratch).
#include <cuda_runtime.h>

#include <cstddef>

#include "capi.hpp"
#include "dash/ops/gated_delta_net/cuda.cuh"

namespace {

using dash::Device;
using dash::Shape;
using dash::TensorView;
using dash::cuda::bfloat16;

template <class T>
TensorView<T> on_device(T* data, Shape shape) {
  return TensorView<T>(data, shape, Device::cuda);
}

}  // namespace

extern "C" size_t dash_gdn_workspace(int B, int T, int H, int Hs, int D) {
  std::size_t bytes = 0;
  const int status =
      dash::peer::guarded([&] { bytes = dash::cuda::gdn::backward_workspace_bytes({B, T, H, Hs, D}); });
  return status == 0 ? bytes : 0;
}

extern "C" size_t dash_gdn_kept_workspace(int B, int T, int H, int Hs, int D) {
  std::size_t bytes = 0;
  const int status = dash::peer::guarded([&] { bytes = dash::cuda::gdn::kept_workspace_bytes({B, T, H, Hs, D}); });
  return status == 0 ? bytes : 0;
}

extern "C" size_t dash_gdn_backward_scratch(int B, int T, int H, int Hs, int D) {
  std::size_t bytes = 0;
  const int status = dash::peer::guarded([&] { bytes = dash::cuda::gdn::backward_scratch_bytes({B, T, H, Hs, D}); });
  return status == 0 ? bytes : 0;
}

namespace {

dash::cuda::gdn::Forward forward_args(const void* q, const void* k, const void* v, const float* g, const float* beta,
                                      void* o, float* final_state, int B, int T, int H, int Hs, int D, float scale,
                                      float eps) {
  dash::cuda::gdn::Forward a;
  a.q = on_device(static_cast<const bfloat16*>(q), Shape{B, T, H, D});
  a.k = on_device(static_cast<const bfloat16*>(k), Shape{B, T, Hs, D});
  a.v = on_device(static_cast<const bfloat16*>(v), Shape{B, T, Hs, D});
  a.g = on_device(g, Shape{B, T, Hs});
  a.beta = on_device(beta, Shape{B, T, Hs});
  a.o = on_device(static_cast<bfloat16*>(o), Shape{B, T, H, D});
  if (final_state) a.final_state = on_device(final_state, Shape{B, Hs, D, D});
  a.scale = scale, a.eps = eps;
  return a;
}

dash::cuda::gdn::Backward backward_args(const void* q, const void* k, const void* v, const float* g,
                                        const float* beta, const void* d_o, void* dq, void* dk, void* dv, float* dg,
                                        float* dbeta, int B, int T, int H, int Hs, int D, float scale, float eps) {
  dash::cuda::gdn::Backward a;
  a.q = on_device(static_cast<const bfloat16*>(q), Shape{B, T, H, D});
  a.k = on_device(static_cast<const bfloat16*>(k), Shape{B, T, Hs, D});
  a.v = on_device(static_cast<const bfloat16*>(v), Shape{B, T, Hs, D});
  a.g = on_device(g, Shape{B, T, Hs});
  a.beta = on_device(beta, Shape{B, T, Hs});
  a.d_o = on_device(static_cast<const bfloat16*>(d_o), Shape{B, T, H, D});
  a.dq = on_device(static_cast<bfloat16*>(dq), Shape{B, T, H, D});
  a.dk = on_device(static_cast<bfloat16*>(dk), Shape{B, T, Hs, D});
  a.dv = on_device(static_cast<bfloat16*>(dv), Shape{B, T, Hs, D});
  a.dg = on_device(dg, Shape{B, T, Hs});
  a.dbeta = on_device(dbeta, Shape{B, T, Hs});
  a.scale = scale, a.eps = eps;
  return a;
}

}  // namespace

extern "C" int dash_gdn_forward(const void* q, const void* k, const void* v, const float* g, const float* beta,
                                void* o, float* final_state, int B, int T, int H, int Hs, int D, float scale,
                                float eps, void* workspace, size_t workspace_bytes, void* stream) {
  return dash::peer::guarded([&] {
    const auto a = forward_args(q, k, v, g, beta, o, final_state, B, T, H, Hs, D, scale, eps);
    dash::cuda::gdn::forward(a, workspace, workspace_bytes, static_cast<cudaStream_t>(stream));
  });
}

extern "C" int dash_gdn_forward_kept(const void* q, const void* k, const void* v, const float* g, const float* beta,
                                     void* o, float* final_state, int B, int T, int H, int Hs, int D, float scale,
                                     float eps, void* kept, size_t kept_bytes, void* stream) {
  return dash::peer::guarded([&] {
    auto a = forward_args(q, k, v, g, beta, o, final_state, B, T, H, Hs, D, scale, eps);
    a.keep_for_backward = true;
    dash::cuda::gdn::forward(a, kept, kept_bytes, static_cast<cudaStream_t>(stream));
  });
}

extern "C" int dash_gdn_backward(const void* q, const void* k, const void* v, const float* g, const float* beta,
                                 const void* d_o, void* dq, void* dk, void* dv, float* dg, float* dbeta, int B, int T,
                                 int H, int Hs, int D, float scale, float eps, void* workspace,
                                 size_t workspace_bytes, void* stream) {
  return dash::peer::guarded([&] {
    const auto a = backward_args(q, k, v, g, beta, d_o, dq, dk, dv, dg, dbeta, B, T, H, Hs, D, scale, eps);
    dash::cuda::gdn::backward(a, workspace, workspace_bytes, static_cast<cudaStream_t>(stream));
  });
}

extern "C" int dash_gdn_backward_kept(const void* q, const void* k, const void* v, const float* g, const float* beta,
                                      const void* d_o, void* dq, void* dk, void* dv, float* dg, float* dbeta, int B,
                                      int T, int H, int Hs, int D, float scale, float eps, const void* kept,
                                      size_t kept_bytes, void* scratch, size_t scratch_bytes, void* stream) {
  return dash::peer::guarded([&] {
    const auto a = backward_args(q, k, v, g, beta, d_o, dq, dk, dv, dg, dbeta, B, T, H, Hs, D, scale, eps);
    dash::cuda::gdn::backward(a, kept, kept_bytes, scratch, scratch_bytes, static_cast<cudaStream_t>(stream));
  });
}

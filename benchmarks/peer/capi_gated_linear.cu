// C entry points of GatedLinear's CUDA kernels for the peer comparison (contiguous layouts:
// q [B,T,H,D], k and v [B,T,Hkv,D] bf16; g [B,T,H] fp32; o and gradients as their inputs).
#include <algorithm>
#include <cstddef>

#include "capi.hpp"
#include "dash/ops/gated_linear/cuda.cuh"

namespace {

void set_inputs(dash::cuda::gla::Inputs& p, const void* q, const void* k, const void* v, const float* g, int B, int T,
                int H, int Hkv, int D, float scale) {
  p.q = static_cast<const dash::cuda::bfloat16*>(q);
  p.k = static_cast<const dash::cuda::bfloat16*>(k);
  p.v = static_cast<const dash::cuda::bfloat16*>(v);
  p.g = g;
  p.batch = B, p.length = T, p.n_heads = H, p.n_kv_heads = Hkv, p.d_head = D, p.scale = scale;
}

}  // namespace

// Scratch bytes enough for dash_gla_forward and dash_gla_backward; 0 for sizes they refuse.
extern "C" size_t dash_gla_workspace(int B, int T, int H, int Hkv, int D) {
  std::size_t bytes = 0;
  dash::peer::guarded([&] {
    dash::cuda::gla::ForwardParams f;
    set_inputs(f, nullptr, nullptr, nullptr, nullptr, B, T, H, Hkv, D, 1.0f);
    dash::cuda::gla::BackwardParams b;
    set_inputs(b, nullptr, nullptr, nullptr, nullptr, B, T, H, Hkv, D, 1.0f);
    bytes = std::max(dash::cuda::gla::forward_workspace_bytes(f), dash::cuda::gla::backward_workspace_bytes(b));
  });
  return bytes;
}

extern "C" int dash_gla_forward(const void* q, const void* k, const void* v, const float* g, void* o,
                                float* final_state, int B, int T, int H, int Hkv, int D, float scale, void* workspace,
                                size_t workspace_bytes, void* stream) {
  return dash::peer::guarded([&] {
    dash::cuda::gla::ForwardParams p;
    set_inputs(p, q, k, v, g, B, T, H, Hkv, D, scale);
    p.o = static_cast<dash::cuda::bfloat16*>(o);
    p.final_state = final_state;
    dash::cuda::gla::forward(p, workspace, workspace_bytes, static_cast<cudaStream_t>(stream));
  });
}

extern "C" int dash_gla_backward(const void* q, const void* k, const void* v, const float* g, const void* d_o, void* dq,
                                 void* dk, void* dv, float* dg, int B, int T, int H, int Hkv, int D, float scale,
                                 void* workspace, size_t workspace_bytes, void* stream) {
  return dash::peer::guarded([&] {
    dash::cuda::gla::BackwardParams p;
    set_inputs(p, q, k, v, g, B, T, H, Hkv, D, scale);
    p.d_o = static_cast<const dash::cuda::bfloat16*>(d_o);
    p.dq = static_cast<dash::cuda::bfloat16*>(dq);
    p.dk = static_cast<dash::cuda::bfloat16*>(dk);
    p.dv = static_cast<dash::cuda::bfloat16*>(dv);
    p.dg = dg;
    dash::cuda::gla::backward(p, workspace, workspace_bytes, static_cast<cudaStream_t>(stream));
  });
}

// C entry points of the Softmax / SlidingWindow attention backward for libdash_peer.so, on
// contiguous layouts: q, o, d_o, dq [B, T, H, D]; k, v, dk, dv [B, T, Hkv, D]; lse [B, H, T]
// fp32 (natural log); scale 1/sqrt(D); window <= 0 means no window. dq, dk, dv are overwritten.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "capi.hpp"
#include "dash/ops/softmax/cuda/backward.cuh"

namespace {

namespace attn = dash::cuda::attention;

attn::BackwardParams contiguous_backward_params(int B, int T, int H, int Hkv, int D, long long window,
                                                long long sinks) {
  attn::BackwardParams p;
  p.batch = B;
  p.length = T;
  p.n_heads = H;
  p.n_kv_heads = Hkv;
  p.d_head = D;
  p.scale = D > 0 ? float(1.0 / std::sqrt(double(D))) : 0.f;
  p.mask.window = window <= 0 ? std::numeric_limits<std::int64_t>::max() : std::int64_t(window);
  p.mask.sinks = sinks;
  const attn::Strides query_rows{std::int64_t(T) * H * D, std::int64_t(H) * D};
  const attn::Strides kv_rows{std::int64_t(T) * Hkv * D, std::int64_t(Hkv) * D};
  p.q_strides = p.o_strides = p.d_o_strides = p.dq_strides = query_rows;
  p.k_strides = p.v_strides = p.dk_strides = p.dv_strides = kv_rows;
  return p;
}

}  // namespace

// Workspace bytes for dash_attention_backward; 0 when the sizes are invalid (see dash_last_error).
extern "C" std::size_t dash_attention_backward_workspace(int B, int T, int H, int Hkv, int D) {
  std::size_t bytes = 0;
  dash::peer::guarded([&] { bytes = attn::backward_workspace_bytes(contiguous_backward_params(B, T, H, Hkv, D, 0, 0)); });
  return bytes;
}

extern "C" int dash_attention_backward(const void* q, const void* k, const void* v, const void* o, const float* lse,
                                       const void* d_o, void* dq, void* dk, void* dv, int B, int T, int H, int Hkv,
                                       int D, long long window, long long sinks, void* workspace,
                                       std::size_t workspace_bytes, void* stream) {
  return dash::peer::guarded([&] {
    attn::BackwardParams p = contiguous_backward_params(B, T, H, Hkv, D, window, sinks);
    p.q = static_cast<const dash::cuda::bfloat16*>(q);
    p.k = static_cast<const dash::cuda::bfloat16*>(k);
    p.v = static_cast<const dash::cuda::bfloat16*>(v);
    p.o = static_cast<dash::cuda::bfloat16*>(const_cast<void*>(o));
    p.lse = const_cast<float*>(lse);
    p.d_o = static_cast<const dash::cuda::bfloat16*>(d_o);
    p.dq = static_cast<dash::cuda::bfloat16*>(dq);
    p.dk = static_cast<dash::cuda::bfloat16*>(dk);
    p.dv = static_cast<dash::cuda::bfloat16*>(dv);
    attn::backward(p, workspace, workspace_bytes, static_cast<cudaStream_t>(stream));
  });
}

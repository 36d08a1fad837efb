// C entry point of the attention forward for the peer benchmarks: contiguous q, o [B, T, H, D],
// k, v [B, T, Hkv, D] (bf16), lse [B, H, T] (fp32), scale 1/√D; window ≤ 0 means no window.
#include <cmath>
#include <cstdint>
#include <limits>

#include "capi.hpp"
#include "dash/ops/softmax/cuda/forward.cuh"

extern "C" int dash_attention_forward(const void* q, const void* k, const void* v, void* o, float* lse, int B, int T,
                                      int H, int Hkv, int D, long long window, long long sinks, void* stream) {
  return dash::peer::guarded([&] {
    namespace attention = dash::cuda::attention;
    using dash::cuda::bfloat16;
    attention::ForwardParams p;
    p.q = static_cast<const bfloat16*>(q);
    p.k = static_cast<const bfloat16*>(k);
    p.v = static_cast<const bfloat16*>(v);
    p.o = static_cast<bfloat16*>(o);
    p.lse = lse;
    p.batch = B;
    p.length = T;
    p.n_heads = H;
    p.n_kv_heads = Hkv;
    p.d_head = D;
    p.q_strides = p.o_strides = {std::int64_t(T) * H * D, std::int64_t(H) * D};
    p.k_strides = p.v_strides = {std::int64_t(T) * Hkv * D, std::int64_t(Hkv) * D};
    p.scale = float(1.0 / std::sqrt(double(D)));
    p.mask = {window > 0 ? std::int64_t(window) : std::numeric_limits<std::int64_t>::max(), std::int64_t(sinks)};
    attention::forward(p, static_cast<cudaStream_t>(stream));
  });
}

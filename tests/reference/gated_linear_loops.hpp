// Gated linear attention written as plain loops in double, from the closed form rather than the
// recurrence or the chunks:
//   o_t = scale·( e^{G(−1,t)} q_tᵀ S_0 + Σ_{j≤t} e^{G(j,t)} (q_t·k_j) v_j ),   G(j,t) = Σ_{j<l≤t} g_l
// (the initial state decays from before token 0), and the final state
//   S_T = e^{G(−1,T−1)} S_0 + Σ_j e^{G(j,T−1)} k_j v_jᵀ.
// The layer around it is written out the same way. Slow (O(T²·D) per head and O(T) per decay):
// for tests only.
#pragma once

#include <cmath>

#include "dash/core/tensor.hpp"
#include "dash/ops/attention.hpp"

namespace dash::reference {

// q [B,T,H,Dk], k [B,T,Hkv,Dk], v [B,T,Hkv,Dv], g [B,T,H], state_in [B,H,Dk,Dv] or empty.
// Fills o [B,T,H,Dv] and, when given, the final state [B,H,Dk,Dv].
template <class T>
void gla_loops(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v, TensorView<const T> g,
               double scale, TensorView<const T> state_in, Tensor<double>& o, Tensor<double>* state_out = nullptr) {
  const index_t B = q.dim(0), T_ = q.dim(1), H = q.dim(2), Dk = q.dim(3), Hkv = k.dim(2), Dv = v.dim(3);
  const index_t group = H / Hkv;
  o = Tensor<double>(Shape{B, T_, H, Dv}, 0.0);
  if (state_out) *state_out = Tensor<double>(Shape{B, H, Dk, Dv}, 0.0);
  // G(j, t) for head (b, h), summed directly.
  const auto log_decay = [&](index_t b, index_t h, index_t j, index_t t) {
    double sum = 0;
    for (index_t l = j + 1; l <= t; ++l) sum += double(g(b, l, h));
    return sum;
  };
  const auto s0 = [&](index_t b, index_t h, index_t d, index_t e) {
    return state_in.empty() ? 0.0 : double(state_in(b, h, d, e));
  };
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h) {
      const index_t kh = h / group;
      for (index_t t = 0; t < T_; ++t) {
        const double w0 = scale * std::exp(log_decay(b, h, -1, t));
        for (index_t e = 0; e < Dv; ++e)
          for (index_t d = 0; d < Dk; ++d) o(b, t, h, e) += w0 * double(q(b, t, h, d)) * s0(b, h, d, e);
        for (index_t j = 0; j <= t; ++j) {
          double qk = 0;
          for (index_t d = 0; d < Dk; ++d) qk += double(q(b, t, h, d)) * double(k(b, j, kh, d));
          const double w = scale * std::exp(log_decay(b, h, j, t)) * qk;
          for (index_t e = 0; e < Dv; ++e) o(b, t, h, e) += w * double(v(b, j, kh, e));
        }
      }
      if (!state_out) continue;
      const index_t last = T_ - 1;
      for (index_t d = 0; d < Dk; ++d)
        for (index_t e = 0; e < Dv; ++e) {
          double sum = std::exp(log_decay(b, h, -1, last)) * s0(b, h, d, e);
          for (index_t j = 0; j < T_; ++j)
            sum += std::exp(log_decay(b, h, j, last)) * double(k(b, j, kh, d)) * double(v(b, j, kh, e));
          (*state_out)(b, h, d, e) = sum;
        }
    }
}

// The layer's weights as plain views: wq … wo as in AttentionWeights ([out, in]); biases may be
// empty views.
struct GlaLayerWeights {
  TensorView<const double> wq, wk, wv, wo, bq, bk, bv, w_gate, b_gate;
};

// The whole layer without RoPE: projections, gate g = log σ(h·w_gateᵀ + b_gate)/γ, mixer from a
// zero state, output projection. Returns y [B,T,d_model]; the log decays go to g_out when given.
inline Tensor<double> gla_layer_loops(const AttentionShape& s, const GlaLayerWeights& w, TensorView<const double> h,
                                      double gamma, double scale, Tensor<double>* g_out = nullptr) {
  const index_t B = h.dim(0), T_ = h.dim(1), C = s.d_model, H = s.n_heads, Hkv = s.n_kv_heads, D = s.d_head;
  const auto project = [&](TensorView<const double> wt, TensorView<const double> bias, index_t heads) {
    Tensor<double> out(Shape{B, T_, heads, D});
    for (index_t b = 0; b < B; ++b)
      for (index_t t = 0; t < T_; ++t)
        for (index_t r = 0; r < heads * D; ++r) {
          double sum = bias.empty() ? 0.0 : bias(r);
          for (index_t c = 0; c < C; ++c) sum += wt(r, c) * h(b, t, c);
          out(b, t, r / D, r % D) = sum;
        }
    return out;
  };
  const Tensor<double> q = project(w.wq, w.bq, H), k = project(w.wk, w.bk, Hkv), v = project(w.wv, w.bv, Hkv);
  Tensor<double> g(Shape{B, T_, H});
  for (index_t b = 0; b < B; ++b)
    for (index_t t = 0; t < T_; ++t)
      for (index_t j = 0; j < H; ++j) {
        double z = w.b_gate(j);
        for (index_t c = 0; c < C; ++c) z += w.w_gate(j, c) * h(b, t, c);
        g(b, t, j) = std::log(1.0 / (1.0 + std::exp(-z))) / gamma;
      }
  Tensor<double> o;
  gla_loops<double>(q, k, v, g, scale, TensorView<const double>{}, o);
  Tensor<double> y(Shape{B, T_, C}, 0.0);
  for (index_t b = 0; b < B; ++b)
    for (index_t t = 0; t < T_; ++t)
      for (index_t c = 0; c < C; ++c) {
        double sum = 0;
        for (index_t r = 0; r < H * D; ++r) sum += w.wo(c, r) * o(b, t, r / D, r % D);
        y(b, t, c) = sum;
      }
  if (g_out) *g_out = g;
  return y;
}

}  // namespace dash::reference

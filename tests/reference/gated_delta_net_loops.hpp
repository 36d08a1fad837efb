// The gated delta rule as plain loops in double, the slow and obvious way: the recurrence
// exactly as written in DESIGN.md §3, with the matrix (I − β k kᵀ) formed explicitly, and the
// whole layer (projections, L2 normalisation, gates, recurrence, output projection) element by
// element. Forward only; the operator's chunked and recurrent forms are tested against it.
#pragma once

#include <cmath>
#include <vector>

#include "dash/core/tensor.hpp"
#include "dash/ops/attention.hpp"
#include "dash/ops/gated_delta_net.hpp"

namespace dash::reference {

struct GatedDeltaNetLoopsResult {
  Tensor<double> out;    // [B, T, H, Dv]
  Tensor<double> state;  // [B, Hs, D, Dv], after the last token
};

// q [B,T,H,D], k [B,T,Hs,D], v [B,T,Hs,Dv], g and beta [B,T,Hs] (g = log a); s0 [B,Hs,D,Dv] or
// empty for a zero initial state. Query head h reads state head h / (H / Hs).
//   S_t = a_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,   o_t = scale · S_tᵀ q_t
template <class T>
GatedDeltaNetLoopsResult gated_delta_rule_loops(const Tensor<T>& q, const Tensor<T>& k, const Tensor<T>& v,
                                                const Tensor<T>& g, const Tensor<T>& beta, const Tensor<T>& s0,
                                                double scale) {
  const index_t B = q.dim(0), L = q.dim(1), H = q.dim(2), D = q.dim(3), Hs = k.dim(2), Dv = v.dim(3);
  const index_t group = H / Hs;
  GatedDeltaNetLoopsResult r{Tensor<double>(Shape{B, L, H, Dv}, 0.0), Tensor<double>(Shape{B, Hs, D, Dv}, 0.0)};
  std::vector<double> S(static_cast<std::size_t>(D * Dv)), next(S.size()), P(static_cast<std::size_t>(D * D));
  for (index_t b = 0; b < B; ++b)
    for (index_t s = 0; s < Hs; ++s) {
      for (index_t i = 0; i < D; ++i)
        for (index_t e = 0; e < Dv; ++e) S[i * Dv + e] = s0.empty() ? 0.0 : double(s0(b, s, i, e));
      for (index_t t = 0; t < L; ++t) {
        const double a = std::exp(double(g(b, t, s))), bt = double(beta(b, t, s));
        // P = I − β k kᵀ
        for (index_t i = 0; i < D; ++i)
          for (index_t j = 0; j < D; ++j)
            P[i * D + j] = (i == j ? 1.0 : 0.0) - bt * double(k(b, t, s, i)) * double(k(b, t, s, j));
        // S ← a P S + β k vᵀ
        for (index_t i = 0; i < D; ++i)
          for (index_t e = 0; e < Dv; ++e) {
            double acc = 0;
            for (index_t j = 0; j < D; ++j) acc += P[i * D + j] * S[j * Dv + e];
            next[i * Dv + e] = a * acc + bt * double(k(b, t, s, i)) * double(v(b, t, s, e));
          }
        S.swap(next);
        for (index_t h = s * group; h < (s + 1) * group; ++h)
          for (index_t e = 0; e < Dv; ++e) {
            double acc = 0;
            for (index_t i = 0; i < D; ++i) acc += S[i * Dv + e] * double(q(b, t, h, i));
            r.out(b, t, h, e) = scale * acc;
          }
      }
      for (index_t i = 0; i < D; ++i)
        for (index_t e = 0; e < Dv; ++e) r.state(b, s, i, e) = S[i * Dv + e];
    }
  return r;
}

// The whole GatedDeltaNet layer for h [B, T, d_model] → y [B, T, d_model], from a zero state.
template <class T>
Tensor<double> gated_delta_net_layer_loops(const AttentionShape& teacher, const GatedDeltaNet& op,
                                           const GatedDeltaNet::Params<T>& p, const Tensor<T>& h) {
  const index_t B = h.dim(0), L = h.dim(1), C = teacher.d_model, H = teacher.n_heads, D = teacher.d_head;
  const index_t Hs = p.w_gate.dim(0);
  const bool bias = !p.proj.bq.empty();
  Tensor<double> q(Shape{B, L, H, D}, 0.0), k(Shape{B, L, Hs, D}, 0.0), v(Shape{B, L, Hs, D}, 0.0);
  Tensor<double> g(Shape{B, L, Hs}, 0.0), beta(Shape{B, L, Hs}, 0.0);
  for (index_t b = 0; b < B; ++b)
    for (index_t t = 0; t < L; ++t) {
      // projections
      for (index_t o = 0; o < H * D; ++o) {
        double acc = bias ? double(p.proj.bq(o)) : 0.0;
        for (index_t c = 0; c < C; ++c) acc += double(p.proj.wq(o, c)) * double(h(b, t, c));
        q(b, t, o / D, o % D) = acc;
      }
      for (index_t o = 0; o < Hs * D; ++o) {
        double ak = bias ? double(p.proj.bk(o)) : 0.0, av = bias ? double(p.proj.bv(o)) : 0.0;
        for (index_t c = 0; c < C; ++c) {
          ak += double(p.proj.wk(o, c)) * double(h(b, t, c));
          av += double(p.proj.wv(o, c)) * double(h(b, t, c));
        }
        k(b, t, o / D, o % D) = ak;
        v(b, t, o / D, o % D) = av;
      }
      // L2 normalisation per head
      const auto normalise = [&](Tensor<double>& x, index_t heads) {
        for (index_t hh = 0; hh < heads; ++hh) {
          double sq = 0;
          for (index_t d = 0; d < D; ++d) sq += x(b, t, hh, d) * x(b, t, hh, d);
          const double norm = std::sqrt(sq + op.norm_eps);
          for (index_t d = 0; d < D; ++d) x(b, t, hh, d) /= norm;
        }
      };
      normalise(q, H);
      normalise(k, Hs);
      // gates: a = σ(z)^(1/γ), β = σ(y)
      for (index_t s = 0; s < Hs; ++s) {
        double z = double(p.b_gate(s)), y = double(p.b_beta(s));
        for (index_t c = 0; c < C; ++c) {
          z += double(p.w_gate(s, c)) * double(h(b, t, c));
          y += double(p.w_beta(s, c)) * double(h(b, t, c));
        }
        g(b, t, s) = std::log(1.0 / (1.0 + std::exp(-z))) / op.gate_normaliser;
        beta(b, t, s) = 1.0 / (1.0 + std::exp(-y));
      }
    }
  const Tensor<double> mixed = gated_delta_rule_loops(q, k, v, g, beta, Tensor<double>{}, op.scale).out;
  Tensor<double> y(Shape{B, L, C}, 0.0);
  for (index_t b = 0; b < B; ++b)
    for (index_t t = 0; t < L; ++t)
      for (index_t c = 0; c < C; ++c) {
        double acc = 0;
        for (index_t o = 0; o < H * D; ++o) acc += double(p.proj.wo(c, o)) * mixed(b, t, o / D, o % D);
        y(b, t, c) = acc;
      }
  return y;
}

}  // namespace dash::reference

// CPU reference of the gated delta rule (GatedDeltaNet, DESIGN.md §3): the chunked (WY / UT)
// form and the recurrent form, forward and backward, and the one-token decode step; plus the
// per-head L2 normalisation of q and k and the two gates, with their backward.
//
// Core math, one (batch, state head) slice in the row convention, S ∈ R^{D×Dv}:
//   S_t = a_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,     o_t = scale · S_tᵀ q_t,
// a_t = exp(g_t). Query head h reads state head h / (H / Hs) (GQA: a group of query heads
// shares one state). Written as S_t = a_t S_{t−1} + k_t w_tᵀ with w_t = β_t (v_t − a_t S_{t−1}ᵀ k_t).
//
// Chunked form. In a chunk of n tokens that starts from state S0, with cumulative log decays
// G_i = Σ_{j≤i} g_j (from the chunk start), γ_i = exp(G_i), and the decay ratios
// M_ij = exp(G_i − G_j) for j ≤ i (0 above the diagonal; computed from differences of G, never
// as γ_i / γ_j, so a chunk whose γ underflows stays exact; G is accumulated in double even for
// float inputs, since G_i − G_j is a small difference of large numbers when decays are strong:
// with fp32 G, a chunk of a = e^-7 per token puts ~|G|·eps ≈ 3e-5 relative error into M and
// ~1e-5 into dg):
//   A = strictly_lower(diag(β) (M ∘ K Kᵀ)),     U = V − diag(γ) K S0,     R = diag(β) U,
//   W = (I + A)⁻¹ R                                  (unit-lower triangular solve)
//   O = scale · (diag(γ) Q S0 + (M ∘ Q Kᵀ) W),     S_n = γ_n S0 + Kᵀ diag(d) W,  d_j = exp(G_n − G_j).
//
// Chunked backward, chunks in reverse, carrying dS (the gradient of the chunk's end state):
//   dW  = diag(d) K dS + scale · Σ_h (M ∘ Q Kᵀ)ᵀ dO
//   dP  = lower(scale · dO Wᵀ):   dQ += scale · diag(γ) dO S0ᵀ + (dP ∘ M) K,   dK += (dP ∘ M)ᵀ Q,
//                                 dM += dP ∘ Q Kᵀ
//   dS0 = γ_n dS + scale · Σ_h Qᵀ diag(γ) dO − Kᵀ diag(γ) dU
//   dγ_i += scale · (Q S0)_i · dO_i − (K S0)_i · dU_i,   dγ_n += <S0, dS>,   dd_j = (K dS)_j · w_j
//   dK  += diag(d) W dSᵀ − diag(γ) dU S0ᵀ + (dKk + dKkᵀ) K
//   through the solve:  dR = (I + A)⁻ᵀ dW,   dA = −strictly_lower(dR Wᵀ)
//   dβ_i = dR_i · U_i + Σ_{j<i} dA_ij M_ij (k_i·k_j),   dU = diag(β) dR,   dV = dU
//   dM  += diag(β) (dA ∘ K Kᵀ),   dKk = diag(β) (dA ∘ M)
//   and since M_ij, γ_i, d_j are exps of sums of g over (j, i], [1, i], (j, n]:
//   dg_l = Σ_{i≥l>j} dM_ij M_ij + Σ_{i≥l} dγ_i γ_i + Σ_{j<l} dd_j d_j.
//
// Recurrent backward (reverse-time adjoint), per token with P = a_t S_{t−1}, u = v_t − Pᵀ k_t,
// w = β_t u, S_t = P + k_t wᵀ, carrying dS = dL/dS_t:
//   dS += scale Σ_h q_h dO_hᵀ,   dq_h += scale S_t dO_h,   dk += dS w,   dw = dSᵀ k,
//   dβ += dw·u,   dv += β dw,   dP = dS − β k dwᵀ,   dk −= β P dw,
//   dg += a_t <dP, S_{t−1}>,   dS ← a_t dP.
// The states inside a chunk are recomputed from the chunk's checkpoint, so memory is one
// checkpoint per chunk rather than T states.
//
// Both forms keep the same checkpoints: states [B, Hs, n_chunks + 1, D, Dv], the state at the
// start of every chunk of `chunk` tokens and, last, the final state; either backward accepts
// the checkpoints of either forward.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <string_view>
#include <utility>
#include <vector>

#include "dash/core/eigen.hpp"
#include "dash/core/error.hpp"
#include "dash/core/tensor.hpp"

namespace dash::eigen::gdn {

// Sizes of a core call, checked once.
struct Dims {
  index_t B = 0, T = 0, H = 0, Hs = 0, D = 0, Dv = 0, chunk = 0, n_chunks = 0;
  index_t group() const { return H / Hs; }
  Shape states() const { return Shape{B, Hs, n_chunks + 1, D, Dv}; }
  Shape state() const { return Shape{B, Hs, D, Dv}; }
};

inline index_t chunk_count(index_t length, index_t chunk) { return (length + chunk - 1) / chunk; }

template <class T>
void require_dense(TensorView<T> x, std::string_view what) {
  require_host(x, what);
  require(x.contiguous(), what, ": shape ", x.shape, " must be contiguous");
}

// q [B,T,H,D], k [B,T,Hs,D], v [B,T,Hs,Dv], g and beta [B,T,Hs].
template <class T>
Dims check_core(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v, TensorView<const T> g,
                TensorView<const T> beta, index_t chunk) {
  require(chunk >= 1, "GatedDeltaNet: chunk = ", chunk, ", expected >= 1");
  require_rank(q, 4, "GatedDeltaNet q");
  require_rank(k, 4, "GatedDeltaNet k");
  require_rank(v, 4, "GatedDeltaNet v");
  Dims d;
  d.B = q.dim(0), d.T = q.dim(1), d.H = q.dim(2), d.D = q.dim(3), d.Hs = k.dim(2), d.Dv = v.dim(3);
  d.chunk = chunk, d.n_chunks = chunk_count(d.T, chunk);
  require(d.Hs >= 1 && d.H % d.Hs == 0, "GatedDeltaNet k: ", d.Hs, " state heads (shape ", k.shape,
          ") must divide the ", d.H, " query heads of q ", q.shape);
  require_shape(k, Shape{d.B, d.T, d.Hs, d.D}, "GatedDeltaNet k");
  require_shape(v, Shape{d.B, d.T, d.Hs, d.Dv}, "GatedDeltaNet v");
  require_shape(g, Shape{d.B, d.T, d.Hs}, "GatedDeltaNet g (log decay)");
  require_shape(beta, Shape{d.B, d.T, d.Hs}, "GatedDeltaNet beta");
  require_dense(q, "GatedDeltaNet q");
  require_dense(k, "GatedDeltaNet k");
  require_dense(v, "GatedDeltaNet v");
  require_dense(g, "GatedDeltaNet g");
  require_dense(beta, "GatedDeltaNet beta");
  return d;
}

// The D×Dv state of (b, s) inside a [B, Hs, (slots,) D, Dv] tensor.
template <class T>
MatrixMap<T> state_at(TensorView<T> x, index_t b, index_t s, index_t slot = -1) {
  T* p = slot < 0 ? &x(b, s, 0, 0) : &x(b, s, slot, 0, 0);
  const index_t rank = x.rank();
  return MatrixMap<T>(p, x.dim(rank - 2), x.dim(rank - 1));
}

// Per-token scalars g(b, t, s) or beta(b, t, s) of [B, T, Hs].
template <class T>
struct Scalars {
  const T* base;
  index_t stride;
  T operator[](index_t t) const { return base[t * stride]; }
};
template <class T>
Scalars<T> scalars(TensorView<const T> x, index_t b, index_t s) {
  return {x.data + b * x.stride[0] + s * x.stride[2], x.stride[1]};
}

// One chunk's quantities (see the header comment), computed by prepare().
template <class T>
struct Chunk {
  using Mat = Matrix<T>;
  using Vec = Vector<T>;
  index_t n = 0;
  Mat K, V;           // n×D, n×Dv
  Vec beta;           // β
  Eigen::VectorXd G;  // cumulative log decay from the chunk start, in double: G_i − G_j of a
                      // strongly decaying chunk is a small difference of large numbers
  Vec gam, d;         // γ_i = exp(G_i), d_j = exp(G_{n} − G_j)
  Mat M;              // exp(G_i − G_j) for j ≤ i, 0 above
  Mat Kk;             // K Kᵀ
  Mat A;              // strictly lower
  Mat KS, U, W;       // K S0, V − diag(γ) K S0, (I + A)⁻¹ diag(β) U

  template <class KBlock, class VBlock>
  void prepare(const KBlock& k_rows, const VBlock& v_rows, Scalars<T> g, Scalars<T> b, index_t t0, const Mat& S0) {
    n = k_rows.rows();
    K = k_rows, V = v_rows;
    beta.resize(n), G.resize(n);
    double acc = 0;
    for (index_t i = 0; i < n; ++i) {
      acc += double(g[t0 + i]);
      G(i) = acc;
      beta(i) = b[t0 + i];
    }
    gam = G.array().exp().template cast<T>();
    d = (G(n - 1) - G.array()).exp().template cast<T>();
    M.setZero(n, n);
    for (index_t i = 0; i < n; ++i)
      M.row(i).head(i + 1) = (G(i) - G.head(i + 1).array()).exp().template cast<T>().transpose();
    Kk.noalias() = K * K.transpose();
    A = (beta.asDiagonal() * M.cwiseProduct(Kk)).template triangularView<Eigen::StrictlyLower>();
    KS.noalias() = K * S0;
    U = V - gam.asDiagonal() * KS;
    W = beta.asDiagonal() * U;
    A.template triangularView<Eigen::UnitLower>().solveInPlace(W);
  }

  // S ← γ_n S + Kᵀ diag(d) W: the state at the end of the chunk.
  void advance(Mat& S) const {
    S *= gam(n - 1);
    S.noalias() += K.transpose() * (d.asDiagonal() * W);
  }
};

// The checks shared by both forward forms.
template <class T>
Dims check_forward(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v, TensorView<const T> g,
                   TensorView<const T> beta, TensorView<const T> s0, TensorView<T> out, TensorView<T> states,
                   index_t chunk) {
  const Dims dm = check_core(q, k, v, g, beta, chunk);
  require_shape(out, Shape{dm.B, dm.T, dm.H, dm.Dv}, "GatedDeltaNet out");
  require_dense(out, "GatedDeltaNet out");
  if (!s0.empty()) require_shape(s0, dm.state(), "GatedDeltaNet initial state");
  if (!states.empty()) require_shape(states, dm.states(), "GatedDeltaNet states");
  return dm;
}

// out [B,T,H,Dv]: the mixer output. s0 [B,Hs,D,Dv] or empty (zero initial state).
// states [B,Hs,n_chunks+1,D,Dv] or empty: the checkpoints (see the header comment).
template <class T>
void forward_chunked(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v, TensorView<const T> g,
                     TensorView<const T> beta, TensorView<const T> s0, TensorView<T> out, TensorView<T> states,
                     index_t chunk, double scale) {
  const Dims dm = check_forward(q, k, v, g, beta, s0, out, states, chunk);
  using Mat = Matrix<T>;
  const T sc = T(scale);
  Chunk<T> c;
  Mat S, QK;
  for (index_t b = 0; b < dm.B; ++b)
    for (index_t s = 0; s < dm.Hs; ++s) {
      if (s0.empty())
        S.setZero(dm.D, dm.Dv);
      else
        S = state_at(s0, b, s);
      const auto K = head(k, b, s);
      const auto V = head(v, b, s);
      for (index_t ci = 0; ci < dm.n_chunks; ++ci) {
        const index_t t0 = ci * chunk, n = std::min(chunk, dm.T - t0);
        if (!states.empty()) state_at(states, b, s, ci) = S;
        c.prepare(K.middleRows(t0, n), V.middleRows(t0, n), scalars(g, b, s), scalars(beta, b, s), t0, S);
        for (index_t h = s * dm.group(); h < (s + 1) * dm.group(); ++h) {
          const auto Q = head(q, b, h).middleRows(t0, n);
          QK.noalias() = Q * c.K.transpose();
          auto O = head(out, b, h).middleRows(t0, n);
          O.noalias() = c.gam.asDiagonal() * (Q * S);
          O.noalias() += c.M.cwiseProduct(QK) * c.W;
          O *= sc;
        }
        c.advance(S);
      }
      if (!states.empty()) state_at(states, b, s, dm.n_chunks) = S;
    }
}

// The checks shared by both backward forms.
template <class T>
Dims check_backward(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v, TensorView<const T> g,
                    TensorView<const T> beta, TensorView<const T> states, TensorView<const T> d_out,
                    TensorView<const T> d_final, TensorView<T> dq, TensorView<T> dk, TensorView<T> dv,
                    TensorView<T> dg, TensorView<T> dbeta, TensorView<T> ds0, index_t chunk) {
  const Dims dm = check_core(q, k, v, g, beta, chunk);
  require_shape(states, dm.states(), "GatedDeltaNet states (checkpoints from the forward with the same chunk)");
  require_dense(states, "GatedDeltaNet states");
  require_shape(d_out, Shape{dm.B, dm.T, dm.H, dm.Dv}, "GatedDeltaNet d_out");
  require_dense(d_out, "GatedDeltaNet d_out");
  if (!d_final.empty()) require_shape(d_final, dm.state(), "GatedDeltaNet d_final");
  require_shape(dq, q.shape, "GatedDeltaNet dq");
  require_shape(dk, k.shape, "GatedDeltaNet dk");
  require_shape(dv, v.shape, "GatedDeltaNet dv");
  require_shape(dg, g.shape, "GatedDeltaNet dg");
  require_shape(dbeta, beta.shape, "GatedDeltaNet dbeta");
  for (auto [x, what] : {std::pair{TensorView<const T>(dq), "dq"},
                         {TensorView<const T>(dk), "dk"},
                         {TensorView<const T>(dv), "dv"},
                         {TensorView<const T>(dg), "dg"},
                         {TensorView<const T>(dbeta), "dbeta"}})
    require_dense(x, what);
  if (!ds0.empty()) require_shape(ds0, dm.state(), "GatedDeltaNet ds0");
  return dm;
}

// Adds into dq, dk, dv, dg, dbeta and (when not empty) ds0. d_final [B,Hs,D,Dv] is the gradient
// of the final state, or empty. `states` are the forward's checkpoints for the same chunk.
template <class T>
void backward_chunked(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v, TensorView<const T> g,
                      TensorView<const T> beta, TensorView<const T> states, TensorView<const T> d_out,
                      TensorView<const T> d_final, TensorView<T> dq, TensorView<T> dk, TensorView<T> dv,
                      TensorView<T> dg, TensorView<T> dbeta, TensorView<T> ds0, index_t chunk, double scale) {
  const Dims dm = check_backward(q, k, v, g, beta, states, d_out, d_final, dq, dk, dv, dg, dbeta, ds0, chunk);
  using Mat = Matrix<T>;
  using Vec = Vector<T>;
  const T sc = T(scale);
  Chunk<T> c;
  Mat S0, dS, dS0, dW, dK, dM, dR, dA, dU, dKk, QK, dP, KdS, E;
  Vec dgam, dd, dG, dB;
  for (index_t b = 0; b < dm.B; ++b)
    for (index_t s = 0; s < dm.Hs; ++s) {
      if (d_final.empty())
        dS.setZero(dm.D, dm.Dv);
      else
        dS = state_at(d_final, b, s);
      const auto K = head(k, b, s);
      const auto V = head(v, b, s);
      for (index_t ci = dm.n_chunks - 1; ci >= 0; --ci) {
        const index_t t0 = ci * chunk, n = std::min(chunk, dm.T - t0);
        S0 = state_at(states, b, s, ci);
        c.prepare(K.middleRows(t0, n), V.middleRows(t0, n), scalars(g, b, s), scalars(beta, b, s), t0, S0);
        dgam.setZero(n), dG.setZero(n);
        dM.setZero(n, n);
        // From the chunk's end state S_n = γ_n S0 + Kᵀ diag(d) W.
        KdS.noalias() = c.K * dS;
        dW.noalias() = c.d.asDiagonal() * KdS;
        dd = KdS.cwiseProduct(c.W).rowwise().sum();
        dK.noalias() = (c.d.asDiagonal() * c.W) * dS.transpose();
        dgam(n - 1) += S0.cwiseProduct(dS).sum();
        dS0 = c.gam(n - 1) * dS;
        // From the outputs O_h = scale (diag(γ) Q S0 + (M ∘ Q Kᵀ) W).
        for (index_t h = s * dm.group(); h < (s + 1) * dm.group(); ++h) {
          const auto Q = head(q, b, h).middleRows(t0, n);
          const auto dO = head(d_out, b, h).middleRows(t0, n);
          auto dQ = head(dq, b, h).middleRows(t0, n);
          QK.noalias() = Q * c.K.transpose();
          dP.noalias() = sc * dO * c.W.transpose();
          dP.template triangularView<Eigen::StrictlyUpper>().setZero();
          dW.noalias() += sc * c.M.cwiseProduct(QK).transpose() * dO;
          dM += dP.cwiseProduct(QK);
          dP = dP.cwiseProduct(c.M);  // now d(Q Kᵀ)
          dQ.noalias() += sc * c.gam.asDiagonal() * (dO * S0.transpose());
          dQ.noalias() += dP * c.K;
          dK.noalias() += dP.transpose() * Q;
          dS0.noalias() += sc * Q.transpose() * (c.gam.asDiagonal() * dO);
          dgam += sc * (Q * S0).cwiseProduct(dO).rowwise().sum();
        }
        // Through W = (I + A)⁻¹ R.
        dR = dW;
        c.A.transpose().template triangularView<Eigen::UnitUpper>().solveInPlace(dR);
        dA.noalias() = -dR * c.W.transpose();
        dA.template triangularView<Eigen::Upper>().setZero();
        dB = dR.cwiseProduct(c.U).rowwise().sum();
        dU = c.beta.asDiagonal() * dR;
        dgam -= c.KS.cwiseProduct(dU).rowwise().sum();
        dK.noalias() -= c.gam.asDiagonal() * (dU * S0.transpose());
        dS0.noalias() -= c.K.transpose() * (c.gam.asDiagonal() * dU);
        // Through A = strictly_lower(diag(β) (M ∘ K Kᵀ)).
        dB += dA.cwiseProduct(c.M).cwiseProduct(c.Kk).rowwise().sum();
        dM += c.beta.asDiagonal() * dA.cwiseProduct(c.Kk);
        dKk = c.beta.asDiagonal() * dA.cwiseProduct(c.M);
        dK.noalias() += (dKk + dKk.transpose()) * c.K;
        // Through the decays. Each factor is exp of a sum of g over a segment of the chunk:
        //   M_ij = exp(Σ_{j<l≤i} g_l),  γ_i = exp(Σ_{l≤i} g_l),  d_j = exp(Σ_{j<l≤n} g_l),
        // so dg_l = Σ_{i≥l>j} dM_ij M_ij + Σ_{i≥l} dγ_i γ_i + Σ_{j<l} dd_j d_j: the pairs whose
        // segment covers l. Summed this way, not as a reverse cumulative sum of dG_i (which adds
        // and later cancels terms far larger than the result, and loses ~n·eps of them in fp32).
        E = dM.cwiseProduct(c.M);
        dG = dgam.cwiseProduct(c.gam);  // becomes Σ_{i≥l} dγ_i γ_i
        for (index_t l = n - 2; l >= 0; --l) dG(l) += dG(l + 1);
        T below = T(0);  // Σ_{j<l} dd_j d_j
        for (index_t l = 0; l < n; ++l) {
          T cover = T(0);  // Σ_{i≥l} Σ_{j<l} E_ij; column l−1 of E turns into row prefix sums
          if (l > 0)
            for (index_t i = l; i < n; ++i) {
              if (l > 1) E(i, l - 1) += E(i, l - 2);
              cover += E(i, l - 1);
            }
          dg(b, t0 + l, s) += cover + dG(l) + below;
          below += dd(l) * c.d(l);
          dbeta(b, t0 + l, s) += dB(l);
        }
        head(dk, b, s).middleRows(t0, n) += dK;
        head(dv, b, s).middleRows(t0, n) += dU;
        dS = dS0;
      }
      if (!ds0.empty()) state_at(ds0, b, s) += dS;
    }
}

// One token of the recurrence on state S (D×Dv), in place: S ← a S + k wᵀ, w = β (v − a Sᵀ k).
template <class T, class KRow, class VRow>
void step_state(Matrix<T>& S, const KRow& k_row, const VRow& v_row, T a, T b) {
  S *= a;
  const Vector<T> w = b * (v_row.transpose() - S.transpose() * k_row.transpose());
  S.noalias() += k_row.transpose() * w.transpose();
}

// Same contract as forward_chunked; `chunk` is the checkpoint interval.
template <class T>
void forward_recurrent(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v, TensorView<const T> g,
                       TensorView<const T> beta, TensorView<const T> s0, TensorView<T> out, TensorView<T> states,
                       index_t chunk, double scale) {
  const Dims dm = check_forward(q, k, v, g, beta, s0, out, states, chunk);
  const T sc = T(scale);
  Matrix<T> S;
  for (index_t b = 0; b < dm.B; ++b)
    for (index_t s = 0; s < dm.Hs; ++s) {
      if (s0.empty())
        S.setZero(dm.D, dm.Dv);
      else
        S = state_at(s0, b, s);
      const auto K = head(k, b, s);
      const auto V = head(v, b, s);
      const auto G = scalars(g, b, s), Bt = scalars(beta, b, s);
      for (index_t t = 0; t < dm.T; ++t) {
        if (t % chunk == 0 && !states.empty()) state_at(states, b, s, t / chunk) = S;
        step_state(S, K.row(t), V.row(t), T(std::exp(G[t])), Bt[t]);
        for (index_t h = s * dm.group(); h < (s + 1) * dm.group(); ++h)
          head(out, b, h).row(t).noalias() = sc * (head(q, b, h).row(t) * S);
      }
      if (!states.empty()) state_at(states, b, s, dm.n_chunks) = S;
    }
}

// Same contract as backward_chunked.
template <class T>
void backward_recurrent(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v, TensorView<const T> g,
                        TensorView<const T> beta, TensorView<const T> states, TensorView<const T> d_out,
                        TensorView<const T> d_final, TensorView<T> dq, TensorView<T> dk, TensorView<T> dv,
                        TensorView<T> dg, TensorView<T> dbeta, TensorView<T> ds0, index_t chunk, double scale) {
  const Dims dm = check_backward(q, k, v, g, beta, states, d_out, d_final, dq, dk, dv, dg, dbeta, ds0, chunk);
  using Mat = Matrix<T>;
  using Vec = Vector<T>;
  const T sc = T(scale);
  std::vector<Mat> St(static_cast<std::size_t>(std::min(chunk, std::max<index_t>(dm.T, 1)) + 1));
  Mat dS, P;
  Vec kv, dw, u, w;
  for (index_t b = 0; b < dm.B; ++b)
    for (index_t s = 0; s < dm.Hs; ++s) {
      if (d_final.empty())
        dS.setZero(dm.D, dm.Dv);
      else
        dS = state_at(d_final, b, s);
      const auto K = head(k, b, s);
      const auto V = head(v, b, s);
      const auto G = scalars(g, b, s), Bt = scalars(beta, b, s);
      for (index_t ci = dm.n_chunks - 1; ci >= 0; --ci) {
        const index_t t0 = ci * chunk, n = std::min(chunk, dm.T - t0);
        St[0] = state_at(states, b, s, ci);
        for (index_t i = 0; i < n; ++i) {
          St[i + 1] = St[i];
          step_state(St[i + 1], K.row(t0 + i), V.row(t0 + i), T(std::exp(G[t0 + i])), Bt[t0 + i]);
        }
        for (index_t i = n - 1; i >= 0; --i) {
          const index_t t = t0 + i;
          const Mat& S_prev = St[i];
          const Mat& S_t = St[i + 1];
          for (index_t h = s * dm.group(); h < (s + 1) * dm.group(); ++h) {
            const auto q_row = head(q, b, h).row(t);
            const auto do_row = head(d_out, b, h).row(t);
            dS.noalias() += sc * q_row.transpose() * do_row;
            head(dq, b, h).row(t).noalias() += sc * (S_t * do_row.transpose()).transpose();
          }
          const T a = T(std::exp(G[t])), bt = Bt[t];
          const auto k_row = K.row(t);
          P = a * S_prev;
          u = V.row(t).transpose() - P.transpose() * k_row.transpose();
          w = bt * u;
          dw.noalias() = dS.transpose() * k_row.transpose();
          auto dk_row = head(dk, b, s).row(t);
          dk_row.noalias() += (dS * w).transpose();
          dbeta(b, t, s) += dw.dot(u);
          head(dv, b, s).row(t).noalias() += bt * dw.transpose();
          // u = v − Pᵀ k:  dP −= β k dwᵀ,  dk −= β P dw.
          dS.noalias() -= bt * k_row.transpose() * dw.transpose();
          dk_row.noalias() -= bt * (P * dw).transpose();
          dg(b, t, s) += a * dS.cwiseProduct(S_prev).sum();
          dS *= a;
        }
      }
      if (!ds0.empty()) state_at(ds0, b, s) += dS;
    }
}

// One decode step for a batch of single tokens: q [B,H,D], k [B,Hs,D], v [B,Hs,Dv], g and
// beta [B,Hs]; state [B,Hs,D,Dv] advances in place; out [B,H,Dv].
template <class T>
void decode_step(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v, TensorView<const T> g,
                 TensorView<const T> beta, TensorView<T> state, TensorView<T> out, double scale) {
  require_rank(q, 3, "GatedDeltaNet step q");
  const index_t B = q.dim(0), H = q.dim(1), D = q.dim(2), Hs = k.rank() == 3 ? k.dim(1) : 0;
  require(Hs >= 1 && H % Hs == 0, "GatedDeltaNet step k: shape ", k.shape, ", expected [", B, ", state heads dividing ",
          H, ", ", D, "]");
  require_shape(k, Shape{B, Hs, D}, "GatedDeltaNet step k");
  require_rank(v, 3, "GatedDeltaNet step v");
  const index_t Dv = v.dim(2);
  require_shape(v, Shape{B, Hs, Dv}, "GatedDeltaNet step v");
  require_shape(g, Shape{B, Hs}, "GatedDeltaNet step g");
  require_shape(beta, Shape{B, Hs}, "GatedDeltaNet step beta");
  require_shape(state, Shape{B, Hs, D, Dv}, "GatedDeltaNet step state");
  require_shape(out, Shape{B, H, Dv}, "GatedDeltaNet step out");
  for (auto [x, what] : {std::pair{q, "q"},
                         {k, "k"},
                         {v, "v"},
                         {g, "g"},
                         {beta, "beta"},
                         {TensorView<const T>(state), "state"},
                         {TensorView<const T>(out), "out"}})
    require_dense(x, what);
  const index_t group = H / Hs;
  Matrix<T> S;
  for (index_t b = 0; b < B; ++b)
    for (index_t s = 0; s < Hs; ++s) {
      auto state_map = state_at(state, b, s);
      S = state_map;
      const VectorMap<const T> k_vec(&k(b, s, 0), D), v_vec(&v(b, s, 0), Dv);
      step_state(S, k_vec.transpose(), v_vec.transpose(), T(std::exp(g(b, s))), beta(b, s));
      state_map = S;
      for (index_t h = s * group; h < (s + 1) * group; ++h)
        VectorMap<T>(&out(b, h, 0), Dv).noalias() = T(scale) * (S.transpose() * VectorMap<const T>(&q(b, h, 0), D));
    }
}

// x̂ = x / sqrt(‖x‖² + eps) along the last axis of a dense [..., D] tensor; inv_norm keeps
// 1 / sqrt(‖x‖² + eps) per row.
template <class T>
void l2_normalize(TensorView<const T> x, TensorView<T> x_hat, TensorView<T> inv_norm, double eps) {
  const index_t D = x.dim(x.rank() - 1), rows = x.numel() / std::max<index_t>(D, 1);
  const MatrixMap<const T> X(x.data, rows, D);
  MatrixMap<T> Xh(x_hat.data, rows, D);
  for (index_t r = 0; r < rows; ++r) {
    const T inv = T(1.0 / std::sqrt(double(X.row(r).squaredNorm()) + eps));
    inv_norm.data[r] = inv;
    Xh.row(r) = inv * X.row(r);
  }
}

// dx += (dx̂ − x̂ (x̂·dx̂)) / sqrt(‖x‖² + eps).
template <class T>
void l2_normalize_backward(TensorView<const T> x_hat, TensorView<const T> inv_norm, TensorView<const T> dx_hat,
                           TensorView<T> dx) {
  const index_t D = x_hat.dim(x_hat.rank() - 1), rows = x_hat.numel() / std::max<index_t>(D, 1);
  const MatrixMap<const T> Xh(x_hat.data, rows, D), dXh(dx_hat.data, rows, D);
  MatrixMap<T> dX(dx.data, rows, D);
  for (index_t r = 0; r < rows; ++r)
    dX.row(r) += inv_norm.data[r] * (dXh.row(r) - Xh.row(r).dot(dXh.row(r)) * Xh.row(r));
}

// log σ(z), without overflow for either sign of z.
inline double log_sigmoid(double z) { return std::min(z, 0.0) - std::log1p(std::exp(-std::abs(z))); }
inline double sigmoid(double z) { return z >= 0 ? 1.0 / (1.0 + std::exp(-z)) : std::exp(z) / (1.0 + std::exp(z)); }

// g = log σ(z) / normaliser and β = σ(y), elementwise (z, y: the gates' pre-activations).
template <class T>
void gates_forward(TensorView<const T> z, TensorView<const T> y, TensorView<T> g, TensorView<T> beta,
                   double normaliser) {
  for (index_t i = 0; i < z.numel(); ++i) {
    g.data[i] = T(log_sigmoid(double(z.data[i])) / normaliser);
    beta.data[i] = T(sigmoid(double(y.data[i])));
  }
}

// dz = dg · σ(−z) / normaliser, with σ(−z) = 1 − exp(normaliser · g) = −expm1(log σ(z));
// dy = dβ · β (1 − β). Written (not added) into dz and dy.
template <class T>
void gates_backward(TensorView<const T> g, TensorView<const T> beta, TensorView<const T> dg, TensorView<const T> dbeta,
                    TensorView<T> dz, TensorView<T> dy, double normaliser) {
  for (index_t i = 0; i < g.numel(); ++i) {
    const double sig_neg = -std::expm1(normaliser * double(g.data[i]));
    dz.data[i] = T(double(dg.data[i]) * sig_neg / normaliser);
    const double b = double(beta.data[i]);
    dy.data[i] = T(double(dbeta.data[i]) * b * (1 - b));
  }
}

}  // namespace dash::eigen::gdn

// CPU (Eigen) math of gated linear attention, on the mixer's own q, k, v and log decays:
//
//   S_t = a_t·S_{t−1} + k_t v_tᵀ,   o_t = scale · S_tᵀ q_t,   a_t = exp(g_t)
//
// per query head h, with k/v head h / (H / Hkv) (GQA: the state is per query head, because
// the decay is). Shapes: q [B,T,H,Dk], k [B,T,Hkv,Dk], v [B,T,Hkv,Dv], g [B,T,H] (log decays,
// ≤ 0 in practice), o [B,T,H,Dv], states [B,H,Dk,Dv]. An initial state is optional (empty view:
// zero), and so is the final state. Computation is in T: float for the reference, double for
// gradient tests.
//
// Chunked form (training, prefill). Within a chunk of C tokens starting from state S_0, with the
// cumulative log decay b_i = Σ_{j≤i} g_j from the chunk start and b_C its last value:
//   o_i   = scale·(e^{b_i} q_iᵀ S_0 + Σ_{j≤i} e^{b_i−b_j} (q_i·k_j) v_j)
//   S_end = e^{b_C} S_0 + Σ_j e^{b_C−b_j} k_j v_jᵀ
// Every exponent is a sum of log decays over an interval, so it is ≤ 0 and nothing overflows,
// however strong the decay or long the chunk (e^{−b_j} alone would overflow); each is summed
// over its own interval rather than taken as a difference of prefix sums, so its rounding error
// is relative to itself.
//
// Backward of one chunk, with dS' the gradient reaching its end state from later chunks and
// D_ij = e^{b_i−b_j} [j ≤ i]:
//   dq_i = scale·(e^{b_i} S_0 do_i + Σ_{j≤i} D_ij (do_i·v_j) k_j)
//   dk_j = scale·Σ_{i≥j} D_ij (do_i·v_j) q_i + e^{b_C−b_j} dS' v_j
//   dv_j = scale·Σ_{i≥j} D_ij (q_i·k_j) do_i + e^{b_C−b_j} dS'ᵀ k_j
//   dS_0 = scale·Σ_i e^{b_i} q_i do_iᵀ + e^{b_C} dS'
//   ∂L/∂b_i = q_i·dq_i − k_i·dk_i  (+ ⟨dS', S_end⟩ for the last i),  dg_j = Σ_{i≥j} ∂L/∂b_i
// (every term of the output or state that carries e^{+b_i} is linear in q_i, every term that
// carries e^{−b_j} is linear in k_j). The recurrent backward uses the same identity over the
// whole sequence, so it needs no stored states: one forward sweep gives dq_t = scale·S_t do_t,
// one reverse sweep carries dS_t = scale·q_t do_tᵀ + a_{t+1} dS_{t+1} and gives dk, dv, and
//   dg_t = Σ_{t'≥t} (q_t'·dq_t' − k_t'·dk_t') + ⟨dS_T, S_T⟩   (dS_T: the given final-state gradient).
//
// Backward functions add into dq, dk, dv, dg and the initial-state gradient; forward functions
// overwrite o and the final state. The final state may alias the initial state (decode).
#pragma once

#include <algorithm>
#include <cmath>
#include <string_view>
#include <vector>

#include <Eigen/Core>

#include "dash/core/eigen.hpp"
#include "dash/core/tensor.hpp"

namespace dash::eigen::gla {

struct Dims {
  index_t B = 0, T = 0, H = 0, Hkv = 0, Dk = 0, Dv = 0;
  index_t group() const { return H / Hkv; }
};

namespace detail {

template <class T>
void require_rows(TensorView<T> x, std::string_view what) {
  require_host(x, what);
  require(x.stride[x.rank() - 1] == 1, what, ": last axis must have unit stride (shape ", x.shape, ")");
}

template <class T>
Dims check_inputs(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v, TensorView<const T> g,
                  TensorView<const T> state_in, std::string_view fn) {
  require_rank(q, 4, "gla q");
  require_rank(k, 4, "gla k");
  require_rank(v, 4, "gla v");
  Dims d{q.dim(0), q.dim(1), q.dim(2), k.dim(2), q.dim(3), v.dim(3)};
  require(d.Hkv > 0 && d.H % d.Hkv == 0, fn, ": ", d.H, " query heads are not a multiple of ", d.Hkv, " k/v heads");
  require_shape(k, Shape{d.B, d.T, d.Hkv, d.Dk}, "gla k");
  require_shape(v, Shape{d.B, d.T, d.Hkv, d.Dv}, "gla v");
  require_shape(g, Shape{d.B, d.T, d.H}, "gla g (log decay)");
  require_rows(q, "gla q"), require_rows(k, "gla k"), require_rows(v, "gla v"), require_host(g, "gla g");
  if (!state_in.empty()) {
    require_shape(state_in, Shape{d.B, d.H, d.Dk, d.Dv}, "gla initial state");
    require_rows(state_in, "gla initial state");
  }
  return d;
}

template <class T>
void check_output(TensorView<T> x, const Shape& expected, std::string_view what) {
  require_shape(x, expected, what);
  require_rows(x, what);
}

// The [Dk, Dv] state of (b, h) in a [B, H, Dk, Dv] view.
template <class T>
StridedMap<T> state(TensorView<T> s, index_t b, index_t h) {
  return StridedMap<T>(s.data + b * s.stride[0] + h * s.stride[1], s.dim(2), s.dim(3),
                       Eigen::OuterStride<>(s.stride[2]));
}

// The decays of one chunk of head (b, h): rows [t0, t0 + n). Every exponent is summed directly
// over its own interval of log decays, so its rounding error scales with the exponent itself,
// not with the cumulative sum from the chunk start (which matters in float over long chunks).
template <class T>
struct ChunkDecay {
  Vector<T> log_g;  // g_{t0+i}
  Vector<T> head;   // e^{b_i},       b_i = Σ_{l≤i} g_l
  Vector<T> tail;   // e^{b_C − b_i} = e^{Σ_{l>i} g_l}
  Matrix<T> pair;   // e^{b_i − b_j} = e^{Σ_{j<l≤i} g_l} for j ≤ i, 0 above the diagonal
  T total = 0;      // e^{b_C}

  void compute(TensorView<const T> g, index_t b, index_t h, index_t t0, index_t n, bool with_pair) {
    log_g.resize(n), head.resize(n), tail.resize(n);
    for (index_t i = 0; i < n; ++i) log_g(i) = g(b, t0 + i, h);
    T sum = 0;
    for (index_t i = 0; i < n; ++i) head(i) = std::exp(sum += log_g(i));
    total = std::exp(sum);
    sum = 0;
    for (index_t i = n - 1; i >= 0; --i) tail(i) = std::exp(sum), sum += log_g(i);
    if (!with_pair) return;
    pair.setZero(n, n);
    for (index_t i = 0; i < n; ++i) {
      sum = 0;
      pair(i, i) = 1;
      for (index_t j = i - 1; j >= 0; --j) pair(i, j) = std::exp(sum += log_g(j + 1));
    }
  }
};

}  // namespace detail

// Chunked parallel form. `chunk` ≥ 1; chunk ≥ T is the fully parallel (quadratic) form.
template <class T>
void forward_chunked(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v, TensorView<const T> g,
                     double scale, index_t chunk, TensorView<const T> state_in, TensorView<T> o,
                     TensorView<T> state_out = {}) {
  const Dims d = detail::check_inputs(q, k, v, g, state_in, "gla forward_chunked");
  require(chunk >= 1, "gla forward_chunked: chunk = ", chunk, ", expected ≥ 1");
  detail::check_output(o, Shape{d.B, d.T, d.H, d.Dv}, "gla o");
  if (!state_out.empty()) detail::check_output(state_out, Shape{d.B, d.H, d.Dk, d.Dv}, "gla final state");
  const T s = static_cast<T>(scale);
  Matrix<T> S(d.Dk, d.Dv), A;
  detail::ChunkDecay<T> decay;
  for (index_t b = 0; b < d.B; ++b)
    for (index_t h = 0; h < d.H; ++h) {
      const index_t kh = h / d.group();
      const auto Q = head(q, b, h), K = head(k, b, kh), V = head(v, b, kh);
      auto O = head(o, b, h);
      if (state_in.empty()) S.setZero();
      else S = detail::state(state_in, b, h);
      for (index_t t0 = 0; t0 < d.T; t0 += chunk) {
        const index_t n = std::min(chunk, d.T - t0);
        const auto Qc = Q.middleRows(t0, n), Kc = K.middleRows(t0, n), Vc = V.middleRows(t0, n);
        decay.compute(g, b, h, t0, n, true);
        A.noalias() = Qc * Kc.transpose();
        A = A.cwiseProduct(decay.pair) * s;
        auto Oc = O.middleRows(t0, n);
        Oc.noalias() = A * Vc;
        Oc.noalias() += (s * decay.head).asDiagonal() * (Qc * S);
        S *= decay.total;
        S.noalias() += Kc.transpose() * decay.tail.asDiagonal() * Vc;
      }
      if (!state_out.empty()) detail::state(state_out, b, h) = S;
    }
}

// Recurrent form: one token at a time, O(Dk·Dv) memory per head.
template <class T>
void forward_recurrent(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v, TensorView<const T> g,
                       double scale, TensorView<const T> state_in, TensorView<T> o, TensorView<T> state_out = {}) {
  const Dims d = detail::check_inputs(q, k, v, g, state_in, "gla forward_recurrent");
  detail::check_output(o, Shape{d.B, d.T, d.H, d.Dv}, "gla o");
  if (!state_out.empty()) detail::check_output(state_out, Shape{d.B, d.H, d.Dk, d.Dv}, "gla final state");
  const T s = static_cast<T>(scale);
  Matrix<T> S(d.Dk, d.Dv);
  for (index_t b = 0; b < d.B; ++b)
    for (index_t h = 0; h < d.H; ++h) {
      const index_t kh = h / d.group();
      const auto Q = head(q, b, h), K = head(k, b, kh), V = head(v, b, kh);
      auto O = head(o, b, h);
      if (state_in.empty()) S.setZero();
      else S = detail::state(state_in, b, h);
      for (index_t t = 0; t < d.T; ++t) {
        S *= std::exp(g(b, t, h));
        S.noalias() += K.row(t).transpose() * V.row(t);
        O.row(t).noalias() = s * (Q.row(t) * S);
      }
      if (!state_out.empty()) detail::state(state_out, b, h) = S;
    }
}

// Decode: advances `state` [B,H,Dk,Dv] in place over the given tokens (T = 1 for one decode step)
// and writes their outputs.
template <class T>
void decode_step(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v, TensorView<const T> g,
                 double scale, TensorView<T> state, TensorView<T> o) {
  require(!state.empty(), "gla decode_step: state is empty, expected [B, H, Dk, Dv]");
  forward_recurrent<T>(q, k, v, g, scale, state, o, state);
}

namespace detail {
template <class T>
Dims check_backward(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v, TensorView<const T> g,
                    TensorView<const T> state_in, TensorView<const T> d_o, TensorView<const T> d_state_out,
                    TensorView<T> dq, TensorView<T> dk, TensorView<T> dv, TensorView<T> dg, TensorView<T> d_state_in,
                    std::string_view fn) {
  const Dims d = check_inputs(q, k, v, g, state_in, fn);
  require_shape(d_o, Shape{d.B, d.T, d.H, d.Dv}, "gla d_o");
  require_rows(d_o, "gla d_o");
  const Shape state_shape{d.B, d.H, d.Dk, d.Dv};
  if (!d_state_out.empty()) {
    require_shape(d_state_out, state_shape, "gla final-state gradient");
    require_rows(d_state_out, "gla final-state gradient");
  }
  check_output(dq, q.shape, "gla dq");
  check_output(dk, k.shape, "gla dk");
  check_output(dv, v.shape, "gla dv");
  require_shape(dg, g.shape, "gla dg");
  require_host(dg, "gla dg");
  if (!d_state_in.empty()) {
    require(!state_in.empty(), fn, ": initial-state gradient requested without an initial state");
    check_output(d_state_in, state_shape, "gla initial-state gradient");
  }
  return d;
}
}  // namespace detail

// Backward of forward_chunked. Recomputes the chunk-boundary states (one pass, O(T/C·Dk·Dv)
// memory per head) and walks the chunks backwards. `d_state_out` (may be empty) is the
// gradient reaching the final state; `d_state_in` (may be empty) receives the initial state's.
template <class T>
void backward_chunked(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v, TensorView<const T> g,
                      double scale, index_t chunk, TensorView<const T> state_in, TensorView<const T> d_o,
                      TensorView<const T> d_state_out, TensorView<T> dq, TensorView<T> dk, TensorView<T> dv,
                      TensorView<T> dg, TensorView<T> d_state_in = {}) {
  const Dims d = detail::check_backward(q, k, v, g, state_in, d_o, d_state_out, dq, dk, dv, dg, d_state_in,
                                        "gla backward_chunked");
  require(chunk >= 1, "gla backward_chunked: chunk = ", chunk, ", expected ≥ 1");
  const T s = static_cast<T>(scale);
  const index_t n_chunks = (d.T + chunk - 1) / chunk;
  std::vector<Matrix<T>> states(static_cast<std::size_t>(n_chunks + 1));
  Matrix<T> dS(d.Dk, d.Dv), A, dA, dQc, dKc, dVc;
  Vector<T> db;
  detail::ChunkDecay<T> decay;
  for (index_t b = 0; b < d.B; ++b)
    for (index_t h = 0; h < d.H; ++h) {
      const index_t kh = h / d.group();
      const auto Q = head(q, b, h), K = head(k, b, kh), V = head(v, b, kh), dO = head(d_o, b, h);
      auto dQ = head(dq, b, h);
      auto dK = head(dk, b, kh), dV = head(dv, b, kh);
      // states[c]: the state at the start of chunk c; states[n_chunks]: the final state.
      if (state_in.empty()) states[0].setZero(d.Dk, d.Dv);
      else states[0] = detail::state(state_in, b, h);
      for (index_t c = 0; c < n_chunks; ++c) {
        const index_t t0 = c * chunk, n = std::min(chunk, d.T - t0);
        decay.compute(g, b, h, t0, n, false);
        states[c + 1] = decay.total * states[c];
        states[c + 1].noalias() += K.middleRows(t0, n).transpose() * decay.tail.asDiagonal() * V.middleRows(t0, n);
      }
      if (d_state_out.empty()) dS.setZero();
      else dS = detail::state(d_state_out, b, h);
      for (index_t c = n_chunks - 1; c >= 0; --c) {
        const index_t t0 = c * chunk, n = std::min(chunk, d.T - t0);
        const auto Qc = Q.middleRows(t0, n), Kc = K.middleRows(t0, n), Vc = V.middleRows(t0, n);
        const auto dOc = dO.middleRows(t0, n);
        const Matrix<T>& S0 = states[c];
        decay.compute(g, b, h, t0, n, true);
        A.noalias() = Qc * Kc.transpose();
        A = A.cwiseProduct(decay.pair) * s;
        dA.noalias() = dOc * Vc.transpose();
        dA = dA.cwiseProduct(decay.pair) * s;
        dQc.noalias() = dA * Kc;
        dQc.noalias() += (s * decay.head).asDiagonal() * (dOc * S0.transpose());
        dKc.noalias() = dA.transpose() * Qc;
        dKc.noalias() += decay.tail.asDiagonal() * (Vc * dS.transpose());
        dVc.noalias() = A.transpose() * dOc;
        dVc.noalias() += decay.tail.asDiagonal() * (Kc * dS);
        db = Qc.cwiseProduct(dQc).rowwise().sum() - Kc.cwiseProduct(dKc).rowwise().sum();
        db(n - 1) += dS.cwiseProduct(states[c + 1]).sum();
        T acc = 0;
        for (index_t i = n - 1; i >= 0; --i) dg(b, t0 + i, h) += acc += db(i);
        dS *= decay.total;
        dS.noalias() += Qc.transpose() * (s * decay.head).asDiagonal() * dOc;
        dQ.middleRows(t0, n) += dQc;
        dK.middleRows(t0, n) += dKc;
        dV.middleRows(t0, n) += dVc;
      }
      if (!d_state_in.empty()) detail::state(d_state_in, b, h) += dS;
    }
}

// Backward of forward_recurrent, with O(Dk·Dv) state memory: a forward sweep for dq and the
// final state, a reverse sweep for dk, dv, dg and the initial-state gradient.
template <class T>
void backward_recurrent(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v, TensorView<const T> g,
                        double scale, TensorView<const T> state_in, TensorView<const T> d_o,
                        TensorView<const T> d_state_out, TensorView<T> dq, TensorView<T> dk, TensorView<T> dv,
                        TensorView<T> dg, TensorView<T> d_state_in = {}) {
  const Dims d = detail::check_backward(q, k, v, g, state_in, d_o, d_state_out, dq, dk, dv, dg, d_state_in,
                                        "gla backward_recurrent");
  const T s = static_cast<T>(scale);
  Matrix<T> S(d.Dk, d.Dv), dS(d.Dk, d.Dv), dQl(d.T, d.Dk);
  Eigen::Matrix<T, 1, Eigen::Dynamic> dk_t(d.Dk);
  for (index_t b = 0; b < d.B; ++b)
    for (index_t h = 0; h < d.H; ++h) {
      const index_t kh = h / d.group();
      const auto Q = head(q, b, h), K = head(k, b, kh), V = head(v, b, kh), dO = head(d_o, b, h);
      auto dQ = head(dq, b, h);
      auto dK = head(dk, b, kh), dV = head(dv, b, kh);
      if (state_in.empty()) S.setZero();
      else S = detail::state(state_in, b, h);
      for (index_t t = 0; t < d.T; ++t) {
        S *= std::exp(g(b, t, h));
        S.noalias() += K.row(t).transpose() * V.row(t);
        dQl.row(t).noalias() = s * (dO.row(t) * S.transpose());
      }
      dQ += dQl;
      // acc: ∂L/∂(log a_t), accumulated from the end; it starts at ⟨dS_T, S_T⟩.
      if (d_state_out.empty()) dS.setZero();
      else dS = detail::state(d_state_out, b, h);
      T acc = dS.cwiseProduct(S).sum();
      for (index_t t = d.T - 1; t >= 0; --t) {
        dS.noalias() += s * (Q.row(t).transpose() * dO.row(t));
        dk_t.noalias() = V.row(t) * dS.transpose();
        dK.row(t) += dk_t;
        dV.row(t).noalias() += K.row(t) * dS;
        acc += Q.row(t).dot(dQl.row(t)) - K.row(t).dot(dk_t);
        dg(b, t, h) += acc;
        dS *= std::exp(g(b, t, h));
      }
      if (!d_state_in.empty()) detail::state(d_state_in, b, h) += dS;
    }
}

}  // namespace dash::eigen::gla

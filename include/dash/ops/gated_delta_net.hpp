// GatedDeltaNet (name "gdn"): the gated delta rule (DESIGN.md §3), a token mixer with its own
// projections, initialised from the teacher's.
//
// For the layer input h [B, T, d_model], per state head s and token t:
//   q = h·Wqᵀ (+bq),  k = h·Wkᵀ (+bk),  v = h·Wvᵀ (+bv)         (no RoPE: position enters through the decay)
//   q̂ = q / sqrt(‖q‖² + ε),  k̂ = k / sqrt(‖k‖² + ε)             (per head)
//   g_t = log σ(h_t·w_gateᵀ + b_gate) / γ,  a_t = exp(g_t) ∈ (0, 1)   (γ = gate_normaliser)
//   β_t = σ(h_t·w_betaᵀ + b_beta) ∈ (0, 1)
//   S_t = a_t (I − β_t k̂_t k̂_tᵀ) S_{t−1} + β_t k̂_t v_tᵀ,   S ∈ R^{D×D}, S_0 = 0 or step's state
//   o_t = scale · S_tᵀ q̂_t    (query head h reads state head h / (H / Hs))
//   y = o·Woᵀ
// The chunked (WY / UT) and recurrent forms, their backward and the decode step are in
// gated_delta_net/eigen.hpp, with the derivation.
//
// State heads. By default every query head owns a state (state_per_query_head): the teacher's
// k/v heads are repeated to n_heads (repeat_kv_heads), and w_gate, w_beta are [n_heads, d_model].
// With state_per_query_head = false the op keeps the teacher's n_kv_heads states, shared by each
// group of query heads (GQA), and the gates are [n_kv_heads, d_model].
//
// Initialisation (init_from_teacher):
//   * Wq, Wk, Wv, Wo and biases: the teacher's (k/v heads repeated as above).
//   * b_gate: a per-head constant decay a_s whose half-life −ln 2 / ln a_s is spaced
//     geometrically from init_half_life_min (16) to init_half_life_max (1024) tokens across
//     the state heads (so a_s ∈ [0.958, 0.9993]: every head starts close to 1, with short- and
//     long-memory heads); b = L − log(1 − e^L) with L = γ·ln a_s, i.e. log σ(b) = γ·ln a_s.
//     With γ = 16 a half-life of 16 tokens is b = 0 (GLA's default point) and 1024 is b ≈ 4.5.
//   * w_gate, w_beta: N(0, (init_gate_weight_std / sqrt(d_model))²), std 0.1/sqrt(d_model): the
//     data-dependent part of either gate starts small (about 0.1 × the rms of h) and is learned.
//   * b_beta = 0: β starts at 1/2, halfway between keeping (β → 0, plain decayed linear
//     attention) and overwriting (β → 1) the value stored under a key.
//   * scale = 1 (not fla's 1/sqrt(D)): q̂ and k̂ are unit vectors, so a query equal to a stored
//     key reads back a value of the size of v, which is what the teacher's Wo expects.
//
// Cost: a state of Hs·D·D elements at query.state_bytes_per_element each (fp32 by default,
// as for GatedLinear), constant in the context length; FLOPs of the configured form (cost()).
//
// Decoding: `step` runs tokens h [B, T, d_model] (T = 1: one decode step; more: a prefill) from
// a `State` and leaves the state after the last token in it. No backward.
//
// Dispatch: views on the host run the Eigen reference.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>

#include "dash/core/error.hpp"
#include "dash/core/rng.hpp"
#include "dash/core/tensor.hpp"
#include "dash/ops/attention.hpp"
#include "dash/ops/detail/linear.hpp"
#include "dash/ops/gated_delta_net/eigen.hpp"
#include "dash/ops/operator.hpp"
#include "dash/ops/projections.hpp"

namespace dash {

struct GatedDeltaNet {
  static constexpr std::string_view name = "gdn";
  static constexpr bool shares_teacher_projections = false;

  enum class Form : std::uint8_t { chunked, recurrent };

  Form form = Form::chunked;
  index_t chunk = 64;           // chunk length (chunked form) and checkpoint interval (both forms)
  double gate_normaliser = 16;  // γ in g = log σ(z) / γ
  double scale = 1;             // o = scale · Sᵀ q̂
  double norm_eps = 1e-6;       // ε in q̂ = q / sqrt(‖q‖² + ε)
  bool state_per_query_head = true;
  double init_half_life_min = 16, init_half_life_max = 1024;  // tokens
  double init_gate_weight_std = 0.1;                          // × 1/sqrt(d_model)

  template <class T>
  struct Params {
    AttentionWeights<T> proj;  // own Wq, Wk, Wv, Wo (+ biases), k/v with one head per state
    Tensor<T> w_gate;          // [Hs, d_model]
    Tensor<T> b_gate;          // [Hs]
    Tensor<T> w_beta;          // [Hs, d_model]
    Tensor<T> b_beta;          // [Hs]

    template <class F>
    void for_each(F&& f) {
      proj.for_each(f);
      f("w_gate", w_gate), f("b_gate", b_gate), f("w_beta", w_beta), f("b_beta", b_beta);
    }

    int state_heads() const { return static_cast<int>(w_gate.dim(0)); }

    // The teacher's shape with n_kv_heads = the number of state heads: the shape of proj.
    AttentionShape shape_for(const AttentionShape& teacher) const {
      AttentionShape own = teacher;
      own.n_kv_heads = state_heads();
      return own;
    }

    void validate(const AttentionShape& teacher) const {
      require(w_gate.rank() == 2 && w_gate.dim(0) >= 1, "GatedDeltaNet params: w_gate has shape ", w_gate.shape(),
              ", expected [state heads, ", teacher.d_model, "]");
      const AttentionShape own = shape_for(teacher);
      require(own.n_kv_heads >= 1 && teacher.n_heads % own.n_kv_heads == 0, "GatedDeltaNet params: ", own.n_kv_heads,
              " state heads (w_gate ", w_gate.shape(), ") must divide n_heads = ", teacher.n_heads);
      proj.validate(own);
      const index_t Hs = own.n_kv_heads;
      require_shape(w_gate.view(), Shape{Hs, own.d_model}, "GatedDeltaNet params: w_gate");
      require_shape(b_gate.view(), Shape{Hs}, "GatedDeltaNet params: b_gate");
      require_shape(w_beta.view(), Shape{Hs, own.d_model}, "GatedDeltaNet params: w_beta");
      require_shape(b_beta.view(), Shape{Hs}, "GatedDeltaNet params: b_beta");
    }

    // Same shapes, every element zero: a gradient accumulator.
    Params zeros_like() const {
      Params z = *this;
      z.for_each([](const char*, Tensor<T>& t) { t.fill(T(0)); });
      return z;
    }

    template <class U>
    Params<U> cast() const {
      const auto c = [](const Tensor<T>& t) { return dash::cast<U, T>(t.view()); };
      Params<U> out;
      out.proj.wq = c(proj.wq), out.proj.wk = c(proj.wk), out.proj.wv = c(proj.wv), out.proj.wo = c(proj.wo);
      if (!proj.bq.empty()) out.proj.bq = c(proj.bq), out.proj.bk = c(proj.bk), out.proj.bv = c(proj.bv);
      out.w_gate = c(w_gate), out.b_gate = c(b_gate), out.w_beta = c(w_beta), out.b_beta = c(b_beta);
      return out;
    }
  };

  // What forward keeps for backward.
  template <class T>
  struct Saved {
    Tensor<T> q, k, v;                 // q̂ [B,T,H,D], k̂ [B,T,Hs,D], v [B,T,Hs,D]
    Tensor<T> q_inv_norm, k_inv_norm;  // 1 / sqrt(‖·‖² + ε): [B,T,H], [B,T,Hs]
    Tensor<T> g, beta;                 // log decay and β: [B,T,Hs]
    Tensor<T> mixed;                   // o before Wo: [B,T,H,D]
    Tensor<T> states;                  // checkpoints [B,Hs,n_chunks+1,D,D] (eigen.hpp)
    index_t chunk = 0;                 // their interval
  };

  // The recurrent state for decoding: one D×D matrix per (batch, state head), and the number of
  // tokens it has seen.
  template <class T>
  struct State {
    Tensor<T> S;  // [B, Hs, D, D]
    index_t position = 0;
  };

  void validate() const {
    require(chunk >= 1, "GatedDeltaNet: chunk = ", chunk, ", expected >= 1");
    require(std::isfinite(gate_normaliser) && gate_normaliser > 0, "GatedDeltaNet: gate_normaliser = ", gate_normaliser,
            ", expected a finite value > 0");
    require(std::isfinite(scale), "GatedDeltaNet: scale = ", scale, ", expected a finite value");
    require(std::isfinite(norm_eps) && norm_eps > 0, "GatedDeltaNet: norm_eps = ", norm_eps,
            ", expected a finite value > 0");
    require(init_half_life_min > 0 && init_half_life_max >= init_half_life_min, "GatedDeltaNet: init half-lives [",
            init_half_life_min, ", ", init_half_life_max, "], expected 0 < min <= max");
  }

  int state_heads(const AttentionShape& teacher) const {
    return state_per_query_head ? teacher.n_heads : teacher.n_kv_heads;
  }

  // b with log σ(b) = γ · ln a, for the decay a = 2^(−1/half_life).
  static double gate_bias_for_half_life(double half_life, double normaliser) {
    const double L = -normaliser * std::log(2.0) / half_life;
    return L - std::log(-std::expm1(L));
  }

  // Half-life of state head s of Hs at initialisation: geometric from min to max.
  double init_half_life(int s, int Hs) const {
    if (Hs <= 1) return std::sqrt(init_half_life_min * init_half_life_max);
    return init_half_life_min * std::pow(init_half_life_max / init_half_life_min, double(s) / double(Hs - 1));
  }

  // Cost at `context` tokens. kv_bytes: the state, Hs·D·D elements. FLOPs (multiply-add = 2),
  // chunked form, per chunk of n tokens and state head: K Kᵀ 2n²D, the solve n²D, K S0 2nD²,
  // the state update 2nD² + D²; per query head: Q Kᵀ 2n²D, Q S0 2nD², (M ∘ Q Kᵀ) W 2n²D.
  // Recurrent form, per token and state head: the decay D², Sᵀk 2D², the update 2D²; per query
  // head: Sᵀ q 2D².
  Cost cost(const CostQuery& query) const {
    const AttentionShape& s = query.shape;
    const double Hs = state_heads(s), H = s.n_heads, D = s.d_head, T_ = double(query.context);
    Cost c;
    c.kv_bytes = Hs * D * D * query.state_bytes_per_element;
    if (form == Form::recurrent) {
      c.flops = T_ * (Hs * 5 * D * D + H * 2 * D * D);
    } else {
      const auto per_chunk = [&](double n) {
        return Hs * (2 * n * n * D + n * n * D + 2 * n * D * D + 2 * n * D * D + D * D) +
               H * (2 * n * n * D + 2 * n * D * D + 2 * n * n * D);
      };
      const index_t full = query.context / std::max<index_t>(chunk, 1), rest = query.context - full * chunk;
      c.flops = double(full) * per_chunk(double(chunk)) + (rest > 0 ? per_chunk(double(rest)) : 0.0);
    }
    c.softmax_layers = 0;
    return c;
  }

  template <class T>
  Params<T> init_from_teacher(const AttentionShape& teacher, const AttentionWeights<T>& w, Rng& rng) const {
    validate();
    w.validate(teacher);
    const int Hs = state_heads(teacher);
    Params<T> p;
    p.proj = repeat_kv_heads(teacher, w, Hs);
    const double weight_std = init_gate_weight_std / std::sqrt(double(teacher.d_model));
    p.w_gate = Tensor<T>(Shape{Hs, teacher.d_model});
    p.w_beta = Tensor<T>(Shape{Hs, teacher.d_model});
    fill_normal(p.w_gate.view(), rng, 0.0, weight_std);
    fill_normal(p.w_beta.view(), rng, 0.0, weight_std);
    p.b_gate = Tensor<T>(Shape{Hs});
    for (int s = 0; s < Hs; ++s) p.b_gate(s) = T(gate_bias_for_half_life(init_half_life(s, Hs), gate_normaliser));
    p.b_beta = Tensor<T>(Shape{Hs}, T(0));
    return p;
  }

  // y = GDN(h), from a zero state.
  template <class T>
  void forward(const AttentionShape& teacher, const Params<T>& p, TensorView<const T> h, TensorView<T> y,
               Saved<T>& saved) const {
    validate();
    p.validate(teacher);
    const AttentionShape own = p.shape_for(teacher);
    check_layer_io(own, h, y, "forward");
    mix<T>(own, p, h, saved, TensorView<const T>{});
    project_out<T>(own, p.proj, saved.mixed.view(), y);
  }

  // Adds into dh and grads.
  template <class T>
  void backward(const AttentionShape& teacher, const Params<T>& p, TensorView<const T> h, const Saved<T>& saved,
                TensorView<const T> dy, TensorView<T> dh, Params<T>& grads) const {
    validate();
    p.validate(teacher);
    grads.validate(teacher);
    const AttentionShape own = p.shape_for(teacher);
    check_layer_io(own, h, dh, "backward");
    require_shape(dy, h.shape, "GatedDeltaNet::backward: dy");
    require(dy.contiguous(), "GatedDeltaNet::backward: dy must be contiguous");
    const index_t B = h.dim(0), T_ = h.dim(1), Hs = own.n_kv_heads;
    require_shape(saved.mixed.view(), Shape{B, T_, own.n_heads, own.d_head},
                  "GatedDeltaNet::backward: saved.mixed (is `saved` from a forward on this h?)");
    Tensor<T> d_mixed(saved.mixed.shape(), T(0));
    project_out_backward<T>(p.proj, saved.mixed.view(), dy, d_mixed.view(), &grads.proj);

    Tensor<T> dq(saved.q.shape(), T(0)), dk(saved.k.shape(), T(0)), dv(saved.v.shape(), T(0));
    Tensor<T> dg(saved.g.shape(), T(0)), dbeta(saved.beta.shape(), T(0));
    const auto run = form == Form::chunked ? &eigen::gdn::backward_chunked<T> : &eigen::gdn::backward_recurrent<T>;
    run(saved.q.view(), saved.k.view(), saved.v.view(), saved.g.view(), saved.beta.view(), saved.states.view(),
        d_mixed.view(), TensorView<const T>{}, dq.view(), dk.view(), dv.view(), dg.view(), dbeta.view(),
        TensorView<T>{}, saved.chunk, scale);

    Tensor<T> dq_raw(dq.shape(), T(0)), dk_raw(dk.shape(), T(0));
    eigen::gdn::l2_normalize_backward<T>(saved.q.view(), saved.q_inv_norm.view(), dq.view(), dq_raw.view());
    eigen::gdn::l2_normalize_backward<T>(saved.k.view(), saved.k_inv_norm.view(), dk.view(), dk_raw.view());
    Tensor<T> dz(Shape{B, T_, Hs}), dzb(Shape{B, T_, Hs});
    eigen::gdn::gates_backward<T>(saved.g.view(), saved.beta.view(), dg.view(), dbeta.view(), dz.view(), dzb.view(),
                                  gate_normaliser);
    detail::linear_backward<T>(h, p.w_gate.view(), dz.view(), dh, grads.w_gate.view(), grads.b_gate.view());
    detail::linear_backward<T>(h, p.w_beta.view(), dzb.view(), dh, grads.w_beta.view(), grads.b_beta.view());
    project_qkv_backward<T>(p.proj, h, dq_raw.view(), dk_raw.view(), dv.view(), dh, &grads.proj);
  }

  // A zero state for a batch of B sequences.
  template <class T>
  State<T> initial_state(const AttentionShape& teacher, index_t batch) const {
    return State<T>{Tensor<T>(Shape{batch, state_heads(teacher), teacher.d_head, teacher.d_head}, T(0)), 0};
  }

  // Prefill or decode: runs the tokens h [B, T, d_model] (T = 1 for one decode step) from
  // `state`, writes y [B, T, d_model] and leaves in `state` the state after the last token.
  template <class T>
  void step(const AttentionShape& teacher, const Params<T>& p, TensorView<const T> h, State<T>& state,
            TensorView<T> y) const {
    validate();
    p.validate(teacher);
    const AttentionShape own = p.shape_for(teacher);
    check_layer_io(own, h, y, "step");
    const index_t B = h.dim(0), T_ = h.dim(1), H = own.n_heads, Hs = own.n_kv_heads, D = own.d_head;
    require_shape(state.S.view(), Shape{B, Hs, D, D}, "GatedDeltaNet::step: state.S");
    Saved<T> work;
    if (T_ == 1) {
      // The recurrence for one token, without checkpoints.
      allocate(work, B, 1, H, Hs, D, 0);
      mixer_inputs(own, p, h, work);
      const auto flat = [](const Tensor<T>& t, Shape s) { return TensorView<const T>(t.data(), s); };
      eigen::gdn::decode_step<T>(flat(work.q, Shape{B, H, D}), flat(work.k, Shape{B, Hs, D}),
                                 flat(work.v, Shape{B, Hs, D}), flat(work.g, Shape{B, Hs}),
                                 flat(work.beta, Shape{B, Hs}), state.S.view(),
                                 TensorView<T>(work.mixed.data(), Shape{B, H, D}), scale);
    } else {
      mix(own, p, h, work, TensorView<const T>(state.S.view()));
      const index_t last = work.states.dim(2) - 1;
      for (index_t b = 0; b < B; ++b)
        for (index_t s = 0; s < Hs; ++s)
          eigen::gdn::state_at(state.S.view(), b, s) = eigen::gdn::state_at(work.states.view(), b, s, last);
    }
    project_out<T>(own, p.proj, work.mixed.view(), y);
    state.position += T_;
  }

 private:
  template <class T>
  static void check_layer_io(const AttentionShape& own, TensorView<const T> h, TensorView<T> out,
                             std::string_view what) {
    const std::string prefix = "GatedDeltaNet::" + std::string(what) + ": ";
    require_host(h, prefix + "h");
    require_rank(h, 3, prefix + "h");
    require_shape(h, Shape{h.dim(0), h.dim(1), own.d_model}, prefix + "h");
    require(h.contiguous(), prefix, "h must be contiguous");
    require_host(out, prefix + "output");
    require_shape(out, h.shape, prefix + (what == "backward" ? "dh" : "y"));
    require(out.contiguous(), prefix, what == "backward" ? "dh" : "y", " must be contiguous");
  }

  template <class T>
  static void allocate(Saved<T>& w, index_t B, index_t T_, index_t H, index_t Hs, index_t D, index_t checkpoints) {
    w.q = Tensor<T>(Shape{B, T_, H, D}), w.k = Tensor<T>(Shape{B, T_, Hs, D}), w.v = Tensor<T>(Shape{B, T_, Hs, D});
    w.q_inv_norm = Tensor<T>(Shape{B, T_, H}), w.k_inv_norm = Tensor<T>(Shape{B, T_, Hs});
    w.g = Tensor<T>(Shape{B, T_, Hs}), w.beta = Tensor<T>(Shape{B, T_, Hs});
    w.mixed = Tensor<T>(Shape{B, T_, H, D});
    if (checkpoints > 0) w.states = Tensor<T>(Shape{B, Hs, checkpoints, D, D});
  }

  // Projections, L2 normalisation of q and k, and the gates, into w.q, w.k, w.v, the inverse
  // norms, w.g and w.beta.
  template <class T>
  void mixer_inputs(const AttentionShape& own, const Params<T>& p, TensorView<const T> h, Saved<T>& w) const {
    Tensor<T> q(w.q.shape()), k(w.k.shape());
    project_qkv<T>(own, p.proj, h, q.view(), k.view(), w.v.view());
    eigen::gdn::l2_normalize<T>(q.view(), w.q.view(), w.q_inv_norm.view(), norm_eps);
    eigen::gdn::l2_normalize<T>(k.view(), w.k.view(), w.k_inv_norm.view(), norm_eps);
    Tensor<T> z(w.g.shape()), zb(w.beta.shape());
    detail::linear_forward<T>(h, p.w_gate.view(), p.b_gate.view(), z.view());
    detail::linear_forward<T>(h, p.w_beta.view(), p.b_beta.view(), zb.view());
    eigen::gdn::gates_forward<T>(z.view(), zb.view(), w.g.view(), w.beta.view(), gate_normaliser);
  }

  // Everything before Wo, for the sequence h from the state s0 (empty: zero), in the configured
  // form, keeping the checkpoints.
  template <class T>
  void mix(const AttentionShape& own, const Params<T>& p, TensorView<const T> h, Saved<T>& w,
           TensorView<const T> s0) const {
    const index_t B = h.dim(0), T_ = h.dim(1);
    allocate(w, B, T_, own.n_heads, own.n_kv_heads, own.d_head, eigen::gdn::chunk_count(T_, chunk) + 1);
    w.chunk = chunk;
    mixer_inputs(own, p, h, w);
    const auto run = form == Form::chunked ? &eigen::gdn::forward_chunked<T> : &eigen::gdn::forward_recurrent<T>;
    run(w.q.view(), w.k.view(), w.v.view(), w.g.view(), w.beta.view(), s0, w.mixed.view(), w.states.view(), chunk,
        scale);
  }
};

static_assert(check_operator<GatedDeltaNet, double>());
static_assert(check_operator<GatedDeltaNet, float>());

}  // namespace dash

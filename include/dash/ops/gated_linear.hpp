// GatedLinear ("gla"): gated linear attention with a data-dependent per-head decay (DESIGN.md §3).
// It owns its projections (initialised from the teacher's) and maps the layer input h [B,T,d_model]
// to the layer output y [B,T,d_model]:
//
//   q = h·Wqᵀ + bq,  k = h·Wkᵀ + bk,  v = h·Wvᵀ + bv         (heads of d_head; k/v may be GQA)
//   z = h·w_gateᵀ + b_gate                                     (w_gate [n_heads, d_model], b_gate [n_heads])
//   g = log σ(z) / γ,   a = exp(g) = σ(z)^{1/γ} ∈ (0, 1)      (per token and query head; GLA's γ = 16)
//   S_t = a_t·S_{t−1} + k_t v_tᵀ,   o_t = scale · S_tᵀ q_t    (S per query head, [d_head, d_head], from 0)
//   y = o·Woᵀ
//
// The recurrence and its chunked form, forward and backward, are in gated_linear/eigen.hpp.
// The normaliser γ keeps the decay near 1 and slow to move: ∂log a/∂z = σ(−z)/γ.
//
// Initialisation (init_from_teacher): Wq, Wk, Wv, Wo and their biases are the teacher's (k/v heads
// repeated when `kv_heads` asks for more than the teacher has). The gate starts at long memory,
// like the softmax teacher: head j gets the bias b_j = logit(a_j^γ), where the decays a_j spread the
// memory lengths 1/(1 − a) geometrically from 1/(1 − init_decay_min) (head 0) to
// 1/(1 − init_decay_max) (last head): with the defaults 0.97 … 0.99, memories of 33 … 100 tokens
// (b = 0.46 … 1.75). w_gate ~ N(0, init_gate_std² / d_model), small, so that a depends on the data
// from the first step without moving far: for an input of unit RMS, z has standard deviation
// about init_gate_std around b, and a = σ(z)^{1/γ} moves by a·σ(−b)/γ per unit of z: with the
// default 0.1, a standard deviation of 0.0023 (head 0) to 0.0009 (last head) over tokens.
//
// GQA: the decay is per query head, so the state is too (n_heads·d_head² elements); query head h
// reads k/v head h / (n_heads / kv_heads). With kv_heads = n_heads every head trains its own k/v
// projections; the function at initialisation is the same either way.
//
// Options: `form` (chunked, for training and prefill; recurrent, token by token), `chunk`,
// `scale` (0: 1/sqrt(d_head)), `rope` (rotate q and k with the teacher's RoPE before mixing, so
// that q_i·k_j keeps the teacher's relative-position dependence; off by default, as in GLA).
// Decoding runs `step` on a `State` (the per-head matrices and the position), one token or many.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string_view>

#include "dash/core/rng.hpp"
#include "dash/core/tensor.hpp"
#include "dash/ops/attention.hpp"
#include "dash/ops/detail/linear.hpp"
#include "dash/ops/gated_linear/eigen.hpp"
#include "dash/ops/operator.hpp"
#include "dash/ops/projections.hpp"
#include "dash/ops/rope.hpp"

namespace dash {

struct GatedLinear {
  static constexpr std::string_view name = "gla";
  static constexpr bool shares_teacher_projections = false;

  enum class Form : std::uint8_t { chunked, recurrent };

  Form form = Form::chunked;
  index_t chunk = 64;             // tokens per chunk of the chunked form
  int kv_heads = 0;               // k/v heads of the op's own projections; 0: the teacher's
  double gate_normaliser = 16;    // γ
  double init_decay_min = 0.97;   // decay of head 0 at initialisation
  double init_decay_max = 0.99;   // decay of the last head at initialisation
  double init_gate_std = 0.1;     // w_gate ~ N(0, init_gate_std² / d_model)
  double scale = 0;               // output scale; 0: 1/sqrt(d_head)
  bool rope = false;              // apply the teacher's RoPE to q and k

  template <class T>
  struct Params {
    AttentionWeights<T> proj;  // wq, wk, wv, wo (+ bq, bk, bv), with kv_heads k/v heads
    Tensor<T> w_gate;          // [n_heads, d_model]
    Tensor<T> b_gate;          // [n_heads]

    template <class F>
    void for_each(F&& f) {
      proj.for_each(f);
      f("w_gate", w_gate), f("b_gate", b_gate);
    }
  };

  // What forward keeps for backward.
  template <class T>
  struct Saved {
    Tensor<T> q, k, v;  // after RoPE when `rope`
    Tensor<T> z, g;     // gate pre-activation and log decay, [B, T, n_heads]
    Tensor<T> o;        // mixer output before Wo, [B, T, n_heads, d_head]
  };

  // The recurrent state for decoding: one [d_head, d_head] matrix per (batch, query head), and
  // the position of the next token (for RoPE).
  template <class T>
  struct State {
    Tensor<T> S;  // [B, n_heads, d_head, d_head]
    index_t position = 0;
  };

  // The teacher's shape with this op's k/v head count.
  AttentionShape op_shape(const AttentionShape& teacher) const {
    teacher.validate();
    AttentionShape s = teacher;
    if (kv_heads != 0) {
      require(kv_heads > 0 && kv_heads % teacher.n_kv_heads == 0 && teacher.n_heads % kv_heads == 0,
              "GatedLinear: kv_heads = ", kv_heads, " must be a multiple of the teacher's ", teacher.n_kv_heads,
              " and divide n_heads = ", teacher.n_heads);
      s.n_kv_heads = kv_heads;
    }
    return s;
  }

  double output_scale(const AttentionShape& s) const {
    return scale != 0 ? scale : 1.0 / std::sqrt(double(s.d_head));
  }

  // State bytes are constant in the context length; FLOPs are those of the form in use
  // (chunked: per token and head 4·C·d_head for the intra-chunk products, 4·d_head² for the
  // state's read and update; recurrent: 5·d_head²).
  Cost cost(const CostQuery& query) const {
    const double H = query.shape.n_heads, D = query.shape.d_head, T = double(query.context);
    Cost c;
    c.kv_bytes = H * D * D * query.state_bytes_per_element;
    if (form == Form::chunked) {
      const double C = double(std::min<index_t>(chunk, std::max<index_t>(query.context, 1)));
      c.flops = H * T * (4 * C * D + 4 * D * D);
    } else {
      c.flops = H * T * 5 * D * D;
    }
    c.softmax_layers = 0;
    return c;
  }

  template <class T>
  Params<T> zero_params(const AttentionShape& teacher) const {
    const AttentionShape s = op_shape(teacher);
    Params<T> p;
    p.proj = AttentionWeights<T>::zeros(s);
    p.w_gate = Tensor<T>(Shape{s.n_heads, s.d_model}, T(0));
    p.b_gate = Tensor<T>(Shape{s.n_heads}, T(0));
    return p;
  }

  template <class T>
  Params<T> init_from_teacher(const AttentionShape& teacher, const AttentionWeights<T>& w, Rng& rng) const {
    w.validate(teacher);
    require(gate_normaliser > 0, "GatedLinear: gate_normaliser = ", gate_normaliser, ", expected > 0");
    require(0 < init_decay_min && init_decay_min <= init_decay_max && init_decay_max < 1,
            "GatedLinear: initial decays [", init_decay_min, ", ", init_decay_max,
            "] must satisfy 0 < min ≤ max < 1");
    const AttentionShape s = op_shape(teacher);
    Params<T> p;
    p.proj = s.n_kv_heads == teacher.n_kv_heads ? w : repeat_kv_heads(teacher, w, s.n_kv_heads);
    p.w_gate = Tensor<T>(Shape{s.n_heads, s.d_model});
    p.b_gate = Tensor<T>(Shape{s.n_heads});
    fill_normal(p.w_gate.view(), rng, 0.0, init_gate_std / std::sqrt(double(s.d_model)));
    const double m0 = 1 / (1 - init_decay_min), m1 = 1 / (1 - init_decay_max);
    for (index_t j = 0; j < s.n_heads; ++j) {
      const double f = s.n_heads > 1 ? double(j) / double(s.n_heads - 1) : 0.0;
      const double a = 1 - 1 / (m0 * std::pow(m1 / m0, f));
      const double sigma = std::pow(a, gate_normaliser);  // σ(b) = a^γ
      p.b_gate(j) = static_cast<T>(std::log(sigma / (1 - sigma)));
    }
    return p;
  }

  template <class T>
  void forward(const AttentionShape& teacher, const Params<T>& p, TensorView<const T> h, TensorView<T> y,
               Saved<T>& saved) const {
    const AttentionShape s = checked_shape(teacher, p, h, "GatedLinear::forward");
    const index_t B = h.dim(0), T_ = h.dim(1);
    require_shape(y, Shape{B, T_, s.d_model}, "GatedLinear y");
    resize(saved.q, Shape{B, T_, s.n_heads, s.d_head});
    resize(saved.k, Shape{B, T_, s.n_kv_heads, s.d_head});
    resize(saved.v, Shape{B, T_, s.n_kv_heads, s.d_head});
    resize(saved.z, Shape{B, T_, s.n_heads});
    resize(saved.g, Shape{B, T_, s.n_heads});
    resize(saved.o, Shape{B, T_, s.n_heads, s.d_head});
    inputs(s, p, h, 0, saved.q, saved.k, saved.v, saved.z, saved.g);
    mix(s, saved, TensorView<T>{});
    project_out<T>(s, p.proj, saved.o, y);
  }

  // Adds into dh and into each tensor of `grads` that is not empty (leave them all empty when
  // only dh is wanted, as in the architecture search).
  template <class T>
  void backward(const AttentionShape& teacher, const Params<T>& p, TensorView<const T> h, const Saved<T>& saved,
                TensorView<const T> dy, TensorView<T> dh, Params<T>& grads) const {
    const AttentionShape s = checked_shape(teacher, p, h, "GatedLinear::backward");
    const index_t B = h.dim(0), T_ = h.dim(1);
    require_shape(saved.o.view(), Shape{B, T_, s.n_heads, s.d_head}, "GatedLinear saved o (run forward first)");
    require_shape(dy, Shape{B, T_, s.d_model}, "GatedLinear dy");
    require_shape(dh, Shape{B, T_, s.d_model}, "GatedLinear dh");
    check_grads(p, grads);
    Tensor<T> d_o(saved.o.shape(), T(0));
    project_out_backward<T>(p.proj, saved.o, dy, d_o, &grads.proj);
    Tensor<T> dq(saved.q.shape(), T(0)), dk(saved.k.shape(), T(0)), dv(saved.v.shape(), T(0));
    Tensor<T> dz(saved.g.shape(), T(0));  // holds dg, then dz
    const double sc = output_scale(s);
    if (form == Form::chunked)
      eigen::gla::backward_chunked<T>(saved.q, saved.k, saved.v, saved.g, sc, chunk, {}, d_o, {}, dq, dk, dv, dz);
    else
      eigen::gla::backward_recurrent<T>(saved.q, saved.k, saved.v, saved.g, sc, {}, d_o, {}, dq, dk, dv, dz);
    if (rope) {
      const RopeTable table(s.rope, s.d_head, 0, T_);
      table.apply(dq.view(), true), table.apply(dk.view(), true);
    }
    // dz = dg · ∂g/∂z = dg · σ(−z) / γ
    for (index_t i = 0; i < dz.numel(); ++i)
      dz.data()[i] *= static_cast<T>(sigmoid(-double(saved.z.data()[i])) / gate_normaliser);
    detail::linear_backward<T>(h, p.w_gate.view(), dz, dh, grads.w_gate, grads.b_gate);
    project_qkv_backward<T>(p.proj, h, dq, dk, dv, dh, &grads.proj);
  }

  template <class T>
  State<T> initial_state(const AttentionShape& teacher, index_t batch) const {
    const AttentionShape s = op_shape(teacher);
    return State<T>{Tensor<T>(Shape{batch, s.n_heads, s.d_head, s.d_head}, T(0)), 0};
  }

  // Prefill or decode: runs the tokens h [B,T,d_model] (T = 1 for one decode step) from `state`,
  // writes y and leaves in `state` the state after the last token. No backward.
  template <class T>
  void step(const AttentionShape& teacher, const Params<T>& p, TensorView<const T> h, State<T>& state,
            TensorView<T> y) const {
    const AttentionShape s = checked_shape(teacher, p, h, "GatedLinear::step");
    const index_t B = h.dim(0), T_ = h.dim(1);
    require_shape(y, Shape{B, T_, s.d_model}, "GatedLinear y");
    require_shape(state.S.view(), Shape{B, s.n_heads, s.d_head, s.d_head}, "GatedLinear state");
    Saved<T> work;
    work.q = Tensor<T>(Shape{B, T_, s.n_heads, s.d_head});
    work.k = Tensor<T>(Shape{B, T_, s.n_kv_heads, s.d_head});
    work.v = Tensor<T>(work.k.shape());
    work.z = Tensor<T>(Shape{B, T_, s.n_heads});
    work.g = Tensor<T>(work.z.shape());
    work.o = Tensor<T>(work.q.shape());
    inputs(s, p, h, state.position, work.q, work.k, work.v, work.z, work.g);
    mix(s, work, state.S.view());
    project_out<T>(s, p.proj, work.o, y);
    state.position += T_;
  }

 private:
  static double sigmoid(double x) { return x >= 0 ? 1 / (1 + std::exp(-x)) : std::exp(x) / (1 + std::exp(x)); }
  // log σ(x) without overflow or cancellation for large |x|.
  static double log_sigmoid(double x) { return x >= 0 ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x)); }

  template <class T>
  static void resize(Tensor<T>& t, const Shape& shape) {
    if (!(t.shape() == shape)) t = Tensor<T>(shape);
  }

  template <class T>
  AttentionShape checked_shape(const AttentionShape& teacher, const Params<T>& p, TensorView<const T> h,
                               std::string_view where) const {
    const AttentionShape s = op_shape(teacher);
    p.proj.validate(s);
    require_shape(p.w_gate.view(), Shape{s.n_heads, s.d_model}, "GatedLinear w_gate");
    require_shape(p.b_gate.view(), Shape{s.n_heads}, "GatedLinear b_gate");
    require_rank(h, 3, where);
    require(h.dim(2) == s.d_model, where, ": h has shape ", h.shape, ", expected [B, T, ", s.d_model, "]");
    require(h.contiguous(), where, ": h must be contiguous");
    require(chunk >= 1, "GatedLinear: chunk = ", chunk, ", expected ≥ 1");
    require(gate_normaliser > 0, "GatedLinear: gate_normaliser = ", gate_normaliser, ", expected > 0");
    return s;
  }

  // Each gradient tensor is empty (skipped) or shaped as its parameter.
  template <class T>
  static void check_grads(const Params<T>& p, const Params<T>& grads) {
    const auto check = [](const Tensor<T>& grad, const Tensor<T>& param, std::string_view name) {
      require(grad.empty() || grad.shape() == param.shape(), "GatedLinear grads.", name, ": shape ", grad.shape(),
              ", expected ", param.shape(), " (or empty, to skip it)");
    };
    check(grads.proj.wq, p.proj.wq, "wq"), check(grads.proj.wk, p.proj.wk, "wk");
    check(grads.proj.wv, p.proj.wv, "wv"), check(grads.proj.wo, p.proj.wo, "wo");
    check(grads.proj.bq, p.proj.bq, "bq"), check(grads.proj.bk, p.proj.bk, "bk");
    check(grads.proj.bv, p.proj.bv, "bv");
    check(grads.w_gate, p.w_gate, "w_gate"), check(grads.b_gate, p.b_gate, "b_gate");
  }

  // q, k, v (rotated from `position` when `rope`), z and g for the tokens h.
  template <class T>
  void inputs(const AttentionShape& s, const Params<T>& p, TensorView<const T> h, index_t position, Tensor<T>& q,
              Tensor<T>& k, Tensor<T>& v, Tensor<T>& z, Tensor<T>& g) const {
    project_qkv<T>(s, p.proj, h, q, k, v);
    if (rope) {
      const RopeTable table(s.rope, s.d_head, position, h.dim(1));
      table.apply(q.view()), table.apply(k.view());
    }
    detail::linear_forward<T>(h, p.w_gate.view(), p.b_gate.view(), z);
    for (index_t i = 0; i < z.numel(); ++i)
      g.data()[i] = static_cast<T>(log_sigmoid(double(z.data()[i])) / gate_normaliser);
  }

  // saved.o from saved.q/k/v/g, from and into `state` when it is not empty.
  template <class T>
  void mix(const AttentionShape& s, Saved<T>& w, TensorView<T> state) const {
    const double sc = output_scale(s);
    if (form == Form::chunked && w.q.dim(1) > 1)
      eigen::gla::forward_chunked<T>(w.q, w.k, w.v, w.g, sc, chunk, state, w.o, state);
    else
      eigen::gla::forward_recurrent<T>(w.q, w.k, w.v, w.g, sc, state, w.o, state);
  }
};

static_assert(check_operator<GatedLinear>());
static_assert(Operator<GatedLinear, float> && Operator<GatedLinear, double>);

}  // namespace dash

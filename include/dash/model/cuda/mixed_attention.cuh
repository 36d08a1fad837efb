// One MixedAttention layer (mixed_attention.hpp) on the GPU: forward and backward to the layer
// input, for the operators Softmax, SlidingWindow, GatedLinear and GatedDeltaNet. For the
// normalised layer input h [rows = B·T, d] (bf16), mixing weights π (device fp32, one per
// operator) and the set of operators that run:
//
//   shared family (Softmax, SlidingWindow: the teacher's projections)
//     [q | k | v] = h·[Wq; Wk; Wv]ᵀ + b,  q, k ← RoPE            one GEMM, one fused buffer
//     a_i = attention_i(q, k, v)                                  written side by side: [a_1 | a_2 | …]
//   own family (GatedLinear, GatedDeltaNet: their own projections, one GEMM each)
//     [q | k | v | z] = h·[Wq; Wk; Wv; W_gates]ᵀ + [b; 0]          one fused buffer, row stride
//     gates (gates.cuh, z + fp32 gate biases),  a_i = mixer_i(q, k, v, gates)   (strided operands)
//   y += Σ_i π_i·a_i·Wo_iᵀ                                       Wo_i: the teacher's Wo or the op's own
// The weighted sum is the accumulating GEMMs' own product: the shared outputs side by side
// against [π_1·Wo | π_2·Wo | …] (one GEMM for each contiguous run of running shared operators),
// and each own operator's output against π_i·Wo_i, from π-scaled copies of the weights that
// scale_weights refreshes from the device π (mixture.cuh). y is the fp32 residual stream.
//
// Backward, for the upstream gradient dy (bf16) of y, after a forward on the same buffers:
//   d_cat = dy·[Wo | Wo_own_1 | …]                  one GEMM per contiguous run of needed blocks
//   shared: one backward of the mixture Σ π_i·a_i over the shared operators that ran
//           (attention::mixture_backward, d = the teacher's block of d_cat): S = QKᵀ, dP and the
//           dQ, dK, dV products once per tile for both masks, and dL/dπ_i = <a_i, d> from its
//           D pass, into one fused dq | dk | dv; inverse RoPE; dh = dqkv·[Wq; Wk; Wv]   one GEMM
//   own:    dL/dπ_i = <a_i, d_i>, d_o_i = π_i·d_i    one pass for all (mixture_gradient), d_i
//           the block of d_cat that a_i met;
//           the mixer's backward to dq, dk, dv and the gates (GatedDeltaNet's from the chunk
//           workspace its forward left in the layer's activations); inverse RoPE (GatedLinear with
//           rope); dz through the gates, all into one fused [dq | dk | dv | dz];
//           dh += [dq | dk | dv | dz]·[Wq; Wk; Wv; W_gates]      one GEMM
// dh is fp32. The search freezes every weight; candidate preparation (prepare.cuh) trains the own
// operators' weights through own_output and own_weight_gradients, one operator alone:
//   d_W_in = [dq | dk | dv | dz]ᵀ·h,   d_Wo = dyᵀ·a,   the biases' gradients column sums.
// With a StepTimer in the context every GEMM and every kernel group is enqueued between CUDA
// events (the benchmark's profile).
//
// The layer owns its weights (bf16; gate biases fp32) and π-scaled copies; the activations
// (MixerBuffers) belong to the caller, one set for all layers or one per layer (kept for the
// backward, search_model.cuh), sized by MixerWidths. Operator
// options are honoured as the CPU reads them: SlidingWindow's window and sinks; GatedLinear's
// kv_heads, gate_normaliser, scale and rope; GatedDeltaNet's gate_normaliser, scale, norm_eps and
// state heads. The form and chunk of GatedLinear and GatedDeltaNet choose how the CPU evaluates
// the same function; the GPU kernels use their own chunked form.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "dash/core/cuda.hpp"
#include "dash/core/error.hpp"
#include "dash/mixed_attention.hpp"
#include "dash/model/cuda/gates.cuh"
#include "dash/model/cuda/gemm.cuh"
#include "dash/model/cuda/mixture.cuh"
#include "dash/model/cuda/rope.cuh"
#include "dash/ops/gated_delta_net.hpp"
#include "dash/ops/gated_delta_net/cuda.cuh"
#include "dash/ops/gated_linear.hpp"
#include "dash/ops/gated_linear/cuda.cuh"
#include "dash/ops/sliding_window.hpp"
#include "dash/ops/softmax.hpp"
#include "dash/ops/softmax/cuda/backward.cuh"
#include "dash/ops/softmax/cuda/forward.cuh"

namespace dash::cuda::model {

template <class Op>
struct is_sliding_window : std::false_type {};
template <index_t W>
struct is_sliding_window<SlidingWindow<W>> : std::true_type {};

template <class Op>
inline constexpr bool has_cuda_mixer_v = std::is_same_v<Op, Softmax> || is_sliding_window<Op>::value ||
                                         std::is_same_v<Op, GatedLinear> || std::is_same_v<Op, GatedDeltaNet>;

// Returns true so that it can sit in a static_assert; the instantiation names the operator.
template <class Op>
consteval bool check_cuda_mixer() {
  static_assert(has_cuda_mixer_v<Op>,
                "DeviceMixedAttention: this operator has no CUDA implementation (the GPU runs Softmax, "
                "SlidingWindow, GatedLinear and GatedDeltaNet)");
  return true;
}

// Timing mode of a step: CUDA events around every GEMM (labelled by its shape) and around every
// other launch group (labelled by name), for a profile of where a step's time goes.
class StepTimer {
 public:
  struct Call {
    GemmShape shape;              // of a GEMM
    const char* label = nullptr;  // of anything else (null for a GEMM)
    cudaEvent_t start = nullptr, stop = nullptr;
  };
  StepTimer() = default;
  StepTimer(const StepTimer&) = delete;
  StepTimer& operator=(const StepTimer&) = delete;
  ~StepTimer() {
    for (Call& c : pool_) cudaEventDestroy(c.start), cudaEventDestroy(c.stop);
  }
  std::size_t size() const { return used_; }
  const Call& operator[](std::size_t i) const { return pool_[i]; }

  // Enqueues f() on `stream` between two events of a new call.
  template <class F>
  void record(const GemmShape& shape, const char* label, cudaStream_t stream, F&& f) {
    Call& c = next();
    c.shape = shape, c.label = label;
    check(cudaEventRecord(c.start, stream), "StepTimer: record");
    f();
    check(cudaEventRecord(c.stop, stream), "StepTimer: record");
  }

 private:
  Call& next() {
    if (used_ == pool_.size()) {
      Call c;
      check(cudaEventCreate(&c.start), "StepTimer: event");
      check(cudaEventCreate(&c.stop), "StepTimer: event");
      pool_.push_back(c);
    }
    return pool_[used_++];
  }

  std::vector<Call> pool_;
  std::size_t used_ = 0;
};

// f() on `stream`, timed as `label` when a timer is given.
template <class F>
void timed(StepTimer* timer, const char* label, cudaStream_t stream, F&& f) {
  if (timer)
    timer->record(GemmShape{}, label, stream, f);
  else
    f();
}

// Enqueues c (+)= a·op(w) through `gemm`: a [m, k] with row stride lda; w stored [n, k]
// (transpose_w, a checkpoint's [out, in]) or [k, n], row stride ldw; c [m, n], row stride ldc.
// With `addend` (and accumulate), c = addend + a·op(w), addend laid out as c: a residual stream
// that moves to another buffer without a copy.
class Linear {
 public:
  Gemm* gemm = nullptr;
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;
  StepTimer* timer = nullptr;  // when set, every call is timed

  void operator()(index_t m, index_t n, index_t k, const bfloat16* a, index_t lda, const bfloat16* w, index_t ldw,
                  bool transpose_w, const bfloat16* bias, void* c, index_t ldc, DType c_type, bool accumulate,
                  cudaStream_t stream, const void* addend = nullptr) const {
    GemmShape s;
    s.m = m, s.n = n, s.k = k;
    s.transpose_b = transpose_w;
    s.lda = lda == k ? 0 : lda;
    s.ldb = ldw == (transpose_w ? k : n) ? 0 : ldw;
    s.ldc = ldc == n ? 0 : ldc;
    s.c_type = c_type;
    s.bias = bias != nullptr;
    s.accumulate = accumulate;
    GemmOperands o;
    o.a = a, o.b = w, o.c = c, o.bias = bias, o.addend = addend;
    run(s, o, stream);
  }

  // c (+)= aᵀ·b for a [k, m] and b [k, n] with row strides lda and ldb, c fp32 [m, n]: the
  // weight gradients of candidate preparation (k = rows of activations).
  void transposed_a(index_t m, index_t n, index_t k, const bfloat16* a, index_t lda, const bfloat16* b, index_t ldb,
                    float* c, bool accumulate, cudaStream_t stream) const {
    GemmShape s;
    s.m = m, s.n = n, s.k = k;
    s.transpose_a = true;
    s.lda = lda == m ? 0 : lda;
    s.ldb = ldb == n ? 0 : ldb;
    s.c_type = DType::f32;
    s.accumulate = accumulate;
    GemmOperands o;
    o.a = a, o.b = b, o.c = c;
    run(s, o, stream);
  }

 private:
  void run(const GemmShape& s, GemmOperands& o, cudaStream_t stream) const {
    o.workspace = workspace, o.workspace_bytes = workspace_bytes;
    if (!timer) return (*gemm)(s, o, stream);
    const GemmPlan& plan = gemm->plan(s, o);
    timer->record(s, nullptr, stream, [&] { plan.run(o, stream); });
  }
};

// The widths of the activations of one layer; the buffers are sized by the widest layer.
struct MixerWidths {
  static constexpr int max_own = max_mixture_terms;
  int n_ops = 0, n_shared = 0, n_own = 0;
  index_t d_model = 0, q_dim = 0, qkv_width = 0, n_heads = 0;
  std::array<index_t, max_own> own_q{}, own_gates{}, own_in{};  // own_in: fused row width
  std::array<std::size_t, max_own> own_kept_bytes{};  // GatedDeltaNet's forward workspace, kept for its backward

  void widen(const MixerWidths& o) {
    n_ops = o.n_ops, n_shared = o.n_shared, n_own = o.n_own;
    d_model = o.d_model, q_dim = o.q_dim, qkv_width = o.qkv_width, n_heads = o.n_heads;
    for (int j = 0; j < max_own; ++j) {
      own_q[j] = std::max(own_q[j], o.own_q[j]);
      own_gates[j] = std::max(own_gates[j], o.own_gates[j]);
      own_in[j] = std::max(own_in[j], o.own_in[j]);
      own_kept_bytes[j] = std::max(own_kept_bytes[j], o.own_kept_bytes[j]);
    }
  }
};

// The activations of a layer's forward (kept for its backward) and the backward's scratch.
struct MixerBuffers {
  static constexpr int max_own = MixerWidths::max_own;
  bfloat16* qkv = nullptr;         // [rows, q_dim + 2·kv_dim], q and k after RoPE
  bfloat16* shared_out = nullptr;  // [rows, n_shared·q_dim]: a_i side by side
  float* lse = nullptr;            // [n_shared, B, H, T]
  std::array<bfloat16*, max_own> own_in{};   // [rows, own_in]: q | k | v | z of own operator j
  std::array<bfloat16*, max_own> own_out{};  // [rows, q_dim]
  std::array<float*, max_own> own_g{}, own_beta{};
  std::array<std::uint8_t*, max_own> own_kept{};  // what own operator j's backward reads of its forward
  bfloat16* d_cat = nullptr;       // [rows, (1 + n_own)·q_dim]
  bfloat16* d_out = nullptr;       // [n_own, rows, q_dim]: π_i·d_i of the own operators
  bfloat16* dqkv = nullptr;        // [rows, q_dim + 2·kv_dim]
  bfloat16* own_d_in = nullptr;    // [rows, widest own_in]: dq | dk | dv | dz
  float *own_dg = nullptr, *own_dbeta = nullptr;
  double* partials = nullptr;      // mixture_partials_count()

  // Calls carve(pointer, count, name) for every buffer, for `rows` tokens.
  template <class Carve>
  void carve(Carve&& carve, const MixerWidths& w, index_t rows) {
    carve_forward(carve, w, rows);
    carve_backward(carve, w, rows);
  }

  // The forward's activations only (what a backward reads).
  template <class Carve>
  void carve_forward(Carve&& carve, const MixerWidths& w, index_t rows) {
    const auto r = std::size_t(rows);
    carve(qkv, r * std::size_t(w.qkv_width), "qkv");
    carve(shared_out, r * std::size_t(w.q_dim) * std::size_t(w.n_shared), "shared outputs");
    carve(lse, r * std::size_t(w.n_heads) * std::size_t(w.n_shared), "lse");
    for (int j = 0; j < w.n_own; ++j) {
      const auto gates = std::size_t(w.own_gates[j]);
      carve(own_in[j], r * std::size_t(w.own_in[j]), "own q|k|v|z");
      carve(own_out[j], r * std::size_t(w.own_q[j]), "own output");
      carve(own_g[j], r * gates, "own log decays"), carve(own_beta[j], r * gates, "own beta");
      carve(own_kept[j], w.own_kept_bytes[j], "own kept workspace");
    }
  }

  // The backward's scratch only.
  template <class Carve>
  void carve_backward(Carve&& carve, const MixerWidths& w, index_t rows) {
    const auto r = std::size_t(rows);
    const auto q = std::size_t(w.q_dim), kv_width = std::size_t(w.qkv_width);
    std::size_t widest_in = 0, widest_gates = 0;
    for (int j = 0; j < w.n_own; ++j)
      widest_in = std::max(widest_in, std::size_t(w.own_in[j])),
      widest_gates = std::max(widest_gates, std::size_t(w.own_gates[j]));
    carve(d_cat, r * q * std::size_t(1 + w.n_own), "d_cat");
    carve(d_out, r * q * std::size_t(w.n_own), "d_out");
    carve(dqkv, r * kv_width, "dqkv");
    carve(own_d_in, r * widest_in, "own dq|dk|dv|dz");
    carve(own_dg, r * widest_gates, "own dg"), carve(own_dbeta, r * widest_gates, "own dbeta");
    carve(partials, mixture_partials_count(), "mixture partials");
  }

  // These buffers with the forward's activations taken from `f` (a layer's kept activations).
  MixerBuffers with_forward_of(const MixerBuffers& f) const {
    MixerBuffers b = *this;
    b.qkv = f.qkv, b.shared_out = f.shared_out, b.lse = f.lse;
    b.own_in = f.own_in, b.own_out = f.own_out, b.own_g = f.own_g, b.own_beta = f.own_beta, b.own_kept = f.own_kept;
    return b;
  }
};

// What a forward or backward call runs with besides the layer's weights.
struct MixerContext {
  Linear linear;
  MixerBuffers buffers;
  void* scratch = nullptr;  // the operators' kernels' workspace
  std::size_t scratch_bytes = 0;
  RopeTableView rope;  // positions [0, max_length)
  index_t batch = 0, length = 0;
  cudaStream_t stream = nullptr;
};

template <class... Ops>
class DeviceMixedAttention {
  static_assert((check_cuda_mixer<Ops>() && ...));
  static_assert(sizeof...(Ops) <= max_mixture_terms, "DeviceMixedAttention: at most 8 operators");
  static_assert((int(shares_teacher_projections_v<Ops>) + ...) <= attention::max_mixture_backward_terms,
                "DeviceMixedAttention: at most 2 operators on the teacher's projections (one mixture backward)");

 public:
  static constexpr int n_ops = int(sizeof...(Ops));
  static constexpr int n_shared = (int(shares_teacher_projections_v<Ops>) + ...);
  static constexpr int n_own = n_ops - n_shared;
  using OpMask = std::array<bool, sizeof...(Ops)>;
  // Sequences per step: GatedLinear's kernels put batch × sweeps on one grid axis.
  static constexpr index_t max_batch =
      (std::is_same_v<Ops, GatedLinear> || ...) ? 65535 / gla::detail::max_sweeps : 65535;

  // Checks the shapes and every operator option the GPU honours, before any CUDA call.
  template <class T>
  static void validate(const BasicMixedAttention<T, Ops...>& mixer) {
    const AttentionShape& s = mixer.shape();
    s.validate();
    require(s.d_head <= attention::max_d_head, "DeviceMixedAttention: d_head = ", s.d_head, ", expected at most ",
            attention::max_d_head);
    mixer.teacher().validate(s);
    for_each_op([&]<std::size_t I>(std::integral_constant<std::size_t, I>) {
      using Op = std::tuple_element_t<I, std::tuple<Ops...>>;
      const Op& op = std::get<I>(mixer.ops());
      if constexpr (std::is_same_v<Op, GatedLinear>) {
        const auto& p = std::get<I>(mixer.params());
        require(std::isfinite(op.gate_normaliser) && op.gate_normaliser > 0,
                "DeviceMixedAttention: GatedLinear gate_normaliser = ", op.gate_normaliser,
                ", expected a finite value > 0");
        require(std::isfinite(op.scale), "DeviceMixedAttention: GatedLinear scale = ", op.scale,
                ", expected a finite value");
        p.proj.validate(op.op_shape(s));
        require_shape(p.w_gate.view(), Shape{s.n_heads, s.d_model}, "DeviceMixedAttention: GatedLinear w_gate");
        require_shape(p.b_gate.view(), Shape{s.n_heads}, "DeviceMixedAttention: GatedLinear b_gate");
      } else if constexpr (std::is_same_v<Op, GatedDeltaNet>) {
        op.validate();
        std::get<I>(mixer.params()).validate(s);
      }
    });
  }

  template <class T>
    requires(std::is_same_v<T, float> || std::is_same_v<T, double>)
  explicit DeviceMixedAttention(const BasicMixedAttention<T, Ops...>& mixer) : shape_(mixer.shape()) {
    validate(mixer);
    const AttentionShape& s = shape_;
    q_dim_ = s.q_dim(), kv_dim_ = s.kv_dim(), qkv_width_ = q_dim_ + 2 * kv_dim_;
    const AttentionWeights<T>& teacher = mixer.teacher();
    w_qkv_ = stacked_to_device_bf16<T>({teacher.wq, teacher.wk, teacher.wv});
    if (s.qkv_bias) b_qkv_ = stacked_to_device_bf16<T>({teacher.bq, teacher.bk, teacher.bv});

    // [Wo | Wo_own_1 | …] as [d, (1 + n_own)·q_dim]; the π-scaled [π_1·Wo_1 | …] is refreshed per step.
    const index_t d = s.d_model, blocks = 1 + n_own;
    w_cat_ = DeviceTensor<bfloat16>(Shape{d, blocks * q_dim_});
    const auto put_block = [&](const Tensor<T>& wo, index_t block) {
      copy_to_device_bf16(wo.data(), d, q_dim_, w_cat_.data() + block * q_dim_, blocks * q_dim_);
    };
    put_block(teacher.wo, 0);
    int shared = 0, own = 0;
    for_each_op([&]<std::size_t I>(std::integral_constant<std::size_t, I>) {
      using Op = std::tuple_element_t<I, std::tuple<Ops...>>;
      const Op& op = std::get<I>(mixer.ops());
      OpInfo& info = info_[I];
      if constexpr (shares_teacher_projections_v<Op>) {
        info.slot = shared++;
        if constexpr (is_sliding_window<Op>::value) info.mask = attention::Mask{op.window(), op.sinks()};
      } else {
        info.slot = own;
        OwnOp& o = own_[std::size_t(own)];
        const auto& p = std::get<I>(mixer.params());
        if constexpr (std::is_same_v<Op, GatedLinear>) {
          const AttentionShape os = op.op_shape(s);
          o.kind = OwnKind::gated_linear;
          o.kv_heads = os.n_kv_heads, o.gates = s.n_heads, o.with_beta = false;
          o.normaliser = float(op.gate_normaliser), o.scale = float(op.output_scale(os));
          o.rope = op.rope && s.rope.style != RopeConfig::Style::none;
          upload_own(o, p.proj, {std::cref(p.w_gate)}, {std::cref(p.b_gate)});
        } else {
          o.kind = OwnKind::gated_delta_net;
          o.kv_heads = p.state_heads(), o.gates = p.state_heads(), o.with_beta = true;
          o.normaliser = float(op.gate_normaliser), o.scale = float(op.scale), o.eps = float(op.norm_eps);
          upload_own(o, p.proj, {std::cref(p.w_gate), std::cref(p.w_beta)}, {std::cref(p.b_gate), std::cref(p.b_beta)});
        }
        put_block(p.proj.wo, 1 + own);
        ++own;
      }
    });
    w_scaled_ = DeviceTensor<bfloat16>(Shape{d, index_t(n_ops) * q_dim_});
  }

  const AttentionShape& shape() const { return shape_; }
  static constexpr int softmax_index() {
    constexpr bool is_softmax[] = {std::is_same_v<Ops, Softmax>...};
    for (int i = 0; i < n_ops; ++i)
      if (is_softmax[i]) return i;
    return n_ops;
  }

  // The widths of this layer's activations, own operators outside `used` none.
  MixerWidths widths(const OpMask& used) const {
    MixerWidths w;
    w.n_ops = n_ops, w.n_shared = n_shared, w.n_own = n_own;
    w.d_model = shape_.d_model, w.q_dim = q_dim_, w.qkv_width = qkv_width_, w.n_heads = shape_.n_heads;
    for (int j = 0; j < n_own; ++j) {
      if (!own_used(j, used)) continue;
      const OwnOp& o = own_[std::size_t(j)];
      w.own_q[j] = q_dim_;
      w.own_gates[j] = o.gates, w.own_in[j] = o.in_width;
    }
    return w;
  }

  // Bytes of the kernels' scratch of the operators in `used` for `batch` sequences of `length` tokens.
  std::size_t scratch_bytes(index_t batch, index_t length, const OpMask& used) const {
    const int B = int(batch), T = int(length), H = shape_.n_heads, D = shape_.d_head;
    std::size_t bytes = 0;
    if constexpr (n_shared > 0) {
      attention::MixtureBackwardParams a;
      a.batch = B, a.length = T, a.n_heads = H, a.n_kv_heads = shape_.n_kv_heads, a.d_head = D;
      a.n_terms = n_shared;
      bytes = std::max(bytes, attention::mixture_backward_workspace_bytes(a));
    }
    for (int j = 0; j < n_own; ++j) {
      if (!own_used(j, used)) continue;
      const OwnOp& o = own_[std::size_t(j)];
      if (o.kind == OwnKind::gated_linear) {
        gla::ForwardParams f;
        f.batch = B, f.length = T, f.n_heads = H, f.n_kv_heads = o.kv_heads, f.d_head = D, f.scale = o.scale;
        gla::BackwardParams g;
        static_cast<gla::Inputs&>(g) = f;
        bytes = std::max({bytes, gla::forward_workspace_bytes(f), gla::backward_workspace_bytes(g)});
      } else {
        bytes = std::max(bytes, gdn::backward_scratch_bytes(gdn::Dims{batch, length, H, o.kv_heads, D}));
      }
    }
    return bytes;
  }

  // Widens w.own_kept_bytes to what `batch` sequences of `length` tokens keep (of the operators
  // in `used`): GatedDeltaNet's
  // forward leaves its chunk workspace (normalised keys, the solve, every chunk's state) in the
  // layer's activations, so that its backward does not compute them again.
  void widen_kept(MixerWidths& w, index_t batch, index_t length, const OpMask& used) const {
    for (int j = 0; j < n_own; ++j) {
      const OwnOp& o = own_[std::size_t(j)];
      if (o.kind != OwnKind::gated_delta_net || !own_used(j, used)) continue;
      const gdn::Dims dims{batch, length, shape_.n_heads, o.kv_heads, shape_.d_head};
      w.own_kept_bytes[std::size_t(j)] = std::max(w.own_kept_bytes[std::size_t(j)], gdn::kept_workspace_bytes(dims));
    }
  }

  // The jobs that refresh this layer's π-scaled output projections from π[pi_offset + i].
  void scale_jobs(std::vector<ScaleJob>& jobs, int pi_offset) {
    const index_t cat_stride = index_t(1 + n_own) * q_dim_, scaled_stride = index_t(n_ops) * q_dim_;
    for (int i = 0; i < n_ops; ++i) {
      ScaleJob job;
      job.src = w_cat_.data() + distinct_block(i) * q_dim_, job.src_stride = cat_stride;
      job.dst = w_scaled_.data() + scaled_column(i) * q_dim_, job.dst_stride = scaled_stride;
      job.rows = shape_.d_model, job.cols = q_dim_;
      job.pi_index = pi_offset + i;
      jobs.push_back(job);
    }
  }

  // y = x + Σ_{i run} π_i·o_i(h), with the π-scaled weights as scale_weights last left them
  // (x and y [rows, d] fp32, the same buffer or apart: the first output GEMM reads x, the others
  // add to y). The teacher's forward (`teacher`): softmax attention through the unscaled Wo,
  // `run` ignored.
  void forward(const MixerContext& c, const bfloat16* h, const float* x, float* y, const OpMask& run,
               bool teacher) const {
    const index_t rows = c.batch * c.length;
    const OpMask runs = teacher ? only_softmax() : run;
    const MixerBuffers& b = c.buffers;
    // The residual for the next output GEMM: x for the first, y (in place) after it.
    const float* addend = x == y ? nullptr : x;
    const auto add_output = [&](index_t k, const bfloat16* a, index_t lda, const bfloat16* w, index_t ldw) {
      c.linear(rows, shape_.d_model, k, a, lda, w, ldw, true, nullptr, y, shape_.d_model, DType::f32, true, c.stream,
               addend);
      addend = nullptr;
    };
    if (any_shared(runs)) {
      c.linear(rows, qkv_width_, shape_.d_model, h, shape_.d_model, w_qkv_.data(), shape_.d_model, true,
               b_qkv_.data(), b.qkv, qkv_width_, DType::bf16, false, c.stream);
      timed(c.linear.timer, "rope", c.stream,
            [&] { rotate(c, b.qkv, b.qkv + q_dim_, shape_.n_heads, shape_.n_kv_heads, qkv_width_, false); });
      timed(c.linear.timer, "attention forward", c.stream, [&] { shared_forward(c, runs); });
      const index_t shared_stride = index_t(n_shared) * q_dim_;
      if (teacher) {
        const int s = info_[std::size_t(softmax_index())].slot;
        add_output(q_dim_, b.shared_out + s * q_dim_, shared_stride, w_cat_.data(), index_t(1 + n_own) * q_dim_);
      } else {
        // One GEMM per contiguous run of running shared slots, against the scaled copies.
        std::array<bool, max_mixture_terms> slot_runs{};
        for (int i = 0; i < n_ops; ++i)
          if (is_shared(i) && runs[std::size_t(i)]) slot_runs[std::size_t(info_[std::size_t(i)].slot)] = true;
        for_each_span(slot_runs, n_shared, [&](int first, int count) {
          add_output(count * q_dim_, b.shared_out + first * q_dim_, shared_stride, w_scaled_.data() + first * q_dim_,
                     index_t(n_ops) * q_dim_);
        });
      }
    }
    if (!teacher)
      for (int i = 0; i < n_ops; ++i) {
        if (!runs[std::size_t(i)] || is_shared(i)) continue;
        const int j = info_[std::size_t(i)].slot;
        own_forward(c, j, h);
        add_output(q_dim_, b.own_out[std::size_t(j)], q_dim_, w_scaled_.data() + scaled_column(i) * q_dim_,
                   index_t(n_ops) * q_dim_);
      }
    if (addend)  // nothing ran: y = x
      check(cudaMemcpyAsync(y, x, std::size_t(rows) * std::size_t(shape_.d_model) * sizeof(float),
                            cudaMemcpyDeviceToDevice, c.stream),
            "DeviceMixedAttention::forward: copy x to y");
  }

  // After forward(c, h, ·, run, false) on the same buffers: dh = dL/dh (fp32, written, not added)
  // for the upstream gradient dy (bf16 [rows, d]), and d_pi[i] = dL/dπ_i for every operator that
  // ran (the others' entries are left as they are). Returns false when nothing ran (dh untouched).
  bool backward(const MixerContext& c, const bfloat16* dy, float* dh, const float* pi, const OpMask& run,
                float* d_pi) const {
    const index_t rows = c.batch * c.length, d = shape_.d_model;
    const MixerBuffers& b = c.buffers;
    const index_t cat_stride = index_t(1 + n_own) * q_dim_;
    // d_cat = dy·[Wo | Wo_own…] over the blocks some running operator reads.
    std::array<bool, max_mixture_terms> blocks{};
    for (int i = 0; i < n_ops; ++i)
      if (run[std::size_t(i)]) blocks[std::size_t(distinct_block(i))] = true;
    bool any = false;
    for_each_span(blocks, 1 + n_own, [&](int first, int count) {
      any = true;
      c.linear(rows, count * q_dim_, d, dy, d, w_cat_.data() + first * q_dim_, cat_stride, false, nullptr,
               b.d_cat + first * q_dim_, cat_stride, DType::bf16, false, c.stream);
    });
    if (!any) return false;

    // The own operators' dL/dπ_i and π_i·d_i (their backward's upstream gradient).
    MixtureGradientParams m;
    m.rows = rows, m.cols = int(q_dim_), m.pi = pi, m.grad = d_pi, m.partials = b.partials;
    for (int i = 0; i < n_ops; ++i) {
      if (!run[std::size_t(i)] || is_shared(i)) continue;
      MixtureTerm& t = m.terms[m.n_terms++];
      t.a = b.own_out[std::size_t(info_[std::size_t(i)].slot)], t.a_stride = q_dim_;
      t.d = b.d_cat + distinct_block(i) * q_dim_, t.d_stride = cat_stride;
      t.scaled = d_out(b, i, rows);
      t.pi_index = i;
    }
    if (m.n_terms > 0) timed(c.linear.timer, "mixture gradient", c.stream, [&] { mixture_gradient(m, c.stream); });

    bool dh_written = false;
    if (any_shared(run)) {
      const attention::MixtureBackwardParams p = shared_backward_params(c, run, pi, d_pi);
      timed(c.linear.timer, "attention backward", c.stream,
            [&] { attention::mixture_backward(p, c.scratch, c.scratch_bytes, c.stream); });
      timed(c.linear.timer, "rope", c.stream,
            [&] { rotate(c, b.dqkv, b.dqkv + q_dim_, shape_.n_heads, shape_.n_kv_heads, qkv_width_, true); });
      c.linear(rows, d, qkv_width_, b.dqkv, qkv_width_, w_qkv_.data(), d, false, nullptr, dh, d, DType::f32, false,
               c.stream);
      dh_written = true;
    }
    for (int i = 0; i < n_ops; ++i) {
      if (!run[std::size_t(i)] || is_shared(i)) continue;
      own_backward(c, info_[std::size_t(i)].slot, d_out(b, i, rows), dh, dh_written);
      dh_written = true;
    }
    return true;
  }

  // Candidate preparation (prepare.cuh) trains the own operators' weights in place: their
  // device copies, operator i's output alone and its weight gradients.
  struct OwnWeights {
    bfloat16* w_in = nullptr;  // [in_width, d_model]: Wq; Wk; Wv; W_gate (; W_β); zero rows
    bfloat16* b_in = nullptr;  // [in_width]: bq; bk; bv; zeros, or null without qkv_bias
    float* b_gates = nullptr;  // [gate_biases]: the decay's, then β's
    bfloat16* wo = nullptr;    // [d_model, q_dim], rows wo_stride apart (a block of [Wo | Wo_own…])
    index_t in_width = 0, d_model = 0, q_dim = 0, kv_width = 0, gates = 0, gate_biases = 0, wo_stride = 0;
  };

  static constexpr bool has_own_weights(int i) { return !is_shared(i); }

  OwnWeights own_weights(int i) {
    require(i >= 0 && i < n_ops && !is_shared(i), "DeviceMixedAttention::own_weights: operator ", i,
            " has no weights of its own");
    const int j = info_[std::size_t(i)].slot;
    OwnOp& o = own_[std::size_t(j)];
    OwnWeights w;
    w.w_in = o.w_in.data(), w.b_in = o.b_in.data(), w.b_gates = o.b_gates.data();
    w.wo = w_cat_.data() + distinct_block(i) * q_dim_;
    w.in_width = o.in_width, w.d_model = shape_.d_model, w.q_dim = q_dim_, w.kv_width = o.kv_width;
    w.gates = o.gates, w.gate_biases = o.b_gates.numel(), w.wo_stride = index_t(1 + n_own) * q_dim_;
    return w;
  }

  // y = o_i(h) (fp32 [rows, d], written), own operator i alone through its unscaled Wo.
  void own_output(const MixerContext& c, int i, const bfloat16* h, float* y) const {
    const int j = info_[std::size_t(i)].slot;
    own_forward(c, j, h);
    c.linear(c.batch * c.length, shape_.d_model, q_dim_, c.buffers.own_out[std::size_t(j)], q_dim_,
             w_cat_.data() + distinct_block(i) * q_dim_, index_t(1 + n_own) * q_dim_, true, nullptr, y,
             shape_.d_model, DType::f32, false, c.stream);
  }

  // After own_output(c, i, h, ·) on the same buffers, for dy = ∂loss/∂y (bf16 [rows, d]): the
  // weight gradients, fp32, written: d_w_in [in_width, d] = [dq | dk | dv | dz]ᵀ·h and
  // d_wo [d, q_dim] = dyᵀ·o. The fused [dq | dk | dv | dz] stays in buffers.own_d_in (its column
  // sums are the bias gradients).
  void own_weight_gradients(const MixerContext& c, int i, const bfloat16* h, const bfloat16* dy, float* d_w_in,
                            float* d_wo) const {
    const int j = info_[std::size_t(i)].slot;
    const OwnOp& o = own_[std::size_t(j)];
    const MixerBuffers& b = c.buffers;
    const index_t rows = c.batch * c.length, d = shape_.d_model;
    bfloat16* const d_o = d_out(b, i, rows);
    c.linear(rows, q_dim_, d, dy, d, w_cat_.data() + distinct_block(i) * q_dim_, index_t(1 + n_own) * q_dim_, false,
             nullptr, d_o, q_dim_, DType::bf16, false, c.stream);
    c.linear.transposed_a(d, q_dim_, rows, dy, d, b.own_out[std::size_t(j)], q_dim_, d_wo, false, c.stream);
    own_backward_to_projection(c, j, d_o);
    c.linear.transposed_a(o.in_width, d, rows, b.own_d_in, o.in_width, h, d, d_w_in, false, c.stream);
  }

 private:
  enum class OwnKind { gated_linear, gated_delta_net };

  struct OpInfo {
    int slot = 0;            // shared slot, or own index
    attention::Mask mask{};  // shared
  };

  // An own-projection operator's weights and options.
  // Rows of the fused projection: [Wq; Wk; Wv; W_gates; zero rows up to a multiple of 8] so
  // that every row of the fused activations starts 16-byte aligned.
  struct OwnOp {
    OwnKind kind = OwnKind::gated_linear;
    int kv_heads = 0, gates = 0;
    index_t kv_width = 0;      // kv_heads·d_head
    index_t gate_columns = 0;  // the gate block: gates (twice with β) and the zero padding
    index_t in_width = 0;      // q_dim + 2·kv_width + gate_columns
    bool with_beta = false, rope = false;
    float normaliser = 16, scale = 1, eps = 1e-6f;
    DeviceTensor<bfloat16> w_in;  // [in_width, d]
    DeviceTensor<bfloat16> b_in;  // [in_width]: bq; bk; bv; zeros (empty without qkv_bias)
    DeviceTensor<float> b_gates;  // [gates] of the decay, then [gates] of β: added in fp32
  };

  template <class F>
  static void for_each_op(F&& f) {
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (f(std::integral_constant<std::size_t, I>{}), ...);
    }(std::index_sequence_for<Ops...>{});
  }

  static constexpr bool is_shared(int i) {
    constexpr bool shared[] = {shares_teacher_projections_v<Ops>...};
    return shared[i];
  }
  static bool any_shared(const OpMask& run) {
    for (int i = 0; i < n_ops; ++i)
      if (run[std::size_t(i)] && is_shared(i)) return true;
    return false;
  }
  // Whether own operator j is one of `used`.
  bool own_used(int j, const OpMask& used) const {
    for (int i = 0; i < n_ops; ++i)
      if (!is_shared(i) && info_[std::size_t(i)].slot == j) return used[std::size_t(i)];
    return false;
  }

  static OpMask only_softmax() {
    OpMask m{};
    m[std::size_t(softmax_index())] = true;
    return m;
  }
  // Block of [Wo | Wo_own…] that operator i's output meets; column block of the scaled copy.
  index_t distinct_block(int i) const { return is_shared(i) ? 0 : 1 + info_[std::size_t(i)].slot; }
  index_t scaled_column(int i) const {
    return is_shared(i) ? info_[std::size_t(i)].slot : n_shared + info_[std::size_t(i)].slot;
  }
  // π_i·d_i of own operator i.
  bfloat16* d_out(const MixerBuffers& b, int i, index_t rows) const {
    return b.d_out + index_t(info_[std::size_t(i)].slot) * rows * q_dim_;
  }

  // Calls f(first, count) for every maximal run of set flags among the first n.
  template <class F>
  static void for_each_span(const std::array<bool, max_mixture_terms>& flags, int n, F&& f) {
    for (int i = 0; i < n;) {
      if (!flags[std::size_t(i)]) {
        ++i;
        continue;
      }
      int j = i;
      while (j < n && flags[std::size_t(j)]) ++j;
      f(i, j - i);
      i = j;
    }
  }

  template <class T>
  void upload_own(OwnOp& o, const AttentionWeights<T>& proj,
                  std::initializer_list<std::reference_wrapper<const Tensor<T>>> gate_weights,
                  std::initializer_list<std::reference_wrapper<const Tensor<T>>> gate_biases) {
    o.kv_width = index_t(o.kv_heads) * shape_.d_head;
    const index_t gate_rows = index_t(gate_weights.size()) * o.gates, unpadded = q_dim_ + 2 * o.kv_width + gate_rows;
    o.in_width = (unpadded + 7) / 8 * 8;
    o.gate_columns = o.in_width - q_dim_ - 2 * o.kv_width;
    std::vector<std::reference_wrapper<const Tensor<T>>> rows{std::cref(proj.wq), std::cref(proj.wk),
                                                              std::cref(proj.wv)};
    rows.insert(rows.end(), gate_weights.begin(), gate_weights.end());
    o.w_in = stacked_to_device_bf16<T>(rows, o.in_width);
    if (shape_.qkv_bias) o.b_in = stacked_to_device_bf16<T>({std::cref(proj.bq), std::cref(proj.bk), std::cref(proj.bv)}, o.in_width);
    // The biases as the device's bf16 weights would hold them, kept in fp32 for the gate kernel.
    Tensor<float> bias(Shape{index_t(gate_biases.size()) * o.gates});
    float* at = bias.data();
    for (const Tensor<T>& p : gate_biases)
      for (index_t i = 0; i < p.numel(); ++i) *at++ = float(bf16(float(p.data()[i])));
    o.b_gates = DeviceTensor<float>::from_host(bias.view());
  }

  // RoPE (or its inverse) on q and k heads that share strides (both in one fused buffer).
  void rotate(const MixerContext& c, bfloat16* q, bfloat16* k, int q_heads, int k_heads, index_t token_stride,
              bool inverse) const {
    if (shape_.rope.style == RopeConfig::Style::none) return;
    RopeParams r;
    r.q = q, r.k = k, r.n_q_heads = q_heads, r.n_k_heads = k_heads;
    r.batch = int(c.batch), r.length = c.length;
    r.batch_stride = c.length * token_stride, r.token_stride = token_stride;
    r.inverse = inverse;
    r.table = c.rope;
    rope(r, c.stream);
  }

  // The shared operators that run: a causal Softmax beside a window without sinks as one pass
  // over q, k, v (attention::pair_forward), anything else one forward each.
  void shared_forward(const MixerContext& c, const OpMask& runs) const {
    std::array<attention::ForwardParams, max_mixture_terms> a{};
    int n = 0;
    for (int i = 0; i < n_ops; ++i)
      if (runs[std::size_t(i)] && is_shared(i)) a[std::size_t(n++)] = attention_params(c, i);
    if (n == 2) {
      if (a[0].mask.window < c.length) std::swap(a[0], a[1]);
      const attention::ForwardParams &causal = a[0], &window = a[1];
      if (causal.mask.window >= c.length && causal.mask.sinks == 0 && window.mask.sinks == 0) {
        return attention::pair_forward(
            attention::pair_params(causal, window.o, window.o_strides, window.lse, window.mask.window), c.stream);
      }
    }
    for (int t = 0; t < n; ++t) attention::forward(a[std::size_t(t)], c.stream);
  }

  // The shared operators that ran, as one mixture backward: the gradient d of their weighted
  // sum is the teacher's block of d_cat, unscaled; dL/dπ of each comes from the same pass.
  attention::MixtureBackwardParams shared_backward_params(const MixerContext& c, const OpMask& run, const float* pi,
                                                          float* d_pi) const {
    const MixerBuffers& b = c.buffers;
    attention::MixtureBackwardParams p;
    for (int i = 0; i < n_ops; ++i) {
      if (!run[std::size_t(i)] || !is_shared(i)) continue;
      const attention::ForwardParams a = attention_params(c, i);
      p.q = a.q, p.k = a.k, p.v = a.v, p.q_strides = a.q_strides, p.k_strides = a.k_strides, p.v_strides = a.v_strides;
      p.batch = a.batch, p.length = a.length, p.n_heads = a.n_heads, p.n_kv_heads = a.n_kv_heads;
      p.d_head = a.d_head, p.scale = a.scale;
      p.terms[p.n_terms++] = {a.o, a.o_strides, a.lse, a.mask, i};
    }
    const index_t cat_stride = index_t(1 + n_own) * q_dim_;
    p.pi = pi, p.d_pi = d_pi;
    p.d = b.d_cat, p.d_strides = {c.length * cat_stride, cat_stride};
    p.dq = b.dqkv, p.dk = b.dqkv + q_dim_, p.dv = b.dqkv + q_dim_ + kv_dim_;
    p.dq_strides = p.dk_strides = p.dv_strides = p.q_strides;
    return p;
  }

  attention::ForwardParams attention_params(const MixerContext& c, int i) const {
    const MixerBuffers& b = c.buffers;
    const int slot = info_[std::size_t(i)].slot;
    attention::ForwardParams a;
    a.q = b.qkv, a.k = b.qkv + q_dim_, a.v = b.qkv + q_dim_ + kv_dim_;
    a.q_strides = a.k_strides = a.v_strides = attention::Strides{c.length * qkv_width_, qkv_width_};
    const index_t shared_stride = index_t(n_shared) * q_dim_;
    a.o = b.shared_out + slot * q_dim_;
    a.o_strides = attention::Strides{c.length * shared_stride, shared_stride};
    a.lse = b.lse + slot * c.batch * c.length * shape_.n_heads;
    a.batch = int(c.batch), a.length = int(c.length);
    a.n_heads = shape_.n_heads, a.n_kv_heads = shape_.n_kv_heads, a.d_head = shape_.d_head;
    a.scale = float(1.0 / std::sqrt(double(shape_.d_head)));
    a.mask = info_[std::size_t(i)].mask;
    return a;
  }

  template <class E>
  static TensorView<E> device_view(E* data, Shape s) {
    return TensorView<E>(data, s, Device::cuda);
  }
  // [B, T, heads, D] heads inside rows of `row_width` elements (a fused buffer).
  template <class E>
  static TensorView<E> rows_view(E* data, index_t B, index_t T, index_t heads, index_t D, index_t row_width) {
    return TensorView<E>(data, Shape{B, T, heads, D}, {T * row_width, row_width, D, 1}, Device::cuda);
  }

  // Own operator j: the fused projection, gates and mixer into its buffers.
  void own_forward(const MixerContext& c, int j, const bfloat16* h) const {
    const OwnOp& o = own_[std::size_t(j)];
    const MixerBuffers& b = c.buffers;
    const index_t rows = c.batch * c.length, d = shape_.d_model, D = shape_.d_head, ld = o.in_width;
    bfloat16* const in = b.own_in[std::size_t(j)];
    bfloat16 *q = in, *k = in + q_dim_, *v = in + q_dim_ + o.kv_width;
    float *g = b.own_g[std::size_t(j)], *beta = b.own_beta[std::size_t(j)];
    c.linear(rows, ld, d, h, d, o.w_in.data(), d, true, o.b_in.data(), in, ld, DType::bf16, false, c.stream);
    const GateForwardParams gates{.z = in + q_dim_ + 2 * o.kv_width,
                                  .z_stride = ld,
                                  .bias = o.b_gates.data(),
                                  .g = g,
                                  .beta = o.with_beta ? beta : nullptr,
                                  .rows = rows,
                                  .n = o.gates,
                                  .with_beta = o.with_beta,
                                  .normaliser = o.normaliser};
    timed(c.linear.timer, "gates", c.stream, [&] { gate_forward(gates, c.stream); });
    bfloat16* out = b.own_out[std::size_t(j)];
    if (o.kind == OwnKind::gated_linear) {
      if (o.rope) rotate(c, q, k, shape_.n_heads, o.kv_heads, ld, false);
      gla::ForwardParams f;
      fill_gla_inputs(f, c, o, in, g);
      f.o = out;
      timed(c.linear.timer, "gla forward", c.stream, [&] { gla::forward(f, c.scratch, c.scratch_bytes, c.stream); });
    } else {
      const index_t B = c.batch, T = c.length, H = shape_.n_heads, Hs = o.kv_heads;
      gdn::Forward f;
      f.q = rows_view<const bfloat16>(q, B, T, H, D, ld);
      f.k = rows_view<const bfloat16>(k, B, T, Hs, D, ld);
      f.v = rows_view<const bfloat16>(v, B, T, Hs, D, ld);
      f.g = device_view<const float>(g, Shape{B, T, Hs});
      f.beta = device_view<const float>(beta, Shape{B, T, Hs});
      f.o = device_view<bfloat16>(out, Shape{B, T, H, D});
      f.scale = o.scale, f.eps = o.eps;
      f.keep_for_backward = true;
      const std::size_t kept_bytes = gdn::kept_workspace_bytes(gdn::Dims{B, T, H, Hs, D});
      timed(c.linear.timer, "gdn forward", c.stream,
            [&] { gdn::forward(f, b.own_kept[std::size_t(j)], kept_bytes, c.stream); });
    }
  }

  void fill_gla_inputs(gla::Inputs& f, const MixerContext& c, const OwnOp& o, const bfloat16* in,
                       const float* g) const {
    f.q = in, f.k = in + q_dim_, f.v = in + q_dim_ + o.kv_width, f.g = g;
    f.q_stride = f.k_stride = f.v_stride = o.in_width;
    f.batch = int(c.batch), f.length = int(c.length);
    f.n_heads = shape_.n_heads, f.n_kv_heads = o.kv_heads, f.d_head = shape_.d_head;
    f.scale = o.scale;
  }

  // Own operator j's backward from d_o (= π·dL/da) to the fused [dq | dk | dv | dz] in own_d_in.
  void own_backward_to_projection(const MixerContext& c, int j, const bfloat16* d_o) const {
    const OwnOp& o = own_[std::size_t(j)];
    const MixerBuffers& b = c.buffers;
    const index_t rows = c.batch * c.length, D = shape_.d_head, ld = o.in_width;
    const bfloat16* const in = b.own_in[std::size_t(j)];
    bfloat16* const d_in = b.own_d_in;
    const float *g = b.own_g[std::size_t(j)], *beta = b.own_beta[std::size_t(j)];
    if (o.kind == OwnKind::gated_linear) {
      gla::BackwardParams p;
      fill_gla_inputs(p, c, o, in, g);
      p.d_o = d_o, p.dq = d_in, p.dk = d_in + q_dim_, p.dv = d_in + q_dim_ + o.kv_width, p.dg = b.own_dg;
      p.dq_stride = p.dk_stride = p.dv_stride = ld;
      timed(c.linear.timer, "gla backward", c.stream, [&] { gla::backward(p, c.scratch, c.scratch_bytes, c.stream); });
      if (o.rope) rotate(c, d_in, d_in + q_dim_, shape_.n_heads, o.kv_heads, ld, true);
    } else {
      const index_t B = c.batch, T = c.length, H = shape_.n_heads, Hs = o.kv_heads;
      gdn::Backward p;
      p.q = rows_view<const bfloat16>(in, B, T, H, D, ld);
      p.k = rows_view<const bfloat16>(in + q_dim_, B, T, Hs, D, ld);
      p.v = rows_view<const bfloat16>(in + q_dim_ + o.kv_width, B, T, Hs, D, ld);
      p.g = device_view<const float>(g, Shape{B, T, Hs});
      p.beta = device_view<const float>(beta, Shape{B, T, Hs});
      p.d_o = device_view<const bfloat16>(d_o, Shape{B, T, H, D});
      p.dq = rows_view<bfloat16>(d_in, B, T, H, D, ld);
      p.dk = rows_view<bfloat16>(d_in + q_dim_, B, T, Hs, D, ld);
      p.dv = rows_view<bfloat16>(d_in + q_dim_ + o.kv_width, B, T, Hs, D, ld);
      p.dg = device_view<float>(b.own_dg, Shape{B, T, Hs});
      p.dbeta = device_view<float>(b.own_dbeta, Shape{B, T, Hs});
      p.scale = o.scale, p.eps = o.eps;
      const std::size_t kept_bytes = gdn::kept_workspace_bytes(gdn::Dims{B, T, H, Hs, D});
      timed(c.linear.timer, "gdn backward", c.stream, [&] {
        gdn::backward(p, b.own_kept[std::size_t(j)], kept_bytes, c.scratch, c.scratch_bytes, c.stream);
      });
    }
    const GateBackwardParams gates{.g = g,
                                   .beta = o.with_beta ? beta : nullptr,
                                   .dg = b.own_dg,
                                   .dbeta = o.with_beta ? b.own_dbeta : nullptr,
                                   .dz = d_in + q_dim_ + 2 * o.kv_width,
                                   .dz_stride = ld,
                                   .columns = o.gate_columns,
                                   .rows = rows,
                                   .n = o.gates,
                                   .with_beta = o.with_beta,
                                   .normaliser = o.normaliser};
    timed(c.linear.timer, "gates", c.stream, [&] { gate_backward(gates, c.stream); });
  }

  // Own operator j's backward from d_o: dh (+)= [dq | dk | dv | dz]·[Wq; Wk; Wv; W_gates].
  void own_backward(const MixerContext& c, int j, const bfloat16* d_o, float* dh, bool accumulate) const {
    const OwnOp& o = own_[std::size_t(j)];
    const index_t rows = c.batch * c.length, d = shape_.d_model;
    own_backward_to_projection(c, j, d_o);
    c.linear(rows, d, o.in_width, c.buffers.own_d_in, o.in_width, o.w_in.data(), d, false, nullptr, dh, d,
             DType::f32, accumulate, c.stream);
  }

  AttentionShape shape_;
  index_t q_dim_ = 0, kv_dim_ = 0, qkv_width_ = 0;
  DeviceTensor<bfloat16> w_qkv_, b_qkv_;
  DeviceTensor<bfloat16> w_cat_;     // [d, (1 + n_own)·q_dim]: the teacher's Wo, then each own op's
  DeviceTensor<bfloat16> w_scaled_;  // [d, n_ops·q_dim]: π_i·Wo_i, shared slots first
  std::array<OpInfo, sizeof...(Ops)> info_{};
  std::array<OwnOp, std::size_t(n_own > 0 ? n_own : 1)> own_{};
};

}  // namespace dash::cuda::model

// The teacher decoder's forward on the GPU, every layer softmax attention: what
// dash::model::Decoder<T, MixedAttention<Softmax>> computes (decoder.hpp), assembled from the
// model kernels. With the residual stream x in fp32 and every other activation in bf16:
//   x = E[ids]
//   per layer:  n = RMSNorm(x; g_attn)
//               [q | k | v] = n·[Wq; Wk; Wv]ᵀ + [bq; bk; bv]         one GEMM, fused QKV buffer
//               q, k ← RoPE(q, k)                                     in place, the config's style
//               a = softmax(q·kᵀ/√D + mask)·v                        causal, or the config's window
//               x += a·Woᵀ
//               n = RMSNorm(x; g_mlp)
//               [g | u] = n·[W_gate; W_up]ᵀ                           one GEMM
//               x += (silu(g) ⊙ u)·W_downᵀ
//   h = RMSNorm(x; g_final)                                           bf16, [B·T, d]
//   NLL = mean over counted targets of lse(h·Headᵀ) − (h·Headᵀ)[y]     Head = E when tied
// Both residual adds are the epilogues of the O and down GEMMs (C += A·Bᵀ with C the fp32
// stream), so a branch's output reaches the stream without a bf16 rounding and without a pass
// of its own; each RMSNorm then reads the stream as it stands.
//
// DeviceDecoder owns bf16 copies of the weights (Wq|Wk|Wv and W_gate|W_up stacked as above),
// the GEMM plans, the RoPE table, and one Workspace carved at construction for at most
// max_tokens = B·T rows and max_length = T positions. forward and nll validate their arguments
// on the host before any launch, then enqueue on the caller's stream without allocating device
// memory or synchronising (the first call at a new B·T builds that size's GEMM plans, on the
// host). The accessors that copy results to the host synchronise the stream; they are for
// tests and inspection, not for a training step.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "dash/core/cuda.hpp"
#include "dash/core/dtype.hpp"
#include "dash/core/error.hpp"
#include "dash/model/config.hpp"
#include "dash/model/cuda/embedding.cuh"
#include "dash/model/cuda/gemm.cuh"
#include "dash/model/cuda/invalid_token.cuh"
#include "dash/model/cuda/lm_loss.cuh"
#include "dash/model/cuda/rms_norm.cuh"
#include "dash/model/cuda/rope.cuh"
#include "dash/model/cuda/swiglu.cuh"
#include "dash/model/weights.hpp"
#include "dash/ops/softmax/cuda/forward.cuh"

namespace dash::cuda::model {

// The NLL of the last nll() call, as its device scalars hold it.
struct NllValue {
  double sum = 0;   // Σ over counted targets
  double mean = 0;  // sum / count, 0 when nothing counts
  int count = 0;    // targets in [0, vocab)
};

class DeviceDecoder {
 public:
  // Uploads the weights rounded to bf16 (nearest even); checks the config, the weights and the
  // limits before touching the device.
  template <class T>
    requires(std::is_same_v<T, float> || std::is_same_v<T, double>)
  DeviceDecoder(const dash::model::Config& config, const dash::model::Weights<T>& weights, index_t max_tokens,
                index_t max_length)
      : config_(config), max_tokens_(max_tokens), max_length_(max_length) {
    weights.validate(config);
    require(config.d_head <= attention::max_d_head, "DeviceDecoder: d_head = ", config.d_head, ", expected at most ",
            attention::max_d_head);
    require(config.n_heads <= 65535, "DeviceDecoder: n_heads = ", config.n_heads, ", expected at most 65535");
    require(max_length >= 1 && max_length <= std::numeric_limits<int>::max(), "DeviceDecoder: max_length = ",
            max_length, ", expected 1 ... ", std::numeric_limits<int>::max());
    require(max_tokens >= max_length, "DeviceDecoder: max_tokens = ", max_tokens,
            ", expected at least max_length = ", max_length, " (one whole sequence)");

    embedding_ = to_device_bf16<T>(weights.embedding.view());
    if (!config.tied_embeddings) lm_head_ = to_device_bf16<T>(weights.lm_head.view());
    final_norm_ = to_device_bf16<T>(weights.final_norm.view());
    for (const dash::model::LayerWeights<T>& w : weights.layers) {
      Layer layer;
      layer.attn_norm = to_device_bf16<T>(w.attn_norm.view());
      layer.w_qkv = stacked_to_device_bf16<T>({w.attention.wq, w.attention.wk, w.attention.wv});
      if (config.qkv_bias) layer.b_qkv = stacked_to_device_bf16<T>({w.attention.bq, w.attention.bk, w.attention.bv});
      layer.w_o = to_device_bf16<T>(w.attention.wo.view());
      layer.mlp_norm = to_device_bf16<T>(w.mlp_norm.view());
      layer.w_gate_up = stacked_to_device_bf16<T>({w.w_gate, w.w_up});
      layer.w_down = to_device_bf16<T>(w.w_down.view());
      layers_.push_back(std::move(layer));
    }
    if (config.rope.style != RopeConfig::Style::none) rope_.emplace(config.rope, config.d_head, max_length);

    hidden_ = DeviceTensor<bfloat16>(Shape{max_tokens, config.d_model});
    loss_ = DeviceTensor<float>(Shape{2});
    count_ = DeviceTensor<int>(Shape{1});
    invalid_ = DeviceTensor<unsigned long long>(Shape{2});
    // The loss's workspace depends on the sizes and on which outputs are given, not on the
    // addresses; the targets are each call's own, so the count scalar's address stands in.
    loss_bytes_ = lm_loss_workspace_bytes(gemm_, loss_params(count_.data(), max_tokens));
    std::size_t total = 0;
    carve_buffers([&]<class E>(E*&, std::size_t count, const char*) { total += Workspace::aligned(sizeof(E) * count); });
    workspace_.reserve(total);
    carve_buffers([&]<class E>(E*& p, std::size_t count, const char* what) { p = workspace_.carve<E>(count, what); });
  }

  DeviceDecoder(const DeviceDecoder&) = delete;
  DeviceDecoder& operator=(const DeviceDecoder&) = delete;

  const dash::model::Config& config() const { return config_; }
  index_t max_tokens() const { return max_tokens_; }
  index_t max_length() const { return max_length_; }

  // Final hidden states h of `batch` sequences of `length` device ids [batch·length] into
  // hidden(). An id outside [0, vocab) gives a zero embedding row and is reported by
  // check_tokens().
  void forward(const int* ids, index_t batch, index_t length, cudaStream_t stream) {
    validate_batch("forward", ids, batch, length);
    const index_t rows = batch * length;
    const int d = config_.d_model, d_ff = config_.d_ff;
    const index_t q_dim = config_.n_heads * index_t(config_.d_head), kv_dim = config_.n_kv_heads * index_t(config_.d_head);
    const index_t qkv_width = q_dim + 2 * kv_dim;

    reset_invalid_token(invalid_.data() + 1, stream);  // no targets read yet
    embedding<float>({ids, embedding_.data(), buffers_.x, rows, config_.vocab_size, d, invalid_.data()}, stream);
    for (const Layer& layer : layers_) {
      norm(layer.attn_norm.data(), buffers_.normed, rows, stream);
      linear(buffers_.normed, layer.w_qkv.data(), layer.b_qkv.data(), buffers_.qkv, DType::bf16, false, rows,
             qkv_width, d, stream);
      bfloat16* const q = buffers_.qkv;
      bfloat16* const k = q + q_dim;
      bfloat16* const v = k + kv_dim;
      if (rope_) {
        RopeParams r;
        r.q = q, r.k = k;
        r.n_q_heads = config_.n_heads, r.n_k_heads = config_.n_kv_heads;
        r.batch = int(batch), r.length = length;
        r.batch_stride = length * qkv_width, r.token_stride = qkv_width;
        r.table = rope_->view();
        rope(r, stream);
      }
      attention::ForwardParams a;
      a.q = q, a.k = k, a.v = v, a.o = buffers_.attended, a.lse = buffers_.lse;
      a.q_strides = a.k_strides = a.v_strides = attention::Strides{length * qkv_width, qkv_width};
      a.o_strides = attention::Strides{length * q_dim, q_dim};
      a.batch = int(batch), a.length = int(length);
      a.n_heads = config_.n_heads, a.n_kv_heads = config_.n_kv_heads, a.d_head = config_.d_head;
      a.scale = float(1.0 / std::sqrt(double(config_.d_head)));
      if (config_.sliding_window > 0) a.mask.window = config_.sliding_window;
      attention::forward(a, stream);
      linear(buffers_.attended, layer.w_o.data(), nullptr, buffers_.x, DType::f32, true, rows, d, q_dim, stream);

      norm(layer.mlp_norm.data(), buffers_.normed, rows, stream);
      linear(buffers_.normed, layer.w_gate_up.data(), nullptr, buffers_.gate_up, DType::bf16, false, rows,
             2 * index_t(d_ff), d, stream);
      swiglu_forward({.gate = buffers_.gate_up,
                      .up = buffers_.gate_up + d_ff,
                      .gate_up_stride = 2 * index_t(d_ff),
                      .out = buffers_.mlp,
                      .out_stride = d_ff,
                      .rows = rows,
                      .d_ff = d_ff},
                     stream);
      linear(buffers_.mlp, layer.w_down.data(), nullptr, buffers_.x, DType::f32, true, rows, d, d_ff, stream);
    }
    norm(final_norm_.data(), hidden_.data(), rows, stream);
    rows_ = rows;
  }

  // forward, then the mean NLL of `targets` (device [batch·length], one per position; a
  // negative target is not counted) into the device scalars nll_sum() and nll_mean().
  void nll(const int* ids, const int* targets, index_t batch, index_t length, cudaStream_t stream) {
    validate_batch("nll", ids, batch, length);
    require(targets != nullptr, "DeviceDecoder::nll: targets is null");
    forward(ids, batch, length, stream);
    lm_loss(gemm_, loss_params(targets, batch * length), buffers_.loss, loss_bytes_, stream);
  }

  // Device results of the last forward / nll.
  const bfloat16* hidden() const { return hidden_.data(); }  // [B·T, d_model]
  const bfloat16* head() const { return config_.tied_embeddings ? embedding_.data() : lm_head_.data(); }
  const float* nll_sum() const { return loss_.data(); }
  const float* nll_mean() const { return loss_.data() + 1; }
  index_t rows() const { return rows_; }  // B·T of the last forward

  // Host copies (these synchronise `stream`).
  Tensor<double> hidden_to_host(cudaStream_t stream) const {
    require(rows_ > 0, "DeviceDecoder::hidden_to_host: no forward has run");
    check(cudaStreamSynchronize(stream), "DeviceDecoder: synchronise");
    std::vector<bf16> raw(std::size_t(rows_) * std::size_t(config_.d_model));
    check(cudaMemcpy(raw.data(), hidden_.data(), raw.size() * sizeof(bf16), cudaMemcpyDeviceToHost),
          "DeviceDecoder: copy hidden states");
    Tensor<double> out(Shape{rows_, config_.d_model});
    for (std::size_t i = 0; i < raw.size(); ++i) out.data()[i] = double(raw[i]);
    return out;
  }

  // Natural-log logits h·Headᵀ of hidden rows [first, first + count) of the last forward, fp32
  // on the device, [count, vocab]. Allocates its output.
  Tensor<double> logits_to_host(index_t first, index_t count, cudaStream_t stream) {
    require(first >= 0 && count >= 1 && first + count <= rows_, "DeviceDecoder::logits_to_host: rows [", first, ", ",
            first + count, ") are not within the last forward's ", rows_);
    DeviceTensor<float> z(Shape{count, config_.vocab_size});
    linear(hidden_.data() + first * config_.d_model, head(), nullptr, z.data(), DType::f32, false, count,
           config_.vocab_size, config_.d_model, stream);
    check(cudaStreamSynchronize(stream), "DeviceDecoder: synchronise");
    return to_host_double(z);
  }

  NllValue nll_to_host(cudaStream_t stream) const {
    check(cudaStreamSynchronize(stream), "DeviceDecoder: synchronise");
    const Tensor<float> loss = loss_.to_host();
    return {double(loss.data()[0]), double(loss.data()[1]), count_.to_host().data()[0]};
  }

  // Throws naming the first id (of the last forward) or target (of the last nll) outside the
  // vocabulary.
  void check_tokens(cudaStream_t stream) const {
    check(cudaStreamSynchronize(stream), "DeviceDecoder: synchronise");
    const Tensor<unsigned long long> words = invalid_.to_host();
    if (const auto bad = invalid_token(words.data()[0]))
      fail("DeviceDecoder: id ", bad->id, " at position ", bad->position, " is outside the vocabulary [0, ",
           config_.vocab_size, ")");
    if (const auto bad = invalid_token(words.data()[1]))
      fail("DeviceDecoder: target ", bad->id, " at position ", bad->position, " is outside the vocabulary [0, ",
           config_.vocab_size, ")");
  }

 private:
  struct Layer {
    DeviceTensor<bfloat16> attn_norm, w_qkv, b_qkv, w_o, mlp_norm, w_gate_up, w_down;
  };

  // Activations of max_tokens rows and scratch, carved from the workspace at construction.
  struct Buffers {
    float* x = nullptr;               // residual stream [rows, d]
    bfloat16* normed = nullptr;       // [rows, d]
    bfloat16* qkv = nullptr;          // [rows, q_dim + 2·kv_dim]
    bfloat16* attended = nullptr;     // [rows, q_dim]
    float* lse = nullptr;             // [B, H, T]
    bfloat16* gate_up = nullptr;      // [rows, 2·d_ff]
    bfloat16* mlp = nullptr;          // [rows, d_ff]
    std::uint8_t* gemm = nullptr;     // the GEMMs' workspace
    std::uint8_t* loss = nullptr;     // lm_loss's workspace
  };

  // Calls carve(pointer, count, name) for every buffer: once to add up the bytes, once to carve.
  template <class Carve>
  void carve_buffers(Carve&& carve) {
    const auto rows = std::size_t(max_tokens_), d = std::size_t(config_.d_model);
    const auto q_dim = std::size_t(config_.n_heads) * std::size_t(config_.d_head);
    const auto kv_dim = std::size_t(config_.n_kv_heads) * std::size_t(config_.d_head);
    const auto d_ff = std::size_t(config_.d_ff);
    carve(buffers_.x, rows * d, "residual stream");
    carve(buffers_.normed, rows * d, "normed");
    carve(buffers_.qkv, rows * (q_dim + 2 * kv_dim), "qkv");
    carve(buffers_.attended, rows * q_dim, "attention output");
    carve(buffers_.lse, rows * std::size_t(config_.n_heads), "lse");
    carve(buffers_.gate_up, rows * 2 * d_ff, "gate|up");
    carve(buffers_.mlp, rows * d_ff, "swiglu output");
    carve(buffers_.gemm, gemm_.workspace_bytes(), "gemm workspace");
    carve(buffers_.loss, loss_bytes_, "lm loss workspace");
  }

  void validate_batch(const char* what, const int* ids, index_t batch, index_t length) const {
    require(ids != nullptr, "DeviceDecoder::", what, ": ids is null");
    require(batch >= 1 && batch <= 65535, "DeviceDecoder::", what, ": batch = ", batch, ", expected 1 ... 65535");
    require(length >= 1 && length <= max_length_, "DeviceDecoder::", what, ": length T = ", length,
            ", expected 1 ... max_length = ", max_length_);
    require(batch * length <= max_tokens_, "DeviceDecoder::", what, ": batch × length = ", batch, " × ", length,
            " exceeds max_tokens = ", max_tokens_);
  }

  LmLossParams loss_params(const int* targets, index_t tokens) {
    LmLossParams p;
    p.kind = LmLoss::nll;
    p.hidden = hidden_.data();
    p.targets = targets;
    p.head = head();
    p.tokens = tokens;
    p.d_model = config_.d_model;
    p.vocab = config_.vocab_size;
    p.loss_sum = loss_.data();
    p.loss_mean = loss_.data() + 1;
    p.count = count_.data();
    p.invalid_target = invalid_.data() + 1;
    return p;
  }

  void norm(const bfloat16* gain, bfloat16* y, index_t rows, cudaStream_t stream) {
    rms_norm_forward<float>({.x = buffers_.x,
                             .weight = gain,
                             .y = y,
                             .rows = rows,
                             .d = config_.d_model,
                             .eps = float(config_.rms_eps)},
                            stream);
  }

  // c[rows, n] (= or +=) a[rows, k]·wᵀ (+ bias), with w stored [n, k] as checkpoints store it.
  void linear(const bfloat16* a, const bfloat16* w, const bfloat16* bias, void* c, DType c_type, bool accumulate,
              index_t rows, index_t n, index_t k, cudaStream_t stream) {
    GemmShape shape;
    shape.m = rows, shape.n = n, shape.k = k;
    shape.transpose_b = true;
    shape.c_type = c_type;
    shape.bias = bias != nullptr;
    shape.accumulate = accumulate;
    GemmOperands o;
    o.a = a, o.b = w, o.c = c, o.bias = bias;
    o.workspace = buffers_.gemm, o.workspace_bytes = gemm_.workspace_bytes();
    gemm_(shape, o, stream);
  }

  dash::model::Config config_;
  index_t max_tokens_, max_length_;
  index_t rows_ = 0;
  DeviceTensor<bfloat16> embedding_, lm_head_, final_norm_;
  std::vector<Layer> layers_;
  std::optional<RopeTable> rope_;
  Gemm gemm_;
  DeviceTensor<bfloat16> hidden_;
  DeviceTensor<float> loss_;                  // Σ, mean
  DeviceTensor<int> count_;
  DeviceTensor<unsigned long long> invalid_;  // first bad id, first bad target (invalid_token.cuh)
  std::size_t loss_bytes_ = 0;
  Workspace workspace_;
  Buffers buffers_;
};

}  // namespace dash::cuda::model

// The search's model on the GPU: what search::DecoderSearchModel<T, Ops...>::kl_and_gradient
// computes (decoder_model.hpp), for Ops drawn from Softmax, SlidingWindow, GatedLinear and
// GatedDeltaNet. One step on B sequences of T tokens, with the residual stream x in fp32:
//
//   teacher   x = E[ids];  per layer  x += Attn_softmax(RMSNorm(x)),  x += MLP(RMSNorm(x))
//             h_t = RMSNorm(x)                                         (bf16)
//   student   x_0 = E[ids];  x_{l+1} = layer_l(x_l) with the mixer Σ_i π_li·o_li   (keeps every x_l)
//             h_s = RMSNorm(x_L)
//   loss      KL = mean_t KL(softmax(h_t·Eᵀ) ‖ softmax(h_s·Eᵀ)),  d_h = dKL/dh_s   (lm_loss.cuh)
//   backward  dx = RMSNorm'(x_L)ᵀ d_h; per layer, last first, with the layer's activations
//             (recomputed from x_l: mixer forward, second norm, gate|up; or kept from the forward)
//               dr = dx + RMSNorm'(r)ᵀ (MLP'ᵀ dx)          r = x_l + mixer(RMSNorm(x_l))
//               dx = dr + RMSNorm'(x_l)ᵀ (mixer'ᵀ dr),      dL/dπ_li from the mixer (mixed_attention.cuh)
//             leaving dL/dx_0 in dx.
// Memory (Activations): `recomputed` holds (L + 1)·B·T·d fp32 layer inputs and one layer's
// activations, and runs every layer's forward twice; `kept` holds every layer's activations too
// (the mixer's, gate|up and r: for SmolLM2 about 0.5 GB per layer at 32k tokens) and runs each
// forward once. Nothing is allocated after construction (one Workspace carved for max_tokens =
// B·T rows and max_length = T; the operators' scratch is planned for sequences of at least
// min(64, max_length) tokens, and a batch of shorter sequences that would need more is refused
// before any launch).
//
// step() enqueues all of it on the caller's stream from device ids and π without synchronising;
// kl_and_gradient() is the SearchModel contract (search/mixture.hpp): it checks the batch and
// the mixture on the host, uploads ids and π, runs step() on the model's stream (replayed as
// one CUDA graph from the second step of the same batch shape and run flags on) and copies the
// loss and dL/dπ back (one synchronisation per step). Mixture semantics are the CPU's: weights
// are π, run masks say which operators run (one not run must have weight 0), dL/dπ is 0 for
// an operator that did not run. The teacher is causal softmax attention in every layer, as on
// the CPU (a config's own sliding_window is not applied to it).
//
// Scoring, forward only (search/evaluate.hpp and the retrieval tasks), on the same workspace with
// the residual stream in one fp32 buffer instead of L + 1:
//   teacher_forward   h_t = the teacher's final hidden states of ids, into teacher_hidden()
//   score             Σ_t KL(softmax(h_t·Eᵀ) ‖ softmax(h_s·Eᵀ)) and Σ_t −log softmax(h_s·Eᵀ)[y_t]
//                     for the student under π (two passes of lm_loss: one kind each), against
//                     teacher hidden states of the same ids that the caller keeps (a copy of
//                     teacher_hidden(): they cost tokens × d bf16, a forward costs a whole model)
//   next_tokens       argmax_v (h_s·Eᵀ)_tv at every position (lowest id on ties, argmax.cuh), the
//                     logits formed a chunk of rows at a time in the loss's workspace
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>

#include "dash/core/cuda.hpp"
#include "dash/core/cuda/replay.cuh"
#include "dash/core/error.hpp"
#include "dash/mixed_attention.hpp"
#include "dash/model/config.hpp"
#include "dash/model/cuda/alignment.cuh"
#include "dash/model/cuda/argmax.cuh"
#include "dash/model/cuda/embedding.cuh"
#include "dash/model/cuda/gemm.cuh"
#include "dash/model/cuda/lm_loss.cuh"
#include "dash/model/cuda/mixed_attention.cuh"
#include "dash/model/cuda/mixture.cuh"
#include "dash/model/cuda/rms_norm.cuh"
#include "dash/model/cuda/rope.cuh"
#include "dash/model/cuda/swiglu.cuh"
#include "dash/model/decoder.hpp"
#include "dash/search/mixture.hpp"

namespace dash::cuda::model {

// What the search step's backward has of each layer's forward (see DeviceSearchModel).
enum class Activations { recomputed, kept };

template <class... Ops>
class DeviceSearchModel {
 public:
  using Batch = dash::model::TokenBatch;
  using Mixer = DeviceMixedAttention<Ops...>;
  using OpMask = typename Mixer::OpMask;
  static_assert(Mixer::softmax_index() < Mixer::n_ops,
                "DeviceSearchModel: the teacher is softmax attention in every layer, so the operators must include "
                "Softmax");

  static constexpr OpMask every_op() {
    OpMask all{};
    all.fill(true);
    return all;
  }

  // `used`: the operators any step may run (a search's candidates); the device holds no
  // activations or scratch for the others, and a step that runs one is refused.
  template <class T>
    requires(std::is_same_v<T, float> || std::is_same_v<T, double>)
  DeviceSearchModel(const dash::model::Decoder<T, BasicMixedAttention<T, Ops...>>& decoder, index_t max_tokens,
                    index_t max_length, Activations activations = Activations::recomputed,
                    GemmChoice gemm_choice = GemmChoice::heuristic, OpMask used = every_op())
      : config_(decoder.config()),
        max_tokens_(max_tokens),
        max_length_(max_length),
        activations_(activations),
        used_(used),
        gemm_(Gemm::default_workspace_bytes, gemm_choice) {
    const dash::model::Config& c = config_;
    c.validate();
    require(max_length >= 1 && max_length <= std::numeric_limits<int>::max(), "DeviceSearchModel: max_length = ",
            max_length, ", expected 1 ... ", std::numeric_limits<int>::max());
    require(max_tokens >= max_length && max_tokens <= (index_t(1) << 31) - 1, "DeviceSearchModel: max_tokens = ",
            max_tokens, ", expected at least max_length = ", max_length, " (one whole sequence) and below 2^31");
    require(c.n_heads <= 65535, "DeviceSearchModel: n_heads = ", c.n_heads, ", expected at most 65535");
    require(int(decoder.mixers().size()) == c.n_layers, "DeviceSearchModel: ", decoder.mixers().size(),
            " mixers for ", c.n_layers, " layers");
    for (const auto& mixer : decoder.mixers()) Mixer::validate(mixer);
    const dash::model::Weights<T>& w = decoder.weights();
    embedding_ = to_device_bf16<T>(w.embedding.view());
    if (!c.tied_embeddings) lm_head_ = to_device_bf16<T>(w.lm_head.view());
    final_norm_ = to_device_bf16<T>(w.final_norm.view());
    for (int l = 0; l < c.n_layers; ++l) {
      const dash::model::LayerWeights<T>& lw = w.layers[std::size_t(l)];
      Layer layer{Mixer(decoder.mixers()[std::size_t(l)])};
      layer.attn_norm = to_device_bf16<T>(lw.attn_norm.view());
      layer.mlp_norm = to_device_bf16<T>(lw.mlp_norm.view());
      layer.w_gate_up = stacked_to_device_bf16<T>({lw.w_gate, lw.w_up});
      layer.w_down = to_device_bf16<T>(lw.w_down.view());
      layers_.push_back(std::move(layer));
    }
    if (c.rope.style != RopeConfig::Style::none) rope_.emplace(c.rope, c.d_head, max_length);

    std::vector<ScaleJob> jobs;
    for (int l = 0; l < c.n_layers; ++l) layers_[std::size_t(l)].mixer.scale_jobs(jobs, l * n_ops());
    Tensor<std::uint8_t> job_bytes(Shape{index_t(jobs.size() * sizeof(ScaleJob))});
    std::memcpy(job_bytes.data(), jobs.data(), jobs.size() * sizeof(ScaleJob));
    scale_jobs_ = DeviceTensor<std::uint8_t>::from_host(job_bytes.view());
    n_scale_jobs_ = int(jobs.size());
    for (const ScaleJob& j : jobs) scale_elements_ = std::max(scale_elements_, j.rows * j.cols);

    for (const Layer& layer : layers_) widths_.widen(layer.mixer.widths(used_));
    // The operators' scratch for every split of max_tokens into sequences of at least
    // min(planned_length, max_length) tokens (shorter ones pad to the kernels' chunks and would
    // reserve several times the memory; step() refuses a batch that needs more than this).
    const index_t shortest = std::min(planned_length, max_length);
    for (index_t b = 1; b <= std::min(max_tokens / shortest, Mixer::max_batch); ++b) {
      const index_t length = std::min(max_length, max_tokens / b);
      scratch_bytes_ = std::max(scratch_bytes_, scratch_bytes(b, length));
      for (const Layer& layer : layers_) layer.mixer.widen_kept(widths_, b, length, used_);
    }
    loss_ = DeviceTensor<float>(Shape{2});
    scores_ = DeviceTensor<float>(Shape{2});
    counted_ = DeviceTensor<int>(Shape{1});
    invalid_ = DeviceTensor<unsigned long long>(Shape{1});
    loss_bytes_ = lm_loss_workspace_bytes(gemm_, loss_params(max_tokens));
    std::size_t total = 0;
    carve_buffers([&]<class E>(E*&, std::size_t count, const char*) { total += Workspace::aligned(sizeof(E) * count); });
    workspace_.reserve(total);
    carve_buffers([&]<class E>(E*& p, std::size_t count, const char* what) { p = workspace_.carve<E>(count, what); });
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "DeviceSearchModel: create stream");
  }

  DeviceSearchModel(const DeviceSearchModel&) = delete;
  DeviceSearchModel& operator=(const DeviceSearchModel&) = delete;
  ~DeviceSearchModel() {
    if (stream_) cudaStreamDestroy(stream_);
  }

  int n_layers() const { return config_.n_layers; }
  int n_ops() const { return Mixer::n_ops; }
  const dash::model::Config& config() const { return config_; }
  index_t max_tokens() const { return max_tokens_; }
  index_t max_length() const { return max_length_; }
  std::size_t workspace_bytes() const { return workspace_.capacity(); }
  Activations activations() const { return activations_; }
  cudaStream_t stream() const { return stream_; }

  // SearchModel: the token-mean KL(teacher ‖ student) of `batch` under `mixture`, with dL/dπ in
  // mixture.grad.
  double kl_and_gradient(const Batch& batch, search::Mixture& mixture) {
    batch.validate(config_.vocab_size);
    validate_batch("kl_and_gradient", batch.batch, batch.length);
    require(mixture.n_layers == n_layers() && mixture.n_ops == n_ops(), "DeviceSearchModel: a mixture of ",
            mixture.n_layers, " × ", mixture.n_ops, " for ", n_layers(), " × ", n_ops());
    const std::size_t entries = std::size_t(n_layers()) * std::size_t(n_ops());
    require(mixture.weights.size() == entries && mixture.run.size() == entries, "DeviceSearchModel: mixture has ",
            mixture.weights.size(), " weights and ", mixture.run.size(), " run flags, expected ", entries);
    std::vector<float> pi(entries);
    for (std::size_t e = 0; e < entries; ++e) {
      const double weight = mixture.weights[e];
      const int l = int(e) / n_ops(), i = int(e) % n_ops();
      require(std::isfinite(weight), "DeviceSearchModel: mixture weight of layer ", l, " operator ", i, " is ", weight,
              ", expected a finite value");
      require(mixture.run[e] || weight == 0, "DeviceSearchModel: mixture weight of layer ", l, " operator ", i,
              " is ", weight, " but the operator is not run; expected weight 0 for an operator left out");
      pi[e] = float(weight);
    }
    check(cudaMemcpyAsync(ids_, batch.ids.data(), batch.ids.size() * sizeof(int), cudaMemcpyHostToDevice, stream_),
          "DeviceSearchModel: upload ids");
    check(cudaMemcpyAsync(pi_, pi.data(), entries * sizeof(float), cudaMemcpyHostToDevice, stream_),
          "DeviceSearchModel: upload pi");
    replayed_step(ids_, batch.batch, batch.length, pi_, mixture.run, stream_);
    float loss[2];
    std::vector<float> grad(entries);
    check(cudaMemcpyAsync(loss, loss_.data(), sizeof(loss), cudaMemcpyDeviceToHost, stream_),
          "DeviceSearchModel: copy loss");
    check(cudaMemcpyAsync(grad.data(), grad_, entries * sizeof(float), cudaMemcpyDeviceToHost, stream_),
          "DeviceSearchModel: copy dL/dpi");
    check(cudaStreamSynchronize(stream_), "DeviceSearchModel: synchronise");
    mixture.grad.assign(grad.begin(), grad.end());
    return double(loss[1]);
  }

  // One step on `batch` sequences of `length` device ids, mixing weights pi (device fp32,
  // [n_layers × n_ops], layer-major) and host run flags (same layout): the loss into loss(),
  // dL/dπ into pi_gradient(), dL/dx_0 into input_gradient(). Enqueued on `stream`; no host
  // synchronisation, no allocation. An id outside [0, vocab) gives a zero embedding row and is
  // reported by check_tokens().
  void step(const int* ids, index_t batch, index_t length, const float* pi, std::span<const std::uint8_t> run,
            cudaStream_t stream) {
    validate_batch("step", batch, length);
    require(ids != nullptr, "DeviceSearchModel::step: ids is null");
    require(pi != nullptr, "DeviceSearchModel::step: pi is null");
    set_masks("step", run);
    const std::size_t entries = std::size_t(n_layers()) * std::size_t(n_ops());

    const index_t rows = batch * length;
    const MixerContext c = context(batch, length, stream);
    float* const x_last = layer_input(n_layers());

    check(cudaMemsetAsync(grad_, 0, entries * sizeof(float), stream), "DeviceSearchModel: clear dL/dpi");
    timed(timer_, "scale weights", stream, [&] {
      scale_weights(reinterpret_cast<const ScaleJob*>(scale_jobs_.data()), n_scale_jobs_, scale_elements_, pi, stream);
    });

    // Teacher, in the last layer-input slot (the student overwrites it).
    embed(ids, x_last, rows, stream);
    for (int l = 0; l < n_layers(); ++l) {
      attention_block(c, l, x_last, x_last, masks_[std::size_t(l)], /*teacher=*/true);
      mlp_block(c, l, x_last, x_last, /*down=*/true, buffers_.gate_up);
    }
    norm(final_norm_.data(), x_last, buffers_.teacher_hidden, rows, stream);

    // Student, keeping every layer's input (and, when kept, its activations): the residual
    // stream moves from buffer to buffer through the output GEMMs' addends, never copied.
    embed(ids, layer_input(0), rows, stream);
    for (int l = 0; l < n_layers(); ++l) {
      float* const x = layer_input(l + 1);
      float* const r = activations_ == Activations::kept ? buffers_.kept_residual[std::size_t(l)] : x;
      const MixerContext cl = layer_context(c, l);
      attention_block(cl, l, layer_input(l), r, masks_[std::size_t(l)], false);
      mlp_block(cl, l, r, x, true, gate_up_of(l));
    }
    norm(final_norm_.data(), x_last, buffers_.student_hidden, rows, stream);

    LmLossParams loss = loss_params(rows);
    timed(timer_, "lm loss (its 3 GEMMs inside)", stream,
          [&] { lm_loss(gemm_, loss, buffers_.loss, loss_bytes_, stream); });

    // Backward.
    norm_backward(x_last, final_norm_.data(), buffers_.d_hidden, false, rows, stream);
    for (int l = n_layers() - 1; l >= 0; --l)
      layer_backward(layer_context(c, l), l, pi + l * n_ops(), masks_[std::size_t(l)], grad_ + l * n_ops());
  }

  // step(), replayed as one CUDA graph (dash/core/cuda/replay.cuh) while its arguments stay the
  // same: the first call with them runs eagerly (it settles the GEMM algorithms), the second
  // captures. Eager in timing mode, whose events are per launch.
  void replayed_step(const int* ids, index_t batch, index_t length, const float* pi,
                     std::span<const std::uint8_t> run, cudaStream_t stream) {
    if (timer_) return step(ids, batch, length, pi, run, stream);
    std::vector<std::uint64_t> key{std::uint64_t(reinterpret_cast<std::uintptr_t>(ids)), std::uint64_t(batch),
                                   std::uint64_t(length), std::uint64_t(reinterpret_cast<std::uintptr_t>(pi))};
    key.insert(key.end(), run.begin(), run.end());
    replay_.run(key, stream, [&](cudaStream_t s) { step(ids, batch, length, pi, run, s); });
  }

  // The teacher's final hidden states of `batch` sequences of `length` device ids, into
  // teacher_hidden() ([batch·length, d] bf16). Enqueued on `stream`; no synchronisation.
  void teacher_forward(const int* ids, index_t batch, index_t length, cudaStream_t stream) {
    validate_batch("teacher_forward", batch, length);
    require(ids != nullptr, "DeviceSearchModel::teacher_forward: ids is null");
    const MixerContext c = context(batch, length, stream);
    float* const x = buffers_.residual;
    embed(ids, x, batch * length, stream);
    for (int l = 0; l < n_layers(); ++l) {
      attention_block(c, l, x, x, OpMask{}, /*teacher=*/true);
      mlp_block(c, l, x, x, /*down=*/true, buffers_.gate_up);
    }
    norm(final_norm_.data(), x, buffers_.teacher_hidden, batch * length, stream);
  }

  // The student under π (device, as for step()) and run flags on `batch` sequences of `length`
  // device ids, scored against `teacher_hidden` ([batch·length, d] bf16: the teacher's final
  // hidden states of the same ids, as teacher_forward() leaves them): scores() = [Σ_t KL_t,
  // Σ_t NLL_t of `targets`], target_count() = the targets counted (those in [0, vocab); a
  // negative one is not counted, nor one ≥ vocab). Enqueued on `stream`; no synchronisation.
  void score(const int* ids, const int* targets, index_t batch, index_t length, const float* pi,
             std::span<const std::uint8_t> run, const bfloat16* teacher_hidden, cudaStream_t stream) {
    validate_forward("score", ids, batch, length, pi, run);
    require(targets != nullptr, "DeviceSearchModel::score: targets is null");
    require(teacher_hidden != nullptr, "DeviceSearchModel::score: teacher_hidden is null");
    const index_t rows = batch * length;
    student_forward(ids, batch, length, pi, stream);
    float* const sums = scores_.data();
    LmLossParams kl = scoring_params(LmLoss::kl, rows);
    kl.teacher_hidden = teacher_hidden;
    kl.loss_sum = sums;
    timed(timer_, "lm loss (kl)", stream, [&] { lm_loss(gemm_, kl, buffers_.loss, loss_bytes_, stream); });
    LmLossParams nll = scoring_params(LmLoss::nll, rows);
    nll.targets = targets;
    nll.loss_sum = sums + 1;
    nll.count = counted_.data();
    timed(timer_, "lm loss (nll)", stream, [&] { lm_loss(gemm_, nll, buffers_.loss, loss_bytes_, stream); });
  }

  // next[r] = argmax_v of the student's logits at row r of `batch` sequences of `length` device
  // ids (the next token greedy decoding picks after ids[0..t]), into out_ids ([batch·length],
  // device). Enqueued on `stream`; no synchronisation.
  void next_tokens(const int* ids, index_t batch, index_t length, const float* pi, std::span<const std::uint8_t> run,
                   int* out_ids, cudaStream_t stream) {
    validate_forward("next_tokens", ids, batch, length, pi, run);
    require(out_ids != nullptr, "DeviceSearchModel::next_tokens: out_ids is null");
    const index_t rows = batch * length, ld = detail::round_up(config_.vocab_size, 64);
    student_forward(ids, batch, length, pi, stream);
    const index_t chunk = detail::tidy_chunk(index_t(loss_bytes_ / (std::size_t(ld) * sizeof(float))), rows);
    float* const logits = reinterpret_cast<float*>(buffers_.loss);
    for (index_t first = 0; first < rows; first += chunk) {
      const index_t n = std::min(chunk, rows - first);
      GemmShape shape;
      shape.m = n, shape.n = config_.vocab_size, shape.k = config_.d_model;
      shape.transpose_b = true;
      shape.ldc = ld;
      shape.c_type = DType::f32;
      GemmOperands operands{};
      operands.a = buffers_.student_hidden + first * config_.d_model;
      operands.b = head();
      operands.c = logits;
      operands.workspace = buffers_.gemm, operands.workspace_bytes = gemm_.workspace_bytes();
      timed(timer_, "logits", stream, [&] { gemm_(shape, operands, stream); });
      timed(timer_, "argmax", stream, [&] {
        argmax_rows({.values = logits, .rows = n, .cols = config_.vocab_size, .ld = ld, .out = out_ids + first},
                    stream);
      });
    }
  }

  // Candidate preparation (prepare.cuh): the teacher's forward of `batch` sequences of `length`
  // device ids, layer by layer, calling f(l, context, h, a) after layer l's attention with
  // h = RMSNorm(x_l) (bf16 [rows, d]) and a = A_l(h) (fp32 [rows, d]), the teacher's attention
  // output; f may use the layer's mixer buffers, and must leave h and a as they are. Then
  // x_{l+1} = x_l + a + MLP(RMSNorm(x_l + a)). Enqueued on `stream`; no synchronisation.
  template <class F>
  void teacher_layers(const int* ids, index_t batch, index_t length, cudaStream_t stream, F&& f) {
    validate_batch("teacher_layers", batch, length);
    require(ids != nullptr, "DeviceSearchModel::teacher_layers: ids is null");
    const MixerContext c = context(batch, length, stream);
    const index_t rows = batch * length;
    float *const x = buffers_.residual, *const a = buffers_.d_mixer;
    embed(ids, x, rows, stream);
    for (int l = 0; l < n_layers(); ++l) {
      const Layer& layer = layers_[std::size_t(l)];
      norm(layer.attn_norm.data(), x, buffers_.normed, rows, stream);
      check(cudaMemsetAsync(a, 0, std::size_t(rows) * std::size_t(config_.d_model) * sizeof(float), stream),
            "DeviceSearchModel: clear the attention output");
      layer.mixer.forward(c, buffers_.normed, a, a, OpMask{}, /*teacher=*/true);
      f(l, c, static_cast<const bfloat16*>(buffers_.normed), static_cast<const float*>(a));
      add_into(x, a, rows * config_.d_model, stream);
      mlp_block(c, l, x, x, /*down=*/true, buffers_.gate_up);
    }
  }

  Mixer& mixer(int l) { return layers_[std::size_t(l)].mixer; }

  // Device results of the last score(): [Σ_t KL_t, Σ_t NLL_t] and the targets counted.
  const float* scores() const { return scores_.data(); }
  const int* target_count() const { return counted_.data(); }

  // Device results of the last step.
  const float* loss() const { return loss_.data(); }  // [Σ_t KL_t, mean]
  const float* pi_gradient() const { return grad_; }   // [n_layers × n_ops]
  const float* input_gradient() const { return buffers_.dx; }  // dL/dx_0, [B·T, d] fp32
  const bfloat16* teacher_hidden() const { return buffers_.teacher_hidden; }
  const bfloat16* student_hidden() const { return buffers_.student_hidden; }

  // Throws naming the first id of the last step outside the vocabulary (synchronises `stream`).
  void check_tokens(cudaStream_t stream) const {
    check(cudaStreamSynchronize(stream), "DeviceSearchModel: synchronise");
    const Tensor<unsigned long long> word = invalid_.to_host();
    if (const auto bad = invalid_token(word.data()[0]))
      fail("DeviceSearchModel: id ", bad->id, " at position ", bad->position, " is outside the vocabulary [0, ",
           config_.vocab_size, ")");
  }

  // Timing mode: every GEMM and every other launch group of the following steps recorded in
  // `timer` (null: off). The fused loss is one region (its GEMMs run inside lm_loss).
  void set_timer(StepTimer* timer) {
    timer_ = timer;
    replay_.reset();
  }

 private:
  struct Layer {
    Mixer mixer;
    DeviceTensor<bfloat16> attn_norm, mlp_norm, w_gate_up, w_down;
  };

  struct Buffers {
    float* layer_inputs = nullptr;      // [L + 1, rows, d]
    float* residual = nullptr;          // [rows, d]: r of the layer being recomputed
    bfloat16* normed = nullptr;         // [rows, d]
    bfloat16* gate_up = nullptr;        // [rows, 2·d_ff]
    bfloat16* mlp = nullptr;            // [rows, d_ff]
    bfloat16* teacher_hidden = nullptr; // [rows, d]
    bfloat16* student_hidden = nullptr;
    bfloat16* d_hidden = nullptr;       // [rows, d]
    float* dx = nullptr;                // [rows, d]: the residual stream's gradient
    float* d_mixer = nullptr;           // [rows, d]: the mixer's dh
    bfloat16* dx_rounded = nullptr;     // [rows, d]
    bfloat16* d_normed = nullptr;       // [rows, d]
    MixerBuffers mixer;
    std::vector<MixerBuffers> kept_mixer;  // [L]: each layer's mixer activations (kept)
    std::vector<bfloat16*> kept_gate_up;   // [L]: [rows, 2·d_ff] (kept)
    std::vector<float*> kept_residual;     // [L]: r = x_l + mixer, [rows, d] (kept)
    std::uint8_t* scratch = nullptr;    // the operators' kernels
    std::uint8_t* gemm = nullptr;
    std::uint8_t* loss = nullptr;
  };

  template <class Carve>
  void carve_buffers(Carve&& carve) {
    const auto rows = std::size_t(max_tokens_), d = std::size_t(config_.d_model), d_ff = std::size_t(config_.d_ff);
    carve(buffers_.layer_inputs, (std::size_t(n_layers()) + 1) * rows * d, "layer inputs");
    carve(buffers_.residual, rows * d, "residual");
    carve(buffers_.normed, rows * d, "normed");
    carve(buffers_.gate_up, rows * 2 * d_ff, "gate|up");
    carve(buffers_.mlp, rows * d_ff, "swiglu output");
    carve(buffers_.teacher_hidden, rows * d, "teacher hidden");
    carve(buffers_.student_hidden, rows * d, "student hidden");
    carve(buffers_.d_hidden, rows * d, "d hidden");
    carve(buffers_.dx, rows * d, "dx");
    carve(buffers_.d_mixer, rows * d, "mixer dh");
    carve(buffers_.dx_rounded, rows * d, "dx bf16");
    carve(buffers_.d_normed, rows * d, "d normed");
    buffers_.mixer.carve(carve, widths_, max_tokens_);
    const std::size_t kept = activations_ == Activations::kept ? std::size_t(n_layers()) : 0;
    buffers_.kept_mixer.resize(kept), buffers_.kept_gate_up.resize(kept), buffers_.kept_residual.resize(kept);
    for (std::size_t l = 0; l < kept; ++l) {
      buffers_.kept_mixer[l].carve_forward(carve, widths_, max_tokens_);
      carve(buffers_.kept_gate_up[l], rows * 2 * d_ff, "kept gate|up");
      carve(buffers_.kept_residual[l], rows * d, "kept residual");
    }
    carve(buffers_.scratch, scratch_bytes_, "operator scratch");
    carve(buffers_.gemm, gemm_.workspace_bytes(), "gemm workspace");
    carve(buffers_.loss, loss_bytes_, "lm loss workspace");
    carve(ids_, rows, "ids");
    carve(pi_, std::size_t(n_layers()) * std::size_t(n_ops()), "pi");
    carve(grad_, std::size_t(n_layers()) * std::size_t(n_ops()), "dL/dpi");
  }

  void validate_batch(const char* what, index_t batch, index_t length) const {
    require(batch >= 1 && batch <= Mixer::max_batch, "DeviceSearchModel::", what, ": batch = ", batch,
            ", expected 1 ... ", Mixer::max_batch);
    require(length >= 1 && length <= max_length_, "DeviceSearchModel::", what, ": length T = ", length,
            ", expected 1 ... max_length = ", max_length_);
    require(batch * length <= max_tokens_, "DeviceSearchModel::", what, ": batch × length = ", batch, " × ", length,
            " exceeds max_tokens = ", max_tokens_);
    const auto refuse_above = [&](std::size_t needed, std::size_t held, const char* buffer) {
      require(needed <= held, "DeviceSearchModel::", what, ": ", batch, " sequences of ", length, " tokens need ",
              needed, " bytes of ", buffer, ", the model holds ", held, " (planned for sequences of at least ",
              std::min(planned_length, max_length_),
              " tokens; for more, shorter sequences give the model a larger max_tokens)");
    };
    refuse_above(scratch_bytes(batch, length), scratch_bytes_, "operator scratch");
    MixerWidths kept;
    for (const Layer& layer : layers_) layer.mixer.widen_kept(kept, batch, length, used_);
    for (int j = 0; j < MixerWidths::max_own; ++j)
      refuse_above(kept.own_kept_bytes[std::size_t(j)], widths_.own_kept_bytes[std::size_t(j)],
                   "GatedDeltaNet workspace kept per layer");
  }

  void validate_forward(const char* what, const int* ids, index_t batch, index_t length, const float* pi,
                        std::span<const std::uint8_t> run) {
    validate_batch(what, batch, length);
    require(ids != nullptr, "DeviceSearchModel::", what, ": ids is null");
    require(pi != nullptr, "DeviceSearchModel::", what, ": pi is null");
    set_masks(what, run);
  }

  // masks_ from the run flags, which may only name operators the model was built for.
  void set_masks(const char* what, std::span<const std::uint8_t> run) {
    const std::size_t entries = std::size_t(n_layers()) * std::size_t(n_ops());
    require(run.size() == entries, "DeviceSearchModel::", what, ": run has ", run.size(),
            " flags, expected n_layers × n_ops = ", entries);
    masks_.resize(std::size_t(n_layers()));
    for (std::size_t e = 0; e < entries; ++e) {
      const std::size_t l = e / std::size_t(n_ops()), i = e % std::size_t(n_ops());
      require(!run[e] || used_[i], "DeviceSearchModel::", what, ": operator ", i, " runs in layer ", l,
              ", but the model was built without it");
      masks_[l][i] = run[e] != 0;
    }
  }

  // The student's final hidden states under π and masks_ into student_hidden(), the residual
  // stream in one buffer.
  void student_forward(const int* ids, index_t batch, index_t length, const float* pi, cudaStream_t stream) {
    const index_t rows = batch * length;
    const MixerContext c = context(batch, length, stream);
    timed(timer_, "scale weights", stream, [&] {
      scale_weights(reinterpret_cast<const ScaleJob*>(scale_jobs_.data()), n_scale_jobs_, scale_elements_, pi, stream);
    });
    float* const x = buffers_.residual;
    embed(ids, x, rows, stream);
    for (int l = 0; l < n_layers(); ++l) {
      attention_block(c, l, x, x, masks_[std::size_t(l)], false);
      mlp_block(c, l, x, x, true, buffers_.gate_up);
    }
    norm(final_norm_.data(), x, buffers_.student_hidden, rows, stream);
  }

  // The loss of a score() pass: sums only, no gradient.
  LmLossParams scoring_params(LmLoss kind, index_t tokens) const {
    LmLossParams p;
    p.kind = kind;
    p.hidden = buffers_.student_hidden;
    p.head = head();
    p.tokens = tokens;
    p.d_model = config_.d_model;
    p.vocab = config_.vocab_size;
    return p;
  }

  // The operators' scratch for `batch` sequences of `length` tokens, over every layer.
  std::size_t scratch_bytes(index_t batch, index_t length) const {
    std::size_t bytes = 0;
    for (const Layer& layer : layers_) bytes = std::max(bytes, layer.mixer.scratch_bytes(batch, length, used_));
    return bytes;
  }

  const bfloat16* head() const { return config_.tied_embeddings ? embedding_.data() : lm_head_.data(); }

  LmLossParams loss_params(index_t tokens) const {
    LmLossParams p;
    p.kind = LmLoss::kl;
    p.teacher_hidden = buffers_.teacher_hidden;
    p.hidden = buffers_.student_hidden;
    p.head = head();
    p.tokens = tokens;
    p.d_model = config_.d_model;
    p.vocab = config_.vocab_size;
    p.loss_sum = const_cast<float*>(loss_.data());
    p.loss_mean = const_cast<float*>(loss_.data()) + 1;
    p.d_hidden = buffers_.d_hidden;
    p.d_hidden_type = DType::bf16;
    // Before carving the workspace the pointers are null: only sizes matter to the byte count.
    if (!p.teacher_hidden) p.teacher_hidden = p.head, p.hidden = p.head, p.d_hidden = const_cast<bfloat16*>(p.head);
    return p;
  }

  MixerContext context(index_t batch, index_t length, cudaStream_t stream) {
    MixerContext c;
    c.linear = Linear{&gemm_, buffers_.gemm, gemm_.workspace_bytes(), timer_};
    c.buffers = buffers_.mixer;
    c.scratch = buffers_.scratch, c.scratch_bytes = scratch_bytes_;
    if (rope_) c.rope = rope_->view();
    c.batch = batch, c.length = length;
    c.stream = stream;
    return c;
  }

  // c with layer l's own forward activations where they are kept.
  MixerContext layer_context(const MixerContext& c, int l) const {
    if (activations_ != Activations::kept) return c;
    MixerContext cl = c;
    cl.buffers = c.buffers.with_forward_of(buffers_.kept_mixer[std::size_t(l)]);
    return cl;
  }

  bfloat16* gate_up_of(int l) const {
    return activations_ == Activations::kept ? buffers_.kept_gate_up[std::size_t(l)] : buffers_.gate_up;
  }

  float* layer_input(int l) const {
    return buffers_.layer_inputs + std::size_t(l) * std::size_t(max_tokens_) * std::size_t(config_.d_model);
  }

  void embed(const int* ids, float* x, index_t rows, cudaStream_t stream) {
    timed(timer_, "embedding", stream, [&] {
      embedding<float>({ids, embedding_.data(), x, rows, config_.vocab_size, config_.d_model, invalid_.data()},
                       stream);
    });
  }

  void norm(const bfloat16* gain, const float* x, bfloat16* y, index_t rows, cudaStream_t stream) {
    timed(timer_, "rms norm", stream, [&] {
      rms_norm_forward<float>(
          {.x = x, .weight = gain, .y = y, .rows = rows, .d = config_.d_model, .eps = float(config_.rms_eps)}, stream);
    });
  }

  // dx (+)= the norm's backward of dy, and dx_rounded = bf16(dx), what the next GEMM reads.
  template <class Upstream>
  void norm_backward(const float* x, const bfloat16* gain, const Upstream* dy, bool accumulate, index_t rows,
                     cudaStream_t stream) {
    timed(timer_, "rms norm backward", stream, [&] {
      rms_norm_backward<float, float, Upstream>({.x = x,
                                                 .weight = gain,
                                                 .dy = dy,
                                                 .dx = buffers_.dx,
                                                 .dx_rounded = buffers_.dx_rounded,
                                                 .rows = rows,
                                                 .d = config_.d_model,
                                                 .eps = float(config_.rms_eps),
                                                 .accumulate = accumulate},
                                                stream);
    });
  }

  // x += mixer(RMSNorm(x)).
  // y = x + mixer(RMSNorm(x)); y may be x.
  void attention_block(const MixerContext& c, int l, const float* x, float* y, const OpMask& run, bool teacher) {
    const Layer& layer = layers_[std::size_t(l)];
    const index_t rows = c.batch * c.length;
    norm(layer.attn_norm.data(), x, buffers_.normed, rows, c.stream);
    layer.mixer.forward(c, buffers_.normed, x, y, run, teacher);
  }

  // n = RMSNorm(x), gate|up = n·[W_gate; W_up]ᵀ into gate_up, and with `down`:
  // y = x + SwiGLU·W_downᵀ (y may be x).
  void mlp_block(const MixerContext& c, int l, const float* x, float* y, bool down, bfloat16* gate_up) {
    const Layer& layer = layers_[std::size_t(l)];
    const index_t rows = c.batch * c.length, d = config_.d_model, d_ff = config_.d_ff;
    norm(layer.mlp_norm.data(), x, buffers_.normed, rows, c.stream);
    c.linear(rows, 2 * d_ff, d, buffers_.normed, d, layer.w_gate_up.data(), d, true, nullptr, gate_up, 2 * d_ff,
             DType::bf16, false, c.stream);
    if (!down) return;
    timed(timer_, "swiglu", c.stream, [&] {
      swiglu_forward({.gate = gate_up,
                      .up = gate_up + d_ff,
                      .gate_up_stride = 2 * d_ff,
                      .out = buffers_.mlp,
                      .out_stride = d_ff,
                      .rows = rows,
                      .d_ff = int(d_ff)},
                     c.stream);
    });
    c.linear(rows, d, d_ff, buffers_.mlp, d_ff, layer.w_down.data(), d_ff, true, nullptr, y, d, DType::f32, true,
             c.stream, x == y ? nullptr : x);
  }

  // dx: dL/dx_{l+1} in, dL/dx_l out; d_pi[i] = dL/dπ_li. c holds layer l's forward activations
  // when they are kept; else they are recomputed here.
  void layer_backward(const MixerContext& c, int l, const float* pi, const OpMask& run, float* d_pi) {
    const Layer& layer = layers_[std::size_t(l)];
    const index_t rows = c.batch * c.length, d = config_.d_model, d_ff = config_.d_ff;
    const bool kept = activations_ == Activations::kept;
    float* const r = kept ? buffers_.kept_residual[std::size_t(l)] : buffers_.residual;
    bfloat16* const gate_up = gate_up_of(l);
    if (!kept) {
      attention_block(c, l, layer_input(l), r, run, false);
      mlp_block(c, l, r, r, false, gate_up);
    }

    // Through the MLP: dn2 = (SwiGLU'ᵀ (dx·W_down))·[W_gate; W_up], then the second norm into dx.
    // dx_rounded is bf16(dx): every norm backward into dx writes both.
    c.linear(rows, d_ff, d, buffers_.dx_rounded, d, layer.w_down.data(), d_ff, false, nullptr, buffers_.mlp, d_ff,
             DType::bf16, false, c.stream);
    timed(timer_, "swiglu backward", c.stream, [&] {
      swiglu_backward({.gate = gate_up,
                       .up = gate_up + d_ff,
                       .gate_up_stride = 2 * d_ff,
                       .d_out = buffers_.mlp,
                       .d_out_stride = d_ff,
                       .d_gate = gate_up,
                       .d_up = gate_up + d_ff,
                       .d_gate_up_stride = 2 * d_ff,
                       .rows = rows,
                       .d_ff = int(d_ff)},
                      c.stream);
    });
    c.linear(rows, d, 2 * d_ff, gate_up, 2 * d_ff, layer.w_gate_up.data(), d, false, nullptr,
             buffers_.d_normed, d, DType::bf16, false, c.stream);
    norm_backward(r, layer.mlp_norm.data(), buffers_.d_normed, true, rows, c.stream);

    // Through the mixer and the first norm (which reads the mixer's fp32 gradient as it is).
    if (!layer.mixer.backward(c, buffers_.dx_rounded, buffers_.d_mixer, pi, run, d_pi)) return;
    norm_backward(layer_input(l), layer.attn_norm.data(), buffers_.d_mixer, true, rows, c.stream);
  }

  // The shortest sequences the operators' scratch is planned for: the linear-attention kernels'
  // chunk, to which shorter sequences pad.
  static constexpr index_t planned_length = 64;

  dash::model::Config config_;
  index_t max_tokens_, max_length_;
  Activations activations_;
  OpMask used_;  // the operators that may run; the others' activations and scratch are not held
  DeviceTensor<bfloat16> embedding_, lm_head_, final_norm_;
  std::vector<Layer> layers_;
  std::optional<RopeTable> rope_;
  DeviceTensor<std::uint8_t> scale_jobs_;  // ScaleJob[n_scale_jobs_]
  int n_scale_jobs_ = 0;
  index_t scale_elements_ = 1;
  MixerWidths widths_;
  std::size_t scratch_bytes_ = 0, loss_bytes_ = 0;
  Gemm gemm_;
  DeviceTensor<float> loss_;                  // Σ, mean
  DeviceTensor<float> scores_;                // score(): Σ KL, Σ NLL
  DeviceTensor<int> counted_;                 // score(): targets counted
  DeviceTensor<unsigned long long> invalid_;  // first bad id (invalid_token.cuh)
  Workspace workspace_;
  Buffers buffers_;
  int* ids_ = nullptr;
  float* pi_ = nullptr;
  float* grad_ = nullptr;
  std::vector<OpMask> masks_;  // the run flags of the current step, per layer
  StepTimer* timer_ = nullptr;
  Replay replay_;  // declared after the workspace, so the graph goes before the buffers it uses
  cudaStream_t stream_ = nullptr;
};

}  // namespace dash::cuda::model

// Stage 1 of DASH (candidate preparation, search/prepare.hpp) on the GPU. The same training:
// every candidate with weights of its own (GatedLinear, GatedDeltaNet), in every layer, learns
// to reproduce the teacher's attention output on the teacher's own layer inputs,
//   error_l,o = Σ ||A_l(h_l) − o(h_l)||² / Σ ||A_l(h_l)||²     over the tokens of a batch,
// with its own Adam (cosine schedule, warm-up) and, at the first step, its output projection
// first scaled by the least-squares factor <o, A> / <o, o>.
//
// One teacher forward per step (DeviceSearchModel::teacher_layers) yields h_l and A_l layer by
// layer; each candidate of the layer then runs its forward, the error and ∂error/∂o
// (alignment.cuh), its backward to the weights (DeviceMixedAttention::own_weight_gradients:
// one GEMM each for the fused projection's and the output projection's gradients, the bias
// gradients as column sums) and the Adam updates, which write the bf16 copies the next forward
// reads. The masters and moments are fp32 on the device; write_back() copies the masters into
// the CPU decoder's parameters (what io::save_candidates saves). One host synchronisation per
// step (the errors).
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "dash/core/cuda.hpp"
#include "dash/core/error.hpp"
#include "dash/mixed_attention.hpp"
#include "dash/model/cuda/alignment.cuh"
#include "dash/model/cuda/search_model.cuh"
#include "dash/model/decoder.hpp"
#include "dash/search/adam.hpp"
#include "dash/search/prepare.hpp"

namespace dash::cuda::model {

// The parameter groups of a candidate under training, each one flat fp32 vector on the device:
// the fused projection [in_width, d], its q|k|v biases, the gate biases, Wo [d, q_dim].
enum class OwnGroup { projection, projection_bias, gate_bias, output };
inline constexpr int own_groups = 4;

// f(tensor, group, offset) for every CPU parameter of an own operator (GatedLinear's or
// GatedDeltaNet's Params), with its place in the flat group: the fused projection's row blocks
// (Wq, Wk, Wv, W_gate, W_β), the biases, Wo.
template <class Params, class Weights, class F>
void for_each_own_block(Params& p, const Weights& w, F&& f) {
  const index_t d = w.d_model, kv_rows = w.q_dim + w.kv_width, gates_row = w.q_dim + 2 * w.kv_width;
  f(p.proj.wq, OwnGroup::projection, 0), f(p.proj.wk, OwnGroup::projection, w.q_dim * d);
  f(p.proj.wv, OwnGroup::projection, kv_rows * d), f(p.w_gate, OwnGroup::projection, gates_row * d);
  if (w.b_in)
    f(p.proj.bq, OwnGroup::projection_bias, 0), f(p.proj.bk, OwnGroup::projection_bias, w.q_dim),
        f(p.proj.bv, OwnGroup::projection_bias, kv_rows);
  f(p.b_gate, OwnGroup::gate_bias, 0);
  if constexpr (requires { p.w_beta; })
    f(p.w_beta, OwnGroup::projection, (gates_row + w.gates) * d), f(p.b_beta, OwnGroup::gate_bias, w.gates);
  f(p.proj.wo, OwnGroup::output, 0);
}

template <class... Ops>
class DeviceCandidatePreparation {
 public:
  using Model = DeviceSearchModel<Ops...>;
  using Mixer = typename Model::Mixer;
  using OwnWeights = typename Mixer::OwnWeights;
  static constexpr int n_ops = Mixer::n_ops;

  // `prepare[i]`: whether candidate i is trained (ignored for those that use the teacher's
  // weights). Batches of up to max_tokens tokens in sequences of up to max_length.
  template <class T>
  DeviceCandidatePreparation(const dash::model::Decoder<T, BasicMixedAttention<T, Ops...>>& decoder,
                             std::vector<bool> prepare, search::PrepareOptions options, index_t max_tokens,
                             index_t max_length)
      : model_(checked(decoder, prepare, options), max_tokens, max_length),
        prepare_(std::move(prepare)),
        options_(options) {
    const index_t d = decoder.config().d_model;
    std::size_t w_in = 1, wo = 1, in_width = 1;
    for (int l = 0; l < model_.n_layers(); ++l)
      for_each_prepared([&]<std::size_t I>() {
        Candidate cand;
        cand.layer = l, cand.op = int(I);
        cand.w = model_.mixer(l).own_weights(int(I));
        const auto& params = std::get<I>(decoder.mixers()[std::size_t(l)].params());
        cand.group(OwnGroup::projection) = Group(cand.w.in_width * d);
        cand.group(OwnGroup::projection_bias) = Group(cand.w.b_in ? cand.w.q_dim + 2 * cand.w.kv_width : 0);
        cand.group(OwnGroup::gate_bias) = Group(cand.w.gate_biases);
        cand.group(OwnGroup::output) = Group(d * cand.w.q_dim);
        std::array<Tensor<float>, n_groups> host;
        for (int g = 0; g < n_groups; ++g)
          host[std::size_t(g)] = Tensor<float>(Shape{std::max<index_t>(1, cand.groups[std::size_t(g)].n)}, 0.f);
        for_each_own_block(params, cand.w, [&](const Tensor<T>& t, OwnGroup group, index_t offset) {
          float* to = host[std::size_t(group)].data() + offset;
          for (index_t k = 0; k < t.numel(); ++k) to[k] = float(t.data()[k]);
        });
        for (int g = 0; g < n_groups; ++g)
          if (cand.groups[std::size_t(g)].n)
            cand.groups[std::size_t(g)].master = DeviceTensor<float>::from_host(host[std::size_t(g)].view());
        w_in = std::max(w_in, std::size_t(cand.w.in_width * d)), wo = std::max(wo, std::size_t(d * cand.w.q_dim));
        in_width = std::max(in_width, std::size_t(cand.w.in_width));
        candidates_.push_back(std::move(cand));
      });
    const auto rows = std::size_t(max_tokens), dd = std::size_t(d);
    y_ = DeviceTensor<float>(Shape{index_t(rows * dd)});
    dy_ = DeviceTensor<bfloat16>(Shape{index_t(rows * dd)});
    d_w_in_ = DeviceTensor<float>(Shape{index_t(w_in)});
    d_wo_ = DeviceTensor<float>(Shape{index_t(wo)});
    bias_grad_ = DeviceTensor<float>(Shape{index_t(in_width)});
    column_scratch_ = DeviceTensor<float>(Shape{index_t(column_sums_scratch(index_t(in_width)))});
    partials_ = DeviceTensor<double>(Shape{index_t(alignment_partials_count())});
    scalars_ = DeviceTensor<float>(Shape{2});  // Σ A², the output scale
    errors_ = DeviceTensor<float>(Shape{index_t(model_.n_layers()) * n_ops});
    ids_ = DeviceTensor<int>(Shape{max_tokens});
    check(cudaDeviceSynchronize(), "prepare: initialise");  // the moments' clears, before the model's stream
  }

  std::int64_t steps() const { return options_.steps; }
  std::size_t candidates() const { return candidates_.size(); }

  // One Adam step of every prepared (layer, candidate) on `batch`; returns the mean error over
  // them before the step (after the output scale, at step 0).
  double step(const dash::model::TokenBatch& batch, std::int64_t step) {
    const float lr = float(search::cosine_lr(options_.lr, step, options_.steps, options_.warmup,
                                             options_.min_lr_fraction));
    ++adam_steps_;
    const search::AdamOptions adam_options;
    AdamParams adam_base;
    adam_base.lr = lr, adam_base.beta1 = float(adam_options.beta1), adam_base.beta2 = float(adam_options.beta2);
    adam_base.eps = float(adam_options.eps);
    adam_base.correction1 = float(1 - std::pow(adam_options.beta1, double(adam_steps_)));
    adam_base.correction2 = float(1 - std::pow(adam_options.beta2, double(adam_steps_)));
    run(batch, [&](const MixerContext& c, Candidate& cand, const bfloat16* h, const float* a, index_t n) {
      Mixer& mixer = model_.mixer(cand.layer);
      if (step == 0) {
        mixer.own_output(c, cand.op, h, y_.data());
        output_scale({.y = y_.data(), .target = a, .n = n, .partials = partials_.data(), .result = scale()}, c.stream);
        AdamParams p = copy_params(cand, OwnGroup::output, adam_base);
        p.grad = nullptr, p.scale = scale();
        adam(p, c.stream);
      }
      error_and_gradient(c, cand, h, a, n, true);
      const index_t qkv = cand.w.q_dim + 2 * cand.w.kv_width;
      column_sums(c.buffers.own_d_in, c.batch * c.length, cand.w.in_width, cand.w.in_width, column_scratch_.data(),
                  bias_grad_.data(), c.stream);
      const std::array<const float*, n_groups> grads{d_w_in_.data(), bias_grad_.data(), bias_grad_.data() + qkv,
                                                     d_wo_.data()};
      for (int g = 0; g < n_groups; ++g) {
        if (!cand.groups[std::size_t(g)].n) continue;
        AdamParams p = copy_params(cand, OwnGroup(g), adam_base);
        p.grad = grads[std::size_t(g)];
        adam(p, c.stream);
      }
    });
    return mean_error();
  }

  // The alignment error of every prepared candidate on `batch`, without training (NaN where a
  // candidate is not prepared).
  search::AlignmentErrors errors(const dash::model::TokenBatch& batch) {
    run(batch, [&](const MixerContext& c, Candidate& cand, const bfloat16* h, const float* a, index_t n) {
      error_and_gradient(c, cand, h, a, n, false);
    });
    const Tensor<float> e = finished_errors();
    search::AlignmentErrors out(std::size_t(model_.n_layers()), std::vector<double>(std::size_t(n_ops), NAN));
    for (const Candidate& cand : candidates_)
      out[std::size_t(cand.layer)][std::size_t(cand.op)] = double(e.data()[cand.layer * n_ops + cand.op]);
    return out;
  }

  // The trained weights into `decoder`'s parameters (the decoder this was built from).
  template <class T>
  void write_back(dash::model::Decoder<T, BasicMixedAttention<T, Ops...>>& decoder) {
    require(decoder.n_layers() == model_.n_layers(), "prepare: write_back into a decoder of ", decoder.n_layers(),
            " layers, prepared ", model_.n_layers());
    check(cudaStreamSynchronize(model_.stream()), "prepare: synchronise");
    for (Candidate& cand : candidates_)
      with_op(cand.op, [&]<std::size_t I>() {
        std::array<Tensor<float>, n_groups> host;
        for (int g = 0; g < n_groups; ++g)
          if (cand.groups[std::size_t(g)].n) host[std::size_t(g)] = cand.groups[std::size_t(g)].master.to_host();
        auto& params = std::get<I>(decoder.mixers()[std::size_t(cand.layer)].params());
        for_each_own_block(params, cand.w, [&](Tensor<T>& t, OwnGroup group, index_t offset) {
          const float* from = host[std::size_t(group)].data() + offset;
          for (index_t k = 0; k < t.numel(); ++k) t.data()[k] = T(from[k]);
        });
      });
  }

 private:
  static constexpr int n_groups = own_groups;

  // The decoder, once the other arguments are checked (before the model touches the device).
  template <class Decoder>
  static const Decoder& checked(const Decoder& decoder, const std::vector<bool>& prepare,
                                const search::PrepareOptions& options) {
    options.validate();
    require(prepare.size() == std::size_t(n_ops), "prepare: ", prepare.size(), " flags for ", n_ops, " operators");
    return decoder;
  }

  struct Group {
    index_t n = 0;
    DeviceTensor<float> master, m, v;
    Group() = default;
    explicit Group(index_t count) : n(count) {
      if (!n) return;
      m = DeviceTensor<float>(Shape{n}), v = DeviceTensor<float>(Shape{n});
      check(cudaMemset(m.data(), 0, sizeof(float) * std::size_t(n)), "prepare: clear Adam moments");
      check(cudaMemset(v.data(), 0, sizeof(float) * std::size_t(n)), "prepare: clear Adam moments");
    }
  };

  struct Candidate {
    int layer = 0, op = 0;
    OwnWeights w;
    std::array<Group, n_groups> groups;  // indexed by OwnGroup
    Group& group(OwnGroup g) { return groups[std::size_t(g)]; }
  };

  float* den() { return scalars_.data(); }
  float* scale() { return scalars_.data() + 1; }

  // f(context, candidate, h, A, n) for every prepared candidate of every layer, after one
  // teacher forward of `batch`.
  template <class F>
  void run(const dash::model::TokenBatch& batch, F&& f) {
    batch.validate(model_.config().vocab_size);
    cudaStream_t stream = model_.stream();
    check(cudaMemcpyAsync(ids_.data(), batch.ids.data(), batch.ids.size() * sizeof(int), cudaMemcpyHostToDevice,
                          stream),
          "prepare: upload ids");
    std::size_t next = 0;
    model_.teacher_layers(ids_.data(), batch.batch, batch.length, stream,
                          [&](int l, const MixerContext& c, const bfloat16* h, const float* a) {
                            const index_t n = c.batch * c.length * model_.config().d_model;
                            squared_norm({.target = a, .n = n, .partials = partials_.data(), .result = den()},
                                         c.stream);
                            for (; next < candidates_.size() && candidates_[next].layer == l; ++next)
                              f(c, candidates_[next], h, a, n);
                          });
  }

  // The error of candidate `cand` into errors_, and (with gradients) its weight gradients.
  void error_and_gradient(const MixerContext& c, Candidate& cand, const bfloat16* h, const float* a, index_t n,
                          bool gradients) {
    Mixer& mixer = model_.mixer(cand.layer);
    mixer.own_output(c, cand.op, h, y_.data());
    alignment_error({.y = y_.data(),
                     .target = a,
                     .n = n,
                     .den = den(),
                     .dy = dy_.data(),
                     .partials = partials_.data(),
                     .result = errors_.data() + cand.layer * n_ops + cand.op},
                    c.stream);
    if (gradients) mixer.own_weight_gradients(c, cand.op, h, dy_.data(), d_w_in_.data(), d_wo_.data());
  }

  // Adam's arguments for group g of `cand`: its master, moments and the copy the forward reads.
  AdamParams copy_params(Candidate& cand, OwnGroup g, AdamParams p) {
    Group& group = cand.group(g);
    p.master = group.master.data(), p.m = group.m.data(), p.v = group.v.data(), p.n = group.n;
    const OwnWeights& w = cand.w;
    switch (g) {
      case OwnGroup::projection: p.copy = w.w_in, p.cols = w.d_model, p.copy_stride = w.d_model; break;
      case OwnGroup::projection_bias: p.copy = w.b_in, p.cols = group.n, p.copy_stride = group.n; break;
      case OwnGroup::gate_bias: p.copy_f32 = w.b_gates; break;
      case OwnGroup::output: p.copy = w.wo, p.cols = w.q_dim, p.copy_stride = w.wo_stride; break;
    }
    return p;
  }

  Tensor<float> finished_errors() {
    check(cudaStreamSynchronize(model_.stream()), "prepare: synchronise");
    return errors_.to_host();
  }

  double mean_error() {
    const Tensor<float> e = finished_errors();
    double sum = 0;
    for (const Candidate& cand : candidates_) sum += double(e.data()[cand.layer * n_ops + cand.op]);
    return candidates_.empty() ? 0 : sum / double(candidates_.size());
  }

  template <class F>
  void for_each_prepared(F&& f) const {
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (
          [&] {
            if constexpr (Mixer::has_own_weights(int(I)))
              if (prepare_[I]) f.template operator()<I>();
          }(),
          ...);
    }(std::make_index_sequence<std::size_t(n_ops)>{});
  }

  template <class F>
  static void with_op(int op, F&& f) {
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (
          [&] {
            if constexpr (Mixer::has_own_weights(int(I)))
              if (op == int(I)) f.template operator()<I>();
          }(),
          ...);
    }(std::make_index_sequence<std::size_t(n_ops)>{});
  }

  Model model_;
  std::vector<bool> prepare_;
  search::PrepareOptions options_;
  std::vector<Candidate> candidates_;  // layer-major
  std::int64_t adam_steps_ = 0;
  DeviceTensor<float> y_, d_w_in_, d_wo_, bias_grad_, column_scratch_, scalars_, errors_;
  DeviceTensor<bfloat16> dy_;
  DeviceTensor<double> partials_;
  DeviceTensor<int> ids_;
};

}  // namespace dash::cuda::model

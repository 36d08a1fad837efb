// Stage 1 of DASH (DESIGN.md §2): teacher-aligned candidates. Every candidate with weights of
// its own (GatedLinear, GatedDeltaNet), initialised from the teacher's projections, is trained to
// reproduce the teacher's attention output on the teacher's own layer inputs:
//   error_l,o = Σ ||A_l(h_l) − o(h_l)||² / Σ ||A_l(h_l)||²      over the tokens of a batch
// Layers are independent (teacher forcing), so one teacher forward feeds every layer's
// alignment; each (layer, candidate) has its own Adam with a cosine schedule.
//
// The teacher's projections leave a linear-attention candidate at the wrong scale (its state
// sums over its memory where softmax averages: outputs tens of times too large), so the first
// step first scales each candidate's output projection by the least-squares factor
// s = <o, A> / <o, o> on that batch, the best a scalar can do: it brings the error to
// 1 − cos²(o, A) ≤ 1 before any gradient step.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "dash/core/error.hpp"
#include "dash/mixed_attention.hpp"
#include "dash/model/decoder.hpp"
#include "dash/search/adam.hpp"
#include "dash/search/decoder_model.hpp"

namespace dash::search {

struct PrepareOptions {
  std::int64_t steps = 100;
  double lr = 1e-3;
  std::int64_t warmup = 5;
  double min_lr_fraction = 0.1;

  void validate() const {
    require(steps >= 1, "prepare: steps = ", steps, ", expected >= 1");
    require(lr > 0 && std::isfinite(lr), "prepare: lr = ", lr, ", expected > 0");
  }
};

// The relative alignment error per layer and candidate (NaN where a candidate was not prepared).
using AlignmentErrors = std::vector<std::vector<double>>;

template <class T, class... Ops>
class CandidatePreparation {
 public:
  using Model = DecoderSearchModel<T, Ops...>;
  using Mixer = typename Model::Mixer;
  using Decoder = typename Model::Decoder;
  static constexpr std::size_t n_ops = Mixer::n_ops;

  // `prepare[i]`: whether candidate i is prepared (ignored for those that use the teacher's
  // weights: they have nothing to prepare).
  CandidatePreparation(Decoder& decoder, std::vector<bool> prepare, PrepareOptions options)
      : decoder_(decoder), model_(decoder), prepare_(std::move(prepare)), options_(options) {
    options_.validate();
    require(prepare_.size() == n_ops, "prepare: ", prepare_.size(), " flags for ", n_ops, " operators");
    adams_.resize(std::size_t(decoder_.n_layers()));
    for (int l = 0; l < decoder_.n_layers(); ++l)
      for_each_candidate([&]<std::size_t I>() {
        auto& params = std::get<I>(decoder_.mixers()[std::size_t(l)].params());
        params.for_each([&](const char*, Tensor<T>& t) { adams_[std::size_t(l)][I].emplace_back(std::size_t(t.numel())); });
      });
  }

  std::int64_t steps() const { return options_.steps; }

  // One Adam step of every prepared (layer, candidate) on `batch`; returns the mean error over
  // them before the step.
  double step(const model::TokenBatch& batch, std::int64_t step) {
    const double lr = cosine_lr(options_.lr, step, options_.steps, options_.warmup, options_.min_lr_fraction);
    double sum = 0;
    int count = 0;
    for_each_layer_io(batch, [&](int l, const Tensor<T>& h, const Tensor<T>& target) {
      for_each_candidate([&]<std::size_t I>() {
        Mixer& mixer = decoder_.mixers()[std::size_t(l)];
        if (step == 0) fit_output_scale<I>(mixer, h, target);
        typename Mixer::Gradients grads = mixer.zero_gradients();
        sum += error_and_gradient<I>(mixer, h, target, &grads), ++count;
        auto& params = std::get<I>(mixer.params());
        std::size_t k = 0;
        std::vector<Tensor<T>*> g;
        std::get<I>(grads.params).for_each([&](const char*, Tensor<T>& t) { g.push_back(&t); });
        params.for_each([&](const char*, Tensor<T>& t) {
          adams_[std::size_t(l)][I][k].step(std::span<T>(t.data(), std::size_t(t.numel())),
                                           std::span<const T>(g[k]->data(), std::size_t(t.numel())), lr);
          ++k;
        });
      });
    });
    return count ? sum / count : 0;
  }

  // The alignment error of every prepared candidate on `batch`, without training.
  AlignmentErrors errors(const model::TokenBatch& batch) const {
    AlignmentErrors e(std::size_t(decoder_.n_layers()), std::vector<double>(n_ops, NAN));
    for_each_layer_io(batch, [&](int l, const Tensor<T>& h, const Tensor<T>& target) {
      for_each_candidate([&]<std::size_t I>() {
        e[std::size_t(l)][I] = error_and_gradient<I>(decoder_.mixers()[std::size_t(l)], h, target, nullptr);
      });
    });
    return e;
  }

 private:
  // One teacher forward, then f(l, h_l, A_l(h_l)) for every layer: the normalised input and the
  // teacher's attention output on it.
  template <class F>
  void for_each_layer_io(const model::TokenBatch& batch, F&& f) const {
    typename Decoder::Activations act;
    decoder_.forward(batch, act, model_.teacher());
    for (int l = 0; l < decoder_.n_layers(); ++l) {
      Tensor<T> h, target;
      decoder_.mixer_io(l, act, h, target);
      f(l, h, target);
    }
  }

  // Calls f.template operator()<I>() for every prepared candidate I (own weights only).
  template <class F>
  void for_each_candidate(F&& f) const {
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (
          [&] {
            using Op = std::tuple_element_t<I, std::tuple<Ops...>>;
            if constexpr (!shares_teacher_projections_v<Op>)
              if (prepare_[I]) f.template operator()<I>();
          }(),
          ...);
    }(std::index_sequence_for<Ops...>{});
  }

  template <std::size_t I>
  static void fit_output_scale(Mixer& mixer, const Tensor<T>& h, const Tensor<T>& target) {
    auto& params = std::get<I>(mixer.params());
    if constexpr (requires { params.proj.wo; }) {
      const Tensor<T> o = output<I>(mixer, h);
      double oa = 0, oo = 0;
      for (index_t k = 0; k < o.numel(); ++k)
        oa += double(o.data()[k]) * double(target.data()[k]), oo += double(o.data()[k]) * double(o.data()[k]);
      if (oo > 0 && std::isfinite(oa / oo))
        for (index_t k = 0; k < params.proj.wo.numel(); ++k) params.proj.wo.data()[k] *= T(oa / oo);
    }
  }

  template <std::size_t I>
  static Tensor<T> output(const Mixer& mixer, const Tensor<T>& h, typename Mixer::Cache* cache_out = nullptr) {
    typename Mixer::Weights w{};
    w[I] = T(1);
    typename Mixer::Cache local;
    typename Mixer::Cache& cache = cache_out ? *cache_out : local;
    Tensor<T> y(h.shape());
    mixer.forward(h.view(), y.view(), cache, w, Mixer::nonzero(w));
    return y;
  }

  // error = Σ||o − A||² / Σ||A||², and (with grads) its gradient in grads.params.
  template <std::size_t I>
  static double error_and_gradient(const Mixer& mixer, const Tensor<T>& h, const Tensor<T>& target,
                                   typename Mixer::Gradients* grads) {
    typename Mixer::Cache cache;
    const Tensor<T> y = output<I>(mixer, h, &cache);
    double num = 0, den = 0;
    for (index_t k = 0; k < y.numel(); ++k) {
      const double diff = double(y.data()[k]) - double(target.data()[k]);
      num += diff * diff, den += double(target.data()[k]) * double(target.data()[k]);
    }
    require(den > 0, "prepare: the teacher's attention output is zero on this batch");
    if (grads) {
      Tensor<T> dy(y.shape()), dh(h.shape(), T(0));
      for (index_t k = 0; k < y.numel(); ++k) dy.data()[k] = T(2 * (double(y.data()[k]) - double(target.data()[k])) / den);
      mixer.backward(h.view(), cache, dy.view(), dh.view(), *grads);
    }
    return num / den;
  }

  Decoder& decoder_;
  Model model_;
  std::vector<bool> prepare_;
  PrepareOptions options_;
  std::vector<std::array<std::vector<Adam>, n_ops>> adams_;  // [layer][op][tensor]
};

}  // namespace dash::search

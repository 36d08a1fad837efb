// A Llama-family decoder whose token mixer is a template parameter:
//   x₀ = E[tokens];  for each layer l:  r = x_l + Mixer_l(RMSNorm(x_l)),  x_{l+1} = r + SwiGLU(RMSNorm(r));
//   h = RMSNorm(x_L);  logits = h·Headᵀ  (Head = E when tied).
// The mixer is anything shaped like BasicMixedAttention (mixed_attention.hpp): a fixed operator
// is BasicMixedAttention<T, Op>, a searchable layer BasicMixedAttention<T, Ops...>.
//
// Memory: forward keeps only each layer's input x_l (O(L·B·T·d)); backward recomputes one layer
// at a time, so at most one layer's mixer cache (O(B·T·d) plus the operators' own saved
// statistics, never a T×T matrix) is alive. Weights are frozen: backward returns dL/dx_l for
// every layer and the mixers' gradients (logits, operators' own parameters, optionally the
// teacher's projections), never gradients of the norms, MLP or embedding.
#pragma once

#include <functional>
#include <optional>
#include <span>
#include <vector>

#include "dash/core/error.hpp"
#include "dash/core/tensor.hpp"
#include "dash/model/config.hpp"
#include "dash/model/rms_norm.hpp"
#include "dash/model/swiglu.hpp"
#include "dash/model/weights.hpp"

namespace dash::model {

// B sequences of T token ids, row-major.
struct TokenBatch {
  std::span<const int> ids;
  index_t batch = 1;
  index_t length = 0;

  void validate(int vocab_size) const {
    require(batch >= 1 && length >= 1, "token batch: ", batch, " × ", length, ", expected at least 1 × 1");
    require(index_t(ids.size()) == batch * length, "token batch: ", ids.size(), " ids for ", batch, " × ", length);
    for (std::size_t i = 0; i < ids.size(); ++i)
      require(ids[i] >= 0 && ids[i] < vocab_size, "token batch: id ", ids[i], " at position ", i,
              " is outside the vocabulary [0, ", vocab_size, ")");
  }
};

template <class T, class Mixer>
class Decoder {
 public:
  using MixerWeights = typename Mixer::Weights;
  using MixerGradients = typename Mixer::Gradients;
  using OpMask = typename Mixer::OpMask;

  // Per-layer mixing given by the caller instead of softmax(α/τ): layer l mixes with weights[l]
  // and runs the operators in run[l] (one left out must have weight 0).
  struct Architecture {
    std::vector<MixerWeights> weights;
    std::vector<OpMask> run;

    // One operator per layer, the others not run: a discrete hybrid.
    static Architecture discrete(const std::vector<int>& ops) {
      Architecture a;
      for (std::size_t l = 0; l < ops.size(); ++l) {
        require(ops[l] >= 0 && std::size_t(ops[l]) < Mixer::n_ops, "Decoder::Architecture: layer ", l,
                " chooses operator ", ops[l], ", expected 0 … ", Mixer::n_ops - 1);
        MixerWeights w{};
        w[std::size_t(ops[l])] = 1;
        a.weights.push_back(w);
        a.run.push_back(Mixer::nonzero(w));
      }
      return a;
    }
  };
  // Builds layer l's mixer from the teacher's attention weights of that layer.
  using MixerFactory = std::function<Mixer(int layer, const AttentionShape&, AttentionWeights<T>)>;

  // What forward keeps for backward.
  struct Activations {
    std::vector<Tensor<T>> layer_inputs;  // x_l, [B, T, d] each, l = 0 … L (x_L feeds the final norm)
    Tensor<T> hidden;                     // h = RMSNorm(x_L), [B, T, d]
    std::optional<Architecture> architecture;  // the per-layer mixing the forward used, if given
  };

  // The mixers take the attention projections; the rest of `weights` stays here.
  Decoder(Config config, Weights<T> weights, const MixerFactory& make_mixer) : config_(std::move(config)) {
    weights.validate(config_);
    const AttentionShape shape = config_.attention();
    mixers_.reserve(weights.layers.size());
    for (std::size_t l = 0; l < weights.layers.size(); ++l)
      mixers_.push_back(make_mixer(int(l), shape, std::move(weights.layers[l].attention)));
    weights_ = std::move(weights);
  }

  const Config& config() const { return config_; }
  const Weights<T>& weights() const { return weights_; }
  std::vector<Mixer>& mixers() { return mixers_; }
  const std::vector<Mixer>& mixers() const { return mixers_; }
  int n_layers() const { return config_.n_layers; }

  // Runs the decoder to the final hidden states, each layer mixing with softmax(α/τ) or, when
  // given, with `architecture`.
  void forward(const TokenBatch& tokens, Activations& act, std::optional<Architecture> architecture = std::nullopt) const {
    tokens.validate(config_.vocab_size);
    require(!architecture || (int(architecture->weights.size()) == n_layers() &&
                              architecture->run.size() == architecture->weights.size()),
            "Decoder::forward: architecture has ", architecture ? architecture->weights.size() : 0, " weights and ",
            architecture ? architecture->run.size() : 0, " run masks, the model ", n_layers(), " layers");
    const index_t d = config_.d_model;
    const Shape shape{tokens.batch, tokens.length, d};
    act.architecture = std::move(architecture);
    act.layer_inputs.resize(std::size_t(n_layers()) + 1);
    Tensor<T>& x0 = act.layer_inputs[0];
    x0 = Tensor<T>(shape);
    for (std::size_t i = 0; i < tokens.ids.size(); ++i)
      std::copy_n(weights_.embedding.data() + index_t(tokens.ids[i]) * d, d, x0.data() + index_t(i) * d);
    for (int l = 0; l < n_layers(); ++l) {
      typename Mixer::Cache cache;
      Scratch s(shape);
      layer_forward(l, act, act.layer_inputs[std::size_t(l)].view(), s, cache);
      act.layer_inputs[std::size_t(l) + 1] = std::move(s.out);
    }
    act.hidden = Tensor<T>(shape);
    rms_norm_forward<T>(act.layer_inputs.back().view(), weights_.final_norm.view(), config_.rms_eps,
                        act.hidden.view());
  }

  // Backward from dL/dh (the gradient at the final hidden states, from a loss) through every
  // layer. Returns each layer's mixer gradients; `d_layer_inputs`, when given, receives dL/dx_l.
  std::vector<MixerGradients> backward(const Activations& act, TensorView<const T> d_hidden,
                                       bool teacher_gradients = false,
                                       std::vector<Tensor<T>>* d_layer_inputs = nullptr) const {
    require(act.layer_inputs.size() == std::size_t(n_layers()) + 1, "Decoder::backward: activations are not from forward");
    const Shape shape = act.hidden.shape();
    require_shape(d_hidden, shape, "Decoder::backward: d_hidden");
    Tensor<T> dx(shape, T(0));
    rms_norm_backward<T>(act.layer_inputs.back().view(), weights_.final_norm.view(), config_.rms_eps, d_hidden,
                         dx.view(), {});
    if (d_layer_inputs) d_layer_inputs->assign(std::size_t(n_layers()) + 1, Tensor<T>());
    std::vector<MixerGradients> grads;
    grads.reserve(std::size_t(n_layers()));
    for (int l = 0; l < n_layers(); ++l) grads.push_back(mixers_[std::size_t(l)].zero_gradients(teacher_gradients));
    for (int l = n_layers() - 1; l >= 0; --l) {
      if (d_layer_inputs) (*d_layer_inputs)[std::size_t(l) + 1] = clone(dx.view());
      const Tensor<T>& x = act.layer_inputs[std::size_t(l)];
      const LayerWeights<T>& w = weights_.layers[std::size_t(l)];
      typename Mixer::Cache cache;
      Scratch s(shape);
      layer_forward(l, act, x.view(), s, cache);  // recompute this layer
      // x_{l+1} = r + SwiGLU(n2): dr = dx + dn2 through the norm.
      Tensor<T> dn2(shape, T(0));
      swiglu_backward<T>(mlp_weights(w), s.n2.view(), dx.view(), dn2.view());
      Tensor<T>& dr = dx;  // dr accumulates into dx's storage
      rms_norm_backward<T>(s.r.view(), w.mlp_norm.view(), config_.rms_eps, dn2.view(), dr.view(), {});
      // r = x + Mixer(n1): dx = dr + dn1 through the norm.
      Tensor<T> dn1(shape, T(0));
      mixers_[std::size_t(l)].backward(s.n1.view(), cache, dr.view(), dn1.view(), grads[std::size_t(l)]);
      rms_norm_backward<T>(x.view(), w.attn_norm.view(), config_.rms_eps, dn1.view(), dx.view(), {});
    }
    if (d_layer_inputs) (*d_layer_inputs)[0] = std::move(dx);
    return grads;
  }

  // Layer l's normalised input and the mixer's output on it, as the teacher computes them:
  // what candidate preparation aligns to (stage 1). Runs the forward from x_l.
  void mixer_io(int l, const Activations& act, Tensor<T>& normed, Tensor<T>& mixed) const {
    const Tensor<T>& x = act.layer_inputs[std::size_t(l)];
    normed = Tensor<T>(x.shape());
    mixed = Tensor<T>(x.shape());
    rms_norm_forward<T>(x.view(), weights_.layers[std::size_t(l)].attn_norm.view(), config_.rms_eps, normed.view());
    typename Mixer::Cache cache;
    run_mixer(l, act, normed.view(), mixed.view(), cache);
  }

 private:
  struct Scratch {
    Tensor<T> n1, r, n2, out;
    explicit Scratch(const Shape& s) : n1(s), r(s), n2(s), out(s) {}
  };

  static SwigluWeights<T> mlp_weights(const LayerWeights<T>& w) {
    return {w.w_gate.view(), w.w_up.view(), w.w_down.view()};
  }

  void run_mixer(int l, const Activations& act, TensorView<const T> n1, TensorView<T> y,
                 typename Mixer::Cache& cache) const {
    const Mixer& mixer = mixers_[std::size_t(l)];
    if (act.architecture)
      mixer.forward(n1, y, cache, act.architecture->weights[std::size_t(l)], act.architecture->run[std::size_t(l)]);
    else
      mixer.forward(n1, y, cache);
  }

  void layer_forward(int l, const Activations& act, TensorView<const T> x, Scratch& s,
                     typename Mixer::Cache& cache) const {
    const LayerWeights<T>& w = weights_.layers[std::size_t(l)];
    rms_norm_forward<T>(x, w.attn_norm.view(), config_.rms_eps, s.n1.view());
    run_mixer(l, act, s.n1.view(), s.r.view(), cache);
    eigen::vector(s.r.view()) += eigen::vector(x);
    rms_norm_forward<T>(s.r.view(), w.mlp_norm.view(), config_.rms_eps, s.n2.view());
    swiglu_forward<T>(mlp_weights(w), s.n2.view(), s.out.view());
    eigen::vector(s.out.view()) += eigen::vector(s.r.view());
  }

  Config config_;
  Weights<T> weights_;  // attention projections moved into the mixers
  std::vector<Mixer> mixers_;
};

}  // namespace dash::model

// The per-layer mixing a search step asks of a model, and the model contract the search needs.
#pragma once

#include <concepts>
#include <cstdint>
#include <vector>

namespace dash::search {

// Layer l mixes its candidates with weights[l·m + i] and runs the candidates with run[l·m + i];
// the model returns dL/dπ in grad (0 for a candidate it did not run).
struct Mixture {
  int n_layers = 0, n_ops = 0;
  std::vector<double> weights;
  std::vector<std::uint8_t> run;
  std::vector<double> grad;

  Mixture() = default;
  Mixture(int layers, int ops)
      : n_layers(layers), n_ops(ops), weights(std::size_t(layers * ops)), run(weights.size()), grad(weights.size()) {}
  double weight(int l, int i) const { return weights[std::size_t(l * n_ops + i)]; }
  bool runs(int l, int i) const { return run[std::size_t(l * n_ops + i)] != 0; }
};

// What DifferentiableSearch needs of a model: its grid of choices, and one step of the
// objective. kl_and_gradient runs the teacher (the original model) and the student (every
// layer mixing its candidates as `mixture` says) on the same batch, and returns the token-mean
// KL(teacher ‖ student) with its gradient with respect to every mixing weight in mixture.grad.
// Everything else in the model stays frozen. DecoderSearchModel (decoder_model.hpp) is the
// library's model; a user's transformer satisfies it with MixedAttention layers and kl_loss.
template <class M>
concept SearchModel = requires(M& m, const typename M::Batch& batch, Mixture& mixture) {
  { m.n_layers() } -> std::convertible_to<int>;
  { m.n_ops() } -> std::convertible_to<int>;
  { m.kl_and_gradient(batch, mixture) } -> std::convertible_to<double>;
};

}  // namespace dash::search

// The library's decoder as a SearchModel: the teacher is the same decoder with every layer
// running Softmax on its own weights, the student mixes each layer's candidates.
#pragma once

#include <cstddef>
#include <tuple>
#include <type_traits>
#include <vector>

#include "dash/core/error.hpp"
#include "dash/mixed_attention.hpp"
#include "dash/model/decoder.hpp"
#include "dash/model/loss.hpp"
#include "dash/ops/softmax.hpp"
#include "dash/search/mixture.hpp"

namespace dash::search {

namespace detail {
template <class... Ops>
consteval std::size_t softmax_position() {
  constexpr bool is_softmax[] = {std::is_same_v<Ops, Softmax>...};
  for (std::size_t i = 0; i < sizeof...(Ops); ++i)
    if (is_softmax[i]) return i;
  return sizeof...(Ops);
}
}  // namespace detail

template <class T, class... Ops>
class DecoderSearchModel {
 public:
  using Mixer = BasicMixedAttention<T, Ops...>;
  using Decoder = model::Decoder<T, Mixer>;
  using Architecture = typename Decoder::Architecture;
  using Batch = model::TokenBatch;
  static constexpr std::size_t softmax_index = detail::softmax_position<Ops...>();
  static_assert(softmax_index < sizeof...(Ops),
                "DecoderSearchModel: the teacher is the model with softmax attention in every layer, so the "
                "mixer's operators must include Softmax (it need not be a candidate of the search)");

  explicit DecoderSearchModel(const Decoder& decoder) : decoder_(decoder) {}

  int n_layers() const { return decoder_.n_layers(); }
  int n_ops() const { return int(Mixer::n_ops); }
  const Decoder& decoder() const { return decoder_; }

  // Every layer softmax: the teacher.
  Architecture teacher() const { return Architecture::discrete(std::vector<int>(std::size_t(n_layers()), int(softmax_index))); }

  double kl_and_gradient(const Batch& batch, Mixture& mixture) const {
    require(mixture.n_layers == n_layers() && mixture.n_ops == n_ops(), "DecoderSearchModel: a mixture of ",
            mixture.n_layers, " × ", mixture.n_ops, " for ", n_layers(), " × ", n_ops());
    typename Decoder::Activations teacher_act, student_act;
    decoder_.forward(batch, teacher_act, teacher());
    decoder_.forward(batch, student_act, to_architecture(mixture));
    Tensor<T> d_hidden(student_act.hidden.shape(), T(0));
    const model::LossValue kl = model::kl_loss<T>(decoder_.weights().head().view(), teacher_act.hidden.view(),
                                                  student_act.hidden.view(), d_hidden.view());
    const auto grads = decoder_.backward(student_act, d_hidden.view());
    for (int l = 0; l < n_layers(); ++l)
      for (int i = 0; i < n_ops(); ++i)
        mixture.grad[std::size_t(l * n_ops() + i)] = double(grads[std::size_t(l)].weights[std::size_t(i)]);
    return kl.mean();
  }

  static Architecture to_architecture(const Mixture& mixture) {
    Architecture a;
    for (int l = 0; l < mixture.n_layers; ++l) {
      typename Mixer::Weights w{};
      typename Mixer::OpMask run{};
      for (std::size_t i = 0; i < Mixer::n_ops; ++i) w[i] = T(mixture.weight(l, int(i))), run[i] = mixture.runs(l, int(i));
      a.weights.push_back(w);
      a.run.push_back(run);
    }
    return a;
  }

 private:
  const Decoder& decoder_;
};

}  // namespace dash::search

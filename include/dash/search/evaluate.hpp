// Stage 3: a discrete hybrid scored against its teacher on held-out text. The teacher's final
// hidden states are computed once per batch and reused for every architecture scored.
#pragma once

#include <vector>

#include "dash/model/loss.hpp"
#include "dash/search/decoder_model.hpp"

namespace dash::search {

struct Quality {
  double kl = 0;    // token-mean KL(teacher ‖ architecture), nats
  double nll = 0;   // token-mean negative log-likelihood of the next token, nats
  index_t tokens = 0;
};

// Held-out batches with the teacher's outputs on them.
template <class T, class... Ops>
class HeldOut {
 public:
  using Model = DecoderSearchModel<T, Ops...>;

  // windows: token ids, each [batch × (length + 1)]: the first `length` tokens are read, the
  // last `length` are the targets.
  HeldOut(const Model& model, const std::vector<std::vector<int>>& windows, index_t batch, index_t length)
      : model_(model), batch_(batch), length_(length) {
    require(!windows.empty(), "held-out data: no windows");
    for (const auto& w : windows) {
      require(index_t(w.size()) == batch_ * (length_ + 1), "held-out data: a window of ", w.size(), " ids, expected ",
              batch_, " × ", length_ + 1);
      inputs_.emplace_back(), targets_.emplace_back();
      for (index_t b = 0; b < batch_; ++b) {
        const auto row = w.begin() + b * (length_ + 1);
        inputs_.back().insert(inputs_.back().end(), row, row + length_);
        targets_.back().insert(targets_.back().end(), row + 1, row + length_ + 1);
      }
      typename Model::Decoder::Activations act;
      model_.decoder().forward(tokens(inputs_.size() - 1), act, model_.teacher());
      teacher_hidden_.push_back(std::move(act.hidden));
    }
  }

  index_t tokens_per_window() const { return batch_ * length_; }
  std::size_t size() const { return inputs_.size(); }

  // KL to the teacher and NLL of one architecture (one operator per layer).
  Quality score(const std::vector<int>& ops) const {
    const auto arch = Model::Architecture::discrete(ops);
    Quality q;
    double kl = 0, nll = 0;
    const Tensor<T>& head = model_.decoder().weights().head();
    for (std::size_t w = 0; w < inputs_.size(); ++w) {
      typename Model::Decoder::Activations act;
      model_.decoder().forward(tokens(w), act, arch);
      kl += model::kl_loss<T>(head.view(), teacher_hidden_[w].view(), act.hidden.view()).sum;
      nll += model::nll_loss<T>(head.view(), act.hidden.view(), targets_[w]).sum;
      q.tokens += batch_ * length_;
    }
    q.kl = kl / double(q.tokens), q.nll = nll / double(q.tokens);
    return q;
  }

 private:
  model::TokenBatch tokens(std::size_t w) const { return {inputs_[w], batch_, length_}; }

  const Model& model_;
  index_t batch_, length_;
  std::vector<std::vector<int>> inputs_, targets_;
  std::vector<Tensor<T>> teacher_hidden_;
};

}  // namespace dash::search

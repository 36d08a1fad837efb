// The model the tool runs: a loaded checkpoint as a decoder whose every layer is softmax
// attention with the checkpoint's own weights, in float32.
#pragma once

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "dash/io/load.hpp"
#include "dash/mixed_attention.hpp"
#include "dash/model/decoder.hpp"
#include "dash/model/loss.hpp"
#include "dash/ops/softmax.hpp"

namespace dash::tool {

using Teacher = model::Decoder<float, MixedAttention<Softmax>>;

inline Teacher make_teacher(io::Checkpoint&& checkpoint) {
  Rng rng(0);  // softmax has no parameters to initialise
  return Teacher(checkpoint.config, std::move(checkpoint.weights),
                 [&](int, const AttentionShape& s, AttentionWeights<float> w) {
                   return MixedAttention<Softmax>(s, std::move(w), rng);
                 });
}

// Logits of the last position of `ids` (one sequence).
inline std::vector<float> last_logits(const Teacher& teacher, const std::vector<int>& ids) {
  Teacher::Activations act;
  teacher.forward({ids, 1, index_t(ids.size())}, act);
  const index_t d = teacher.config().d_model;
  const Tensor<float>& head = teacher.weights().head();
  std::vector<float> z(std::size_t(head.dim(0)));
  const TensorView<const float> last(act.hidden.data() + (index_t(ids.size()) - 1) * d, Shape{1, d});
  model::logits<float>(head.view(), last, TensorView<float>(z.data(), Shape{1, head.dim(0)}));
  return z;
}

// A progress line on stderr, rewritten in place: done/total, rate, ETA; at most four times a
// second, and always at the end.
class Progress {
 public:
  Progress(std::string what, double total) : what_(std::move(what)), total_(total) {}
  void update(double done, const std::string& extra = {}) {
    const double seconds = elapsed();
    if (done < total_ && seconds - shown_ < 0.25) return;
    shown_ = seconds;
    const double rate = seconds > 0 ? done / seconds : 0;
    const double eta = rate > 0 ? (total_ - done) / rate : 0;
    std::fprintf(stderr, "\r%s %.0f/%.0f  %.0f tok/s  ETA %.0fs  %s   ", what_.c_str(), done, total_, rate, eta,
                 extra.c_str());
    std::fflush(stderr);
  }
  void finish() { std::fprintf(stderr, "\n"); }
  double elapsed() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  std::string what_;
  double total_;
  double shown_ = -1;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

}  // namespace dash::tool

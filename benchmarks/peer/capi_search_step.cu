// C entry points for timing dash's search step (DeviceSearchModel::step) against the PyTorch
// step of benchmarks/peer/search_step.py in the same process, on torch's stream.
//
//   dash_search_step_create   builds a Llama-shaped decoder of the given sizes with random weights
//                             (uniform, std 1/√fan-in; the embedding std 1; norms 1; speed does not
//                             depend on the values) and the device model for `batch` sequences of
//                             `length` tokens, every layer's activations kept for the backward;
//                             `ops` is "softmax,swa:W,gla,gdn" or "softmax,swa:W,gla" (W the
//                             window in tokens), the operator sets compiled here.
//   dash_search_step_run      one step: teacher forward, student forward with every operator of
//                             every layer run and mixed by π, KL at the head, backward to dL/dπ
//                             and dL/dx_0; ids int32 [batch·length] and π fp32 [layers × ops]
//                             (layer-major) are device pointers; enqueued on `stream`, no
//                             synchronisation.
//   dash_search_step_read     copies the last step's [Σ_t KL_t, mean KL] and dL/dπ to the host
//                             (synchronises `stream`).
//   dash_search_step_bytes    the device workspace the model carved (weights not included).
//   dash_search_step_destroy  frees the model.
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../random_weights.hpp"
#include "capi.hpp"
#include "dash/core/cuda.hpp"
#include "dash/core/error.hpp"
#include "dash/mixed_attention.hpp"
#include "dash/model/config.hpp"
#include "dash/model/cuda/search_model.cuh"
#include "dash/model/decoder.hpp"
#include "dash/model/weights.hpp"
#include "dash/ops/gated_delta_net.hpp"
#include "dash/ops/gated_linear.hpp"
#include "dash/ops/sliding_window.hpp"
#include "dash/ops/softmax.hpp"

namespace {

using namespace dash;

// The step of one compiled operator set, behind one interface for the C entry points.
struct SearchStep {
  virtual ~SearchStep() = default;
  virtual void run(const int* ids, const float* pi, cudaStream_t stream) = 0;
  virtual void read(float* loss, float* pi_gradient, cudaStream_t stream) const = 0;
  virtual std::size_t workspace_bytes() const = 0;
};

template <class... Ops>
class TypedSearchStep final : public SearchStep {
 public:
  TypedSearchStep(const model::Config& c, index_t batch, index_t length, Ops... ops)
      : batch_(batch), length_(length), model_(decoder(c, ops...), batch * length, length, dash::cuda::model::Activations::kept,
             dash::cuda::GemmChoice::fastest),
        run_(std::size_t(c.n_layers) * sizeof...(Ops), 1) {}

  void run(const int* ids, const float* pi, cudaStream_t stream) override {
    model_.step(ids, batch_, length_, pi, run_, stream);
  }

  void read(float* loss, float* pi_gradient, cudaStream_t stream) const override {
    const std::size_t entries = run_.size();
    dash::cuda::check(cudaMemcpyAsync(loss, model_.loss(), 2 * sizeof(float), cudaMemcpyDeviceToHost, stream),
                "dash_search_step_read: copy the loss");
    dash::cuda::check(cudaMemcpyAsync(pi_gradient, model_.pi_gradient(), entries * sizeof(float), cudaMemcpyDeviceToHost,
                                stream),
                "dash_search_step_read: copy dL/dpi");
    dash::cuda::check(cudaStreamSynchronize(stream), "dash_search_step_read: synchronise");
  }

  std::size_t workspace_bytes() const override { return model_.workspace_bytes(); }

 private:
  using Mixer = BasicMixedAttention<float, Ops...>;

  static model::Decoder<float, Mixer> decoder(const model::Config& c, Ops... ops) {
    Rng rng(7);
    return model::Decoder<float, Mixer>(c, bench::random_weights(c), [&](int, const AttentionShape& s, AttentionWeights<float> a) {
      return Mixer(s, std::move(a), rng, ops...);
    });
  }

  index_t batch_, length_;
  dash::cuda::model::DeviceSearchModel<Ops...> model_;
  std::vector<std::uint8_t> run_;
};

// "softmax,swa:W,gla[,gdn]" → the window W and whether gdn is present; anything else fails.
std::unique_ptr<SearchStep> make_step(const model::Config& c, const std::string& ops, index_t batch,
                                      index_t length) {
  const std::string prefix = "softmax,swa:";
  const auto comma = ops.find(',', prefix.size());
  const std::string rest = comma == std::string::npos ? "" : ops.substr(comma);
  index_t window = 0;
  if (ops.rfind(prefix, 0) == 0 && comma != std::string::npos) {
    const std::string digits = ops.substr(prefix.size(), comma - prefix.size());
    if (!digits.empty() && digits.find_first_not_of("0123456789") == std::string::npos && digits.size() < 10)
      window = std::stoll(digits);
  }
  require(window >= 1 && (rest == ",gla,gdn" || rest == ",gla"), "dash_search_step_create: ops = '", ops,
          "', expected 'softmax,swa:W,gla,gdn' or 'softmax,swa:W,gla' with a window W >= 1");
  if (rest == ",gla,gdn")
    return std::make_unique<TypedSearchStep<Softmax, SlidingWindow<>, GatedLinear, GatedDeltaNet>>(
        c, batch, length, Softmax{}, SlidingWindow<>(window), GatedLinear{}, GatedDeltaNet{});
  return std::make_unique<TypedSearchStep<Softmax, SlidingWindow<>, GatedLinear>>(c, batch, length, Softmax{},
                                                                                  SlidingWindow<>(window), GatedLinear{});
}

SearchStep& handle_of(void* handle) {
  require(handle != nullptr, "dash_search_step: handle is null");
  return *static_cast<SearchStep*>(handle);
}

}  // namespace

extern "C" int dash_search_step_create(int n_layers, int d_model, int n_heads, int n_kv_heads, int d_head, int d_ff,
                                       int vocab_size, int tied_embeddings, int qkv_bias, double rope_theta,
                                       const char* ops, int batch, int length, void** handle) {
  return dash::peer::guarded([&] {
    require(handle != nullptr, "dash_search_step_create: handle is null");
    require(ops != nullptr, "dash_search_step_create: ops is null");
    require(batch >= 1 && length >= 1, "dash_search_step_create: batch × length = ", batch, " × ", length,
            ", expected both >= 1");
    *handle = nullptr;
    model::Config c;
    c.architecture = "llama";
    c.n_layers = n_layers, c.d_model = d_model, c.n_heads = n_heads, c.n_kv_heads = n_kv_heads, c.d_head = d_head;
    c.d_ff = d_ff, c.vocab_size = vocab_size, c.context_length = length;
    c.tied_embeddings = tied_embeddings != 0, c.qkv_bias = qkv_bias != 0;
    c.rope = RopeConfig{RopeConfig::Style::half, rope_theta};
    c.validate();
    *handle = make_step(c, ops, batch, length).release();
  });
}

extern "C" int dash_search_step_run(void* handle, const int* ids, const float* pi, void* stream) {
  return dash::peer::guarded([&] { handle_of(handle).run(ids, pi, static_cast<cudaStream_t>(stream)); });
}

extern "C" int dash_search_step_read(void* handle, float* loss, float* pi_gradient, void* stream) {
  return dash::peer::guarded([&] {
    require(loss != nullptr && pi_gradient != nullptr, "dash_search_step_read: loss and pi_gradient must not be null");
    handle_of(handle).read(loss, pi_gradient, static_cast<cudaStream_t>(stream));
  });
}

extern "C" size_t dash_search_step_bytes(void* handle) {
  std::size_t bytes = 0;
  const int status = dash::peer::guarded([&] { bytes = handle_of(handle).workspace_bytes(); });
  return status == 0 ? bytes : 0;
}

extern "C" void dash_search_step_destroy(void* handle) { delete static_cast<SearchStep*>(handle); }

// The tool's one CUDA translation unit: candidate preparation, the search step and the
// evaluation's scoring of the tool's decoder type on the GPU.
#include "device_model.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "dash/core/cuda.hpp"
#include "dash/model/cuda/prepare.cuh"
#include "dash/model/cuda/search_model.cuh"

namespace dash::tool {

namespace {

using DeviceModel = cuda::model::DeviceSearchModel<Softmax, SlidingWindow<>, GatedLinear, GatedDeltaNet>;

// Every layer's activations kept from the forward when they fit in the device's memory (no
// forward runs twice), else recomputed layer by layer in the backward. Each GEMM shape runs the
// fastest of cuBLASLt's candidate algorithms, timed in the first step.
class CudaStep final : public DeviceSearchStep {
 public:
  CudaStep(const SearchDecoder& decoder, index_t batch, index_t length, const DeviceModel::OpMask& candidates,
           std::string name)
      : model_(make_model(decoder, batch * length, length, candidates)), name_(std::move(name)) {
    if (model_->activations() == cuda::model::Activations::recomputed)
      std::fprintf(stderr, "search: the layers' activations do not fit beside the model; each layer's forward is "
                           "recomputed in the backward\n");
  }

  double kl_and_gradient(const model::TokenBatch& batch, search::Mixture& mixture) override {
    return model_->kl_and_gradient(batch, mixture);
  }
  std::string device_name() const override { return name_; }

 private:
  static std::unique_ptr<DeviceModel> make_model(const SearchDecoder& decoder, index_t tokens, index_t length,
                                                 const DeviceModel::OpMask& candidates) {
    const auto make = [&](cuda::model::Activations activations) {
      return std::make_unique<DeviceModel>(decoder, tokens, length, activations, cuda::GemmChoice::fastest, candidates);
    };
    try {
      return make(cuda::model::Activations::kept);
    } catch (const Error&) {
      (void)cudaGetLastError();  // the failed allocation
      return make(cuda::model::Activations::recomputed);
    }
  }

  std::unique_ptr<DeviceModel> model_;
  std::string name_;
};

class CudaPreparation final : public DevicePreparation {
 public:
  CudaPreparation(const SearchDecoder& decoder, std::vector<bool> prepare, search::PrepareOptions options,
                  index_t batch, index_t length, std::string name)
      : preparation_(decoder, std::move(prepare), options, batch * length, length), name_(std::move(name)) {}

  double step(const model::TokenBatch& batch, std::int64_t step) override { return preparation_.step(batch, step); }
  search::AlignmentErrors errors(const model::TokenBatch& batch) override { return preparation_.errors(batch); }
  void write_back(SearchDecoder& decoder) override { preparation_.write_back(decoder); }
  std::string device_name() const override { return name_; }

 private:
  cuda::model::DeviceCandidatePreparation<Softmax, SlidingWindow<>, GatedLinear, GatedDeltaNet> preparation_;
  std::string name_;
};

// The current device's name; a dash::Error when there is none.
std::string cuda_device_name() {
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  require(status == cudaSuccess && devices > 0, "--device cuda: no CUDA device found (",
          status == cudaSuccess ? "none present" : cudaGetErrorString(status), "); use --device cpu");
  int device = 0;
  cuda::check(cudaGetDevice(&device), "--device cuda: current device");
  cudaDeviceProp properties{};
  cuda::check(cudaGetDeviceProperties(&properties, device), "--device cuda: device properties");
  return properties.name;
}

// Scoring texts are cut into batches of whole windows; their inputs, targets and the teacher's
// hidden states stay on the device. Each score() or next_tokens() synchronises once per batch.
class CudaScorer final : public DeviceScorer {
 public:
  CudaScorer(const SearchDecoder& decoder, index_t max_tokens, index_t max_length, std::string name)
      : model_(decoder, max_tokens, max_length),
        name_(std::move(name)),
        vocab_(decoder.config().vocab_size),
        pi_(Shape{index_t(model_.n_layers()) * model_.n_ops()}),
        ids_(Shape{max_tokens}),
        next_(Shape{max_tokens}) {}

  std::size_t add_text(const std::vector<std::vector<int>>& windows, index_t length) override {
    require(!windows.empty(), "held-out data: no windows");
    require(length >= 1 && length <= model_.max_length(), "held-out data: windows of ", length,
            " tokens, the device model holds sequences of at most ", model_.max_length());
    Text text;
    text.windows = index_t(windows.size()), text.length = length;
    text.per_batch = std::min<index_t>(text.windows, std::max<index_t>(1, model_.max_tokens() / length));
    Tensor<int> inputs(Shape{text.windows * length}), targets(Shape{text.windows * length});
    for (index_t w = 0; w < text.windows; ++w) {
      const std::vector<int>& window = windows[std::size_t(w)];
      require(index_t(window.size()) == length + 1, "held-out data: a window of ", window.size(), " ids, expected ",
              length + 1);
      check_ids(window);
      std::copy(window.begin(), window.end() - 1, inputs.data() + w * length);
      std::copy(window.begin() + 1, window.end(), targets.data() + w * length);
    }
    text.inputs = cuda::DeviceTensor<int>::from_host(inputs.view());
    text.targets = cuda::DeviceTensor<int>::from_host(targets.view());
    const index_t d = model_.config().d_model;
    text.teacher_hidden = cuda::DeviceTensor<cuda::bfloat16>(Shape{text.windows * length, d});
    const cudaStream_t stream = model_.stream();
    for (index_t first = 0; first < text.windows; first += text.per_batch) {
      const index_t batch = std::min(text.per_batch, text.windows - first), row = first * length;
      model_.teacher_forward(text.inputs.data() + row, batch, length, stream);
      cuda::check(cudaMemcpyAsync(text.teacher_hidden.data() + row * d, model_.teacher_hidden(),
                                  std::size_t(batch * length * d) * sizeof(cuda::bfloat16), cudaMemcpyDeviceToDevice,
                                  stream),
                  "eval: keep the teacher's hidden states");
    }
    cuda::check(cudaStreamSynchronize(stream), "eval: teacher forward");
    texts_.push_back(std::move(text));
    return texts_.size() - 1;
  }

  search::Quality score(std::size_t which, const std::vector<int>& ops) override {
    require(which < texts_.size(), "eval: text ", which, " of ", texts_.size());
    const Text& text = texts_[which];
    const std::vector<std::uint8_t> run = select(ops);
    const cudaStream_t stream = model_.stream();
    double kl = 0, nll = 0;
    index_t counted = 0;
    for (index_t first = 0; first < text.windows; first += text.per_batch) {
      const index_t batch = std::min(text.per_batch, text.windows - first), row = first * text.length;
      model_.score(text.inputs.data() + row, text.targets.data() + row, batch, text.length, pi_.data(), run,
                   text.teacher_hidden.data() + row * model_.config().d_model, stream);
      float sums[2];
      int count = 0;
      cuda::check(cudaMemcpyAsync(sums, model_.scores(), sizeof(sums), cudaMemcpyDeviceToHost, stream),
                  "eval: copy scores");
      cuda::check(cudaMemcpyAsync(&count, model_.target_count(), sizeof(count), cudaMemcpyDeviceToHost, stream),
                  "eval: copy target count");
      cuda::check(cudaStreamSynchronize(stream), "eval: score");
      kl += sums[0], nll += sums[1], counted += count;
    }
    search::Quality q;
    q.tokens = text.windows * text.length;
    require(counted == q.tokens, "eval: ", counted, " of ", q.tokens, " targets inside the vocabulary");
    q.kl = kl / double(q.tokens), q.nll = nll / double(q.tokens);
    return q;
  }

  std::vector<std::vector<int>> next_tokens(const std::vector<std::vector<int>>& sequences,
                                            const std::vector<int>& ops) override {
    const std::vector<std::uint8_t> run = select(ops);
    const cudaStream_t stream = model_.stream();
    std::vector<std::vector<int>> out(sequences.size());
    // Batches of sequences padded at the end to the longest: every operator is causal, so the
    // padding changes no earlier position.
    for (std::size_t first = 0; first < sequences.size();) {
      index_t length = 0;
      std::size_t end = first;
      while (end < sequences.size()) {
        const index_t n = index_t(sequences[end].size());
        require(n >= 1 && n <= model_.max_length(), "eval: a sequence of ", n,
                " tokens, the device model holds 1 ... ", model_.max_length());
        const index_t longer = std::max(length, n);
        if (end > first && (longer * index_t(end + 1 - first) > model_.max_tokens() ||
                            index_t(end + 1 - first) > DeviceModel::Mixer::max_batch))
          break;
        length = longer, ++end;
      }
      const index_t batch = index_t(end - first);
      std::vector<int> ids(std::size_t(batch * length), 0);
      for (std::size_t s = first; s < end; ++s) {
        check_ids(sequences[s]);
        std::copy(sequences[s].begin(), sequences[s].end(), ids.begin() + long(s - first) * length);
      }
      cuda::check(cudaMemcpyAsync(ids_.data(), ids.data(), ids.size() * sizeof(int), cudaMemcpyHostToDevice, stream),
                  "eval: upload ids");
      model_.next_tokens(ids_.data(), batch, length, pi_.data(), run, next_.data(), stream);
      std::vector<int> next(ids.size());
      cuda::check(cudaMemcpyAsync(next.data(), next_.data(), next.size() * sizeof(int), cudaMemcpyDeviceToHost, stream),
                  "eval: copy next tokens");
      cuda::check(cudaStreamSynchronize(stream), "eval: next tokens");
      for (std::size_t s = first; s < end; ++s) {
        const auto row = next.begin() + long(s - first) * length;
        out[s].assign(row, row + long(sequences[s].size()));
      }
      first = end;
    }
    return out;
  }

  std::string device_name() const override { return name_; }

 private:
  struct Text {
    index_t windows = 0, length = 0, per_batch = 0;
    cuda::DeviceTensor<int> inputs, targets;
    cuda::DeviceTensor<cuda::bfloat16> teacher_hidden;  // [windows·length, d]
  };

  void check_ids(const std::vector<int>& ids) const {
    for (std::size_t t = 0; t < ids.size(); ++t)
      require(ids[t] >= 0 && ids[t] < vocab_, "eval: token id ", ids[t], " at position ", t,
              " is outside the vocabulary [0, ", vocab_, ")");
  }

  // One-hot π for `ops` on the device (weight 1 on each layer's operator, the only one run);
  // returns the run flags.
  std::vector<std::uint8_t> select(const std::vector<int>& ops) {
    const int L = model_.n_layers(), n = model_.n_ops();
    require(int(ops.size()) == L, "eval: an architecture of ", ops.size(), " layers, the model has ", L);
    std::vector<float> pi(std::size_t(L * n), 0.0f);
    std::vector<std::uint8_t> run(pi.size(), 0);
    for (int l = 0; l < L; ++l) {
      const int op = ops[std::size_t(l)];
      require(op >= 0 && op < n, "eval: layer ", l, " has operator ", op, ", expected 0 ... ", n - 1);
      pi[std::size_t(l * n + op)] = 1.0f, run[std::size_t(l * n + op)] = 1;
    }
    cuda::check(cudaMemcpyAsync(pi_.data(), pi.data(), pi.size() * sizeof(float), cudaMemcpyHostToDevice,
                                model_.stream()),
                "eval: upload pi");
    cuda::check(cudaStreamSynchronize(model_.stream()), "eval: upload pi");
    return run;
  }

  DeviceModel model_;
  std::string name_;
  int vocab_;
  cuda::DeviceTensor<float> pi_;
  cuda::DeviceTensor<int> ids_, next_;
  std::vector<Text> texts_;
};

}  // namespace

std::unique_ptr<DevicePreparation> make_cuda_preparation(const SearchDecoder& decoder, std::vector<bool> prepare,
                                                         search::PrepareOptions options, index_t batch, index_t length) {
  std::string name = cuda_device_name();
  return std::make_unique<CudaPreparation>(decoder, std::move(prepare), options, batch, length, std::move(name));
}

std::unique_ptr<DeviceSearchStep> make_cuda_search_step(const SearchDecoder& decoder, index_t batch, index_t length,
                                                        const std::array<bool, n_ops>& candidates) {
  std::string name = cuda_device_name();
  return std::make_unique<CudaStep>(decoder, batch, length, candidates, std::move(name));
}

std::unique_ptr<DeviceScorer> make_cuda_scorer(const SearchDecoder& decoder, index_t max_tokens, index_t max_length) {
  std::string name = cuda_device_name();
  return std::make_unique<CudaScorer>(decoder, max_tokens, max_length, std::move(name));
}

}  // namespace dash::tool

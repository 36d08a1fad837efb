// Candidate preparation, the search step and the evaluation's scoring on the GPU, behind small
// interfaces: only device_model.cu is compiled by nvcc, and a build without CUDA still links
// (the make_cuda_* functions then throw).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dash/model/decoder.hpp"
#include "dash/search/evaluate.hpp"
#include "dash/search/mixture.hpp"
#include "dash/search/prepare.hpp"
#include "search_space.hpp"

namespace dash::tool {

#ifndef DASH_TOOL_CUDA
// What every make_cuda_* says in a build without CUDA.
[[noreturn]] inline void fail_without_cuda() {
  fail("--device cuda: this build of dash has no CUDA (configure with a CUDA compiler and CMake >= 3.28); use --device cpu");
}
#endif

// search::CandidatePreparation's steps on a GPU; write_back copies the trained candidates into
// the decoder the preparation was made from.
class DevicePreparation {
 public:
  virtual ~DevicePreparation() = default;
  virtual double step(const model::TokenBatch& batch, std::int64_t step) = 0;
  virtual search::AlignmentErrors errors(const model::TokenBatch& batch) = 0;
  virtual void write_back(SearchDecoder& decoder) = 0;
  virtual std::string device_name() const = 0;
};

// For batches of at most batch × length tokens. Throws a dash::Error when no GPU is present.
#ifdef DASH_TOOL_CUDA
std::unique_ptr<DevicePreparation> make_cuda_preparation(const SearchDecoder& decoder, std::vector<bool> prepare,
                                                         search::PrepareOptions options, index_t batch, index_t length);
#else
inline std::unique_ptr<DevicePreparation> make_cuda_preparation(const SearchDecoder&, std::vector<bool>,
                                                                search::PrepareOptions, index_t, index_t) {
  fail_without_cuda();
}
#endif

// search::SearchModel's step, run on a GPU.
class DeviceSearchStep {
 public:
  virtual ~DeviceSearchStep() = default;
  virtual double kl_and_gradient(const model::TokenBatch& batch, search::Mixture& mixture) = 0;
  virtual std::string device_name() const = 0;
};

// The GPU copy of `decoder` (bf16 weights, every candidate's parameters) for batches of at most
// batch × length tokens, holding activations for the operators in `candidates` only. Throws a
// dash::Error when no GPU is present. Defined in device_model.cu in builds with CUDA
// (DASH_TOOL_CUDA).
#ifdef DASH_TOOL_CUDA
std::unique_ptr<DeviceSearchStep> make_cuda_search_step(const SearchDecoder& decoder, index_t batch, index_t length,
                                                        const std::array<bool, n_ops>& candidates);
#else
inline std::unique_ptr<DeviceSearchStep> make_cuda_search_step(const SearchDecoder&, index_t, index_t,
                                                               const std::array<bool, n_ops>&) {
  fail_without_cuda();
}
#endif

// What `dash eval` computes, on a GPU, for discrete architectures (one operator per layer, only
// that operator run): search::HeldOut's scores and the retrieval tasks' greedy next tokens.
class DeviceScorer {
 public:
  virtual ~DeviceScorer() = default;
  // Text to score on: windows of length + 1 ids (the first `length` read, the last `length` the
  // targets). The teacher's final hidden states over it are computed now and kept on the device.
  // Returns the text's index for score().
  virtual std::size_t add_text(const std::vector<std::vector<int>>& windows, index_t length) = 0;
  // search::HeldOut::score on text `text`: token-mean KL to the teacher and NLL of the targets.
  virtual search::Quality score(std::size_t text, const std::vector<int>& ops) = 0;
  // For each sequence, next[t] = the architecture's argmax token after ids[0..t] (lowest id on
  // ties), one forward per batch of sequences.
  virtual std::vector<std::vector<int>> next_tokens(const std::vector<std::vector<int>>& sequences,
                                                    const std::vector<int>& ops) = 0;
  virtual std::string device_name() const = 0;
};

// The GPU copy of `decoder` for batches of at most max_tokens tokens in sequences of at most
// max_length. Throws a dash::Error when no GPU is present. Defined in device_model.cu in builds
// with CUDA (DASH_TOOL_CUDA).
#ifdef DASH_TOOL_CUDA
std::unique_ptr<DeviceScorer> make_cuda_scorer(const SearchDecoder& decoder, index_t max_tokens, index_t max_length);
#else
inline std::unique_ptr<DeviceScorer> make_cuda_scorer(const SearchDecoder&, index_t, index_t) {
  fail_without_cuda();
}
#endif

// A search::SearchModel whose every step runs on the GPU.
class CudaSearchModel {
 public:
  using Batch = model::TokenBatch;

  CudaSearchModel(const SearchDecoder& decoder, index_t batch, index_t length, const std::array<bool, n_ops>& candidates)
      : n_layers_(decoder.n_layers()), step_(make_cuda_search_step(decoder, batch, length, candidates)) {}

  int n_layers() const { return n_layers_; }
  int n_ops() const { return tool::n_ops; }
  double kl_and_gradient(const Batch& batch, search::Mixture& mixture) { return step_->kl_and_gradient(batch, mixture); }
  std::string device_name() const { return step_->device_name(); }

 private:
  int n_layers_;
  std::unique_ptr<DeviceSearchStep> step_;
};

}  // namespace dash::tool

// `dash prepare`: stage 1, the teacher-aligned candidates, saved to OUT/candidates.safetensors.
// With --device cuda the candidates train on the GPU (model/cuda/prepare.cuh), else on the CPU
// reference (search/prepare.hpp): the same steps on the same batches.
#pragma once

#include <cmath>
#include <cstdio>
#include <string>

#include <nlohmann/json.hpp>

#include "dash/search/prepare.hpp"
#include "device_model.hpp"
#include "interrupt.hpp"
#include "workspace.hpp"

namespace dash::tool {

// The training loop and the saved candidates, for a preparation with step(batch, s) and
// errors(batch) (the CPU's CandidatePreparation or a DevicePreparation).
template <class Preparation>
int prepare_with(Workspace& ws, Preparation& prep, const std::vector<bool>& prepare, index_t steps,
                 const std::string& device) {
  const auto descriptions = ws.ops.prepared();
  const index_t B = ws.args.batch, T = ws.seq_len;
  const std::vector<int> validation = random_windows(ws.corpus.calibration, ws.args.seed + 17, -1, B, T);
  const search::AlignmentErrors before = prep.errors({validation, B, T});

  std::fprintf(stderr, "prepare: %s on %s, %lld steps of %lld × %lld tokens on %s\n", ws.ops.to_string().c_str(),
               ws.model_name.c_str(), (long long)steps, (long long)B, (long long)T, device.c_str());
  Progress progress("prepare", double(steps * B * T));
  double error = 0;
  for (index_t s = 0; s < steps; ++s) {
    if (interrupt_requested()) {
      progress.finish();
      std::fprintf(stderr, "prepare: interrupted at step %lld of %lld; nothing saved (run it again)\n",
                   (long long)s, (long long)steps);
      return interrupted_status;
    }
    const std::vector<int> ids = random_windows(ws.corpus.calibration, ws.args.seed + 1, s, B, T);
    error = prep.step({ids, B, T}, s);
    progress.update(double((s + 1) * B * T), "step " + std::to_string(s + 1) + "/" + std::to_string(steps) +
                                                 "  alignment error " + std::to_string(error));
  }
  progress.finish();
  const search::AlignmentErrors after = prep.errors({validation, B, T});
  if constexpr (requires { prep.write_back(ws.decoder); }) prep.write_back(ws.decoder);

  nlohmann::ordered_json alignment = nlohmann::ordered_json::array();
  std::printf("layer");
  for (int i = 0; i < n_ops; ++i)
    if (prepare[std::size_t(i)]) std::printf("  %10s before → after", ws.ops.name(i).c_str());
  std::printf("\n");
  for (int l = 0; l < ws.decoder.n_layers(); ++l) {
    nlohmann::ordered_json row = {{"layer", l}};
    std::printf("%5d", l);
    for (int i = 0; i < n_ops; ++i)
      if (prepare[std::size_t(i)]) {
        const double b = before[std::size_t(l)][std::size_t(i)], a = after[std::size_t(l)][std::size_t(i)];
        row[ws.ops.name(i)] = {{"before", b}, {"after", a}};
        std::printf("  %10s %6.4f → %6.4f", "", b, a);
      }
    std::printf("\n");
    alignment.push_back(row);
  }
  io::save_candidates(ws.candidates_path(), ws.decoder, descriptions, ws.fingerprint,
                      {{"dash.model", ws.model_name},
                       {"dash.tokens", std::to_string(steps * B * T)},
                       {"dash.seconds", std::to_string(progress.elapsed())},
                       {"dash.seed", std::to_string(ws.args.seed)},
                       {"dash.device", device},
                       {"dash.data", ws.corpus.source},
                       {"dash.alignment", alignment.dump()}});
  std::printf("candidates: %s (%lld tokens, %.0f s)\n", ws.candidates_path().c_str(), (long long)(steps * B * T),
              progress.elapsed());
  return 0;
}

inline int run_prepare(Workspace& ws) {
  const auto descriptions = ws.ops.prepared();
  std::vector<bool> prepare(n_ops);
  for (int i = 0; i < n_ops; ++i) prepare[std::size_t(i)] = !descriptions[std::size_t(i)].empty();
  if (std::find(prepare.begin(), prepare.end(), true) == prepare.end()) {
    std::printf("prepare: %s use the teacher's own weights; nothing to prepare\n", ws.ops.to_string().c_str());
    return 0;
  }
  const index_t tokens = ws.args.prepare_tokens > 0 ? ws.args.prepare_tokens : ws.args.tokens;
  const index_t steps = ws.steps_for(tokens);
  const search::PrepareOptions options{.steps = steps, .lr = ws.args.prepare_lr, .warmup = steps / 10};
  if (ws.args.device == "cuda") {
    const std::unique_ptr<DevicePreparation> prep =
        make_cuda_preparation(ws.decoder, prepare, options, ws.args.batch, ws.seq_len);
    return prepare_with(ws, *prep, prepare, steps, prep->device_name());
  }
  search::CandidatePreparation<float, Softmax, SlidingWindow<>, GatedLinear, GatedDeltaNet> prep(ws.decoder, prepare,
                                                                                                options);
  return prepare_with(ws, prep, prepare, steps, "cpu");
}

}  // namespace dash::tool

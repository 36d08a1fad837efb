// The `dash` tool's commands on a plain (all-softmax) model: info, generate, perplexity.
#pragma once

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "dash/io/load.hpp"
#include "teacher.hpp"
#include "dash/io/text.hpp"

namespace dash::tool {

struct ModelArgs {
  std::filesystem::path model;
  std::optional<std::filesystem::path> tokenizer;
};

inline const io::Tokenizer& require_tokenizer(const io::LoadedModel& m) {
  require(bool(m.tokenizer), m.checkpoint.path, ": no tokenizer found for this model, give one with --tokenizer");
  return *m.tokenizer;
}

inline int run_info(const ModelArgs& args) {
  io::LoadedModel m = io::load_model(args.model, args.tokenizer);
  const model::Config& c = m.checkpoint.config;
  const char* rope = c.rope.style == RopeConfig::Style::interleaved ? "interleaved pairs"
                     : c.rope.style == RopeConfig::Style::half      ? "rotate-half"
                                                                      : "none";
  std::string storage;
  for (const auto& [type, count] : m.checkpoint.storage_types)
    storage += (storage.empty() ? "" : ", ") + type + " ×" + std::to_string(count);
  std::printf("model          %s (%s, %s)\n", m.checkpoint.name.c_str(), m.checkpoint.format.c_str(),
              m.checkpoint.path.c_str());
  std::printf("architecture   %s\n", c.architecture.c_str());
  std::printf("layers         %d\n", c.n_layers);
  std::printf("d_model        %d\n", c.d_model);
  std::printf("heads          %d query, %d key/value, %d wide (GQA group %d)\n", c.n_heads, c.n_kv_heads, c.d_head,
              c.n_heads / c.n_kv_heads);
  std::printf("mlp            SwiGLU, %d hidden\n", c.d_ff);
  std::printf("vocabulary     %d\n", c.vocab_size);
  std::printf("context        %d\n", c.context_length);
  std::printf("rope           %s, theta %g\n", rope, c.rope.theta);
  std::printf("rms_norm eps   %g\n", c.rms_eps);
  std::printf("qkv bias       %s\n", c.qkv_bias ? "yes" : "no");
  std::printf("lm head        %s\n", c.tied_embeddings ? "tied to the embedding" : "separate");
  if (c.sliding_window) std::printf("window         %d\n", c.sliding_window);
  std::printf("stored as      %s (loaded as float32)\n", storage.c_str());
  std::printf("parameters     %zu\n", m.checkpoint.weights.parameter_count());
  std::printf("fingerprint    %s\n", io::fingerprint(c, m.checkpoint.weights).c_str());
  std::printf("tokenizer      %s%s\n", m.tokenizer ? m.tokenizer->description().c_str() : "none (give --tokenizer)",
              m.tokenizer ? (m.add_bos ? ", adds BOS" : ", no BOS") : "");
  return 0;
}

inline int run_generate(const ModelArgs& args, const std::string& prompt, int tokens) {
  require(tokens >= 1, "--tokens: ", tokens, ", expected >= 1");
  io::LoadedModel m = io::load_model(args.model, args.tokenizer);
  const io::Tokenizer tokenizer = require_tokenizer(m);
  std::vector<int> ids = tokenizer.encode(prompt, m.add_bos);
  require(!ids.empty(), "--prompt: empty, and this tokenizer adds no BOS: give a prompt");
  const Teacher teacher = make_teacher(std::move(m.checkpoint));
  const int context = teacher.config().context_length;
  std::printf("%s", prompt.c_str());
  std::fflush(stdout);
  for (int i = 0; i < tokens && int(ids.size()) < context; ++i) {
    const std::vector<float> z = last_logits(teacher, ids);
    const int next = int(std::max_element(z.begin(), z.end()) - z.begin());
    if (next == tokenizer.eos()) break;
    std::printf("%s", tokenizer.decode_piece(ids.back(), next).c_str());
    std::fflush(stdout);
    ids.push_back(next);
  }
  std::printf("\n");
  return 0;
}

// Mean NLL of the tokens of --data: each document is encoded (with BOS where the model expects
// one) and cut into windows of seq_len tokens; every token of a window but its first is
// predicted from the ones before it in the window. --max-tokens stops after that many predictions.
inline int run_perplexity(const ModelArgs& args, const std::filesystem::path& data, int seq_len, long max_tokens) {
  io::LoadedModel m = io::load_model(args.model, args.tokenizer);
  const io::Tokenizer tokenizer = require_tokenizer(m);
  const std::string name = m.checkpoint.name;
  const Teacher teacher = make_teacher(std::move(m.checkpoint));
  if (seq_len <= 0) seq_len = std::min(teacher.config().context_length, 1024);
  require(seq_len >= 2 && seq_len <= teacher.config().context_length, "--seq-len: ", seq_len, ", expected 2..",
          teacher.config().context_length, " (the model's context)");
  require(max_tokens != 0, "--max-tokens: 0, expected a positive count (or leave it out)");

  std::vector<std::vector<int>> windows;
  long planned = 0;
  for (const std::string& doc : io::read_documents(data)) {
    const std::vector<int> ids = tokenizer.encode(doc, m.add_bos);
    for (std::size_t start = 0; start + 1 < ids.size(); start += std::size_t(seq_len)) {
      const std::size_t end = std::min(ids.size(), start + std::size_t(seq_len));
      std::vector<int> window(ids.begin() + long(start), ids.begin() + long(end));
      if (max_tokens > 0 && planned + long(window.size()) - 1 > max_tokens)
        window.resize(std::size_t(max_tokens - planned + 1));
      if (window.size() < 2) break;
      planned += long(window.size()) - 1;
      windows.push_back(std::move(window));
      if (max_tokens > 0 && planned >= max_tokens) break;
    }
    if (max_tokens > 0 && planned >= max_tokens) break;
  }
  require(planned > 0, data.string(), ": no window of at least 2 tokens");

  Progress progress("perplexity", double(planned));
  model::LossValue total;
  for (const auto& w : windows) {
    Teacher::Activations act;
    teacher.forward({w, 1, index_t(w.size())}, act);
    std::vector<int> targets(w.begin() + 1, w.end());
    targets.push_back(-1);  // the last position predicts nothing here
    const model::LossValue loss = model::nll_loss<float>(teacher.weights().head().view(), act.hidden.view(), targets);
    total.sum += loss.sum;
    total.count += loss.count;
    progress.update(double(total.count), "nll " + std::to_string(total.mean()));
  }
  progress.finish();
  const double nll = total.mean();
  nlohmann::json out = {{"model", name},
                        {"data", data.string()},
                        {"nll", nll},
                        {"ppl", std::exp(nll)},
                        {"tokens", total.count},
                        {"windows", windows.size()},
                        {"seq_len", seq_len},
                        {"seconds", progress.elapsed()},
                        {"tokens_per_second", double(total.count) / progress.elapsed()}};
  std::cout << out.dump() << std::endl;
  return 0;
}

}  // namespace dash::tool

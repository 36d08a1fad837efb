// What prepare, search and eval share: their arguments, the loaded model as a searchable
// decoder, the text, and the output folder's files.
#pragma once

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "corpus.hpp"
#include "dash/io/candidates.hpp"
#include "dash/io/load.hpp"
#include "dash/search/budget.hpp"
#include "search_space.hpp"

namespace dash::tool {

struct SearchArgs {
  ModelArgs model;
  std::optional<std::filesystem::path> data, eval_data;
  std::string ops = "softmax,swa,gla";
  std::string budget = "kv=0.25";
  index_t context = 0;           // where costs are counted; 0: the model's context
  index_t tokens = 16384;        // search tokens
  index_t prepare_tokens = 0;    // 0: as many as the search
  index_t eval_tokens = 4096;    // held-out tokens per architecture
  index_t seq_len = 0;           // 0: min(256, context)
  index_t batch = 1;
  std::string device = "cpu";
  std::uint64_t seed = 0;
  std::filesystem::path out;
  bool resume = false;
  bool enumerate = false;
  std::string relaxation = "softmax";
  double lr = 0.1;
  double prepare_lr = 1e-4;
  double copy_fraction = 0;  // of the search's and KL-guided's calibration sequences (repeat_halves)
  std::vector<index_t> retrieval_contexts;  // empty: 256, 512, 1024 within the model's context
  int retrieval_prompts = 4;
  int random_baselines = 5;
};

// Seconds since construction.
class Stopwatch {
 public:
  double seconds() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count(); }

 private:
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

struct Workspace {
  SearchArgs args;
  std::string model_name, fingerprint;
  io::Tokenizer tokenizer;
  bool add_bos = false;
  OpSet ops;
  search::Budget budget;
  index_t context = 0, seq_len = 0;
  SearchDecoder decoder;
  Corpus corpus;

  SearchModel model() const { return SearchModel(decoder); }
  std::filesystem::path candidates_path() const { return args.out / "candidates.safetensors"; }
  std::filesystem::path arch_path() const { return args.out / "arch.json"; }
  std::filesystem::path log_path() const { return args.out / "search_log.csv"; }
  std::filesystem::path checkpoint_path() const { return args.out / "search.ckpt"; }
  std::filesystem::path eval_path() const { return args.out / "eval.json"; }
  std::filesystem::path report_path() const { return args.out / "report.svg"; }

  search::CostTable costs() const { return cost_table(decoder, ops, budget, context); }
  index_t steps_for(index_t tokens) const { return std::max<index_t>(1, tokens / (args.batch * seq_len)); }
};

inline std::unique_ptr<Workspace> open_workspace(SearchArgs args) {
  require(args.device == "cpu" || args.device == "cuda", "--device: '", args.device, "', expected cpu or cuda");
  require(!args.out.empty(), "--out: expected an output folder");
  std::error_code ec;
  std::filesystem::create_directories(args.out, ec);
  require(!ec && std::filesystem::is_directory(args.out), "--out ", args.out.string(),
          ": cannot create this folder (", ec.message(), ")");
  require(args.batch >= 1, "--batch: ", args.batch, ", expected >= 1");
  require(args.copy_fraction >= 0 && args.copy_fraction <= 1, "--copy-fraction: ", args.copy_fraction,
          ", expected 0 … 1");
  require(args.tokens >= 1 && args.eval_tokens >= 1 && args.prepare_tokens >= 0, "--tokens, --prepare-tokens and --eval-tokens must be positive");
  const OpSet ops = OpSet::parse(args.ops);
  const search::Budget budget = search::Budget::parse(args.budget);

  const Stopwatch loading;
  io::LoadedModel loaded = io::load_model(args.model.model, args.model.tokenizer);
  require(bool(loaded.tokenizer), loaded.checkpoint.path, ": no tokenizer found for this model, give one with --tokenizer");
  const model::Config config = loaded.checkpoint.config;
  const index_t context = args.context > 0 ? args.context : config.context_length;
  const index_t seq_len = args.seq_len > 0 ? args.seq_len : std::min<index_t>(256, config.context_length);
  require(seq_len >= 2 && seq_len <= config.context_length, "--seq-len: ", seq_len, ", expected 2 … ",
          config.context_length, " (the model's context)");
  const std::string name = loaded.checkpoint.name;
  const std::string fp = io::fingerprint(config, loaded.checkpoint.weights);
  const double weights = double(loaded.checkpoint.weights.parameter_count());
  SearchDecoder decoder = make_search_decoder(std::move(loaded.checkpoint), ops, args.seed);
  auto ws = std::unique_ptr<Workspace>(new Workspace{std::move(args), name, fp, std::move(*loaded.tokenizer),
                                                     loaded.add_bos, ops, budget, context, seq_len, std::move(decoder), {}});
  ws->costs();  // a budget no architecture meets fails here, before any work
  const double model_seconds = loading.seconds();
  ws->corpus = make_corpus(ws->model(), ws->tokenizer, ws->add_bos, ws->args.data, ws->args.eval_data,
                           std::max(ws->args.tokens, ws->args.prepare_tokens), seq_len, ws->args.seed);
  std::fprintf(stderr, "loaded %s (%.3g B weights) in %.1f s, text (%zu + %zu held-out tokens) in %.1f s\n",
               ws->model_name.c_str(), weights * 1e-9, model_seconds,
               ws->corpus.calibration.size(), ws->corpus.held_out.size(), loading.seconds() - model_seconds);
  return ws;
}

inline void write_json(const std::filesystem::path& path, const nlohmann::ordered_json& j) {
  const std::filesystem::path partial = path.string() + ".partial";
  {
    std::ofstream out(partial);
    require(bool(out), partial.string(), ": cannot open for writing");
    out << j.dump(2) << "\n";
    require(bool(out), partial.string(), ": write failed");
  }
  std::filesystem::rename(partial, path);
}

inline nlohmann::json read_json(const std::filesystem::path& path, const char* made_by) {
  std::ifstream in(path);
  require(bool(in), path.string(), ": not found; run `", made_by, "` with this --out first");
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail(path.string(), ": not valid JSON (", e.what(), ")");
  }
}

// Loads the prepared candidates the op set needs; refuses ones made for another teacher.
inline std::optional<io::CandidatesInfo> load_prepared(Workspace& ws) {
  bool any = false;
  for (const auto& d : ws.ops.prepared()) any = any || !d.empty();
  if (!any) return std::nullopt;
  require(std::filesystem::exists(ws.candidates_path()), ws.candidates_path().string(),
          ": not found; run `dash prepare` with this --out and --ops first");
  return io::load_candidates(ws.candidates_path(), ws.decoder, ws.ops.prepared(), ws.fingerprint);
}

inline std::string layer_list(const OpSet& ops, const std::vector<int>& arch) {
  std::string s;
  for (int op : arch) {
    if (!s.empty()) s += ' ';
    s += ops.name(op);
  }
  return s;
}

}  // namespace dash::tool

// `dash search`: stage 2. Reads OUT/candidates.safetensors, writes OUT/search_log.csv (one row
// per step), OUT/search.ckpt (every 30 s, at the end and on Ctrl-C) and OUT/arch.json.
#pragma once

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "dash/search/checkpoint.hpp"
#include "dash/search/differentiable_search.hpp"
#include "device_model.hpp"
#include "interrupt.hpp"
#include "workspace.hpp"

namespace dash::tool {

// One row of search_log.csv.
struct LogRow {
  std::int64_t step = 0;
  double tokens = 0, seconds = 0, temperature = 0, kl = 0, expected_cost = 0, price = 0;
  std::vector<double> pi;  // [L·m], every operator (0 for non-candidates)
};

inline std::string log_header(const Workspace& ws) {
  std::string h = "step,tokens,seconds,temperature,kl,expected_cost,price";
  for (int l = 0; l < ws.decoder.n_layers(); ++l)
    for (int i = 0; i < n_ops; ++i) h += ",pi_" + std::to_string(l) + "_" + std::string(SearchMixer::op_names()[std::size_t(i)]);
  return h;
}

inline std::string log_line(const LogRow& r) {
  std::ostringstream s;
  s.precision(9);
  s << r.step << ',' << r.tokens << ',' << r.seconds << ',' << r.temperature << ',' << r.kl << ',' << r.expected_cost
    << ',' << r.price;
  for (double p : r.pi) s << ',' << p;
  return s.str();
}

// The rows of an existing log with step < `before`; throws when the log is not this run's.
inline std::vector<LogRow> read_log(const Workspace& ws, std::int64_t before) {
  std::ifstream in(ws.log_path());
  require(bool(in), ws.log_path().string(), ": not found");
  std::string line;
  std::getline(in, line);
  require(line == log_header(ws), ws.log_path().string(), ": its columns are not this model's and operators'");
  std::vector<LogRow> rows;
  while (std::getline(in, line)) {
    std::stringstream cells(line);
    std::vector<double> v;
    for (std::string cell; std::getline(cells, cell, ',');) v.push_back(std::stod(cell));
    require(v.size() == 7 + std::size_t(ws.decoder.n_layers() * n_ops), ws.log_path().string(), ": a row of ", v.size(),
            " cells");
    LogRow r{std::int64_t(v[0]), v[1], v[2], v[3], v[4], v[5], v[6], {v.begin() + 7, v.end()}};
    if (r.step < before) rows.push_back(std::move(r));
  }
  return rows;
}

inline std::string search_signature(const Workspace& ws, const search::SearchOptions& o) {
  std::ostringstream s;
  s << "teacher " << ws.fingerprint << "; ops " << ws.ops.to_string() << "; budget " << ws.budget.to_string()
    << "; context " << ws.context << "; batch " << ws.args.batch << " x " << ws.seq_len << "; steps " << o.steps
    << "; lr " << o.lr << "; temperature " << o.temperature_start << "-" << o.temperature_end << "; relaxation "
    << ws.args.relaxation << "; copy fraction " << ws.args.copy_fraction << "; seed " << o.seed << "; data " << ws.corpus.source << " (" << ws.corpus.calibration.size()
    << " tokens)";
  if (std::filesystem::exists(ws.candidates_path()))
    s << "; candidates " << std::filesystem::file_size(ws.candidates_path()) << " bytes";
  return s.str();
}

// The search with the model that runs its steps: the CPU reference or the GPU.
template <search::SearchModel Model>
int run_search_with(Workspace& ws, Model& model, const std::optional<io::CandidatesInfo>& candidates) {
  const search::CostTable costs = ws.costs();
  if (costs.fits(costs.dearest()))
    std::fprintf(stderr, "search: budget %s does not bind: the dearest architecture (%.3g of all-softmax) fits\n",
                 ws.budget.to_string().c_str(), costs.dearest() / costs.reference);
  const index_t B = ws.args.batch, T = ws.seq_len;
  const search::SearchOptions options{.steps = ws.steps_for(ws.args.tokens),
                                      .lr = ws.args.lr,
                                      .relaxation = search::parse_relaxation(ws.args.relaxation),
                                      .seed = ws.args.seed};
  search::DifferentiableSearch<Model> searching(model, costs, options);
  const std::string signature = search_signature(ws, options);

  std::vector<LogRow> rows;
  if (ws.args.resume) {
    require(std::filesystem::exists(ws.checkpoint_path()), ws.checkpoint_path().string(),
            ": no checkpoint to resume; run without --resume");
    searching.restore(search::load_checkpoint(ws.checkpoint_path(), signature));
    rows = read_log(ws, searching.state().step);
    std::fprintf(stderr, "search: resuming at step %lld of %lld\n", (long long)searching.state().step,
                 (long long)options.steps);
  }
  {
    std::ofstream log(ws.log_path(), std::ios::trunc);
    require(bool(log), ws.log_path().string(), ": cannot open for writing");
    log << log_header(ws) << "\n";
    for (const auto& r : rows) log << log_line(r) << "\n";
  }
  std::ofstream log(ws.log_path(), std::ios::app);
  const double seconds_before = rows.empty() ? 0 : rows.back().seconds;
  const double tokens_before = double(searching.state().step * B * T);

  std::fprintf(stderr, "search: %s, ops %s, budget %s at context %lld, %lld steps of %lld × %lld tokens on %s\n",
               ws.model_name.c_str(), ws.ops.to_string().c_str(), ws.budget.to_string().c_str(), (long long)ws.context,
               (long long)options.steps, (long long)B, (long long)T, ws.args.device.c_str());
  Progress progress("search", double(options.steps * B * T) - tokens_before);
  Stopwatch since_checkpoint_timer;
  double last_checkpoint = 0;
  while (!searching.done()) {
    if (interrupt_requested()) {
      search::save_checkpoint(ws.checkpoint_path(), searching.state(), signature);
      progress.finish();
      std::fprintf(stderr, "search: interrupted at step %lld of %lld; checkpoint %s; continue with --resume\n",
                   (long long)searching.state().step, (long long)options.steps, ws.checkpoint_path().c_str());
      return interrupted_status;
    }
    const std::int64_t step = searching.state().step;
    std::vector<int> ids = random_windows(ws.corpus.calibration, ws.args.seed + 2, step, B, T);
    repeat_halves(ids, B, T, ws.args.copy_fraction, ws.args.seed + 3, step);
    const search::StepReport r = searching.step({ids, B, T});
    const LogRow row{step, double((step + 1) * B * T),
                     seconds_before + progress.elapsed(), r.temperature, r.kl, r.expected_cost, r.price,
                     searching.probabilities()};
    log << log_line(row) << "\n" << std::flush;
    char extra[160];
    std::snprintf(extra, sizeof extra, "step %lld/%lld  KL %.4f  cost %.3f (budget %.3f)", (long long)(step + 1),
                  (long long)options.steps, r.kl, r.expected_cost, costs.limit / costs.reference);
    progress.update(double((step + 1) * B * T) - tokens_before, extra);
    if (progress.elapsed() - last_checkpoint >= 30) {
      search::save_checkpoint(ws.checkpoint_path(), searching.state(), signature);
      last_checkpoint = progress.elapsed();
    }
  }
  search::save_checkpoint(ws.checkpoint_path(), searching.state(), signature);
  progress.finish();

  const std::vector<int> arch = searching.architecture();
  const std::vector<double> pi = searching.probabilities();
  nlohmann::ordered_json layers = nlohmann::ordered_json::array(), types = nlohmann::ordered_json::array();
  for (int l = 0; l < ws.decoder.n_layers(); ++l) {
    nlohmann::ordered_json p = nlohmann::ordered_json::object();
    for (int i = 0; i < n_ops; ++i)
      if (ws.ops.candidate[std::size_t(i)]) p[ws.ops.name(i)] = pi[std::size_t(l * n_ops + i)];
    layers.push_back({{"layer", l}, {"op", ws.ops.name(arch[std::size_t(l)])}, {"pi", p}});
    types.push_back(OpSet::layer_type(arch[std::size_t(l)]));
  }
  const double total = costs.total(arch);
  const double seconds = seconds_before + progress.elapsed();
  nlohmann::ordered_json j = {
      {"model", ws.model_name},
      {"teacher_fingerprint", ws.fingerprint},
      {"ops", ws.ops.to_string()},
      {"layer_types", types},
      {"sliding_window", ws.ops.window},
      {"layers", layers},
      {"cost",
       {{"kind", ws.budget.to_string().substr(0, ws.budget.to_string().find('='))},
        {"context", ws.context},
        {"total", total},
        {"fraction", total / costs.reference},
        {"budget", costs.limit},
        {"budget_fraction", costs.limit / costs.reference},
        {"all_softmax", costs.reference}}},
      {"budget", ws.budget.to_string()},
      {"search",
       {{"tokens", options.steps * B * T},
        {"steps", options.steps},
        {"batch", B},
        {"seq_len", T},
        {"seconds", seconds},
        {"relaxation", ws.args.relaxation},
        {"copy_fraction", ws.args.copy_fraction},
        {"device", ws.args.device},
        {"lr", options.lr},
        {"seed", options.seed},
        {"data", ws.corpus.source}}}};
  if (candidates)
    j["prepare"] = {{"tokens", std::stoll(candidates->metadata.at("dash.tokens"))},
                    {"seconds", std::stod(candidates->metadata.at("dash.seconds"))}};
  write_json(ws.arch_path(), j);
  std::printf("architecture (%s, cost %.4f of all-softmax, budget %s):\n  %s\n", ws.model_name.c_str(),
              total / costs.reference, ws.budget.to_string().c_str(), layer_list(ws.ops, arch).c_str());
  std::printf("arch.json: %s (%.0f s, %lld tokens)\n", ws.arch_path().c_str(), seconds,
              (long long)(options.steps * B * T));
  return 0;
}

inline int run_search(Workspace& ws) {
  const std::optional<io::CandidatesInfo> candidates = load_prepared(ws);
  if (ws.args.device == "cuda") {
    const Stopwatch building;
    CudaSearchModel model(ws.decoder, ws.args.batch, ws.seq_len, ws.ops.candidate);
    std::fprintf(stderr, "search: on %s (model built and copied to it in %.1f s)\n", model.device_name().c_str(),
                 building.seconds());
    return run_search_with(ws, model, candidates);
  }
  SearchModel model = ws.model();
  return run_search_with(ws, model, candidates);
}

}  // namespace dash::tool

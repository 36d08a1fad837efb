// `dash eval`: stage 3. The searched architecture (OUT/arch.json) and every selector baseline at
// the same budget, scored on held-out text (KL to the teacher, perplexity) and on retrieval
// (passkey and multi-key needle, exact match); with --enumerate, every architecture under the
// budget too. Writes OUT/eval.json and OUT/report.svg. With --device cuda every score and every
// retrieval forward runs on the GPU (device_model.hpp); the CPU path is the reference.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "dash/search/baselines.hpp"
#include "dash/search/evaluate.hpp"
#include "dash/search/knapsack.hpp"
#include "device_model.hpp"
#include "interrupt.hpp"
#include "report_svg.hpp"
#include "retrieval.hpp"
#include "search_command.hpp"
#include "workspace.hpp"

namespace dash::tool {

using HeldOut = search::HeldOut<float, Softmax, SlidingWindow<>, GatedLinear, GatedDeltaNet>;

struct Scored {
  std::string name;
  std::vector<int> ops;
  search::Quality quality;
  double cost_fraction = 0;
  std::map<std::string, std::map<index_t, double>> retrieval;  // task → context → accuracy
};

// Exact-match accuracy of an architecture on prompts: one forward per prompt, the answer
// positions read under teacher forcing (retrieval.hpp).
inline double retrieval_accuracy(const SearchDecoder& d, const std::vector<int>& ops,
                                 const std::vector<RetrievalPrompt>& prompts) {
  const auto arch = SearchDecoder::Architecture::discrete(ops);
  const Tensor<float>& head = d.weights().head();
  const index_t V = head.dim(0), dm = d.config().d_model;
  int hits = 0;
  for (const auto& p : prompts) {
    const std::vector<int> input(p.ids.begin(), p.ids.end() - 1);
    SearchDecoder::Activations act;
    d.forward({input, 1, index_t(input.size())}, act, arch);
    std::vector<int> next(p.ids.size(), -1);
    Tensor<float> z(Shape{1, V});
    for (index_t t = p.answer_begin - 1; t < index_t(input.size()); ++t) {
      model::logits<float>(head.view(), TensorView<const float>(act.hidden.data() + t * dm, Shape{1, dm}), z.view());
      next[std::size_t(t)] = int(std::max_element(z.data(), z.data() + V) - z.data());
    }
    hits += exact_match(p, next);
  }
  return prompts.empty() ? 0 : double(hits) / double(prompts.size());
}

// The same on the GPU: the prompts in batches, one forward each.
inline double retrieval_accuracy(DeviceScorer& scorer, const std::vector<int>& ops,
                                 const std::vector<RetrievalPrompt>& prompts) {
  std::vector<std::vector<int>> inputs;
  for (const auto& p : prompts) inputs.emplace_back(p.ids.begin(), p.ids.end() - 1);
  const std::vector<std::vector<int>> next = scorer.next_tokens(inputs, ops);
  int hits = 0;
  for (std::size_t k = 0; k < prompts.size(); ++k) hits += exact_match(prompts[k], next[k]);
  return prompts.empty() ? 0 : double(hits) / double(prompts.size());
}

// Tokens per batch on the GPU: enough for whole retrieval prompts and many held-out windows at
// once, small enough that the model's workspace (L + 1 fp32 residual streams of this many rows)
// stays a small part of the device.
inline constexpr index_t device_batch_tokens = 16384;

inline std::vector<int> ops_from_arch_json(const Workspace& ws, const nlohmann::json& j) {
  require(j.value("teacher_fingerprint", "") == ws.fingerprint, ws.arch_path().string(),
          ": searched for another teacher (", j.value("teacher_fingerprint", "?"), "), this model is ", ws.fingerprint);
  require(j.value("ops", "") == ws.ops.to_string(), ws.arch_path().string(), ": searched over ops ",
          j.value("ops", "?"), ", this run's --ops are ", ws.ops.to_string());
  require(j.value("budget", "") == ws.budget.to_string(), ws.arch_path().string(), ": searched under budget ",
          j.value("budget", "?"), ", this run's --budget is ", ws.budget.to_string());
  std::vector<int> ops;
  for (const auto& layer : j.at("layers")) {
    const std::string name = layer.at("op");
    int op = -1;
    for (int i = 0; i < n_ops; ++i)
      if (ws.ops.candidate[std::size_t(i)] && ws.ops.name(i) == name) op = i;
    require(op >= 0, ws.arch_path().string(), ": layer ", ops.size(), " has op '", name, "', not one of ", ws.ops.to_string());
    ops.push_back(op);
  }
  require(int(ops.size()) == ws.decoder.n_layers(), ws.arch_path().string(), ": ", ops.size(), " layers, the model has ",
          ws.decoder.n_layers());
  return ops;
}

inline std::vector<index_t> retrieval_contexts(const Workspace& ws) {
  std::vector<index_t> out;
  for (index_t c : ws.args.retrieval_contexts.empty() ? std::vector<index_t>{256, 512, 1024} : ws.args.retrieval_contexts)
    if (c <= ws.decoder.config().context_length) out.push_back(c);
  return out;
}

inline int run_eval(Workspace& ws) {
  load_prepared(ws);
  const std::vector<int> searched = ops_from_arch_json(ws, read_json(ws.arch_path(), "dash search"));
  const search::CostTable costs = ws.costs();
  // KV-cache and state bytes whatever the budget counts, so that results under every budget
  // share one cost axis.
  const search::CostTable kv_costs =
      cost_table(ws.decoder, ws.ops, search::Budget{search::CostKind::kv_bytes, 1}, ws.context);
  const SearchModel model = ws.model();
  const index_t T = ws.seq_len;
  const auto held_windows = consecutive_windows(ws.corpus.held_out, T, 1, ws.args.eval_tokens);
  auto calib_windows = consecutive_windows(ws.corpus.calibration, T, 1, std::min(ws.args.eval_tokens, 4 * T));
  for (std::size_t i = 0; i < calib_windows.size(); ++i)  // KL-guided reads what the search read
    repeat_halves(calib_windows[i], 1, T, ws.args.copy_fraction, ws.args.seed + 3, std::int64_t(i));
  require(!held_windows.empty(), "eval: the held-out text has fewer than seq_len + 1 = ", T + 1, " tokens");

  // Prompts per task and context; a context too short for a task's question is left out.
  const auto contexts = retrieval_contexts(ws);
  std::map<std::string, std::map<index_t, std::vector<RetrievalPrompt>>> prompts;
  for (index_t c : contexts)
    for (const std::string task : {"passkey", "needle"}) try {
        prompts[task][c] = task == "passkey"
                               ? passkey_prompts(ws.tokenizer, ws.add_bos, c, ws.args.retrieval_prompts, ws.args.seed + 7)
                               : needle_prompts(ws.tokenizer, ws.add_bos, c, ws.args.retrieval_prompts, 4, ws.args.seed + 8);
      } catch (const Error& e) {
        std::fprintf(stderr, "eval: no %s prompts at context %lld: %s\n", task.c_str(), (long long)c, e.what());
      }

  // Scores on held-out and calibration text: HeldOut on the CPU, or the GPU's copy of the model.
  std::optional<HeldOut> held_cpu, calibration_cpu;
  std::unique_ptr<DeviceScorer> device;
  std::size_t held_text = 0, calibration_text = 0;
  if (ws.args.device == "cuda") {
    // Sequences as long as the longest prompt; batches as large as all windows of a text or all
    // prompts of a task and context (padded to the longest of them), up to device_batch_tokens.
    index_t longest = T;
    index_t wanted = index_t(std::max(held_windows.size(), calib_windows.size())) * T;
    for (const auto& [task, by_context] : prompts)
      for (const auto& [c, some] : by_context) {
        index_t longest_here = 0;
        for (const auto& p : some) longest_here = std::max(longest_here, index_t(p.ids.size()) - 1);
        longest = std::max(longest, longest_here);
        wanted = std::max(wanted, index_t(some.size()) * longest_here);
      }
    const index_t max_tokens = std::max(longest, std::min(device_batch_tokens, wanted));
    device = make_cuda_scorer(ws.decoder, max_tokens, longest);
    std::fprintf(stderr, "eval: on %s (batches of up to %lld tokens, sequences up to %lld)\n",
                 device->device_name().c_str(), (long long)max_tokens, (long long)longest);
    held_text = device->add_text(held_windows, T);
    calibration_text = device->add_text(calib_windows, T);
  } else {
    held_cpu.emplace(model, held_windows, 1, T);
    calibration_cpu.emplace(model, calib_windows, 1, T);
  }
  const auto held_score = [&](const std::vector<int>& ops) {
    return device ? device->score(held_text, ops) : held_cpu->score(ops);
  };
  const auto calibration_score = [&](const std::vector<int>& ops) {
    return device ? device->score(calibration_text, ops) : calibration_cpu->score(ops);
  };
  Stopwatch clock;

  std::vector<Scored> methods{{"dash", searched, {}, 0, {}}};
  std::vector<search::Selection> baselines;
  int filler = -1;
  if (ws.ops.candidate[softmax_op]) {
    double best = INFINITY;  // the filler: the cheaper candidate that does least harm in every layer
    for (int i = 0; i < n_ops; ++i) {
      const std::vector<int> uniform(std::size_t(ws.decoder.n_layers()), i);
      if (i == softmax_op || !ws.ops.candidate[std::size_t(i)] || !costs.fits(costs.total(uniform))) continue;
      const double kl = calibration_score(uniform).kl;
      if (kl < best) best = kl, filler = i;
    }
  }
  if (filler >= 0) {
    const search::SoftmaxPlacement place(costs, softmax_op, filler);
    const int K = place.softmax_layers();
    std::fprintf(stderr, "eval: baselines keep %d softmax layers, %s elsewhere\n", K, ws.ops.name(filler).c_str());
    methods.push_back({"even", place.even(), {}, 0, {}});
    methods.push_back({"first-K", place.first(), {}, 0, {}});
    methods.push_back({"last-K", place.last(), {}, 0, {}});
    for (int s = 1; s <= ws.args.random_baselines; ++s)
      methods.push_back({"random", place.random(ws.args.seed * 1000 + std::uint64_t(s)), {}, 0, {}});
    methods.push_back({"kl-guided", place.kl_guided([&](const std::vector<int>& ops) { return calibration_score(ops).kl; }), {}, 0, {}});
  } else {
    std::fprintf(stderr, "eval: no selector baselines (they need softmax and a cheaper candidate that fits the budget)\n");
  }

  const auto score_retrieval = [&](Scored& m) {
    for (const auto& [task, by_context] : prompts)
      for (const auto& [c, some] : by_context)
        m.retrieval[task][c] =
            device ? retrieval_accuracy(*device, m.ops, some) : retrieval_accuracy(ws.decoder, m.ops, some);
  };
  Scored teacher{"all-softmax", std::vector<int>(std::size_t(ws.decoder.n_layers()), softmax_op), {}, 1, {}};
  Progress progress("eval", double(methods.size() + 1));
  teacher.quality = held_score(teacher.ops);
  score_retrieval(teacher);
  for (std::size_t k = 0; k < methods.size(); ++k) {
    if (interrupt_requested()) return interrupted_status;
    Scored& m = methods[k];
    m.quality = held_score(m.ops);
    m.cost_fraction = costs.total(m.ops) / costs.reference;
    score_retrieval(m);
    progress.update(double(k + 1), m.name + " KL " + std::to_string(m.quality.kl));
  }
  progress.finish();

  nlohmann::ordered_json enumerated = nlohmann::ordered_json::array();
  std::vector<ReportMethod> points;
  int rank = 0;
  std::size_t n_enumerated = 0;
  if (ws.args.enumerate) {
    const auto all = search::all_under_budget(costs, 50000);
    Progress p("enumerate", double(all.size()));
    n_enumerated = all.size();
    rank = 1;
    for (std::size_t k = 0; k < all.size(); ++k) {
      if (interrupt_requested()) return interrupted_status;
      const double kl = held_score(all[k]).kl, cost = costs.total(all[k]) / costs.reference;
      enumerated.push_back({{"ops", layer_list(ws.ops, all[k])}, {"cost_fraction", cost}, {"kl", kl}});
      points.push_back({"enumerated", cost, std::max(kl, 1e-12)});  // the log axis needs KL > 0
      rank += all[k] != searched && kl < methods[0].quality.kl;
      p.update(double(k + 1));
    }
    p.finish();
  }

  // eval.json, the table, the report.
  const auto method_json = [&](const Scored& m) {
    nlohmann::ordered_json r = nlohmann::ordered_json::object();
    for (const auto& [task, by_context] : m.retrieval)
      for (const auto& [c, acc] : by_context) r[task][std::to_string(c)] = acc;
    return nlohmann::ordered_json{{"method", m.name},
                                  {"ops", layer_list(ws.ops, m.ops)},
                                  {"softmax_layers", std::count(m.ops.begin(), m.ops.end(), softmax_op)},
                                  {"cost_fraction", m.cost_fraction},
                                  {"kv_fraction", kv_costs.total(m.ops) / kv_costs.reference},
                                  {"kl", m.quality.kl},
                                  {"nll", m.quality.nll},
                                  {"ppl", std::exp(m.quality.nll)},
                                  {"retrieval", r}};
  };
  nlohmann::ordered_json out = {{"model", ws.model_name},
                                {"ops", ws.ops.to_string()},
                                {"budget", ws.budget.to_string()},
                                {"budget_fraction", costs.limit / costs.reference},
                                {"device", ws.args.device},
                                {"held_out_tokens", held_windows.size() * std::size_t(T)},
                                {"held_out", ws.corpus.source},
                                {"retrieval_contexts", contexts},
                                {"retrieval_prompts_per_context", ws.args.retrieval_prompts},
                                {"teacher", method_json(teacher)},
                                {"methods", nlohmann::ordered_json::array()}};
  for (const auto& m : methods) out["methods"].push_back(method_json(m));
  std::vector<double> random_kl;
  for (const auto& m : methods)
    if (m.name == "random") random_kl.push_back(m.quality.kl);
  if (!random_kl.empty()) {
    std::sort(random_kl.begin(), random_kl.end());
    out["random_median_kl"] = random_kl[random_kl.size() / 2];
  }
  if (ws.args.enumerate) {
    out["enumerated"] = {{"count", n_enumerated},
                         {"dash_rank", rank},
                         {"dash_percentile", 100.0 * rank / double(n_enumerated)},
                         {"architectures", enumerated}};
  }
  out["seconds"] = clock.seconds();
  write_json(ws.eval_path(), out);

  std::printf("\n%-12s %8s %9s %9s %8s", "method", "softmax", "cost", "KL", "ppl");
  for (const auto& [task, by_context] : prompts)
    for (const auto& [c, some] : by_context) std::printf("  %s@%-5lld", task.substr(0, 2).c_str(), (long long)c);
  std::printf("\n");
  const auto row = [&](const Scored& m) {
    std::printf("%-12s %8lld %9.4f %9.5f %8.3f", m.name.c_str(),
                (long long)std::count(m.ops.begin(), m.ops.end(), softmax_op), m.cost_fraction, m.quality.kl,
                std::exp(m.quality.nll));
    for (const auto& [task, by_context] : m.retrieval)
      for (const auto& [c, acc] : by_context) std::printf("  %8.2f", acc);
    std::printf("\n");
  };
  row(teacher);
  for (const auto& m : methods) row(m);
  if (ws.args.enumerate)
    std::printf("enumerated %zu architectures under the budget: dash ranks %d (best %.1f%%)\n", n_enumerated, rank,
                100.0 * rank / double(n_enumerated));

  Report report;
  report.title = ws.model_name + " · ops " + ws.ops.to_string() + " · budget " + ws.budget.to_string();
  for (int i = 0; i < n_ops; ++i)
    if (ws.ops.candidate[std::size_t(i)]) report.op_names.push_back(ws.ops.name(i));
  const std::vector<LogRow> log = read_log(ws, std::numeric_limits<std::int64_t>::max());
  for (const auto& r : log) {
    report.steps.push_back(int(r.step));
    std::vector<std::vector<double>> layers;
    for (int l = 0; l < ws.decoder.n_layers(); ++l) {
      std::vector<double> p;
      for (int i = 0; i < n_ops; ++i)
        if (ws.ops.candidate[std::size_t(i)]) p.push_back(r.pi[std::size_t(l * n_ops + i)]);
      layers.push_back(p);
    }
    report.pi.push_back(layers);
  }
  for (int op : searched) {
    int k = 0;
    for (int i = 0; i < op; ++i) k += ws.ops.candidate[std::size_t(i)];
    report.chosen.push_back(k);
  }
  report.budget_fraction = costs.limit / costs.reference;
  report.cost_label = ws.budget.kind == search::CostKind::kv_bytes ? "KV cache (fraction of all-softmax)"
                      : ws.budget.kind == search::CostKind::flops  ? "attention FLOPs (fraction of all-softmax)"
                                                                    : "softmax layers (fraction of all)";
  for (const auto& m : methods) points.push_back({m.name, m.cost_fraction, std::max(m.quality.kl, 1e-12)});
  report.methods = points;
  write_report_svg(ws.report_path(), report);
  std::printf("eval.json: %s\nreport.svg: %s\n", ws.eval_path().c_str(), ws.report_path().c_str());
  return 0;
}

}  // namespace dash::tool

// dash: differentiable architecture search for hybrid attention, from the command line.
//
//   dash info MODEL                         what the checkpoint is
//   dash generate MODEL --prompt TEXT       greedy continuation
//   dash perplexity MODEL --data FILE       mean NLL and perplexity, one JSON line
//   dash prepare --model MODEL --out DIR    stage 1: teacher-aligned candidates
//   dash search  --model MODEL --out DIR    stage 2: the architecture under a budget
//   dash eval    --model MODEL --out DIR    stage 3: against the selector baselines
//   dash run     --model MODEL --out DIR    all three
//
// MODEL: a GGUF file, a Hugging Face folder (config.json + safetensors), or a llama2.c .bin
// (give its tokenizer.bin with --tokenizer).
#include <CLI/CLI.hpp>

#include <cstdio>
#include <exception>

#include "commands.hpp"
#include "eval_command.hpp"
#include "prepare_command.hpp"
#include "search_command.hpp"

namespace {

void add_search_options(CLI::App* cmd, dash::tool::SearchArgs& a) {
  cmd->add_option("--model", a.model.model, "GGUF file, Hugging Face folder, or llama2.c .bin")->required();
  cmd->add_option("--tokenizer", a.model.tokenizer, "tokenizer.bin (llama2.c) or tokenizer.json");
  cmd->add_option("--data", a.data,
                  "calibration text: a file or folder of .txt (the last tenth of its documents is held out); "
                  "without it, text sampled from the teacher");
  cmd->add_option("--eval-data", a.eval_data, "held-out text for eval (instead of the tenth of --data)");
  cmd->add_option("--ops", a.ops, "candidate operators: softmax, swa[:W], gla, gdn")->capture_default_str();
  cmd->add_option("--budget", a.budget, "kv=F, flops=F (fractions of all-softmax) or softmax-layers=N")->capture_default_str();
  cmd->add_option("--context", a.context, "context length at which costs are counted (default: the model's)");
  cmd->add_option("--tokens", a.tokens, "tokens the search reads")->capture_default_str();
  cmd->add_option("--prepare-tokens", a.prepare_tokens, "tokens candidate preparation reads (default: --tokens)");
  cmd->add_option("--eval-tokens", a.eval_tokens, "held-out tokens each architecture is scored on")->capture_default_str();
  cmd->add_option("--seq-len", a.seq_len, "tokens per sequence (default: min(256, context))");
  cmd->add_option("--batch", a.batch, "sequences per step")->capture_default_str();
  cmd->add_option("--device", a.device, "cpu or cuda")->capture_default_str();
  cmd->add_option("--seed", a.seed, "seed of every random choice")->capture_default_str();
  cmd->add_option("--out", a.out, "output folder (created if missing)")->required();
  cmd->add_flag("--resume", a.resume, "continue an interrupted search from OUT/search.ckpt");
  cmd->add_flag("--enumerate", a.enumerate, "eval: also score every architecture under the budget");
  cmd->add_option("--relaxation", a.relaxation, "softmax, gumbel or straight-through")->capture_default_str();
  cmd->add_option("--lr", a.lr, "Adam's step on the architecture logits")->capture_default_str();
  cmd->add_option("--prepare-lr", a.prepare_lr, "Adam's peak step in candidate preparation")->capture_default_str();
  cmd->add_option("--copy-fraction", a.copy_fraction,
                  "share of the search's and KL-guided's calibration sequences whose second half repeats the first")
      ->capture_default_str();
  cmd->add_option("--retrieval-contexts", a.retrieval_contexts, "context lengths of the retrieval prompts (default 256 512 1024)")
      ->delimiter(',');
  cmd->add_option("--retrieval-prompts", a.retrieval_prompts, "prompts per task and context")->capture_default_str();
  cmd->add_option("--random-baselines", a.random_baselines, "seeds of the random baseline")->capture_default_str();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"dash: differentiable architecture search for hybrid attention"};
  app.require_subcommand(1);
  dash::tool::ModelArgs model;
  const auto model_options = [&](CLI::App* cmd) {
    cmd->add_option("model", model.model, "GGUF file, Hugging Face folder, or llama2.c .bin")->required();
    cmd->add_option("--tokenizer", model.tokenizer, "tokenizer.bin (llama2.c) or tokenizer.json");
  };

  CLI::App* info = app.add_subcommand("info", "architecture, sizes, storage types and tokenizer of a checkpoint");
  model_options(info);

  CLI::App* generate = app.add_subcommand("generate", "greedy generation from a prompt");
  model_options(generate);
  std::string prompt;
  int tokens = 64;
  generate->add_option("--prompt", prompt, "text to continue (empty: start from BOS)");
  generate->add_option("--tokens", tokens, "tokens to generate")->capture_default_str();

  CLI::App* perplexity = app.add_subcommand("perplexity", "mean NLL and perplexity on text, as one JSON line");
  model_options(perplexity);
  std::filesystem::path data;
  int seq_len = 0;
  long max_tokens = -1;
  perplexity->add_option("--data", data, "text file or folder of .txt files; documents split at <|endoftext|>")
      ->required();
  perplexity->add_option("--seq-len", seq_len, "window length (default: min(context, 1024))");
  perplexity->add_option("--max-tokens", max_tokens, "stop after this many predicted tokens");

  dash::tool::SearchArgs search_args;
  CLI::App* prepare = app.add_subcommand("prepare", "stage 1: candidates aligned to the teacher, OUT/candidates.safetensors");
  CLI::App* search = app.add_subcommand("search", "stage 2: the architecture under the budget, OUT/arch.json");
  CLI::App* eval = app.add_subcommand("eval", "stage 3: OUT/arch.json against the baselines, OUT/eval.json and report.svg");
  CLI::App* run = app.add_subcommand("run", "prepare, search and eval");
  for (CLI::App* cmd : {prepare, search, eval, run}) add_search_options(cmd, search_args);

  CLI11_PARSE(app, argc, argv);
  try {
    if (info->parsed()) return dash::tool::run_info(model);
    if (generate->parsed()) return dash::tool::run_generate(model, prompt, tokens);
    if (perplexity->parsed()) return dash::tool::run_perplexity(model, data, seq_len, max_tokens);
    dash::tool::catch_interrupts();
    const auto ws = dash::tool::open_workspace(search_args);
    if (prepare->parsed()) return dash::tool::run_prepare(*ws);
    if (search->parsed()) return dash::tool::run_search(*ws);
    if (eval->parsed()) return dash::tool::run_eval(*ws);
    if (run->parsed()) {
      const bool prepared = search_args.resume && std::filesystem::exists(ws->candidates_path());
      if (!prepared)
        if (const int status = dash::tool::run_prepare(*ws)) return status;
      if (const int status = dash::tool::run_search(*ws)) return status;
      return dash::tool::run_eval(*ws);
    }
  } catch (const dash::Error& e) {
    std::fprintf(stderr, "dash: %s\n", e.what());
    return 2;
  }
  return 0;
}

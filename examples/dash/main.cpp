// dash: differentiable architecture search for hybrid attention, from the command line.
//
//   dash info MODEL                         what the checkpoint is
//   dash generate MODEL --prompt TEXT       greedy continuation
//   dash perplexity MODEL --data FILE       mean NLL and perplexity, one JSON line
//
// MODEL: a GGUF file, a Hugging Face folder (config.json + safetensors), or a llama2.c .bin
// (give its tokenizer.bin with --tokenizer).
#include <CLI/CLI.hpp>

#include <cstdio>
#include <exception>

#include "commands.hpp"

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

  CLI11_PARSE(app, argc, argv);
  try {
    if (info->parsed()) return dash::tool::run_info(model);
    if (generate->parsed()) return dash::tool::run_generate(model, prompt, tokens);
    if (perplexity->parsed()) return dash::tool::run_perplexity(model, data, seq_len, max_tokens);
  } catch (const dash::Error& e) {
    std::fprintf(stderr, "dash: %s\n", e.what());
    return 2;
  }
  return 0;
}

// The hyperparameters of a Llama-family decoder: what every loader produces and every model
// and search reads. One struct covers Llama, Mistral, Qwen2, SmolLM and llama2.c checkpoints;
// they differ only in the values (RoPE convention, q/k/v bias, tied head, norm epsilon).
#pragma once

#include <string>

#include "dash/core/error.hpp"
#include "dash/core/shape.hpp"
#include "dash/ops/attention.hpp"

namespace dash::model {

struct Config {
  std::string architecture = "llama";  // llama, mistral, qwen2, smollm, llama2c: informative
  int n_layers = 0;
  int d_model = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int d_head = 0;          // usually d_model / n_heads; Qwen2/Mistral variants may differ
  int d_ff = 0;            // SwiGLU hidden width
  int vocab_size = 0;
  int context_length = 0;  // the length the model was trained for
  double rms_eps = 1e-5;
  RopeConfig rope{};       // style: how the checkpoint's Wq/Wk expect rotation; theta: base
  bool qkv_bias = false;   // Qwen2
  bool tied_embeddings = true;
  int sliding_window = 0;  // the checkpoint's own attention window (Mistral), 0 when none

  AttentionShape attention() const {
    return AttentionShape{d_model, n_heads, n_kv_heads, d_head, qkv_bias, rope};
  }

  void validate() const {
    const auto positive = [](int v, const char* field) {
      require(v > 0, "model config: ", field, " = ", v, ", expected > 0");
    };
    positive(n_layers, "n_layers");
    positive(d_model, "d_model");
    positive(n_heads, "n_heads");
    positive(n_kv_heads, "n_kv_heads");
    positive(d_head, "d_head");
    positive(d_ff, "d_ff");
    positive(vocab_size, "vocab_size");
    positive(context_length, "context_length");
    require(n_heads % n_kv_heads == 0, "model config: n_heads = ", n_heads, " is not a multiple of n_kv_heads = ",
            n_kv_heads);
    require(rms_eps > 0 && rms_eps < 1, "model config: rms_eps = ", rms_eps, ", expected in (0, 1)");
    require(sliding_window >= 0, "model config: sliding_window = ", sliding_window, ", expected >= 0");
    attention().validate();
  }
};

}  // namespace dash::model

// config.json of a Hugging Face Llama-family checkpoint (model_type llama, mistral or qwen2)
// → model::Config. Defaults are those of transformers' LlamaConfig, MistralConfig and
// Qwen2Config where they are conventions (θ = 10000, untied head, no bias, head_dim =
// hidden/heads); the sizes, context length and epsilon are required, since transformers'
// defaults for them describe one particular reference model and a config without them is more
// likely broken than meant. Whatever dash's decoder cannot reproduce exactly (scaled RoPE, an
// o_proj or MLP bias, an activation other than SiLU, sliding windows on some layers only) is
// refused by name rather than loaded subtly wrong.
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "dash/core/error.hpp"
#include "dash/io/detail/bytes.hpp"
#include "dash/model/config.hpp"

namespace dash::io {
namespace detail {

// A JSON value shortened for an error message (a fuzzed file may hold megabytes in one field).
inline std::string json_excerpt(const nlohmann::json& value) {
  std::string text = value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (text.size() > 64) text = text.substr(0, 61) + "...";
  return text;
}

// Parses `text` as JSON, refusing what nlohmann would accept silently: a key repeated in one
// object (the last would win) and nesting deeper than any header or config needs (so that
// hostile input cannot make the parse, or the message about it, arbitrarily deep).
inline nlohmann::json parse_json(std::string_view text, std::string_view file, std::string_view field) {
  constexpr int max_depth = 64;
  std::vector<std::set<std::string>> keys_of_open_objects;
  const auto check = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using Event = nlohmann::json::parse_event_t;
    if (event == Event::object_start || event == Event::array_start)
      require(depth < max_depth, file, ": ", field, ": nested deeper than ", max_depth, " levels, expected at most ",
              max_depth);
    if (event == Event::object_start) keys_of_open_objects.emplace_back();
    if (event == Event::object_end) keys_of_open_objects.pop_back();
    if (event == Event::key)
      require(keys_of_open_objects.back().insert(parsed.get<std::string>()).second, file, ": ", field, ": key ",
              json_excerpt(parsed), " appears twice in one object, expected unique keys");
    return true;
  };
  try {
    return nlohmann::json::parse(text.begin(), text.end(), check);
  } catch (const nlohmann::json::exception& e) {
    fail(file, ": ", field, ": invalid JSON (", e.what(), ")");
  }
}

// The member `key` of a JSON object, or nullptr when it is absent.
inline const nlohmann::json* member(const nlohmann::json& object, std::string_view key) {
  const auto it = object.find(key);
  return it == object.end() ? nullptr : &*it;
}

// Typed reads of config.json members; each error names the file and the key.
class ConfigReader {
 public:
  ConfigReader(const nlohmann::json& object, std::string file) : object_(object), file_(std::move(file)) {}

  const std::string& file() const { return file_; }
  const nlohmann::json* find(std::string_view key) const { return member(object_, key); }
  // Present and not null: transformers reads an explicit null as "use the default".
  bool given(std::string_view key) const {
    const nlohmann::json* v = find(key);
    return v && !v->is_null();
  }

  [[noreturn]] void wrong(std::string_view key, const nlohmann::json& value, std::string_view expected) const {
    fail(file_, ": ", key, ": ", json_excerpt(value), ", expected ", expected);
  }

  int integer(std::string_view key, int lo, int hi) const {
    const nlohmann::json* v = find(key);
    require(v != nullptr, file_, ": ", key, ": missing, expected an integer in [", lo, ", ", hi, "]");
    return integer_value(key, *v, lo, hi);
  }
  int integer(std::string_view key, int lo, int hi, int fallback) const {
    return given(key) ? integer(key, lo, hi) : fallback;
  }
  int integer_value(std::string_view key, const nlohmann::json& v, int lo, int hi) const {
    if (!v.is_number_integer()) wrong(key, v, "an integer");
    // nlohmann holds integers above INT64_MAX as unsigned; they are out of range anyway.
    const bool fits = !v.is_number_unsigned() || v.get<std::uint64_t>() <= std::uint64_t(hi);
    const std::int64_t x = fits ? v.get<std::int64_t>() : std::int64_t(hi) + 1;
    if (x < lo || x > hi) fail(file_, ": ", key, ": ", json_excerpt(v), ", expected an integer in [", lo, ", ", hi, "]");
    return int(x);
  }

  double number(std::string_view key) const {
    const nlohmann::json* v = find(key);
    require(v != nullptr, file_, ": ", key, ": missing, expected a number");
    return number_value(key, *v);
  }
  double number(std::string_view key, double fallback) const { return given(key) ? number(key) : fallback; }
  double number_value(std::string_view key, const nlohmann::json& v) const {
    if (!v.is_number()) wrong(key, v, "a number");
    return v.get<double>();
  }

  bool boolean(std::string_view key, bool fallback) const {
    if (!given(key)) return fallback;
    const nlohmann::json& v = *find(key);
    if (!v.is_boolean()) wrong(key, v, "true or false");
    return v.get<bool>();
  }

  std::string string(std::string_view key) const {
    const nlohmann::json* v = find(key);
    require(v != nullptr, file_, ": ", key, ": missing, expected a string");
    if (!v->is_string()) wrong(key, *v, "a string");
    return v->get<std::string>();
  }
  std::string string(std::string_view key, std::string fallback) const {
    return given(key) ? string(key) : std::move(fallback);
  }

 private:
  const nlohmann::json& object_;
  std::string file_;
};

// Bounds far above any Llama-family model, so that sizes multiplied together fit in an int.
inline constexpr int max_width = 1 << 20;     // hidden_size, intermediate_size
inline constexpr int max_heads = 1 << 12;     // attention heads, and elements per head
inline constexpr int max_layers = 1 << 12;
inline constexpr int max_vocab = 1 << 24;

// RoPE: transformers ≥ 5 writes {"rope_parameters": {"rope_type", "rope_theta"}}, earlier
// versions a top-level rope_theta and an optional rope_scaling {"rope_type" or "type", ...};
// a non-null rope_scaling takes precedence, as in transformers. Only unscaled RoPE is
// implemented.
inline double hf_rope_theta(const ConfigReader& config) {
  const nlohmann::json* scaling = config.find("rope_scaling");
  const bool scaled = scaling && !scaling->is_null() && !(scaling->is_object() && scaling->empty());
  const char* key = scaled ? "rope_scaling" : "rope_parameters";
  const nlohmann::json* rope = config.find(key);
  double theta = config.number("rope_theta", 10000.0);
  if (rope && !rope->is_null()) {
    if (!rope->is_object()) config.wrong(key, *rope, "an object");
    const ConfigReader fields(*rope, config.file());
    const std::string type = fields.given("rope_type") ? fields.string("rope_type") : fields.string("type", "default");
    require(type == "default", config.file(), ": ", key, ": rope type \"", type,
            "\" (scaled RoPE) is not implemented, expected \"default\"");
    theta = fields.number("rope_theta", theta);
  }
  const double partial = config.number("partial_rotary_factor", 1.0);
  require(partial == 1.0, config.file(), ": partial_rotary_factor: ", partial,
          " (RoPE on part of each head) is not implemented, expected 1");
  require(theta > 0 && theta < 1e12, config.file(), ": rope_theta: ", theta, ", expected a positive base");
  return theta;
}

// The attention window of every layer, 0 when none. Mistral applies sliding_window (default
// 4096, null for none) to every layer; Qwen2 only with use_sliding_window, and then to the
// layers from max_window_layers on (or as layer_types says), which dash can represent only
// when that is all of them or none.
inline int hf_sliding_window(const ConfigReader& config, const std::string& model_type, int n_layers) {
  const auto window = [&](int fallback) {
    return config.integer("sliding_window", 1, std::numeric_limits<int>::max(), fallback);
  };
  if (model_type == "mistral") return config.find("sliding_window") ? window(0) : 4096;
  if (model_type != "qwen2" || !config.boolean("use_sliding_window", false)) return 0;
  const int size = config.find("sliding_window") ? window(0) : 4096;
  if (size == 0) return 0;
  int sliding_layers = 0;
  if (const nlohmann::json* types = config.find("layer_types"); types && !types->is_null()) {
    if (!types->is_array() || int(types->size()) != n_layers)
      config.wrong("layer_types", *types, "an array with one entry per layer");
    for (const nlohmann::json& t : *types) {
      if (t == "sliding_attention")
        ++sliding_layers;
      else if (t != "full_attention")
        config.wrong("layer_types", t, "\"full_attention\" or \"sliding_attention\"");
    }
  } else {
    const int first = config.integer("max_window_layers", 0, std::numeric_limits<int>::max(), 28);
    sliding_layers = std::max(0, n_layers - first);
  }
  if (sliding_layers == 0) return 0;
  require(sliding_layers == n_layers, config.file(), ": use_sliding_window: ", sliding_layers, " of ", n_layers,
          " layers slide, expected all or none (per-layer windows are not implemented)");
  return size;
}

}  // namespace detail

inline model::Config read_hf_config(std::string_view json_text, const std::string& name) {
  const nlohmann::json root = detail::parse_json(json_text, name, "text");
  if (!root.is_object()) fail(name, ": text: ", detail::json_excerpt(root), ", expected a JSON object");
  const detail::ConfigReader config(root, name);

  model::Config c;
  const std::string type = config.string("model_type");
  require(type == "llama" || type == "mistral" || type == "qwen2", name, ": model_type: \"", type,
          "\" is not supported, expected llama, mistral or qwen2");
  c.architecture = type;

  const std::string activation = config.string("hidden_act", "silu");
  require(activation == "silu", name, ": hidden_act: \"", activation, "\" is not supported, expected silu (SwiGLU)");

  c.d_model = config.integer("hidden_size", 1, detail::max_width);
  c.n_layers = config.integer("num_hidden_layers", 1, detail::max_layers);
  c.n_heads = config.integer("num_attention_heads", 1, detail::max_heads);
  // transformers' llama default is the query head count; Mistral's and Qwen2's are the head
  // counts of their reference models (8 and 32), which no other model should inherit.
  if (type == "llama" || config.find("num_key_value_heads"))
    c.n_kv_heads = config.integer("num_key_value_heads", 1, detail::max_heads, c.n_heads);
  else
    c.n_kv_heads = config.integer("num_key_value_heads", 1, detail::max_heads);
  require(c.n_heads % c.n_kv_heads == 0, name, ": num_key_value_heads: ", c.n_kv_heads,
          " does not divide num_attention_heads = ", c.n_heads, ", expected a divisor");
  c.d_head = config.integer("head_dim", 1, detail::max_heads, c.d_model / c.n_heads);
  require(c.d_head > 0, name, ": head_dim: hidden_size / num_attention_heads = ", c.d_model, " / ", c.n_heads,
          " is 0, expected hidden_size >= num_attention_heads or an explicit head_dim");
  c.d_ff = config.integer("intermediate_size", 1, detail::max_width);
  c.vocab_size = config.integer("vocab_size", 1, detail::max_vocab);
  c.context_length = config.integer("max_position_embeddings", 1, std::numeric_limits<int>::max());
  c.rms_eps = config.number("rms_norm_eps");
  require(c.rms_eps > 0 && c.rms_eps < 1, name, ": rms_norm_eps: ", c.rms_eps, ", expected a value in (0, 1)");

  // Rotate-half: Hugging Face's conversion of Meta's checkpoints permuted the rows of Wq and
  // Wk within each head so that rotating (x[i], x[i + D/2]) reproduces Meta's rotation of
  // adjacent pairs; weights as stored in safetensors expect the half-split convention.
  c.rope = RopeConfig{RopeConfig::Style::half, detail::hf_rope_theta(config)};
  require(c.d_head % 2 == 0, name, ": head_dim: ", c.d_head, ", expected an even size for RoPE");

  c.tied_embeddings = config.boolean("tie_word_embeddings", false);
  if (type == "llama") {
    require(!config.boolean("attention_bias", false), name,
            ": attention_bias: true gives o_proj a bias as well as q/k/v, which dash's attention does not have, "
            "expected false");
    require(!config.boolean("mlp_bias", false), name,
            ": mlp_bias: true (biases on the MLP projections) is not implemented, expected false");
  }
  c.qkv_bias = type == "qwen2";  // Qwen2's q/k/v projections always carry a bias, o_proj none
  c.sliding_window = detail::hf_sliding_window(config, type, c.n_layers);
  try {
    c.validate();
  } catch (const Error& e) {
    fail(name, ": ", e.what());
  }
  return c;
}

inline model::Config read_hf_config(const std::filesystem::path& config_json) {
  const std::vector<std::byte> bytes = detail::read_file(config_json);
  return read_hf_config(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()),
                        config_json.string());
}

}  // namespace dash::io

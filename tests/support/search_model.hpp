// The CPU search decoder in float64 on bf16-rounded weights: the reference the GPU's search
// model is checked against. Weights are rounded as the GPU stores them (bf16), and every
// operator's own parameters too; with a perturbation, every such value is then multiplied by
// (1 + u·2⁻⁸), u uniform in [−1, 1] — one bf16-sized rounding of every weight, the size of
// perturbation the GPU's rounding of activations makes — so that a test can measure how
// sensitive an output is to bf16 rounding and bound the GPU's error by it.
#pragma once

#include <doctest/doctest.h>

#include <cstdlib>
#include <filesystem>
#include <optional>
#include <tuple>
#include <utility>

#include "dash/core/dtype.hpp"
#include "dash/core/rng.hpp"
#include "dash/io/llama2c.hpp"
#include "dash/mixed_attention.hpp"
#include "dash/model/decoder.hpp"
#include "dash/ops/gated_delta_net.hpp"
#include "dash/ops/gated_linear.hpp"
#include "dash/ops/sliding_window.hpp"
#include "dash/ops/softmax.hpp"
#include "support/random_model.hpp"

namespace dash::test {

// DASH_FIXTURES, else tests/fixtures next to this file (the path the compiler was given).
inline std::filesystem::path fixtures() {
  if (const char* env = std::getenv("DASH_FIXTURES")) return env;
  return std::filesystem::path(__FILE__).parent_path().parent_path() / "fixtures";
}

// stories260K from the fixtures; nothing, with a message that the test skips, where it is missing.
inline std::optional<io::Checkpoint> stories260k() {
  const auto path = fixtures() / "stories260K" / "stories260K.bin";
  if (!std::filesystem::exists(path)) {
    MESSAGE("stories260K not found under ", fixtures().string(), " (set DASH_FIXTURES): skipping");
    return std::nullopt;
  }
  return io::read_llama2c(path);
}

using CpuSearchDecoder = MixedDecoder<double, Softmax, SlidingWindow<>, GatedLinear, GatedDeltaNet>;

template <class From>
Tensor<double> bf16_rounded(const Tensor<From>& t) {
  if (t.empty()) return {};
  Tensor<double> out(t.shape());
  for (index_t i = 0; i < t.numel(); ++i) out.data()[i] = double(bf16(float(t.data()[i])));
  return out;
}

// Every tensor of w through f.
template <class From, class F>
model::Weights<double> transformed(const model::Weights<From>& w, F&& f) {
  model::Weights<double> r;
  r.embedding = f(w.embedding);
  r.final_norm = f(w.final_norm);
  r.lm_head = f(w.lm_head);
  for (const model::LayerWeights<From>& l : w.layers) {
    model::LayerWeights<double> o;
    o.attn_norm = f(l.attn_norm);
    o.attention.wq = f(l.attention.wq);
    o.attention.wk = f(l.attention.wk);
    o.attention.wv = f(l.attention.wv);
    o.attention.wo = f(l.attention.wo);
    o.attention.bq = f(l.attention.bq);
    o.attention.bk = f(l.attention.bk);
    o.attention.bv = f(l.attention.bv);
    o.mlp_norm = f(l.mlp_norm);
    o.w_gate = f(l.w_gate);
    o.w_up = f(l.w_up);
    o.w_down = f(l.w_down);
    r.layers.push_back(std::move(o));
  }
  return r;
}

// The weights as the device holds them (bf16), in float64.
template <class From>
model::Weights<double> bf16_rounded(const model::Weights<From>& w) {
  return transformed(w, [](const auto& t) { return bf16_rounded(t); });
}

// t with every element multiplied by (1 + u·2⁻⁸), u uniform in [−1, 1]: one bf16-sized rounding.
inline Tensor<double> perturbed(const Tensor<double>& t, Rng& rng) {
  Tensor<double> out = t;
  for (index_t i = 0; i < out.numel(); ++i) out.data()[i] *= 1.0 + (2.0 * rng.uniform() - 1.0) / 256.0;
  return out;
}

// The CPU decoder on bf16-rounded weights, with every operator's own parameters rounded too;
// with `perturbation`, every one of those values is then perturbed by one bf16-sized rounding.
template <class From>
CpuSearchDecoder make_cpu_decoder(const model::Config& c, const model::Weights<From>& w, Rng& rng,
                                  SlidingWindow<> swa, GatedLinear gla, GatedDeltaNet gdn,
                                  Rng* perturbation = nullptr) {
  model::Weights<double> rounded = bf16_rounded(w);
  if (perturbation) rounded = transformed(rounded, [&](const Tensor<double>& t) { return perturbed(t, *perturbation); });
  CpuSearchDecoder decoder = make_decoder<double>(c, rounded, rng, Softmax{}, swa, gla, gdn);
  for (auto& mixer : decoder.mixers())
    std::apply(
        [&](auto&... p) {
          (p.for_each([&](const char*, Tensor<double>& t) {
            t = bf16_rounded(t);
            if (perturbation) t = perturbed(t, *perturbation);
          }),
           ...);
        },
        mixer.params());
  return decoder;
}

// The decoder three times, all with the same random operator parameters: exactly, and perturbed
// independently twice — once for a teacher's forward, once for a student's, since the GPU rounds
// the two forwards' activations independently (a perturbation they shared would cancel in
// differences of teacher and student such as the KL's gradient q − p).
struct SearchReference {
  CpuSearchDecoder exact, perturbed_teacher, perturbed_student;
};

template <class From>
SearchReference make_search_reference(const model::Config& c, const model::Weights<From>& w, Rng& rng,
                                      SlidingWindow<> swa, GatedLinear gla, GatedDeltaNet gdn) {
  Rng same_teacher = rng, same_student = rng, noise(rng.next_u64());
  CpuSearchDecoder exact = make_cpu_decoder(c, w, rng, swa, gla, gdn);
  CpuSearchDecoder perturbed_teacher = make_cpu_decoder(c, w, same_teacher, swa, gla, gdn, &noise);
  CpuSearchDecoder perturbed_student = make_cpu_decoder(c, w, same_student, swa, gla, gdn, &noise);
  return {std::move(exact), std::move(perturbed_teacher), std::move(perturbed_student)};
}

}  // namespace dash::test

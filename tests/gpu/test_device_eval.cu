// Scoring on the GPU (DeviceSearchModel's teacher_forward, score and next_tokens: what `dash eval`
// runs) against the CPU's search::HeldOut and greedy argmax in float64 on the same bf16-rounded
// weights, for discrete architectures (one operator per layer) on stories260K and on random
// configs (d_head 64, GQA, q/k/v bias, T above the linear-attention kernels' 64-token chunk, a
// vocabulary large enough that the logits come a chunk of rows at a time).
//
// Tolerances. KL and NLL: relative error within max(1e-2, 3 × the value's sensitivity to one
// bf16-sized rounding of every weight), the bound test_search_model.cu explains: the NLL is
// well conditioned (1e-2 holds), but the KL of an architecture close to its teacher is a small
// difference of two forwards and its relative error grows as it shrinks. Next tokens: the CPU's
// argmax, except where the CPU's top two logits are within the bf16 error of that position's
// logits, taken as 3 × the largest change of that position's logits under the same perturbation
// of the weights; those near ties are counted and must be the only mismatches. The KL's
// sensitivity perturbs the teacher's forward and the student's independently (as the GPU rounds
// them), the NLL's and the logits' the student's alone. Identity: the all-softmax architecture is
// the teacher, KL = 0 up to rounding.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "dash/core/cuda.hpp"
#include "dash/io/llama2c.hpp"
#include "dash/model/cuda/argmax.cuh"
#include "dash/model/cuda/search_model.cuh"
#include "dash/model/loss.hpp"
#include "dash/search/decoder_model.hpp"
#include "dash/search/evaluate.hpp"
#include "support/errors.hpp"
#include "support/gpu.hpp"
#include "support/random.hpp"
#include "support/random_model.hpp"
#include "support/search_model.hpp"

using namespace dash;
namespace cm = dash::cuda::model;
using dash::cuda::bfloat16;
using dash::cuda::DeviceTensor;

namespace {

using DeviceModel = cm::DeviceSearchModel<Softmax, SlidingWindow<>, GatedLinear, GatedDeltaNet>;
using CpuModel = search::DecoderSearchModel<double, Softmax, SlidingWindow<>, GatedLinear, GatedDeltaNet>;
using CpuHeldOut = search::HeldOut<double, Softmax, SlidingWindow<>, GatedLinear, GatedDeltaNet>;
using Mixer = BasicMixedAttention<double, Softmax, SlidingWindow<>, GatedLinear, GatedDeltaNet>;
constexpr int n_ops = 4;

// B windows of T + 1 ids, back to back: inputs and targets as HeldOut reads them.
struct Windows {
  index_t batch, length;
  std::vector<int> ids;  // [B × (T + 1)]

  std::vector<int> inputs() const { return part(0); }
  std::vector<int> targets() const { return part(1); }

 private:
  std::vector<int> part(index_t offset) const {
    std::vector<int> out;
    for (index_t b = 0; b < batch; ++b) {
      const auto row = ids.begin() + b * (length + 1) + offset;
      out.insert(out.end(), row, row + length);
    }
    return out;
  }
};

struct Scores {
  double kl = 0, nll = 0;
  std::vector<int> next;        // argmax per position, [B·T]
  std::vector<double> gap;      // CPU: top logit − second, per position
  std::vector<double> logits;   // CPU: [B·T, V]
};

// HeldOut's KL and NLL (with `held_out`; else no KL, and the NLL from the logits below, for
// shapes where HeldOut's own logits would cost too much), and the argmax of every position.
Scores cpu_scores(const test::CpuSearchDecoder& decoder, const Windows& w, const std::vector<int>& ops,
                  bool held_out = true) {
  Scores s;
  if (held_out) {
    const CpuModel model(decoder);
    const CpuHeldOut held(model, {w.ids}, w.batch, w.length);
    const search::Quality q = held.score(ops);
    s.kl = q.kl, s.nll = q.nll;
  }
  const std::vector<int> inputs = w.inputs();
  test::CpuSearchDecoder::Activations act;
  decoder.forward({inputs, w.batch, w.length}, act, CpuModel::Architecture::discrete(ops));
  const Tensor<double>& head = decoder.weights().head();
  const index_t rows = w.batch * w.length, V = head.dim(0);
  Tensor<double> z(Shape{rows, V});
  model::logits<double>(head.view(), act.hidden.view(), z.view());
  s.logits.assign(z.data(), z.data() + z.numel());
  const std::vector<int> targets = w.targets();
  double nll = 0;
  for (index_t r = 0; r < rows; ++r) {
    const double* row = z.data() + r * V;
    const index_t top = index_t(std::max_element(row, row + V) - row);
    double second = -INFINITY, sum = 0;
    for (index_t v = 0; v < V; ++v) {
      if (v != top) second = std::max(second, row[v]);
      sum += std::exp(row[v] - row[top]);
    }
    s.next.push_back(int(top));
    s.gap.push_back(row[top] - second);
    nll += row[top] + std::log(sum) - row[targets[std::size_t(r)]];
  }
  if (!held_out) s.kl = NAN, s.nll = nll / double(rows);
  return s;
}

// KL(teacher ‖ student) with the teacher's forward on one decoder and the student's on another:
// the sensitivity of the KL to independent bf16-sized perturbations of the two forwards, as the
// GPU rounds them independently.
double cpu_kl(const test::CpuSearchDecoder& teacher_decoder, const test::CpuSearchDecoder& student_decoder,
              const Windows& w, const std::vector<int>& ops) {
  const std::vector<int> inputs = w.inputs();
  const model::TokenBatch batch{inputs, w.batch, w.length};
  test::CpuSearchDecoder::Activations teacher, student;
  teacher_decoder.forward(batch, teacher, CpuModel(teacher_decoder).teacher());
  student_decoder.forward(batch, student, CpuModel::Architecture::discrete(ops));
  return model::kl_loss<double>(student_decoder.weights().head().view(), teacher.hidden.view(), student.hidden.view())
      .mean();
}

template <class E>
std::vector<E> download(const E* data, std::size_t n) {
  std::vector<E> out(n);
  dash::cuda::check(cudaMemcpy(out.data(), data, n * sizeof(E), cudaMemcpyDeviceToHost), "download");
  return out;
}

// teacher_forward, score and next_tokens on a stream of the test's own, every output poisoned first.
Scores gpu_scores(DeviceModel& m, const Windows& w, const std::vector<int>& ops) {
  const index_t rows = w.batch * w.length, d = m.config().d_model;
  const auto upload = [](const std::vector<int>& v) {
    Tensor<int> t(Shape{index_t(v.size())});
    std::copy(v.begin(), v.end(), t.data());
    return DeviceTensor<int>::from_host(t.view());
  };
  const DeviceTensor<int> inputs = upload(w.inputs()), targets = upload(w.targets());
  Tensor<float> pi(Shape{index_t(ops.size()) * n_ops}, 0.0f);
  std::vector<std::uint8_t> run(std::size_t(pi.numel()), 0);
  for (std::size_t l = 0; l < ops.size(); ++l) pi.data()[l * n_ops + ops[l]] = 1, run[l * n_ops + ops[l]] = 1;
  const DeviceTensor<float> pi_device = DeviceTensor<float>::from_host(pi.view());
  DeviceTensor<bfloat16> teacher(Shape{rows, d});
  DeviceTensor<int> next(Shape{rows});
  test::poison(teacher);
  test::poison(next);
  dash::cuda::check(cudaMemset(const_cast<float*>(m.scores()), 0xFF, 2 * sizeof(float)), "poison scores");
  dash::cuda::check(cudaMemset(const_cast<int*>(m.target_count()), 0xFF, sizeof(int)), "poison count");
  dash::cuda::check(cudaMemset(const_cast<bfloat16*>(m.teacher_hidden()), 0xFF,
                               std::size_t(rows * d) * sizeof(bfloat16)),
                    "poison teacher hidden");

  cudaStream_t stream = nullptr;
  dash::cuda::check(cudaStreamCreate(&stream), "stream");
  m.teacher_forward(inputs.data(), w.batch, w.length, stream);
  dash::cuda::check(cudaMemcpyAsync(teacher.data(), m.teacher_hidden(), std::size_t(rows * d) * sizeof(bfloat16),
                                    cudaMemcpyDeviceToDevice, stream),
                    "keep the teacher's hidden states");
  // The teacher's buffer is the model's: scoring must read only the copy.
  dash::cuda::check(cudaMemsetAsync(const_cast<bfloat16*>(m.teacher_hidden()), 0xFF,
                                    std::size_t(rows * d) * sizeof(bfloat16), stream),
                    "poison teacher hidden");
  m.score(inputs.data(), targets.data(), w.batch, w.length, pi_device.data(), run, teacher.data(), stream);
  m.next_tokens(inputs.data(), w.batch, w.length, pi_device.data(), run, next.data(), stream);
  m.check_tokens(stream);
  dash::cuda::check(cudaStreamSynchronize(stream), "synchronise");
  dash::cuda::check(cudaStreamDestroy(stream), "stream");

  const std::vector<float> sums = download(m.scores(), 2);
  const std::vector<int> count = download(m.target_count(), 1);
  CHECK(count[0] == rows);
  Scores s;
  s.kl = double(sums[0]) / double(rows), s.nll = double(sums[1]) / double(rows);
  s.next = download(next.data(), std::size_t(rows));
  return s;
}

double relative(double got, double want) {
  return std::isfinite(got) ? std::abs(got - want) / std::max(std::abs(want), 1e-300) : INFINITY;
}

// The GPU's scores of `ops` against the float64 reference, within the bounds the header states.
// With `held_out` false, the KL is not compared and the NLL is the test's own (cpu_scores).
void check_architecture(const std::string& what, DeviceModel& m, const test::SearchReference& ref, const Windows& w,
                        const std::vector<int>& ops, bool held_out = true) {
  const Scores got = gpu_scores(m, w, ops);
  const Scores want = cpu_scores(ref.exact, w, ops, held_out),
               shifted = cpu_scores(ref.perturbed_student, w, ops, held_out);
  const auto bound = [](double sensitivity) { return std::max(test::bf16_tolerance, 3 * sensitivity); };
  const double kl_error = relative(got.kl, want.kl);
  const double kl_bound =
      held_out ? bound(relative(cpu_kl(ref.perturbed_teacher, ref.perturbed_student, w, ops), want.kl)) : 0;
  const double nll_error = relative(got.nll, want.nll), nll_bound = bound(relative(shifted.nll, want.nll));

  // A position's argmax may differ where its top two logits are closer than 3 × the largest move
  // the perturbation makes in that position's logits.
  const std::size_t V = want.logits.size() / want.next.size();
  int near_ties = 0, mismatches = 0, unexplained = 0;
  double widest_tie = 0;
  for (std::size_t r = 0; r < want.next.size(); ++r) {
    double shift = 0;
    for (std::size_t v = r * V; v < (r + 1) * V; ++v)
      shift = std::max(shift, std::abs(shifted.logits[v] - want.logits[v]));
    widest_tie = std::max(widest_tie, 3 * shift);
    const bool near = want.gap[r] <= 3 * shift;
    near_ties += near;
    if (got.next[r] != want.next[r]) {
      ++mismatches;
      if (!near) {
        ++unexplained;
        INFO(what, ": position ", r, " GPU ", got.next[r], " CPU ", want.next[r], " gap ", want.gap[r]);
        CHECK(got.next[r] == want.next[r]);
      }
    }
  }
  MESSAGE(what, ": KL ", want.kl, " relative error ", kl_error, " (bound ", kl_bound, "), NLL ", want.nll,
          " relative error ", nll_error, " (bound ", nll_bound, "); next tokens: ", mismatches, " of ",
          want.next.size(), " differ, ", near_ties, " near ties (widest allowance ", widest_tie, ")");
  if (held_out) CHECK(kl_error <= kl_bound);
  CHECK(nll_error <= nll_bound);
  CHECK(unexplained == 0);
}

Windows random_windows(Rng& rng, index_t batch, index_t length, int vocab) {
  return {batch, length, test::random_ids(rng, batch * (length + 1), vocab)};
}

// One operator per layer at random, never softmax in every layer (that is the teacher, whose KL
// of 0 has no relative error to speak of: check_teacher covers it).
std::vector<int> random_ops(Rng& rng, int layers) {
  std::vector<int> ops(static_cast<std::size_t>(layers));
  for (int& op : ops) op = int(rng.below(n_ops));
  if (std::all_of(ops.begin(), ops.end(), [](int op) { return op == 0; }))
    ops[std::size_t(rng.below(std::uint64_t(layers)))] = 1 + int(rng.below(n_ops - 1));
  return ops;
}

// The all-softmax architecture is the teacher: KL 0 up to rounding, NLL the CPU teacher's.
void check_teacher(const std::string& what, DeviceModel& m, const test::SearchReference& ref, const Windows& w) {
  const std::vector<int> softmax(std::size_t(m.n_layers()), 0);
  const Scores got = gpu_scores(m, w, softmax);
  const Scores want = cpu_scores(ref.exact, w, softmax);
  MESSAGE(what, ", all-softmax: KL ", got.kl, ", NLL ", got.nll, " (CPU ", want.nll, ")");
  CHECK(std::abs(got.kl) <= 1e-5);
  CHECK(relative(got.nll, want.nll) <= test::bf16_tolerance);
}

}  // namespace

TEST_CASE("eval scoring on stories260K: KL, NLL and next tokens of discrete architectures match the CPU") {
  if (!test::gpu_available()) return;
  const std::optional<io::Checkpoint> stories = test::stories260k();
  if (!stories) return;
  Rng rng = test::rng_for("eval scoring stories260K");
  const io::Checkpoint& ckpt = *stories;
  SlidingWindow<> swa(16 + index_t(rng.below(16)), index_t(rng.below(3)));
  const test::SearchReference ref =
      test::make_search_reference(ckpt.config, ckpt.weights, rng, swa, GatedLinear{}, GatedDeltaNet{});
  const int L = ckpt.config.n_layers;
  // Two windows of 129 tokens, and one of 257 in a model that holds either.
  DeviceModel device(ref.exact, 2 * 257, 257);
  const Windows two = random_windows(rng, 2, 129, ckpt.config.vocab_size);
  const Windows one = random_windows(rng, 1, 257, ckpt.config.vocab_size);
  check_teacher("stories260K B 2 T 129", device, ref, two);
  check_architecture("stories260K B 2 T 129, random hybrid", device, ref, two, random_ops(rng, L));
  for (int op = 1; op < n_ops; ++op) {
    const std::string name = "stories260K B 1 T 257, every layer " + std::string(Mixer::op_names()[std::size_t(op)]);
    check_architecture(name, device, ref, one, std::vector<int>(std::size_t(L), op));
  }
}

TEST_CASE("eval scoring on random configs: d_head 64, GQA, bias, T above the chunk, odd vocabulary") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("eval scoring random configs");
  model::Config c = test::random_config(rng);
  c.n_layers = 3, c.d_head = 64, c.n_heads = 4, c.n_kv_heads = 2, c.d_model = 128;
  c.d_ff = 160 + 8 * int(rng.below(8));
  c.vocab_size = 201 + 2 * int(rng.below(100));
  c.qkv_bias = true;
  c.rope = {rng.below(2) ? RopeConfig::Style::half : RopeConfig::Style::interleaved, 10000.0};
  const model::Weights<double> w = model::Weights<double>::random(c, rng);
  GatedLinear gla;
  gla.rope = true, gla.gate_normaliser = 8;
  GatedDeltaNet gdn;
  gdn.scale = 0.5;
  const test::SearchReference ref =
      test::make_search_reference(c, w, rng, SlidingWindow<>(1 + index_t(rng.below(40)), index_t(rng.below(4))), gla, gdn);
  DeviceModel device(ref.exact, 3 * 65 + 7, 70);
  const Windows windows = random_windows(rng, 3, 65, c.vocab_size);
  check_teacher("random config B 3 T 65", device, ref, windows);
  check_architecture("random config B 3 T 65, random hybrid", device, ref, windows, random_ops(rng, c.n_layers));
  check_architecture("random config B 3 T 65, gla|swa|gdn", device, ref, windows, {2, 1, 3});
}

TEST_CASE("eval scoring with a large vocabulary: the logits come a chunk of rows at a time") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("eval scoring large vocabulary");
  model::Config c = test::random_config(rng);
  c.n_layers = 2, c.d_head = 8, c.n_heads = 2, c.n_kv_heads = 1, c.d_model = 16, c.d_ff = 24;
  // The loss's workspace holds chunks of 2²⁷ logits with their gradient: 896 rows at this
  // vocabulary (a multiple of 128); next_tokens' fp32 logits alone fit 2176 rows of it, so 2600
  // rows take two chunks, and score()'s KL and NLL passes several.
  c.vocab_size = 140001;
  c.context_length = 2048;
  const model::Weights<double> w = model::Weights<double>::random(c, rng);
  const test::SearchReference ref =
      test::make_search_reference(c, w, rng, SlidingWindow<>(37, 1), GatedLinear{}, GatedDeltaNet{});
  DeviceModel device(ref.exact, 2 * 1300, 1300);
  check_architecture("vocabulary 140001, B 2 T 1300, gdn|softmax", device, ref,
                     random_windows(rng, 2, 1300, c.vocab_size), {3, 0}, /*held_out=*/false);
}

TEST_CASE("argmax_rows: the first maximum of each row, NaN never wins") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("argmax rows");
  for (const int cols : {1, 7, 255, 256, 257, 5000}) {
    const index_t rows = 1 + index_t(rng.below(40)), ld = cols + index_t(rng.below(5));
    Tensor<float> values(Shape{rows, ld});
    for (index_t i = 0; i < values.numel(); ++i) values.data()[i] = float(rng.below(7));  // many ties
    values.data()[0] = NAN;
    const auto device_values = DeviceTensor<float>::from_host(values.view());
    DeviceTensor<int> out(Shape{rows});
    test::poison(out);
    cm::argmax_rows({.values = device_values.data(), .rows = rows, .cols = cols, .ld = ld, .out = out.data()}, nullptr);
    dash::cuda::check(cudaDeviceSynchronize(), "argmax");
    const std::vector<int> got = download(out.data(), std::size_t(rows));
    for (index_t r = 0; r < rows; ++r) {
      const float* row = values.data() + r * ld;
      int want = -1;
      for (int j = 0; j < cols; ++j)
        if (!std::isnan(row[j]) && (want < 0 || row[j] > row[want])) want = j;
      INFO("cols ", cols, " row ", r);
      CHECK(got[std::size_t(r)] == want);
    }
  }
}

TEST_CASE("argmax_rows refuses bad arguments before any launch") {
  using test::contains;
  using test::error_of;
  float value = 0;
  int out = 0;
  const cm::ArgmaxParams good{.values = &value, .rows = 1, .cols = 1, .ld = 1, .out = &out};
  cm::ArgmaxParams p = good;
  p.rows = 0;
  CHECK(contains(error_of([&] { cm::argmax_rows(p, nullptr); }), "rows = 0"));
  p = good, p.cols = 0;
  CHECK(contains(error_of([&] { cm::argmax_rows(p, nullptr); }), "cols = 0"));
  p = good, p.cols = 4, p.ld = 3;
  CHECK(contains(error_of([&] { cm::argmax_rows(p, nullptr); }), "ld = 3, expected at least cols = 4"));
  p = good, p.values = nullptr;
  CHECK(contains(error_of([&] { cm::argmax_rows(p, nullptr); }), "values is null"));
  p = good, p.out = nullptr;
  CHECK(contains(error_of([&] { cm::argmax_rows(p, nullptr); }), "out is null"));
}

TEST_CASE("eval scoring refuses bad batches and pointers before any launch") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("eval scoring bad input");
  model::Config c = test::random_config(rng);
  c.d_head = 8, c.n_heads = 2, c.n_kv_heads = 1, c.d_model = 16;
  const test::CpuSearchDecoder decoder = test::make_cpu_decoder(c, model::Weights<double>::random(c, rng), rng,
                                                                SlidingWindow<>(3), GatedLinear{}, GatedDeltaNet{});
  DeviceModel device(decoder, 20, 10);
  const int L = c.n_layers;
  const DeviceTensor<int> ids(Shape{20}), out(Shape{20});
  const DeviceTensor<float> pi(Shape{index_t(n_ops * L)});
  const DeviceTensor<bfloat16> teacher(Shape{20, c.d_model});
  const std::vector<std::uint8_t> run(std::size_t(n_ops * L), 1), short_run(3, 1);
  int* const next = const_cast<int*>(out.data());
  using test::contains;
  using test::error_of;
  CHECK(contains(error_of([&] { device.teacher_forward(ids.data(), 1, 11, nullptr); }),
                 "teacher_forward: length T = 11, expected 1 ... max_length = 10"));
  CHECK(contains(error_of([&] { device.teacher_forward(nullptr, 1, 5, nullptr); }), "teacher_forward: ids is null"));
  CHECK(contains(error_of([&] { device.score(ids.data(), ids.data(), 3, 10, pi.data(), run, teacher.data(), nullptr); }),
                 "score: batch × length = 3 × 10 exceeds max_tokens = 20"));
  CHECK(contains(error_of([&] { device.score(nullptr, ids.data(), 1, 5, pi.data(), run, teacher.data(), nullptr); }),
                 "score: ids is null"));
  CHECK(contains(error_of([&] { device.score(ids.data(), nullptr, 1, 5, pi.data(), run, teacher.data(), nullptr); }),
                 "score: targets is null"));
  CHECK(contains(error_of([&] { device.score(ids.data(), ids.data(), 1, 5, nullptr, run, teacher.data(), nullptr); }),
                 "score: pi is null"));
  CHECK(contains(error_of([&] { device.score(ids.data(), ids.data(), 1, 5, pi.data(), short_run, teacher.data(), nullptr); }),
                 "score: run has 3 flags"));
  CHECK(contains(error_of([&] { device.score(ids.data(), ids.data(), 1, 5, pi.data(), run, nullptr, nullptr); }),
                 "score: teacher_hidden is null"));
  CHECK(contains(error_of([&] { device.next_tokens(ids.data(), 0, 5, pi.data(), run, next, nullptr); }),
                 "next_tokens: batch = 0"));
  CHECK(contains(error_of([&] { device.next_tokens(ids.data(), 1, 5, pi.data(), run, nullptr, nullptr); }),
                 "next_tokens: out_ids is null"));
  CHECK(contains(error_of([&] { device.next_tokens(ids.data(), 20, 1, pi.data(), run, next, nullptr); }),
                 "bytes of operator scratch"));
}

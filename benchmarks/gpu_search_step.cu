// One step of the architecture search on the GPU (DeviceSearchModel): teacher forward, student
// forward with every operator of every layer mixed, the KL at the head with its gradient, and
// the student's backward to its inputs, with each layer's forward recomputed before its backward
// or its activations kept from the forward (Activations). Random bf16 weights (speed does not
// depend on the values), π uniform, every operator run, one stream.
//
// Reports the median ms per step over CUDA-event timings (enqueued launch by launch, and replayed
// as one CUDA graph as the search runs it), tokens/s, and in a timing mode (CUDA events around
// every GEMM and every other launch group of one step) where the time goes, and the GEMMs'
// achieved TFLOP/s against the same process's cuBLASLt rate on an 8192³ bf16 product; the
// fused loss (whose GEMMs run inside lm_loss: two logit products and d_hidden) is
// timed as one region. Device memory is what the process holds after the steps.
//
//   gpu_search_step [smollm2|qwen3b|all] [batch] [length] [recomputed|kept|both] [fastest|heuristic]
//       (default all: SmolLM2 16 × 2048, Qwen2.5-3B 4 × 4096; both; GEMM algorithms timed in the
//       warm-up as the dash tool does, or cuBLASLt's first heuristic choice)
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "dash/core/cuda.hpp"
#include "dash/mixed_attention.hpp"
#include "dash/model/config.hpp"
#include "dash/model/cuda/gemm.cuh"
#include "dash/model/cuda/search_model.cuh"
#include "dash/model/decoder.hpp"
#include "dash/model/weights.hpp"
#include "dash/ops/gated_delta_net.hpp"
#include "dash/ops/gated_linear.hpp"
#include "dash/ops/sliding_window.hpp"
#include "dash/ops/softmax.hpp"
#include "random_weights.hpp"

namespace {

using namespace dash;
namespace cm = dash::cuda::model;

model::Config shape(const std::string& name) {
  model::Config c;
  c.architecture = name;
  c.rope = RopeConfig{RopeConfig::Style::half, 10000.0};
  c.context_length = 32768;
  if (name == "smollm2") {
    c.n_layers = 30, c.d_model = 576, c.n_heads = 9, c.n_kv_heads = 3, c.d_head = 64, c.d_ff = 1536;
    c.vocab_size = 49152, c.tied_embeddings = true;
  } else if (name == "qwen3b") {
    c.n_layers = 36, c.d_model = 2048, c.n_heads = 16, c.n_kv_heads = 2, c.d_head = 128, c.d_ff = 11008;
    c.vocab_size = 151936, c.qkv_bias = true, c.tied_embeddings = false;
  } else {
    fail("gpu_search_step: unknown shape '", name, "' (smollm2, qwen3b)");
  }
  return c;
}

float elapsed(cudaEvent_t a, cudaEvent_t b) {
  float ms = 0;
  dash::cuda::check(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime");
  return ms;
}

// TFLOP/s of cuBLASLt on C[8192²] bf16 = A·Bᵀ, the reference rate.
double reference_rate(cudaStream_t stream) {
  const index_t n = 8192;
  dash::cuda::DeviceTensor<dash::cuda::bfloat16> a(Shape{n, n}), b(Shape{n, n}), c(Shape{n, n});
  a.fill_bytes(0x3c), b.fill_bytes(0x3c);
  dash::cuda::Gemm gemm;
  dash::cuda::DeviceTensor<std::uint8_t> workspace(Shape{index_t(gemm.workspace_bytes())});
  dash::cuda::GemmShape s;
  s.m = s.n = s.k = n, s.transpose_b = true;
  dash::cuda::GemmOperands o;
  o.a = a.data(), o.b = b.data(), o.c = c.data(), o.workspace = workspace.data(),
  o.workspace_bytes = gemm.workspace_bytes();
  cudaEvent_t start, stop;
  dash::cuda::check(cudaEventCreate(&start), "event");
  dash::cuda::check(cudaEventCreate(&stop), "event");
  for (int i = 0; i < 3; ++i) gemm(s, o, stream);
  std::vector<float> ms;
  for (int i = 0; i < 20; ++i) {
    dash::cuda::check(cudaEventRecord(start, stream), "record");
    gemm(s, o, stream);
    dash::cuda::check(cudaEventRecord(stop, stream), "record");
    dash::cuda::check(cudaEventSynchronize(stop), "sync");
    ms.push_back(elapsed(start, stop));
  }
  std::sort(ms.begin(), ms.end());
  cudaEventDestroy(start), cudaEventDestroy(stop);
  return 2.0 * double(n) * double(n) * double(n) / (double(ms[ms.size() / 2]) * 1e-3) / 1e12;
}

template <class... Ops>
void run(const std::string& name, index_t B, index_t T, cm::Activations activations, dash::cuda::GemmChoice choice,
         double reference_tflops, Ops... ops) {
  const model::Config c = shape(name);
  std::printf("\n%s: %d layers, d %d, %d/%d heads of %d, d_ff %d, vocab %d, B×T = %lld × %lld, %d operators, "
              "activations %s, GEMM algorithms %s\n",
              name.c_str(), c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_head, c.d_ff, c.vocab_size,
              (long long)B, (long long)T, int(sizeof...(Ops)),
              activations == cm::Activations::kept ? "kept" : "recomputed",
              choice == dash::cuda::GemmChoice::fastest ? "timed" : "heuristic");
  std::fflush(stdout);
  std::size_t free_before = 0, total = 0;
  dash::cuda::check(cudaMemGetInfo(&free_before, &total), "cudaMemGetInfo");
  using Mixer = BasicMixedAttention<float, Ops...>;
  Rng rng(7);
  const model::Decoder<float, Mixer> decoder(
      c, bench::random_weights(c),
      [&](int, const AttentionShape& s, AttentionWeights<float> a) { return Mixer(s, std::move(a), rng, ops...); });
  cm::DeviceSearchModel<Ops...> model(decoder, B * T, T, activations, choice);

  const int m = model.n_ops(), L = model.n_layers();
  Tensor<int> ids(Shape{B * T});
  for (index_t i = 0; i < ids.numel(); ++i) ids.data()[i] = int((i * 7919) % c.vocab_size);
  Tensor<float> pi(Shape{index_t(L * m)}, 1.0f / float(m));
  const auto ids_device = dash::cuda::DeviceTensor<int>::from_host(ids.view());
  const auto pi_device = dash::cuda::DeviceTensor<float>::from_host(pi.view());
  const std::vector<std::uint8_t> run(std::size_t(L * m), 1);
  cudaStream_t stream = model.stream();
  const auto step = [&] { model.step(ids_device.data(), B, T, pi_device.data(), run, stream); };

  cudaEvent_t start, stop;
  dash::cuda::check(cudaEventCreate(&start), "event");
  dash::cuda::check(cudaEventCreate(&stop), "event");
  // 10 steps after 2 of warm-up, each timed by CUDA events: the sorted milliseconds.
  const auto time_steps = [&](const auto& run_step) {
    for (int i = 0; i < 2; ++i) run_step();
    dash::cuda::check(cudaStreamSynchronize(stream), "sync");
    std::vector<float> times;
    for (int i = 0; i < 10; ++i) {
      dash::cuda::check(cudaEventRecord(start, stream), "record");
      run_step();
      dash::cuda::check(cudaEventRecord(stop, stream), "record");
      dash::cuda::check(cudaEventSynchronize(stop), "sync");
      times.push_back(elapsed(start, stop));
    }
    std::sort(times.begin(), times.end());
    return times;
  };
  const std::vector<float> ms = time_steps(step);
  const double step_ms = ms[ms.size() / 2];
  // The same steps replayed as one CUDA graph (what the search's kl_and_gradient runs).
  const std::vector<float> replayed_ms =
      time_steps([&] { model.replayed_step(ids_device.data(), B, T, pi_device.data(), run, stream); });
  std::size_t free_replayed = 0;
  dash::cuda::check(cudaMemGetInfo(&free_replayed, &total), "cudaMemGetInfo");
  float loss[2];
  dash::cuda::check(cudaMemcpy(loss, model.loss(), sizeof(loss), cudaMemcpyDeviceToHost), "copy loss");

  // Timing mode: one step with events around every GEMM and every other launch group.
  cm::StepTimer timer;
  model.set_timer(&timer);
  dash::cuda::check(cudaEventRecord(start, stream), "record");
  step();
  dash::cuda::check(cudaEventRecord(stop, stream), "record");
  dash::cuda::check(cudaEventSynchronize(stop), "sync");
  model.set_timer(nullptr);
  const double timed_step_ms = elapsed(start, stop);
  struct Group {
    int calls = 0;
    double ms = 0, flops = 0;
  };
  std::map<std::tuple<index_t, index_t, index_t>, Group> shapes;
  std::map<std::string, Group> regions;
  double gemm_ms = 0, gemm_flops = 0;
  for (std::size_t i = 0; i < timer.size(); ++i) {
    const auto& call = timer[i];
    const double t = elapsed(call.start, call.stop);
    if (call.label) {
      Group& g = regions[call.label];
      ++g.calls, g.ms += t;
      continue;
    }
    const double f = 2.0 * double(call.shape.m) * double(call.shape.n) * double(call.shape.k);
    Group& g = shapes[{call.shape.m, call.shape.n, call.shape.k}];
    ++g.calls, g.ms += t, g.flops += f;
    gemm_ms += t, gemm_flops += f;
  }
  const std::string loss_label = "lm loss (its 3 GEMMs inside)";
  const double loss_ms = regions[loss_label].ms;
  const double loss_flops = 3.0 * 2.0 * double(B * T) * double(c.vocab_size) * double(c.d_model);
  std::size_t free_after = 0;
  dash::cuda::check(cudaMemGetInfo(&free_after, &total), "cudaMemGetInfo");

  const double tflops = gemm_flops / (gemm_ms * 1e-3) / 1e12;
  std::printf("  KL of the last step %.5f\n", double(loss[1]));
  std::printf("  %-34s %10.2f ms  (min %.2f, max %.2f, 10 steps)\n", "step (median)", step_ms, double(ms.front()),
              double(ms.back()));
  std::printf("  %-34s %10.0f\n", "tokens/s", double(B * T) / (step_ms * 1e-3));
  std::printf("  %-34s %10.2f ms  (min %.2f, max %.2f, 10 steps)\n", "step replayed as a graph (median)",
              double(replayed_ms[replayed_ms.size() / 2]), double(replayed_ms.front()), double(replayed_ms.back()));
  std::printf("  %-34s %10.2f ms  (%.0f%% of the timed step, %.2f ms)\n", "GEMMs outside the loss, sum", gemm_ms,
              100 * gemm_ms / timed_step_ms, timed_step_ms);
  std::printf("  %-34s %10.1f TF/s = %.0f%% of the 8192^3 rate %.1f\n", "GEMMs outside the loss, achieved", tflops,
              100 * tflops / reference_tflops, reference_tflops);
  std::printf("  %-34s %10.2f ms  (%.1f TF/s counting its 3 GEMMs only, %.0f%% of 8192^3)\n", "fused KL loss",
              loss_ms, loss_flops / (loss_ms * 1e-3) / 1e12,
              100 * loss_flops / (loss_ms * 1e-3) / 1e12 / reference_tflops);
  std::printf("  %-34s %10.2f GiB (model workspace %.2f GiB; %.2f GiB with the step's graph)\n", "device memory held",
              double(free_before - free_after) / double(1ull << 30), double(model.workspace_bytes()) / double(1ull << 30),
              double(free_before - free_replayed) / double(1ull << 30));
  std::printf("  time by part of the timed step (calls, ms, share):\n");
  std::vector<std::pair<std::string, Group>> parts(regions.begin(), regions.end());
  parts.push_back({"GEMMs outside the loss", Group{0, gemm_ms, 0}});
  double listed = 0;
  for (const auto& p : parts) listed += p.second.ms;
  parts.push_back({"untimed (launch gaps, GLA rope, memsets)", Group{0, timed_step_ms - listed, 0}});
  std::sort(parts.begin(), parts.end(), [](const auto& a, const auto& b) { return a.second.ms > b.second.ms; });
  for (const auto& [label, g] : parts)
    std::printf("    %-42s %5d %9.2f ms %5.1f%%\n", label.c_str(), g.calls, g.ms, 100 * g.ms / timed_step_ms);
  std::printf("  GEMM shapes by time (m × n × k: calls, ms, TF/s):\n");
  std::vector<std::pair<std::tuple<index_t, index_t, index_t>, Group>> sorted(shapes.begin(), shapes.end());
  std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) { return a.second.ms > b.second.ms; });
  for (std::size_t i = 0; i < std::min<std::size_t>(sorted.size(), 12); ++i) {
    const auto& [key, g] = sorted[i];
    std::printf("    %6lld × %6lld × %6lld: %4d calls, %8.2f ms, %6.1f TF/s\n", (long long)std::get<0>(key),
                (long long)std::get<1>(key), (long long)std::get<2>(key), g.calls, g.ms,
                g.flops / (g.ms * 1e-3) / 1e12);
  }
  std::fflush(stdout);
  cudaEventDestroy(start), cudaEventDestroy(stop);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string which = argc > 1 ? argv[1] : "all";
    const index_t batch = argc > 2 ? std::atoll(argv[2]) : 0, length = argc > 3 ? std::atoll(argv[3]) : 0;
    const std::string mode = argc > 4 ? argv[4] : "both";
    const std::string algorithms = argc > 5 ? argv[5] : "fastest";
    if (algorithms != "fastest" && algorithms != "heuristic")
      fail("gpu_search_step: GEMM algorithms '", algorithms, "', expected fastest or heuristic");
    const auto choice =
        algorithms == "fastest" ? dash::cuda::GemmChoice::fastest : dash::cuda::GemmChoice::heuristic;
    std::vector<cm::Activations> modes;
    if (mode != "kept") modes.push_back(cm::Activations::recomputed);
    if (mode != "recomputed") modes.push_back(cm::Activations::kept);
    cudaStream_t stream = nullptr;
    dash::cuda::check(cudaStreamCreate(&stream), "stream");
    const double reference = reference_rate(stream);
    std::printf("cuBLASLt bf16 8192^3: %.1f TFLOP/s\n", reference);
    for (const cm::Activations a : modes) {
      if (which == "smollm2" || which == "all")
        run("smollm2", batch ? batch : 16, length ? length : 2048, a, choice, reference, Softmax{}, SlidingWindow<512>{},
            GatedLinear{}, GatedDeltaNet{});
      if (which == "qwen3b" || which == "all")
        run("qwen3b", batch ? batch : 4, length ? length : 4096, a, choice, reference, Softmax{}, SlidingWindow<2048>{},
            GatedLinear{});
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gpu_search_step: %s\n", e.what());
    return 1;
  }
}

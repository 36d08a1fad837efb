// Teacher forward of whole decoders on the GPU (DeviceDecoder: every layer softmax attention),
// bf16 weights, random values (speed does not depend on them), one stream. Reports ms per
// forward (median of CUDA-event timings), tokens/s and the share of time that its GEMMs would
// take at the cuBLASLt rate measured on the same GPU by an 8192³ product.
//
//   gpu_decoder [smollm2|qwen0.5b|qwen3b] [batch] [length]   (default: smollm2 and qwen0.5b, 16 × 2048)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "dash/core/cuda.hpp"
#include "dash/model/config.hpp"
#include "dash/model/cuda/decoder.cuh"
#include "dash/model/cuda/gemm.cuh"
#include "dash/model/weights.hpp"

namespace {

using namespace dash;

model::Config shape(const std::string& name) {
  model::Config c;
  c.architecture = name;
  c.rope = RopeConfig{RopeConfig::Style::half, 10000.0};
  if (name == "smollm2") {
    c.n_layers = 30, c.d_model = 576, c.n_heads = 9, c.n_kv_heads = 3, c.d_head = 64, c.d_ff = 1536;
    c.vocab_size = 49152;
  } else if (name == "qwen0.5b") {
    c.n_layers = 24, c.d_model = 896, c.n_heads = 14, c.n_kv_heads = 2, c.d_head = 64, c.d_ff = 4864;
    c.vocab_size = 151936, c.qkv_bias = true;
  } else if (name == "qwen3b") {
    c.n_layers = 36, c.d_model = 2048, c.n_heads = 16, c.n_kv_heads = 2, c.d_head = 128, c.d_ff = 11008;
    c.vocab_size = 151936, c.qkv_bias = true;
  } else {
    fail("gpu_decoder: unknown shape '", name, "' (smollm2, qwen0.5b, qwen3b)");
  }
  c.context_length = 32768;
  return c;
}

template <class F>
float median_ms(F&& f, int reps) {
  cudaEvent_t start, stop;
  dash::cuda::check(cudaEventCreate(&start), "cudaEventCreate");
  dash::cuda::check(cudaEventCreate(&stop), "cudaEventCreate");
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    dash::cuda::check(cudaEventRecord(start), "cudaEventRecord");
    f();
    dash::cuda::check(cudaEventRecord(stop), "cudaEventRecord");
    dash::cuda::check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float t = 0;
    dash::cuda::check(cudaEventElapsedTime(&t, start, stop), "cudaEventElapsedTime");
    ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ms[ms.size() / 2];
}

// bf16 GEMM TFLOP/s at 8192³ through the same wrapper: the rate the decoder's GEMMs are held to.
double gemm_rate() {
  const int n = 8192;
  Rng rng(2);
  Tensor<float> host(Shape{n, n});
  fill_normal(host.view(), rng, 0.0, 1.0);  // random operands: zeros or constants run faster
  const auto a = dash::cuda::to_device_bf16<float>(host.view());
  const auto b = dash::cuda::to_device_bf16<float>(host.view());
  dash::cuda::DeviceTensor<dash::cuda::bfloat16> c(Shape{n, n});
  dash::cuda::Gemm gemm;
  dash::cuda::DeviceTensor<unsigned char> ws(Shape{index_t(gemm.workspace_bytes())});
  dash::cuda::GemmShape s{};
  s.m = n, s.n = n, s.k = n, s.transpose_b = true, s.lda = n, s.ldb = n, s.ldc = n;
  dash::cuda::GemmOperands ops{};
  ops.a = a.data(), ops.b = b.data(), ops.c = c.data(), ops.workspace = ws.data(), ops.workspace_bytes = gemm.workspace_bytes();
  for (int i = 0; i < 3; ++i) gemm(s, ops, nullptr);
  const float ms = median_ms([&] { gemm(s, ops, nullptr); }, 10);
  return 2.0 * n * double(n) * n / (ms * 1e9);
}

void run(const std::string& name, index_t batch, index_t length, double rate) {
  const model::Config config = shape(name);
  Rng rng(1);
  const auto weights = model::Weights<float>::random(config, rng);
  dash::cuda::model::DeviceDecoder decoder(config, weights, batch * length, length);
  std::vector<int> ids(std::size_t(batch * length));
  for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = int((i * 7919) % std::size_t(config.vocab_size));
  dash::cuda::DeviceTensor<int> d_ids(Shape{batch * length});
  dash::cuda::check(cudaMemcpy(d_ids.data(), ids.data(), ids.size() * sizeof(int), cudaMemcpyHostToDevice), "ids");
  for (int i = 0; i < 3; ++i) decoder.forward(d_ids.data(), batch, length, nullptr);
  const float ms = median_ms([&] { decoder.forward(d_ids.data(), batch, length, nullptr); }, 10);
  // GEMM FLOPs of one forward (without the LM head, which forward does not run).
  const double N = double(batch * length), d = config.d_model, D = config.d_head;
  const double qkv = (config.n_heads + 2.0 * config.n_kv_heads) * D, o = config.n_heads * D;
  const double gemm_flops = 2 * N * config.n_layers * (d * qkv + o * d + 3 * d * config.d_ff);
  const double attention_flops = 4 * double(batch) * config.n_heads * D * (double(length) * (length + 1) / 2) *
                                 config.n_layers;
  std::printf("%-9s B=%lld T=%lld: forward %.2f ms, %.0f tokens/s; GEMMs %.1f TFLOP, attention %.1f TFLOP; "
              "GEMMs at the %.0f TFLOP/s rate would take %.0f%% of the time\n",
              name.c_str(), (long long)batch, (long long)length, ms, N / (ms * 1e-3), gemm_flops / 1e12,
              attention_flops / 1e12, rate, 100 * gemm_flops / (rate * 1e9) / ms);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (dash::cuda::device_count() == 0) {
      std::printf("gpu_decoder: no CUDA device visible\n");
      return 77;
    }
    const std::vector<std::string> names =
        argc > 1 ? std::vector<std::string>{argv[1]} : std::vector<std::string>{"smollm2", "qwen0.5b"};
    const index_t batch = argc > 2 ? std::atoll(argv[2]) : 16, length = argc > 3 ? std::atoll(argv[3]) : 2048;
    const double rate = gemm_rate();
    std::printf("cuBLASLt bf16 8192^3: %.0f TFLOP/s\n", rate);
    for (const auto& n : names) run(n, batch, length, rate);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gpu_decoder: %s\n", e.what());
    return 1;
  }
}

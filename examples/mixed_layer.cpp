// One hybrid-attention layer: softmax, a sliding window, gated linear attention and gated
// DeltaNet mixed by architecture logits, on a layer shaped like SmolLM2-135M's (hidden 576,
// 9 query heads / 3 KV heads of 64). Runs forward and backward on the CPU and prints the mixing
// weights π, dL/dα, and each operator's KV-cache cost at an 8K context.
#include <dash/ops/gated_delta_net.hpp>
#include <dash/ops/gated_linear.hpp>
#include <dash/ops/sliding_window.hpp>
#include <dash/ops/softmax.hpp>
#include <dash/search.hpp>

#include <chrono>
#include <cstdio>

int main() {
  using namespace dash;
  const AttentionShape shape{.d_model = 576, .n_heads = 9, .n_kv_heads = 3, .d_head = 64};
  const index_t batch = 1, tokens = 512;
  Rng rng(2026);

  // A stand-in for one layer of a pretrained teacher.
  MixedAttention<Softmax, SlidingWindow<>, GatedLinear, GatedDeltaNet> layer(
      shape, AttentionWeights<float>::random(shape, rng), rng, Softmax{}, SlidingWindow<>(128), GatedLinear{},
      GatedDeltaNet{});
  layer.set_logits({0.5f, 0.2f, -0.1f, -0.3f});

  Tensor<float> h(Shape{batch, tokens, shape.d_model}), y(h.shape()), dy(h.shape()), dh(h.shape(), 0.0f);
  fill_normal(h.view(), rng);
  fill_normal(dy.view(), rng);

  const auto start = std::chrono::steady_clock::now();
  decltype(layer)::Cache cache;
  layer.forward(h.view(), y.view(), cache);
  auto grads = layer.zero_gradients();
  layer.backward(h.view(), cache, dy.view(), dh.view(), grads);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  const auto pi = layer.weights();
  const auto costs = layer.costs(CostQuery{.shape = shape, .context = 8192});
  std::printf("one mixed layer, B=%lld T=%lld, d_model %d, %d/%d heads of %d: forward+backward %.2f s (%.0f tokens/s)\n",
              static_cast<long long>(batch), static_cast<long long>(tokens), shape.d_model, shape.n_heads,
              shape.n_kv_heads, shape.d_head, seconds, double(batch * tokens) / seconds);
  std::printf("%-8s %8s %12s %16s\n", "op", "pi", "dL/dalpha", "KV bytes @ 8K");
  for (std::size_t i = 0; i < layer.n_ops; ++i)
    std::printf("%-8.*s %8.4f %12.4e %16.0f\n", int(layer.op_names()[i].size()), layer.op_names()[i].data(),
                double(pi[i]), double(grads.logits[i]), costs[i].kv_bytes);
  return 0;
}

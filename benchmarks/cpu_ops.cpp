// CPU reference, forward + backward of each operator's token mixing, float32.
// Shapes: B = 1, 8 query heads of d_head 64, T ∈ {256, 1024, 4096}; Softmax and SlidingWindow
// read 2 k/v heads (GQA 4), the linear operators keep one state per query head, as they do by
// default in a layer. Reports tokens/s (B·T per forward + backward).
#include <benchmark/benchmark.h>

#include "dash/core/rng.hpp"
#include "dash/ops/gated_delta_net.hpp"
#include "dash/ops/gated_linear.hpp"
#include "dash/ops/sliding_window.hpp"
#include "dash/ops/softmax.hpp"

namespace {

using namespace dash;
constexpr index_t B = 1, H = 8, D = 64;

Tensor<float> normal(Shape s, Rng& rng, double mean = 0.0, double stddev = 1.0) {
  Tensor<float> t(s);
  fill_normal(t.view(), rng, mean, stddev);
  return t;
}

void count_tokens(benchmark::State& state, index_t T) {
  state.counters["tokens/s"] = benchmark::Counter(double(B * T), benchmark::Counter::kIsIterationInvariantRate);
}

template <class Op>
void attention(benchmark::State& state, const Op& op) {
  const index_t T = state.range(0), Hkv = 2;
  Rng rng(1);
  const Tensor<float> q = normal(Shape{B, T, H, D}, rng), k = normal(Shape{B, T, Hkv, D}, rng),
                      v = normal(Shape{B, T, Hkv, D}, rng), d_out = normal(Shape{B, T, H, D}, rng);
  Tensor<float> out(q.shape()), dq(q.shape(), 0.0f), dk(k.shape(), 0.0f), dv(v.shape(), 0.0f);
  typename Op::template Saved<float> saved;
  for (auto _ : state) {
    op.forward(q.view(), k.view(), v.view(), out.view(), saved);
    op.backward(q.view(), k.view(), v.view(), out.view(), saved, d_out.view(), dq.view(), dk.view(), dv.view());
    benchmark::DoNotOptimize(dq.data());
  }
  count_tokens(state, T);
}

void softmax(benchmark::State& state) { attention(state, Softmax{}); }
void sliding_window_512(benchmark::State& state) { attention(state, SlidingWindow<512>{}); }

void gated_linear(benchmark::State& state) {
  const index_t T = state.range(0), chunk = 64;
  Rng rng(2);
  const Tensor<float> q = normal(Shape{B, T, H, D}, rng), k = normal(Shape{B, T, H, D}, rng),
                      v = normal(Shape{B, T, H, D}, rng), g = normal(Shape{B, T, H}, rng, -0.03, 0.01),
                      d_out = normal(Shape{B, T, H, D}, rng);
  Tensor<float> out(q.shape()), dq(q.shape(), 0.0f), dk(k.shape(), 0.0f), dv(v.shape(), 0.0f), dg(g.shape(), 0.0f);
  const double scale = 1.0 / 8.0;
  for (auto _ : state) {
    eigen::gla::forward_chunked<float>(q.view(), k.view(), v.view(), g.view(), scale, chunk, {}, out.view());
    eigen::gla::backward_chunked<float>(q.view(), k.view(), v.view(), g.view(), scale, chunk, {}, d_out.view(), {},
                                        dq.view(), dk.view(), dv.view(), dg.view());
    benchmark::DoNotOptimize(dq.data());
  }
  count_tokens(state, T);
}

void gated_delta_net(benchmark::State& state) {
  const index_t T = state.range(0), chunk = 64;
  Rng rng(3);
  Tensor<float> q = normal(Shape{B, T, H, D}, rng), k = normal(Shape{B, T, H, D}, rng);
  // The operator feeds L2-normalised q and k to its core.
  for (Tensor<float>* x : {&q, &k})
    for (index_t r = 0; r < B * T * H; ++r) {
      float* row = x->data() + r * D;
      float norm = 0;
      for (index_t i = 0; i < D; ++i) norm += row[i] * row[i];
      for (index_t i = 0; i < D; ++i) row[i] /= std::sqrt(norm);
    }
  const Tensor<float> v = normal(Shape{B, T, H, D}, rng), g = normal(Shape{B, T, H}, rng, -0.03, 0.01),
                      beta = normal(Shape{B, T, H}, rng, 0.5, 0.1), d_out = normal(Shape{B, T, H, D}, rng);
  const index_t n_chunks = (T + chunk - 1) / chunk;
  Tensor<float> out(q.shape()), states(Shape{B, H, n_chunks + 1, D, D}), dq(q.shape(), 0.0f), dk(k.shape(), 0.0f),
      dv(v.shape(), 0.0f), dg(g.shape(), 0.0f), dbeta(beta.shape(), 0.0f);
  for (auto _ : state) {
    eigen::gdn::forward_chunked<float>(q.view(), k.view(), v.view(), g.view(), beta.view(), {}, out.view(),
                                       states.view(), chunk, 1.0);
    eigen::gdn::backward_chunked<float>(q.view(), k.view(), v.view(), g.view(), beta.view(), states.view(),
                                        d_out.view(), {}, dq.view(), dk.view(), dv.view(), dg.view(), dbeta.view(),
                                        {}, chunk, 1.0);
    benchmark::DoNotOptimize(dq.data());
  }
  count_tokens(state, T);
}

}  // namespace

BENCHMARK(softmax)->Arg(256)->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond);
BENCHMARK(sliding_window_512)->Arg(256)->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond);
BENCHMARK(gated_linear)->Arg(256)->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond);
BENCHMARK(gated_delta_net)->Arg(256)->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond);
BENCHMARK_MAIN();

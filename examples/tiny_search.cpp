// DASH on a transformer of your own, with random weights: embedding, x_{l+1} = x_l + Mixer_l(RMSNorm(x_l)), an LM
// head on x_L; each mixer mixes softmax, a sliding window and gated linear attention. DifferentiableSearch needs only
// the SearchModel contract, whose kl_and_gradient gives KL(all-softmax teacher ‖ mixed student) and dKL/dπ.
#include <dash/search.hpp>

#include <cstdio>
#include <vector>

using namespace dash;
using Mixer = MixedAttention<Softmax, SlidingWindow<8>, GatedLinear>;
constexpr std::size_t batch = 4, length = 64, vocab = 256, d = 64, L = 4, m = Mixer::n_ops;
constexpr AttentionShape shape{.d_model = d, .n_heads = 4, .n_kv_heads = 2, .d_head = 16};

struct TinyTransformer {
  using Batch = std::vector<int>;  // batch × length token ids
  struct Activations {
    std::vector<Tensor<float>> x, n;  // x_0 … x_L, RMSNorm(x_l)
    std::vector<Mixer::Cache> cache;
  };
  Tensor<float> embedding{Shape{vocab, d}}, head{Shape{vocab, d}}, gain{Shape{d}, 1.0f};
  std::vector<Mixer> layers;
  int n_layers() const { return int(L); }
  int n_ops() const { return int(m); }
  Activations forward(const Batch& ids, const search::Mixture& mix) const {
    const Tensor<float> zero(Shape{batch, length, d}, 0.0f);
    Activations a{std::vector(L + 1, zero), std::vector(L, zero), std::vector<Mixer::Cache>(L)};
    for (std::size_t i = 0; i < ids.size() * d; ++i) a.x[0].data()[i] = embedding(ids[i / d], i % d);
    for (std::size_t l = 0; l < L; ++l) {
      Mixer::Weights w;
      Mixer::OpMask run;
      for (std::size_t i = 0; i < m; ++i) w[i] = float(mix.weights[l * m + i]), run[i] = mix.run[l * m + i];
      model::rms_norm_forward<float>(a.x[l], gain, 1e-5, a.n[l]);
      layers[l].forward(a.n[l], a.x[l + 1], a.cache[l], w, run);
      eigen::vector(a.x[l + 1].view()) += eigen::vector(a.x[l].view());
    }
    return a;
  }
  double kl_and_gradient(const Batch& ids, search::Mixture& mix) const {
    const Activations teacher = forward(ids, one_hot(std::vector<int>(L, 0))), student = forward(ids, mix);
    Tensor<float> dx(student.x.back().shape(), 0.0f);
    const double kl = model::kl_loss<float>(head, teacher.x.back(), student.x.back(), dx).mean();
    for (std::size_t l = L; l-- > 0;) {
      Tensor<float> dn(dx.shape(), 0.0f);
      Mixer::Gradients grads;
      layers[l].backward(student.n[l], student.cache[l], dx, dn, grads);
      model::rms_norm_backward<float>(student.x[l], gain, 1e-5, dn, dx, {});  // dx: the residual path, plus this
      for (std::size_t i = 0; i < m; ++i) mix.grad[l * m + i] = grads.weights[i];
    }
    return kl;
  }
  search::Mixture one_hot(const std::vector<int>& ops) const {  // operator ops[l] at layer l
    search::Mixture mix(n_layers(), n_ops());
    for (std::size_t l = 0; l < L; ++l) mix.weights[l * m + ops[l]] = mix.run[l * m + ops[l]] = 1;
    return mix;
  }
};

int main() {
  Rng rng(2026);
  TinyTransformer model;
  fill_normal(model.embedding.view(), rng), fill_normal(model.head.view(), rng, 0.0, 0.25);
  while (model.layers.size() < L) model.layers.emplace_back(shape, AttentionWeights<float>::random(shape, rng), rng);
  const auto c = model.layers[0].costs({.shape = shape, .context = length});
  const auto costs = search::make_cost_table(search::Budget::parse("softmax-layers=1"),
                                             std::vector<std::vector<Cost>>(L, {c.begin(), c.end()}),
                                             {true, true, true}, c[0], {"softmax", "swa", "gla"});
  search::DifferentiableSearch search(model, costs, {.steps = 100});
  TinyTransformer::Batch ids(batch * length);
  while (!search.done()) {
    for (int& id : ids) id = int(rng.below(vocab));
    if (const auto r = search.step(ids); r.step % 20 == 0)
      std::printf("step %3d  tau %.2f  KL %.4f\n", int(r.step), r.temperature, r.kl);
  }
  const std::vector<int> ops = search.architecture();
  for (std::size_t l = 0; l < L; ++l) std::printf("layer %zu: %s\n", l, Mixer::op_names()[std::size_t(ops[l])].data());
  search::Mixture chosen = model.one_hot(ops), all_swa = model.one_hot(std::vector<int>(L, 1));
  std::printf("on the last batch, KL(teacher || chosen) %.4f, KL(teacher || all swa) %.4f\n",
              model.kl_and_gradient(ids, chosen), model.kl_and_gradient(ids, all_swa));
}

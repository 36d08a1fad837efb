// A token mixer of your own, searched alongside the library's. DecayedLinear is linear attention with a
// positive feature map and a fixed decay per head, on the teacher's Q, K, V after RoPE: a mixer whose state
// does not grow with the context and that needs no weights of its own. For each batch, query head h (reading
// kv head h / (H / Hkv)) and query i, with φ(x) = elu(x) + 1 > 0 elementwise:
//   w_ij = γ_h^{i−j} φ(q_i)·φ(k_j)  for j ≤ i,    z_i = Σ_j w_ij,    o_i = Σ_j w_ij v_j / z_i,
// a decayed, normalised average of the values, with RetNet's decays γ_h = 1 − 2^{−5−h} (memories of 32, 64, …
// tokens). In matrix form W = (φ(Q) φ(K)ᵀ) ⊙ Γ and O = diag(1/z) W V; backward, with δ_i = dO_i·o_i:
//   dV += (diag(1/z) W)ᵀ dO,    dG = diag(1/z) (dO Vᵀ − δ 1ᵀ) ⊙ Γ,
//   dQ += (dG φ(K)) ⊙ φ'(Q),    dK += (dGᵀ φ(Q)) ⊙ φ'(K),
// dK and dV summed over a kv head's query group. The code evaluates this parallel form, O(T²) per head;
// decoding runs the recurrence
//   S_i = γ S_{i−1} + φ(k_i) v_iᵀ,    s_i = γ s_{i−1} + φ(k_i),    o_i = S_iᵀ φ(q_i) / (s_i·φ(q_i)),
// whose state (a D×D matrix and a D-vector per query head) is what cost() reports.
//
// The example checks the backward against central differences, then searches stories260K for the best
// architecture with one softmax layer, every other layer DecayedLinear or gated linear attention. Gated
// linear attention starts here from the teacher's projections untrained, at the wrong scale (the dash tool
// aligns it to the teacher first: `dash prepare`), so it loses.
//   custom_operator [model [tokenizer [text]]]     (default: the repository's stories260K fixtures)
#include <dash/io/load.hpp>
#include <dash/io/text.hpp>
#include <dash/search.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

using namespace dash;

struct DecayedLinear {
  static constexpr std::string_view name = "dlinear";
  static constexpr bool shares_teacher_projections = true;  // mixes the teacher's q, k, v

  template <class T>
  struct Saved {};  // backward recomputes W from q and k

  static double decay(index_t head) { return 1 - std::exp2(-5.0 - double(head)); }  // γ_h

  // Γ of one head, [T, T]: γ^{i−j} for j ≤ i, else 0.
  template <class T>
  static eigen::Matrix<T> decay_mask(index_t head, index_t length) {
    const double g = decay(head);
    eigen::Matrix<T> mask = eigen::Matrix<T>::Zero(length, length);
    for (index_t i = 0; i < length; ++i)
      for (index_t j = 0; j <= i; ++j) mask(i, j) = T(std::pow(g, double(i - j)));
    return mask;
  }

  // φ(x) = elu(x) + 1 and φ'(x), elementwise.
  template <class M>
  static auto features(const M& x) {
    return x.unaryExpr([](auto e) { return e > 0 ? e + 1 : std::exp(e); }).eval();
  }
  template <class M>
  static auto feature_slopes(const M& x) {
    return x.unaryExpr([](auto e) { return e > 0 ? decltype(e)(1) : std::exp(e); }).eval();
  }

  // T is deduced from `saved` alone, so that tensors and views of T or const T all convert.
  template <class T>
  void forward(std::type_identity_t<TensorView<const T>> q, std::type_identity_t<TensorView<const T>> k,
               std::type_identity_t<TensorView<const T>> v, std::type_identity_t<TensorView<T>> out, Saved<T>&) const {
    const index_t group = q.dim(2) / k.dim(2);
    for (index_t h = 0; h < q.dim(2); ++h) {
      const eigen::Matrix<T> mask = decay_mask<T>(h, q.dim(1));
      for (index_t b = 0; b < q.dim(0); ++b) {
        const auto K = eigen::head(k, b, h / group), V = eigen::head(v, b, h / group);
        const eigen::Matrix<T> w = (features(eigen::head(q, b, h)) * features(K).transpose()).cwiseProduct(mask);
        eigen::head(out, b, h).noalias() = w.rowwise().sum().cwiseInverse().asDiagonal() * (w * V);
      }
    }
  }

  // Adds into dq, dk and dv.
  template <class T>
  void backward(std::type_identity_t<TensorView<const T>> q, std::type_identity_t<TensorView<const T>> k,
                std::type_identity_t<TensorView<const T>> v, std::type_identity_t<TensorView<const T>> out,
                const Saved<T>&, std::type_identity_t<TensorView<const T>> d_out,
                std::type_identity_t<TensorView<T>> dq, std::type_identity_t<TensorView<T>> dk,
                std::type_identity_t<TensorView<T>> dv) const {
    const index_t group = q.dim(2) / k.dim(2);
    for (index_t h = 0; h < q.dim(2); ++h) {
      const eigen::Matrix<T> mask = decay_mask<T>(h, q.dim(1));
      for (index_t b = 0; b < q.dim(0); ++b) {
        const auto Q = eigen::head(q, b, h), K = eigen::head(k, b, h / group), V = eigen::head(v, b, h / group);
        const auto O = eigen::head(out, b, h), dO = eigen::head(d_out, b, h);
        const eigen::Matrix<T> fq = features(Q), fk = features(K);
        const eigen::Matrix<T> w = (fq * fk.transpose()).cwiseProduct(mask);
        const eigen::Vector<T> inv_z = w.rowwise().sum().cwiseInverse();
        const eigen::Vector<T> delta = dO.cwiseProduct(O).rowwise().sum();
        const eigen::Matrix<T> dg = (inv_z.asDiagonal() * ((dO * V.transpose()).colwise() - delta)).cwiseProduct(mask);
        eigen::head(dv, b, h / group).noalias() += (inv_z.asDiagonal() * w).transpose() * dO;
        eigen::head(dq, b, h) += (dg * fk).cwiseProduct(feature_slopes(Q));
        eigen::head(dk, b, h / group) += (dg.transpose() * fq).cwiseProduct(feature_slopes(K));
      }
    }
  }

  // The recurrence's: per query head, a state of D² + D entries; per token, 3·D² to decay S and add
  // φ(k)vᵀ, 2·D to update s, 2·D² + 2·D to read o.
  Cost cost(const CostQuery& query) const {
    const double H = query.shape.n_heads, D = query.shape.d_head;
    return Cost{.kv_bytes = H * (D * D + D) * query.state_bytes_per_element,
                .flops = H * (5 * D * D + 4 * D) * double(query.context),
                .softmax_layers = 0};
  }
};

// The largest difference between backward's gradients and central differences of L = <dO, o(q, k, v)>,
// relative to the largest gradient, on a small random case in double with two query heads per kv head.
double backward_error() {
  Rng rng(1);
  const Shape qs{2, 9, 4, 4}, kvs{2, 9, 2, 4};
  Tensor<double> q(qs), k(kvs), v(kvs), d_out(qs), out(qs), dq(qs, 0.0), dk(kvs, 0.0), dv(kvs, 0.0);
  for (Tensor<double>* t : {&q, &k, &v, &d_out}) fill_normal(t->view(), rng);
  const DecayedLinear op;
  DecayedLinear::Saved<double> saved;
  const auto loss = [&] {
    op.forward<double>(q, k, v, out, saved);
    return eigen::vector(out.view()).dot(eigen::vector(d_out.view()));
  };
  loss();
  op.backward<double>(q, k, v, out, saved, d_out, dq, dk, dv);
  double error = 0, largest = 0;
  for (const auto& [x, dx] : {std::pair{&q, &dq}, {&k, &dk}, {&v, &dv}})
    for (index_t i = 0; i < x->numel(); ++i) {
      const double x0 = x->data()[i], step = 1e-5;
      x->data()[i] = x0 + step;
      const double up = loss();
      x->data()[i] = x0 - step;
      const double down = loss();
      x->data()[i] = x0;
      error = std::max(error, std::abs((up - down) / (2 * step) - dx->data()[i]));
      largest = std::max(largest, std::abs(dx->data()[i]));
    }
  return error / largest;
}

int main(int argc, char** argv) {
  const double error = backward_error();
  std::printf("DecayedLinear backward vs central differences: max error %.1e of the largest gradient\n", error);
  require(error < 1e-6, "DecayedLinear: backward is off by ", error, " of the largest gradient");

  const std::string fixtures = DASH_EXAMPLE_FIXTURES;
  const std::string model_path = argc > 1 ? argv[1] : fixtures + "/stories260K/stories260K.bin";
  std::optional<std::filesystem::path> tokenizer_path;  // a llama2.c model needs one; a GGUF carries its own
  if (argc > 2)
    tokenizer_path = argv[2];
  else if (argc == 1)
    tokenizer_path = fixtures + "/stories260K/tok512.bin";
  io::LoadedModel loaded = io::load_model(model_path, tokenizer_path);
  require(bool(loaded.tokenizer), model_path, ": no tokenizer, give one as the second argument");

  using Model = search::DecoderSearchModel<float, Softmax, DecayedLinear, GatedLinear>;
  Rng rng(0);
  const Model::Decoder decoder(loaded.checkpoint.config, std::move(loaded.checkpoint.weights),
                               [&](int, const AttentionShape& shape, AttentionWeights<float> teacher) {
                                 return Model::Mixer(shape, std::move(teacher), rng);
                               });
  Model model(decoder);

  // Windows of `batch` rows of length + 1 tokens: the search reads whole rows, the score predicts each
  // row's last `length` tokens from the first.
  constexpr index_t batch = 4, length = 64;
  std::vector<int> ids;
  for (const std::string& doc : io::read_documents(argc > 3 ? argv[3] : fixtures + "/text/tinystories_sample.txt")) {
    const std::vector<int> tokens = loaded.tokenizer->encode(doc, loaded.add_bos);
    ids.insert(ids.end(), tokens.begin(), tokens.end());
  }
  std::vector<std::vector<int>> windows;
  for (std::size_t at = 0, size = batch * (length + 1); at + size <= ids.size(); at += size)
    windows.emplace_back(ids.begin() + std::ptrdiff_t(at), ids.begin() + std::ptrdiff_t(at + size));
  require(!windows.empty(), "the text has ", ids.size(), " tokens, fewer than one window of ", batch * (length + 1));
  std::printf("%s: %d layers; %zu tokens of text in %zu windows of %lld × %lld\n", model_path.c_str(),
              decoder.n_layers(), ids.size(), windows.size(), static_cast<long long>(batch),
              static_cast<long long>(length + 1));

  std::vector<std::vector<Cost>> costs;
  for (const auto& mixer : decoder.mixers()) {
    const auto c = mixer.costs({.shape = mixer.shape(), .context = length});
    costs.emplace_back(c.begin(), c.end());
  }
  const auto names = Model::Mixer::op_names();
  search::DifferentiableSearch search(
      model,
      search::make_cost_table(search::Budget::parse("softmax-layers=1"), costs, {true, true, true},
                              costs[0][Model::softmax_index], {names.begin(), names.end()}),
      {.steps = 200});
  while (!search.done()) {
    const auto& window = windows[std::size_t(search.state().step) % windows.size()];
    if (const auto r = search.step({window, batch, length + 1}); r.step % 40 == 0)
      std::printf("step %3lld  tau %.2f  KL %.4f\n", static_cast<long long>(r.step), r.temperature, r.kl);
  }

  // The searched architecture, the teacher, and for comparison each place for the softmax layer with
  // DecayedLinear everywhere else, scored on the text the search read.
  const search::HeldOut<float, Softmax, DecayedLinear, GatedLinear> text(model, windows, batch, length);
  const auto report = [&](const std::vector<int>& ops, const char* what) {
    std::string layers;
    for (int op : ops) layers += std::string(names[std::size_t(op)]) + " ";
    const search::Quality q = text.score(ops);
    std::printf("  %-14s %-42s KL %.4f  NLL %.4f\n", what, layers.c_str(), q.kl, q.nll);
  };
  const std::size_t n_layers = std::size_t(decoder.n_layers());
  std::printf("KL(teacher || architecture) and next-token NLL, per token:\n");
  report(std::vector<int>(n_layers, 0), "teacher");
  report(search.architecture(), "searched");
  for (std::size_t l = 0; l < n_layers; ++l) {
    std::vector<int> ops(n_layers, 1);
    ops[l] = 0;
    report(ops, l == 0 ? "alternatives" : "");
  }
  report(std::vector<int>(n_layers, 2), "");
}

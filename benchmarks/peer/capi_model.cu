// C entry points for timing the decoder's GEMMs and the fused LM-head loss against PyTorch in
// the same process (benchmarks/peer/*.py pass torch tensors' data_ptr() and torch's stream).
// Matrices are row-major:
//   dash_gemm_bf16:  C[M, N] (bf16) = op(A)·op(B), fp32 accumulation; A is [M, K] (transa = 0)
//                    or [K, M] (transa = 1), B is [K, N] (transb = 0) or [N, K] (transb = 1);
//                    so x·Wᵀ for W [out, in] is (a = x, b = W, transb = 1).
//   dash_kl_loss:    Σ_t KL(p_teacher,t ‖ q_student,t) into *loss_sum (a device float), and, when
//                    d_student_hidden is not null, d(mean KL)/d(student_hidden) as bf16 [N, d];
//                    hidden states bf16 [N, d], head bf16 [V, d]. The workspace decides the chunk:
//                    dash_kl_loss_workspace gives the default (about 128 Mi logits per chunk).
// The cuBLASLt plans live in one dash::cuda::Gemm per GEMM workspace size, built on first use.
#include <cstddef>
#include <map>
#include <memory>

#include "capi.hpp"
#include "dash/model/cuda/gemm.cuh"
#include "dash/model/cuda/lm_loss.cuh"

namespace {

namespace cm = dash::cuda::model;

dash::cuda::Gemm& gemm_with_workspace(std::size_t bytes) {
  static std::map<std::size_t, std::unique_ptr<dash::cuda::Gemm>> gemms;
  auto& g = gemms[bytes];
  if (!g) g = std::make_unique<dash::cuda::Gemm>(bytes);
  return *g;
}

dash::cuda::Gemm& loss_gemm() { return gemm_with_workspace(dash::cuda::Gemm::default_workspace_bytes); }

cm::LmLossParams kl_params(const void* teacher_hidden, const void* student_hidden, const void* head, int N, int d,
                           int V) {
  cm::LmLossParams p;
  p.kind = cm::LmLoss::kl;
  p.teacher_hidden = static_cast<const dash::cuda::bfloat16*>(teacher_hidden);
  p.hidden = static_cast<const dash::cuda::bfloat16*>(student_hidden);
  p.head = static_cast<const dash::cuda::bfloat16*>(head);
  p.tokens = N, p.d_model = d, p.vocab = V;
  return p;
}

}  // namespace

extern "C" int dash_gemm_bf16(const void* a, const void* b, void* c, int M, int N, int K, int transa, int transb,
                              void* workspace, size_t workspace_bytes, void* stream) {
  return dash::peer::guarded([&] {
    dash::cuda::GemmShape s;
    s.m = M, s.n = N, s.k = K;
    s.transpose_a = transa != 0, s.transpose_b = transb != 0;
    dash::cuda::GemmOperands o;
    o.a = static_cast<const dash::cuda::bfloat16*>(a);
    o.b = static_cast<const dash::cuda::bfloat16*>(b);
    o.c = c;
    o.workspace = workspace, o.workspace_bytes = workspace_bytes;
    gemm_with_workspace(workspace_bytes)(s, o, static_cast<cudaStream_t>(stream));
  });
}

extern "C" size_t dash_kl_loss_workspace(int N, int d, int V) {
  std::size_t bytes = 0;
  const int status = dash::peer::guarded([&] {
    cm::LmLossParams p = kl_params(&bytes, &bytes, &bytes, N, d, V);
    p.loss_sum = reinterpret_cast<float*>(&bytes);
    p.d_hidden = &bytes;
    bytes = cm::lm_loss_workspace_bytes(loss_gemm(), p);
  });
  return status == 0 ? bytes : 0;
}

extern "C" int dash_kl_loss(const void* teacher_hidden, const void* student_hidden, const void* head, int N, int d,
                            int V, float* loss_sum, void* d_student_hidden, void* workspace, size_t workspace_bytes,
                            void* stream) {
  return dash::peer::guarded([&] {
    cm::LmLossParams p = kl_params(teacher_hidden, student_hidden, head, N, d, V);
    p.loss_sum = loss_sum;
    p.d_hidden = d_student_hidden;
    p.d_hidden_type = dash::DType::bf16;
    cm::lm_loss(loss_gemm(), p, workspace, workspace_bytes, static_cast<cudaStream_t>(stream));
  });
}

// Dense bf16 matrix products through cuBLASLt, in row-major terms:
//   C[m, n] (=, or += when accumulating) alpha · op(A)·op(B) (+ bias[n] broadcast over rows)
// A is stored [m, k] (op = identity) or [k, m] (op = transpose); B is stored [k, n] or [n, k].
// A and B are bf16, products accumulate in fp32 (CUBLAS_COMPUTE_32F), C is bf16 or fp32.
// The decoder's three products with a weight W [out, in] as checkpoints store it:
//   y  = x·Wᵀ    m = rows, n = out, k = in,   transpose_b
//   dx = dy·W    m = rows, n = in,  k = out
//   dW = dyᵀ·x   m = out,  n = in,  k = rows, transpose_a
// cuBLASLt is column-major: a row-major [r, c] matrix is its column-major transpose, so the
// product is computed as Cᵀ = op(B)ᵀ·op(A)ᵀ with the operands swapped.
//
// Gemm owns the cuBLASLt handle and one GemmPlan (descriptors, layouts, the chosen algorithm)
// per shape and operand alignment, built on first use and kept: a training step builds nothing.
// GemmPlan::run is the call path of a step. Neither is thread-safe.
//
// The algorithm is the heuristic's first choice, or with GemmChoice::fastest the fastest of its
// first few as timed on the plan's first run: on that call's operands, into a scratch C (so C is
// written once, as always), with the host waiting for the timings. That first call is then a
// warm-up (one allocation, one synchronisation; not inside a CUDA graph capture), and the
// choice, made from timings, may differ between processes, so results agree to rounding rather
// than bit for bit across runs. The heuristic's first choice is within 6% of the fastest on
// most large products, and up to 24% slower on thin ones (k = 576, n = 3072 on an H200).
#pragma once

#include <cublasLt.h>

#include <algorithm>
#include <cmath>
#include <compare>
#include <cstdint>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "dash/core/cuda.hpp"
#include "dash/core/dtype.hpp"
#include "dash/core/error.hpp"

namespace dash::cuda {

inline void check_cublas(cublasStatus_t status, const std::string& what) {
  if (status != CUBLAS_STATUS_SUCCESS)
    fail("cuBLASLt: ", what, ": ", cublasLtGetStatusName(status), " (", cublasLtGetStatusString(status), ")");
}

// What a plan is built for.
struct GemmShape {
  index_t m = 0, n = 0, k = 0;
  bool transpose_a = false;  // A stored [k, m] instead of [m, k]
  bool transpose_b = false;  // B stored [n, k] instead of [k, n]
  index_t lda = 0, ldb = 0, ldc = 0;  // elements between rows as stored; 0 = the stored width
  DType c_type = DType::bf16;         // bf16 or f32; a bias has this type too
  bool bias = false;
  bool accumulate = false;  // C += ... instead of C = ...

  index_t stored_a_width() const { return transpose_a ? m : k; }
  index_t stored_b_width() const { return transpose_b ? k : n; }
  index_t row_stride_a() const { return lda ? lda : stored_a_width(); }
  index_t row_stride_b() const { return ldb ? ldb : stored_b_width(); }
  index_t row_stride_c() const { return ldc ? ldc : n; }

  auto operator<=>(const GemmShape&) const = default;
};

// The operands of one call.
struct GemmOperands {
  const bfloat16* a = nullptr;
  const bfloat16* b = nullptr;
  void* c = nullptr;            // of shape.c_type
  const void* addend = nullptr; // with shape.accumulate: c = addend + A·B (same layout as c); null: c += A·B
  const void* bias = nullptr;   // [n] of shape.c_type, when shape.bias
  float alpha = 1;
  void* workspace = nullptr;    // at least Gemm::workspace_bytes(), 256-byte aligned
  std::size_t workspace_bytes = 0;
};

namespace detail {

// "C[m×n] f32 += A[k×m]ᵀ·B[k×n] + bias", with the stored shapes: what errors name.
inline std::string describe(const GemmShape& s) {
  std::ostringstream out;
  out << "gemm C[" << s.m << "×" << s.n << "] " << name_of(s.c_type) << (s.accumulate ? " += " : " = ");
  if (s.transpose_a)
    out << "A[" << s.k << "×" << s.m << "]ᵀ";
  else
    out << "A[" << s.m << "×" << s.k << "]";
  if (s.transpose_b)
    out << "·B[" << s.n << "×" << s.k << "]ᵀ";
  else
    out << "·B[" << s.k << "×" << s.n << "]";
  if (s.bias) out << " + bias[" << s.n << "]";
  out << " (row strides " << s.row_stride_a() << ", " << s.row_stride_b() << ", " << s.row_stride_c() << ")";
  return out.str();
}

// Largest power of two up to 256 that divides the address: what cuBLASLt may assume of it.
inline std::uint32_t alignment_of(const void* p) {
  const auto address = reinterpret_cast<std::uintptr_t>(p);
  if (address == 0) return 256;
  const std::uintptr_t lowest = address & (~address + 1);
  return static_cast<std::uint32_t>(lowest < 256 ? lowest : 256);
}

struct Alignments {
  std::uint32_t a = 256, b = 256, c = 256, bias = 256;
  auto operator<=>(const Alignments&) const = default;

  static Alignments of(const GemmOperands& o) {
    // C and D share the plan's layout, so the addend counts as C.
    return {alignment_of(o.a), alignment_of(o.b), std::min(alignment_of(o.c), alignment_of(o.addend)),
            alignment_of(o.bias)};
  }
  bool satisfied_by(const Alignments& actual) const {
    return actual.a >= a && actual.b >= b && actual.c >= c && actual.bias >= bias;
  }
};

// Each check builds its message only when it fails: these run on every call of a step.
inline void validate(const GemmShape& s) {
  if (s.m < 1 || s.n < 1 || s.k < 1) fail(describe(s), ": m, n and k must be at least 1");
  if (s.c_type != DType::bf16 && s.c_type != DType::f32)
    fail(describe(s), ": C must be bf16 or f32, not ", name_of(s.c_type));
  if (s.lda < 0 || s.ldb < 0 || s.ldc < 0) fail(describe(s), ": row strides must not be negative");
  if (s.row_stride_a() < s.stored_a_width())
    fail(describe(s), ": lda = ", s.row_stride_a(), " is below A's row width ", s.stored_a_width());
  if (s.row_stride_b() < s.stored_b_width())
    fail(describe(s), ": ldb = ", s.row_stride_b(), " is below B's row width ", s.stored_b_width());
  if (s.row_stride_c() < s.n) fail(describe(s), ": ldc = ", s.row_stride_c(), " is below C's row width ", s.n);
}

inline void validate(const GemmShape& s, const GemmOperands& o, std::size_t workspace_needed) {
  if (!o.a) fail(describe(s), ": A is null");
  if (!o.b) fail(describe(s), ": B is null");
  if (!o.c) fail(describe(s), ": C is null");
  if (o.addend && !s.accumulate) fail(describe(s), ": an addend is given but the shape does not accumulate");
  if (s.bias && !o.bias) fail(describe(s), ": bias is null");
  if (!s.bias && o.bias) fail(describe(s), ": a bias pointer is given but the shape has no bias");
  if (o.workspace_bytes < workspace_needed)
    fail(describe(s), ": workspace_bytes = ", o.workspace_bytes, ", expected at least ", workspace_needed);
  if (o.workspace_bytes > 0 && !o.workspace)
    fail(describe(s), ": workspace is null but workspace_bytes = ", o.workspace_bytes);
  if (o.workspace && alignment_of(o.workspace) < 256) fail(describe(s), ": workspace is not 256-byte aligned");
}

inline cudaDataType_t cuda_type(DType t) { return t == DType::f32 ? CUDA_R_32F : CUDA_R_16BF; }

}  // namespace detail

enum class GemmChoice { heuristic, fastest };

// How many of the heuristic's algorithms GemmChoice::fastest times, and runs of each.
inline constexpr int gemm_candidates = 8;
inline constexpr int gemm_timed_runs = 3;

class GemmPlan {
 public:
  GemmPlan(cublasLtHandle_t handle, const GemmShape& shape, const detail::Alignments& alignments,
           std::size_t workspace_limit, GemmChoice choice = GemmChoice::heuristic)
      : handle_(handle), shape_(shape), alignments_(alignments) {
    const std::string what = detail::describe(shape);
    const cudaDataType_t c_type = detail::cuda_type(shape.c_type);
    cublasLtMatmulDesc_t desc = nullptr;
    check_cublas(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), what);
    desc_.reset(desc);
    // cuBLASLt's first operand is our B, its second our A (see the top of the file).
    set(CUBLASLT_MATMUL_DESC_TRANSA, shape.transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N, what);
    set(CUBLASLT_MATMUL_DESC_TRANSB, shape.transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N, what);
    if (shape.bias) {
      set(CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_BIAS, what);
      set(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, std::int32_t(c_type), what);
      // The heuristic reads the bias pointer's alignment: any address of the planned alignment.
      set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, reinterpret_cast<const void*>(std::uintptr_t(alignments.bias)), what);
    }
    const auto layout = [&](Layout& out, cudaDataType_t type, index_t rows, index_t cols, index_t ld) {
      cublasLtMatrixLayout_t created = nullptr;
      check_cublas(cublasLtMatrixLayoutCreate(&created, type, std::uint64_t(rows), std::uint64_t(cols), ld), what);
      out.reset(created);
    };
    if (shape.transpose_b)
      layout(first_, CUDA_R_16BF, shape.k, shape.n, shape.row_stride_b());
    else
      layout(first_, CUDA_R_16BF, shape.n, shape.k, shape.row_stride_b());
    if (shape.transpose_a)
      layout(second_, CUDA_R_16BF, shape.m, shape.k, shape.row_stride_a());
    else
      layout(second_, CUDA_R_16BF, shape.k, shape.m, shape.row_stride_a());
    layout(result_, c_type, shape.n, shape.m, shape.row_stride_c());

    cublasLtMatmulPreference_t created = nullptr;
    check_cublas(cublasLtMatmulPreferenceCreate(&created), what);
    const Preference preference(created, &cublasLtMatmulPreferenceDestroy);
    const auto prefer = [&](cublasLtMatmulPreferenceAttributes_t attribute, auto value) {
      check_cublas(cublasLtMatmulPreferenceSetAttribute(preference.get(), attribute, &value, sizeof(value)), what);
    };
    prefer(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, std::uint64_t(workspace_limit));
    prefer(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignments.b);
    prefer(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignments.a);
    prefer(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignments.c);
    prefer(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignments.c);
    cublasLtMatmulHeuristicResult_t results[gemm_candidates]{};
    int found = 0;
    check_cublas(cublasLtMatmulAlgoGetHeuristic(handle_, desc_.get(), first_.get(), second_.get(), result_.get(),
                                                result_.get(), preference.get(),
                                                choice == GemmChoice::fastest ? gemm_candidates : 1, results, &found),
                 what + ": algorithm heuristic");
    require(found > 0, what, ": cuBLASLt has no algorithm for this shape with operand alignments ", alignments.a,
            ", ", alignments.b, ", ", alignments.c, " bytes and a ", workspace_limit, "-byte workspace");
    algo_ = results[0].algo;
    for (int i = 0; i < found; ++i) {
      workspace_bytes_ = std::max(workspace_bytes_, results[i].workspaceSize);
      if (found > 1) untimed_.push_back({results[i].algo});
    }
  }

  GemmPlan(const GemmPlan&) = delete;
  GemmPlan& operator=(const GemmPlan&) = delete;

  const GemmShape& shape() const { return shape_; }
  // What the algorithms it may choose use of the workspace (at most the Gemm's workspace_bytes()).
  std::size_t workspace_bytes() const { return workspace_bytes_; }

  // Enqueues the product on `stream`, after choosing the algorithm on the first run when the
  // plan was built for GemmChoice::fastest. The operands must be aligned at least as the plan's.
  void run(const GemmOperands& o, cudaStream_t stream) const {
    detail::validate(shape_, o, workspace_bytes_);
    if (!alignments_.satisfied_by(detail::Alignments::of(o)))
      fail(detail::describe(shape_), ": an operand is less aligned than the plan was built for");
    if (shape_.bias) set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, o.bias, "bias pointer");
    if (!untimed_.empty()) choose_fastest(o, stream);
    const cublasStatus_t status = enqueue(algo_, o, o.c, stream);
    if (status != CUBLAS_STATUS_SUCCESS) check_cublas(status, detail::describe(shape_));
  }

 private:
  using Desc = std::unique_ptr<cublasLtMatmulDescOpaque_t, decltype(&cublasLtMatmulDescDestroy)>;
  using Layout = std::unique_ptr<cublasLtMatrixLayoutOpaque_t, decltype(&cublasLtMatrixLayoutDestroy)>;
  using Preference = std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, decltype(&cublasLtMatmulPreferenceDestroy)>;

  cublasStatus_t enqueue(const cublasLtMatmulAlgo_t& algo, const GemmOperands& o, void* c, cudaStream_t stream) const {
    const float alpha = o.alpha, beta = shape_.accumulate ? 1.0f : 0.0f;
    const void* addend = o.addend ? o.addend : c;
    return cublasLtMatmul(handle_, desc_.get(), &alpha, o.b, first_.get(), o.a, second_.get(), &beta, addend,
                          result_.get(), c, result_.get(), &algo, o.workspace, o.workspace_bytes, stream);
  }

  // Times each candidate on o's A and B into a scratch C and keeps the fastest (the earliest of
  // equals); a candidate that fails to run is passed over.
  void choose_fastest(const GemmOperands& o, cudaStream_t stream) const {
    const std::string what = detail::describe(shape_) + ": timing algorithms";
    const std::size_t c_bytes = std::size_t(shape_.m - 1) * std::size_t(shape_.row_stride_c()) * size_of(shape_.c_type) +
                                std::size_t(shape_.n) * size_of(shape_.c_type);
    void* scratch = nullptr;
    check(cudaMallocAsync(&scratch, c_bytes, stream), what.c_str());
    cudaEvent_t start = nullptr, stop = nullptr;
    check(cudaEventCreate(&start), what.c_str());
    check(cudaEventCreate(&stop), what.c_str());
    float best = INFINITY;
    for (const Candidate& candidate : untimed_) {
      const cublasLtMatmulAlgo_t& algo = candidate.algo;
      if (enqueue(algo, o, scratch, stream) != CUBLAS_STATUS_SUCCESS) continue;  // warm-up
      float fastest_run = INFINITY;
      for (int r = 0; r < gemm_timed_runs; ++r) {
        check(cudaEventRecord(start, stream), what.c_str());
        check_cublas(enqueue(algo, o, scratch, stream), what);
        check(cudaEventRecord(stop, stream), what.c_str());
        check(cudaEventSynchronize(stop), what.c_str());
        float ms = 0;
        check(cudaEventElapsedTime(&ms, start, stop), what.c_str());
        fastest_run = std::min(fastest_run, ms);
      }
      if (fastest_run < best) best = fastest_run, algo_ = algo;
    }
    check(cudaEventDestroy(start), what.c_str());
    check(cudaEventDestroy(stop), what.c_str());
    check(cudaFreeAsync(scratch, stream), what.c_str());
    untimed_.clear();
  }

  template <class V>
  void set(cublasLtMatmulDescAttributes_t attribute, const V& value, const std::string& what) const {
    const cublasStatus_t status = cublasLtMatmulDescSetAttribute(desc_.get(), attribute, &value, sizeof(value));
    if (status != CUBLAS_STATUS_SUCCESS) check_cublas(status, what);
  }

  cublasLtHandle_t handle_;
  GemmShape shape_;
  detail::Alignments alignments_;
  Desc desc_{nullptr, &cublasLtMatmulDescDestroy};
  Layout first_{nullptr, &cublasLtMatrixLayoutDestroy};
  Layout second_{nullptr, &cublasLtMatrixLayoutDestroy};
  Layout result_{nullptr, &cublasLtMatrixLayoutDestroy};
  // A named holder: nvcc cannot keep cuBLASLt's anonymous algorithm struct in a std::vector.
  struct Candidate {
    cublasLtMatmulAlgo_t algo;
  };
  mutable cublasLtMatmulAlgo_t algo_{};
  mutable std::vector<Candidate> untimed_;  // GemmChoice::fastest, until the first run
  std::size_t workspace_bytes_ = 0;
};

class Gemm {
 public:
  // cuBLASLt's recommendation for Hopper: room for split-K and stream-K reductions.
  static constexpr std::size_t default_workspace_bytes = std::size_t(32) << 20;

  // Creates nothing on the device until the first plan.
  explicit Gemm(std::size_t workspace_bytes = default_workspace_bytes, GemmChoice choice = GemmChoice::heuristic)
      : workspace_bytes_(workspace_bytes), choice_(choice) {}
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;
  ~Gemm() {
    plans_.clear();
    if (handle_) cublasLtDestroy(handle_);
  }

  // The workspace every call must be given; plans choose algorithms that fit in it.
  std::size_t workspace_bytes() const { return workspace_bytes_; }

  // The plan for `shape` with operands aligned as `o`'s, built on first use.
  const GemmPlan& plan(const GemmShape& shape, const GemmOperands& o) {
    detail::validate(shape);
    detail::validate(shape, o, workspace_bytes_);
    const Key key{shape, detail::Alignments::of(o)};
    auto it = plans_.find(key);
    if (it == plans_.end()) {
      if (!handle_) check_cublas(cublasLtCreate(&handle_), "cublasLtCreate");
      it = plans_.emplace(key, std::make_unique<GemmPlan>(handle_, shape, key.alignments, workspace_bytes_, choice_))
               .first;
    }
    return *it->second;
  }

  // Plans (on first use) and enqueues C = alpha·op(A)·op(B) (+ bias) (+ C) on `stream`.
  void operator()(const GemmShape& shape, const GemmOperands& o, cudaStream_t stream) {
    plan(shape, o).run(o, stream);
  }

  std::size_t plan_count() const { return plans_.size(); }

 private:
  struct Key {
    GemmShape shape;
    detail::Alignments alignments;
    auto operator<=>(const Key&) const = default;
  };

  std::size_t workspace_bytes_;
  GemmChoice choice_;
  cublasLtHandle_t handle_ = nullptr;
  std::map<Key, std::unique_ptr<GemmPlan>> plans_;
};

}  // namespace dash::cuda

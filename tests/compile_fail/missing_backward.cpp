// A teacher-projection operator with a forward but no backward is not an operator.
// expect: dash operator: missing `backward\(q, k, v, out, saved, d_out, dq, dk, dv\)`
#include <string_view>

#include "dash/mixed_attention.hpp"

struct ForwardOnly {
  static constexpr std::string_view name = "forward-only";
  static constexpr bool shares_teacher_projections = true;
  template <class T>
  struct Saved {};
  dash::Cost cost(const dash::CostQuery&) const { return {}; }
  template <class T>
  void forward(dash::TensorView<const T>, dash::TensorView<const T>, dash::TensorView<const T>, dash::TensorView<T>,
               Saved<T>&) const {}
};

static_assert(sizeof(dash::BasicMixedAttention<double, ForwardOnly>) > 0);

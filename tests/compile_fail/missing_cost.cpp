// A type with a name but no cost model is not an operator.
// expect: dash operator: missing `Cost cost\(const CostQuery&\) const`
#include <string_view>

#include "dash/mixed_attention.hpp"

struct NoCost {
  static constexpr std::string_view name = "no-cost";
  static constexpr bool shares_teacher_projections = true;
};

static_assert(sizeof(dash::BasicMixedAttention<double, NoCost>) > 0);

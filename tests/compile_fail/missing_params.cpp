// An operator with its own weights must say what they are.
// expect: dash operator: missing `template <class T> struct Params`
#include <string_view>

#include "dash/mixed_attention.hpp"

struct NoParams {
  static constexpr std::string_view name = "no-params";
  static constexpr bool shares_teacher_projections = false;
  template <class T>
  struct Saved {};
  dash::Cost cost(const dash::CostQuery&) const { return {}; }
};

static_assert(sizeof(dash::BasicMixedAttention<double, NoParams>) > 0);

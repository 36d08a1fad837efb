// A type without a name is not an operator.
// expect: dash operator: missing `static constexpr std::string_view name`
#include "dash/mixed_attention.hpp"

struct Anonymous {};

static_assert(sizeof(dash::BasicMixedAttention<double, Anonymous>) > 0);

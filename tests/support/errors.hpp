// Checking what bad input is refused with: the message of the dash::Error a call throws.
#pragma once

#include <doctest/doctest.h>

#include <functional>
#include <string>
#include <string_view>

#include "dash/core/error.hpp"

namespace dash::test {

// The message of the dash::Error that f throws; a test failure when it throws none.
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  FAIL_CHECK("expected a dash::Error, none was thrown");
  return {};
}

inline bool contains(const std::string& text, std::string_view part) {
  return text.find(part) != std::string::npos;
}

}  // namespace dash::test

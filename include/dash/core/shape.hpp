// Shape: up to six extents, row-major. Small and trivially copyable so that views pass by value.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <ostream>

#include "dash/core/device.hpp"
#include "dash/core/error.hpp"

namespace dash {

using index_t = std::int64_t;

class Shape {
 public:
  static constexpr int max_rank = 6;

  constexpr Shape() = default;
  Shape(std::initializer_list<index_t> extents) {
    require(extents.size() <= max_rank, "Shape: rank ", extents.size(), " exceeds ", max_rank);
    for (index_t e : extents) {
      require(e >= 0, "Shape: extent ", e, " is negative");
      extent_[rank_++] = e;
    }
  }

  DASH_HOST_DEVICE constexpr int rank() const { return rank_; }
  DASH_HOST_DEVICE constexpr index_t operator[](int axis) const { return extent_[axis]; }
  DASH_HOST_DEVICE constexpr index_t numel() const {
    index_t n = 1;
    for (int i = 0; i < rank_; ++i) n *= extent_[i];
    return n;
  }
  // Row-major strides in elements.
  constexpr std::array<index_t, max_rank> strides() const {
    std::array<index_t, max_rank> s{};
    index_t step = 1;
    for (int i = rank_ - 1; i >= 0; --i) {
      s[i] = step;
      step *= extent_[i];
    }
    return s;
  }

  friend constexpr bool operator==(const Shape& a, const Shape& b) {
    if (a.rank_ != b.rank_) return false;
    for (int i = 0; i < a.rank_; ++i)
      if (a.extent_[i] != b.extent_[i]) return false;
    return true;
  }

  friend std::ostream& operator<<(std::ostream& os, const Shape& s) {
    os << '[';
    for (int i = 0; i < s.rank_; ++i) os << (i ? ", " : "") << s.extent_[i];
    return os << ']';
  }

 private:
  std::array<index_t, max_rank> extent_{};
  int rank_ = 0;
};

}  // namespace dash
